"""Protocol metrics: cirlab.core.metrics vs the loops the papers' evaluation code runs, timed side by side.

    .venv/bin/python bench/metrics.py            # COCO-5K (5,000 x 25,000) and CIRR val size (4,181 x 2,297)
    .venv/bin/python bench/metrics.py --quick    # small sizes, seconds

ITM: the anchor is the original evaluation loop exactly as the VSE++ / SCAN / DIME / HREM ``evaluation.py`` runs it
over the full matrix: per image ``np.argsort(d)[::-1]`` (NumPy's default, unstable sort) and ``np.where`` for each of
its 5 captions; per caption the same over the transposed matrix. cirlab's :func:`cirlab.core.metrics.itm_ranks`
computes both directions in one pass over the matrix. Two floors are timed on the same matrix for scale: a plain
read (``max``) and one compare-and-count pass (the cheapest exact rank computation of a single direction).

CIRR: the anchor is the per-query loop of ``tests/naive_metrics.py`` (one stable argsort per query).

Every pair is timed interleaved (alternating which side runs first) and repeated; the tables give the median
times and the median of the per-repeat ratios. Writes reports/benchmarks/metrics.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import fill_defaults, int_range, machine, paired, positive_int, write_report  # noqa: E402


def original_itm_loop(sims: np.ndarray, per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """0-based i2t and t2i ranks as the original evaluation code computes them (unstable argsort, reversed)."""
    import numpy as np

    n = sims.shape[0]
    i2t, top1 = np.zeros(n), np.zeros(n)
    for index in range(n):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(per_image * index, per_image * index + per_image):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        i2t[index], top1[index] = rank, inds[0]
    st = sims.T
    t2i, top1_t = np.zeros(per_image * n), np.zeros(per_image * n)
    for index in range(n):
        for i in range(per_image):
            inds = np.argsort(st[per_image * index + i])[::-1]
            t2i[per_image * index + i] = np.where(inds == index)[0][0]
            top1_t[per_image * index + i] = inds[0]
    return i2t, t2i


def read_pass(sims: np.ndarray) -> float:
    return float(sims.max())


def compare_count_pass(sims: np.ndarray, rows: int) -> np.ndarray:
    """One direction's strict count ``#(s_ij > t_i)`` in blocks of ``rows`` rows: one compare + count per element."""
    import numpy as np

    n, c = sims.shape
    t = sims[np.arange(n), 5 * np.arange(n)][:, None]
    out, buf = np.zeros(n, dtype=np.int64), np.empty((rows, c), dtype=bool)
    for r0 in range(0, n, rows):
        m = np.greater(sims[r0:r0 + rows], t[r0:r0 + rows], out=buf[:min(rows, n - r0)])
        out[r0:r0 + rows] = m.view(np.uint8).sum(1, dtype=np.int32)
    return out


def bench_itm(n_images: int, repeats: int) -> list[dict]:
    import torch

    from cirlab.core import metrics as M

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_images, 256, generator=gen), dim=1)
    cap = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 0.9 * torch.randn(5 * n_images, 256,
                                                                                      generator=gen), dim=1)
    sims = img @ cap.T  # [N, 5N] float32
    s = sims.numpy()
    rows = M._itm_rows(None, s.shape[1], 4)
    cirlab = lambda: M.itm_ranks(sims)  # noqa: E731
    size = f"{n_images} x {5 * n_images}"
    res = paired(lambda: original_itm_loop(s), cirlab, repeats)
    (o_i2t, o_t2i), (c_i2t, c_t2i) = res["anchor_out"], res["candidate_out"]
    same = int((o_i2t == c_i2t.numpy() - 1).sum() + (o_t2i == c_t2i.numpy() - 1).sum())
    total = len(o_i2t) + len(o_t2i)
    out = [{"name": f"ITM ranks, both directions ({size})", **res,
            "anchor_name": "original loop (argsort, [::-1], np.where)",
            "note": f"{same:,} of {total:,} ranks equal the loop's"}]
    for label, fn in (("one read pass (`max`)", lambda: read_pass(s)),
                      (f"one compare-and-count pass ({rows}-row blocks)", lambda: compare_count_pass(s, rows))):
        r = paired(fn, cirlab, repeats)
        out.append({"name": f"ITM ranks, both directions ({size})", **r, "anchor_name": label,
                    "note": f"cirlab takes {1 / r['ratio']:.1f}x this floor"})
    return out


