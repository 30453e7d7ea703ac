"""Per-image cost of the feature store's input digest (``cirlab.core.featcache.tensor_digest``), side by side with
the hash it replaced (BLAKE2b-128).

    .venv/bin/python bench/feature_digest.py              # 200 images of 3x128x128 and 3x224x224 fp32, 3 repeats
    .venv/bin/python bench/feature_digest.py --images 50  # quicker

A warm AMC ``lite`` run reads every image's backbone features from the store, keyed by the digest of the transformed
fp32 image, so the digest is paid for every image of every step. Both sides hash the same bytes (dtype, shape, then
the tensor); the timed loop is the whole ``tensor_digest`` call (the copy to contiguous CPU memory included).

Writes reports/benchmarks/feature_digest.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, positive_int, write_report  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--images", type=positive_int, default=200, help="images hashed per side and repeat (200)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats (3)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not write reports/benchmarks/feature_digest.md")
    return parser.parse_args(argv)


def blake2b_digest(t: Any) -> str:
    """The replaced digest: BLAKE2b-128 of dtype, shape and bytes."""
    import torch

    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}:{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _sha_note() -> str:
    """The ratio depends on the CPU: SHA-256 is fast where the CPU has SHA instructions (x86 ``sha_ni``, Arm
    ``sha2``), and typically slower than BLAKE2b where it has none (Intel Xeons before Ice Lake)."""
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                 if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    said = "has" if flags & {"sha_ni", "sha2"} else "has no" if flags else "may or may not have"
    return (f"This CPU {said} SHA instructions (x86 `sha_ni`, Arm `sha2`). The ratio depends on them: without "
            "them SHA-256 is typically slower than BLAKE2b, and this digest would cost more than the one it replaced.")


def per_image_us(digest: Callable[[Any], str], images: list[Any]) -> float:
    start = time.perf_counter()
    keys = {digest(image) for image in images}
    assert len(keys) == len(images), "two images gave one digest"
    return (time.perf_counter() - start) / len(images) * 1e6


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch  # after the arguments: a bad one fails before torch loads

    from cirlab.core.featcache import tensor_digest

    sides = {"BLAKE2b-128 (before)": blake2b_digest, "SHA-256, first 128 bits (now)": tensor_digest}
    rows, ratios = [], []
    for side in (128, 224):
        gen = torch.Generator().manual_seed(side)
        images = [torch.randn(3, side, side, generator=gen) for _ in range(args.images)]
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
            for name, digest in order:
                times[name].append(per_image_us(digest, images))
        before, now = (statistics.median(t) for t in times.values())
        ratios.append(before / now)
        rows += [f"| 3x{side}x{side} fp32 | {name} | {statistics.median(t):.0f} | {', '.join(f'{x:.0f}' for x in t)} |"
                 for name, t in times.items()]
    body = "\n".join([f"{args.images} images per size, side and repeat, {args.repeats} interleaved repeats, "
                      f"{torch.get_num_threads()} torch threads (hashing is single-threaded).", "",
                      "| image | digest | median µs per image | repeats (µs) |", "| --- | --- | ---: | --- |", *rows,
                      "", "Ratio before / now: " + ", ".join(f"**{r:.2f}x** at {s} px" for r, s in
                                                             zip(ratios, (128, 224))) + ".", "", _sha_note()])
    print(f"Machine: {machine()}\n\n{body}")
    if not args.no_write:
        print(f"wrote {write_report('feature_digest', 'Feature store input digest: per-image cost', body)}")


if __name__ == "__main__":
    main()
