"""Notebook recipes: the few multi-step calls the notebooks share (train a run, load it, evaluate it, trace it).

Notebooks stay thin (aesthetics rule 22): each cell calls one function here, in :mod:`cirlab.workbench.viz` or in
:mod:`cirlab.workbench.analysis`. The functions compose the engine's parts (``cirlab.models.registry``, ``cirlab.data``,
``cirlab.engine.train``, ``cirlab.core.retrieval``, ``cirlab.core.metrics``, ``cirlab.core.tracing``) in the documented contracts and
add no logic of their own beyond bookkeeping. CIR datasets (Fashion-IQ / Shoes / CIRR layouts) and ITM precomp
datasets (``f30k`` / ``coco``: ``<data_root>/precomp/<name>_precomp/``), including the synthetic data written in them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = ["cir_splits", "is_precomp", "precomp_root", "precomp_split", "run_config", "train_run", "load_run",
           "untrained_copy", "evaluate_run", "evaluate_itm_run", "collect_routes",
           "query_fn_for", "gallery_rows",
           "worst_queries", "load_topk_files", "write_outputs", "ensure_synthetic", "dataset_root"]

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
PRECOMP = ("f30k", "coco")  # ITM datasets in the precomp layout (cirlab.engine.runs.PRECOMP)


def is_precomp(dataset: str) -> bool:
    """True for the ITM precomp datasets (evaluated with ``evaluate_itm``, split names train/dev/test)."""
    return dataset.lower() in PRECOMP


def precomp_root(data_root: str | os.PathLike) -> Path:
    """The folder holding ``<name>_precomp/``: ``data_root/precomp`` when present (the synthetic set), else
    ``data_root`` itself."""
    root = Path(data_root)
    return root / "precomp" if (root / "precomp").is_dir() else root


def precomp_split(split: str) -> str:
    """Precomp data calls the validation split ``dev``: the notebooks' ``"val"`` maps to it."""
    return "dev" if split == "val" else split


def _feature_dim(data_root: str | os.PathLike, dataset: str, split: str = "train") -> int | None:
    """Region-feature size of a precomp split read from the ``.npy`` header (no data loaded); None if absent."""
    import numpy as np

    path = precomp_root(data_root) / f"{dataset.lower()}_precomp" / f"{split}_ims.npy"
    if not path.is_file():
        return None
    return int(np.load(path, mmap_mode="r").shape[-1])


def dataset_root(data_root: str | os.PathLike, dataset: str) -> Path:
    """``data_root/<dataset>`` when ``data_root`` holds several layouts (the synthetic set), else ``data_root``."""
    root = Path(data_root)
    return root / dataset if (root / dataset).is_dir() else root


def ensure_synthetic(data_root: str | os.PathLike | None = None, size: str = "default", seed: int = 0) -> Path:
    """The synthetic CIR/ITM data root (``cirlab.data.generators.synthetic.ensure``: generated only when missing)."""
    from cirlab.data.generators import synthetic

    if data_root and (Path(data_root) / synthetic.MANIFEST).is_file():
        return Path(data_root)  # complete data given by the caller (e.g. cirlab report's cached set): use as is
    return synthetic.ensure(data_root or None, seed=seed, size=size)


def cir_splits(dataset: str, data_root: str | os.PathLike, split: str) -> dict[str, Any]:
    """``{category: CIRSplit}``: Fashion-IQ is evaluated per category, Shoes and CIRR as one split."""
    from cirlab.data import load_cir

    root = dataset_root(data_root, dataset)
    if dataset == "fashioniq":
        return {cat: load_cir(dataset, root, split, category=cat) for cat in _fiq_categories(root, split)}
    loaded = load_cir(dataset, root, split)
    return {loaded.category or dataset: loaded}


def _fiq_categories(root: Path, split: str) -> list[str]:
    found = sorted({p.name.split(".")[1] for p in (root / "captions").glob(f"cap.*.{split}.json")})
    return found or list(FIQ_CATEGORIES)


