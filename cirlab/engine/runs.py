"""Run configs and run folders: YAML loading, ``--set`` overrides, and one experiment from config to metrics.

A run config (``configs/*.yaml``) has these keys (every one but ``model`` may be left out)::

    name: ""                       # names the folder under $CIRLAB_RUNS when output_dir is "" (default: the file's)
    model: amc                     # a name from cirlab.list_models()
    preset: fashioniq              # one of cirlab.list_presets(model)
    model_overrides: {}            # config-dataclass fields changed on top of the preset
    dataset:
      name: fashioniq              # fashioniq | shoes | cirr (CIR) or f30k | coco (ITM precomp)
      root: ""                     # "" -> $CIRLAB_DATA/<name> (precomp: $CIRLAB_DATA); a run records it absolute
      category: dress              # Fashion-IQ: one category, a list, or null (train on all, report per category)
      train_split: train           # left out: the dataset's own split names (cirlab.data.catalog): f30k dev/test,
      val_split: val               #   COCO dev/testall, CIRR val/test1. The model selection split
      test_split: test             #   (train.selection "val" means it); the split results are reported on
      options: {}                  # loader options (e.g. Fashion-IQ protocol / gallery)
      synthetic: null              # {size: tiny, seed: 0, image_size: 64, out: ""}: generate the embedded synthetic
                                   #   data when root is "" (out "": into cirlab's cache; image_size: its side)
    train: {}                      # cirlab.engine.train.TrainConfig fields, over the model's paper defaults
    eval:
      protocol: null               # null = the dataset's: CIR fashioniq | shoes | cirr; ITM full (f30k) |
                                   #   coco1k | coco5k | coco (both; COCO's default; testall only, dev is full)
      splits: [val]                # evaluated after training with checkpoints/best.pt
      k: 50                        # top-K file length
      topk: true                   # write the top-K files (<run>/topk/); false: metrics only
      batch_size: 64
      shard_size: 1000             # ITM: images x captions per scoring block
      num_workers: 0               # CIR: DataLoader workers decoding the evaluation's images (ITM reads
                                   #   precomputed features: refused there)
      stage1_topk: ""              # re-rankers: stage I's top-K files (its run folder, a folder or a .topk.npz)
    output_dir: ""                 # "" -> $CIRLAB_RUNS/<config name>

A run's own config.yaml adds ``model_config:`` (the model config it built, a record: an edited copy is refused).

``--set train.lr=2e-4 --set dataset.category=[dress,shirt]`` parses each value as YAML.

Every section is checked before any data is read (:func:`validate_config`): an unknown key anywhere (a section, a
``dataset``/``eval``/``train`` field, a ``model_overrides`` field, a loader option under ``dataset.options``, a
``dataset.synthetic`` field) is an error with a "did you mean" suggestion, values are type- and range-checked, and a
duplicated YAML key is refused instead of silently keeping the last one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from cirlab.core.config import (did_you_mean, field_names, original_hints, unknown_fields_message,
                                unknown_names_message)
from cirlab.core.io import file_name_part, folder_lock, to_plain, write_json
from cirlab.core.contracts import (INIT_REPORT, HasDatasetExtras, HasEnsemble, HasImageTransform, HasInit,
                                   HasOwnEvaluation, HasVocab)

logger = logging.getLogger(__name__)

# "model_config" is written into a run's config.yaml (the resolved model config); it is ignored when read back
SECTIONS = ("name", "model", "preset", "model_overrides", "dataset", "train", "eval", "output_dir", "model_config")
DEFAULTS: dict[str, Any] = {
    "model": None, "preset": None, "model_overrides": {},
    "dataset": {"name": None, "root": "", "category": None, "train_split": "train", "val_split": "val",
                "test_split": "test", "options": {}, "synthetic": None},
    "train": {},
    "eval": {"protocol": None, "splits": None, "k": 50, "batch_size": 64, "shard_size": 1000, "topk": True,
             "stage1_topk": "", "num_workers": 0},
    "output_dir": "",
}
SYNTHETIC_KEYS = ("size", "seed", "out", "image_size")  # dataset.synthetic: cirlab.data.generators.synthetic.ensure


from cirlab.core.errors import ConfigError, UnknownNameError  # noqa: E402  (ConfigError is re-exported)


# PyYAML follows YAML 1.1, where "2e-4" (no dot) is a string; users mean a float
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first}); a YAML mapping keeps only the "
                         "last value, so one of them would be silently ignored")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden: not a duplicate
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise _DuplicateKey(key, line, first)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


# values a config may expand to through its anchors and aliases: a real one has a few hundred, while nine levels of
# ten aliases each (a 481-byte "billion laughs" file) expand to 10**9 and took every byte of memory
MAX_YAML_VALUES = 100_000


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML with duplicate keys refused; every error is one :class:`ConfigError` line naming ``source``."""
    try:
        return _fix_floats(_load_bounded(text, source))
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None


def _load_bounded(text: str, source: str) -> Any:
    """The document, composed first and refused when its aliases expand it past :data:`MAX_YAML_VALUES` values
    (the constructed lists and dicts are then rebuilt as copies by :func:`_fix_floats`)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        count = _expanded_size(node, {})
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: its anchors and aliases (*name) expand it to {count:,} values, more than "
                              f"the {MAX_YAML_VALUES:,} a config may hold; write the repeated parts out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias written out (aliases share their node: counted once
    per node, so a bomb is measured without being expanded)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node reached again inside itself (a recursive alias) counts once, not forever
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _fix_floats(value: Any) -> Any:
    if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _fix_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_floats(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- config


def parse_set(items: Sequence[str] | str) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-3", "dataset.category=[dress]"]`` -> ``[(["train", "lr"], 0.001), ...]`` (YAML-typed).

    One string is one entry (``papermill -p settings train.lr=1e-3`` passes a string, not a list: iterating it
    would read one entry per character)."""
    if isinstance(items, str):
        items = [items]
    elif not isinstance(items, (list, tuple)):
        raise ConfigError(f"--set: expected a list of KEY=VALUE strings, got {type(items).__name__} {items!r}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"--set {item!r}: expected a KEY=VALUE string (e.g. train.lr=1e-4), got "
                              f"{type(item).__name__}")
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=1e-4)")
        value = read_yaml(raw, f"--set {item!r}: value") if raw.strip() else ""
        _refuse_a_cut_comment(item, key.strip(), raw, value)
        out.append(([part for part in key.strip().split(".")], value))
    return out


def _refuse_a_cut_comment(item: str, key: str, raw: str, value: Any) -> None:
    """YAML reads `` #...`` as a comment: ``dataset.root=data/run #1`` became ``data/run``, and the run used that
    other folder without a word. A value whose ``#`` was eaten so is refused with the quoting that keeps it."""
    if re.search(r"(^|\s)#", raw) and "#" not in str(value):
        import shlex

        arg = f"{key}='{raw.strip().replace(chr(39), chr(39) * 2)}'"  # YAML doubles a quote inside single quotes
        # YAML's single quotes keep every character (its double quotes read \ escapes: C:\data failed); the shell
        # word around them in double quotes where that needs no escaping, else as shlex writes it
        quoted = f'"{arg}"' if not set(arg) & set('"$`\\!') else shlex.quote(arg)
        raise ConfigError(f"--set {item!r}: YAML reads the '#' and what follows as a comment, so the value would be "
                          f"{value!r}; quote it to keep it whole (--set {quoted}), or drop the comment")


def parse_set_flat(items: Sequence[str]) -> dict[str, Any]:
    """:func:`parse_set` as ``{"a.b": value}``: model config fields for tools that build a model from a preset
    (``cirlab convert --set``, ``cirlab models --params --set``, ``cirlab report --set``)."""
    return {".".join(path): value for path, value in parse_set(items)}


