"""The per-item feature store shared by several processes: rows another process stored meanwhile are not written
again, and what writers killed mid-segment left is removed once clearly abandoned.

Two :class:`FeatureStore` objects on one folder stand for two processes: each reads the folder when opened and keeps
its own index, as a separate process does."""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.core import featcache

HOUR = 3600.0


def _items(first: int, count: int) -> torch.Tensor:
    """``count`` distinct two-value inputs, from item ``first`` on (the same range gives the same inputs)."""
    return torch.arange(2 * first, 2 * (first + count), dtype=torch.float32).view(count, 2)


def _times_ten(x: torch.Tensor) -> torch.Tensor:
    return x * 10


def _never(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError(f"recomputed {len(x)} rows")


def _stored_keys(folder: Path) -> list[str]:
    """Every key written in the committed segments of ``folder``, once per stored row."""
    keys: list[str] = []
    for keys_file in sorted(folder.glob("seg-*.keys.json")):
        keys += json.loads(keys_file.read_text(encoding="utf-8"))
    return keys


def _age(path: Path, seconds: float) -> None:
    """Date ``path`` ``seconds`` ago (negative: in the future)."""
    when = time.time() - seconds
    os.utime(path, (when, when))


# ------------------------------------------------------------------------------------ parallel writers
def _two_processes(folder: Path) -> tuple[featcache.FeatureStore, featcache.FeatureStore]:
    """Two stores on one folder, as two processes have them: each read the folder when it opened."""
    return featcache.FeatureStore(folder, flush_rows=100), featcache.FeatureStore(folder, flush_rows=100)


def test_a_flush_leaves_out_rows_another_process_stored_meanwhile(tmp_path):
    """Two jobs of a sweep on a cold cache: both compute items 0-7, the second also 8-11. The second writes only
    8-11, and serves 0-7 from the first one's segment afterwards."""
    folder = tmp_path / "store"
    first, second = _two_processes(folder)
    first.get_or_compute(_items(0, 8), _times_ten)
    second.get_or_compute(_items(0, 12), _times_ten)
    first.flush()
    second.flush()
    stored = _stored_keys(folder)
    assert len(stored) == len(set(stored)) == 12
    assert torch.equal(second.get_or_compute(_items(0, 12), _never), _items(0, 12) * 10)


def test_the_exit_time_flush_leaves_out_rows_another_process_stored(tmp_path):
    """A set smaller than ``flush_rows`` is written only by the flush at exit (or when the store is collected)."""
    folder = tmp_path / "store"
    first, second = _two_processes(folder)
    first.get_or_compute(_items(0, 6), _times_ten)
    second.get_or_compute(_items(0, 6), _times_ten)
    first.flush()
    del second
    gc.collect()
    stored = _stored_keys(folder)
    assert len(stored) == len(set(stored)) == 6


def test_each_segment_of_another_process_is_read_once(tmp_path, monkeypatch):
    """A flush reads only the key files committed since the last look, not the whole folder each time."""
    folder = tmp_path / "store"
    other = featcache.FeatureStore(folder, flush_rows=100)
    other.get_or_compute(_items(0, 4), _times_ten)
    other.flush()
    mine = featcache.FeatureStore(folder, flush_rows=100)  # reads the other's segment at open
    other.get_or_compute(_items(4, 4), _times_ten)
    other.flush()
    read: list[str] = []
    real = featcache._read_segment
    monkeypatch.setattr(featcache, "_read_segment", lambda d, k: read.append(k.name) or real(d, k))
    for batch in range(3):
        mine.get_or_compute(_items(10 + 2 * batch, 2), _times_ten)
        mine.flush()
    assert len(read) == 1  # the other's second segment; neither its first nor this store's own ones
    assert torch.equal(mine.get_or_compute(_items(0, 8), _never), _items(0, 8) * 10)


def test_a_segment_whose_key_file_is_not_written_yet_is_not_read(tmp_path):
    """Another process between writing a segment's data and its key file: the data is not taken as stored."""
    folder = tmp_path / "store"
    mine = featcache.FeatureStore(folder, flush_rows=100)
    mine.get_or_compute(_items(0, 4), _times_ten)
    folder.mkdir(parents=True)
    np.save(folder / "seg-0123456789abcdef0123456789abcdef.npy", (_items(0, 4) * 10).numpy())
    mine.flush()
    assert len(_stored_keys(folder)) == 4
    featcache.FeatureStore(folder, flush_rows=100)  # an open looks for leftovers
    assert (folder / "seg-0123456789abcdef0123456789abcdef.npy").exists()  # young: not removed either


# ------------------------------------------------------------------------------------ leftovers of killed writes
def _killed_writes(folder: Path) -> tuple[Path, Path]:
    """What a writer killed mid-segment leaves: a staged data file, and a segment whose key file never came."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / ".seg-af254145ec3e4b598f3e3a93203bf240.npy.a8e4451003c2.tmp"
    staged.write_bytes(b"\0" * 1000)
    uncommitted = folder / "seg-406ecf34e88f487aacce0c40c3576125.npy"
    np.save(uncommitted, np.zeros((3, 2), dtype=np.float32))
    return staged, uncommitted


def _committed_store(folder: Path) -> list[Path]:
    """A store with one complete segment of items 0-3; its files."""
    store = featcache.FeatureStore(folder, flush_rows=100)
    store.get_or_compute(_items(0, 4), _times_ten)
    store.flush()
    return sorted(folder.glob("seg-*"))


def test_opening_removes_what_killed_writes_left_an_hour_ago(tmp_path, caplog):
    folder = tmp_path / "store"
    committed = _committed_store(folder)
    staged, uncommitted = _killed_writes(folder)
    size = staged.stat().st_size + uncommitted.stat().st_size
    for path in [*committed, staged, uncommitted]:
        _age(path, 2 * HOUR)
    with caplog.at_level(logging.INFO, logger="cirlab.core.featcache"):
        store = featcache.FeatureStore(folder, flush_rows=100)
    assert sorted(folder.iterdir()) == committed  # the complete segment stays, however old
    removed = [r.getMessage() for r in caplog.records if "killed" in r.getMessage()]
    assert removed == [f"feature store {folder}: removed 2 files of killed writes ({size} bytes): {staged.name}, "
                       f"{uncommitted.name}"]
    assert torch.equal(store.get_or_compute(_items(0, 4), _never), _items(0, 4) * 10)


@pytest.mark.parametrize("age", [10 * 60, -2 * HOUR], ids=["ten-minutes-old", "dated-in-the-future"])
def test_opening_keeps_leftovers_that_may_be_a_live_writers(tmp_path, caplog, age):
    """A young file may be a writer's at work; one dated ahead (a file server's clock) has no known age."""
    folder = tmp_path / "store"
    _committed_store(folder)
    leftovers = _killed_writes(folder)
    for path in leftovers:
        _age(path, age)
    with caplog.at_level(logging.INFO, logger="cirlab.core.featcache"):
        featcache.FeatureStore(folder, flush_rows=100)
    assert all(path.exists() for path in leftovers)
    assert not [r for r in caplog.records if "killed" in r.getMessage()]


def test_opening_removes_nothing_else(tmp_path):
    """Old files that are no staged segment, segment data or key file stay: another file's staged copy, a user's
    note. A key file whose data is gone (it warned at every open) goes."""
    folder = tmp_path / "store"
    _committed_store(folder)
    others = [folder / ".notes.txt.0123456789ab.tmp", folder / "notes.txt",
              folder / "seg-5555aaaa5555aaaa5555aaaa5555aaaa.npy.bak"]
    orphan = folder / "seg-6666bbbb6666bbbb6666bbbb6666bbbb.keys.json"
    for path in [*others, orphan]:
        path.write_text("[]")
        _age(path, 2 * HOUR)
    before = sorted(folder.iterdir())
    featcache.FeatureStore(folder, flush_rows=100)
    assert sorted(folder.iterdir()) == [p for p in before if p != orphan]


def test_a_leftovers_age_is_taken_by_the_folders_clock(tmp_path, monkeypatch):
    """A file server whose clock runs two hours behind this machine's dates a live writer's segment two hours
    back: by this machine's clock it looked abandoned, and was removed under the writer."""
    folder = tmp_path / "store"
    leftovers = _killed_writes(folder)
    for path in leftovers:
        _age(path, 2 * HOUR)  # just written, by the server's clock
    monkeypatch.setattr(featcache, "_folder_now", lambda d: max(p.stat().st_mtime for p in leftovers) + 5)
    featcache.FeatureStore(folder, flush_rows=100)
    assert all(path.exists() for path in leftovers)
    monkeypatch.undo()
    featcache.FeatureStore(folder, flush_rows=100)  # by the folder's own clock now: two hours old
    assert not any(path.exists() for path in leftovers)
    assert not [p for p in folder.iterdir() if p.name.startswith(".clock-")]  # the probe goes too


def test_leftovers_that_cannot_be_removed_are_left_quietly(tmp_path, monkeypatch, caplog):
    """Another user's killed write in a group's store this user may only read: no line at each open."""
    folder = tmp_path / "store"
    leftovers = _killed_writes(folder)
    for path in leftovers:
        _age(path, 2 * HOUR)

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level(logging.INFO, logger="cirlab.core.featcache"):
        featcache.FeatureStore(folder, flush_rows=100)
    assert all(path.exists() for path in leftovers)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
