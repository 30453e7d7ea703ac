"""Flickr30K / MS-COCO "precomp" BUTD region features, the SCAN release format (Lee et al., ECCV 2018,
https://github.com/kuanghuei/SCAN) used by VSE++, SCAN, GPO, HREM and DIME.

Layout (``root``)::

    {name}_precomp/{split}_ims.npy    float array [N_img, 36, 2048] (Faster R-CNN BUTD regions), memory-mapped
    {name}_precomp/{split}_caps.txt   one raw caption per line, 5 consecutive lines per image, image order = .npy order

``name`` is ``f30k`` or ``coco`` (or any other, e.g. the synthetic set); splits are ``train``, ``dev``, ``test`` and
(COCO) ``testall``. GPO's ``{name}/precomp/`` layout is accepted too.

Semantics (identical in VSE++/SCAN/GPO/HREM): the split is indexed by caption; ``im_div = 5`` when
``N_img != N_caps`` else 1, and caption ``k`` belongs to image ``k // im_div``. Unlike the original code, a caption
count that is neither ``N_img`` nor ``5 * N_img`` is a DataError naming both files (the original silently misaligns).
The ``dev`` split is capped at its first 5,000 captions (``max_captions``), as all of these code bases do for fast
validation; pass ``max_captions=None`` for the whole split.
"""
from __future__ import annotations

import codecs
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cirlab.core.errors import ConfigError, UnknownNameError
from cirlab.data.base import ProblemCollector, check_root, file_not_found, refuse_unfinished, utf16_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
# "val", as the notebooks and the CIR datasets name the validation split: the precomp releases call it "dev"
SPLIT_ALIASES = {"val": "dev"}
DEV_MAX_CAPTIONS = 5000  # VSE++ data.py: `if data_split == 'dev': self.length = 5000`
_DEFAULT = object()
# dataset.options the loader takes ("int?": an integer >= 1 or null)
OPTIONS: dict[str, object] = {"max_captions": "int?", "regions": "int?", "dim": "int?"}


def precomp_dir(root: Path, name: str) -> Path:
    """The set's folder (:func:`find_set_dir`), else ``root/{name}_precomp`` (the path a missing-file problem names).
    The folder a split is read from: where a root holds two folders of the set, the one read is said here (once
    per load; :func:`find_set_dir` is also asked where only existence matters)."""
    root = Path(root)
    found = find_set_dir(root, name)
    if found is None:
        return root / f"{name}_precomp"
    others = [c for c in _set_dir_candidates(root, name)
              if c.is_dir() and os.path.realpath(c) != os.path.realpath(found)]
    if others:
        logger.warning("%s holds %s and %s: reading %s", root, found.relative_to(root),
                       " and ".join(str(c.relative_to(root)) for c in others), found.relative_to(root))
    return found


def _set_dir_candidates(root: Path, name: str) -> tuple[Path, ...]:
    return root / f"{name}_precomp", root / name / "precomp", root / "precomp" / f"{name}_precomp"


def find_set_dir(root: Path, name: str) -> Path | None:
    """``root/{name}_precomp`` (HREM/SCAN), else ``root/{name}/precomp`` (GPO), else ``root/precomp/{name}_precomp``
    (a data root holding several layouts: the synthetic set), else ``root`` if it is that folder; None if absent."""
    for candidate in _set_dir_candidates(root, name):
        if candidate.is_dir():
            return candidate
    # a folder named precomp/ is GPO's set folder only when it holds no *_precomp sets (the synthetic set's does),
    # and it is this set unless its parent names another one (coco/precomp loaded as f30k read COCO's features)
    if root.name == f"{name}_precomp" or (_is_gpo_set(root) and not _names_another_set(root.parent.name, name)):
        return root
    return None


def _names_another_set(folder_name: str, name: str) -> bool:
    from cirlab.data.catalog import ITM_DATASETS, canonical_name

    return canonical_name(folder_name) in ITM_DATASETS and canonical_name(folder_name) != canonical_name(name)


