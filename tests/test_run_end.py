"""How a start of a run ended, written into its folder: ``provenance.json``'s start entry gets ``ended``, ``status``
and ``message``; ``train.log`` keeps the log lines (a traceback for an unexpected error), one block per start; the
lock file says what a stale lock means. One tiny AMC run on the synthetic data per test (a few seconds each)."""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest

import cirlab
from cirlab.core.errors import ConfigError
from cirlab.engine import runs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "amc_synthetic_tiny.yaml"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> dict:
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="cirlab")  # as the command logs (train.log takes what the loggers emit)
    return cirlab.load_config(CONFIG, ["train.max_steps=2", "eval.splits=[val]"])


def _starts(run: Path) -> list[dict]:
    return json.loads((run / "provenance.json").read_text())["starts"]


def _fail_final_evaluation(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def final_evaluation(*args, **kwargs):
        raise err

    monkeypatch.setattr(runs, "_final_evaluation", final_evaluation)  # after the training, inside _finishing


def _file_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger("cirlab").handlers if isinstance(h, logging.FileHandler)]


def test_a_finished_run_records_its_end_and_its_log_and_overwrite_keeps_the_new_log(config, tmp_path):
    run = tmp_path / "run"
    cirlab.run_experiment(config, output_dir=run)
    (entry,) = _starts(run)
    assert entry["status"] == "finished" and "message" not in entry
    assert entry["ended"] >= entry["started"] and entry["ended"].endswith("+00:00")
    text = (run / "train.log").read_text()
    assert text.splitlines()[0].split(" INFO cirlab: ")[1].startswith("=== start (fresh run")
    assert "INFO cirlab.engine.train: evaluating at step 2" in text
    assert "WARNING cirlab.engine.runs: dataset.root" in text
    assert not _file_handlers()  # removed (and closed) after the run

    # a second call in the same process, replacing the run: the trainer removes the previous run's files at its
    # start; train.log then holds this start's lines, each once (no second handler left over from the first call)
    cirlab.run_experiment(config, output_dir=run, overwrite=True)
    text = (run / "train.log").read_text()
    assert text.count("=== start") == 1 and "=== start (overwrite" in text
    assert text.count("evaluating at step 2") == 1 and text.count("evaluated val_dress") == 2  # selection, final
    assert [s["status"] for s in _starts(run)] == ["finished"]
    assert not _file_handlers()


@pytest.mark.parametrize("progress", ["log", "tqdm", "none"])
def test_train_log_follows_the_progress_whatever_the_console_shows(config, tmp_path, capsys, progress):
    """`tail -f run/train.log` follows a batch job: its progress lines are in train.log (they were only on stderr,
    or in the bar), and the console shows them as before: once as lines, or as the bar, or not at all."""
    config["train"]["progress"] = progress
    run = tmp_path / "run"
    console = _Names()  # a handler where the command's console handler would be
    logging.getLogger("cirlab").addHandler(console)
    try:
        cirlab.run_experiment(config, output_dir=run)
    finally:
        logging.getLogger("cirlab").removeHandler(console)
    text = (run / "train.log").read_text()
    for step in (1, 2):
        assert text.count(f"INFO cirlab.progress: train: step {step}/2 ") == 1, text
    assert "cirlab.engine.train" in console.names and "cirlab.progress" not in console.names  # not shown twice
    err = capsys.readouterr().err
    assert err.count("train: step 2/2 ") == (progress == "log")
    assert not any(isinstance(h, runs._TrainLog) for h in logging.getLogger("cirlab.progress").handlers)


