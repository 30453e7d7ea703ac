"""Dataset layouts read exactly as the public releases ship them, plus the paper transforms and a tree checker.

::

    split = cirlab.data.load_cir("fashioniq", root, "val", category="dress")   # or "shoes", "cirr"
    split = cirlab.data.load_precomp(root, "f30k", "test")
    problems = cirlab.data.check_dataset("cirr", root)

The layouts are documented in ``docs/datasets.md`` and in each module's docstring. Loading validates eagerly and raises
:class:`DataError` (a ``ValueError``) naming the file and the entry; a split or category the dataset does not have
raises :class:`UnknownNameError` (``.field``, ``.name``). Submodules load on first use, so importing this
package stays cheap (no torch, no numpy).
"""
from __future__ import annotations

import importlib
from typing import Any

from cirlab.core.errors import UnknownNameError
from cirlab.data.base import CIRSplit, DataError, Problem, Triplet, load_cir

_LAZY = {
    "load_precomp": "cirlab.data.precomp:load_precomp",
    "PrecompSplit": "cirlab.data.precomp:PrecompSplit",
    "check_dataset": "cirlab.data.check:check_dataset",
    "format_problems": "cirlab.data.check:format_problems",
    "build_transform": "cirlab.data.transforms:build_transform",
    "default_transform": "cirlab.data.transforms:default_transform",
    "list_transforms": "cirlab.data.transforms:list_transforms",
}

__all__ = ["CIRSplit", "DataError", "Problem", "Triplet", "UnknownNameError", "load_cir", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'cirlab.data' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
