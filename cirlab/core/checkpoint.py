"""Checkpoints: atomic writes, safe loads (``weights_only=True``), clear errors on damaged or foreign files.

A cirlab checkpoint is a plain dict saved with :func:`torch.save`, holding only tensors and primitive
containers so that it loads with ``torch.load(weights_only=True)``::

    {"format": "cirlab-checkpoint-v1", "model": state_dict, "model_name": str, "model_config": dict,
     "optimizer": ..., "schedule": ..., "ema": ..., "scaler": ..., "rng": ..., "progress": ..., "train_config": dict}

Some checkpoints released with the papers (e.g. AMC's ``train_model.pt``) pickle the whole model object. Those
execute arbitrary code on load, so they are refused unless the caller passes ``trust_pickle=True`` (CLI:
``--trust-pickle``), which logs a warning. The file is inspected before it is unpickled: a Git-LFS pointer, an
HTML page, a text file or random bytes saved as ``.pt`` are named as such, and ``--trust-pickle`` is suggested
only when PyTorch refused a pickled Python global (never for a file that is not a checkpoint at all).
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from cirlab.core.contracts import INIT_REPORT, model_label
from cirlab.core.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "cirlab-checkpoint-v1"


from cirlab.core.errors import CheckpointError  # noqa: E402  (re-exported: raised and caught by this name)
from cirlab.core.errors import error_chain, first_few  # noqa: E402
from cirlab.core.errors import MissingCheckpointError  # noqa: E402


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous file is unchanged."""


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
# the legacy (non-zip) torch.save format starts with its magic number pickled with protocol 2
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *, stamp: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then ``os.replace``. With
    ``stamp`` the file records cirlab's checkpoint ``format``; without, ``state`` is written as given (a file in
    the original code's layout, which has no such key).

    A crash or a full disk mid-write leaves the previous file at ``path`` untouched (the last good checkpoint
    survives) and no temporary file behind; the failure is a :class:`CheckpointWriteError` saying so. Any other
    error raised during the write (a DataLoader worker's death, which torch raises wherever the main process is)
    comes out as it is: it is no write failure, and the disk is not to blame.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                torch.save({"format": FORMAT, **state} if stamp else state, fh)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as RuntimeError
        failure = _write_failure(err)
        if failure is None:
            raise
        kept = f"the previous {path.name} is kept unchanged" if path.is_file() else f"no {path.name} was written"
        raise CheckpointWriteError(f"cannot write checkpoint {path} ({_describe_write_error(failure, path)}); "
                                   f"{kept}") from err
    return path


def _write_failure(err: BaseException) -> BaseException | None:
    """The write's own failure behind ``err``: an ``OSError`` anywhere in its chain (torch's writer raises its
    "unexpected pos" RuntimeError over the file's OSError), else torch's writer error when nothing else caused it;
    None when another error broke into the write (torch's writer then reports it as a failed write too)."""
    chain = error_chain(err)
    for link in chain:
        if isinstance(link, OSError):
            return link
    writer = all(isinstance(link, RuntimeError) and _from_torchs_writer(link) for link in chain)
    return chain[0] if writer else None


def _from_torchs_writer(err: RuntimeError) -> bool:
    text = str(err)
    return "inline_container" in text or "PytorchStreamWriter" in text


def _describe_write_error(err: BaseException, path: Path) -> str:
    text = f"{type(err).__name__}: {err}"
    if not isinstance(err, OSError):  # the free space says nothing about an error that is not the disk's
        return text
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return text
    return f"{text}; {free / 2**20:.0f} MiB free on that disk"


def sniff(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes: ``torch-zip``, ``torch-legacy``, ``pickle``, ``lfs-pointer``,
    ``html``, ``gzip``, ``npy``, ``safetensors``, ``text``, ``empty`` or ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(LEGACY_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.startswith(LFS_POINTER):
        return "lfs-pointer"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in lowered:
        return "html"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    return "text" if printable >= 0.95 * len(text) else "unknown"


def _not_a_checkpoint(path: Path, kind: str) -> CheckpointError:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    what = {
        "lfs-pointer": "is a Git LFS pointer, not the checkpoint itself: fetch the real file (`git lfs pull`)",
        "html": "is an HTML page, not a checkpoint (a failed download? e.g. an error or login page)",
        "gzip": "is gzip-compressed: decompress it first",
        "npy": "is a NumPy array file (.npy), not a PyTorch checkpoint",
        "safetensors": "is a safetensors file; cirlab checkpoints are torch.save files (convert it first)",
        "text": f"is a text file, not a checkpoint (it starts with {head.decode('utf-8', 'replace')[:40]!r})",
    }.get(kind, f"is not a PyTorch checkpoint (unrecognised content, first bytes {head[:8].hex(' ')})")
    return CheckpointError(f"checkpoint {path} ({size} bytes) {what}")


TRUST_HINT = "if you trust its source, pass trust_pickle=True (CLI: --trust-pickle)"


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a file that looks like a PyTorch checkpoint (from its first bytes, without loading it);
    else a :class:`CheckpointError` saying what it is (missing, a folder, empty, text, HTML, ...)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write?")
    kind = sniff(path)
    if kind not in ("torch-zip", "torch-legacy", "pickle"):
        raise _not_a_checkpoint(path, kind)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", trust_pickle: bool = False,
                    trust_hint: str = TRUST_HINT) -> Any:
    """Load a checkpoint with ``weights_only=True``; pickled objects only when ``trust_pickle`` is set.

    Returns the loaded object (a dict for cirlab checkpoints; possibly an ``nn.Module`` for trusted
    pickled checkpoints). Raises :class:`CheckpointError` naming the file when it is missing, truncated,
    corrupt, not a checkpoint at all (the message says what it is), or holds pickled code while
    ``trust_pickle`` is False; ``trust_hint`` is what that refusal tells the user to do (a reader without a
    ``trust_pickle`` option says what else works).
    """
    path = check_checkpoint_file(path)
    allowed = _data_globals_allowed()  # outside the try: a failure here is cirlab's, not the file's
    try:
        with allowed:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_weights_only_refusal(err):
            if sniff(path) == "pickle":
                raise CheckpointError(f"checkpoint {path} is a Python pickle that is not a PyTorch checkpoint (it "
                                      "uses pickle instructions a weights-only load does not read)") from err
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_line(err)})") from err
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects ({_refused_global(err)}), which can run "
                f"arbitrary code when loaded. cirlab refuses it by default; {trust_hint}."
            ) from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError/KeyError/EOFError... for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                              f"{_first_line(err)})") from err
    logger.warning("loading %s with weights_only=False (--trust-pickle): pickled code in it runs now", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"checkpoint {path} could not be unpickled ({type(err).__name__}: "
                              f"{_first_line(err)})") from err


