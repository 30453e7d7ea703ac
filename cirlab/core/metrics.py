"""Protocol-exact retrieval metrics: tensors in, plain dicts of floats (percent) out.

Every function here is pure (no I/O, no globals) and vectorised; the naive per-query loops they must equal
live in ``tests/naive_metrics.py``. Protocols, as the papers' public evaluation code computes them (CLIP4Cir,
the re-ranking paper and CaLa for Fashion-IQ/CIRR; AMC for Shoes; VSE++/DIME/HREM ``evaluation.py`` for ITM):

* **Fashion-IQ** (CLIP4Cir / Re-ranking / CaLa): per category R@10 and R@50 over that category's val
  gallery, the reference is *not* removed; ``avg_R@10`` / ``avg_R@50`` are the means over categories and
  ``avg`` (the paper's "overall") is their mean. The AMC variant removes the reference: pass ``exclude``.
* **Shoes** (AMC): R@1/10/50 with the reference removed, ``avg`` = their mean.
* **CIRR**: R@1/5/10/50 with the reference removed from the gallery, Recall_subset@1/2/3 over the
  ``img_set`` members (reference removed; the subset ranking is the global ranking restricted to the set),
  ``avg`` = (R@5 + Rsubset@1) / 2. :func:`cirr_submission` builds the test-server JSON. A two-stage re-ranker
  scores the members itself (they need not be among its top-K), so its subset ranking breaks ties by the rule
  below (lower gallery index), while its re-ranked top-K keeps stage I's order on ties
  (:func:`cirlab.core.retrieval.reorder`): with tied stage-II scores the two lists may order members differently.
* **ITM** (VSE++/SCAN/GPO/HREM ``mode='coco'``, HREM and DIME evaluation code): ``sims`` is [N images x 5N captions]
  with captions ``5i..5i+4`` belonging to image ``i``; i2t ranks an image by its best caption, t2i ranks each caption's
  image; R@1/5/10, ``medr = floor(median(rank0)) + 1`` (NumPy median: the mean of the two middle values for an even
  count, *not* ``torch.median``'s lower middle value), ``meanr = mean(rank0) + 1``, ``rsum`` = the six recalls.
  COCO 1K = the mean of every metric over 5 folds of 1,000 images; COCO 5K and Flickr30K 1K = the full matrix.

**Ties.** The original code sorts with ``np.argsort``/``torch.argsort`` (unstable), so a tied target lands at an
arbitrary place. cirlab's default, ``ties="stable"``, resolves ties toward the lower gallery index, as a stable
sort of the descending scores does: the 1-based rank of the target is
``1 + #(scores strictly greater) + #(scores equal at a lower gallery index)``. ``ties="optimistic"`` counts only
strictly greater scores (the HREM evaluation's); ``ties="pessimistic"`` puts every tied item first.

**Exclusion.** ``exclude`` holds one gallery index per query (``-1``: none), the reference image. It is removed
from that query's ranking exactly as the re-ranking code's ``names[names != reference]`` does (equivalently AMC's
``sims[i, ref] = -1e11``). A target equal to its own excluded reference is never a hit (its rank is reported as
``G + 1``, past every rankable item).

Do not use torchmetrics' retrieval metrics here: they drop scores <= 0, which changes the ranks.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from cirlab.core.config import FieldValueError, name_list, whole_number
from cirlab.core.errors import InputError, refuse_entries
from cirlab.core.metric_keys import (  # the names, without torch; re-exported here
    AVG, AVG_DEFINITIONS, CIRR_KS, CIRR_SUBMISSION_K, CIRR_SUBSET_KS, CIRR_VERSION, FIQ_CATEGORIES, FIQ_KS, ITM_KS,
    RECALL_KS, RSUM, SHOES_KS, TIES, is_recall_key, itm_key, recall_key, subset_key)

__all__ = [
    "AVG", "AVG_DEFINITIONS", "RSUM", "TIES", "FIQ_CATEGORIES", "FIQ_KS", "SHOES_KS", "CIRR_KS", "RECALL_KS",
    "CIRR_SUBSET_KS", "ITM_KS",
    "recall_key", "is_recall_key", "subset_key", "itm_key",
    "target_ranks", "removed_targets_missed", "recall_from_ranks", "recall_at_k",
    "fashioniq_metrics", "shoes_metrics",
    "cirr_subset_ranks", "cirr_metrics", "cirr_metrics_from_ranks", "cirr_submission", "validate_cirr_submission",
    "itm_ranks", "i2t_ranks", "t2i_ranks", "itm_metrics_from_ranks", "itm_metrics", "coco_1k_metrics",
    "coco_1k_folds", "fold_mean_metrics", "coco_5k_metrics",
]

ScoresLike = Any  # a tensor or anything torch.as_tensor accepts (numpy arrays, memmaps, lists)
_NEVER = torch.iinfo(torch.long).max  # rank that no recall cut-off reaches (a target removed with its reference)


# ---------------------------------------------------------------------------------------------------- input checks
def whole_argument(value: Any, name: str, low: int = 1) -> int:
    """``value`` as an int when it is a whole number >= ``low`` (a chunk size, a fold count), else one
    :class:`InputError` line naming ``name``. The chunked loops ``range(0, n, chunk)`` do nothing for a negative step
    (the output kept uninitialised memory as ranks), and 0 or 1.5 failed inside ``range`` as a bare error.
    :func:`cirlab.core.retrieval.topk_search` checks its chunk sizes with this too. The rule is
    :func:`cirlab.core.config.whole_number`'s; an argument of a function is an input, not a config field."""
    try:
        return whole_number(value, name, low)
    except FieldValueError as err:
        raise InputError(str(err)) from None


def _as_scores(scores: ScoresLike) -> Tensor:
    s = torch.as_tensor(scores)  # shares memory with numpy inputs: no full-size copy
    if s.ndim != 2:
        raise InputError(f"scores must be a 2-D [queries x gallery] matrix, got shape {tuple(s.shape)}")
    return s


