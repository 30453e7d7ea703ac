"""DIME full-matrix evaluation speed: cirlab's evaluation kernel vs the original plain 64 x 64 shard loop.

Every side computes the same [images x captions] score matrix of one DIME direction with the paper's dimensions
(embed 256, 16 IMRC heads, router hidden 512, random weights). Image and caption encodings are computed once
beforehand and shared (BERT is not part of the timing; a small random BERT with a whole-word vocabulary stands in,
giving Flickr-like caption lengths of 10-22 tokens).

* anchor ``plain``: the original loop, 64 images x 64 captions per call of the interaction module, every block
  computed from scratch (:func:`cirlab.models.dime.naive_score_matrix`).
* ``fp32`` / ``bf16``: :func:`cirlab.models.dime.score_matrix`, the evaluation kernel of
  :mod:`cirlab.models._dime_fast` (per-item work once, exact-length caption groups, cache-sized shards).

Each pair is timed interleaved (alternating which runs first), repeated; the table gives medians of the times and
of the per-repeat ratios, and the largest score difference to the plain loop.

Usage::

    .venv/bin/python bench/dime_eval.py                          # CPU, 24 x 120 pairs, 1 thread
    .venv/bin/python bench/dime_eval.py --images 200 --device cuda --project-coco5k

Writes ``reports/benchmarks/dime_eval.md``; ``--out NAME`` writes ``reports/benchmarks/NAME.md`` and ``--out
PATH.md`` (or a path with a folder) that file, as ``--report`` does in the other bench scripts; ``--no-write`` (or
``--out ''``) prints only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPORT_HELP, choice_list, machine, nonneg_int, paired, positive_int, report_arg,  # noqa: E402
                     torch_device, write_report)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # names of torch dtypes: torch is imported after parsing
WORDS = ("a man woman dog cat red blue small large street park ball car tree water near on in the with "
         "playing sitting standing walking running two three white black green young old").split()


def _captions(n: int, seed: int) -> list[str]:
    """Flickr-like caption lengths (8-20 words, 10-22 tokens with [CLS]/[SEP]/'.') from a small word list."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 21, (n,), generator=g)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(k),), generator=g)) + " ."
            for k in lengths]


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--direction", choices=["i2t", "t2i", "both"], default="both",
                        help="DIME direction(s) to score (default both)")
    parser.add_argument("--images", type=positive_int, default=24, help="images, 5 captions each (default 24)")
    parser.add_argument("--plain-shard", type=positive_int, default=64,
                        help="block side of the plain loop (default 64)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device (default cpu)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats per pair (default 3)")
    parser.add_argument("--threads", type=nonneg_int, default=1, help="torch CPU threads (0: torch default; default 1)")
    parser.add_argument("--dtypes", type=choice_list(list(DTYPES)), default="fp32,bf16",
                        help="comma-separated cirlab precisions to time (default fp32,bf16)")
    parser.add_argument("--project-coco5k", action="store_true", help="project the COCO-5K (5000 x 25000) time")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", type=report_arg, default=None,
                        help=f"the report (default dime_eval): {REPORT_HELP}; '' = print only. Not an output folder "
                             "(rerank_synthetic's --out is one)")
    args = parser.parse_args(argv)
    if args.no_write and args.out:
        parser.error(f"--out {args.out!r} names a report and --no-write writes none: drop one of them")
    if args.out is None:
        args.out = "dime_eval"
    if not args.out:
        args.no_write = True
    import torch  # after parsing: a bad argument is rejected before torch's import time

    if args.threads:
        torch.set_num_threads(args.threads)

    import cirlab
    from cirlab.core._search import cpu_has_bf16
    from cirlab.models.dime import eval_dtype, naive_score_matrix, score_matrix, tiny_vocab

    print(machine(), flush=True)
    device = torch.device(args.device)
    n_img, n_cap = args.images, 5 * args.images
    feats = torch.rand(n_img, 36, 2048, generator=torch.Generator().manual_seed(0))
    texts = _captions(n_cap, 1)
    directions = ["i2t", "t2i"] if args.direction == "both" else [args.direction]
    rows, default = [], None
    for direction in directions:
        torch.manual_seed(0)
        vocab = Path(tempfile.mkdtemp()) / "vocab.txt"  # whole-word vocab: realistic token counts
        vocab.write_text("\n".join(tiny_vocab(WORDS)) + "\n", encoding="utf-8")
        model = cirlab.create_model("dime", f"f30k_{direction}", bert="random",
                                    vocab_file=str(vocab)).to(device).eval()
        default = eval_dtype(model, device)
        with torch.no_grad():
            img, txt = model.encode_image(feats.to(device)), model.encode_text(texts)
        small = ({k: v[:4] for k, v in img.items()}, {k: v[:8] for k, v in txt.items()})
        for name in args.dtypes:  # warm-up (allocator, kernels)
            score_matrix(model, *small, dtype=getattr(torch, DTYPES[name]), device=device)

        def plain() -> torch.Tensor:
            out = naive_score_matrix(model, img, txt, shard=args.plain_shard, device=device)
            _sync(device)
            return out

        for name in args.dtypes:
            def ours(dt: torch.dtype = getattr(torch, DTYPES[name])) -> torch.Tensor:
                out = score_matrix(model, img, txt, dtype=dt, device=device)
                _sync(device)
                return out

            res = paired(plain, ours, args.repeats)
            diff = float((res["anchor_out"] - res["candidate_out"]).abs().max())
            rows.append((direction, name, res, diff))
            print(f"{direction} {name}: plain {res['anchor']:.2f}s cirlab {res['candidate']:.2f}s "
                  f"ratio {res['ratio']:.2f} ({', '.join(f'{r:.2f}' for r in res['ratios'])}) max|diff| {diff:.1e}",
                  flush=True)
    pairs = n_img * n_cap
    lines = ["| direction | cirlab precision | plain 64x64 loop (s) | cirlab (s) | plain / cirlab (median of ratios) "
             "| per-repeat ratios | pairs/s plain -> cirlab | max abs score diff |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for direction, name, res, diff in rows:
        ratios = ", ".join(f"{r:.2f}" for r in res["ratios"])
        lines.append(f"| {direction} | {name} | {res['anchor']:.2f} | {res['candidate']:.2f} | **{res['ratio']:.2f}x** "
                     f"| {ratios} | {pairs / res['anchor']:,.0f} -> {pairs / res['candidate']:,.0f} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.project_coco5k:
        table += "\n\nCOCO-5K (5,000 images x 25,000 captions = 125M pairs) projected from the measured rates:\n"
        for direction, name, res, _ in rows:
            table += (f"\n- {direction} {name}: plain {125e6 / (pairs / res['anchor']) / 3600:.1f} h, cirlab "
                      f"{125e6 / (pairs / res['candidate']) / 3600:.1f} h")
    if args.no_write:
        return 0
    units = "has" if cpu_has_bf16() else "does not have"
    body = f"""{n_img} images x {n_cap} captions = {pairs:,} pairs per direction; paper dimensions, random weights;
{torch.get_num_threads()} torch thread(s) on {device}. This CPU {units} bf16 dot-product units, so
`eval_dtype="auto"` (the default) evaluates in {'bf16' if default == torch.bfloat16 else 'fp32'} here.

{table}

Each row is one pair timed interleaved ({args.repeats} repeats, alternating which runs first; medians) on a
2-core machine shared with other jobs. The last column is the largest difference between cirlab's scores and
the plain loop's (fp32): fp32 is the same function to float rounding; bf16 (weights and activations in bf16,
fp32 accumulation and reductions) is the documented tolerance of `eval_dtype="bf16"`.

Where the time goes (fp32, 1 thread): about 60 % in the linear layers (fc_1/fc_2 of CMRC, GLGC's fc_1, IMRC's
q/k/v and FFN in layers 1 and 2: about 52M multiply-adds per i2t pair, 36 regions x 256 dims), which the plain
loop runs at nearly the same rate: in fp32 the kernel wins by doing less per pair (layer-0 GLGC without a
product, CMRC projections per caption, no padding) and by keeping the per-pair tensors in cache. t2i gains more
because its refined tokens are the words (10-22) instead of 32 padded positions. bf16 runs the products about 3x
faster on AVX-512 BF16; the rest (softmax, tanh, the mixing) then weighs more.
"""
    print("wrote", write_report(args.out, "DIME full-matrix evaluation speed", body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