def data_globals() -> list[Any]:
    """Pickled globals a weights-only load may rebuild because they are data, not code: ``argparse.Namespace`` (the
    options HREM's and DIME's training scripts save beside the weights, a plain attribute bag) and numpy scalars with
    their dtypes (a ``best_rsum`` computed in numpy). So the papers' released files load without trusting them
    (``torch.load(weights_only=False)`` would run whatever else such a file pickles)."""
    import argparse

    import numpy as np

    try:
        scalar = np._core.multiarray.scalar  # numpy 2
    except AttributeError:  # numpy 1
        scalar = np.core.multiarray.scalar
    kinds = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
    return [argparse.Namespace, scalar, np.dtype, *{type(np.dtype(kind)) for kind in kinds}]


def _data_globals_allowed() -> Any:
    """A context allowing :func:`data_globals` in weights-only loads: ``safe_globals`` (torch >= 2.5); on torch 2.4
    they are added process-wide (they are data either way); older torch has no allowlist, and such files then need
    ``trust_pickle`` as before."""
    import contextlib

    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals(data_globals())
    if hasattr(serialization, "add_safe_globals"):
        serialization.add_safe_globals(data_globals())
    return contextlib.nullcontext()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _is_weights_only_refusal(err: Exception) -> bool:
    # torch raises UnpicklingError both for a refused global ("Unsupported global: GLOBAL x.y") and for bytes its
    # restricted unpickler cannot read ("Unsupported operand 118"); only the first is a reason to trust the file
    # torch words it "Unsupported global: GLOBAL x.y", or for a module it blocks outright (os, posix, subprocess)
    # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked": both are refusals of code
    return "unsupported global" in str(err).lower()