def _refuse_entries(bad: Tensor, values: Tensor, what: str) -> None:
    """One line naming how many entries of ``values`` (1-D) are ``bad`` and the first few positions and values."""
    if bool(bad.any()):  # the check stays on the tensors' device; only a refusal copies them to the CPU
        refuse_entries(bad.cpu(), values.cpu(), what)


def _whole_entries(t: Tensor, name: str) -> Tensor:
    """``t`` as int64; float entries must be whole, since ``.long()`` would silently truncate 2.7 to 2."""
    if t.is_floating_point():
        _refuse_entries(~torch.isfinite(t) | (t != t.floor()), t, f"{name} must hold whole numbers")
    return t.long()


def _as_index(x: ScoresLike | None, n: int, name: str, device: torch.device, fill: int = -1) -> Tensor:
    if x is None:
        return torch.full((n,), fill, dtype=torch.long, device=device)
    t = _whole_entries(torch.as_tensor(x, device=device).reshape(-1), name)
    if len(t) != n:
        raise InputError(f"{name} has {len(t)} entries for {n} queries")
    return t


def _check_range(idx: Tensor, size: int, name: str, allow_missing: bool) -> None:
    low = -1 if allow_missing else 0
    bad = (idx < low) | (idx >= size)
    if bad.any():
        q = int(bad.nonzero()[0, 0])
        raise InputError(f"{name}[{q}] = {int(idx[q])} is not a gallery index in [0, {size})")


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise InputError(f"ties must be one of {TIES}, got {ties!r}")


def first_nan_row(block: Tensor) -> int | None:
    """The first row of ``block`` [rows, cols] that holds a NaN, None when none does: every ranking path refuses
    such a row (NaN compares false both ways, so it would rank anywhere)."""
    rows = torch.isnan(block).any(1)
    return int(rows.nonzero()[0, 0]) if bool(rows.any()) else None


def _check_finite_rows(block: Tensor, row0: int) -> None:
    row = first_nan_row(block)
    if row is not None:
        raise InputError(f"scores row {row0 + row} contains NaN: a ranking is undefined")


# ---------------------------------------------------------------------------------------------------- ranks
def _count(mask: Tensor, dim: int) -> Tensor:
    """Count True along ``dim``; summing bytes into int32 avoids the int64 copy a bool ``sum`` makes (3x faster)."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32).long()


def _ahead_count(block: Tensor, t: Tensor, target: Tensor, ties: str) -> Tensor:
    """Per row, how many gallery items rank before the target (0-based rank, before exclusion)."""
    ahead = block > t  # [b, G]
    if ties != "optimistic":
        tied = block == t
        cols = torch.arange(block.shape[1], device=block.device)
        # stable: a tie counts only at a lower gallery index; pessimistic: every other tie counts
        tied &= cols < target[:, None] if ties == "stable" else cols != target[:, None]
        ahead |= tied
    return _count(ahead, 1)


def _excluded_ahead(block: Tensor, t: Tensor, target: Tensor, exclude: Tensor, ties: str) -> Tensor:
    """1 where the excluded item was counted ahead of the target (so removing it moves the target up)."""
    has = exclude >= 0
    se = block.gather(1, exclude.clamp(min=0)[:, None])  # [b, 1]
    ahead = se > t
    if ties == "stable":
        ahead |= (se == t) & (exclude < target)[:, None]
    elif ties == "pessimistic":
        ahead |= (se == t) & (exclude != target)[:, None]
    return (ahead[:, 0] & has).long()


def _rank_block(block: Tensor, target: Tensor, exclude: Tensor, ties: str) -> Tensor:
    t = block.gather(1, target[:, None])  # [b, 1] the target's score
    rank = _ahead_count(block, t, target, ties) - _excluded_ahead(block, t, target, exclude, ties) + 1
    return torch.where(target == exclude, block.shape[1] + 1, rank)


def target_ranks(scores: ScoresLike, target: ScoresLike, exclude: ScoresLike | None = None, *,
                 ties: str = "stable", chunk_size: int = 1024) -> Tensor:
    """1-based rank of each query's target in its descending-score ranking of the gallery.

    Rank = 1 + #(strictly greater scores) + #(equal scores at a lower gallery index) with ``ties="stable"`` (the
    order of a stable descending sort). The excluded item (one gallery index per query, -1 for none) is removed
    from the ranking; a target equal to its excluded item gets rank ``G + 1``. Rows are processed ``chunk_size`` at
    a time, so extra memory is O(chunk_size x G) whatever the number of queries.

    Args:
        scores: [Q, G] similarity matrix (higher = better).
        target: [Q] gallery index of each query's target.
        exclude: [Q] gallery index to remove per query (the reference image), -1 for none.
        ties: "stable" (lower index first), "optimistic" (only strictly greater counts) or "pessimistic".
        chunk_size: query rows per block.

    Examples:
        >>> s = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.8, 0.3]])
        >>> target_ranks(s, torch.tensor([2, 2])).tolist()
        [3, 2]
        >>> target_ranks(s, torch.tensor([2, 2]), exclude=torch.tensor([0, 1])).tolist()
        [2, 1]
    """
    _check_ties(ties)
    chunk_size = whole_argument(chunk_size, "chunk_size")
    s = _as_scores(scores)
    q, g = s.shape
    tgt = _as_index(target, q, "target", s.device)
    exc = _as_index(exclude, q, "exclude", s.device)
    _check_range(tgt, g, "target", allow_missing=False)
    _check_range(exc, g, "exclude", allow_missing=True)
    out = torch.empty(q, dtype=torch.long, device=s.device)
    for r0 in range(0, q, chunk_size):
        r1 = min(q, r0 + chunk_size)
        block = s[r0:r1]
        _check_finite_rows(block, r0)
        out[r0:r1] = _rank_block(block, tgt[r0:r1], exc[r0:r1], ties)
    return out


def _as_ranks(ranks: ScoresLike, name: str = "ranks") -> Tensor:
    """``ranks`` as a 1-D tensor of 1-based ranks: a 0 or negative rank would count as a hit for every K, and a
    fractional or NaN one has no place in a ranking. Float ranks keep their dtype (+inf is a miss for every K)."""
    r = torch.as_tensor(ranks).reshape(-1)
    if len(r) == 0:
        raise InputError("recall of an empty query set is undefined")
    bad = ~(r >= 1)  # NaN fails the comparison too
    if r.is_floating_point():
        bad |= r != r.floor()
    _refuse_entries(bad, r, f"{name} must be whole 1-based ranks >= 1")
    return r


def _as_ks(ks: int | Sequence[int], name: str = "ks") -> list[int]:
    """Recall cut-offs as whole numbers >= 1, one int meaning ``[k]``; repeats are dropped so that an average over
    the cut-offs (Shoes, Fashion-IQ) counts each once. A tensor is read as a NumPy array is (its iteration gave
    0-d tensors, which are no ints)."""
    if isinstance(ks, Tensor):
        ks = ks.tolist()
    out = list(dict.fromkeys(whole_number(k, name) for k in name_list(ks)))
    if not out:
        raise InputError(f"{name} must name at least one recall cut-off, got {ks!r}")
    return out


def _percent(hits: torch.Tensor) -> float:
    """The share of true entries of ``hits`` in percent, as ``100 * count / n`` (NaN for none): ``100 * mean`` put the
    mean's rounding in the last digit (0.575 -> 57.49999999999999), which every CSV of the metrics copied."""
    n = hits.numel()
    return 100.0 * int(hits.sum()) / n if n else float("nan")


