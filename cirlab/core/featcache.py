"""Feature caches: keys and digests, whole-corpus tensor files, and a memory-mapped per-item store.

Two caches share this module:

* **Corpus files** (:func:`load_tensor` / :func:`save_tensor`): one tensor per key, e.g. the gallery features of
  :func:`cirlab.core.retrieval.encode_corpus` or the re-ranker's frozen stage-I tokens, written atomically.
* **Per-item store** (:class:`FeatureStore`): features of single inputs (one image), found by a digest of the
  input's bytes, for frozen backbones that see the same images every epoch (AMC ``lite``). The store lives in a
  folder named by :func:`cache_key` of everything else the features depend on (the weights' digest, the network,
  the input size); because the item key is the content of the *transformed* input, a changed image file or a
  changed transform gives a new digest, and changed weights give a new folder. Rows are appended in segment files
  (``.npy``, memory-mapped when read back, one per flush and writer, so several processes can share a folder);
  a segment counts only once its key list, written last, is complete. Before it writes, a flush picks up the
  segments other processes committed meanwhile and leaves out the rows they hold, so parallel jobs on a cold
  cache store each item about once; what a killed writer left is removed at a later open, an hour on.

Keys are hashes, never paths: moving a dataset keeps its cache valid, and editing an image invalidates it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from cirlab.core.errors import ModelContractError

log = logging.getLogger(__name__)

__all__ = ["cache_key", "file_digest", "state_dict_digest", "tensor_digest", "default_dir", "load_tensor",
           "save_tensor", "FeatureStore", "open_store"]


# ---------------------------------------------------------------------------------------------------- keys
def cache_key(*parts: Any) -> str:
    """A short stable hash of the parts (checkpoint digest, dataset, split, size, encoder name, ...).

    Examples:
        >>> key = cache_key("ckpt-1a2b", "cirr", "val", 2297, "encode_target")
        >>> len(key), key == cache_key("ckpt-1a2b", "cirr", "val", 2297, "encode_target")
        (20, True)
        >>> cache_key("ckpt-1a2b", "cirr", "val", 2297, "encode_query") == cache_key("ckpt-1a2b", "cirr", "val", 2297)
        False
    """
    blob = json.dumps([str(p) for p in parts], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: str | os.PathLike, *, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (e.g. a checkpoint), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_digest(module_or_state: Any) -> str:
    """SHA-256 over a model's parameter and buffer names and bytes (for models not loaded from a file), and over
    the extra state a module keeps beside them (``get_extra_state``: AMC's vocabulary, a dict of lists)."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        _digest_value(h, key, state[key])
    return h.hexdigest()


# values whose repr is their whole content, the same in every process
_REPR_TYPES = (str, int, float, bool, type(None))


def _digest_value(h: Any, key: str, value: Any) -> None:
    """Feed one state entry to ``h``: a tensor or numpy array by dtype, shape and bytes; a mapping or sequence
    entry by entry; a set by its items' digests, sorted; bytes as they are; a word, number, bool or None by its
    repr; anything else by its pickle (protocol 4). A repr is not an identity for the rest: numpy elides arrays of
    over 1000 elements ("..."), so two tables collided; a set prints in hash order, which changes per process."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"{key}:dict:{len(value)}".encode())
        for k in sorted(value, key=str):
            _digest_value(h, f"{key}.{k}", value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{key}:{type(value).__name__}:{len(value)}".encode())
        for i, v in enumerate(value):
            _digest_value(h, f"{key}[{i}]", v)
    elif isinstance(value, _REPR_TYPES):
        h.update(f"{key}={value!r}".encode())
    else:
        _digest_other(h, key, value)


def _digest_other(h: Any, key: str, value: Any) -> None:
    """:func:`_digest_value` for arrays, sets, bytes and any other picklable value."""
    if isinstance(value, (np.ndarray, np.generic)):
        _digest_array(h, key, np.asarray(value))
    elif isinstance(value, (set, frozenset)):
        h.update(f"{key}:{type(value).__name__}:{len(value)}".encode())
        for item in sorted(_item_digest(v) for v in value):  # hash order differs between processes
            h.update(item.encode())
    elif isinstance(value, (bytes, bytearray)):
        h.update(f"{key}:{type(value).__name__}:{len(value)}:".encode())
        h.update(bytes(value))
    else:
        h.update(f"{key}:pickle:{type(value).__qualname__}:".encode())
        h.update(_pickled(key, value))


def _digest_array(h: Any, key: str, array: np.ndarray) -> None:
    """An array by dtype, shape and bytes; one of Python objects (whose bytes are addresses) item by item."""
    h.update(f"{key}:ndarray:{array.dtype.str}:{array.shape}".encode())
    if array.dtype.hasobject:
        _digest_value(h, f"{key}.items", array.reshape(-1).tolist())
    else:
        h.update(np.ascontiguousarray(array).tobytes())


def _item_digest(value: Any) -> str:
    """The digest of one set item on its own: sorting these orders a set the same way in every process."""
    h = hashlib.sha256()
    _digest_value(h, "", value)
    return h.hexdigest()


def _pickled(key: str, value: Any) -> bytes:
    """``value``'s pickle (protocol 4, readable by every Python cirlab supports); a value that does not pickle
    cannot be told from another one, so it is refused rather than digested by something partial."""
    import pickle

    try:
        return pickle.dumps(value, protocol=4)
    except Exception as err:  # pickling raises PicklingError, TypeError or AttributeError, depending on the value
        raise ModelContractError(f"cannot digest the extra state {key!r}: a {type(value).__qualname__} is none of "
                                 "tensor, numpy array, dict, list, tuple, set, bytes, str, number, bool or None, and "
                                 f"it does not pickle ({err}); make get_extra_state return one of those") from None


DIGEST_SCHEME = "sha256-128"  # of tensor_digest; part of a store's folder key, so entries of another scheme (a
# BLAKE2b store of earlier cirlab versions), which can never be hit, are not loaded on every open


def tensor_digest(t: Tensor) -> str:
    """SHA-256 (first 128 bits) of a tensor's dtype, shape and bytes: the identity of one input (a transformed
    image). SHA-256, not BLAKE2b: on CPUs with SHA instructions the whole call is about 1.9x faster
    (``bench/feature_digest.py``), and a warm AMC ``lite`` run hashes every image of every step. A store of the
    earlier digest is not opened (:data:`DIGEST_SCHEME` is part of its folder key): its items are recomputed once."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def default_dir() -> Path:
    """``cirlab.core.paths.cache_dir() / "features"`` (``$CIRLAB_CACHE``)."""
    from cirlab.core.paths import cache_dir

    return cache_dir() / "features"