def apply_overrides(config: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set nested keys (creating sections as needed); a path through a non-mapping is an error."""
    config = copy.deepcopy(config)
    seen: dict[str, Any] = {}
    for path, value in overrides:
        key = ".".join(path)
        if key in seen and seen[key] != value:  # a script's base flags, then its own: the last wins, said
            logger.warning("--set %s is given twice (%r, then %r): the last one is used", key, seen[key], value)
        seen[key] = value
        if path[0] not in SECTIONS:
            raise ConfigError(f"--set {'.'.join(path)}: unknown section {path[0]!r}{did_you_mean(path[0], SECTIONS)}; "
                              f"known: {', '.join(SECTIONS)}")
        node = config
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
            node = child
        old = node.get(path[-1])
        if isinstance(old, dict) and isinstance(value, dict) and set(old) - set(value):
            # a mapping value replaces the mapping; what the config file set in it is gone, which must be said
            dropped = ", ".join(f"{k}={old[k]!r}" for k in sorted(set(old) - set(value))
                                if old[k] not in (None, "", {}, []))
            if dropped:
                logger.warning("--set %s={...} replaces the whole mapping: %s from the config no longer apply "
                               "(--set %s.KEY=VALUE changes one entry)", key, dropped, key)
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
    """A run config with every section's defaults (:data:`DEFAULTS`) filled in; an empty section (``train:`` with
    nothing under it, YAML's null) is that section's defaults."""
    given = {k: v for k, v in config.items() if not (v is None and isinstance(DEFAULTS.get(k), dict))}
    out = merge_config(DEFAULTS, given)
    release_split_names(out["dataset"], given.get("dataset") if isinstance(given.get("dataset"), dict) else {})
    return out


def release_split_names(dataset: dict[str, Any], given: dict[str, Any]) -> None:
    """The split names a config leaves out are its dataset's own (:mod:`cirlab.data.catalog`: f30k ``dev``/``test``,
    COCO ``dev``/``testall``, CIRR ``val``/``test1``), as the workbench and ``cirlab eval`` without a config take
    them: ``train/val/test`` for every dataset scored COCO's ``testall`` as a 5K matrix only (its test split was
    ``test``, so ``testall`` was not the test split and got the ``full`` protocol)."""
    from cirlab.data.catalog import get_dataset

    try:
        spec = get_dataset(dataset["name"])
    except (KeyError, ValueError, TypeError):  # no name or an unknown one: the config check reports it
        return
    for key, name in zip(("train_split", "val_split", "test_split"), spec.splits):
        if key not in given:
            dataset[key] = name


def read_config_file(path: str | os.PathLike, flag: str = "") -> dict[str, Any]:
    """A config YAML file's sections as written (no defaults); a folder, a missing file, a binary or non-YAML file
    and a file that is not a mapping are one-line :class:`ConfigError` naming it (after ``flag``, e.g.
    ``--config``). A bare name may name a config cirlab ships (:func:`config_path`)."""
    path = config_path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise ConfigError(f"{name} is a folder; pass a run config YAML file (e.g. configs/amc_synthetic_tiny.yaml)")
    if not path.is_file():
        from cirlab.core.shipped import shipped_config, shipped_configs

        stem = path.name.removesuffix(".yaml")
        if path.parent == Path("."):  # a bare name: config_path found no shipped config of that name either
            hint = f", nor a config cirlab ships{did_you_mean(stem, shipped_configs())}"
        else:
            hint = f"; cirlab ships a config of that name: pass {stem}" if shipped_config(path) else ""
        raise ConfigError(f"{name}: file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read the config ({err})") from None
    raw = read_yaml(text, name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def config_path(path: str | os.PathLike) -> Path:
    """``path`` when it is a file; a bare name (``amc_synthetic_tiny``, no folder, no such file here) is the config
    cirlab ships under that name (``configs/`` of the checkout, or the wheel's copy: an installed wheel has no
    checkout to hold ``configs/``), said in the log."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    from cirlab.core.shipped import shipped_config

    shipped = shipped_config(path)
    if shipped is None:
        return path
    logger.info("config %s: the one cirlab ships, %s", path, shipped)
    return shipped


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a run config, apply ``--set`` overrides and fill defaults; errors name the file and the key. ``path``
    may name a config cirlab ships (:func:`config_path`)."""
    path = config_path(path)  # its name below is the file's
    raw = read_config_file(path)
    if not raw:
        raise ConfigError(f"{path}: the file sets nothing (empty, or only comments): a run config names at least a "
                          "model and a dataset (e.g. configs/amc_synthetic_tiny.yaml)")
    check_sections(raw, str(path))  # before the --set overrides merge into them
    config = with_defaults(apply_overrides(raw, parse_set(overrides)))
    config.setdefault("name", path.stem)
    base = {**with_defaults(raw), "name": raw.get("name", path.stem)}  # the file's own name: --set name=... is not
    validate_blaming(config, base, str(path), [f"--set {o}" for o in overrides])
    return config


def validate_blaming(config: dict[str, Any], base: dict[str, Any], source: str, changes: Sequence[str],
                     **kw: Any) -> None:
    """:func:`validate_config` of ``config`` = ``base`` (read from ``source``) changed on the command line by
    ``changes`` (``--set train.lr=x``, ``--batch-size 0``). A mistake that is not in ``source`` is not blamed on
    it: when ``base`` alone passes, the error names the command-line change(s) it comes from instead."""
    try:
        validate_config(config, source, **kw)
    except ConfigError as err:
        if not changes:
            raise
        try:
            validate_config(base, source, **kw)
        except ConfigError:
            raise err from None  # the file itself is wrong (too): its own message
        message = str(err).removeprefix(f"{source}: ")
        said = message.split("; known:")[0]  # the lists of known names would match any key

        def key(change: str) -> str:  # "--set train.max_step=5" -> max_step, "--batch-size 0" -> batch_size
            return re.split(r"[ =]", change.removeprefix("--set "), maxsplit=1)[0].split(".")[-1].replace(
                "-", "_").lstrip("_")

        named = [c for c in changes if re.search(rf"\b{re.escape(key(c))}\b", said)] or list(changes)
        raise ConfigError(f"{', '.join(named)}: {message}") from None


def check_sections(config: dict[str, Any], source: str) -> None:
    """Every top-level name is a known section and the mapping sections are mappings (else a ConfigError naming
    ``source``)."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown_names_message(f"{source}: section", unknown, SECTIONS).replace("field", "name", 1))
    for section in ("dataset", "train", "eval", "model_overrides"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ConfigError(f"{source}: {section}: expected a mapping, got {config[section]!r:.60}")


def validate_config(config: dict[str, Any], source: str = "config", *, for_eval: bool = False,
                    check_train: bool = False) -> None:
    """Check every section before any data is read: names (model, preset, dataset, protocol), every key of every
    section against its schema with "did you mean" suggestions, and values (types, ranges, choices).

    ``for_eval``: the config of ``cirlab eval``: the model comes from the checkpoint, nothing is trained, so only
    the sections it reads (dataset, eval) are checked, and the train section with ``check_train`` (a file the user
    passed, whose typos would otherwise go unsaid; a run's own config.yaml holds what its version resolved).
    Raises :class:`ConfigError` naming ``source`` and the field.
    """
    check_sections(config, source)
    for key in ("name", "output_dir"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ConfigError(f"{source}: {key}: expected a string, got {config[key]!r}")
    if config.get("name") and not for_eval:  # the run folder's name under runs/: ../x wrote outside it
        file_name_part(config["name"], f"{source}: name")
    if not for_eval:  # cirlab eval rebuilds the model from the checkpoint and trains nothing
        _validate_model(config, source)
    if not for_eval or check_train:
        _validate_train(config, source)
    _validate_dataset(config, source)
    if not for_eval:
        _validate_task(config, source)
    _validate_eval(config, source)


def _validate_task(config: dict[str, Any], source: str) -> None:
    """A composed-retrieval model (CIR, re-ranker) trains on a CIR dataset, an image-text matching model on precomp
    features: the other pairing fails deep in the data code otherwise (a caption vocabulary fitted on triplets)."""
    from cirlab.data.catalog import get_dataset
    from cirlab.models.registry import get_entry

    refuse_task_mismatch(str(config["model"]), str(config["dataset"]["name"]), f"{source}: dataset.name")

    dataset = get_dataset(str(config["dataset"]["name"]))
    if (config.get("eval") or {}).get("stage1_topk") and get_entry(str(config["model"])).task != "rerank":
        # only a stage II reads stage I's lists; any other model ranks the whole gallery and never opened the path
        raise ConfigError(f"{source}: eval.stage1_topk: {config['model']} ranks the whole gallery and reads no "
                          "stage-I top-K (only a re-ranker's stage II, blip_rerank_stage2, does); remove it")
    if (config.get("train") or {}).get("group_batches") and dataset.is_itm:  # before the data and the model
        raise ConfigError(f"{source}: train.group_batches groups CIR triplets by reference image; "
                          f"{dataset.name}'s image-caption pairs have no groups (set it to 0)")


def refuse_task_mismatch(model: str, dataset: str, source: str) -> None:
    """:func:`task_mismatch` of registered ``model`` as a ConfigError led by ``source`` (``cirlab train``'s config
    check, ``cirlab eval``'s flags); a KeyError for a name the registry does not know."""
    from cirlab.models.registry import get_entry

    problem = task_mismatch(model, get_entry(model).task, dataset)
    if problem:
        raise ConfigError(f"{source}: {problem}")


def task_mismatch(model: str, task: str, dataset: str) -> str:
    """Why a model of ``task`` cannot read ``dataset`` (a CIR model on precomp features, an ITM model on
    triplets), naming the datasets it reads; ``""`` when it can."""
    from cirlab.data.catalog import CIR_DATASETS, ITM_DATASETS, get_dataset

    spec = get_dataset(dataset)
    wants_itm = task == "itm"
    if wants_itm == spec.is_itm:
        return ""
    dataset = spec.name
    fits = ITM_DATASETS if wants_itm else CIR_DATASETS
    kind = "an image-text matching" if wants_itm else "a composed image retrieval"
    return f"{model} is {kind} model and cannot read {dataset!r}; its datasets: {', '.join(fits)}"


def _validate_model(config: dict[str, Any], source: str) -> None:
    from cirlab.models.registry import build_config, get_entry, list_models, list_presets

    name = config.get("model")
    if not name:
        raise ConfigError(f"{source}: 'model' is required: one of {', '.join(list_models())} (`cirlab models` lists "
                          "them with their presets)")
    try:
        entry = get_entry(str(name))
    except KeyError:
        known = list_models()
        raise ConfigError(f"{source}: model: unknown model {name!r}{did_you_mean(name, known)}; "
                          f"known: {', '.join(known)}") from None
    preset = config.get("preset")
    if preset and preset not in list_presets(name):
        known = list_presets(name)
        raise ConfigError(f"{source}: preset {preset!r} of {name!r} is unknown{did_you_mean(preset, known)}; "
                          f"known: {', '.join(known)}")
    overrides = dict(config.get("model_overrides") or {})
    cls = entry.config_cls
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(overrides) - set(fields))
    if fields and unknown:
        from cirlab.engine.train import TrainConfig

        training = {n: f"train.{n}" for n in unknown if n in field_names(TrainConfig)}  # lr, batch_size
        raise ConfigError(unknown_fields_message(cls, unknown, f"{source}: model_overrides ({cls.__name__})",
                                                 training))
    try:  # the config dataclass checks its own values (choices, divisibility); no weights are built here
        build_config(name, preset, **overrides)
    except (TypeError, ValueError, KeyError, ArithmeticError) as err:  # a modulo by zero in a check: still one line
        raise ConfigError(f"{source}: model_overrides: {' '.join(str(err).split())}") from None
    dataset = (config.get("dataset") or {}).get("name")
    if getattr(cls, "FOLLOWS_RUN_DATASET", False) and dataset and "dataset" not in overrides:
        try:
            build_config(name, preset, **{**overrides, "dataset": dataset})
        except (TypeError, ValueError, KeyError, ArithmeticError) as err:
            raise ConfigError(f"{source}: dataset.name {dataset!r} is passed to the {name} config, which refuses it "
                              f"({' '.join(str(err).split())}); set model_overrides.dataset to one it accepts"
                              ) from None
    _check_written_model_config(config, source, overrides)


def _check_written_model_config(config: dict[str, Any], source: str, overrides: dict[str, Any]) -> None:
    """``model_config`` is the record a run writes of the model it built, not an input: an edited copy (a run's
    config.yaml with ``model_config.embed_dim`` changed) trained the preset's model without a word. A record that
    matches the model this config builds (a run's config.yaml run again) passes."""
    from cirlab.models.registry import build_config, get_entry

    written = config.get("model_config")
    if not written:
        return
    if not isinstance(written, dict):
        raise ConfigError(f"{source}: model_config: expected a mapping (the record a run writes), got {written!r}")
    name = str(config["model"])
    if getattr(get_entry(name).config_cls, "FOLLOWS_RUN_DATASET", False) and "dataset" not in overrides:
        overrides = {**overrides, "dataset": (config.get("dataset") or {}).get("name")}
    built = to_plain(dataclasses.asdict(build_config(name, config.get("preset"), **overrides)))
    written = get_entry(name).config_cls.current_names(written)  # a run written before a field was renamed
    unknown = sorted(set(written) - set(built))
    if unknown:  # an edited record with a typo read as matching
        raise ConfigError(unknown_names_message(f"{source}: model_config", unknown, built))
    differ = [k for k, v in written.items() if to_plain(v) != built[k]]
    if differ:
        shown = ", ".join(f"{k}: {written[k]!r} (builds {built.get(k)!r})" for k in differ[:3])
        raise ConfigError(f"{source}: model_config is the record a run writes and is not read, and it differs from "
                          f"the model this config builds ({shown}); put the change in model_overrides, or delete "
                          "model_config")


def _validate_dataset(config: dict[str, Any], source: str) -> None:
    from cirlab.data.base import check_options
    from cirlab.data.catalog import DATASETS, canonical_name

    ds = config.get("dataset") or {}
    unknown = sorted(set(ds) - set(DEFAULTS["dataset"]))
    if unknown:
        raise ConfigError(unknown_names_message(f"{source}: dataset", unknown, DEFAULTS["dataset"]))
    name = ds.get("name")
    if not name:
        raise ConfigError(f"{source}: dataset.name is required (one of {', '.join(DATASETS)})")
    if canonical_name(str(name)) not in DATASETS:
        raise ConfigError(f"{source}: dataset.name: unknown dataset {name!r}{did_you_mean(name, DATASETS)}; "
                          f"known: {', '.join(DATASETS)}")
    if ds.get("root") is not None and not isinstance(ds["root"], str):
        raise ConfigError(f"{source}: dataset.root: expected a path string, got {ds['root']!r} (YAML reads an "
                          "unquoted date, number or yes/no as such: quote the path, e.g. "
                          "--set 'dataset.root=\"2024-01-01\"')")
    cat = ds.get("category")
    if cat is not None and not isinstance(cat, str) and not (isinstance(cat, list) and cat
                                                             and all(isinstance(c, str) for c in cat)):
        raise ConfigError(f"{source}: dataset.category: expected a name, a list of names or null, got {cat!r}")
    spec = DATASETS[canonical_name(str(name))]
    if cat and not spec.categories:  # the loaders of the others take no category: it was read and ignored
        raise ConfigError(f"{source}: dataset.category: {spec.name} has no categories (Fashion-IQ's are "
                          f"{', '.join(DATASETS['fashioniq'].categories)}); remove it")
    for key in ("train_split", "val_split", "test_split"):
        if not isinstance(ds.get(key), str) or not ds[key]:
            raise ConfigError(f"{source}: dataset.{key}: expected a split name, got {ds.get(key)!r}")
    _check_splits(ds, spec, source)
    options = ds.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: dataset.options: expected a mapping of loader options, got {options!r:.60}")
    try:
        check_options(str(name), options)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    synth = ds.get("synthetic")
    if synth is not None:
        if not isinstance(synth, dict):
            raise ConfigError(f"{source}: dataset.synthetic: expected a mapping like {{size: tiny, seed: 0}} or null, "
                              f"got {synth!r:.60}")
        unknown = sorted(set(synth) - set(SYNTHETIC_KEYS))
        if unknown:
            raise ConfigError(unknown_names_message(f"{source}: dataset.synthetic", unknown, SYNTHETIC_KEYS))
        from cirlab.core.config import MAX_SEED
        from cirlab.data.generators.synthetic import MAX_IMAGE_SIZE, SIZES

        if synth.get("size", "tiny") not in SIZES:
            raise ConfigError(f"{source}: dataset.synthetic.size: {synth['size']!r} is not one of "
                              f"{', '.join(SIZES)}{did_you_mean(synth['size'], SIZES)}")
        for key, low, high in (("seed", 0, MAX_SEED), ("image_size", 16, MAX_IMAGE_SIZE)):  # the generator's ranges
            value = synth.get(key, low)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{source}: dataset.synthetic.{key}: expected an integer from {low} to {high}, "
                                  f"got {value!r}")


