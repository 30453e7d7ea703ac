"""Thread policy for CPU runs: one intra-op thread where more would only wait for a core.

torch starts one intra-op thread per core and OpenMP threads spin while they wait. On a 2-core machine, or
whenever another process holds a core (a second pytest worker, a notebook kernel next to ``cirlab report``), the
threads of one small op then wait for each other: the demo's training notebook took 212 s with torch's default
2 threads on a loaded 2-core machine and 31 s with one. The policy:

* ``CIRLAB_THREADS=N`` (or an explicit ``threads=N``) wins, then a count the user gave OpenMP
  (``OMP_NUM_THREADS``, which torch's default follows too);
* else one thread where at most 2 CPUs are there for this process;
* else, in a job's allocation (a batch scheduler's ``SLURM_CPUS_PER_TASK``, or an affinity mask smaller than the
  machine), one thread per allocated CPU: those CPUs are the job's, so the node's load average, which counts
  the other jobs on the node, says nothing about them;
* else one thread when the 1-minute load average says the cores are already busy, torch's default otherwise.

CPUs are counted from the affinity mask (``taskset``, cgroups), not the machine's (``os.cpu_count``): a job given
8 CPUs of a 64-core node has 8.

OpenMP threads wait passively (``OMP_WAIT_POLICY=passive``; lower case: libgomp folds the case by the locale, and
under tr_TR it refused ``PASSIVE``) unless the user set a policy: a spinning waiter steals the core that another
process needs. That variable only acts before OpenMP starts, so the report sets
it for the kernels it launches, and :func:`thread_env` gives the environment for any child process.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)

ENV = "CIRLAB_THREADS"
CHILD_ENV = (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")  # every variable thread_env may set


def policy_threads(threads: int | None = None) -> int | None:
    """Intra-op threads the policy asks for; None = leave torch's default."""
    return _policy(threads)[0]


def _policy(threads: int | None) -> tuple[int | None, str]:
    """The policy's count (None: torch's default) and why, for the log line."""
    if threads:
        return int(threads), "set"
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            return max(1, int(value)), f"set by {ENV}"
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: expected a whole number of threads") from None
    omp = _leading_count(os.environ.get("OMP_NUM_THREADS", ""))
    if omp:
        return omp, f"set by OMP_NUM_THREADS; {ENV}=N changes it"
    cores, allocated = allocated_cpus()
    if cores <= 2:
        return 1, f"cirlab's policy with {cores} CPU{'' if cores == 1 else 's'}; set {ENV}=N to change it"
    if allocated:
        return cores, f"the {cores} CPUs allocated to this job; set {ENV}=N to change it"
    return (1, f"cirlab's policy on a busy machine; set {ENV}=N to change it") if _busy(cores) else (None, "")


def allocated_cpus() -> tuple[int, bool]:
    """The CPUs this process may run on, and whether that is an allocation smaller than the machine (a batch job's
    share of a node). The affinity mask where the platform has one (``os.cpu_count`` counts the whole node),
    capped by ``SLURM_CPUS_PER_TASK``: with SLURM's task affinity off, the mask is the whole node while the job
    was given fewer CPUs."""
    machine = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0)) or machine
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cores = machine
    slurm = _leading_count(os.environ.get("SLURM_CPUS_PER_TASK", ""))
    if slurm:
        return min(cores, slurm), True
    return cores, cores < machine


def _leading_count(value: str) -> int | None:
    """A positive count from a variable another program defines (``OMP_NUM_THREADS=4,2`` gives the outer level's
    4); None when unset or not a count: that program's setting, not cirlab's to refuse."""
    head = value.split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else None


def _busy(cores: int) -> bool:
    """Every core but one already taken by other processes, by the 1-minute load average of the machine."""
    try:
        return os.getloadavg()[0] > cores - 1
    except (AttributeError, OSError):  # not available on this platform
        return False


def thread_env(threads: int | None = None) -> dict[str, str]:
    """Environment variables that give a child process (a notebook kernel, a worker) the policy."""
    env = {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "passive"}
    n = policy_threads(threads)
    if n is not None:
        env.update({ENV: str(n), "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)})
    return env


@contextlib.contextmanager
def kept_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on leaving the block: a run applies the policy in this process (a
    notebook kernel, a script looping over runs), and the caller's own setting came back as 1 after training."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def apply_thread_policy(threads: int | None = None) -> int:
    """Set torch's intra-op threads by the policy in this process; returns the count in force."""
    import torch

    n, why = _policy(threads)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        logger.info("using %d intra-op thread%s (%s)", n, "" if n == 1 else "s", why)
    return torch.get_num_threads()


def launch_rank() -> int:
    """This process's rank as ``torchrun`` sets it (``RANK``; 0 outside a launcher, or for a value that is no whole
    number), known before the process group exists: the command line's logging and the run's writer ask it."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0
