"""Exact top-K search: cirlab's ``topk_search`` backends vs faiss-cpu ``IndexFlatIP``, timed side by side.

    .venv/bin/python bench/retrieval.py                 # 100k x 512 gallery, 5k queries, k = 50, 1 and 2 threads
    .venv/bin/python bench/retrieval.py --quick         # 20k gallery, 1k queries

The anchor is faiss ``IndexFlatIP.search`` (the index built beforehand, not timed), the exact inner-product search
most code bases use. Each cirlab backend (``blocks``: the previous default, torch.topk per block; ``filter``: fp32
blocks against a running threshold; ``bf16``: bf16 blocks with a certified bound and exact fp32 rescoring;
``auto``: what ``topk_search`` picks on this machine) is timed as a pair with faiss, interleaved (alternating which
runs first) and repeated; the table gives median times and the median of the per-repeat ratios faiss / cirlab.

"identical" compares each backend's indices and scores with the ``blocks`` backend's, bit for bit; faiss's own
lists are compared too (faiss orders ties arbitrarily and its fp32 sums differ in the last bits).

Writes reports/benchmarks/retrieval.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import choice_list, fill_defaults, int_list, machine, paired, positive_int, write_report  # noqa: E402


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of queries whose top-k index lists are identical, in order."""
    return 100.0 * float((a == b).all(1).double().mean())


def run_threads(q: torch.Tensor, g: torch.Tensor, k: int, threads: int, backends: list[str], repeats: int,
                index) -> list[tuple]:
    import torch

    from cirlab.core import _search
    from cirlab.core.retrieval import topk_search

    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    ref_s, ref_i = topk_search(q, g, k, backend="blocks") if "blocks" not in backends else (None, None)
    rows = []
    for backend in backends:
        res = paired(lambda: index.search(q.numpy(), k), lambda: topk_search(q, g, k, backend=backend), repeats)
        s, i = res["candidate_out"]
        if ref_i is None:
            ref_s, ref_i = s, i
        same = torch.equal(i, ref_i) and torch.equal(s, ref_s)
        faiss_same = agreement(torch.from_numpy(res["anchor_out"][1]).long(), ref_i)
        name = backend if backend != "auto" else f"auto (= {_search.choose_backend('auto', q, g, k)})"
        rows.append((threads, name, res, same, faiss_same))
        print(threads, name, f"faiss {res['anchor']:.2f}s cirlab {res['candidate']:.2f}s ratio {res['ratio']:.2f} "
              f"({', '.join(f'{x:.2f}' for x in res['ratios'])}) identical {same}", flush=True)
    return rows


def _backends() -> tuple[str, ...]:
    """cirlab's search backends, read when --backends is parsed (``cirlab.core._search`` imports torch)."""
    from cirlab.core import _search

    return _search.BACKENDS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # gallery and queries default to None: --quick fills only the ones not given
    ap.add_argument("--gallery", type=positive_int, help="gallery size (default 100,000)")
    ap.add_argument("--queries", type=positive_int, help="number of queries (default 5,000)")
    ap.add_argument("--dim", type=positive_int, default=512, help="embedding dimension (default 512)")
    ap.add_argument("-k", type=positive_int, default=50, help="list length, at most --gallery (default 50)")
    ap.add_argument("--threads", type=int_list(1), default="1,2",
                    help="comma-separated thread counts, torch and faiss (default 1,2)")
    ap.add_argument("--backends", type=choice_list(_backends),
                    default="blocks,filter,bf16,auto", help="comma-separated cirlab backends to time against faiss "
                    "(default blocks,filter,bf16,auto)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats per pair (default 3)")
    ap.add_argument("--quick", action="store_true", help="20k gallery, 1k queries for the size options not given"
                    "; prints only: quick sizes never replace the committed table")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    from cirlab.core import _search  # imports torch: after parsing, so a bad argument is rejected in 0.1 s

    fill_defaults(args, {"gallery": 20_000, "queries": 1_000} if args.quick else
                  {"gallery": 100_000, "queries": 5_000})
    if args.k > args.gallery:  # faiss pads the lists with -1 where the gallery runs out
        ap.error(f"-k {args.k} is more than --gallery {args.gallery}")
    if args.quick:
        args.no_write = True
    try:
        import faiss
    except ImportError:
        raise SystemExit("bench/retrieval.py needs faiss as its anchor: pip install faiss-cpu (or cirlab[faiss])")
    print(machine(), flush=True)
    q, g = embeddings(args.queries, args.dim, 0), embeddings(args.gallery, args.dim, 1)
    size = f"{args.queries} queries x {args.gallery} gallery x {args.dim} dims, k = {args.k}"
    print(size, flush=True)
    index = faiss.IndexFlatIP(args.dim)
    index.add(g.numpy())
    rows = []
    for threads in args.threads:
        rows += run_threads(q, g, args.k, threads, args.backends, args.repeats, index)
    lines = ["| threads | cirlab backend | faiss IndexFlatIP (s) | cirlab (s) | faiss / cirlab (median of ratios) | "
             "per-repeat ratios | identical to `blocks` (indices and scores) | faiss lists equal to cirlab's |",
             "| ---: | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for threads, name, res, same, faiss_same in rows:
        ratios = ", ".join(f"{x:.2f}" for x in res["ratios"])
        lines.append(f"| {threads} | `{name}` | {res['anchor']:.2f} | {res['candidate']:.2f} | "
                     f"**{res['ratio']:.2f}x** | "
                     f"{ratios} | {'yes' if same else 'NO'} | {faiss_same:.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    bf16 = "has" if _search.cpu_has_bf16() else "does not have"
    body = f"""{size}; faiss {faiss.__version__} (faiss-cpu from PyPI); this CPU {bf16} bf16 dot-product units.

{table}

Each row is one pair, faiss and the cirlab backend, timed interleaved ({args.repeats} repeats, alternating which
runs first; medians), on a 2-core machine shared with other jobs: absolute times move with the load, the ratio
within a repeat much less. The faiss index is built once before timing (its `add` is not counted).

How the fast backends stay exact (details in `cirlab/core/_search.py`):

* `filter`: the same fp32 block products as `blocks`, but each block is compared with a running per-query
  threshold (the k-th best score so far; for the first block, the k-th largest of 4k group maxima) instead of
  `torch.topk`, so only the few items that can still enter the list are kept and sorted.
* `bf16`: the block products run in bf16 (on CPUs with AVX-512 BF16 or AMX units), with a
  certified per-query bound on `|bf16 product - fp32 product|` from the norms of the vectors and of their bf16
  rounding residuals. Every item that could reach the k-th place is kept (about 2x k here) and rescored in fp32
  by the same BLAS kernel as the block product (checked bit for bit once per process), so lists and scores are
  identical to `blocks`; ties go to the lower gallery index in every backend.
* `faiss` (when timed): faiss `IndexFlatIP` for k + 16 items, certified with the bound on `|faiss fp32 - torch
  fp32|` and rescored exactly (rows faiss cannot certify go through `filter`); it pays faiss's own time plus the
  rescoring, so it stays below 1x here: it is what `auto` picks on a CPU without bf16 units when faiss is installed.
* Memory: one query x gallery block (32 MB bf16 / 64 MB fp32 at the defaults), the candidate lists (about
  2k per query), and for `bf16` a bf16 copy of the gallery (half its size) for the duration of the call.
"""
    print("wrote", write_report("retrieval", "Exact top-K search vs faiss IndexFlatIP", body))


if __name__ == "__main__":
    main()
