"""Notebook recipes: the few multi-step calls the notebooks share (train a run, load it, evaluate it, trace it).

Notebooks stay thin: each cell calls one function here, in :mod:`cirlab.workbench.viz` or in
:mod:`cirlab.workbench.analysis`. Every recipe builds a run config (the ``cirlab train`` schema of
:mod:`cirlab.engine.runs`) from the notebook's parameters and calls the engine's public functions with it, so a
notebook loads, scores and traces data exactly as ``cirlab train`` / ``cirlab eval`` do. ``data_root`` may be a
dataset's own folder or a folder holding several layouts (``$CIRLAB_DATA``, the synthetic set:
``<root>/fashioniq``, ``<root>/precomp/f30k_precomp``); :func:`cirlab.data.catalog.dataset_root` decides.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from cirlab.core.config import did_you_mean, name_list, whole_number
from cirlab.core.contracts import RUN_DIR_ATTRIBUTE as RUN_ATTRIBUTE
from cirlab.core.contracts import Model, eval_mode, model_label, require_model
from cirlab.core.errors import ConfigError, InputError, MissingPathError, ModelMismatchError, UnknownKeyError
from cirlab.core.shipped import inside_package, is_checkout, source_checkout

logger = logging.getLogger(__name__)


class ParameterError(ConfigError):
    """A notebook parameter (or the workbench argument behind it) out of range or inconsistent with another; the
    message names it. Shown as one line in a notebook, like every cirlab error."""


__all__ = ["cir_splits", "data_config", "run_config", "train_run", "load_run", "untrained_copy", "evaluate_run",
           "evaluate_itm_run", "collect_routes", "query_fn_for", "explorer_for", "gallery_rows", "worst_queries",
           "load_topk_files", "write_outputs", "ensure_synthetic", "stored_config", "project_root", "reports_dir",
           "find_run", "find_data", "output_folder", "describe_paths", "explorer_kind", "cala_trace", "hrem_relation",
           "itm_topk", "itm_splits", "ranking_pair", "as_list", "CPU_RECIPES", "cpu_recipe"]

# The tiny presets' short CPU recipes: `cirlab train --set` overrides the notebooks apply by default
# (short_recipe=True) and `cirlab report` runs with. The papers' recipes need far longer runs than a notebook on a CPU:
# AMC's 50 epochs at lr 1e-4 with EMA 0.999 leave a few hundred steps' EMA weights almost at their initial values
# (an opened quickstart trained nothing: avg R@10 3.6, the untrained copy's). Paper presets are untouched.
CPU_RECIPES: dict[str, list[str]] = {
    # about a minute on 2 cores: avg R@10 about 40 on the synthetic Fashion-IQ (untrained: about 4)
    "amc": ["train.lr=1e-3", "train.ema_decay=0.99", "train.lr_milestones=[]", "train.eval_every=0",
            "model_overrides.image_size=32"],
    # 5 epochs (3 summing all violations) of the small precomp set, about 2 min on one core: dev rsum 387 (untrained
    # about 64). The real frozen MiniLM, not the tiny preset's random BERT: the path regulariser aligns routes with
    # sentence similarity, which only a pretrained encoder gives meaning (bench/dime_synthetic.py); 32 positions
    # hold the longest synthetic captions
    "dime": ["train.lr=3e-3", "train.eval_every=0", "model_overrides.direction=t2i",
             "model_overrides.lambda_softmax=9.0", "model_overrides.vse_mean_warmup_epochs=3",
             "model_overrides.bert=minilm", "model_overrides.max_words=32"],
    # the original optimisation (AdamW, BERT at 0.1 x lr, clip 2) at lr 2e-3 instead of 5e-4: dev rsum about 84 at
    # 60 steps (5e-4: 69); far from trained (reports/benchmarks/hrem_synthetic.md: 12 epochs, embed 128, rsum ~400)
    "hrem": ["train.lr=2e-3", "train.eval_every=0"],
    # random BLIP-2 sizes at 32 px: a few dozen CPU steps show the pipeline and the attention maps, not a trained CaLa
    # (its position-0 features start near-identical; reports/benchmarks/cala_synthetic.md)
    "cala": ["model_overrides.lr=1e-3", "model_overrides.image_size=32", "train.eval_every=0"],
    # the re-ranker (random-init tiny BLIP, 32 px): lr 2e-3 instead of 2e-5, no dropout; stage II at batch 8 (its
    # B x B pair scores make a step cost B^2); about a minute for both stages. Measured alternatives (stage II lr
    # 3e-3 / 5e-3, batch 16, grouping by reference) moved fewer targets forward
    "blip_rerank_stage1": ["train.lr=2e-3", "train.log_every=50", "model_overrides.dropout=0.0"],
    "blip_rerank_stage2": ["train.batch_size=8", "train.lr=2e-3", "train.log_every=100",
                           "model_overrides.dropout=0.0"],
}


def cpu_recipe(model: str, preset: str) -> list[str]:
    """The short CPU recipe (:data:`CPU_RECIPES`) of ``model`` for the ``tiny`` preset, else ``[]`` (the preset's own,
    the paper's recipe): the ``settings`` a notebook puts before the user's own."""
    return list(CPU_RECIPES.get(model, [])) if preset == "tiny" else []


REPORTS_ENV = "CIRLAB_REPORTS"  # where `cirlab report` / `make demo` wrote the report (default: <checkout>/reports)


# --------------------------------------------------------------------------------------------- where things are
# JupyterLab starts kernels in the notebook's folder (notebooks/), papermill in its --cwd, a user anywhere: so the
# notebooks' defaults never depend on the working directory. They name what `make demo` wrote
# (<checkout>/reports/<entry>, the synthetic data in the cache) and write to <checkout>/runs/<notebook>.
def project_root() -> Path | None:
    """The cirlab checkout in use: the working directory or its first parent holding cirlab's ``pyproject.toml``
    and ``notebooks/`` (or a report: ``reports/index.html``); else the source tree of an editable install; else
    None (a wheel used outside a checkout)."""
    return _checkout_above(Path.cwd().resolve()) or source_checkout()


def _checkout_above(here: Path) -> Path | None:
    """``here`` or its first parent holding cirlab's ``pyproject.toml`` and ``notebooks/`` (or a report:
    ``reports/index.html``), else None."""
    for folder in (here, *here.parents):
        if is_checkout(folder) or (folder / "reports" / "index.html").is_file():
            return folder
    return None


def reports_dir() -> Path:
    """Where ``make demo`` / ``cirlab report`` wrote the report: ``$CIRLAB_REPORTS``, else ``<checkout>/reports``,
    else ``./reports``."""
    env = os.environ.get(REPORTS_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    root = project_root()
    return (root or Path.cwd()) / "reports"


def _fix_hint(entry: str) -> str:
    root = project_root()
    if root is not None and (root / "Makefile").is_file():
        return f"run `make demo` in {root} (or `cirlab report --only {entry}` there)"
    return f"run `cirlab report --only {entry} --out {reports_dir()}`"


def find_run(run_dir: str | os.PathLike = "", entry: str = "", dataset: str = "") -> Path:
    """A trained run folder as an absolute path. ``""``: the report's ``<reports>/<entry>``, what ``make demo``
    trained (``entry`` default: ``train_dime`` for an ITM ``dataset``, else ``train``); a relative path is read
    from the working directory, else from the checkout. Raises ``FileNotFoundError`` naming the absolute path and
    the command that writes it when the folder has no checkpoint."""
    if not entry:
        from cirlab.data.catalog import is_itm

        entry = "train_dime" if dataset and is_itm(dataset) else "train"
    if str(run_dir):
        path = _from_checkout(Path(run_dir).expanduser()).resolve()
        hint = (_fix_hint(path.name) if path.parent == reports_dir() and path.name == entry else
                f"train it first (the train notebook with output_dir={str(path)!r}, or `cirlab train CONFIG "
                f"--output-dir {path}`)")
    else:
        path = reports_dir() / entry
        hint = _fix_hint(entry)
    checkpoints = path / "checkpoints"
    if not any((checkpoints / name).is_file() for name in ("best.pt", "last.pt")):
        inside = sorted({p.parent.parent.name for p in path.glob("*/checkpoints/*.pt")}) if path.is_dir() else []
        if inside:  # the folder above the runs (reports/ for reports/train): name the runs instead of "train it"
            hint = f"it holds the runs {', '.join(inside)}: name one of them ({path / inside[0]})"
        raise MissingPathError(f"no trained run at {path} (no checkpoints/best.pt or last.pt): {hint}")
    if dataset and not str(run_dir):
        _refuse_default_run_of_another_dataset(path, dataset)
    return path


def _refuse_default_run_of_another_dataset(path: Path, dataset: str) -> None:
    """The report's run is the default for ``dataset``'s task; one trained on another dataset failed only after the
    data had been read (at the untrained baseline, advising the wrong dataset)."""
    from cirlab.data.catalog import canonical_name

    trained_on = (stored_config(path).get("dataset") or {}).get("name")
    if trained_on and canonical_name(str(trained_on)) != canonical_name(dataset):
        raise ModelMismatchError(f"dataset={dataset!r}: the default run {path} was trained on {trained_on!r}; train "
                                 f"one on {dataset!r} first (the train notebook with dataset={dataset!r}) and name "
                                 f"its folder (run_dir / runs), or set dataset={trained_on!r}")


def _run_folder_of(path: Path) -> Path:
    """The run folder of ``path``: itself, or for a checkpoint file in a run's ``checkpoints/`` (which load_run
    takes) the folder above."""
    if path.is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def _from_checkout(path: Path) -> Path:
    """A relative path as given when it exists from the working directory, else from the checkout's root (so that
    ``reports/train`` means the same in notebooks/ as at the root)."""
    root = project_root()
    if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
        return root / path
    return path


def find_data(dataset: str, data_root: str | os.PathLike = "", run_dir: str | os.PathLike | None = None,
              size: str = "default", seed: int = 0) -> Path:
    """The data folder a notebook reads, as an absolute path.

    ``data_root`` when given; else ``$CIRLAB_DATA``; else the folder the run in ``run_dir`` was trained on (its
    ``config.yaml``), when it is the same dataset; else the embedded synthetic data in the cache (what ``make demo``
    generated; generated here in seconds when missing). A given folder that does not exist raises
    ``FileNotFoundError`` with its absolute path and the command that writes the synthetic set there. A recorded
    folder that is gone is the synthetic set of the size, seed and image size it names when it was one (generated
    again, said in the log); any other raises ``MissingPathError`` naming it: the run is not scored on other data.
    """
    from cirlab.data.catalog import get_dataset

    from cirlab.data.generators.synthetic import resolve_size

    # a misspelt name must not fall through to the synthetic data, nor a misspelt size wait until it is needed
    for name, check in (("dataset", lambda: get_dataset(dataset)), ("size", lambda: resolve_size(size))):
        try:
            check()
        except ValueError as err:
            raise ParameterError(f"{name}: {err}") from None
    data_root = data_root or ""  # None is "not given", not a folder named "None"
    if run_dir:
        run_dir = _run_folder_of(_from_checkout(Path(run_dir).expanduser()))  # read as find_run, load_run read it
    if run_dir and not Path(run_dir).exists():  # was: the synthetic data, without a word
        raise MissingPathError(f"run_dir {Path(run_dir).resolve()} does not exist")
    for given, origin in ((str(data_root), "data_root"), (os.environ.get("CIRLAB_DATA", "").strip(), "$CIRLAB_DATA")):
        if given:
            path = _from_checkout(Path(given).expanduser()).resolve()
            if not path.exists():
                raise MissingPathError(f"{origin} {path} does not exist: point it at your {dataset} data, or "
                                        f"write the synthetic set there with `cirlab data synth --out {path}`")
            return path
    if run_dir:
        stored = stored_config(run_dir).get("dataset") or {}
        root = stored.get("root")
        try:
            same = get_dataset(str(stored.get("name", ""))).name == get_dataset(dataset).name
        except (KeyError, ValueError):
            same = False
        if root and same:
            return _recorded_root(Path(str(root)).expanduser(), Path(run_dir).expanduser(), dataset)
        if same and isinstance(stored.get("synthetic"), dict):  # the shipped configs: root "" and the set's settings
            return _recorded_synthetic(stored["synthetic"], Path(run_dir).expanduser())
    return ensure_synthetic(None, size=size, seed=seed).resolve()


def _recorded_synthetic(settings: dict[str, Any], run_dir: Path) -> Path:
    """The generated synthetic set a run was trained on (its config's ``dataset.synthetic``: size, seed, image size,
    folder), made again where missing: the notebook's own ``size`` (default) stood in for it, and a run trained on
    the tiny set was scored on the default one."""
    size, seed = str(settings.get("size", "tiny")), int(settings.get("seed", 0))
    image_size = int(settings.get("image_size", 64))
    logger.info("%s was trained on the generated synthetic set (size %s, seed %d, %d-px images): reading that set "
                "(data_root= names another)", run_dir, size, seed, image_size)
    return ensure_synthetic(settings.get("out") or None, size, seed, image_size).resolve()


def _recorded_root(root: Path, run_dir: Path, dataset: str) -> Path:
    """The data root ``run_dir``'s config.yaml records, where it still is. Gone (a moved cache, a run received from
    a colleague), the default-size synthetic set stood in for it without a word: the run was then scored on other
    data. A generated synthetic set is made again with the settings its folder names; anything else is refused."""
    if root.exists():
        return root.resolve()
    from cirlab.data.generators.synthetic import remade_root

    remade = remade_root(root, run_dir / "config.yaml")
    if remade is None:
        raise MissingPathError(f"run_dir {run_dir}: the {dataset} data root it was trained on, {root} (recorded in "
                               f"{run_dir / 'config.yaml'}), does not exist here: pass data_root= (or set "
                               "CIRLAB_DATA) to the folder holding that data")
    return remade


def output_folder(output_dir: str | os.PathLike = "", notebook: str = "notebook") -> Path:
    """Where a notebook writes: ``output_dir`` when given (relative to the working directory), else
    ``$CIRLAB_RUNS/<notebook>``, else ``<checkout>/runs/<notebook>`` (git-ignored) when the working directory is in
    a checkout, else ``./runs/<notebook>``; but never inside the installed package (a wheel's notebook opened where
    it lies starts its kernel there): ``~/cirlab/runs/<notebook>`` instead, and an ``output_dir`` there is refused.
    A folder this process cannot write is refused now, in one line, not by a traceback after the notebook's work."""
    if str(output_dir):
        folder = Path(output_dir).expanduser().resolve()
        if inside_package(folder):
            raise ConfigError(f"output_dir={str(output_dir)!r} is inside the installed cirlab package ({folder}); "
                              "write elsewhere (pip uninstall would leave it behind)")
        hint = "pass another output_dir"
    elif os.environ.get("CIRLAB_RUNS", "").strip():
        folder = Path(os.environ["CIRLAB_RUNS"].strip()).expanduser().resolve() / notebook
        if inside_package(folder):
            raise ConfigError(f"CIRLAB_RUNS={os.environ['CIRLAB_RUNS'].strip()} is inside the installed cirlab "
                              "package; point it elsewhere (pip uninstall would leave the runs behind)")
        hint = "set CIRLAB_RUNS to a folder you can write (or pass output_dir=FOLDER)"
    else:
        folder = _writing_root() / "runs" / notebook
        if inside_package(folder):  # copy the notebooks out with `cirlab notebooks DIR` to write beside them
            from cirlab.core.paths import home

            folder = home("set CIRLAB_RUNS or pass output_dir") / "cirlab" / "runs" / notebook
        hint = "pass output_dir=FOLDER (or set CIRLAB_RUNS)"
    from cirlab.core.io import check_writable

    check_writable([folder], command=f"the {notebook} notebook's output folder", hint=hint)
    refuse_foreign_notebook_config(folder)  # now, not after the notebook's work
    return folder


