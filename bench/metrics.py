"""Vectorised cirlab.core.metrics vs the naive per-query loops (tests/naive_metrics.py), timed side by side.

    .venv/bin/python bench/metrics.py            # COCO-5K (5,000 x 25,000) and CIRR val size (4,181 x 2,297)
    .venv/bin/python bench/metrics.py --quick    # small sizes, seconds

The naive ITM loop is timed on the first ``--naive-rows`` images (i2t) and 5x that many captions (t2i) and
extrapolated linearly to the full protocol (every query costs one argsort of the same length); the output says so.
Writes reports/benchmarks/metrics.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, timed, write_report  # noqa: E402
import naive_metrics as N  # noqa: E402

from cirlab import metrics as M  # noqa: E402


def bench_itm(n_images: int, naive_rows: int, chunk: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_images, 256, generator=gen), dim=1)
    cap = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 0.9 * torch.randn(5 * n_images, 256,
                                                                                      generator=gen), dim=1)
    sims = img @ cap.T  # [N, 5N] float32
    t_vec, m = timed(lambda: (M.i2t_ranks(sims, chunk_size=chunk), M.t2i_ranks(sims, chunk_size=chunk)), repeat=2)
    i2t, t2i = m
    s = sims.numpy()
    rows = min(naive_rows, n_images)
    t_i2t, naive_i2t = timed(lambda: [min(np.nonzero(N.ranking(s[i]) == j)[0][0] for j in range(5 * i, 5 * i + 5))
                                      for i in range(rows)])
    t_t2i, naive_t2i = timed(lambda: [np.nonzero(N.ranking(s[:, c]) == c // 5)[0][0] for c in range(5 * rows)])
    parity = (i2t[:rows] - 1).tolist() == naive_i2t and (t2i[:5 * rows] - 1).tolist() == naive_t2i
    t_naive = (t_i2t + t_t2i) * n_images / rows  # both loops scale linearly in the number of queries
    return {"name": f"ITM COCO-5K protocol (i2t + t2i ranks, {n_images} x {5 * n_images})", "vec": t_vec,
            "naive": t_naive, "parity": parity,
            "note": f"naive loop timed on {rows} images + {5 * rows} captions, extrapolated x{n_images / rows:.0f}"}


def bench_cirr(n_queries: int, n_gallery: int) -> dict:
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n_queries, 256, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(n_gallery, 256, generator=gen), dim=1)
    scores = q @ g.T
    members = np.stack([rng.choice(n_gallery, 6, replace=False) for _ in range(n_queries)])
    reference, target = members[:, 0].copy(), members[:, 1].copy()
    t_vec, vec = timed(lambda: M.cirr_metrics(scores, target, reference, members), repeat=3)
    t_naive, naive = timed(lambda: N.naive_cirr(scores.numpy(), target, reference, members))
    parity = all(abs(vec[k] - naive[k]) < 1e-9 for k in naive)
    return {"name": f"CIRR val protocol (R@K + Rsubset@K, {n_queries} x {n_gallery}, img_set of 6)", "vec": t_vec,
            "naive": t_naive, "parity": parity, "note": "full naive loop (one stable argsort per query)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (1,000 images; 1,000 x 500 CIRR)")
    ap.add_argument("--images", type=int, default=5000, help="ITM images (captions = 5x)")
    ap.add_argument("--naive-rows", type=int, default=200, help="images timed in the naive ITM loop")
    ap.add_argument("--cirr-queries", type=int, default=4181, help="CIRR queries")
    ap.add_argument("--cirr-gallery", type=int, default=2297, help="CIRR gallery size")
    ap.add_argument("--chunk", type=int, default=512, help="rows per chunk in the vectorised ITM ranks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the naive loop is single-threaded too, and 1 is robust on a "
                         "shared machine)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write reports/benchmarks/metrics.md")
    args = ap.parse_args()
    if args.quick:
        args.images, args.naive_rows, args.cirr_queries, args.cirr_gallery = 1000, 100, 1000, 500
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    results = [bench_itm(args.images, args.naive_rows, args.chunk), bench_cirr(args.cirr_queries, args.cirr_gallery)]
    lines = ["| protocol | vectorised (s) | naive loop (s) | speed-up | equal to the loop | naive timing |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    threads = f"torch threads: {torch.get_num_threads()}; the naive loop is single-threaded NumPy."
    for r in results:
        lines.append(f"| {r['name']} | {r['vec']:.2f} | {r['naive']:.1f} | {r['naive'] / r['vec']:.0f}x | "
                     f"{'yes' if r['parity'] else 'NO'} | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        body = (f"{table}\n\n{threads} Both columns ran in the same process, one after the other. The naive "
                "loops are the oracles of `tests/naive_metrics.py` (one stable `np.argsort` per query, as the "
                "VSE++/CLIP4Cir loops do). 'equal to the loop' compares the ranks (ITM, on the timed rows) or the "
                "metric dict (CIRR).\n")
        print("wrote", write_report("metrics", "cirlab.core.metrics: vectorised vs naive per-query loop", body))


if __name__ == "__main__":
    main()
