"""Whether this process is the ``cirlab`` command, and what Ctrl-C does once that command is stopping.

A command ends when its work does, so a second Ctrl-C (or one while Python shuts down) may end the process at
once, as an unhandled Ctrl-C does: a ``KeyboardInterrupt`` raised there could surface inside torch's C++ callbacks
or exit handlers (an abort with a core dump, "Exception ignored ..."). A notebook kernel, a Python prompt or a
script calling the API goes on after the call, so there Ctrl-C keeps raising ``KeyboardInterrupt``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, TextIO

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


class _ReaderGone:
    """``sys.stdout`` of the command, which goes on quietly once the program reading it has closed the pipe
    (``cirlab models | head -3``): each print raised BrokenPipeError, a traceback for a pipe doing its job, and
    ``cirlab report | head`` stopped the report itself. The first such write points file descriptor 1 at
    ``os.devnull``: the rest of the output is dropped, as the reader asked, and the work goes on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(BrokenPipeError):
            self._stream.flush()  # what was buffered for the closed pipe now goes to devnull

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_a_closed_stdout() -> None:
    """In the ``cirlab`` command: a reader that stops reading stdout ends the output, not the command."""
    if not isinstance(sys.stdout, _ReaderGone) and sys.stdout is not None:
        sys.stdout = _ReaderGone(sys.stdout)  # type: ignore[assignment]


def live_frontend() -> bool:
    """Whether this process is a Jupyter kernel driven by a live frontend (JupyterLab, Notebook, VS Code).

    Live frontends send their execute requests with ``allow_stdin`` (they can answer ``input()``); papermill,
    nbclient and ``nbconvert --execute`` never do, so a headless run gets ``False`` here.
    """
    ipython = sys.modules.get("IPython")
    kernel = getattr(ipython.get_ipython(), "kernel", None) if ipython is not None else None
    if kernel is None or not hasattr(kernel, "get_parent"):
        return False
    try:
        return bool(kernel.get_parent().get("content", {}).get("allow_stdin", False))
    except Exception:  # noqa: BLE001 - an unusual kernel is simply not a live frontend
        return False


def wants_a_bar() -> bool:
    """A progress bar where someone watches it redraw: a terminal, or a live Jupyter frontend (its widget); log lines
    or nothing elsewhere (papermill, CI, a redirected stderr), where a bar is a wall of carriage returns. The one
    policy of the trainer's ``progress="auto"`` and the encoders' ``progress="auto"``. A terminal that reports no
    width or no height (some ``docker exec -t`` or CI pseudo-terminals; ``stty cols 120`` in a 0x0 one) gets lines:
    tqdm draws nothing at zero columns or zero rows."""
    return (sys.stderr.isatty() and min(_terminal_size()) > 0) or live_frontend()


def _terminal_size() -> tuple[int, int]:
    """(columns, rows) of stderr's terminal, as tqdm asks it ((0, 0) where it reports none)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines
