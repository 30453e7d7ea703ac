"""`cirlab cache`: the cache's entries as its writers leave them, their last use, and removing the unused ones."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from cirlab.cli import main
from cirlab.core import featcache, io, paths
from cirlab.data.generators import _owned, emoji, synthetic
from cirlab.workbench import cache

DAY = cache.DAY_S


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CIRLAB_CACHE", str(folder))
    return folder


def _data_set(root: Path, area: str = "synthetic", name: str = "tiny-seed0-64px") -> Path:
    """A generated data set as synthetic.generate leaves it: a marked output root with its manifest and a sealed
    layout folder (the generators' own marker functions, a handful of bytes instead of a whole build)."""
    generator = {"synthetic": synthetic.__name__, "emoji": emoji.__name__}[area]
    out = root / area / name
    _owned.mark(out, generator)
    layout = out / "cirr"
    _owned.mark(layout, generator)
    (layout / "images").mkdir()
    (layout / "images" / "a.png").write_bytes(b"x" * 1000)
    _owned.seal(layout, generator)
    (out / synthetic.MANIFEST).write_text("{}\n")
    return out


def _store(root: Path) -> Path:
    """A feature store with one committed segment, written by FeatureStore itself."""
    folder = root / "features" / "amc" / featcache.cache_key("weights", "lite")
    store = featcache.FeatureStore(folder)
    store.get_or_compute(torch.rand(3, 4), lambda x: x.sum(dim=1, keepdim=True).repeat(1, 8))
    store.flush()
    return folder


def _tokens(root: Path, stem: str = "cirr_val_dffe29ef40cfe8e2_0bcfbd46") -> Path:
    base = root / "blip_rerank" / stem
    base.parent.mkdir(parents=True, exist_ok=True)
    np.save(base.with_suffix(".npy"), np.zeros((2, 3), dtype=np.float32))
    base.with_suffix(".json").write_text("{}")
    return base


def _age(path: Path, days: float) -> None:
    """Date every file at or under ``path`` ``days`` back, for both its last write and its last read."""
    then = time.time() - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then), follow_symlinks=False)


def _by_label(root: Path) -> dict[str, cache.CacheEntry]:
    return {e.label: e for e in cache.cache_entries(root)}


