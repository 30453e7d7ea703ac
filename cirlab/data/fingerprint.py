"""What a run was trained on, as digests of the files that define the data, so that a later ``cirlab eval RUN`` or
``--resume`` can tell when the data under the same path is no longer the same.

The files are the annotations and features under the dataset root (caption and split files, precomp features,
the synthetic generator's manifest): every file with a suffix in :data:`SUFFIXES`. Images are not read (Fashion-IQ
has some 70,000): a changed image list shows in the split files, a re-encoded image does not. Files larger than
:data:`WHOLE_BELOW` (precomp features, several GB) are digested by their size and first and last
:data:`SAMPLE` bytes. The stage-I top-K files a re-ranker reads (``eval.stage1_topk``) are part of its data too.

The digests are written to ``<run>/data_fingerprint.json`` when a run starts, and again when a resume accepts
changed data (``--allow-config-change``; ``provenance.json`` lists the files that changed): the run's later results
are computed on that data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".npy", ".npz")
WHOLE_BELOW = 64 << 20  # files up to 64 MiB are hashed whole (CIRR's and Fashion-IQ's annotation files are smaller)
SAMPLE = 4 << 20
FILE_NAME = "data_fingerprint.json"
_CACHE_DIRS = ("__pycache__", ".ipynb_checkpoints")
logger = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    """sha256 of the file, or of its size and first and last :data:`SAMPLE` bytes when it is large."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE_BELOW:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(SAMPLE))
        f.seek(size - SAMPLE)
        h.update(f.read(SAMPLE))
    return "sampled:" + h.hexdigest()


def folder_digests(root: Path, prefix: str = "") -> dict[str, str]:
    """``{prefix + relative path: digest}`` of the data-defining files under ``root`` (a file: itself)."""
    root = Path(root)
    if root.is_file():
        return {prefix + root.name: file_digest(root)}
    found: dict[str, str] = {}
    seen: set[str] = set()
    # linked folders are followed (captions -> a shared copy is the data too), each real folder once (no cycles)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _CACHE_DIRS)
        for name in sorted(files):
            if name.endswith(SUFFIXES) and not name.startswith("."):
                path = Path(folder) / name
                found[prefix + path.relative_to(root).as_posix()] = _digest_or_why(path)
    return found


def _digest_or_why(path: Path) -> str:
    """:func:`file_digest`, or why the file cannot be read (a dangling link, no permission): recorded as such, so
    that it becoming readable (or the reverse) is a difference, and the loader says the rest."""
    try:
        return file_digest(path)
    except OSError as err:
        return f"unreadable: {err.strerror or type(err).__name__}"


def fingerprint(root: Path | None, stage1_topk: str | os.PathLike | None = None) -> dict[str, Any]:
    """The digests of the data a run reads: the files under the dataset ``root`` and, for a re-ranker, the
    stage-I top-K files (``eval.stage1_topk``: a file, a folder of them or a stage-I run folder)."""
    files = folder_digests(root) if root is not None and Path(root).is_dir() else {}
    if stage1_topk:
        source = Path(stage1_topk).expanduser()
        if source.is_dir() and (source / "topk").is_dir():
            source = source / "topk"
        if source.exists():
            files.update(folder_digests(source, "eval.stage1_topk/"))
    return {"root": str(root) if root is not None else None, "files": files}


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The files of ``stored`` that changed or are gone in ``now`` (files added since are not a difference: the
    data the run read is still there as it was)."""
    old, new = dict(stored.get("files") or {}), dict(now.get("files") or {})
    changed = [f"{name} changed" for name in sorted(old) if name in new and new[name] != old[name]]
    gone = [f"{name} is gone" for name in sorted(old) if name not in new]
    return changed + gone


def read_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The fingerprint a run folder recorded (None for runs written before fingerprints, or without one)."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        value = err
    if not isinstance(value, dict):
        logger.warning("%s cannot be read (%s): the data is not compared with what the run was trained on", path,
                       value)
        return None
    return value


def summary(diffs: list[str], limit: int = 4) -> str:
    """``"a changed; b is gone"`` with at most ``limit`` named and the count of the rest."""
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")
