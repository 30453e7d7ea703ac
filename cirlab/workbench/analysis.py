"""Pure analysis helpers behind the notebooks' figures (numpy/pandas in, numbers and tidy frames out).

Everything here is plain computation so that it is unit-tested without matplotlib and reused by
:mod:`cirlab.workbench.viz`, :mod:`cirlab.workbench.widgets` and the notebooks:

* rank shift (the re-ranking paper's Figure 8): align two top-K files by query,
  bin the queries by their rank before, and summarise how far targets moved;
* the candidate-pool ceiling: a re-ranker that only re-orders the stage-I top-K cannot find a target
  outside it, so stage I's Recall@K_pool bounds stage II's recall at every k;
* router statistics from a route-trace frame (``cirlab.core.tracing.RouteTrace.to_frame``): per-query gate
  matrices, gate entropy, expert utilisation, DIME's mean cell-to-cell flows, path-space PCA;
* run bookkeeping: reading ``log.jsonl`` and ``metrics.json`` files and tabulating several runs.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cirlab.core.config import name_list, whole_number
from cirlab.core.contracts import FRAME_COLUMNS
from cirlab.core.errors import InputError, MissingPathError, UnknownKeyError, first_few

logger = logging.getLogger(__name__)

__all__ = [
    "align_ranks", "different_queries", "rank_shift_table", "rank_shift_summary", "ceiling_recall", "known_recall",
    "rank_shift_by_category", "feature_columns", "gate_matrix", "gate_entropy", "expert_utilisation",
    "route_statistics", "flow_matrices", "path_vectors", "pca_2d", "read_log", "read_metrics",
    "compare_runs", "flatten_metrics", "layer_matrix", "bridge_words", "relation_matrix", "relation_block_means",
    "word_region_matrix", "word_image_matrix", "recall_by_category", "removed_rank", "shown_rank",
    "results_table", "seed_summary", "paper_metrics",
]


# --------------------------------------------------------------------------------------------- rank shift
def _require_topk(value: Any, argument: str) -> None:
    """A path or name here failed as ``'str' object has no attribute 'query_ids'``: say what to pass instead."""
    if not (hasattr(value, "query_ids") and hasattr(value, "target_rank")):
        raise InputError(f"align_ranks: {argument} is a {type(value).__name__} ({value!r}), not a loaded top-K file; "
                         "load paths with cirlab.core.topk.load_topk(path) or "
                         "cirlab.workbench.ranking_pair(before, after)")


def different_queries(before: Any, after: Any) -> str:
    """Why two top-K files rank different queries ("" when they may rank the same): their metadata names another
    dataset or split. Precomp caption ids are 0..N-1 in every split, and CIR ids can coincide, so two such rankings
    would align on ids that merely match."""
    for key in ("dataset", "split"):
        said = [str((getattr(t, "meta", None) or {}).get(key, "")) for t in (before, after)]
        if all(said) and said[0] != said[1]:
            return (f"before ranks {key} {said[0]!r} and after ranks {key} {said[1]!r}: the comparison needs two "
                    "rankings of the same queries")
    return ""


def align_ranks(before: Any, after: Any) -> Any:
    """Join two top-K files (``cirlab.core.topk.TopK``) by query id.

    Returns a frame with ``query_id, category, rank_before, rank_after`` (1-based, 0 = unknown), keeping
    only queries whose target rank is known in both files. Raises if the files share no query, or if their
    metadata says they rank different datasets or splits (:func:`different_queries`).
    """
    import pandas as pd

    _require_topk(before, "before")
    _require_topk(after, "after")
    why = different_queries(before, after)
    if why:
        raise InputError(f"align_ranks: {why}")
    a = pd.DataFrame({"query_id": before.query_ids, "category": before.category, "rank_before": before.target_rank})
    b = pd.DataFrame({"query_id": after.query_ids, "rank_after": after.target_rank})
    for name, frame in (("before", a), ("after", b)):
        dup = frame["query_id"][frame["query_id"].duplicated()]
        if len(dup):
            raise InputError(f"top-K file '{name}' repeats query id {dup.iloc[0]!r}")
    merged = a.merge(b, on="query_id", how="inner")
    if merged.empty:
        raise InputError("the two top-K files share no query id (are they from the same split?)")
    missing = len(a) - len(merged)
    if missing:
        logger.warning("%d queries of the 'before' file are absent from the 'after' file", missing)
    known = (merged["rank_before"] > 0) & (merged["rank_after"] > 0)
    return merged[known].reset_index(drop=True)


def _same_length(before: np.ndarray, after: np.ndarray) -> None:
    if before.shape != after.shape:
        raise InputError(f"rank_before {before.shape} and rank_after {after.shape} differ")


def _ranks(values: Any, name: str) -> np.ndarray:
    """A 1-D array of ranks without NaN: a 2-D array was flattened into the table, NaN dropped without a word."""
    r = np.asarray(values, dtype=float)
    if r.ndim != 1:
        raise InputError(f"{name} must be a 1-D array of ranks (one per query), got shape {r.shape}")
    if np.isnan(r).any():
        raise InputError(f"{name} holds {int(np.isnan(r).sum())} NaN rank(s) (positions "
                         f"{np.flatnonzero(np.isnan(r))[:5].tolist()}); use 0 for an unknown rank")
    return r


ALIGN_HINT = "pass analysis.align_ranks(before, after)"


def require_frame(value: Any, what: str, hint: str = "") -> None:
    """Raise when ``value`` is not a pandas DataFrame: a recipe's tuple or dict handed whole failed deep inside as
    ``KeyError: 'matrix'`` or ``'tuple' object has no attribute 'loc'``; the message says which element to pass."""
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return
    if isinstance(value, Mapping) and "edges" in value:
        hint = f"pass hrem_relation(...)[{'word_region' if 'word_region' in what else 'edges'!r}]"
    elif isinstance(value, (tuple, list)) and value and isinstance(value[0], pd.DataFrame):
        hint = "cala_trace / collect_routes return (frame, texts): pass its first element"
    raise InputError(f"{what} must be a pandas DataFrame, got a {type(value).__name__}" + (f"; {hint}" if hint else ""))


def aligned_frame(aligned: Any, what: str) -> Any:
    """The frame of :func:`align_ranks` (``rank_before``, ``rank_after``; ``category`` optional), with rows."""
    require_frame(aligned, what, ALIGN_HINT)
    missing = [c for c in ("rank_before", "rank_after") if c not in aligned.columns]
    if missing:
        raise UnknownKeyError(f"{what} lacks column(s) {', '.join(missing)}; its columns: "
                              f"{', '.join(map(str, aligned.columns)) or '(none)'}; {ALIGN_HINT}")
    if aligned.empty:
        raise InputError(f"{what} has no rows: no query has a known target rank in both rankings")
    return aligned


def _bin_edges(k: int, bins: int | Sequence[int] | None) -> np.ndarray:
    """Left-closed integer bin edges over ranks 1..k (the last edge is k + 1). Given edges must cover exactly that
    range: a query outside every bin would vanish from the table without a word."""
    if bins is None:
        return np.arange(1, k + 2)
    if isinstance(bins, (int, np.integer)):
        return np.unique(np.linspace(1, k + 1, whole_number(bins, "bins") + 1).round().astype(int))
    raw = np.asarray(bins, dtype=float)
    if raw.ndim == 1 and not np.all(np.isfinite(raw) & (raw == np.round(raw))):  # 2.7 was truncated to 2
        raise InputError(f"bins must be whole-number rank edges, got {bins!r}")
    edges = raw.astype(int) if raw.ndim == 1 and np.isfinite(raw).all() else raw
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise InputError(f"bins must be increasing integer edges, got {bins!r}")
    if edges[0] != 1 or edges[-1] != k + 1:
        raise InputError(f"bin edges must cover ranks 1..{k}: start at 1 and end at {k + 1} (k + 1), got {bins!r}")
    return edges


def rank_shift_table(rank_before: Sequence[int], rank_after: Sequence[int], k: int,
                     bins: int | Sequence[int] | None = None) -> Any:
    """Mean rank after per bin of the rank before (Figure 8 of the re-ranking paper, 1-based ranks).

    Only queries whose target is inside the candidate pool before (``1 <= rank_before <= k``) enter, as in
    the original notebook (``labels_I.nonzero()``). ``bins=None`` gives one bin per rank 1..k.
    Columns: ``bin_start, bin_end`` (inclusive), ``count``, ``mean_rank_before``, ``mean_rank_after``,
    ``average_delta`` = mean(before - after) (positive = moved forward; 0 for empty bins, as the paper does).
    """
    import pandas as pd

    k = whole_number(k, "k")
    before = _ranks(rank_before, "rank_before")
    after = _ranks(rank_after, "rank_after")
    _same_length(before, after)
    in_pool = (before >= 1) & (before <= k) & (after >= 1)
    before, after = before[in_pool], after[in_pool]
    edges = _bin_edges(k, bins)
    index = np.searchsorted(edges, before, side="right") - 1
    rows = []
    for i in range(len(edges) - 1):
        m = index == i
        n = int(m.sum())
        mean_b = float(before[m].mean()) if n else float("nan")
        mean_a = float(after[m].mean()) if n else float("nan")
        rows.append({"bin_start": int(edges[i]), "bin_end": int(edges[i + 1] - 1), "count": n,
                     "mean_rank_before": mean_b, "mean_rank_after": mean_a,
                     "average_delta": float((before[m] - after[m]).mean()) if n else 0.0})
    return pd.DataFrame(rows)


def removed_rank() -> int:
    """The rank a top-K file gives a target that is its query's own reference, removed from the ranking with it
    (:func:`cirlab.core.metrics.removed_targets_missed`): past every cut-off, so the recalls here count it as a miss,
    as the protocol's metrics do."""
    import torch

    from cirlab.core.metrics import removed_targets_missed

    one = torch.ones(1, dtype=torch.long)
    return int(removed_targets_missed(one, [0], [0])[0])  # query 0: target 0 is its own removed reference


