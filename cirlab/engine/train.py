"""The one training loop for every cirlab model (CIR, ITM, re-rankers).

Usage::

    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-4, schedule="step", lr_milestones=[40])
    result = train(model, split.triplet_dataset(transform), cfg, output_dir="runs/amc", evaluate_fn=evaluate)

The model implements ``training_step(batch) -> dict`` of named terms; the loop sums the keys ending in
``_loss`` and logs every key. The order of one optimizer step follows nanoGPT: lr -> forward -> backward ->
clip -> step -> EMA -> log. Everything a run needs to continue exactly where it stopped (model, optimizer,
schedule position, EMA, grad scaler, Python/NumPy/torch RNG states, epoch and position inside the epoch) is
written to ``checkpoints/last.pt`` atomically, every ``checkpoint_every`` steps and at every epoch end.

Data order comes from :class:`ResumableSampler` (seeded per epoch, a ``DistributedSampler`` equivalent that can
start in the middle of an epoch) and every item is produced under a per-item seed derived from
``(seed, epoch, index)``, so random augmentations are the same after a resume and for any ``num_workers``.

Multi-GPU: run the same script under ``torchrun``; :func:`train` joins the process group the launcher
describes (or one the caller set up), wraps the model in ``DistributedDataParallel``, shards the data, and lets
rank 0 alone log and write checkpoints. ``batch_size`` is the *global* batch (split over the processes), so a
run on N processes takes the same optimizer steps as a single-process run on the same data for losses that are
means over items. In-batch contrastive losses (AMC, DIME, BLIP) see each process's share of the batch as their
negatives (cirlab does not all-gather them): fewer negatives per step than one process with the same global
batch, so compare multi-GPU runs with that in mind.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cirlab.core import console, io, provenance
from cirlab.core.config import (MAX_SEED, UnknownFieldError, choice_problem, did_you_mean, original_hints,
                                unknown_names_message)
from cirlab.core.fielddocs import documented
from cirlab.core.contracts import RUN_DIR_ATTRIBUTE, HasEpochHook, HasEvalPrecision, HasParamGroups, Model, model_label
from cirlab.core.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from cirlab.core.errors import CirlabError, ConfigError, InputError
from cirlab.core.io import NO_SPACE, flat_numbers, to_plain, write_json
from cirlab.core.signals import STOP_SIGNALS, give_back_signals, take_signals
from cirlab.core.streams import random_streams, restore_streams, seed_streams
from cirlab.core._search import cuda_native_bf16
from cirlab.core.threads import allocated_cpus, apply_thread_policy, kept_threads

logger = logging.getLogger(__name__)
# the progress lines (:meth:`_RunLog.line`) as log records, for the run's train.log (engine.runs attaches its handler
# here): not passed on to the ``cirlab`` logger, since the console already shows the bar or the lines themselves
PROGRESS_LOG = logging.getLogger("cirlab.progress")
PROGRESS_LOG.propagate = False  # its level is the ``cirlab`` logger's: a notebook's train.log gets warnings only

SCHEDULES = ("constant", "step", "cosine", "periodic_cosine")
EvalFn = Callable[[nn.Module], dict[str, Any]]


@documented
@dataclass
class TrainConfig:
    """Optimisation and run settings (a run config's ``train:`` section). Model defaults
    (``model.default_train_config()``, ``cirlab models --settings MODEL``) are merged under the fields given:
    ``cirlab.fit(model, data, TrainConfig(lr=1e-3))`` keeps the model's paper schedule, weight decay and EMA, as the
    dict ``{"lr": 1e-3}`` does; a field the constructor filled in from its class default does not count as given
    (:meth:`given`)."""

    # --- length ---
    epochs: int = 1  # passes over the training data
    max_steps: int | None = None  # stop after this many optimizer steps (whichever of epochs/max_steps comes first)
    # --- batches ---
    batch_size: int = 32  # GLOBAL batch per micro-step, split evenly over DDP processes
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size * this)
    drop_last: bool = True  # drop the last incomplete batch of an epoch (all paper recipes do)
    shuffle: bool = True  # reshuffle the training data every epoch (seeded by seed + epoch)
    # > 0: keep up to this many items that share a group key (the dataset's group_keys(); CIR triplets: the
    # reference image) next to each other in each epoch's shuffled order, so batches hold hard in-batch
    # negatives (same reference, different text and target). 0 = a plain shuffle, as every paper recipe does.
    group_batches: int = 0
    num_workers: int = 0  # DataLoader worker processes
    # --- optimizer ---
    optimizer: str = "adam"  # "adam" (L2 weight decay, AMC/DIME) | "adamw" (decoupled decay, BLIP re-ranker)
    lr: float = 1e-4  # base learning rate (param groups from model.param_groups() may set their own)
    weight_decay: float = 0.0  # weight decay (L2 for adam, decoupled for adamw)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float | None = None  # max global gradient norm (DIME: 2.0); None = no clipping
    # --- learning-rate schedule (computed from the epoch, never accumulated, so resume is exact) ---
    schedule: str = "constant"  # constant | step | cosine | periodic_cosine
    lr_milestones: list[int] = field(default_factory=list)  # step: epochs at which lr *= lr_gamma (AMC: [40])
    lr_step_size: int = 0  # step: if > 0, lr *= lr_gamma every lr_step_size epochs (DIME: 15), milestones ignored
    lr_gamma: float = 0.1  # step: decay factor
    cosine_epochs: int | None = None  # cosine: epochs of one half-period (re-ranker's --blip-max-epoch); None = epochs
    min_lr: float = 0.0  # cosine: lr at the end of the half-period
    warmup_steps: int = 0  # linear warm-up over the first optimizer steps (multiplies the schedule)
    # --- numerics ---
    # auto: bf16 autocast on a CUDA card with bf16 in hardware (Ampere and later), else fp32 | fp32 | bf16 |
    # fp16: autocast with a GradScaler, on CUDA only. A CPU refuses fp16 for every model: it has no fp16 kernels
    # for some layers (oneDNN's LSTM failed mid-step for AMC while HREM trained), the rest is slow emulation, and
    # bf16 is the CPU's half precision
    precision: str = "auto"
    ema_decay: float | None = None  # keep an exponential moving average of the weights (AMC: 0.999); None = off
    ema_mode: str = "standard"  # standard: EMA weights swapped in for evaluation, then restored |
    #                             paper_no_restore: AMC's code, EMA weights replace the live ones at every epoch end
    # --- reproducibility ---
    seed: int = 0  # seeds Python, NumPy and torch (per process: seed + rank) and the data order
    deterministic: bool = False  # torch.use_deterministic_algorithms, cuDNN benchmark off, CUBLAS workspace
    device: str = "auto"  # auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda | cuda:N
    # --- evaluation and model selection ---
    eval_every: int = 1  # evaluate every N epochs (0 = only after the last epoch)
    eval_every_steps: int = 0  # also evaluate every N optimizer steps (DIME: 2000); 0 = off
    selection: str = "val"  # split name to select best.pt on | "paper" (the reported split, as the original
    #                         code does; logged as a warning) | "last" (no selection: best.pt = final weights)
    # metric key, or keys joined by "+" that are summed (e.g. "R@10+R@50"); "auto": the task's headline metric,
    # rsum for image-text matching, avg for composed retrieval (it was rsum for every model: a CIR model failed)
    selection_metric: str = "auto"
    test_split: str = "test"  # the split results are reported on (used by selection="paper")
    # --- output ---
    log_every: int = 10  # optimizer steps between log records (JSONL, TensorBoard, console)
    checkpoint_every: int = 0  # optimizer steps between checkpoints/last.pt writes (0 = epoch ends only)
    # also keep checkpoints/epoch_{N}.pt (whole training states, as last.pt): true = every epoch's, an integer N =
    # the last N epochs' (each holds the optimizer's state too: every epoch of a 100-epoch run filled a disk)
    keep_epoch_checkpoints: bool | int = False
    tensorboard: bool = True  # write tb/ when tensorboard is importable
    progress: str = "auto"  # auto (tqdm bar on a TTY or in JupyterLab, log lines otherwise) | tqdm | log | none
    resume: str = ""  # "" = fresh run | "auto" = <output_dir>/checkpoints/last.pt if present | a checkpoint path
    num_threads: int = 0  # torch intra-op CPU threads; 0 = cirlab's policy (cirlab.core.threads; CIRLAB_THREADS)
    # DDP only: a model whose steps leave some parameters without gradient (HREM before its relation warm-up)
    # needs DistributedDataParallel(find_unused_parameters=True); its default_train_config says so
    ddp_find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        validate_train_values(dataclasses.asdict(self), "TrainConfig.")
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives lists
        self.lr_milestones = [int(m) for m in self.lr_milestones]
        for name in _FLOAT_FIELDS:  # 1 and 1.0 are the same learning rate; keep the type the annotations promise
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, float(value))

    # the options of the papers' original training scripts that are named otherwise here (DIME and HREM train.py /
    # arguments.py, the re-ranker's stage*_train.py); said when such a name is given as a field
    ORIGINAL_NAMES: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "blip_learning_rate": "lr", "num_epochs": "epochs", "blip_max_epoch": "cosine_epochs",
        "lr_update": "lr_step_size", "lr_schedules": "lr_milestones", "decay_rate": "lr_gamma",
        "val_step": "eval_every_steps", "validation_frequency": "eval_every", "log_step": "log_every",
        "workers": "num_workers"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UnknownFieldError(unknown_names_message("TrainConfig", unknown, known, original_hints(cls)))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        given = self.__dict__.get("_given")
        if given is not None:  # set after construction (``cfg.selection = ...``): the caller's choice too
            given.add(name)

    def given(self) -> dict[str, Any]:
        """The fields passed to the constructor or set since, with their values (the rest are class defaults)."""
        given = self.__dict__.get("_given")
        values = self.to_dict()
        return values if given is None else {k: v for k, v in values.items() if k in given}

    def selection_split(self) -> str | None:
        """The split that chooses ``best.pt``: None for ``last``, ``test_split`` for ``paper``, else the named
        split."""
        if self.selection == "last":
            return None
        return self.test_split if self.selection == "paper" else self.selection


CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": SCHEDULES, "optimizer": ("adam", "adamw"), "precision": ("auto", "fp32", "bf16", "fp16"),
    "ema_mode": ("standard", "paper_no_restore"), "progress": ("auto", "tqdm", "log", "none"),
}
# field -> (kind, lower bound, bound inclusive, may be None); kinds: int, float, bool, str
_RULES: dict[str, tuple[str, float | None, bool, bool]] = {
    "epochs": ("int", 1, True, False), "max_steps": ("int", 1, True, True), "batch_size": ("int", 1, True, False),
    "grad_accum_steps": ("int", 1, True, False), "drop_last": ("bool", None, True, False),
    "shuffle": ("bool", None, True, False), "group_batches": ("int", 0, True, False),
    "num_workers": ("int", 0, True, False), "lr": ("float", 0, True, False), "weight_decay": ("float", 0, True, False),
    "eps": ("float", 0, False, False), "grad_clip": ("float", 0, False, True), "lr_step_size": ("int", 0, True, False),
    "lr_gamma": ("float", 0, False, False), "cosine_epochs": ("int", 1, True, True),
    "min_lr": ("float", 0, True, False),
    "warmup_steps": ("int", 0, True, False), "ema_decay": ("float", 0, False, True), "seed": ("int", 0, True, False),
    "deterministic": ("bool", None, True, False), "eval_every": ("int", 0, True, False),
    "eval_every_steps": ("int", 0, True, False), "log_every": ("int", 1, True, False),
    "checkpoint_every": ("int", 0, True, False),
    "tensorboard": ("bool", None, True, False), "num_threads": ("int", 0, True, False),
    "resume": ("str", None, True, False), "device": ("str", None, True, False), "selection": ("str", None, True, False),
    "selection_metric": ("str", None, True, False), "test_split": ("str", None, True, False),
    "ddp_find_unused_parameters": ("bool", None, True, False),
    **{name: ("str", None, True, False) for name in CHOICES},
}
# processes or threads per CPU this process may use: more only oversubscribes, and a slip (num_workers=1e9) started
# ~1,800 DataLoader workers that ignored SIGTERM; num_threads=1e9 made libgomp allocate 216 GB. At least _MIN_CAP
# whatever the machine, so that a config written on a server still runs (oversubscribed) on a laptop.
_PER_CPU, _MIN_CAP = 4, 32
_PER_CPU_FIELDS = {"num_workers": "DataLoader worker processes", "num_threads": "torch CPU threads"}
# field -> (highest value, why): far past any paper's value, a slip (1e9 for 1e-9) that trains without a word
_UPPER = {"lr": (10.0, "a learning rate above 10 diverges at once; e.g. 1e-4, not 1e4"),
          "eps": (1.0, "Adam's eps floors the update's denominator: a large one stops learning; e.g. 1e-8, not 1e8")}
_FLOAT_FIELDS = tuple(name for name, rule in _RULES.items() if rule[0] == "float")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


_OWN_RULES = ("betas", "lr_milestones", "keep_epoch_checkpoints")  # checked by _value_problem itself, not _RULES


def _value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for TrainConfig field ``name`` (None when it is)."""
    if name == "betas":
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(_is_number(b) and 0 <= float(b) < 1 for b in value))
        return None if ok else "expected two numbers in [0, 1), e.g. [0.9, 0.999]"
    if name == "keep_epoch_checkpoints":
        ok = isinstance(value, bool) or (_is_int(value) and value >= 0)
        return None if ok else "expected true (every epoch's), false, or the number of recent epochs to keep"
    if name == "lr_milestones":
        ok = isinstance(value, (list, tuple)) and all(_is_int(m) and m >= 0 for m in value)
        return None if ok else "expected a list of epoch numbers >= 0, e.g. [40]"
    kind, low, inclusive, optional = _RULES[name]
    if value is None:
        # the caller adds "got <value>": "got null" here read "got null, got None"
        return None if optional else f"expected {'an integer' if kind == 'int' else 'a ' + _KIND_NAMES[kind]}"
    if kind == "bool":
        return None if isinstance(value, bool) else "expected true or false"
    if kind == "str":
        if not isinstance(value, str):
            return "expected a string"
        if name in CHOICES and value not in CHOICES[name]:
            return choice_problem(value, CHOICES[name])
        if name == "device" and not _DEVICE.match(value):
            hint = " (did you mean 'cuda'?)" if "gpu" in value.lower() else did_you_mean(value, ("auto", "cpu", "cuda"))
            return f"must be auto, cpu, cuda or cuda:N{hint}"
        if name in ("selection", "selection_metric", "test_split") and not value.strip():
            return "must not be empty"
        return None
    if kind == "int" and not _is_int(value):
        return "expected an integer"
    if kind == "float" and not _is_number(value):
        return "expected a number" + _decimal_comma_hint(value)
    if kind == "float" and not math.isfinite(float(value)):
        return "must be a finite number"
    if name == "ema_decay" and not 0 < float(value) < 1:
        return "must be between 0 and 1 (e.g. 0.999), or null for no EMA"
    if name in _PER_CPU_FIELDS and value > cpu_cap():
        return (f"must be <= {cpu_cap()} ({_PER_CPU_FIELDS[name]}: {_PER_CPU} per CPU, at least {_MIN_CAP}; this "
                f"process may use {available_cpus()} CPUs)")
    if name in _UPPER and value > _UPPER[name][0]:
        return f"must be <= {_UPPER[name][0]:g} ({_UPPER[name][1]})"
    if name == "seed" and value > MAX_SEED:
        return f"must be <= {MAX_SEED} (NumPy's seed range, as cirlab data synth --seed)"
    if low is not None and (value < low if inclusive else value <= low):
        why = {"epochs": " (0 would train nothing and write no checkpoint)",
               "max_steps": " (0 would train nothing and write no checkpoint; null = no cap)"}.get(name, "")
        return f"must be {'>=' if inclusive else '>'} {low:g}{why}"
    return None


