"""The trainer's progress display: a tqdm.auto bar in terminals and JupyterLab, one line per logged step elsewhere,
and a warning when max_steps cuts the epochs short."""
from __future__ import annotations

import logging

import pytest

from cirlab.core import console
from cirlab.engine import train as train_mod
from cirlab.engine.train import TrainConfig, _RunLog


def record(step: int, loss: float = 0.5) -> dict:
    return {"kind": "train", "epoch": 0, "step": step, "lr": 1e-3, "loss": loss}


def test_headless_runs_print_each_logged_step_once_with_eta(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "live_frontend", lambda: False)
    log = _RunLog(tmp_path, TrainConfig(epochs=2, progress="auto", tensorboard=False), 40, True, 0, steps_per_epoch=20)
    assert log.bar is None and log.lines  # pytest's stderr is no terminal, no Jupyter frontend: lines
    for step in (1, 10, 20):
        log.progress(record(step))
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[1].split(" ", 2)[2].startswith("train: step 10/40 (25%) epoch 1 loss 0.5000 lr "
                                                                 "1.00e-03")
    assert "elapsed, ETA" in err[2]


def test_a_live_jupyter_frontend_or_a_terminal_gets_a_tqdm_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "live_frontend", lambda: True)
    log = _RunLog(tmp_path, TrainConfig(epochs=1, progress="auto", tensorboard=False), 10, True, 0)
    try:
        assert log.bar is not None and not log.lines
        log.progress(record(1))
        assert log.bar.n == 1 and log.bar.total == 10 and "loss" in str(log.bar.postfix)
    finally:
        log.close()
    assert _RunLog(tmp_path, TrainConfig(epochs=1, progress="none", tensorboard=False), 10, True, 0).bar is None


def test_max_steps_that_cuts_epochs_short_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cirlab.engine.train"):
        _RunLog(tmp_path, TrainConfig(epochs=3, max_steps=6, progress="none", tensorboard=False), 6, True, 0,
                steps_per_epoch=30)
    assert any("max_steps=6" in r.getMessage() and "3 epochs" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cirlab.engine.train"):
        _RunLog(tmp_path, TrainConfig(epochs=3, max_steps=90, progress="none", tensorboard=False), 90, True, 0,
                steps_per_epoch=30)
    assert not caplog.records  # max_steps covers every epoch: nothing to say


@pytest.mark.parametrize("seconds,text", [(42, "42s"), (185, "3m05s"), (3720, "1h02m")])
def test_durations_read_like_a_clock(seconds, text):
    assert train_mod._duration(seconds) == text


def test_a_log_line_during_a_terminal_bar_is_written_above_it_not_onto_it(tmp_path, capsys, monkeypatch):
    """An evaluation's INFO line (or a warning) mid-training was written onto the bar's line on a terminal, leaving a
    stale bar frame glued to it in the scrollback and in script/tmux logs. The user's handlers keep their levels,
    filters and streams meanwhile (a first fix through tqdm's logging_redirect_tqdm lost a script's WARNING-to-stderr
    handler and let INFO lines through it)."""
    import sys

    monkeypatch.setattr(console, "live_frontend", lambda: False)
    root = logging.getLogger()
    infos = logging.StreamHandler(sys.stdout)  # a script's routing: INFO to stdout, WARNING and above to stderr
    infos.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    for handler in (infos, warnings):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        log = _RunLog(tmp_path, TrainConfig(epochs=1, progress="tqdm", tensorboard=False), 10, True, 0)
        for step in (1, 2, 3):
            log.progress(record(step))
        logging.getLogger("cirlab.engine.train").info("evaluating at step 3")
        logging.getLogger("cirlab.engine.train").warning("a warning at step 3")
        log.progress(record(4))
        log.close()
        restored = all("emit" not in vars(h) for h in (infos, warnings))  # the handlers as they were
    finally:
        for handler in (infos, warnings):
            root.removeHandler(handler)
        root.setLevel(level)
    captured = capsys.readouterr()
    assert captured.out == "INFO cirlab.engine.train: evaluating at step 3\n"  # its handler, its stream, once
    [said] = [line for line in captured.err.split("\n") if "a warning at step 3" in line]
    assert said.split("\r")[-1] == "WARNING cirlab.engine.train: a warning at step 3"  # a line of its own
    assert "evaluating at step 3" not in captured.err and restored


def test_nested_bars_keep_the_outer_bars_handling_and_a_users_own_emit():
    """The inner bar's exit removed the outer bar's wrapper (and an emit a user had set on the handler)."""
    import sys

    from tqdm import tqdm

    handler = logging.StreamHandler(sys.stderr)
    mine = handler.emit
    handler.emit = mine  # a user's own, set on the instance
    logging.getLogger().addHandler(handler)
    try:
        with train_mod._lines_above_the_bar(tqdm):
            outer = handler.emit
            with train_mod._lines_above_the_bar(tqdm):
                assert handler.emit is not outer
            assert handler.emit is outer
        assert handler.emit is mine
    finally:
        logging.getLogger().removeHandler(handler)
