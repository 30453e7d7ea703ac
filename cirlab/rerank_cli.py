"""``cirlab submit`` and ``cirlab convert``: the re-ranking verbs of the command line.

::

    cirlab submit runs/cirr_stage2 --split test          # recall_submission_*.json + recall_subset_submission_*.json
    cirlab convert model_base.pth runs/blip_base.pt --to cirlab --model blip_rerank_stage1 --preset cirr
    cirlab convert runs/cirr_stage2 stage2_blip.pt --to original --stage1-out stage1_blip.pt

``submit`` writes the two CIRR test-server files (https://github.com/Cuberick-Orion/CIRR, ``Test-split_server.md``)
of a run (stage I, stage II, or any CIR model trained on CIRR), validated against the split before writing.
``convert`` moves weights between the original layouts (BLIP ``model_base.pth``, the released stage I / II files of
https://github.com/Cuberick-Orion/Candidate-Reranking-CIR, a transformers BLIP folder) and cirlab checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("run", metavar="RUN", help="run folder (config.yaml + checkpoints/)")
    p.add_argument("--split", default="test",
                   help="split to rank (default: test = the config's dataset.test_split, test1 for CIRR)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in RUN/checkpoints/ (default: best.pt)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/submission)")
    p.add_argument("--name", default=None, help="file name part (default: <run folder name>_<split>)")
    p.add_argument("--root", default=None, help="dataset root (default: the run config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set eval.stage1_topk=runs/cirr_stage1")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.set_defaults(func=_run_submit)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _run_submit(args: argparse.Namespace) -> int:
    from cirlab.core.retrieval import save_cirr_submission
    from cirlab.engine import rerank
    from cirlab.engine.runs import ConfigError, load_config, load_split, model_from_checkpoint

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"cirlab submit: {run} is not a run folder (no config.yaml)")
    config = load_config(run / "config.yaml", args.overrides + ([f"dataset.root={args.root}"] if args.root else []))
    split_name = config["dataset"]["test_split"] if args.split == "test" else args.split
    model, _ = model_from_checkpoint(run / "checkpoints" / args.checkpoint)
    device = _device(args.device)
    model.to(device)
    (split,) = load_split(config, split_name)
    try:
        submission = rerank.cirr_submission(model, split, eval_config={**config["eval"], "run_dir": str(run)},
                                            device=device)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        sys.stderr.write(f"cirlab submit: {err}\n")
        return 2
    name = args.name or f"{run.resolve().name}_{split_name}"
    recall, subset = save_cirr_submission(submission, Path(args.out) if args.out else run / "submission", name)
    print(json.dumps({"recall": str(recall), "recall_subset": str(subset), "queries": len(split.triplets)}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- convert


def _add_convert(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert re-ranker weights between the original layouts and cirlab",
        description="--to cirlab: read BLIP model_base.pth, a released stage-I (BLIP_Retrieval) or stage-II "
                    "(BLIP_NLVR) file, a transformers BLIP folder or a cirlab run, and write a cirlab checkpoint "
                    "(usable by cirlab eval, and as init_from / stage1_checkpoint) plus <OUT>.report.json (loaded, "
                    "unmatched, missing keys). --to original: write a cirlab run or checkpoint in the original "
                    "code's file format.")
    p.add_argument("source", metavar="SRC", help="checkpoint file, transformers folder or cirlab run folder")
    p.add_argument("out", metavar="OUT", help="file to write")
    p.add_argument("--to", choices=("cirlab", "original"), required=True, help="target layout")
    p.add_argument("--model", choices=("blip_rerank_stage1", "blip_rerank_stage2"), default=None,
                   help="--to cirlab: the model to build (default: stage II for a stage-II file, else stage I)")
    p.add_argument("--preset", default="cirr",
                   help="--to cirlab: model sizes (cirr / fashioniq = BLIP ViT-B, the default; tiny for test files)")
    p.add_argument("--stage1", default=None,
                   help="--to cirlab, stage II: the frozen stage I to embed (a released stage-I file or a cirlab run)")
    p.add_argument("--stage1-out", default=None,
                   help="--to original, stage II: also write its frozen stage I (BLIP_Retrieval) to this file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--to cirlab: model config fields, e.g. --set image_size=224")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    return _to_cirlab(args) if args.to == "cirlab" else _to_original(args)


def _to_cirlab(args: argparse.Namespace) -> int:
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.core.io import write_json
    from cirlab.engine.runs import parse_set
    from cirlab.engine.train import to_plain
    from cirlab.models import blip_rerank

    overrides = {".".join(path): value for path, value in parse_set(args.overrides)}
    stage = {"blip_rerank_stage1": 1, "blip_rerank_stage2": 2}.get(args.model or "")
    model, reports = blip_rerank.from_pretrained(args.source, stage=stage, preset=args.preset, stage1=args.stage1,
                                                 **overrides)
    out = Path(args.out)
    save_checkpoint(out, {"model": model.state_dict(), "model_name": model.model_name,
                          "model_config": to_plain(model.config.to_dict()), "converted_from": str(args.source)})
    report = write_json(out.with_name(out.name + ".report.json"), [r.to_dict() for r in reports])
    print(json.dumps({"model": model.model_name, "checkpoint": str(out), "report": str(report),
                      "loaded": sum(len(r.loaded) for r in reports),
                      "missing": [k for r in reports for k in r.missing],
                      "unmatched": sum(len(r.unmatched) for r in reports)}, indent=2))
    return 0


def _to_original(args: argparse.Namespace) -> int:
    from cirlab.engine.runs import model_from_checkpoint
    from cirlab.models import blip_rerank

    source = Path(args.source)
    checkpoint = source / "checkpoints" / "best.pt" if source.is_dir() else source
    model, _ = model_from_checkpoint(checkpoint)
    if not isinstance(model, (blip_rerank.BlipRerankStage1, blip_rerank.BlipRerankStage2)):
        sys.stderr.write(f"cirlab convert: {checkpoint} holds {model.model_name}, not a blip_rerank model\n")
        return 2
    written = {"out": str(blip_rerank.export_original(model, args.out))}
    if args.stage1_out and isinstance(model, blip_rerank.BlipRerankStage2):
        written["stage1_out"] = str(blip_rerank.export_original(model.stage1, args.stage1_out))
    print(json.dumps(written, indent=2))
    return 0