_KIND_NAMES = {"float": "number", "bool": "boolean", "str": "string"}


# schedule field -> the schedules that read it (schedule_factor, learning_rate)
_SCHEDULE_READERS = {"lr_milestones": ("step",), "lr_step_size": ("step",), "lr_gamma": ("step",),
                     "cosine_epochs": ("cosine", "periodic_cosine"), "min_lr": ("cosine", "periodic_cosine")}


def setting_warnings(cfg: TrainConfig, total_steps: int | None, recipe: Mapping[str, Any] | None = None
                     ) -> list[str]:
    """Settings that are valid but do nothing or leave nothing to train: a warm-up as long as the run (the lr never
    reaches its value), and schedule fields set away from their defaults under a schedule that never reads them.
    Warnings, not errors; a value the model's paper ``recipe`` (``default_train_config``) holds is not the user's
    choice, and not said (a tiny config's constant schedule carries AMC's milestones unread)."""
    out = []
    if cfg.warmup_steps and total_steps and cfg.warmup_steps >= total_steps:
        out.append(f"train.warmup_steps={cfg.warmup_steps} covers the whole run ({total_steps} optimizer steps): "
                   f"the lr rises linearly for all of it and never reaches train.lr; lower train.warmup_steps")
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(TrainConfig) if f.name in _SCHEDULE_READERS}
    recipe = recipe or {}

    def chosen(name: str) -> bool:
        value = getattr(cfg, name)
        return value != defaults[name] and not (name in recipe and _same_setting(recipe[name], value))

    unread = [f"{name}={getattr(cfg, name)!r}" for name, readers in _SCHEDULE_READERS.items()
              if cfg.schedule not in readers and chosen(name)]
    if cfg.schedule == "step" and cfg.lr_step_size > 0 and cfg.lr_milestones and chosen("lr_milestones"):
        # the step size wins over milestones
        unread.append(f"lr_milestones={cfg.lr_milestones!r} (lr_step_size={cfg.lr_step_size} is used instead)")
    if unread:
        out.append(f"train.schedule={cfg.schedule!r} does not read train.{', train.'.join(unread)}: ignored (a "
                   "model's paper recipe sets them for its own schedule); set the schedule that reads them, or "
                   "remove them")
    return out


