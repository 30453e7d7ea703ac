"""`cirlab report` under a wall clock that jumps: entry states come from run identities, durations from a monotonic
clock. A report folder can hold records of runs whose clocks disagree (another machine writing into a shared
reports/, a date that was wrong until NTP corrected it), so a newer run may carry an older time."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cirlab import report

AHEAD, CORRECT = "2026-12-08T06:00:{:02d}+00:00", "2026-12-07T06:00:{:02d}+00:00"


def _clock(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """Every record time from now on comes from ``pattern``, one second apart (a clock set as ``pattern`` says)."""
    ticks: Iterator[int] = iter(range(60))
    monkeypatch.setattr(report, "_now", lambda: pattern.format(next(ticks)))


def _notebook_writing(text: str, fail: bool = False) -> Callable[..., None]:
    """A stand-in for ``run_notebook``: writes ``text`` as the entry's metrics, then fails if asked."""
    def run(name: str, params: Any, folder: Path, *args: Any, **kwargs: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"run": text}))
        if fail:
            raise ValueError(f"{text} failed on purpose")
    return run


def _run(monkeypatch: pytest.MonkeyPatch, out: Path, name: str, text: str, fail: bool = False) -> None:
    monkeypatch.setattr(report, "run_notebook", _notebook_writing(text, fail))
    if fail:
        with pytest.raises(ValueError, match="on purpose"):
            report.run_entry(name, {}, out, commit="abc1234")
    else:
        report.run_entry(name, {}, out, commit="abc1234")


def _shown(out: Path, name: str) -> str:
    return json.loads((out / name / "metrics.json").read_text())["run"]


def test_a_prerequisite_rerun_after_a_clock_correction_marks_the_entry_stale(tmp_path, monkeypatch):
    _clock(monkeypatch, AHEAD)  # train and evaluate ran while the clock was a day ahead
    _run(monkeypatch, tmp_path, "train", "train 1")
    _run(monkeypatch, tmp_path, "evaluate", "evaluate 1")
    assert not report.entry_state(tmp_path, "evaluate")["stale"]
    _clock(monkeypatch, CORRECT)  # train again, the clock corrected: it finished "before" evaluate started
    _run(monkeypatch, tmp_path, "train", "train 2")
    train_finished = json.loads((tmp_path / "train" / report.RECORD).read_text())["finished"]
    assert report.entry_state(tmp_path, "evaluate")["stale"] == {"train": train_finished}
    assert "badge stale" in report.write_index(tmp_path).read_text()
    _run(monkeypatch, tmp_path, "evaluate", "evaluate 2")  # evaluate on the new train results: no longer stale
    assert not report.entry_state(tmp_path, "evaluate")["stale"]


def test_a_failure_after_a_clock_correction_is_shown(tmp_path, monkeypatch):
    _clock(monkeypatch, AHEAD)
    _run(monkeypatch, tmp_path, "evaluate", "good")
    _clock(monkeypatch, CORRECT)
    _run(monkeypatch, tmp_path, "evaluate", "broken", fail=True)
    assert _shown(tmp_path, "evaluate") == "good"
    assert report.entry_state(tmp_path, "evaluate")["failed"]["error"] == "broken failed on purpose"
    page = report.write_index(tmp_path).read_text()
    assert "badge failed" in page and "The last run failed" in page


def test_a_failure_older_than_the_results_shown_is_not_marked(tmp_path, monkeypatch):
    """A good run killed after its results were in place, before it cleared the failure mark of the run before."""
    _clock(monkeypatch, CORRECT)
    _run(monkeypatch, tmp_path, "evaluate", "good")
    _run(monkeypatch, tmp_path, "evaluate", "broken", fail=True)
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / report.FAILED_DIR, kept)
    _clock(monkeypatch, CORRECT.replace("06:00", "05:00"))  # the later good run's clock was behind
    _run(monkeypatch, tmp_path, "evaluate", "good again")
    shutil.copytree(kept, tmp_path / report.FAILED_DIR, dirs_exist_ok=True)  # its tidy-up never ran
    assert not report.entry_state(tmp_path, "evaluate")["failed"]


def test_a_run_killed_in_its_tidy_up_after_a_clock_correction_keeps_its_results(tmp_path, monkeypatch):
    """The next run repairs the folder: the finished run's results stand, although it started "before" the run it
    replaced."""
    _clock(monkeypatch, AHEAD)
    _run(monkeypatch, tmp_path, "evaluate", "old")
    _clock(monkeypatch, CORRECT)
    real_discard = report._discard

    def killed(folder: Path) -> None:
        if folder.name == ".evaluate.previous":
            raise KeyboardInterrupt  # the process dies before it deletes the previous results
        real_discard(folder)

    monkeypatch.setattr(report, "_discard", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, tmp_path, "evaluate", "new")
    monkeypatch.setattr(report, "_discard", real_discard)
    assert (tmp_path / ".evaluate.previous").is_dir() and _shown(tmp_path, "evaluate") == "new"
    _run(monkeypatch, tmp_path, "evaluate", "next", fail=True)  # the next run: repairs, then fails
    assert _shown(tmp_path, "evaluate") == "new"
    assert not (tmp_path / ".evaluate.previous").exists()