def set_name(root: Path, name: Any) -> str:
    """The name of the precomp set ``name`` picks under ``root``: as given when its folder exists, else the catalog's
    name for it (a case slip or an alias: "F30K", "flickr30k" -> "f30k").

    A name matching none of the sets in a folder that holds some is a ConfigError naming them; it would otherwise
    read as a missing split.
    """
    from cirlab.core.config import did_you_mean
    from cirlab.data.catalog import DATASETS, ITM_DATASETS, canonical_name

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a precomp dataset name such as 'f30k' or 'coco', got {name!r}")
    key = canonical_name(name)
    for candidate in dict.fromkeys((name, key)):
        if find_set_dir(root, candidate) is not None:
            return candidate
    where = root if find_precomp(root) else root / "precomp"
    present = [n for n, _ in find_precomp(where)]
    if not present:  # nothing to choose from: the loader reports the missing folder
        return key if key in DATASETS else name
    what = f"precomp set {name!r} not found" if key in ITM_DATASETS else f"unknown precomp set {name!r}"
    hint = did_you_mean(name, [n for n in dict.fromkeys([*present, *ITM_DATASETS]) if n != key])
    raise ConfigError(f"{what}{hint}; sets in {where}: {', '.join(present)} (catalog names: "
                      f"{', '.join(ITM_DATASETS)})")


def count_or_none(value: Any, name: str) -> int | None:
    """A count argument: a whole number >= 1, or None (no limit / any size). ``max_captions=-5`` would otherwise
    slice the last 5 captions off, and ``regions="36"`` never match an array's shape."""
    from cirlab.core.config import FieldValueError, whole_number

    if value is None:
        return None
    try:
        return whole_number(value, name)
    except FieldValueError:
        raise FieldValueError(f"{name} must be a whole number >= 1 or None, got {value!r}") from None


_NPY_MAGIC = b"\x93NUMPY"  # the first six bytes of every .npy file (numpy.lib.format)


def open_features(path: Path, sink: ProblemCollector, regions: int | None = 36, dim: int | None = 2048) -> Any:
    """Memory-map ``{split}_ims.npy`` and validate its header (shape, dtype, file size) without reading the data."""
    if not path.is_file():
        sink.add("missing_file", path, None, file_not_found(path))
        return None
    with open(path, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:  # numpy takes such a file for a pickle and advises allow_pickle, which would be wrong here
        sink.add("bad_array", path, None, "not a .npy file (it does not start with numpy's \\x93NUMPY header)"
                 + (": the file is empty" if not magic else ""))
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # truncated download: "mmap length is greater than file size"
        why = ("it holds Python objects, not numbers" if "Python objects" in str(err)
               else f"truncated or damaged? {err}")
        sink.add("bad_array", path, None, f"cannot memory-map the array ({why})")
        return None
    expected = f"[N, {regions or 'R'}, {dim or 'D'}]"
    if array.ndim != 3 or (regions and array.shape[1] != regions) or (dim and array.shape[2] != dim):
        sink.add("bad_array", path, None, f"shape {tuple(array.shape)} does not match {expected}"
                 + _shape_hint(array.shape, regions, dim))
        return None
    if not np.issubdtype(array.dtype, np.floating):
        sink.add("bad_array", path, None, f"dtype {array.dtype} is not a floating-point type")
        return None
    return array


def _shape_hint(shape: tuple[int, ...], regions: int | None, dim: int | None) -> str:
    """Which option sets the expected size, for features of another backbone or region count than BUTD's 36 x 2048:
    the run-config spelling and ``cirlab data check``'s."""
    if len(shape) != 3:
        return " (region features are 3-D: images x regions x dimensions)"
    wrong = [(name, got) for name, want, got in (("regions", regions, shape[1]), ("dim", dim, shape[2]))
             if want and got != want]
    return "".join(f"; for {got}-{'region' if name == 'regions' else 'dimensional'} features set "
                   f"dataset.options.{name}={got} (cirlab data check --{name} {got})" for name, got in wrong)


def check_finite_features(array: Any, path: Path, sink: ProblemCollector, chunk: int = 256) -> None:
    """Report NaN / infinite values, and warn of images whose features are all zero (``cirlab data check``: reads the
    whole array, a block of images at a time)."""
    bad: list[int] = []
    zero: list[int] = []
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start:start + chunk])
        block = block.reshape(len(block), -1)
        bad += [start + int(i) for i in np.flatnonzero(~np.isfinite(block).all(axis=1))]
        zero += [start + int(i) for i in np.flatnonzero(~block.any(axis=1))]
    if bad:
        sink.add("bad_array", path, f"image {bad[0]}", f"NaN or infinite feature values in {_images(bad)}; training "
                 "on them gives a NaN loss")
    if zero:  # an export that wrote no features: finite, so it trained and scored, by tie order alone
        sink.warn("zero_features", path, f"image {zero[0]}", f"all-zero features in {_images(zero)}: such images score "
                  "alike against every caption, their ranks come from tie order alone")


