"""The CPU thread policy (cirlab.core.threads)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from cirlab.core import provenance, threads


def machine(monkeypatch, cpus: int, allowed: int | None = None, load: float = 0.0, **env: str) -> None:
    """This process on a machine of ``cpus`` cores, of which it may run on ``allowed`` (its affinity mask; default
    all), with that 1-minute load average and only the given thread variables set."""
    for var in ("CIRLAB_THREADS", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(allowed or cpus)), raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, 0.0, 0.0))


def test_env_variable_wins(monkeypatch):
    monkeypatch.setenv("CIRLAB_THREADS", "3")
    assert threads.policy_threads() == 3
    assert threads.policy_threads(5) == 5  # an explicit count wins over the environment


def test_small_machine_gets_one_thread(monkeypatch):
    machine(monkeypatch, 2)
    assert threads.policy_threads() == 1


def test_busy_large_machine_gets_one_thread_idle_one_keeps_the_default(monkeypatch):
    machine(monkeypatch, 16, load=15.5)
    assert threads.policy_threads() == 1
    machine(monkeypatch, 16, load=2.0)
    assert threads.policy_threads() is None


def test_a_slurm_job_uses_its_allocated_cpus_on_a_busy_node(monkeypatch):
    """A job given 8 CPUs of a 64-core node full of other users' jobs got 1 thread: the policy counted the node's
    cores and read the node's load average."""
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="8")
    assert threads.policy_threads() == 8
    machine(monkeypatch, 64, allowed=4, load=63.5, SLURM_CPUS_PER_TASK="8")
    assert threads.policy_threads() == 4  # the mask is what the process may run on
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="2")
    assert threads.policy_threads() == 1  # a small allocation is a small machine
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="a lot")
    assert threads.policy_threads() == 1  # not a count: the node's policy, no error for SLURM's variable


def test_an_affinity_mask_counts_the_cpus_and_ignores_the_nodes_load(monkeypatch):
    machine(monkeypatch, 64, allowed=8, load=63.5)  # taskset, a cgroup cpuset: no SLURM variable
    assert threads.policy_threads() == 8
    machine(monkeypatch, 64, allowed=2, load=0.0)
    assert threads.policy_threads() == 1
    machine(monkeypatch, 8, load=0.0)
    monkeypatch.delattr(threads.os, "sched_getaffinity")  # macOS, Windows: the machine's count
    assert threads.policy_threads() is None


def test_overrides_win_over_the_allocation(monkeypatch):
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="8", CIRLAB_THREADS="3")
    assert threads.policy_threads() == 3
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="8", OMP_NUM_THREADS="6")
    assert threads.policy_threads() == 6
    machine(monkeypatch, 64, load=63.5, OMP_NUM_THREADS="4,2")  # OpenMP's nested form: the outer level
    assert threads.policy_threads() == 4


def test_the_log_line_says_the_count_comes_from_the_allocation(monkeypatch, caplog):
    machine(monkeypatch, 64, load=63.5, SLURM_CPUS_PER_TASK="3")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with caplog.at_level(logging.INFO, logger="cirlab.core.threads"):
            assert threads.apply_thread_policy() == 3
    finally:
        torch.set_num_threads(before)
    assert "using 3 intra-op threads (the 3 CPUs allocated to this job; set CIRLAB_THREADS=N" in caplog.text


# ------------------------------------------------------------------------------------ thread count in provenance


def _start(run, threads_now: int, resumed: bool, device: str = "cpu") -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads_now)
        provenance.record_start(run, provenance.start_entry(0, device, "float32"), resumed=resumed)
    finally:
        torch.set_num_threads(before)


def test_each_start_records_its_thread_count_and_a_change_is_warned_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cirlab.core.provenance"):
        _start(tmp_path, 1, resumed=False)
        _start(tmp_path, 1, resumed=True)
        assert not caplog.records
        _start(tmp_path, 2, resumed=True)
    assert [s["threads"] for s in provenance.read_starts(tmp_path)] == [1, 1, 2]
    [warning] = caplog.records
    assert "this start uses 2 intra-op threads, its previous start used 1" in warning.getMessage()
    assert "exact resume needs the same count (CIRLAB_THREADS=1)" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cirlab.core.provenance"):
        _start(tmp_path, 1, resumed=True, device="cuda:0")  # the GPU's sums: not ordered by the CPU's threads
    assert not caplog.records


def test_a_run_recorded_without_thread_counts_resumes_without_a_warning(tmp_path, caplog):
    old = provenance.start_entry(0, "cpu", "float32")
    old.pop("threads", None)  # provenance.json of an older cirlab
    (tmp_path / provenance.FILE_NAME).write_text(json.dumps({"starts": [old]}))
    with caplog.at_level(logging.WARNING, logger="cirlab.core.provenance"):
        _start(tmp_path, 2, resumed=True)
    assert not caplog.records
    assert [s.get("threads") for s in provenance.read_starts(tmp_path)] == [None, 2]


def test_a_resume_with_another_thread_count_is_warned_by_training(tmp_path, caplog):
    from cirlab.engine.train import TrainConfig, train
    from stub_models import TripletItems

    import cirlab

    def run(threads_now: int, steps: int, resume: str = "") -> None:
        cfg = TrainConfig(epochs=1, max_steps=steps, batch_size=4, num_threads=threads_now, progress="none",
                          tensorboard=False, resume=resume)
        train(cirlab.create_model("stub_cir", "tiny"), TripletItems(16), cfg, output_dir=tmp_path / "run")

    before = torch.get_num_threads()
    try:
        run(1, 2)
        with caplog.at_level(logging.WARNING, logger="cirlab.core.provenance"):
            run(2, 4, resume="auto")
    finally:
        torch.set_num_threads(before)
    assert [s["threads"] for s in provenance.read_starts(tmp_path / "run")] == [1, 2]
    assert "its previous start used 1" in caplog.text


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
