"""HREM on the synthetic precomp dataset (CPU): does the instance-level relation module help, and is evaluation as
fast as the metrics path?

Part 1 (``--train``): three models with the same encoders and the same recipe, each trained with the one trainer
(``cirlab.engine.runs.run_experiment``) for several seeds, selected on dev by rsum, scored on test:

* ``hrem``: HREM's loss (distance-weighted triplet on ``(v, t)``; after ``--warmup`` iterations also the cross and
  enhanced terms from the instance-level module and 10 x the KL regulariser);
* ``no_instance``: the same encoders and triplet loss without the instance-level module (``instance_module=False``);
* ``vsepp``: the same encoders, VSE++ hardest-negative hinge (``base_loss=vse``, sum of violations in epoch 0);
* ``hrem_bug`` (only when named in ``--variants``): HREM with ``connection_bug=True``, the released code before its
  2023-10-25 fix, whose i2i / t2t connections come from the cross-modal similarities; the paper's numbers predate
  the fix.

The synthetic precomp set (``cirlab.data.generators.synthetic``) writes 5 captions per image that differ in
content (``full``, ``color``, ``shape``, ``layout``, ``relation``); only ``full`` identifies its image, so recall is
capped well below 100. ``--backbone tiny`` is a random-init tiny BERT with a whole-word vocabulary from the training
captions (trained at the base lr: a random BERT has nothing to protect), ``--backbone lite`` the real MiniLM-L6 at
HREM's BERT lr (about 6x slower per step on CPU).

Part 2 (``--eval-timing``): COCO-5K-sized random embeddings (5,000 images x 25,000 captions, 1024-d) through
``cirlab.engine.evaluate.evaluate_itm`` (DataLoader encoding of precomputed rows, ``score_itm``'s image x caption
shard loop with ``HREM.score``, metrics) against the metrics path (one matrix product + ``cirlab.core.metrics``).

Usage (the recorded run; the two halves of the seeds can run in parallel on 2 cores)::

    PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py --train --seeds 0 1 2 --out-dir /tmp/hrem_bench
    PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py --eval-timing --out-dir /tmp/hrem_bench
    PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py --report reports/benchmarks/hrem_synthetic.md \\
        --out-dir /tmp/hrem_bench

Writes JSON results under ``--out-dir`` and the Markdown report with ``--report`` (from whatever is there; a bare
name is ``reports/benchmarks/NAME.md``, a path with a folder or ending in ``.md`` is that file).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPORT_HELP, nonneg_int, positive_float, positive_int, report_arg, report_path,  # noqa: E402
                     seed_int, synthetic_sizes)

VARIANTS = {
    "hrem": {},
    "no_instance": {"instance_module": False},
    "vsepp": {"instance_module": False, "base_loss": "vse"},
    "hrem_bug": {"connection_bug": True},
}
DEFAULT_VARIANTS = ["hrem", "no_instance", "vsepp"]
KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def run_config(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"img_dim": 2048, "embed_size": args.embed, "img_hidden": args.embed // 2, "nhead": args.heads,
                 "warmup_iters": args.warmup, **VARIANTS[variant]}
    if args.backbone == "tiny":
        overrides.update(bert_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                      "intermediate_size": 128, "max_position_embeddings": 64},
                         bert_lr_scale=1.0)  # a random tiny BERT trains at the base lr
    name = f"{args.backbone}_{variant}_s{seed}"
    return {"name": name, "model": "hrem", "preset": args.backbone, "model_overrides": overrides,
            "dataset": {"name": "f30k", "root": "", "train_split": "train", "val_split": "dev", "test_split": "test",
                        "synthetic": {"size": args.size, "seed": 0, "image_size": 64,
                                      "out": str(Path(args.out_dir) / "data")}},
            "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "lr_milestones": [args.decay],
                      "seed": seed, "selection": "val", "selection_metric": "rsum", "log_every": 50,
                      "tensorboard": False, "progress": "none", "num_threads": args.threads},
            "eval": {"protocol": "full", "splits": ["test"], "batch_size": 128, "shard_size": 1000},
            "output_dir": str(Path(args.out_dir) / name)}


def train_all(args: argparse.Namespace) -> None:
    from cirlab.engine import runs

    for seed in args.seeds:
        for variant in args.variants:
            config = runs.with_defaults(run_config(variant, seed, args))
            out = Path(config["output_dir"])
            if (out / "bench_result.json").is_file():
                continue
            start = time.perf_counter()
            result = runs.run_experiment(config, overwrite=True)  # a run left without bench_result.json is redone
            record = {"variant": variant, "seed": seed, "backbone": args.backbone, "test": result["splits"]["test"],
                      "selection": result["selection"], "steps": result["steps"],
                      "minutes": (time.perf_counter() - start) / 60, "config": config}
            (out / "bench_result.json").write_text(json.dumps(record, indent=1, default=str))
            print(f"{variant} seed {seed}: test rsum {record['test']['rsum']:.1f} (best epoch "
                  f"{record['selection']['best_epoch']}, {record['minutes']:.1f} min)", flush=True)


# ------------------------------------------------------------------------------------------- eval timing


class _Rows:
    """A dataset whose items are row indices (the 'features' are precomputed embeddings)."""

    def __init__(self, n: int, key: str) -> None:
        self.n, self.key = n, key

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {self.key: i}


class _Split:
    def __init__(self, n_img: int) -> None:
        self.num_images, self.im_div = n_img, 5

    def image_dataset(self) -> _Rows:
        return _Rows(self.num_images, "image_feats")

    def caption_dataset(self) -> _Rows:
        return _Rows(5 * self.num_images, "text")


def _precomputed(img: torch.Tensor, txt: torch.Tensor) -> Any:
    """Encoders that look the embeddings up; ``score`` is HREM's (one matrix product). The module class is made
    here, not at module level, so that importing the script does not import torch: it parses its arguments first
    (a bad one is rejected in 0.1 s, not after torch's 1.5 s)."""
    import torch

    from cirlab.models.hrem import HREM

    class Precomputed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.img, self.txt = img, txt

        def encode_image(self, idx: torch.Tensor) -> torch.Tensor:
            return self.img[idx]

        def encode_text(self, idx: torch.Tensor) -> torch.Tensor:
            return self.txt[idx]

        def score(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return HREM.score(self, image, text)  # type: ignore[arg-type]

    return Precomputed()


class _Clock:
    """Wall and process CPU seconds of a block (CPU seconds stay meaningful on a shared, busy machine)."""

    def __enter__(self) -> "_Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def eval_timing(args: argparse.Namespace) -> None:
    import torch

    from cirlab.core import metrics as M
    from cirlab.engine.evaluate import encode_dataset, evaluate_itm, score_itm

    n, d = args.timing_images, 1024
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 1.2 * torch.randn(5 * n, d, generator=g), dim=-1)
    model = _precomputed(img, txt)
    rows = []
    for protocol in ("coco5k", "coco"):
        with _Clock() as mm:
            sims = img @ txt.T
        with _Clock() as path:
            sims = img @ txt.T
            ref = M.itm_metrics(sims)
            if protocol == "coco":
                one_k = M.coco_1k_metrics(sims)
                ref = {**{f"1k_{k}": v for k, v in one_k.items()}, **{f"5k_{k}": v for k, v in ref.items()}}
        del sims
        with _Clock() as ev:
            out = evaluate_itm(model, _Split(n), protocol, batch_size=args.timing_batch, shard_size=args.timing_shard)
        assert all(abs(out["metrics"][k] - ref[k]) < 1e-6 for k in ref), "evaluate_itm and the metrics path differ"
        rows.append({"protocol": protocol, "matmul": mm.wall, "matmul_cpu": mm.cpu, "metrics_path": path.wall,
                     "metrics_path_cpu": path.cpu, "evaluate_itm": ev.wall, "evaluate_itm_cpu": ev.cpu})
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    # where evaluate_itm's time goes: encoding through the DataLoader vs the shard loop
    with _Clock() as full:
        score_itm(model, _Split(n), batch_size=args.timing_batch, shard_size=args.timing_shard)
    with _Clock() as enc:
        encode_dataset(lambda b: model.encode_image(b["image_feats"]), _Split(n).image_dataset(),
                       batch_size=args.timing_batch)
        encode_dataset(lambda b: model.encode_text(b["text"]), _Split(n).caption_dataset(),
                       batch_size=args.timing_batch)
    record = {"images": n, "captions": 5 * n, "dim": d, "threads": torch.get_num_threads(), "rows": rows,
              "score_itm": full.wall, "score_itm_cpu": full.cpu, "encode_only": enc.wall, "encode_only_cpu": enc.cpu,
              "batch_size": args.timing_batch, "shard_size": args.timing_shard}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "eval_timing.json").write_text(json.dumps(record, indent=1))
    print(f"score_itm {full.cpu:.2f} CPU s of which encoding {enc.cpu:.2f} CPU s", flush=True)


