"""CIRR release rc2 (Liu et al., "Image Retrieval on Real-life Images with Pre-trained Vision-and-Language Models",
ICCV 2021; https://github.com/Cuberick-Orion/CIRR), read as the release ships it.

Layout (``root`` = the ``cirr_dataset`` folder)::

    cirr/captions/cap.rc2.{train,val,test1}.json     list of {"pairid", "reference", "target_hard", "target_soft",
                                                     "caption", "img_set": {"id", "members", ...}}
                                                     (test1 has no target_hard / target_soft)
    cirr/image_splits/split.rc2.{train,val,test1}.json   {name: "./dev/dev-244-0-img0.png", ...}, key order =
                                                     gallery order; paths are relative to ``root``
    train/<0..>/*.png  dev/*.png  test1/*.png        the images

Queries: reference = ``reference``, target = ``target_hard`` (the only positive; ``target_soft`` is kept in extras
but unused, as in every CIRR code base), text = ``caption``, query id = ``str(pairid)``. ``Triplet.extras`` holds
``members`` (the 6 ``img_set`` names, reference included: Recall_subset ranks the 5 others), ``img_set_id`` and the
remaining entry fields. Protocol: the gallery is the split's image dict in key order and the reference is removed
from its own ranking. The official split names are ``val`` and ``test1``; ``dev`` and ``test`` are accepted aliases.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import AbstractSet, Any

from cirlab.core.config import did_you_mean
from cirlab.core.errors import UnknownNameError
from cirlab.data.base import (CIRSplit, ProblemCollector, Triplet, is_str_list, missing_keys_message,
                              read_json)

logger = logging.getLogger(__name__)

RELEASE = "rc2"
SPLITS = ("train", "val", "test1")
SPLIT_ALIASES = {"dev": "val", "test": "test1"}
_CORE_KEYS = ("pairid", "reference", "target_hard", "caption", "img_set")
_KNOWN_KEYS = (*_CORE_KEYS, "target_soft")  # never suggested as the misspelling of a missing key
OPTIONS: dict[str, object] = {}  # dataset.options the loader takes (none)


def dataset_root(root: Path) -> Path:
    """Accept the ``cirr_dataset`` folder or its ``cirr`` subfolder."""
    root = Path(root)
    if not (root / "cirr").is_dir() and (root / "captions").is_dir() and root.name == "cirr":
        return root.parent
    return root


def captions_file(root: Path, split: str) -> Path:
    return root / "cirr" / "captions" / f"cap.{RELEASE}.{split}.json"


def split_file(root: Path, split: str) -> Path:
    return root / "cirr" / "image_splits" / f"split.{RELEASE}.{split}.json"


def _read_image_split(root: Path, split: str, sink: ProblemCollector,
                      rejected: set[str] | None = None) -> dict[str, Path]:
    """Image name -> file; names whose path is unusable go to ``rejected`` (reported once, here)."""
    path = split_file(root, split)
    rejected = set() if rejected is None else rejected
    data = read_json(path, sink)
    if data is None:
        return {}
    if not isinstance(data, dict):
        sink.add("bad_entry", path, None, f"expected a JSON object name -> relative path, got {type(data).__name__}")
        return {}
    images: dict[str, Path] = {}
    named: dict[str, str] = {}  # normalised path -> the first name given it
    for name, rel in data.items():
        if not isinstance(rel, str):
            sink.add("bad_entry", path, name, f"expected a relative path string, got {rel!r}")
            rejected.add(name)
            continue
        if not _inside_root(rel):
            sink.add("bad_entry", path, name, f"image path {rel!r} points outside the dataset root {root}; "
                                              "paths must be relative to it (e.g. ./dev/dev-0-0-img0.png)")
            rejected.add(name)
            continue
        image = root / rel
        if not image.is_file():
            sink.add("missing_image", path, name, f"image file {image} not found" + _backslash_hint(rel))
        first = named.setdefault(os.path.normpath(rel), name)
        if first != name:  # one picture twice in the gallery: a target and its copy tie in every ranking
            sink.warn("same_file", path, name, f"names the file of {first!r} ({rel})")
        images[name] = image
    sink.count("images", len(images))
    return images


def _backslash_hint(rel: str) -> str:
    """A split file written on Windows (``.\\dev\\x.png``) names files no POSIX system finds: say so."""
    return " (use / in paths: backslashes are part of a file name outside Windows)" if "\\" in rel else ""


def _inside_root(rel: str) -> bool:
    """True for a relative path that stays inside the root (``./dev/x.png``), never ``/etc/x`` or ``../x``.

    Decided on the text, not on the resolved file, so a root whose sub-folders are symlinks still loads."""
    from pathlib import PurePosixPath, PureWindowsPath

    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return False
    depth = 0
    for part in rel.replace("\\", "/").split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return False
    return True


def _check_entry(entry: Any, i: int, path: Path, split: str, sink: ProblemCollector) -> bool:
    where = f"#{i}" if not isinstance(entry, dict) or "pairid" not in entry else f"pairid {entry['pairid']}"
    if not isinstance(entry, dict):
        problems = [f"expected an object, got {entry!r:.80}"]
    else:
        problems = _field_problems(entry, split)
    for message in problems:
        sink.add("bad_entry", path, where, message)
    return not problems


def _field_problems(entry: dict[str, Any], split: str) -> list[str]:
    """What is wrong with the fields of one caption entry: a missing key is named as missing (with the entry's keys
    and the likely rename), a present one of the wrong type as such."""
    strings = ("reference", "caption") + (("target_hard",) if split != "test1" else ())
    missing = missing_keys_message(entry, ("pairid", *strings, "img_set"), _KNOWN_KEYS)
    problems = [missing] if missing else []
    pairid = entry.get("pairid", 0)
    if not isinstance(pairid, int) or isinstance(pairid, bool):
        problems.append(f"'pairid' must be an integer, got {pairid!r}")
    for key in (k for k in strings if k in entry):
        if not isinstance(entry[key], str):
            problems.append(f"{key!r} must be a string, got {entry[key]!r:.80}")
        elif not entry[key].strip():
            problems.append(f"{key!r} is empty")
    img_set = entry.get("img_set", {"members": []})
    if isinstance(img_set, dict) and "members" not in img_set:
        problems.append("'img_set': " + missing_keys_message(img_set, ("members",), ("id",)))
    elif not (isinstance(img_set, dict) and is_str_list(img_set.get("members"))):
        problems.append(f"'img_set' must be an object with a 'members' list of names, got {img_set!r:.80}")
    return problems


SET_SIZE = 6  # every rc2 img_set: the reference and five others (Recall_subset@1/2/3 ranks those five)


def _img_set_problems(entry: dict[str, Any], split: str) -> list[str]:
    """What makes an entry's ``img_set`` unusable for Recall_subset: not six distinct names, or a set that lacks the
    reference or ``target_hard`` (both are members in the rc2 val and test1 files). The metric would otherwise rank
    the target among fewer candidates, or not at all, without a word."""
    members = entry["img_set"]["members"]
    problems = []
    if len(members) != SET_SIZE:
        problems.append(f"'img_set' has {len(members)} members; CIRR sets have {SET_SIZE} (the reference and five "
                        "others)")
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        problems.append(f"'img_set' lists {', '.join(map(repr, repeated))} more than once")
    roles = [("reference", entry["reference"])] + ([("target_hard", entry["target_hard"])] if split != "test1" else [])
    problems += [f"the {role} {name!r} is not among its img_set members" for role, name in roles
                 if name not in members]
    return problems


def _img_set_usable(entry: dict[str, Any], split: str, path: Path, where: str, sink: ProblemCollector) -> bool:
    """:func:`_img_set_problems` as problems where Recall_subset reads the set (val, test1), as warnings on train,
    where nothing does (one odd set must not stop a training run)."""
    problems = _img_set_problems(entry, split)
    for message in problems:
        if split == "train":
            sink.warn("unusable_img_set", path, where, message + " (the query is trained; only this img_set is "
                      "unusable, and training does not read it)")
        else:
            sink.add("bad_entry", path, where, message)
    return split == "train" or not problems


def load(root: Path, split: str = "train", category: str | None = None, *,
         sink: ProblemCollector | None = None) -> CIRSplit:
    """Load a CIRR rc2 split.

    Args:
        root: the ``cirr_dataset`` folder (or its ``cirr`` subfolder).
        split: "train" | "val" | "test1" (aliases "dev", "test").
        category: ignored (triplets carry category "cirr").
        sink: problem collector (default strict).
    """
    root = dataset_root(root)
    sink = sink or ProblemCollector(strict=True)
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise UnknownNameError(f"unknown CIRR split {split!r}{did_you_mean(split, (*SPLITS, *SPLIT_ALIASES))}; "
                               f"known: {', '.join(SPLITS)} (aliases dev, test)", "split", split)
    rejected: set[str] = set()
    images = _read_image_split(root, split, sink, rejected)
    path = captions_file(root, split)
    data = read_json(path, sink)
    if data is not None and not isinstance(data, list):
        sink.add("bad_entry", path, None, f"expected a JSON list of queries, got {type(data).__name__}")
        data = None
    if data == []:
        sink.warn("empty_split", path, None, "the caption file holds no queries (an empty list)")
    triplets: list[Triplet] = []
    seen: set[int] = set()
    for i, entry in enumerate(data or []):
        if not _check_entry(entry, i, path, split, sink):
            continue
        where = f"pairid {entry['pairid']}"
        if entry["pairid"] in seen:
            sink.add("duplicate", path, where, "pairid appears twice")
            continue
        seen.add(entry["pairid"])
        if not _img_set_usable(entry, split, path, where, sink):
            continue
        triplets.append(_triplet(entry, split, path, images, sink, rejected))
    sink.count("triplets", len(triplets))
    sink.count("splits")
    sink.log_warnings(f"CIRR {split}")
    return CIRSplit("cirr", split, root, None, triplets, list(images), images, protocol="cirr",
                    exclude_reference=True)


def _triplet(entry: dict[str, Any], split: str, path: Path, images: dict[str, Path], sink: ProblemCollector,
             rejected: AbstractSet[str] = frozenset()) -> Triplet:
    where = f"pairid {entry['pairid']}"
    target = entry.get("target_hard") if split != "test1" else None
    members = list(entry["img_set"]["members"])
    named = [("reference", entry["reference"])] + ([("target_hard", target)] if target else [])
    named += [("img_set member", m) for m in members]
    if images:  # without a readable split file the missing file is the problem already reported
        for role, name in named:
            if name not in images and name not in rejected:  # a rejected path was reported with its file
                sink.add("unknown_name", path, where, f"{role} {name!r} is not in split.{RELEASE}.{split}.json")
    if target is not None and target == entry["reference"]:
        sink.warn("target_is_reference", path, where, f"the target {target!r} is the reference image itself "
                                                      "(the protocol removes the reference from its ranking: the "
                                                      "query counts as a miss)")
    extras = {k: v for k, v in entry.items() if k not in _CORE_KEYS}
    extras["members"] = members
    extras["img_set_id"] = entry["img_set"].get("id")
    extras.update((f"img_set_{k}", v) for k, v in entry["img_set"].items() if k not in ("id", "members"))
    caption = entry["caption"]
    return Triplet(str(entry["pairid"]), entry["reference"], [caption], caption, target, "cirr", extras)


def scan(root: Path, sink: ProblemCollector, **kw: Any) -> list[CIRSplit]:
    """Validate every split present (for ``cirlab data check``); returns the splits loaded."""
    root = dataset_root(root)
    present = [s for s in SPLITS if captions_file(root, s).exists() or split_file(root, s).exists()]
    if not present:
        sink.add("missing_file", captions_file(root, "val"), None,
                 "no CIRR split found (expected cirr/captions/cap.rc2.{train,val,test1}.json)")
    return [load(root, split, sink=sink, **kw) for split in present]
