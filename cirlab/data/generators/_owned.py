"""Generators write only into folders they created: a marker file (a small manifest) says so.

A folder a generator creates gets ``.cirlab-generated.json`` (the generator's name and the time) before anything
else is written into it, so even a build killed half-way leaves a folder that is recognisably the generator's.
Replacing or deleting a folder without the marker (or the generator's own completed manifest) is refused unless the
caller passes ``force``; the refusal names exactly what would be deleted.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from cirlab.core.errors import CirlabError, first_few
from cirlab.core.io import UnwritableFolderError, atomic_path, make_folder, write_text

MARKER = ".cirlab-generated.json"


class NotOwnedError(CirlabError, FileExistsError):
    """A generator was pointed at a folder it did not create (and ``force`` was not given)."""


class OtherSettingsError(CirlabError, FileExistsError):
    """A folder holds generated data written with other settings (seed, size, image size, version, format) than
    asked, and replacing it was not forced: runs trained on it would then read other data without a word."""


def is_owned(folder: Path, generator: str, manifests: Iterable[str] = ()) -> bool:
    """True when ``folder`` carries the marker of ``generator`` or one of its completed manifests (older builds)."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("generator") == generator
        except (OSError, ValueError, AttributeError):
            return False
    return any((folder / name).is_file() for name in manifests)


def unfinished(folder: Path, manifests: Iterable[str] = ()) -> str | None:
    """The generator whose write into ``folder`` never finished, else None: its marker lacks the record of the
    files that :func:`seal` adds last, and no completed ``manifests`` (written after everything else, in the
    folder or the one above it) says otherwise (a build from before the record, or the output root itself)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or "files" in marker:
        return None
    if any((f / name).is_file() for f in (folder, folder.parent) for name in manifests):
        return None
    return str(marker.get("generator", "a cirlab generator"))


def is_empty(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def mark(folder: Path, generator: str) -> None:
    """Create ``folder`` (if needed) and mark it as written by ``generator``: the first write, so a folder that
    cannot be written is one line here, before any data is generated."""
    make_folder(folder)
    try:  # no time or pid in it: the same seed must still write byte-identical trees
        write_text(folder / MARKER, json.dumps({"generator": generator}) + "\n")
    except OSError as err:
        raise UnwritableFolderError(f"cannot write into {folder} ({err.strerror or err})") from None


def seal(folder: Path, generator: str) -> None:
    """Record in the marker every file the generator wrote into ``folder`` (called once the write is complete), so
    that a later rebuild can tell them from files a user added and refuse to delete those (:func:`foreign`)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    # sorted relative paths only: the same seed still writes a byte-identical tree
    write_text(folder / MARKER, json.dumps({"generator": generator, "files": files}) + "\n")


def recorded_files(folder: Path) -> list[str] | None:
    """The files :func:`seal` recorded in ``folder``'s marker; None where the marker holds no readable record (a
    write that never finished, a build older than the record). A missing marker raises FileNotFoundError."""
    try:
        recorded = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, list) else None


def foreign(folder: Path, manifests: Iterable[str] = ()) -> list[Path]:
    """What ``folder`` holds beyond the files its generator recorded (:func:`seal`): files a user added, and the
    top-most folders made only of such files.

    A folder with the generator's marker but no record (a write that never finished, or a build older than the
    record) is the generator's as far as anyone can tell: nothing in it is foreign. A folder without a marker,
    taken as the generator's only because it holds one of its ``manifests`` (a build from before markers, or
    anyone's folder with such a file name), vouches for nothing: everything in it but those manifests is foreign.
    """
    if not folder.is_dir():
        return []
    try:
        recorded = recorded_files(folder)
    except FileNotFoundError:
        recorded = list(manifests)
    if recorded is None:
        return []
    known = set(recorded) | {MARKER}
    known_dirs = {parent.as_posix() for name in known for parent in Path(name).parents}
    found: list[Path] = []

    def walk(path: Path) -> None:
        for child in sorted(path.iterdir()):
            rel = child.relative_to(folder).as_posix()
            if child.is_dir() and not child.is_symlink() and rel in known_dirs:
                walk(child)
            elif rel not in known or (child.is_dir() and not child.is_symlink()):  # a folder where a file was
                found.append(child)

    walk(folder)
    return found


def refuse_foreign(command: str, folder: Path, force: bool, manifests: Iterable[str] = ()) -> None:
    """Refuse to replace generated ``folder`` while it holds files the generator did not write (with ``force``,
    say which go); ``manifests`` as for :func:`foreign`."""
    extra = foreign(folder, manifests)
    if not extra:
        return
    listed = first_few((p.relative_to(folder) for p in extra), 5)
    if force:
        import logging

        logging.getLogger(__name__).warning("--force: %s also holds files it did not generate, deleted with it: %s",
                                            folder, listed)
        return
    raise NotOwnedError(f"{command}: refusing to replace {folder}: it holds files the generator did not write "
                        f"({listed}). Move them out, or pass --force (Python: force=True) to delete them too")


def describe(folder: Path) -> str:
    """``"data/fiq (1,234 files, 56.7 MB)"``: what deleting ``folder`` would remove."""
    if not folder.is_dir():
        return f"{folder} (a file)"
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return f"{folder} ({len(files):,} file{'s' if len(files) != 1 else ''}, {size / 1e6:.1f} MB)"


def refuse(command: str, target: Path, doomed: list[Path], reason: str, *, forcible: bool = True) -> NotOwnedError:
    """The refusal to write into ``target``; ``forcible=False`` where ``--force`` would not help (a file where the
    folder goes: the generator never replaces a file it did not write)."""
    deleted = "; it would delete " + ", ".join(describe(p) for p in doomed) if doomed else ""
    force = ", or pass --force (Python: force=True) to replace it" if forcible else ""
    return NotOwnedError(f"{command}: refusing to write into {target}: {reason}{deleted}. Choose an empty or new "
                         f"folder{force}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_release_json(path: Path, obj: object) -> None:
    """A generated annotation file as the public releases write theirs: one line, UTF-8 (indenting would also switch
    json to its slow pure-Python encoder on the larger sets)."""
    write_text(path, json.dumps(obj, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` that replaces it on a clean exit (for writers that take a file name: PIL,
    numpy); its suffix is not ``path``'s, so a writer that infers the format from it must be told the format.
    No fsync: a generated tree holds thousands of files and a sync each multiplied the write time; the rename is
    what a kill needs (an empty file a power cut may still leave is one ``cirlab data check`` reports)."""
    with atomic_path(path, fsync=False) as tmp:
        yield tmp
