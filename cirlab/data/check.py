"""Validate a whole dataset tree and list every problem (``cirlab data check``).

The checker runs the loaders themselves in *collect* mode (:class:`~cirlab.data.base.ProblemCollector` with
``strict=False``), so it reports exactly what loading would reject, all at once instead of the first problem only.
With ``verify_images=True`` every image file is also opened and decoded (slow on real data; off by default).
"""
from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from pathlib import Path
from types import ModuleType

from cirlab.data.base import ProblemCollector, ProblemList
from cirlab.data.catalog import DATASETS as _TABLE
from cirlab.data.catalog import canonical_name

logger = logging.getLogger(__name__)

# "precomp" checks every *_precomp folder under the root
DATASETS = (*_TABLE, "precomp")


def check_dataset(name: str, root: str | os.PathLike | None = None, *, verify_images: bool = False) -> ProblemList:
    """Every problem of a dataset tree (an empty list when the tree is valid).

    Args:
        name: "fashioniq" | "shoes" | "cirr" | "f30k" | "coco" | "precomp" (every ``*_precomp`` folder under root).
        root: the dataset root; None = ``$CIRLAB_DATA/<name>`` (precomp: ``$CIRLAB_DATA``).
        verify_images: also decode every image file referenced (catches truncated or corrupt files).

    Returns:
        a ``list[Problem]`` whose ``stats`` attribute counts what was walked (splits, triplets, images, captions).
    """
    from cirlab.core.paths import resolve_root

    key = canonical_name(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    itm = key == "precomp" or _TABLE[key].is_itm
    root = resolve_root(root, "" if itm else _TABLE[key].subdir)
    sink = ProblemCollector(strict=False)
    if not Path(root).is_dir():
        sink.add("missing_file", root, None, "dataset root not found")
        return sink.problems
    if itm:
        from cirlab.data import precomp

        precomp.scan(Path(root), sink, name=None if key == "precomp" else key)
    else:
        module = importlib.import_module(_TABLE[key].loader)
        if verify_images:
            _verify_images(module, Path(root), sink)
        else:
            module.scan(Path(root), sink)
    return sink.problems


def _verify_images(module: ModuleType, root: Path, sink: ProblemCollector) -> None:
    """Scan, then decode every image the loaded splits point to."""
    from PIL import Image

    paths = {path for split in module.scan(root, sink) for path in split.image_paths.values()}
    for path in sorted(paths):
        if not path.is_file():
            continue  # already reported as missing
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as err:  # noqa: BLE001 - any decoder failure is a problem to list
            sink.add("unreadable_image", path, None, f"cannot decode image: {err}")
    sink.count("images_decoded", len(paths))


def format_problems(problems: list, max_per_kind: int | None = None) -> str:
    """Problems grouped by kind, each group headed by its count, then a total line.

    Args:
        problems: from :func:`check_dataset`.
        max_per_kind: list at most this many per kind (the count still covers all); None = list every one.
    """
    if not problems:
        return "no problems"
    counts = Counter(p.kind for p in problems)
    lines = []
    for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{kind}: {count} problem{'s' if count != 1 else ''}")
        group = [p for p in problems if p.kind == kind]
        shown = group if max_per_kind is None else group[:max_per_kind]
        lines += [f"  {p}" for p in shown]
        if len(shown) < len(group):
            lines.append(f"  ... and {len(group) - len(shown)} more")
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
    lines.append(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in total ({summary})")
    return "\n".join(lines)


def format_stats(stats: dict[str, int]) -> str:
    """``3 splits, 120 triplets, 64 images`` from a ProblemList's stats."""
    order = ("splits", "triplets", "images", "captions", "images_decoded")
    keys = [k for k in order if k in stats] + sorted(k for k in stats if k not in order)
    return ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in keys) or "nothing found"
