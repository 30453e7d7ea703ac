"""Evaluation runners: protocol metrics plus per-query ranks for CIR and ITM models, and route collection.

::

    out = evaluate_cir(model, [load_cir("fashioniq", root, "val", category=c) for c in FIQ_CATEGORIES],
                       batch_size=64, device="cuda", topk_path="runs/amc/topk")
    out["metrics"]        # {"dress_R@10": ..., "avg_R@10": ..., "avg": ...}  (cirlab.core.metrics keys)
    out["ranks"]["val_dress"]   # 1-based target rank per query (0 = no ground truth)

    out = evaluate_itm(model, load_precomp(root, "coco", "testall"), protocol="coco1k")

Protocols come from :mod:`cirlab.core.metrics` and the split itself: a :class:`~cirlab.data.CIRSplit` says whether its
protocol removes the query's reference from the ranking (``exclude_reference``); Fashion-IQ is reported per
category, Shoes as one set, CIRR with Recall_subset over the ``img_set`` members.

Under ``torchrun`` every process encodes a shard of the queries and of the gallery, and the features are gathered so
that every process computes the same metrics (evaluation gathered across processes, as training is).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cirlab.core.config import whole_number
from cirlab.core.contracts import (CIRModel, HasGalleryScorer, HasImageTransform, ITMModel, model_label,
                                    require_model)
from cirlab.core.errors import ConfigError, InputError, ModelContractError, ModelMismatchError
from cirlab.data.catalog import DATASETS, ITM_PROTOCOLS
from cirlab.engine.train import refuse_low_precision_weights, to_device, worker_loader

logger = logging.getLogger(__name__)

# the protocols the catalog's datasets are scored with (cirlab.data.catalog decides them)
CIR_PROTOCOLS = tuple(dict.fromkeys(p for spec in DATASETS.values() if not spec.is_itm for p in spec.protocols))


# ----------------------------------------------------------------------------------------------- encoding
def ordered_loader(dataset: Any, batch_size: int, num_workers: int = 0) -> Any:
    """A DataLoader over ``dataset`` in order, drawing its worker seed from its own generator: each iteration of a
    loader without one takes a number from torch's global generator, so an evaluation changed what the caller's
    next ``torch.rand`` gave after ``torch.manual_seed``. Its workers leave the stop signals to this process, as
    the training loader's do, and their errors reach the caller as themselves (:func:`~cirlab.engine.train.
    worker_loader`)."""
    import torch

    return worker_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         generator=torch.Generator())


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _concat(parts: list[Any]) -> Any:
    """Concatenate batch outputs along dim 0: tensors, or tuples/lists/dicts of tensors (e.g. word + sentence)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}

    raise ModelContractError(f"cannot concatenate encoder outputs of type {type(first).__name__} (an encoder returns "
                             "tensors, or tuples, lists or dicts of them)")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


@torch.no_grad()
def encode_dataset(fn: Callable[[dict[str, Any]], Any], dataset: Any, *, batch_size: int, device: Any = "cpu",
                   num_workers: int = 0, indices: Sequence[int] | None = None, gather: bool = True) -> Any:
    """``fn(batch)`` over ``dataset`` (or ``indices`` of it) in order; outputs concatenated on the CPU.

    Under DDP (and ``gather``), each process encodes every world_size-th item and the shards are all-gathered
    back into dataset order, so every process returns the full result.
    """
    idx = list(range(len(dataset))) if indices is None else list(indices)
    rank, world = _world() if gather else (0, 1)
    mine = idx[rank::world]
    subset = torch.utils.data.Subset(dataset, mine)
    loader = ordered_loader(subset, batch_size, num_workers)
    parts = [_to_cpu(fn(to_device(batch, device))) for batch in loader]
    local = _concat(parts) if parts else None
    if world == 1:
        return local
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return _interleave(gathered, world, len(idx))


def _interleave(shards: list[Any], world: int, n: int) -> Any:
    """Undo the rank::world split: item i came from shard i % world, at position i // world."""
    per = (n + world - 1) // world
    ref = next(s for s in shards if s is not None)
    empty = _index_rows(ref, torch.zeros(0, dtype=torch.long))  # a process that had no items
    stacked = _concat([_pad_rows(s if s is not None else empty, per) for s in shards])
    order = torch.tensor([(i % world) * per + i // world for i in range(n)], dtype=torch.long)
    return _index_rows(stacked, order)


def _pad_rows(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        missing = rows - value.shape[0]
        return torch.cat([value, value.new_zeros((missing, *value.shape[1:]))]) if missing > 0 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_pad_rows(v, rows) for v in value)
    return {k: _pad_rows(v, rows) for k, v in value.items()}


def _index_rows(value: Any, order: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[order]
    if isinstance(value, (tuple, list)):
        return type(value)(_index_rows(v, order) for v in value)
    return {k: _index_rows(v, order) for k, v in value.items()}


# ----------------------------------------------------------------------------------------------- CIR


def _split_key(split: Any) -> str:
    return f"{split.split}_{split.category}" if getattr(split, "category", None) else str(split.split)


def _as_split_dict(split_or_splits: Any) -> dict[str, Any]:
    given = split_or_splits.values() if isinstance(split_or_splits, Mapping) else split_or_splits \
        if isinstance(split_or_splits, (list, tuple)) else [split_or_splits]
    for split in given:
        if not hasattr(split, "triplets"):  # a split's name ("val") or a precomp split, deep in the scoring before
            raise ModelMismatchError(f"evaluate_cir: {split!r} is a {type(split).__name__}, not a CIR split "
                                     "(cirlab.data.load_cir(dataset, root, split))")
    if isinstance(split_or_splits, Mapping):
        return dict(split_or_splits)
    splits = split_or_splits if isinstance(split_or_splits, (list, tuple)) else [split_or_splits]
    out = {}
    for split in splits:
        key = _split_key(split)
        if key in out:
            raise InputError(f"two splits share the name {key!r}; pass a dict name -> split")
        out[key] = split
    return out


def _infer_protocol(splits: dict[str, Any], protocol: str | None) -> str:
    """The splits' dataset is their protocol; a ``protocol`` naming another dataset is refused (Shoes' metrics on
    Fashion-IQ splits were computed and labelled as Shoes without a word)."""
    names = {getattr(s, "dataset", None) for s in splits.values()}
    if protocol is not None and len(names) == 1 and next(iter(names)) in CIR_PROTOCOLS and protocol not in names:
        raise ConfigError(f"protocol={protocol!r}, but the splits are {next(iter(names))} splits: leave protocol "
                          "out to use theirs")
    if protocol is None:
        if len(names) != 1 or next(iter(names)) not in CIR_PROTOCOLS:
            raise InputError(f"cannot infer the protocol from datasets {sorted(map(str, names))}; pass protocol=")
        protocol = next(iter(names))
    if protocol not in CIR_PROTOCOLS:
        raise InputError(f"unknown CIR protocol {protocol!r}; known: {', '.join(CIR_PROTOCOLS)}")
    return protocol


def cir_transform(model: Any, transform: Any) -> Any:
    """The image transform of a CIR evaluation: the caller's, else the model's eval transform, else the split's."""
    if transform is not None:
        return transform
    if isinstance(model, HasImageTransform):
        return model.image_transform(False)
    return None  # the split's default transform


def model_device(model: Any, device: Any = None) -> Any:
    """The device an evaluation feeds ``model`` on: ``device`` as given (a name is checked, ``"auto"`` is this
    process's GPU when there is one: :func:`cirlab.engine.train.resolve_device`), or, for None, the device its
    weights are on (CPU for a model without any). The default was ``"cpu"``: a model ``cirlab.fit`` had trained on
    a GPU was fed CPU batches. The model is not moved: put it on ``device`` first."""
    from cirlab.engine.train import resolve_device

    if device is None:
        weights = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        return weights.device if weights is not None else torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device, "device")


@torch.no_grad()
def score_split(model: Any, split: Any, *, transform: Any = None, batch_size: int = 64, device: Any = None,
                num_workers: int = 0, cache_dir: Any = None) -> torch.Tensor:
    """[Q, G] query x gallery scores of one split (CPU float32): query embeddings times gallery features, or the
    model's own pair scorer over the gallery features (:class:`HasGalleryScorer`). What :func:`evaluate_cir` ranks,
    for metrics of one's own (rows: ``split.triplets``; columns: ``split.gallery_names``); ``transform`` as there.
    The model is used as it is (call ``model.eval()`` first); ``device`` as :func:`model_device`."""
    refuse_low_precision_weights(model, "score_split")
    device = model_device(model, device)
    transform = cir_transform(model, transform)
    queries = split.query_dataset(transform)
    g = _encode_gallery(model, split, split.gallery_dataset(transform), batch_size=batch_size, device=device,
                        num_workers=num_workers, cache_dir=cache_dir)
    scorer = model.gallery_scorer() if isinstance(model, HasGalleryScorer) else None
    if scorer is not None:
        on_device = g.to(device)
        return encode_dataset(lambda b: scorer(b["ref_image"], b["text"], on_device), queries,
                              batch_size=batch_size, device=device, num_workers=num_workers).float()
    q = encode_dataset(lambda b: model.encode_query(b["ref_image"], b["text"]), queries, batch_size=batch_size,
                       device=device, num_workers=num_workers)
    _check_embeddings(model, q, g)
    return q.float() @ g.float().T


def _check_embeddings(model: Any, queries: Any, gallery: Any) -> None:
    """``encode_query`` and ``encode_target`` give [N, D] tensors of one width D (the contract's dot-product
    retrieval); otherwise the product failed as torch's "mat1 and mat2 shapes cannot be multiplied"."""
    from cirlab.core.errors import ModelContractError

    for what, value in (("encode_query", queries), ("encode_target", gallery)):
        if not (torch.is_tensor(value) and value.ndim == 2):
            shape = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise ModelContractError(f"{type(model).__name__}.{what} gave {shape}; the CIR contract's encoders give "
                                     "[batch, dim] tensors")
    if queries.shape[1] != gallery.shape[1]:
        raise ModelContractError(f"{type(model).__name__}: encode_query gives {queries.shape[1]}-d vectors and "
                                 f"encode_target {gallery.shape[1]}-d ones; retrieval scores their dot products")


def _encode_gallery(model: Any, split: Any, gallery: Any, *, batch_size: int, device: Any, num_workers: int,
                    cache_dir: Any) -> torch.Tensor:
    if cache_dir is None or _world()[1] > 1:
        return encode_dataset(lambda b: model.encode_target(b["image"]), gallery, batch_size=batch_size,
                              device=device, num_workers=num_workers)
    from cirlab.core import retrieval

    key = retrieval.cache_key(retrieval.state_dict_digest(model), *_encoder_identity(model, gallery), split.dataset,
                              split.root, split.split, split.category, len(gallery), "encode_target",
                              getattr(split, "image_read", "viewer"), _autocast_state(device))
    loader = ordered_loader(gallery, batch_size, num_workers)
    return retrieval.encode_corpus(model.encode_target, loader, device=device, key="image", index_key="gallery_idx",
                                   cache_dir=cache_dir, cache_key=key, progress=False)


def _autocast_state(device: Any) -> str:
    """The caller's autocast for ``device``'s type: gallery features encoded under bf16 autocast differ from fp32
    ones (by ~5e-3 in the scores), and an fp32 evaluation read them from the cache as if they were its own."""
    from cirlab.core._search import autocast_dtype

    dtype = autocast_dtype(torch.device(device).type)
    return "autocast off" if dtype is None else f"autocast {str(dtype).removeprefix('torch.')}"


def _encoder_identity(model: Any, gallery: Any) -> tuple[str, str, str]:
    """What decides the gallery features besides the weights: the model's class, its config (a pooling flag or an
    image size changes ``encode_target``, not the state dict) and the image transform, taken as the digest of the
    first gallery image it gives (a transform's repr names functions by memory address, and says nothing of a
    user's own class)."""
    from cirlab.core.featcache import tensor_digest

    config = getattr(model, "config", None)
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str) if hasattr(config, "to_dict") else ""
    first = gallery[0]["image"] if len(gallery) else None
    return (f"{type(model).__module__}.{type(model).__qualname__}", settings,
            tensor_digest(first) if torch.is_tensor(first) else "")


def _ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """1-based target ranks (0 where the target is unknown; G + 1 where it was removed with the reference)."""
    from cirlab.core.metrics import target_ranks

    ranks = torch.zeros(len(target), dtype=torch.long)
    known = target >= 0
    if known.any():
        ex = exclude[known] if exclude is not None else None
        ranks[known] = target_ranks(known_rows(scores, known), target[known], ex).cpu()
    return ranks


def known_rows(t: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``t[known]``, without its copy when every row is known (every val split): a boolean index copies the
    whole [Q, G] score matrix (6K x 15K: 343 MB) for the ranking that then reads it in chunks."""
    return t if bool(known.all()) else t[known]


def _metric_ranks(ranks: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    from cirlab.core.metrics import removed_targets_missed

    return removed_targets_missed(ranks, target, exclude)[target >= 0]


def evaluate_cir(model: Any, split_or_splits: Any, protocol: str | None = None, *, batch_size: int = 64,
                 device: Any = None, k: int = 50, topk_path: str | os.PathLike | None = None,
                 transform: Any = None, num_workers: int = 0, cache_dir: str | os.PathLike | None = None,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a CIR model (``encode_query``/``encode_target``) on one split or several (Fashion-IQ categories).

    Args:
        model: a CIR model; put in eval mode here (and left so).
        split_or_splits: a ``CIRSplit``, a list of them (named ``<split>_<category>``) or a dict name -> split.
        protocol: "fashioniq" | "shoes" | "cirr"; None = the splits' dataset. Whether the reference is removed
            from its own ranking follows each split's ``exclude_reference``.
        batch_size: encoding batch size.
        device: where the model runs (:func:`model_device`: by default where its weights are).
        k: list length of the top-K file (at most the candidates a query ranks; 0 when none is left).
        topk_path: write top-K results: a ``.npz`` file (all splits in one file) or a folder (one
            ``<split>[_<category>].topk.npz`` per split). A target removed with its reference has the rank
            :func:`cirlab.core.metrics.removed_targets_missed` gives there (past every cut-off), not ``G + 1``.
        transform: image transform (default: ``model.image_transform(False)`` if the model has one).
        num_workers: DataLoader workers.
        cache_dir: cache gallery features there (keyed by the weights, the model class and config, the image
            transform (its output on the first gallery image), dataset, split and size).
        meta: extra entries for the top-K files' ``meta`` (model name, checkpoint, ...).

    Returns:
        ``{"metrics": {...}, "ranks": {name: int64 array}, "query_ids": {name: list}, "topk_paths": [...]}``;
        ranks are 1-based over the full gallery, 0 where the split has no ground truth (CIRR test1), and
        ``G + 1`` where the target is the query's own reference and the protocol removes it (a miss at every K,
        :func:`cirlab.core.metrics.removed_targets_missed`). The score matrix itself: :func:`score_split`.
    """
    from cirlab.core import metrics as M

    require_model(model, CIRModel, "evaluate_cir", hint="a stage-II re-ranker is evaluated over stage I's top-K "
                  "(cirlab eval RUN, workbench.evaluate_run)" if getattr(model, "task", None) == "rerank" else
                  "evaluate_itm scores image-text matching models")
    refuse_low_precision_weights(model, "evaluate_cir")
    whole_number(k, "k")
    whole_number(batch_size, "batch_size")
    splits = _as_split_dict(split_or_splits)
    protocol = _infer_protocol(splits, protocol)
    for split in splits.values():  # no queries: the encoders got nothing to encode, and the model was blamed
        if not split.triplets:
            category = f" (category {split.category})" if split.category else ""
            from cirlab.data.base import no_queries_reason

            raise InputError(f"evaluate_cir: split {split.split!r}{category} has no queries "
                             f"({no_queries_reason(split.dataset)}); check the data with `cirlab data check`")
    model.eval()
    transform = cir_transform(model, transform)
    per_split: dict[str, dict[str, Any]] = {}
    for name, split in splits.items():
        scores = score_split(model, split, transform=transform, batch_size=batch_size, device=device,
                              num_workers=num_workers, cache_dir=cache_dir)
        target = torch.tensor(split.target_indices(), dtype=torch.long)
        exclude = torch.tensor(split.ref_indices(), dtype=torch.long) if split.exclude_reference else None
        ranks = _ranks(scores, target, exclude)
        if (target >= 0).any():  # a split without ground truth (CIRR test1) has no recall to be trivial
            _say_trivial_cutoffs(name, protocol, candidates_per_query(split), _metric_ranks(ranks, target, exclude))
        per_split[name] = {"split": split, "scores": scores, "target": target, "exclude": exclude, "ranks": ranks}
        logger.info("evaluated %s: %d queries x %d gallery images", name, scores.shape[0], scores.shape[1])
    result = {"metrics": _cir_metrics(protocol, per_split, M),
              "ranks": {n: v["ranks"].numpy() for n, v in per_split.items()},
              "query_ids": {n: [t.query_id for t in v["split"].triplets] for n, v in per_split.items()},
              "topk_paths": []}
    if topk_path is not None and _world()[0] == 0:
        base = {"model": model_label(model), "protocol": protocol, **(meta or {})}
        result["topk_paths"] = _write_topk(per_split, Path(topk_path), k, base)
    return result


_SAID_TRIVIAL: set[tuple[str, str, int, float]] = set()


def candidates_per_query(split: Any) -> int:
    """How many gallery items each query of ``split`` ranks: the reference is removed from its own ranking when the
    protocol excludes it. The length a full top-K list of the split has (what stage II can re-rank at most)."""
    return len(split.gallery_names) - (1 if split.exclude_reference else 0)


def _say_trivial_cutoffs(name: str, protocol: str, candidates: int, metric_ranks: torch.Tensor) -> None:
    """A recall cut-off at or past the number of candidates a query ranks is the same for any model (a small gallery
    of one's own data, the tiny synthetic sets): said, so that its value is not read as a result.

    ``metric_ranks`` are the ranks the metrics read (:func:`_metric_ranks`): a target removed with its reference
    is a miss there, so the value for any model is the share of the other targets, not always 100."""
    from cirlab.core import metrics as M

    ks = M.RECALL_KS.get(protocol, ())
    trivial = [f"R@{k}" for k in ks if k >= candidates]
    value = 100.0 * float((metric_ranks <= candidates).double().mean()) if len(metric_ranks) else 0.0
    key = (name, protocol, candidates, value)
    if not trivial or key in _SAID_TRIVIAL:  # once: a run evaluates the split each epoch
        return
    _SAID_TRIVIAL.add(key)
    verb = "is" if len(trivial) == 1 else "are"
    removed = int((metric_ranks > candidates + 1).sum())  # past the whole gallery: removed with the reference
    if removed == 0:
        logger.warning("%s: %s %s 100 for any model: each query ranks %d candidates, so every target is within "
                       "them (a larger gallery makes %s mean something)", name, ", ".join(trivial), verb,
                       candidates, "it" if len(trivial) == 1 else "them")
        return
    if removed == len(metric_ranks):
        logger.warning("%s: %s %s 0 for any model: every query's target is its own reference, removed from the "
                       "ranking with it (a miss at every cut-off)", name, ", ".join(trivial), verb)
        return
    logger.warning("%s: %s %s %.4g for any model: each query ranks %d candidates, so every target is within them "
                   "but for the %d of %d queries whose target is their own reference, removed from the ranking with "
                   "it (a miss at every cut-off)", name, ", ".join(trivial), verb, value, candidates, removed,
                   len(metric_ranks))


def cir_protocol_metrics(protocol: str, ranks: dict[str, torch.Tensor],
                         subset_ranks: torch.Tensor | None = None) -> dict[str, float]:
    """The CIR protocols' metric functions, the one dispatch on a protocol name: Fashion-IQ takes ranks per
    category (``{category: ranks}``), Shoes and CIRR the ranks of one split (CIRR also its subset ranks)."""
    from cirlab.core import metrics as M

    if protocol == "fashioniq":
        return M.fashioniq_metrics(ranks)
    if protocol not in CIR_PROTOCOLS:
        raise InputError(f"unknown CIR protocol {protocol!r}; known: {', '.join(CIR_PROTOCOLS)}")
    if len(ranks) != 1:
        raise InputError(f"protocol {protocol!r} takes one split, got {sorted(ranks)}")
    (only,) = ranks.values()
    if protocol == "shoes":
        return M.shoes_metrics(only)
    return M.cirr_metrics_from_ranks(only, only if subset_ranks is None else subset_ranks)


def metric_names(protocol: str, categories: Sequence[str] = ()) -> set[str]:
    """The metric keys ``protocol`` reports (for the given Fashion-IQ categories), read off the protocol's own
    metric function on placeholder ranks: what model selection may ask for."""
    from cirlab.core import metrics as M

    if protocol in ITM_PROTOCOLS:
        names = set(M.itm_metrics(torch.zeros(5, 25)))  # every ITM protocol reports these per matrix or fold
        return {f"{size}_{k}" for size in ("1k", "5k") for k in names} if protocol == "coco" else names
    one = torch.ones(1, dtype=torch.long)
    keys = list(categories) if protocol == "fashioniq" else ["split"]
    return set(cir_protocol_metrics(protocol, {k: one for k in keys}))


def say_no_targets(names: Sequence[str]) -> None:
    """The evaluation of splits without ground truth (CIRR test1, Fashion-IQ test: their labels are the benchmark's
    evaluation server's) gives rankings only: what it is for, said as such (a warning read as a failure)."""
    logger.info("%s: no ground-truth targets (a test split: its labels are the evaluation server's), so no metrics, "
                "only the rankings", ", ".join(names))


def _cir_metrics(protocol: str, per_split: dict[str, dict[str, Any]], M: Any) -> dict[str, float]:
    scored = {n: v for n, v in per_split.items() if bool((v["target"] >= 0).any())}
    if not scored:
        say_no_targets(list(per_split))
        return {}
    ranks = {(v["split"].category or n if protocol == "fashioniq" else n):
             _metric_ranks(v["ranks"], v["target"], v["exclude"]) for n, v in scored.items()}
    subset = None
    if protocol == "cirr" and len(scored) == 1:
        (v,) = scored.values()
        known = v["target"] >= 0
        members = pad_members(v["split"].member_indices())[known]
        reference = torch.tensor(v["split"].ref_indices(), dtype=torch.long)[known]
        subset = M.cirr_subset_ranks(known_rows(v["scores"], known), v["target"][known], reference, members)
    return cir_protocol_metrics(protocol, ranks, subset)


def pad_members(members: list[list[int]]) -> torch.Tensor:
    """CIRR's subset members as one [Q, width] index tensor, short rows padded with -1 (no gallery item)."""
    width = max((len(m) for m in members), default=0)
    return torch.tensor([m + [-1] * (width - len(m)) for m in members], dtype=torch.long).reshape(len(members), width)


def _write_topk(per_split: dict[str, dict[str, Any]], path: Path, k: int, base: dict[str, Any]) -> list[str]:
    from cirlab.core.metrics import removed_targets_missed
    from cirlab.core.retrieval import make_topk
    from cirlab.core.topk import TopK, save_topk

    files: dict[str, TopK] = {}
    for name, v in per_split.items():
        split, scores = v["split"], v["scores"]
        top_scores, top_idx = _top_lists(scores, min(k, candidates_per_query(split)), v["exclude"])
        # the file's readers (stage II, the workbench) compare ranks with a cut-off as the metrics do: a target
        # removed with its reference gets the metrics' never-a-hit rank, not G + 1 (a hit at any K past G)
        ranks = removed_targets_missed(v["ranks"], v["target"], v["exclude"])
        files[name] = make_topk(top_scores, top_idx, query_ids=[t.query_id for t in split.triplets],
                                gallery_ids=split.gallery_names, target=v["target"], ranks=ranks,
                                category=[t.category for t in split.triplets],
                                meta={**base, "dataset": split.dataset, "split": split.split,
                                      "category": split.category or "", "stage": base.get("stage", "retrieval")})
    if path.suffix == ".npz":
        merged = _merge_topk(list(files.values()))
        return [str(save_topk(path, merged))]
    return [str(save_topk(path / f"{name}.topk.npz", t)) for name, t in files.items()]


def _top_lists(scores: torch.Tensor, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` candidates per query; ``k = 0`` (a 1-image gallery whose image is the removed reference leaves
    none) gives empty [Q, 0] lists, where top-K search refuses a length of 0 (an error after training)."""
    from cirlab.core.retrieval import topk_candidates

    if k == 0:
        return torch.zeros(scores.shape[0], 0), torch.zeros(scores.shape[0], 0, dtype=torch.long)
    return topk_candidates(scores, k, exclude=exclude)


def _merge_topk(parts: list[Any]) -> Any:
    from cirlab.core.topk import TopK

    if len(parts) == 1:
        return parts[0]
    k = min(p.k for p in parts)
    meta = {**parts[0].meta, "k": k, "splits": [p.meta.get("category") or p.meta.get("split") for p in parts]}
    return TopK(np.concatenate([p.query_ids for p in parts]), np.concatenate([p.gallery_ids[:, :k] for p in parts]),
                np.concatenate([p.scores[:, :k] for p in parts]), np.concatenate([p.target_rank for p in parts]),
                np.concatenate([p.category for p in parts]), np.concatenate([p.target_ids for p in parts]), meta)


# ----------------------------------------------------------------------------------------------- ITM


def _itm_encode_shards(fn: Callable[[dict[str, Any]], Any], dataset: Any, shard_size: int, batch_size: int,
                       device: Any, rows: range | None = None) -> list[Any]:
    rows = range(len(dataset)) if rows is None else rows
    shards = []
    for start in range(0, len(rows), shard_size):
        idx = rows[start:start + shard_size]
        shards.append(encode_dataset(fn, dataset, batch_size=batch_size, device=device, indices=idx, gather=False))
    return shards


@torch.no_grad()
def score_itm(model: Any, split: Any, *, batch_size: int = 128, shard_size: int = 1000, device: Any = None,
              images: range | None = None, captions: range | None = None) -> Any:
    """[N images x N captions] scores, computed in image x caption shards through ``model.score``.

    ``images`` / ``captions`` restrict the matrix to those rows / columns (COCO 1K scores only its 5 folds).

    Cross-attention matchers need every (image, caption) pair, so their score matrix is built block by block:
    each block holds at most ``shard_size`` images x ``shard_size`` captions of encoded features on ``device``.
    Under DDP, image shards are split over the processes and the rows are gathered.
    """
    require_model(model, ITMModel, "score_itm")  # encode_image, encode_text and score (a dual encoder's: a product)
    refuse_low_precision_weights(model, "score_itm")
    device = model_device(model, device)
    model.eval()
    score = model.score
    image_data, caption_data = split.image_dataset(), split.caption_dataset()
    image_rows = range(len(image_data)) if images is None else images
    caption_rows = range(len(caption_data)) if captions is None else captions
    image_shards = _itm_encode_shards(lambda b: model.encode_image(b["image_feats"]), image_data, shard_size,
                                      batch_size, device, image_rows)
    caption_shards = _itm_encode_shards(lambda b: model.encode_text(b["text"]), caption_data, shard_size,
                                        batch_size, device, caption_rows)
    # filled block by block in place: a row strip per shard then their concatenation held the matrix twice
    # (COCO 5K: 477 MB twice)
    out = torch.empty(len(image_rows), len(caption_rows))
    rank, world = _world()
    mine = [i for i in range(len(image_shards)) if i % world == rank]
    for i in mine:
        im, first = to_device(image_shards[i], device), i * shard_size
        height, column = len(image_rows[first:first + shard_size]), 0
        for j, tx in enumerate(caption_shards):
            block = score(im, to_device(tx, device)).float().cpu()
            width = len(caption_rows[j * shard_size:(j + 1) * shard_size])
            if tuple(block.shape) != (height, width):  # torch.empty must not show through a short block
                raise ModelContractError(f"{model_label(model)}.score gave a {tuple(block.shape)} block for "
                                         f"{height} images x {width} captions")
            out[first:first + height, column:column + width] = block
            column += width
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world  # a clone per strip: a pickled view would carry the whole matrix
        dist.all_gather_object(gathered, {i: out[i * shard_size:(i + 1) * shard_size].clone() for i in mine})
        for part in gathered:
            for i, strip in part.items():
                out[i * shard_size:i * shard_size + len(strip)] = strip
    return out


def _refuse_other_feature_width(model: Any, split: Any) -> None:
    """A model built for region features of one width (its config's ``img_dim``) evaluated on features of another
    (``cirlab eval RUN --root`` of 512-d features): one line before any scoring, instead of the encoder's traceback."""
    want = getattr(getattr(model, "config", None), "img_dim", None)
    have = int(split.images.shape[-1]) if getattr(split, "images", None) is not None else None
    if isinstance(want, int) and have is not None and want != have:
        raise ModelMismatchError(f"{model_label(model)} reads {want}-d region features (its img_dim), but "
                                 f"{getattr(split, 'ims_path', split)} holds {have}-d ones: evaluate it on features of "
                                 "the width it was trained on")


def evaluate_itm(model: Any, split: Any, protocol: str | None = None, *, batch_size: int = 128, shard_size: int = 1000,
                 device: Any = None) -> dict[str, Any]:
    """Evaluate an ITM model on a precomp split.

    Args:
        model: ``encode_image``/``encode_text`` (+ ``score`` for cross-attention matchers).
        split: a :class:`~cirlab.data.PrecompSplit` (5 captions per image).
        protocol: "full" (= "f30k": the split's whole matrix) | "coco1k" (mean over 5 folds of 1,000 images; only
            the folds' blocks are scored) | "coco5k" (full ``testall``) | "coco" (both, keys ``1k_*`` / ``5k_*``);
            None: as ``cirlab eval`` scores the split (:func:`cirlab.data.catalog.itm_protocol_of`: COCO's
            ``testall`` by "coco", every other split by "full").
        batch_size: encoding batch size.
        shard_size: images (and captions) per scoring block.
        device: where the model runs (:func:`model_device`: by default where its weights are).

    Returns:
        ``{"metrics": {...}, "i2t_ranks": [N] int64, "t2i_ranks": [5N] int64}`` (1-based; for coco1k within folds,
        for coco in the full matrix).
    """
    from cirlab.core import metrics as M

    require_model(model, ITMModel, "evaluate_itm", hint="evaluate_cir scores composed-retrieval models")
    refuse_low_precision_weights(model, "evaluate_itm")
    device = model_device(model, device)
    if not hasattr(split, "image_dataset"):  # a CIR split failed as "'CIRSplit' object has no attribute ..."
        raise ModelMismatchError(f"evaluate_itm needs a precomp split (cirlab.data.load_precomp), got a "
                                 f"{type(split).__name__}")
    whole_number(batch_size, "batch_size")
    whole_number(shard_size, "shard_size")
    _refuse_other_feature_width(model, split)
    if protocol is None:  # was "full": COCO's test split gave other numbers here than in cirlab eval
        from cirlab.data.catalog import itm_protocol_of

        protocol = itm_protocol_of(split.name, split.split)
    if protocol not in ITM_PROTOCOLS:
        raise InputError(f"unknown ITM protocol {protocol!r}; known: {', '.join(ITM_PROTOCOLS)}")
    cpi = int(getattr(split, "im_div", 5))
    if protocol.startswith("coco") and split.num_images != 5000:  # applies, but its numbers mean something else
        logger.warning("ITM protocol %r describes COCO's 5,000-image testall; this split has %d images (scored the "
                       "same way: %s)", protocol, split.num_images,
                       "5 folds of a fifth each" if protocol == "coco1k" else "its full matrix"
                       + (" and 5 folds" if protocol == "coco" else ""))
    score = functools.partial(score_itm, model, split, batch_size=batch_size, shard_size=shard_size, device=device)
    if protocol == "coco1k":
        try:
            folds = M.coco_1k_folds(split.num_images, captions_per_image=cpi)
        except InputError as err:
            raise InputError(f"{split!r}: {err}") from None
        # a cross-attention matcher pays per pair: score the 5 folds' blocks only (1/5 of the full matrix)
        blocks = [score(images=images, captions=captions) for images, captions in folds]
        metrics = M.fold_mean_metrics(blocks, captions_per_image=cpi)
    else:
        sims = score()
        metrics = M.itm_metrics(sims, captions_per_image=cpi)
        if protocol == "coco":
            metrics = {**{f"1k_{k}": v for k, v in M.coco_1k_metrics(sims, captions_per_image=cpi).items()},
                       **{f"5k_{k}": v for k, v in metrics.items()}}
        blocks = [sims]
    i2t = torch.cat([M.i2t_ranks(b, captions_per_image=cpi) for b in blocks])
    t2i = torch.cat([M.t2i_ranks(b, captions_per_image=cpi) for b in blocks])
    return {"metrics": metrics, "i2t_ranks": i2t.numpy(), "t2i_ranks": t2i.numpy()}


# ----------------------------------------------------------------------------------------------- routes


@torch.no_grad()
def trace_split(model: Any, split: Any, n: int | None = 200, *, batch_size: int = 32, device: Any = None,
                   transform: Any = None, seed: int | None = None) -> Any:
    """Run ``n`` queries under :func:`cirlab.trace_routes` and return the tidy route frame.

    CIR splits: queries go through ``encode_query`` with ids, ``category`` and ``modification`` attached to each
    batch (``trace.set_batch``). ITM precomp splits: each of the first ``n`` captions is scored against its own
    image (one pair per call), with ``image_idx`` and ``caption_idx`` columns. ``seed`` picks a random subset
    instead of the first ``n``.
    """
    from cirlab.core.tracing import trace_routes

    device = model_device(model, device)
    model.eval()
    total = len(split.triplets) if hasattr(split, "triplets") else len(split.captions)
    count = total if n is None else min(n, total)
    order = (np.random.default_rng(seed).permutation(total)[:count] if seed is not None
             else np.arange(count)).tolist()
    with trace_routes(model) as trace:
        if hasattr(split, "triplets"):
            _route_cir(model, split, order, trace, batch_size, device, cir_transform(model, transform))
        else:
            _route_itm(model, split, order, trace, device)
    return trace.to_frame()


def _route_cir(model: Any, split: Any, order: list[int], trace: Any, batch_size: int, device: Any,
               transform: Any) -> None:
    queries = split.query_dataset(transform)
    for start in range(0, len(order), batch_size):
        items = [queries[i] for i in order[start:start + batch_size]]
        trace.set_batch(ids=[it["query_id"] for it in items], category=[it["category"] for it in items],
                        modification=[it.get("modification", "") for it in items])
        images = torch.stack([it["ref_image"] for it in items]).to(device)
        model.encode_query(images, [it["text"] for it in items])


def _route_itm(model: Any, split: Any, order: list[int], trace: Any, device: Any) -> None:
    """One call per image with all of its traced captions (every pair in the call is a matching pair): the
    text encoder and the routing cells then run once per image rather than once per caption, which dominated
    the explorer notebooks' run time on CPU."""
    require_model(model, ITMModel, "route tracing on precomp data")
    score = model.score
    encode_image, encode_text = _with_ids(model.encode_image), _with_ids(model.encode_text)
    by_image: dict[int, list[int]] = {}
    for k in order:
        by_image.setdefault(int(split.image_of_caption(k)), []).append(int(k))
    for i, caps in by_image.items():
        texts = [split.captions[k] for k in caps]
        trace.set_batch(ids=caps, image_idx=[i] * len(caps), caption_idx=caps, text=texts)
        image = encode_image(split.features(i)[None].to(device), torch.tensor([i]))
        score(image, encode_text(texts, torch.tensor(caps)))


def _with_ids(fn: Callable[..., Any]) -> Callable[[Any, torch.Tensor], Any]:
    """``fn`` as ``(inputs, ids)``: passes the dataset ids when the encoder takes them (DIME records them in its
    traces), drops them otherwise."""
    import inspect

    if "ids" in inspect.signature(fn).parameters:
        return lambda inputs, ids: fn(inputs, ids=ids)
    return lambda inputs, ids: fn(inputs)
