"""DIME on the synthetic precomp dataset (CPU): untrained vs trained rsum per direction, DIME* (ensemble), and
which routing cells dominate for the different caption types.

The synthetic precomp set (``cirlab.data.generators.synthetic``) writes 5 captions per image that differ in *content*
(their types, ``_scenes.CAPTION_TYPES``, listed per caption in ``synthetic_meta.json``): ``full`` (every object with
size, colour, shape and cell), ``color`` (colours and counts only), ``shape`` (shapes and counts only), ``layout``
(cells and sizes only) and ``relation`` (relative positions of objects named by colour and shape). Only ``full``
identifies its image on its own, so the other types cap the reachable recall; routing may differ by type.

Both directions are trained with the one trainer (``cirlab.engine.train.train``) on the reduced DIME dimensions below,
the frozen real MiniLM-L6 text encoder (the ``lite`` preset's BERT-family stand-in for BERT-base; ``--bert random`` uses
a random-init tiny BERT with a WordPiece vocabulary built from the training captions instead), and the paper's loss
(VSE++ hardest negative with extra negatives + 0.5 x path regulariser). The regulariser pulls the similarity of two
captions' routes towards the similarity of their frozen-BERT sentence vectors; only a pretrained encoder gives
those vectors meaning (captions of one type close, of different types apart), so with ``--bert random`` the routes
stay near their uniform start whatever the caption says. ``--warmup-epochs N`` sets ``vse_mean_warmup_epochs``:
N epochs of the sum of violations before the hardest negative (VSE-infinity's warm-up; 0 = the paper). Checkpoint
selection on dev by r1+r5+r1i+r5i; numbers are on test with the selected weights.

Usage::

    # the recorded run: each direction ~4-8 min on the shared 2-core machine (run the two in parallel with
    # --directions i2t / t2i and --threads 1, then once more with --reuse for the report)
    PYTHONPATH=. .venv/bin/python bench/dime_synthetic.py --size small --epochs 8 --embed 32 --lr 3e-3 \\
        --warmup-epochs 3 --eval-every 2

Run folders (checkpoints, ``summary.json``) and ``results.json`` go under ``--out-dir``; once both directions are
trained the Markdown report goes to ``reports/benchmarks/dime_synthetic.md`` (``--report``: a bare name is
``reports/benchmarks/NAME.md``, a path with a folder or ending in ``.md`` is that file; ``--report ''`` prints it).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (REPORT_HELP, choice_list, nonneg_int, positive_float, positive_int, report_arg,  # noqa: E402
                     report_path, seed_int, synthetic_sizes)


def _encode(model: Any, split: Any, batch: int = 128) -> tuple[dict, dict]:
    """Per-image and per-caption encodings of a whole split (computed once, shared by all shards)."""
    import torch

    feats = torch.from_numpy(split.images[:].astype("float32"))
    with torch.no_grad():
        imgs = [model.encode_image(feats[i:i + batch]) for i in range(0, len(feats), batch)]
        txts = [model.encode_text(split.captions[i:i + batch]) for i in range(0, len(split.captions), batch)]
    img = {k: torch.cat([d[k] for d in imgs]) for k in imgs[0]}
    txt = {k: torch.cat([d[k] for d in txts]) for k in txts[0]}
    img["ids"], txt["ids"] = torch.arange(len(feats)), torch.arange(len(split.captions))
    return img, txt


def scores_on(model: Any, split: Any) -> torch.Tensor:
    from cirlab.models.dime import score_matrix

    was_training = model.training
    model.eval()
    img, txt = _encode(model, split)
    out = score_matrix(model, img, txt)
    model.train(was_training)
    return out


def build(direction: str, args: argparse.Namespace, train_split: Any) -> Any:
    import torch

    import cirlab

    torch.manual_seed(args.seed)
    common = dict(direction=direction, vse_mean_warmup_epochs=args.warmup_epochs, img_dim=2048,
                  embed_size=args.embed, hid_router=args.embed * 2,
                  hid_imrc=args.embed * 2, num_head_imrc=4, path_hid=32, max_words=32,
                  lambda_softmax=4.0 if direction == "i2t" else 9.0)
    if args.bert == "minilm":
        return cirlab.create_model("dime", "lite", **common)
    model = cirlab.create_model("dime", "tiny", bert="random",
                                bert_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                             "intermediate_size": 128, "max_position_embeddings": 64}, **common)
    model.fit_vocab(train_split)  # whole-word WordPiece vocabulary from the training captions (saved with the model)
    return model


def route_table(model: Any, split: Any, n_images: int, caption_type: list[str]) -> dict[str, Any]:
    """Path weights of the matching pairs traced through cirlab.trace_routes, grouped by caption type.

    Per layer: ``matrix`` = mean weight per (caption type, destination, source); ``eta2`` = the share of the
    per-pair path variance that caption type explains (between-type / total sum of squares over all the
    layer's entries; 0 = type tells nothing, 1 = type fixes the routes); ``eta2_within_image`` = the same after
    removing each image's mean, i.e. what type explains beyond which image it is.
    """
    import torch

    import pandas as pd

    import cirlab

    model.eval()
    img, txt = _encode(model, split)
    n_images = min(n_images, img["img"].shape[0])
    per = len(split.captions) // img["img"].shape[0]
    rows = []
    with torch.no_grad():
        for i in range(n_images):  # one image with its own captions: the matching pairs only
            sub_img = {k: v[i:i + 1] for k, v in img.items()}
            sub_txt = {k: v[per * i:per * i + per] for k, v in txt.items()}
            with cirlab.trace_routes(model) as trace:
                model.itr_module(sub_img, sub_txt)
            rows.append(trace.to_frame())
    frame = pd.concat(rows, ignore_index=True)
    frame = frame[frame.layer.isin(["layer0", "layer1", "layer2"])].copy()
    frame["caption_type"] = [caption_type[int(c)] for c in frame["caption_id"]]
    out: dict[str, Any] = {}
    for layer, part in frame.groupby("layer"):
        matrix = part.groupby(["caption_type", "destination", "source"])["weight"].mean()
        feat = part.set_index(["image_id", "caption_id", "caption_type", "destination", "source"])["weight"]
        wide = feat.unstack(["destination", "source"])  # one row per pair, one column per path entry
        types = wide.index.get_level_values("caption_type")
        out[layer] = {"matrix": matrix, "eta2": _eta2(wide, types),
                      "eta2_within_image": _eta2(wide - wide.groupby(level="image_id").transform("mean"), types)}
    return out


def _eta2(wide: Any, groups: Any) -> float:
    """Between-group sum of squares / total sum of squares, pooled over all columns."""
    total = float(((wide - wide.mean()) ** 2).to_numpy().sum())
    if total < 1e-12:
        return 0.0
    means = wide.groupby(groups).transform("mean")
    between = float(((means - wide.mean()) ** 2).to_numpy().sum())
    return between / total


def _edge_dev(type_matrix: Any, overall: Any) -> str:
    """The destination <- source edge this caption type weights most above the mean over types."""
    dev = type_matrix.reorder_levels(["destination", "source"]) - overall
    (dst, src), value = dev.idxmax(), dev.max()
    return f"{src} -> {dst} ({value:+.3f})"


def dominant_by_type(matrix: Any, gates: bool) -> dict[str, str]:
    """Per caption type, the largest entry of its mean route: ``src -> dst`` for path matrices, a cell for gates."""
    out = {}
    for t in matrix.index.get_level_values("caption_type").unique():
        dst, src = matrix.loc[t].idxmax()
        out[t] = src if gates else f"{src} -> {dst}"
    return out


def recall_by_type(scores: torch.Tensor, caption_type: list[str], per: int = 5) -> dict[str, float]:
    """t2i R@1 of each caption type (caption j's image is j // per)."""
    import torch

    rank1 = scores.argmax(0) == torch.arange(scores.shape[1]) // per
    out: dict[str, list[bool]] = {}
    for j, t in enumerate(caption_type):
        out.setdefault(t, []).append(bool(rank1[j]))
    return {t: 100.0 * sum(v) / len(v) for t, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, choices=synthetic_sizes(),
                        help="synthetic data size (default small; not with --data, which names the data)")
    parser.add_argument("--data", default="", help="synthetic root (default: generated under the cirlab cache)")
    parser.add_argument("--epochs", type=positive_int, default=6, help="training epochs (default 6)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam lr (paper 2e-4 over 30 epochs)")
    parser.add_argument("--embed", type=positive_int, default=64, help="embed size (paper 256)")
    parser.add_argument("--bert", choices=["random", "minilm"], default="minilm",
                        help="frozen text encoder: minilm (real pretrained MiniLM-L6, the lite preset) or random (a "
                             "random-init tiny BERT: its sentence similarities carry no meaning, so the path "
                             "regulariser has nothing to align the routes with)")
    parser.add_argument("--lr-step", type=nonneg_int, default=0, help="epochs between x0.1 lr steps (0: no step)")
    parser.add_argument("--warmup-epochs", type=nonneg_int, default=0, help="vse_mean_warmup_epochs: epochs of "
                        "summed violations before the hardest negative (0: the paper)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="training batch (paper 32)")
    parser.add_argument("--eval-every", type=nonneg_int, default=0,
                        help="dev evaluation every N epochs (0: at the end)")
    parser.add_argument("--directions", type=choice_list(["i2t", "t2i"]), default="i2t,t2i",
                        help="comma-separated directions to train in this process (default i2t,t2i)")
    parser.add_argument("--reuse", action="store_true", help="load <out-dir>/<direction>/checkpoints/best.pt "
                        "when present instead of training (to train the directions in parallel processes)")
    parser.add_argument("--seed", type=seed_int, default=0, help="training seed (default 0)")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--trace-images", type=positive_int, default=50,
                        help="test images whose matching pairs are traced for the route tables (default 50)")
    parser.add_argument("--out-dir", default="", help="run folders (default: <runs_dir>/dime_synthetic)")
    parser.add_argument("--report", type=report_arg, default=str(ROOT / "reports" / "benchmarks" / "dime_synthetic.md"),
                        help=f"the Markdown report (default reports/benchmarks/dime_synthetic.md): {REPORT_HELP}; "
                             "'' = print it only")
    args = parser.parse_args(argv)
    if args.data and args.size:  # the size of generated data: with --data it was ignored without a word
        parser.error(f"--size {args.size} sizes the generated data; --data {args.data!r} names the data to use: drop one")
    args.size = args.size or "small"
    import torch  # after parsing: a bad argument is rejected before torch's import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    import cirlab
    from cirlab.data.generators import synthetic
    from cirlab.core.metrics import itm_metrics
    from cirlab.models.dime import SELECTION_METRIC, ensemble_scores
    from cirlab.core.paths import runs_dir
    from cirlab.engine.train import train

    start = time.time()
    root = Path(args.data) if args.data else synthetic.ensure(size=args.size, seed=args.seed, layouts=("precomp",))
    pre = root / "precomp" if (root / "precomp").is_dir() else root
    splits = {s: cirlab.data.load_precomp(pre, "f30k", s) for s in ("train", "dev", "test")}
    out_dir = Path(args.out_dir) if args.out_dir else runs_dir() / "dime_synthetic"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((pre / synthetic.META).read_text(encoding="utf-8")) if (pre / synthetic.META).is_file() else {}
    caption_type = meta.get("caption_type", {}).get("test") or [f"style {k % 5}" for k in
                                                                 range(len(splits["test"].captions))]
    print(f"data: {pre} | " + ", ".join(f"{s} {v.num_images} images / {len(v.captions)} captions"
                                         for s, v in splits.items()), flush=True)

    results: dict[str, Any] = {}
    test_scores: dict[str, torch.Tensor] = {}
    routes: dict[str, Any] = {}
    directions = args.directions
    for direction in directions:
        model = build(direction, args, splits["train"])
        untrained = itm_metrics(scores_on(model, splits["test"]))
        best_path = out_dir / direction / "checkpoints" / "best.pt"
        if args.reuse and best_path.is_file():
            summary = json.loads((out_dir / direction / "summary.json").read_text(encoding="utf-8"))
        else:
            cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                   "lr_step_size": args.lr_step or args.epochs + 1,
                   "eval_every": args.eval_every, "eval_every_steps": 0, "selection": "dev", "tensorboard": False,
                   "progress": "log", "log_every": 10, "seed": args.seed, "device": "cpu"}
            pairs = splits["train"].pair_dataset(**model.dataset_extras())  # + the random extra caption / image
            summary = train(model, pairs, cfg, output_dir=out_dir / direction, overwrite=True,
                            evaluate_fn=lambda m: {"dev": itm_metrics(scores_on(m, splits["dev"]))})
            summary = {k: summary[k] for k in ("best_epoch", "steps")}
            (out_dir / direction / "summary.json").write_text(json.dumps(summary))
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        s = scores_on(model, splits["test"])
        test_scores[direction] = s
        results[direction] = {"untrained": untrained, "trained": itm_metrics(s), "best_epoch": summary["best_epoch"],
                              "steps": summary["steps"], "t2i_R@1_by_type": recall_by_type(s, caption_type)}
        routes[direction] = route_table(model, splits["test"], args.trace_images, caption_type)
        print(f"{direction}: rsum untrained {untrained['rsum']:.1f} -> "
              f"trained {results[direction]['trained']['rsum']:.1f}"
              f" (best epoch {summary['best_epoch']})", flush=True)
    if len(test_scores) < 2:
        print("trained", directions, "- run again with --reuse for the report")
        return 0
    ens_scores = ensemble_scores(test_scores["i2t"], test_scores["t2i"])
    ens = itm_metrics(ens_scores)
    results["dime_star"] = {**ens, "t2i_R@1_by_type": recall_by_type(ens_scores, caption_type)}
    print(f"DIME*: rsum {ens['rsum']:.1f}", flush=True)
    elapsed = time.time() - start
    results["routes"] = {d: {layer: {"eta2": r["eta2"], "eta2_within_image": r["eta2_within_image"],
                                     "matrix": {"|".join(k): float(v) for k, v in r["matrix"].items()}}
                             for layer, r in routes[d].items()} for d in routes}
    (out_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2, default=str))
    write_report(args, argv, results, routes, splits, elapsed, SELECTION_METRIC)
    return 0