def recall_from_ranks(ranks: ScoresLike, ks: int | Sequence[int], prefix: str = "") -> dict[str, float]:
    """Recall@K in percent from 1-based ranks: ``100 * mean(rank <= k)`` over all queries.

    Ranks below 1, NaN or fractional are refused (filter out unknown targets, rank 0, first); ``ks`` may be one int.

    Examples:
        >>> recall_from_ranks(torch.tensor([1, 3, 12, 2]), ks=(1, 10))
        {'R@1': 25.0, 'R@10': 75.0}
    """
    ks = _as_ks(ks)
    r = _as_ranks(ranks)
    return {recall_key(k, prefix): _percent(r <= k) for k in ks}


def recall_at_k(scores: ScoresLike, target: ScoresLike, ks: int | Sequence[int], exclude: ScoresLike | None = None, *,
                ties: str = "stable", chunk_size: int = 1024, prefix: str = "") -> dict[str, float]:
    """Recall@K in percent: the share of queries whose target ranks within the top K (see :func:`target_ranks`).

    A query whose target equals its excluded reference is a miss for every K (the CIR protocols remove the reference).

    Examples:
        >>> s = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.8, 0.3]])
        >>> recall_at_k(s, torch.tensor([2, 2]), ks=(1, 2))
        {'R@1': 0.0, 'R@2': 50.0}
        >>> recall_at_k(s, torch.tensor([2, 2]), ks=(1, 2), exclude=torch.tensor([0, 1]))
        {'R@1': 50.0, 'R@2': 100.0}
    """
    return recall_from_ranks(_hit_ranks(scores, target, exclude, ties, chunk_size), ks, prefix)


def _hit_ranks(scores: ScoresLike, target: ScoresLike, exclude: ScoresLike | None, ties: str,
               chunk_size: int = 1024) -> Tensor:
    """Ranks for recall: a target removed together with its reference can never be a hit."""
    return removed_targets_missed(target_ranks(scores, target, exclude, ties=ties, chunk_size=chunk_size),
                                  target, exclude)


def removed_targets_missed(ranks: ScoresLike, target: ScoresLike, exclude: ScoresLike | None) -> Tensor:
    """``ranks`` with each target that is its own excluded reference set to a rank no recall cut-off reaches:
    removed with the reference, it is a miss whatever the gallery size (its ``target_ranks`` rank, ``G + 1``,
    would be a hit at any K above G). Unknown targets (-1) are left as they are."""
    r = torch.as_tensor(ranks).reshape(-1)
    if exclude is None:
        return r
    tgt = torch.as_tensor(target, device=r.device).reshape(-1)
    return r.masked_fill((tgt == torch.as_tensor(exclude, device=r.device).reshape(-1)) & (tgt >= 0), _NEVER)


# ---------------------------------------------------------------------------------------------------- CIR: FIQ, Shoes
RanksOrScores = Union[Tensor, Sequence]


def _is_matrix(x: Any) -> bool:
    """2-D: an array of ndim >= 2, or a sequence whose first item is itself a sequence or an array."""
    if hasattr(x, "ndim"):
        return x.ndim >= 2
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)) or len(x) == 0:
        return False
    inner = x[0]
    return getattr(inner, "ndim", 0) >= 1 or (isinstance(inner, Sequence) and not isinstance(inner, (str, bytes)))


def _is_scores_entry(entry: RanksOrScores) -> bool:
    """A ``(scores, target[, exclude])`` tuple or list starts with a matrix (an array or a nested sequence); a flat
    list of numbers such as ``[1, 3, 12]`` is ready ranks, and so is a [Q, 1] nested list such as ``[[1], [9]]``
    (a [Q, 1] tensor's ``.tolist()``): its first item is one row, not a scores matrix."""
    if not isinstance(entry, (tuple, list)) or len(entry) == 0:
        return False
    return _is_matrix(entry[0])


_ENTRY_FORMS = "1-based ranks [Q] (or [Q, 1]), or a (scores [Q, G], target[, exclude]) tuple"