# ------------------------------------------------------------------------------------------- report


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


PAIRS = [("hrem", "no_instance"), ("hrem", "vsepp"), ("hrem_bug", "no_instance"), ("hrem_bug", "hrem")]


def _paired(by_variant: dict[str, list[dict]]) -> list[str]:
    """Each HREM variant minus each baseline, seed by seed: the same seed gives the same initial encoders, data
    order and augmentations, so a run with the instance module repeats its baseline step for step until the warm-up
    ends (since the random BERT's fitted word table has its own generator; runs recorded before 2026-12-04 drew it
    after the module and so differed from the first step)."""
    out = []
    for model, base in PAIRS:
        mine = {r["seed"]: r["test"]["rsum"] for r in by_variant.get(model, [])}
        other = {r["seed"]: r["test"]["rsum"] for r in by_variant.get(base, [])}
        seeds = sorted(set(mine) & set(other))
        if not seeds:
            continue
        diffs = [mine[s] - other[s] for s in seeds]
        spread = ""
        if len(diffs) > 1 and statistics.stdev(diffs) > 0:  # paired t: the mean difference in standard errors
            t = statistics.mean(diffs) / (statistics.stdev(diffs) / len(diffs) ** 0.5)
            spread = f" ± {statistics.stdev(diffs):.1f} (sd), paired t = {t:.2f} over {len(diffs)} seeds"
        name = "HREM" if model == "hrem" else model
        out.append(f"- {name} - {base}, test rsum per seed: {', '.join(f'{d:+.1f}' for d in diffs)}; mean "
                   f"{statistics.mean(diffs):+.1f}{spread}; {name} higher in {sum(d > 0 for d in diffs)} of "
                   f"{len(diffs)} seeds.")
    return out + [""] if out else []


