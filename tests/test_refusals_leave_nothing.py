"""A refused ``cirlab train`` leaves nothing behind: neither a report of a pretrained start that never happened (in a
new folder, or over the finished run an ``--overwrite`` would have replaced) nor the empty parent folders of
``--output-dir`` it made; and a path the user may not read is one line, not a traceback."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
from pathlib import Path

import pytest

from cirlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
HREM = str(ROOT / "configs" / "hrem_synthetic_tiny.yaml")


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _hrem(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", HREM, "--set", "train.max_steps=1", "--set", "train.num_threads=1",
            "--set", f"dataset.synthetic.out={tmp_path / 'data'}", *extra]


def test_a_refused_start_keeps_the_finished_runs_init_report(tmp_path, caplog):
    """The pretrained start is loaded before the last refusals (here train.selection_metric): its report was written
    into the run folder at once, replacing the finished run's record of what it loaded; into a new folder it was
    left there, with the folders made for it."""
    first = tmp_path / "first"
    assert main(_hrem(tmp_path, "--output-dir", str(first))) == 0
    run = tmp_path / "run"
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--set", f"model_overrides.init_from={first}")) == 0
    report = run / "init_from.json"
    before = _digest(report)
    assert json.loads(report.read_text())["init_from"] == str(first)

    other = first / "checkpoints" / "best.pt"
    refused = ("--set", f"model_overrides.init_from={other}", "--set", "train.selection_metric=nosuch")
    caplog.clear()
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--overwrite", *refused)) == 2
    assert len(_errors(caplog)) == 1 and "selection_metric" in _errors(caplog)[0]
    assert _digest(report) == before  # the finished run's record of its start, as it was
    assert (run / "metrics.json").is_file()

    fresh = tmp_path / "new" / "x" / "run"
    assert main(_hrem(tmp_path, "--output-dir", str(fresh), *refused)) == 2
    assert not (tmp_path / "new").exists()

    # a start without a pretrained start, refused by the trainer (batch larger than the data): the report stays
    caplog.clear()
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--overwrite", "--set", "train.batch_size=5000")) == 2
    assert "batch_size" in _errors(caplog)[0] and _digest(report) == before

    # a start that happens writes its own report, with the other start files; one without a start removes it
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--overwrite",
                      "--set", f"model_overrides.init_from={other}")) == 0
    assert json.loads(report.read_text())["init_from"] == str(other)
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--overwrite")) == 0
    assert not report.exists()


def test_a_refused_start_removes_the_parent_folders_it_made(tmp_path, caplog):
    """Only the leaf of ``--output-dir`` was removed: ``np/a/b/`` stayed after ``--output-dir np/a/b/c``."""
    bad_root = ("--set", f"dataset.root={tmp_path / 'nonexistent' / 'x'}")
    assert main(_hrem(tmp_path, "--output-dir", str(tmp_path / "np" / "a" / "b" / "c"), *bad_root)) == 2
    assert not (tmp_path / "np").exists()

    mine = tmp_path / "mine"  # a folder that was there, with the user's file, stays as it was
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(_hrem(tmp_path, "--output-dir", str(mine / "a" / "b"), *bad_root)) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_made_folders_filled_meanwhile_are_kept(tmp_path):
    """A parent this command made but someone wrote into meanwhile is kept, with every folder above it."""
    from cirlab.engine.runs import _missing_top, _remove_made_folders

    leaf = tmp_path / "a" / "b" / "c"
    top = _missing_top(leaf)
    assert top == tmp_path / "a" and _missing_top(tmp_path) is None
    leaf.mkdir(parents=True)
    (tmp_path / "a" / "b" / "theirs.txt").write_text("x")
    _remove_made_folders(leaf, top)
    assert not leaf.exists() and (tmp_path / "a" / "b" / "theirs.txt").is_file()


def _deny_under(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Path.exists / is_dir / stat below ``denied`` raise EACCES, as Python 3.11 does under a folder the user may not
    read (a test run as root cannot be denied by chmod)."""
    real_stat = pathlib.Path.stat

    def stat(self: pathlib.Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if str(self).startswith(str(denied) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(pathlib.Path, "stat", stat)


def test_an_unreadable_dataset_root_is_one_line(tmp_path, caplog, monkeypatch):
    """``cirlab train --set dataset.root=<under a folder the user may not read>`` and ``cirlab data check --root``
    ended in a PermissionError traceback."""
    home = tmp_path / "otheruser"
    root = home / "data" / "f30k"
    root.mkdir(parents=True)
    _deny_under(monkeypatch, home)
    out = tmp_path / "runs" / "r"
    assert main(_hrem(tmp_path, "--output-dir", str(out), "--set", f"dataset.root={root}")) == 2
    [error] = _errors(caplog)
    assert "permission denied: ask its owner for access or choose another folder" in error
    assert str(home) in error and "\n" not in error
    assert not (tmp_path / "runs").exists()
    caplog.clear()
    assert main(["data", "check", "--dataset", "f30k", "--root", str(root)]) == 2
    [error] = _errors(caplog)
    assert str(root) in error and "permission denied" in error


def test_permission_errors_of_any_command_are_one_line(caplog):
    """The command runner said ENAMETOOLONG and a full disk in one line, but re-raised EACCES / EPERM."""
    from cirlab.cli import _run_command

    for code in (errno.EACCES, errno.EPERM):
        def denied(args: object, code: int = code) -> int:
            raise PermissionError(code, os.strerror(code), "/srv/theirs/data")

        caplog.clear()
        assert _run_command(type("Args", (), {"func": staticmethod(denied)})()) == 2
        assert _errors(caplog) == ["/srv/theirs/data: permission denied: ask its owner for access or choose another "
                                   "folder"]


def test_eval_of_a_run_whose_recorded_root_is_unreadable_names_root(tmp_path, caplog, monkeypatch):
    """``cirlab eval RUN`` whose config.yaml records a dataset root under a folder the user may not read (a colleague's
    home): a traceback in the check for gone recorded paths; now one line that suggests --root."""
    home = tmp_path / "otheruser"
    assert main(_hrem(tmp_path, "--output-dir", str(home / "setup"))) == 0  # generates the synthetic data
    root = tmp_path / "data" / "precomp"
    run = tmp_path / "run"
    assert main(_hrem(tmp_path, "--output-dir", str(run), "--set", f"dataset.root={root}")) == 0
    moved = home / "precomp"
    root.rename(moved)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(f"root: {root}", f"root: {moved}"))
    _deny_under(monkeypatch, home)
    caplog.clear()
    assert main(["eval", str(run)]) == 2
    [error] = _errors(caplog)
    assert str(moved) in error and "permission denied" in error and "--root PATH" in error, error


def test_an_unwritable_run_folder_names_what_chooses_it(tmp_path, monkeypatch, caplog):
    """CIRLAB_RUNS moves only a run folder neither --output-dir nor the config's output_dir names."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(_hrem(tmp_path, "--output-dir", str(a_file / "run"))) == 2
    assert _errors(caplog)[-1].endswith(f"({a_file} is a file); pass --output-dir FOLDER (in a notebook: "
                                        "output_dir=FOLDER)")
    monkeypatch.setenv("CIRLAB_RUNS", str(a_file))
    assert main(_hrem(tmp_path)) == 2
    assert _errors(caplog)[-1].endswith("output_dir=FOLDER) or set CIRLAB_RUNS")