def _ranks_of(entry: RanksOrScores, ties: str) -> Tensor:
    """Accept ready ranks ([Q] or [Q, 1] tensor, array or list) or a ``(scores, target[, exclude])`` tuple."""
    if _is_scores_entry(entry):
        if len(entry) not in (2, 3):
            raise InputError(f"a (scores, target[, exclude]) entry has 2 or 3 items, got {len(entry)}")
        return _hit_ranks(*entry, ties=ties) if len(entry) == 3 else _hit_ranks(*entry, None, ties=ties)
    try:
        ranks = torch.as_tensor(entry)
    except (ValueError, TypeError, RuntimeError):  # ragged, e.g. a tuple whose scores are not 2-D
        raise InputError(f"expected {_ENTRY_FORMS}; got a {type(entry).__name__} that is neither") from None
    if sum(d > 1 for d in ranks.shape) > 1:  # a matrix is not a list of ranks: flattened, it counted as Q x G ranks
        raise InputError(f"expected {_ENTRY_FORMS}; got ranks of shape {tuple(ranks.shape)}")
    return ranks.reshape(-1)


def fashioniq_metrics(per_category: Mapping[str, RanksOrScores], *, ks: int | Sequence[int] = FIQ_KS,
                      ties: str = "stable") -> dict[str, float]:
    """Fashion-IQ: per-category R@10/R@50, their means over categories, and ``avg`` = mean of those means.

    Protocol (CLIP4Cir / Re-ranking / CaLa): each category is evaluated on its own val gallery
    (``split.{cat}.val.json``) and the reference is *not* removed. AMC removes the reference and uses the
    union of the caption file's images as gallery: pass ``(scores, target, exclude)`` with that gallery.
    The paper's "overall" is ``avg`` = (avg_R@10 + avg_R@50) / 2.

    Args:
        per_category: category -> 1-based target ranks [Q] (a tensor, array or flat list), or a
            ``(scores, target[, exclude])`` tuple.
        ks: recall cut-offs (the protocol's 10 and 50).

    Examples:
        >>> m = fashioniq_metrics({"dress": torch.tensor([1, 20, 60]), "shirt": torch.tensor([5, 5, 100])})
        >>> round(m["dress_R@50"], 2), round(m["avg_R@10"], 2), round(m["avg"], 2)
        (66.67, 50.0, 58.33)
    """
    if not isinstance(per_category, Mapping):  # a list of ranks failed as "'list' object has no attribute 'items'"
        raise InputError(f"fashioniq_metrics takes {{category: ranks or (scores, target)}}, got a "
                         f"{type(per_category).__name__} (one category: {{'dress': ranks}})")
    if not per_category:
        raise InputError("fashioniq_metrics needs at least one category")
    ks = _as_ks(ks)
    out: dict[str, float] = {}
    for cat, entry in per_category.items():
        out.update(recall_from_ranks(_ranks_of(entry, ties), ks, prefix=cat))
    for k in ks:
        out[recall_key(k, "avg")] = sum(out[recall_key(k, c)] for c in per_category) / len(per_category)
    out[AVG] = sum(out[recall_key(k, "avg")] for k in ks) / len(ks)
    return out


def shoes_metrics(entry: RanksOrScores, *, ks: int | Sequence[int] = SHOES_KS,
                  ties: str = "stable") -> dict[str, float]:
    """Shoes (AMC): R@1/10/50 with the reference removed, and ``avg`` = their mean.

    Args:
        entry: 1-based target ranks [Q] (a tensor, array or flat list), or ``(scores, target, exclude)`` with
            ``exclude`` the reference index.

    Examples:
        >>> shoes_metrics(torch.tensor([1, 9, 49, 51]))
        {'R@1': 25.0, 'R@10': 50.0, 'R@50': 75.0, 'avg': 50.0}
    """
    ks = _as_ks(ks)
    out = recall_from_ranks(_ranks_of(entry, ties), ks)
    out[AVG] = sum(out.values()) / len(ks)
    return out


# ---------------------------------------------------------------------------------------------------- CIR: CIRR
def _subset_mask(members: Tensor, target: Tensor, reference: Tensor) -> Tensor:
    """Members that take part in the subset ranking: present, not the reference, not the target, not repeated."""
    m = members.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=members.device).tril(-1)  # [m, m'] m' < m
    repeated = ((members[:, :, None] == members[:, None, :]) & earlier).any(2)  # isin() counts a name once
    return (members >= 0) & (members != reference[:, None]) & (members != target[:, None]) & ~repeated


def members_table(members: ScoresLike, n_queries: int, device: torch.device | str | None = None) -> Tensor:
    """``img_set`` members as a [Q, M] int64 table: whole gallery indices, each query's list padded with -1 to one
    length (the contract of :func:`cirr_subset_ranks`; ragged lists failed inside torch as "expected sequence of
    length 2"). :func:`cirlab.core.retrieval.subset_topk` reads its members with this too."""
    try:
        t = torch.as_tensor(members, device=device)
    except (ValueError, TypeError):
        try:
            got = f"lists of lengths {sorted({len(m) for m in members})}"
        except TypeError:
            got = type(members).__name__
        raise InputError(f"members must be one list per query padded with -1 to one length, got {got}") from None
    if (t.ndim == 2 and len(t) != n_queries) or t.ndim == 0 or (n_queries and t.numel() % n_queries):
        raise InputError(f"members must be a [{n_queries} queries x M] table, got shape {tuple(t.shape)}")
    return _whole_entries(t.reshape(-1), "members").reshape(n_queries, -1)