def test_each_writer_s_default_folder_is_an_area_the_listing_knows(root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from cirlab.models.blip_rerank import default_cache_path

    written: list[Path] = []
    monkeypatch.setattr(synthetic, "generate", lambda out, **_: written.append(Path(out)))

    class Split:  # what default_cache_path reads of a split
        dataset, split, category, root = "cirr", "val", None, "/data/cirr"

    assert featcache.default_dir() == root / "features"
    assert default_cache_path(Split(), "vit").parent == root / "blip_rerank"
    assert emoji.default_root().parent == root / "emoji"
    synthetic.ensure(size="tiny")
    assert [p.parent for p in written] == [root / "synthetic"]
    assert set(cache.GENERATED_AREAS) == set(paths.GENERATED_DATA) == {"synthetic", "emoji"}  # the runs' read marks


def test_listing_finds_each_kind_with_its_bytes(root: Path) -> None:
    data = _data_set(root)
    store = _store(root)
    tokens = _tokens(root)
    gallery = root / "features" / f"{featcache.cache_key('gallery')}.pt"
    featcache.save_tensor(gallery, "k", torch.zeros(5, 2))
    (root / "report-home" / "ipython").mkdir(parents=True)
    entries = _by_label(root)
    assert set(entries) == {"synthetic/tiny-seed0-64px", f"features/amc/{store.name}", f"blip_rerank/{tokens.name}",
                            f"features/{gallery.name}", "report-home"}
    files = [p for p in data.rglob("*") if p.is_file()]
    assert entries["synthetic/tiny-seed0-64px"].size == sum(p.stat().st_size for p in files)
    assert entries[f"blip_rerank/{tokens.name}"].size == sum(p.stat().st_size for p in tokens.parent.iterdir())
    assert entries[f"features/amc/{store.name}"].kind == "feature store"
    assert entries["report-home"].kept and not entries["report-home"].area
    assert all(e.kept is None for label, e in entries.items() if label != "report-home")


def test_last_use_is_the_newest_read_or_write_but_not_the_marker_s(root: Path) -> None:
    data = _data_set(root)
    _age(data, 40)
    png = data / "cirr" / "images" / "a.png"
    os.utime(png, (time.time() - 3 * DAY, time.time() - 40 * DAY))  # read 3 days ago
    assert time.time() - _by_label(root)["synthetic/tiny-seed0-64px"].last_used == pytest.approx(3 * DAY, abs=60)
    os.utime(png, (time.time() - 40 * DAY, time.time() - 40 * DAY))
    os.utime(data / _owned.MARKER, (time.time(), time.time() - 40 * DAY))  # the listing itself reads the markers
    assert time.time() - _by_label(root)["synthetic/tiny-seed0-64px"].last_used == pytest.approx(40 * DAY, abs=60)


def test_unused_entries_are_the_idle_ones_of_the_areas(root: Path) -> None:
    old, new = _tokens(root, "cirr_val_a_1"), _tokens(root, "cirr_val_b_2")
    _age(old.with_suffix(".npy"), 31)
    _age(old.with_suffix(".json"), 31)
    (root / "locks").mkdir()
    _age(root / "locks", 100)
    idle = cache.unused_entries(cache.cache_entries(root), 30)
    assert [e.label for e in idle] == [f"blip_rerank/{old.name}"]
    assert {e.label for e in cache.unused_entries(cache.cache_entries(root), 0)} == \
        {f"blip_rerank/{old.name}", f"blip_rerank/{new.name}"}  # never the top-level locks folder


def test_remove_frees_an_entry_and_keeps_the_rest(root: Path) -> None:
    data, store = _data_set(root), _store(root)
    entries = _by_label(root)
    freed = cache.remove_entry(entries["synthetic/tiny-seed0-64px"])
    assert freed == entries["synthetic/tiny-seed0-64px"].size and not data.exists()
    assert store.is_dir() and (root / "synthetic").is_dir()
    assert cache.remove_entry(entries[f"features/amc/{store.name}"]) > 0 and not store.exists()


def test_a_data_set_holding_a_user_s_file_is_kept(root: Path) -> None:
    data = _data_set(root)
    (data / "cirr" / "my_notes.txt").write_text("mine")
    entry = _by_label(root)["synthetic/tiny-seed0-64px"]
    assert "my_notes.txt" in entry.kept
    with pytest.raises(cache.CacheEntryKept, match="my_notes.txt"):
        cache.remove_entry(entry)
    assert (data / "cirr" / "my_notes.txt").exists()


def test_a_file_added_after_the_listing_still_keeps_it(root: Path) -> None:
    data = _data_set(root)
    entry = _by_label(root)["synthetic/tiny-seed0-64px"]
    assert entry.kept is None
    (data / "extra.bin").write_bytes(b"1")  # the cache changed between listing and removing
    with pytest.raises(cache.CacheEntryKept, match="extra.bin"):
        cache.remove_entry(entry)
    assert data.is_dir()


def test_folders_cirlab_did_not_write_are_kept(root: Path) -> None:
    (root / "synthetic" / "mine").mkdir(parents=True)
    (root / "synthetic" / "mine" / "a.txt").write_text("x")
    other = root / "features" / "amc" / featcache.cache_key("x")
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("x")
    (root / "my_folder").mkdir()
    entries = _by_label(root)
    assert "not written by cirlab" in entries["synthetic/mine"].kept
    assert "notes.txt" in entries[f"features/amc/{other.name}"].kept
    assert entries["my_folder"].kept
    for entry in entries.values():
        with pytest.raises(cache.CacheEntryKept):
            cache.remove_entry(entry)
    assert (root / "synthetic" / "mine" / "a.txt").exists() and (other / "notes.txt").exists()


@contextlib.contextmanager
def _held_elsewhere(target: Path) -> Iterator[None]:
    """``target``'s generated-folder lock held by another thread, as a writer in another process holds it (a lock
    this thread holds is re-entered, not refused)."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with io.generated_folder_lock(target, wait=0):
            taken.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(30)
    try:
        yield
    finally:
        done.set()
        holder.join()


def test_an_entry_being_written_is_kept(root: Path) -> None:
    data, tokens = _data_set(root), _tokens(root)
    entries = _by_label(root)
    for target, label in ((data, "synthetic/tiny-seed0-64px"), (tokens, f"blip_rerank/{tokens.name}")):
        with _held_elsewhere(target):  # as synthetic.generate and cache_image_tokens hold it while they write
            # listed so (a set half written read as "holds files its generator did not write")
            assert _by_label(root)[label].kept == "being written by another cirlab process now"
            with pytest.raises(cache.CacheEntryKept, match="being written"):
                cache.remove_entry(entries[label])
        assert target.exists() or target.with_suffix(".npy").exists()
    assert cache.remove_entry(entries[f"blip_rerank/{tokens.name}"]) > 0
    assert not tokens.with_suffix(".npy").exists() and not tokens.with_suffix(".json").exists()


def test_a_removal_refused_by_the_file_system_is_an_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(root)

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache.shutil, "rmtree", refuse)
    with pytest.raises(cache.CacheRemovalError, match="Permission denied"):
        cache.remove_entry(_by_label(root)[f"features/amc/{store.name}"])


def test_cli_lists_areas_and_entries(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache"]) == 0
    assert "holds nothing yet" in capsys.readouterr().out
    _data_set(root)
    _tokens(root, "cirr_val_a_1")
    _tokens(root, "cirr_val_b_2")
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"cirlab's cache: {root} (from $CIRLAB_CACHE)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:4]}
    assert rows["blip_rerank"][1] == "2" and rows["synthetic"][1] == "1"
    assert "3 entries" in out
    assert main(["cache", "--list"]) == 0
    assert "blip_rerank/cirr_val_a_1" in capsys.readouterr().out
    assert main(["cache", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["entry"] for e in listed) == ["blip_rerank/cirr_val_a_1", "blip_rerank/cirr_val_b_2",
                                                   "synthetic/tiny-seed0-64px"]


def test_cli_removes_only_what_was_unused_for_the_days(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data_set(root)
    _age(data, 45)
    kept = _tokens(root)
    assert main(["cache", "--unused-for", "30"]) == 0
    out = capsys.readouterr().out
    assert "synthetic/tiny-seed0-64px" in out and kept.name not in out and data.exists()
    assert main(["cache", "--unused-for", "30", "--remove"]) == 0
    out = capsys.readouterr().out
    assert "removed synthetic/tiny-seed0-64px" in out and "freed" in out
    assert not data.exists() and kept.with_suffix(".npy").exists()


def test_cli_refuses_remove_without_days_and_bad_days(root: Path, capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _data_set(root)
    assert main(["cache", "--remove"]) == 2
    assert "--remove needs --unused-for" in caplog.text
    for bad in ("-1", "nan", "week"):
        with pytest.raises(SystemExit) as err:
            main(["cache", "--unused-for", bad])
        assert err.value.code == 2
        assert "expected a number of days >= 0" in capsys.readouterr().err
    assert (root / "synthetic" / "tiny-seed0-64px").is_dir()


def test_cli_says_why_an_idle_entry_stays(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data_set(root)
    (data / "cirr" / "my_notes.txt").write_text("mine")
    assert main(["cache", "--unused-for", "0", "--remove"]) == 0
    out = capsys.readouterr().out
    assert "synthetic/tiny-seed0-64px: kept: holds files its generator did not write" in out
    assert "1 entry kept" in out and data.is_dir()


def test_a_removal_cut_short_leaves_no_half_entry_under_its_name(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted rmtree (Ctrl-C, a kill) left a data set without its images but with its manifest and marker,
    which read as complete. The entry is renamed first: cut short, it is gone from its name, and what is left is an
    entry of its own that the next --remove frees."""
    data = _data_set(root)
    real_rmtree = cache.shutil.rmtree

    def cut_short(path: object, *args: object, **kwargs: object) -> None:
        (Path(str(path)) / "cirr" / "images" / "a.png").unlink()  # part of it gone, then the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        cache.remove_entry(_by_label(root)["synthetic/tiny-seed0-64px"])
    assert not data.exists()  # nothing half-deleted under the data set's name
    [left] = cache.cache_entries(root)
    assert left.kind == "interrupted removal" and left.kept is None and left.name.startswith(cache.REMOVING)
    monkeypatch.setattr(cache.shutil, "rmtree", real_rmtree)
    assert [e.label for e in cache.unused_entries([left], 0)] == [left.label]
    cache.remove_entry(left)
    assert cache.cache_entries(root) == [] and (root / "synthetic").is_dir()


def test_cli_remove_with_json_removes_and_says_each_in_one_list(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json returned before --remove ran: a script asking for machine output freed nothing and exited 0."""
    data = _data_set(root)
    (root / "synthetic" / "mine").mkdir()
    assert main(["cache", "--unused-for", "0", "--remove", "--json"]) == 0
    rows = {r["entry"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["synthetic/tiny-seed0-64px"]["removed"] is True and not data.exists()
    assert rows["synthetic/mine"]["removed"] is False and "not written by cirlab" in rows["synthetic/mine"]["why"]


def test_what_cannot_be_read_is_listed_as_kept_not_left_out(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder inside a data set that could not be listed stopped the whole command; an unreadable area vanished
    from the listing and its bytes from the totals (simulated: the tests run as root, whom modes do not stop)."""
    data = _data_set(root)
    _tokens(root)
    denied = {str(data / "cirr" / "images"), str(root / "blip_rerank")}
    real_listdir, real_iterdir = os.listdir, Path.iterdir

    def listdir(path: object = ".") -> list[str]:
        if str(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    def iterdir(self: Path) -> object:
        if str(self) in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(cache.os, "listdir", listdir)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    entries = _by_label(root)
    assert entries["synthetic/tiny-seed0-64px"].kept.startswith(f"cannot list {data / 'cirr' / 'images'}")
    assert entries["blip_rerank"].kept.startswith(f"cannot list {root / 'blip_rerank'}")
    assert cache.unused_entries(list(entries.values()), 0)[0].kept  # asked to remove: kept, and said why


def test_an_area_on_another_disk_is_listed_through_its_link(root: Path, tmp_path: Path) -> None:
    """A features/ moved to a bigger disk and linked back read 0 B and "not a folder cirlab writes"."""
    other = tmp_path / "bigdisk" / "features"
    other.mkdir(parents=True)
    root.mkdir()
    (root / "features").symlink_to(other)
    store = _store(root)
    [entry] = cache.cache_entries(root)
    assert entry.kind == "feature store" and entry.kept is None and entry.size > 0
    assert cache.remove_entry(entry) == entry.size and not (other / "amc" / store.name).exists()
    assert (root / "features").is_symlink()  # the link itself stays


def test_a_folder_where_a_recorded_file_was_keeps_its_entry(root: Path) -> None:
    """foreign() asked only whether the path was recorded: a folder of the user's at a recorded file's path went with
    the data set; a folder named like a segment in a store likewise."""
    data = _data_set(root)
    png = data / "cirr" / "images" / "a.png"
    png.unlink()
    png.mkdir()
    (png / "notes.txt").write_text("mine")
    store = _store(root)
    (store / f"seg-{'0' * 32}.npy").mkdir()
    entries = _by_label(root)
    assert "a.png" in entries["synthetic/tiny-seed0-64px"].kept
    assert entries[f"features/amc/{store.name}"].kept


def test_an_entry_dated_ahead_of_this_clock_counts_as_used_now(root: Path) -> None:
    """--unused-for 0 ("empty the cache") passed over a file dated in the future (a file server's clock)."""
    data = _data_set(root)
    ahead = time.time() + 2 * DAY
    for p in [data, *data.rglob("*")]:
        os.utime(p, (ahead, ahead))
    [entry] = cache.cache_entries(root)
    assert cache.unused_entries([entry], 0) == [entry] and cache.unused_entries([entry], 1) == []


def test_a_run_whose_data_root_was_removed_from_the_cache_is_evaluated_on_it_made_again(
        root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """The notebooks record the cache's synthetic folder as a run's dataset.root: after `cirlab cache --remove`,
    `cirlab eval RUN` refused it ("moved, or another machine?") while the notebooks made the set again."""
    data = synthetic.ensure(None, size="tiny", seed=0)
    run = tmp_path / "run"
    assert main(["train", "amc_synthetic_tiny", "--set", f"dataset.root={data / 'fashioniq'}", "--set",
                 "dataset.synthetic=null", "--set", "train.max_steps=2", "--output-dir", str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["splits"]["val"]
    assert main(["cache", "--unused-for", "0", "--remove"]) == 0 and data.exists()  # this process read it
    io.release_reading()  # done with it (a kernel restarted)
    assert main(["cache", "--unused-for", "0", "--remove"]) == 0 and not data.exists()
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["splits"]["val"] == pytest.approx(trained)  # the same data, made again
    assert "is gone; it was the synthetic set (size tiny, seed 0, 64-px images)" in caplog.text


def test_a_data_set_a_running_process_reads_is_kept(root: Path, tmp_path: Path) -> None:
    """Removed under a training, the data set ended the run at its next image ("image file not found"): a process
    that reads a data set of the cache marks it, and --remove keeps it while that process lives."""
    import subprocess
    import sys

    data = _data_set(root)
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time; from cirlab.core import io; "
                               f"io.hold_while_reading({str(data)!r}); print('reading', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        entry = _by_label(root)["synthetic/tiny-seed0-64px"]
        assert entry.kept and entry.kept.startswith("read by a running cirlab process")
        assert main(["cache", "--unused-for", "0", "--remove"]) == 0 and data.is_dir()
    finally:
        reader.kill()
        reader.wait()
    assert main(["cache", "--unused-for", "0", "--remove"]) == 0 and not data.exists()
    assert not io.in_use_file(data).exists()  # its mark goes with it


def test_a_run_marks_the_cache_s_data_set_it_reads(root: Path, tmp_path: Path) -> None:
    """runs.dataset_root is where training, evaluation and the notebooks' calls find their data: one in the cache's
    synthetic area is marked as read; data elsewhere is not (only the cache is pruned)."""
    from cirlab.engine.runs import dataset_root

    data = _data_set(root)
    own = tmp_path / "own" / "fashioniq"
    own.mkdir(parents=True)
    try:
        marked = dataset_root({"name": "x", "dataset": {"name": "fashioniq", "root": str(data / "cirr")}})
        assert marked == data / "cirr"
        assert io.read_by_others(data)  # this process's mark, seen from another descriptor
        dataset_root({"name": "x", "dataset": {"name": "fashioniq", "root": str(own)}})
        assert not io.in_use_file(own.parent).exists() and not io.in_use_file(own).exists()
    finally:
        io.release_reading()
    assert not io.read_by_others(data)


def test_the_report_marks_the_data_set_its_notebooks_read(root: Path) -> None:
    """The report made the set and handed it to its kernels unmarked: removed before a kernel's first lookup, the
    notebook failed with "data_root ... does not exist"."""
    from cirlab.workbench import report

    path = report.ensure_synthetic_data("tiny", stream=None)
    try:
        assert path.parent == root / "synthetic" and io.read_by_others(path)
        assert "read by a running cirlab process" in (_by_label(root)[f"synthetic/{path.name}"].kept or "")
    finally:
        io.release_reading()
