"""Checkpoints: atomic writes, safe loads (``weights_only=True``), clear errors on damaged files.

A cirlab checkpoint is a plain dict saved with :func:`torch.save`, holding only tensors and primitive
containers so that it loads with ``torch.load(weights_only=True)``::

    {"format": "cirlab-checkpoint-v1", "model": state_dict, "model_name": str, "model_config": dict,
     "optimizer": ..., "schedule": ..., "ema": ..., "scaler": ..., "rng": ..., "progress": ..., "train_config": dict}

Some checkpoints released with the papers (e.g. AMC's ``train_model.pt``) pickle the whole model object. Those
execute arbitrary code on load, so they are refused unless the caller passes ``trust_pickle=True`` (CLI:
``--trust-pickle``), which logs a warning.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from cirlab.core.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "cirlab-checkpoint-v1"


from cirlab.core.errors import CheckpointError  # noqa: E402  (re-exported: raised and caught by this name)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    A crash mid-write leaves the previous file at ``path`` untouched (the last good checkpoint survives).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", trust_pickle: bool = False) -> Any:
    """Load a checkpoint with ``weights_only=True``; pickled objects only when ``trust_pickle`` is set.

    Returns the loaded object (a dict for cirlab checkpoints; possibly an ``nn.Module`` for trusted
    pickled checkpoints). Raises :class:`CheckpointError` naming the file when it is missing, truncated,
    corrupt, or holds pickled code while ``trust_pickle`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_weights_only_refusal(err):
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({err})") from err
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects (e.g. a whole model), which can run "
                "arbitrary code when loaded. cirlab refuses it by default; if you trust its source, pass "
                "trust_pickle=True (CLI: --trust-pickle)."
            ) from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError/KeyError/EOFError... for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from err
    logger.warning("loading %s with weights_only=False (--trust-pickle): pickled code in it runs now", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"checkpoint {path} could not be unpickled ({type(err).__name__}: {err})") from err


def _is_weights_only_refusal(err: Exception) -> bool:
    # torch raises UnpicklingError both for refused globals ("Weights only load failed") and for garbage bytes
    text = str(err)
    return "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text


def model_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: cirlab dicts, ``{"state_dict"|"model": ...}``, or a module."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, torch.nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj  # a bare state dict
    raise CheckpointError(f"{path}: no model weights found (expected a 'model' or 'state_dict' entry)")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, *, trust_pickle: bool = False,
                       strict: bool = True) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model``; returns the checkpoint's other entries."""
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    state = model_state_dict(obj, path)
    result = model.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning("%s: missing keys %s, unexpected keys %s", path, result.missing_keys, result.unexpected_keys)
    return obj if isinstance(obj, dict) else {}
