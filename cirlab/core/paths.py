"""The one place where default locations are resolved (environment variables, never hard-coded paths), and where
environment variables a call sets for itself are given back (:func:`environ_kept`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

from cirlab.core.errors import ConfigError


class NoHomeError(ConfigError, RuntimeError):
    """No home directory to put a default location in (no ``HOME``, a user id without a passwd entry: a container
    run with ``--user``); the message names the variable that sets the location instead. A RuntimeError too, as
    ``Path.home()`` raises, for callers that catch that."""


@contextlib.contextmanager
def environ_kept(keys: Sequence[str]) -> Iterator[None]:
    """``os.environ``'s values of ``keys`` (or their absence) as they were before the block, after it."""
    before = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def user_path(value: str) -> str:
    """A path option as a shell would give it unquoted: ``~`` expanded (argparse ``type=``). A quoted ``~`` from a
    script made a folder named ``~`` in the working folder for some options and not for others."""
    return os.path.expanduser(value)


def _env_path(var: str, fallback: Path) -> Path:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else fallback


def data_root() -> Path:
    """Root of the datasets: ``$CIRLAB_DATA``, else ``./data`` relative to the working directory."""
    return _env_path("CIRLAB_DATA", Path.cwd() / "data")


# the cache's folders of generated data sets (synthetic.ensure's and the emoji builder's defaults): the data sets a
# run marks as read (engine.runs.mark_reading) and cirlab cache lists as such (workbench.cache.GENERATED_AREAS)
GENERATED_DATA = ("synthetic", "emoji")


def cache_dir() -> Path:
    """Cache for derived assets (emoji set, feature caches): ``$CIRLAB_CACHE``, else ``$XDG_CACHE_HOME/cirlab``,
    else ``~/.cache/cirlab``. The home directory is looked up only when neither variable is set: a batch job
    without one that sets ``CIRLAB_CACHE`` works."""
    for var, below in (("CIRLAB_CACHE", ""), ("XDG_CACHE_HOME", "cirlab")):
        value = os.environ.get(var, "").strip()
        if value:
            return _expand(value, var) / below
    return home("set CIRLAB_CACHE to a folder for cirlab's cache") / ".cache" / "cirlab"


def home(fix: str) -> Path:
    """The user's home directory, or a one-line :class:`NoHomeError` ending in ``fix`` (what to set instead)."""
    try:
        return Path.home()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry for this user id
        raise NoHomeError(f"no home directory (HOME is not set and user id {_uid()} has no passwd entry): "
                          f"{fix}") from None


def _expand(value: str, var: str) -> Path:
    """``value`` of ``var`` with a leading ``~`` expanded; one line when that needs a home directory there is not."""
    try:
        return Path(value).expanduser()
    except (RuntimeError, KeyError, OSError):
        raise NoHomeError(f"{var}={value}: no home directory to expand '~' against (HOME is not set and user id "
                          f"{_uid()} has no passwd entry); give {var} without '~'") from None


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "?"


def runs_dir() -> Path:
    """Where training runs are written: ``$CIRLAB_RUNS``, else ``./runs``."""
    return _env_path("CIRLAB_RUNS", Path.cwd() / "runs")


def resolve_root(root: str | os.PathLike | None, subdir: str = "") -> Path:
    """An explicit root if given (non-empty), else ``data_root() / subdir``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    return data_root() / subdir if subdir else data_root()