def _refused_global(err: Exception) -> str:
    text = str(err)
    start = text.find("GLOBAL ")
    if start < 0:
        return "a pickled Python global"
    name = text[start + len("GLOBAL "):].split()[0]
    return f"e.g. {name}"


STATE_CONTAINERS = ("model", "state_dict", "model_state_dict")


def find_state_dict(obj: Any, containers: tuple[str, ...] = STATE_CONTAINERS) -> dict[str, Any] | None:
    """The weights inside a loaded file, or None: a module's state dict; the first of ``containers`` that holds
    a dict or a module; a bare ``{name: tensor}`` dict; or the one dict entry of a training script's own container
    (CaLa saves ``{"epoch": n, "Blip2Qformer": state_dict}``), searched the same way."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        return None
    for key in containers:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            return inner.state_dict()
        if isinstance(inner, dict):
            return inner
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    inner = [v for k, v in obj.items() if k != "epoch" and isinstance(v, dict)]
    return find_state_dict(inner[0], containers) if len(inner) == 1 else None


def model_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint (:func:`find_state_dict`); CheckpointError when none."""
    state = find_state_dict(obj)
    if state is None:
        raise CheckpointError(f"{path}: no model weights found (expected a 'model' or 'state_dict' entry)")
    return state


def check_finite(state: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> None:
    """Raise :class:`CheckpointError` naming the file and the first tensors when any weight is NaN or infinite."""
    bad = [name for name, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights ({len(bad)} tensor"
                              f"{'s' if len(bad) != 1 else ''}: {first_few(bad)}); it cannot be used")


def load_state(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike = "<checkpoint>", *,
               strict: bool = True, saved_name: str | None = None) -> Any:
    """``model.load_state_dict(state)`` with NaN/Inf weights refused and a mismatch reported as one line naming the
    file, the model the checkpoint says it holds (``saved_name``) and the first differing keys."""
    check_finite(state, path)
    expected = model_label(model)
    try:
        return model.load_state_dict(state, strict=strict)
    except (RuntimeError, ValueError, KeyError) as err:
        origin = f" (it holds model {saved_name!r})" if saved_name and saved_name != expected else ""
        detail = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint {path} does not fit model {expected!r}{origin}: "
                              f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from err


def load_converted(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike, *,
                   kept_as_built: tuple[str, ...] = ()) -> list[str]:
    """Load ``state``, converted from another code's layout, into ``model``. Missing keys under the
    ``kept_as_built`` prefixes (parts the other code never saves, e.g. a training-only module) keep their built
    values and are returned; any other missing or unexpected key is a :class:`CheckpointError` naming ``path``."""
    result = load_state(model, state, path, strict=False, saved_name=None)
    kept = [k for k in result.missing_keys if k.startswith(kept_as_built) or k.endswith("_extra_state")]
    missing = [k for k in result.missing_keys if k not in kept]
    if missing or result.unexpected_keys:
        parts = [f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", list(result.unexpected_keys))) if keys]
        name = model_label(model)
        raise CheckpointError(f"checkpoint {path} does not fit model {name!r}: {'; '.join(parts)}; check the "
                              "preset (or the model_overrides) it was trained with")
    return kept


def run_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint a source names: a cirlab run folder's ``checkpoints/best.pt``, any other path as given."""
    path = Path(path).expanduser()
    return path / "checkpoints" / "best.pt" if path.is_dir() else path


def load_object(model: torch.nn.Module, obj: Any, path: str | os.PathLike) -> dict[str, Any] | None:
    """Load a checkpoint already read by :func:`load_checkpoint` into ``model``: its state dict wherever
    :func:`find_state_dict` finds one, else (a file the paper's own code saved, e.g. DIME's and HREM's
    ``[img_enc, txt_enc, ...]`` lists) through the model's :class:`~cirlab.core.contracts.HasOriginalCheckpoint`
    reader, whose report is returned (None for a state dict)."""
    from cirlab.core.contracts import HasOriginalCheckpoint

    if find_state_dict(obj) is None and isinstance(model, HasOriginalCheckpoint):
        return model.load_original(obj, str(path))
    saved = obj.get("model_name") if isinstance(obj, dict) else None
    state = model_state_dict(obj, path)
    try:
        load_state(model, state, path, saved_name=saved)
    except CheckpointError as err:  # a layout the model's converter reads (BLIP's original files): say how
        hint = model.layout_hint(state, str(path)) if hasattr(model, "layout_hint") else None
        if hint:
            raise CheckpointError(f"checkpoint {path} {hint}") from err
        raise
    return None


# the field HREM and DIME had for unpickling an init_from file, refused by name in a config file (see load_start)
RETIRED_TRUST_FIELD = {"init_trust_pickle": "a config file cannot switch on unpickling (a shared config could run "
                                            "code with it); the paper's released file loads without it (its pickled "
                                            "argparse options are read as data): remove the field"}


def load_start(model: torch.nn.Module, source: str | os.PathLike, *,
               field: str = "model_overrides.init_from") -> dict[str, Any]:
    """A pretrained start (``init_from``) for a model trained from its own weights: a cirlab run folder (its
    ``checkpoints/best.pt``), a cirlab checkpoint, or a file the paper's own code saved, read by the model's
    :class:`~cirlab.core.contracts.HasOriginalCheckpoint` reader. Returns where the weights came from, in which
    layout, and (original files) what was ignored or kept as built. Anything unusable is one
    :class:`CheckpointError` line naming ``field`` and the file.

    Always a weights-only load: a config file names the start, and a config shared by someone else must not be
    able to switch on unpickling (which runs whatever the file pickles). The papers' files load as they are (their
    pickled argparse options are data, :func:`data_globals`)."""
    path = run_checkpoint(source)
    if not path.is_file():
        raise CheckpointError(f"{field}: {path} does not exist (give a cirlab run folder, a checkpoint, or the "
                              "paper's own file)")
    hint = ("a training start is read as weights only; if you trust its source, load it yourself and save its "
            "weights alone (torch.save(state_dict, path))")
    try:
        report = load_object(model, load_checkpoint(path, trust_hint=hint), path)
    except CheckpointError as err:
        raise CheckpointError(f"{field}: {err}") from None
    if report is not None:
        return {"source": str(path), "layout": "original", **report}
    return {"source": str(path), "layout": "cirlab"}


def apply_init_from(model: torch.nn.Module, init_from: str, *,
                    report_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """``load_init`` of the models that start from their own weights (:func:`load_start`): logs where the weights
    came from and writes ``<report_dir>/init_from.json``."""
    if not init_from:
        return []
    report = load_start(model, init_from)
    kept = report.get("kept_as_built") or []
    logger.info("init_from: %s weights from %s%s", report["layout"], report["source"],
                f"; kept as built: {len(kept)} keys" if kept else "")
    if report_dir is not None:
        from cirlab.core import io

        io.write_json(Path(report_dir) / INIT_REPORT, {"init_from": init_from, **report})
    return [report]


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, *, trust_pickle: bool = False,
                       strict: bool = True) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model``; returns the checkpoint's other entries."""
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    state = model_state_dict(obj, path)
    saved = obj.get("model_name") if isinstance(obj, dict) else None
    result = load_state(model, state, path, strict=strict, saved_name=saved)
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning("%s: missing keys %s, unexpected keys %s", path, result.missing_keys, result.unexpected_keys)
    return obj if isinstance(obj, dict) else {}
