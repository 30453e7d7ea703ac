"""Fashion-IQ, read as the public release ships it (Wu et al., CVPR 2021; https://github.com/XiaoxiaoGuo/fashion-iq).

Layout (``root``)::

    captions/cap.{category}.{split}.json       list of {"candidate": asin, "target": asin, "captions": [str, str]}
                                               (test files have no "target"; further keys go to Triplet.extras)
    image_splits/split.{category}.{split}.json list of asin strings, file order = gallery order
    images/{asin}.png | images/{asin}.jpg      flat image folder (CLIP4Cir / re-ranking layout), or
    img/{category}/{asin}.jpg                  per-category folder (AMC layout)

Categories are discovered from ``captions/`` (real Fashion-IQ: dress, shirt, toptee; the emoji set: color, gender,
skin_tone), so any tree written in this layout loads.

Protocols (``protocol=``; ``gallery=`` / ``captions=`` / ``exclude_reference=`` override single parts):

=============  ==============================================  ================  ==========================
protocol       gallery                                         caption policy    reference removed at eval
=============  ==============================================  ================  ==========================
``amc``        ``"amc"``: unique candidates+targets of the     ``"amc"``         yes (``ref_idx``)
               caption file, first-appearance order (AMC
               ``get_test_targets``, ``gallery_all=False``)
``clip4cir``   ``"split"``: ``split.{cat}.{split}.json`` in    ``"clip4cir"``    no
               file order (CLIP4Cir, Candidate Re-ranking,
               CaLa)
=============  ==============================================  ================  ==========================

AMC's full-split variant (its unused ``gallery_all=True``) keeps AMC's reference removal: ``protocol="amc",
gallery="split"`` (labelled ``amc(gallery=split)``). ``rerank`` is an alias of ``clip4cir``.
Caption policies (``CAPTION_POLICIES``):

* ``clip4cir``: eval text ``"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"``; training text drawn at random
  per item from {c1 and c2, c2 and c1, c1, c2} (``generate_randomized_fiq_caption``).
* ``amc``: ``"<BOS> c0 <AND> c1 <EOS>"`` for training and eval (AMC ``datasets.FashionIQ``); the model's
  tokenizer strips punctuation, the loader keeps the raw string.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cirlab.core.errors import ConfigError, UnknownNameError
from cirlab.core.metric_keys import AVG
from cirlab.data.base import (CIRSplit, ProblemCollector, Triplet, first_appearance, index_images, is_str_list,
                              missing_keys_message, read_json)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_CORE_KEYS = ("candidate", "target", "captions")


# ----------------------------------------------------------------------------------------------------------------------
# caption policies


def _clean(caption: str) -> str:
    # CLIP4Cir strips these four characters at both ends before joining
    return caption.strip(".?, ")


def clip4cir_join(captions: list[str]) -> str:
    """Deterministic CLIP4Cir / re-ranking text: ``"C1 and c2"``."""
    c1, c2 = captions
    return f"{_clean(c1).capitalize()} and {_clean(c2)}"


def clip4cir_random(captions: list[str], rng: Any = random) -> str:
    """Randomised CLIP4Cir training text: each of 4 forms with probability 1/4."""
    c1, c2 = captions
    u = rng.random()
    if u < 0.25:
        return f"{_clean(c1).capitalize()} and {_clean(c2)}"
    if u < 0.5:
        return f"{_clean(c2).capitalize()} and {_clean(c1)}"
    if u < 0.75:
        return _clean(c1).capitalize()
    return _clean(c2).capitalize()


def amc_join(captions: list[str]) -> str:
    """AMC text: ``"<BOS> c0 <AND> c1 <EOS>"``.

    Captions keep their punctuation (AMC's tokenizer strips it); outer whitespace is trimmed, which no whitespace
    tokenizer can tell apart.
    """
    c0, c1 = captions
    return f"<BOS> {c0.strip()} <AND> {c1.strip()} <EOS>"


@dataclass(frozen=True)
class CaptionPolicy:
    join: Callable[[list[str]], str]  # deterministic text (evaluation, Triplet.text)
    train: Callable[[list[str]], str] | None  # per-item training sampler; None = use join


CAPTION_POLICIES: dict[str, CaptionPolicy] = {
    "clip4cir": CaptionPolicy(clip4cir_join, clip4cir_random),
    "amc": CaptionPolicy(amc_join, None),
}

PROTOCOLS: dict[str, dict[str, Any]] = {
    "amc": {"gallery": "amc", "captions": "amc", "exclude_reference": True},
    "clip4cir": {"gallery": "split", "captions": "clip4cir", "exclude_reference": False},
}
_PROTOCOL_ALIASES = {"rerank": "clip4cir", "cala": "clip4cir"}
# option spellings that mean one setting (for comparing two option sets)
OPTION_ALIASES: dict[str, dict[str, str]] = {"protocol": _PROTOCOL_ALIASES}
GALLERIES = ("amc", "split")
# dataset.options the loader takes: choices, or "bool?" (true/false/null)
# what a split-file image missing from disk does: "error" (every listed image must exist), or "drop" (opt-in, for
# a partial download of the dead-link Amazon images: the image leaves the gallery and every query naming it is left
# out, each counted in a warning, as CaLa's src/data_utils.py drops the names it cannot find)
MISSING_IMAGES = ("error", "drop")
OPTIONS: dict[str, object] = {"protocol": (*PROTOCOLS, *_PROTOCOL_ALIASES), "gallery": GALLERIES,
                              "captions": tuple(CAPTION_POLICIES), "exclude_reference": "bool?",
                              "missing_images": MISSING_IMAGES}


# ----------------------------------------------------------------------------------------------------------------------
# files


def captions_file(root: Path, category: str, split: str) -> Path:
    return root / "captions" / f"cap.{category}.{split}.json"


def split_file(root: Path, category: str, split: str) -> Path:
    return root / "image_splits" / f"split.{category}.{split}.json"


def _refuse_reserved_names(root: Path, categories: Sequence[str], sink: ProblemCollector) -> None:
    """A category named like the protocol's average ("avg") would write its recalls under the average's keys
    (avg_R@10), and one of the two would be lost without a word."""
    if AVG in categories:
        sink.add("bad_entry", root / "captions", f"category {AVG!r}",
                 f"a category named {AVG!r} shares its metric keys with the average over the categories "
                 f"({AVG}_R@10): rename its cap.{AVG}.*.json and split.{AVG}.*.json files")


def find_categories(root: Path, split: str | None = None) -> list[str]:
    """Categories present on disk (from ``captions/`` and ``image_splits/`` file names), sorted."""
    found: set[str] = set()
    for folder, prefix in (("captions", "cap."), ("image_splits", "split.")):
        for path in (root / folder).glob(f"{prefix}*.json"):
            parts = path.name[len(prefix):-len(".json")].rsplit(".", 1)
            if len(parts) == 2 and (split is None or parts[1] == split):
                found.add(parts[0])
    return sorted(found)


# the image folders in use: flat ones (CLIP4Cir and the re-ranker: images/; CaLa's src/data_utils.py: image_data/)
# and AMC's per-category img/{category}/
FLAT_IMAGE_FOLDERS = ("images", "image_data")
PER_CATEGORY_FOLDER = "img"


def _image_layouts(root: Path) -> list[str]:
    """The image folders of ``root`` that hold something, one name per folder: ``images`` linked to
    ``image_data`` (one download shared by CLIP4Cir and CaLa) is one layout, and an empty folder is none."""
    found: dict[str, str] = {}
    for name in (*FLAT_IMAGE_FOLDERS, PER_CATEGORY_FOLDER):
        folder = root / name
        if folder.is_dir() and next(folder.iterdir(), None) is not None:
            found.setdefault(os.path.realpath(folder), name)
    return list(found.values())


class FashionIQImages:
    """Finds ``images/{asin}.{png,jpg}`` or ``image_data/{asin}.{png,jpg}`` (flat) or ``img/{category}/{asin}.jpg``
    (per category) with one scan. A root holding two of these layouts is an error: which one a run read would be a
    silent choice."""

    def __init__(self, root: Path, sink: ProblemCollector) -> None:
        self.root, self.sink = root, sink
        present = _image_layouts(root)
        self._index: dict[str, dict[str, Path]] = {}
        # without any image folder (or with two), its one line says it all: no further line per image
        self.present = len(present) == 1
        self.flat = bool(present) and present[0] in FLAT_IMAGE_FOLDERS
        self._flat_folder = root / (present[0] if self.flat else FLAT_IMAGE_FOLDERS[0])
        if len(present) > 1:
            sink.add("ambiguous_layout", root, None, f"holds {' and '.join(f + '/' for f in present)}: more than one "
                     "image layout, and which one a run reads would be a silent choice; keep one (rename or move the "
                     "others)")
        if self.flat and self.present:
            self._index[""] = index_images(self._flat_folder, sink)
        elif not present:
            sink.add("missing_file", root / "images", None, "no image folder: expected images/{asin}.png|jpg, "
                     "image_data/{asin}.png|jpg (CaLa's layout) or img/{category}/{asin}.jpg")

    def folder(self, category: str) -> Path:
        return self._flat_folder if self.flat else self.root / PER_CATEGORY_FOLDER / category

    def lookup(self, name: str, category: str) -> Path | None:
        key = "" if self.flat else category
        if key not in self._index:
            folder = self.folder(category)
            self._index[key] = index_images(folder, self.sink) if folder.is_dir() else {}
        return self._index[key].get(name)


# ----------------------------------------------------------------------------------------------------------------------
# parsing


def _read_split_names(path: Path, sink: ProblemCollector) -> list[str] | None:
    names = read_json(path, sink)
    if names is None:
        return None
    if not isinstance(names, list):
        sink.add("bad_entry", path, None, f"expected a JSON list of image names, got {type(names).__name__}")
        return None
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            sink.add("bad_entry", path, f"#{i}", f"expected an image name (string), got {name!r}")
        elif name in seen:
            sink.add("duplicate", path, f"#{i}", f"image {name!r} is listed twice (also #{seen[name]})")
        else:
            seen[name] = i
    return list(seen)


def _parse_entry(entry: Any, i: int, path: Path, split: str, sink: ProblemCollector) -> dict[str, Any] | None:
    where = f"#{i}"
    if not isinstance(entry, dict):
        sink.add("bad_entry", path, where, f"expected an object with candidate/target/captions, got {entry!r:.80}")
        return None
    problems = _field_problems(entry, split)
    for message in problems:
        sink.add("bad_entry", path, where, message)
    return None if problems else entry


def _field_problems(entry: dict[str, Any], split: str) -> list[str]:
    """What is wrong with one caption entry's fields; a missing key is named as missing, with the entry's keys and
    the likely rename ("captions" written "caption"), not as a value of the wrong type."""
    required = ("candidate", "captions") + (("target",) if split != "test" else ())
    missing = missing_keys_message(entry, required, _CORE_KEYS)
    problems = [missing] if missing else []
    if "candidate" in entry and not isinstance(entry["candidate"], str):
        problems.append(f"'candidate' must be an image name, got {entry['candidate']!r}")
    target = entry.get("target")
    if "target" in entry and not isinstance(target, str) and (target is not None or split != "test"):
        problems.append(f"'target' must be an image name, got {target!r}")
    caps = entry.get("captions", ["", "present"])  # a missing list is reported above
    if not (is_str_list(caps) and len(caps) == 2):
        problems.append(f"'captions' must be a list of 2 strings, got {caps!r:.80}")
    elif not any(c.strip() for c in caps):
        problems.append("both captions are empty")
    return problems


def _load_category(root: Path, category: str, split: str, images: FashionIQImages, policy: CaptionPolicy,
                   sink: ProblemCollector, missing_images: str = "error") -> tuple[list[Triplet], list[str], list[str]]:
    """Triplets, split-file names and caption-file names (candidates+targets, first appearance) of one category."""
    s_path, c_path = split_file(root, category, split), captions_file(root, category, split)
    names = _read_split_names(s_path, sink)
    absent: set[str] = set()  # listed, not on disk, and dropped (missing_images="drop")
    for i, name in enumerate(names or [] if images.present else []):
        if images.lookup(name, category) is None:
            if missing_images == "drop":
                absent.add(name)
            else:
                sink.add("missing_image", s_path, f"#{i}", f"image {name!r} not found in {images.folder(category)}"
                         " (a partial download: dataset.options.missing_images=drop leaves such images out)")
    if absent:  # one warning per image and per query: the log line counts them, data check lists them
        names = [n for n in names if n not in absent]
        for name in sorted(absent):
            sink.warn("dropped_image", s_path, name, "not on disk: left out of the gallery, with the queries that "
                      "name it (dataset.options.missing_images=drop)")
    known = set(names) if names is not None else None
    entries = read_json(c_path, sink)
    if entries is not None and not isinstance(entries, list):
        sink.add("bad_entry", c_path, None, f"expected a JSON list of caption entries, got {type(entries).__name__}")
        entries = None
    if entries == []:
        sink.warn("empty_split", c_path, None, "the caption file holds no entries (an empty list): no queries")
    triplets: list[Triplet] = []
    for i, raw in enumerate(entries or []):
        entry = _parse_entry(raw, i, c_path, split, sink)
        if entry is None:
            continue
        if any(entry.get(role) in absent for role in ("candidate", "target")):
            sink.warn("dropped_query", c_path, f"#{i}", "names an image that is not on disk: left out "
                      "(dataset.options.missing_images=drop)")
            continue
        for role in ("candidate", "target"):
            name = entry.get(role)
            if name is None:
                continue
            if known is not None and name not in known:
                sink.add("unknown_name", c_path, f"#{i}", f"{role} {name!r} is not listed in {s_path.name}")
            elif known is None and images.present and images.lookup(name, category) is None:
                sink.add("missing_image", c_path, f"#{i}", f"{role} image {name!r} not found")
        if entry.get("target") is not None and entry["target"] == entry["candidate"]:
            sink.warn("target_is_reference", c_path, f"#{i}", f"the target {entry['target']!r} is the reference "
                                                               "(candidate) image itself")
        caps = list(entry["captions"])
        extras = {k: v for k, v in entry.items() if k not in _CORE_KEYS}
        triplets.append(Triplet(f"{category}:{i}", entry["candidate"], caps, policy.join(caps), entry.get("target"),
                                category, extras))
    sink.count("triplets", len(triplets))
    sink.count("splits")
    used = first_appearance(n for t in triplets for n in (t.ref_name, t.target_name) if n is not None)
    return triplets, names or [], used


def check_category(root: Path, category: Any) -> str | None:
    """The on-disk name of ``category`` (a case slip is folded), None for all categories.

    Checked before any file is read: a list, "" or a misspelt name would otherwise surface as a missing
    ``split.<category>.<split>.json``. With no caption files on disk there is nothing to check against, and the
    missing file is the problem the loader reports.
    """
    from cirlab.core.config import did_you_mean

    if category is None:
        return None
    if isinstance(category, (list, tuple, set)):
        raise ConfigError(f"category takes one Fashion-IQ category, got {category!r}: call load_cir once per "
                          "category (the protocol scores each on its own), or pass None for all of them concatenated")
    if not isinstance(category, str) or not category.strip():
        raise ConfigError(f"category must be a Fashion-IQ category name or None, got {category!r}")
    present = find_categories(root)
    if not present or category in present:
        return category
    folded = [c for c in present if c.lower() == category.lower()]
    if len(folded) == 1:
        return folded[0]
    raise UnknownNameError(f"unknown Fashion-IQ category {category!r}{did_you_mean(category, present)}; categories "
                           f"in {root}: {', '.join(present)}", "category", category)


def _resolve_protocol(protocol: str, gallery: str | None, captions: str | None,
                      exclude_reference: bool | None) -> tuple[str, str, str, bool]:
    """(protocol label, gallery, caption policy, exclude_reference); the label notes any override."""
    key = _PROTOCOL_ALIASES.get(protocol, protocol)
    if key not in PROTOCOLS:
        raise ConfigError(f"unknown Fashion-IQ protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    spec = PROTOCOLS[key]
    gallery = gallery or spec["gallery"]
    captions = captions or spec["captions"]
    if gallery not in GALLERIES:
        raise ConfigError(f"unknown Fashion-IQ gallery {gallery!r}; known: {', '.join(GALLERIES)}")
    if captions not in CAPTION_POLICIES:
        raise ConfigError(f"unknown caption policy {captions!r}; known: {', '.join(CAPTION_POLICIES)}")
    exclude = spec["exclude_reference"] if exclude_reference is None else exclude_reference
    overrides = [f"{k}={v}" for k, v in (("gallery", gallery), ("captions", captions), ("exclude_reference", exclude))
                 if v != spec[k]]
    return (f"{key}({', '.join(overrides)})" if overrides else key), gallery, captions, exclude


def load(root: Path, split: str = "train", category: str | None = None, *, protocol: str = "amc",
         gallery: str | None = None, captions: str | None = None, exclude_reference: bool | None = None,
         missing_images: str = "error", sink: ProblemCollector | None = None,
         images: FashionIQImages | None = None) -> CIRSplit:
    """Load one Fashion-IQ split (one category, or all categories concatenated when ``category`` is None).

    Args:
        root: the Fashion-IQ root (holding ``captions/``, ``image_splits/`` and ``images/`` or ``img/``).
        split: "train" | "val" | "test".
        category: one category, e.g. "dress" (case-insensitive); None = every category found in ``captions/`` for
            this split.
        protocol: "amc" (default; the AMC paper's protocol) or "clip4cir" (alias "rerank"); see the module doc.
        gallery: "amc" (caption-file candidates+targets) or "split" (``split.{cat}.{split}.json``).
        captions: caption policy name, see ``CAPTION_POLICIES``.
        exclude_reference: override the protocol's choice of removing the reference from its own ranking.
        missing_images: "error" (default: every listed image must be on disk) or "drop" (a partial download: such
            images leave the gallery and the queries naming them are left out, counted in warnings; the metrics
            are then on the reduced split, not comparable with the full one).
        sink: problem collector (default strict: raise the first problem as DataError).
        images: a pre-built image index (the checker shares one across splits).
    """
    if split not in SPLITS:  # a typo would otherwise read as "no caption file found"
        from cirlab.core.config import did_you_mean

        raise UnknownNameError(f"unknown Fashion-IQ split {split!r}{did_you_mean(split, SPLITS)}; known: "
                               f"{', '.join(SPLITS)}", "split", split)
    if missing_images not in MISSING_IMAGES:
        raise ConfigError(f"missing_images={missing_images!r}; expected one of {', '.join(MISSING_IMAGES)}")
    root = Path(root)
    sink = sink or ProblemCollector(strict=True)
    label, gallery, captions, exclude = _resolve_protocol(protocol, gallery, captions, exclude_reference)
    category = check_category(root, category)
    if category is not None:
        cats = [category]
    else:
        cats = find_categories(root, split)
        if not cats:
            sink.add("missing_file", root / "captions", None, f"no cap.*.{split}.json caption file found")
    _refuse_reserved_names(root, cats, sink)
    images = images or FashionIQImages(root, sink)
    triplets: list[Triplet] = []
    gallery_names: list[str] = []
    paths: dict[str, Path] = {}
    for cat in cats:
        cat_triplets, split_names, used = _load_category(root, cat, split, images, CAPTION_POLICIES[captions], sink,
                                                         missing_images)
        triplets += cat_triplets
        gallery_names += used if gallery == "amc" else split_names
        for name in first_appearance([*split_names, *used]):
            path = images.lookup(name, cat)
            if path is not None:
                paths.setdefault(name, path)
    sink.count("images", len(paths))
    if sink.strict and gallery == "amc" and triplets and not any(t.target_name for t in triplets):
        # the caption files' candidates and targets, without targets: a gallery no answer can be in (said when a
        # run loads the split to rank it, not by data check: the data is fine)
        sink.warn("gallery_without_targets", captions_file(root, cats[0], split), None, "this split has no targets, "
                  "so the amc gallery (the caption file's images) holds only the candidates; rankings over the split "
                  "file's images: dataset.options.gallery=split")
    sink.log_warnings(f"Fashion-IQ {split}" + (f" {category}" if category else ""))
    return CIRSplit("fashioniq", split, root, category, triplets, first_appearance(gallery_names), paths,
                    protocol=label, exclude_reference=exclude, train_text=CAPTION_POLICIES[captions].train)


def scan(root: Path, sink: ProblemCollector, **kw: Any) -> list[CIRSplit]:
    """Walk every category and split on disk (for ``cirlab data check``); returns the splits loaded."""
    root = Path(root)
    cats = find_categories(root)
    if not cats:
        sink.add("missing_file", root / "captions", None, "no captions/cap.{category}.{split}.json files found")
        return []
    _refuse_reserved_names(root, cats, sink)
    splits = []
    images = FashionIQImages(root, sink)
    for split in SPLITS:
        for cat in cats:
            present = [p for p in (captions_file(root, cat, split), split_file(root, cat, split)) if p.exists()]
            if present:  # a split that ships neither file is simply not part of this tree
                splits.append(load(root, split, cat, sink=sink, images=images, **kw))
    return splits
