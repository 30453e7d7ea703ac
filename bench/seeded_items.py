"""Per-item cost of the trainer's seeded item wrapper (``cirlab.engine.train.SeededItems``), side by side with the
rule it replaced: ``torch.random.fork_rng`` + ``torch.manual_seed`` per item.

    .venv/bin/python bench/seeded_items.py               # 4,000 items at a run's stack depth, 3 interleaved repeats
    .venv/bin/python bench/seeded_items.py --items 500   # quicker

Both sides seed torch, ``random`` and numpy per item and put the caller's states back; the items they give are
compared for equality. ``torch.manual_seed`` also re-seeds the CUDA generators and, before CUDA starts, records a
stack trace per call, so its cost grows with the depth of the stack it runs in: the items are read ``--depth``
frames deep (a training run reads them about 45 frames deep: run_experiment, the trainer, the DataLoader).

Writes reports/benchmarks/seeded_items.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import positive_int, write_report  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--items", type=positive_int, default=4000, help="items read per side and repeat (4000)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats (3)")
    parser.add_argument("--depth", type=positive_int, default=45, help="stack frames the items are read at (45)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not write reports/benchmarks/seeded_items.md")
    return parser.parse_args(argv)


class Draws:
    """An item that draws from all three generators (an augmentation would)."""

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        import numpy as np
        import torch

        return float(torch.rand(1)), random.random(), float(np.random.rand())


class ForkRngItems:
    """The replaced rule: fork_rng and torch.manual_seed (all devices' generators) per item."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __getitem__(self, index: int) -> Any:
        import numpy as np
        import torch

        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def at_depth(depth: int, fn: Callable[[], Any]) -> Any:
    return fn() if depth <= 1 else at_depth(depth - 1, fn)


def per_item_us(items: Any, n: int, depth: int) -> tuple[float, list[Any]]:
    def read() -> tuple[float, list[Any]]:
        start = time.perf_counter()
        got = [items[i] for i in range(n)]
        return (time.perf_counter() - start) / n * 1e6, got

    return at_depth(depth, read)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from cirlab.engine.train import SeededItems  # after the arguments: a bad one fails before torch loads

    sides = {"fork_rng + torch.manual_seed (before)": ForkRngItems(Draws(), 0),
             "SeededItems (now)": SeededItems(Draws(), 0)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs = {}
    for _ in range(args.repeats):
        for name, items in sides.items():
            us, outputs[name] = per_item_us(items, args.items, args.depth)
            times[name].append(us)
    before, now = (statistics.median(t) for t in times.values())
    same = len({repr(v) for v in outputs.values()}) == 1
    rows = [f"| {name} | {statistics.median(t):.1f} | {', '.join(f'{x:.1f}' for x in t)} |" for name, t in times.items()]
    body = "\n".join([f"{args.items} items per side and repeat, read {args.depth} stack frames deep, "
                      f"{args.repeats} interleaved repeats.", "",
                      "| per item | median µs | repeats (µs) |", "| --- | ---: | --- |", *rows, "",
                      f"Ratio before / now: **{before / now:.2f}x**. Same items on both sides: {same}."])
    print(body)
    if not args.no_write:
        print(f"wrote {write_report('seeded_items', 'Seeded training items: per-item cost', body)}")


if __name__ == "__main__":
    main()