def _check_splits(ds: dict[str, Any], spec: Any, source: str) -> None:
    """A composed-retrieval loader knows a fixed set of split names (and aliases): a slip in a split field is refused
    here, naming the field, rather than by the loader as "unknown Fashion-IQ split 'nope'" without it (or not at
    all: see below). Region-feature (ITM) layouts name their splits by the files present: not checked."""
    if spec.is_itm:
        return
    module = importlib.import_module(spec.loader)
    known = [*getattr(module, "SPLITS", getattr(module, "SPLIT_FILES", ())), *getattr(module, "SPLIT_ALIASES", ())]
    # all three: test_split is read only for the protocol and `selection: paper`, so a slip there went unsaid
    for key in ("train_split", "val_split", "test_split"):
        if known and ds[key] not in known:
            raise ConfigError(f"{source}: dataset.{key}: {spec.name} has no split {ds[key]!r}"
                              f"{did_you_mean(ds[key], known)}; known: {', '.join(known)}")


# the re-ranker's original options given under eval: the candidates stage II re-ranks are a model setting
EVAL_ORIGINAL_NAMES = {name: f"the original code's --{name}; here: model_overrides.rerank_k (the candidates stage II "
                             "re-ranks; eval.k is the length of the top-K lists written)" for name in ("K", "K_value")}


def model_fields(model: Any) -> set[str]:
    """The config fields of registered model ``model``; none for another value (checked elsewhere)."""
    from cirlab.models.registry import get_entry

    try:
        cls = get_entry(str(model)).config_cls
    except (KeyError, ValueError, TypeError):
        return set()
    return set(field_names(cls)) if dataclasses.is_dataclass(cls) else set()


def _say_unread_k(config: dict[str, Any], source: str) -> None:
    """A stage-II re-ranker writes every candidate it re-ranks (``model_overrides.rerank_k``): an ``eval.k`` other
    than the default (``cirlab eval --k 5``, the original validate_stage2.py's ``--k``) was read by nothing, without
    a word, and the run re-ranked its 50 or 100 as before."""
    from cirlab.models.registry import get_entry

    k = (config.get("eval") or {}).get("k", DEFAULTS["eval"]["k"])
    try:
        rerank = get_entry(str(config.get("model"))).task == "rerank"
    except (KeyError, ValueError):
        return
    if rerank and k != DEFAULTS["eval"]["k"] and (config["model"], k) not in _SAID_UNREAD_K:
        _SAID_UNREAD_K.add((config["model"], k))  # a config is checked when read and again when run: said once
        logger.warning("%s: eval.k=%s is not read by %s: it re-ranks model_overrides.rerank_k candidates per query "
                       "(0: the paper's K) and writes them all; set that to change how many", source, k,
                       config["model"])


_SAID_UNREAD_K: set[tuple[str, Any]] = set()


def _validate_eval(config: dict[str, Any], source: str) -> None:
    from cirlab.data.catalog import get_dataset

    ev = config.get("eval") or {}
    known = list(DEFAULTS["eval"])
    unknown = sorted(set(ev) - set(known))
    if unknown:
        raise ConfigError(unknown_names_message(f"{source}: eval", unknown, known, EVAL_ORIGINAL_NAMES))
    for key, low in (("k", 1), ("batch_size", 1), ("shard_size", 1), ("num_workers", 0)):
        value = ev.get(key, DEFAULTS["eval"][key])
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{source}: eval.{key}: expected an integer >= {low}, got {value!r}")
    if ev.get("num_workers") and is_precomp(config):  # nothing would read it
        raise ConfigError(f"{source}: eval.num_workers: ITM evaluation ({config['dataset']['name']}) reads "
                          "precomputed features, with no images to decode in workers; remove it")
    _say_unread_k(config, source)
    splits = ev.get("splits")
    if splits is not None and not (isinstance(splits, list) and splits and all(isinstance(x, str) for x in splits)):
        raise ConfigError(f"{source}: eval.splits: expected a list of split names (e.g. [val, test]) or null, "
                          f"got {splits!r}")
    twice = sorted({s for s in splits or [] if splits.count(s) > 1})
    if twice:  # each split's metrics are one entry of the results: a repeat failed after evaluating everything
        raise ConfigError(f"{source}: eval.splits: {', '.join(map(repr, twice))} listed more than once ({splits})")
    if not isinstance(ev.get("topk", True), bool):
        raise ConfigError(f"{source}: eval.topk: expected true or false, got {ev['topk']!r}")
    protocol = ev.get("protocol")
    if protocol is not None:
        from cirlab.data.base import loader_options

        name = config["dataset"]["name"]
        known = get_dataset(name).protocols
        if protocol in loader_options(name).get("protocol", ()):  # the word names two settings: say which is which
            raise ConfigError(f"{source}: eval.protocol: {protocol!r} is a protocol of the {name} loader (which "
                              f"gallery and captions a split holds): set it with dataset.options.protocol="
                              f"{protocol}; eval.protocol names the metric protocol ({', '.join(known)})")
        if protocol not in known:
            raise ConfigError(f"{source}: eval.protocol: {protocol!r} is not a protocol of dataset "
                              f"{name!r}{did_you_mean(protocol, known)}; known: {', '.join(known)}")


def _validate_train(config: dict[str, Any], source: str) -> None:
    from cirlab.engine.train import TrainConfig, validate_train_values

    section = config.get("train") or {}
    fields = field_names(TrainConfig)  # not the ClassVar tables __dataclass_fields__ holds
    unknown = sorted(set(section) - set(fields))
    if unknown:
        model = model_fields(config.get("model"))  # a model setting put under train: (margin, max_violation)
        hints = original_hints(TrainConfig, {n: f"model_overrides.{n}" for n in unknown if n in model})
        raise ConfigError(unknown_names_message(f"{source}: train", unknown, fields, hints))
    validate_train_values(section, f"{source}: train.")
    split = (config.get("dataset") or {}).get("test_split", DEFAULTS["dataset"]["test_split"])
    # a run sets it from dataset.test_split; in a run's own config.yaml (model_config) it is that value, written
    if "test_split" in section and section["test_split"] != split and "model_config" not in config:
        raise ConfigError(f"{source}: train.test_split: {section['test_split']!r} differs from dataset.test_split "
                          f"{split!r}, which a run uses (for `selection: paper`): set dataset.test_split and remove "
                          "train.test_split")