def _writing_root() -> Path:
    """The folder a notebook's default output goes under: the checkout the working directory is in, else the
    working directory. Not the editable install's checkout seen from elsewhere (:func:`project_root` falls back to
    it): a notebook copied out of a shared checkout wrote into it, over every other user's results."""
    here = Path.cwd().resolve()
    return _checkout_above(here) or here


def refuse_foreign_notebook_config(folder: str | os.PathLike) -> None:
    """A notebook writes its parameters to ``config.json`` in its output folder: refuse a folder whose config.json
    no notebook wrote (one of the user's files, a transformers model folder) instead of writing over it. A
    notebook's own is a JSON object with ``output_dir`` (every notebook records where it wrote)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(stored, dict) and "output_dir" in stored
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ParameterError(f"output_dir: {path} is not a config.json a cirlab notebook wrote (a file of yours?); "
                             "the notebook would write its parameters over it: choose another output_dir")


def as_list(value: Any, name: str) -> list[Any]:
    """A list notebook parameter as a list: ``papermill -p runs /path`` (and ``cirlab report --set runs=/path``)
    pass one string, which iterated would be one entry per character; ``""`` / None are empty."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike, list, tuple)):
        return name_list(value)
    raise ParameterError(f"{name}: expected a list (papermill: -y '{name}: [a, b]'), got {type(value).__name__} "
                         f"{value!r}")