def run_config(model: str, preset: str, dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike,
               *, epochs: int = 1, max_steps: int = 0, batch_size: int = 0, lr: float = 0.0, device: str = "cpu",
               seed: int = 0, resume: str = "", eval_split: str = "val", log_every: int = 10,
               settings: Sequence[str] = ()) -> dict[str, Any]:
    """The ``cirlab train`` config (``cirlab.engine.runs`` schema) for the notebook parameters.

    ``settings`` are ``section.key=value`` overrides applied last, exactly as ``cirlab train --set`` applies them
    (e.g. ``["train.lr=1e-3", "model_overrides.image_size=32"]``).

    Zero means "the model's paper default" for ``max_steps`` (no cap), ``batch_size`` and ``lr``. Precomp datasets
    (f30k/coco) read ``<data_root>/precomp``, validate on ``dev`` (for ``eval_split="val"``) and set the model's
    ``img_dim`` to the features' size when the model has one (the tiny preset's 64 would not fit 2048-d features).
    """
    from cirlab.engine.runs import DEFAULTS, _merge, apply_overrides, parse_set

    train: dict[str, Any] = {"epochs": epochs, "device": device, "seed": seed, "log_every": log_every,
                             "progress": "log", "selection": "val"}
    train.update({k: v for k, v in {"max_steps": max_steps, "batch_size": batch_size, "lr": lr}.items() if v})
    if resume:
        train["resume"] = resume
    overrides: dict[str, Any] = {}
    if is_precomp(dataset):
        eval_split = precomp_split(eval_split)
        ds = {"name": dataset, "root": str(precomp_root(data_root)), "val_split": eval_split}
        dim = _feature_dim(data_root, dataset)
        if dim is not None and _has_field(model, "img_dim"):
            overrides["img_dim"] = dim
    else:
        ds = {"name": dataset, "root": str(dataset_root(data_root, dataset)), "val_split": eval_split}
    config = _merge(DEFAULTS, {"name": Path(output_dir).name, "model": model, "preset": preset, "dataset": ds,
                               "model_overrides": overrides, "train": train,
                               "eval": {"splits": [eval_split], "k": 10}, "output_dir": str(output_dir)})
    return apply_overrides(config, parse_set(list(settings)))


def _has_field(model: str, field: str) -> bool:
    import dataclasses

    from cirlab.models.registry import get_entry

    cls = get_entry(model).config_cls
    return dataclasses.is_dataclass(cls) and field in {f.name for f in dataclasses.fields(cls)}


def train_run(model: str, preset: str, dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike,
              **options: Any) -> dict[str, Any]:
    """Train a registered model through the same path as ``cirlab train`` (:func:`cirlab.engine.runs.run_experiment`).

    ``options`` are :func:`run_config`'s. Returns the run's ``metrics.json`` contents plus ``best_score``,
    ``best_epoch`` and ``run_config`` (the resolved config, with ``model_config``).
    """
    import yaml

    from cirlab.engine.runs import run_experiment, validate_config

    config = run_config(model, preset, dataset, data_root, output_dir, **options)
    validate_config(config, "notebook parameters")
    result = run_experiment(config, output_dir=output_dir)
    resolved = yaml.safe_load((Path(output_dir) / "config.yaml").read_text())
    return {**result, "best_score": result["selection"]["best_score"], "best_epoch": result["selection"]["best_epoch"],
            "run_config": resolved}


def load_run(run_dir: str | os.PathLike, device: str = "cpu", checkpoint: str = "best") -> Any:
    """A run's model with ``checkpoints/<checkpoint>.pt`` loaded (falls back to ``last``), in eval mode."""
    import yaml

    from cirlab.engine.runs import model_from_checkpoint

    run = Path(run_dir)
    ckpt = run / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'} (train the run first)")
    model, _ = model_from_checkpoint(ckpt)
    cfg_path = run / "config.yaml"
    model.run_config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return model.to(device).eval()


