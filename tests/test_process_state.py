"""A run gives its caller back what it set for the whole process (a notebook kernel or a script looping over runs):
the global random streams, the determinism switches of ``train.deterministic``, and the feature stores it opened
(written, their files let go)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

import cirlab
from cirlab.core import featcache
from cirlab.engine.train import kept_process_state

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "amc_synthetic_tiny.yaml"


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _seed(n: int) -> None:
    random.seed(n)
    np.random.seed(n)
    torch.manual_seed(n)


def test_a_run_leaves_the_callers_random_streams_where_they_were(tmp_path, monkeypatch):
    """A random search in a notebook (seed once, then draw a trial and run it, again and again) drew the same
    trial after its first run: the run had reseeded Python's, NumPy's and torch's streams with train.seed."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    _seed(123)
    expected = [_draws() for _ in range(3)]
    _seed(123)
    got = []
    for trial in range(3):
        got.append(_draws())
        config = cirlab.load_config(CONFIG, ["train.max_steps=1", "eval.splits=[val]"])
        cirlab.run_experiment(config, output_dir=tmp_path / f"trial{trial}")
    assert got == expected and len(set(got)) == 3


def test_train_deterministic_is_switched_back_off_after_its_run(tmp_path, monkeypatch):
    """A later run with deterministic: false still ran with deterministic algorithms and without cuDNN's
    autotuning, and the caller's own cudnn.benchmark was lost."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    config = cirlab.load_config(CONFIG, ["train.max_steps=1", "eval.splits=[val]", "train.deterministic=true"])
    seen = {}

    def record(*args, **kwargs):  # inside the run: the switches are on
        seen["during"] = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
        return real(*args, **kwargs)

    from cirlab.engine import runs
    real = runs._final_evaluation
    monkeypatch.setattr(runs, "_final_evaluation", record)
    cirlab.run_experiment(config, output_dir=tmp_path / "run")
    assert seen["during"] == (True, False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_the_stores_a_run_opened_are_written_and_let_go_at_its_end(tmp_path):
    """Held for the process's life, a store kept its segments mapped (one file descriptor each) after the run, so
    deleting the cache freed nothing and the next run read the deleted files; rows short of a segment were written
    only when the kernel exited."""
    folder = tmp_path / "store"
    with kept_process_state():
        store = featcache.open_store(folder)
        rows = torch.arange(12.0).reshape(3, 4)
        store.get_or_compute(rows, lambda x: x * 2)
        assert not folder.exists()  # 3 rows: short of a segment
    assert not featcache._STORES  # let go: the next run opens the folder again
    assert len(list(folder.glob("seg-*.keys.json"))) == 1  # written at the run's end, not at the process's
    again = featcache.open_store(folder)
    assert torch.equal(again.get_or_compute(rows, lambda x: x * 0), rows * 2)
    featcache.release_stores()
