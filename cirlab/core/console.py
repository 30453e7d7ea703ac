"""Whether this process is the ``cirlab`` command, and what Ctrl-C does once that command is stopping.

A command ends when its work does, so a second Ctrl-C (or one while Python shuts down) may end the process at
once, as an unhandled Ctrl-C does: a ``KeyboardInterrupt`` raised there could surface inside torch's C++ callbacks
or exit handlers (an abort with a core dump, "Exception ignored ..."). A notebook kernel, a Python prompt or a
script calling the API goes on after the call, so there Ctrl-C keeps raising ``KeyboardInterrupt``.
"""
from __future__ import annotations

import os
import signal
import threading

_CONSOLE = False  # set by cirlab.cli.console, the console script and `python -m cirlab`


def mark_console() -> None:
    """This process is the ``cirlab`` command (called once, before the command runs)."""
    global _CONSOLE
    _CONSOLE = True


def ends_with_ctrl_c() -> bool:
    """True in the ``cirlab`` command's main thread on POSIX (Windows has no Ctrl-C signal to re-raise: it would
    end the process with exit code 2, the code of a user error)."""
    return _CONSOLE and os.name == "posix" and threading.current_thread() is threading.main_thread()


def end_at_next_ctrl_c() -> None:
    """In the ``cirlab`` command, Ctrl-C from now on ends the process at once (not where Ctrl-C is ignored: a
    background job of a shell script)."""
    if ends_with_ctrl_c() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