# the paths a run reads beside its model's own files: (section, key). A re-ranker's stage II reads stage I's run
# (its top-K files, its frozen weights) again at every later evaluation
RUN_PATHS = (("dataset", "root"), ("eval", "stage1_topk"), ("model_overrides", "stage1_checkpoint"))


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the :data:`RUN_PATHS` absolute (``~`` expanded), as the run folder records them: a relative
    path was read against the working folder of each later ``cirlab eval RUN`` or ``--resume``, so the same run was
    scored on whatever data sat at that path there, without a word (or not found at all)."""
    out = config
    for section, key in RUN_PATHS:
        value = (config.get(section) or {}).get(key)
        if not isinstance(value, str) or not value:
            continue
        absolute = str(Path(value).expanduser().absolute())
        if absolute != value:
            out = copy.deepcopy(out) if out is config else out
            out[section][key] = absolute
    return out


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
        root = Path(ds["root"]).expanduser()
        if not root.exists():  # a generated set removed from the cache (cirlab cache --remove): made again
            from cirlab.data.generators.synthetic import remade_root

            root = remade_root(root, f"config {config.get('name', '')!r}: dataset.root") or root
        return mark_reading(root)
    synth = ds.get("synthetic")
    if synth:  # the config opts in explicitly (configs/*synthetic*.yaml); said out loud every time it is used
        from cirlab.data.generators import synthetic

        base = synthetic.ensure(synth.get("out"), seed=int(synth.get("seed", 0)), size=synth.get("size", "tiny"),
                                image_size=int(synth.get("image_size", 64)))
        return mark_reading(resolve(ds["name"], base))
    return None


def mark_reading(root: Path) -> Path:
    """``root``, marked as read by this process (and its forked children) when it lies in a data set of cirlab's
    cache (``cirlab cache --remove`` keeps it: :func:`cirlab.core.io.hold_while_reading`)."""
    from cirlab.core.io import hold_while_reading
    from cirlab.core.paths import GENERATED_DATA, cache_dir

    try:
        areas = [cache_dir().resolve() / area for area in GENERATED_DATA]
        path = root.resolve()
    except (OSError, RuntimeError, ValueError):  # no home for the default cache, a loop of links: nothing to mark
        return root
    for folder in (path, *path.parents):
        if folder.parent in areas:
            hold_while_reading(folder)
            break
    return root


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


def load_train_data(config: dict[str, Any]) -> Any:
    """The run's training split as read from disk: a ``PrecompSplit`` (ITM) or a list of ``CIRSplit`` (one per
    category trained jointly). Read once per run and handed to :func:`fit_to_training_data` and
    :func:`train_dataset`, so its load warnings are logged once."""
    split = config["dataset"]["train_split"]
    if is_precomp(config):
        return load_precomp_split(config, split)
    return load_cir_splits(config, split, for_training=True)


def say_other_protocol(config: dict[str, Any]) -> bool:
    """Warn when the run reads its dataset with other loader options than the model's paper evaluates it with
    (``PAPER_DATA_OPTIONS``: CaLa's configs switched to Fashion-IQ read it with AMC's protocol, the loader's
    default, without a word). Returns whether it warned."""
    from cirlab.data.catalog import canonical_name, get_dataset
    from cirlab.models.registry import get_entry

    name = str(config["dataset"]["name"])
    wanted = getattr(get_entry(str(config["model"])).config_cls, "PAPER_DATA_OPTIONS", {}).get(canonical_name(name))
    if not wanted:
        return False
    module = importlib.import_module(get_dataset(name).loader)
    aliases = getattr(module, "OPTION_ALIASES", {})
    defaults = {k: p.default for k, p in inspect.signature(module.load).parameters.items()  # an option left out
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    given = {**defaults, **(config["dataset"].get("options") or {})}
    plain = lambda key, value: aliases.get(key, {}).get(value, value)  # noqa: E731
    differ = {k: given.get(k) for k, v in wanted.items() if plain(k, given.get(k)) != plain(k, v)}
    if differ:
        logger.warning("%s's paper reads %s with dataset.options %s; this run reads it with %s: its numbers follow "
                       "another protocol than the paper's", config["model"], name,
                       ", ".join(f"{k}: {v}" for k, v in wanted.items()),
                       ", ".join(f"{k}: {v}" for k, v in differ.items()))
    return bool(differ)


def match_feature_width(config: dict[str, Any], train_data: Any) -> None:
    """An ITM model reads region features of one width (``img_dim``): when the preset's differs from the features'
    (the tiny presets' 64, the paper's 2048 against CLIP's 512), ``model_overrides.img_dim`` is set to it, as the
    notebooks' run configs do; a width the config names itself and the features contradict is refused here, in one
    line, instead of inside the first training step. A preset that fits is left as it is (runs resume unchanged)."""
    if not is_precomp(config) or getattr(train_data, "images", None) is None:
        return
    width = int(train_data.images.shape[-1])
    given = (config.get("model_overrides") or {}).get("img_dim")
    if given is not None:
        if int(given) != width:
            raise ConfigError(f"model_overrides.img_dim={given}, but {train_data.ims_path} holds {width}-d region "
                              f"features: set model_overrides.img_dim={width} (a config without it follows the "
                              "features)")
        return
    current = getattr(model_config_of(config), "img_dim", None)
    if current is not None and int(current) != width:
        config["model_overrides"] = {**(config.get("model_overrides") or {}), "img_dim": width}
        logger.info("%s: img_dim set to %d, the width of the region features in %s (the %s preset has %d)",
                    config["model"], width, train_data.ims_path, config.get("preset"), current)


def train_dataset(config: dict[str, Any], model: Any, train_data: Any = None) -> Any:
    """The torch dataset the trainer draws from (``train_data``: :func:`load_train_data`'s result, read when
    not given)."""
    import torch

    data = load_train_data(config) if train_data is None else train_data
    if is_precomp(config):
        # models whose items carry random extras (DIME's extra caption / image per sample) say which
        extras = model.dataset_extras() if isinstance(model, HasDatasetExtras) else {}
        return data.pair_dataset(**extras)
    transform = model.image_transform(True) if isinstance(model, HasImageTransform) else None
    parts = [s.triplet_dataset(transform) for s in data]
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


# ----------------------------------------------------------------------------------------------- models


def model_config_of(config: dict[str, Any]) -> Any:
    """The model's config dataclass for a run config (preset + model_overrides), without building the model."""
    from cirlab.models.registry import build_config

    from cirlab.models.registry import get_entry

    overrides = dict(config.get("model_overrides") or {})
    dataset = (config.get("dataset") or {}).get("name")
    if getattr(get_entry(config["model"]).config_cls, "FOLLOWS_RUN_DATASET", False) and dataset:
        overrides.setdefault("dataset", dataset)  # e.g. CaLa's selection metric follows the data it trains on
    try:  # a bad override value is a config error (checked without building when the config was validated)
        return build_config(config["model"], config.get("preset"), **overrides)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"model_overrides: {' '.join(str(err).split())}") from None


def build_model(config: dict[str, Any], model_config: Any = None, seed: int | None = None) -> Any:
    """The run config's model (initial weights drawn under ``seed`` when given, as ``create_model(seed=)``). A
    pretrained part it names that cannot be read (a missing folder, a hub id on a machine without the hub) is a
    one-line :class:`ConfigError` naming the model and the path."""
    from cirlab.models.registry import create_model

    try:
        return create_model(config["model"], config=model_config or model_config_of(config), seed=seed)
    except OSError as err:
        raise ConfigError(f"model {config['model']!r} (model_overrides): {' '.join(str(err).split())}") from None


def build_seeded_model(config: dict[str, Any]) -> Any:
    """:func:`build_model` with the initial weights drawn under the run's seed (``train.seed``, else the model
    config's ``TRAIN_SEED``, e.g. AMC's 300, else 0), so one config gives one run; the trainer re-seeds with the
    same seed for the data order and augmentations."""
    model_config = model_config_of(config)
    train_seed = (config.get("train") or {}).get("seed")
    if train_seed is None:
        train_seed = getattr(type(model_config), "TRAIN_SEED", None)
    return build_model(config, model_config, seed=int(train_seed or 0))


class _Captions:
    """Several CIR training splits seen as one (``fit_vocab`` reads ``.triplets``)."""

    def __init__(self, splits: Sequence[Any]) -> None:
        self.triplets = [t for s in splits for t in s.triplets]


def fit_to_training_data(model: Any, config: dict[str, Any], train_data: Any = None) -> None:
    """Data-dependent set-up before training: models with a vocabulary built from the training captions
    (AMC's ``fit_vocab``; DIME's for its random tiny BERT, a no-op for real BERTs) get it here, so the CLI,
    the notebooks and the API train the same model. Precomp (ITM) models get the training ``PrecompSplit``.
    ``train_data``: :func:`load_train_data`'s result, read here when not given."""
    if not isinstance(model, HasVocab):
        return
    data = load_train_data(config) if train_data is None else train_data
    size = model.fit_vocab(data if is_precomp(config) else _Captions(data))
    logger.info("%s: vocabulary of %s tokens from the %s captions", config["model"], size,
                config["dataset"]["train_split"])