def shown_rank(rank: int) -> str:
    """A target rank as a figure or widget prints it: the number, or for a target removed with its reference (its
    :func:`removed_rank` stand-in, a 19-digit number) what happened to it."""
    return "none (the target is the reference, removed)" if int(rank) >= removed_rank() else str(int(rank))


def rank_shift_summary(rank_before: Sequence[int], rank_after: Sequence[int],
                       k: int | None = None) -> dict[str, int | float]:
    """The number of queries (an int) and the shares of those whose target moved forward / back (within the pool if
    ``k`` is given). A target removed with its reference (:func:`removed_rank`) has no place in either ranking to
    move from: left out, as an unknown one, so that its stand-in rank does not swamp the mean ranks."""
    before = _ranks(rank_before, "rank_before")  # NaN failed ``>= 1`` and the query left the counts unsaid
    after = _ranks(rank_after, "rank_after")
    _same_length(before, after)
    removed = float(removed_rank())
    keep = (before >= 1) & (after >= 1) & (before < removed) & (after < removed)
    if k is not None:
        keep &= before <= whole_number(k, "k")
    before, after = before[keep], after[keep]
    n = len(before)
    share = (lambda m: 100.0 * float(m.sum()) / n) if n else (lambda m: float("nan"))
    return {"queries": n,
            "mean_rank_before": float(before.mean()) if n else float("nan"),
            "mean_rank_after": float(after.mean()) if n else float("nan"),
            "moved_forward": float((before - after).mean()) if n else float("nan"),
            "improved_pct": share(after < before), "unchanged_pct": share(after == before),
            "worsened_pct": share(after > before)}


