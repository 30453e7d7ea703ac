"""AMC ``lite`` training speed with and without the frozen-feature cache, timed side by side.

    .venv/bin/python bench/amc_cache.py                  # batch 32, 6 timed steps, 1 thread, 3 interleaved repeats
    .venv/bin/python bench/amc_cache.py --quick          # batch 16, 3 steps, 2 repeats

``lite`` freezes its EfficientNet-Lite0 backbone. Both sides run the real trainer (:func:`cirlab.fit`: Adam, EMA,
clipping) for the same steps on the same items, drawn from a pool of ``--pool`` distinct 128 px images (as an
epoch of the emoji recipe revisits its images): ``uncached`` recomputes the backbone every step
(``feature_cache=False``); ``cached`` reads the features from the memory-mapped store (filled by one pass over the
pool first, timed separately as the cold cost). The ratio is samples/s cached / uncached, the median of the
per-repeat ratios of interleaved runs. Equality: two fresh models (same seed) train the same steps with and
without the cache, and their losses and weights are compared bit for bit.

Writes reports/benchmarks/amc_cache.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fill_defaults, machine, paired, positive_int, write_report  # noqa: E402

WORDS = ("is more has longer shorter darker lighter red blue black white green floral striped sleeveless "
         "collar buttons pattern print logo graphic lace casual formal fitted loose cotton denim silk").split()


class PoolItems:
    """``n`` training items whose reference and target images come from a fixed pool (images recur). A plain
    map-style dataset (``__len__``, ``__getitem__``: all the DataLoader reads), so that the module does not import
    torch: the script parses its arguments first (a bad one is rejected in 0.1 s, not after torch's 1.5 s)."""

    def __init__(self, pool: torch.Tensor, texts: list[str], n: int) -> None:
        self.pool, self.texts, self.n = pool, texts, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = len(self.pool)
        return {"ref_image": self.pool[(7 * i) % p], "target_image": self.pool[(13 * i + 1) % p],
                "text": self.texts[i % len(self.texts)]}


def build(cache: bool, cache_dir: str, texts: list[str]) -> Any:
    import torch

    import cirlab

    torch.manual_seed(0)
    model = cirlab.create_model("amc", "lite", feature_cache=cache, feature_cache_dir=cache_dir)
    model.fit_vocab(texts)
    return model


def fit_time(model: Any, data: PoolItems, batch: int, warmup: int, steps: int) -> float:
    """Seconds per optimizer step of cirlab.fit over the timed steps."""
    import cirlab
    from cirlab.engine.train import resolve_train_config

    stamps: list[float] = []
    cfg = resolve_train_config(model, {
        "batch_size": batch, "epochs": 1, "max_steps": warmup + steps, "device": "cpu", "precision": "fp32",
        "eval_every": 0, "eval_every_steps": 0, "checkpoint_every": 0, "log_every": 1, "num_workers": 0,
        "shuffle": False, "tensorboard": False})
    with tempfile.TemporaryDirectory() as out:
        cirlab.fit(model, data, cfg, output_dir=out, callbacks=[lambda record: stamps.append(time.perf_counter())])
    return (stamps[-1] - stamps[warmup - 1]) / steps


def same_training(pool: torch.Tensor, texts: list[str], cache_dir: str, steps: int = 3) -> bool:
    """Fresh models with and without the cache take the same steps: identical losses and weights?"""
    import torch

    from cirlab.core import featcache

    results = []
    for cache in (False, True):
        featcache._STORES.clear()
        model = build(cache, cache_dir, texts).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []
        for s in range(steps):
            idx = torch.arange(8) * (s + 3) % len(pool)
            out = model.training_step({"ref_image": pool[idx], "target_image": pool[idx.roll(1)],
                                       "text": [texts[int(i) % len(texts)] for i in idx]})
            loss = out["cls_loss"] + out["sim_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l0, p0), (l1, p1) = results
    return l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # batch size, steps and repeats default to None: --quick fills only the ones not given
    ap.add_argument("--batch-size", type=positive_int, help="training batch (default 32)")
    ap.add_argument("--steps", type=positive_int, help="timed optimizer steps per run (default 6)")
    ap.add_argument("--warmup", type=positive_int, default=1,
                    help="untimed steps first, at least 1: the timing starts at the last of them (default 1)")
    ap.add_argument("--pool", type=positive_int, default=96, help="distinct images (default 96)")
    ap.add_argument("--repeats", type=positive_int, help="interleaved repeats (default 3)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 steps, 2 repeats for the options not given"
                    "; prints only: quick sizes never replace the committed table")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    import torch  # after parsing: a bad argument is rejected before torch's import time

    fill_defaults(args, {"batch_size": 16, "steps": 3, "repeats": 2} if args.quick else
                  {"batch_size": 32, "steps": 6, "repeats": 3})
    if args.quick:
        args.no_write = True
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(args.pool, 3, 128, 128, generator=gen)
    texts = [" ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (8,), generator=gen)) for _ in range(64)]
    data = PoolItems(pool, texts, (args.warmup + args.steps) * args.batch_size)
    with tempfile.TemporaryDirectory() as cache_dir:
        from cirlab.core import featcache

        featcache._STORES.clear()
        uncached, cached = build(False, cache_dir, texts), build(True, cache_dir, texts)
        t0 = time.perf_counter()
        with torch.no_grad():
            cached.image_encoder(pool)  # the cold pass: every image's features computed once and stored
        cold = time.perf_counter() - t0
        store = cached.image_encoder._feature_store()
        store.flush()
        res = paired(lambda: fit_time(uncached, data, args.batch_size, args.warmup, args.steps),
                     lambda: fit_time(cached, data, args.batch_size, args.warmup, args.steps), args.repeats,
                     self_timed=True)
        identical = same_training(pool, texts, cache_dir)
        disk = sum(f.stat().st_size for f in Path(cache_dir).rglob("*.npy")) / 2**20
    b = args.batch_size
    table = ("| | s/step | samples/s |\n| --- | ---: | ---: |\n"
             f"| backbone every step (`feature_cache=False`) | {res['anchor']:.3f} | {b / res['anchor']:.1f} |\n"
             f"| cached features (`feature_cache=True`, warm) | {res['candidate']:.3f} | "
             f"{b / res['candidate']:.1f} |\n")
    ratios = ", ".join(f"{r:.2f}" for r in res["ratios"])
    summary = (f"samples/s cached / uncached: **{res['ratio']:.2f}x** (median of per-repeat ratios {ratios}); "
               f"cold pass over the {args.pool}-image pool: {cold:.2f} s ({args.pool / cold:.0f} images/s); "
               f"store on disk: {disk:.1f} MB; cached run identical to the uncached run (losses and weights, "
               f"3 steps): {'yes' if identical else 'NO'}.")
    print(table + "\n" + summary)
    if not args.no_write:
        body = (f"AMC `lite` (frozen EfficientNet-Lite0 at 128 px, MiniLM word vectors), batch {b}, "
                f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} torch thread(s), "
                f"{args.pool} distinct images.\n\n{table}\n{summary}\n\n"
                "Both runs are the real trainer (`cirlab.fit`: Adam, EMA, clipping), timed interleaved "
                f"({args.repeats} repeats, alternating which runs first; medians) on a 2-core machine shared with "
                "other jobs. What remains per step with the cache: hashing each input image (BLAKE2b over its "
                "bytes, about 0.2 ms), the trainable 1x1 projection, experts, routers, LSTM and the optimiser.\n\n"
                "How the cache stays exact: features are computed in fixed chunks of 8 images (zero-padded), so an "
                "image's features do not depend on its batch; they are stored as float32 under the digest of the "
                "transformed image, in a folder keyed by the backbone weights' digest (a new image, transform or "
                "set of weights misses). `tests/test_amc.py` checks cached == uncached training bit for bit.\n")
        print("wrote", write_report("amc_cache", "AMC lite: frozen-feature cache", body))


if __name__ == "__main__":
    main()
