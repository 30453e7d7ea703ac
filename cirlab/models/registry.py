"""A small timm-style model registry: names map to entrypoints that take a config preset and overrides.

Usage::

    model = cirlab.create_model("amc", preset="tiny", embed_dim=64)
    cirlab.list_models()            # ['amc', 'blip_rerank_stage1', 'blip_rerank_stage2', 'dime', ...]
    cirlab.list_presets("amc")      # ['fashioniq', 'lite', 'shoes', 'tiny']
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from cirlab.core.contracts import check_model

# model modules imported on demand so that `import cirlab` does not import torch
_MODEL_MODULES = ("cirlab.models.amc", "cirlab.models.dime", "cirlab.models.blip_rerank")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # "cir" | "itm" | "rerank"
    build: Callable[..., Any]  # build(config) -> nn.Module
    config_cls: type


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str, config_cls: type) -> Callable:
    """Decorator registering ``build(config) -> nn.Module`` under ``name``."""

    def wrap(build: Callable) -> Callable:
        _REGISTRY[name] = ModelEntry(name, task, build, config_cls)
        return build

    return wrap


def _load_all() -> None:
    # every listed module must import: a typo or a broken model file is an error, never a silently missing model
    for module in _MODEL_MODULES:
        importlib.import_module(module)


def get_entry(name: str) -> ModelEntry:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern."""
    _load_all()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def list_presets(name: str) -> list[str]:
    """Preset names of one model (paper presets plus ``tiny`` and ``lite``)."""
    return sorted(get_entry(name).config_cls.presets())


def build_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """The model's config dataclass for ``preset`` (default: its default preset) with overrides applied."""
    cls = get_entry(name).config_cls
    return cls.from_preset(preset, **overrides) if preset else cls(**overrides)


def create_model(name: str, preset: str | None = None, *, config: Any = None, **overrides: Any) -> Any:
    """Build a registered model from a preset (``tiny``, ``lite``, paper presets) plus field overrides."""
    entry = get_entry(name)
    cfg = config if config is not None else build_config(name, preset, **overrides)
    model = entry.build(cfg)
    _check_identity(type(model), entry)
    check_model(model)
    return model


def _check_identity(cls: type, entry: ModelEntry) -> None:
    """Model classes declare ``model_name`` and ``task`` (checkpoints and the engine read them); a class that
    declares neither gets its registration's, one that declares others is a registration error."""
    for attr, expected in (("model_name", entry.name), ("task", entry.task)):
        declared = cls.__dict__.get(attr) or getattr(cls, attr, None)
        if declared is None:
            setattr(cls, attr, expected)
        elif declared != expected:
            raise TypeError(f"{cls.__name__}.{attr} is {declared!r} but it is registered as {expected!r}")