def cirr_subset_ranks(scores: ScoresLike, target: ScoresLike, reference: ScoresLike, members: ScoresLike, *,
                      ties: str = "stable") -> Tensor:
    """1-based rank of the target among the ``img_set`` members with the reference removed.

    The re-ranking code restricts the global ranking to the set (``isin(names, members)``), so the subset rank counts
    the members whose score beats the target's (ties as in :func:`target_ranks`).

    Args:
        scores: [Q, G] scores.
        target: [Q] gallery index of ``target_hard``.
        reference: [Q] gallery index of the reference.
        members: [Q, M] gallery indices of ``img_set.members`` (6 in CIRR, reference included); -1 pads.

    A target that is its own reference is removed with it and gets rank ``M + 1`` (a miss for Recall_subset@1/2/3).

    Examples:
        >>> s = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6]])
        >>> cirr_subset_ranks(s, [3], [1], [[1, 2, 3, 4]]).tolist()
        [2]
    """
    _check_ties(ties)
    s = _as_scores(scores)
    q, g = s.shape
    tgt = _as_index(target, q, "target", s.device)
    ref = _as_index(reference, q, "reference", s.device)
    mem = members_table(members, q, s.device)
    _check_range(tgt, g, "target", allow_missing=False)
    _check_range(mem.reshape(-1), g, "members (flattened)", allow_missing=True)
    missing = ~(mem == tgt[:, None]).any(1)
    if missing.any():
        i = int(missing.nonzero()[0, 0])
        raise InputError(f"query {i}: target {int(tgt[i])} is not among its img_set members {mem[i].tolist()}")
    sm = s.gather(1, mem.clamp(min=0))  # [Q, M]
    st = s.gather(1, tgt[:, None])  # [Q, 1]
    # NaN compares false both ways: a NaN target came out first (a diverged re-ranker scored 100); the removed
    # reference's score plays no part
    refuse_nan_members(sm, (mem >= 0) & (mem != ref[:, None]))
    ahead = sm > st
    if ties == "stable":
        ahead |= (sm == st) & (mem < tgt[:, None])
    elif ties == "pessimistic":
        ahead |= sm == st
    ranks = (ahead & _subset_mask(mem, tgt, ref)).sum(1) + 1
    # a target that is the reference itself is removed with it, as the global ranking removes it (target_ranks):
    # the original's restriction of that ranking to the set finds no target, a miss at every cut-off
    return ranks.masked_fill(tgt == ref, mem.shape[1] + 1)


def refuse_nan_members(member_scores: Tensor, keep: Tensor) -> None:
    """One line naming the first query whose ranked ``img_set`` members (``keep``, [Q, M]) have a NaN score: their
    ranking is undefined (the subset ranks and the submission's ``recall_subset`` lists both refuse it)."""
    row = first_nan_row(member_scores.masked_fill(~keep, 0.0))
    if row is not None:
        raise InputError(f"query {row}: scores contain NaN among its img_set members")


def cirr_metrics_from_ranks(ranks: ScoresLike, subset_ranks: ScoresLike) -> dict[str, float]:
    """CIRR metrics from 1-based global ranks (reference removed) and subset ranks (e.g. after re-ranking).

    Examples:
        >>> m = cirr_metrics_from_ranks(torch.tensor([1, 7]), torch.tensor([1, 2]))
        >>> m["R@5"], m["cirr_Rsubset@1"], m["avg"]
        (50.0, 50.0, 50.0)
    """
    out = recall_from_ranks(ranks, CIRR_KS)
    sub = _as_ranks(subset_ranks, "subset_ranks")
    out.update({subset_key(k): _percent(sub <= k) for k in CIRR_SUBSET_KS})
    out[AVG] = (out[recall_key(5)] + out[subset_key(1)]) / 2
    return out


def cirr_metrics(scores: ScoresLike, target: ScoresLike, reference: ScoresLike, members: ScoresLike, *,
                 ties: str = "stable", chunk_size: int = 1024) -> dict[str, float]:
    """CIRR val protocol: R@1/5/10/50 and Recall_subset@1/2/3 with the reference removed.

    ``avg`` = (R@5 + Rsubset@1) / 2, the headline number. Denominators are all queries.

    Args:
        scores: [Q, G] query-gallery scores over the split's gallery (``split.rc2.val.json`` order).
        target: [Q] gallery index of ``target_hard``.
        reference: [Q] gallery index of the reference image (removed from its own ranking).
        members: [Q, M] gallery indices of ``img_set.members`` (-1 pads).

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.2, 0.4, 0.6, 0.9]])
        >>> m = cirr_metrics(s, [2, 1], [0, 3], [[0, 2, 3], [1, 2, 3]])
        >>> m["R@1"], m["cirr_Rsubset@1"], m["avg"]
        (50.0, 50.0, 75.0)
    """
    subset = cirr_subset_ranks(scores, target, reference, members, ties=ties)  # cheap, and validates the inputs
    return cirr_metrics_from_ranks(_hit_ranks(scores, target, reference, ties, chunk_size), subset)


def cirr_submission(pair_ids: Sequence[int | str], ranked_names: Sequence[Sequence[str]],
                    subset_names: Sequence[Sequence[str]]) -> dict[str, dict[str, object]]:
    """The two CIRR test-server dicts: ``{"recall": {...}, "recall_subset": {...}}``.

    Each dict holds ``"version": "rc2"``, ``"metric"`` and ``str(int(pairid)) -> names``: the top-50 global
    predictions with the reference removed, and the top-3 of the non-reference set members, best first. Both are
    checked with :func:`validate_cirr_submission`. Build the name lists with
    ``cirlab.core.retrieval.cirr_rankings`` and write them with ``cirlab.core.retrieval.save_cirr_submission``.

    Examples:
        >>> sub = cirr_submission([7], [[f"img{i}" for i in range(50)]], [["a", "b", "c"]])
        >>> sub["recall_subset"]
        {'version': 'rc2', 'metric': 'recall_subset', '7': ['a', 'b', 'c']}
    """
    if not (len(pair_ids) == len(ranked_names) == len(subset_names)):
        raise InputError(f"CIRR submission: {len(pair_ids)} pair ids, {len(ranked_names)} global rankings and "
                         f"{len(subset_names)} subset rankings differ in length")
    out = {}
    for metric, lists in (("recall", ranked_names), ("recall_subset", subset_names)):
        k = CIRR_SUBMISSION_K[metric]
        obj: dict[str, object] = {"version": CIRR_VERSION, "metric": metric}
        obj.update({str(int(p)): [str(n) for n in names[:k]] for p, names in zip(pair_ids, lists)})
        validate_cirr_submission(obj, pair_ids=pair_ids)
        out[metric] = obj
    return out