def known_recall(ranks: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """:func:`cirlab.core.metrics.recall_from_ranks` over the queries whose target is known (rank > 0; CIRR test
    queries have none); NaN when no query is left, so a table of categories keeps its rows."""
    from cirlab.core.metrics import recall_from_ranks

    ks = [whole_number(k, "k") for k in name_list(ks)]  # ks=5 was "int is not iterable", "10" its letters
    r = _ranks(ranks, "ranks")  # NaN failed ``> 0`` and left the recall's denominator without a word
    r = r[r > 0]
    if len(r) == 0:
        return {f"R@{k}": float("nan") for k in ks}
    return recall_from_ranks(r, ks)


def recall_by_category(topk: Any, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{category: {"R@k": recall}}`` of one top-K file grouped by its ``category`` column (known targets only),
    e.g. an ITM run's text-to-image file per caption type. A target removed with its reference is a miss at every
    k (its rank is :func:`removed_rank`), as in the run's metrics; files of cirlab versions before that rank hold
    ``gallery size + 1`` there instead, a hit for a k past the gallery size."""
    cats = np.asarray(topk.category).astype(str)
    return {str(c): known_recall(np.asarray(topk.target_rank)[cats == c], ks) for c in dict.fromkeys(cats)}


def ceiling_recall(rank_before: Sequence[int], pool: int) -> float:
    """Best recall any re-ranker of the stage-I top-``pool`` candidates can reach (percent)."""
    pool = whole_number(pool, "pool")
    return known_recall(rank_before, [pool])[f"R@{pool}"]


def rank_shift_by_category(aligned: Any, pool: int | None, ks: Sequence[int] = (1, 5, 10, 50)) -> Any:
    """Per category (plus ``all``): recall before/after at ``ks``, the pool ceiling, and the shift summary.

    A re-ranking (``pool`` = its candidate pool size): the shift summary is over the queries whose target is in the
    pool before, counted in ``queries_in_pool`` (the recalls are over every query with a known target).
    ``pool=None``, two full rankings of their own: no ceiling, and the summary is over every query with a known
    target (``queries``); a pool filter would keep only the queries the first ranking already did well on."""
    import pandas as pd

    aligned = aligned_frame(aligned, "rank_shift_by_category: aligned")
    pool = None if pool is None else whole_number(pool, "pool")
    ks = name_list(ks)
    rows = []
    groups = [("all", aligned)]
    if "category" in aligned.columns and aligned["category"].nunique() > 1:  # no category: one group, "all"
        groups += [(str(c), g) for c, g in aligned.groupby("category", sort=True)]
    for name, g in groups:
        row: dict[str, Any] = {"category": name}
        row.update({f"before_{k}": v for k, v in known_recall(g["rank_before"], ks).items()})
        row.update({f"after_{k}": v for k, v in known_recall(g["rank_after"], ks).items()})
        shift = rank_shift_summary(g["rank_before"], g["rank_after"], k=pool)
        if pool is not None:
            row[f"ceiling_R@{pool}"] = ceiling_recall(g["rank_before"], pool)
            shift["queries_in_pool"] = shift.pop("queries")
        row.update(shift)
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- routing
def require_columns(frame: Any, columns: Sequence[str], what: str) -> None:
    """Stop with the missing names and the frame's own columns, not pandas' bare ``KeyError: 'layer'`` from deep in a
    pivot (a renamed or hand-built frame)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UnknownKeyError(f"{what} lacks column(s) {', '.join(missing)}; its columns: "
                              f"{', '.join(map(str, frame.columns)) or '(none)'}")


CALA_PREFIXES = ("hca.", "tac.")  # CaLa.trace's layers: HCA's hinge maps and bridge, TAC's twin attention steps
HREM_LAYERS = ("connection", "relevance")  # HREM's relation graph, traced or as hrem_relation(...)["edges"]


def refuse_attention_trace(frame: Any, what: str) -> None:
    """Router views (AMC gates, DIME paths) given a CaLa or HREM trace failed on "repeated weight rows ...
    set_batch" or drew meaningless panels: name the views made for that trace instead."""
    if not hasattr(frame, "columns"):
        return
    if "matrix" in frame.columns and "edge_type" in frame.columns:
        layers = set(map(str, frame["matrix"].unique()))
    elif "layer" in frame.columns:
        layers = set(map(str, frame["layer"].unique()))
    else:
        return
    if any(l.startswith(CALA_PREFIXES) for l in layers):
        raise InputError(f"{what} is for router traces (AMC gates, DIME paths); this is a CaLa trace (layers hca.*, "
                         "tac.*): draw it with viz.plot_cala_bridges or viz.plot_bridge_words")
    if set(HREM_LAYERS) <= layers:
        raise InputError(f"{what} is for router traces (AMC gates, DIME paths); this is an HREM relation trace: draw "
                         "it with viz.plot_relation_graph or viz.plot_word_region (workbench.hrem_relation)")


def _has_source(frame: Any) -> Any:
    """Per row, whether it is a path row (source -> destination); gate rows carry ``source`` None."""
    src = frame["source"]
    return src.notna() & (src.astype(str) != "None")


def feature_columns(frame: Any) -> Any:
    """Label of each weight: the expert for gate rows, ``source->destination`` for DIME path rows."""
    require_columns(frame, FRAME_COLUMNS, "the route frame")
    src = frame["source"]
    is_path = _has_source(frame)
    label = frame["paper_name"].astype(str).where(frame["paper_name"].notna(), frame["expert"].astype(str))
    return label.where(~is_path, src.astype(str) + "->" + frame["destination"].astype(str))


def _ordered_unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _refuse_repeated_queries(rows: Any, keys: list[str]) -> None:
    """One weight per query and feature: a query id that repeats (two traces concatenated, each numbering its
    queries 0..N; batches traced under one set_batch) would be averaged with another query into one row."""
    repeated = rows.duplicated(["query_id", *keys])
    if repeated.any():
        first = rows.loc[repeated, "query_id"].iloc[0]
        raise InputError(f"query id {first!r} has {int(repeated.sum())} repeated weight row(s) in the route frame: "
                         "two traces concatenated, or batches traced without their own ids? Give every query its own "
                         "id (trace.set_batch(ids=...) before each batch)")


def gate_matrix(frame: Any, layer: str) -> Any:
    """``[query x expert]`` weights of one layer (columns in the model's code order, paper names)."""
    refuse_attention_trace(frame, "gate_matrix")
    require_columns(frame, FRAME_COLUMNS, "the route frame")
    rows = frame[frame["layer"] == layer]
    if rows.empty:
        raise UnknownKeyError(f"layer {layer!r} not in the route frame; layers: {_ordered_unique(frame['layer'])}")
    rows = rows.assign(_feature=feature_columns(rows))
    order = _ordered_unique(rows.sort_values("code_index", kind="stable")["_feature"]) if rows["source"].isna().all() \
        else _ordered_unique(rows["_feature"])
    _refuse_repeated_queries(rows, ["_feature"])
    table = rows.pivot_table(index="query_id", columns="_feature", values="weight", aggfunc="mean", sort=False)
    return table[order]


def _weights(weights: Any) -> np.ndarray:
    """A ``[queries x experts]`` weight matrix with at least one expert and no NaN (argmax would pick a NaN as the
    winner; a 1-D array had no expert axis)."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 2 or w.shape[1] == 0:
        raise InputError(f"routing weights must be [queries x experts] with at least one expert, got shape {w.shape}")
    if np.isnan(w).any():
        raise InputError(f"routing weights hold {int(np.isnan(w).sum())} NaN value(s) (rows "
                         f"{np.flatnonzero(np.isnan(w).any(axis=1))[:5].tolist()}...)")
    return w


def _normalise(w: np.ndarray) -> np.ndarray:
    """Rows of a checked weight matrix (:func:`_weights`) as distributions: AMC's sigmoid gates are not normalised,
    so entropy needs a division."""
    w = np.clip(w, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    uniform = np.full_like(w, 1.0 / w.shape[1])
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), uniform)


def gate_entropy(weights: np.ndarray, normalised: bool = True) -> np.ndarray:
    """Entropy of each row's routing distribution; divided by log(E) when ``normalised`` (1 = uniform)."""
    p = _normalise(_weights(weights))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / np.log(p.shape[1]) if normalised and p.shape[1] > 1 else h


def expert_utilisation(weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per expert: mean normalised share of routing weight and the fraction of queries it wins (argmax)."""
    w = _weights(weights)
    p = _normalise(w)
    wins = np.bincount(w.argmax(axis=1), minlength=p.shape[1]) / max(len(p), 1)
    return {"mean_share": p.mean(axis=0), "top1_share": wins}


def route_statistics(frame: Any) -> Any:
    """Per layer and expert: mean raw weight, mean normalised share, top-1 share, mean layer entropy."""
    import pandas as pd

    refuse_attention_trace(frame, "route_statistics")
    require_columns(frame, FRAME_COLUMNS, "the route frame")
    rows = []
    for layer in _ordered_unique(frame["layer"]):
        m = gate_matrix(frame, layer)
        util = expert_utilisation(m.to_numpy())
        ent = float(gate_entropy(m.to_numpy()).mean())
        for j, name in enumerate(m.columns):
            rows.append({"layer": layer, "expert": name, "mean_weight": float(m.iloc[:, j].mean()),
                         "mean_share": float(util["mean_share"][j]), "top1_share": float(util["top1_share"][j]),
                         "layer_entropy": ent})
    return pd.DataFrame(rows)


def flow_matrices(frame: Any) -> list[tuple[str, list[str], list[str], np.ndarray]]:
    """Mean ``[destination x source]`` path weight per layer (DIME), in layer order.

    Returns ``(layer, sources, destinations, matrix)`` tuples; raises when the frame has no path rows.
    """
    refuse_attention_trace(frame, "flow_matrices (plot_path_matrices, plot_dime_flows)")
    require_columns(frame, FRAME_COLUMNS, "the route frame")
    paths = frame[_has_source(frame)]
    if paths.empty:
        raise InputError("the route frame has no path rows (source/destination); flows need a DIME-like model")
    out = []
    for layer in _ordered_unique(paths["layer"]):
        rows = paths[paths["layer"] == layer]
        sources = _ordered_unique(rows["source"].astype(str))
        dests = _ordered_unique(rows["destination"].astype(str))
        mean = rows.groupby([rows["destination"].astype(str), rows["source"].astype(str)])["weight"].mean()
        mat = np.array([[mean.get((d, s), 0.0) for s in sources] for d in dests], dtype=float)
        out.append((layer, sources, dests, mat))
    return out


def path_vectors(frame: Any, meta: str | None = "category") -> tuple[np.ndarray, list[Any], list[Any]]:
    """Each query's weights over all layers as one vector (its point in path space).

    Returns ``(X [Q, F], query_ids, labels)`` where labels are the ``meta`` column per query ("" when the frame has
    no ``category`` column and ``meta`` is that default; any other missing ``meta`` is an error, as a misspelt name
    gave "" labels without a word).
    """
    refuse_attention_trace(frame, "path_vectors (plot_path_space)")
    require_columns(frame, FRAME_COLUMNS, "the route frame")
    if meta and meta not in frame.columns and meta != "category":
        raise UnknownKeyError(f"meta={meta!r} is not a column of the route frame; columns: "
                              f"{', '.join(map(str, frame.columns))}")
    f = frame.assign(_feature=frame["layer"].astype(str) + ":" + feature_columns(frame))
    _refuse_repeated_queries(f, ["_feature"])
    table = f.pivot_table(index="query_id", columns="_feature", values="weight", aggfunc="mean", sort=False)
    table = table.fillna(0.0)
    ids = list(table.index)
    if meta and meta in frame.columns:
        first = frame.drop_duplicates("query_id").set_index("query_id")[meta]
        labels = [first.get(q, "") for q in ids]
    else:
        labels = [""] * len(ids)
    return table.to_numpy(dtype=float), ids, labels


def pca_2d(x: np.ndarray, standardize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto the first two principal components (numpy SVD; no sklearn).

    Returns ``(coords [N, 2], explained_variance_ratio [2])``; components with no variance give zeros.
    ``standardize``: divide each centred column by its standard deviation first (a constant column stays 0), so
    that features on larger scales (DIME's raw output-layer weights beside normalised hidden-layer ones) do not make
    the map one feature's.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"pca_2d needs a [N>=2, F] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():  # the SVD would fail with "did not converge" or draw every point at NaN
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise InputError(f"pca_2d: {len(bad)} row(s) hold NaN or inf values (rows {bad[:5].tolist()}"
                         f"{'...' if len(bad) > 5 else ''})")
    centred = x - x.mean(axis=0)
    if standardize:
        std = centred.std(axis=0)
        centred = centred / np.where(std > 0, std, 1.0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    coords = centred @ comps.T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s ** 2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(min(2, len(var)))
    # a deterministic sign, so the same data always draws the same map
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), range(2)])
    signs[signs == 0] = 1
    return coords * signs, np.pad(ratio, (0, 2 - len(ratio)))


# --------------------------------------------------------------------------------------------- runs
def read_log(path: str | os.PathLike) -> Any:
    """A training ``log.jsonl`` as a frame (one row per record); names the file and line on bad JSON."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise MissingPathError(f"training log not found: {path}")
    records = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):  # torn: a run stopped while writing its last record
                logger.warning("%s:%d: the last line is torn (a run stopped mid-write); skipped", path, n)
                continue
            raise InputError(f"{path}:{n}: not a JSON record ({err.msg})") from err
        if not isinstance(record, dict):  # a bare number or list would become a column named 0
            raise InputError(f"{path}:{n}: not a JSON record (a JSON {type(record).__name__}, not an object)")
        records.append(record)
    return pd.DataFrame(records)


def _metrics_path(path: str | os.PathLike) -> Path:
    """A run folder's ``metrics.json``, or the file itself."""
    path = Path(path)
    return path / "metrics.json" if path.is_dir() else path


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """``metrics.json`` of a run folder (or the file itself)."""
    path = _metrics_path(path)
    if not path.is_file():
        raise MissingPathError(f"metrics file not found: {path}")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err.msg})") from err
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: expected a JSON object of metrics, got a {type(metrics).__name__}")
    return metrics


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> flat ``{"a/b": value}`` with numeric leaves only, as floats
    (:func:`cirlab.core.io.flat_numbers`)."""
    from cirlab.core.io import flat_numbers

    return flat_numbers(metrics, prefix)


def _run_name(path: str | os.PathLike) -> str:
    """A run folder's name; for a ``metrics.json`` given directly, its folder's name; for another JSON file (``cirlab
    eval --output amc_s0.json``) its name without ``.json``."""
    path = Path(path)
    if path.name == "metrics.json":
        return path.parent.name
    return path.stem if path.suffix == ".json" else path.name


def _named_runs(runs: Any, caller: str = "compare_runs") -> Mapping[str, Any]:
    """``runs`` as ``{name: source}``: a list of run folders (or one folder) is named by the folders' names."""
    if isinstance(runs, Mapping):
        return runs
    named: dict[str, Any] = {}
    for path in name_list(runs):
        if not isinstance(path, (str, os.PathLike)):  # a dict has no name to put on its column
            raise InputError(f"{caller}: a list holds run folders or metrics files; got a {type(path).__name__} "
                             "(pass {name: metrics} for metric dicts)")
        name = _run_name(path)
        if name in named:
            raise InputError(f"{caller}: two runs are named {name!r} ({named[name]} and {path}); pass "
                             "{name: folder} to name them")
        named[name] = path
    return named


