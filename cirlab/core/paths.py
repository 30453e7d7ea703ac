"""The one place where default locations are resolved (environment variables, never hard-coded paths)."""
from __future__ import annotations

import os
from pathlib import Path


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


def cache_dir() -> Path:
    """Cache for derived assets (emoji set, feature caches): ``$CIRLAB_CACHE``, else ``$XDG_CACHE_HOME/cirlab``."""
    xdg = _env_path("XDG_CACHE_HOME", Path.home() / ".cache")
    return _env_path("CIRLAB_CACHE", xdg / "cirlab")


def runs_dir() -> Path:
    """Where training runs are written: ``$CIRLAB_RUNS``, else ``./runs``."""
    return _env_path("CIRLAB_RUNS", Path.cwd() / "runs")


def resolve_root(root: str | os.PathLike | None, subdir: str = "") -> Path:
    """An explicit root if given (non-empty), else ``data_root() / subdir``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    return data_root() / subdir if subdir else data_root()
