"""Atomic file writing: the one way cirlab writes a file that a reader, a resume or a crash may see.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file in the destination
folder, flushed to disk, given the permissions a plain ``open(path, "w")`` would have (the user's umask, not
``mkstemp``'s 0600), then renamed over the destination. A reader sees the old file or the complete new one, a
crash or a full disk leaves the old file in place, and no temporary file outlives a failed write.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path`` in one rename.

    The temporary name starts with ``.<name>.`` and ends with ``.tmp`` (so :func:`stale_temporaries` can find
    leftovers of a killed process). The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """JSON with sorted keys; values JSON cannot hold (paths, numpy scalars) are written as their ``str``."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str))


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_path` left behind in ``folder`` (a process killed mid-write)."""
    folder = Path(folder)
    return sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
