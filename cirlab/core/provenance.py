"""Which code, on which machine, ran a run: ``<run>/provenance.json`` holds one entry per start of the run (the
first, then each ``--resume``) with the versions, the git commit of the cirlab source, the command line, the host,
the device and precision in use, torch's intra-op thread count, and the settings a resume changed
(``--allow-config-change``). A start that ended in this process also says how (:func:`record_end`): ``ended``,
``status`` (finished, stopped (SIGNAME): the signal that stopped it, failed, error) and, unless finished, the
``message`` the command printed (a second stop signal, which ends the process at once, records ``stopped
(SIGNAME)`` before it does); a start without them was killed (or is running: its folder's lock is held)."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from cirlab.core.io import write_json

FILE_NAME = "provenance.json"
logger = logging.getLogger(__name__)
# run folder -> (index, "started", resumed) of the start this process appended last: record_end completes that entry
# and no other (an earlier process's start, or one a later --overwrite replaced, is not this process's to close)
_APPENDED: dict[str, tuple[int, str, bool]] = {}


# set by `cirlab report` for the notebook it runs: the command that regenerates the entry, recorded as the command of
# a run the notebook trains (a kernel's own argv is ipykernel_launcher and a temporary connection file)
REPORT_COMMAND_ENV = "CIRLAB_REPORT_COMMAND"
# set by `cirlab report` for the notebooks it runs: its output folder, whose tracked files it rewrites (a committed
# reports/), is left out of the dirty check, or each run it trains recorded "+ uncommitted changes" of its own making
REPORT_OUT_ENV = "CIRLAB_REPORT_OUT"


def code_version(root: Path | None = None, exclude: Sequence[str | os.PathLike] = ()) -> str:
    """``abc1234`` (``+ uncommitted changes`` when the work tree differs) of the checkout ``root`` (default: the one
    cirlab is imported from), or what identifies the code where there is none (an installed wheel: its version).
    Changes under the ``exclude`` folders, and under ``$CIRLAB_REPORT_OUT`` (:data:`REPORT_OUT_ENV`), are outputs,
    not code: they do not count."""
    from cirlab import __version__
    from cirlab.core.shipped import source_checkout

    root = root or source_checkout()
    if root is None:
        return f"cirlab {__version__} (installed, not a git checkout)"
    try:
        # git answers from the repository around root, which is another project's where root has no .git of its own
        # (an unpacked sdist inside a packaging repository or a dotfiles repo): only root's own commit is recorded
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return f"cirlab {__version__} (not a git checkout)"
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *_left_out(Path(root), exclude)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if head.returncode != 0:
        return f"cirlab {__version__} (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def command_line() -> list[str]:
    """This process's command line. In a Jupyter kernel, whose own (``ipykernel_launcher -f /tmp/tmpXXXX.json``)
    says nothing about what ran: in one `cirlab report` started, the report's command for the entry
    (:data:`REPORT_COMMAND_ENV`); else the command line of the process that started the kernel (papermill's, with
    the notebook and its parameters; JupyterLab's), where the system shows it (Linux's ``/proc``)."""
    import shlex

    in_kernel = bool(sys.argv) and Path(sys.argv[0]).name.startswith("ipykernel_launcher")
    if not in_kernel:
        return list(sys.argv)
    given = os.environ.get(REPORT_COMMAND_ENV, "").strip()
    if given:
        try:
            return shlex.split(given)
        except ValueError:  # not one command line: recorded as it was given
            return [given]
    return _parent_command() or list(sys.argv)


def _parent_command() -> list[str] | None:
    """The command line of this process's parent (Linux), or None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if len(words) > 1 and Path(words[0]).name.startswith("python"):  # a script's shebang: `python .../papermill`
        words = words[1:]
    return words or None


def _left_out(root: Path, exclude: Sequence[str | os.PathLike]) -> list[str]:
    """git pathspecs leaving out each folder of ``exclude`` (and ``$CIRLAB_REPORT_OUT``) that lies inside ``root``."""
    folders = [*exclude, *([os.environ[REPORT_OUT_ENV]] if os.environ.get(REPORT_OUT_ENV, "").strip() else [])]
    specs = []
    for folder in folders:
        try:
            inside = Path(folder).expanduser().resolve().relative_to(root.resolve())
        except ValueError:  # outside the checkout: git does not see it anyway
            continue
        if inside.parts:  # the checkout itself is not left out
            specs.append(f":(exclude){inside.as_posix()}")
    return specs


def _version(module: str) -> str | None:
    """The module's own ``__version__`` where it is imported (torch's names its build: ``2.14.1+cu130``), else
    the installed distribution's (importing transformers only for its version would take seconds)."""
    loaded = sys.modules.get(module)
    if getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed: nothing to record
        return None


