"""CaLa on synthetic CIR data (CPU): CaLa vs the same recipe without TBIA/CTR vs image-only / text-only baselines.

Every variant is one ``cirlab.run_experiment`` (the engine's loop, selection and protocol metrics) on the embedded
synthetic data, with the same preset, seed, steps and learning rate; only the loss terms / the query differ:

* ``cala``          the released loss (src/blip_fine_tune.py after commit 213ef3c): 0.1 CE(TBIA) + 0.9 CE(0.45 CTR +
  0.55 QTM)
* ``qtm_only``      the same model and recipe with ``hca_weight=0, tac_weight=0`` (no TBIA, no CTR)
* ``image_only``    query = reference image through the multimodal Q-Former (QTM loss)
* ``text_only``     query = text CLS alone (QTM loss)
* ``cala_paper``    the paper's form of the objective: CE(QTM) + 0.1 CE(TBIA) + 0.45 CE(CTR) (``loss_form: paper``)
* ``tbia_only``     the released loss without CTR (``tac_weight=0``): 0.1 CE(TBIA) + 0.9 CE(QTM)
* ``ctr_only``      the released loss without TBIA (``hca_weight=0``): CE(0.45 CTR + 0.55 QTM)
* ``qtm_s55``       ``qtm_only`` with the QTM logit scale at 55 instead of 100: the temperature QTM has inside the
  released mixing ``0.45 CTR + 0.55 QTM`` when the CTR logits are near zero (a control for ``ctr_only``)

Usage::

    .venv/bin/python bench/cala_synthetic.py --dataset cirr --size small --epochs 8
    .venv/bin/python bench/cala_synthetic.py --dataset fashioniq --preset lite --epochs 2 --report ''

Data, run folders and per-variant results go under ``--work``; the table is printed and written to
``reports/benchmarks/<--report>.md`` (default ``cala_synthetic``; a path with a folder or ending in ``.md`` is that
file; ``--report ''`` prints only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPORT_HELP, positive_float, positive_int, report_arg, seed_int,  # noqa: E402
                     synthetic_sizes, write_report)

VARIANTS = {
    "cala": {},
    "qtm_only": {"hca_weight": 0.0, "tac_weight": 0.0},
    "image_only": {"ablation": "image_only"},
    "text_only": {"ablation": "text_only"},
    "cala_paper": {"loss_form": "paper"},
    "tbia_only": {"tac_weight": 0.0},  # which auxiliary term moves the result: each alone
    "ctr_only": {"hca_weight": 0.0},
    "qtm_s55": {"hca_weight": 0.0, "tac_weight": 0.0, "qtm_scale": 55.0},  # is ctr_only's gain only its temperature?
}
METRICS = {"cirr": ["R@1", "R@5", "R@10", "R@50", "cirr_Rsubset@1", "avg"],
           "fashioniq": ["avg_R@10", "avg_R@50", "avg"],
           # the emoji galleries are small (gender: 28-134 images, color: 6-41): R@1 from the top-K files says more
           "emoji": ["avg_R@1", "avg_R@10", "avg_R@50", "avg"]}


def config(args: argparse.Namespace, data_root: Path, variant: str) -> dict[str, Any]:
    from cirlab.engine import runs

    overrides = {"lr": args.lr, "encoder": args.encoder, **VARIANTS[variant]}
    return runs.with_defaults({
        "name": f"cala_{variant}", "model": "cala", "preset": args.preset, "model_overrides": overrides,
        "dataset": {"name": "fashioniq" if args.dataset == "emoji" else args.dataset,
                    "root": str(data_root / args.dataset), "category": args.categories or None,
                    "test_split": "test1" if args.dataset == "cirr" else "test"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "progress": "none",
                  "tensorboard": False, "precision": "fp32", "schedule": args.schedule, "selection": args.selection,
                  "eval_every": max(1, args.epochs // 4), "log_every": 50},
        "eval": {"splits": ["val"] if args.dataset == "cirr" else ["val", "test"], "k": 50, "batch_size": 64},
    })


def run_variant(args: argparse.Namespace, data_root: Path, variant: str) -> dict[str, Any]:
    """One variant's run (in this process or a worker process)."""
    import torch

    from cirlab.engine import runs

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = runs.run_experiment(config(args, data_root, variant), output_dir=Path(args.work) / "runs" / variant,
                              overwrite=True)
    if args.dataset == "emoji":
        add_r1(out["splits"], Path(args.work) / "runs" / variant / "topk")
    result = {"splits": out["splits"], "steps": out["steps"], "seconds": time.perf_counter() - t0,
              "best_epoch": out["selection"]["best_epoch"]}
    print(variant, json.dumps(result), flush=True)
    results = Path(args.work) / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{variant}.json").write_text(json.dumps(result))
    return result