def untrained_copy(run_dir: str | os.PathLike, dataset: str, data_root: str | os.PathLike, device: str = "cpu",
                   seed: int = 0) -> Any:
    """A freshly initialised model with a run's exact config (and the same training vocabulary): a baseline."""
    import torch

    from cirlab.models.registry import create_model
    from cirlab.engine.runs import DEFAULTS, _merge, fit_to_training_data

    trained = load_run(run_dir)
    torch.manual_seed(seed)
    model = create_model(trained.model_name, config=trained.config)
    config = _merge(DEFAULTS, trained.run_config or {"model": trained.model_name,
                                                     "dataset": {"name": dataset,
                                                                 "root": str(dataset_root(data_root, dataset))}})
    fit_to_training_data(model, config)  # the same vocabulary as the trained run, built the same way
    return model.to(device).eval()


def evaluate_run(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", k: int = 50,
                 device: str = "cpu", topk_dir: str | os.PathLike | None = None,
                 name: str = "") -> tuple[dict[str, float], dict[str, Any]]:
    """Protocol metrics and the top-K lists per category, dispatched on ``model.task``.

    CIR models: ``cirlab.engine.evaluate.evaluate_cir``; top-K files go to ``topk_dir/<split>[_<category>].topk.npz`` when
    given (a temporary folder otherwise). ITM models on precomp data: :func:`evaluate_itm_run` (i2t/t2i R@1/5/10
    and rsum; no top-K files, so the dict is empty). Returns ``(metrics, {category: TopK})``.
    """
    import tempfile

    if getattr(model, "task", "cir") == "itm":
        return evaluate_itm_run(model, dataset, data_root, split, device=device), {}

    from cirlab.engine.evaluate import evaluate_cir
    from cirlab.core.topk import load_topk

    splits = cir_splits(dataset, data_root, split)
    named = {(f"{split}_{cat}" if dataset == "fashioniq" else split): sp for cat, sp in splits.items()}
    was_training = model.training
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(topk_dir) if topk_dir is not None else Path(tmp)
        result = evaluate_cir(model, named, protocol=dataset, device=device, k=k, topk_path=out,
                              meta={"model": name or getattr(model, "model_name", "")})
        topks = {cat: load_topk(out / f"{key}.topk.npz") for key, cat in zip(named, splits)}
    model.train(was_training)
    metrics = dict(result["metrics"])
    metrics["rsum"] = sum(v for key, v in metrics.items() if "R@" in key and not key.startswith("avg"))
    return metrics, topks


def evaluate_itm_run(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val",
                     device: str = "cpu", shard_size: int = 1000) -> dict[str, float]:
    """ITM metrics (``cirlab.engine.evaluate.evaluate_itm``) of a model on a precomp split: ``i2t_R@1/5/10``,
    ``t2i_R@1/5/10`` and ``rsum``. ``"val"`` means the precomp ``dev`` split; coco is scored with the 5K protocol."""
    from cirlab.data import load_precomp
    from cirlab.engine.evaluate import evaluate_itm

    if not is_precomp(dataset):
        raise ValueError(f"evaluate_itm_run: {dataset!r} is not a precomp ITM dataset ({', '.join(PRECOMP)})")
    loaded = load_precomp(precomp_root(data_root), dataset.lower(), precomp_split(split), dim=None)
    was_training = model.training
    result = evaluate_itm(model, loaded, protocol="coco5k" if dataset.lower() == "coco" else "f30k",
                          shard_size=shard_size, device=device)
    model.train(was_training)
    return {k: float(v) for k, v in result["metrics"].items()}


