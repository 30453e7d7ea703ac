"""What cirlab ships besides its code: the notebooks and the run configs.

A wheel has no checkout around it, so the build (``setup.py``) copies ``notebooks/*.ipynb`` and ``configs/*.yaml``
into ``cirlab/_resources/``; an editable install reads the checkout's own folders. Everything that looks for them
asks :func:`resource_dir`, so the two layouts are decided in one place. Light: no torch, no numpy.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../cirlab
KINDS = ("notebooks", "configs")


def is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a cirlab source checkout (its pyproject names cirlab and it has ``notebooks/``)."""
    pyproject = folder / "pyproject.toml"
    try:
        return (folder / "notebooks").is_dir() and 'name = "cirlab"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        return False


def source_checkout() -> Path | None:
    """The checkout cirlab is imported from (an editable install), or None (an installed wheel)."""
    return PACKAGE_DIR.parent if is_checkout(PACKAGE_DIR.parent) else None


def resource_dir(kind: str) -> Path:
    """``notebooks/`` or ``configs/`` of the checkout cirlab is imported from (an editable install), else the copy
    shipped in the wheel (``cirlab/_resources/<kind>``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    checkout = source_checkout()
    return checkout / kind if checkout else PACKAGE_DIR / "_resources" / kind


def shipped_configs() -> list[str]:
    """The names of the run configs cirlab ships (``amc_synthetic_tiny``, ...), sorted."""
    return sorted(p.stem for p in resource_dir("configs").glob("*.yaml"))


def shipped_config(name: str | os.PathLike) -> Path | None:
    """The shipped run config named like ``name`` (its file name, with or without ``.yaml``), or None."""
    stem = Path(name).name.removesuffix(".yaml")
    path = resource_dir("configs") / f"{stem}.yaml"
    return path if stem and path.is_file() else None


def inside_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside the installed cirlab package (a wheel's site-packages copy): nothing a user runs
    may write there (``pip uninstall`` leaves such files behind, an upgrade mixes them with the new version's)."""
    if source_checkout():  # an editable install: the package folder is the user's checkout
        return False
    resolved = Path(path).expanduser().resolve()
    return resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents
