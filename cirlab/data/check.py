"""Validate a whole dataset tree and list every problem (``cirlab data check``).

The checker runs the loaders themselves in *collect* mode (:class:`~cirlab.data.base.ProblemCollector` with
``strict=False``), so it reports exactly what loading would reject, all at once instead of the first problem only.
Beyond what loading checks, every image the splits use gets a fast header check (it opens as an image, and a PNG
or JPEG file ends where its format says it ends, which catches zero-byte, garbage and truncated files); with
``verify_images=True`` every image is fully decoded instead (slow on real data). Precomp features are scanned for
NaN / infinite values. Findings that do not make a tree invalid (a query whose target is its own reference) are
listed as warnings.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from cirlab.data.base import (DataError, Findings, ProblemCollector, ProblemList, check_image_size, check_options,
                              cir_root, unfinished_write)
from cirlab.data.catalog import DATASETS as _TABLE
from cirlab.data.catalog import ITM_DATASETS
from cirlab.data.catalog import canonical_name

logger = logging.getLogger(__name__)

# "precomp" checks every *_precomp folder under the root
DATASETS = (*_TABLE, "precomp")
ITM_CHOICES = (*ITM_DATASETS, "precomp")  # the choices whose features --dim / --regions describe


def check_dataset(name: str, root: str | os.PathLike | None = None, *, verify_images: bool = False,
                  options: dict[str, Any] | None = None, max_per_kind: int | None = None) -> ProblemList:
    """Every problem of a dataset tree (an empty list when the tree is valid).

    Args:
        name: "fashioniq" | "shoes" | "cirr" | "f30k" | "coco" | "precomp" (every ``*_precomp`` folder under root).
        root: the dataset root; None = ``$CIRLAB_DATA/<name>`` (precomp: ``$CIRLAB_DATA``).
        verify_images: fully decode every image file referenced instead of the default header-and-ending check.
        options: the loader options a run would pass (``dataset.options``: precomp ``dim`` / ``regions`` for
            features other than 36 x 2048, Fashion-IQ ``missing_images``, ...), so the tree is checked as that run
            reads it; checked against the loader's table like a run config's.
        max_per_kind: keep at most this many problems (and warnings) of each kind and file, only counting the
            others (``problems.counts()``, ``problems.total``), so that millions of bad entries do not take
            gigabytes; None = keep every one.

    Returns:
        a ``list[Problem]`` whose ``stats`` attribute counts what was walked (splits, triplets, images, captions),
        whose ``warnings`` attribute lists findings that do not invalidate the tree, and whose ``root`` is the
        folder checked (``root/<dataset>`` when ``root`` holds several layouts, as the loaders read it). With
        ``max_per_kind``, ``len()`` counts the problems kept and ``total`` every one.
    """
    from cirlab.core.paths import resolve_root

    from cirlab.core.config import did_you_mean
    from cirlab.core.errors import ConfigError

    if not isinstance(verify_images, bool):  # "no" is truthy: every image would be decoded, slowly, unasked
        raise ConfigError(f"verify_images must be True or False, got {verify_images!r}")
    if max_per_kind is not None and (not isinstance(max_per_kind, int) or isinstance(max_per_kind, bool)
                                     or max_per_kind < 0):
        raise ConfigError(f"max_per_kind must be an integer >= 0 or None, got {max_per_kind!r}")
    key = canonical_name(name)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    itm = key == "precomp" or _TABLE[key].is_itm
    options = dict(options or {})
    check_options("f30k" if key == "precomp" else key, options)  # every precomp set has the same loader
    given = root
    # a CIR root may be a data root holding several layouts (`cirlab data synth --out DIR`), as the loaders take it
    root = resolve_root(root) if itm else cir_root(key, root)
    sink = ProblemCollector(strict=False, keep=max_per_kind)
    sink.problems.root = Path(root)
    if not Path(root).is_dir():
        from cirlab.data.base import missing_root_message

        sink.add("missing_file", root, None, missing_root_message("f30k" if key == "precomp" else key, root, given))
        return sink.problems
    _check_finished(Path(root), sink)
    if itm:
        from cirlab.data import precomp

        precomp.scan(Path(root), sink, name=None if key == "precomp" else key, **options)
    else:
        module = importlib.import_module(_TABLE[key].loader)
        _check_images(module, Path(root), sink, full=verify_images, options=options)
    return sink.problems


def _check_finished(root: Path, sink: ProblemCollector) -> None:
    """A tree cirlab's generator was writing when it stopped (Ctrl-C, a full disk) can be valid as far as it goes,
    with splits missing: say so instead of passing it."""
    from cirlab.data.generators import _owned

    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        why = unfinished_write(folder)  # the loaders' refusal of the same folder says the same
        if why:
            sink.add("unfinished_write", folder / _owned.MARKER, None, f"{folder}: {why}")


def _check_images(module: ModuleType, root: Path, sink: ProblemCollector, full: bool,
                  options: dict[str, Any] | None = None) -> None:
    """Scan, then check every image the loaded splits point to: its header (default) or a full decode."""
    from PIL import Image

    # image_read is how images decode, not which: the files checked are the same
    scan_options = {k: v for k, v in (options or {}).items() if k != "image_read"}
    paths = {path for split in module.scan(root, sink, **scan_options) for path in split.image_paths.values()}
    for path in sorted(paths):
        if not path.is_file():
            continue  # already reported as missing
        try:
            if path.stat().st_size == 0:
                raise ValueError("the file is empty (0 bytes)")
            with Image.open(path) as img:
                check_image_size(img, path)  # before decoding: loading refuses it, so must the check
                img.load() if full else _check_ending(path, img.format)
        except DataError as err:
            sink.add(err.kind, path, None, err.detail)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a problem to list
            sink.add("unreadable_image", path, None, f"cannot {'decode' if full else 'read'} image: {err}")
    sink.count("images_decoded" if full else "images_checked", len(paths))


_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every complete PNG


def _check_ending(path: Path, fmt: str | None) -> None:
    """A truncated PNG lacks its final IEND chunk; a truncated JPEG its end-of-image marker (FF D9)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 4096))
        tail = fh.read()
    if fmt == "PNG" and _PNG_END not in tail[-64:]:
        raise ValueError("truncated PNG (no IEND chunk at the end)")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ValueError("truncated JPEG (no end-of-image marker)")


def format_problems(problems: list, max_per_kind: int | None = None) -> str:
    """Problems grouped by kind, each group headed by its count, then a total line.

    Args:
        problems: from :func:`check_dataset`.
        max_per_kind: list at most this many per kind (the count still covers all); None = list every one.
    """
    if not problems:
        return "no problems"
    # a list checked with max_per_kind keeps only the first problems of each kind: its counts cover the rest
    counts = problems.counts() if isinstance(problems, Findings) else Counter(p.kind for p in problems)
    lines = []
    for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{kind}: {count} problem{'s' if count != 1 else ''}")
        group = [p for p in problems if p.kind == kind]
        shown = group if max_per_kind is None else group[:max_per_kind]
        lines += [f"  {p}" for p in shown]
        if len(shown) < count:
            lines.append(f"  ... and {count - len(shown)} more")
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
    total = sum(counts.values())
    lines.append(f"{total} problem{'s' if total != 1 else ''} in total ({summary})")
    return "\n".join(lines)


def format_stats(stats: dict[str, int]) -> str:
    """``3 splits, 120 triplets, 64 images`` from a ProblemList's stats."""
    order = ("splits", "triplets", "images", "captions", "images_checked", "images_decoded")
    keys = [k for k in order if k in stats] + sorted(k for k in stats if k not in order)
    return ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in keys) or "nothing found"