def _same_setting(recipe_value: Any, value: Any) -> bool:
    """Whether a recipe's value is the resolved one (a recipe's list of milestones is a tuple once resolved)."""
    if isinstance(recipe_value, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(recipe_value) == list(value)
    return recipe_value == value


def cpu_cap() -> int:
    """The most ``num_workers`` / ``num_threads`` accepted: 4 per CPU this process may use, at least 32."""
    return max(_PER_CPU * available_cpus(), _MIN_CAP)


def available_cpus() -> int:
    """The CPUs this process may run on, as the thread policy counts them (:func:`allocated_cpus`: the affinity
    mask, a batch job's SLURM allocation)."""
    return allocated_cpus()[0]


def _decimal_comma_hint(value: Any) -> str:
    """`` (write 0.001: a decimal point, not a comma)`` for a text like ``"0,001"`` (a German or French keyboard's
    number), else nothing."""
    if isinstance(value, str) and value.count(",") == 1:
        try:
            number = float(value.replace(",", "."))
        except ValueError:
            return ""
        return f" (write {number:g}: a decimal point, not a comma)"
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_train_values(values: Mapping[str, Any], prefix: str = "train.") -> None:
    """Check the values of TrainConfig fields (those present in ``values``); the first bad one raises
    :class:`~cirlab.core.errors.ConfigError` naming ``<prefix><field>``, the problem and the value."""
    for name, value in values.items():
        if name in _RULES or name in _OWN_RULES:
            problem = _value_problem(name, value)
            if problem:
                raise ConfigError(f"{prefix}{name}: {problem}, got {'null' if value is None else repr(value)}")


def check_device(device: str, where: str = "device") -> None:
    """Fail early (before any data is read) for a device name torch would reject or that is not present here."""
    problem = _value_problem("device", device)
    if problem:
        raise ConfigError(f"{where}: {problem}, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {device!r} asked for, but no CUDA GPU is visible to PyTorch here "
                              "(torch.cuda.is_available() is False); use cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{where}: 'mps' asked for, but the Apple MPS backend is not available here; use cpu")


def _remember_given(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the dataclass ``__init__`` so that an instance knows which fields its caller gave (positionally or by
    name): :func:`train` merges the model's paper defaults under exactly those."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]

    def __init__(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown:  # the dataclass's own TypeError names the first one and suggests nothing
            raise UnknownFieldError(unknown_names_message("TrainConfig", unknown, names, original_hints(TrainConfig)))
        init(self, *args, **kwargs)
        object.__setattr__(self, "_given", set(names[:len(args)]) | set(kwargs))

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
    return __init__


TrainConfig.__init__ = _remember_given(TrainConfig.__init__)  # type: ignore[method-assign]


def resolve_train_config(model: nn.Module | None, overrides: dict[str, Any] | None = None, *,
                         base: dict[str, Any] | None = None) -> TrainConfig:
    """``base`` (e.g. a dataset's default selection metric), then the model's paper defaults
    (``default_train_config()``), then the user's ``overrides`` on top: the one place they are merged."""
    defaults = model.default_train_config() if isinstance(model, Model) else {}
    if not isinstance(defaults, Mapping):  # dict(None) failed as "'NoneType' object is not iterable"
        from cirlab.core.errors import ModelContractError

        raise ModelContractError(f"{type(model).__name__}.default_train_config() returned {defaults!r}; it returns a "
                                 "dict of TrainConfig fields (its paper recipe; {} for none)")
    _say_overridden_model_fields(model, defaults, overrides or {})
    return TrainConfig.from_dict({**(base or {}), **dict(defaults), **(overrides or {})})


def _say_overridden_model_fields(model: Any, recipe: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """A training setting the model's recipe takes from a model field of the same name (CaLa's ``lr``) and the
    user set otherwise in ``train``: the train value is used, and a run's config.yaml holding both read as a
    contradiction, so say which one counts."""
    config = getattr(model, "config", None)
    for key, value in overrides.items():
        said = (id(model), key, str(value))  # a run resolves its train config more than once: said once
        if key in recipe and hasattr(config, key) and recipe[key] == getattr(config, key) and value != recipe[key] \
                and said not in _SAID_OVERRIDDEN:
            _SAID_OVERRIDDEN.add(said)
            logger.info("train.%s=%s is used; model_overrides.%s=%s (the recipe's value) is not", key, value, key,
                        recipe[key])


_SAID_OVERRIDDEN: set[tuple[int, str, str]] = set()


# ----------------------------------------------------------------------------------------------- schedule


def schedule_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier on the base lr for ``epoch`` (0-based); per-epoch schedules as the papers use them."""
    if cfg.schedule == "step":
        if cfg.lr_step_size > 0:  # DIME: lr0 * 0.1 ** (epoch // 15)
            return cfg.lr_gamma ** (epoch // cfg.lr_step_size)
        return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)  # AMC: x0.1 from epoch 40
    if cfg.schedule in ("cosine", "periodic_cosine"):
        period = cfg.cosine_epochs or cfg.epochs
        # "cosine" holds at the end value after the half-period; "periodic_cosine" is the re-ranking code's
        # unclamped formula, which rises again (lr is 0 at epochs 10, 30 and back to lr0 at 20 with period 10)
        t = epoch if cfg.schedule == "periodic_cosine" else min(epoch, period)
        return 0.5 * (1.0 + math.cos(math.pi * t / period))
    return 1.0


def learning_rate(cfg: TrainConfig, base_lr: float, epoch: int, step: int) -> float:
    """The lr of a param group with ``base_lr`` at ``epoch`` and global optimizer ``step`` (0-based)."""
    factor = schedule_factor(cfg, epoch)
    if cfg.schedule in ("cosine", "periodic_cosine"):  # (lr0 - min_lr) * cos_term + min_lr, as in the re-ranker
        lr = (base_lr - cfg.min_lr) * factor + cfg.min_lr
    else:
        lr = base_lr * factor
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


# ----------------------------------------------------------------------------------------------- data order


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch order, sharded like ``DistributedSampler``, able to start mid-epoch.

    Process ``rank`` takes ``order[rank::world_size]``; with a per-process batch of ``batch_size / world_size``
    the union of the processes' j-th batches is exactly the j-th batch of a single-process run.

    With ``groups`` (one integer key per item) and ``group_size > 0`` a shuffled epoch is built from runs of up to
    ``group_size`` items of one group, the runs in random order (see ``TrainConfig.group_batches``).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 batch_size: int = 1, rank: int = 0, world_size: int = 1, groups: Sequence[int] | None = None,
                 group_size: int = 0) -> None:
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.drop_last, self.batch_size = drop_last, batch_size  # batch_size: GLOBAL batch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        if group_size > 0 and (groups is None or len(groups) != num_samples):
            raise ValueError(f"group_size {group_size} needs one group key per item ({num_samples} items)")
        self.groups = list(groups) if group_size > 0 and groups is not None else None
        self.group_size = group_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` items of this process (resume)."""
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle and self.groups is not None:
            order = self._grouped_order(torch.Generator().manual_seed(self.seed + self.epoch))
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:  # every process gets the same number of full batches
            return order[: len(order) // self.batch_size * self.batch_size]
        pad = (-len(order)) % self.world_size
        return order + order[:pad]

    def _grouped_order(self, g: torch.Generator) -> list[int]:
        """Members of each group shuffled and cut into runs of ``group_size``; the runs shuffled as units."""
        members: dict[int, list[int]] = {}
        for i in torch.randperm(self.num_samples, generator=g).tolist():  # random order inside every group
            members.setdefault(self.groups[i], []).append(i)
        runs = [m[k:k + self.group_size] for m in members.values() for k in range(0, len(m), self.group_size)]
        return [i for r in torch.randperm(len(runs), generator=g).tolist() for i in runs[r]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank:: self.world_size][self.start:])

    def __len__(self) -> int:
        return max(0, len(self._order()) // self.world_size - self.start)


def group_ids(dataset: Any) -> list[int]:
    """One integer per item from ``dataset.group_keys()`` (equal keys = one group); sees through ``Subset``."""
    if isinstance(dataset, torch.utils.data.Subset):
        keys = group_ids(dataset.dataset)
        return [keys[i] for i in dataset.indices]
    if not hasattr(dataset, "group_keys"):
        raise ConfigError(f"train.group_batches needs a training set with group_keys() (CIR triplets have them); "
                          f"{type(dataset).__name__} has none (set group_batches: 0)")
    index: dict[Any, int] = {}
    return [index.setdefault(key, len(index)) for key in dataset.group_keys()]


class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so item ``i`` of epoch ``e`` is produced under a seed derived from ``(seed, e, i)``.

    Random augmentations then depend on neither the worker layout nor on where a resumed run started, and
    the caller's global RNG streams are left untouched.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        # the CPU generator only: torch.manual_seed also re-seeds every CUDA generator (the global stream dropout
        # draws from on a GPU) and, before CUDA starts, records a stack trace per call, 0.5-1.6 ms an item
        cpu = torch.default_generator
        torch_state, py_state, np_state = cpu.get_state(), random.getstate(), np.random.get_state(legacy=False)
        cpu.manual_seed(item_seed)
        random.seed(item_seed)
        np.random.seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            cpu.set_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


# ----------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of the trainable parameters (``shadow = d * shadow + (1 - d) * param``)."""

    def __init__(self, model: nn.Module, decay: float, mode: str = "standard") -> None:
        self.decay, self.mode = decay, mode
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}
        self.reseed = False  # paper_no_restore: the next update copies the live weights (see apply_permanently)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name not in self.shadow:
                continue
            if self.reseed:
                self.shadow[name].copy_(p.detach().float())
            else:
                self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)
        self.reseed = False

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Standard mode: the model holds the EMA weights inside the block, its live weights again after it
        (also when the block raises)."""
        backup: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.shadow:
                    backup[name] = p.detach().clone()
                    p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    @torch.no_grad()
    def apply_permanently(self, model: nn.Module) -> None:
        """AMC's ``apply_shadow()`` without ``restore()``: live weights become the EMA weights.

        In the original code ``param.data`` then aliases the shadow tensor, so the first optimizer step of the
        next epoch also moves the shadow and the following update re-seeds the EMA at the current weights;
        ``reseed`` reproduces that.
        """
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])
        self.reseed = True

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "reseed": self.reseed, "decay": self.decay, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.reseed = bool(state["reseed"])


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> _Dist:
    """Join the process group: one the caller already set up, or the one ``torchrun`` describes in the env."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)  # env:// from torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    if dist.is_available() and dist.is_initialized():
        info = _Dist(dist.get_rank(), dist.get_world_size(), _local_rank())
        if torch.cuda.is_available() and torch.cuda.device_count() > info.local_rank:
            torch.cuda.set_device(info.local_rank)  # NCCL collectives and any bare "cuda" of this rank: its own card
        return info
    return _Dist()


def _local_rank() -> int:
    """This process's card index: torchrun's LOCAL_RANK, else the rank of a process group the caller set up, else 0."""
    import torch.distributed as dist

    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def kept_process_state() -> Iterator[None]:
    """Give the caller back, on leaving the block, what a run sets for the whole process: torch's thread count
    (:func:`kept_threads`), the global random streams of Python, NumPy and torch, which :func:`seed_everything`
    reseeds (a random search in a notebook drew the same trial after its first run), and the determinism switches
    of ``train.deterministic`` (a later run with ``deterministic: false`` still ran under them, and the caller's
    ``cudnn.benchmark`` was lost). The feature stores the run opened are written and let go
    (:func:`cirlab.core.featcache.release_stores`). Nested (``run_experiment`` around :func:`train`), the outer
    block restores: the run's final evaluation still runs under its settings."""
    from cirlab.core import featcache

    global _KEEPING
    if _KEEPING:
        yield
        return

    cudnn = torch.backends.cudnn
    streams = random_streams()
    switches = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                cudnn.benchmark, cudnn.deterministic, os.environ.get(CUBLAS_WORKSPACE))
    _KEEPING = True
    try:
        with kept_threads():
            yield
    finally:
        _KEEPING = False
        featcache.release_stores()
        restore_streams(streams)
        torch.use_deterministic_algorithms(switches[0], warn_only=switches[1])
        cudnn.benchmark, cudnn.deterministic = switches[2], switches[3]
        if switches[4] is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
        else:
            os.environ[CUBLAS_WORKSPACE] = switches[4]


CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"  # cuBLAS reads it: required for its deterministic kernels
_KEEPING = False  # inside a kept_process_state block


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally switch to deterministic kernels."""
    seed_streams(seed)
    if deterministic:
        os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")  # required by cuBLAS for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(device: str, where: str = "device", local_rank: int | None = None) -> str:
    """The one reading of a ``device`` setting (training, evaluation, the workbench, the CLIs): a name is checked
    (:func:`check_device`), ``"auto"`` is this process's GPU when one is visible, else ``"cpu"``. This process's GPU
    is ``cuda:<local rank>`` (:func:`_local_rank`, or ``local_rank``), so that every rank's training and evaluation
    use the same card (a bare ``"cuda"`` would put every rank's evaluation on card 0)."""
    if device != "auto":
        check_device(device, where)
        return device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{_local_rank() if local_rank is None else local_rank}"


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "auto":
        return torch.bfloat16 if cuda_native_bf16(device) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # an autocast dtype, as configured


def _say_auto_precision(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None) -> None:
    """``auto`` depends on the hardware: the log says what it chose here and why."""
    if cfg.precision != "auto":
        return
    if dtype is not None:
        logger.info("train.precision=auto: bf16 autocast on %s (bf16 in hardware)", device)
    elif device.type == "cuda":  # a warning: cirlab chose bf16 on every card before, and fp32 takes more memory
        logger.warning("train.precision=auto: fp32 on %s, which has no bf16 in hardware (before Ampere; fp32 needs "
                       "more memory than bf16 did); train.precision=fp16 trains with fp16 autocast and a GradScaler",
                       device)
    else:
        logger.info("train.precision=auto: fp32 on %s", device)


def check_precision(precision: str, device: torch.device | str, where: str = "train.precision") -> None:
    """Refuse fp16 autocast on a CPU in one line, before any work (see :attr:`TrainConfig.precision`)."""
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError(f"{where}=fp16: fp16 autocast is for CUDA; use bf16 or fp32 on a CPU")


def refuse_low_precision_weights(model: nn.Module, where: str) -> None:
    """cirlab keeps fp32 weights and lowers the precision of the computation with autocast; a model cast to half
    (``model.half()``, ``.to(torch.bfloat16)``) failed deep in torch (a dtype mismatch in the first layer, or the
    GradScaler's "Attempting to unscale FP16 gradients"). The trainable parameters are checked, or, for a model
    with none, the whole model: a frozen tower kept in fp16 on purpose beside fp32 layers passes."""
    floating = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    trainable = [(name, p) for name, p in floating if p.requires_grad]
    if trainable:
        bad = [(name, p) for name, p in trainable if p.dtype != torch.float32]
    else:
        bad = floating if all(p.dtype != torch.float32 for _, p in floating) else []
    if bad:
        name, p = bad[0]
        raise InputError(f"{where}: {model_label(model)} holds {str(p.dtype).removeprefix('torch.')} weights "
                         f"({len(bad)} parameter(s), e.g. {name}); cirlab keeps fp32 weights: call model.float() "
                         "first (half-precision training is train.precision=bf16 or fp16, autocast over fp32 weights)")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW over ``model.param_groups()`` (if defined) or all trainable parameters; ``base_lr`` kept per group.

    A group's ``base_lr`` is ``train.lr x lr_scale`` when it gives ``lr_scale`` (so ``--set train.lr=...`` moves
    every group together, keeping the paper's ratios), else its own absolute ``lr``, else ``train.lr``. A group
    with ``scheduled: False`` keeps its ``base_lr`` for the whole run (see :meth:`Trainer.set_lr`)."""
    groups = model.param_groups() if isinstance(model, HasParamGroups) else [{"params": list(model.parameters())}]
    groups = [{**group, "params": list(group["params"])} for group in groups]  # a generator would be read once
    _refuse_unknown_group_keys(model, groups)
    _refuse_left_out(model, groups)
    cleaned = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            extra = {k: v for k, v in group.items() if k != "params"}
            base = cfg.lr * float(group["lr_scale"]) if "lr_scale" in group else float(group.get("lr", cfg.lr))
            cleaned.append({**extra, "lr": base, "params": params, "base_lr": base})
    if not cleaned:
        raise ConfigError("the model has no trainable parameters (everything is frozen)")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(cleaned, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _loss_keys(model: nn.Module, terms: Any) -> list[str]:
    """The ``*_loss`` keys of ``training_step``'s dict, scalar tensors, at least one with a gradient: a step returning
    otherwise failed inside torch ("iteration over a 0-d tensor", "'float' object has no attribute 'float'",
    "element 0 of tensors does not require grad")."""
    from cirlab.core.errors import ModelContractError

    where = f"{type(model).__name__}.training_step"
    if not isinstance(terms, Mapping):
        raise ModelContractError(f"{where} returned a {type(terms).__name__}; it returns a dict with one or more "
                                 "'*_loss' scalar tensors (summed by the trainer) and any other terms to log")
    keys = [k for k in terms if isinstance(k, str) and k.endswith("_loss")]
    if not keys:
        raise ModelContractError(f"{where} returned no '*_loss' term (keys: {sorted(map(str, terms))})")
    for k in keys:
        v = terms[k]
        if not (torch.is_tensor(v) and v.numel() == 1):
            raise ModelContractError(f"{where}: {k!r} is {type(v).__name__}"
                                     + (f" of shape {tuple(v.shape)}" if torch.is_tensor(v) else "")
                                     + "; a loss term is a scalar tensor")
    if torch.is_grad_enabled() and not any(terms[k].requires_grad for k in keys):  # one may be a constant 0
        raise ModelContractError(f"{where}: no loss term has a gradient ({', '.join(keys)}: computed under no_grad, "
                                 "or detached)")
    return keys


# what a param_groups() dict may hold: cirlab's keys and the per-group settings torch's Adam/AdamW read
GROUP_KEYS = ("params", "name", "lr", "lr_scale", "scheduled", "weight_decay", "betas", "eps", "amsgrad", "maximize",
              "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _refuse_unknown_group_keys(model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
    """torch keeps any key of a group, so a misspelt ``lr_scal`` trained its group at the full lr without a word."""
    from cirlab.core.config import did_you_mean
    from cirlab.core.errors import ModelContractError

    for i, group in enumerate(groups):
        for key in group:
            if key not in GROUP_KEYS:
                name = f" ({group['name']!r})" if "name" in group else ""
                raise ModelContractError(f"{type(model).__name__}.param_groups() group {i}{name}: unknown key "
                                         f"{key!r}{did_you_mean(str(key), GROUP_KEYS)}; a group takes "
                                         f"{', '.join(GROUP_KEYS)}")


def _refuse_left_out(model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
    """A trainable parameter that no group of ``param_groups()`` holds would never train, without a word: it must be
    in a group or frozen (``requires_grad=False``, as the models freeze what their paper does not train); one held
    by two groups (or twice by one) is refused by name."""
    from cirlab.core.errors import ModelContractError

    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for i, group in enumerate(groups):
        for p in group["params"]:  # torch's own refusal names neither the parameter nor the groups
            if id(p) in seen:
                where = f"groups {seen[id(p)]} and {i}" if seen[id(p)] != i else f"group {i} twice"
                raise ModelContractError(f"{type(model).__name__}.param_groups() lists the parameter "
                                         f"{names.get(id(p), 'of shape ' + str(tuple(p.shape)))} in {where}: a "
                                         "parameter belongs to one group (one learning rate)")
            seen[id(p)] = i
    held = set(seen)
    left = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if left:
        raise ModelContractError(f"{type(model).__name__}.param_groups() leaves out {len(left)} trainable "
                                 f"parameter(s) ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}), which "
                                 "would never train: put them in a group or set requires_grad=False")


class _StepModule(nn.Module):
    """Routes ``forward`` to ``training_step`` so DistributedDataParallel sees the step as its forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.training_step(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device`` (the trainer's and the encoders' batches); strings and
    other values stay as they are. Non-blocking: for a copy back to the CPU use a blocking ``.cpu()``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------------------------- RNG states


def _rng_state() -> dict[str, Any]:
    # NumPy's state holds an ndarray, which weights_only loading refuses: store the key as a tensor
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------- logging


class _RunLog:
    """Rank-0 sinks: JSONL log, TensorBoard (if importable) and the progress display.

    Progress (``TrainConfig.progress``): ``tqdm`` draws a ``tqdm.auto`` bar (steps, loss, lr, ETA): a text bar
    in a terminal, a widget in JupyterLab; ``log`` prints one line per logged step to stderr (wall-clock time,
    step/total, loss, lr, elapsed, ETA), each line once, for logs and headless notebook runs (``cirlab report``
    shows them);
    ``auto`` picks ``tqdm`` on a terminal or in a live Jupyter frontend and ``log`` elsewhere (papermill, CI, a
    redirected stderr): :func:`cirlab.core.console.wants_a_bar`.

    The log lines' ETA is the training's end, its evaluations included (not the final evaluation a run does after
    it): the steps left at the recent step rate (the last :data:`ETA_WINDOW_S` seconds of stepping, or the last
    tenth of it where that is longer: the first epoch of a feature-caching model is slower than the others), plus
    the evaluations still due, this step's included, at the last one's duration (before the first, the line says
    how many are due).
    """

    def __init__(self, output_dir: Path, cfg: TrainConfig, total_steps: int | None, active: bool,
                 start_step: int, steps_per_epoch: int | None = None, evaluates: bool = False,
                 recipe: Mapping[str, Any] | None = None) -> None:
        self.active = active
        self.path = output_dir / "log.jsonl"
        self.tb = self._tensorboard(output_dir, start_step) if active and cfg.tensorboard else None
        mode = cfg.progress
        if mode == "auto":
            mode = "tqdm" if console.wants_a_bar() else "log"
        self.total, self.start_step = total_steps, start_step
        self.bar = None
        self.redirect = contextlib.ExitStack()
        if active and mode == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            if not console.live_frontend():  # a terminal's text bar: a log line (an evaluation, a warning) was
                # written onto the bar's line, leaving a stale frame with it; now the bar steps aside for it
                self.redirect.enter_context(_lines_above_the_bar(tqdm))
        self.lines = active and mode == "log"
        self.t0 = time.monotonic()  # durations: the wall clock set back or forward (NTP) mid-run made them negative
        self.eval_seconds, self.last_eval = 0.0, None  # time spent in the loop's evaluations; the last one's
        self.samples: collections.deque = collections.deque([(0.0, start_step)], maxlen=1024)  # (step clock, step)
        self.schedule = (steps_per_epoch, cfg.epochs, cfg.eval_every, cfg.eval_every_steps) if evaluates else None
        if active:
            self._warn_if_capped(cfg, steps_per_epoch)
            for warning in setting_warnings(cfg, total_steps, recipe):
                logger.warning("%s", warning)

    @staticmethod
    def _warn_if_capped(cfg: TrainConfig, steps_per_epoch: int | None) -> None:
        """``max_steps`` below ``epochs`` x steps per epoch silently shortens a run: say so once."""
        if not cfg.max_steps or not steps_per_epoch or cfg.max_steps >= steps_per_epoch * cfg.epochs:
            return
        logger.warning("train.max_steps=%d stops this run after %.2g epochs, not the %d epoch%s asked for (%d "
                       "steps per epoch, %d in all); raise train.max_steps or set it to null to train every epoch",
                       cfg.max_steps, cfg.max_steps / steps_per_epoch, cfg.epochs, "" if cfg.epochs == 1 else "s",
                       steps_per_epoch, steps_per_epoch * cfg.epochs)

    @staticmethod
    def _tensorboard(output_dir: Path, start_step: int = 0) -> Any:
        """A SummaryWriter on ``tb/``; a resumed run's purges the points past its checkpoint (``start_step``), which
        a stop at once (kill -9, a second Ctrl-C) left and the resumed steps write again: TensorBoard drew them
        twice, its line jumping back (log.jsonl is cut back the same way by :func:`repair_log`)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            logger.info("tensorboard is not installed; logging to log.jsonl only")
            return None
        if not utf8_paths_agree(output_dir):
            logger.warning("tensorboard cannot write into %s: it names files in UTF-8, and this path has no UTF-8 "
                           "name under the file system's encoding (%s); logging to log.jsonl only", output_dir,
                           sys.getfilesystemencoding())
            return None
        return SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` to log.jsonl (and TensorBoard) with its wall clock ``time``; returns it as written."""
        # the wall clock (Unix seconds) of each record: a watcher of log.jsonl can tell a slow run from a hung one
        record = {**record, "time": round(time.time(), 3)}
        if not self.active:
            return record
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(io.json_text(record, indent=None) + "\n")  # strict JSON: a NaN grad_norm is null
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for key, value in flat_numbers(record).items():
                if key == "selection_score":  # a tag per metric: runs selecting on others are not one chart
                    self.tb.add_scalar(f"{prefix}/selection/{record['selection_metric']}", value, record["step"])
                elif key not in ("step", "epoch", "time"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))
        return record

    def progress(self, record: dict[str, Any]) -> None:
        text = self.line(record) if self.lines or PROGRESS_LOG.handlers else ""
        if text:  # into train.log whatever the console shows: `tail -f train.log` follows a batch job
            PROGRESS_LOG.info("%s", text)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        elif self.lines:  # the wall clock first, as on the log lines between them (a long job's log shows when)
            line = f"{wall_clock()} {text}\n"
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # a hung-up terminal (EIO) or a closed stream: the run goes on unseen
                self.lines = False

    def evaluated(self, seconds: float) -> None:
        """An evaluation of the loop took ``seconds``: left out of the step rate, counted for those still due."""
        self.eval_seconds += seconds
        self.last_eval = seconds

    def line(self, record: dict[str, Any]) -> str:
        """``train: step 40/240 (17%) epoch 2 loss 0.4123 lr 1.00e-03 | 12s elapsed, ETA 58s``."""
        step, elapsed = int(record["step"]), time.monotonic() - self.t0
        total = f"/{self.total}" if self.total else ""
        share = f" ({100 * step / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {self.eta(step)}" if self.total and step > self.start_step else ""
        return (f"train: step {step}{total}{share} epoch {int(record['epoch']) + 1} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} | {_duration(elapsed)} elapsed{eta}")

    def eta(self, step: int) -> str:
        """The time left at ``step``: steps left x the recent step time, plus the evaluations still due."""
        clock = time.monotonic() - self.t0 - self.eval_seconds  # time spent stepping
        per_step = recent_step_seconds(self.samples, clock, step)
        self.samples.append((clock, step))
        left = per_step * max(int(self.total or 0) - step, 0)
        # this step's evaluation, if it has one, comes after its line
        due = evaluations_after(step - 1, int(self.total or 0), *self.schedule) if self.schedule else 0
        if due and self.last_eval is None:
            return f"{_duration(left)} + {due} evaluation{'' if due == 1 else 's'}"
        return _duration(left + due * (self.last_eval or 0.0))

    def close(self) -> None:
        self.redirect.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _position(p: _Progress, batch: bool = False) -> str:
    """Where a run stands, numbered as the progress and eval lines number it: at an epoch end the counter has moved
    on, and a stop after epoch 1's last step was said to be "in epoch 2" while every other line put it in epoch 1.
    ``batch``: also the micro-batch inside the epoch."""
    if p.batch_in_epoch == 0 and p.epoch > 0:
        return f"at the end of epoch {p.epoch}, step {p.step}"
    return f"in epoch {p.epoch + 1}, step {p.step}" + (f", batch {p.batch_in_epoch} of the epoch" if batch else "")


@contextlib.contextmanager
def _lines_above_the_bar(tqdm_class: Any) -> Iterator[None]:
    """Every console handler of the root logger writes its record with the bar cleared and drawn again under it
    (``tqdm.external_write_mode``), keeping its own level, filters, format and stream: tqdm's
    ``logging_redirect_tqdm`` swapped them all for one handler with the first one's stream and no level, which lost
    a script's WARNING-to-stderr routing and showed INFO lines a WARNING handler had kept out."""
    import sys

    wrapped = [h for h in logging.getLogger().handlers
               if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)]
    own = {id(h): h.__dict__["emit"] for h in wrapped if "emit" in h.__dict__}  # an emit set on the instance before
    for handler in wrapped:
        def emit(record: logging.LogRecord, _emit: Any = handler.emit, _stream: Any = handler.stream) -> None:
            with tqdm_class.external_write_mode(file=_stream):
                _emit(record)
        handler.emit = emit  # type: ignore[method-assign]  # on the instance: put back as it was below
    try:
        yield
    finally:
        for handler in wrapped:
            if id(handler) in own:
                handler.emit = own[id(handler)]  # type: ignore[method-assign]
            else:
                handler.__dict__.pop("emit", None)


ETA_WINDOW_S = 120.0  # the step rate of the ETA: over the last two minutes of stepping at least


def recent_step_seconds(samples: Sequence[tuple[float, int]], clock: float, step: int) -> float:
    """Seconds per step at ``step`` (reached at stepping time ``clock``), over the recent ``samples`` of (stepping
    time, step) in order: from the earliest one in the last :data:`ETA_WINDOW_S` seconds, or in the last tenth of
    the stepping time where that is longer (else the latest one before ``step``)."""
    window = max(ETA_WINDOW_S, 0.1 * clock)
    earlier = [(c, s) for c, s in samples if s < step]
    if not earlier:
        return 0.0
    since, at = next(((c, s) for c, s in earlier if c >= clock - window), earlier[-1])
    return max(clock - since, 0.0) / (step - at)


def evaluations_after(step: int, total: int, steps_per_epoch: int | None, epochs: int, eval_every: int,
                      eval_every_steps: int) -> int:
    """How many evaluations the loop runs after ``step`` up to its last step ``total``: at every ``eval_every``-th
    epoch end, every ``eval_every_steps`` steps, and at the last step (the last epoch's end or a ``max_steps``
    stop); a step is evaluated once whatever asks for it."""
    if total <= step:
        return 0

    def multiples(m: int) -> int:  # multiples of m in (step, total]
        return total // m - step // m if m > 0 else 0

    by_epoch = (steps_per_epoch or 0) * eval_every
    count = multiples(by_epoch) + multiples(eval_every_steps)
    if by_epoch and eval_every_steps:
        count -= multiples(math.lcm(by_epoch, eval_every_steps))
    on_total = any(m and total % m == 0 for m in (by_epoch, eval_every_steps))
    return count + (0 if on_total else 1)


def wall_clock() -> str:
    """``2026-12-06 19:40:00,123``: the local time as the log lines' ``%(asctime)s`` writes it (logging's default
    format, milliseconds after a comma)."""
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int((now - int(now)) * 1000):03d}"


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------------------------- the loop


class NonFiniteLossError(CirlabError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before the step reached the weights or a checkpoint."""


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together (torch >= 2.6 has it as ``nn.utils.get_total_norm``)."""
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


class NonFiniteGradientError(NonFiniteLossError):
    """A finite loss gave a NaN or infinite gradient (a half-precision underflow: sqrt or a division at 0) where no
    GradScaler skips such a step; training stopped before the step reached the weights or a checkpoint. A
    :class:`NonFiniteLossError`, so that it ends a run as that does."""


SKIPPED_IN_A_ROW_WARNING = 10  # fp16: consecutive steps the GradScaler skips before the log warns (scale / 1024)


class TrainingInterrupted(CirlabError, KeyboardInterrupt):
    """SIGINT, SIGTERM, SIGUSR1 or SIGHUP stopped the run after ``checkpoints/last.pt`` was written; ``exit_code`` is
    128 + the signal's number (130, 143, and 138 and 129 on Linux), the status the signal gives a process it ends.
    A ``KeyboardInterrupt`` too: a script's ``except KeyboardInterrupt`` clean-up around ``cirlab.fit`` runs, as it
    would for a Ctrl-C anywhere else (and ``except Exception`` still catches it, as every cirlab error)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class RunFolderError(ConfigError):
    """The run folder already holds another run (and neither resume nor overwrite was asked for)."""


class RunWriteError(CirlabError, OSError):
    """The run folder could not be written (disk full, quota, read-only); the last complete checkpoint is kept."""


# what a run writes into its folder (train, eval, submit): a fresh run refuses a folder holding any of them, and
# --overwrite replaces exactly these (a start's init_from.json goes when the new run starts: engine.runs)
RUN_ARTIFACTS = ("config.yaml", "log.jsonl", "checkpoints", "tb", "metrics.json", "train_summary.json", "topk",
                 "submission", "provenance.json", "data_fingerprint.json")
# - its results (a resume without last.pt must not throw them away)
RUN_RESULTS = ("checkpoints", "metrics.json", "train_summary.json", "topk", "submission")
# - the records it writes when it starts (a start that fails before its first step removes them again)
RUN_RECORDS = tuple(name for name in RUN_ARTIFACTS if name not in RUN_RESULTS)
# train settings a resume may change without changing the trajectory of the steps already taken
RESUME_MAY_CHANGE = frozenset({"epochs", "max_steps", "resume", "device", "num_workers", "num_threads", "progress",
                               "tensorboard", "log_every", "checkpoint_every", "keep_epoch_checkpoints", "eval_every",
                               "eval_every_steps", "precision", "deterministic"})


def run_artifacts(folder: str | os.PathLike, config_is_a_runs: bool = False) -> list[str]:
    """The names of :data:`RUN_ARTIFACTS` present in ``folder`` (a folder with none holds no run); a ``config.yaml``
    counts only when a run wrote it (:func:`is_run_config`), unless the caller has just checked
    (``config_is_a_runs``)."""
    folder = Path(folder)
    return [name for name in RUN_ARTIFACTS if (folder / name).exists()
            and (name != "config.yaml" or config_is_a_runs or is_run_config(folder / name))]


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml a run wrote: its ``train`` section holds every :class:`TrainConfig` field
    (the resolved settings). A hand-written config (a few keys, comments) is the user's file, never a run's."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):  # nested too deeply: no run wrote it
        return False
    train = config.get("train") if isinstance(config, dict) else None
    return isinstance(train, dict) and all(f.name in train for f in dataclasses.fields(TrainConfig))


def refuse_foreign_config(folder: str | os.PathLike) -> None:
    """A fresh run writes its resolved ``config.yaml`` into its folder: stop before any work when a config.yaml
    there is not a run's (the user's own experiment file, kept next to its outputs), instead of writing over it."""
    path = Path(folder) / "config.yaml"
    if path.is_file() and not is_run_config(path):
        raise RunFolderError(f"{path} is not a config a cirlab run wrote (a file of yours?): the run would write its "
                             "resolved config.yaml over it; move that file or choose another --output-dir")



def check_run_folder(folder: str | os.PathLike, *, overwrite: bool = False, resuming: bool = False) -> list[str]:
    """What a fresh run in ``folder`` would remove (:data:`RUN_ARTIFACTS` of the run there; empty: nothing), or
    why it may not start there. Refused: a folder holding a run (without ``overwrite``); a config.yaml no run wrote
    (:func:`refuse_foreign_config`); run-like names (``checkpoints/``, ``tb/``) in a folder no run wrote (no run's
    config.yaml or log.jsonl): they are the user's and never removed. ``resuming`` (a resume that found no
    ``last.pt``) may replace a run that never saved a result, not one that did (its ``best.pt``, its metrics)."""
    folder = Path(folder)
    refuse_foreign_config(folder)
    found = run_artifacts(folder, config_is_a_runs=True)  # a config.yaml still here is a run's: read it once
    if not found:
        return []
    if not {"config.yaml", "log.jsonl"} & set(found):
        raise RunFolderError(f"{folder} holds {', '.join(found)} but no run's config.yaml or log.jsonl: no cirlab "
                             "run wrote them, so a run neither writes into nor removes them; choose another "
                             "--output-dir")
    saved = [name for name in found if name in RUN_RESULTS and not _is_empty_dir(folder / name)]
    if resuming and not overwrite and saved:
        raise RunFolderError(f"--resume: {folder} holds a run ({', '.join(saved)}) but no checkpoints/last.pt to "
                             "continue from; run with --overwrite instead of --resume to replace it, or choose "
                             "another --output-dir")
    if not (overwrite or resuming):
        # finished (train_summary.json is written when training ends; cirlab.fit writes no metrics.json) or not:
        # --resume of the first trains nothing, of the second continues
        state = "a finished run" if "train_summary.json" in found else "an unfinished run"
        raise RunFolderError(f"run folder {folder} already holds {state} ({', '.join(found)}); pass --resume to "
                             "continue it or --overwrite to replace it (Python: resume / overwrite=True), or "
                             "choose another --output-dir")
    return found


def claim_run_folder(folder: str | os.PathLike, *, overwrite: bool = False, resuming: bool = False) -> None:
    """Make ``folder`` ready for a fresh run (:func:`check_run_folder`), removing the previous run's files when it
    may (only :data:`RUN_ARTIFACTS`; anything else in the folder is left alone)."""
    import shutil

    folder = Path(folder)
    found = check_run_folder(folder, overwrite=overwrite, resuming=resuming)
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if found:
        logger.warning("overwrite: removed the previous run's %s from %s", ", ".join(found), folder)


def refuse_linked_artifacts(folder: Path) -> None:
    """A run folder to be resumed whose log, checkpoints or other outputs are symbolic links (a folder from
    elsewhere): the resume appended its log to, and wrote checkpoints into, whatever they point to."""
    linked = [name for name in RUN_ARTIFACTS if (folder / name).is_symlink()]
    if linked:
        targets = ", ".join(f"{name} -> {os.readlink(folder / name)}" for name in linked)
        raise ConfigError(f"{folder}: symbolic link(s) where the run writes ({targets}); a resumed run would change "
                          "the files they point to. Replace each with a copy of what it points to, then resume")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


RECIPE_MARK = "recipe_run.json"  # in a run folder a recipe (train notebook, re-rank pipeline) finished


_FINGERPRINT_BYTES = 1 << 20


def _checkpoint_fingerprint(folder: Path, name: str = "last.pt") -> list[Any] | None:
    """[size, sha256 of the first and last MiB] of ``checkpoints/<name>``: any later training into the folder
    changes ``last.pt`` (the end of a torch.save zip lists every entry's CRC), and a copy (``cp -r``, a clone) keeps
    it; the mtime it was before changed with every copy, and the copy's re-run was refused."""
    import hashlib

    path = folder / "checkpoints" / name
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(0)
            digest = hashlib.sha256(fh.read(_FINGERPRINT_BYTES))
            fh.seek(max(size - _FINGERPRINT_BYTES, 0))
            digest.update(fh.read(_FINGERPRINT_BYTES))
    except OSError:
        return None
    return [size, digest.hexdigest()]


def _legacy_fingerprint(folder: Path) -> list[int] | None:
    """[size, mtime in ns] of ``last.pt``: the mark of a recipe run before content fingerprints (still honoured)."""
    try:
        st = (folder / "checkpoints" / "last.pt").stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def mark_recipe_run(folder: str | os.PathLike) -> None:
    """Record that a recipe finished the run in ``folder``: a re-run of the recipe may replace it
    (:func:`recipe_wrote`)."""
    folder = Path(folder)
    write_json(folder / RECIPE_MARK, {"last_checkpoint": _checkpoint_fingerprint(folder),
                                      "best_checkpoint": _checkpoint_fingerprint(folder, "best.pt")})


def recipe_wrote(folder: str | os.PathLike) -> bool:
    """Whether the run in ``folder`` is one a recipe finished (:func:`mark_recipe_run`) and nothing has trained into
    since (``cirlab train --resume`` or ``--overwrite`` change ``last.pt``)."""
    folder = Path(folder)
    try:
        mark = json.loads((folder / RECIPE_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(mark, dict) or mark.get("last_checkpoint") is None:
        return False
    if not (folder / "checkpoints" / "last.pt").exists():  # dropped to free disk (cirlab runs says it may be):
        # training into the folder writes a new one, so the run is the recipe's if its best.pt is the one marked
        return mark.get("best_checkpoint") is not None and mark["best_checkpoint"] == _checkpoint_fingerprint(
            folder, "best.pt")
    return mark["last_checkpoint"] in (_checkpoint_fingerprint(folder), _legacy_fingerprint(folder))


def claim_for_recipe(folder: str | os.PathLike, *, overwrite: bool, resume: bool, what: str, fix: str) -> bool:
    """Whether a recipe's fresh run should replace the run in ``folder`` (``run_experiment(overwrite=...)``).

    A recipe re-run (a notebook run again) replaces the run it finished itself; any other run there (``cirlab
    train``'s, one trained into since, an interrupted one) is refused with ``what`` and ``fix`` in the message unless
    ``overwrite``: a recipe must not delete hours of someone's training because a path pointed at it."""
    folder = Path(folder)
    found = run_artifacts(folder)
    if not found or resume:
        return False
    if not overwrite and not recipe_wrote(folder):
        raise RunFolderError(f"{what} {folder} already holds a run this recipe did not finish ({', '.join(found)}); "
                             f"{fix}")
    return True


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       may_change: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """``["batch_size: 32 -> 16", ...]``: train settings that differ between a checkpoint and a resumed run
    (settings in ``may_change`` do not count)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in may_change:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = list(old), list(new)
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def repair_log(path: Path, last_step: int | None = None, evaluated_step: int | None = None) -> int:
    """Make ``log.jsonl`` appendable again: drop a torn final line (a process killed mid-write) and, on resume,
    the records of steps after ``last_step`` (they are logged again as the resumed run re-takes them), and the
    evaluations after ``evaluated_step`` (the last one the resumed state includes; None: unknown). Rewrites
    the file atomically when anything changes; returns how many lines were removed."""
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    kept: list[str] = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1 and not text.endswith("\n"):  # torn: no newline ever ended it
                logger.warning("%s: the last line is torn (a run stopped while writing it); dropped", path)
                continue
            kept.append(line)  # other damage is left for a reader to report, never deleted here
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if last_step is not None and isinstance(step, int) and step > last_step:
            continue
        if (evaluated_step is not None and isinstance(step, int) and step > evaluated_step
                and record.get("kind") == "eval"):
            continue
        kept.append(line)
    removed = len(lines) - len(kept)
    if removed:
        io.write_text(path, "".join(f"{line}\n" for line in kept))
        logger.info("%s: %d record(s) after the resumed step %s removed", path, removed, last_step)
    return removed


def eval_records(path: Path) -> list[dict[str, Any]]:
    """The evaluation records of a run's ``log.jsonl`` (after :func:`repair_log`), oldest first."""
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # repair_log keeps damage it did not make for a reader to report; it is not an evaluation
        if isinstance(record, dict) and record.get("kind") == "eval":
            found.append(record)
    return found


def utf8_paths_agree(path: Path, encoding: str | None = None) -> bool:
    """Whether ``path`` names the same file in UTF-8 as in the file system's encoding. tensorboard encodes its
    paths as UTF-8 whatever the locale: under a Latin-1 locale a folder named with a non-ASCII letter is another
    folder to it, and its writer thread then failed with FileNotFoundError in the middle of training."""
    text = str(path)
    try:
        return text.encode(encoding or sys.getfilesystemencoding(), "surrogateescape") == text.encode("utf-8")
    except UnicodeError:
        return False


class _EvaluationStopped(BaseException):
    """Raised by the stop handler inside an evaluation of the training loop, to cut it short. A BaseException: an
    evaluation's ``except Exception`` must not swallow it."""


class _StopSignals:
    """SIGINT / SIGTERM / SIGUSR1 / SIGHUP ask the loop to stop after the current optimizer step (it then writes
    ``last.pt``); inside an interruptible evaluation (:meth:`evaluation`) a first SIGTERM, SIGUSR1 or SIGHUP stops
    the evaluation itself (an evaluation on real data outlasts a cluster's grace period between SIGTERM and SIGKILL).
    A second signal stops at once. Installed only in the main thread (signal handlers live there), and not for a
    signal this process was started with ignored: a background job of a shell script inherits Ctrl-C ignored (so
    that a Ctrl-C of the script's foreground command leaves it running), as Python itself and ``cirlab report``
    respect."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved_step: int | None = None  # the step checkpoints/last.pt holds (the trainer sets it when it saves)
        self._previous: dict[int, Any] = {}
        self._evaluating = False  # inside an evaluation of the loop
        self._interruptible = False  # ... which the first signal may cut short

    def __enter__(self) -> "_StopSignals":
        self._previous = take_signals(self.SIGNALS, self._handle)
        return self

    @contextlib.contextmanager
    def evaluation(self, interruptible: bool) -> Iterator[None]:
        """The block is an evaluation: with ``interruptible``, a first stop signal inside it raises
        :class:`_EvaluationStopped` there; else the loop stops once the evaluation is done."""
        self._evaluating, self._interruptible = True, interruptible
        try:
            yield
        finally:
            self._evaluating = self._interruptible = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            self._restore()
            # the last line of the run: it ended without one, and `cirlab runs` shows the last logged step, not the
            # one --resume continues from
            held = (f"checkpoints/last.pt holds step {self.saved_step}: --resume continues from there"
                    if self.saved_step is not None else "no checkpoints/last.pt was written by this start")
            name = signal.Signals(signum).name
            logger.warning("%s received again: stopping at once; %s", name, held)
            if signum == getattr(signal, "SIGINT", None):
                if not console.ends_with_ctrl_c():  # a notebook, a prompt, a script: the caller's interrupt
                    raise KeyboardInterrupt
                # the cirlab command: end as an unhandled Ctrl-C does (last.pt and the log are written
                # atomically, so nothing half-written is left)
                console.end_at_next_ctrl_c()
            # the process ends by the signal: no exception reaches the run's record of its end, so it is written now
            provenance.record_open_ends(f"stopped ({name})", f"{name} received again: stopped at once; {held}")
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        # a scheduler's SIGTERM / SIGUSR1 (or a hang-up) cut the evaluation short (SIGKILL follows); Ctrl-C lets it
        # finish (in a notebook, an exception raised anywhere inside a library's evaluation code could leave its
        # state half changed; a second Ctrl-C still stops at once)
        if self._interruptible and signum != getattr(signal, "SIGINT", None):
            self._interruptible = False
            logger.warning("%s received: stopping the evaluation and saving checkpoints/last.pt; the resumed run "
                           "evaluates this step again (send it again to stop at once)", name)
            raise _EvaluationStopped(name)
        when = "after this evaluation" if self._evaluating else "after this step"
        logger.warning("%s received: stopping %s and saving checkpoints/last.pt (send it again to stop at once)",
                       name, when)

    def _restore(self) -> None:
        give_back_signals(self._previous)

    def __exit__(self, *exc: Any) -> None:
        self._restore()
        if self.signum is not None:  # the command winds up: a further Ctrl-C ends it at once
            console.end_at_next_ctrl_c()


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker leaves every stop signal to the main process, which stops after the step and then shuts
    the workers down itself. A cluster's SIGTERM (a time limit, scancel) reaches the whole process group: a worker
    it killed made torch raise in the main process wherever that was, a checkpoint write among others."""
    del worker_id
    for name in ("SIGINT", "SIGUSR1", "SIGHUP"):  # a hang-up reaches the terminal's whole process group
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if hasattr(signal, "SIGTERM") and hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        _end_only_at_the_parents_sigterm()
    _end_with_the_parent()


class _CarriedError:
    """A cirlab error (an unreadable image, a malformed entry) raised in a DataLoader worker, sent to the main
    process in place of its batch and raised there as itself. torch's own re-raise rebuilds the exception from its
    traceback text: the one-line message became a worker traceback, and ``DataError.file`` / ``kind`` were lost."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _CarryingItems(torch.utils.data.Dataset):
    """``dataset`` whose items that raise a :class:`CirlabError` come back as a :class:`_CarriedError` (one that
    would not survive the trip to the main process, its class rebuilt from its pickle, is raised as torch raises)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CirlabError as err:
            import pickle

            try:
                pickle.loads(pickle.dumps(err))
            except Exception:  # noqa: BLE001 - any failure to rebuild it: torch's way, the traceback text
                raise err from None
            return _CarriedError(err)


class _CarryingCollate:
    """The collate function of a :func:`worker_loader`: a batch with a carried error is that error."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items: Sequence[Any]) -> Any:
        carried = next((item for item in items if isinstance(item, _CarriedError)), None)
        return carried if carried is not None else self.collate_fn(items)


class _WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader with workers that raises a worker's cirlab error in the main process as the same error."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, _CarriedError):
                raise batch.error
            yield batch


def worker_loader(dataset: Any, *, num_workers: int = 0, collate_fn: Callable | None = None,
                  **kwargs: Any) -> torch.utils.data.DataLoader:
    """The DataLoader of training and evaluation: with workers, they leave the stop signals to this process
    (:func:`ignore_stop_signals`) and a cirlab error in one reaches the caller as itself (its one line, its
    fields), as without workers."""
    if not num_workers:
        return torch.utils.data.DataLoader(dataset, num_workers=0, collate_fn=collate_fn, **kwargs)
    return _WorkerLoader(_CarryingItems(dataset), num_workers=num_workers, collate_fn=_CarryingCollate(collate_fn),
                         worker_init_fn=ignore_stop_signals, **kwargs)


_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal the kernel sends this process when its parent ends


def _end_with_the_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it ends, however it ends (a second Ctrl-C
    or SIGTERM, which end the main process at once; SIGKILL; the OOM killer). The worker ignores stop signals, so
    it lived on until torch's watchdog noticed the parent gone, seconds later, beside a run resumed at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # a libc without prctl: torch's watchdog still ends the worker, later
        return
    if os.getppid() != parent:  # the parent ended during the call: nobody will send the signal now
        os._exit(0)


def _end_only_at_the_parents_sigterm() -> None:
    """SIGTERM ends this worker only when the main process sends it: torch and multiprocessing end a worker that
    does not exit on its own that way (a plain SIG_IGN left the main process waiting for it forever at exit), as
    torch's own worker handler does. The signal is blocked and taken by a thread that reads who sent it."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_exit_at_sigterm_from, args=(parent,), name="cirlab-worker-sigterm", daemon=True).start()


def _exit_at_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # 0, as torch's handler: the main process's SIGCHLD check takes it as a clean exit


@dataclass
class _Progress:
    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps taken so far (global)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    best_score: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    # step of the last evaluation this state includes (-1: none yet; None: a checkpoint from before this was kept).
    # A last.pt written just before an epoch-end evaluation is behind that evaluation's log record: the resumed run
    # evaluates again, so the record is dropped, not logged twice
    evaluated_step: int | None = None
    skipped_steps: int = 0  # fp16: optimizer steps the GradScaler skipped (inf/NaN gradients), counted in `step` too


class Trainer:
    """One training run: :meth:`run` owns the loop, the final weights and the summary; the other methods
    are its pieces."""

    def __init__(self, model: nn.Module, dataset: Any, cfg: TrainConfig, output_dir: Path,
                 evaluate_fn: EvalFn | None, collate_fn: Callable | None, callbacks: Sequence[Callable],
                 run_config: dict[str, Any] | None, overwrite: bool = False,
                 start_notes: Mapping[str, Any] | None = None, run_files: Mapping[str, Any] | None = None) -> None:
        if cfg.selection_metric == "auto":
            task = getattr(model, "task", "")
            cfg = dataclasses.replace(cfg, selection_metric=TASK_SELECTION_METRIC.get(task, "avg"))
        self.cfg, self.output_dir, self.evaluate_fn, self.callbacks = cfg, output_dir, evaluate_fn, list(callbacks)
        self.overwrite = overwrite
        self.stop = _StopSignals()
        self.dist = init_distributed()
        apply_thread_policy(cfg.num_threads or None)  # 1 thread on small or busy machines (see cirlab.core.threads)
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        self.device = torch.device(resolve_device(cfg.device, "train.device"))
        check_precision(cfg.precision, self.device)
        self.model = model.to(self.device)
        self.step_module: nn.Module = _StepModule(self.model)
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=ids, find_unused_parameters=cfg.ddp_find_unused_parameters)
        self.optimizer = build_optimizer(self.model, cfg)
        self.amp_dtype = _autocast_dtype(cfg, self.device)
        _say_auto_precision(cfg, self.device, self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._skipped_in_a_row, self._said_skips = 0, False  # fp16: the GradScaler's skips in a row, warned once
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_mode) if cfg.ema_decay else None
        self.progress = _Progress(evaluated_step=-1)
        self.loader, self.sampler, self.items = self._loader(dataset, collate_fn)
        self.steps_per_epoch = len(self.loader) // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            # the paper recipes' batches (CaLa 64, the re-ranker's stage I 512) exceed the tiny synthetic sets
            fits = max(1, len(dataset) // cfg.grad_accum_steps)  # batch_size is the global batch
            need = int(getattr(self.model, "min_micro_batch", 1)) * self.dist.world_size
            if fits < need:  # a smaller batch would train on a zero loss
                raise ConfigError(f"the training set ({len(dataset)} items) is smaller than one optimizer step "
                                  f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}), and "
                                  f"{type(self.model).__name__} needs at least {need} items per batch: add training "
                                  "data, or lower train.grad_accum_steps")
            raise ConfigError(f"the training set ({len(dataset)} items) is smaller than one optimizer step "
                             f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}); set "
                             f"train.batch_size to at most {fits} (--set train.batch_size=N, "
                             "TrainConfig(batch_size=N), train_run's or a notebook's batch_size) or "
                             "train.drop_last=false")
        self.ckpt_dir = output_dir / "checkpoints"
        self.run_config = run_config
        self.start_notes = dict(start_notes or {})  # this start's extra provenance fields (train(start_notes=))
        self.run_files = dict(run_files or {})  # files written at each start (train(run_files=))
        self.resumed = False  # run(): continued from a checkpoint (even one at step 0)
        self.losses: list[float] = []
        self.eval_history: list[dict[str, Any]] = []

    # -- data ---------------------------------------------------------------------------------------
    def _loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, ResumableSampler, SeededItems]:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % world:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} processes")
        need = int(getattr(self.model, "min_micro_batch", 1))
        if cfg.batch_size // world < need:  # a contrastive loss over one item is 0: steps that learn nothing
            per = f" over {world} processes, {cfg.batch_size // world} each" if world > 1 else ""
            raise ConfigError(f"{type(self.model).__name__} contrasts each item with the other items of its batch, so "
                              f"a batch needs at least {need} items per process (train.batch_size {cfg.batch_size}"
                              f"{per}); grad_accum_steps adds no negatives. Set train.batch_size to {need * world} "
                              "or more")
        items = SeededItems(dataset, cfg.seed)
        groups = group_ids(dataset) if cfg.group_batches else None
        sampler = ResumableSampler(len(dataset), shuffle=cfg.shuffle, seed=cfg.seed, drop_last=cfg.drop_last,
                                   batch_size=cfg.batch_size, rank=self.dist.rank, world_size=world,
                                   groups=groups, group_size=cfg.group_batches)
        loader = worker_loader(
            items, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=collate_fn, drop_last=cfg.drop_last, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed))  # own generator: the global RNG is not consumed
        return loader, sampler, items

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = _rng_state()
        if self.dist.world_size > 1:  # every process's RNG, so a resumed DDP run continues each stream
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng = {"per_rank": gathered}
        p = self.progress
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": {"kind": self.cfg.schedule, "epoch": p.epoch, "step": p.step,
                             "last_lr": [g["lr"] for g in self.optimizer.param_groups]},
                "ema": self.ema.state_dict() if self.ema else None, "scaler": self.scaler.state_dict(),
                "precision": PRECISION_NAMES[self.amp_dtype],  # as resolved here ("auto" depends on the device)
                "rng": rng, "progress": dataclasses.asdict(p), "train_config": self.cfg.to_dict(),
                **_model_meta(self.model)}

    def save(self, name: str) -> None:
        state = self.state()  # all ranks take part (RNG gather); rank 0 writes
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / name, state)
        self._barrier()
        if name == "last.pt":  # every rank: each one's second-signal line says it (a rank said "none written")
            self.stop.saved_step = self.progress.step

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        missing = [k for k in ("model", "optimizer", "progress", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a resumable cirlab checkpoint (missing {missing})")
        name, saved = getattr(self.model, "model_name", None), ckpt.get("model_name")
        if name and saved and name != saved:
            raise CheckpointError(f"cannot resume from {path}: it holds model {saved!r}, this run trains {name!r}")
        changed = resume_differences(ckpt.get("train_config") or {}, self.cfg.to_dict())
        if changed:
            logger.warning("resuming %s with changed train settings (the run is no longer one uninterrupted "
                           "run): %s", path, "; ".join(changed))
        load_state(self.model, ckpt["model"], path, saved_name=saved)
        self._load_optimizer_keeping_settings(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        saved_precision = self._saved_precision(path, ckpt)
        self._say_a_precision_change(path, saved_precision)
        self._load_scaler(path, ckpt.get("scaler"), saved_precision)
        rng = ckpt["rng"]
        if "per_rank" in rng:
            ranks = rng["per_rank"]
            if len(ranks) != self.dist.world_size:
                logger.warning("%s was written by %d processes, resuming on %d: RNG streams differ",
                               path, len(ranks), self.dist.world_size)
            rng = ranks[self.dist.rank % len(ranks)]
        _set_rng_state(rng)
        self.progress = _Progress(**ckpt["progress"])
        self.stop.saved_step = self.progress.step
        logger.info("resumed from %s %s", path, _position(self.progress, batch=True))

    def _load_optimizer_keeping_settings(self, state: Mapping[str, Any]) -> None:
        """The optimizer's state (moments, step counts) from a checkpoint, its settings (each group's base lr,
        weight decay, betas, eps, lr scale) from this run's config: ``load_state_dict`` restores the saved groups'
        settings too, so a resume with ``--allow-config-change --set train.lr=...`` trained at the old rate while
        log.jsonl, TensorBoard and config.yaml recorded the new one. Unchanged settings are the saved ones."""
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)

    @staticmethod
    def _saved_precision(path: Path, ckpt: Mapping[str, Any]) -> str | None:
        """The precision the checkpoint's steps were taken in (fp32, bf16, fp16), None where unknown. A checkpoint
        from before it was stored: its train.precision, or, for ``auto``, the precision its run's last start
        recorded in provenance.json."""
        if ckpt.get("precision") in PRECISION_NAMES.values():
            return ckpt["precision"]
        configured = (ckpt.get("train_config") or {}).get("precision")
        if configured in ("fp32", "bf16", "fp16"):
            return configured
        if path.parent.name != "checkpoints":  # a checkpoint outside a run folder: no provenance beside it
            return None
        from cirlab.core.provenance import read_starts

        try:
            starts = read_starts(path.parent.parent)
        except (OSError, ValueError):
            return None
        recorded = starts[-1].get("precision") if starts and isinstance(starts[-1], dict) else None
        # provenance.json names the dtype (torch's "bfloat16"); the config's spelling of the same
        by_dtype = {str(dtype or torch.float32).removeprefix("torch."): name for dtype, name in PRECISION_NAMES.items()}
        return by_dtype.get(recorded)

    def _say_a_precision_change(self, path: Path, saved: str | None) -> None:
        """A resume in another autocast precision changes the numerics of every later step (``auto`` too, when it
        resolves otherwise on another device): warn, as for any changed setting."""
        now = PRECISION_NAMES[self.amp_dtype]
        if saved is None or saved == now:
            return
        logger.warning("resuming %s in precision %s; its steps so far were taken in %s: the run is no longer one "
                       "uninterrupted run", path, self.precision_label(), saved)

    def _load_scaler(self, path: Path, state: Mapping[str, Any] | None, saved: str | None) -> None:
        """The GradScaler's loss scale, where this run uses one (fp16). A checkpoint of fp32, bf16 or ``auto``
        holds a disabled scaler's empty state, which torch refuses to load: the scale then starts afresh."""
        if not self.scaler.is_enabled():
            return
        if state:
            self.scaler.load_state_dict(state)
            return
        logger.info("resuming %s into fp16: its checkpoint holds no GradScaler state (%s), so the loss scale starts "
                    "afresh at %g", path, f"its steps were in {saved}" if saved else "none was in use",
                    self.scaler.get_scale())

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Resume if asked, write ``config.yaml``, train to ``epochs``/``max_steps``, write ``best.pt`` (the
        selected or the final weights) and ``train_summary.json``; returns the summary."""
        cfg, p = self.cfg, self.progress
        resume_from = resume_checkpoint(cfg.resume, self.output_dir)
        if self.dist.is_main:
            if resume_from is not None:  # before anything in the folder is touched
                refuse_linked_artifacts(self.output_dir)
            _remove_stale_temporaries(self.output_dir)  # first: a torn last.pt write is no saved result
            if resume_from is None:  # a fresh run (resume="auto" with no last.pt yet replaces a run that never saved)
                claim_run_folder(self.output_dir, overwrite=self.overwrite, resuming=bool(cfg.resume))
        if resume_from is None and cfg.resume == "auto":
            logger.info("resume='auto': no %s yet, starting a fresh run", self.ckpt_dir / "last.pt")
        self._barrier()
        self.resumed = resume_from is not None
        if resume_from is not None:
            self.resume(resume_from)
            p = self.progress
            self._refuse_a_resume_past_the_end()
            self._say_what_the_resume_continues()
            if self.dist.is_main:
                repair_log(self.output_dir / "log.jsonl", p.step, p.evaluated_step)
            # the evaluations before the resume belong to this run's history (train_summary.json) too
            self.eval_history = eval_records(self.output_dir / "log.jsonl")
        try:
            try:
                with self.stop:
                    return self._run(p)
            except BaseException:
                # an interruption saves last.pt even at step 0 and names --resume: that run is kept whole
                started = self.progress.step > 0 or (self.ckpt_dir / "last.pt").exists()
                if resume_from is None and not started and self.dist.is_main:
                    self._forget_failed_start()
                raise
        except OSError as err:
            if isinstance(err, CirlabError) or err.errno not in NO_SPACE:
                raise
            last = self.ckpt_dir / "last.pt"
            kept = f"the last complete checkpoint is kept: {last}" if last.is_file() else "no checkpoint was written"
            raise RunWriteError(f"cannot write to the run folder {self.output_dir} ({err.strerror or err}); "
                                f"{kept}") from err

    @property
    def batches_per_epoch(self) -> int:
        """The micro-batches of an epoch that fill whole accumulation groups (the rest of the loader is dropped)."""
        return self.steps_per_epoch * self.cfg.grad_accum_steps

    def total_steps(self) -> int:
        """The optimizer steps this run trains to: ``epochs`` whole epochs, capped by ``max_steps``."""
        total = self.steps_per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps is not None else total

    def _refuse_a_resume_past_the_end(self) -> None:
        """A resumed run already past the end the settings now set cannot be continued to it; its config.yaml would
        be rewritten with a run length its checkpoints and metrics contradict. Stop before writing anything. A run
        exactly at its end continues: a stop on the last step still owes its final evaluation and summary."""
        p, cfg = self.progress, self.cfg
        if p.step <= self.total_steps():
            return
        raise ConfigError(f"resume: {self.output_dir} is already at step {p.step}, past the end "
                          f"train.epochs={cfg.epochs}, train.max_steps={cfg.max_steps} sets now "
                          f"({self.total_steps()} steps). Raise them to train further (train.epochs, "
                          f"train.max_steps), or evaluate the run as it is (cirlab eval)")

    def _say_what_the_resume_continues(self) -> None:
        """A resume of a finished run trains nothing (it said "resumed in epoch 3" of a 2-epoch run and went on);
        one that extends a run stopped by ``max_steps`` keeps that stop's evaluation among the candidates for
        ``best.pt``, which a run trained straight through never made: say both."""
        p, cfg = self.progress, self.cfg
        if not self._more_to_do(self._owes_evaluation()):
            logger.info("%s had already trained its %d steps: nothing is left to train (raise train.epochs or "
                        "train.max_steps to train further)", self.output_dir, p.step)
            return
        scheduled = bool(cfg.eval_every_steps) and p.step % cfg.eval_every_steps == 0
        stopped_mid_epoch = 0 < p.batch_in_epoch < self.batches_per_epoch
        if p.best_step == p.step == p.evaluated_step and stopped_mid_epoch and not scheduled:
            logger.info("best.pt so far is the evaluation at step %d, made because the run stopped there "
                        "(train.max_steps); it stays a candidate, so best.pt can differ from a run trained straight "
                        "to step %d", p.step, self.total_steps())

    def _forget_failed_start(self) -> None:
        """A fresh run that stopped before its first optimizer step holds nothing worth keeping, but its config.yaml,
        log and tb/ made the folder "hold a run": the corrected call was refused without --overwrite."""
        import shutil

        for name in RUN_RECORDS:
            path = self.output_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink()
        logger.info("the run stopped before its first step: nothing of it is kept in %s", self.output_dir)

    def _run(self, p: _Progress) -> dict[str, Any]:
        cfg = self.cfg
        self._write_config()
        total = self.total_steps()
        log = _RunLog(self.output_dir, cfg, total, self.dist.is_main, p.step,
                      steps_per_epoch=self.steps_per_epoch, evaluates=self.evaluate_fn is not None,
                      recipe=self.model.default_train_config() if isinstance(self.model, Model) else None)
        self.model.train()
        try:
            owed = self._owes_evaluation()
            while self._more_to_do(owed):
                if isinstance(self.model, HasEpochHook):
                    self.model.on_epoch_start(p.epoch)
                if owed:  # where the stopped run was: after its step, before the rest of the epoch
                    self.evaluate_and_select(log)
                    owed = False
                if not self.train_one_epoch(log):  # stopped by max_steps mid-epoch
                    self.evaluate_and_select(log)
                    self.save("last.pt")  # keeps the position inside the epoch for a later resume
                    if self._stop_requested():  # during that save: the command must not go on to its final evaluation
                        self._interrupted(saved=True)
                    break
                self.end_of_epoch(log)
                if self._stop_requested():  # end_of_epoch has just written last.pt
                    self._interrupted(saved=True)
            if self.selection_split() is None or self.evaluate_fn is None:
                with self.evaluated_weights():  # without selection, best.pt is the final model
                    self.save_weights("best.pt")
            self._keep_evaluated_weights()
        finally:
            log.close()
        return self.summary()

    def _owes_evaluation(self) -> bool:
        """Whether a resumed run starts at a step whose evaluation a stop cut short or came before: an
        ``eval_every_steps`` step, or the ``max_steps`` stop inside an epoch. (An epoch end needs nothing: its
        ``last.pt`` is behind the epoch end, so the resumed run ends that epoch, evaluation included.)"""
        p, cfg = self.progress, self.cfg
        if not self.resumed or self.evaluate_fn is None or p.evaluated_step in (None, p.step) or p.step == 0:
            return False  # None: a checkpoint from before evaluated_step was kept, which cannot tell
        every = bool(cfg.eval_every_steps) and p.step % cfg.eval_every_steps == 0
        last = cfg.max_steps is not None and p.step >= cfg.max_steps and p.batch_in_epoch < self.batches_per_epoch
        return every or last

    def _more_to_do(self, owed: bool) -> bool:
        """Whether the loop takes another epoch (or the rest of one). At ``max_steps`` a resumed run still ends the
        step it stopped at: its evaluation (``owed``) or its epoch end, as the uninterrupted run did."""
        p, cfg = self.progress, self.cfg
        if p.epoch >= cfg.epochs:
            return False
        if cfg.max_steps is None or p.step < cfg.max_steps:
            return True
        return owed or p.batch_in_epoch >= self.batches_per_epoch

    def _keep_evaluated_weights(self) -> None:
        """Leave the model holding what ``best.pt`` holds: the checkpoint model selection kept (loaded back when an
        earlier evaluation won), else the final weights as evaluated (the EMA's in standard mode). A caller who
        evaluated the model after ``cirlab.fit`` measured the live last weights, which are not what the run saved
        as its model (``last.pt`` keeps them, with the average, for a resume)."""
        p = self.progress
        if self.evaluate_fn is not None and self.selection_split() is not None and p.best_step is not None:
            # an EMA changes the live weights after an evaluation (standard: they were never the EMA's;
            # paper_no_restore: the epoch end copies the average in after an eval_every_steps evaluation saved best.pt)
            if p.best_step != p.step or self.ema is not None:
                self._barrier()  # rank 0 wrote best.pt
                best = self.ckpt_dir / "best.pt"
                load_state(self.model, load_checkpoint(best, map_location=self.device)["model"], best)
                logger.info("the model holds checkpoints/best.pt now (epoch %d, step %d, the one selected)",
                            (p.best_epoch or 0) + 1, p.best_step)
            return
        if self.ema is not None and self.cfg.ema_mode == "standard":
            self.ema.apply_permanently(self.model)
            logger.info("the model holds the EMA weights now (ema_decay=%s), as evaluated and saved in "
                        "checkpoints/best.pt; checkpoints/last.pt keeps the live ones for a resume", self.cfg.ema_decay)

    def _write_config(self) -> None:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # cirlab.fit's run: the sections cirlab eval reads back (model, its config, train); the dataset is the
            # caller's, so `cirlab eval RUN` needs --dataset/--root (it says so)
            meta = _model_meta(self.model)
            config = self.run_config or {"model": meta.pop("model_name"), **meta, "train": self.cfg.to_dict()}
            write_yaml(self.output_dir / "config.yaml", config)
            self._record_start()
            if self.cfg.selection == "paper":
                logger.warning("selection='paper': best.pt is chosen on the %r split, the split results are "
                               "reported on, as the original code does; this is optimistic (no held-out selection)",
                               self.cfg.test_split)
        self._barrier()

    def _record_start(self) -> None:
        """``provenance.json``: this start's code, versions, host, device and precision (one entry per start);
        and the :attr:`run_files`, as of this start: a resume reaches here with the same ones, or with ones whose
        change was accepted (``--allow-config-change``, listed in this start's entry), and the run's later results
        (metrics.json) are then computed on what they describe now."""
        from cirlab.core.provenance import record_start, start_entry

        precision = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "float32"
        notes = dict(self.start_notes)
        if getattr(self.model, "init_seed", None) is not None:  # create_model(seed=): the initial weights' seed
            notes.setdefault("model_init_seed", self.model.init_seed)
        if isinstance(self.model, HasEvalPrecision):  # a model that picks its scoring precision by the hardware
            notes.setdefault("eval_precision", self.model.eval_precision(self.device))
        record_start(self.output_dir, start_entry(self.progress.step, str(self.device), precision, notes),
                     resumed=self.resumed)
        for name, value in self.run_files.items():
            if value is None:  # a file of the run this start replaces, which this start has no value for
                (self.output_dir / name).unlink(missing_ok=True)
            else:
                io.write_json(self.output_dir / name, value)

    def summary(self) -> dict[str, Any]:
        p = self.progress
        # best_epoch counted from 1, as every log line and epoch_<N>.pt count epochs (Progress keeps the 0-based
        # index); "epochs" is the epochs trained, a fraction where max_steps stopped the run inside one (a CaLa
        # demo's 20 steps read "0.31", not "0" beside a best epoch of 1)
        best_epoch = None if p.best_epoch is None else p.best_epoch + 1
        epochs = round(p.epoch + p.batch_in_epoch / self.batches_per_epoch, 3) if p.batch_in_epoch else p.epoch
        # without an evaluate_fn nothing was selected: best.pt is the last model (a CIR run read "rsum" here)
        selected = self.evaluate_fn is not None and self.selection_split() is not None
        summary = {"output_dir": str(self.output_dir), "steps": p.step, "epochs": epochs, "losses": self.losses,
                   "eval_history": self.eval_history, "best_score": p.best_score, "best_epoch": best_epoch,
                   "best_step": p.best_step, "selection": self.cfg.selection if self.evaluate_fn else "last",
                   "selection_split": self.selection_split() if selected else None,
                   "selection_metric": self.cfg.selection_metric if selected else None,
                   "best_checkpoint": str(self.ckpt_dir / "best.pt"), "resumed": self.resumed,
                   "skipped_steps": p.skipped_steps,
                   "last_checkpoint": str(self.ckpt_dir / "last.pt")}
        if self.dist.is_main:
            write_json(self.output_dir / "train_summary.json", {k: v for k, v in summary.items() if k != "losses"})
        return summary

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _stop_requested(self) -> bool:
        """True once a stop signal arrived (under DDP: in any process, so every process stops at one step)."""
        stop = self.stop.signum is not None
        if self.dist.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(stop)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _interrupted(self, saved: bool = False, evaluation: bool = False) -> None:
        """Save ``last.pt`` (unless ``saved``) and raise :class:`TrainingInterrupted`; ``evaluation``: the stop came
        instead of the evaluation of this step, which the resumed run then runs."""
        if not saved:
            self.save("last.pt")
        p, signum = self.progress, self.stop.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        owed = " before its evaluation (the resumed run evaluates it)" if evaluation else ""
        raise TrainingInterrupted(f"{name}: training stopped {_position(p)}{owed}; saved "
                                  f"{self.ckpt_dir / 'last.pt'}. Resume with the same command plus --resume "
                                  f"(Python: resume='auto')", signum)

    # -- one optimizer step -------------------------------------------------------------------------
    def set_lr(self) -> float:
        """Set every scheduled group's lr for this step; returns train.lr's value at it, the "lr" of the log (the
        first group's could be a scaled one: HREM's BERT group is 0.1 x train.lr)."""
        epoch, step = self.progress.epoch, self.progress.step
        for group in self.optimizer.param_groups:
            if group.get("scheduled", True):  # an unscheduled group (e.g. CaLa's non-Q-Former groups) stays constant
                group["lr"] = learning_rate(self.cfg, group["base_lr"], epoch, step)
        return learning_rate(self.cfg, self.cfg.lr, epoch, step)

    def forward_backward(self, batch: Any, sync: bool) -> dict[str, float]:
        batch = to_device(batch, self.device)
        no_sync = self.step_module.no_sync if (not sync and self.dist.world_size > 1) else contextlib.nullcontext
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with no_sync():
            with autocast:
                terms = self.step_module(batch)
            loss_keys = _loss_keys(self.model, terms)
            loss = sum(terms[k].float() for k in loss_keys)
            if not torch.isfinite(loss):  # stop before a NaN reaches the weights and the checkpoints
                raise NonFiniteLossError(f"non-finite loss in epoch {self.progress.epoch + 1}, step "
                                         f"{self.progress.step + 1}: " + ", ".join(
                                             f"{k}={float(terms[k].detach()):.4g}" for k in loss_keys)
                                         + " (NaN/Inf in the data? `cirlab data check` lists them; else try a "
                                           "lower train.lr)")
            self.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        logged = {k: float(v.detach().float().mean()) for k, v in terms.items() if torch.is_tensor(v)}
        return {**logged, "loss": float(loss.detach())}

    def optimizer_step(self) -> tuple[float | None, bool]:
        """Clip, step, update the EMA; returns the gradient norm (where ``grad_clip`` computes it) and whether the
        fp16 GradScaler skipped the step (inf/NaN gradients: the weights did not move)."""
        grad_norm = self._checked_grad_norm()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # update() lowers the scale exactly when the step found inf/NaN gradients and was skipped
        skipped = scale is not None and self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return (None if grad_norm is None else float(grad_norm)), skipped

    def _checked_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm where ``grad_clip`` needs it (after clipping to it). Without the GradScaler
        (fp32, bf16) nothing skips a step whose loss was finite but whose gradient is not: it is refused here,
        before the weights move, from the clip's norm or one norm pass over the gradients."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = None
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler.is_enabled():
            return norm
        checked = norm if norm is not None else _total_norm([p.grad for p in params if p.grad is not None])
        if not torch.isfinite(checked):
            self._refuse_non_finite_gradient(float(checked))
        return norm

    def _refuse_non_finite_gradient(self, norm: float) -> None:
        p = self.progress
        name = next((n for n, q in self.model.named_parameters()
                     if q.grad is not None and not torch.isfinite(q.grad).all()), "?")
        hint = ("an underflow in half precision (a sqrt or a division at 0)? try train.precision=fp32"
                if self.amp_dtype is not None else "a sqrt or a division at 0 in the loss? else try a lower train.lr")
        raise NonFiniteGradientError(f"non-finite gradient in epoch {p.epoch + 1}, step {p.step + 1} (precision "
                                     f"{self.precision_label()}): the loss is finite, the gradient norm is {norm} "
                                     f"(first in {name}); the step was not taken, the weights and checkpoints are "
                                     f"as before it ({hint})")

    def precision_label(self) -> str:
        """``bf16``, or ``auto (fp32 on cpu)``: the setting and, for auto, what it chose here."""
        chosen = PRECISION_NAMES[self.amp_dtype]
        return chosen if self.cfg.precision != "auto" else f"auto ({chosen} on {self.device})"

    def _count_skipped(self, skipped: bool) -> None:
        """fp16: a step the GradScaler skipped changed no weight; count it, and warn once when they go on."""
        if not skipped:
            self._skipped_in_a_row = 0
            return
        self.progress.skipped_steps += 1
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= SKIPPED_IN_A_ROW_WARNING and not self._said_skips:
            self._said_skips = True
            logger.warning("fp16: the GradScaler skipped the last %d optimizer steps in a row (inf/NaN gradients at "
                           "every loss scale down to %g): the weights are not changing; try train.precision=bf16 "
                           "or fp32, or a lower train.lr", SKIPPED_IN_A_ROW_WARNING, self.scaler.get_scale())

    def train_one_epoch(self, log: _RunLog) -> bool:
        """Runs (the rest of) the current epoch; returns False when max_steps stopped it before its end."""
        cfg, p = self.cfg, self.progress
        used = self.batches_per_epoch
        if cfg.max_steps is not None and p.step >= cfg.max_steps:  # resumed at its last step: none to take
            return p.batch_in_epoch >= used
        self.items.epoch = p.epoch
        self.sampler.set_epoch(p.epoch, start=p.batch_in_epoch * self.loader.batch_size)
        micro_terms: list[dict[str, float]] = []
        lr = self.set_lr()
        for batch in self.loader:
            if p.batch_in_epoch >= used:
                break  # trailing micro-batches that cannot fill an accumulation group are not used
            sync = (p.batch_in_epoch + 1) % cfg.grad_accum_steps == 0
            micro_terms.append(self.forward_backward(batch, sync=sync))
            p.batch_in_epoch += 1
            if not sync:
                continue
            grad_norm, skipped = self.optimizer_step()
            p.step += 1
            self._count_skipped(skipped)
            record = self._step_record(micro_terms, lr, grad_norm, skipped)
            micro_terms = []
            self.after_step(record, log)
            if self._stop_requested():
                self._interrupted()
            if p.batch_in_epoch >= used:
                return True
            if cfg.max_steps is not None and p.step >= cfg.max_steps:
                return False
            lr = self.set_lr()
        return True

    def _step_record(self, micro_terms: list[dict[str, float]], lr: float, grad_norm: float | None,
                     skipped: bool = False) -> dict:
        terms = {k: sum(t[k] for t in micro_terms) / len(micro_terms) for k in micro_terms[0]}
        self.losses.append(terms["loss"])
        record = {"kind": "train", "epoch": self.progress.epoch, "step": self.progress.step, "lr": lr, **terms}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if skipped:
            record["skipped"] = True
        return record

    def after_step(self, record: dict[str, Any], log: _RunLog) -> None:
        cfg, step = self.cfg, self.progress.step
        if step % cfg.log_every == 0 or step == 1 or step == self.total_steps():  # the first and the last too
            log.write(record)
            log.progress(record)
        elif log.bar is not None:
            log.bar.update(1)
        if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
            self.evaluate_and_select(log)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.save("last.pt")
        for callback in self.callbacks:
            callback(record)

    # -- evaluation and model selection -------------------------------------------------------------
    def selection_split(self) -> str | None:
        return self.cfg.selection_split()

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The weights that are evaluated and saved as ``best.pt``: the EMA's in standard mode, else the live
        ones."""
        if self.ema is not None and self.cfg.ema_mode == "standard":
            return self.ema.swapped(self.model)
        return contextlib.nullcontext(self.model)

    def evaluate_and_select(self, log: _RunLog) -> dict[str, Any] | None:
        """Evaluate and select at this step, once: an epoch end or a max_steps stop on a step eval_every_steps has
        just evaluated does not evaluate (and log) it again."""
        if self.evaluate_fn is None or self.progress.evaluated_step == self.progress.step:
            return None
        if self._stop_requested():  # asked during the step: stop now, not after a whole evaluation
            self._interrupted(evaluation=True)
        # one process only: under DDP the others would wait for this one in the evaluation's collectives
        interruptible = self.dist.world_size == 1
        rng = _rng_state() if interruptible else None
        stopped = False
        try:
            results, missing = self._evaluate(log, interruptible)
        except _EvaluationStopped:  # a stop signal cut the evaluation short; the weights are back as they were
            stopped = True
        if stopped:
            _set_rng_state(rng)  # as before it: the resumed run evaluates from the same state
            self._interrupted(evaluation=True)
        if missing is not None:
            self.save("last.pt")
            field = missing.field
            raise ConfigError(f"{missing.args[0]}; set train.{field} to one of them and resume: the training so far "
                              f"is saved in {self.ckpt_dir / 'last.pt'} (Python: the same call with {field}=... and "
                              f"resume='auto'; cirlab train: --resume --allow-config-change --set train.{field}=...)"
                              ) from None
        return results

    def _evaluate(self, log: _RunLog, interruptible: bool) -> tuple[dict[str, Any], MissingSelection | None]:
        """Evaluate the weights :meth:`evaluated_weights` names and select; returns the results and the selection's
        complaint, if any (raised by the caller once the live weights are back, not the EMA's)."""
        p = self.progress
        logger.info("evaluating at step %d, epoch %d (%s)", p.step, p.epoch + 1,
                    self.selection_split() or "no selection")
        with self.evaluated_weights():
            self.model.eval()
            try:
                started = time.monotonic()
                with torch.no_grad(), self.stop.evaluation(interruptible):
                    results = self.evaluate_fn(self.model)
                log.evaluated(time.monotonic() - started)
                try:  # outside the interruptible part: selection and its log record are never left half done
                    self._select(results, log)
                except MissingSelection as err:
                    return results, err
                return results, None
            finally:
                self.model.train()

    def _select(self, results: dict[str, Any], log: _RunLog) -> None:
        p, split = self.progress, self.selection_split()
        record = {"kind": "eval", "epoch": p.epoch, "step": p.step, "metrics": _numbers_only(results)}
        score = selection_score(results, split, self.cfg.selection_metric) if split is not None else None
        p.evaluated_step = p.step
        if score is not None:
            # the metric's name beside its value: one selection_score was AMC's avg, DIME's rsum and CaLa's sum of
            # seven recalls, overlaid on one TensorBoard chart
            record["selection_metric"], record["selection_score"] = self.cfg.selection_metric, score
            if p.best_score is None or score > p.best_score:
                p.best_score, p.best_epoch, p.best_step = score, p.epoch, p.step
                record["best"] = True
                self.save_weights("best.pt", results)  # weights as evaluated (EMA if enabled)
        self.eval_history.append(log.write(record))  # as written (with its time), as a resumed run reads it back
        # numbered as the progress line numbers epochs (from 1); the record keeps the 0-based index
        logger.info("eval at step %d, epoch %d: %s", p.step, p.epoch + 1, _short(record))

    def save_weights(self, name: str, metrics: dict[str, Any] | None = None) -> None:
        if self.dist.is_main:
            p = self.progress
            save_checkpoint(self.ckpt_dir / name, {"model": self.model.state_dict(), "metrics": _numbers_only(
                metrics or {}), "progress": dataclasses.asdict(p), "train_config": self.cfg.to_dict(),
                **_model_meta(self.model)})
        self._barrier()

    def end_of_epoch(self, log: _RunLog) -> None:
        cfg, p = self.cfg, self.progress
        if self.ema is not None and cfg.ema_mode == "paper_no_restore":
            self.ema.apply_permanently(self.model)  # AMC: validation and training continue on EMA weights
        # the run's last epoch, also where max_steps ends it exactly at this epoch's end (that stop is no mid-epoch
        # stop, which evaluates on its own: with eval_every != 1 the last steps went unselected, and with 0 no best.pt)
        last_epoch = p.epoch + 1 >= cfg.epochs or (cfg.max_steps is not None and p.step >= cfg.max_steps)
        if (cfg.eval_every and (p.epoch + 1) % cfg.eval_every == 0) or last_epoch:
            self.evaluate_and_select(log)
        p.epoch += 1
        p.batch_in_epoch = 0
        self.save("last.pt")
        if cfg.keep_epoch_checkpoints:
            self.save(f"epoch_{p.epoch}.pt")
            self._drop_old_epoch_checkpoints()

    def _drop_old_epoch_checkpoints(self) -> None:
        """With ``keep_epoch_checkpoints: N``, delete the epoch checkpoints older than the last N (files this run
        wrote under these names; an earlier start of the same run wrote the others)."""
        keep = self.cfg.keep_epoch_checkpoints
        if keep is True or not self.dist.is_main:
            return
        for epoch in range(1, self.progress.epoch - int(keep) + 1):
            (self.ckpt_dir / f"epoch_{epoch}.pt").unlink(missing_ok=True)


class MissingSelection(KeyError):
    """The selection split or metric is not among an evaluation's results; ``field`` names the setting to change
    (``selection`` or ``selection_metric``). The trainer stops after keeping the training so far."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


TASK_SELECTION_METRIC = {"itm": "rsum", "cir": "avg", "rerank": "avg"}  # selection_metric="auto", per model task


def selection_score(results: dict[str, Any], split: str, metric: str) -> float:
    """Sum of the ``+``-joined ``metric`` keys in ``results[split]`` (a flat dict counts as that split)."""
    split_metrics = results.get(split, results if not any(isinstance(v, dict) for v in results.values()) else None)
    if not isinstance(split_metrics, dict):
        raise MissingSelection(f"model selection: evaluate_fn returned no split {split!r} (splits: "
                               f"{sorted(results)})", "selection")
    keys = [k.strip() for k in metric.split("+")]
    missing = [k for k in keys if k not in split_metrics]
    if missing:
        available = sorted(k for k in split_metrics if not isinstance(split_metrics[k], dict))
        raise MissingSelection(f"model selection: metric(s) {missing} not in split {split!r} (available: "
                               f"{available})", "selection_metric")
    return float(sum(float(split_metrics[k]) for k in keys))


def _numbers_only(values: Any) -> Any:
    if isinstance(values, dict):
        return {str(k): _numbers_only(v) for k, v in values.items()
                if isinstance(v, (dict, int, float)) and not isinstance(v, bool)}
    return float(values) if isinstance(values, (int, float)) else values


def _short(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in flat_numbers(record.get("metrics", {})).items())


def _model_meta(model: nn.Module) -> dict[str, Any]:
    meta: dict[str, Any] = {"model_name": model_label(model)}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["model_config"] = to_plain(config.to_dict())
    return meta


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    io.write_yaml(path, to_plain(values))




def _remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files a killed process left mid-write (``.last.pt.*.tmp``); the caller holds the folder lock."""
    for folder in (output_dir, output_dir / "checkpoints"):
        if folder.is_symlink():  # another folder's in-flight writes: never removed from here
            continue
        for leftover, _ in io.remove_temporaries(io.stale_temporaries(folder)):
            logger.info("removed %s, left by a process stopped while writing it", leftover)


def resume_checkpoint(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` names: None for a fresh run ("" or "auto" without ``last.pt`` yet),
    ``<output_dir>/checkpoints/last.pt`` for "auto", else the given path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return Path(resume).expanduser()


def _check_train_inputs(model: Any, train_dataset: Any, cfg: Any) -> None:
    """Before the run folder is touched: a model name, a split instead of its training dataset, a config file's path
    failed inside the first step (leaving a config.yaml that then refused the corrected call)."""
    from cirlab.core.errors import ModelMismatchError

    if not (isinstance(model, nn.Module) and hasattr(model, "training_step")):
        raise ModelMismatchError(f"train/fit needs a model (cirlab.create_model(...)), got {model!r}")
    if not (hasattr(train_dataset, "__getitem__") and hasattr(train_dataset, "__len__")):
        hint = ("; a CIR split gives its training items with split.triplet_dataset(model.image_transform(True))"
                if hasattr(train_dataset, "triplet_dataset") else "")
        raise ModelMismatchError(f"train/fit needs a dataset of training items (indexable, with a length), got a "
                                 f"{type(train_dataset).__name__}{hint}")
    if cfg is not None and not isinstance(cfg, (TrainConfig, Mapping)):
        raise ConfigError(f"train/fit: cfg is a TrainConfig or a dict of its fields, got {cfg!r} (a config file runs "
                          "with cirlab.run_experiment(cirlab.load_config(path)))")
    refuse_low_precision_weights(model, "train")
    grouped = cfg.group_batches if isinstance(cfg, TrainConfig) else (cfg or {}).get("group_batches")
    if grouped:
        group_ids(train_dataset)  # a dataset without group keys: refused here, not once the run folder is claimed


def train(model: nn.Module, train_dataset: Any, cfg: TrainConfig | dict[str, Any] | None = None, *,
          output_dir: str | os.PathLike, evaluate_fn: EvalFn | None = None, collate_fn: Callable | None = None,
          callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
          run_config: dict[str, Any] | None = None, overwrite: bool = False,
          start_notes: Mapping[str, Any] | None = None, run_files: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
    """Train ``model`` on ``train_dataset``; write the run folder; return a summary.

    Args:
        model: an ``nn.Module`` implementing ``training_step(batch) -> dict``.
        train_dataset: map-style dataset of batch items (dicts).
        cfg: a :class:`TrainConfig` or a dict; either's given fields are merged over ``model.default_train_config()``.
        output_dir: run folder (``config.yaml``, ``checkpoints/``, ``log.jsonl``, ``tb/``, ``metrics.json``).
        evaluate_fn: ``evaluate_fn(model) -> {split: {metric: value}}`` run at epoch ends (every process calls
            it, so it may gather across processes); drives the choice of ``checkpoints/best.pt``.
        collate_fn: DataLoader collate function (default: torch's default collate).
        callbacks: called with every optimizer step's log record (after checkpointing).
        run_config: the full resolved run config to write as ``config.yaml`` (default: model + train sections).
        overwrite: a fresh run (no ``cfg.resume``) into a folder that holds a run replaces that run's files;
            without it such a folder is refused (:class:`RunFolderError`). The folder is locked while training.
        start_notes: extra fields of this start's entry in ``provenance.json`` (e.g. the settings a resume changed).
        run_files: ``{name: JSON value}`` written into the run folder at each start (a resume rewrites them),
            e.g. ``data_fingerprint.json``; a None value removes that file (left by the run this one replaces).

    The run seeds Python's, NumPy's and torch's global generators with ``cfg.seed`` when it starts and gives them
    back as they were when it ends (:func:`kept_process_state`): what the caller draws afterwards does not depend
    on the run. The model's initial weights are drawn before, from the caller's streams: for a cell that gives the
    same numbers at every re-run, build the model with ``create_model(..., seed=N)``.

    Returns:
        dict with ``steps``, ``epochs`` (epochs trained; a fraction where ``max_steps`` ends the run inside one),
        ``losses`` (per optimizer step of this call), ``eval_history``,
        ``best_score``, ``best_epoch`` (counted from 1, as the log lines count epochs; None without selection; the
        ``"epoch"`` of ``eval_history`` and log.jsonl records counts from 0: ``best_epoch - 1`` is its record's),
        ``best_step``, ``best_checkpoint``, ``last_checkpoint`` and ``skipped_steps`` (fp16: the steps the
        GradScaler skipped for inf/NaN gradients, over the whole run; each is ``"skipped": true`` in log.jsonl).

    Raises:
        TrainingInterrupted: Ctrl-C (SIGINT), SIGTERM, SIGUSR1 or SIGHUP stopped the run after the current step (or cut
            an evaluation of the loop short, in a single process), with ``checkpoints/last.pt`` written;
            ``cfg.resume="auto"`` continues it, evaluating first what the stop cut short. It is a
            ``KeyboardInterrupt`` (and a :class:`CirlabError`), so ``except KeyboardInterrupt`` catches it.
    """
    _check_train_inputs(model, train_dataset, cfg)
    # trained again, it is no longer the model of the run it was loaded from (workbench.evaluate_run read that
    # run's category: a dress run fine-tuned on shirts was scored on dresses)
    vars(model).pop(RUN_DIR_ATTRIBUTE, None)
    # a TrainConfig's own fields over the model's paper defaults, as a dict's: its class defaults do not count
    cfg = resolve_train_config(model, cfg.given() if isinstance(cfg, TrainConfig) else cfg)
    output_dir = Path(output_dir)
    with kept_process_state(), io.folder_lock(output_dir) if init_distributed().is_main else contextlib.nullcontext():
        trainer = Trainer(model, train_dataset, cfg, output_dir, evaluate_fn, collate_fn, callbacks, run_config,
                          overwrite, start_notes, run_files)
        return trainer.run()
