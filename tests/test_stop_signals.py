"""How a run stops when a batch scheduler signals it: SIGTERM to the whole process group (DataLoader workers too),
SIGUSR1 before the time limit, a signal during an evaluation of the training loop or during the final evaluation.
Every stop writes ``last.pt``, says so in one line, exits with 128 + the signal's number, and ``--resume`` then
continues as if nothing had happened."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

import cirlab
from cirlab.engine.train import TrainConfig, TrainingInterrupted, train
from stub_models import TripletItems

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")

TINY = ["train", "amc_synthetic_tiny", "--set", "train.max_steps=null", "--set", "train.epochs=30"]


# ------------------------------------------------------------------------------------------- the cirlab command


@contextlib.contextmanager
def _cirlab(argv: list[str], err: Path, *, code: str = "", group: bool = False) -> Iterator[subprocess.Popen]:
    """``cirlab ARGV`` as its own process, stderr into ``err``; ``code`` runs first (a patch standing in for a slow
    part), ``group``: in a process group of its own, as a batch job's step is. A failed check leaves no process of
    it running."""
    script = f"{code}\nfrom cirlab.cli import console\nconsole()"
    # its temporary files beside err: a process killed with SIGKILL (and its DataLoader workers) cannot remove the
    # pymp-* folders multiprocessing made, which were left in /tmp by every run
    env = {**os.environ, "TMPDIR": str(err.parent)}
    with open(err, "w") as stream:
        proc = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.DEVNULL, stderr=stream,
                                start_new_session=group, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None and group:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
        proc.wait()


def _wait_for(proc: subprocess.Popen, err: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while text not in err.read_text():
        assert proc.poll() is None, err.read_text()[-3000:]
        assert time.time() < deadline, f"no {text!r} in time: {err.read_text()[-3000:]}"
        time.sleep(0.05)


def _ended(proc: subprocess.Popen, err: Path, timeout: float = 60) -> tuple[int, str]:
    return proc.wait(timeout=timeout), err.read_text()


def _saved_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]


def test_sigterm_to_the_process_group_stops_a_run_with_dataloader_workers_cleanly(tmp_path):
    """SLURM's time limit and scancel signal every process of the job: the workers died of SIGTERM, torch raised
    "DataLoader worker ... is killed" inside the checkpoint write (exit 2, blaming the disk) or in the next batch
    (a traceback, exit 1), last.pt an epoch behind. The workers leave the signal to the main process now."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with _cirlab([*TINY, "--set", "train.num_workers=2", "--output-dir", str(run)], err, group=True) as proc:
        _wait_for(proc, err, "train: step 13/")  # inside epoch 2: last.pt holds step 10 so far
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the main process and its DataLoader workers
        code, text = _ended(proc, err)
    stopped = re.search(r"SIGTERM: training stopped in epoch \d+, step (\d+); saved", text)
    assert code == 143 and stopped, text[-3000:]
    assert "Traceback" not in text and "cannot write checkpoint" not in text and "killed by signal" not in text
    assert _saved_step(run) == int(stopped.group(1)) > 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_dataloader_workers_end_with_a_main_process_that_was_killed(tmp_path):
    """The workers ignore stop signals (the main process stops them): after a second Ctrl-C or SIGTERM (which end
    the main process at once), SIGKILL or the OOM killer, they lived on until torch's watchdog noticed, seconds
    later, beside a run resumed at once. The kernel ends them with their parent now."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with _cirlab([*TINY, "--set", "train.num_workers=2", "--output-dir", str(run)], err, group=True) as proc:
        _wait_for(proc, err, "train: step 3/")
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 3
        while _running_in_group(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert _running_in_group(proc.pid) == [], "DataLoader workers outlived the killed main process"


def _running_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that still run (a zombie waiting for its reaper does not)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            running.append(int(stat.parent.name))
    return running


def test_sigusr1_stops_after_the_step_with_its_own_exit_status(tmp_path):
    """SIGUSR1 (#SBATCH --signal=USR1@300, "time is nearly up") ended the process at once, exit 138, with no line
    and last.pt at the previous epoch end. It stops as SIGTERM does now, and exits 138 = 128 + SIGUSR1."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with _cirlab([*TINY, "--output-dir", str(run)], err) as proc:
        _wait_for(proc, err, "train: step 13/")
        proc.send_signal(signal.SIGUSR1)
        code, text = _ended(proc, err)
    stopped = re.search(r"SIGUSR1: training stopped in epoch \d+, step (\d+); saved .*--resume", text)
    assert code == 128 + signal.SIGUSR1 and stopped, text[-3000:]
    assert "SIGUSR1 received: stopping after this step" in text
    assert _saved_step(run) == int(stopped.group(1)) > 10


def _hang_up_as_a_terminal_sends_it() -> None:
    """The run's SIGHUP as a shell in a terminal starts it: under `nohup make test` every child inherits it ignored,
    and cirlab keeps an ignored signal ignored (the run went on to exit 0, as a nohup'd run should)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_a_hang_up_stops_after_the_step_though_the_terminal_is_gone(tmp_path):
    """A closed terminal or a dropped ssh connection (SIGHUP) ended the run at once, exit 129 with no line, last.pt
    at the previous epoch end: everything since it was lost. It stops after the step as SIGTERM does now, and the
    progress lines written into the dead terminal (EIO) do not stop it first."""
    import pty

    run = tmp_path / "run"
    master, slave = pty.openpty()
    os.write(master, b"")  # the terminal is open while the run starts
    proc = subprocess.Popen([sys.executable, "-m", "cirlab", *TINY, "--set", "train.progress=log", "--output-dir",
                             str(run)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            start_new_session=True, preexec_fn=_hang_up_as_a_terminal_sends_it)
    os.close(slave)
    try:
        seen, deadline = b"", time.time() + 120
        while b"train: step 13/" not in seen:  # inside epoch 2: last.pt holds step 10 so far
            assert proc.poll() is None and time.time() < deadline, seen.decode(errors="replace")[-3000:]
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
        os.close(master)  # the terminal goes: every later write to it fails with EIO
        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGHUP
    assert _saved_step(run) > 13 - 1 and _saved_step(run) != 10


SLOW_VALIDATION = """
import sys, time
import cirlab.engine.runs as runs
real = runs.evaluate_split
def slow(*args, **kwargs):
    print("EVALUATING", file=sys.stderr, flush=True)
    time.sleep(60)  # a validation on real data, minutes long
    return real(*args, **kwargs)
runs.evaluate_split = slow
"""


def test_a_stop_signal_cuts_an_evaluation_inside_training_short(tmp_path):
    """The flag a signal set was read after the evaluation: an epoch-end validation on real data outlasts a
    cluster's grace period, and SIGKILL came first (last.pt an epoch behind). The evaluation stops at once now."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    argv = ["train", "amc_synthetic_tiny", "--output-dir", str(run), "--set", "train.max_steps=null"]
    with _cirlab(argv, err, code=SLOW_VALIDATION) as proc:
        _wait_for(proc, err, "EVALUATING")  # the validation at the end of epoch 1
        proc.send_signal(signal.SIGUSR1)
        code, text = _ended(proc, err, timeout=30)  # not after the 60 s evaluation
    assert code == 128 + signal.SIGUSR1, text[-3000:]
    assert "SIGUSR1 received: stopping the evaluation and saving checkpoints/last.pt" in text
    assert re.search(r"SIGUSR1: training stopped in epoch 1, step 10 before its evaluation \(the resumed run "
                     r"evaluates it\); saved .*last\.pt\. Resume with the same command plus --resume", text), text
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert saved["step"] == 10 and saved["evaluated_step"] != 10


def test_a_second_signal_records_how_the_start_ended_before_the_process_ends(tmp_path):
    """A second Ctrl-C ends the command at once, by the signal itself: no exception reached the run's record, and
    provenance.json kept a start with no end, as a killed run's (``cirlab runs``: no status)."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    argv = ["train", "amc_synthetic_tiny", "--output-dir", str(run), "--set", "train.max_steps=null"]
    ctrl_c = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's job has it"
    with _cirlab(argv, err, code=ctrl_c + SLOW_VALIDATION) as proc:
        _wait_for(proc, err, "EVALUATING")  # Ctrl-C lets the evaluation finish: a second one stops at once
        proc.send_signal(signal.SIGINT)
        _wait_for(proc, err, "SIGINT received: stopping after this evaluation")
        proc.send_signal(signal.SIGINT)
        code, text = _ended(proc, err, timeout=30)
    assert code == -signal.SIGINT, text[-3000:]
    end = json.loads((run / "provenance.json").read_text())["starts"][-1]
    assert end["status"] == "stopped (SIGINT)" and "ended" in end, end
    assert end["message"] == ("SIGINT received again: stopped at once; no checkpoints/last.pt was written by this "
                              "start")


SLOW_FINAL = """
import sys, time
import cirlab.engine.runs as runs
real = runs._final_evaluation
def slow(*args, **kwargs):
    print("FINAL EVALUATION", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
runs._final_evaluation = slow
"""


def test_sigterm_in_the_final_evaluation_is_one_line_with_its_status_and_resume_finishes(tmp_path):
    """After the training, SIGTERM (and SIGUSR1) ended the process in the final evaluation without a line; Ctrl-C
    there said that --resume finishes the run. Both say it now, with the signal's exit status."""
    from cirlab.cli import main

    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    argv = ["train", "amc_synthetic_tiny", "--output-dir", str(run), "--set", "train.max_steps=2"]
    with _cirlab(argv, err, code=SLOW_FINAL) as proc:
        _wait_for(proc, err, "FINAL EVALUATION")
        proc.send_signal(signal.SIGTERM)
        code, text = _ended(proc, err, timeout=30)
    assert code == 143, text[-3000:]
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert re.search(r"ERROR cirlab: SIGTERM: interrupted in the final evaluation: the training is done and saved "
                     r"in .*checkpoints; the same command with --resume .* runs the final evaluation", errors[0])
    assert not (run / "metrics.json").exists()
    assert main([*argv, "--resume"]) == 0 and (run / "metrics.json").is_file()


# ------------------------------------------------------------------------------------- the loop, in this process


def _model():
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset="tiny_dropout")


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=2e-2, log_every=1, tensorboard=False, progress="none",
                selection_metric="R@1", seed=3)
    return TrainConfig(**{**base, **kw})