def _unfinished(src: str | os.PathLike) -> str | None:
    """Why a run folder (or metrics file) has no current metrics: its state, or that the file is missing."""
    if Path(src).is_dir():
        state = run_state(src)["state"]
        return None if state == "finished" else state
    return None if _metrics_path(src).is_file() else "no metrics.json"


def compare_runs(runs: Mapping[str, Mapping[str, Any] | str | os.PathLike] | Sequence[str | os.PathLike], *,
                 unfinished: str = "error") -> Any:
    """Side-by-side table: one row per metric, one column per run (dicts or run folders / metrics files). A list of
    run folders (or one folder) names each column by its folder. A run folder without metrics.json (stopped,
    killed, still running) is an error, or with ``unfinished="skip"`` left out with a warning naming it (a glob of a
    sweep's folders), as is one whose last start did not finish (its metrics.json is an earlier start's);
    :func:`runs_table` lists every run with its state."""
    import pandas as pd

    if unfinished not in ("error", "skip"):
        raise InputError(f"compare_runs: unfinished={unfinished!r}; expected 'error' or 'skip'")
    columns = {}
    for name, src in _named_runs(runs).items():
        why = _unfinished(src) if unfinished == "skip" and not isinstance(src, Mapping) else None
        if why:
            logger.warning("compare_runs: %s is not finished (%s): left out", src, why)
            continue
        metrics = src if isinstance(src, Mapping) else read_metrics(src)
        columns[name] = flatten_metrics(metrics)
    table = pd.DataFrame(columns)
    table.index.name = "metric"
    return table


