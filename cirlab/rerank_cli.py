"""``cirlab submit`` and ``cirlab convert``: the re-ranking verbs of the command line.

::

    cirlab submit runs/cirr_stage2 --split test          # recall_submission_*.json + recall_subset_submission_*.json
    cirlab convert model_base.pth runs/blip_base.pt --to cirlab --model blip_rerank_stage1 --preset cirr
    cirlab convert runs/cirr_stage2 stage2_blip.pt --to original --stage1-out stage1_blip.pt

    cirlab convert --from lavis blip_coco_retrieval.pth runs/lavis_stage1.pt --itm-head   # LAVIS BLIP -> stage I
    cirlab convert --from lavis blip2_pretrained_vitL.pth runs/lavis_cala.pt --model cala   # LAVIS BLIP-2 -> CaLa
    cirlab convert models/blip_cirr_exp runs/cala_released.pt --model cala --preset cirr   # CaLa's tuned_*.pt files
    cirlab convert runs/cala_cirr cala_files/ --to original                  # a CaLa run -> CaLa's tuned_*.pt files

``submit`` writes the two CIRR test-server files (https://github.com/Cuberick-Orion/CIRR, ``Test-split_server.md``)
of a run (stage I, stage II, or any CIR model trained on CIRR), validated against the split before writing.
``convert`` moves weights between the original layouts (BLIP ``model_base.pth``, the released stage I / II files of
https://github.com/Cuberick-Orion/Candidate-Reranking-CIR, a transformers BLIP folder) and cirlab checkpoints, and
reads LAVIS checkpoints (https://github.com/salesforce/LAVIS: ``blip_retrieval`` into the re-ranker's stage I, BLIP-2
``blip2_feature_extractor`` / ``pretrain`` / ``pretrain_vitL`` into CaLa; :mod:`cirlab.models.lavis_interop`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from cirlab.cli import DEFAULT_CHECKPOINT, checkpoint_of
from cirlab.core.paths import user_path

logger = logging.getLogger(__name__)


def register_cli(subparsers: Any) -> None:
    """Add ``cirlab submit`` and ``cirlab convert`` to the top-level CLI's subparsers (each one not already there:
    the CLI may hold a name-only placeholder for the command that is not being run)."""
    for name, add in (("submit", _add_submit), ("convert", _add_convert)):
        if name not in subparsers.choices:
            add(subparsers)


# ----------------------------------------------------------------------------------------------- submit


def _add_submit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit", help="write the CIRR test-server files of a run",
        description="Rank the CIRR test split with a trained run and write recall_submission_<name>.json (top 50, "
                    "reference removed) and recall_subset_submission_<name>.json (best 3 of the img_set), both "
                    "checked against the split first. A stage-II run re-ranks stage I's top-K "
                    "(eval.stage1_topk of its config, or its own frozen stage I).")
    p.add_argument("run", metavar="RUN", type=user_path, help="run folder (config.yaml + checkpoints/)")
    p.add_argument("--split", default="test",
                   help="split to rank (default: test = the config's dataset.test_split, test1 for CIRR)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="checkpoint in RUN/checkpoints/ (default: best.pt; last.pt also works, and either without .pt)")
    p.add_argument("--out", default=None, type=user_path, help="output folder (default: RUN/submission)")
    p.add_argument("--name", default=None, help="file name part (default: <run folder name>_<split>)")
    p.add_argument("--root", default=None, type=user_path, help="dataset root (default: the run config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set eval.stage1_topk=runs/cirr_stage1")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace submission files of the same name (without it they are refused before any work)")
    p.set_defaults(func=_run_submit)


def _device(name: str) -> str:
    from cirlab.engine.train import resolve_device

    return resolve_device(name, "cirlab submit --device")  # a GPU that is not there: one line, before any work


def _run_submit(args: argparse.Namespace) -> int:
    from cirlab.core.io import check_outputs, file_name_part
    from cirlab.core.retrieval import SUBMISSION_STEMS, save_cirr_submission
    from cirlab.data.catalog import canonical_name
    from cirlab.engine import rerank
    from cirlab.engine.runs import ConfigError, load_config, load_split, model_from_checkpoint

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"cirlab submit: {run} is not a run folder (no config.yaml)")
    config = load_config(run / "config.yaml", args.overrides + ([f"dataset.root={args.root}"] if args.root else []))
    dataset = canonical_name(str(config["dataset"]["name"]))
    if dataset != "cirr":  # the files are the CIRR test server's format; nothing else has such a server
        raise ConfigError(f"cirlab submit: {run} is a {dataset} run; the submission files are for the CIRR test "
                          "server, so submit takes CIRR runs only (cirlab eval scores other datasets)")
    split_name = config["dataset"]["test_split"] if args.split == "test" else args.split
    said = split_name
    if args.split == "test" and split_name == config["dataset"]["val_split"]:  # tiny configs test on val: say so
        said = f"{split_name} (--split test: the run config's dataset.test_split is its validation split)"
        logger.warning("cirlab submit: --split test ranks split %r: the run config's dataset.test_split is its "
                       "validation split, so these files are not a test submission", split_name)
    elif split_name == config["dataset"]["train_split"]:  # the server scores test1; training queries score high
        logger.warning("cirlab submit: --split %s ranks the training split, which the model was trained on: these "
                       "files are not a test submission", split_name)
    name = file_name_part(args.name, "--name") if args.name else f"{run.resolve().name}_{split_name}"
    out = Path(args.out) if args.out else run / "submission"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cirlab submit: --out {out} is a file; the two submission files go into a folder")
    device = _device(args.device)
    checkpoint, _ = checkpoint_of(str(run), args.checkpoint, "cirlab submit")  # as cirlab eval names it: last, last.pt
    check_outputs([out / f"{stem}_{name}.json" for stem in SUBMISSION_STEMS], overwrite=args.overwrite,
                  command="cirlab submit")
    (split,) = load_split(config, split_name)  # a wrong root fails before the model is read
    model, _ = model_from_checkpoint(checkpoint)
    model.to(device)
    try:
        submission = rerank.cirr_submission(model, split, eval_config={**config["eval"], "run_dir": str(run)},
                                            device=device)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        root = config["dataset"].get("root") or "the configured dataset"
        raise ConfigError(f"cirlab submit: {run}, split {said} of {root}: {err}") from None
    recall, subset = save_cirr_submission(submission, out, name)
    print(json.dumps({"recall": str(recall), "recall_subset": str(subset), "queries": len(split.triplets)}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- convert


_CONVERT_HELP = """\
--to cirlab (the default): read a checkpoint and write a cirlab checkpoint (usable by cirlab eval, and as
init_from / stage1_checkpoint) plus <OUT>.report.json (loaded, ignored, unmatched and missing keys).