def validate_cirr_submission(obj: Mapping[str, object], *, pair_ids: Sequence[int | str] | None = None) -> None:
    """Check a CIRR test-server dict against the test server's schema; raise ``ValueError`` naming the bad entry.

    Schema: ``version == "rc2"``; ``metric`` in {"recall", "recall_subset"}; every other key is a pair id written
    as ``str(int(pairid))`` mapping to a list of distinct image names of length 50 (recall) or 3 (recall_subset).
    With ``pair_ids`` the keys must be exactly those ids.

    Examples:
        >>> validate_cirr_submission({"version": "rc2", "metric": "recall_subset", "1": ["a", "b"]})
        Traceback (most recent call last):
        ...
        cirlab.core.errors.InputError: CIRR submission (recall_subset): pair 1 has 2 names, expected 3
    """
    if not isinstance(obj, Mapping):
        raise InputError(f"CIRR submission must be a dict, got {type(obj).__name__}")
    if obj.get("version") != CIRR_VERSION:
        raise InputError(f"CIRR submission: 'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    metric = obj.get("metric")
    if metric not in CIRR_SUBMISSION_K:
        raise InputError(f"CIRR submission: 'metric' must be one of {sorted(CIRR_SUBMISSION_K)}, got {metric!r}")
    k = CIRR_SUBMISSION_K[metric]
    keys = [key for key in obj if key not in ("version", "metric")]
    for key in keys:
        _check_submission_entry(metric, key, obj[key], k)
    if pair_ids is not None:
        expected = {str(int(p)) for p in pair_ids}
        if len(expected) != len(pair_ids):
            raise InputError(f"CIRR submission ({metric}): duplicate pair ids")
        missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
        if missing or extra:
            raise InputError(f"CIRR submission ({metric}): missing pair ids {missing[:5]}, unexpected {extra[:5]}")
    if not keys:
        raise InputError(f"CIRR submission ({metric}): no pair ids")


def _check_submission_entry(metric: str, key: object, names: object, k: int) -> None:
    if not isinstance(key, str) or not key.lstrip("-").isdigit() or str(int(key)) != key:
        raise InputError(f"CIRR submission ({metric}): key {key!r} is not a pair id written as str(int(pairid))")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"CIRR submission ({metric}): pair {key} must map to a list of image names")
    if len(names) != k:
        raise InputError(f"CIRR submission ({metric}): pair {key} has {len(names)} names, expected {k}")
    if len(set(names)) != k:
        raise InputError(f"CIRR submission ({metric}): pair {key} repeats an image name")


# ---------------------------------------------------------------------------------------------------- ITM
_ITM_BLOCK_BYTES = 1 << 20  # rows per pass: about 1 MB of scores, so the four comparisons re-read it from cache


def _check_itm(sims: ScoresLike, captions_per_image: int) -> Tensor:
    whole_argument(captions_per_image, "captions_per_image")  # 0 passed the shape check on an empty matrix
    s = _as_scores(sims)
    n, c = s.shape
    if c != captions_per_image * n:
        raise InputError(f"ITM sims must be [N images x {captions_per_image}N captions], got {tuple(s.shape)}")
    return s


def _itm_rows(chunk_size: int | None, n_cols: int, element_size: int) -> int:
    if chunk_size is not None:
        return whole_argument(chunk_size, "chunk_size")
    return max(1, _ITM_BLOCK_BYTES // max(1, n_cols * element_size))


class _ArrayOps:
    """The few array operations of the ITM pass, for NumPy (CPU: its comparisons are about 3x faster than torch's)
    or torch (other devices)."""

    def __init__(self, s: Tensor) -> None:
        self.numpy = s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64, torch.float16)
        if self.numpy:
            self.gt, self.ge, self.u8, self.i32 = np.greater, np.greater_equal, np.uint8, np.int32
        else:
            self.gt, self.ge, self.u8, self.i32 = torch.gt, torch.ge, torch.uint8, torch.int32

    def array(self, x: Tensor) -> Any:
        return x.numpy() if self.numpy else x

    def zeros(self, n: int, like: Any) -> Any:
        return np.zeros(n, dtype=np.int64) if self.numpy else torch.zeros(n, dtype=torch.long, device=like.device)

    def arange(self, n: int, like: Any) -> Any:
        return np.arange(n) if self.numpy else torch.arange(n, device=like.device)

    def empty_bool(self, shape: tuple[int, int], like: Any) -> Any:
        return np.empty(shape, dtype=bool) if self.numpy else torch.empty(shape, dtype=torch.bool, device=like.device)

    def count(self, mask: Any, axis: int) -> Any:
        """True entries along ``axis``: bytes summed into int32 (no int64 copy of the mask)."""
        return mask.view(self.u8).sum(axis, dtype=self.i32)

    def compare_count(self, op: Any, x: Any, threshold: Any, out: Any, axis: int) -> Any:
        """How many entries of ``x`` pass ``op(x, threshold)`` along ``axis``, written into the reused ``out``."""
        if x.shape[1] == 0:
            return 0
        return self.count(op(x, threshold, out=out), axis)

    def has_nan(self, block: Any) -> bool:
        return bool((np.isnan(block.max(1)) if self.numpy else torch.isnan(block.amax(1))).any())  # max keeps NaN

    def tensor(self, x: Any, device: torch.device) -> Tensor:
        return torch.from_numpy(x) if self.numpy else x


