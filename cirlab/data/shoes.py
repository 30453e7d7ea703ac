"""Shoes with relative captions (Guo et al., "Dialog-based interactive image retrieval", NeurIPS 2018), read as the AMC
repository expects it (https://github.com/KevinLight831/AMC, ``datasets.Shoes``).

Layout (``root``)::

    relative_captions_shoes.json      list of {"ImageName": target, "ReferenceImageName": reference,
                                                "RelativeCaption": str}   (further keys go to Triplet.extras)
    train_im_names.txt                one image basename per line (split "train")
    eval_im_names.txt                 one image basename per line (split "test"; alias "eval"/"val")
    attributedata/<folder>/<sub>/<name>.jpg
                                      images; only top-level folders whose name contains "womens" are used (AMC);
                                      images are indexed by basename, a basename found twice is an error

Pairs: a caption entry belongs to a split when its ``ImageName`` or its ``ReferenceImageName`` is in the split's
name list; it gives the query (reference = ``ReferenceImageName``, target = ``ImageName``, text =
``RelativeCaption.strip()``). The gallery is the split's name list in file order, and the reference is removed from
its own ranking (AMC ``test.py``).

``pairs="unique"`` (default) emits each caption entry once. ``pairs="amc"`` reproduces the AMC code, which loops over
the split's names and emits an entry once per listed name it contains, so an entry whose two images are both listed
appears twice (every test query is duplicated; recall is unchanged, the query count and epoch length double).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cirlab.core.config import did_you_mean
from cirlab.core.errors import ConfigError, UnknownNameError
from cirlab.data.base import (CIRSplit, ProblemCollector, Triplet, index_images, missing_keys_message, read_json,
                              read_lines)

logger = logging.getLogger(__name__)

CAPTIONS_FILE = "relative_captions_shoes.json"
SPLIT_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}
SPLIT_ALIASES = {"eval": "test", "val": "test"}
_CORE_KEYS = ("ImageName", "ReferenceImageName", "RelativeCaption")
PAIR_MODES = ("unique", "amc")
OPTIONS: dict[str, object] = {"pairs": PAIR_MODES}  # dataset.options the loader takes


def index_shoes_images(root: Path, sink: ProblemCollector) -> dict[str, Path]:
    """Basename -> path for ``attributedata/*womens*/*/<image>`` (AMC's glob), duplicates are problems."""
    base = root / "attributedata"
    if not base.is_dir():
        sink.add("missing_file", base, None, "image folder not found (expected attributedata/womens_*/*/)")
        return {}
    found: dict[str, Path] = {}
    folders = sorted(p for p in base.iterdir() if p.is_dir() and "womens" in p.name)
    if not folders:
        sink.add("missing_file", base, None, "no folder whose name contains 'womens' (e.g. womens_boots/)")
    for folder in folders:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            index_images(sub, sink, by="name", into=found)
    sink.count("images", len(found))
    return found


def _parse_entries(path: Path, sink: ProblemCollector) -> list[dict[str, Any] | None]:
    """Caption entries in file order; an invalid entry is reported and kept as None (indices stay file indices)."""
    data = read_json(path, sink)
    if data is None:
        return []
    if not isinstance(data, list):
        sink.add("bad_entry", path, None, f"expected a JSON list of caption entries, got {type(data).__name__}")
        return []
    entries: list[dict[str, Any] | None] = []
    for i, entry in enumerate(data):
        problems = _entry_problems(entry)
        for message in problems:
            sink.add("bad_entry", path, f"#{i}", message)
        entries.append(None if problems else entry)
    if not data:
        sink.warn("empty_split", path, None, "the caption file holds no entries (an empty list): no queries")
    return entries


def _entry_problems(entry: Any) -> list[str]:
    """What is wrong with one caption entry: a missing key named as missing (with the entry's keys and the likely
    rename), a value of the wrong type as such, an empty caption."""
    if not isinstance(entry, dict):
        return [f"expected an object with string fields {', '.join(_CORE_KEYS)}, got {entry!r:.120}"]
    missing = missing_keys_message(entry, _CORE_KEYS, _CORE_KEYS)
    problems = [missing] if missing else []
    problems += [f"{key!r} must be a string, got {entry[key]!r:.80}" for key in _CORE_KEYS
                 if key in entry and not isinstance(entry[key], str)]
    if not problems and not entry["RelativeCaption"].strip():
        problems.append("'RelativeCaption' is empty")
    return problems


def _select(entries: list[dict[str, Any] | None], names: list[str], pairs: str) -> list[tuple[int, int]]:
    """(entry index, emission number) of the split's queries, in AMC's order for ``pairs="amc"``."""
    if pairs == "unique":
        listed = set(names)
        return [(i, 0) for i, e in enumerate(entries)
                if e is not None and (e["ImageName"] in listed or e["ReferenceImageName"] in listed)]
    by_name: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e is not None:
            for name in dict.fromkeys((e["ImageName"], e["ReferenceImageName"])):
                by_name.setdefault(name, []).append(i)
    emitted: dict[int, int] = {}
    order = []
    for name in names:  # AMC get_relative_pairs: for name in split, for entry mentioning name
        for i in by_name.get(name, []):
            order.append((i, emitted.get(i, 0)))
            emitted[i] = emitted.get(i, 0) + 1
    return order


def load(root: Path, split: str = "train", category: str | None = None, *, pairs: str = "unique",
         sink: ProblemCollector | None = None, images: dict[str, Path] | None = None) -> CIRSplit:
    """Load the Shoes ``train`` or ``test`` split.

    Args:
        root: the Shoes root (see the module doc for the layout).
        split: "train" | "test" (aliases "eval", "val").
        category: ignored (Shoes has none; triplets carry category "shoes").
        pairs: "unique" (default) or "amc" (AMC's duplicated pairs).
        sink: problem collector (default strict).
        images: a pre-built basename index (the checker shares one).
    """
    root = Path(root)
    sink = sink or ProblemCollector(strict=True)
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_FILES:
        raise UnknownNameError(f"unknown Shoes split {split!r}{did_you_mean(split, (*SPLIT_FILES, *SPLIT_ALIASES))}"
                               "; known: train, test (aliases eval, val)", "split", split)
    if pairs not in PAIR_MODES:
        raise ConfigError(f"unknown Shoes pairs mode {pairs!r}; known: {', '.join(PAIR_MODES)}")
    images = index_shoes_images(root, sink) if images is None else images
    list_path, cap_path = root / SPLIT_FILES[split], root / CAPTIONS_FILE
    names = _read_names(list_path, images, sink)
    entries = _parse_entries(cap_path, sink)
    listed = set(names)
    triplets = []
    for i, k in _select(entries, names, pairs):
        triplets.append(_triplet(entries[i], i, k, cap_path, split, listed, images, sink))
    sink.count("triplets", len(triplets))
    sink.count("splits")
    sink.log_warnings(f"Shoes {split}")
    paths = {n: images[n] for t in triplets for n in (t.ref_name, t.target_name) if n in images}
    paths.update((n, images[n]) for n in names if n in images)
    return CIRSplit("shoes", split, root, None, triplets, names, paths, protocol=f"amc(pairs={pairs})"
                    if pairs != "unique" else "amc", exclude_reference=True)


def _read_names(path: Path, images: dict[str, Path], sink: ProblemCollector) -> list[str]:
    lines = read_lines(path, sink) or []
    seen: dict[str, int] = {}
    for n, name in lines:
        name = os.path.basename(name)
        if name in seen:
            sink.add("duplicate", path, f"line {n}", f"image {name!r} is listed twice (also line {seen[name]})")
            continue
        seen[name] = n
        if name not in images:
            sink.add("missing_image", path, f"line {n}", f"image {name!r} not found under attributedata/*womens*/*/")
    return list(seen)


def _triplet(entry: dict[str, Any], i: int, k: int, path: Path, split: str, listed: set[str],
             images: dict[str, Path], sink: ProblemCollector) -> Triplet:
    ref, target = entry["ReferenceImageName"], entry["ImageName"]
    for role, name in (("ReferenceImageName", ref), ("ImageName", target)):
        if name not in images:
            sink.add("missing_image", path, f"#{i}", f"{role} {name!r} not found under attributedata/*womens*/*/")
        elif split == "test" and name not in listed:
            # evaluation needs both images in the gallery (AMC indexes them in it)
            sink.add("unknown_name", path, f"#{i}", f"{role} {name!r} is not in {SPLIT_FILES[split]}")
    if ref == target:
        sink.warn("target_is_reference", path, f"#{i}", f"the target {target!r} is the reference image itself")
    text = entry["RelativeCaption"].strip()
    extras = {key: v for key, v in entry.items() if key not in _CORE_KEYS}
    return Triplet(str(i) if k == 0 else f"{i}.{k}", ref, [text], text, target, "shoes", extras)


def scan(root: Path, sink: ProblemCollector, **kw: Any) -> list[CIRSplit]:
    """Validate both splits (for ``cirlab data check``); returns the splits loaded."""
    images = index_shoes_images(Path(root), sink)
    return [load(root, split, sink=sink, images=images, **kw) for split in SPLIT_FILES]
