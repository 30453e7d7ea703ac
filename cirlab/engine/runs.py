"""Run configs and run folders: YAML loading, ``--set`` overrides, and one experiment from config to metrics.

A run config (``configs/*.yaml``) has five sections::

    model: amc                     # a name from cirlab.list_models()
    preset: fashioniq              # one of cirlab.list_presets(model)
    model_overrides: {}            # config-dataclass fields changed on top of the preset
    dataset:
      name: fashioniq              # fashioniq | shoes | cirr (CIR) or f30k | coco (ITM precomp)
      root: ""                     # "" -> $CIRLAB_DATA/<name> (precomp: $CIRLAB_DATA); never an absolute path here
      category: dress              # Fashion-IQ: one category, a list, or null (train on all, report per category)
      train_split: train
      val_split: val               # model selection split (train.selection: "val" means this split)
      test_split: test             # the split results are reported on (selection "paper" selects here)
      options: {}                  # loader options (e.g. Fashion-IQ protocol / gallery)
      synthetic: null              # {size: tiny, seed: 0}: generate the embedded synthetic data when root is ""
    train: {}                      # cirlab.engine.train.TrainConfig fields, over the model's paper defaults
    eval:
      protocol: null               # null = the dataset's: CIR fashioniq | shoes | cirr; ITM full (f30k) |
                                   #   coco1k | coco5k | coco (both; COCO's default; testall only, dev is full)
      splits: [val]                # evaluated after training with checkpoints/best.pt
      k: 50                        # top-K file length
      batch_size: 64
      shard_size: 1000             # ITM: images x captions per scoring block
    output_dir: ""                 # "" -> $CIRLAB_RUNS/<config name>

``--set train.lr=2e-4 --set dataset.category=[dress,shirt]`` parses each value as YAML.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from cirlab.core.io import write_json
from cirlab.core.contracts import HasDatasetExtras, HasImageTransform, HasOwnEvaluation, HasVocab

logger = logging.getLogger(__name__)

# "model_config" is written into a run's config.yaml (the resolved model config); it is ignored when read back
SECTIONS = ("name", "model", "preset", "model_overrides", "dataset", "train", "eval", "output_dir", "model_config")
DEFAULTS: dict[str, Any] = {
    "model": None, "preset": None, "model_overrides": {},
    "dataset": {"name": None, "root": "", "category": None, "train_split": "train", "val_split": "val",
                "test_split": "test", "options": {}, "synthetic": None},
    "train": {},
    "eval": {"protocol": None, "splits": None, "k": 50, "batch_size": 64, "shard_size": 1000, "topk": True},
    "output_dir": "",
}


from cirlab.core.errors import ConfigError  # noqa: E402  (re-exported: raised and caught by this name)


# PyYAML follows YAML 1.1, where "2e-4" (no dot) is a string; users mean a float
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _fix_floats(value: Any) -> Any:
    if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _fix_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_floats(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- config


def parse_set(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-3", "dataset.category=[dress]"]`` -> ``[(["train", "lr"], 0.001), ...]`` (YAML-typed)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=1e-4)")
        try:
            value = _fix_floats(yaml.safe_load(raw)) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from err
        out.append(([part for part in key.strip().split(".")], value))
    return out


def apply_overrides(config: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set nested keys (creating sections as needed); a path through a non-mapping is an error."""
    config = copy.deepcopy(config)
    for path, value in overrides:
        if path[0] not in SECTIONS:
            raise ConfigError(f"--set {'.'.join(path)}: unknown section {path[0]!r}; known: {', '.join(SECTIONS)}")
        node = config
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return config


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a deep copy of ``base``, section by section (nested mappings merge, values replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (merge_config(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict)
                    else value)
    return out


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run config with every section's defaults (:data:`DEFAULTS`) filled in."""
    return merge_config(DEFAULTS, config)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a run config, apply ``--set`` overrides and fill defaults; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _fix_floats(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    config = with_defaults(apply_overrides(raw, parse_set(overrides)))
    config.setdefault("name", path.stem)
    validate_config(config, str(path))
    return config


def validate_config(config: dict[str, Any], source: str = "config") -> None:
    """Check names early (model, preset, train fields) so a typo fails before any data is read."""
    from cirlab.models.registry import get_entry, list_presets
    from cirlab.engine.train import TrainConfig

    if not config.get("model"):
        raise ConfigError(f"{source}: 'model' is required (one of cirlab.list_models())")
    try:
        get_entry(config["model"])
    except KeyError as err:
        raise ConfigError(f"{source}: model: {err.args[0]}") from None
    preset = config.get("preset")
    if preset and preset not in list_presets(config["model"]):
        raise ConfigError(f"{source}: preset {preset!r} of {config['model']!r} is unknown; "
                          f"known: {', '.join(list_presets(config['model']))}")
    if not config["dataset"].get("name"):
        raise ConfigError(f"{source}: dataset.name is required")
    fields = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(config.get("train") or {}) - fields)
    if unknown:
        raise ConfigError(f"{source}: train: unknown field(s) {unknown}; known: {sorted(fields)}")


def output_dir_of(config: dict[str, Any]) -> Path:
    if config.get("output_dir"):
        return Path(config["output_dir"]).expanduser()
    from cirlab.core.paths import runs_dir

    return runs_dir() / str(config.get("name") or config["model"])


# ----------------------------------------------------------------------------------------------- data


def is_precomp(config: dict[str, Any]) -> bool:
    """True when the run's dataset is an ITM precomp dataset (f30k, coco; :mod:`cirlab.data.catalog`)."""
    from cirlab.data.catalog import is_itm

    return is_itm(config["dataset"]["name"])


def dataset_root(config: dict[str, Any]) -> Path | None:
    """The dataset root: explicit, else the synthetic data (generated on demand), else None ($CIRLAB_DATA)."""
    from cirlab.data.catalog import dataset_root as resolve

    ds = config["dataset"]
    if ds.get("root"):
        return Path(ds["root"]).expanduser()
    synth = ds.get("synthetic")
    if synth:
        from cirlab.data.generators import synthetic

        base = synthetic.ensure(synth.get("out"), seed=int(synth.get("seed", 0)), size=synth.get("size", "tiny"),
                                image_size=int(synth.get("image_size", 64)))
        return resolve(ds["name"], base)
    return None


def _categories(ds: dict[str, Any], root: Path | None, split: str, for_training: bool) -> list[str | None]:
    from cirlab.data.catalog import categories, get_dataset

    if not get_dataset(ds["name"]).categories:
        return [None]
    cat = ds.get("category")
    if cat is None:  # train on all categories jointly; report each category found on disk (emoji: skin_tone, ...)
        return [None] if for_training else list(categories(ds["name"], root, split))
    return [cat] if isinstance(cat, str) else list(cat)


def load_cir_splits(config: dict[str, Any], split: str, *, for_training: bool = False) -> list[Any]:
    from cirlab.data import load_cir

    ds, root = config["dataset"], dataset_root(config)
    options = dict(ds.get("options") or {})
    cats = _categories(ds, Path(root) if root is not None else None, split, for_training)
    return [load_cir(ds["name"], root, split, category=c, **options) for c in cats]


def load_precomp_split(config: dict[str, Any], split: str) -> Any:
    from cirlab.data import load_precomp

    ds = config["dataset"]
    return load_precomp(dataset_root(config), str(ds["name"]).lower(), split, **dict(ds.get("options") or {}))


def train_dataset(config: dict[str, Any], model: Any) -> Any:
    import torch

    split = config["dataset"]["train_split"]
    if is_precomp(config):
        # models whose items carry random extras (DIME's extra caption / image per sample) say which
        extras = model.dataset_extras() if isinstance(model, HasDatasetExtras) else {}
        return load_precomp_split(config, split).pair_dataset(**extras)
    transform = model.image_transform(True) if isinstance(model, HasImageTransform) else None
    parts = [s.triplet_dataset(transform) for s in load_cir_splits(config, split, for_training=True)]
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


# ----------------------------------------------------------------------------------------------- models


def build_model(config: dict[str, Any]) -> Any:
    from cirlab.models.registry import create_model

    return create_model(config["model"], config.get("preset"), **dict(config.get("model_overrides") or {}))


def build_seeded_model(config: dict[str, Any]) -> Any:
    """:func:`build_model` with the initial weights drawn under the run's seed (``train.seed``, else the model's
    own default seed, e.g. AMC's 300, else 0), so one config gives one run; the trainer re-seeds with the same
    seed for the data order and augmentations."""
    from cirlab.engine.train import seed_everything

    train_section = dict(config.get("train") or {})
    seed = int(train_section.get("seed", 0))
    seed_everything(seed)
    model = build_model(config)
    model_seed = _model_train_defaults(model).get("seed")
    if "seed" not in train_section and model_seed is not None and int(model_seed) != seed:
        seed_everything(int(model_seed))  # known only once the model exists: build again under it
        model = build_model(config)
    return model


class _Captions:
    """Several CIR training splits seen as one (``fit_vocab`` reads ``.triplets``)."""

    def __init__(self, splits: Sequence[Any]) -> None:
        self.triplets = [t for s in splits for t in s.triplets]


def fit_to_training_data(model: Any, config: dict[str, Any]) -> None:
    """Data-dependent set-up before training: models with a vocabulary built from the training captions
    (AMC's ``fit_vocab``; DIME's for its random tiny BERT, a no-op for real BERTs) get it here, so the CLI,
    the notebooks and the API train the same model. Precomp (ITM) models get the training ``PrecompSplit``."""
    if not isinstance(model, HasVocab):
        return
    if is_precomp(config):
        size = model.fit_vocab(load_precomp_split(config, config["dataset"]["train_split"]))
    else:
        splits = load_cir_splits(config, config["dataset"]["train_split"], for_training=True)
        size = model.fit_vocab(_Captions(splits))
    logger.info("%s: vocabulary of %s words from the %s captions", config["model"], size,
                config["dataset"]["train_split"])


def model_from_checkpoint(path: str | os.PathLike, *, model: str | None = None, preset: str | None = None,
                          trust_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with (its saved name + config) and load its weights."""
    from cirlab.core.checkpoint import CheckpointError, load_checkpoint, model_state_dict
    from cirlab.models.registry import create_model, get_entry

    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    meta = ckpt if isinstance(ckpt, dict) else {}
    name = model or meta.get("model_name")
    if not name:
        raise CheckpointError(f"{path}: the checkpoint does not say which model it holds; pass --model (and --preset)")
    if preset is None and meta.get("model_config"):
        cfg = get_entry(name).config_cls.from_dict(_restore_tuples(get_entry(name).config_cls, meta["model_config"]))
        net = create_model(name, config=cfg)
    else:
        net = create_model(name, preset)
    net.load_state_dict(model_state_dict(ckpt, path))
    return net, meta


def make_ensemble(models: Sequence[Any]) -> Any:
    """One model that scores as the mean of ``models``' scores, built by the members' own ``ensemble``
    classmethod (AMC: mean of cosines, the original ``eval_ensemble.py``; DIME: DIME*, mean of the score
    matrices). Members must be the same paper's model."""
    kinds = sorted({type(m).__name__ for m in models})
    if len(kinds) != 1:
        raise ConfigError(f"an ensemble's members must be one model kind; got {', '.join(kinds)}")
    build = getattr(type(models[0]), "ensemble", None)
    if build is None:
        raise ConfigError(f"{kinds[0]} defines no ensemble (AMC and DIME do)")
    try:
        return build(list(models))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _restore_tuples(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML/checkpoint round trips turn tuples into lists; give tuple-default fields their tuples back."""
    import dataclasses

    out = dict(values)
    for f in dataclasses.fields(cls):
        if f.name in out and isinstance(out[f.name], list) and isinstance(f.default, tuple):
            out[f.name] = tuple(out[f.name])
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def default_selection_metric(config: dict[str, Any]) -> str:
    return "rsum" if is_precomp(config) else "avg"


def reported_metric_names(config: dict[str, Any], loaded: Any, split: str | None = None) -> set[str] | None:
    """The metric names :func:`evaluate_split` reports for ``loaded`` (as :func:`load_split` returns it),
    from the protocol's own metric function on placeholder ranks; None when that cannot be known up front."""
    from cirlab.engine.evaluate import CIR_PROTOCOLS, metric_names

    if is_precomp(config):
        return metric_names(itm_protocol(config, split))
    protocol = config["eval"].get("protocol") or getattr(loaded[0], "dataset", None)
    if protocol not in CIR_PROTOCOLS:
        return None
    return metric_names(protocol, [s.category or f"split{i}" for i, s in enumerate(loaded)])


def check_selection_metric(config: dict[str, Any], metric: str, split: str, loaded: Any, model: Any) -> None:
    """Fail before training when model selection asks for a metric the evaluation will not report
    (otherwise the run stops with a KeyError at its first evaluation, an epoch later)."""
    if isinstance(model, HasOwnEvaluation):  # the model's own pipeline decides its metric names
        return
    names = reported_metric_names(config, loaded, split)
    if names is None:
        return
    missing = [k.strip() for k in metric.split("+") if k.strip() not in names]
    if missing:
        raise ConfigError(f"config {config.get('name', '')!r}: train.selection_metric {metric!r}: {missing} "
                          f"not reported on split {split!r}; available: {', '.join(sorted(names))}")


def itm_protocol(config: dict[str, Any], split: str | None = None) -> str:
    """The ITM protocol of ``split``: ``eval.protocol`` (default: ``coco`` = 1K and 5K for COCO, else ``full``).

    The COCO protocols describe the 5,000-image ``testall`` only; every other split (the ``dev`` that selects the
    checkpoint, 1,000 images) is scored on its full matrix, as the original validation does."""
    from cirlab.data.catalog import get_dataset

    protocol = config["eval"].get("protocol") or get_dataset(config["dataset"]["name"]).default_protocol
    if split is not None and protocol.startswith("coco") and split != config["dataset"]["test_split"]:
        return "full"
    return protocol


def evaluate_split(model: Any, config: dict[str, Any], split: str, *, device: Any = "cpu",
                   topk_dir: Path | None = None, loaded: Any = None) -> dict[str, Any]:
    """Evaluate ``model`` on one named split of the configured dataset; returns evaluate_cir/itm's dict.

    ``loaded`` is the split as :func:`load_split` returned it (saves re-reading the files every epoch).
    """
    from cirlab.engine.evaluate import evaluate_cir, evaluate_itm

    ev = config["eval"]
    loaded = load_split(config, split) if loaded is None else loaded
    if isinstance(model, HasOwnEvaluation):  # models with their own pipeline (a stage-II re-ranker over top-K)
        run_dir = str(config.get("output_dir") or "")  # the run folder: a stage I writes its top-K into <run>/topk
        return model.evaluate_split(loaded, eval_config={**ev, "run_dir": run_dir}, device=device, topk_dir=topk_dir)
    if model.task == "rerank":
        logger.warning("%s has no evaluate_split hook: re-ranking evaluation skipped for %s", config["model"], split)
        return {"metrics": {}}
    if is_precomp(config):
        return evaluate_itm(model, loaded, protocol=itm_protocol(config, split), batch_size=int(ev["batch_size"]),
                            shard_size=int(ev["shard_size"]), device=device)
    splits = loaded
    meta = {"run": str(config.get("name", "")), "config_model": config["model"]}
    return evaluate_cir(model, splits, ev.get("protocol"), batch_size=int(ev["batch_size"]), device=device,
                        k=int(ev["k"]), topk_path=topk_dir, meta=meta)


def load_split(config: dict[str, Any], split: str) -> Any:
    """A PrecompSplit (ITM) or the list of CIRSplits (one per Fashion-IQ category) of a named split."""
    return load_precomp_split(config, split) if is_precomp(config) else load_cir_splits(config, split)


def make_evaluate_fn(config: dict[str, Any], splits: Sequence[str], device: Any,
                     loaded: dict[str, Any] | None = None) -> Any:
    """``evaluate_fn(model) -> {split: metrics}`` for the trainer's model selection (splits read once;
    ``loaded`` may hold them already, as :func:`load_split` returns them)."""
    loaded = dict(loaded or {})

    def evaluate_fn(model: Any) -> dict[str, Any]:
        for s in splits:
            if s not in loaded:
                loaded[s] = load_split(config, s)
        return {s: evaluate_split(model, config, s, device=device, loaded=loaded[s])["metrics"] for s in splits}

    return evaluate_fn


def run_experiment(config: dict[str, Any], *, output_dir: str | os.PathLike | None = None, resume: bool = False,
                   device: str | None = None) -> dict[str, Any]:
    """Train, select, evaluate and write the run folder described in ``docs/architecture.md``.

    Writes ``config.yaml``, ``checkpoints/{last,best}.pt``, ``log.jsonl``, ``tb/``, ``metrics.json`` and
    ``topk/<split>[_<category>].topk.npz`` (CIR). Returns the contents of ``metrics.json``.
    """
    from cirlab.core.checkpoint import load_model_weights
    from cirlab.engine.train import resolve_train_config, train

    out = Path(output_dir) if output_dir else output_dir_of(config)
    _prepare_data(config)
    model = build_seeded_model(config)
    if hasattr(model, "load_init"):  # pretrained start from the model config (init_from); its report -> run folder
        model.load_init(out if _is_main() else None)
    fit_to_training_data(model, config)
    overrides = dict(config.get("train") or {})
    if resume:
        overrides["resume"] = "auto"
    if device:
        overrides["device"] = device
    overrides["test_split"] = config["dataset"]["test_split"]
    cfg = resolve_train_config(model, overrides, base={"selection_metric": default_selection_metric(config)})
    ds = config["dataset"]
    if cfg.selection == "val":
        cfg.selection = ds["val_split"]  # "val" names the configured validation split
    select_split = cfg.selection_split()
    if select_split and model.task == "rerank" and not isinstance(model, HasOwnEvaluation):
        raise ConfigError(f"{config['model']}: model selection needs an evaluate_split hook on the model; "
                          "set train.selection=last")
    run_device = _eval_device(cfg.device)
    resolved = {**config, "output_dir": str(out), "train": cfg.to_dict(), "model_config": model.config.to_dict()}
    # read (and so validate) every split the run evaluates before the first step: a broken val or test file
    # must fail now, naming the file, not after the training it would waste
    eval_splits = list(dict.fromkeys([*_final_splits(config), *([select_split] if select_split else [])]))
    loaded = {s: load_split(config, s) for s in eval_splits}
    if select_split:
        check_selection_metric(config, cfg.selection_metric, select_split, loaded[select_split], model)
    evaluate_fn = make_evaluate_fn(config, [select_split], run_device, loaded) if select_split else None
    summary = train(model, train_dataset(config, model), cfg, output_dir=out, evaluate_fn=evaluate_fn,
                    run_config=resolved)
    load_model_weights(model, out / "checkpoints" / "best.pt")
    model.to(run_device)
    final = _final_evaluation(model, config, out, run_device, loaded)
    result = {"model": config["model"], "preset": config.get("preset"), "dataset": ds["name"],
              "protocol": (itm_protocol(config, ds["test_split"]) if is_precomp(config)
                           else config["eval"].get("protocol") or str(ds["name"]).lower()),
              "selection": {"mode": summary["selection"], "split": summary["selection_split"],
                            "metric": summary["selection_metric"], "best_score": summary["best_score"],
                            "best_epoch": summary["best_epoch"], "best_step": summary["best_step"]},
              "steps": summary["steps"], "epochs": summary["epochs"],
              "checkpoint": str(out / "checkpoints" / "best.pt"), "splits": final}
    if _is_main():
        write_json(out / "metrics.json", result)
    return result


def _prepare_data(config: dict[str, Any]) -> None:
    """Under torchrun, rank 0 generates on-demand synthetic data first; the others wait, then find it."""
    from cirlab.engine.train import init_distributed

    dist_info = init_distributed()
    if dist_info.world_size == 1:
        return
    import torch.distributed as dist

    if dist_info.is_main:
        dataset_root(config)
    dist.barrier()


def _model_train_defaults(model: Any) -> dict[str, Any]:
    return dict(model.default_train_config())


def _eval_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _final_splits(config: dict[str, Any]) -> list[str]:
    return list(config["eval"].get("splits") or [config["dataset"]["val_split"]])


def _final_evaluation(model: Any, config: dict[str, Any], out: Path, device: Any,
                      loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    topk_dir = out / "topk" if config["eval"].get("topk", True) and not is_precomp(config) else None
    results = {}
    for split in _final_splits(config):
        evaluated = evaluate_split(model, config, split, device=device, topk_dir=topk_dir,
                                   loaded=(loaded or {}).get(split))
        results[split] = evaluated["metrics"]
        logger.info("%s: %s", split, ", ".join(f"{k}={v:.2f}" for k, v in evaluated["metrics"].items()))
    return results

