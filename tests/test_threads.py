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