def test_train_log_says_the_zone_of_its_times(config, tmp_path, monkeypatch):
    """A run started under TZ=America/St_Johns and resumed under UTC read as a gap of 3.5 hours in train.log: each
    start's line says the zone of the local times below it."""
    import time

    run = tmp_path / "run"
    monkeypatch.setenv("TZ", "America/St_Johns")
    time.tzset()
    try:
        cirlab.run_experiment(config, output_dir=run)
    finally:
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
    config["train"]["max_steps"] = 3
    cirlab.run_experiment(config, output_dir=run, resume=True, allow_config_change=True)
    monkeypatch.delenv("TZ")
    time.tzset()
    starts = [line for line in (run / "train.log").read_text().splitlines() if "=== start" in line]
    assert [s.split("times in ")[1].split(")")[0] for s in starts] in (
        [zone, "UTC"] for zone in ("UTC-03:30", "UTC-02:30")), starts  # standard or daylight time


class _Names(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)


def test_a_stopped_final_evaluation_is_recorded_and_resume_appends_to_the_log(config, tmp_path, monkeypatch):
    from cirlab.core.signals import StopSignalInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_final_evaluation(patch, StopSignalInterrupt(signal.SIGTERM))
        with pytest.raises(StopSignalInterrupt) as stopped:
            cirlab.run_experiment(config, output_dir=run)
    (entry,) = _starts(run)
    assert entry["status"] == "stopped (SIGTERM)" and entry["message"] == stopped.value.message
    assert entry["message"].startswith("SIGTERM: interrupted in the final evaluation: the training is done")
    assert f"ERROR cirlab: {entry['message']}" in (run / "train.log").read_text()

    cirlab.run_experiment(config, output_dir=run, resume=True)
    first, second = _starts(run)
    assert first["status"] == "stopped (SIGTERM)" and second["status"] == "finished"
    lines = (run / "train.log").read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if "=== start" in line]
    assert len(marks) == 2 and "=== start (resume" in lines[marks[1]] and marks[1] > 1
    assert "resumed from" in "\n".join(lines[marks[1]:])