def _images(indices: list[int]) -> str:
    """``"3 images (index 0, 4, 7)"``: a count and the first few indices."""
    from cirlab.core.errors import first_few

    return f"{len(indices)} image{'s' if len(indices) != 1 else ''} (index {first_few(indices, 5)})"


def read_captions(path: Path, sink: ProblemCollector) -> list[str] | None:
    """Lines of ``{split}_caps.txt`` (read as bytes, decoded as UTF-8 without a leading byte order mark); an empty
    line is a problem, never dropped."""
    if not path.is_file():
        sink.add("missing_file", path, None, file_not_found(path))
        return None
    data = path.read_bytes()
    utf16 = utf16_text(path, data[:2048])
    if utf16:  # one problem, not one per line
        sink.add("bad_entry", path, None, utf16)
        return None
    if data.startswith(codecs.BOM_UTF8):  # base.TEXT_ENCODING's rule: a byte order mark is no part of caption 1
        data = data[len(codecs.BOM_UTF8):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the final newline ends the last caption, it does not start another
        lines.pop()
    captions = []
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            sink.add("bad_entry", path, f"line {n}", f"not UTF-8 text: {err.reason}")
            text = ""
        else:
            if not text:
                sink.add("bad_entry", path, f"line {n}", "empty caption")
        captions.append(text)
    return captions


def image_divisor(n_images: int, n_captions: int) -> int | None:
    """``im_div`` of the original loaders (5 if the counts differ, else 1); None when the counts are inconsistent."""
    if n_captions == n_images:
        return 1
    if n_captions == CAPTIONS_PER_IMAGE * n_images:
        return CAPTIONS_PER_IMAGE
    return None


@dataclass
class PrecompSplit:
    """A loaded precomp split.

    Attributes:
        name: dataset name ("f30k", "coco", ...).
        split: split name.
        images: memory-mapped ``[N_img, R, D]`` features (only the images covered by ``captions``).
        captions: raw captions; caption ``k`` describes image ``k // im_div``. The datasets made from the split
            (:meth:`pair_dataset`, :meth:`caption_dataset`) read the captions as they were when made: edit the
            list before making them (its length and order stay the split's, as ``im_div`` pairs them).
        im_div: captions per image (5, or 1 when the files hold one caption per image).
        ims_path / caps_path: the two files.
    """

    name: str
    split: str
    images: Any
    captions: list[str]
    im_div: int
    ims_path: Path
    caps_path: Path

    def __repr__(self) -> str:
        return (f"PrecompSplit({self.name!r}, split={self.split!r}, images={tuple(self.images.shape)}, "
                f"captions={len(self.captions)}, im_div={self.im_div})")

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn/forkserver pickle the dataset: pickling a memmap would copy the whole
        # array (33 GB for COCO train), so ship the path and re-open the map on the other side
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap):
            state["images"] = ("memmap", str(self.ims_path), int(self.images.shape[0]))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        images = state["images"]
        if isinstance(images, tuple) and images[:1] == ("memmap",):
            state["images"] = np.load(images[1], mmap_mode="r", allow_pickle=False)[: images[2]]
        self.__dict__.update(state)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def image_of_caption(self, k: int) -> int:
        return k // self.im_div

    def features(self, i: int) -> Any:
        """Image ``i``'s region features as a float32 tensor ``[R, D]`` (copied out of the memory map)."""
        import torch

        return torch.from_numpy(np.array(self.images[i], dtype=np.float32))

    def pair_dataset(self, extra_text: bool = False, extra_image: bool = False) -> "PairDataset":
        """Training pairs, one per caption: ``{"image_feats","text","image_idx","caption_idx"}``.

        ``extra_text`` / ``extra_image`` add, per item, one random caption / image of the whole split, drawn
        uniformly with torch's RNG inside ``__getitem__`` (DIME's ``--extra_stc 1`` / ``--extra_img 1``; see
        :class:`PairDataset`). The trainer seeds every item from ``(seed, epoch, index)``, so the draws are
        reproducible and resume-exact.
        """
        return PairDataset(self, extra_text=extra_text, extra_image=extra_image)

    def image_dataset(self) -> "ImageDataset":
        """``{"image_feats","image_idx"}`` per image."""
        return ImageDataset(self)

    def caption_dataset(self) -> "CaptionDataset":
        """``{"text","caption_idx"}`` per caption."""
        return CaptionDataset(self)


