"""What cirlab's cache holds, how much each entry takes and when it was last used; removing unused entries.

The cache (:func:`cirlab.core.paths.cache_dir`: ``$CIRLAB_CACHE``, else ``~/.cache/cirlab``) holds only what cirlab
can make again, but it grows with every dataset size, seed, backbone and split a user tries: on real data the
feature stores and BLIP token files take several GB each. ``cirlab cache`` lists it; ``cirlab cache --unused-for
DAYS --remove`` frees what nothing read for that long.

An **entry** is one thing cirlab made again as a whole:

============================  ==========================================================================
``synthetic/<name>/``          a synthetic data set (``cirlab data synth``), one per size, seed, image size
``emoji/<name>/``              the emoji data set (``cirlab data emoji``)
``npm/<file>.tgz``             the npm package the emoji set is built from
``features/<model>/<key>/``    a per-item feature store (frozen backbones of the ``lite`` presets)
``features/<key>.pt``          the encoded gallery of one split (:func:`cirlab.core.retrieval.encode_corpus`)
``blip_rerank/<name>.npy``     the frozen ViT tokens of one split (with its ``.json``)
============================  ==========================================================================

Everything else (``jupyter/``, ``report-home/``, ``locks/``, files a user put there) is listed but never removed.
A generated data set is removed only while it holds nothing but what its generator recorded writing (the marker
``.cirlab-generated.json``), only under the lock its generator writes it under (a BLIP token file likewise), and
only while no running process reads it (the mark a run's data lookup leaves, :func:`cirlab.core.io.hold_while_reading`).
A folder entry is renamed before it is deleted, so a removal cut short leaves no half entry under its name.

*Last used* is the newest modification or access time of the entry's files. Linux mounts record reads only
roughly (``relatime``: an access time moves when it is older than the last write or a day old), so a file read
today may show yesterday, never older; on a ``noatime`` mount it is the last write. Listing reads no file of an
entry but the markers, whose times are left out.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cirlab.core.errors import CirlabError, first_few
from cirlab.data.generators import emoji, synthetic
from cirlab.data.generators._owned import MARKER, foreign

__all__ = ["CacheEntry", "CacheEntryKept", "CacheRemovalError", "cache_entries", "unused_entries", "remove_entry",
           "DAY_S"]

DAY_S = 86400.0
# the areas whose entries generators write (the folder of their default output), with their generator's name
GENERATED_AREAS = {"synthetic": ("synthetic data set", synthetic.__name__), "emoji": ("emoji data set", emoji.__name__)}
# manifests a generator writes into an output root that its marker's record of files does not list
ROOT_MANIFESTS = frozenset({synthetic.MANIFEST, emoji.MANIFEST})
_KEY = re.compile(r"[0-9a-f]{20}")  # cirlab.core.featcache.cache_key's length
_SEGMENT = re.compile(r"seg-[0-9a-f]{32}(\.npy|\.keys\.json)")
# a folder being removed is renamed to this prefix first, so that no reader finds a half-deleted entry under its
# name (an interrupted rmtree of a data set left its manifest, and the set read as complete); one a kill left is
# an entry of its own, removable
REMOVING = ".cirlab-removing-"
_AREAS = ("synthetic", "emoji", "npm", "features", "blip_rerank")  # the areas whose entries --remove may remove
_KEPT = {"jupyter": "the report kernels' spec (cirlab report writes it)",
         "report-home": "the report kernels' IPython folder",
         "locks": "locks of work that may be running"}


@dataclass
class CacheEntry:
    """One entry of the cache (module docstring): ``area/name``, its files' bytes, when it was last used, and why
    :func:`remove_entry` keeps it (None: it may be removed)."""

    area: str
    name: str
    kind: str
    paths: tuple[Path, ...]
    size: int
    last_used: float | None
    kept: str | None = None

    @property
    def label(self) -> str:
        return f"{self.area}/{self.name}" if self.area else self.name


class CacheEntryKept(CirlabError, RuntimeError):
    """An entry :func:`remove_entry` would not remove (not cirlab's whole making, or in use)."""


class CacheRemovalError(CirlabError, OSError):
    """An entry :func:`remove_entry` could not remove (permission denied: a colleague's entry in a shared cache)."""


def cache_entries(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every entry of the cache folder ``root`` (default :func:`cirlab.core.paths.cache_dir`), by area and name;
    an empty list where the folder does not exist yet."""
    from cirlab.core.paths import cache_dir

    root = Path(root) if root is not None else cache_dir()
    try:
        tops = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CacheRemovalError(f"{root}: cannot list cirlab's cache ({err.strerror or err})") from None
    entries: list[CacheEntry] = []
    for top in tops:
        entries.extend(_area_entries(top))
    return entries


def unused_entries(entries: list[CacheEntry], days: float, *, now: float | None = None) -> list[CacheEntry]:
    """The entries of the cache's areas not used for ``days`` days (0: all): what :func:`remove_entry` is asked to
    remove. Those it keeps (``kept``) are among them, so that a caller can say why they stay; the top-level folders
    listed whole (``report-home``, ``locks``, a folder of the user's) are not."""
    now = time.time() if now is None else now
    # a time ahead of this clock (a file server's, an unpacked archive's) counts as now
    return [e for e in entries if e.area and (e.last_used is None or max(0.0, now - e.last_used) >= days * DAY_S)]


def remove_entry(entry: CacheEntry) -> int:
    """Remove ``entry`` (one of :func:`cache_entries`); the bytes freed. Raises :class:`CacheEntryKept` with the
    reason for one it keeps: checked again here, as the cache may have changed since it was listed."""
    if entry.kept is not None:
        raise CacheEntryKept(f"{entry.label}: kept: {entry.kept}")
    if entry.area in GENERATED_AREAS or entry.area == "blip_rerank":
        with _writer_lock(entry):
            return _remove_fresh(entry)
    return _remove_fresh(entry)


# ---------------------------------------------------------------------------------------------------- listing
def _children(folder: Path) -> list[Path]:
    """What ``folder`` holds; nothing where it cannot be listed (a colleague's folder in a shared cache), which
    :func:`_entry` then finds and keeps."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _area_entries(top: Path) -> list[CacheEntry]:
    """The entries of one top-level item of the cache."""
    area = top.name
    if not top.is_dir() or (top.is_symlink() and area not in _AREAS):  # an area may be a link to another disk
        return [_entry("", area, "other", [top], "not a folder cirlab writes")]
    unreadable = _unlistable(top)
    if unreadable:  # its entries cannot be known: the area says so, and its bytes are not counted as nothing
        return [_entry("", area, "other", [top], unreadable)]
    if area in _KEPT:
        return [_entry("", area, "cirlab's own", [top], _KEPT[area])]
    if area in GENERATED_AREAS:
        return [_leftover(area, "", child) or _generated(top, child) for child in _children(top)
                if not _is_lock(child)]
    if area == "npm":
        return [_entry(area, c.name, "npm package", [c], None if _plain(c) and c.suffix == ".tgz"
                       else "not a package file cirlab fetched") for c in _children(top)]
    if area == "features":
        return _feature_entries(top)
    if area == "blip_rerank":
        return _token_entries(top)
    return [_entry("", area, "other", [top], "not a folder cirlab writes")]


def _unlistable(folder: Path) -> str | None:
    """Why ``folder`` cannot be listed (a colleague's folder in a shared cache), else None."""
    try:
        os.listdir(folder)
    except OSError as err:
        return f"cannot list {folder} ({err.strerror or err})"
    return None


def _feature_entries(top: Path) -> list[CacheEntry]:
    entries = []
    for child in _children(top):
        if _plain(child) and child.suffix == ".pt" and _KEY.fullmatch(child.stem):
            entries.append(_entry("features", child.name, "encoded gallery", [child], None))
        elif child.is_dir() and not child.is_symlink():  # features/<model>/: one store per key
            unreadable = _unlistable(child)
            entries.extend([_entry("features", child.name, "other", [child], unreadable)] if unreadable else
                           (_store_entry(child, store) for store in _children(child)))
        else:
            entries.append(_entry("features", child.name, "other", [child], "not a file cirlab writes"))
    return entries


def _store_entry(model: Path, store: Path) -> CacheEntry:
    name = f"{model.name}/{store.name}"
    leftover = _leftover("features", f"{model.name}/", store)
    if leftover:
        return leftover
    if not (store.is_dir() and not store.is_symlink() and _KEY.fullmatch(store.name)):
        return _entry("features", name, "other", [store], "not a feature store cirlab writes")
    stray = [c.name for c in _children(store) if not (_plain(c) and (_SEGMENT.fullmatch(c.name) or _staged(c.name)))]
    return _entry("features", name, "feature store", [store],
                  f"holds files a feature store does not write ({first_few(stray)})" if stray else None)


def _token_entries(top: Path, *, locked: bool = False) -> list[CacheEntry]:
    """``blip_rerank/``: one entry per ``<name>.npy`` / ``<name>.json`` pair; temporaries and locks of a write go
    with the file they stage."""
    groups: dict[str, list[Path]] = {}
    for child in _children(top):
        stem = child.name
        if _staged(stem) or _is_lock(child):
            continue  # a write in progress or a killed one: its writer removes what it left
        groups.setdefault(stem.rsplit(".", 1)[0] if stem.endswith((".npy", ".json")) else stem, []).append(child)
    entries = []
    for stem, paths in sorted(groups.items()):
        odd = [p.name for p in paths if not (_plain(p) and p.suffix in (".npy", ".json"))]
        entries.append(_entry("blip_rerank", stem, "BLIP ViT tokens", paths,
                              f"not a token file cirlab writes ({first_few(odd)})" if odd
                              else _busy(top / stem, writer=not locked)))
    return entries


def _leftover(area: str, prefix: str, folder: Path) -> CacheEntry | None:
    """The entry of a folder an interrupted removal left (:data:`REMOVING`), else None."""
    if folder.name.startswith(REMOVING) and folder.is_dir() and not folder.is_symlink():
        return _entry(area, prefix + folder.name, "interrupted removal", [folder], None)
    return None


def _generated(top: Path, folder: Path, *, locked: bool = False) -> CacheEntry:
    kind, generator = GENERATED_AREAS[top.name]
    if folder.is_symlink() or not folder.is_dir():
        return _entry(top.name, folder.name, "other", [folder], "not a folder cirlab writes")
    busy = _busy(folder, writer=not locked)
    if busy:
        return _entry(top.name, folder.name, kind, [folder], busy)
    if _generator(folder) != generator:
        return _entry(top.name, folder.name, kind, [folder], f"no {MARKER}: not written by cirlab")
    try:
        extra = _unrecorded(folder)
    except OSError as err:  # a folder inside it that cannot be listed: what it holds is unknown
        return _entry(top.name, folder.name, kind, [folder], f"cannot list {err.filename} ({err.strerror or err})")
    return _entry(top.name, folder.name, kind, [folder],
                  f"holds files its generator did not write ({first_few(extra)})" if extra else None)


def _generator(folder: Path) -> str | None:
    try:
        name = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _unrecorded(folder: Path) -> list[str]:
    """Paths under generated ``folder`` that its generator did not record writing: beyond a sealed marker's list
    of files; in a folder whose marker lists none (an output root), anything but manifests, marked folders and
    staged temporaries."""
    try:
        recorded = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return [folder.name]
    if isinstance(recorded, list):
        return [str(p.relative_to(folder.parent)) for p in foreign(folder)]
    extra = []
    for child in _children(folder):
        if child.is_dir() and not child.is_symlink() and _generator(child):
            extra.extend(f"{folder.name}/{p}" for p in _unrecorded(child))
        elif not (_plain(child) and (child.name in ROOT_MANIFESTS or child.name == MARKER or _staged(child.name))):
            extra.append(f"{folder.name}/{child.name}")
    return extra


def _entry(area: str, name: str, kind: str, paths: list[Path], kept: str | None) -> CacheEntry:
    size, last, unread = 0, None, []
    for info, is_marker in _file_stats(paths, unread):
        size += info.st_size
        used = info.st_mtime if is_marker else max(info.st_mtime, info.st_atime)  # listing read the markers
        last = used if last is None else max(last, used)
    if unread and kept is None:  # its size and last use are a part's, and removing it would stop half-way
        kept = f"cannot list {unread[0].filename} ({unread[0].strerror or unread[0]})"
    return CacheEntry(area, name, kind, tuple(paths), size, last, kept)


def _file_stats(paths: list[Path], unread: list[OSError] | None = None) -> Iterator[tuple[os.stat_result, bool]]:
    """``lstat`` of every plain file at or under ``paths`` (links neither followed nor counted), and whether it is
    a marker; files gone meanwhile (a write that finished) are passed over, folders one may not list go to
    ``unread``."""
    for path in paths:
        errors = unread if unread is not None else []
        walked = (os.walk(path, onerror=errors.append) if path.is_dir() and not path.is_symlink()
                  else [(str(path.parent), [], [path.name])])
        for folder, _, names in walked:
            for name in names:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield info, name == MARKER


def _plain(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _staged(name: str) -> bool:
    """A temporary name :func:`cirlab.core.io.atomic_path` stages a write under."""
    from cirlab.core.io import TMP_SUFFIX

    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _is_lock(path: Path) -> bool:
    """A writer's lock file or the readers' mark beside an entry (:func:`cirlab.core.io.hold_while_reading`)."""
    from cirlab.core.io import IN_USE_NAME, LOCK_NAME

    return path.name.startswith(".") and path.name.endswith((LOCK_NAME, IN_USE_NAME))


def _busy(target: Path, *, writer: bool = True) -> str | None:
    """Why the entry at ``target`` (a data set folder, a token file's stem) is in use now: its writer holds its lock
    (a data set being generated read as holding files of the user's; ``writer=False`` where this process holds it,
    to remove the entry), or a running process reads it; else None."""
    from cirlab.core.io import generated_lock_file, lock_holder_of, read_by_others

    if writer and lock_holder_of(generated_lock_file(target)):
        return "being written by another cirlab process now"
    if read_by_others(target):  # removed under a training, it ended the run at its next image
        return "read by a running cirlab process (a training, an evaluation, a notebook's kernel): stop it first"
    return None


# ---------------------------------------------------------------------------------------------------- removing
@contextlib.contextmanager
def _writer_lock(entry: CacheEntry) -> Iterator[None]:
    """The lock the writer of a generated data set or a token file holds (``generated_folder_lock``), taken at once
    or not at all: a write going on now is never cut."""
    from cirlab.core.io import FolderLockedError, generated_folder_lock

    target = entry.paths[0] if entry.area != "blip_rerank" else entry.paths[0].with_suffix("")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(generated_folder_lock(target, wait=0))
        except FolderLockedError:
            raise CacheEntryKept(f"{entry.label}: kept: being written by another cirlab process now") from None
        yield


def _remove_fresh(entry: CacheEntry) -> int:
    """Remove ``entry`` as a listing finds it now: the cache may have changed since it was listed (a file added to
    a data set, a data set rewritten)."""
    fresh = _relisted(entry)
    if fresh.kept is not None:
        raise CacheEntryKept(f"{entry.label}: kept: {fresh.kept}")
    freed = _remove_paths(fresh)
    if entry.area in GENERATED_AREAS:  # its readers' mark, which nobody holds (checked above)
        from cirlab.core.io import in_use_file

        with contextlib.suppress(OSError):
            in_use_file(entry.paths[0]).unlink()
    return freed


def _relisted(entry: CacheEntry) -> CacheEntry:
    """``entry`` as a listing now finds it (the cache may have changed since it was listed)."""
    path = entry.paths[0]
    if entry.kind == "interrupted removal":
        return entry
    if entry.area == "blip_rerank":  # under the writer's lock this process holds (_writer_lock)
        return next((e for e in _token_entries(path.parent, locked=True) if e.name == entry.name), entry)
    if entry.area in GENERATED_AREAS:
        return _generated(path.parent, path, locked=True)
    if entry.kind == "feature store":
        return _store_entry(path.parent, path)
    return entry


def _remove_paths(entry: CacheEntry) -> int:
    freed = 0
    for path in entry.paths:
        size = sum(info.st_size for info, _ in _file_stats([path]))
        try:
            if path.is_dir() and not path.is_symlink():
                if not path.name.startswith(REMOVING):  # renamed in one step: whole under its name, or gone
                    renamed = path.with_name(f"{REMOVING}{path.name}-{os.getpid()}")
                    os.rename(path, renamed)
                    path = renamed
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            # rmtree stops at the first file it may not delete: what went before it is gone, the entry is not whole
            raise CacheRemovalError(f"{entry.label}: could not remove {err.filename or path} "
                                    f"({err.strerror or err}); ask its owner to remove it") from None
        freed += size
    return freed
