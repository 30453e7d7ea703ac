"""The CPU thread policy (cirlab.core.threads)."""
from __future__ import annotations

import pytest
import torch

from cirlab.core import threads


def test_env_variable_wins(monkeypatch):
    monkeypatch.setenv("CIRLAB_THREADS", "3")
    assert threads.policy_threads() == 3
    assert threads.policy_threads(5) == 5  # an explicit count wins over the environment


def test_small_machine_gets_one_thread(monkeypatch):
    monkeypatch.delenv("CIRLAB_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.policy_threads() == 1


def test_busy_large_machine_gets_one_thread_idle_one_keeps_the_default(monkeypatch):
    monkeypatch.delenv("CIRLAB_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (15.5, 0.0, 0.0))
    assert threads.policy_threads() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert threads.policy_threads() is None


def test_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("CIRLAB_THREADS", "many")
    with pytest.raises(ValueError, match="CIRLAB_THREADS='many'"):
        threads.policy_threads()


def test_child_environment_waits_passively_and_apply_sets_torch(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("CIRLAB_THREADS", "1")
    env = threads.thread_env()
    # lower case: libgomp folds the case by the locale, and under tr_TR "PASSIVE" was refused (no I -> i)
    assert env["OMP_WAIT_POLICY"] == "passive" and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY" not in threads.thread_env()  # the user's own choice is kept
    before = torch.get_num_threads()
    try:
        assert threads.apply_thread_policy(2) == 2
    finally:
        torch.set_num_threads(before)


def test_a_run_gives_the_caller_its_thread_count_back(tmp_path, monkeypatch):
    """A notebook kernel set torch to 2 threads, trained (the policy set 1 on a small machine) and kept 1 for the
    rest of the session."""
    import torch

    from cirlab.engine.train import TrainConfig, train
    from stub_models import TripletItems

    import cirlab

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model = cirlab.create_model("stub_cir", "tiny")
        cfg = TrainConfig(epochs=1, max_steps=2, batch_size=8, num_threads=1, progress="none", tensorboard=False)
        train(model, TripletItems(16), cfg, output_dir=tmp_path / "run")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_evaluation_leaves_the_callers_random_numbers_alone():
    """Each DataLoader iteration without a generator of its own took a number from torch's global generator: after
    torch.manual_seed(0), the next torch.rand gave another value when an evaluation ran in between."""
    import torch

    from cirlab.engine.evaluate import encode_dataset

    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    encode_dataset(lambda batch: batch.float(), torch.arange(10), batch_size=4)
    assert torch.equal(torch.rand(1), expected)