class _CaptionReader:
    """A dataset that reads its split's captions through a :class:`TextTable` made when it is made."""

    split: PrecompSplit
    texts: "TextTable"

    def __getstate__(self) -> dict[str, Any]:
        # workers started by spawn (not fork) share nothing anyway: the table is made again from the split's
        # captions there, so that they are not pickled twice
        return {k: v for k, v in self.__dict__.items() if k != "texts"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.texts = TextTable(self.split.captions)


class PairDataset(_CaptionReader):
    """One (image, caption) pair per caption, optionally with one random extra caption and/or image.

    Extra items are drawn uniformly from the whole split with ``torch.randint`` (global torch RNG: seeded per item
    by the trainer's ``SeededItems``, per worker by the DataLoader otherwise), as the original DIME loader does:

    * ``extra_text``: ``"extra_text"`` (a random caption), ``"extra_text_image_idx"`` (its image) and
      ``"extra_caption_idx"``;
    * ``extra_image``: ``"extra_image_feats"`` (a random image's regions) and ``"extra_image_idx"``.

    The draw may hit the item's own caption or image (the original does not avoid it); a model that masks
    same-image pairs uses the ``*_idx`` fields.
    """

    def __init__(self, split: PrecompSplit, extra_text: bool = False, extra_image: bool = False) -> None:
        self.split, self.extra_text, self.extra_image = split, bool(extra_text), bool(extra_image)
        self.texts = TextTable(split.captions)  # the captions as they are now, read by the workers

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, k: int) -> dict[str, Any]:
        import torch

        i = self.split.image_of_caption(k)
        item = {"image_feats": self.split.features(i), "text": self.texts[k], "image_idx": i, "caption_idx": k}
        if self.extra_text:
            j = int(torch.randint(len(self.texts), ()))
            item.update(extra_text=self.texts[j], extra_text_image_idx=self.split.image_of_caption(j),
                        extra_caption_idx=j)
        if self.extra_image:
            j = int(torch.randint(self.split.num_images, ()))
            item.update(extra_image_feats=self.split.features(j), extra_image_idx=j)
        return item


class ImageDataset:
    def __init__(self, split: PrecompSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image_feats": self.split.features(i), "image_idx": i}


class CaptionDataset(_CaptionReader):
    def __init__(self, split: PrecompSplit) -> None:
        self.split = split
        self.texts = TextTable(split.captions)  # the captions as they are now, read by the workers

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"text": self.texts[k], "caption_idx": k}


class TextTable:
    """Strings packed in one byte array with their offsets, read as ``table[k]``.

    DataLoader workers are forked: reading an item of a ``list[str]`` writes its reference count, so each worker
    slowly copies every memory page that holds captions (COCO train's 566K captions: about 86 MB per worker by
    the end of an epoch). Two numpy arrays are read without writing, and stay shared.

    Examples:
        >>> t = TextTable(["a dog", "", "café"])
        >>> len(t), t[2], t[-3], t[1] == ""
        (3, 'café', 'a dog', True)
    """

    def __init__(self, texts: Sequence[str]) -> None:
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]  # any str, a lone surrogate too, round-trips
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, k: int) -> str:
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"text {k} of {n}")
        k %= n
        return self._data[self._offsets[k]:self._offsets[k + 1]].tobytes().decode("utf-8", "surrogatepass")


def _split_alias(folder: Path, split: str) -> str:
    """``split``, or the release's name for it (:data:`SPLIT_ALIASES`) where only that one is on disk."""
    alias = SPLIT_ALIASES.get(split)
    has = lambda s: (folder / f"{s}_ims.npy").exists() or (folder / f"{s}_caps.txt").exists()  # noqa: E731
    return alias if alias and not has(split) and has(alias) else split