def start_entry(step: int, device: str, precision: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This start's record: time, step it starts from, command line (and the notebook, where JupyterLab names it),
    code and library versions, host, device, precision and intra-op threads (a CPU run's losses differ in the last
    digits with another count)."""
    from cirlab import __version__

    notebook = os.environ.get("JPY_SESSION_NAME", "").strip()  # set by Jupyter Server for a notebook's kernel
    return {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "from_step": int(step),
            "command": command_line(), **({"notebook": notebook} if notebook else {}), "cirlab": __version__,
            "code": code_version(),
            "torch": _version("torch"), "transformers": _version("transformers"),
            "python": platform.python_version(), "host": platform.node(), "device": device,
            "precision": precision, "threads": _torch_threads(), **dict(extra or {})}


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def record_start(run_dir: Path, entry: Mapping[str, Any], resumed: bool = False) -> None:
    """Append ``entry`` to the run's ``provenance.json``; a fresh run (not ``resumed``) starts a new file."""
    path = Path(run_dir) / FILE_NAME
    starts: list[Any] = []
    if resumed and path.is_file():  # the earlier starts stay (a resume from a step-0 checkpoint too)
        try:
            starts = read_starts(run_dir)
        except (OSError, ValueError) as err:
            logger.warning("%s cannot be read (%s): its earlier entries are replaced by this start's", path, err)
    if starts:
        _say_other_threads(run_dir, starts[-1], entry)
    write_json(path, {"starts": [*starts, dict(entry)]})
    _APPENDED[_key(run_dir)] = (len(starts), str(entry.get("started")), bool(resumed))


def _key(run_dir: str | os.PathLike) -> str:
    return os.path.abspath(run_dir)


def recorded_start(run_dir: str | os.PathLike) -> bool | None:
    """Whether this process has recorded a start in ``run_dir`` that has not ended: None where not, else whether
    that start resumed the run (False: a fresh run's new provenance.json)."""
    appended = _APPENDED.get(_key(run_dir))
    return None if appended is None else appended[2]


def forget_start(run_dir: str | os.PathLike) -> None:
    """Forget the start this process recorded in ``run_dir`` (before a new one: a start appended by a bare
    ``cirlab.fit`` that never ended through :func:`record_end` must not be closed by a later run)."""
    _APPENDED.pop(_key(run_dir), None)


def record_end(run_dir: str | os.PathLike, status: str, message: str | None = None) -> bool:
    """Add ``ended`` (UTC time), ``status`` and ``message`` to the start this process appended to ``run_dir``'s
    provenance.json; False where it appended none (the run failed before its start was recorded). The file a failed
    first step removed is not written again, and a write that fails is a warning: the end of a run must never hide
    why it ended."""
    appended = _APPENDED.pop(_key(run_dir), None)
    if appended is None:
        return False
    index, started, _ = appended
    path = Path(run_dir) / FILE_NAME
    end = {"ended": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "status": status}
    if message:
        end["message"] = message
    try:
        if not path.is_file():  # a start that failed before its first step leaves no records
            return True
        starts = read_starts(run_dir)
        entry = starts[index] if index < len(starts) else None
        if not isinstance(entry, dict) or str(entry.get("started")) != started:
            return True  # rewritten since by someone else: the entry is not this process's any more
        starts[index] = {**entry, **end}
        write_json(path, {"starts": starts})
    except Exception as err:  # noqa: BLE001 - whatever it is, the run's own error or result goes first
        logger.warning("%s: cannot record how this start ended (%s: %s)", path, type(err).__name__, err)
    return True


def record_open_ends(status: str, message: str) -> None:
    """:func:`record_end` for every start this process appended and has not ended: the process is about to end by a
    signal (a second stop signal to the ``cirlab`` command), which leaves no exception for the run's own record."""
    for run_dir in list(_APPENDED):
        record_end(run_dir, status, message)


def _say_other_threads(run_dir: Path, previous: Any, entry: Mapping[str, Any]) -> None:
    """Warn when this start of a run uses another intra-op thread count than its previous start: torch sums in
    another order, so losses and metrics can differ in the last digits, and a resume is exact only with the count
    the run was interrupted with (a requeued job may land on a node with another allocation or load). A start
    recorded without a count (a run of an older cirlab) says nothing, nor does a start on a GPU, whose sums the
    CPU's threads do not order."""
    before = previous.get("threads") if isinstance(previous, Mapping) else None
    now = entry.get("threads")
    if not _is_count(before) or not _is_count(now) or before == now:
        return
    if not str(entry.get("device") or "cpu").startswith("cpu"):
        return
    logger.warning("%s: this start uses %d intra-op threads, its previous start used %d: results can differ in the "
                   "last digits, and an exact resume needs the same count (CIRLAB_THREADS=%d)", run_dir, now, before,
                   before)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_starts(run_dir: str | os.PathLike) -> list[Any]:
    """The entries of the run's ``provenance.json``, one per start (each a dict as :func:`start_entry` makes it, in
    a file cirlab wrote). OSError or ValueError when it cannot be read (a file from elsewhere may hold anything:
    no object, no list, JSON nested too deeply)."""
    try:
        data = json.loads((Path(run_dir) / FILE_NAME).read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    starts = data.get("starts") if isinstance(data, dict) else None
    if starts is not None and not isinstance(starts, list):
        raise ValueError(f"'starts' is a {type(starts).__name__}, not a list")
    return list(starts or [])