def collect_routes(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", n: int = 100,
                   device: str = "cpu") -> tuple[Any, dict[Any, str]]:
    """Trace the router on up to ``n`` queries spread over the categories: ``(route frame, {query_id: text})``.

    CIR data goes through ``encode_query``; ITM precomp data (DIME) scores each caption with its own image.
    """
    import pandas as pd

    from cirlab.engine.evaluate import collect_routes as trace_split

    if getattr(model, "task", "cir") == "itm":
        from cirlab.data import load_precomp

        sp = load_precomp(precomp_root(data_root), dataset.lower(), precomp_split(split), dim=None)
        frame = _with_caption_types(_trace_itm(model, sp, n, device), sp)
        texts = {q: sp.captions[int(q)] for q in dict.fromkeys(frame["query_id"])} if not frame.empty else {}
        return _checked(_main_layers(frame), model), texts
    splits = cir_splits(dataset, data_root, split)
    per = max(1, n // len(splits))
    frames = [trace_split(model, sp, per, device=device) for sp in splits.values()]
    texts = {t.query_id: t.text for sp in splits.values() for t in sp.triplets}
    frame = _main_layers(pd.concat(frames, ignore_index=True))
    return _checked(frame, model), {q: texts[q] for q in dict.fromkeys(frame["query_id"])}


def _trace_itm(model: Any, split: Any, n: int, device: str) -> Any:
    """Trace the first ``n`` captions, each scored with its own image; one model call per image (all of its
    captions at once: every pair in that call is a matching pair), query id = caption index.

    Batched per image rather than per pair (``cirlab.engine.evaluate.collect_routes``) because one call per pair costs
    the text encoder and routing cells once per caption and dominates the notebook's run time on CPU."""
    import torch

    from cirlab.core.tracing import trace_routes

    model.eval()
    count = min(n, len(split.captions))
    by_image: dict[int, list[int]] = {}
    for k in range(count):
        by_image.setdefault(int(split.image_of_caption(k)), []).append(k)
    score = getattr(model, "score", None) or (lambda im, tx: im @ tx.T)
    with torch.no_grad(), trace_routes(model) as trace:
        for i, caps in by_image.items():
            trace.set_batch(ids=caps)
            image = model.encode_image(split.features(i)[None].to(device))
            score(image, model.encode_text([split.captions[k] for k in caps]))
    frame = trace.to_frame()
    if not frame.empty:  # the model's own image_id/caption_id are batch-local; the data's indices are these
        frame["caption_id"] = frame["query_id"].astype(int)
        frame["image_id"] = [int(split.image_of_caption(int(k))) for k in frame["query_id"]]
    return frame


def _with_caption_types(frame: Any, split: Any) -> Any:
    """Give ITM route records a ``category``: the caption's type when the data's meta file lists it (the synthetic
    set's ``synthetic_meta.json``: full, color, shape, layout, relation), else ``caption <k>``, its slot among the
    image's captions."""
    if frame.empty or "caption_id" not in frame.columns:
        return frame
    meta = Path(getattr(split, "ims_path", "")).parent.parent / "synthetic_meta.json"
    types: list[str] = []
    if meta.is_file():
        types = list(json.loads(meta.read_text()).get("caption_type", {}).get(getattr(split, "split", ""), []))
    cpi = int(getattr(split, "im_div", 5))
    idx = frame["caption_id"].astype(int)
    frame = frame.copy()
    frame["category"] = [types[k] if k < len(types) else f"caption {k % cpi}" for k in idx]
    return frame


def _checked(frame: Any, model: Any) -> Any:
    if frame.empty:
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)} emitted no router records")
    return frame