def _refuse_swapped(root: Any, name: Any) -> None:
    """``load_precomp("f30k", "data/precomp", "dev")``, in ``load_cir``'s order (name first), read as a folder
    ``f30k`` and failed on a path made of both; said as the swap it is."""
    from cirlab.data.catalog import ITM_DATASETS, canonical_name

    if isinstance(root, str) and canonical_name(root) in ITM_DATASETS and Path(str(name)).expanduser().is_dir() \
            and not Path(root).is_dir():
        raise ConfigError(f"load_precomp(root, name, split) takes the folder first: got root={root!r}, "
                        f"name={str(name)!r}; call load_precomp({str(name)!r}, {root!r}, ...)")


def load_precomp(root: str | Path | None, name: str, split: str, *, max_captions: Any = _DEFAULT,
                 regions: int | None = 36, dim: int | None = 2048, sink: ProblemCollector | None = None
                 ) -> PrecompSplit:
    """Load ``{name}_precomp/{split}_{ims.npy,caps.txt}`` with the original loaders' semantics (module doc).

    Args:
        root: folder holding ``{name}_precomp/`` (or ``precomp/{name}_precomp/``); None = ``$CIRLAB_DATA``.
        name: "f30k" | "coco" (case and aliases folded, as in :func:`cirlab.data.catalog.canonical_name`) | any
            other precomp set present under ``root``.
        split: "train" | "dev" | "test" | "testall"; "val" reads "dev" where the set has no val split.
        max_captions: keep only the first captions (default: 5,000 for "dev", all otherwise; None = all); a cap
            that would split an image's 5 captions is refused (ConfigError naming ``dataset.options.max_captions``).
        regions, dim: expected feature shape ``[N, regions, dim]``; None accepts any size on that axis.
        sink: problem collector (default strict: raise the first problem as DataError).
    """
    from cirlab.core.paths import resolve_root

    _refuse_swapped(root, name)
    check_root(root)
    regions, dim = count_or_none(regions, "regions"), count_or_none(dim, "dim")
    if max_captions is not _DEFAULT:
        max_captions = count_or_none(max_captions, "max_captions")
    sink = sink or ProblemCollector(strict=True)
    base = resolve_root(root)
    name = set_name(base, name)
    folder = precomp_dir(base, name)
    if sink.strict:  # a loader's question; the checker says it as a problem of its own
        refuse_unfinished(folder.parent)  # the generator marks the folder holding {name}_precomp/
    split = _split_alias(folder, split)
    ims_path, caps_path = folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"
    if not folder.is_dir() and sink.strict:
        from cirlab.core.config import did_you_mean
        from cirlab.data.base import missing_root_hint
        from cirlab.data.catalog import DATASETS, ITM_DATASETS

        known = name in DATASETS
        hint = "" if known else did_you_mean(name, ITM_DATASETS)  # "f30kk" with no sets on disk to compare with
        sink.add("missing_file", folder, None, f"precomp folder not found{hint} "
                 f"({missing_root_hint(name if known else 'f30k', root)})")
    if not ims_path.exists() and not caps_path.exists() and folder.is_dir():
        # a name the caller asked for, not a file the tree lacks (the checker only loads the splits it finds)
        from cirlab.core.config import did_you_mean

        found = sorted({p.name.split("_")[0] for p in folder.glob("*_ims.npy")})
        close = did_you_mean(split, [*found, *(a for a, s in SPLIT_ALIASES.items() if s in found)])
        raise UnknownNameError(f"{ims_path}: split {split!r} not found{close}; splits here: "
                               f"{', '.join(found) or 'none'}", "split", split)
    images = open_features(ims_path, sink, regions, dim)
    if images is not None and not sink.strict:  # the checker reads every value; loading for training does not
        check_finite_features(images, ims_path, sink)
    captions = read_captions(caps_path, sink)
    if images is None or captions is None:
        return _empty(name, split, ims_path, caps_path, images, captions)
    im_div = image_divisor(len(images), len(captions))
    if im_div is None:
        n = len(images)
        sink.add("count_mismatch", caps_path, None, f"{len(captions)} captions for {n} images in {ims_path} "
                 f"(expected {CAPTIONS_PER_IMAGE * n}, i.e. {CAPTIONS_PER_IMAGE} per image, or {n})")
        return _empty(name, split, ims_path, caps_path, images, captions)
    if not captions:
        sink.warn("empty_split", caps_path, None, "no captions (an empty file): the split has no pairs")
    limit = (DEV_MAX_CAPTIONS if split == "dev" else None) if max_captions is _DEFAULT else max_captions
    if limit is not None and limit < len(captions):
        _refuse_partial_image(limit, im_div, name, split, caps_path)
        captions = captions[:limit]
    n_img = -(-len(captions) // im_div)
    sink.count("images", n_img)
    sink.count("captions", len(captions))
    sink.count("splits")
    sink.log_warnings(f"{name} {split}")
    return PrecompSplit(name, split, images[:n_img], captions, im_div, ims_path, caps_path)


def _refuse_partial_image(limit: int, im_div: int, name: str, split: str, caps_path: Path) -> None:
    """A caption cap that cuts an image's captions apart: its image would have fewer than ``im_div`` captions, and
    the ITM metrics (5 captions per image) fail at the first evaluation, after training. Refused at load instead;
    rounding would change what the user asked for without a word."""
    if limit % im_div == 0:
        return
    lower, upper = limit - limit % im_div, limit - limit % im_div + im_div
    fix = f"{lower} or {upper}" if lower else f"{upper}"
    raise ConfigError(f"dataset.options.max_captions={limit} ({name} {split}, {caps_path}): the split has {im_div} "
                      f"captions per image, so the cap must be a multiple of {im_div} to keep whole images, e.g. {fix}")


def _empty(name: str, split: str, ims_path: Path, caps_path: Path, images: Any, captions: Any) -> PrecompSplit:
    """Placeholder returned in collect mode after a problem (strict mode has raised already)."""
    return PrecompSplit(name, split, images if images is not None else np.zeros((0, 0, 0), np.float32),
                        captions or [], 1, ims_path, caps_path)


def _precomp_folders(root: Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every ``*_precomp`` folder directly under ``root`` (HREM/SCAN's layout)."""
    return [(p.name[: -len("_precomp")], p) for p in sorted(Path(root).glob("*_precomp")) if p.is_dir()]


def _is_gpo_set(folder: Path) -> bool:
    """GPO's ``{name}/precomp/`` set folder: a ``precomp`` folder that holds no ``*_precomp`` sets (the synthetic
    data's ``DIR/precomp/`` holds them, and is no set itself)."""
    return folder.name == "precomp" and folder.is_dir() and not _precomp_folders(folder)


def find_precomp(root: Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every precomp set under ``root``: ``*_precomp`` folders, GPO's ``{name}/precomp/``
    folders, or ``root`` itself when it is one of these."""
    root = Path(root)
    if root.name.endswith("_precomp"):
        return [(root.name[: -len("_precomp")], root)]
    if _is_gpo_set(root):
        return [(root.parent.name, root)]
    found = _precomp_folders(root)
    named = {name for name, _ in found}
    return found + [(p.parent.name, p) for p in sorted(root.glob("*/precomp"))
                    if _is_gpo_set(p) and p.parent.name not in named]


def scan(root: Path, sink: ProblemCollector, name: str | None = None, **kw: Any) -> None:
    """Validate every split file pair of one precomp set (``name``) or of every ``*_precomp`` folder under root."""
    root = Path(root)
    present = find_precomp(root)
    if not present and find_precomp(root / "precomp"):  # cirlab data synth's layout: DIR/precomp/
        root = root / "precomp"
        present = find_precomp(root)
    sets = [(name, precomp_dir(root, name))] if name else present
    others = [n for n, _ in present if n != name]
    if not sets or not sets[0][1].is_dir() or (name and sets[0][1] == root and others):
        found = ", ".join(n for n, _ in present)
        where = sets[0][1] if sets else root
        sink.add("missing_file", where, None,
                 (f"no {name}_precomp folder" if name else "no *_precomp folder") + f" in {root}"
                 + (f" (it holds {found})" if found else " (expected f30k_precomp/ or coco_precomp/, or GPO's "
                    "f30k/precomp/, with <split>_ims.npy and <split>_caps.txt; `cirlab data synth --out DIR` writes "
                    "DIR/precomp/)"))
        return
    for set_name, folder in sets:
        splits = sorted({p.name.rsplit("_", 1)[0] for p in (*folder.glob("*_ims.npy"), *folder.glob("*_caps.txt"))})
        if not splits:
            sink.add("missing_file", folder, None, "no <split>_ims.npy / <split>_caps.txt files in it")
        for split in splits:
            # every caption is checked unless the caller limits them (dev's default cap is for validation speed)
            load_precomp(folder.parent if folder.name.endswith("_precomp") else folder.parent.parent, set_name,
                         split, sink=sink, **{"max_captions": None, **kw})