Sources (--from):
  original  BLIP model_base.pth, a released stage-I (BLIP_Retrieval) or stage-II (BLIP_NLVR) file of
            Candidate-Reranking-CIR, a transformers BLIP folder, or a cirlab run; with --model cala, a folder
            of CaLa's saved files (tuned_blip_{text,multi,visual}_<suffix>.pt, tuned_tac_*, tuned_hca_*,
            tuned_artemis_*; the CLIP path's tuned_clip_* with a CLIP preset), sizes read from the files
  lavis     a LAVIS checkpoint ({"model": state_dict} .pth, or a .safetensors state dict):
            blip_retrieval -> blip_rerank_stage1 (momentum encoders and ITC queues are ignored;
            --itm-head keeps LAVIS's ITM head), BLIP-2 blip2_feature_extractor / pretrain (EVA ViT-g) /
            pretrain_vitL (CLIP ViT-L) -> cala (tower + the three Q-Former copies)
  auto      (default) lavis when the keys are a LAVIS layout (Qformer.* + query_tokens; or a BLIP ViT and text
            encoder with momentum encoders, queues or itm_head and no text_decoder), else original

LAVIS sources and CaLa's files: the sizes are read from the tensors and --preset gives everything else (the
loss, the frame, ...: pass the preset the files were trained with). Head counts are not in the tensors: the
preset's when its width is the same, else width // 64 (16 for 1024- and 1408-wide ViTs); set them with
--set vision_heads=N / text_heads=N / qformer_heads=N (CLIP: clip_text_heads=N). The report and the printed summary list the
model_overrides a run config needs to build the same model (e.g. for init_from: lavis:PATH).