def describe_paths(**paths: Any) -> str:
    """One line per resolved path, for the notebooks' first output (``run: /abs/reports/train``)."""
    return "\n".join(f"{name:>10}: {value}" for name, value in paths.items())


def ensure_synthetic(data_root: str | os.PathLike | None = None, size: str = "default", seed: int = 0,
                     image_size: int = 64) -> Path:
    """The synthetic CIR/ITM data root (``cirlab.data.generators.synthetic.ensure``: generated only when missing)."""
    from cirlab.data.generators import synthetic

    if data_root and (Path(data_root) / synthetic.MANIFEST).is_file():
        return Path(data_root)  # complete data given by the caller (e.g. cirlab report's cached set): use as is
    return synthetic.ensure(data_root or None, seed=seed, size=size, image_size=image_size)


def _split_name(dataset: str, split: str) -> str:
    """The notebooks say ``val``/``test``; precomp data calls them ``dev``/``test`` (COCO ``testall``)."""
    from cirlab.data.catalog import get_dataset

    spec = get_dataset(dataset)
    return {"train": spec.splits[0], "val": spec.splits[1], "test": spec.splits[2]}.get(split, split)


def data_config(dataset: str, data_root: str | os.PathLike, eval_split: str = "val") -> dict[str, Any]:
    """A run config (defaults filled in, no model yet) whose dataset section reads ``dataset`` under
    ``data_root`` and validates on ``eval_split``."""
    from cirlab.data.catalog import dataset_root, is_itm
    from cirlab.engine.runs import with_defaults

    ds: dict[str, Any] = {"name": dataset, "root": str(dataset_root(dataset, data_root)),
                          "train_split": _split_name(dataset, "train"), "val_split": _split_name(dataset, eval_split),
                          "test_split": _split_name(dataset, "test")}
    if is_itm(dataset):
        ds["options"] = {"dim": None}  # any feature size (the synthetic and the tiny presets' features differ)
    return with_defaults({"dataset": ds, "eval": {"splits": [ds["val_split"]]}})


def cir_splits(dataset: str, data_root: str | os.PathLike, split: str) -> dict[str, Any]:
    """``{category: CIRSplit}``: Fashion-IQ is evaluated per category, Shoes and CIRR as one split."""
    from cirlab.engine.runs import load_cir_splits

    loaded = load_cir_splits(data_config(dataset, data_root), _split_name(dataset, split))
    return {sp.category or dataset: sp for sp in loaded}


def run_config(model: str, preset: str, dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike,
               *, epochs: int = 1, max_steps: int = 0, batch_size: int = 0, lr: float = 0.0, device: str = "cpu",
               seed: int = 0, resume: str = "", eval_split: str = "val", log_every: int = 10,
               settings: Sequence[str] | str = ()) -> dict[str, Any]:
    """The ``cirlab train`` config (``cirlab.engine.runs`` schema) for the notebook parameters.

    ``settings`` are ``section.key=value`` overrides applied last, exactly as ``cirlab train --set`` applies them
    (e.g. ``["train.lr=1e-3", "model_overrides.image_size=32"]``).

    Zero means "the model's paper default" for ``max_steps`` (no cap), ``batch_size`` and ``lr``. Precomp datasets
    (f30k/coco) validate on ``dev`` (for ``eval_split="val"``) and set the model's ``img_dim`` to the features'
    size when the model has one (the tiny preset's 64 would not fit 2048-d features).
    """
    from cirlab.data.catalog import is_itm
    from cirlab.engine.runs import apply_overrides, merge_config, parse_set

    train: dict[str, Any] = {"epochs": epochs, "device": device, "seed": seed, "log_every": log_every,
                             "progress": "auto", "selection": "val"}
    train.update({k: v for k, v in {"max_steps": max_steps, "batch_size": batch_size, "lr": lr}.items() if v})
    if resume:
        train["resume"] = resume
    base = data_config(dataset, data_root, eval_split)
    overrides: dict[str, Any] = {}
    if is_itm(dataset):
        dim = _feature_dim(base)
        if dim is not None and _has_field(model, "img_dim"):
            overrides["img_dim"] = dim
    config = merge_config(base, {"name": Path(output_dir).name, "model": model, "preset": preset,
                                 "model_overrides": overrides, "train": train, "eval": {"k": 10},
                                 "output_dir": str(output_dir)})
    return apply_overrides(config, parse_set(settings))


def _feature_dim(config: Mapping[str, Any]) -> int | None:
    """Region-feature size of the training split read from the ``.npy`` header (no data loaded); None if absent."""
    import numpy as np

    ds = config["dataset"]
    path = Path(ds["root"]) / f"{str(ds['name']).lower()}_precomp" / f"{ds['train_split']}_ims.npy"
    if not path.is_file():
        return None
    return int(np.load(path, mmap_mode="r").shape[-1])


def _has_field(model: str, field: str) -> bool:
    import dataclasses

    from cirlab.models.registry import get_entry

    cls = get_entry(model).config_cls
    return dataclasses.is_dataclass(cls) and field in {f.name for f in dataclasses.fields(cls)}