RUN_MARKS = ("provenance.json", "log.jsonl")  # what every run that took a step holds; a user's folder holds neither
_NOT_RUNS = {"checkpoints", "tb", "topk", "figures"}  # a run's own subfolders: never searched for runs


def find_runs(root: str | os.PathLike) -> list[Path]:
    """The run folders at or under ``root`` (each holds a :data:`RUN_MARKS` file), sorted by path; a run's own
    subfolders are not searched, nor hidden ones."""
    root = Path(root)
    if root.is_file():  # "not found" of a file that is there sent the user looking for it
        raise InputError(f"{root} is a file, not a folder of runs: pass the folder that holds the run folders")
    if not root.is_dir():
        raise MissingPathError(f"runs folder not found: {root}")
    found = []
    for folder, subfolders, files in os.walk(root, onerror=_say_skipped):
        if any(mark in files for mark in RUN_MARKS):
            found.append(Path(folder))
            subfolders[:] = [d for d in subfolders if d not in _NOT_RUNS]
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    return sorted(found)


def _say_skipped(err: OSError) -> None:
    """``os.walk`` drops a folder it cannot list without a word: a colleague's private run would be missing from
    the table as if it did not exist."""
    logger.warning("skipped %s: %s", err.filename, (err.strerror or str(err)).lower())


def run_state(run: str | os.PathLike) -> dict[str, Any]:
    """Where one run stands, from its folder alone: ``state`` is ``running`` (its lock is held), how its last start
    ended where that was not a finish (``stopped (SIGNAME)``, ``failed``, ``error``: provenance.json), ``finished``
    (a metrics.json that start wrote), ``trained`` (its training is done, the final evaluation is owed:
    ``--resume`` runs it) or ``killed`` (a start that never recorded an end: ``kill -9``, the OOM killer, a lost
    node). With ``message``, ``started``, ``ended`` and the last logged ``step``."""
    run = Path(run)
    if not run.is_dir():  # a typo read as a run that was killed
        raise MissingPathError(f"no run folder at {run.absolute()}")
    return _state_of(run, _json_or(run / "metrics.json", {}), _json_or(run / "train_summary.json", {}))


