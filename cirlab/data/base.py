"""The CIR data contract: ``Triplet``, ``CIRSplit``, ``DataError`` and the problem collector shared by the loaders.

Every CIR layout (Fashion-IQ, Shoes, CIRR; the synthetic and emoji sets are written in those layouts) loads into a
:class:`CIRSplit`. Loaders parse and validate eagerly through a :class:`ProblemCollector`: in *strict* mode (loading)
the first problem raises :class:`DataError` naming the file and the entry; in *collect* mode (``cirlab data check``)
every problem is recorded and the walk goes on. One code path serves both, so the checker and the loader can never
disagree about what a valid tree is.

No torch at import time: images and tensors are produced inside the dataset views (``triplet_dataset`` & co).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

from cirlab.core.errors import CirlabError, ConfigError

logger = logging.getLogger(__name__)

Transform = Callable[[Any], Any]


# ----------------------------------------------------------------------------------------------------------------------
# errors and problems


class DataError(CirlabError, ValueError):
    """A dataset file is missing, malformed or inconsistent. The message names the file and the entry."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, entry: str | None = None,
                 kind: str = "invalid") -> None:
        self.file = str(file) if file is not None else None
        self.entry = entry
        self.kind = kind
        self.detail = message
        where = (self.file or "") + (f" [{entry}]" if entry else "")
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset tree.

    ``kind`` is one of ``missing_file``, ``missing_image``, ``malformed_json``, ``bad_entry``, ``unknown_name``,
    ``duplicate``, ``count_mismatch``, ``bad_array``, ``unreadable_image``.
    """

    kind: str
    file: str
    entry: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [{self.entry}]" if self.entry else "")
        return f"{where}: {self.message}"

    def to_error(self) -> DataError:
        return DataError(self.message, file=self.file, entry=self.entry or None, kind=self.kind)


class Findings(list):
    """``list[Problem]`` that may keep only the first problems of each kind and file (``ProblemCollector(keep=N)``):
    :meth:`counts` and :attr:`total` still cover every distinct problem found, kept or not."""

    def __init__(self, problems: Iterable[Problem] = ()) -> None:
        super().__init__(problems)
        # kind -> hash() of every distinct problem not kept: 8 bytes each, where a Problem with its strings took
        # hundreds (a 10 MB file of bad entries held 1.7 GB of them); hashes, so that a file read twice (Shoes'
        # captions, once per split) is still counted once
        self.omitted: dict[str, array] = {}

    def __bool__(self) -> bool:  # keep=0 keeps nothing, and the tree is still invalid
        return len(self) > 0 or any(self.omitted.values())

    def counts(self) -> Counter[str]:
        """Kind -> number of distinct problems of that kind, the ones not kept included."""
        counts = Counter(p.kind for p in self)
        for kind, hashes in self.omitted.items():
            counts[kind] += _distinct(hashes)
        return counts

    @property
    def total(self) -> int:
        """Every distinct problem found, the ones not kept included (``len()`` counts only the kept ones)."""
        return sum(self.counts().values())


def _distinct(hashes: array) -> int:
    """How many different values ``hashes`` holds, without a Python int per value."""
    import numpy as np

    if not hashes:
        return 0
    values = np.sort(np.frombuffer(hashes, dtype=np.int64))  # one copy; np.unique took five times the array
    return int(np.count_nonzero(values[1:] != values[:-1])) + 1


class ProblemList(Findings):
    """``list[Problem]`` with ``stats`` (counts of what was walked: splits, triplets, images, ...) and ``warnings``
    (findings that do not make the tree invalid, e.g. a query whose target is its reference image)."""

    def __init__(self, problems: Iterable[Problem] = (), stats: dict[str, int] | None = None) -> None:
        super().__init__(problems)
        self.stats: dict[str, int] = dict(stats or {})
        self.warnings: Findings = Findings()
        self.root: Path | None = None  # the folder checked (a data root's layout subfolder when one was taken)


class ProblemCollector:
    """Receives problems from a loader: raises the first one (``strict``) or records them all.

    ``keep``: in collect mode, keep at most this many problems (and warnings) of each kind and file; the others are
    only counted (:meth:`Findings.counts`), so a file of millions of bad entries takes megabytes, not gigabytes.
    None keeps every one.
    """

    def __init__(self, strict: bool = True, keep: int | None = None) -> None:
        self.strict = strict
        self.keep = keep
        self.problems = ProblemList()
        self._seen: set[tuple[str, str, str, str]] = set()  # the fields of every problem kept
        self._kept: dict[tuple[str, str], int] = {}  # (kind, file) -> problems kept (only when keep is set)

    def add(self, kind: str, file: str | os.PathLike, entry: Any, message: str) -> None:
        fields = (kind, str(file), "" if entry is None else str(entry), message)
        if self.strict:
            raise Problem(*fields).to_error()
        self._record(fields, self.problems)

    def count(self, key: str, n: int = 1) -> None:
        self.problems.stats[key] = self.problems.stats.get(key, 0) + n

    def warn(self, kind: str, file: str | os.PathLike, entry: Any, message: str) -> None:
        """Record a finding that does not invalidate the tree (listed by ``cirlab data check``, logged on load)."""
        self._record((kind, str(file), "" if entry is None else str(entry), message), self.problems.warnings)

    def _record(self, fields: tuple[str, str, str, str], found: Findings) -> None:
        """Keep the problem in ``found`` (or only count it, past ``keep``), once however often it is reported.

        Works on the plain fields: a Problem is built only for the problems kept, which made a file of millions
        of bad entries twice as fast to check."""
        if fields in self._seen:  # a file shared by several splits (Shoes captions) is parsed more than once
            return
        if self.keep is not None:
            group = fields[:2]
            kept = self._kept.get(group, 0)
            if kept >= self.keep:
                found.omitted.setdefault(fields[0], array("q")).append(hash(fields))
                return
            self._kept[group] = kept + 1
        self._seen.add(fields)
        found.append(Problem(*fields))

    def log_warnings(self, where: str) -> None:
        """Loading (strict mode): one log line per kind of warning, with its count and first case; then forget them."""
        if not self.strict:
            return
        warnings = self.problems.warnings
        counts = warnings.counts()
        for kind, n in counts.items():
            first = next((w for w in warnings if w.kind == kind), None)  # None: keep=0 kept no case
            logger.warning("%s: %s x %d%s", where, kind, n, f" (e.g. {first})" if first else "")
        warnings.clear()
        warnings.omitted.clear()


def file_not_found(path: Path) -> str:
    """``file not found``, with the closest name in its folder when there is one (a misspelt category or split:
    ``split.shrt.val.json`` -> ``did you mean 'split.shirt.val.json'?``)."""
    from cirlab.core.config import did_you_mean

    try:
        names = [p.name for p in path.parent.iterdir() if p.is_file()] if path.parent.is_dir() else []
    except OSError:
        names = []
    return "file not found" + did_you_mean(path.name, names)


# Every text and JSON file the loaders read is decoded as "utf-8-sig": a UTF-8 byte order mark (what Windows
# editors write) is dropped, never refused as malformed JSON nor kept as "\ufeff" in the first name or caption.
TEXT_ENCODING = "utf-8-sig"


def utf16_text(path: Path, head: bytes | None = None) -> str | None:
    """The message for a UTF-16 text file (Windows Notepad's "Unicode" save), None for any other: its bytes are no
    UTF-8, and "invalid start byte" did not say what to do."""
    import codecs

    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16 text (as Windows Notepad's \"Unicode\" saves it): save it as UTF-8"
    if _nul_between_letters(head[:_SNIFF_BYTES]):  # no byte order mark: read as UTF-8 it is letters and NULs
        return "UTF-16 text without a byte order mark (a NUL byte beside every letter): save it as UTF-8"
    return None


_SNIFF_BYTES = 2048  # enough text to tell UTF-16 from UTF-8 by its NUL bytes


def _nul_between_letters(head: bytes) -> bool:
    """Whether ``head`` looks like UTF-16 of mostly Latin text: NUL in at least a third of the even or of the odd
    bytes, and almost none in the other half (UTF-8 text holds no NUL at all)."""
    even, odd = head[0::2], head[1::2]
    if len(odd) < 4:
        return False
    shares = sorted((even.count(0) / len(even), odd.count(0) / len(odd)))
    return shares[1] >= 1 / 3 and shares[0] <= 0.05


def read_json(path: Path, sink: ProblemCollector) -> Any | None:
    """Parse a JSON file; a missing or malformed file becomes a problem (None is returned in collect mode).

    A key given twice in one object is a ``duplicate`` problem: Python's json keeps the last value without a word,
    so a split naming an image twice would silently point at the second file.
    """
    if not path.is_file():
        sink.add("missing_file", path, None, file_not_found(path))
        return None
    repeated: dict[int, list[str]] = {}  # id(object) -> its keys given more than once
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
        data = json.loads(text, object_pairs_hook=lambda pairs: _object(pairs, repeated))
        found = list(_repeated_keys(data, repeated)) if repeated else []  # recursive too: inside the same guard
    except json.JSONDecodeError as err:
        sink.add("malformed_json", path, f"line {err.lineno} column {err.colno}",
                 utf16_text(path) or f"malformed JSON: {err.msg}{_trailing_comma_hint(err)}")
        return None
    except UnicodeDecodeError as err:
        sink.add("malformed_json", path, f"byte {err.start}", utf16_text(path) or f"not UTF-8 text: {err.reason}")
        return None
    except RecursionError:
        # json decodes nested lists and objects recursively: "[[[[..." thousands deep ended in a raw traceback;
        # no dataset file nests more than a few levels
        sink.add("malformed_json", path, None, "malformed JSON: nested too deeply (lists or objects inside each "
                 "other about a thousand levels deep or more; dataset files nest a few levels)")
        return None
    for where, key in found:
        sink.add("duplicate", path, where, f"key {key!r} appears twice in {path.name}")
    return data


def _object(pairs: list[tuple[str, Any]], repeated: dict[int, list[str]]) -> dict[str, Any]:
    """``object_pairs_hook``: the dict json would build, noting the keys it would silently overwrite."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            repeated.setdefault(id(obj), []).append(key)
        obj[key] = value
    return obj


def _repeated_keys(data: Any, repeated: dict[int, list[str]], where: str = "") -> Iterable[tuple[str, str]]:
    """``(entry, key)`` of every repeated key, the entry named as the loaders name it: a top-level object's key by
    the key itself (CIRR split files), a list element by ``#index``, a nested object by its path below that."""
    for key in repeated.get(id(data), []):
        yield where or key, key
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for name, child in children:
        if isinstance(child, (dict, list)):
            part = f"#{name}" if isinstance(data, list) else str(name)
            yield from _repeated_keys(child, repeated, f"{where} {part}" if where else part)


def _trailing_comma_hint(err: json.JSONDecodeError) -> str:
    """`` (a trailing comma?)`` when the character before the error (whitespace skipped) is a comma: json's own
    "Expecting property name enclosed in double quotes" does not say what is wrong with ``[1, 2,]`` or ``{"a": 1,}``."""
    return " (a trailing comma?)" if err.doc[:err.pos].rstrip().endswith(",") else ""


def read_lines(path: Path, sink: ProblemCollector) -> list[tuple[int, str]] | None:
    """``(line number, stripped text)`` of the non-blank lines of a text file (numbers count blank lines too)."""
    if not path.is_file():
        sink.add("missing_file", path, None, file_not_found(path))
        return None
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as err:
        sink.add("bad_entry", path, f"byte {err.start}", utf16_text(path) or f"not UTF-8 text: {err.reason}")
        return None
    utf16 = utf16_text(path) if "\x00" in text[:_SNIFF_BYTES] else None  # UTF-16 of Latin text is valid UTF-8
    if utf16:
        sink.add("bad_entry", path, None, utf16)
        return None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# One role, three CIR layouts' names for it (Fashion-IQ, CIRR, Shoes): an entry written in another layout's names (a
# Fashion-IQ file with CIRR's "reference") is offered the rename although the names are not alike.
SAME_FIELD_ACROSS_LAYOUTS = ({"fashioniq": "candidate", "cirr": "reference", "shoes": "ReferenceImageName"},
                             {"fashioniq": "target", "cirr": "target_hard", "shoes": "ImageName"},
                             {"fashioniq": "captions", "cirr": "caption", "shoes": "RelativeCaption"})


def _other_layouts_name(key: str, spare: list[str]) -> str | None:
    """The entry's name for ``key``'s role in another CIR layout, if it has one."""
    for names in SAME_FIELD_ACROSS_LAYOUTS:
        if key in names.values():
            return next((n for n in spare if n in names.values() and n != key), None)
    return None


def _whose_name(name: str) -> str:
    """`` (the name CIRR uses)`` for a field of another layout, else nothing."""
    layouts = {"fashioniq": "Fashion-IQ", "cirr": "CIRR", "shoes": "Shoes"}
    owner = next((layout for names in SAME_FIELD_ACROSS_LAYOUTS for layout, n in names.items() if n == name), None)
    return f" (the name {layouts[owner]} uses)" if owner else ""


def missing_keys_message(entry: dict[str, Any], keys: Iterable[str], known: Iterable[str] = ()) -> str | None:
    """``missing key 'target_hard' (this entry has: pairid, reference, ...; did you mean 'target'?)``, None when
    none of ``keys`` is missing: a renamed field reads as what it is, not as a value of the wrong type.
    ``known``: the fields the loader reads, never offered as a misspelling (``target_soft`` is no ``target_hard``)."""
    from cirlab.core.config import closest

    missing = [key for key in keys if key not in entry]
    if not missing:
        return None
    names = list(entry)
    spare = [n for n in names if n not in set(known) | set(missing)]
    guesses = [(close, key) for key, close in ((key, closest(key, spare) or _other_layouts_name(key, spare))
                                               for key in missing) if close]
    said = [f"{close!r}" + (f" for {key!r}" if len(missing) > 1 else "") + _whose_name(close)
            for close, key in guesses]
    hint = f"; did you mean {', '.join(said)}?" if said else ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "no keys"
    what = f"key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    return f"missing {what} (this entry has: {shown}{hint})"


# ----------------------------------------------------------------------------------------------------------------------
# the CIR contract


@dataclass
class Triplet:
    """One CIR query: reference image + modification text (-> target image).

    Attributes:
        query_id: unique within the split (CIRR ``pairid``, Fashion-IQ ``{category}:{index}``, Shoes entry index).
        ref_name: reference image name (a key of ``CIRSplit.image_paths``).
        captions: the raw modification texts of the entry (Fashion-IQ: 2, Shoes and CIRR: 1).
        text: the deterministic query text (captions joined by the split's caption policy).
        target_name: target image name; None where the split ships no ground truth (CIRR test1, Fashion-IQ test).
        category: Fashion-IQ category; the dataset name for Shoes ("shoes") and CIRR ("cirr").
        extras: every further per-entry field (CIRR ``members``/``img_set_id``/``target_soft``, a synthetic
            ``modification`` type, ...).
    """

    query_id: str
    ref_name: str
    captions: list[str]
    text: str
    target_name: str | None
    category: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class CIRSplit:
    """A loaded CIR split: triplets, the protocol's evaluation gallery and where every image lives.

    Attributes:
        dataset: "fashioniq" | "shoes" | "cirr".
        split: the split name as loaded ("train", "val", "test", "test1").
        root: the dataset root.
        category: the category loaded (None = all categories, each triplet carries its own).
        triplets: the queries in file order.
        gallery_names: the evaluation gallery for this split/category, in protocol order.
        image_paths: image name -> file, for every image named by the triplets or the gallery.
        protocol: name of the evaluation protocol the gallery and texts follow (e.g. "amc", "clip4cir", "cirr").
        exclude_reference: whether the protocol removes each query's own reference image from its ranking
            (AMC Fashion-IQ/Shoes and CIRR: yes; CLIP4Cir/re-ranking Fashion-IQ: no). Pass ``ref_idx`` as the
            metric's ``exclude`` when True.
        train_text: optional ``captions -> text`` sampler used by ``triplet_dataset`` (the randomised Fashion-IQ
            caption policy); None = use ``Triplet.text``.
    """

    dataset: str
    split: str
    root: Path
    category: str | None
    triplets: list[Triplet]
    gallery_names: list[str]
    image_paths: dict[str, Path]
    protocol: str = ""
    exclude_reference: bool = True
    train_text: Callable[[list[str]], str] | None = None
    image_read: str = "viewer"  # dataset.options.image_read: how image files are decoded (load_image)

    def __repr__(self) -> str:
        cat = f", category={self.category!r}" if self.category else ""
        return (f"CIRSplit({self.dataset!r}, split={self.split!r}{cat}, protocol={self.protocol!r}, "
                f"triplets={len(self.triplets)}, gallery={len(self.gallery_names)})")

    def __len__(self) -> int:
        return len(self.triplets)

    def image_path(self, name: str) -> Path:
        """The file of image ``name`` (KeyError naming the split when unknown)."""
        try:
            return self.image_paths[name]
        except KeyError:
            raise KeyError(f"image {name!r} is not part of {self!r}") from None

    def read_image(self, name: str) -> Any:
        """Image ``name`` as 8-bit RGB, decoded as ``image_read`` says (:func:`load_image`)."""
        return load_image(self.image_path(name), self.image_read)

    @cached_property
    def gallery_index(self) -> dict[str, int]:
        """Image name -> position in ``gallery_names``."""
        return {name: i for i, name in enumerate(self.gallery_names)}

    @property
    def has_targets(self) -> bool:
        return all(t.target_name is not None for t in self.triplets)

    def ref_indices(self) -> list[int]:
        """Gallery index of every query's reference image (-1 when not in the gallery)."""
        return [self.gallery_index.get(t.ref_name, -1) for t in self.triplets]

    def target_indices(self) -> list[int]:
        """Gallery index of every query's target (-1 when absent, e.g. CIRR test1)."""
        return [self.gallery_index.get(t.target_name, -1) if t.target_name else -1 for t in self.triplets]

    def member_indices(self) -> list[list[int]]:
        """CIRR: gallery indices of each query's ``img_set`` members (reference included); [] for other datasets."""
        return [[self.gallery_index.get(m, -1) for m in t.extras.get("members", [])] for t in self.triplets]

    def triplet_dataset(self, transform: Transform | None = None, random_text: bool = True) -> "TripletDataset":
        """Training items ``{"query_id","ref_image","text","target_image","category","modification"}``.

        Args:
            transform: PIL image -> tensor; None = :func:`cirlab.data.transforms.default_transform`.
            random_text: sample the text with the split's ``train_text`` policy when it has one (Fashion-IQ
                CLIP4Cir policy); False = always ``Triplet.text``.
        """
        if not self.has_targets:
            missing = next(t for t in self.triplets if t.target_name is None)
            raise DataError("this split ships no targets; it cannot be used for training",
                            file=str(self.root), entry=f"{self.split} query {missing.query_id}", kind="bad_entry")
        return TripletDataset(self, _resolve_transform(transform), self.train_text if random_text else None)

    def query_dataset(self, transform: Transform | None = None) -> "QueryDataset":
        """Evaluation queries ``{"query_id","ref_image","text","ref_idx","target_idx","category","modification"}``."""
        return QueryDataset(self, _resolve_transform(transform))

    def gallery_dataset(self, transform: Transform | None = None) -> "GalleryDataset":
        """Gallery images ``{"image","gallery_idx","name"}`` in ``gallery_names`` order."""
        return GalleryDataset(self, _resolve_transform(transform))


def _resolve_transform(transform: Transform | None) -> Transform:
    if transform is not None:
        return transform
    from cirlab.data.transforms import default_transform

    return default_transform()


IMAGE_READS = ("viewer", "original")  # dataset.options.image_read of every CIR dataset

# The most pixels an image file may declare (width x height); a larger one is refused before it is decoded. The
# CIR and ITM releases' images are at most a few megapixels, while Pillow only warns up to twice its own limit
# (about 179 Mpx): a PNG of a few hundred KB declaring 15000 x 11900 pixels took gigabytes per load, in every
# DataLoader worker. Read at each call, so a project with larger images can raise it (cirlab.data.base).
MAX_IMAGE_PIXELS = 50_000_000


def check_image_size(img: Any, path: str | os.PathLike) -> None:
    """Refuse an opened image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels (a DataError naming
    the file and its size). ``img``: a PIL image from ``Image.open``, whose pixels are not decoded yet."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image too large: {width} x {height} pixels ({width * height / 1e6:.1f} Mpx) is above the "
                        f"{MAX_IMAGE_PIXELS / 1e6:g} Mpx limit (cirlab.data.base.MAX_IMAGE_PIXELS); decoding it "
                        "would take gigabytes of memory (a decompression bomb?)", file=path, kind="unreadable_image")


def load_image(path: Path, image_read: str = "viewer") -> Any:
    """Open an image as 8-bit RGB, as an image viewer shows it (:func:`to_rgb`; ``image_read="original"``: as the
    papers' loaders read it, ``.convert("RGB")`` only); an unreadable file, or one declaring more than
    :data:`MAX_IMAGE_PIXELS` pixels, is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            check_image_size(img, path)  # Image.open read only the header: nothing is decoded yet
            if image_read == "original":  # no orientation tag read, alpha dropped, 16-bit clipped at 255
                return img.convert("RGB")
            return to_rgb(upright(img), img.format)
    except FileNotFoundError:
        raise DataError("image file not found", file=path, kind="missing_image") from None
    except Image.DecompressionBombError as err:  # Pillow's own refusal (twice its limit): not an OSError
        raise DataError(f"image too large: {err}", file=path, kind="unreadable_image") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image: {err}", file=path, kind="unreadable_image") from None


def upright(img: Any) -> Any:
    """The image turned as its EXIF orientation says (a phone writes the tag instead of rotating the pixels: without
    it a portrait photo loads lying on its side). Untagged images, nearly all, are returned as they are."""
    from PIL import ExifTags, ImageOps

    if img.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return img
    return ImageOps.exif_transpose(img)


WHITE = (255, 255, 255)  # what transparent pixels become: the background viewers and product photos show


def to_rgb(img: Any, fmt: str | None = None) -> Any:
    """8-bit RGB of any PIL image: high-bit-depth modes scaled (:func:`to_8bit`), transparency composited on white.

    PIL's ``convert("RGB")`` (what the papers' loaders call) clips 16-bit values at 255, so a 16-bit PNG loads almost
    white, and it drops alpha, keeping whatever colour the encoder left under transparent pixels (often black, or
    anything): the model would see a colour no viewer shows. Both rules change nothing for 8-bit opaque images,
    which is what the public releases ship. ``fmt``: the file format (a turned copy no longer knows it).
    """
    from PIL import Image

    img = to_8bit(img, fmt or img.format)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # a loaded copy even for RGB: the caller closes the file


def to_8bit(img: Any, fmt: str | None = None) -> Any:
    """An ``L`` image from a 16/32-bit integer or float one (other modes unchanged), scaled by the mode's range:

    * ``I;16*`` (16-bit PNG / TIFF): 0..65535 -> 0..255 (divided by 257, so 65535 is 255);
    * ``I`` from a PNG or PPM/PGM file (how Pillow opens 16-bit PNGs in older versions and 16-bit PGM/PPM files):
      the same 0..65535 range;
    * ``I`` otherwise (a 32-bit TIFF, or an in-memory image, whose format is unknown): decided from the data, as
      the format cannot tell: largest value <= 65535 -> the 16-bit range, else 0..2**31-1 -> 0..255; negatives 0;
    * ``F`` (32-bit float): 0.0..1.0 -> 0..255, values outside clipped.
    """
    import numpy as np
    from PIL import Image

    top = _full_scale(img, fmt)
    if top is None:
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


# formats whose ``I`` images hold 16-bit samples: PNG (older Pillow) and PGM/PPM (Pillow reports "PPM" for both)
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


def _full_scale(img: Any, fmt: str | None) -> float | None:
    """The value that maps to 255 for ``img``'s mode (None: an 8-bit mode, left as it is)."""
    if img.mode == "F":
        return 1.0
    if img.mode.startswith("I;16") or img.mode == "I" and fmt in _SIXTEEN_BIT_I_FORMATS:
        return 65535.0
    if img.mode == "I":
        # an in-memory copy (format None) or another format may hold either range: scaling 16-bit data by 2**31
        # would turn it black, so a largest value within 16 bits is read as 16-bit data
        return 65535.0 if img.getextrema()[1] <= 65535 else float(2 ** 31 - 1)
    return None


class TripletDataset:
    """Map-style dataset of training triplets (works with ``torch.utils.data.DataLoader``'s default collate)."""

    def __init__(self, split: CIRSplit, transform: Transform, text_fn: Callable[[list[str]], str] | None) -> None:
        self.split, self.transform, self.text_fn = split, transform, text_fn

    def __len__(self) -> int:
        return len(self.split.triplets)

    def group_keys(self) -> list[str]:
        """The reference image of every triplet: the trainer's ``group_batches`` batches these together."""
        return [t.ref_name for t in self.split.triplets]

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.split.triplets[i]
        return {
            "query_id": t.query_id,
            "ref_image": self.transform(self.split.read_image(t.ref_name)),
            "text": self.text_fn(t.captions) if self.text_fn else t.text,
            "target_image": self.transform(self.split.read_image(t.target_name)),
            "category": t.category,
            "modification": str(t.extras.get("modification", "")),
        }


class QueryDataset:
    """Map-style dataset of evaluation queries; ``ref_idx``/``target_idx`` index ``gallery_names`` (-1 = absent)."""

    def __init__(self, split: CIRSplit, transform: Transform) -> None:
        self.split, self.transform = split, transform
        self.ref_idx = split.ref_indices()
        self.target_idx = split.target_indices()

    def __len__(self) -> int:
        return len(self.split.triplets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.split.triplets[i]
        return {
            "query_id": t.query_id,
            "ref_image": self.transform(self.split.read_image(t.ref_name)),
            "text": t.text,
            "ref_idx": self.ref_idx[i],
            "target_idx": self.target_idx[i],
            "category": t.category,
            "modification": str(t.extras.get("modification", "")),
        }


class GalleryDataset:
    """Map-style dataset over ``gallery_names``."""

    def __init__(self, split: CIRSplit, transform: Transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.gallery_names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.split.gallery_names[i]
        return {"image": self.transform(self.split.read_image(name)), "gallery_idx": i, "name": name}


# ----------------------------------------------------------------------------------------------------------------------
# dispatch

def load_cir(name: str, root: str | os.PathLike | None = None, split: str = "train", category: str | None = None,
             **kw: Any) -> CIRSplit:
    """Load a CIR split (validated eagerly: the first problem raises :class:`DataError`).

    Args:
        name: "fashioniq" | "shoes" | "cirr".
        root: dataset root, or a folder holding it as ``<root>/<name>`` (the synthetic set, ``$CIRLAB_DATA``; see
            :func:`cirlab.data.catalog.dataset_root`); None = ``$CIRLAB_DATA/<name>``.
        split: split name ("train", "val", "test"; CIRR "test1").
        category: one Fashion-IQ category (None = all categories concatenated); ignored by Shoes and CIRR.
        **kw: dataset options (Fashion-IQ ``protocol``/``gallery``/``captions``, Shoes ``pairs``).
    """
    from cirlab.core.config import did_you_mean, unknown_names_message
    from cirlab.data.catalog import CIR_DATASETS, DATASETS, canonical_name

    check_root(root)
    key = canonical_name(name)
    if key not in CIR_DATASETS:
        raise ConfigError(f"unknown CIR dataset {name!r}{did_you_mean(name, CIR_DATASETS)}; "
                          f"known: {', '.join(CIR_DATASETS)}")
    spec = DATASETS[key]
    options = loader_options(key)
    if set(kw) - set(options):  # load_cir's own arguments are candidates too: categroy= means category=
        raise ConfigError(unknown_names_message(f"load_cir({key!r})", set(kw) - set(options),
                                                ["root", "split", "category", *options]))
    check_options(key, kw)
    path = cir_root(key, root)
    if not path.is_dir():
        raise DataError(missing_root_message(key, path, root), file=path, kind="missing_file")
    refuse_unfinished(path)
    module = importlib.import_module(spec.loader)
    image_read = kw.pop("image_read", "viewer")  # every CIR loader's; the split carries it to its datasets
    return dataclasses.replace(module.load(path, split=split, category=category, **kw), image_read=image_read)


def refuse_unfinished(folder: Path) -> None:
    """Refuse ``folder`` where a cirlab generator was writing it and stopped (killed, Ctrl-C, a full disk): its images
    and splits may be missing, and ``missing_images=drop`` would then train on part of the set without a word, or
    a complete category on a tree that is not the generator's output. Rerunning the generator finishes it."""
    why = unfinished_write(folder)
    if why is not None:
        raise DataError(why, file=folder, kind="unfinished_write")


def unfinished_write(folder: Path) -> str | None:
    """What to say of ``folder`` where a cirlab generator's write never finished (None: it finished, or no cirlab
    generator wrote it): the loaders refuse it with this, ``cirlab data check`` lists it."""
    from cirlab.data.generators import _owned, emoji, synthetic

    generator = _owned.unfinished(folder, (synthetic.MANIFEST, emoji.MANIFEST))
    if generator is None:
        return None
    command = {synthetic.__name__: synthetic.COMMAND, emoji.__name__: emoji.COMMAND}.get(generator)
    again = f"run `{command}` again with the same options to finish it" if command else \
        f"run the command that wrote it ({generator}) again"
    return (f"written by `{command or generator}` and not finished (it was stopped part-way: splits or images may be "
            f"missing); {again}")


def cir_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder a CIR loader reads (and ``cirlab data check`` checks) for ``root``: a given root may be the folder
    holding ``<name>/`` (what the workbench's find_data accepts), None is ``$CIRLAB_DATA/<name>``
    (:func:`cirlab.data.catalog.dataset_root` decides both); then the loader's own ``dataset_root`` (CIRR's
    ``cirr_dataset`` or its ``cirr``)."""
    from cirlab.data.catalog import dataset_root, get_dataset

    loader = importlib.import_module(get_dataset(name).loader)
    return getattr(loader, "dataset_root", Path)(dataset_root(name, root))


def check_root(root: Any) -> None:
    """Refuse a root that is not a path (``root=3`` would fail deep inside pathlib with a TypeError)."""
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ConfigError(f"root must be a folder path (str or os.PathLike) or None, got {root!r}")


def missing_root_message(name: str, path: Path, given: Any = None) -> str:
    """``dataset root not found (...)`` for a resolved root ``path`` that is not a folder (``given``: the root the
    user passed, None or "" when the default was used)."""
    what = "dataset root is a file, not a folder" if path.exists() else "dataset root not found"
    return f"{what} ({missing_root_hint(name, given)})"


def missing_root_hint(name: str, root: Any = None, recorded_in: Path | None = None) -> str:
    """What to do about a dataset root that does not exist: where the default comes from and how to get data.
    ``recorded_in``: the run's config.yaml the root was read from (``cirlab eval RUN``): the user gave no root, and
    CIRLAB_DATA does not apply (a recorded root comes before it), so only ``--root`` is advised."""
    from cirlab.data.catalog import dataset_root, get_dataset
    from cirlab.data.generators.synthetic import default_out

    if recorded_in is not None:
        return (f"it is the dataset.root recorded in {recorded_in}, where the run was trained: "
                f"{Path(str(root)).expanduser().absolute()}, gone since (moved, or another machine?); pass --root PATH "
                f"(cirlab eval {recorded_in.parent} --root PATH) naming the folder that holds that data here")
    spec = get_dataset(name)
    where = (f"it is the given root (dataset.root or --root), {Path(str(root)).expanduser().absolute()}"
             if root not in (None, "")
             else f"the default is {dataset_root(name, None)} (CIRLAB_DATA is "
                  + (f"{os.environ['CIRLAB_DATA']!r})" if os.environ.get("CIRLAB_DATA") else "not set: ./data)"))
    synthetic = default_out()
    if root in (None, "") and (synthetic / spec.subdir).is_dir():  # `cirlab data synth` without --out wrote there
        where += (f"; synthetic data is at {synthetic} (cirlab data synth's default): use it as the root "
                  f"({synthetic})")
    return (f"{where}; set dataset.root (cirlab train --set dataset.root=PATH, cirlab eval --root PATH) or "
            "CIRLAB_DATA to the folder holding the release, or write the synthetic data in this layout with "
            "`cirlab data synth --out DIR` and use DIR")


def loader_options(name: str) -> dict[str, Any]:
    """The options a dataset's loader takes (``dataset.options``), each with its choices: its ``OPTIONS`` table."""
    from cirlab.data.catalog import get_dataset

    spec = get_dataset(name)
    common = {} if spec.is_itm else {"image_read": IMAGE_READS}
    return {**dict(getattr(importlib.import_module(spec.loader), "OPTIONS", {})), **common}


def no_queries_reason(name: str) -> str:
    """Why a split of dataset ``name`` can hold no query, as the refusal of an empty evaluation split says it: only
    the causes this dataset can have (Shoes has no ``missing_images`` option to blame)."""
    from cirlab.data.catalog import get_dataset

    if get_dataset(name).is_itm:
        return "its caption file is empty"
    drop = ", or dataset.options.missing_images=drop left every query out" \
        if "missing_images" in loader_options(name) else ""
    return f"its caption file is empty or names no image of the split{drop}"


def check_options(name: str, options: dict[str, Any]) -> None:
    """Check loader options (``dataset.options``) against the loader's ``OPTIONS`` table: an unknown option or a
    value outside its choices is a :class:`~cirlab.core.errors.ConfigError` with a "did you mean" suggestion."""
    from cirlab.core.config import did_you_mean, unknown_names_message
    from cirlab.data.catalog import get_dataset

    spec = get_dataset(name)
    schema = loader_options(name)
    unknown = sorted(set(options) - set(schema))
    if unknown:
        where = f"dataset.options ({spec.name} loader" + (")" if schema else ", which takes no options)")
        raise ConfigError(unknown_names_message(where, unknown, schema))
    for key, value in options.items():
        allowed = schema[key]
        if isinstance(allowed, tuple):
            if value not in allowed:
                raise ConfigError(f"dataset.options.{key}: {value!r} is not one of {', '.join(map(str, allowed))}"
                                  f"{did_you_mean(value, allowed)}")
        elif allowed == "bool?":
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"dataset.options.{key}: expected true, false or null, got {value!r}")
        elif allowed == "int?":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"dataset.options.{key}: expected an integer >= 1 or null, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# helpers shared by the layouts

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def index_images(folder: Path, sink: ProblemCollector, *, by: str = "stem", exts: tuple[str, ...] = IMAGE_EXTS,
                 into: dict[str, Path] | None = None) -> dict[str, Path]:
    """Map image key (file stem or full basename) -> path for the image files directly inside ``folder``.

    One ``os.scandir`` instead of a ``stat`` per lookup (Fashion-IQ has ~75k images). Two files with the same key are
    a ``duplicate`` problem naming both, never a silent choice.
    """
    found = {} if into is None else into
    with os.scandir(folder) as entries:
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix not in exts or not entry.is_file():
                continue
            key = os.path.splitext(entry.name)[0] if by == "stem" else entry.name
            path = Path(entry.path)
            if key in found and found[key] != path:
                sink.add("duplicate", path, key, f"image {key!r} exists twice: {found[key]} and {path}")
                continue
            found[key] = path
    return found


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def first_appearance(names: Iterable[str]) -> list[str]:
    """Unique names in order of first appearance."""
    return list(dict.fromkeys(names))
