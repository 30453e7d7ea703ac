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
    "create_model": "cirlab.models.registry:create_model",
    "list_models": "cirlab.models.registry:list_models",
    "list_presets": "cirlab.models.registry:list_presets",
    "register_model": "cirlab.models.registry:register_model",
    "trace_routes": "cirlab.core.tracing:trace_routes",
    "RouteTrace": "cirlab.core.tracing:RouteTrace",
    "TopK": "cirlab.core.topk:TopK",
    "save_topk": "cirlab.core.topk:save_topk",
    "load_topk": "cirlab.core.topk:load_topk",
    "data_root": "cirlab.core.paths:data_root",
    "cache_dir": "cirlab.core.paths:cache_dir",
    "runs_dir": "cirlab.core.paths:runs_dir",
    # the base of every error caused by the user's input (a config, a file, a name): `except cirlab.CirlabError`
    "CirlabError": "cirlab.core.errors:CirlabError",
    "errors": "cirlab.core.errors",
    # layer modules, so that `from cirlab import viz, workbench` reads as the notebooks use it
    "metrics": "cirlab.core.metrics",
    "retrieval": "cirlab.core.retrieval",
    "tracing": "cirlab.core.tracing",
    "paths": "cirlab.core.paths",
    "registry": "cirlab.models.registry",
    "runs": "cirlab.engine.runs",
    "workbench": "cirlab.workbench",
    "analysis": "cirlab.workbench.analysis",
    "viz": "cirlab.workbench.viz",
    "widgets": "cirlab.workbench.widgets",
    "report": "cirlab.workbench.report",
    "data": "cirlab.data",
    # `fit` (not `train`): `cirlab.engine.train` is the trainer module, and `import cirlab.engine.train` would
    # shadow a function
    "fit": "cirlab.engine.train:train",
    "train": "cirlab.engine.train",
    "TrainConfig": "cirlab.engine.train:TrainConfig",
    "evaluate_cir": "cirlab.engine.evaluate:evaluate_cir",
    "run_experiment": "cirlab.engine.runs:run_experiment",
    "load_config": "cirlab.engine.runs:load_config",
    "evaluate_itm": "cirlab.engine.evaluate:evaluate_itm",
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