# ---------------------------------------------------------------------------------------------------- corpus files
def load_tensor(path: Path, key: str) -> Tensor | None:
    """The tensor saved under ``key`` at ``path``; None (with a warning) when unreadable or another key's."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: recompute rather than fail
        log.warning("feature cache %s is unreadable (%s); recomputing", path, err)
        return None
    if not isinstance(blob, dict) or blob.get("cache_key") != key or not isinstance(blob.get("features"), Tensor):
        log.warning("feature cache %s does not hold key %s; recomputing", path, key)
        return None
    return blob["features"]


def save_tensor(path: Path, key: str, features: Tensor) -> None:
    """Write ``features`` under ``key`` atomically: a reader sees the old file or the complete new one."""
    _atomic_write(path, lambda f: torch.save({"cache_key": key, "features": features}, f))


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Through :func:`cirlab.core.io.atomic_path`, so the file gets the user's umask like every file cirlab writes
    (``mkstemp``'s 0600 made a group-shared ``CIRLAB_CACHE`` unreadable to the other members, who recomputed and
    replaced each other's entries on every run)."""
    from cirlab.core.io import atomic_path

    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as f:
        write(f)


# ---------------------------------------------------------------------------------------------------- per-item store
MAX_MAPPED = 64  # segments a FeatureStore keeps memory-mapped at once (each map holds a file descriptor)
# age (by mtime) past which a staged file or a segment without its key file is taken as a killed writer's: a live
# writer stages, renames and commits its pair within seconds
STALE_WRITE_S = 3600.0


