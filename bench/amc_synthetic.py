"""AMC learning signal and router behaviour on CPU: synthetic scenes (``tiny`` preset) and emoji (``lite`` preset).

For each dataset it trains, through the one trainer (:func:`cirlab.engine.train.train`), the full AMC model and two
baselines of the same architecture with one modality cut (``ablation="image_only"``: sentence vector zeroed;
``ablation="text_only"``: grid tokens zeroed), selects on the val split, and reports on the held-out split:

* R@1/10/50 of the untrained model, the trained model and both baselines (AMC protocol: reference removed,
  caption-file gallery);
* the mean router gate per (layer, expert, modification type) of the trained and untrained model, and how much of
  the gates' variance the modification type explains (eta squared, with a permutation p-value), plus the
  leave-one-out accuracy of a nearest-centroid classifier predicting the modification type from the 6 gates.

Run (writes the Markdown table to ``--report``: a bare name is ``reports/benchmarks/NAME.md``, a path with a folder
or ending in ``.md`` is that file; without ``--report`` it is only printed)::

    .venv/bin/python bench/amc_synthetic.py --parts synthetic emoji --report reports/benchmarks/amc_synthetic.md

The printed output is the report itself; nothing here is timed against a target. Data and run folders go under
``--work``.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPORT_HELP, nonneg_int, positive_int, report_arg, report_path, synthetic_sizes  # noqa: E402

logger = logging.getLogger("amc_synthetic")
VARIANTS = ("full", "image_only", "text_only")


@dataclass
class Setup:
    """One dataset + preset experiment."""

    name: str
    preset: str
    root: Path
    categories: list[str] | None  # Fashion-IQ categories to evaluate separately (None = all together)
    train_overrides: dict[str, Any]
    model_overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    max_train_per_category: int = 0  # > 0: train on a fixed random subset of at most this many triplets per category


# ----------------------------------------------------------------------------------------------------- data


def synthetic_setup(work: Path, size: str, epochs: int) -> Setup:
    from cirlab.data.generators import synthetic

    manifest = synthetic.generate(work / f"synthetic-{size}", seed=0, size=size, layouts=["fashioniq"], image_size=64)
    root = Path(manifest["layouts"]["fashioniq"]["root"])
    train_cfg = {"epochs": epochs, "lr": 1e-3, "lr_milestones": [int(epochs * 0.8)], "ema_decay": 0.99,
                 "batch_size": 32, "eval_every": max(epochs // 3, 1), "selection_metric": "avg_R@10+avg_R@50"}
    return Setup("synthetic", "tiny", root, ["dress", "shirt", "toptee"], train_cfg,
                 note=f"cirlab.data.generators.synthetic.generate(seed=0, size={size!r}, image_size=64), "
                      "Fashion-IQ layout; "
                      "one model trained on the three categories together, evaluated per category")


def emoji_setup(work: Path, epochs: int, tarball: str, max_train: int, group_batches: int) -> Setup:
    from cirlab.data.generators import emoji

    root = emoji.build(work / "emoji", tarball=tarball or None)
    # R@50 saturates on these small galleries (6 to 348 images): select on R@1 + R@10 instead of the paper's
    # R@10 + R@50.
    # group_batches: a default emoji has 5 skin-tone triplets with the same reference; shuffled freely, two of them
    # rarely share a batch, so the in-batch loss is won by recognising the emoji and the tone word is never needed.
    train_cfg = {"epochs": epochs, "lr": 1e-3, "lr_milestones": [int(epochs * 0.8)], "ema_decay": 0.99,
                 "batch_size": 32, "eval_every": max(epochs // 3, 1), "selection_metric": "avg_R@1+avg_R@10",
                 "group_batches": group_batches}
    # 64 px = the emoji's native size (a 2x2 EfficientNet grid)
    subset = f"at most {max_train} triplets per category" if max_train > 0 else "every training triplet"
    return Setup("emoji", "lite", root, None, train_cfg, model_overrides={"image_size": 64},
                 note="cirlab.data.generators.emoji.build() (Noto emoji of emoji-datasource-google 16.0.0), "
                      "Fashion-IQ layout; "
                      "`lite` preset with image_size=64 (the emoji's native size, a 2x2 grid of frozen "
                      f"EfficientNet-Lite0 features); training on {subset}; batches keep up to {group_batches} "
                      "triplets with the same reference together (`group_batches`, 0 = plain shuffle)",
                 max_train_per_category=max_train)


def load_splits(setup: Setup, split: str) -> list[Any]:
    from cirlab.data import load_cir

    if setup.categories is None:
        return [load_cir("fashioniq", setup.root, split, category=c) for c in _categories(setup.root, split)]
    return [load_cir("fashioniq", setup.root, split, category=c) for c in setup.categories]


def _categories(root: Path, split: str) -> list[str]:
    return sorted(p.name.split(".")[1] for p in (root / "captions").glob(f"cap.*.{split}.json"))


# ----------------------------------------------------------------------------------------------------- runs


def build(setup: Setup, train_split: Any, ablation: str, seed: int = 0) -> Any:
    import torch

    import cirlab

    torch.manual_seed(seed)
    model = cirlab.create_model("amc", preset=setup.preset, ablation=ablation, **setup.model_overrides)
    model.fit_vocab(train_split)
    return model


def evaluate(model: Any, splits: list[Any]) -> dict[str, float]:
    """The Fashion-IQ protocol metrics plus R@1 per category and averaged (from the per-query ranks)."""
    import numpy as np

    from cirlab.engine.evaluate import evaluate_cir

    out = evaluate_cir(model, splits, protocol="fashioniq", batch_size=128)
    metrics = dict(out["metrics"])
    for split, (name, ranks) in zip(splits, out["ranks"].items()):
        ranks = ranks[ranks > 0]  # 0 = no ground truth; G + 1 = target removed with the reference (a miss)
        metrics[f"{split.category}_R@1"] = float(100.0 * (ranks == 1).mean())
    metrics["avg_R@1"] = float(np.mean([metrics[f"{s.category}_R@1"] for s in splits]))
    # query-weighted over all categories: the per-category average gives a 6-query category the weight of 588
    every = np.concatenate([r[r > 0] for r in out["ranks"].values()])
    for k in (1, 10):
        metrics[f"all_R@{k}"] = float(100.0 * (every <= k).mean())
    return metrics


def routes(model: Any, splits: list[Any]) -> Any:
    import pandas as pd

    from cirlab.engine.evaluate import trace_split

    return pd.concat([trace_split(model, s, n=None, batch_size=128) for s in splits], ignore_index=True)


def run_variant(setup: Setup, ablation: str, train_split: Any, val: list[Any], test: list[Any],
                out_dir: Path, **train_changes: Any) -> dict[str, Any]:
    from cirlab.engine.train import train

    model = build(setup, train_split, ablation)
    start = time.perf_counter()
    name = ablation + "".join(f"_{k}{v}" for k, v in train_changes.items())
    result = train(model, train_items(setup, train_split, model), {**setup.train_overrides, **train_changes},
                   output_dir=out_dir / name, evaluate_fn=lambda m: {"val": evaluate(m, val)}, overwrite=True)
    seconds = time.perf_counter() - start
    from cirlab.core.checkpoint import load_model_weights

    load_model_weights(model, result["best_checkpoint"])  # the val-selected (EMA) weights
    model.eval()
    out = {"metrics": evaluate(model, test), "seconds": seconds, "steps": result["steps"],
           "best_epoch": result["best_epoch"], "model": model}
    logger.info("%s %s: %s in %.0fs", setup.name, ablation, _fmt(out["metrics"]), seconds)
    return out


def train_items(setup: Setup, split: Any, model: Any) -> Any:
    import numpy as np
    import torch

    dataset = split.triplet_dataset(model.image_transform(True))
    if setup.max_train_per_category <= 0:
        return dataset
    rng = np.random.default_rng(0)
    keep: list[int] = []
    for category in sorted({t.category for t in split.triplets}):
        members = [i for i, t in enumerate(split.triplets) if t.category == category]
        keep += sorted(rng.permutation(members)[: setup.max_train_per_category].tolist())
    return torch.utils.data.Subset(dataset, keep)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.1f}" for k, v in metrics.items() if k.startswith("avg"))


# ----------------------------------------------------------------------------------------------------- gates


def gate_table(frame: Any) -> Any:
    """Mean gate per (layer, expert) x modification type."""
    table = frame.pivot_table(index=["layer", "expert", "paper_name"], columns="modification", values="weight",
                              aggfunc="mean")
    return table.round(3)


def eta_squared(values: np.ndarray, labels: np.ndarray) -> float:
    """Share of the variance of ``values`` explained by the group ``labels`` (one-way ANOVA effect size)."""
    import numpy as np

    total = ((values - values.mean()) ** 2).sum()
    if total == 0:
        return 0.0
    between = sum(((values[labels == g].mean() - values.mean()) ** 2) * (labels == g).sum() for g in np.unique(labels))
    return float(between / total)


def gate_statistics(frame: Any, permutations: int = 500, seed: int = 0) -> dict[str, Any]:
    """eta^2 (+ permutation p) per layer x expert, and nearest-centroid LOO accuracy from the 6 gates."""
    import numpy as np

    wide = frame.pivot_table(index=["query_id", "modification"], columns=["layer", "expert"], values="weight")
    labels = wide.index.get_level_values("modification").to_numpy()
    x = wide.to_numpy()
    rng = np.random.default_rng(seed)
    per_gate = {}
    for j, (layer, expert) in enumerate(wide.columns):
        eta = eta_squared(x[:, j], labels)
        null = [eta_squared(x[:, j], rng.permutation(labels)) for _ in range(permutations)]
        p = (1 + sum(n >= eta for n in null)) / (1 + permutations)
        per_gate[f"{layer}/{expert}"] = (eta, p)
    predicted = _nearest_centroid_loo(x, labels)
    groups = np.unique(labels)
    return {"per_gate": per_gate, "loo_accuracy": float(np.mean(predicted == labels)),
            "balanced_accuracy": float(np.mean([np.mean(predicted[labels == g] == g) for g in groups])),
            "chance": max(np.mean(labels == g) for g in groups), "classes": len(groups), "n": len(labels)}


def _nearest_centroid_loo(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import numpy as np

    x = (x - x.mean(0)) / (x.std(0) + 1e-12)  # standardise: gates of different experts live on different scales
    groups = np.unique(labels)
    sums = {g: x[labels == g].sum(0) for g in groups}
    counts = {g: (labels == g).sum() for g in groups}
    predicted = labels.copy()
    for i in range(len(x)):
        best, best_d = None, np.inf
        for g in groups:
            n = counts[g] - (labels[i] == g)
            if n == 0:
                continue
            centroid = (sums[g] - (x[i] if labels[i] == g else 0)) / n
            d = ((x[i] - centroid) ** 2).sum()
            if d < best_d:
                best, best_d = g, d
        predicted[i] = best
    return predicted


# ----------------------------------------------------------------------------------------------------- report


def run_setup(setup: Setup, work: Path) -> dict[str, Any]:
    from cirlab.data import load_cir

    train_split = load_cir("fashioniq", setup.root, "train")
    val, test = load_splits(setup, "val"), load_splits(setup, "test")
    untrained = build(setup, train_split, "none").eval()
    rows = {"untrained": {"metrics": evaluate(untrained, test), "seconds": 0.0, "steps": 0, "best_epoch": None}}
    n_train = len(train_items(setup, train_split, untrained))
    untrained_routes = routes(untrained, test)
    for ablation in ("none", "image_only", "text_only"):
        rows[ablation] = run_variant(setup, ablation, train_split, val, test, work / "runs" / setup.name)
    if setup.train_overrides.get("group_batches"):  # what the grouped batches add: the full model, plain shuffle
        rows["plain"] = run_variant(setup, "none", train_split, val, test, work / "runs" / setup.name,
                                    group_batches=0)
    trained_routes = routes(rows["none"]["model"], test)
    return {"setup": setup, "rows": rows, "train_size": n_train, "val": [len(s) for s in val],
            "test": [(s.category, len(s), len(s.gallery_names)) for s in test],
            "gates": {"trained": (gate_table(trained_routes), gate_statistics(trained_routes)),
                      "untrained": (gate_table(untrained_routes), gate_statistics(untrained_routes))}}


def frame_markdown(table: Any) -> str:
    """A pivot table as a Markdown table (no tabulate dependency)."""
    index_names = [str(n) for n in table.index.names]
    columns = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(index_names + columns) + " |", "|" + "---|" * (len(index_names) + len(columns))]
    for key, row in table.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join([str(k) for k in key] + [f"{v:.3f}" for v in row]) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    setup, rows = result["setup"], result["rows"]
    cats = [c for c, _, _ in result["test"]]
    lines = [f"## {setup.name} (`{setup.preset}` preset)", "", setup.note + ".", "",
             f"Train: {result['train_size']} triplets. Test (held out; selection on val): "
             + ", ".join(f"{c} {q} queries / {g} gallery" for c, q, g in result["test"]) + ".",
             f"Trainer overrides on the paper defaults: `{json.dumps(setup.train_overrides)}`.", "",
             "| model | " + " | ".join(f"{c} R@1 / R@10" for c in cats)
             + " | avg R@1 | avg R@10 | avg R@50 | all R@1 / R@10 | train s | steps |",
             "|---|" + "---|" * (len(cats) + 6)]
    names = {"untrained": "AMC untrained (random init)", "none": "AMC trained",
             "image_only": "image-only baseline (text zeroed)", "text_only": "text-only baseline (image zeroed)",
             "plain": "AMC trained, plain shuffle (group_batches 0)"}
    for key, row in rows.items():
        m = row["metrics"]
        lines.append(f"| {names[key]} | " + " | ".join(f"{m[f'{c}_R@1']:.1f} / {m[f'{c}_R@10']:.1f}" for c in cats)
                     + f" | {m['avg_R@1']:.1f} | {m['avg_R@10']:.1f} | {m['avg_R@50']:.1f}"
                     f" | {m['all_R@1']:.1f} / {m['all_R@10']:.1f} | {row['seconds']:.0f}"
                     f" | {row['steps']} |")
    for which in ("trained", "untrained"):
        table, stats = result["gates"][which]
        lines += ["", f"### Router gates of the {which} model per modification type (test queries)", "",
                  "Mean sigmoid gate; expert = code order [NIN, CRN, GTN], paper_name = figure numbering.", "",
                  frame_markdown(table), "",
                  "eta² = share of a gate's variance explained by the modification type (permutation p, "
                  f"{stats['n']} queries): "
                  + "; ".join(f"{k} {eta:.3f} (p={p:.3f})" for k, (eta, p) in stats["per_gate"].items()) + ".", "",
                  f"Nearest-centroid leave-one-out accuracy of the modification type from the 6 gates: "
                  f"{100 * stats['loo_accuracy']:.1f}% (majority class {100 * stats['chance']:.1f}%); balanced "
                  f"accuracy (mean per-type recall) {100 * stats['balanced_accuracy']:.1f}% "
                  f"(chance {100 / stats['classes']:.1f}%)."]
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return "\n".join([
        "# AMC on synthetic and emoji data (CPU)", "",
        f"Command: `.venv/bin/python bench/amc_synthetic.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, no GPU; "
        f"date {time.strftime('%Y-%m-%d')}. Timings are wall-clock on a machine shared with other jobs.", "",
        "R@K = AMC protocol (reference removed from its own ranking, gallery = caption-file images), per category, "
        "averaged over categories (avg) and over all queries (all, query-weighted). Baselines are the same "
        "architecture trained with the same recipe, with one modality cut.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["synthetic", "emoji"], choices=["synthetic", "emoji"],
                        help="datasets to train and report (default: both)")
    parser.add_argument("--work", default="/tmp/cirlab_amc_bench", help="data and run folders (default %(default)s)")
    parser.add_argument("--size", default="default", choices=synthetic_sizes(),
                        help="synthetic data size (default %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="synthetic epochs (default 20)")
    parser.add_argument("--emoji-epochs", type=positive_int, default=10, help="emoji epochs (default 10)")
    parser.add_argument("--emoji-tarball", default="", help="emoji-datasource-google .tgz (default: cache or npm)")
    parser.add_argument("--emoji-max-train", type=nonneg_int, default=1200,
                        help="training triplets per emoji category (0 = all; skin_tone has 2,666)")
    parser.add_argument("--emoji-group-batches", type=nonneg_int, default=6,
                        help="TrainConfig.group_batches for emoji: triplets with one reference kept together "
                             "(hard in-batch negatives; 0 = plain shuffle)")
    parser.add_argument("--report", type=report_arg, default="",
                        help=f"also write the printed report to this Markdown file: {REPORT_HELP}; "
                             "'' (default) = print only")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.emoji_tarball and "emoji" in args.parts and not Path(args.emoji_tarball).is_file():
        # the emoji part would only have been reported as "Not run", with exit status 0
        parser.error(f"--emoji-tarball {args.emoji_tarball!r}: no such file")
    import torch  # after parsing: a bad argument is rejected before torch's import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)  # the CPU is shared: oversubscribed threads slow every step down
    work = Path(args.work)
    sections = [header(args)]
    for part in args.parts:
        try:
            setup = synthetic_setup(work, args.size, args.epochs) if part == "synthetic" else emoji_setup(
                work, args.emoji_epochs, args.emoji_tarball, args.emoji_max_train, args.emoji_group_batches)
        except Exception as err:  # noqa: BLE001 - the report says why a part could not run
            logger.exception("%s data could not be prepared", part)
            sections.append(f"## {part}\n\nNot run: the data could not be built ({type(err).__name__}: {err}).")
            continue
        sections.append(markdown(run_setup(setup, work)))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.report:
        report_path(args.report).parent.mkdir(parents=True, exist_ok=True)
        report_path(args.report).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