def train_run(model: str, preset: str, dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike,
              overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Train a registered model through the same path as ``cirlab train`` (:func:`cirlab.engine.runs.run_experiment`).

    ``options`` are :func:`run_config`'s. Returns the run's ``metrics.json`` contents plus ``best_score``,
    ``best_epoch`` and ``run_config`` (the resolved config, with ``model_config``).

    A notebook re-run replaces the run it finished before in ``output_dir`` (recorded by
    :func:`cirlab.engine.train.mark_recipe_run`, with the fingerprint of its ``last.pt``). Any other run there
    (``cirlab train``'s, one continued since, an interrupted one) is refused unless ``overwrite=True`` (replace it)
    or ``resume`` (continue it): a notebook must not delete hours of someone's training because its ``output_dir``
    pointed there.
    """
    import inspect

    from cirlab.core.config import unknown_names_message
    from cirlab.engine.runs import run_experiment, validate_config
    from cirlab.engine.train import claim_for_recipe, mark_recipe_run

    known = [p.name for p in inspect.signature(run_config).parameters.values() if p.kind == p.KEYWORD_ONLY]
    if set(options) - set(known):  # named as train_run's own options, not as the internal run_config()'s
        raise ParameterError(unknown_names_message("train_run", sorted(set(options) - set(known)), known))
    config = run_config(model, preset, dataset, data_root, output_dir, **options)
    validate_config(config, "notebook parameters")
    run = Path(output_dir)
    resume = bool(options.get("resume"))
    replace = claim_for_recipe(run, overwrite=overwrite, resume=resume, what="output_dir",
                               fix='set resume="auto" to continue it, overwrite=True to replace it, or choose another '
                                   'output_dir')
    result = run_experiment(config, output_dir=run, overwrite=replace)
    mark_recipe_run(run)
    resolved = stored_config(run)
    return {**result, "best_score": result["selection"]["best_score"], "best_epoch": result["selection"]["best_epoch"],
            "run_config": resolved}


def run_device(device: str | None, model: Any = None) -> str:
    """A workbench function's ``device``, checked by name (as ``cirlab train`` checks ``train.device``: a typo such as
    ``"gpu"`` was torch's list of device types) and with ``"auto"`` resolved to ``cuda`` when a GPU is visible; None:
    where ``model``'s weights are (:func:`cirlab.engine.evaluate.model_device`), the default of the calls that take a
    model (it was ``"cpu"``: a model loaded or trained on a GPU was fed CPU batches)."""
    from cirlab.engine.evaluate import model_device

    return str(model_device(model, device))


def load_run(run_dir: str | os.PathLike, device: str = "cpu", checkpoint: str = "best") -> Any:
    """A run's model with ``checkpoints/<checkpoint>.pt`` loaded, in eval mode. ``best`` falls back to ``last`` with a
    warning (a run stopped before its first evaluation has no best.pt: its last weights, not a selected model);
    any other name that is not there is an error listing the checkpoints the run has. ``run_dir`` may also be a
    checkpoint file itself (``.../checkpoints/best.pt``), and ``checkpoint`` a file name (``"last.pt"``)."""
    from cirlab.engine.runs import model_from_checkpoint

    device = run_device(device)
    run = _from_checkout(Path(run_dir).expanduser()).resolve()  # reports/train from notebooks/ too, as find_run
    if run.is_file() and run.suffix in (".pt", ".pth", ".ckpt"):  # a checkpoint file, cirlab's or an original's
        model, _ = model_from_checkpoint(run)
        if run.parent.name == "checkpoints" and (run.parent.parent / "config.yaml").is_file():
            mark_run(model, run.parent.parent)
        return model.to(device).eval()
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ParameterError(f"checkpoint is a checkpoint's name in the run (best, last), got {checkpoint!r}")
    checkpoint = checkpoint.removesuffix(".pt")  # "last.pt" looked for last.pt.pt
    if run.name == "checkpoints" and any(run.glob("*.pt")):  # the run's checkpoints/ folder itself
        run = run.parent
    folder = run / "checkpoints"
    have = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not have:
        find_run(run, entry=run.name if run.parent == reports_dir() else "")  # raises, saying what to do
        raise MissingPathError(f"no checkpoint in {folder}")
    name = checkpoint if checkpoint in have else "last" if checkpoint == "best" and "last" in have else None
    if name is None:
        raise MissingPathError(f"checkpoint={checkpoint!r}: no {folder / (checkpoint + '.pt')}"
                               f"{did_you_mean(checkpoint, have)}; this run has: {', '.join(have)}")
    if name != checkpoint:  # cirlab eval refuses such a run and names --checkpoint last.pt: said here too
        logger.warning("%s has no best.pt (stopped before its first evaluation?): loading last.pt, the weights it "
                       "stopped with, not a selected model", folder)
    model, _ = model_from_checkpoint(folder / f"{name}.pt")
    mark_run(model, run)
    return model.to(device).eval()


def mark_run(model: Any, run_dir: str | os.PathLike) -> None:
    """Record on ``model`` the run it comes from (:data:`cirlab.core.contracts.RUN_DIR_ATTRIBUTE`), for
    :func:`evaluate_run`; a relative ``run_dir`` is read as :func:`find_run` reads it."""
    setattr(model, RUN_ATTRIBUTE, str(_from_checkout(Path(run_dir).expanduser()).resolve()))


def stored_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's resolved ``config.yaml`` (empty when the run wrote none; a folder that is not there is a
    :class:`MissingPathError`, not a run without a config). A relative path is read as :func:`find_run` reads it."""
    from cirlab.engine.runs import read_run_config

    run = _from_checkout(Path(run_dir).expanduser())
    if not run.is_dir():
        raise MissingPathError(f"no run folder at {run.absolute()}")
    return read_run_config(run)


def untrained_copy(run_dir: str | os.PathLike, dataset: str, data_root: str | os.PathLike, device: str = "cpu",
                   seed: int = 0) -> Any:
    """A freshly initialised model with a run's exact config (and the same training vocabulary): a baseline.

    The vocabulary is built from ``dataset``'s training split under ``data_root`` (where the data is now; the run
    may have been trained elsewhere), which must be the dataset the run was trained on."""
    from cirlab.data.catalog import canonical_name
    from cirlab.engine.runs import fit_to_training_data, merge_config
    from cirlab.models.registry import create_model

    device = run_device(device)
    trained = load_run(run_dir)
    given = data_config(dataset, data_root)
    stored = stored_config(run_dir)
    trained_on = (stored.get("dataset") or {}).get("name")
    if trained_on and canonical_name(str(trained_on)) != canonical_name(dataset):  # another vocabulary, silently
        raise ModelMismatchError(f"untrained_copy: {run_dir} was trained on {trained_on!r}, not {dataset!r}; pass "
                                 f"dataset={trained_on!r} for a baseline with its vocabulary")
    config = merge_config(given, stored)
    config["dataset"]["root"] = given["dataset"]["root"]  # the stored root won and data_root went unread
    config["model"] = trained.model_name
    # its weights under `seed` (the vocabulary's rows too), the caller's random streams kept: create_model(seed=)
    model = create_model(trained.model_name, config=trained.config, seed=seed)
    fit_to_training_data(model, config)  # the same vocabulary as the trained run, built the same way
    mark_run(model, run_dir)  # evaluated with the run's dataset settings, as the trained model is
    return model.to(device).eval()


def evaluate_run(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", k: int = 50,
                 device: str | None = None, topk_dir: str | os.PathLike | None = None,
                 name: str = "", from_run: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Protocol metrics and the top-K lists per category, through :func:`cirlab.engine.runs.evaluate_split`.

    A model from :func:`load_run` or :func:`untrained_copy` is evaluated with its run's dataset settings, as
    ``cirlab eval RUN`` evaluates it: the category it was trained on (``dataset.category``), the dataset's
    ``options`` (Fashion-IQ's ``protocol: rerank`` of the re-ranker runs) and ``eval.protocol``, where the run was
    trained on ``dataset``; ``from_run=False`` takes the dataset's defaults instead (every category).

    CIR models: top-K files go to ``topk_dir/<split>_<category>.topk.npz`` when given (a temporary folder
    otherwise). ITM models on precomp data: :func:`evaluate_itm_run` without ``topk_dir`` (the dict is empty);
    with it, :func:`itm_topk` (the same metrics, plus the text-to-image top-K file ``topk_dir/<split>_t2i.topk.npz``
    under the key ``"t2i"``). Returns ``(metrics, {category: TopK})``.
    """
    import tempfile

    from cirlab.core.topk import load_topk
    from cirlab.engine.runs import evaluate_split, load_split, task_mismatch

    device = run_device(device, model)
    whole_number(k, "k (the top-K lists' length)")  # before the gallery is encoded
    require_model(model, Model, "evaluate_run")
    problem = task_mismatch(model.model_name, model.task, dataset)
    if problem:  # was torch's "'AMC' object has no attribute 'encode_image'" from deep in the scoring
        raise ModelMismatchError(f"evaluate_run: {problem}")
    if model.task == "itm":
        if topk_dir is None:
            return evaluate_itm_run(model, dataset, data_root, split, device=device), {}
        return itm_topk(model, dataset, data_root, split, k=k, device=device, topk_dir=topk_dir,
                        name=name or model.model_name)
    config = data_config(dataset, data_root, split)
    if from_run:
        _take_run_settings(config, getattr(model, RUN_ATTRIBUTE, None))
    config.update(name=name or model.model_name, model=model.model_name)
    config["eval"]["k"] = k
    loaded = load_split(config, config["dataset"]["val_split"])
    with eval_mode(model), tempfile.TemporaryDirectory() as tmp:
        out = Path(topk_dir) if topk_dir is not None else Path(tmp)
        result = evaluate_split(model, config, config["dataset"]["val_split"], device=device, topk_dir=out,
                                loaded=loaded)
        topks = {sp.category or dataset: load_topk(path) for sp, path in zip(loaded, result["topk_paths"])}
    return dict(result["metrics"]), topks


def _take_run_settings(config: dict[str, Any], run_dir: str | None) -> None:
    """Put the dataset settings the run ``run_dir`` was trained and evaluated with into ``config`` (built by
    :func:`data_config` for the same dataset; the data's root and the split asked stay), and say which."""
    from cirlab.data.catalog import canonical_name

    stored = stored_config(run_dir) if run_dir and Path(run_dir, "config.yaml").is_file() else {}
    ds, ev = stored.get("dataset") or {}, stored.get("eval") or {}
    if not ds.get("name") or canonical_name(str(ds["name"])) != canonical_name(config["dataset"]["name"]):
        return  # a run of another dataset (or of cirlab.fit, which records none): the dataset's defaults
    taken = {"dataset.category": ds.get("category"), "dataset.options": ds.get("options") or None,
             "eval.protocol": ev.get("protocol")}
    taken = {key: value for key, value in taken.items() if value}
    for key, value in taken.items():
        section, field = key.split(".")
        config[section][field] = copy.deepcopy(value)
    if taken:
        logger.info("evaluate_run: with the settings of %s: %s (from_run=False: the dataset's defaults)", run_dir,
                    ", ".join(f"{k}={v}" for k, v in taken.items()))


def evaluate_itm_run(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val",
                     device: str | None = None, shard_size: int = 1000) -> dict[str, float]:
    """ITM metrics of a model on a precomp split, with the run configs' protocol
    (:func:`cirlab.engine.runs.itm_protocol`: COCO's 1K and 5K on its test split, the full matrix elsewhere).
    ``"val"`` means the precomp ``dev`` split."""
    from cirlab.data.catalog import ITM_DATASETS, is_itm
    from cirlab.engine.runs import evaluate_split

    device = run_device(device, model)
    if not is_itm(dataset):
        raise InputError(f"evaluate_itm_run: {dataset!r} is not a precomp ITM dataset ({', '.join(ITM_DATASETS)})")
    config = data_config(dataset, data_root, split)
    config["eval"]["shard_size"] = shard_size
    with eval_mode(model):
        result = evaluate_split(model, config, config["dataset"]["val_split"], device=device)
    return {k: float(v) for k, v in result["metrics"].items()}


def itm_splits(dataset: str, data_root: str | os.PathLike, split: str = "val") -> Any:
    """The precomp split the ITM notebooks read (``"val"`` is ``dev``)."""
    from cirlab.engine.runs import load_split

    config = data_config(dataset, data_root, split)
    return load_split(config, config["dataset"]["val_split"])


def itm_topk(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", k: int = 50,
             device: str | None = None, topk_dir: str | os.PathLike | None = None, name: str = "",
             shard_size: int = 1000) -> tuple[dict[str, float], dict[str, Any]]:
    """ITM metrics and the text-to-image top-K of every caption, from one score matrix.

    The matrix is the engine's (:func:`cirlab.engine.evaluate.score_itm`, every image x caption pair) and the
    metrics are :func:`cirlab.core.metrics.itm_metrics` of it, which is what ``evaluate_itm``'s ``full`` protocol
    reports (F30K, the synthetic set, COCO 5K); the others (COCO 1K, 1K + 5K) take their metrics from
    :func:`evaluate_itm_run` and cost a second scoring. The top-K file (``cirlab.core.topk`` format) has one row
    per caption: query id = caption index, gallery ids = image indices, ``target_rank`` = the 1-based rank of the
    caption's own image among all images (the t2i rank of the metrics), ``category`` = the caption's type (the
    synthetic set's meta file) or ``caption <slot>``. Written to ``topk_dir/<split>_t2i.topk.npz`` when given, so
    the rank-shift notebook can compare two ITM runs (e.g. DIME vs HREM) query by query.
    """
    import numpy as np
    import pandas as pd
    import torch

    from cirlab.core import metrics as M
    from cirlab.core.retrieval import make_topk, topk_candidates
    from cirlab.core.topk import save_topk
    from cirlab.engine.evaluate import score_itm
    from cirlab.engine.runs import itm_protocol

    device = run_device(device, model)
    whole_number(k, "k (the top-K lists' length)")  # int(2.5) ranked 2 without a word
    loaded = itm_splits(dataset, data_root, split)
    config = data_config(dataset, data_root, split)
    split_name = str(config["dataset"]["val_split"])
    protocol = itm_protocol(config, split_name)
    cpi = int(getattr(loaded, "im_div", 5))
    with eval_mode(model):
        sims = score_itm(model, loaded, shard_size=shard_size, device=device)  # [N images, N captions]
    if protocol in ("full", "f30k", "coco5k"):  # evaluate_itm: itm_metrics of the whole matrix
        metrics = {key: float(v) for key, v in M.itm_metrics(sims, captions_per_image=cpi).items()}
    else:
        metrics = evaluate_itm_run(model, dataset, data_root, split, device=device, shard_size=shard_size)
    t2i = sims.T.float()  # captions x images
    n_cap, n_img = t2i.shape
    target = torch.arange(n_cap) // cpi
    ranks = M.t2i_ranks(sims, captions_per_image=cpi).numpy()
    kk = min(int(k), n_img)
    top_scores, top_idx = topk_candidates(t2i, kk)
    types = _with_caption_types(pd.DataFrame({"caption_id": np.arange(n_cap)}), loaded)["category"].tolist()
    topk = make_topk(top_scores, top_idx, query_ids=[str(c) for c in range(n_cap)],
                     gallery_ids=[str(i) for i in range(n_img)], target=target.tolist(), ranks=ranks,
                     category=types, meta={"model": getattr(model, "model_name", ""), "name": name,
                                           "dataset": dataset, "split": split_name,
                                           "direction": "t2i", "protocol": protocol})
    if topk_dir is not None:
        save_topk(Path(topk_dir) / f"{split_name}_t2i.topk.npz", topk)
    return metrics, {"t2i": topk}


def explorer_kind(model: Any) -> str:
    """What the router-explorer notebook draws for a model: ``"cala"`` (HCA hinge / TAC attention),
    ``"hrem"`` (the instance-level relation graph) or ``"router"`` (AMC gates, DIME paths: a
    :class:`cirlab.core.contracts.TracedModel`). Another model (the BLIP re-ranker's stages) has none of these: a
    one-line :class:`ModelMismatchError` (it was "router", and the notebook failed later on an empty trace)."""
    from cirlab.core.contracts import TracedModel

    name = getattr(model, "model_name", "")
    if name in ("cala", "hrem"):
        return name
    require_model(model, TracedModel, "the router explorer",
                  hint=_ensemble_hint(model) or "it has no router, attention view or relation graph to explore (the "
                                                "rank_shift notebook compares its rankings)")
    return "router"


def _ensemble_hint(model: Any) -> str:
    """An AMC or DIME ensemble has routers, one per member under the same layer names (a trace could not tell
    them apart): explore one member."""
    members = getattr(model, "members", None)
    return "an ensemble: trace one of its members (model.members[0])" if members is not None else ""


def _check_count(n: Any, name: str) -> None:
    """A number of queries or images to trace: a whole number >= 1 (the router explorer's ``n_queries``)."""
    whole_number(n, f"{name} (router_explorer's n_queries)")


def _shares(n: int, parts: int) -> list[int]:
    """``n`` spread over ``parts`` categories, the remainder to the first ones: 20 over three is 7 + 7 + 6 (an even
    split of 6 each traced 18). A category with fewer queries than its share gives what it has."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _require_kind(model: Any, name: str, where: str, others: str) -> None:
    """A model-specific view given another model failed as torch's ``'AMC' object has no attribute 'trace'``."""
    from cirlab.core.contracts import model_label

    got = model_label(model)
    if got != name:
        raise ModelMismatchError(f"{where} needs a {name} model, got {got!r} ({others})")


def cala_trace(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", n: int = 8,
               device: str | None = None) -> tuple[Any, dict[Any, str]]:
    """CaLa's attention (:meth:`cirlab.models.cala.CaLa.trace`: HCA's hinge map and bridge shares, TAC's twin
    attention, token strings in ``source``/``destination``) for up to ``n`` queries with a known target, spread
    over the categories; adds each query's ``category``. Returns ``(frame, {query_id: text})``."""
    import pandas as pd
    import torch

    from cirlab.workbench.viz import plain_text

    device = run_device(device, model)
    _require_kind(model, "cala", "cala_trace", "router models (AMC, DIME): collect_routes; HREM: hrem_relation")
    _check_count(n, "n")
    splits = cir_splits(dataset, data_root, split)
    transform = model.image_transform(False)
    frames, texts = [], {}
    for (cat, sp), share in zip(splits.items(), _shares(n, len(splits))):
        trips = [t for t in sp.triplets if t.target_name][:share]
        if not trips:
            continue
        load = lambda names, sp=sp: torch.stack([transform(sp.read_image(x))  # noqa: E731
                                                 for x in names]).to(device)
        frame = model.trace(load([t.ref_name for t in trips]), [t.text for t in trips],
                            load([t.target_name for t in trips]), ids=[t.query_id for t in trips])
        frame["category"] = cat
        frames.append(frame)
        texts.update({t.query_id: plain_text(t.text) for t in trips})
    if not frames:
        raise InputError(f"no {dataset} {split} query with a known target to trace")
    return pd.concat(frames, ignore_index=True), texts


def hrem_relation(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", n_images: int = 6,
                  caption: int = 0, slot: int = 0, device: str | None = None) -> dict[str, Any]:
    """HREM's instance-level graph for one batch of ``n_images`` images of a precomp split and one caption of
    each (caption ``slot`` of every image: on the synthetic set slot 0 is the ``full`` caption), as the tidy
    frames of :func:`cirlab.models.hrem.relation_frames`: ``"edges"`` (connection, relevance, mask and fusion
    attention per edge, typed i2i/i2t/t2i/t2t, with image and caption ids) and ``"word_region"`` (batch caption
    ``caption``'s words against every region of every image). Adds ``"texts"`` ({caption id: caption}) and
    ``"caption_id"`` (the chosen caption's dataset id)."""
    import numpy as np
    import torch

    from cirlab.models.hrem import relation_frames

    device = run_device(device, model)
    _require_kind(model, "hrem", "hrem_relation", "router models (AMC, DIME): collect_routes; CaLa: cala_trace")
    loaded = itm_splits(dataset, data_root, split)
    cpi = int(getattr(loaded, "im_div", 5))
    _check_count(n_images, "n_images")
    n = max(2, min(n_images, loaded.num_images))  # a relation graph needs two images
    if n != n_images:
        why = (f"the split has only {loaded.num_images} images" if n_images > loaded.num_images
               else "a relation graph needs at least 2 images")
        logger.warning("hrem_relation: n_images=%d: using %d (%s)", n_images, n, why)
    whole_number(caption, "caption", low=0)  # 2.0 or "1" failed as list-index / comparison TypeErrors
    whole_number(slot, "slot", low=0)
    if not 0 <= caption < n:
        raise ParameterError(f"caption {caption} is not a batch position (0..{n - 1})")
    if slot >= cpi:  # slot 7 wrapped to slot 2 without a word
        raise ParameterError(f"slot {slot} is not a caption slot: every image has {cpi} captions (0..{cpi - 1})")
    images = list(range(n))
    captions = [i * cpi + (slot % cpi) for i in images]
    batch = {"image_feats": torch.as_tensor(np.asarray(loaded.images[images]), dtype=torch.float32).to(device),
             "text": [loaded.captions[c] for c in captions], "image_idx": torch.tensor(images),
             "caption_idx": torch.tensor(captions)}
    frames = relation_frames(model, batch, caption=caption)
    frames["texts"] = {c: loaded.captions[c] for c in captions}
    frames["caption_id"] = captions[caption]
    return frames


def collect_routes(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", n: int = 100,
                   device: str | None = None) -> tuple[Any, dict[Any, str]]:
    """Trace the router on up to ``n`` queries spread over the categories: ``(route frame, {query_id: text})``.

    One engine tracer (:func:`cirlab.engine.evaluate.trace_split`): CIR data goes through ``encode_query``; ITM
    precomp data (DIME) scores each caption with its own image. The model is traced in eval mode and given back in
    the mode it had.
    """
    from cirlab.engine.runs import load_split

    from cirlab.core.contracts import TracedModel
    from cirlab.core.tracing import OTHER_VIEWS

    name = model_label(model)
    require_model(model, TracedModel, "collect_routes",
                  hint=_ensemble_hint(model) or OTHER_VIEWS.get(name, "its forward emits no routes"))
    device = run_device(device, model)
    _check_count(n, "n")
    config = data_config(dataset, data_root, split)
    loaded = load_split(config, config["dataset"]["val_split"])
    with eval_mode(model):  # traced as evaluated; the caller's mode (training between epochs) given back
        return _traced_routes(model, loaded, n, device)


def _traced_routes(model: Any, loaded: Any, n: int, device: str) -> tuple[Any, dict[Any, str]]:
    import pandas as pd

    from cirlab.engine.evaluate import trace_split

    if model.task == "itm":
        frame = trace_split(model, loaded, n, device=device)
        if not frame.empty:  # the dataset's indices, not the batch-local ones some models emit
            frame["caption_id"] = frame["query_id"].astype(int)
            frame["image_id"] = frame["image_idx"].astype(int)
        frame = _with_caption_types(frame, loaded)
        texts = {q: loaded.captions[int(q)] for q in dict.fromkeys(frame["query_id"])} if not frame.empty else {}
        return _checked(_main_layers(frame), model), texts
    from cirlab.workbench.viz import plain_text

    frames = [trace_split(model, sp, share, device=device) for sp, share in zip(loaded, _shares(n, len(loaded)))
              if share]
    texts = {t.query_id: plain_text(t.text) for sp in loaded for t in sp.triplets}
    frame = _main_layers(pd.concat(frames, ignore_index=True))
    return _checked(frame, model), {q: texts[q] for q in dict.fromkeys(frame["query_id"])}


def _with_caption_types(frame: Any, split: Any) -> Any:
    """Give ITM route records a ``category``: the caption's type when the data's meta file lists it (the synthetic
    set's ``synthetic_meta.json``: full, color, shape, layout, relation), else ``caption <k>``, its slot among the
    image's captions."""
    if frame.empty or "caption_id" not in frame.columns:
        return frame
    meta = Path(getattr(split, "ims_path", "")).parent.parent / "synthetic_meta.json"
    types: list[str] = []
    if meta.is_file():
        meta_json = json.loads(meta.read_text(encoding="utf-8"))
        types = list(meta_json.get("caption_type", {}).get(getattr(split, "split", ""), []))
    cpi = int(getattr(split, "im_div", 5))
    idx = frame["caption_id"].astype(int)
    frame = frame.copy()
    frame["category"] = [types[k] if k < len(types) else f"caption {k % cpi}" for k in idx]
    return frame


def _checked(frame: Any, model: Any) -> Any:
    if frame.empty:
        from cirlab.core.tracing import nothing_traced

        raise InputError(nothing_traced(model_label(model), "collect_routes"))
    return frame


def query_fn_for(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", k: int = 5,
                 device: str | None = None, splits: Mapping[str, Any] | None = None) -> Any:
    """``query_fn(query_id, text)`` for :class:`cirlab.workbench.widgets.RouterExplorer` over every category of a CIR
    split (None for ITM models: see :func:`explorer_for`). ``splits`` (``{category: CIRSplit}``) avoids reloading
    them."""
    device = run_device(device, model)
    if model.task != "cir":
        return None
    from cirlab.workbench.widgets import make_query_fn

    from cirlab.engine.evaluate import cir_transform

    splits = splits if splits is not None else cir_splits(dataset, data_root, split)
    transform = cir_transform(model, None)  # image_transform is an optional hook: the split's default without it
    per_cat = {cat: make_query_fn(model, sp, transform, k=k, device=device) for cat, sp in splits.items()}
    owner = {t.query_id: cat for cat, sp in splits.items() for t in sp.triplets}

    def query_fn(query_id: Any, text: str) -> dict[str, Any]:
        if query_id not in owner:
            raise UnknownKeyError(f"query {query_id!r} is not in the {dataset} {split} split")
        return per_cat[owner[query_id]](query_id, text)

    return query_fn


def explorer_for(model: Any, routes: Any, texts: Mapping[Any, str], dataset: str, data_root: str | os.PathLike,
                 split: str = "val", *, run_dir: str | os.PathLike = "", compare: str = "", k: int = 5,
                 device: str | None = None) -> Any:
    """The interactive explorer for a traced router model, wired to the model so that edits re-run it.

    CIR models (AMC): a :class:`cirlab.workbench.widgets.RouterExplorer` with thumbnails from the split, the
    target's rank in the whole gallery, and, when ``compare`` names a second checkpoint (``"untrained"``: a fresh
    copy of the run's model, built from ``run_dir``'s config, so it needs ``run_dir=``; or another run folder), that
    checkpoint's gates for the same text side by side.
    ITM models (DIME): a :class:`cirlab.workbench.widgets.PathExplorer` that re-scores an edited caption against a
    chosen image of the split (``compare`` is ignored).

    Call the explorer's ``close()`` before building another in a re-run cell (or use it as ``with explorer_for(...)
    as explorer:``): ipywidgets keeps every open widget, and through it the explorer, its model copies and its
    data, for the whole kernel session (about 27 MB a re-run with the ``lite`` AMC).
    """
    from cirlab.workbench import widgets

    device = run_device(device, model)
    require_model(model, Model, "explorer_for")
    kind = explorer_kind(model)
    if kind != "router":  # a RouterExplorer on a CaLa trace failed later, inside the widget, on missing gates
        views = {"cala": "viz.plot_cala_bridges / viz.plot_bridge_words",
                 "hrem": "viz.plot_relation_graph / viz.plot_word_region"}[kind]
        raise ModelMismatchError(f"explorer_for: {model.model_name} has no live explorer (it is for AMC gates and "
                                 f"DIME paths); its views are {views}")
    if model.task == "itm":
        from cirlab.engine.runs import load_split

        config = data_config(dataset, data_root, split)
        loaded = load_split(config, config["dataset"]["val_split"])
        return widgets.PathExplorer(routes, texts, pair_fn=widgets.make_pair_fn(model, loaded, device=device),
                                    n_images=loaded.num_images)
    splits = cir_splits(dataset, data_root, split)
    query_fn = query_fn_for(model, dataset, data_root, split, k=k, device=device, splits=splits)
    compare_fn, labels = None, (Path(run_dir).name if str(run_dir) else "this run", str(compare))
    if compare == "untrained" and not str(run_dir):  # was "no trained run at <cwd>": the copy needs the run's config
        raise ParameterError('compare="untrained" builds a fresh copy of the run\'s model: pass run_dir= too (or '
                             'compare="" for no comparison)')
    if compare:
        other = (untrained_copy(run_dir, dataset, data_root, device=device) if compare == "untrained"
                 else load_run(find_run(compare), device=device))
        compare_fn = query_fn_for(other, dataset, data_root, split, k=k, device=device, splits=splits)
        labels = (labels[0], "untrained" if compare == "untrained" else Path(compare).name)
    paths: dict[str, Any] = {}
    for sp in splits.values():
        for name in sp.gallery_names:
            paths.setdefault(str(name), sp)
        for t in sp.triplets:
            paths.setdefault(str(t.ref_name), sp)
    return widgets.RouterExplorer(routes, texts=texts, query_fn=query_fn, k=k, compare_fn=compare_fn, labels=labels,
                                  image_fn=lambda name: paths[str(name)].image_path(name))


def _main_layers(frame: Any) -> Any:
    """Drop diagnostic layers (DIME's ``*_raw`` pre-normalisation paths): plots show what the model used."""
    return frame[~frame["layer"].astype(str).str.endswith("_raw")].reset_index(drop=True)


def require_split(split: Any, where: str, *, itm: bool = False, one: bool = False) -> None:
    """``split`` is a loaded split (CIR: a ``CIRSplit``, or unless ``one`` :func:`cir_splits`' ``{category:
    split}``; ITM: a ``PrecompSplit``), not its name: ``"val"`` failed deep inside as "'str' object has no attribute
    'triplets'"."""
    wanted, attr = ("precomp split (workbench.itm_splits(dataset, data_root, 'val'))", "captions") if itm else \
        (f"CIR split (workbench.cir_splits(dataset, data_root, 'val'){'[category]' if one else ''})", "triplets")
    for one_split in (split.values() if isinstance(split, Mapping) and not (itm or one) else [split]):
        if not hasattr(one_split, attr):
            raise ParameterError(f"{where}: split must be a loaded {wanted}, got {one_split!r}")


def gallery_rows(topk: Any, split: Any, query_ids: Sequence[str] | None = None, k: int = 5,
                 n: int = 4) -> list[dict[str, Any]]:
    """Rows for :func:`cirlab.workbench.viz.plot_retrieval_gallery` from a top-K file and its split (images from
    disk). ``split`` may be :func:`cir_splits`' ``{category: split}`` (a top-K file of every category); without
    ``query_ids`` the first ``n`` queries of the file that the split holds."""
    from cirlab.workbench.viz import plain_text

    require_split(split, "gallery_rows")
    whole_number(k, "k")
    whole_number(n, "n")
    owner = {t.query_id: (sp, t) for sp in (split.values() if isinstance(split, Mapping) else [split])
             for t in sp.triplets}
    row_of = {q: i for i, q in enumerate(topk.query_ids)}
    ids = name_list(query_ids) if query_ids is not None else [q for q in topk.query_ids if q in owner][:n]
    for qid in ids:  # bare KeyErrors before: an id of another category, or one the top-K file does not hold
        for where, known in (("the top-K file", row_of), ("the split", owner)):
            if str(qid) not in known:
                raise UnknownKeyError(f"query {str(qid)!r} is not in {where} ({len(known)} queries, first: "
                                      f"{', '.join(map(str, list(known)[:3]))})")
    rows = []
    for qid in ids:
        (sp, trip), i = owner[str(qid)], row_of[str(qid)]
        cands = list(topk.gallery_ids[i, :k])
        target = trip.target_name
        rows.append({"query_id": qid, "ref_image": sp.image_path(trip.ref_name), "text": plain_text(trip.text),
                     "candidates": [sp.image_path(c) for c in cands], "candidate_ids": cands,
                     "scores": list(topk.scores[i, :k]), "target_rank": int(topk.target_rank[i]),
                     "target_position": cands.index(target) if target in cands else None,
                     "target_image": sp.image_path(target) if target else None})
    return rows


def worst_queries(topk: Any, n: int = 4) -> list[str]:
    """Query ids whose target ranks worst (known targets only; a target that is its own reference, removed from the
    ranking with it, has no rank to be worst at: its never-a-hit stand-in put those queries first)."""
    import numpy as np

    from cirlab.workbench.analysis import removed_rank

    whole_number(n, "n")  # order[:-1] gave every query but one
    known = np.flatnonzero((topk.target_rank > 0) & (topk.target_rank < removed_rank()))
    order = known[np.argsort(-topk.target_rank[known], kind="stable")]
    return [str(q) for q in topk.query_ids[order[:n]]]


def load_topk_files(path: str | os.PathLike, split: str = "") -> Any:
    """One top-K file, or the ``*.topk.npz`` files of one split in a folder concatenated (e.g. the Fashion-IQ
    categories of a run's ``topk/``). A folder holding several splits' files (``val_dress``, ``test_dress``) needs
    ``split``: concatenated, they were one ranking of twice the queries, labelled with one split."""
    import numpy as np

    from cirlab.core.topk import TopK, load_topk

    path = Path(path)
    if path.is_file():
        one = load_topk(path)
        if split and one.meta.get("split") != split:
            raise MissingPathError(f"{path} is a top-K file of split {one.meta.get('split')!r}, not {split!r}")
        return one
    files = sorted(path.glob("*.topk.npz")) if path.is_dir() else []
    if not files:
        raise MissingPathError(f"no top-K file at {path} (expected a .topk.npz file or a folder of them)")
    parts = [load_topk(f) for f in files]
    splits = sorted({str(p.meta.get("split", "")) for p in parts})
    if split:
        kept = [i for i, p in enumerate(parts) if p.meta.get("split") == split]
        files, parts = [files[i] for i in kept], [parts[i] for i in kept]
        if not parts:
            raise MissingPathError(f"no top-K file of split {split!r} in {path}; its files are of "
                                   f"{', '.join(map(repr, splits))}")
    elif len(splits) > 1:
        raise InputError(f"{path} holds the top-K files of several splits ({', '.join(map(repr, splits))}), which "
                         f"are no one ranking: read one split (load_topk_files(path, split={splits[-1]!r})), or name "
                         "a file or a folder of one split")
    k = min(p.k for p in parts)
    return TopK(np.concatenate([p.query_ids for p in parts]), np.concatenate([p.gallery_ids[:, :k] for p in parts]),
                np.concatenate([p.scores[:, :k] for p in parts]), np.concatenate([p.target_rank for p in parts]),
                np.concatenate([p.category for p in parts]), np.concatenate([p.target_ids for p in parts]),
                {"files": [str(f) for f in files], **parts[0].meta})


def ranking_pair(before: str | os.PathLike | None, after: str | os.PathLike | None,
                 rerank: bool = True) -> tuple[Any, Any] | None:
    """The rank_shift notebook's optional second comparison, read and checked before anything trains.

    ``before`` and ``after`` name top-K files (or folders of them) of two rankings of the same queries; both or
    neither must be set, and with ``rerank=False`` both (there would be nothing to compare). Returns the two
    :class:`~cirlab.core.topk.TopK` or None. Errors name the notebook parameter.
    """
    before, after = before or "", after or ""  # None as "not set", not as a path named "None"
    if not str(before) and not str(after):
        if not rerank:
            raise ParameterError("rerank=False and before/after are empty: nothing to compare (set before and after "
                                 "to two top-K files or folders, or rerank=True)")
        return None
    if not str(before) or not str(after):
        given, missing = ("before", "after") if str(before) else ("after", "before")
        raise ParameterError(f"{given} is set but {missing} is empty: the second comparison needs both rankings")
    loaded = []
    for name, value in (("before", before), ("after", after)):
        try:
            loaded.append(load_topk_files(Path(value).expanduser().resolve()))
        except FileNotFoundError as err:
            raise MissingPathError(f"{name}={str(value)!r}: {err}") from None
        except (OSError, ValueError) as err:  # not a top-K file, or an unreadable one
            raise ParameterError(f"{name}={str(value)!r}: {err}") from None
    from cirlab.workbench.analysis import different_queries

    why = different_queries(*loaded)  # checked here too: before the notebook's later cells run
    if why:
        raise ParameterError(why)
    return loaded[0], loaded[1]


def write_outputs(output_dir: str | os.PathLike, metrics: Mapping[str, Any], config: Mapping[str, Any],
                  merge: bool = True) -> Path:
    """The notebook's result files: ``metrics.json`` (merged into one already there, e.g. the trainer's, when
    ``merge``) and its resolved ``config.json``."""
    from cirlab.core.io import write_json  # plain, strict JSON (core.io.to_plain)

    out = Path(output_dir)
    refuse_foreign_notebook_config(out)
    if "output_dir" not in config:  # the mark refuse_foreign_notebook_config knows a notebook's config.json by
        config = {**config, "output_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if merge and path.is_file() else {}
    except (UnicodeDecodeError, ValueError) as err:  # was json's traceback at the notebook's last cell
        raise ParameterError(f"{path}: not readable as JSON ({err}); the notebook merges its metrics into it: move "
                             "it or choose another output_dir") from None
    merged = {**(old if isinstance(old, dict) else {"previous": old}), **{str(k): v for k, v in metrics.items()}}
    write_json(path, merged)  # atomic: a reader never sees half a metrics.json
    write_json(out / "config.json", config)
    return out