--to original: write a cirlab run or checkpoint in the original code's file format: the re-ranker's stage I / II
files, or for CaLa a folder OUT of its tuned_*_<suffix>.pt files (the layout CaLa's own code loads; each
tuned_blip_* file is a LAVIS Blip2Qformer state dict).

An output that exists (OUT, --stage1-out, CaLa's files in OUT) is refused unless --overwrite.

Every error is one line naming the file (exit status 2)."""


def _add_convert(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints between the original BLIP / CaLa / LAVIS layouts and cirlab",
        description=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", type=user_path,
                   help="checkpoint file, transformers folder, cirlab run folder or a folder of CaLa's "
                        "tuned_*.pt files")
    p.add_argument("out", metavar="OUT", type=user_path, help="file to write (--to original for CaLa: a folder)")
    p.add_argument("--to", choices=("cirlab", "original"), default="cirlab",
                   help="target layout (default: cirlab)")
    p.add_argument("--from", dest="source_layout", choices=("auto", "original", "lavis"), default="auto",
                   help="source layout (default: auto = lavis when the keys are a LAVIS layout, else original)")
    p.add_argument("--model", choices=("blip_rerank_stage1", "blip_rerank_stage2", "cala"), default=None,
                   help="--to cirlab: the model to build (default: cala for a LAVIS BLIP-2 file, stage II for a "
                        "stage-II file, else stage I)")
    p.add_argument("--preset", default=None,
                   help="--to cirlab: model sizes (cirr / fashioniq = the papers' sizes, the default; tiny for test "
                        "files); for LAVIS sources and CaLa's files the sizes come from the tensors and the preset "
                        "gives the rest")
    p.add_argument("--itm-head", action="store_true",
                   help="--from lavis, blip_retrieval: build stage I with BLIP's ITM head and load LAVIS's "
                        "(itm_logits(); the re-ranker does not use it)")
    p.add_argument("--stage1", default=None, type=user_path,
                   help="--to cirlab, stage II: the frozen stage I to embed (a released stage-I file or a cirlab run)")
    p.add_argument("--stage1-out", default=None, type=user_path,
                   help="--to original, stage II: also write its frozen stage I (BLIP_Retrieval) to this file")
    p.add_argument("--suffix", default=None,
                   help="CaLa's files: the save to read (tuned_blip_text_<SUFFIX>.pt; default: the only one in the "
                        "folder) or to write (default: arithmetic, the name of CaLa's CIRR selection)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--to cirlab: model config fields, e.g. --set image_size=224")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT (and --stage1-out, and CaLa's files in OUT) when it exists; without it an "
                        "existing output is refused before any work")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    _refuse_existing(args)
    if not Path(args.source).exists():  # said first, in one form: each reader below named a missing path its own way
        from cirlab.core.errors import MissingPathError

        raise MissingPathError(f"cirlab convert: {args.source}: no such file or folder")
    if args.to == "original":
        if args.source_layout == "lavis":
            from cirlab.core.errors import ConfigError

            raise ConfigError("cirlab convert: --from lavis reads LAVIS checkpoints into cirlab (--to cirlab); "
                              "--to original writes a cirlab run in the re-ranker's original format")
        return _to_original(args)
    lavis = _lavis_source(args)
    if lavis is not None:
        return _lavis_to_cirlab(args, *lavis)
    if args.model == "cala":
        from cirlab.models.cala import saved_files_path

        if saved_files_path(args.source):
            return _cala_files_to_cirlab(args)
        from cirlab.core.errors import ConfigError
        from cirlab.models.cala import SOURCES

        raise ConfigError(f"cirlab convert: {args.source}: --model cala reads {SOURCES}")
    return _to_cirlab(args)


# options that only one direction reads: given with the other, they would be ignored, so they are refused
_CIRLAB_ONLY = {"model": "--model", "preset": "--preset", "itm_head": "--itm-head", "stage1": "--stage1",
                "overrides": "--set"}
_ORIGINAL_ONLY = {"stage1_out": "--stage1-out"}


def _refuse_existing(args: argparse.Namespace) -> None:
    """Before anything is read: refuse options the chosen direction would ignore, and (nothing written is lost) an
    output that is there already unless ``--overwrite``. A folder OUT (CaLa's files) is checked for the files it
    would replace in :func:`_cala_to_files`."""
    from cirlab.core.errors import ConfigError
    from cirlab.core.io import check_outputs

    unused = _CIRLAB_ONLY if args.to == "original" else _ORIGINAL_ONLY
    given = [flag for field, flag in unused.items() if getattr(args, field)]
    if given:
        raise ConfigError(f"cirlab convert: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                          f"--to {args.to} (see cirlab convert --help)")
    args.preset = args.preset or "cirr"
    if args.to == "original":  # OUT may be a folder there (CaLa's files), checked once the model is known
        check_outputs([args.stage1_out] + ([args.out] if not Path(args.out).is_dir() else []),
                      overwrite=args.overwrite, command="cirlab convert")
    else:
        check_outputs([args.out, f"{args.out}.report.json"], overwrite=args.overwrite, command="cirlab convert")


def _lavis_source(args: argparse.Namespace) -> tuple[str, dict] | None:
    """``(layout, state dict)`` when SRC is to be read as a LAVIS checkpoint, else None (the original path)."""
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.models import blip_interop, lavis_interop

    expected = {"blip_rerank_stage1": ("blip_retrieval",), "cala": ("blip2",)}.get(args.model or "",
                                                                                     ("blip_retrieval", "blip2"))
    if args.source_layout == "lavis":
        if args.model == "blip_rerank_stage2":
            raise CheckpointError(f"cirlab convert: {args.source}: --from lavis builds blip_rerank_stage1 or cala; "
                                  "start stage II from it with init_from: lavis:PATH")
        try:
            return lavis_interop.read_lavis_layout(args.source, expected=expected)
        except blip_interop.InteropError as err:
            raise CheckpointError(f"cirlab convert --from lavis: {err}") from None
    if args.source_layout == "original" or not Path(args.source).is_file():
        return None
    try:
        layout, state = lavis_interop.read_lavis_layout(args.source)
    except blip_interop.InteropError:
        return None  # not a LAVIS file: the original readers report what it is
    if args.model == "blip_rerank_stage2" or layout not in expected:  # stage II has no LAVIS layout
        raise CheckpointError(f"cirlab convert: {args.source} is a LAVIS {layout} checkpoint; it converts to "
                              f"{'cala' if layout == 'blip2' else 'blip_rerank_stage1'}, not {args.model}")
    return layout, state


def _lavis_to_cirlab(args: argparse.Namespace, layout: str, state: dict) -> int:
    """LAVIS blip_retrieval -> stage I, LAVIS BLIP-2 -> CaLa; checkpoint + ``<OUT>.report.json``."""
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.core.io import write_json
    from cirlab.engine.runs import parse_set_flat
    from cirlab.core.io import to_plain
    from cirlab.models import blip_interop, lavis_interop
    from cirlab.models.registry import create_model

    overrides = parse_set_flat(args.overrides)
    source = str(args.source)
    warnings = []
    try:
        if layout == "blip2":
            from cirlab.models import _hf_blip2 as hb
            from cirlab.models import cala

            if args.itm_head:
                warnings.append("--itm-head applies to blip_retrieval only: CaLa has no ITM head (ignored)")
            config, model_overrides = lavis_interop.cala_config_from(state, args.preset, **overrides)
            model = create_model("cala", config=config)
            report = cala.load_lavis_state(model, state, source)
            vocab, rows = len(hb.blip2_tokenizer(config.vocab_file)), int(config.vocab_size)
        else:
            from cirlab.models import _hf_blip as hf

            if args.itm_head and "itm_head.weight" not in state:
                raise blip_interop.InteropError(f"{source}: --itm-head, but the checkpoint has no itm_head.*")
            config, model_overrides = lavis_interop.stage1_config_from(state, args.preset, itm_head=args.itm_head,
                                                                      **overrides)
            model = create_model("blip_rerank_stage1", config=config)
            _, report = lavis_interop.convert_lavis_blip(state, model, keep_heads=False, source=source)
            blip_interop.check_usable(report, model)  # a file short of tensors it should hold: --set init_partial=true
            vocab, rows = len(hf.blip_tokenizer(config.vocab_file)), int(config.vocab_size or hf.MED_VOCAB_SIZE)
    except (blip_interop.InteropError, ValueError, TypeError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cirlab convert --from lavis: {' '.join(str(err).split())}") from None
    if vocab != rows:
        warnings.append(f"the tokenizer has {vocab} tokens and the checkpoint's text embedding {rows} rows: set "
                        "vocab_file to the vocabulary the checkpoint was trained with before encoding text")
    heads = {k: getattr(config, k) for k in ("vision_heads", "text_heads", "qformer_heads") if hasattr(config, k)}
    out = Path(args.out)
    _save_converted(out, model, source, f"lavis {layout}")
    summary = {"model": model.model_name, "checkpoint": str(out), "source_layout": f"lavis {layout}",
               "preset": args.preset, "model_overrides": to_plain(model_overrides), "heads": heads,
               "loaded": len(report.loaded), "ignored": len(report.ignored), "missing": list(report.missing),
               "unmatched": list(report.unmatched), "warnings": warnings}
    path = write_json(out.with_name(out.name + ".report.json"), {**summary, "reports": [report.to_dict()]})
    for line in warnings:
        logger.warning("%s", line)
    print(json.dumps({**summary, "report": str(path)}, indent=2))
    return 0


def _to_cirlab(args: argparse.Namespace) -> int:
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.core.io import write_json
    from cirlab.engine.runs import parse_set_flat
    from cirlab.models import blip_rerank

    overrides = parse_set_flat(args.overrides)
    stage = {"blip_rerank_stage1": 1, "blip_rerank_stage2": 2}.get(args.model or "")
    try:
        model, reports = blip_rerank.from_pretrained(args.source, stage=stage, preset=args.preset,
                                                     stage1=args.stage1, **overrides)
    except CheckpointError as err:  # said as the command's other refusals say it, with its flag
        said = str(err).replace("from_pretrained(stage1=...)", "cirlab convert --stage1", 1)
        raise CheckpointError(said.replace("from_pretrained", "cirlab convert", 1)) from None
    out = Path(args.out)
    _save_converted(out, model, str(args.source), "original BLIP")
    report = write_json(out.with_name(out.name + ".report.json"), [r.to_dict() for r in reports])
    print(json.dumps({"model": model.model_name, "checkpoint": str(out), "report": str(report),
                      "loaded": sum(len(r.loaded) for r in reports),
                      "missing": [k for r in reports for k in r.missing],
                      "unmatched": sum(len(r.unmatched) for r in reports)}, indent=2))
    return 0


def _to_original(args: argparse.Namespace) -> int:
    from cirlab.core.checkpoint import run_checkpoint
    from cirlab.core.errors import ConfigError
    from cirlab.core.io import check_outputs
    from cirlab.engine.runs import model_from_checkpoint
    from cirlab.models import blip_rerank

    checkpoint = run_checkpoint(args.source)
    model, meta = model_from_checkpoint(checkpoint)
    stage2 = isinstance(model, blip_rerank.BlipRerankStage2)
    if args.stage1_out and not stage2:
        raise ConfigError(f"cirlab convert: --stage1-out: {checkpoint} holds {model.model_name}, which has no frozen "
                          "stage I (only a stage-II run has)")
    if model.model_name == "cala":
        return _cala_to_files(args, model, int(meta.get("epoch") or 0))
    if not isinstance(model, (blip_rerank.BlipRerankStage1, blip_rerank.BlipRerankStage2)):
        raise ConfigError(f"cirlab convert: {checkpoint} holds {model.model_name}; --to original writes the "
                          "re-ranker's and CaLa's files")
    check_outputs([args.out], overwrite=args.overwrite, command="cirlab convert")  # a folder is CaLa's only
    written = {"out": str(blip_rerank.export_original(model, args.out))}
    if stage2 and args.stage1_out:
        written["stage1_out"] = str(blip_rerank.export_original(model.stage1, args.stage1_out))
    print(json.dumps(written, indent=2))
    return 0


def _cala_files_to_cirlab(args: argparse.Namespace) -> int:
    """A folder of CaLa's saved files -> a cirlab checkpoint + ``<OUT>.report.json`` (one report per file)."""
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.core.errors import ConfigError
    from cirlab.core.io import to_plain, write_json
    from cirlab.engine.runs import parse_set_flat
    from cirlab.models import blip_interop, cala
    from cirlab.models.registry import create_model

    overrides = parse_set_flat(args.overrides)
    try:  # the sizes come from the files (one file read, nothing built yet), the rest from the preset and --set
        config, model_overrides = cala.config_for_files(args.source, args.preset, suffix=args.suffix or "",
                                                        **overrides)
        model = create_model("cala", config=config)
        reports = cala.load_cala_files(model, args.source, suffix=args.suffix or "")
    except ConfigError as err:
        raise ConfigError(f"cirlab convert: {err}") from None
    except (blip_interop.InteropError, FileNotFoundError, ValueError, OSError) as err:
        raise CheckpointError(f"cirlab convert: {' '.join(str(err).split())}") from None
    bad = next((r for r in reports if r.mismatched), None)
    if bad is not None:
        key, src, dst = bad.mismatched[0]
        raise CheckpointError(f"cirlab convert: {bad.source}: {len(bad.mismatched)} tensors do not fit the model "
                              f"built from preset {args.preset!r} with the files' sizes and --set (e.g. {key}: file "
                              f"{list(src)} vs model {list(dst)}); drop the --set that changes a size, or pass the "
                              "preset the files were trained with")
    out = Path(args.out)
    _save_converted(out, model, str(args.source), "cala files")
    summary = {"model": "cala", "checkpoint": str(out), "source_layout": "cala files", "preset": args.preset,
               "model_overrides": to_plain(model_overrides),
               "files": [r.source for r in reports], "loaded": sum(len(r.loaded) for r in reports),
               "ignored": sum(len(r.ignored) for r in reports), "missing": [k for r in reports for k in r.missing]}
    path = write_json(out.with_name(out.name + ".report.json"), {**summary, "reports": [r.to_dict() for r in reports]})
    print(json.dumps({**summary, "report": str(path)}, indent=2))
    return 0


def _cala_to_files(args: argparse.Namespace, model: Any, epoch: int) -> int:
    """A CaLa run or checkpoint -> CaLa's own ``tuned_*_<suffix>.pt`` files in the folder OUT (never over others)."""
    from cirlab.core.errors import ConfigError
    from cirlab.core.io import file_name_part
    from cirlab.models import cala

    out, suffix = Path(args.out), file_name_part(args.suffix, "--suffix") if args.suffix else "arithmetic"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cirlab convert: {out} is a file; CaLa's files go into a folder")
    taken = sorted(out.glob(f"tuned_*_{suffix}.pt")) if out.is_dir() else []
    if taken and not args.overwrite:
        raise ConfigError(f"cirlab convert: {taken[0]} exists; pass --overwrite to replace CaLa's files there, or "
                          "choose another folder or --suffix")
    written = cala.export_cala_files(model, out, suffix=suffix, epoch=epoch)
    print(json.dumps({"out": str(out), "files": [p.name for p in written]}, indent=2))
    return 0


def _save_converted(out: Path, model: Any, source: str, layout: str | None = None) -> None:
    """A converted model as a cirlab checkpoint: weights, model name and config (so ``model_from_checkpoint``
    rebuilds it), and where it came from."""
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.core.io import to_plain

    meta = {"converted_from": source, **({"converted_layout": layout} if layout else {})}
    save_checkpoint(out, {"model": model.state_dict(), "model_name": model.model_name,
                          "model_config": to_plain(model.config.to_dict()), **meta})