def _bytes_in(paths: Iterable[Path]) -> int:
    """The bytes the files among ``paths`` take (one removed meanwhile by another process counts nothing)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def _keys_file(data_file: Path) -> Path:
    """The key file that commits the segment ``data_file`` (``seg-X.npy`` -> ``seg-X.keys.json``)."""
    return data_file.with_name(data_file.name[:-len(".npy")] + ".keys.json")


def _data_file(keys_file: Path) -> Path:
    """The segment data ``keys_file`` commits (``seg-X.keys.json`` -> ``seg-X.npy``)."""
    return keys_file.with_name(keys_file.name[:-len(".keys.json")] + ".npy")


def _read_segment(directory: Path, keys_file: Path) -> tuple[Path, list[str]] | None:
    """The segment ``keys_file`` commits and its keys; None (with a warning) where it cannot be used."""
    data_file = _data_file(keys_file)
    try:
        keys = json.loads(keys_file.read_text(encoding="utf-8"))
        rows = len(np.load(data_file, mmap_mode="r"))  # the map is dropped at once: its fd closes
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty .npy a power cut left (no fsync)
        log.warning("feature store %s: skipping unreadable segment %s (%s)", directory, data_file, err)
        return None
    if len(keys) != rows:
        log.warning("feature store %s: segment %s is incomplete; skipped", directory, data_file)
        return None
    return data_file, keys


def _new_segments(directory: Path, seen: set[str]) -> list[tuple[Path, list[str]]]:
    """The segments committed in ``directory`` whose key files are not in ``seen``, which gets their names (an
    unreadable one too: it is said once, not at every flush). Only key files are listed: a segment's key file is
    written after its data, so a segment still being written is never read."""
    found = []
    for keys_file in sorted(directory.glob("seg-*.keys.json")):
        if keys_file.name in seen:
            continue
        seen.add(keys_file.name)
        segment = _read_segment(directory, keys_file)
        if segment is not None:
            found.append(segment)
    return found


def _drop_stored(directory: Path, pending: dict[str, np.ndarray], seen: set[str]) -> list[tuple[Path, list[str]]]:
    """Pick up the segments other processes committed since ``seen`` was filled and drop the ``pending`` rows they
    hold: the jobs of a sweep started together on a cold cache compute the same items, and each wrote its own copy
    of all of them. Returns the segments picked up. (A pending row was missing from every segment known when it was
    computed, so only these new ones can hold it.)"""
    found = _new_segments(directory, seen)
    before = len(pending)
    for _, keys in found:
        for k in keys:
            pending.pop(k, None)
    if len(pending) < before:
        log.debug("feature store %s: %d new rows were stored by another process meanwhile; not written again",
                  directory, before - len(pending))
    return found


def _killed_writes(directory: Path) -> list[Path]:
    """Staged segment files (``.seg-*.tmp``) and segments without their key file in ``directory``: what a writer
    killed mid-segment leaves, or a live writer's files (the caller tells them apart by age); and key files whose
    segment is gone (removed by hand, or by an earlier cleanup), which warn at every open."""
    try:
        names = set(os.listdir(directory))
    except OSError:  # no store yet, or one this user may not list
        return []
    staged = {n for n in names if n.startswith(".seg-") and n.endswith(".tmp")}
    uncommitted = {n for n in names if n.startswith("seg-") and n.endswith(".npy")
                   and _keys_file(Path(n)).name not in names}
    orphaned = {n for n in names if n.startswith("seg-") and n.endswith(".keys.json")
                and _data_file(Path(n)).name not in names}
    return [directory / n for n in sorted(staged | uncommitted | orphaned)]


def _remove_if_abandoned(path: Path, now: float) -> int | None:
    """Remove ``path`` if older than :data:`STALE_WRITE_S`; its size, or None where it stays. A file dated in the
    future (a file server whose clock is ahead) stays: its age is unknown, and it may be a live writer's."""
    try:
        stat = path.stat()
        age = now - stat.st_mtime
        if age < STALE_WRITE_S:  # also every negative age (a future mtime)
            return None
        if path.suffix == ".npy" and _keys_file(path).exists():  # committed since it was listed
            return None
        path.unlink()
    except OSError as err:  # gone meanwhile (another opener removed it) or not ours to remove: leave it quietly
        log.debug("feature store: leaving %s (%s)", path, err)
        return None
    return stat.st_size


def _folder_now(directory: Path) -> float | None:
    """The time by the clock that dates ``directory``'s files: a file server's clock behind this machine's made a
    live writer's segment look an hour old (and removed). The mtime of a file made there now; None where none can
    be made (a store this user may not write, whose files it could not remove either)."""
    probe = directory / f".clock-{uuid.uuid4().hex}"
    try:
        probe.touch()
        try:
            return probe.stat().st_mtime
        finally:
            os.unlink(probe)
    except OSError:
        return None


def _remove_killed_writes(directory: Path) -> None:
    """Remove the staged files and uncommitted segments that writers killed mid-write left in ``directory`` (an
    exit-time flush cut by a SLURM time limit's SIGKILL): nothing else ever reads or removes them."""
    leftovers = _killed_writes(directory)
    now = _folder_now(directory) if leftovers else None
    if now is None:
        return
    removed = [(path, size) for path in leftovers if (size := _remove_if_abandoned(path, now)) is not None]
    if removed:
        log.info("feature store %s: removed %d files of killed writes (%d bytes): %s", directory, len(removed),
                 sum(size for _, size in removed), ", ".join(path.name for path, _ in removed))