def write_report(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out_dir)
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*/bench_result.json"))]
    if not records and not (out / "eval_timing.json").is_file():  # an empty report would replace a committed one
        sys.exit(f"hrem_synthetic: no results in {out} (no */bench_result.json, no eval_timing.json): run --train "
                 "or --eval-timing with this --out-dir first; no report written")
    lines = ["# HREM on the synthetic precomp dataset (CPU)", ""]
    if records:
        tr, mo = records[0]["config"]["train"], records[0]["config"]["model_overrides"]
        seeds = " ".join(str(s) for s in sorted({r["seed"] for r in records}))
        size = records[0]["config"]["dataset"]["synthetic"]["size"]
        present = " ".join(v for v in VARIANTS if any(r["variant"] == v for r in records))
        lines += [f"Training: `PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py --train --backbone "
                  f"{records[0]['backbone']} --size {size} --variants {present} --seeds {seeds} "
                  f"--epochs {tr['epochs']} --batch {tr['batch_size']} --lr {tr['lr']} "
                  f"--decay {tr['lr_milestones'][0]} --warmup {mo['warmup_iters']} --embed {mo['embed_size']} "
                  f"--out-dir {args.out_dir}` (the seeds ran "
                  "as 2 parallel processes, the seeds or the variants split between them)", ""]
    if (out / "eval_timing.json").is_file():
        lines += [f"Evaluation timing: `PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py --eval-timing "
                  f"--out-dir {args.out_dir}`", ""]
    lines += [f"Report: `{args.command}`", "",
             f"Machine: CPU ({platform.machine()}), {args.threads} torch thread(s) per run, shared with other jobs; "
             f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.", ""]
    if records:
        first = records[0]["config"]
        tr, mo = first["train"], first["model_overrides"]
        from cirlab.data.generators.synthetic import SIZES

        size = first["dataset"]["synthetic"]["size"]
        n_train, n_dev, n_test = SIZES[size].precomp
        per_epoch = 5 * n_train // tr["batch_size"]
        lines += [f"Data: `cirlab.data.generators.synthetic` precomp, size `{size}` (train {n_train} images / "
                  f"{5 * n_train} captions, dev {n_dev}, test {n_test}; 5 captions each, only the `full` caption "
                  "identifies its image). Encoders: HREM's image branch (FC + MLP with BN, MaxK + one-layer "
                  f"Transformer, 0.8/0.2) and text branch on backbone `{records[0]['backbone']}`, embed "
                  f"{mo['embed_size']}, {mo['nhead']} heads. Recipe (all variants): AdamW lr {tr['lr']} (BERT lr "
                  f"{mo.get('bert_lr_scale', 0.1)} x lr), "
                  f"weight decay 1e-4, batch {tr['batch_size']}, {tr['epochs']} epochs, x0.1 at epoch "
                  f"{tr['lr_milestones'][0]}, clip 2, text augmentation and region drop on; instance module from "
                  f"iteration {mo['warmup_iters']} ({per_epoch} iterations per epoch). Selection on **dev** by rsum; "
                  f"numbers are on test ({n_test} x {5 * n_test}, full matrix) with the selected weights.", ""]
        lines += ["| variant | seeds | " + " | ".join(KEYS) + " | best epochs (from 1) | min/run |",
                  "|---|---|" + "---|" * len(KEYS) + "---|---|"]
        by_variant: dict[str, list[dict]] = {}
        for r in records:
            by_variant.setdefault(r["variant"], []).append(r)
        for variant in VARIANTS:
            rs = by_variant.get(variant)
            if not rs:
                continue
            cells = [_fmt([r["test"][k] for r in rs]) for k in KEYS]
            epochs = ",".join(str(r["selection"]["best_epoch"]) for r in rs)
            minutes = statistics.mean(r["minutes"] for r in rs)
            lines.append(f"| {variant} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                         + f" | {epochs} | {minutes:.1f} |")
        legend = {"hrem": "HREM as cirlab builds it (connections after the 2023-10-25 fix)",
                  "no_instance": "the same encoders without the instance-level module",
                  "vsepp": "the same encoders with the VSE++ hardest-negative loss",
                  "hrem_bug": "HREM with connection_bug=True (the released code before the fix)"}
        lines += ["", "Variants: " + "; ".join(f"`{v}` {legend[v]}" for v in VARIANTS if v in by_variant) + "."]
        lines += ["", "Per seed (test rsum):", "", "| seed | " + " | ".join(v for v in VARIANTS if v in by_variant)
                  + " |", "|---|" + "---|" * len(by_variant)]
        seeds = sorted({r["seed"] for r in records})
        for s in seeds:
            cells = []
            for v in VARIANTS:
                if v in by_variant:
                    hit = [r["test"]["rsum"] for r in by_variant[v] if r["seed"] == s]
                    cells.append(f"{hit[0]:.1f}" if hit else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _paired(by_variant)
        last = sum(r["selection"]["best_epoch"] >= tr["epochs"] - 1 for r in records)  # counted from 1
        lines += [f"Caveats: the test split has {n_test} images, so one image is {100 / n_test:g} point(s) of i2t R@1 "
                  f"and seed-to-seed spread is large; {last} of {len(records)} runs selected one of their last two "
                  "epochs (a short CPU recipe: still improving); synthetic region features and captions, "
                  f"{'a random tiny BERT' if records[0]['backbone'] == 'tiny' else 'MiniLM-L6'}, not the paper's data "
                  "or BERT-base; min/run is wall time on a shared machine. A paired "
                  "difference smaller than its sd is not evidence either way; this is not a replication of the "
                  "paper's margins.", ""]
    timing = out / "eval_timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text(encoding="utf-8"))
        lines += ["## Evaluation speed on COCO-5K-sized embeddings", "",
                  f"{t['images']:,} images x {t['captions']:,} captions, {t['dim']}-d random unit embeddings "
                  f"(precomputed; no encoder cost), {t['threads']} thread(s). `evaluate_itm` = DataLoader over the "
                  f"rows (batch {t['batch_size']}) + `score_itm`'s {t['shard_size']} x {t['shard_size']} shard loop "
                  "calling `HREM.score` (one matmul per block) + metrics; the metrics path = one `img @ txt.T` + "
                  "`cirlab.core.metrics` (identical metrics, checked).", "",
                  "Process CPU seconds (one thread, so these do not depend on what else the shared machine runs); "
                  "wall seconds in brackets.", "",
                  "| protocol | matmul alone | metrics path | evaluate_itm | evaluate_itm / metrics path (CPU) |",
                  "|---|---|---|---|---|"]
        for row in t["rows"]:
            cells = [f"{row[k + '_cpu']:.1f} ({row[k]:.1f})" for k in ("matmul", "metrics_path", "evaluate_itm")]
            lines.append(f"| {row['protocol']} | " + " | ".join(cells)
                         + f" | {row['evaluate_itm_cpu'] / row['metrics_path_cpu']:.2f} |")
        rows_n = t["images"] + t["captions"]
        lines += ["", f"`score_itm` alone (the full matrix): {t['score_itm_cpu']:.1f} CPU s, of which encoding the "
                  f"{rows_n:,} rows through the DataLoader {t['encode_only_cpu']:.1f} CPU s.", ""]
    path = report_path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)  # a new folder failed here, after --train had run
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train every --variants x --seeds run into --out-dir")
    p.add_argument("--eval-timing", action="store_true", help="time evaluation on COCO-5K-sized random embeddings")
    p.add_argument("--report", type=report_arg, default="",
                   help=f"write the Markdown report from what --out-dir holds: {REPORT_HELP}")
    p.add_argument("--out-dir", default="/tmp/hrem_bench", help="run folders and JSON results (default: %(default)s)")
    p.add_argument("--backbone", choices=("tiny", "lite"), default="tiny",
                   help="text encoder: random tiny BERT or MiniLM-L6 (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="what to train (default: %(default)s; hrem_bug only when named)")
    p.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2],
                   help="training seeds (default: %(default)s)")
    p.add_argument("--size", default="small", choices=synthetic_sizes(),
                   help="synthetic data size (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=20, help="training epochs (default: %(default)s)")
    p.add_argument("--decay", type=nonneg_int, default=None,
                   help="epoch of the x0.1 lr step (default: 15, as in the recorded runs; none when after --epochs)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="base learning rate (default: %(default)s)")
    p.add_argument("--embed", type=positive_int, default=256, help="joint embedding width (default: %(default)s)")
    p.add_argument("--heads", type=positive_int, default=8,
                   help="heads of the Transformer layers (default: %(default)s)")
    p.add_argument("--warmup", type=nonneg_int, default=100,
                   help="iterations before the instance-level module joins (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--timing-images", type=positive_int, default=5000, help="--eval-timing: images (x5 captions)")
    p.add_argument("--timing-batch", type=positive_int, default=128, help="--eval-timing: encoding batch")
    p.add_argument("--timing-shard", type=positive_int, default=1000, help="--eval-timing: score shard size")
    args = p.parse_args(argv)
    if not (args.train or args.eval_timing or args.report):  # ran nothing and exited 0
        p.error("nothing to do: give --train, --eval-timing and/or --report FILE")
    if args.embed % args.heads:  # the Transformer layers failed once the data was built and the first seed began
        p.error(f"--embed {args.embed} must be a multiple of --heads {args.heads} (each head gets embed/heads dims)")
    if args.decay is None:  # 15 whatever --epochs, so that the recorded commands (--epochs 12 or 40) reproduce
        args.decay = 15
        if args.decay > args.epochs:
            print(f"hrem_synthetic.py: note: no lr step in {args.epochs} epochs (--decay defaults to 15)",
                  file=sys.stderr)
    elif args.decay > args.epochs:  # the x0.1 step would never come; the report would still name it
        p.error(f"--decay {args.decay} is after the last epoch (--epochs {args.epochs}): the lr step would never come")
    args.command = "PYTHONPATH=. .venv/bin/python bench/hrem_synthetic.py " + " ".join(sys.argv[1:])
    import torch  # after parsing: a bad argument is rejected before torch's import time

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.train:
        train_all(args)
    if args.eval_timing:
        eval_timing(args)
    if args.report:
        write_report(args)


if __name__ == "__main__":
    main()
