"""The top-K file: one format shared by evaluation, re-ranking and the rank-shift notebook.

A top-K file is a NumPy ``.npz`` archive (load with ``allow_pickle=False``) holding, for Q queries:

=================  ===========  ===============================================================
key                shape/dtype  meaning
=================  ===========  ===============================================================
``query_ids``      [Q] str      query id (CIRR ``pairid``, Fashion-IQ ``{category}:{index}``, ...)
``gallery_ids``    [Q, K] str   the K best gallery item names, best first
``scores``         [Q, K] f32   their scores (higher is better)
``target_rank``    [Q] int64    1-based rank of the target in the *full* ranking; 0 = unknown
                                (no ground truth, e.g. CIRR test1); for re-ranked files a target
                                outside the candidate pool keeps a rank > K (counted as a miss);
                                a target that is its query's own reference, removed from the
                                ranking with it (Fashion-IQ), is 2**63 - 1, past every cut-off
                                (``cirlab.analysis.removed_rank()``; ``shown_rank`` prints it)
``category``       [Q] str      per-query group (Fashion-IQ category, CIRR "cirr", ...), may be ""
``target_ids``     [Q] str      target name ("" when unknown)
``meta``           [] str       JSON: model, dataset, split, stage, protocol, k (a run's file also
                                category, config_model and run)
=================  ===========  ===============================================================
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.core.errors import InputError, MissingPathError, refuse_entries
from cirlab.core.io import atomic_path


@dataclass
class TopK:
    """A top-K file in memory, one row per query (the format's table: ``help(cirlab.core.topk)``): ``query_ids``
    [Q], ``gallery_ids`` and ``scores`` [Q, K] best first, ``target_rank`` [Q] (1-based in the full ranking, 0
    unknown, 2**63 - 1 for a target removed with its reference), optional ``category`` and ``target_ids`` [Q], and
    ``meta``. Read one with :func:`load_topk`, write with :func:`save_topk`; ``to_frame()`` gives a DataFrame."""

    query_ids: np.ndarray
    gallery_ids: np.ndarray
    scores: np.ndarray
    target_rank: np.ndarray
    category: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.query_ids = _column(self.query_ids, "query_ids")
        q = len(self.query_ids)
        self.gallery_ids = _rows(np.asarray(self.gallery_ids).astype(str), q, "gallery_ids")
        self.scores = _rows(np.asarray(self.scores, dtype=np.float32), q, "scores")
        self.target_rank = _target_rank(self.target_rank, q)
        self.category = _column(self.category if self.category is not None else [""] * q, "category", q)
        self.target_ids = _column(self.target_ids if self.target_ids is not None else [""] * q, "target_ids", q)
        if self.gallery_ids.shape != self.scores.shape:
            raise InputError(f"gallery_ids {self.gallery_ids.shape} and scores {self.scores.shape} differ")

    @property
    def k(self) -> int:
        return int(self.gallery_ids.shape[1])

    def __len__(self) -> int:
        return len(self.query_ids)

    def to_frame(self) -> Any:
        """One row per query: query_id, category, target_id, target_rank, top1 id."""
        import pandas as pd

        return pd.DataFrame({"query_id": self.query_ids, "category": self.category, "target_id": self.target_ids,
                             "target_rank": self.target_rank,
                             "top1": self.gallery_ids[:, 0] if self.k else [""] * len(self)})


def _column(values: Any, name: str, q: int | None = None) -> np.ndarray:
    """A per-query string column [Q]: one string here was a 0-d array (``len() of unsized object`` later on)."""
    a = np.asarray(values).astype(str)
    if a.ndim != 1 or (q is not None and len(a) != q):
        want = "be a 1-D list" if q is None else f"have {q} entries (one per query)"
        raise InputError(f"TopK: {name} must {want}, got shape {a.shape} ({type(values).__name__})")
    return a


def _rows(a: np.ndarray, q: int, name: str) -> np.ndarray:
    """A [Q, K] field; a flat [Q * K] one is reshaped as before, but a 2-D one must already have Q rows."""
    if a.ndim == 2 and a.shape[0] == q:
        return a
    if a.ndim != 2 and q > 0 and a.size % q == 0:
        return a.reshape(q, -1)
    raise InputError(f"TopK: {name} has shape {a.shape}, expected [{q} queries, K]")


def _target_rank(values: Any, q: int) -> np.ndarray:
    """[Q] int64 ranks, 0 = unknown: ``astype(int64)`` would truncate 1.7 to 1 and a NaN to a huge negative rank."""
    a = np.asarray(values)
    if a.size != q:
        raise InputError(f"TopK: target_rank has shape {a.shape}, expected [{q}] (one rank per query)")
    a = a.reshape(q)
    if a.dtype.kind not in "iuf":
        raise InputError(f"TopK: target_rank must hold whole numbers, got dtype {a.dtype}")
    bad = ~(a >= 0)  # NaN fails too
    if a.dtype.kind == "f":
        bad |= ~np.isfinite(a) | (a != np.floor(a))
    refuse_entries(bad, a, "TopK: target_rank must hold whole ranks >= 0 (0 = unknown)")
    return a.astype(np.int64)


def save_topk(path: str | os.PathLike, topk: TopK) -> Path:
    """Write atomically (temp file + rename) so a reader never sees a partial file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez would append ".npz" to a name
        np.savez_compressed(fh, query_ids=topk.query_ids, gallery_ids=topk.gallery_ids, scores=topk.scores,
                            target_rank=topk.target_rank, category=topk.category, target_ids=topk.target_ids,
                            meta=np.array(json.dumps(topk.meta, sort_keys=True, default=str)))
    return path


_REQUIRED = ("query_ids", "gallery_ids", "scores", "target_rank")
_FIELDS = (*_REQUIRED, "category", "target_ids", "meta")  # every member load_topk reads

# the dtype kinds save_topk writes each member with; np.load of any other kind is followed by a conversion in TopK
# that can multiply it (an int8 id becomes a 16-byte string), so other kinds are refused from the header
_KINDS = {"query_ids": ("US", "a string dtype"), "gallery_ids": ("US", "a string dtype"),
          "scores": ("f", "a float dtype"), "target_rank": ("iu", "an integer dtype"),
          "category": ("US", "a string dtype"), "target_ids": ("US", "a string dtype"),
          "meta": ("US", "a JSON string")}

# A file whose arrays would take more than _MAX_PLAIN_BYTES of memory once loaded (see _loaded_bytes), and more than
# _MAX_RATIO times the file's own size, is refused before any array is read. The floor only keeps small files clear
# of the ratio; above it the ratio alone bounds what a file may cost. Real top-K files take 15 to 260 times their
# size by that estimate (which counts each array twice; names stored as 4-byte characters compress well, the
# longer the better, the scores hardly at all), while zeros inflate about 2000 times (a 1.5 MB file declared 1.6 GB)
_MAX_PLAIN_BYTES = 16 * 2 ** 20
_MAX_RATIO = 1000  # real files: up to about 260x (one long name pads every id to its length), zeros about 2000x


def load_topk(path: str | os.PathLike) -> TopK:
    """Read a top-K file, naming the file and the missing key when it is not one.

    Every array's header (shape, dtype) is read and checked first, so a file declaring arrays that do not fit each
    other, or far more data than it could hold, is refused before any of it is decompressed."""
    import zipfile

    path = Path(path)
    if path.is_dir():  # a run's topk/ folder: several files, one per split and category
        raise InputError(f"{path} is a folder, not a top-K file: name one of its .topk.npz files, or read them "
                         "together with cirlab.workbench.load_topk_files")
    if not path.is_file():
        raise MissingPathError(f"top-K file not found: {path}")
    if not zipfile.is_zipfile(path):  # numpy took any other file for a pickle and spoke of allow_pickle
        raise InputError(f"{path}: not a top-K file (cirlab writes them as .topk.npz archives)")
    _check_declared(path, _declared_arrays(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED if k not in z.files]
            if missing:
                raise InputError(f"{path}: not a cirlab top-K file (missing {missing})")
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            return TopK(z["query_ids"], z["gallery_ids"], z["scores"], z["target_rank"],
                        z["category"] if "category" in z.files else None,
                        z["target_ids"] if "target_ids" in z.files else None, meta)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise InputError(f"{path}: cannot read top-K file ({err})") from err


def _declared_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``field -> (shape, dtype)`` from the .npy headers of the archive's members, without reading their data."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            found = {}
            for field_name in _FIELDS:
                member = _member_name(field_name, names)
                if member is not None:
                    found[field_name] = _npy_header(archive, member, path)
            return found
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise InputError(f"{path}: cannot read top-K file ({err})") from err


def _member_name(field_name: str, names: set[str]) -> str | None:
    """The archive member ``np.load`` reads for ``field_name`` (the bare name first, as NpzFile looks it up)."""
    for member in (field_name, f"{field_name}.npy"):
        if member in names:
            return member
    return None


def _npy_header(archive: Any, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from one member's .npy header; only its first bytes are decompressed."""
    fmt = np.lib.format
    with archive.open(member) as fh:
        try:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:  # 3.0 only differs for structured dtypes with non-Latin-1 field names, never a top-K field
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as err:
            raise InputError(f"{path}: {member} is not a NumPy array a top-K file holds ({err})") from err
    return tuple(int(n) for n in shape), dtype


def _check_declared(path: Path, declared: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Refuse declared shapes that cannot make a top-K (the checks :class:`TopK` makes on the loaded arrays), and
    an archive declaring far more data than its size explains, before anything is decompressed."""
    import math

    _check_dtypes(path, declared)
    if "query_ids" not in declared:
        return  # the missing keys are named by load_topk
    shapes = {key: shape for key, (shape, _) in declared.items()}
    size = {key: math.prod(shape) for key, shape in shapes.items()}
    if len(shapes["query_ids"]) != 1:
        raise InputError(f"{path}: query_ids declares shape {shapes['query_ids']}, expected [Q] (one id per query)")
    q = shapes["query_ids"][0]
    for key in ("target_rank", "category", "target_ids"):
        if key in shapes and (size[key] != q or key != "target_rank" and len(shapes[key]) != 1):
            raise InputError(f"{path}: {key} declares shape {shapes[key]}, but query_ids declares {q} queries")
    for key in ("gallery_ids", "scores"):
        if key in shapes and not _fits_rows(shapes[key], q):
            raise InputError(f"{path}: {key} declares shape {shapes[key]}, expected [{q} queries, K]")
    if "gallery_ids" in size and "scores" in size and size["gallery_ids"] != size["scores"]:
        raise InputError(f"{path}: gallery_ids declares shape {shapes['gallery_ids']} and scores "
                         f"{shapes['scores']}: they differ")
    if "meta" in size and size["meta"] != 1:
        raise InputError(f"{path}: meta declares shape {shapes['meta']}, expected one JSON string")
    _check_inflation(path, _loaded_bytes(declared, q))


def _fits_rows(shape: tuple[int, ...], q: int) -> bool:
    """Whether a [Q, K] field of this shape loads (``_rows``: Q rows, or a flat Q * K)."""
    import math

    if len(shape) == 2:
        return shape[0] == q
    return q > 0 and math.prod(shape) % q == 0


def _check_dtypes(path: Path, declared: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Refuse a member whose dtype save_topk never writes (see :data:`_KINDS`), naming it and its dtype."""
    for key, (_, dtype) in declared.items():
        kinds, want = _KINDS[key]
        if dtype.kind not in kinds:  # a structured or sub-array dtype is kind "V": refused too
            raise InputError(f"{path}: {key} declares dtype {dtype}, expected {want} (as cirlab writes top-K files)")


def _loaded_bytes(declared: dict[str, tuple[tuple[int, ...], np.dtype]], q: int) -> int:
    """What loading the archive takes at its peak: load_topk hands every array np.load read to TopK at once, and
    TopK converts them into copies (strings to str, ranks to int64), so both are counted (float32 scores, which
    are not copied, are counted twice: a small overestimate); a missing category or target_ids becomes a Python
    list of ``q`` pointers and then a 1-character str array."""
    import math

    total = 0
    for shape, dtype in declared.values():
        total += math.prod(shape) * (dtype.itemsize + _converted_itemsize(dtype))
    for key in ("category", "target_ids"):
        if key not in declared:
            total += q * (8 + 4)
    return total


def _converted_itemsize(dtype: np.dtype) -> int:
    """Bytes per element after TopK's conversion of an array of a dtype :func:`_check_dtypes` lets through."""
    if dtype.kind == "S":  # bytes to str: 4 bytes (UCS-4) per character
        return 4 * max(dtype.itemsize, 1)
    if dtype.kind == "U":  # astype(str) copies; an empty <U0 becomes <U1
        return max(dtype.itemsize, 4)
    if dtype.kind == "f":
        return 4  # float32
    return 8  # int64 ranks


def _check_inflation(path: Path, loaded_bytes: int) -> None:
    """Refuse an archive whose arrays would take far more memory than its size explains (a zip bomb)."""
    on_disk = max(path.stat().st_size, 1)
    if loaded_bytes > _MAX_PLAIN_BYTES and loaded_bytes > _MAX_RATIO * on_disk:
        raise InputError(f"{path}: loading its arrays would take {loaded_bytes / 2 ** 20:.0f} MiB, "
                         f"{loaded_bytes / on_disk:.0f} times the file's {on_disk / 2 ** 20:.1f} MiB; top-K files that "
                         "cirlab writes inflate far less: refused unread (a zip bomb?)")