def _state_of(run: Path, metrics: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`run_state` with the run's metrics.json and train_summary.json already read (``runs_table`` has
    them)."""
    from cirlab.core.io import lock_holder
    from cirlab.core.provenance import read_starts

    try:
        starts = read_starts(run)
    except (OSError, ValueError):  # a listing must not stop at one broken run
        starts = []
    last = starts[-1] if starts and isinstance(starts[-1], dict) else {}
    step = _last_step(run / "log.jsonl")
    if lock_holder(run) is not None:
        state = "running"
    elif last.get("status") not in (None, "finished"):  # its last start: a resume's stop leaves the old metrics
        state = str(last["status"])
    elif (run / "metrics.json").is_file() and (last.get("status") == "finished"
                                               or _covers_log(metrics, step, last.get("from_step"))):
        state = "finished"  # a recorded finish is written after metrics.json
    elif (run / "train_summary.json").is_file() and _covers_log(summary, step, last.get("from_step")):
        state = "trained"
    else:
        state = "killed"
    return {"state": state, "message": last.get("message") if state == last.get("status") else None,
            "started": last.get("started"), "ended": last.get("ended"), "step": step}


def _covers_log(results: Mapping[str, Any], last_step: int | None, from_step: Any = None) -> bool:
    """Whether a results file's contents (metrics.json, train_summary.json: their ``steps``) are the last start's,
    which recorded no end: it must reach the last logged step (a resume killed after training on leaves the
    previous start's files, which stop short of its log) and go past the step that start resumed from
    (``from_step``; killed before its first log record, it changed neither file). Decided from the contents, not
    from file times, which a clock ahead of the file server's, a copy (``cp -r``) or an archive (``tar --mtime``)
    change. Unknown counts as the start's."""
    steps = results.get("steps")
    if not isinstance(steps, int):
        return True
    resumed = isinstance(from_step, int) and not isinstance(from_step, bool) and from_step > 0
    return (last_step is None or steps >= last_step) and not (resumed and steps <= from_step)


def _json_or(path: Path, default: Any) -> Any:
    """A JSON file cirlab wrote, or ``default`` where it is missing or unreadable (a listing must not stop at one
    broken run)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return default
    return data if isinstance(data, type(default)) else default


def _last_step(log: Path) -> int | None:
    """The step of the last complete record of a log.jsonl (read from its end: a long run's log is large)."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 65536, 0))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return None


def _best_logged(log: Path) -> float | None:
    """The best selection score a run's log.jsonl recorded (its last evaluation marked ``best``): a stopped run has
    no summary yet, and its best validation score was shown as missing."""
    best = None
    try:
        with log.open("rb") as fh:
            for line in fh:
                if b'"best": true' not in line:  # most lines are training steps: not parsed
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # a torn last line
                    continue
                if record.get("kind") == "eval" and isinstance(record.get("selection_score"), (int, float)):
                    best = record["selection_score"]
    except OSError:
        return None
    return best


def runs_table(root: str | os.PathLike) -> Any:
    """One row per run folder at or under ``root`` (:func:`find_runs`): its path relative to ``root``, model,
    preset, dataset, :func:`run_state` (state, last step, start and end time, the message of a stop or failure),
    the selection metric and its best validation score, each final split's value of that metric (``test avg``,
    ``test rsum``, ...), and the bytes the folder takes (``size``), of which ``resume state`` is the training state
    a resume reads (``checkpoints/last.pt``, ``epoch_*.pt``: the model, optimizer and averaged weights; a finished
    run's results and ``cirlab eval`` need ``best.pt`` only). Runs that stopped are listed too: a folder of sweeps
    shows which to resume."""
    import pandas as pd

    rows = []
    for run in find_runs(root):
        (config, bad_config), (metrics, bad_metrics), (summary, bad_summary) = (
            _record(run / name) for name in ("config.yaml", "metrics.json", "train_summary.json"))
        broken = [name for name, bad in (("config.yaml", bad_config), ("metrics.json", bad_metrics),
                                         ("train_summary.json", bad_summary)) if bad]
        selection = metrics.get("selection") if isinstance(metrics.get("selection"), dict) else {}
        # None: a run without model selection (cirlab.fit's selection="last")
        metric = (selection.get("metric") or summary.get("selection_metric")
                  or (config.get("train") or {}).get("selection_metric"))
        best = selection.get("best_score", summary.get("best_score"))
        state = _state_of(run, metrics, summary)
        row = {"run": run.relative_to(root).as_posix() or ".", "model": config.get("model"),
               "preset": config.get("preset"), "dataset": (config.get("dataset") or {}).get("name"),
               "state": state.pop("state"), "step": state.pop("step"), "metric": metric,
               "best val": best if best is not None else _best_logged(run / "log.jsonl"), **disk_use(run)}
        for split, values in (metrics.get("splits") or {}).items() if isinstance(metric, str) else ():
            keys = metric.split("+")  # a summed selection metric (CaLa's R@1+R@5+...), as the trainer sums it
            if isinstance(values, dict) and all(isinstance(values.get(k), (int, float)) for k in keys):
                row[f"{split} {metric}"] = sum(values[k] for k in keys)
        if broken:  # its blank model, metrics and state would read as an ordinary run's
            state["message"] = "; ".join(filter(None, (state.get("message"), f"unreadable: {', '.join(broken)}")))
        rows.append({**row, **state})
    table = pd.DataFrame(rows)
    last = [c for c in ("started", "ended", "message") if c in table.columns]  # the widest columns last
    return table[[c for c in table.columns if c not in last] + last]


def paper_metrics(keys: Sequence[str]) -> list[str]:
    """The metric keys of ``keys`` that the papers' tables report, in their order: Fashion-IQ dress, shirt, toptee
    R@10 / R@50 then the averages; Shoes R@1, R@10, R@50; CIRR R@1 ... R@50 then Rsubset@1..3; ITM i2t then t2i
    R@1/5/10 and rsum (COCO: its 1K block, then 5K); ``avg`` last. Keys no table reports (medr, meanr, trivial cut-offs
    past the gallery are still R@K) are left out."""
    from cirlab.core import metrics as M

    cir = [f"{c}_{M.recall_key(k)}" for c in (*M.FIQ_CATEGORIES, "avg") for k in M.FIQ_KS]
    cir += [M.recall_key(k) for k in sorted({*M.CIRR_KS, *M.SHOES_KS})]
    cir += [M.subset_key(k) for k in M.CIRR_SUBSET_KS]
    itm = [M.itm_key(d, k) for d in ("i2t", "t2i") for k in M.ITM_KS] + [M.RSUM]
    order = [*cir, *(f"{block}_{k}" for block in ("1k", "5k") for k in itm), *itm, M.AVG]
    present = set(keys)
    return [k for k in order if k in present]


def results_table(runs: Any, split: str = "test", *, metrics: str | Sequence[str] = "paper",
                  provenance: bool = True) -> Any:
    """A paper's results table: one row per run (run folders, their metrics.json files, or a folder holding runs),
    the ``split``'s metrics as columns in the papers' order (:func:`paper_metrics`; ``metrics="all"`` every key the
    run recorded, or a list of keys), led with provenance unless ``provenance=False``: model, dataset, ``seed``
    (``train.seed`` of the run's config.yaml), ``config`` (a digest of that config without its seed, output folder
    and name: runs differing only by seed share it, which :func:`seed_summary` groups by) and ``code`` (the commit
    its last start ran, from provenance.json). A run without metrics for ``split`` is an error naming the splits it
    has. Export: ``table.to_csv(path, index=False)``, ``table.to_latex(index=False, escape=True,
    float_format="%.2f", na_rep="--")`` (escape: metric and run names hold ``_``)."""
    import pandas as pd

    rows = []
    for name, src in _results_sources(runs).items():
        row = {"run": name, **(_provenance_row(Path(src)) if provenance else {})}
        metrics_file = read_metrics(src)
        values = (metrics_file.get("splits") or {}).get(split)
        if not isinstance(values, Mapping):
            have = sorted(metrics_file.get("splits") or {})
            raise InputError(f"results_table: {src} has no metrics of split {split!r}; it has "
                             f"{', '.join(map(repr, have)) or 'none'}")
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = (paper_metrics(list(numbers)) if metrics == "paper" else sorted(numbers) if metrics == "all"
                else name_list(metrics))
        row.update({k: numbers.get(k) for k in keys})
        rows.append(row)
    table = pd.DataFrame(rows)
    if metrics == "paper":  # one order over runs of several datasets: the papers' order of every key present
        meta = [c for c in table.columns if c in _PROVENANCE_COLUMNS]
        table = table[meta + paper_metrics([c for c in table.columns if c not in _PROVENANCE_COLUMNS])]
    return table


_PROVENANCE_COLUMNS = ("run", "model", "dataset", "seed", "config", "code")


def _results_sources(runs: Any) -> Mapping[str, Any]:
    """``runs`` as ``{name: run folder or metrics file}``; a folder that is no run is the folder of its runs."""
    if isinstance(runs, (str, os.PathLike)) and Path(runs).is_dir() and not (Path(runs) / "metrics.json").is_file():
        root = Path(runs)
        found = find_runs(root)
        done = {run.relative_to(root).as_posix(): run for run in found if (run / "metrics.json").is_file()}
        if not done:  # an empty table, and seed_summary's "no config column" after it, said nothing of why
            unfinished = f": {first_few([run.relative_to(root).as_posix() for run in found])}" if found else ""
            raise InputError(f"results_table: no run under {root} has a metrics.json ({len(found)} run folders"
                             f"{unfinished}); `cirlab train` writes it when a run ends, a run trained with "
                             "cirlab.fit or still training has none: pass `cirlab eval RUN --output FILE` files")
        return done
    return _named_runs(runs, "results_table")


def _provenance_row(src: Path) -> dict[str, Any]:
    """model, dataset, seed, config digest and code of the run at ``src``: its folder, its metrics.json, or a
    ``cirlab eval --output`` file (its model, code and checkpoint, whose run folder holds the config)."""
    import hashlib

    from cirlab.core.provenance import read_starts

    record = _json_or(src, {}) if src.is_file() and src.name != "metrics.json" else {}
    checkpoint = Path(str(record.get("checkpoint") or ""))
    run = (checkpoint.parent.parent if record and checkpoint.parent.name == "checkpoints"
           else src.parent if src.is_file() else src)
    config = _yaml_or(run / "config.yaml") or {}
    train = dict(config.get("train") or {})
    seed = train.pop("seed", None)
    same = {k: v for k, v in config.items() if k not in ("output_dir", "name", "train")}
    digest = hashlib.sha256(json.dumps({**same, "train": train}, sort_keys=True, default=str).encode()).hexdigest()
    try:
        starts = read_starts(run)
    except (OSError, ValueError):
        starts = []
    last = starts[-1] if starts and isinstance(starts[-1], dict) else {}
    return {"model": config.get("model") or record.get("model"), "dataset": (config.get("dataset") or {}).get("name"),
            "seed": seed, "config": digest[:10] if config else None, "code": record.get("code") or last.get("code")}


def seed_summary(table: Any, *, text: bool = False, digits: int = 2) -> Any:
    """:func:`results_table` over runs that differ only by seed, grouped (model, dataset, config): per metric the
    mean and the standard deviation over the seeds (pandas' sample std, ddof 1; 0 for one run), and ``n`` the runs;
    columns ``<metric>`` and ``<metric> std``. ``text=True``: each metric as one string ``"41.46 ± 1.44"``
    (``digits`` decimals), for a table to export as it is."""
    keys = [c for c in ("model", "dataset", "config") if c in table.columns]
    if not len(table):
        raise InputError("seed_summary: the table has no runs")
    if "config" not in keys:
        raise InputError("seed_summary: the table has no config column (results_table(..., provenance=True))")
    unknown = table[table["config"].isna()]
    if len(unknown):  # grouped together, an AMC and a CaLa result made one "mean" of two models
        raise InputError(f"seed_summary: no run config for {', '.join(map(str, unknown['run']))} (a metrics file away "
                         "from its run folder): which runs share a config is unknown; leave them out or keep them "
                         "beside their config.yaml")
    metric_columns = [c for c in table.columns if c not in _PROVENANCE_COLUMNS]
    grouped = table.groupby(keys, dropna=False, sort=False)[metric_columns]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    out = mean.copy()
    out.insert(0, "n", grouped.size())
    for column in metric_columns:
        if text:
            out[column] = [f"{m:.{digits}f} ± {s:.{digits}f}" if m == m else "--"
                           for m, s in zip(mean[column], std[column])]
        else:
            out[f"{column} std"] = std[column]
    if not text:
        out = out[["n", *(c for m in metric_columns for c in (m, f"{m} std"))]]
    return out.reset_index()


RESUME_STATE = "last.pt"  # under checkpoints/: the whole training state (model, optimizer, averaged weights)


def disk_use(run: str | os.PathLike) -> dict[str, int]:
    """``size``: the bytes of the files in run folder ``run`` (links not followed, nor counted); ``resume state``:
    those of ``checkpoints/``:data:`RESUME_STATE`, which a finished run keeps only to be continued (``epoch_*.pt``,
    kept on purpose for ``cirlab eval --checkpoint``, are not counted)."""
    run = Path(run)
    files = [Path(folder, name) for folder, _, names in os.walk(run) for name in names]
    linked = (run / "checkpoints").is_symlink()  # not walked, so not counted in size either
    return {"size": sum(map(_file_bytes, files)),
            "resume state": 0 if linked else _file_bytes(run / "checkpoints" / RESUME_STATE)}


def _file_bytes(path: Path) -> int:
    """A plain file's size; 0 for a link (its target is counted where it lies) or a file gone meanwhile (a running
    run's staged file)."""
    import stat

    try:
        info = os.lstat(path)
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _record(path: Path) -> tuple[dict[str, Any], bool]:
    """A record a run writes (config.yaml, a JSON file) as a mapping, and whether it is there but unreadable (the
    listing goes on with an empty one, and says so). Read once: `cirlab runs` of a few hundred runs is common."""
    if not path.is_file():
        return {}, False
    if path.suffix == ".yaml":
        data = _yaml_or(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
    return (data, False) if isinstance(data, dict) else ({}, True)


def _yaml_or(path: Path) -> dict[str, Any] | None:
    """A run's config.yaml as a mapping; {} where it is missing, None where it is there but unreadable."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    try:  # libyaml's parser where PyYAML has it: several times faster over a folder of runs
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------- CaLa and HREM traces
def layer_matrix(frame: Any, layer: str, query_id: Any | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """One traced layer of one query as a ``[destination x source]`` matrix with its labels in trace order (token
    strings for CaLa's HCA layers); ``query_id`` None takes the frame's first query."""
    require_columns(frame, ("layer", "source"), "the trace frame")
    rows = frame[frame["layer"] == layer]
    if rows.empty:  # before .iloc[0]: an unknown layer was an IndexError
        layers = ", ".join(map(str, frame["layer"].unique()))
        raise UnknownKeyError(f"no {layer!r} records in the frame; its layers: {layers}" if len(frame)
                              else f"no {layer!r} records: the frame is empty")
    if not _has_source(rows).any():  # was pandas' KeyError: 'source_code_index'
        raise InputError(f"layer {layer!r} has no source/destination rows (a gate layer, e.g. AMC's): layer_matrix "
                         "reads CaLa and HREM traces; gate_matrix reads gates")
    require_columns(frame, ("query_id", "destination", "code_index", "source_code_index", "weight"),
                    "the trace frame")
    if query_id is None:
        query_id = rows["query_id"].iloc[0]
    rows = rows[rows["query_id"].astype(str) == str(query_id)]
    if rows.empty:
        raise UnknownKeyError(f"no {layer!r} records for query {query_id!r}")
    d_idx, s_idx = rows["code_index"].astype(int).to_numpy(), rows["source_code_index"].astype(int).to_numpy()
    mat = np.zeros((d_idx.max() + 1, s_idx.max() + 1))
    mat[d_idx, s_idx] = rows["weight"].to_numpy(dtype=float)
    dests = dict(zip(d_idx, rows["destination"].astype(str)))
    sources = dict(zip(s_idx, rows["source"].astype(str)))
    return mat, [dests[i] for i in range(mat.shape[0])], [sources[j] for j in range(mat.shape[1])]


SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[DEC]")


def bridge_words(frame: Any, top: int = 15, skip_special: bool = True, whole_words: bool = True) -> Any:
    """CaLa's ``hca.bridge`` over all traced queries: per word, the mean and count of its bridge value (its share
    of reference query 0's expected hinge logit), the ``top`` words by mean absolute value, largest first.
    ``whole_words``: WordPiece continuations (``##gon``) are joined to the word they continue (``hexagon``), the
    word's value the sum of its pieces' (the bridge is a sum over tokens); ``False`` keeps one row per token."""
    top = whole_number(top, "top")  # head(-1) would drop the last word instead
    require_columns(frame, ("layer", "source", "weight"), "the CaLa trace frame")
    rows = frame[frame["layer"] == "hca.bridge"]
    if rows.empty:  # another model's trace gave an empty table without a word
        raise InputError(f"bridge_words needs a CaLa trace (rows of layer 'hca.bridge'); the frame's layers: "
                         f"{', '.join(map(str, frame['layer'].unique())) or '(none: it is empty)'}")
    if whole_words:
        rows = _join_word_pieces(rows)
    if skip_special:
        rows = rows[~rows["source"].isin(SPECIAL_TOKENS)]
    table = rows.groupby("source")["weight"].agg(["mean", "count"]).reset_index().rename(
        columns={"source": "word", "mean": "bridge"})
    table["abs"] = table["bridge"].abs()
    return table.sort_values(["abs", "word"], ascending=[False, True]).head(top).drop(columns="abs").reset_index(
        drop=True)


def _join_word_pieces(rows: Any) -> Any:
    """One row per word of each query: a ``##`` piece is appended to the token before it (in token order,
    ``source_code_index``) and its weight added."""
    pieces = rows["source"].astype(str).str.startswith("##")
    if not pieces.any():
        return rows
    require_columns(rows, ("query_id", "source_code_index"), "the CaLa trace frame")
    rows = rows.assign(_piece=pieces).sort_values(["query_id", "source_code_index"], kind="stable")
    word = (~rows["_piece"]).astype(int).groupby(rows["query_id"], sort=False).cumsum()
    join = lambda tokens: tokens.iloc[0] + "".join(t[2:] for t in tokens.iloc[1:])  # noqa: E731
    return (rows.groupby([rows["query_id"], word], sort=False)
            .agg(source=("source", join), weight=("weight", "sum")).reset_index(drop=True))


EDGE_BLOCKS = ("i2i", "i2t", "t2i", "t2t")


def relation_matrix(edges: Any, matrix: str = "relevance") -> tuple[np.ndarray, list[str], int]:
    """One matrix of HREM's joint graph (:func:`cirlab.models.hrem.relation_frames` ``"edges"``) as ``[2B, 2B]``
    with node labels (``img <id>`` then ``cap <id>``) and B; ``-inf`` (unconnected in the mask) becomes NaN."""
    require_frame(edges, "relation_matrix: edges", "pass hrem_relation(...)['edges']")
    require_columns(edges, ("matrix", "row", "col", "row_kind", "row_id", "weight"), "the relation frame")
    rows = edges[edges["matrix"] == matrix]
    if rows.empty:
        raise UnknownKeyError(f"no {matrix!r} matrix in the relation frame (has: {sorted(edges['matrix'].unique())})")
    n = int(rows["row"].max()) + 1
    mat = np.full((n, n), np.nan)
    mat[rows["row"].astype(int), rows["col"].astype(int)] = rows["weight"].to_numpy(dtype=float)
    mat[~np.isfinite(mat)] = np.nan
    first = rows.drop_duplicates("row").sort_values("row")
    labels = [f"{'img' if k == 'image' else 'cap'} {i}" for k, i in zip(first["row_kind"], first["row_id"])]
    return mat, labels, int((first["row_kind"] == "image").sum())


def relation_block_means(edges: Any) -> Any:
    """Mean finite weight per matrix and edge type (i2i, i2t, t2i, t2t) of HREM's relation frame."""
    finite = edges[np.isfinite(edges["weight"].to_numpy(dtype=float))]
    return finite.pivot_table(index="matrix", columns="edge_type", values="weight", aggfunc="mean").reindex(
        columns=list(EDGE_BLOCKS))


def _word_region_frame(word_region: Any, value: str, what: str) -> None:
    require_frame(word_region, f"{what}: word_region", "pass hrem_relation(...)['word_region']")
    require_columns(word_region, ("image_id", "word_pos", "word", "real_word", "region"), "the word-region frame")
    if value not in word_region.columns:
        raise UnknownKeyError(f"value={value!r} is not a column of the word-region frame; columns: "
                              f"{', '.join(map(str, word_region.columns))}")


def image_key(word_region: Any, image_id: Any) -> Any:
    """``image_id`` as it is in the frame's ``image_id`` column ('3' is 3); an unknown id lists the batch's images."""
    images = list(dict.fromkeys(word_region["image_id"]))
    if image_id in images:
        return image_id
    if isinstance(image_id, str) and image_id.strip().lstrip("-").isdigit() and int(image_id) in images:
        return images[images.index(int(image_id))]
    raise UnknownKeyError(f"image_id {image_id!r} is not in the word-region frame; its images: "
                          f"{', '.join(map(str, images)) or '(none)'}")


def word_region_matrix(word_region: Any, image_id: Any, value: str = "score",
                       real_words: bool = True) -> tuple[np.ndarray, list[str]]:
    """HREM's word-region relevance of one caption against one image: ``[words x regions]`` and the words. A string
    of a known integer id ('3') is that id."""
    _word_region_frame(word_region, value, "word_region_matrix")
    image_id = image_key(word_region, image_id)
    rows = word_region[word_region["image_id"] == image_id]
    if real_words:
        rows = rows[rows["real_word"]]
    if rows.empty:
        raise UnknownKeyError(f"no word-region scores against image {image_id!r}")
    mat = rows.pivot_table(index="word_pos", columns="region", values=value, aggfunc="first")
    words = rows.drop_duplicates("word_pos").set_index("word_pos").loc[mat.index, "word"].astype(str).tolist()
    return mat.to_numpy(dtype=float), words


def word_image_matrix(word_region: Any, value: str = "score",
                      real_words: bool = True) -> tuple[np.ndarray, list[str], list[Any]]:
    """Per word of the caption, its best region score against every image of the batch: ``[words x images]``."""
    _word_region_frame(word_region, value, "word_image_matrix")
    rows = word_region[word_region["real_word"]] if real_words else word_region
    mat = rows.pivot_table(index="word_pos", columns="image_id", values=value, aggfunc="max")
    words = rows.drop_duplicates("word_pos").set_index("word_pos").loc[mat.index, "word"].astype(str).tolist()
    return mat.to_numpy(dtype=float), words, list(mat.columns)
