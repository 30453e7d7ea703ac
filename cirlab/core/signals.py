"""The stop signals a cirlab command takes as Ctrl-C (torch-free: ``cirlab data`` uses it without importing torch).

SIGTERM (a scheduler's time limit, ``kill``), SIGUSR1 (a scheduler's warning) and SIGHUP (a closed terminal) end a
process at once by default: a command killed that way leaves its lock and says nothing. Inside
:func:`stop_signals_interrupt` they raise :class:`StopSignalInterrupt`, a ``KeyboardInterrupt``, so that the clean-up
and message a command has for Ctrl-C run for them too. The training loop installs its own handler
(:mod:`cirlab.engine.train`, which stops after the step) with :func:`take_signals` / :func:`give_back_signals`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

# the signals that stop a run after its current step, those the platform has (Windows has neither SIGUSR1 nor
# SIGHUP): Ctrl-C, a scheduler's or kill's SIGTERM, SIGUSR1, the "time is nearly up" signal of batch schedulers
# (SLURM's --signal=USR1@300), and SIGHUP, a closed terminal or a dropped ssh connection
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP")
                     if hasattr(signal, name))


def take_signals(signals: Sequence[int], handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Installs ``handler`` for each of ``signals`` and returns the handlers it replaced. Main thread only (signal
    handlers live there); a signal this process was started with ignored stays ignored (a shell script's background
    job inherits Ctrl-C ignored, so that a Ctrl-C of its foreground command leaves it running); one this
    interpreter may not take (an embedded one) is left as it is."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in signals:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    return previous


def give_back_signals(previous: dict[int, Any]) -> None:
    """Puts back the handlers :func:`take_signals` replaced (once: ``previous`` is emptied)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    previous.clear()


class StopSignalInterrupt(KeyboardInterrupt):
    """SIGTERM, SIGUSR1 or SIGHUP where no training loop takes it, raised as Ctrl-C raises ``KeyboardInterrupt``;
    ``exit_code`` is 128 + the signal's number, the status an unhandled one gives, and ``message`` the command's
    line ("interrupted (SIGTERM)")."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(name)
        self.signum, self.exit_code, self.message = signum, 128 + signum, f"interrupted ({name})"


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM, SIGUSR1 and SIGHUP raise :class:`StopSignalInterrupt`, so that the caller's clean-up
    and message run for them as for Ctrl-C (which keeps its own handler); a second one acts as it did before the
    block. Main thread only, and a signal the process was started with ignored stays ignored."""
    def interrupt(signum: int, frame: Any) -> None:
        give_back_signals(previous)
        raise StopSignalInterrupt(signum)

    previous = take_signals([sig for sig in STOP_SIGNALS if sig != getattr(signal, "SIGINT", None)], interrupt)
    try:
        yield
    finally:
        give_back_signals(previous)
