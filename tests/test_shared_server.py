"""cirlab on a lab server shared by a group: another user's files left in a shared cache, read-only stores and
folders, run folders one cannot enter. Each refusal is one line naming the path and what to do.

Permission cases run for real: as root (which every permission lets through) in a forked child that takes the
uid of ``nobody``; as another user, on files made unwritable or unreadable by their mode."""
from __future__ import annotations

import errno
import fcntl  # noqa: F401  imported before a child drops its uid: the interpreter's own folder may be closed to it
import logging
import os
import pwd  # noqa: F401  (as fcntl)
import socket  # noqa: F401  (as fcntl)
import stat  # noqa: F401  (as fcntl)
import subprocess
import tempfile
import time  # noqa: F401  (as fcntl)
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from cirlab.core import featcache, io
from cirlab.workbench import analysis, recipes

NOBODY = 65534


def _as_another_user(work: Callable[[], str]) -> str:
    """``work()`` in a forked child that, when this is root, runs as uid/gid ``nobody`` (no permission override);
    its result, or its error's type and message."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            answer = work()
        except BaseException as err:  # noqa: BLE001  reported to the parent, which fails the test
            answer, code = f"{type(err).__name__}: {err}\n{traceback.format_exc()}", 1
        os.write(write, answer.encode())
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared():
    """A folder every user may write into, as a group's shared cache is (a test's tmp_path is closed to others)."""
    with tempfile.TemporaryDirectory(prefix="cirlab-shared-") as folder:
        os.chmod(folder, 0o777)
        yield Path(folder)


def _killed_holders_lock(folder: Path, mode: int) -> Path:
    """The lock file a colleague's killed process leaves: its pid line (a process that has ended), with the mode
    its umask gave it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = folder / f".data{io.LOCK_NAME}"
    lock.write_text(f"pid {gone.pid} on {socket.gethostname()} since 2026-12-07 00:00:00{io.STALE_NOTE}\n")
    os.chmod(lock, mode)
    return lock


# ------------------------------------------------------------------------------------------ another user's lock
def test_a_lock_file_a_colleagues_killed_process_left_is_taken_over(shared):
    """umask 022 left it mode 644: opening it for writing failed, and the shared cache was blocked for everyone
    with "cannot write into <folder> (Permission denied)" though the folder is writable."""
    lock = _killed_holders_lock(shared, 0o444 if os.geteuid() else 0o644)

    def take() -> str:
        with io.file_lock(lock):
            # a third process is told who holds it now (the dead process's line made it look stale, and the file's
            # note says to remove a stale lock)
            return f"{os.getpid()}|{io.lock_holder_of(lock)}"

    pid, holder = _as_another_user(take).split("|")
    assert holder.startswith(f"pid {pid} on {socket.gethostname()} since ")
    assert not lock.exists()  # released as any lock is: removed, so the next user creates a fresh one


def test_in_a_sticky_folder_a_colleagues_lock_file_is_held_as_it_is_and_said_so(shared):
    """A sticky folder (/tmp-like) keeps another user's file where it is: held read-only, its line names the dead
    process, and whoever meets the lock is told a live process of another user holds it."""
    os.chmod(shared, 0o1777)
    lock = _killed_holders_lock(shared, 0o444 if os.geteuid() else 0o644)
    gone = lock.read_text().split(" since")[0]

    def take() -> str:
        with io.file_lock(lock):
            return io.lock_holder_of(lock) or "nobody"

    holder = _as_another_user(take)
    assert holder.startswith("another user's process; the lock file still names an earlier holder, " + gone), holder
    assert holder.endswith("which is gone")


def test_a_colleagues_lock_file_is_still_a_lock_while_its_holder_lives(shared):
    """Opened read-only, the file is locked all the same: a live holder keeps a second process out."""
    lock = _killed_holders_lock(shared, 0o444 if os.geteuid() else 0o644)
    with open(lock) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)

        def take() -> str:
            with io.file_lock(lock):
                return "locked"

        assert _as_another_user(take).startswith("FolderLockedError: ")


def test_a_lock_file_that_cannot_be_read_names_its_owner_and_mode(shared):
    lock = _killed_holders_lock(shared, 0o000)

    def take() -> str:
        with io.file_lock(lock):
            return "locked"

    answer = _as_another_user(take).splitlines()[0]
    assert answer.startswith(f"UnwritableFolderError: lock file {lock} (owner ")
    assert answer.endswith(", mode 000) cannot be opened: remove it if its process is gone")