def test_an_entry_process_that_finished_is_recognised_by_its_run_id_not_its_time(tmp_path):
    """An entry process (--jobs > 1) killed in its tidy-up: the parent, which recorded an earlier start on a clock
    that was ahead, must not move the finished results to _failed/ and put the old ones back."""
    folder, previous = tmp_path / "evaluate", tmp_path / ".evaluate.previous"
    for path, run_id, started in ((previous, "old", AHEAD.format(0)), (folder, "new", CORRECT.format(5))):
        path.mkdir()
        (path / report.RECORD).write_text(json.dumps({"status": "ok", "run_id": run_id, "started": started}))
    parent = {"status": "failed", "run_id": "new", "started": AHEAD.format(1), "error": "stopped"}
    assert report._repair_entry(tmp_path, "evaluate", parent) is True
    assert json.loads((folder / report.RECORD).read_text())["run_id"] == "new"
    assert not previous.exists() and not (tmp_path / report.FAILED_DIR).exists()


def test_an_entry_process_that_died_midway_is_a_failure_naming_the_results_it_replaced(tmp_path):
    folder, previous = tmp_path / "evaluate", tmp_path / ".evaluate.previous"
    previous.mkdir()
    (previous / report.RECORD).write_text(json.dumps({"status": "ok", "run_id": "old", "started": AHEAD.format(0)}))
    folder.mkdir()
    (folder / "half.png").write_bytes(b"x")  # partial output, no record
    parent = {"status": "failed", "run_id": "new", "started": CORRECT.format(1), "error": "stopped"}
    assert report._repair_entry(tmp_path, "evaluate", parent) is False
    assert json.loads((folder / report.RECORD).read_text())["run_id"] == "old"
    assert (tmp_path / report.FAILED_DIR / "evaluate" / "half.png").is_file()
    assert report.entry_state(tmp_path, "evaluate")["failed"]["replaces"] == "old"  # shown as the latest run


def test_run_entry_records_the_run_id_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "run_notebook", _notebook_writing("x"))
    report.run_entry("quickstart", {}, tmp_path, commit="abc1234", run_id="given")
    assert json.loads((tmp_path / "quickstart" / report.RECORD).read_text())["run_id"] == "given"


def test_records_from_before_run_ids_keep_the_time_order(tmp_path):
    """Report folders written before records named runs: started/finished times decide, as they did."""
    records = {"train": {"status": "ok", "started": CORRECT.format(3), "finished": CORRECT.format(4)},
               "evaluate": {"status": "ok", "started": CORRECT.format(1), "finished": CORRECT.format(2)},
               f"{report.FAILED_DIR}/evaluate": {"status": "failed", "started": CORRECT.format(0)}}
    for name, record in records.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / report.RECORD).write_text(json.dumps(record))
    state = report.entry_state(tmp_path, "evaluate")
    assert state["stale"] == {"train": CORRECT.format(4)} and not state["failed"]


def _jumping_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """``time.time`` as a wall clock that can be set back an hour (returned: the function that does it)."""
    real, offset = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def set_back() -> None:
        offset[0] = -3600.0
    return set_back


def test_an_entry_duration_ignores_a_wall_clock_jump(tmp_path, monkeypatch):
    jump = _jumping_clock(monkeypatch)
    write = _notebook_writing("x")
    monkeypatch.setattr(report, "run_notebook", lambda *a, **k: (write(*a, **k), jump()))
    report.run_entry("quickstart", {}, tmp_path, commit="abc1234")
    duration = json.loads((tmp_path / "quickstart" / report.RECORD).read_text())["duration_s"]
    assert 0 <= duration < 60
    assert "after -" not in report.write_index(tmp_path).read_text()


def test_the_reports_progress_durations_ignore_a_wall_clock_jump(tmp_path, monkeypatch):
    jump = _jumping_clock(monkeypatch)

    def entry(name: str, params: Any, out: Path, *args: Any, **kwargs: Any) -> None:
        (out / name).mkdir(parents=True)
        (out / name / report.RECORD).write_text(json.dumps({"status": "ok", "commit": "abc1234"}))
        jump()

    monkeypatch.setattr(report, "run_entry", entry)
    stream = io.StringIO()
    assert report.run_report(tmp_path / "rep", only="quickstart", overrides={"data_root": str(tmp_path)},
                             stream=stream) == 0
    text = stream.getvalue()
    assert "quickstart: done in " in text and "report: 1 notebook(s) in " in text
    assert " in -" not in text, text