def add_r1(splits: dict[str, dict[str, float]], topk_dir: Path) -> None:
    """Per-category and mean R@1 of each split, from the run's top-K files (their 1-based target ranks)."""
    for split, metrics in splits.items():
        metrics.update({k: v for k, v in pooled_r1(topk_dir, (split,)).items() if k != "queries"})


def pooled_r1(topk_dir: Path, splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
    """R@1 per category over the queries of one or several splits together (from the run's top-K files, their 1-based
    target ranks), their mean over categories (``avg_R@1``) and the number of queries (``queries``).

    Pooling val with test is only meaningful when no split chose the weights (``--selection last``): the emoji test
    split alone has 34 queries (6 color), so one query moves its average by up to 8 points; val and test have 108."""
    from cirlab.core.topk import load_topk

    hits: dict[str, list[bool]] = {}
    for split in splits:
        for f in sorted(topk_dir.glob(f"{split}_*.topk.npz")):
            hits.setdefault(f.name.split(".")[0].split("_", 1)[1], []).extend(load_topk(f).target_rank == 1)
    out = {f"{cat}_R@1": 100.0 * float(sum(h)) / len(h) for cat, h in hits.items()}
    out["avg_R@1"] = sum(out.values()) / len(out)
    out["queries"] = sum(len(h) for h in hits.values())
    return out


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The synthetic layout, or the emoji set (built from the npm package into ``<work>/data/emoji``)."""
    if args.dataset == "emoji":
        from cirlab.data.generators import emoji

        root = emoji.build(work / "data" / "emoji")
        manifest = json.loads((root / emoji.MANIFEST).read_text(encoding="utf-8"))
        return {"source": f"`cirlab.data.generators.emoji.build()` (Noto emoji of {manifest['package']} "
                          f"{manifest['version']}), Fashion-IQ layout, categories {', '.join(args.categories)}",
                "counts": {k: v for k, v in manifest["splits"].items() if k.split("/")[0] in args.categories}}
    from cirlab.data.generators import synthetic

    # one folder per size: generate refuses to replace data written with other settings
    manifest = synthetic.generate(work / f"data-{args.size}", seed=0, size=args.size, image_size=64,
                                  layouts=(args.dataset,))
    layout = manifest["layouts"][args.dataset]
    return {"source": f"`cirlab.data.generators.synthetic.generate(seed=0, size={args.size!r}, image_size=64)`, "
                      f"{args.dataset} layout", "counts": {k: v for k, v in layout.items() if k != "root"}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    work = Path(args.work)
    data = prepare_data(args, work)
    done = {v: json.loads((work / "results" / f"{v}.json").read_text(encoding="utf-8")) for v in args.variants
            if args.reuse and (work / "results" / f"{v}.json").is_file()}  # same --work, same arguments
    todo = [v for v in args.variants if v not in done]
    if args.jobs == 1:
        done.update({v: run_variant(args, work / "data", v) for v in todo})
    else:  # variants side by side, args.threads threads each
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {v: pool.submit(run_variant, args, work / "data", v) for v in todo}
            done.update({v: f.result() for v, f in futures.items()})
    results = {v: done[v] for v in args.variants}
    return {"data": data, "results": results}


def markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    shown = {"cirr": ["val"], "fashioniq": ["test"], "emoji": ["test", "val"]}[args.dataset]
    split = shown[0]
    keys = METRICS[args.dataset]
    selection = "on val (the run's selection metric)" if args.selection == "val" else "none (the final weights)"
    lines = [f"Data: {result['data']['source']}; {json.dumps(result['data']['counts'])}.",
             "",
             f"Model: `cala` preset `{args.preset}`, encoder `{args.encoder}`, model lr {args.lr} "
             "(groups: Q-Formers 1x, TAC/HCA 2x), "
             f"AdamW wd 0.05, {args.schedule} schedule, batch {args.batch_size}, {args.epochs} epochs, "
             f"seed {args.seed}, fp32, "
             f"{args.threads} thread(s) per run, {args.jobs} run(s) at once; selection: {selection}, "
             f"reported on `{split}`.",
             "",
             "| variant | " + " | ".join(keys) + " | steps | best epoch (from 1) | train+eval s |",
             "|---|" + "---|" * (len(keys) + 3)]
    for name, r in result["results"].items():
        m = r["splits"][split]
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in keys)
                     + f" | {r['steps']} | {'last' if r['best_epoch'] is None else r['best_epoch']} "
                       f"| {r['seconds']:.0f} |")
    for other in shown[1:]:  # the emoji test splits are small (color: 6 queries): val too
        lines += ["", f"The same runs on `{other}` (the selection split):", "",
                  "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(f"{r['splits'][other][k]:.1f}" for k in keys) + " |"
                  for name, r in result["results"].items()]
    if args.dataset == "emoji" and args.selection == "last":  # val chose nothing: pool it with test
        pooled = {name: pooled_r1(Path(args.work) / "runs" / name / "topk") for name in result["results"]}
        first = next(iter(pooled.values()))
        cats = [k for k in first if k.endswith("R@1")]
        lines += ["", f"The same runs, R@1 over every held-out query (val and test together, {first['queries']} "
                      "queries; the final weights, so val chose nothing):",
                  "", "| variant | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        lines += [f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in cats) + " |" for name, m in pooled.items()]
    lines += ["", "`cala` = released loss (src/blip_fine_tune.py after commit 213ef3c); `qtm_only` = same recipe "
              "with hca_weight = tac_weight = 0; `cala_paper` = the paper's weighted sum of the three CEs; "
              "`tbia_only` / `ctr_only` = the released loss with tac_weight = 0 / hca_weight = 0; "
              "`qtm_s55` = `qtm_only` at QTM scale 55 (the scale QTM has inside the mixing when CTR is near zero); "
              "`image_only` / `text_only` = one modality as the query. Synthetic or emoji data, not a paper number."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cirr", choices=["cirr", "fashioniq", "emoji"],
                   help="a synthetic layout, or the emoji set (Fashion-IQ layout; built from its npm package)")
    p.add_argument("--categories", nargs="+", default=None,
                   help="Fashion-IQ-layout categories to train and report (default: all; emoji: gender color)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "lite"], help="CaLa preset (default tiny)")
    p.add_argument("--size", default="small", choices=synthetic_sizes(), help="synthetic data size (default small)")
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="training batch (default 32)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="the model's base lr (random-init tiny needs more than 1e-5; default 1e-3)")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="per-epoch lr schedule of every group: constant, or one cosine half-period from lr to 0 over "
                        "--epochs (the released recipe anneals with a cosine; the last epochs then move little)")
    p.add_argument("--encoder", default="both", choices=["multi", "both"],
                   help="both: the target Q-Former trains too (a random-init tiny target encoder carries no signal)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="the training seed (the data is always generated with seed 0)")
    p.add_argument("--jobs", type=positive_int, default=1, help="variants run at once, in separate processes")
    p.add_argument("--selection", choices=["val", "last"], default=None,
                   help="val: the run's selection metric on val; last: the final weights (default: val, emoji last)")
    p.add_argument("--reuse", action="store_true",
                   help="take a variant's result from <work>/results/ when an earlier run with the same arguments "
                        "wrote it (add variants to a finished comparison)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants to run (default: all)")
    p.add_argument("--work", default="/tmp/cirlab_cala_bench",
                   help="folder for the data, the run folders and the per-variant results (default %(default)s)")
    p.add_argument("--report", type=report_arg, default="cala_synthetic",
                   help=f"the Markdown report (default cala_synthetic): {REPORT_HELP}; '' = print only")
    args = p.parse_args(argv)
    if args.categories and args.dataset == "cirr":  # the run refused it only after the data was generated
        p.error(f"--categories {' '.join(args.categories)}: --dataset cirr has no categories "
                "(they are Fashion-IQ's: --dataset fashioniq or emoji)")
    if args.dataset == "emoji" and not args.categories:
        args.categories = ["gender", "color"]  # skin_tone (2,666 training triplets) costs hours of CPU at lite size
    if args.selection is None:  # on the small emoji galleries R@10/R@50 reach 100 within a few epochs: no signal
        args.selection = "last" if args.dataset == "emoji" else "val"
    result = run(args)
    body = markdown(args, result)
    print(body)
    if args.report:
        print("wrote", write_report(args.report, f"CaLa on synthetic {args.dataset} data (CPU)", body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