def bench_cirr(n_queries: int, n_gallery: int, repeats: int) -> dict:
    import numpy as np
    import torch

    import naive_metrics as N

    from cirlab.core import metrics as M

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n_queries, 256, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(n_gallery, 256, generator=gen), dim=1)
    scores = q @ g.T
    members = np.stack([rng.choice(n_gallery, 6, replace=False) for _ in range(n_queries)])
    reference, target = members[:, 0].copy(), members[:, 1].copy()
    res = paired(lambda: N.naive_cirr(scores.numpy(), target, reference, members),
                 lambda: M.cirr_metrics(scores, target, reference, members), repeats)
    parity = all(abs(res["candidate_out"][k] - v) < 1e-9 for k, v in res["anchor_out"].items())
    return {"name": f"CIRR val protocol (R@K + Rsubset@K, {n_queries} x {n_gallery}, img_set of 6)",
            **res, "anchor_name": "per-query loop (stable argsort)",
            "note": "metric dicts equal" if parity else "METRICS DIFFER"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (1,000 images; 1,000 x 500 CIRR) for the size "
                    "options not given; prints only: quick sizes never replace the committed table")
    # sizes default to None: --quick fills only the ones not given
    ap.add_argument("--images", type=positive_int, help="ITM images (captions = 5x; default 5,000)")
    ap.add_argument("--cirr-queries", type=positive_int, help="CIRR queries (default 4,181)")
    ap.add_argument("--cirr-gallery", type=int_range(6),
                    help="CIRR gallery size, at least 6: every query draws an img_set of 6 (default 2,297)")
    ap.add_argument("--repeats", type=positive_int, default=3,
                    help="interleaved repeats per pair (medians are reported; default 3)")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch threads (default 1: the original loop is single-threaded NumPy)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write reports/benchmarks/metrics.md")
    args = ap.parse_args(argv)
    fill_defaults(args, {"images": 1000, "cirr_queries": 1000, "cirr_gallery": 500} if args.quick else
                  {"images": 5000, "cirr_queries": 4181, "cirr_gallery": 2297})
    if args.quick:
        args.no_write = True
    import torch  # after parsing: a bad argument is rejected before torch's import time

    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    results = bench_itm(args.images, args.repeats) + [bench_cirr(args.cirr_queries, args.cirr_gallery, args.repeats)]
    lines = ["| protocol | anchor | anchor (s) | cirlab (s) | anchor / cirlab (median of ratios) | per-repeat ratios "
             "| note |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['name']} | {r['anchor_name']} | {r['anchor']:.3f} | {r['candidate']:.3f} | "
                     f"**{r['ratio']:.2f}x** | {ratios} | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        body = (f"{table}\n\ntorch threads: {torch.get_num_threads()}; the original loop and the floors are "
                "single-threaded NumPy. Each row is one pair timed interleaved: the two sides alternate which runs "
                f"first, {args.repeats} repeats, medians of the times and of the per-repeat ratios (the machine is "
                "shared, so absolute times move with the load; the ratio within a repeat does not, much).\n\n"
                "The original loop sorts with NumPy's default (unstable) argsort, so where scores tie its ranks "
                "are arbitrary; cirlab's are stable (ties to the lower index). Random float scores have almost no "
                "ties, hence the rank counts in the note. The floors are what any exact ranking must at least do: "
                "read the matrix once, or compare-and-count it once for a single direction.\n")
        print("wrote", write_report("metrics", "cirlab.core.metrics: protocol metrics vs the original loops", body))


if __name__ == "__main__":
    main()