def _itm_ahead(s: Tensor, cpi: int, ties: str, rows: int, i2t: bool, t2i: bool) -> tuple[Tensor, Tensor]:
    """0-based i2t and t2i ranks in one pass over ``s`` [N, cpi N], ``rows`` image rows at a time.

    Image ``i``'s threshold is its best ground-truth score ``t_i`` (at caption ``b_i``, the lowest index holding it);
    caption ``c``'s threshold is ``gold_c = s[c // cpi, c]``. In a block of rows ``r0..r1`` every column left of
    the block's own captions (``c < cpi r0``) lies below each row's ``b_i`` and belongs to an image above the block's
    rows, and every column right of them lies above ``b_i`` and belongs to an image below. So with the stable tie
    rule the left part counts ``>= t_i`` (i2t) and ``> gold_c`` (t2i), the right part ``> t_i`` and ``>= gold_c``:
    ties are settled by disjoint slices, not masks. Only the small diagonal block (rows x cpi rows) needs the exact
    per-element rule. Each block is read from memory once; its comparisons re-read it from cache.
    """
    n, c = s.shape
    xp = _ArrayOps(s)
    a = xp.array(s)
    caps = xp.arange(c, a)
    gold = a[caps // cpi, caps]  # [C] each caption's score with its own image
    gs = gold.reshape(n, cpi)
    top = gs.max(1, keepdims=True) if xp.numpy else gs.amax(1, keepdim=True)
    best = (gs == top).astype(np.int8).argmax(1) if xp.numpy else (gs == top).int().argmax(1)  # first best caption
    t = gs[xp.arange(n, a), best][:, None]  # [N, 1] each image's threshold
    # the comparison on each side of the diagonal block: (left, right) for i2t rows and for t2i columns
    strict, loose = xp.gt, xp.ge
    (i2t_left, i2t_right), (t2i_left, t2i_right) = {
        "stable": ((loose, strict), (strict, loose)), "optimistic": ((strict, strict), (strict, strict)),
        "pessimistic": ((loose, loose), (loose, loose))}[ties]
    i2t_ahead, t2i_ahead = xp.zeros(n, a), xp.zeros(c, a)
    buf = xp.empty_bool((min(rows, n), c), a)
    local_r = xp.arange(min(rows, n), a)[:, None]
    local_c = xp.arange(cpi * min(rows, n), a)[None, :]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        b, c0, c1 = r1 - r0, cpi * r0, cpi * r1
        block, m = a[r0:r1], buf[:r1 - r0]
        if xp.has_nan(block):
            _check_finite_rows(s[r0:r1], r0)
        diag, lr, lc = block[:, c0:c1], local_r[:b], local_c[:, :cpi * b]  # the block's own captions
        if i2t:
            ti = t[r0:r1]
            i2t_ahead[r0:r1] += xp.compare_count(i2t_left, block[:, :c0], ti, m[:, :c0], 1)
            i2t_ahead[r0:r1] += xp.compare_count(i2t_right, block[:, c1:], ti, m[:, c1:], 1)
            ahead = diag > ti
            if ties != "optimistic":
                target = cpi * lr + best[r0:r1, None]  # the target caption itself never counts
                ahead |= (diag == ti) & (lc < target if ties == "stable" else lc != target)
            i2t_ahead[r0:r1] += xp.count(ahead, 1)
        if t2i:
            t2i_ahead[:c0] += xp.compare_count(t2i_left, block[:, :c0], gold[:c0], m[:, :c0], 0)
            t2i_ahead[c1:] += xp.compare_count(t2i_right, block[:, c1:], gold[c1:], m[:, c1:], 0)
            g = gold[c0:c1]
            ahead = diag > g
            if ties != "optimistic":
                owner = lc // cpi
                ahead |= (diag == g) & (lr < owner if ties == "stable" else lr != owner)
            t2i_ahead[c0:c1] += xp.count(ahead, 0)
    return xp.tensor(i2t_ahead, s.device), xp.tensor(t2i_ahead, s.device)


def itm_ranks(sims: ScoresLike, *, captions_per_image: int = 5, ties: str = "stable",
              chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """1-based i2t and t2i ranks from one pass over ``sims`` [N, 5N] (see :func:`i2t_ranks`, :func:`t2i_ranks`).

    Each block of image rows is read once for both directions; extra memory is one block of booleans, about
    ``chunk_size x 5N`` bytes (default: rows of about 1 MB of scores).

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.95, 0.2], [0.3, 0.4, 0.5, 0.6]])
        >>> [r.tolist() for r in itm_ranks(s, captions_per_image=2)]
        [[2, 1], [1, 2, 2, 1]]
    """
    _check_ties(ties)
    s = _check_itm(sims, captions_per_image)
    rows = _itm_rows(chunk_size, s.shape[1], s.element_size())
    i2t, t2i = _itm_ahead(s, captions_per_image, ties, rows, True, True)
    return i2t + 1, t2i + 1


def i2t_ranks(sims: ScoresLike, *, captions_per_image: int = 5, ties: str = "stable",
              chunk_size: int | None = None) -> Tensor:
    """Image annotation: 1-based rank of each image's best-ranked ground-truth caption (HREM's ``evaluation.py``).

    Image ``i`` owns captions ``5i..5i+4``; its rank is the smallest rank among them, which (stable ties) is the rank
    of the lowest-index caption holding the best ground-truth score.

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.95, 0.2], [0.3, 0.4, 0.5, 0.6]])
        >>> i2t_ranks(s, captions_per_image=2).tolist()
        [2, 1]
    """
    _check_ties(ties)
    s = _check_itm(sims, captions_per_image)
    rows = _itm_rows(chunk_size, s.shape[1], s.element_size())
    return _itm_ahead(s, captions_per_image, ties, rows, True, False)[0] + 1


def t2i_ranks(sims: ScoresLike, *, captions_per_image: int = 5, ties: str = "stable",
              chunk_size: int | None = None) -> Tensor:
    """Image search: 1-based rank of each caption's image among all images (HREM's ``evaluation.py``).

    Computed column-wise over blocks of image rows, so extra memory is O(chunk_size x 5N), never a transposed copy.

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.95, 0.2], [0.3, 0.4, 0.5, 0.6]])
        >>> t2i_ranks(s, captions_per_image=2).tolist()
        [1, 2, 2, 1]
    """
    _check_ties(ties)
    s = _check_itm(sims, captions_per_image)
    rows = _itm_rows(chunk_size, s.shape[1], s.element_size())
    return _itm_ahead(s, captions_per_image, ties, rows, False, True)[1] + 1


def _median_rank(rank: Tensor) -> float:
    """``floor(np.median(rank0)) + 1``: the NumPy median averages the two middle values of an even count."""
    r0 = torch.sort(rank.reshape(-1) - 1).values.double()
    n = len(r0)
    mid = r0[n // 2] if n % 2 else (r0[n // 2 - 1] + r0[n // 2]) / 2
    return float(math.floor(float(mid)) + 1)


def _direction_metrics(rank: Tensor, direction: str, ks: Sequence[int]) -> dict[str, float]:
    rank = _as_ranks(rank, f"{direction} ranks")
    out = {itm_key(direction, k): _percent(rank <= k) for k in ks}
    out[itm_key(direction, "medr")] = _median_rank(rank)
    out[itm_key(direction, "meanr")] = float(rank.double().mean())  # mean(rank0) + 1
    return out


def itm_metrics_from_ranks(i2t: ScoresLike, t2i: ScoresLike, *,
                           ks: int | Sequence[int] = ITM_KS) -> dict[str, float]:
    """ITM metrics from 1-based i2t and t2i ranks: R@K, medr, meanr per direction and ``rsum``.

    Examples:
        >>> m = itm_metrics_from_ranks(torch.tensor([1, 2, 7, 20]), torch.tensor([1, 1, 3, 30]))
        >>> m["i2t_R@1"], m["i2t_medr"], m["t2i_meanr"], m["rsum"]
        (25.0, 4.0, 8.75, 350.0)
    """
    ks = _as_ks(ks)
    out = _direction_metrics(torch.as_tensor(i2t), "i2t", ks)
    out.update(_direction_metrics(torch.as_tensor(t2i), "t2i", ks))
    out[RSUM] = sum(out[itm_key(d, k)] for d in ("i2t", "t2i") for k in ks)
    return out


def itm_metrics(sims: ScoresLike, *, captions_per_image: int = 5, ties: str = "stable",
                chunk_size: int | None = None) -> dict[str, float]:
    """ITM protocol on one [N x 5N] block (Flickr30K 1K, COCO 5K): i2t and t2i R@1/5/10, medr, meanr, rsum.

    ``R@K = 100 * #{rank0 < K} / #queries`` (N for i2t, 5N for t2i), ``medr = floor(median(rank0)) + 1`` and
    ``meanr = mean(rank0) + 1`` (HREM's ``evaluation.py``). Both directions come from one pass over the matrix
    (:func:`itm_ranks`), ``chunk_size`` image rows at a time (default: about 1 MB of scores): a COCO-5K matrix
    (5,000 x 25,000) needs O(chunk_size x 25,000) extra memory, not another full-size copy.

    Examples:
        >>> import numpy as np
        >>> sims = torch.from_numpy(np.random.default_rng(0).permutation(45).reshape(3, 15) / 45)
        >>> m = itm_metrics(sims)  # checked against HREM's evaluation
        >>> [round(m[k], 2) for k in ("i2t_R@1", "i2t_R@5", "i2t_medr", "i2t_meanr")]
        [33.33, 100.0, 2.0, 1.67]
        >>> [round(m[k], 2) for k in ("t2i_R@1", "t2i_medr", "t2i_meanr")]
        [26.67, 2.0, 2.13]
    """
    return itm_metrics_from_ranks(*itm_ranks(sims, captions_per_image=captions_per_image, ties=ties,
                                             chunk_size=chunk_size))


def coco_5k_metrics(sims: ScoresLike, **kw: object) -> dict[str, float]:
    """COCO 5K: :func:`itm_metrics` on the full ``testall`` matrix (5,000 x 25,000)."""
    return itm_metrics(sims, **kw)


def coco_1k_metrics(sims: ScoresLike, *, folds: int = 5, captions_per_image: int = 5, ties: str = "stable",
                    chunk_size: int | None = None) -> dict[str, float]:
    """COCO 1K: every metric averaged over ``folds`` contiguous blocks of images (HREM's ``evaluation.py``).

    Fold ``f`` scores images ``[fn, (f+1)n)`` against their own captions ``[5fn, 5(f+1)n)`` with ``n = N / folds``
    (1,000 for COCO ``testall``); R@K, medr, meanr and rsum are each the mean over folds.

    Examples:
        >>> sims = torch.eye(4).repeat_interleave(5, dim=1)  # 4 images, perfect scores
        >>> coco_1k_metrics(sims, folds=2)["rsum"]
        600.0
    """
    s = _check_itm(sims, captions_per_image)
    blocks = [s[images.start:images.stop, captions.start:captions.stop]
              for images, captions in coco_1k_folds(s.shape[0], folds=folds, captions_per_image=captions_per_image)]
    return fold_mean_metrics(blocks, captions_per_image=captions_per_image, ties=ties, chunk_size=chunk_size)


def coco_1k_folds(num_images: int, *, folds: int = 5, captions_per_image: int = 5) -> list[tuple[range, range]]:
    """(images, captions) of each COCO 1K fold: contiguous blocks of ``num_images / folds`` images and their own
    captions (HREM's and VSE++'s ``evaluation.py``). A scorer may compute only these blocks of the matrix."""
    folds = whole_argument(folds, "folds")  # 0, -1 and 1.0 failed as bare ZeroDivision, Index and Type errors
    captions_per_image = whole_argument(captions_per_image, "captions_per_image")
    num_images = whole_argument(num_images, "num_images")
    if num_images % folds:
        raise InputError(f"COCO 1K needs a multiple of {folds} images, got {num_images}")
    n = num_images // folds
    return [(range(f * n, (f + 1) * n), range(f * n * captions_per_image, (f + 1) * n * captions_per_image))
            for f in range(folds)]


def fold_mean_metrics(blocks: Sequence[ScoresLike], *, captions_per_image: int = 5, ties: str = "stable",
                      chunk_size: int | None = None) -> dict[str, float]:
    """:func:`itm_metrics` of each fold's block, every metric (R@K, medr, meanr, rsum) the mean over the folds."""
    per_fold = [itm_metrics(b, captions_per_image=captions_per_image, ties=ties, chunk_size=chunk_size) for b in blocks]
    return {key: sum(m[key] for m in per_fold) / len(per_fold) for key in per_fold[0]}