def query_fn_for(model: Any, dataset: str, data_root: str | os.PathLike, split: str = "val", k: int = 5,
                 device: str = "cpu") -> Any:
    """``query_fn(query_id, text)`` for :class:`cirlab.workbench.widgets.RouterExplorer` over every category of a CIR split
    (None for ITM models, whose explorer shows the traced paths only)."""
    if getattr(model, "task", "cir") != "cir":
        return None
    from cirlab.workbench.widgets import make_query_fn

    transform = model.image_transform(False)
    per_cat = {cat: make_query_fn(model, sp, transform, k=k, device=device)
               for cat, sp in cir_splits(dataset, data_root, split).items()}
    owner = {t.query_id: cat for cat, sp in cir_splits(dataset, data_root, split).items() for t in sp.triplets}

    def query_fn(query_id: Any, text: str) -> dict[str, Any]:
        if query_id not in owner:
            raise KeyError(f"query {query_id!r} is not in the {dataset} {split} split")
        return per_cat[owner[query_id]](query_id, text)

    return query_fn


def _main_layers(frame: Any) -> Any:
    """Drop diagnostic layers (DIME's ``*_raw`` pre-normalisation paths): plots show what the model used."""
    return frame[~frame["layer"].astype(str).str.endswith("_raw")].reset_index(drop=True)


def gallery_rows(topk: Any, split: Any, query_ids: Sequence[str] | None = None, k: int = 5,
                 n: int = 4) -> list[dict[str, Any]]:
    """Rows for :func:`cirlab.workbench.viz.plot_retrieval_gallery` from a top-K file and its split (images from disk)."""
    by_id = {t.query_id: t for t in split.triplets}
    row_of = {q: i for i, q in enumerate(topk.query_ids)}
    ids = list(query_ids) if query_ids is not None else list(topk.query_ids[:n])
    rows = []
    for qid in ids:
        i, trip = row_of[str(qid)], by_id[str(qid)]
        cands = list(topk.gallery_ids[i, :k])
        target = trip.target_name
        rows.append({"query_id": qid, "ref_image": split.image_path(trip.ref_name), "text": trip.text,
                     "candidates": [split.image_path(c) for c in cands], "candidate_ids": cands,
                     "scores": list(topk.scores[i, :k]), "target_rank": int(topk.target_rank[i]),
                     "target_position": cands.index(target) if target in cands else None})
    return rows


def worst_queries(topk: Any, n: int = 4) -> list[str]:
    """Query ids whose target ranks worst (known targets only)."""
    import numpy as np

    known = np.flatnonzero(topk.target_rank > 0)
    order = known[np.argsort(-topk.target_rank[known], kind="stable")]
    return [str(q) for q in topk.query_ids[order[:n]]]


def load_topk_files(path: str | os.PathLike) -> Any:
    """One top-K file, or every ``*.topk.npz`` in a folder concatenated (e.g. the Fashion-IQ categories)."""
    import numpy as np

    from cirlab.core.topk import TopK, load_topk

    path = Path(path)
    if path.is_file():
        return load_topk(path)
    files = sorted(path.glob("*.topk.npz")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no top-K file at {path} (expected a .topk.npz file or a folder of them)")
    parts = [load_topk(f) for f in files]
    k = min(p.k for p in parts)
    return TopK(np.concatenate([p.query_ids for p in parts]), np.concatenate([p.gallery_ids[:, :k] for p in parts]),
                np.concatenate([p.scores[:, :k] for p in parts]), np.concatenate([p.target_rank for p in parts]),
                np.concatenate([p.category for p in parts]), np.concatenate([p.target_ids for p in parts]),
                {"files": [str(f) for f in files], **parts[0].meta})


def write_outputs(output_dir: str | os.PathLike, metrics: Mapping[str, Any], config: Mapping[str, Any],
                  merge: bool = True) -> Path:
    """The notebook's result files: ``metrics.json`` (merged into one already there, e.g. the trainer's, when
    ``merge``) and its resolved ``config.json``."""
    from cirlab.engine.runs import _write_json
    from cirlab.engine.train import to_plain

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    old = json.loads(path.read_text()) if merge and path.is_file() else {}
    merged = {**(old if isinstance(old, dict) else {"previous": old}), **to_plain(metrics)}
    _write_json(path, merged)  # atomic: a reader never sees half a metrics.json
    _write_json(out / "config.json", to_plain(config))
    return out


