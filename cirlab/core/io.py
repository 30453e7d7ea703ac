"""Atomic file writing: the one way cirlab writes a file that a reader, a resume or a crash may see.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in the destination
folder (created with the permissions a plain ``open(path, "w")`` gives: the user's umask, not ``mkstemp``'s 0600),
flushed to disk, then renamed over the destination. A reader sees the old file or the complete new one, a
crash or a full disk leaves the old file in place, and no temporary file outlives a failed write.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from cirlab.core.errors import CirlabError

# errno values of a disk that takes no more (full, over quota, read-only): said as one line, nothing is lost;
# the first two may pass (space freed by others): the same command may succeed when tried again later
SPACE_RAN_OUT = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
NO_SPACE = SPACE_RAN_OUT | frozenset(getattr(errno, name) for name in ("EROFS",) if hasattr(errno, name))

TMP_SUFFIX = ".tmp"


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# A staged file's name: "." + the target's name, cut to fit + "." + 12 hex digits + ".tmp". The cut keeps it within
# the file system's name limit, so any name that can be written can be staged (the whole name plus mkstemp's or a
# uuid's tail did not fit where the target's name was close to 255 bytes).
_STAGE_TAIL = 1 + 12 + len(TMP_SUFFIX)


def _create_staged(path: Path) -> tuple[int, Path]:
    """An open descriptor and the path of a new, empty file next to ``path`` (see :func:`stale_temporaries`). Mode
    0o666 through ``os.open``: the kernel applies the umask, as for ``open(path, "w")``. (Reading the umask to chmod
    a ``mkstemp`` file means setting it for a moment: a file another thread created then got the wrong mode.)"""
    import uuid

    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf; NTFS takes 255 characters
        limit = 255
    stem = os.fsencode(path.name)[:max(1, limit - 1 - _STAGE_TAIL)].decode(errors="ignore") or "x"
    while True:
        staged = path.with_name(f".{stem}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            return os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), staged
        except FileExistsError:  # 48 random bits met another staged file: draw again
            continue


# folders whose files must be new in this context (see new_files_only): atomic_path links instead of replacing
_NEW_ONLY: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("cirlab_new_only", default=())


@contextlib.contextmanager
def new_files_only(folder: str | os.PathLike) -> Iterator[None]:
    """In this block, a file :func:`atomic_path` writes directly in ``folder`` (not in its subfolders) must be new:
    one that appeared meanwhile (another process writing the same outputs after this one's check before the work)
    raises FileExistsError instead of being replaced. For writes deep inside a library path (an evaluation's top-K
    files) that a command checked beforehand without ``--overwrite``."""
    token = _NEW_ONLY.set(_NEW_ONLY.get() + (Path(os.path.abspath(folder)),))
    try:
        yield
    finally:
        _NEW_ONLY.reset(token)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, new: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path`` in one rename, or with
    ``new`` (or under :func:`new_files_only`) takes its place only where nothing is: FileExistsError otherwise.

    The temporary name starts with ``.`` and ends with ``.tmp`` (so :func:`stale_temporaries` can find leftovers of a
    killed process in a folder written under a lock; a feature store, written without one, removes its own by age:
    :mod:`cirlab.core.featcache`). The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_staged(path)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        if new or Path(os.path.abspath(path)).parent in _NEW_ONLY.get():
            _place_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _place_new(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path`` where nothing is there: a hard link fails with FileExistsError where ``path`` exists
    (a second process wrote it meanwhile). Without hard links: ``path`` is claimed by an exclusive create, then
    replaced in one rename (a reader may see it empty for that moment, never half-written)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:  # named by the path that exists (os.link's error names the source first)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:  # a file system without hard links (FAT, some network shares)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)  # our empty claim: the next try would refuse it as "exists"
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` only if nothing is there, whole or not at all (:func:`atomic_path` with ``new``):
    FileExistsError where ``path`` exists (a second process wrote it meanwhile)."""
    with atomic_path(path, new=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as :func:`json_text` into ``path`` (atomically, through :func:`write_text`)."""
    return write_text(path, json_text(obj, indent=indent))


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON with sorted keys: values through :func:`to_plain` (numpy scalars as numbers, paths as their
    ``str``), and NaN / infinity (a recall over no queries) as ``null``: Python writes a bare ``NaN`` that JSON
    readers (the report's browser, ``jq``) refuse. Non-ASCII text is written as itself (``josé``, not
    ``jos\\u00e9``), except a string holding a lone surrogate (a file name that is not UTF-8): UTF-8 cannot encode
    it, so that text is written with ASCII escapes."""
    plain = _finite(to_plain(obj))
    text = json.dumps(plain, indent=indent, sort_keys=True, allow_nan=False, ensure_ascii=False)
    if not _utf8_encodable(text):
        text = json.dumps(plain, indent=indent, sort_keys=True, allow_nan=False)
    return text


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_plain(value: Any) -> Any:
    """Primitive containers only (weights_only loading, YAML and JSON refuse anything else); 0-d numpy/torch
    scalars become numbers, anything else its ``str`` (e.g. a Path)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)


def flat_numbers(tree: Any, prefix: str = "", *, floats: bool = True) -> dict[str, Any]:
    """Nested metrics -> ``{"a/b": number}``, numeric leaves only (bools and text dropped): the one flattening of the
    trainer's log records, the workbench's metric tables and the report's index. Numpy and 0-d torch scalars count
    as numbers; ``floats=False`` keeps ints as ints (the index shows ``240``, not ``240.0``). A list is keyed by
    each item's first text field (a table's ``to_dict("records")``: ``category``, ``word``), else its position."""
    flat: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            flat.update(flat_numbers(value, f"{prefix}{key}/", floats=floats))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            name = next((v for v in value.values() if isinstance(v, str)), i) if isinstance(value, Mapping) else i
            flat.update(flat_numbers(value, f"{prefix}{name}/", floats=floats))
    else:
        number = tree.item() if hasattr(tree, "item") and getattr(tree, "ndim", None) == 0 else tree
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            flat[prefix.rstrip("/")] = float(number) if floats else number
    return flat


def _finite(plain: Any) -> Any:
    """A :func:`to_plain` value with every non-finite float, at any depth, replaced by None."""
    if isinstance(plain, float):
        return plain if math.isfinite(plain) else None
    if isinstance(plain, dict):
        return {k: _finite(v) for k, v in plain.items()}
    if isinstance(plain, list):
        return [_finite(v) for v in plain]
    return plain


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    import yaml

    # non-ASCII text as itself; PyYAML still escapes what is not printable (a lone surrogate), so this stays UTF-8.
    # Not where a string holds a Unicode line break (NEL, U+2028/9): written raw, YAML reads it back as a space.
    text = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)
    if any(c in text for c in "\x85\u2028\u2029"):
        text = yaml.safe_dump(obj, sort_keys=False)
    return write_text(path, text)


def file_name_part(value: str, what: str) -> str:
    """``value`` when it can be (part of) a file name: no path separators, no ``..``, not ``.``. A name like ``../x``
    or ``a/b`` would write outside the folder the user chose (or make two outputs resolve to one path), ``.`` into
    that folder itself."""
    from cirlab.core.errors import ConfigError

    text = str(value)
    if not text.strip() or any(c in text for c in "/\\") or ".." in text or text.strip() == ".":
        raise ConfigError(f"{what} {text!r}: it becomes part of a file name; use letters, digits, '-', '_' or '.' "
                          "(no path separators, no '..', not '.')")
    return text


class OutputExistsError(CirlabError, FileExistsError):
    """An output file a command would write is already there (or is a folder); the message names it."""


def check_outputs(paths: Any, *, overwrite: bool, command: str) -> None:
    """Nothing written is lost: refuse, before any work, an output path that is a folder, or a file that exists
    unless ``overwrite`` (``--overwrite``). ``paths`` may hold None (an option not given)."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if os.path.isdir(path):  # os.path: Path.is_dir raises in a folder this user may not enter
            raise OutputExistsError(f"{command}: {path} is a folder; give the path of a file to write")
        if os.path.lexists(path) and not overwrite:
            raise OutputExistsError(f"{command}: {path} exists; pass --overwrite to replace it, or choose another "
                                    "path")


# the next step a refusal of an unwritable folder ends with, where its caller names no option of its own: the
# caller's option or environment variable (``--output-dir FOLDER (or set CIRLAB_RUNS)``) is the better advice
WRITE_HINT = "choose a folder you can write"


def check_writable(folders: Iterable[str | os.PathLike | None], *, command: str, hint: str = WRITE_HINT) -> None:
    """Before any work: each folder (None: an option not given) exists or can be created, and this process may
    write into it; else one line naming it and ending with ``hint`` (the option that chooses another folder),
    instead of a traceback after the work whose results it was to hold."""
    for folder in folders:
        if folder is not None:
            why = why_not_writable(folder)
            if why:
                raise UnwritableFolderError(f"{command}: cannot write into {folder} ({why}); {hint}")


def why_not_writable(folder: str | os.PathLike) -> str | None:
    """What stops ``folder`` from being created or written into (``"/data is not writable"``), None when nothing
    does: a look at the path only, nothing is created (:func:`unwritable_entry`)."""
    found = unwritable_entry(folder)
    return None if found is None else f"{found[0]} {found[1]}"


def unwritable_entry(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """The entry of ``folder``'s absolute path that stops it from being created or written, and why (``"is a
    file"``, ``"is a broken symbolic link"``, ``"is not writable"``), None when nothing does: the nearest entry that
    exists. ``os.path`` functions, which answer False where ``Path.exists`` raises (a parent folder this user may
    not enter)."""
    folder = Path(folder).absolute()
    for entry in (folder, *folder.parents):
        if os.path.islink(entry) and not os.path.exists(entry):
            return entry, "is a broken symbolic link"
        if os.path.lexists(entry):
            if not os.path.isdir(entry):
                return entry, "is a file"
            if not os.access(entry, os.W_OK | os.X_OK):
                return entry, "is not writable"
            return None
    return None


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_path` left behind in ``folder`` (a process killed mid-write)."""
    folder = Path(folder)
    return sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []


def remove_temporaries(paths: Iterable[Path]) -> list[tuple[Path, int]]:
    """Remove temporary files killed writers left (from :func:`stale_temporaries` or :func:`staged_temporaries`,
    under the lock every writer takes); returns those removed with their sizes, for the caller to say. One gone
    meanwhile is skipped; one that cannot be removed is said and left."""
    removed = []
    for leftover in paths:
        try:
            size = leftover.stat().st_size
            leftover.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            logging.getLogger(__name__).warning("cannot remove %s, left by a killed writer (%s)", leftover,
                                                err.strerror or err)
            continue
        removed.append((leftover, size))
    return removed


def staged_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_path` staged for ``path`` that are still beside it: writes of ``path`` not
    finished yet, or killed mid-write. Stale only where the caller holds a lock that every writer of ``path``
    takes; unlike :func:`stale_temporaries` (a whole run folder under its lock), the temporaries of other files in
    that folder are not listed, as their writers may be alive."""
    path = Path(path)
    name = re.compile(re.escape(f".{_staged_stem(path)}.") + "[0-9a-f]{12}" + re.escape(TMP_SUFFIX))
    try:
        entries = os.listdir(path.parent)
    except OSError:  # no folder yet, or one this process may not list: nothing of ours there
        return []
    return sorted(path.parent / entry for entry in entries if name.fullmatch(entry))


def _staged_stem(path: Path) -> str:
    """The part of ``path``'s name that :func:`_create_staged` puts in a staged file's name (the whole name, cut
    where it nears the file system's name limit)."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # as _create_staged: no pathconf, or no folder yet
        limit = 255
    return os.fsencode(path.name)[:max(1, limit - 1 - _STAGE_TAIL)].decode(errors="ignore") or "x"


# ----------------------------------------------------------------------------------------------- folder locks

LOCK_NAME = ".cirlab.lock"
# (thread, resolved lock file) -> [open file, depth]: the same thread may nest the lock; another thread of the
# process opens the file anew, so flock sets it against the holder exactly as it would another process
_HELD: dict[tuple[int, str], list[Any]] = {}


class FolderLockedError(CirlabError, OSError):
    """Another live process holds the folder's lock; the message names it."""


class UnwritableFolderError(CirlabError, OSError):
    """A folder cirlab must write into cannot be created or written (a file in its path, no permission); the
    message names it. Not worth a retry, unlike :class:`FolderLockedError`."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, wait: float = 0.0, hint: str = WRITE_HINT) -> Iterator[Path]:
    """Hold an exclusive OS lock on ``folder`` (``<folder>/.cirlab.lock``) for the block; yields the lock file.

    The lock is ``flock``: the OS releases it when the holder exits, however it exits (kill -9 included), so a
    lock file left by a dead process is stale and is simply taken over. The same thread may nest the lock
    (``run_experiment`` holds it around ``train``); another thread (a notebook's background job) meets it as
    another process would. Raises :class:`FolderLockedError` naming the holder (pid,
    host, start time) when a live process holds it (after ``wait`` seconds, see :func:`file_lock`). A folder that
    cannot be written is refused in one line ending with ``hint`` (see :func:`make_folder`).
    """
    folder = Path(folder)
    make_folder(folder, hint=hint)
    with file_lock(folder / LOCK_NAME, wait=wait, hint=hint) as path:
        yield path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: float = 0.0, hint: str = WRITE_HINT) -> Iterator[Path]:
    """:func:`folder_lock` on the lock file ``path`` itself (its folder must exist). ``wait`` > 0 waits up to that
    many seconds for a live holder to finish (work that a second process should share rather than refuse, such as
    generating a dataset both need); 0 fails at once."""
    import threading

    path = Path(path)
    key = (threading.get_ident(), str(path.resolve()))
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fh = _acquire(path, wait, hint)
    _HELD[key] = [fh, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        _release(path, fh)


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s :func:`folder_lock` now (the lock file's line: pid, host, start time), or None when
    nobody does. Only looks: a shared probe that is dropped at once, so a reader can say why a file it was about to
    read vanished (a ``train --overwrite`` rewriting the run) without taking the lock it would hold a writer out
    with. Anything but a plain file there (a link, a FIFO, which blocked the open) is no lock: None."""
    return lock_holder_of(Path(folder) / LOCK_NAME)


def lock_holder_of(path: str | os.PathLike) -> str | None:
    """:func:`lock_holder` of the lock file ``path`` itself (a :func:`file_lock`)."""
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # released (the holder unlinks its file), never taken, or a link that is no lock
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            import fcntl
        except ImportError:  # Windows: msvcrt's byte-range lock, probed as _try_lock takes it
            import msvcrt

            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                return "unknown process"  # the holder's lock also keeps its line from being read
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(_line(os.read(fd, _LINE_BYTES)) or "unknown process")
        fcntl.flock(fd, fcntl.LOCK_UN)  # a stale file of a process that died: nobody holds it
        return None
    finally:
        os.close(fd)


_LINE_BYTES = 256  # a holder's line is under 100 bytes; a planted file of gigabytes is not read whole


# the lock file outlives a process killed with SIGKILL (or by the OOM killer): read in the folder, the holder's line
# then tells a killed run from a live one; the error that names a live holder leaves it out
STALE_NOTE = " (if this process is gone, it was killed: the lock is stale)"


def _holder(line: str) -> str:
    """A held lock's line as said to the user: a line naming a process of this host that is gone was left by an
    earlier holder (another user's lock file, held read-only where it could not be replaced: :func:`_acquire`)."""
    import socket

    found = re.match(r"pid (\d+) on (\S+) ", line)
    if not found or found.group(2) != socket.gethostname() or _alive(int(found.group(1))):
        return line
    return f"another user's process; the lock file still names an earlier holder, {line}, which is gone"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process (PermissionError), or no such call here: alive as far as known
        pass
    return True


def _line(data: bytes) -> str:
    """A lock file's first bytes as text (bytes that are not UTF-8 replaced: a foreign file, said as such), without
    :data:`STALE_NOTE`."""
    return data.decode("utf-8", errors="replace").strip().removesuffix(STALE_NOTE.strip()).strip()


GENERATE_WAIT_S = 900.0  # a generated dataset writes in well under this on one core


def generated_folder_lock(folder: str | os.PathLike, *, wait: float = GENERATE_WAIT_S,
                          hint: str = WRITE_HINT) -> Any:
    """:func:`file_lock` for writing a generated dataset ``folder``: ``.<folder>.cirlab.lock`` next to it (so the
    generated tree itself stays byte-identical for a seed), waiting for a live holder. Two runs that need the same
    data (parallel seeds, notebooks side by side) then write it once: the second finds the first one's write."""
    lock = generated_lock_file(folder)
    make_folder(lock.parent, hint=hint)
    return file_lock(lock, wait=wait, hint=hint)


def generated_lock_file(folder: str | os.PathLike) -> Path:
    """The lock file :func:`generated_folder_lock` takes for ``folder``: beside it, from its absolute path (for
    ``--out .`` the relative name is empty and the lock file landed inside the folder, which then was no longer
    empty and was refused as someone else's); under ``<cache>/locks/`` when that parent cannot be written or the
    name would pass 255 bytes."""
    folder = Path(os.path.abspath(folder))
    beside = f".{folder.name}{LOCK_NAME}"
    if (folder.parent.is_dir() and not os.access(folder.parent, os.W_OK)) or len(os.fsencode(beside)) > 255:
        # a folder made for the data under a read-only parent (a mount point, a folder an admin created), or one
        # whose name leaves no room for the lock's (255 bytes): the lock goes to cirlab's cache, named by the
        # folder's absolute path, so every process still meets the same file
        import hashlib

        from cirlab.core.paths import cache_dir

        digest = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:32]
        return cache_dir() / "locks" / f"{digest}{LOCK_NAME}"
    return folder.parent / beside


# ----------------------------------------------------------------------------------------- data sets being read
IN_USE_NAME = ".cirlab.inuse"  # .<data set>.cirlab.inuse beside a generated data set: shared locks of its readers
_READING: dict[str, int] = {}  # data set folder -> the descriptor holding this process's shared lock


def in_use_file(folder: str | os.PathLike) -> Path:
    """The file whose shared locks say which processes read the generated data set ``folder``."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}{IN_USE_NAME}"


def hold_while_reading(folder: str | os.PathLike) -> None:
    """Say, for the rest of this process, that it reads the generated data set ``folder`` (a shared lock on
    :func:`in_use_file`, which DataLoader workers inherit): ``cirlab cache --remove`` then keeps it, where removing
    it under a training ended that run at its next image. Best effort: a folder this process may not write beside
    (a read-only shared cache) is read without it; where there is no ``fcntl`` (Windows), likewise."""
    key = os.path.abspath(folder)
    if key in _READING:
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(in_use_file(folder), os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a remover holds it now, or the filesystem has no locks: read without it
        os.close(fd)
        return
    _READING[key] = fd


def read_by_others(folder: str | os.PathLike) -> bool:
    """Whether a process holds :func:`hold_while_reading` on ``folder`` (this one too, from another descriptor)."""
    try:
        import fcntl

        fd = os.open(in_use_file(folder), os.O_RDONLY)
    except (ImportError, OSError):  # nobody ever said they read it, or no locks here
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def release_reading() -> None:
    """Drop this process's :func:`hold_while_reading` marks (a long-lived kernel done with its data sets)."""
    while _READING:
        os.close(_READING.popitem()[1])


def make_folder(folder: Path, *, hint: str = WRITE_HINT) -> None:
    """``mkdir -p``, or one line naming the folder and what to do: ``hint`` (the caller's option that chooses
    another folder), or ``CIRLAB_CACHE`` when it is cirlab's cache (a read-only or missing home directory)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = why_not_writable(folder) or err.strerror or str(err)
        advice = unwritable_advice(folder, hint)
        raise UnwritableFolderError(f"cannot create the folder {folder} ({why}); {advice}") from None


def unwritable_advice(folder: Path, hint: str) -> str:
    """What to do about ``folder`` that cannot be written: ``hint``, unless it is in cirlab's cache, which only
    ``CIRLAB_CACHE`` moves (whichever command found it read-only)."""
    from cirlab.core.paths import cache_dir

    try:
        in_cache = folder.resolve().is_relative_to(cache_dir().resolve())
    except (OSError, RuntimeError):  # no home directory to resolve the default cache against
        in_cache = False
    return "it is cirlab's cache: set CIRLAB_CACHE to a folder you can write" if in_cache else hint


def _acquire(path: Path, wait: float = 0.0, hint: str = WRITE_HINT) -> Any:
    import time

    deadline, told = time.monotonic() + wait, False
    attempts = 0
    while attempts < 10:  # the file may be unlinked by its releasing holder between our open and our lock
        fh = _open_lock_file(path, hint)
        if fh is None:
            attempts += 1
            continue
        if not _try_lock(fh):
            fh.seek(0)
            holder = _line(fh.buffer.read(_LINE_BYTES)) or "unknown process"
            fh.close()
            if time.monotonic() < deadline:
                if not told:
                    logging.getLogger(__name__).info("%s is held by another cirlab process (%s); waiting up to "
                                                     "%.0f s for it", path, holder, wait)
                    told = True
                time.sleep(0.2)
                continue
            raise FolderLockedError(f"{path.parent} is in use by another cirlab process ({_holder(holder)}); wait "
                                    "for it to finish or choose another folder")
        attempts += 1
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            fh.seek(0)
            previous = _line(fh.buffer.read(_LINE_BYTES))
            if previous and not previous.startswith("pid "):  # not a line cirlab wrote: never truncate it
                fh.close()
                raise NotALockFileError(f"{path} is not a lock file cirlab wrote (it holds other text); move it "
                                        "away, then retry")
            if previous:  # left by a process that died: the OS dropped its lock, the file stayed
                logging.getLogger(__name__).info("%s: stale lock of a finished process (%s) taken over", path.parent,
                                                 previous)
            if not fh.writable():  # another user's file, locked read-only: its line names the dead holder
                return _own_file_in_place_of(path, fh)
            _write_holder_line(fh)
            return fh
        fh.close()
    raise FolderLockedError(f"{path.parent}: could not take the lock {path}")


def _write_holder_line(fh: Any) -> None:
    import socket
    import time

    fh.seek(0)
    fh.truncate()
    # UTC, said: a holder in another zone (a batch node, a colleague's shell) made a lock 10 s old read hours old
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}{STALE_NOTE}\n")
    fh.flush()


def _own_file_in_place_of(path: Path, held: Any) -> Any:
    """``held`` is another user's stale lock file, locked through a read-only descriptor: its line, which names a
    process that is gone, cannot be rewritten, so the next process would be told that one holds the folder (and the
    file's note says to remove a stale lock). A file of this process's own, locked and written first, takes the name
    (a rename: whoever waits on the old file sees the name moved on and opens the new one); where the folder does
    not allow it (a sticky one keeps another user's file), the old file stays held (:func:`_holder`)."""
    new = path.with_name(f"{path.name}.{os.getpid()}.new")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:  # O_EXCL: a new plain file of this process's, never one planted there
        fh = os.fdopen(os.open(new, flags, 0o666), "r+", encoding="utf-8")
    except OSError:
        return held
    try:
        if _try_lock(fh):
            _write_holder_line(fh)
            os.replace(new, path)
            held.close()
            return fh
    except OSError:
        pass
    fh.close()
    with contextlib.suppress(OSError):
        new.unlink()
    return held


class NotALockFileError(UnwritableFolderError):
    """A folder's lock path is something cirlab must not write through or truncate (a symbolic link, a hard link to
    another file, a foreign file): a folder from elsewhere may hold one aimed at a user's file."""


def _open_lock_file(path: Path, hint: str = WRITE_HINT) -> Any:
    """The lock file opened for reading and writing, created when missing, without following a symbolic link;
    refused unless it is a plain file of one name (a link planted in a downloaded run or report folder had its
    target truncated to the pid line). Another user's lock file (left by a killed process, mode 644) is opened
    read-only, which ``flock`` locks as well. None when the name no longer holds the file opened (a holder released
    and removed it meanwhile): open it again."""
    import stat

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    mode = "r+"
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise NotALockFileError(f"{path} is a symbolic link, not a lock file cirlab wrote; remove it, then "
                                    "retry") from None
        if not _others_lock_file(path, err):
            raise UnwritableFolderError(f"cannot write into {path.parent} ({err.strerror or err}); "
                                        f"{unwritable_advice(path.parent, hint)}") from None
        opened = _open_others_lock_file(path)
        if opened is None:
            return None
        fd, mode = opened
    info = os.fstat(fd)
    try:
        named = os.lstat(path)  # where O_NOFOLLOW is missing (Windows): the name must be the file opened
    except OSError:
        named = None
    if named is not None and stat.S_ISLNK(named.st_mode):
        os.close(fd)
        raise NotALockFileError(f"{path} is a symbolic link, not a lock file cirlab wrote; remove it, then retry")
    if named is None or (named.st_dev, named.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)  # its holder released it (and removed it) meanwhile: the caller opens the name again
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "is not a plain file" if not stat.S_ISREG(info.st_mode) else "is a hard link to another file"
        raise NotALockFileError(f"{path} {what}, not a lock file cirlab wrote; remove it, then retry")
    return os.fdopen(fd, mode, encoding="utf-8")


def _others_lock_file(path: Path, err: OSError) -> bool:
    """Whether the open of ``path`` for writing failed only because the file is another user's, in a folder this
    user may write into (the lock guards writes into that folder: an unwritable one is refused as such)."""
    return (err.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path)
            and os.access(path.parent, os.W_OK | os.X_OK))


def _open_others_lock_file(path: Path) -> tuple[int, str] | None:
    """An existing lock file this user may not open for writing: another user's, left by a process that was killed
    (a lock file is removed on release), in a folder they share (a group's cache). Opened without ``O_CREAT``
    (which the kernel refuses for another user's file in a sticky folder), for writing if allowed, else read-only:
    ``flock`` needs no write access. The descriptor and its ``fdopen`` mode; None when the file vanished meanwhile;
    one line naming it when it cannot be read. ``O_NONBLOCK``: a FIFO planted there must not hang the open."""
    base = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    for access, mode in ((os.O_RDWR, "r+"), (os.O_RDONLY, "r")):
        try:
            return os.open(path, access | base), mode
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM):
                raise UnwritableFolderError(f"lock file {path} cannot be opened ({err.strerror or err})") from None
    raise UnwritableFolderError(f"lock file {path} ({_owner_and_mode(path)}) cannot be opened: remove it if its "
                                "process is gone")


def _owner_and_mode(path: Path) -> str:
    """``owner otheruser, mode 600`` of ``path`` (the user id where it has no name)."""
    import stat

    try:
        info = os.lstat(path)
    except OSError as err:
        return err.strerror or str(err)
    try:
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
    except (ImportError, KeyError):  # Windows, or a user id without a passwd entry (a container's --user)
        owner = str(info.st_uid)
    return f"owner {owner}, mode {stat.S_IMODE(info.st_mode):03o}"


def _try_lock(fh: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt locks the first byte instead
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:  # a filesystem without locks (some network mounts): go on unlocked, but say so
        logging.getLogger(__name__).warning("%s: this filesystem does not support file locks (%s); the folder is "
                                            "not protected against a second run", Path(fh.name).parent, err)
        return True


def _release(path: Path, fh: Any) -> None:
    try:
        # before unlocking: a waiter that opened the old file sees the inode change. Only our own file: after the
        # folder was renamed away (a report moving an entry aside), ``path`` may be another holder's lock file, and
        # removing it would let a third process in beside that holder.
        if _same_file(path, fh):
            path.unlink(missing_ok=True)
    except OSError:  # Windows cannot remove an open file; the next holder takes it over
        pass
    finally:
        fh.close()  # closing the descriptor releases the OS lock


def _same_file(path: Path, fh: Any) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fh.fileno())
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
