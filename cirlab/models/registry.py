"""A small timm-style model registry: names map to entrypoints that take a config preset and overrides.

Usage::

    model = cirlab.create_model("amc", preset="tiny", embed_dim=64)
    cirlab.list_models()            # ['amc', 'blip_rerank_stage1', 'blip_rerank_stage2', 'dime', ...]
    cirlab.list_presets("amc")      # ['fashioniq', 'lite', 'shoes', 'tiny']
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from cirlab.core.contracts import check_model
from cirlab.core.errors import ConfigError, UnknownKeyError

# model modules imported on demand so that `import cirlab` does not import torch
_MODEL_MODULES = ("cirlab.models.amc", "cirlab.models.dime", "cirlab.models.blip_rerank", "cirlab.models.hrem",
                 "cirlab.models.cala")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # "cir" | "itm" | "rerank"
    build: Callable[..., Any]  # build(config) -> nn.Module
    config_cls: type


_REGISTRY: dict[str, ModelEntry] = {}


MODELS_ENV = "CIRLAB_MODELS"  # modules of a user's own models, imported with cirlab's (comma-separated)
ENTRY_POINT_GROUP = "cirlab.models"  # the same, declared by an installed package (its pyproject's entry points)


def register_model(name: str, *, task: str, config_cls: type) -> Callable:
    """Decorator registering ``build(config) -> nn.Module`` (a model class, or a function returning one) under
    ``name``. Checked here, where the mistake is: ``task`` is one of ``cir``, ``itm``, ``rerank``; ``config_cls`` has
    the preset interface (``from_preset``, ``from_dict``: subclass :class:`cirlab.core.config.PresetMixin`); a name
    that another model holds is refused (one of them would be lost, which one depending on import order). A module
    imported again (``importlib.reload``) may register its own names again."""
    from cirlab.core.contracts import TASKS
    from cirlab.core.errors import ModelContractError

    if task not in TASKS:
        raise ModelContractError(f"register_model({name!r}): task={task!r}; expected one of {', '.join(TASKS)}")
    missing = [m for m in ("from_preset", "from_dict", "PRESETS") if not hasattr(config_cls, m)]
    if missing:
        raise ModelContractError(f"register_model({name!r}): config class {config_cls.__name__} lacks {missing}: "
                                 "subclass cirlab.core.config.PresetMixin (a dataclass with a PRESETS dict)")
    if not _all_fields_are_dataclass_fields(config_cls):  # create_model failed inside dataclasses, or the field
        # of an undecorated subclass was a class attribute that no preset or override could set
        raise ModelContractError(f"register_model({name!r}): config class {config_cls.__name__} is not a dataclass: "
                                 "decorate it with @dataclasses.dataclass (a subclass of a config needs it too)")

    def wrap(build: Callable) -> Callable:
        shipped = _shipped_origins().get(name) if build.__module__ not in _MODEL_MODULES else None
        if shipped:  # cirlab's own models load lazily: a user's model taking one of their names is refused now,
            # not at the next list_models() (which then failed for the whole session); read from their source, so
            # that registering a user's model imports neither torch nor cirlab's models
            raise ModelContractError(f"register_model({name!r}): the name is taken by {shipped}; "
                                     f"{_origin(build)} needs another name")
        held = _REGISTRY.get(name)
        if held is not None and _origin(held.build) != _origin(build):
            raise ModelContractError(f"register_model({name!r}): the name is taken by {_origin(held.build)}; "
                                     f"{_origin(build)} needs another name")
        _REGISTRY[name] = ModelEntry(name, task, build, config_cls)
        return build

    return wrap


def _all_fields_are_dataclass_fields(cls: type) -> bool:
    """A dataclass whose own annotated names are all fields (a ``ClassVar`` is not a field)."""
    if not dataclasses.is_dataclass(cls):
        return False
    fields = {f.name for f in dataclasses.fields(cls)}
    own = cls.__dict__.get("__annotations__", {})
    return all(n in fields or _is_pseudo_field(t) for n, t in own.items())


def _is_pseudo_field(annotation: Any) -> bool:
    """A ``ClassVar`` or an ``InitVar`` (an ``__init__``/``__post_init__`` argument): annotated in the class body,
    yet never a field. Read from the text, as a module with ``from __future__ import annotations`` keeps strings."""
    text = str(annotation)
    return "ClassVar" in text or "InitVar" in text


def _origin(build: Callable) -> str:
    return f"{build.__module__}.{getattr(build, '__qualname__', build)}"


def _load_all() -> None:
    # every listed module must import: a typo or a broken model file is an error, never a silently missing model
    for module in _MODEL_MODULES:
        importlib.import_module(module)
    _load_user_models()


def _load_user_models() -> None:
    for module, source in user_model_modules():
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise _user_import_error(module, source, err) from None


def _user_import_error(module: str, source: str, err: ImportError) -> ConfigError:
    """What a failed import of a user's model module says: the module (or a package above it) is not found, so its
    folder is not on PYTHONPATH; or it was found and something it imports is missing (names compared at dots:
    ``torchx`` is no part of ``torchx_model``)."""
    missing = err.name
    if not isinstance(err, ModuleNotFoundError):
        # found and running: a name it imports is not there (`from . import helperz` without helperz.py says
        # "cannot import name 'helperz' from 'pk'", naming the user's own package)
        return ConfigError(f"{source}: cannot import {module!r}: {err}")
    if not missing or _is_within(module, missing):
        return ConfigError(f"{source}: cannot import {module!r} ({err}); its folder must be on PYTHONPATH "
                           "(or the package installed)")
    if missing.split(".")[0] == module.split(".")[0]:  # a module of the user's own package, not a dependency
        return ConfigError(f"{source}: cannot import {module!r}: it imports {missing!r}, which cannot be found")
    return ConfigError(f"{source}: cannot import {module!r}: it imports {missing!r}, which is not installed in "
                       "this environment")


def _is_within(module: str, package: str) -> bool:
    """Whether ``package`` is ``module`` itself or a package above it (``a`` and ``a.b`` for ``a.b``)."""
    return module == package or module.startswith(package + ".")


def user_model_modules() -> list[tuple[str, str]]:
    """``(module, where it is named)`` for a user's model modules: the comma-separated ``CIRLAB_MODELS`` (a module
    on ``PYTHONPATH``: seen by the command line, notebooks and report kernels alike, which inherit the environment),
    then the ``cirlab.models`` entry points of installed packages."""
    named = [(m.strip(), f"{MODELS_ENV}={os.environ[MODELS_ENV]!r}")
             for m in os.environ.get(MODELS_ENV, "").split(",") if m.strip()]
    return named + list(_entry_point_modules())


@functools.lru_cache(maxsize=1)
def _entry_point_modules() -> tuple[tuple[str, str], ...]:
    """The ``cirlab.models`` entry points, read once per process (scanning every installed distribution's metadata
    at each model lookup would cost more than the lookup)."""
    from importlib.metadata import entry_points

    return tuple((ep.value.split(":")[0], f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r}")
                 for ep in entry_points(group=ENTRY_POINT_GROUP))


class UnknownModelError(UnknownKeyError, ConfigError):
    """A model name that is not registered: a ``KeyError`` (a missing registry key) and a ``ValueError`` (the
    :class:`ConfigError` a run config naming it raises), so that either ``except`` catches it wherever it is met."""


def get_entry(name: str) -> ModelEntry:
    """The registry row of model ``name``; :class:`UnknownModelError` with the near spelling for an unknown one."""
    from cirlab.core.config import did_you_mean

    _load_all()
    if not isinstance(name, str):  # a list would fail as "unhashable" inside the lookup
        raise TypeError(f"a model name is a string (one of cirlab.list_models()), got {name!r}")
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; known models: "
                              f"{', '.join(sorted(_REGISTRY)) or '(none)'} (a model of your own: name its module in "
                              f"{MODELS_ENV}, see docs/architecture.md)")
    return _REGISTRY[name]


def list_models(pattern: str = "*", *, shipped: bool = False) -> list[str]:
    """Registered model names matching a glob pattern; ``shipped=True`` keeps only cirlab's own models (those
    registered by its model modules, not by a user's or a test's ``register_model`` call)."""
    _load_all()
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern)
                  and (not shipped or e.build.__module__ in _MODEL_MODULES))


def describe_models() -> list[dict[str, Any]]:
    """``[{"model", "task", "presets"}]`` for every listed model, read from the model files' source (their
    ``@register_model`` calls and their config classes' ``PRESETS`` keys) without importing them, so that
    ``cirlab models`` answers without loading torch. A file written otherwise (a computed name or preset table)
    is imported instead; a user's model modules (:func:`user_model_modules`) are imported, and models registered
    from outside the listed modules are included too."""
    rows: dict[str, dict[str, Any]] = {}
    for module in _MODEL_MODULES:
        found = _static_registrations(module)
        if found is None:
            importlib.import_module(module)
            continue
        rows.update({row["model"]: {k: v for k, v in row.items() if k != "origin"} for row in found})
    _load_user_models()  # CIRLAB_MODELS and entry points: imported (a user's file may be written any way)
    for name, entry in _REGISTRY.items():  # imported above, or registered by the caller
        rows.setdefault(name, {"model": name, "task": entry.task, "presets": sorted(entry.config_cls.presets())})
    return [rows[n] for n in sorted(rows)]


@functools.lru_cache(maxsize=None)
def _static_registrations(module: str) -> list[dict[str, Any]] | None:
    """:func:`_static_entries` of one of cirlab's model modules, read from its file (None: not literal, or no
    file)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if not (spec and spec.origin):
        return None
    found = _static_entries(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    return None if found is None else [{**row, "origin": f"{module}.{row['origin']}"} for row in found]


def _shipped_origins() -> dict[str, str]:
    """The names cirlab's model modules register -> the function or class registered (a module whose source is not
    literal is imported, and its registrations read)."""
    origins = {}
    for module in _MODEL_MODULES:
        found = _static_registrations(module)
        if found is None:
            importlib.import_module(module)
            origins.update({n: _origin(e.build) for n, e in _REGISTRY.items() if e.build.__module__ == module})
        else:
            origins.update({row["model"]: row["origin"] for row in found})
    return origins


def _static_entries(tree: Any) -> list[dict[str, Any]] | None:
    """The registrations of one parsed model file, or None when they are not literal."""
    import ast

    presets: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id == "PRESETS":
                    if not isinstance(stmt.value, ast.Dict) or not all(
                            isinstance(k, ast.Constant) and isinstance(k.value, str) for k in stmt.value.keys):
                        return None
                    presets[node.name] = sorted(k.value for k in stmt.value.keys)
    rows = []
    for node in ast.walk(tree):
        for deco in getattr(node, "decorator_list", []):
            if not (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_model"):
                continue
            kw = {k.arg: k.value for k in deco.keywords}
            name = deco.args[0] if deco.args else None
            task, cls = kw.get("task"), kw.get("config_cls")
            if not (isinstance(name, ast.Constant) and isinstance(task, ast.Constant) and isinstance(cls, ast.Name)
                    and cls.id in presets):
                return None
            rows.append({"model": name.value, "task": task.value, "presets": presets[cls.id], "origin": node.name})
    return rows


def list_presets(name: str) -> list[str]:
    """Preset names of one model (paper presets plus ``tiny`` and ``lite``)."""
    return sorted(get_entry(name).config_cls.presets())


def build_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """The model's config dataclass for ``preset`` (default: its default preset) with overrides applied."""
    cls = get_entry(name).config_cls
    return cls.from_preset(preset, **overrides) if preset else cls.from_dict(overrides)


def create_model(name: str, preset: str | None = None, *, config: Any = None, seed: int | None = None,
                 **overrides: Any) -> Any:
    """Build a registered model from a preset (``tiny``, ``lite``, paper presets) plus field overrides, or from a
    ``config`` (the model's config dataclass, or a dict of its fields) plus field overrides.

    ``seed`` seeds Python, NumPy and torch (as ``TrainConfig.seed`` does when training starts) before the weights
    are drawn, so that one call gives one model: the same initial weights as ``cirlab train`` with ``train.seed``
    set to it; weights drawn later from the training data (``fit_vocab``) continue the model's seeded streams.
    The caller's random streams are given back as they were: what the caller draws next does not depend on the
    call. Without a seed the weights follow (and advance) the global random state as it is."""
    import dataclasses

    from cirlab.core.config import check_field_ranges, check_fields

    entry = get_entry(name)
    cls = entry.config_cls
    if config is None:
        cfg = build_config(name, preset, **overrides)
    elif preset is not None:
        raise ConfigError(f"create_model({name!r}): pass a preset or a config, not both")
    elif isinstance(config, Mapping):
        cfg = cls.from_dict({**config, **overrides})
    elif isinstance(config, cls):
        check_field_ranges(cls, vars(config))  # built elsewhere: not through check_fields
        check_fields(cls, overrides)
        cfg = dataclasses.replace(config, **overrides)
    else:
        raise ConfigError(f"create_model({name!r}): config must be its {cls.__name__} or a dict of its fields, got "
                          f"{type(config).__name__}")
    if seed is None:
        model = entry.build(cfg)
    else:
        from cirlab.core.streams import keep_model_streams, seeded_streams
        from cirlab.engine.train import validate_train_values

        validate_train_values({"seed": seed}, prefix="create_model: ")  # what train.seed accepts (NumPy's range)
        with seeded_streams(seed) as after:
            model = entry.build(cfg)
        keep_model_streams(model, after[0])  # its later draws (fit_vocab) continue them: cirlab.core.streams
    _check_identity(model, entry)
    check_model(model)
    model.init_seed = seed  # which initial weights: a run's provenance.json records it (None: the global state's)
    return model


def module_parameters(model: Any) -> list[dict[str, Any]]:
    """``[{"module", "params", "trainable", "frozen"}]`` per top-level child of ``model``, plus a ``total`` row
    (parameters registered on the model itself, e.g. a learned token, count in the total only)."""
    rows = []
    for name, module in model.named_children():
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append({"module": name, "params": sum(p.numel() for p in params), "trainable": trainable})
    everything = list(model.parameters())
    rows.append({"module": "total", "params": sum(p.numel() for p in everything),
                 "trainable": sum(p.numel() for p in everything if p.requires_grad)})
    return [{**r, "frozen": r["params"] - r["trainable"]} for r in rows]


CPU_PRESETS = ("tiny", "lite")  # every model's test and CPU-demo sizes


def parameter_table(name: str, preset: str | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """:func:`module_parameters` of a model built on the meta device: no memory, no weight read, so paper sizes
    count on any machine. A BERT named by the hub id ``bert-base-uncased`` (the paper presets' text encoder) is
    counted at BERT-base sizes without the hub. The CPU presets (``tiny``, ``lite``) are built for real: they are
    small, and ``lite`` reads its offline weight files when built, which the meta device refuses."""
    return module_parameters(_weightless_model(name, preset, overrides))


def preset_settings(name: str, preset: str | None = None, **overrides: Any) -> dict[str, dict[str, Any]]:
    """What a run of ``name`` at ``preset`` starts from: ``{"model": the config's fields, "train": the paper's
    training recipe}`` (the model's ``default_train_config()``, the TrainConfig fields it sets; the others keep
    TrainConfig's defaults). The model is built as :func:`parameter_table` builds it: no weights are read."""
    config = build_config(name, preset, **overrides)
    recipe = _weightless_model(name, preset, overrides).default_train_config()
    return {"model": config.to_dict(), "train": dict(recipe)}


def _weightless_model(name: str, preset: str | None, overrides: dict[str, Any]) -> Any:
    """``name`` at ``preset`` built where :func:`parameter_table_device` says, a hub BERT (``bert-base-uncased``,
    the paper presets' text encoder) as a random BERT of its sizes: nothing is downloaded or read."""
    import torch

    config = build_config(name, preset, **overrides)
    if getattr(config, "bert", None) == "bert-base-uncased":
        from cirlab.models._text import BERT_BASE_CONFIG

        config = build_config(name, preset, **{**overrides, "bert": "random", "bert_config": BERT_BASE_CONFIG})
    # a model's warnings about its weights (AMC's "no local resnet50 weights") are about training it; nothing
    # trains or reads weights here, so they would only mislead
    quiet = logging.getLogger("cirlab.models")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device(parameter_table_device(preset)):
            return create_model(name, config=config)
    finally:
        quiet.setLevel(level)


def parameter_table_device(preset: str | None) -> str:
    """Where :func:`parameter_table` builds a preset: ``"cpu"`` for the small CPU presets, else ``"meta"``."""
    return "cpu" if preset in CPU_PRESETS else "meta"


def _check_identity(model: Any, entry: ModelEntry) -> None:
    """Model classes declare ``model_name`` and ``task`` (checkpoints and the engine read them); a model whose class
    declares neither gets its registration's (on the instance: one class may serve several names), one whose class
    declares others is a registration error."""
    from cirlab.core.errors import ModelContractError

    cls = type(model)
    for attr, expected in (("model_name", entry.name), ("task", entry.task)):
        declared = cls.__dict__.get(attr) or getattr(cls, attr, None)
        if declared is None:
            object.__setattr__(model, attr, expected)  # past nn.Module's __setattr__: a plain attribute
        elif declared != expected:
            raise ModelContractError(f"{cls.__name__}.{attr} is {declared!r} but it is registered as {expected!r}")