def test_a_failed_run_is_recorded_and_a_start_that_failed_leaves_nothing(config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # before training: the folder it created goes, with no train.log in it
        patch.setattr(runs, "_prepare_data", lambda config: (_ for _ in ()).throw(ConfigError("no data here")))
        with pytest.raises(ConfigError):
            cirlab.run_experiment(config, output_dir=run)
        assert not run.exists()
        run.mkdir()  # an empty folder of the user's stays empty
        with pytest.raises(ConfigError):
            cirlab.run_experiment(config, output_dir=run)
        assert list(run.iterdir()) == []

    with monkeypatch.context() as patch:
        _fail_final_evaluation(patch, ConfigError("test split unreadable"))
        with pytest.raises(ConfigError) as failed:
            cirlab.run_experiment(config, output_dir=run)
    (entry,) = _starts(run)
    assert entry["status"] == "failed" and entry["message"] == " ".join(str(failed.value).split())
    assert entry["message"].startswith("test split unreadable; the training is done and saved")
    assert f"ERROR cirlab: {entry['message']}" in (run / "train.log").read_text()


def test_an_unexpected_error_in_the_final_evaluation_says_how_to_finish(config, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    boom = RuntimeError("CUDA out of memory (simulated)")
    _fail_final_evaluation(monkeypatch, boom)
    with pytest.raises(RuntimeError) as raised:
        cirlab.run_experiment(config, output_dir=run)
    assert raised.value is boom  # unchanged, its traceback kept
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("the training is done and saved in" in m and "--resume" in m for m in said)
    (entry,) = _starts(run)
    assert entry["status"] == "error" and entry["message"] == "RuntimeError: CUDA out of memory (simulated)"
    text = (run / "train.log").read_text()
    assert "the same command with --resume" in text
    assert "Traceback (most recent call last)" in text and text.rstrip().endswith(entry["message"])
    assert not _file_handlers()


def test_provenance_without_end_keys_still_reads_and_only_this_process_start_is_closed(tmp_path):
    from cirlab.core import provenance
    from cirlab.core.io import write_json

    old = {"started": "2026-01-01T00:00:00+00:00", "from_step": 0, "device": "cpu", "precision": "float32"}
    write_json(tmp_path / "provenance.json", {"starts": [old]})
    assert provenance.read_starts(tmp_path) == [old]
    assert provenance.record_end(tmp_path, "finished") is False  # no start of this process there: nothing written
    provenance.record_start(tmp_path, {**old, "started": "2026-01-02T00:00:00+00:00", "from_step": 4}, resumed=True)
    assert provenance.record_end(tmp_path, "failed", "non-finite loss") is True
    first, second = provenance.read_starts(tmp_path)
    assert first == old and second["status"] == "failed" and second["message"] == "non-finite loss"
    assert provenance.record_end(tmp_path, "finished") is False  # once


def test_the_lock_file_says_a_stale_lock_means_a_killed_process(tmp_path):
    from cirlab.core.io import LOCK_NAME, STALE_NOTE, folder_lock, lock_holder

    with folder_lock(tmp_path):
        text = (tmp_path / LOCK_NAME).read_text()
        assert text.startswith("pid ") and text.rstrip("\n").endswith(STALE_NOTE) and text.count("\n") == 1
        assert "killed" in STALE_NOTE and not lock_holder(tmp_path).endswith(STALE_NOTE.strip())


def test_the_start_line_names_the_command_provenance_records_and_overwrite_only_of_a_run(config, tmp_path,
                                                                                           monkeypatch):
    """A notebook run by `cirlab report` wrote its kernel's temporary argv into train.log (provenance.json has the
    report's command), and "overwrite" for a fresh folder a notebook passed overwrite=True for."""
    monkeypatch.setattr("sys.argv", ["/venv/lib/ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    monkeypatch.setenv("CIRLAB_REPORT_COMMAND", "cirlab report --only train")
    run = tmp_path / "nb"
    runs.run_experiment(config, output_dir=run, overwrite=True)
    first = (run / "train.log").read_text().splitlines()[0]
    assert "=== start (fresh run," in first and first.endswith("): cirlab report --only train"), first
    assert _starts(run)[-1]["command"] == ["cirlab", "report", "--only", "train"]


def _wait_for_exec(pid: int, word: bytes, timeout: float = 30.0) -> None:
    """Until process ``pid`` runs its own program (its command line holds ``word``): a busy machine had not exec'd
    the child yet when the run read its parent's command line, and the test failed on one core."""
    deadline = time.monotonic() + timeout
    while word not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, f"process {pid} did not start its program in {timeout:g} s"
        time.sleep(0.01)


def test_a_notebook_run_outside_the_report_records_the_command_that_started_its_kernel(config, tmp_path,
                                                                                      monkeypatch):
    """papermill's or JupyterLab's kernel recorded `ipykernel_launcher.py -f /tmp/tmpXXXX.json`, which says nothing
    about what ran: the kernel's parent's command line (papermill's, with the notebook and its parameters) is
    recorded, and the notebook JupyterLab names."""
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "notebooks/train.ipynb",
                               "-p", "max_steps", "2"])
    try:
        _wait_for_exec(parent.pid, b"max_steps")  # /proc/PID/cmdline is empty until the child has exec'd
        monkeypatch.setattr("sys.argv", ["/venv/lib/ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
        monkeypatch.setattr(runs.os, "getppid", lambda: parent.pid)
        monkeypatch.delenv("CIRLAB_REPORT_COMMAND", raising=False)
        monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/notebooks/train.ipynb")
        run = tmp_path / "nb"
        runs.run_experiment(config, output_dir=run, overwrite=True)
    finally:
        parent.kill()
        parent.wait()
    start = _starts(run)[-1]
    assert start["command"][-4:] == ["notebooks/train.ipynb", "-p", "max_steps", "2"]
    assert start["command"][0] == "-c"  # the interpreter left out, as a script's shebang puts it first
    assert start["notebook"] == "/home/me/notebooks/train.ipynb"
    assert (run / "train.log").read_text().splitlines()[0].endswith("notebooks/train.ipynb -p max_steps 2")