class FeatureStore:
    """Features of single inputs, keyed by the digest of each input's bytes, memory-mapped on disk.

    Args:
        directory: the store's folder (one per key: build it as ``root / cache_key(weights digest, ...)``);
            ``None`` keeps everything in memory.
        flush_rows: new rows kept in memory before they are written as one segment (also written on
            :meth:`flush`, when the store is garbage-collected and at interpreter exit).

    Examples:
        >>> store = FeatureStore(None)
        >>> x = torch.arange(6.0).view(3, 2)
        >>> calls = []
        >>> f = lambda t: calls.append(len(t)) or t * 10
        >>> store.get_or_compute(x, f).tolist(), store.get_or_compute(x[[2, 0]], f).tolist(), calls
        ([[0.0, 10.0], [20.0, 30.0], [40.0, 50.0]], [[40.0, 50.0], [0.0, 10.0]], [3])
    """

    def __init__(self, directory: str | os.PathLike | None, *, flush_rows: int = 256) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.flush_rows = flush_rows
        self._rows: dict[str, tuple[int, int]] = {}  # digest -> (segment, row)
        self._segments: list[Path] = []  # segment files, mapped on demand (:meth:`_segment`)
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()  # the open maps, least recently used first
        self._pending: dict[str, np.ndarray] = {}  # rows not written yet (all of them for an in-memory store)
        # shared with the exit-time flush, which must not hold the store: set once a write is refused, so that a
        # read-only store says so once (not once per flush, ~300 times an epoch on Fashion-IQ) and is not tried again
        self._unwritable: dict[str, str] = {}
        self._checked = False  # whether the folder was looked at for writing (at the first new row)
        # names of the key files already read (this store's own too), shared with the exit-time flush: a flush
        # reads only the segments committed since
        self._seen: set[str] = set()
        self.hits = self.misses = 0
        if self.directory is not None:
            self._open()
            weakref.finalize(self, FeatureStore._flush_at_exit, self.directory, self._pending, self._unwritable,
                             self._seen)

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending)

    def _open(self) -> None:
        _remove_killed_writes(self.directory)
        for data_file, keys in _new_segments(self.directory, self._seen):
            self._add_segment(data_file, keys)
        if self._rows:  # its size too: nothing prunes the cache, and real data fills gigabytes
            log.info("feature store %s: %d cached items, %.1f MB", self.directory, len(self._rows),
                     _bytes_in(self.directory.glob("seg-*")) / 1e6)

    def _get(self, digest: str) -> np.ndarray | None:
        loc = self._rows.get(digest)
        if loc is not None:
            rows = self._segment(loc[0])
            if rows is not None:
                return rows[loc[1]]
        return self._pending.get(digest)

    def _add_segment(self, data_file: Path, keys: list[str]) -> None:
        seg = len(self._segments)
        self._segments.append(data_file)
        for i, k in enumerate(keys):
            self._rows.setdefault(k, (seg, i))

    def _segment(self, seg: int) -> np.ndarray | None:
        """Segment ``seg`` memory-mapped, None when its file became unreadable (its rows are then recomputed).

        At most :data:`MAX_MAPPED` maps stay open: each holds a file descriptor, and a store of paper-size data
        has hundreds of segments (Fashion-IQ's 77K images: 300), past the usual limit of 1024 open files with the
        DataLoader's own. A map dropped from the table closes once no row read from it is alive."""
        if seg in self._mapped:
            self._mapped.move_to_end(seg)
            return self._mapped[seg]
        try:
            rows = np.load(self._segments[seg], mmap_mode="r")
        except (OSError, ValueError) as err:  # removed or replaced since the store was opened
            log.warning("feature store %s: segment %s became unreadable (%s); its items are recomputed",
                        self.directory, self._segments[seg], err)
            self._rows = {k: loc for k, loc in self._rows.items() if loc[0] != seg}  # stored again when recomputed
            return None
        self._mapped[seg] = rows
        while len(self._mapped) > MAX_MAPPED:
            self._mapped.popitem(last=False)
        return rows

    def get_or_compute(self, inputs: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(inputs)`` row by row, with every row found in the store taken from it instead; ``compute``
        runs once, on the missing rows only, and must treat rows independently."""
        digests = [tensor_digest(x) for x in inputs]
        found = [self._get(d) for d in digests]
        missing = [i for i, row in enumerate(found) if row is None]
        self.hits += len(inputs) - len(missing)
        self.misses += len(missing)
        if missing:
            new = compute(inputs[missing]).detach().float().cpu()
            for j, i in enumerate(missing):
                row = new[j].numpy().copy()
                found[i] = row
                if self._get(digests[i]) is None:  # a batch may hold the same input twice
                    self._pending[digests[i]] = row
            self._check_writable()
            if len(self._pending) >= self.flush_rows:
                self.flush()
        return torch.from_numpy(np.stack(found)).to(inputs.device)

    def _check_writable(self) -> None:
        """At the first new row (a full read-only store has none and stays silent): a store that cannot be written
        is said now, while the run's logging is set up, rather than at the first flush (at exit for a small set)."""
        if self.directory is None or self._checked:
            return
        self._checked = True
        from cirlab.core.io import unwritable_entry

        found = unwritable_entry(self.directory)
        if found is not None:  # the store itself is said without its name: the line names it already
            entry, reason = found
            store_itself = entry == self.directory.absolute() and reason == "is not writable"
            why = "read-only for this user" if store_itself else f"{entry} {reason}"
            FeatureStore._refused(self.directory, why, self._unwritable)

    def flush(self) -> None:
        """Write the pending rows as one segment (nothing for an in-memory store), less the rows other processes
        stored since this store last looked; their segments are read from now on."""
        if self.directory is None or not self._pending:
            return
        for data_file, keys in _drop_stored(self.directory, self._pending, self._seen):
            self._add_segment(data_file, keys)
        for keys, written in FeatureStore._write_segment(self.directory, self._pending, self._unwritable):
            self._add_segment(written, keys)
            self._seen.add(_keys_file(written).name)  # not picked up again as another process's
        self._pending.clear()

    @staticmethod
    def _flush_at_exit(directory: Path, pending: dict[str, np.ndarray], unwritable: dict[str, str],
                       seen: set[str]) -> None:
        """:meth:`flush` for the exit-time finalizer, which must not hold the store: for a set smaller than
        ``flush_rows`` it writes every row, so it leaves out the rows other processes stored too."""
        if not pending or unwritable:
            return
        _drop_stored(directory, pending, seen)
        FeatureStore._write_segment(directory, pending, unwritable)

    @staticmethod
    def _refused(directory: Path, why: str, unwritable: dict[str, str]) -> None:
        """Mark the store unwritable and say so, once: its new rows are dropped at each flush (kept, they would
        fill memory on a real dataset), so they are computed again each epoch."""
        if unwritable:
            return
        unwritable["why"] = why
        # in the cache: CIRLAB_CACHE moves it; elsewhere the model config named the folder
        from cirlab.core.io import unwritable_advice

        advice = unwritable_advice(directory, "point the model's feature_cache_dir at a folder you can write")
        log.warning("feature store %s is not writable (%s): features are computed again each epoch; %s to keep them",
                    directory, why, advice)

    @staticmethod
    def _write_segment(directory: Path, pending: dict[str, np.ndarray],
                       unwritable: dict[str, str]) -> list[tuple[list[str], Path]]:
        """One segment per row shape (inputs of another size give features of another size); nothing once a
        write was refused (``unwritable``)."""
        if unwritable:
            return []
        groups: dict[tuple, list[str]] = {}
        for k, row in pending.items():
            groups.setdefault((row.shape, row.dtype.str), []).append(k)
        written = []
        for keys in groups.values():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                stem = directory / f"seg-{uuid.uuid4().hex}"
                data = np.stack([pending[k] for k in keys])
                _atomic_write(stem.with_suffix(".npy"), lambda f: np.save(f, data))
                blob = json.dumps(keys).encode()
                _atomic_write(Path(f"{stem}.keys.json"), lambda f: f.write(blob))  # commits it
            except OSError as err:  # a full or read-only disk: the cache is an optimisation, never an error
                FeatureStore._refused(directory, err.strerror or str(err), unwritable)
                break
            written.append((keys, stem.with_suffix(".npy")))
        return written


_STORES: dict[str, FeatureStore] = {}


def open_store(directory: str | os.PathLike) -> FeatureStore:
    """The process's one :class:`FeatureStore` for ``directory`` (models and their copies share it), until
    :func:`release_stores`."""
    key = str(Path(directory).resolve())
    if key not in _STORES:
        _STORES[key] = FeatureStore(key)
    return _STORES[key]


def release_stores() -> None:
    """Write every open store's pending rows and let the stores go, their maps and file descriptors with them (a
    run's end: the next run opens them again). Held for the process's life, a notebook kernel kept the segments
    mapped after its runs were gone, so deleting the cache freed no disk and the next run read the deleted
    files; and rows short of a segment reached the disk only when the kernel exited."""
    while _STORES:
        _, store = _STORES.popitem()
        store.flush()
        store._mapped.clear()
