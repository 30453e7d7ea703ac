"""cirlab: a notebook-first workbench for composed image retrieval (CIR) and image-text matching (ITM).

The public API is re-exported lazily so that ``import cirlab`` stays cheap: torch, transformers and
matplotlib load only when a name that needs them is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved on first access (PEP 562)
_LAZY = {
    "create_model": "cirlab.registry:create_model",
    "list_models": "cirlab.registry:list_models",
    "list_presets": "cirlab.registry:list_presets",
    "register_model": "cirlab.registry:register_model",
    "trace_routes": "cirlab.tracing:trace_routes",
    "RouteTrace": "cirlab.tracing:RouteTrace",
    "TopK": "cirlab.topk:TopK",
    "save_topk": "cirlab.topk:save_topk",
    "load_topk": "cirlab.topk:load_topk",
    "data_root": "cirlab.paths:data_root",
    "cache_dir": "cirlab.paths:cache_dir",
    "runs_dir": "cirlab.paths:runs_dir",
    "metrics": "cirlab.metrics",
    "retrieval": "cirlab.retrieval",
    "viz": "cirlab.viz",
    "data": "cirlab.data",
    # `fit` (not `train`): `cirlab.train` is the trainer module, and `import cirlab.train` would shadow a function
    "fit": "cirlab.train:train",
    "train": "cirlab.train",
    "TrainConfig": "cirlab.train:TrainConfig",
    "evaluate_cir": "cirlab.evaluate:evaluate_cir",
    "run_experiment": "cirlab.runs:run_experiment",
    "load_config": "cirlab.runs:load_config",
    "evaluate_itm": "cirlab.evaluate:evaluate_itm",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'cirlab' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
