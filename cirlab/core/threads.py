"""Thread policy for CPU runs: one intra-op thread where more would only wait for a core.

torch starts one intra-op thread per core and OpenMP threads spin while they wait. On a 2-core machine, or
whenever another process holds a core (a second pytest worker, a notebook kernel next to ``cirlab report``), the
threads of one small op then wait for each other: the demo's training notebook took 212 s with torch's default
2 threads on a loaded 2-core machine and 31 s with one. The policy:

* ``CIRLAB_THREADS=N`` (or an explicit ``threads=N``) wins;
* else one thread on machines with at most 2 cores, or when the 1-minute load average says the cores are
  already busy;
* else torch's default.

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
    if threads:
        return int(threads)
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: expected a whole number of threads") from None
    cores = os.cpu_count() or 1
    if cores <= 2:
        return 1
    try:
        busy = os.getloadavg()[0] > cores - 1  # every core but one already taken by other processes
    except OSError:  # not available on this platform
        busy = False
    return 1 if busy else None


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

    n = policy_threads(threads)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        logger.info("using %d intra-op thread%s (%s)", n, "" if n == 1 else "s",
                    "set" if threads or os.environ.get(ENV) else "cirlab's policy on a small or busy machine; "
                    f"set {ENV}=N to change it")
    return torch.get_num_threads()