def test_a_lock_file_opened_read_only_where_the_open_for_writing_is_refused(tmp_path, monkeypatch):
    """The same without a second user: the kernel's refusal of the open for writing, as for another user's file."""
    lock = _killed_holders_lock(tmp_path, 0o644)
    real_open = os.open

    def open_as_another_user(path, flags, *args):
        if Path(path) == lock and flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_another_user)
    with io.file_lock(lock):  # a file of this process's own took its name: it names this process
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert not lock.exists() and sorted(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ refusals say what to do next
def test_refusals_of_unwritable_folders_end_with_the_callers_option(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    hint = "pass --output-dir FOLDER (or set CIRLAB_RUNS)"
    with pytest.raises(io.UnwritableFolderError) as err:
        io.check_writable([a_file / "out"], command="cirlab train", hint=hint)
    assert str(err.value) == f"cirlab train: cannot write into {a_file / 'out'} ({a_file} is a file); {hint}"
    with pytest.raises(io.UnwritableFolderError) as err:
        io.make_folder(a_file / "out", hint="pass --out DIR")
    assert str(err.value) == f"cannot create the folder {a_file / 'out'} ({a_file} is a file); pass --out DIR"
    with pytest.raises(io.UnwritableFolderError) as err:
        with io.folder_lock(a_file / "run", hint=hint):
            pass
    assert str(err.value).endswith(f"({a_file} is a file); {hint}")
    with pytest.raises(io.UnwritableFolderError) as err:  # a caller that names no option: a generic next step
        io.check_writable([a_file / "out"], command="cirlab eval --output")
    assert str(err.value).endswith(f"({a_file} is a file); {io.WRITE_HINT}")


def _refuse_creating_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.open`` refuses to create a file (EACCES), as in a folder this user may not write into."""
    real_open = os.open

    def refused(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refused)


def test_a_lock_that_cannot_be_created_names_the_folder_and_the_option(tmp_path, monkeypatch):
    """An existing folder this user may not write into (a colleague's run, a read-only mount)."""
    _refuse_creating_files(monkeypatch)
    with pytest.raises(io.UnwritableFolderError) as err:
        with io.folder_lock(tmp_path, hint="pass --output-dir FOLDER (or set CIRLAB_RUNS)"):
            pass
    assert str(err.value) == (f"cannot write into {tmp_path} (Permission denied); pass --output-dir FOLDER (or set "
                              "CIRLAB_RUNS)")


def test_a_colleagues_folder_is_refused_with_the_option(shared):
    run = shared / "run"
    run.mkdir()
    os.chmod(run, 0o555)

    def lock() -> str:
        with io.folder_lock(run, hint="pass --output-dir FOLDER (or set CIRLAB_RUNS)"):
            return "locked"

    assert _as_another_user(lock).splitlines()[0] == (f"UnwritableFolderError: cannot write into {run} (Permission "
                                                      "denied); pass --output-dir FOLDER (or set CIRLAB_RUNS)")


# ------------------------------------------------------------------------------------- notebooks' output folder
def _checkout(folder: Path) -> Path:
    """A folder :func:`cirlab.core.shipped.is_checkout` takes for a cirlab checkout."""
    (folder / "notebooks").mkdir(parents=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "cirlab"\n')
    return folder


def test_a_notebook_copied_out_of_the_shared_checkout_writes_beside_itself(tmp_path, monkeypatch):
    """cirlab installed editable from a shared checkout: a user's own copy of the notebooks wrote its default
    output into that checkout, over every other user's results."""
    shared_checkout = _checkout(tmp_path / "shared")
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setattr(recipes, "source_checkout", lambda: shared_checkout)
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    monkeypatch.chdir(mine)
    assert recipes.output_folder("", "evaluate") == mine / "runs" / "evaluate"
    monkeypatch.chdir(shared_checkout / "notebooks")  # JupyterLab in the checkout: its runs/, as documented
    assert recipes.output_folder("", "evaluate") == shared_checkout / "runs" / "evaluate"
    monkeypatch.chdir(shared_checkout)
    assert recipes.output_folder("", "train") == shared_checkout / "runs" / "train"


def test_a_notebook_in_the_editable_checkout_writes_into_it_from_a_subfolder(tmp_path, monkeypatch):
    shared_checkout = _checkout(tmp_path / "shared")
    (shared_checkout / "notebooks" / "mine").mkdir()
    monkeypatch.setattr(recipes, "source_checkout", lambda: shared_checkout)
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    monkeypatch.chdir(shared_checkout / "notebooks" / "mine")
    assert recipes.output_folder("", "quickstart") == shared_checkout / "runs" / "quickstart"


def test_an_unwritable_notebook_output_folder_is_refused_at_the_parameters(tmp_path, monkeypatch):
    """It failed after the notebook's work (an evaluation of every split), with a traceback of three exceptions."""
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")  # where the default output would go: no folder can be made there
    with pytest.raises(io.UnwritableFolderError) as err:
        recipes.output_folder("", "evaluate")
    assert str(err.value) == (f"the evaluate notebook's output folder: cannot write into {tmp_path}/runs/evaluate "
                              f"({tmp_path}/runs is a file); pass output_dir=FOLDER (or set CIRLAB_RUNS)")
    with pytest.raises(io.UnwritableFolderError, match=r"\(.*runs is a file\); pass another output_dir$"):
        recipes.output_folder("runs/mine", "evaluate")
    monkeypatch.setenv("CIRLAB_RUNS", str(tmp_path / "runs"))
    with pytest.raises(io.UnwritableFolderError, match=r"; set CIRLAB_RUNS to a folder you can write \(or pass "
                                                       r"output_dir=FOLDER\)$"):
        recipes.output_folder("", "evaluate")


def test_a_read_only_working_directory_is_refused_for_the_default_output(shared, monkeypatch):
    mine = shared / "mine"
    mine.mkdir()
    os.chmod(mine, 0o555)
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    monkeypatch.chdir(mine)

    def where() -> str:
        return str(recipes.output_folder("", "train"))

    assert _as_another_user(where).splitlines()[0] == (
        f"UnwritableFolderError: the train notebook's output folder: cannot write into {mine}/runs/train ({mine} is "
        "not writable); pass output_dir=FOLDER (or set CIRLAB_RUNS)")


# ------------------------------------------------------------------------------------ a read-only feature store
def _fill(store: featcache.FeatureStore, batches: int, rows: int = 4) -> None:
    for b in range(batches):
        items = torch.arange(b * rows * 2, (b + 1) * rows * 2, dtype=torch.float32).view(rows, 2)
        assert torch.equal(store.get_or_compute(items, lambda x: x * 10), items * 10)


def _warnings_filling(store: featcache.FeatureStore, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings of six batches of new rows into ``store`` (one flush each at 4 rows) and a last flush."""
    with caplog.at_level(logging.WARNING, logger="cirlab.core.featcache"):
        _fill(store, 6)
        store.flush()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_read_only_feature_store_warns_once_and_stops_trying(tmp_path, caplog):
    """One warning per flush (every 256 new rows: ~300 an epoch on Fashion-IQ), each the same line without a hint."""
    (tmp_path / "a_file").write_text("")
    store = featcache.FeatureStore(tmp_path / "a_file" / "store", flush_rows=4)
    warnings = _warnings_filling(store, caplog)
    assert warnings == [f"feature store {tmp_path / 'a_file' / 'store'} is not writable ({tmp_path / 'a_file'} is a "
                        "file): features are computed again each epoch; point the model's feature_cache_dir at a "
                        "folder you can write to keep them"]


def test_a_feature_store_whose_writes_fail_warns_once(tmp_path, monkeypatch, caplog):
    """The folder looks writable but the disk refuses (full, a read-only mount, another user's segment)."""
    tries = []

    def refused(path, write):
        tries.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(featcache, "_atomic_write", refused)
    store = featcache.FeatureStore(tmp_path / "store", flush_rows=4)
    warnings = _warnings_filling(store, caplog)
    assert warnings == [f"feature store {tmp_path / 'store'} is not writable (No space left on device): features are "
                        "computed again each epoch; point the model's feature_cache_dir at a folder you can write to "
                        "keep them"]
    assert len(tries) == 1  # not tried again at each flush
    assert featcache.FeatureStore._write_segment(tmp_path / "store", {"k": torch.ones(2).numpy()},
                                                 store._unwritable) == []  # what the exit-time flush does


def test_a_full_read_only_feature_store_stays_silent(shared, caplog):
    """Another user filled it: every item is found, nothing is written, nothing is said."""
    store = featcache.FeatureStore(shared / "store", flush_rows=4)
    _fill(store, 2)
    store.flush()
    os.chmod(shared / "store", 0o555)

    def reread() -> str:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("cirlab.core.featcache").addHandler(handler)
        again = featcache.FeatureStore(shared / "store", flush_rows=4)
        items = torch.arange(0, 16, dtype=torch.float32).view(8, 2)
        got = again.get_or_compute(items, lambda x: (_ for _ in ()).throw(AssertionError("recomputed")))
        again.flush()
        return f"{torch.equal(got, items * 10)} {[m for m in records if 'not writable' in m]}"

    assert _as_another_user(reread) == "True []"


def test_a_read_only_feature_store_of_another_user_warns_once(shared):
    os.chmod(shared, 0o755)  # the group's cache, not writable by this user

    def fill() -> str:
        records: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("cirlab.core.featcache").addHandler(handler)
        store = featcache.FeatureStore(shared / "store", flush_rows=4)
        _fill(store, 6)
        store.flush()
        return "\n".join(records)

    if os.geteuid() != 0:
        os.chmod(shared, 0o555)
    assert _as_another_user(fill) == (f"feature store {shared / 'store'} is not writable ({shared} is not writable): "
                                      "features are computed again each epoch; point the model's feature_cache_dir at "
                                      "a folder you can write to keep them")


# ------------------------------------------------------------------------------ cirlab runs: unreadable folders
def _a_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("")


def test_a_run_folder_that_cannot_be_read_is_named(shared):
    """It was left out of the table without a word, as if it did not exist."""
    _a_run(shared / "runs" / "ok")
    _a_run(shared / "runs" / "private" / "theirs")
    os.chmod(shared / "runs", 0o755)
    os.chmod(shared / "runs" / "ok", 0o755)
    os.chmod(shared / "runs" / "private", 0o700 if os.geteuid() == 0 else 0o000)

    def listing() -> str:
        records: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("cirlab.workbench.analysis").addHandler(handler)
        found = analysis.find_runs(shared / "runs")
        return f"{[p.name for p in found]} {records}"

    try:
        assert _as_another_user(listing) == f"['ok'] ['skipped {shared / 'runs' / 'private'}: permission denied']"
    finally:
        os.chmod(shared / "runs" / "private", 0o700)  # for the cleanup of a user who is not root


def test_a_run_folder_that_cannot_be_listed_is_warned_once(tmp_path, monkeypatch, caplog):
    _a_run(tmp_path / "ok")
    _a_run(tmp_path / "private" / "a")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "private":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="cirlab.workbench.analysis"):
        assert analysis.find_runs(tmp_path) == [tmp_path / "ok"]
    assert [r.getMessage() for r in caplog.records] == [f"skipped {tmp_path / 'private'}: permission denied"]


def test_a_read_only_feature_store_folder_is_said_without_its_name_twice(shared):
    (shared / "store").mkdir()
    os.chmod(shared / "store", 0o555)

    def fill() -> str:
        records: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("cirlab.core.featcache").addHandler(handler)
        _fill(featcache.FeatureStore(shared / "store", flush_rows=4), 3)
        return "\n".join(records)

    assert _as_another_user(fill) == (f"feature store {shared / 'store'} is not writable (read-only for this user): "
                                      "features are computed again each epoch; point the model's feature_cache_dir at "
                                      "a folder you can write to keep them")


def test_a_colleagues_read_only_folder_with_a_lock_file_left_in_it_is_refused_as_unwritable(shared):
    """The lock guards writes into its folder: taking it there would only move the refusal after the work."""
    run = shared / "run"
    run.mkdir()
    _killed_holders_lock(run, 0o444 if os.geteuid() else 0o644).rename(run / io.LOCK_NAME)
    os.chmod(run, 0o555)

    def lock() -> str:
        with io.folder_lock(run, hint="pass --output-dir FOLDER (or set CIRLAB_RUNS)"):
            return "locked"

    try:
        assert _as_another_user(lock).splitlines()[0] == (
            f"UnwritableFolderError: cannot write into {run} (Permission denied); pass --output-dir FOLDER (or set "
            "CIRLAB_RUNS)")
    finally:
        os.chmod(run, 0o755)  # for the cleanup of a user who is not root


def test_a_lock_in_a_read_only_cache_names_cirlab_cache(tmp_path, monkeypatch):
    """Whichever command meets it, only CIRLAB_CACHE moves the cache: not the caller's output option."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "synthetic").mkdir(parents=True)
    _refuse_creating_files(monkeypatch)
    with pytest.raises(io.UnwritableFolderError) as err:
        with io.generated_folder_lock(tmp_path / "cache" / "synthetic" / "tiny", wait=0, hint="pass --out DIR"):
            pass
    assert str(err.value) == (f"cannot write into {tmp_path / 'cache' / 'synthetic'} (Permission denied); it is "
                              "cirlab's cache: set CIRLAB_CACHE to a folder you can write")


def test_a_read_only_feature_store_in_the_cache_names_cirlab_cache(tmp_path, monkeypatch, caplog):
    """A store under cirlab's cache is moved by CIRLAB_CACHE; one a model config named (feature_cache_dir) is not."""
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "features" / "amc").write_text("a file where the store's folder would be")
    monkeypatch.setenv("CIRLAB_CACHE", str(cache))
    with caplog.at_level(logging.WARNING, logger="cirlab.core.featcache"):
        _fill(featcache.FeatureStore(cache / "features" / "amc" / "store", flush_rows=4), 3)
    assert [r.getMessage().rsplit("; ", 1)[1] for r in caplog.records] == \
        ["it is cirlab's cache: set CIRLAB_CACHE to a folder you can write to keep them"]