def _fmt(m: dict[str, float]) -> str:
    return " | ".join(f"{m[k]:.1f}" for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                                                  "rsum"))


def write_report(args: argparse.Namespace, argv: list[str] | None, results: dict, routes: dict, splits: dict,
                 elapsed: float, selection_metric: str) -> None:
    import torch

    cmd = "PYTHONPATH=. .venv/bin/python bench/dime_synthetic.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:])
    test = splits["test"]
    lines = ["# DIME on the synthetic precomp dataset (CPU)", "", f"Command: `{cmd.strip()}`", "",
             f"Machine: CPU ({platform.machine()}), {torch.get_num_threads()} torch threads, shared with other jobs; "
             f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; wall time {elapsed / 60:.1f} min.", "",
             (f"Data: `{args.data}` " if args.data else
              f"Data: `cirlab.data.generators.synthetic` precomp, size `{args.size}` ") +
             f"(train {splits['train'].num_images} images, "
             f"dev {splits['dev'].num_images}, test {test.num_images}; 5 captions each). Model: DIME with embed "
             f"{args.embed} (paper 256), text encoder `{args.bert}` (frozen), "
             "paper loss (VSE++ hardest negative + extra "
             f"negatives + 0.5 x path regulariser), Adam lr {args.lr}, x0.1 every {args.lr_step or '-'} epochs, "
             f"batch {args.batch_size}, clip 2, {args.epochs} "
             f"epochs, sum-of-violations warm-up {args.warmup_epochs} epoch(s) (vse_mean_warmup_epochs); "
             f"selection on dev by `{selection_metric}`. Scores on test ({test.num_images} x "
             f"{len(test.captions)}, full matrix through the interaction module).", "",
             "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |", "|---|---|---|---|---|---|---|---|"]
    for d in ("i2t", "t2i"):
        lines.append(f"| DIME ({d}) untrained | {_fmt(results[d]['untrained'])} |")
    for d in ("i2t", "t2i"):
        best = f"best epoch {results[d]['best_epoch']} (from 1)"
        lines.append(f"| DIME ({d}) trained, {best} | {_fmt(results[d]['trained'])} |")
    lines.append(f"| **DIME\\*** (mean of the two score matrices) | {_fmt(results['dime_star'])} |")
    best_single = max(results[d]["trained"]["rsum"] for d in ("i2t", "t2i"))
    verdict = ("DIME* beats each direction alone" if results["dime_star"]["rsum"] > best_single else
               "DIME* does not beat the best single direction here")
    lines += ["", f"{verdict} (rsum {results['dime_star']['rsum']:.1f} vs best single {best_single:.1f}).", ""]
    types = list(results["t2i"]["t2i_R@1_by_type"])
    lines += ["Text-to-image R@1 by caption type (only `full` identifies its image on its own):", "",
              "| model | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for name, res in (("DIME (i2t)", results["i2t"]), ("DIME (t2i)", results["t2i"]), ("DIME*", results["dime_star"])):
        by = res["t2i_R@1_by_type"]
        lines.append(f"| {name} | " + " | ".join(f"{by[t]:.1f}" for t in types) + " |")
    lines += ["", "## Routes by caption type", "",
              f"Traced with `cirlab.trace_routes` on the matching pairs of the first {args.trace_images} test images "
              "(each image with its own 5 captions, one per type). Cells in code order; paper numbering RIC 0, "
              "GLGC 2, IMRC 1, CMRC 3. Layers 0 and 1: mean normalised weight of each destination <- source edge "
              "(rows sum to 1 per destination); layer 2: the raw gate of each cell into the output. "
              "eta^2 = share of the per-pair path variance (all entries of the layer pooled) explained by caption "
              "type; 'within image' first removes each image's mean route.", ""]
    lines += ["Dominant route per caption type (layers 0-1: the strongest destination <- source edge of the "
              "type's mean path matrix; final aggregation: the cell with the largest gate):", "",
              "| direction | layer | eta^2 (type) | dominant per caption type | distinct |", "|---|---|---|---|---|"]
    for d in ("i2t", "t2i"):
        for layer in ("layer0", "layer1", "layer2"):
            dom = dominant_by_type(routes[d][layer]["matrix"], layer == "layer2")
            lines.append(f"| {d} | {layer} | {routes[d][layer]['eta2']:.3f} | "
                         + ", ".join(f"{t}: {v}" for t, v in dom.items()) + f" | {len(set(dom.values()))} |")
    lines.append("")
    for d in ("i2t", "t2i"):
        for layer, title in (("layer0", "layer 0"), ("layer1", "layer 1"), ("layer2", "final aggregation (raw gates)")):
            r = routes[d][layer]
            m = r["matrix"]
            lines += [f"**{d}, {title}**: eta^2 (type) = {r['eta2']:.3f}, within image = "
                      f"{r['eta2_within_image']:.3f}", ""]
            if layer == "layer2":
                table = m.unstack("source").droplevel("destination")
                lines += ["| caption type | " + " | ".join(table.columns) + " | dominant | most above the type mean |",
                          "|---" * (len(table.columns) + 3) + "|"]
                for t, row in table.iterrows():
                    dev = row - table.mean(axis=0)
                    lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {row.idxmax()} | "
                                 f"{dev.idxmax()} ({dev.max():+.3f}) |")
            else:
                dests = list(m.index.get_level_values("destination").unique())
                srcs = list(m.index.get_level_values("source").unique())
                lines += ["| caption type | " + " | ".join(f"-> {x}" for x in dests) +
                          " | dominant edge | dominant source | edge most above the type mean |",
                          "|---" * (len(dests) + 4) + "|"]
                overall = m.groupby(level=["destination", "source"]).mean()
                for t in m.index.get_level_values("caption_type").unique():
                    mt = m.loc[t].unstack("source")  # [destination, source]
                    cells = [", ".join(f"{src[:4]} {mt.loc[dst, src]:.2f}" for src in srcs) for dst in dests]
                    edge = mt.stack().idxmax()
                    lines.append(f"| {t} | " + " | ".join(cells) + f" | {edge[1]} -> {edge[0]} "
                                 f"({mt.stack().max():.2f}) | {mt.mean(axis=0).idxmax()} "
                                 f"| {_edge_dev(m.loc[t], overall)} |")
            lines.append("")
    if not args.report:
        print("\n".join(lines))
        return
    out = report_path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