class Validation:
    """An evaluation whose results follow the weights (so best.pt moves) and that draws from torch's generator (as
    a random subset would). With ``stop_at``, that call signals this process and then takes long."""

    def __init__(self, stop_at: int = 0, signum: int = signal.SIGTERM) -> None:
        self.stop_at, self.signum, self.calls, self.finished = stop_at, signum, 0, 0

    def __call__(self, model) -> dict:
        self.calls += 1
        noise = float(torch.rand(1))
        if self.calls == self.stop_at:
            os.kill(os.getpid(), self.signum)
            for _ in range(100):  # 10 s: a long evaluation
                time.sleep(0.1)
        self.finished += 1
        total = sum(float(p.double().sum()) for p in model.parameters())
        return {"val": {"R@1": 50 + 50 * math.sin(total * 7), "noise": noise}}


def _history(run: Path) -> tuple[dict[int, float], list[tuple[int, dict]]]:
    losses, evals = {}, []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
        elif record["kind"] == "eval":
            evals.append((record["step"], record["metrics"]))
    return losses, evals


@pytest.mark.parametrize("where, settings, stop_at, signum", [
    # the epoch-end validation of epoch 2 (step 10), with AMC's EMA copied into the weights before it
    ("epoch end", dict(ema_decay=0.9, ema_mode="paper_no_restore"), 2, signal.SIGTERM),
    # eval_every_steps at step 6, inside epoch 2 (calls: step 3, epoch end 5, step 6), EMA weights swapped in
    ("eval_every_steps", dict(epochs=2, eval_every_steps=3, ema_decay=0.9), 3, signal.SIGUSR1),
    # the evaluation of a max_steps stop inside an epoch (calls: epoch end 5, step 7)
    ("max_steps", dict(max_steps=7), 2, signal.SIGTERM),
])
def test_an_evaluation_cut_short_is_run_again_on_resume_as_in_an_uninterrupted_run(tmp_path, where, settings,
                                                                                   stop_at, signum):
    data = TripletItems(40)  # 5 steps per epoch
    reference = train(_model(), data, _cfg(**settings), output_dir=tmp_path / "ref", evaluate_fn=Validation())

    run, stopping = tmp_path / "run", Validation(stop_at, signum)
    t0 = time.time()
    previous = signal.signal(signum, lambda *args: None)  # a loop that left the signal alone: no end of pytest
    try:
        with pytest.raises(TrainingInterrupted, match="before its evaluation") as caught:
            train(_model(), data, _cfg(**settings), output_dir=run, evaluate_fn=stopping)
    finally:
        signal.signal(signum, previous)
    assert time.time() - t0 < 8 and stopping.finished == stop_at - 1  # cut short, not waited for
    assert caught.value.exit_code == 128 + signum
    resumed = train(_model(), data, _cfg(**settings, resume="auto"), output_dir=run, evaluate_fn=Validation())

    assert _history(run) == _history(tmp_path / "ref")  # every loss, every evaluation (its draw too), once
    for key in ("best_step", "best_score", "steps"):
        assert resumed[key] == reference[key], key
    for name in ("best.pt", "last.pt"):
        got = torch.load(run / "checkpoints" / name, weights_only=True)["model"]
        want = torch.load(tmp_path / "ref" / "checkpoints" / name, weights_only=True)["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), (where, name)


class _ItemsWithABadImage(TripletItems):
    def __getitem__(self, i: int):
        if i == 5:
            from cirlab.data.base import DataError

            raise DataError("cannot read image: truncated PNG", file="/data/images/x5.png", kind="unreadable_image")
        return super().__getitem__(i)


def test_a_data_error_in_a_training_worker_stops_the_run_as_itself(tmp_path):
    """A DataError raised in a DataLoader worker came back as torch's rebuild of it (the worker's traceback as its
    message, no file, kind "invalid"): the cirlab command printed the traceback on its one error line."""
    seen = []
    for workers in (0, 2):
        with pytest.raises(Exception) as err:
            train(_model(), _ItemsWithABadImage(16), _cfg(num_workers=workers), output_dir=tmp_path / f"w{workers}")
        seen.append((type(err.value).__name__, str(err.value), err.value.file, err.value.kind))
    assert seen[0] == seen[1] == ("DataError", "/data/images/x5.png: cannot read image: truncated PNG",
                                  "/data/images/x5.png", "unreadable_image")


def test_ctrl_c_lets_an_evaluation_inside_training_finish_then_stops(tmp_path):
    """Only a scheduler's SIGTERM / SIGUSR1 cut an evaluation short: Ctrl-C in a notebook raised an exception inside
    whatever library code the evaluation was running."""
    data = TripletItems(40)
    stopping = Validation(2, signal.SIGINT)
    # Ctrl-C as a terminal's Python has it: a test run started in the background (`make test &`, nohup) inherits
    # SIGINT ignored, which the training loop respects (it then installs no handler of its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match="SIGINT") as caught:
            train(_model(), data, _cfg(), output_dir=tmp_path / "run", evaluate_fn=stopping)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopping.finished == 2 and "before its evaluation" not in str(caught.value)  # it ran to its end
    assert caught.value.exit_code == 130


def test_a_second_signal_says_where_the_run_resumes_from(caplog):
    """A double Ctrl-C ended the run without a line, and `cirlab runs` then showed the last logged step (14) while
    --resume continued from last.pt's (10)."""
    from cirlab.engine.train import _StopSignals

    stop = _StopSignals()
    stop.signum, stop.saved_step = signal.SIGINT, 10  # the first Ctrl-C was taken; last.pt holds step 10
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):  # in-process: the caller's interrupt
        stop._handle(signal.SIGINT, None)
    assert "SIGINT received again: stopping at once; checkpoints/last.pt holds step 10: --resume continues from " \
           "there" in caplog.text