def model_from_checkpoint(path: str | os.PathLike, *, model: str | None = None, preset: str | None = None,
                          trust_pickle: bool = False, overrides: dict[str, Any] | None = None,
                          asked: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with (its saved name + config) and load its weights.

    A checkpoint that does not record its model is built from ``model`` + ``preset`` (+ ``overrides``, config
    fields). When it is a file the paper's own code saved in a layout with no state dict to find (DIME's and HREM's
    ``model_best.pth``), the model's own reader (:class:`HasOriginalCheckpoint`) loads it; the returned metadata
    then says ``converted_from`` and what was ignored. A checkpoint that records its config is built from that
    config: ``asked``, the model fields this call was given (``cirlab eval --set model_overrides.*``), must then agree
    with it; ``overrides`` (a run config's, which repeats what the run was built with) are read only for a
    checkpoint that records no model."""
    from cirlab.core.checkpoint import CheckpointError, load_checkpoint, load_object
    from cirlab.core.streams import kept_streams
    from cirlab.models.registry import create_model, get_entry

    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    meta = ckpt if isinstance(ckpt, dict) else {}
    saved = meta.get("model_name")
    name = model or saved
    if not name:
        raise CheckpointError(f"{path}: the checkpoint does not say which model it holds; pass --model (and --preset)")
    if model and saved and model != saved:
        raise CheckpointError(f"{path} holds weights of model {saved!r}, not {model!r}; drop --model (the checkpoint "
                              "knows its model) or pass the matching checkpoint")
    if preset is not None and saved and meta.get("model_config"):  # built from the preset, its weights then clashed
        raise CheckpointError(f"{path} records its model ({saved}) and the config it was built with: drop --preset "
                              "(it is for checkpoints that record no model, with --model)")
    try:
        entry = get_entry(name)
    except KeyError:
        from cirlab.models.registry import list_models

        raise CheckpointError(f"{path}: model {name!r} is not registered here{did_you_mean(name, list_models())}; "
                              f"known: {', '.join(list_models())} (a model of your own: name its module in "
                              "CIRLAB_MODELS)") from None
    # the random weights it is built with (and the tables a saved vocabulary is loaded into) are overwritten by the
    # checkpoint's: drawn without moving the caller's random streams
    with kept_streams():
        try:
            if preset is None and meta.get("model_config") and not (model and saved is None):
                cfg = entry.config_cls.from_stored(_restore_tuples(entry.config_cls, meta["model_config"]), str(path))
                _refuse_other_overrides(cfg, asked, path)
                net = create_model(name, config=cfg)
            else:
                net = create_model(name, preset, **(overrides or {}))
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: cannot rebuild model {name!r} from it "
                                  f"({' '.join(str(err).split())})") from None
        except OSError as err:  # a pretrained part it reads that is not here (BERT offline), as build_model says it
            raise ConfigError(f"{path}: model {name!r} (model_overrides): {' '.join(str(err).split())}") from None
        report = load_object(net, ckpt, path)
    logger.debug("%s: model %s in %s layout, config %s", path, name, "the original's" if report is not None
                 else "cirlab's", getattr(net, "config", None))
    if report is not None:  # the paper's own layout, read by the model
        return net, {"converted_from": str(path), "converted_layout": f"original {name}",
                     "epoch": meta.get("epoch"), **report}
    return net, meta


def _refuse_other_overrides(cfg: Any, asked: dict[str, Any] | None, path: Any) -> None:
    """Model fields asked for a checkpoint that records its config: that config is what its weights were trained
    with, and it is the one built; a value other than the recorded one would be read by nothing. Compared as the
    config class reads them (its ``__post_init__``: DIME's old bool ``extra_negatives`` is "none" / "random"; not
    ``from_stored``, whose compatibility resets would make a requested value agree)."""
    from cirlab.core.checkpoint import CheckpointError

    asked = type(cfg).current_names(dict(asked or {}))
    unknown = sorted(k for k in asked if not hasattr(cfg, k))
    try:
        wanted = dataclasses.replace(cfg, **{k: v for k, v in asked.items() if k not in unknown})
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: model_overrides: {' '.join(str(err).split())}") from None
    other = unknown + [k for k in asked
                       if k not in unknown and to_plain(getattr(wanted, k)) != to_plain(getattr(cfg, k))]
    if other:
        given = ", ".join(f"model_overrides.{k}={asked[k]}" for k in other)
        recorded = ", ".join(f"{k}={getattr(cfg, k)}" for k in other if hasattr(cfg, k)) or "no such field"
        raise CheckpointError(f"{path}: {given} differs from the config the checkpoint records "
                              f"({recorded}); its weights were trained with that config, which is the one built "
                              "(model_overrides apply to a checkpoint that records no model)")


def make_ensemble(models: Sequence[Any], names: Sequence[str] = ()) -> Any:
    """One model that scores as the mean of ``models``' scores, built by the members' own ``ensemble``
    classmethod (AMC: mean of cosines, the original ``eval_ensemble.py``; DIME: DIME*, mean of the score
    matrices). Members must be the same paper's model; ``names`` (their files) number them in a refusal."""
    kinds = sorted({type(m).__name__ for m in models})
    if len(kinds) != 1:
        raise ConfigError(f"an ensemble's members must be one model kind; got {', '.join(kinds)}")
    if not isinstance(models[0], HasEnsemble):
        raise ConfigError(f"{kinds[0]} defines no ensemble (AMC and DIME do)")
    try:
        return type(models[0]).ensemble(list(models))
    except ValueError as err:
        members = "; ".join(f"member {i}: {name}" for i, name in enumerate(names, 1))
        raise ConfigError(f"{err}" + (f" ({members})" if members else "")) from None


def _restore_tuples(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML/checkpoint round trips turn tuples into lists; give tuple-default fields their tuples back."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        if f.name in out and isinstance(out[f.name], list) and isinstance(f.default, tuple):
            out[f.name] = tuple(out[f.name])
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def default_selection_metric(config: dict[str, Any]) -> str:
    """The headline metric of the run's data (the trainer's selection_metric="auto" decides it by model task)."""
    from cirlab.engine.train import TASK_SELECTION_METRIC

    return TASK_SELECTION_METRIC["itm" if is_precomp(config) else "cir"]


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
    """The ITM protocol of ``split`` (:func:`cirlab.data.catalog.itm_protocol_of` with ``eval.protocol`` and
    ``dataset.test_split``); without a split, ``eval.protocol`` or the dataset's own."""
    from cirlab.data.catalog import get_dataset, itm_protocol_of

    ds, protocol = config["dataset"], config["eval"].get("protocol")
    if split is None:
        return protocol or get_dataset(ds["name"]).default_protocol
    return itm_protocol_of(ds["name"], split, ds["test_split"], protocol)


def protocol_of(config: dict[str, Any], split: str) -> str:
    """The protocol ``split`` is scored with, as reported next to its metrics (ITM: :func:`itm_protocol`; CIR:
    ``eval.protocol``, else the dataset's own)."""
    if is_precomp(config):
        return itm_protocol(config, split)
    return config["eval"].get("protocol") or str(config["dataset"]["name"]).lower()


def evaluate_split(model: Any, config: dict[str, Any], split: str, *, device: Any = "cpu",
                   topk_dir: Path | None = None, loaded: Any = None, keep_run_topk: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` on one named split of the configured dataset; returns evaluate_cir/itm's dict.

    ``loaded`` is the split as :func:`load_split` returned it (saves re-reading the files every epoch).
    ``keep_run_topk`` (``cirlab eval``): a re-ranker's top-K files already in the run folder are kept, a missing one
    is written there, and a run folder that cannot be written only costs the files
    (:func:`cirlab.engine.rerank.keep_in_run`); ``cirlab train`` writes its run's files as it makes them.
    """
    from cirlab.engine.evaluate import evaluate_cir, evaluate_itm
    from cirlab.engine.rerank import KEEP_RUN_TOPK

    ev = config["eval"]
    loaded = load_split(config, split) if loaded is None else loaded
    if isinstance(model, HasOwnEvaluation):  # models with their own pipeline (a stage-II re-ranker over top-K)
        run_dir = str(config.get("output_dir") or "")  # the run folder: a stage I writes its top-K into <run>/topk
        own = {**ev, "run_dir": run_dir, KEEP_RUN_TOPK: keep_run_topk}
        return model.evaluate_split(loaded, eval_config=own, device=device, topk_dir=topk_dir)
    if model.task == "rerank":
        logger.warning("%s has no evaluate_split hook: re-ranking evaluation skipped for %s", config["model"], split)
        return {"metrics": {}}
    if is_precomp(config):
        return evaluate_itm(model, loaded, protocol=itm_protocol(config, split), batch_size=int(ev["batch_size"]),
                            shard_size=int(ev["shard_size"]), device=device)
    splits = loaded
    meta = {"run": str(config.get("name", "")), "config_model": config["model"]}
    return evaluate_cir(model, splits, ev.get("protocol"), batch_size=int(ev["batch_size"]), device=device,
                        k=int(ev["k"]), topk_path=topk_dir, meta=meta, num_workers=int(ev.get("num_workers") or 0))


def load_splits(config: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``{name: load_split(config, name)}``; two names of one split (``val`` and ``dev``, ``test`` and CIRR's
    ``test1``, resolved by the loaders) are one :class:`ConfigError`: the split was scored twice, and a second
    write of its top-K file stopped the command after all the work, blaming another process."""
    loaded, seen = {}, {}
    for name in names:
        loaded[name] = load_split(config, name)
        parts = loaded[name] if isinstance(loaded[name], (list, tuple)) else [loaded[name]]
        key = tuple(sorted((str(getattr(p, "split", name)), str(getattr(p, "category", "") or "")) for p in parts))
        if key in seen:
            raise ConfigError(f"splits {seen[key]!r} and {name!r} are the same split ({key[0][0]}): evaluate it once")
        seen[key] = name
    return loaded


def load_split(config: dict[str, Any], split: str) -> Any:
    """A PrecompSplit (ITM) or the list of CIRSplits (one per Fashion-IQ category) of a named split. A split or
    category the loader does not have (its :class:`UnknownNameError`) is refused naming the config entries that
    hold the name (``dataset.val_split=vall: unknown Fashion-IQ split 'vall' ...``)."""
    try:
        loaded = load_precomp_split(config, split) if is_precomp(config) else load_cir_splits(config, split)
        logger.debug("split %s of %s from %s: %s", split, (config.get("dataset") or {}).get("name"),
                     dataset_root(config), loaded if is_precomp(config) else ", ".join(map(repr, loaded)))
        return loaded
    except UnknownNameError as err:
        if err.field == "split":
            named = _entries_naming_split(config, split)
        else:
            named = [f"dataset.{err.field}={err.name}"] if (config.get("dataset") or {}).get(err.field) else []
        if not named:
            raise
        raise UnknownNameError(f"{', '.join(named)}: {err}", err.field, err.name, err.reason) from None


def _entries_naming_split(config: dict[str, Any], split: str) -> list[str]:
    ds, ev, tr = config.get("dataset") or {}, config.get("eval") or {}, config.get("train") or {}
    named = [f"dataset.{key}={split}" for key in ("train_split", "val_split", "test_split") if ds.get(key) == split]
    if split in (ev.get("splits") or []):
        named.append(f"eval.splits={ev['splits']}")
    if tr.get("selection") == split:
        named.append(f"train.selection={split}")
    return named


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
                   device: str | None = None, overwrite: bool = False,
                   allow_config_change: bool = False) -> dict[str, Any]:
    """Train, select, evaluate and write the run folder described in ``docs/architecture.md``.

    Writes ``config.yaml``, ``checkpoints/{last,best}.pt``, ``log.jsonl``, ``tb/``, ``metrics.json`` and
    ``topk/<split>[_<category>].topk.npz`` (CIR). Returns the contents of ``metrics.json``.

    The whole config and the device are checked before any data is read. The run folder is locked for the run (a
    second run into it fails at once); a folder that already holds a run is refused unless ``resume`` (continue
    it; the stored config must match, differences are listed, ``allow_config_change`` accepts them) or
    ``overwrite`` (replace it).
    """
    from cirlab.engine.train import (check_device, check_precision, check_run_folder, kept_process_state,
                                     resolve_device)

    if not isinstance(config, dict):  # a path here failed as "'str' object has no attribute 'get'"
        raise ConfigError(f"run_experiment takes a run config (a dict): pass cirlab.load_config(path), got "
                          f"{config!r:.80}")
    config = with_defaults(config)  # a hand-built dict without an eval section failed after validation passed
    name = config.get("name")  # quoted: a config named "config" read "config config: ..."
    validate_config(config, f"config {name!r}" if name else "config")
    config = with_absolute_paths(config)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other (continue the run, or replace it); "
                          "pass one of them")
    if device:
        check_device(device, "--device")
    elif (config.get("train") or {}).get("device", "auto") != "auto":
        check_device(config["train"]["device"], "train.device")
    train_section = config.get("train") or {}  # fp16 on a CPU: refused before the data is read and the model built
    check_precision(str(train_section.get("precision", "auto")),
                    resolve_device(device or str(train_section.get("device", "auto")), "train.device"))
    out = (Path(output_dir).expanduser() if output_dir else output_dir_of(config)).absolute()
    resuming = resume or bool((config.get("train") or {}).get("resume"))
    made = _missing_top(out)  # the highest folder of out this command will create (None: out is there)
    try:
        # CIRLAB_RUNS moves only a run folder neither the command nor the config names
        hint = RUN_FOLDER_HINT + ("" if output_dir or config.get("output_dir") else " or set CIRLAB_RUNS")
        with kept_process_state(), folder_lock(out, hint=hint) if is_main_process() else contextlib.nullcontext():
            # refuse a folder that holds a run now; with --overwrite the trainer removes it once the data, the
            # start files and the model have passed, so a mistyped root does not cost the previous run
            if not resuming and is_main_process():
                check_run_folder(out, overwrite=overwrite)
            with _train_log(out, resuming, overwrite) as log:
                return _run_recorded(config, out, resume, device, allow_config_change, overwrite, log)
    except BaseException:
        if made is not None and is_main_process():
            _remove_made_folders(out, made)  # a failed start leaves no trace, not even the parents it made
        raise


# what an unwritable run folder's refusal says to do (cirlab train, and the notebooks that train)
RUN_FOLDER_HINT = "pass --output-dir FOLDER (in a notebook: output_dir=FOLDER)"


def _missing_top(folder: Path) -> Path | None:
    """The highest of ``folder`` and its parents that does not exist yet (``folder`` itself when only it is
    missing), or None when ``folder`` exists: what ``mkdir -p folder`` is about to create."""
    if folder.exists():
        return None
    top = folder
    while top.parent != top and not top.parent.exists():
        top = top.parent
    return top


def _remove_made_folders(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` (the folders this command created), each only while it is
    empty: a parent someone filled meanwhile is kept, and so is every folder above it."""
    current = folder
    while True:
        try:
            current.rmdir()
        except FileNotFoundError:  # removed already (the trainer's own cleanup): its parent may still be left
            pass
        except OSError:  # not empty, or not ours to remove: it stays, and so does every folder above it
            return
        if current == top or current.parent == current:
            return
        current = current.parent


TRAIN_LOG = "train.log"  # the run's log lines (INFO and up), one block per start; kept beside RUN_ARTIFACTS


def _run_recorded(config: dict[str, Any], out: Path, resume: bool, device: str | None, allow_config_change: bool,
                  overwrite: bool, log: Any) -> dict[str, Any]:
    """:func:`_run_locked`, its end written where it can be read later: the status and message into this start's
    provenance entry (once the trainer recorded one), the line the command prints (or the traceback) into
    train.log. The exception itself goes on unchanged."""
    from cirlab.core import provenance

    provenance.forget_start(out)
    try:
        result = _run_locked(config, out, resume, device, allow_config_change, overwrite)
    except BaseException as err:
        try:
            status, message = ending_of(err)
            log.ended(err, message, status)  # before record_end, which forgets the start
            provenance.record_end(out, status, message)
        except Exception as unrecorded:  # noqa: BLE001 - never in the way of the error being raised
            logger.warning("%s: cannot record how this start ended (%s)", out, unrecorded)
        raise
    log.take_start()  # the lines held back, where no line came after the start was recorded
    provenance.record_end(out, "finished")
    return result


def ending_of(err: BaseException) -> tuple[str, str]:
    """How a run that raised ``err`` ended, and the line the ``cirlab`` command prints for it: ``stopped (SIGTERM)``
    for a stop signal or Ctrl-C, ``failed`` for the user's input or data (a :class:`CirlabError`), ``error`` for
    anything else (its traceback is the command's output; the line names the exception)."""
    import signal

    from cirlab.core.errors import CirlabError

    if isinstance(err, KeyboardInterrupt):  # TrainingInterrupted is a CirlabError too: a stop first
        signum = getattr(err, "signum", None) or signal.SIGINT
        try:
            status = f"stopped ({signal.Signals(signum).name})"
        except ValueError:  # not a signal this platform names
            status = f"stopped (signal {signum})"
    else:
        status = "failed" if isinstance(err, CirlabError) else "error"
    if isinstance(err, CirlabError):
        message = str(err)
    elif isinstance(err, KeyboardInterrupt):
        message = str(getattr(err, "message", "interrupted"))
    else:
        message = f"{type(err).__name__}: {err}"
    return status, " ".join(message.split())


class _TrainLog(logging.Handler):
    """``<run>/train.log`` for one start: the ``cirlab`` loggers' lines at INFO and up, as stderr shows them. Held in
    memory until the trainer records the start in provenance.json (after ``--overwrite`` removed the previous run):
    a start refused before that (a resume whose config differs, a wrong dataset root) leaves the folder as it was."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the command's stderr lines (cli._command_logging)

    def __init__(self, out: Path) -> None:
        super().__init__(logging.INFO)
        self.path = out / TRAIN_LOG
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.failed: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None and not self.take_start():
            if self.failed is None:
                self.pending.append(record)
            return
        assert self.file is not None
        self.file.handle(record)

    def take_start(self) -> bool:
        """Open train.log once this process's start is in provenance.json: appended to by a resume, new otherwise
        (the previous run's went with it), the lines so far written first."""
        from cirlab.core import provenance

        resumed = provenance.recorded_start(self.path.parent)
        if self.file is not None or resumed is None or self.failed is not None:
            return self.file is not None
        try:
            self.file = logging.FileHandler(self.path, mode="a" if resumed else "w", encoding="utf-8")
        except OSError as err:  # an unwritable log must not stop the run; said when the run ends
            self.failed, self.pending = err, []
            return False
        self.file.setFormatter(logging.Formatter(self.FORMAT))
        self.fresh = not resumed
        for record in self.pending:
            self.file.handle(record)
        self.pending = []
        return True

    def write(self, level: int, message: str, exc_info: Any = None) -> None:
        """A line into train.log only (stderr has it already, or gets it from the command)."""
        self.handle(logging.getLogger("cirlab").makeRecord("cirlab", level, __file__, 0, "%s", (message,), exc_info))

    def ended(self, err: BaseException, message: str, status: str) -> None:
        """The end of a start that raised: the command's one line, or the traceback stderr gets for an error."""
        if status == "error":
            self.write(logging.ERROR, f"the run ended with an unexpected error: {message}",
                       (type(err), err, err.__traceback__))
        else:
            self.write(logging.ERROR, message)

    def close(self) -> None:
        """Close the file; a new one goes again where the start left no run (a failure before its first step):
        train.log alone must not make a folder look like a run."""
        from cirlab.engine.train import run_artifacts

        super().close()
        if self.file is not None:
            self.file.close()
            if self.fresh and not run_artifacts(self.path.parent):
                self.path.unlink(missing_ok=True)
        if self.failed is not None:
            logger.warning("%s: cannot write %s (%s)", self.path.parent, TRAIN_LOG,
                           self.failed.strerror or self.failed)


@contextlib.contextmanager
def _train_log(out: Path, resuming: bool, overwrite: bool) -> Iterator[Any]:
    """train.log written for the block (the main process only): the ``cirlab`` loggers' lines from INFO up, after a
    line marking this start; the handler goes afterwards (a notebook's second run logs each line once)."""
    if not is_main_process():
        yield _NoTrainLog()
        return
    from cirlab.engine.train import PROGRESS_LOG

    own, log = logging.getLogger("cirlab"), _TrainLog(out)
    log.setFormatter(logging.Formatter(_TrainLog.FORMAT))
    # no handler anywhere: Python prints warnings through its last-resort handler, which a handler here disables
    keep_stderr = logging.lastResort if not own.hasHandlers() and logging.lastResort is not None else None
    for handler in (log, keep_stderr):
        if handler is not None:
            own.addHandler(handler)
    PROGRESS_LOG.addHandler(log)  # the trainer's progress lines, which the console shows its own way
    try:
        from cirlab.core.provenance import command_line
        from cirlab.engine.train import run_artifacts

        # "overwrite" where a run is replaced (a notebook passes overwrite=True into fresh folders too); the command
        # as provenance.json records it (a report-run notebook's, not its kernel's temporary argv)
        how = "resume" if resuming else "overwrite" if overwrite and run_artifacts(out) else "fresh run"
        log.write(logging.INFO, f"=== start ({how}, pid {os.getpid()}, times in {local_zone()}): "
                                f"{shlex.join(command_line())}")
        yield log
    finally:
        for handler in (log, keep_stderr):
            if handler is not None:
                own.removeHandler(handler)
        PROGRESS_LOG.removeHandler(log)
        try:
            log.close()
        except OSError as err:
            logger.warning("%s: cannot finish %s (%s)", out, TRAIN_LOG, err.strerror or err)


def local_zone() -> str:
    """``UTC`` or ``UTC-03:30``: the zone of the log lines' local times (a resume under another TZ, a batch node's
    zone, a change to or from daylight saving time would otherwise read as a gap of hours)."""
    offset = time.localtime().tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    return "UTC" if offset == 0 else f"UTC{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


class _NoTrainLog:
    """train.log's stand-in where none is written (torchrun's other ranks)."""

    def take_start(self) -> bool:
        return False

    def ended(self, err: BaseException, message: str, status: str) -> None:
        pass


def _run_locked(config: dict[str, Any], out: Path, resume: bool, device: str | None,
                allow_config_change: bool, overwrite: bool = False) -> dict[str, Any]:
    """:func:`run_experiment` once the config is valid and the run folder is locked (and, without ``overwrite``,
    known to hold no run: with it the trainer replaces the previous run's files when it starts)."""
    from cirlab.data.fingerprint import FILE_NAME as FINGERPRINT_FILE
    from cirlab.engine.rerank import check_stage1_topk
    from cirlab.engine.train import resolve_device, resolve_train_config, train

    continued = _resumed_checkpoint(out, config, resume)
    if continued is not None:
        _refuse_resuming_another_model(out, config)
    if continued is None:  # a resumed run takes every weight from its checkpoint: the start files may be gone
        _check_start_paths(config)  # before any data is generated or read
    _prepare_data(config)
    say_other_protocol(config)
    ds = config["dataset"]
    if not ds.get("root") and ds.get("synthetic"):  # the config opted in; said out loud on every run
        logger.warning("dataset.root is empty and dataset.synthetic is set: this run uses the generated SYNTHETIC "
                       "%s data at %s (set dataset.root to train on your own data)", ds["name"], dataset_root(config))
    # read (and so validate) the splits of the final evaluation before building the model: a paper-size model takes
    # tens of seconds to build and may need weights that are not there, and a wrong root must fail first
    loaded = load_splits(config, _final_splits(config))
    for split, value in loaded.items():
        _check_eval_split(config, split, value)
    fingerprint = data_fingerprint(config) if is_main_process() else {}  # only the main process writes or checks it
    notes: dict[str, Any] = {"image_read": image_read_of(config)}
    if continued is not None and is_main_process():
        notes["data_changes"] = check_resume_data(out, fingerprint, allow_config_change)
        say_unrecorded_image_read(out, config)
    train_data = load_train_data(config)
    match_feature_width(config, train_data)  # before the model is built with the preset's img_dim
    model = build_seeded_model(config)
    fit_to_training_data(model, config, train_data)
    # pretrained start from the model config (init_from). After the vocabulary is fitted: a start that saved its own
    # vocabulary (a cirlab run of a random tiny BERT) then keeps it with its embeddings. Its report reaches the run
    # folder only when training starts: a refusal below must leave the previous run's report as it was
    init_report = _load_start(model, continued)
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
    run_device = resolve_device(cfg.device, "train.device")
    resolved = {**config, "output_dir": str(out), "train": cfg.to_dict(), "model_config": model.config.to_dict()}
    logger.debug("resolved train settings: %s", cfg.to_dict())
    logger.debug("model %s, preset %s: %s", config["model"], config.get("preset"), model.config.to_dict())
    if cfg.resume and is_main_process():
        notes["config_changes"] = check_resume_config(out, resolved, allow_config_change, data_now=fingerprint)
    # the selection split too, before the first step: a broken val file must fail now, not after the training
    if select_split and select_split not in loaded:
        loaded[select_split] = load_split(config, select_split)
        _check_eval_split(config, select_split, loaded[select_split])
    if select_split:
        check_selection_metric(config, cfg.selection_metric, select_split, loaded[select_split], model)
    check_stage1_topk(model, config["eval"], loaded)  # a re-ranker's stage-I files, before the first step
    evaluate_fn = make_evaluate_fn(config, [select_split], run_device, loaded) if select_split else None
    run_files = {FINGERPRINT_FILE: fingerprint, **_start_report_files(out, continued, init_report)}
    summary = train(model, train_dataset(config, model, train_data), cfg, output_dir=out, evaluate_fn=evaluate_fn,
                    run_config=resolved, overwrite=overwrite, start_notes={k: v for k, v in notes.items() if v},
                    run_files=run_files)
    model.to(run_device)  # it holds best.pt's weights: train() leaves the model as the checkpoint it selected
    with _finishing(out):
        result = _final_results(config, out, run_device, loaded, model, summary)
    return result


@contextlib.contextmanager
def _finishing(out: Path) -> Iterator[None]:
    """The final evaluation of a trained run: what stops it (Ctrl-C, SIGTERM, SIGUSR1, a full disk, an unreadable
    test image) says that the training is saved and how to finish: the same command with ``--resume`` evaluates and
    writes the results (a run at its last step owes only those). A stop signal ends the command with its own exit
    status (128 + the signal's number), as it does during the training."""
    from cirlab.core.errors import CirlabError
    from cirlab.core.io import NO_SPACE
    from cirlab.core.signals import StopSignalInterrupt, stop_signals_interrupt
    from cirlab.engine.train import RunWriteError

    finish = (f"the training is done and saved in {out / 'checkpoints'}; the same command with --resume (and "
              "without --overwrite) runs the final evaluation")
    try:
        with stop_signals_interrupt():  # else SIGTERM / SIGUSR1 end the process here without a line
            yield
    except KeyboardInterrupt as err:
        signal_name = f"{err}: " if isinstance(err, StopSignalInterrupt) else ""
        err.message = f"{signal_name}interrupted in the final evaluation: {finish}"  # type: ignore[attr-defined]
        raise
    except CirlabError as err:
        err.args = (f"{err}; {finish}", *err.args[1:])
        raise
    except OSError as err:
        if err.errno not in NO_SPACE:
            logger.error("%s", finish)
            raise
        raise RunWriteError(f"cannot write the final results to {out} ({err.strerror or err}); {finish}") from err
    except Exception:  # a bug, or e.g. CUDA out of memory at the eval batch size: the traceback stays, with the way on
        logger.error("%s", finish)
        raise


def _final_results(config: dict[str, Any], out: Path, run_device: Any, loaded: dict[str, Any], model: Any,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation of the selected weights on ``eval.splits``, written as ``metrics.json``."""
    ds = config["dataset"]
    final = _final_evaluation(model, config, out, run_device, loaded, _evaluated_best(summary))
    result = {"model": config["model"], "preset": config.get("preset"), "dataset": ds["name"],
              "protocol": protocol_of(config, ds["test_split"]),
              "selection": {"mode": summary["selection"], "split": summary["selection_split"],
                            "metric": summary["selection_metric"], "best_score": summary["best_score"],
                            "best_epoch": summary["best_epoch"], "best_step": summary["best_step"]},
              "steps": summary["steps"], "epochs": summary["epochs"],
              "checkpoint": str(out / "checkpoints" / "best.pt"), "splits": final}
    if is_main_process():
        write_json(out / "metrics.json", result)
    return result


def read_run_config(run_dir: str | os.PathLike, context: str = "") -> dict[str, Any]:
    """A run folder's resolved ``config.yaml`` as a dict (empty when the run wrote none), read as every config file
    is (:func:`read_config_file`, its errors prefixed by ``context``)."""
    path = Path(run_dir) / "config.yaml"
    return read_config_file(path, context) if path.is_file() else {}


def data_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """Digests of the files that define the run's data (:mod:`cirlab.data.fingerprint`): the dataset root's
    annotations and features, and a re-ranker's stage-I top-K files."""
    from cirlab.data.fingerprint import fingerprint

    return fingerprint(data_folder(config), (config.get("eval") or {}).get("stage1_topk") or None)


def data_folder(config: dict[str, Any]) -> Path:
    """The folder the run's loader reads: the dataset's own folder under the root (or ``$CIRLAB_DATA`` for an empty
    root), as :func:`cirlab.data.catalog.dataset_root` resolves it, and for precomp data the set's folder. A root
    holding several datasets is not all of this run's data."""
    from cirlab.data.catalog import canonical_name, dataset_root as resolve, get_dataset

    name = config["dataset"]["name"]
    folder = resolve(name, dataset_root(config))
    if get_dataset(name).is_itm:
        from cirlab.data.precomp import find_set_dir

        folder = find_set_dir(folder, canonical_name(str(name))) or folder
    return folder


# the day image_read="viewer" became the default (EXIF rotation, transparency on white, 16 bits scaled); runs of
# cirlab before it decoded every image with PIL's convert("RGB"), image_read="original"
VIEWER_DEFAULT_SINCE = "2026-12-06"


def image_read_of(config: dict[str, Any]) -> str | None:
    """How the run's images are decoded (``dataset.options.image_read``, default "viewer"); None for precomp
    features. Recorded in each start's ``provenance.json`` entry, since a default left out of config.yaml cannot
    tell a later reader which decoding the numbers came from."""
    from cirlab.data.catalog import get_dataset

    if get_dataset(str(config["dataset"]["name"])).is_itm:
        return None
    return str((config["dataset"].get("options") or {}).get("image_read", "viewer"))


def say_unrecorded_image_read(run_dir: str | os.PathLike, config: dict[str, Any]) -> bool:
    """Warn when a stored run records no image decoding (neither its config nor its provenance) and is read with the
    default: it may come from before :data:`VIEWER_DEFAULT_SINCE`, whose decoding differs for some images. Returns
    whether it warned."""
    from cirlab.core.provenance import read_starts

    now = image_read_of(config)
    if now is None or "image_read" in (config["dataset"].get("options") or {}):
        return False
    if not (read_run_config(run_dir).get("dataset") or {}).get("name"):  # a cirlab.fit run: its data was the caller's
        return False
    try:
        starts = read_starts(run_dir)
    except (OSError, ValueError):  # an unreadable record records nothing
        starts = []
    # in the order of the starts; a value that is no name (a damaged or foreign record) records nothing
    used = [start.get("image_read") if isinstance(start, dict) else None for start in starts] or [None]
    used = [read if isinstance(read, str) and read else None for read in used]
    recorded = list(dict.fromkeys(used))
    if None in recorded:  # every start must say: a resumed old run trained its first steps the old way
        logger.warning("%s does not record how its images were decoded (in %s): runs of cirlab before %s decoded "
                       "them with PIL's convert(\"RGB\") (--set dataset.options.image_read=original reproduces them); "
                       "read now as an image viewer shows them (image_read=viewer), images with transparency, an EXIF "
                       "rotation or 16 bits per channel give other numbers", run_dir,
                       "any start" if recorded == [None] else "some of its starts", VIEWER_DEFAULT_SINCE)
        return True
    if recorded != [now]:
        logger.warning("%s was trained with dataset.options.image_read=%s, read now with %s: images with "
                       "transparency, an EXIF rotation or 16 bits per channel give other numbers (--set "
                       "dataset.options.image_read=%s reproduces the decoding it ended with)", run_dir,
                       " then ".join(recorded), now, used[-1])
        return True
    return False


def data_changes_since(run_dir: str | os.PathLike, config: dict[str, Any]) -> list[str]:
    """The data files that differ between what ``run_dir`` was trained on (its ``data_fingerprint.json``) and what
    ``config``'s dataset root holds now; empty for another dataset, or a run that recorded none."""
    from cirlab.data.catalog import canonical_name
    from cirlab.data.fingerprint import differences, read_fingerprint

    stored = read_fingerprint(Path(run_dir))
    trained_on = (read_run_config(run_dir).get("dataset") or {}).get("name") if stored is not None else None
    if not trained_on or canonical_name(str(trained_on)) != canonical_name(str(config["dataset"]["name"])):
        return []
    return differences(stored, data_fingerprint(config))


def check_resume_data(out: Path, now: dict[str, Any], allow_config_change: bool = False) -> list[str]:
    """Refuse to resume ``out`` on data other than the data it started on (its ``data_fingerprint.json``; runs
    without one are not checked), listing the files that changed; ``allow_config_change`` accepts it with a
    warning. Returns the accepted differences (recorded in ``provenance.json``)."""
    from cirlab.data.fingerprint import FILE_NAME, differences, read_fingerprint, summary

    stored = read_fingerprint(out)
    diffs = differences(stored, now) if stored is not None else []
    if not diffs:
        return []
    message = (f"--resume: the data changed since {out} started ({summary(diffs)}; root {now.get('root')}, "
               f"recorded in {out / FILE_NAME})")
    if allow_config_change:
        logger.warning("%s; resuming anyway (--allow-config-change)", message)
        return diffs
    raise ConfigError(f"{message}. Resuming would continue the run on other data than it started on: restore the "
                      "data, start a fresh run (another --output-dir, or --overwrite), or pass --allow-config-change")


def _as_recorded_now(stored: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """A run folder's config.yaml as this version records the same settings, so that a resume compares settings,
    not spellings: model fields renamed since (``PresetMixin.RENAMED``), a relative :data:`RUN_PATHS` entry (read, as
    it always was, against the working folder), and a split name the loader reads as another (f30k ``val`` is
    ``dev``, CIRR ``test`` is ``test1``; runs recorded ``train/val/test`` for every dataset)."""
    from cirlab.models.registry import get_entry

    stored = with_absolute_paths(copy.deepcopy(stored))
    try:
        config_cls = get_entry(str(stored.get("model"))).config_cls
    except KeyError:
        config_cls = None
    for section in ("model_overrides", "model_config"):
        if config_cls is not None and isinstance(stored.get(section), dict):
            stored[section] = config_cls.current_names(stored[section])
    ds, now = stored.get("dataset"), resolved.get("dataset") or {}
    if isinstance(ds, dict) and ds.get("name"):
        for key in ("train_split", "val_split", "test_split"):
            if ds.get(key) != now.get(key) and _same_split(ds["name"], ds.get(key), now.get(key)):
                ds[key] = now.get(key)
    return stored


def _same_split(dataset: str, a: Any, b: Any) -> bool:
    """Whether the loader of ``dataset`` reads split names ``a`` and ``b`` as one split (its alias table)."""
    from cirlab.data.catalog import get_dataset

    try:
        aliases = dict(getattr(importlib.import_module(get_dataset(dataset).loader), "SPLIT_ALIASES", {}))
    except (KeyError, ValueError, ImportError):
        return False
    return a is not None and b is not None and aliases.get(a, a) == aliases.get(b, b)


def check_resume_config(out: Path, resolved: dict[str, Any], allow_config_change: bool = False,
                        data_now: dict[str, Any] | None = None) -> list[str]:
    """Refuse to resume ``out`` with settings other than the ones it was trained with (``config.yaml``), listing
    each difference; ``allow_config_change`` logs them instead (and returns them: ``provenance.json`` keeps them,
    as config.yaml is rewritten with the new values). Run length, logging and device may change, and
    ``dataset.root`` where it holds the same data (``data_now``: its :func:`data_fingerprint`, computed here when
    not given)."""
    from cirlab.engine.train import RESUME_MAY_CHANGE, resume_differences

    if not (out / "checkpoints" / "last.pt").is_file() or not (out / "config.yaml").is_file():
        return []  # nothing to continue: the run starts fresh
    stored = _as_recorded_now(read_run_config(out, "--resume:"), resolved)
    diffs: list[str] = []
    for key in ("model", "preset", "model_overrides", "model_config", "dataset"):
        diffs += _differences(key, to_plain(stored.get(key)), to_plain(resolved.get(key)))
    changed = resume_differences(to_plain(stored.get("train") or {}), to_plain(resolved.get("train") or {}),
                                 may_change=frozenset({"resume"}))
    allowed = [d for d in changed if d.split(":", 1)[0] in RESUME_MAY_CHANGE]
    diffs += [f"train.{d}" for d in changed if d not in allowed]
    moved = _moved_to_the_same_data(out, diffs, resolved, data_now)
    diffs = [d for d in diffs if d not in moved]
    allowed = moved + [f"train.{d}" for d in allowed]
    if allowed and not diffs:  # run length, logging, device, a moved copy: they may change, the log says they did
        logger.info("--resume: continuing %s with changed %s", out, "; ".join(allowed))
    if not diffs:
        return allowed
    listed = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
    message = f"--resume: {out} was trained with other settings ({listed})"
    if allow_config_change:
        logger.warning("%s; resuming anyway (--allow-config-change)", message)
        return diffs + allowed
    raise ConfigError(f"{message}. Resuming would mix two runs in one folder: restore those settings, start a fresh "
                      "run (another --output-dir, or --overwrite), or pass --allow-config-change")


def _moved_to_the_same_data(out: Path, diffs: list[str], resolved: dict[str, Any],
                            data_now: dict[str, Any] | None) -> list[str]:
    """The ``dataset.root`` difference among ``diffs`` when the new root holds the same data as the run recorded
    (every file of its ``data_fingerprint.json`` there with the same digest): a batch job that copies the data to
    its node's scratch folder resumes from another path every time. Empty otherwise (a run recorded without a
    fingerprint, or with none of its files, cannot tell)."""
    from cirlab.data.fingerprint import differences, read_fingerprint

    moved = [d for d in diffs if d.startswith("dataset.root: ")]
    if not moved:
        return []
    stored = read_fingerprint(out)
    if not stored or not stored.get("files"):
        return []
    if differences(stored, data_now if data_now is not None else data_fingerprint(resolved)):
        return []
    return moved


def _differences(key: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(f"{key}.{k}", old.get(k), new.get(k))]
    return [f"{key}: {old!r} -> {new!r}"]


def _refuse_resuming_another_model(out: Path, config: dict[str, Any]) -> None:
    """A resume of ``out`` with a config of another model: first, and said as that. It was refused as "the data
    changed" (another model's dataset) with --allow-config-change as the way out, which then failed at the
    checkpoint ("it holds model 'amc'")."""
    from cirlab.engine.train import RunFolderError

    if not (out / "config.yaml").is_file():
        return
    stored = read_run_config(out, "--resume:").get("model")
    if stored and stored != config.get("model"):
        raise RunFolderError(f"--resume: {out} holds a {stored} run; this config trains {config.get('model')}. A "
                             "resume continues the same model: train it into another folder (or --overwrite "
                             "replaces the run)")


def _resumed_checkpoint(out: Path, config: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from (``last.pt``, or ``train.resume``'s file), None for a fresh run.
    Checkpoints hold the whole state dict, frozen parts included, so such a run needs no pretrained start."""
    from cirlab.engine.train import resume_checkpoint

    path = resume_checkpoint("auto" if resume else str((config.get("train") or {}).get("resume") or ""), out)
    return path if path is not None and path.is_file() else None


def _load_start(model: Any, continued: Path | None) -> dict[str, Any] | None:
    """Apply the model's pretrained start (``init_from``, a stage II's ``stage1_checkpoint``) unless the run resumes;
    returns the report ``load_init`` wrote (None: no start, a resume, or not the main process). ``load_init`` writes
    its report into a staging folder: the run folder is written only once training starts, after every refusal."""
    if not isinstance(model, HasInit):
        return None
    if continued is not None:
        logger.info("resuming from %s: the pretrained start (init_from) is not read again; the checkpoint holds "
                    "every weight", continued)
        return None
    if not is_main_process():
        model.load_init(None)
        return None
    with tempfile.TemporaryDirectory(prefix="cirlab-init-") as staging:
        model.load_init(staging)
        report = Path(staging) / INIT_REPORT
        return json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None


def _start_report_files(out: Path, continued: Path | None, init_report: dict[str, Any] | None) -> dict[str, Any]:
    """The ``run_files`` entry of a fresh start's init_from.json: written by the trainer with the other start files,
    once the previous run's files are replaced; a fresh start without one removes the previous run's report there
    (None), so a refused start leaves it as it was. A resume keeps the report of the start it continues."""
    if continued is not None or not is_main_process():
        return {}
    if init_report is not None:
        logger.info("pretrained start: its report goes to %s when training starts", out / INIT_REPORT)
    elif (out / INIT_REPORT).is_file():
        logger.info("%s reports the pretrained start of the run this one replaces: removed when training starts",
                    out / INIT_REPORT)
    return {INIT_REPORT: init_report}


START_FIELDS = ("init_from", "stage1_checkpoint")  # model_overrides naming weights read when a run starts
# model_overrides naming files read when the model is built (vocabularies, word vectors, backbone weights)
BUILD_FILE_FIELDS = ("vocab_file", "glove_path", "minilm_path", "backbone_weights")


def _check_start_paths(config: dict[str, Any]) -> None:
    """A pretrained start (``init_from``, ``stage1_checkpoint``) or a file the model is built from (``vocab_file``,
    ``glove_path``, ...) that names nothing on disk stops before the model is built: a paper-size build takes tens
    of seconds. Every such value is a local path, possibly ``lavis:PATH``,
    except stage II's ``init_from: stage1`` (the frozen stage I's own weights)."""
    from cirlab.models.lavis_interop import strip_lavis_prefix

    overrides = config.get("model_overrides") or {}
    for field in START_FIELDS + BUILD_FILE_FIELDS:
        value = str(overrides.get(field) or "")
        if not value or value == "stage1":
            continue
        start = field in START_FIELDS  # a start may be lavis:PATH; a vocabulary or word-vector file is a plain path
        path = Path(strip_lavis_prefix(value) if start else value).expanduser()
        if not path.exists():
            how = "starts from" if start else "is built from"
            raise ConfigError(f"model_overrides.{field}: {path} does not exist (model {config['model']!r} {how} "
                              "it)")


def _check_eval_split(config: dict[str, Any], split: str, loaded: Any) -> None:
    """Before the first step, what would fail the evaluation after training: a split without queries (empty or NaN
    metrics), a protocol its size does not fit, NaN or inf precomp features."""
    if is_precomp(config):
        empty = [""] if not loaded.captions else []
    else:  # one empty Fashion-IQ category fails too: the protocol averages over every category
        empty = [f" in category {s.category}" if s.category else "" for s in loaded if not s.triplets]
    if empty:
        from cirlab.data.base import no_queries_reason

        raise ConfigError(f"dataset {config['dataset']['name']!r}: evaluation split {split!r} has no queries"
                          f"{empty[0]} ({no_queries_reason(str(config['dataset']['name']))}); check the data with "
                          "`cirlab data check`")
    _check_protocol_fits(config, split, loaded)
    if is_precomp(config):  # a NaN or inf feature made the final evaluation fail after the training, naming no file
        from cirlab.data.base import ProblemCollector
        from cirlab.data.precomp import check_finite_features

        check_finite_features(loaded.images, loaded.ims_path, ProblemCollector(strict=True))


def _check_protocol_fits(config: dict[str, Any], split: str, loaded: Any) -> None:
    """COCO 1K scores 5 folds of a fifth of the images each: a split of another image count failed at the final
    evaluation, after the whole training. Checked when the split is read, before the first step."""
    from cirlab.core.errors import InputError
    from cirlab.core.metrics import coco_1k_folds

    protocol = protocol_of(config, split)
    if not is_precomp(config) or protocol not in ("coco1k", "coco"):
        return
    try:
        coco_1k_folds(loaded.num_images)
    except InputError as err:
        raise ConfigError(f"eval.protocol={protocol}: {config['dataset']['name']} {split} ({loaded.ims_path}) has "
                          f"{loaded.num_images} images, and {err}; use eval.protocol=full, or a split of 5 x N "
                          "images") from None


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


def is_main_process() -> bool:
    """The process that owns the run folder and writes run files: rank 0 under torchrun (known from the
    environment before the process group exists), the only process otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from cirlab.core.threads import launch_rank

    return launch_rank() == 0


def _final_splits(config: dict[str, Any]) -> list[str]:
    return list(config["eval"].get("splits") or [config["dataset"]["val_split"]])


def _evaluated_best(summary: dict[str, Any]) -> dict[str, Any]:
    """``{split: metrics}`` of the evaluation that selected best.pt (its weights, EMA included, are the ones
    evaluated then), empty when nothing was selected or the run was resumed: the evaluation may then be an earlier
    process's, on data a resume accepted as changed since, or by an older cirlab."""
    step = summary.get("best_step")
    if summary.get("resumed"):
        return {}
    chosen = [r for r in summary.get("eval_history") or () if r.get("best") and r.get("step") == step]
    return dict(chosen[-1].get("metrics") or {}) if step is not None and chosen else {}


def _final_evaluation(model: Any, config: dict[str, Any], out: Path, device: Any,
                      loaded: dict[str, Any] | None = None, evaluated_best: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Every final split of the selected weights; an ITM split the selection already scored with these weights
    (``evaluated_best``) is taken from it: scoring it again gave the same numbers (5 s of a 2.5-minute DIME demo).
    CIR splits are evaluated again, for their top-K files."""
    topk_dir = out / "topk" if config["eval"].get("topk", True) and not is_precomp(config) else None
    results = {}
    for split in _final_splits(config):
        if is_precomp(config) and isinstance((evaluated_best or {}).get(split), dict):
            results[split] = evaluated_best[split]
            logger.info("%s: %s (as evaluated when best.pt was selected)", split,
                        ", ".join(f"{k}={v:.2f}" for k, v in results[split].items()))
            continue
        evaluated = evaluate_split(model, config, split, device=device, topk_dir=topk_dir,
                                   loaded=(loaded or {}).get(split))
        results[split] = evaluated["metrics"]
        logger.info("%s: %s", split, ", ".join(f"{k}={v:.2f}" for k, v in evaluated["metrics"].items())
                    or f"no metrics (no targets): its rankings are in {topk_dir or 'no top-K file (eval.topk off)'}")
    return results

