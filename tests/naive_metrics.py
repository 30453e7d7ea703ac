"""Naive per-query loops: the oracles that cirlab.core.metrics and cirlab.core.retrieval must equal.

They follow the original code's shape (one argsort per query, then look the target up), written in NumPy with a
*stable* sort so that ties resolve toward the lower gallery index, cirlab's documented rule. They are slow on
purpose and used only in tests and in bench/metrics.py.
"""
from __future__ import annotations

import math

import numpy as np


def ranking(row: np.ndarray) -> np.ndarray:
    """Gallery indices by descending score; equal scores keep the lower index first (stable sort)."""
    return np.argsort(-np.asarray(row), kind="stable")


def naive_rank(row: np.ndarray, target: int, exclude: int = -1) -> int | None:
    """1-based rank of ``target`` once ``exclude`` is removed from the ranking; None when target was removed."""
    order = ranking(row)
    order = order[order != exclude]  # C.5: names[names != reference]
    pos = np.nonzero(order == target)[0]
    return int(pos[0]) + 1 if len(pos) else None


def naive_ranks(scores: np.ndarray, target, exclude=None) -> list[int | None]:
    exclude = [-1] * len(scores) if exclude is None else exclude
    return [naive_rank(scores[q], int(target[q]), int(exclude[q])) for q in range(len(scores))]


def naive_recall(scores: np.ndarray, target, ks, exclude=None) -> dict[str, float]:
    ranks = naive_ranks(scores, target, exclude)
    return {f"R@{k}": 100.0 * sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}


def naive_cirr(scores: np.ndarray, target, reference, members) -> dict[str, float]:
    """C.5 written as a loop: rank the gallery, drop the reference, then restrict to the img_set."""
    hits = {k: 0 for k in (1, 5, 10, 50)}
    sub_hits = {k: 0 for k in (1, 2, 3)}
    n = len(scores)
    for q in range(n):
        names = ranking(scores[q])
        names = names[names != reference[q]]
        labels = names == target[q]
        for k in hits:
            hits[k] += bool(labels[:k].any())
        group = names[np.isin(names, [m for m in members[q] if m >= 0])]
        group_labels = group == target[q]
        for k in sub_hits:
            sub_hits[k] += bool(group_labels[:k].any())
    out = {f"R@{k}": 100.0 * v / n for k, v in hits.items()}
    out.update({f"cirr_Rsubset@{k}": 100.0 * v / n for k, v in sub_hits.items()})
    out["avg"] = (out["R@5"] + out["cirr_Rsubset@1"]) / 2
    return out


def naive_i2t_ranks(sims: np.ndarray, per_image: int = 5) -> np.ndarray:
    """VSE++ ``i2t`` loop: 0-based best rank among the image's captions."""
    ranks = np.zeros(len(sims), dtype=np.int64)
    for i in range(len(sims)):
        inds = ranking(sims[i])
        ranks[i] = min(np.nonzero(inds == j)[0][0] for j in range(per_image * i, per_image * (i + 1)))
    return ranks


def naive_t2i_ranks(sims: np.ndarray, per_image: int = 5) -> np.ndarray:
    """VSE++ ``t2i`` loop: 0-based rank of each caption's image."""
    st = sims.T
    ranks = np.zeros(len(st), dtype=np.int64)
    for c in range(len(st)):
        inds = ranking(st[c])
        ranks[c] = np.nonzero(inds == c // per_image)[0][0]
    return ranks


def naive_direction(ranks0: np.ndarray, direction: str) -> dict[str, float]:
    out = {f"{direction}_R@{k}": 100.0 * len(np.nonzero(ranks0 < k)[0]) / len(ranks0) for k in (1, 5, 10)}
    out[f"{direction}_medr"] = float(math.floor(np.median(ranks0)) + 1)
    out[f"{direction}_meanr"] = float(ranks0.mean() + 1)
    return out


def naive_itm(sims: np.ndarray, per_image: int = 5) -> dict[str, float]:
    out = {**naive_direction(naive_i2t_ranks(sims, per_image), "i2t"),
           **naive_direction(naive_t2i_ranks(sims, per_image), "t2i")}
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def naive_coco_1k(sims: np.ndarray, folds: int = 5, per_image: int = 5) -> dict[str, float]:
    n = len(sims) // folds
    per = [naive_itm(sims[f * n:(f + 1) * n, f * n * per_image:(f + 1) * n * per_image], per_image)
           for f in range(folds)]
    return {key: float(np.mean([m[key] for m in per])) for key in per[0]}


# the vectorised oracle printed in hrem_itm.md 7.6 (strict count: "optimistic" ties)
def hrem_i2t_ranks(sims: np.ndarray) -> np.ndarray:
    n = sims.shape[0]
    best = sims.reshape(n, n, 5)[np.arange(n), np.arange(n)].max(1)
    return (sims > best[:, None]).sum(1)


def hrem_t2i_ranks(sims: np.ndarray) -> np.ndarray:
    s = sims.T
    q = np.arange(s.shape[0])
    return (s > s[q, q // 5][:, None]).sum(1)


def naive_topk(scores: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Full stable sort per query, reference removed, first k."""
    idx, val = [], []
    for q in range(len(scores)):
        order = ranking(scores[q])
        if exclude is not None:
            order = order[order != exclude[q]]
        idx.append(order[:k])
        val.append(scores[q][order[:k]])
    return np.stack(val), np.stack(idx)
