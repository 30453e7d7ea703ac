"""Retrieval as small pure functions on tensors, plus corpus encoding with a feature cache.

* :func:`similarity`, :func:`topk_search` (chunked over queries *and* gallery, bounded memory),
  :func:`topk_candidates` (the same on a ready score matrix), :func:`target_ranks` (from :mod:`cirlab.core.metrics`).
* Re-ranking: :func:`fuse_scores`, :func:`reorder`, :func:`rerank` (score K candidates in batches),
  :func:`reranked_target_ranks`.
* Files: :func:`make_topk` builds a :class:`cirlab.core.topk.TopK`; :func:`cirr_rankings` and
  :func:`save_cirr_submission` produce the CIRR test-server JSON (https://github.com/Cuberick-Orion/CIRR,
  ``Test-split_server.md``). The two-stage pipeline built on these is :mod:`cirlab.engine.rerank`.
* :func:`encode_corpus` is the only function that touches a DataLoader; its feature cache is keyed by
  :func:`cache_key` of (checkpoint digest, dataset name/split/size, encoder name).

**Tie rule** (the same as :mod:`cirlab.core.metrics`): equal scores keep the lower gallery index first, as a stable sort
of the descending scores does, so a top-K list and the rank of its target always agree. ``torch.topk`` alone does not
promise this; :func:`topk_search` repairs the rows where a tie straddles the K-th place.
"""
from __future__ import annotations

import functools

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from cirlab.core.config import whole_number
from cirlab.core.errors import InputError
from cirlab.core.featcache import cache_key, file_digest, state_dict_digest  # noqa: F401  (re-exported)
from cirlab.core.featcache import default_dir as default_feature_dir
from cirlab.core.featcache import load_tensor as _load_cached
from cirlab.core.featcache import save_tensor as _save_cached
from cirlab.core.io import write_text
from cirlab.core.metrics import (first_nan_row, members_table, refuse_nan_members, target_ranks,
                                 validate_cirr_submission, whole_argument)
from cirlab.core.topk import TopK

log = logging.getLogger(__name__)

__all__ = [
    "similarity", "topk_search", "topk_candidates", "target_ranks", "fuse_scores", "reorder", "rerank",
    "reranked_target_ranks", "candidate_ranks", "make_topk", "cirr_rankings", "subset_topk", "save_cirr_submission",
    "encode_corpus", "cache_key", "file_digest", "state_dict_digest",
]

BlockFn = Callable[[int, int, int, int], Tensor]  # (q0, q1, g0, g1) -> scores[q0:q1, g0:g1]


def similarity(queries: Tensor, gallery: Tensor) -> Tensor:
    """Dot-product scores ``[Q, D] x [G, D] -> [Q, G]`` (cosine when both sides are L2-normalised).

    Examples:
        >>> similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist()
        [[0.5, 1.0]]

    The product runs on the BLAS kernel of :func:`topk_search`'s blocks whatever the number of queries (a few
    query rows took another summation order on several threads), so a score here equals that query's score in a
    top-K list, bit for bit.
    """
    from cirlab.core import _search

    return _search.product(queries, gallery)


# ---------------------------------------------------------------------------------------------------- top-K
def _row_order(scores: Tensor, idx: Tensor) -> Tensor:
    """The permutation ordering each row by (score descending, gallery index ascending)."""
    perm = idx.sort(dim=1, stable=True)[1]
    return perm.gather(1, scores.gather(1, perm).sort(dim=1, descending=True, stable=True)[1])


def _sort_rows(scores: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by (score descending, gallery index ascending)."""
    perm = _row_order(scores, idx)
    return scores.gather(1, perm), idx.gather(1, perm)


def _lowest_index_topk(block: Tensor, kth: Tensor, k: int) -> Tensor:
    """Positions of the top k of each row when ties at the k-th value must go to the lowest positions."""
    above = block > kth
    tied = block == kth
    need = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.int().cumsum(1) <= need))
    return take.nonzero()[:, 1].view(-1, k)  # nonzero() is row-major: ascending positions, exactly k per row


def _block_topk(block: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """Top-k of one score block [b, g] with global indices, ordered by the tie rule."""
    k = min(k, block.shape[1])
    vals, pos = block.topk(min(k + 1, block.shape[1]), dim=1)
    # torch.topk picks arbitrarily among items tied with the k-th value; that matters only where the (k+1)-th value
    # equals the k-th (one extra column tells, no pass over the block), and only those rows are repaired
    ambiguous = vals[:, k] == vals[:, k - 1] if vals.shape[1] > k else None
    vals, pos = vals[:, :k], pos[:, :k]
    if ambiguous is not None and ambiguous.any():
        rows = ambiguous.nonzero()[:, 0]
        pos[rows] = _lowest_index_topk(block[rows], vals[rows, -1:], k)
        vals[rows] = block[rows].gather(1, pos[rows])
    return _sort_rows(vals, pos + offset)


def _merge(best: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Merge two sorted candidate lists; ``best`` holds only lower gallery indices than ``new``."""
    if best is None:
        return new
    scores, idx = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    scores, perm = scores.sort(dim=1, descending=True, stable=True)  # stable: lower indices stay first on ties
    return scores[:, :k], idx.gather(1, perm[:, :k])


def _topk_blocks(block_fn: BlockFn, shape: tuple[int, int], k: int, exclude: Tensor | None, query_chunk: int,
                 gallery_chunk: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 check_nan: bool = False) -> tuple[Tensor, Tensor]:
    """``dtype``: the scores' ranking precision (fp32, or fp64 for fp64 scores: ranked in fp32, near-ties merged and
    the list contradicted ``target_ranks`` of the same matrix). ``check_nan``: refuse NaN block products (an inf
    embedding times a zero gives NaN, which ``torch.topk`` lists first)."""
    n_q, n_g = shape
    # with an exclusion, keep one more than k: the excluded item is dropped by its index at the end. Writing -inf
    # into its score instead tied it with real -inf scores, where its lower index won it a place in the list
    room = min(k + 1, n_g) if exclude is not None else k
    out_s = torch.empty(n_q, k, device=device, dtype=dtype)
    out_i = torch.empty(n_q, k, dtype=torch.long, device=device)
    for q0 in range(0, n_q, query_chunk):
        q1 = min(n_q, q0 + query_chunk)
        best = None
        for g0 in range(0, n_g, gallery_chunk):
            g1 = min(n_g, g0 + gallery_chunk)
            block = block_fn(q0, q1, g0, g1).to(dtype)  # [b, g]
            row = first_nan_row(block) if check_nan else None
            if row is not None:
                raise InputError(f"scores of query row {q0 + row} contain NaN (an infinite embedding entry times a "
                                 "zero?): a ranking is undefined")
            best = _merge(best, _block_topk(block, room, g0), room)
        out_s[q0:q1], out_i[q0:q1] = best if room == k else _drop_excluded(*best, exclude[q0:q1], k)
    return out_s, out_i


def _drop_excluded(scores: Tensor, idx: Tensor, exclude: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first k of each row's k + 1 best once its excluded item is gone (the last item goes where the excluded
    one is not listed): the rest keep their order, so ties stay with the lower index as in ``target_ranks``."""
    drop = idx == exclude[:, None]
    drop[~drop.any(1), -1] = True
    keep = ~drop
    return scores[keep].view(-1, k), idx[keep].view(-1, k)


def check_k(k: int, n_g: int, exclude: Tensor | None) -> int:
    """``k`` as an int a top-K list can hold (2.0 or True failed inside torch as a dtype or size error)."""
    k = whole_number(k, "k (a top-K list's length)")
    available = n_g - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)
    if k > available:
        raise InputError(f"k={k} but only {available} gallery items can be ranked per query")
    return k


def _chunk_sizes(query_chunk: int, gallery_chunk: int) -> tuple[int, int]:
    """Both chunk sizes as whole numbers >= 1: a negative one left the output lists uninitialised memory."""
    return whole_argument(query_chunk, "query_chunk"), whole_argument(gallery_chunk, "gallery_chunk")


def _exclude_tensor(exclude: Any, n_q: int, n_g: int, device: torch.device) -> Tensor | None:
    if exclude is None:
        return None
    exc = torch.as_tensor(exclude, device=device).long().reshape(-1)
    if len(exc) != n_q or bool(((exc < -1) | (exc >= n_g)).any()):
        raise InputError(f"exclude must hold {n_q} gallery indices in [-1, {n_g}), got shape {tuple(exc.shape)}")
    return exc


def topk_search(queries: Tensor, gallery: Tensor, k: int, *, query_chunk: int = 1024, gallery_chunk: int = 16384,
                exclude: Any = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Top-k gallery items per query by dot product, never materialising more than a query x gallery chunk.

    Every backend returns the same lists and scores: the fp32 products of ``queries @ gallery.T`` (fp64 for fp64
    embeddings, which only ``blocks`` searches), best first, ties to the lower gallery index (see
    :mod:`cirlab.core._search`):

    * ``"blocks"``: ``torch.topk`` per block plus a tie repair, merged (any device).
    * ``"filter"`` (CPU): each block is compared with a running threshold (the k-th best so far) instead.
    * ``"bf16"`` (CPU with bf16 units): bf16 block products with a certified error bound, then the few candidates
      that can reach the list are rescored in fp32 by the same kernel (1.3x ``faiss`` ``IndexFlatIP`` for 5k
      queries on a 100k x 512 gallery, k = 50, on an AVX-512 BF16 CPU: ``reports/benchmarks/retrieval.md``).
    * ``"faiss"`` (cirlab's ``faiss`` extra): faiss for k + 16, certified and rescored the same way.
    * ``"auto"`` (default): ``bf16`` where the CPU has bf16 units, else ``faiss`` when installed, else ``filter``,
      for CPU float32 searches of at least 2^26 pairs; ``blocks`` otherwise.

    Memory is O(query_chunk x gallery_chunk) for the block plus O(query_chunk x candidates) for the lists; ``bf16``
    also keeps a bf16 copy of the gallery (half its size) for the duration of the call.

    Args:
        queries: [Q, D] query embeddings.
        gallery: [G, D] gallery embeddings (may stay on the CPU while queries sit on a GPU).
        k: list length.
        query_chunk: query rows per block.
        gallery_chunk: gallery rows per block.
        exclude: [Q] gallery index removed from each query's list (the reference image), -1 for none.
        backend: "auto", "blocks", "filter", "bf16" or "faiss".

    Returns:
        ``(scores [Q, k], indices [Q, k])``, best first.

    Examples:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> g = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
        >>> topk_search(q, g, 2, gallery_chunk=2)[1].tolist()
        [[0, 1], [3, 1]]
        >>> topk_search(q, g, 2, exclude=torch.tensor([0, -1]))[1].tolist()
        [[1, 2], [3, 1]]
        >>> topk_search(q, g, 2, exclude=torch.tensor([0, -1]), backend="filter")[1].tolist()
        [[1, 2], [3, 1]]
    """
    from cirlab.core import _search

    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be [*, D]")
    finite = True
    for name, x in (("queries", queries), ("gallery", gallery)):
        if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):  # min/max keep NaN and inf
            row = first_nan_row(x)
            if row is not None:
                raise InputError(f"{name} contain NaN (row {row})")
            finite = False
    query_chunk, gallery_chunk = _chunk_sizes(query_chunk, gallery_chunk)
    exc = _exclude_tensor(exclude, len(queries), len(gallery), queries.device)
    k = check_k(k, len(gallery), exc)
    engine = _search.choose_backend(backend, queries, gallery, k)
    if engine != "blocks" and not finite:
        if backend != "auto":
            raise InputError(f"backend {backend!r} needs finite embeddings; use 'blocks'")
        engine = "blocks"
    if engine in ("filter", "bf16"):
        return _search.filtered_topk(queries, gallery, k, exc, query_chunk, gallery_chunk,
                                     "bf16" if engine == "bf16" else "fp32")
    if engine == "faiss":
        return _search.faiss_topk(queries, gallery, k, exc, query_chunk, gallery_chunk)

    def block_fn(q0: int, q1: int, g0: int, g1: int) -> Tensor:
        return _search.product(queries[q0:q1], gallery[g0:g1].to(queries.device, queries.dtype))

    return _topk_blocks(block_fn, (len(queries), len(gallery)), k, exc, query_chunk, gallery_chunk, queries.device,
                        _ranking_dtype(queries.dtype), check_nan=not finite)


def _ranking_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 scores are ranked in fp64 (as ``cirlab.core.metrics`` ranks them), every other dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_candidates(scores: Tensor, k: int, *, exclude: Any = None, query_chunk: int = 1024,
                    gallery_chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Top-k of a ready [Q, G] score matrix (e.g. a cross-attention model's), with the same tie rule.

    Examples:
        >>> topk_candidates(torch.tensor([[0.2, 0.7, 0.7, 0.1]]), 2)
        (tensor([[0.7000, 0.7000]]), tensor([[1, 2]]))
    """
    s = torch.as_tensor(scores)
    if s.ndim != 2:
        raise InputError(f"scores must be [Q, G], got {tuple(s.shape)}")
    if torch.isnan(s).any():
        raise InputError("scores contain NaN")
    query_chunk, gallery_chunk = _chunk_sizes(query_chunk, gallery_chunk)
    exc = _exclude_tensor(exclude, s.shape[0], s.shape[1], s.device)
    k = check_k(k, s.shape[1], exc)
    return _topk_blocks(lambda q0, q1, g0, g1: s[q0:q1, g0:g1], tuple(s.shape), k, exc, query_chunk, gallery_chunk,
                        s.device, _ranking_dtype(s.dtype))


def candidate_ranks(indices: Tensor, target: Any) -> Tensor:
    """1-based position of each target in its top-K list, 0 where it is absent (or unknown, -1).

    Examples:
        >>> candidate_ranks(torch.tensor([[4, 2, 9], [1, 3, 5]]), [9, 7]).tolist()
        [3, 0]
    """
    tgt = torch.as_tensor(target, device=indices.device).long().reshape(-1, 1)
    hit = indices == tgt
    if hit.shape[1] == 0:  # empty lists (a one-image gallery with its reference excluded): nothing is a hit
        return torch.zeros(hit.shape[0], dtype=torch.long, device=indices.device)
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, 0)


# ---------------------------------------------------------------------------------------------------- re-ranking
def fuse_scores(stage1: Tensor, stage2: Tensor, alpha: float) -> Tensor:
    """Linear fusion ``alpha * stage1 + (1 - alpha) * stage2`` of two [Q, K] score lists.

    ``alpha = 0`` ranks by the stage-II scores alone, as the re-ranking paper does (Liu et al., TMLR 2024).

    Examples:
        >>> fuse_scores(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.25).tolist()
        [0.25, 0.75]
    """
    if stage1.shape != stage2.shape:
        raise InputError(f"stage1 {tuple(stage1.shape)} and stage2 {tuple(stage2.shape)} scores differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha in (0.0, 1.0):  # one side alone, exactly: 0 x -inf is NaN, which re-ranking refuses
        return (stage1 if alpha == 1.0 else stage2).clone()
    return alpha * stage1 + (1.0 - alpha) * stage2


def reorder(candidates: Tensor, scores: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Re-order each row of candidates by new scores, descending; ties keep the incoming (stage-I) order. NaN scores
    are refused, naming the query: ``rows[i]`` (the query index of row ``i``), else ``i``.

    Returns:
        ``(scores, candidates)``, both [Q, K], best first.

    Examples:
        >>> reorder(torch.tensor([[7, 3, 5]]), torch.tensor([[0.1, 0.9, 0.1]]))
        (tensor([[0.9000, 0.1000, 0.1000]]), tensor([[3, 7, 5]]))
    """
    if candidates.shape != scores.shape:
        raise InputError(f"candidates {tuple(candidates.shape)} and scores {tuple(scores.shape)} differ in shape")
    row = first_nan_row(scores)
    if row is not None:  # sorted first: a diverged stage II listed NaN candidates as its best, with no word
        query = row if rows is None else int(rows[row])
        raise InputError(f"re-ranking scores of query {query} contain NaN: a ranking is undefined (a diverged or "
                         "overflowed model?)")
    sorted_scores, perm = scores.sort(dim=1, descending=True, stable=True)
    return sorted_scores, candidates.gather(1, perm)


@torch.no_grad()
def rerank(score_fn: Callable[[Tensor, Tensor], Tensor], query_idx: Tensor, candidates: Tensor, *,
           batch_size: int = 32, stage1_scores: Tensor | None = None, alpha: float = 0.0) -> tuple[Tensor, Tensor]:
    """Score K candidates per query with ``score_fn(query_idx[b], candidates[b]) -> [b, K]`` in batches, re-order.

    With ``stage1_scores`` the new scores are fused first (:func:`fuse_scores`).

    Examples:
        >>> fn = lambda q, c: -c.float()  # prefer low gallery indices
        >>> rerank(fn, torch.arange(1), torch.tensor([[5, 2, 9]]))[1].tolist()
        [[2, 5, 9]]
    """
    batch_size = whole_argument(batch_size, "batch_size")
    parts = [score_fn(query_idx[i:i + batch_size], candidates[i:i + batch_size])
             for i in range(0, len(candidates), batch_size)]
    scores = torch.cat(parts).to(candidates.device)
    if stage1_scores is not None:
        scores = fuse_scores(stage1_scores.to(scores), scores, alpha)
    return reorder(candidates, scores, query_idx)


def reranked_target_ranks(candidates: Tensor, target: Any, stage1_ranks: Any) -> Tensor:
    """Target ranks after re-ranking the top-K: its new position when it was a candidate, else its stage-I rank.

    A target outside the candidate pool keeps its stage-I rank (> K), so it stays a miss for every k <= K and
    R@k for k >= K equals stage I (Liu et al., TMLR 2024, evaluate with all N queries as the denominator); the
    top-K file format asks for exactly this.

    Examples:
        >>> reranked_target_ranks(torch.tensor([[3, 7, 5], [1, 2, 4]]), [5, 9], [2, 40]).tolist()
        [3, 40]
    """
    pos = candidate_ranks(candidates, target)
    before = torch.as_tensor(stage1_ranks, device=candidates.device).long().reshape(-1)
    return torch.where(pos > 0, pos, before)


# ---------------------------------------------------------------------------------------------------- files
def make_topk(scores: Tensor, indices: Tensor, *, query_ids: Sequence[Any], gallery_ids: Sequence[str],
              target: Any = None, ranks: Any = None, category: Sequence[str] | None = None,
              meta: Mapping[str, Any] | None = None) -> TopK:
    """Build a :class:`cirlab.core.topk.TopK` from search results.

    Args:
        scores: [Q, K] scores, best first.
        indices: [Q, K] gallery indices.
        query_ids: [Q] ids (CIRR pairid, ``{category}:{index}``, ...).
        gallery_ids: [G] gallery names; ``indices`` index this list.
        target: [Q] target gallery index, -1 when unknown (CIRR test1).
        ranks: [Q] 1-based target rank in the full ranking (e.g. :func:`target_ranks`). Without it, a target inside
            the list gets its list position and one outside gets ``K + 1`` (a lower bound, counted as a miss).
        category: [Q] group per query.
        meta: model, dataset, split, stage, protocol, ... (k is added).

    Examples:
        >>> t = make_topk(torch.tensor([[0.9, 0.5]]), torch.tensor([[2, 0]]), query_ids=["q0"],
        ...               gallery_ids=["a", "b", "c"], target=[0])
        >>> t.gallery_ids.tolist(), t.target_rank.tolist(), t.target_ids.tolist()
        ([['c', 'a']], [2], ['a'])
    """
    idx = indices.cpu().numpy()
    names = np.asarray(gallery_ids, dtype=str)
    if idx.size and (idx.min() < 0 or idx.max() >= len(names)):
        raise InputError(f"indices reach outside the {len(names)} gallery ids")
    q, k = idx.shape
    tgt = np.full(q, -1) if target is None else torch.as_tensor(target).long().reshape(-1).cpu().numpy()
    if ranks is not None:
        rank = torch.as_tensor(ranks).long().reshape(-1).cpu().numpy().copy()
    else:
        pos = candidate_ranks(indices.cpu(), torch.as_tensor(tgt)).numpy()
        rank = np.where(pos > 0, pos, k + 1)
    rank[tgt < 0] = 0  # unknown target
    target_ids = np.where(tgt >= 0, names[np.clip(tgt, 0, None)], "") if len(names) else np.full(q, "")
    return TopK(np.asarray([str(x) for x in query_ids]), names[idx], scores.detach().cpu().float().numpy(), rank,
                category, target_ids, {**dict(meta or {}), "k": int(k)})


def cirr_rankings(scores: Tensor, reference: Any, members: Any, gallery_names: Sequence[str], *, k: int = 50,
                  subset_k: int = 3, query_chunk: int = 1024) -> tuple[list[list[str]], list[list[str]]]:
    """Name lists for the CIRR submission: the global top-k with the reference removed, and the top
    ``subset_k`` of the non-reference ``img_set`` members (ties: lower gallery index first).

    Examples:
        >>> s = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.5]])
        >>> cirr_rankings(s, [0], [[0, 1, 2, 3]], ["a", "b", "c", "d", "e"], k=2, subset_k=2)
        ([['c', 'e']], [['c', 'd']])
    """
    s = torch.as_tensor(scores)
    names = np.asarray(gallery_names, dtype=str)
    ref = torch.as_tensor(reference).long().reshape(-1)
    sub = subset_topk(s, ref, members, subset_k)  # validates members before the long global search
    _, top = topk_candidates(s, k, exclude=ref, query_chunk=query_chunk)
    return names[top.numpy()].tolist(), names[sub.numpy()].tolist()


def subset_topk(scores: Tensor, reference: Any, members: Any, k: int = 3) -> Tensor:
    """Gallery indices [Q, k] of each query's best ``k`` non-reference ``img_set`` members (CIRR Recall_subset),
    ties: lower gallery index first; repeated members count once, -1 pads.

    Examples:
        >>> subset_topk(torch.tensor([[0.9, 0.1, 0.8, 0.3]]), [0], [[0, 1, 2, 3, -1]], k=2).tolist()
        [[2, 3]]
    """
    s = torch.as_tensor(scores)
    ref = torch.as_tensor(reference).long().reshape(-1)
    mem = members_table(members, len(ref))
    m = mem.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)
    repeated = ((mem[:, :, None] == mem[:, None, :]) & earlier).any(2)
    keep = (mem >= 0) & (mem != ref[:, None]) & ~repeated
    short = keep.sum(1) < k
    if short.any():
        i = int(short.nonzero()[0, 0])
        raise InputError(f"query {i}: img_set has {int(keep[i].sum())} non-reference members, need {k}")
    member_scores = s.gather(1, mem.clamp(min=0))
    if member_scores.dtype in (torch.float16, torch.bfloat16):  # widened exactly; float64 is kept, since .float()
        member_scores = member_scores.float()                   # merged near-ties that cirr_subset_ranks tells apart
    refuse_nan_members(member_scores, keep)  # NaN sorted first here
    # ordered by (kept first, score descending, gallery index ascending): a masked entry (the reference, a -1 pad,
    # a repeat) must not tie with a member scored -inf (a stage-II log-probability) and be listed before it, which
    # cirr_subset_ranks never does
    perm = _row_order(member_scores, mem)
    perm = perm.gather(1, keep.gather(1, perm).int().sort(dim=1, descending=True, stable=True)[1])
    return mem.gather(1, perm)[:, :k]


SUBMISSION_STEMS = ("recall_submission", "recall_subset_submission")  # the CIRR server's file names, <stem>_<name>


def save_cirr_submission(submission: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike,
                         name: str) -> tuple[Path, Path]:
    """Write ``recall_submission_<name>.json`` and ``recall_subset_submission_<name>.json`` atomically.

    ``submission`` is :func:`cirlab.core.metrics.cirr_submission`'s output; both dicts are validated first and written
    with ``sort_keys=True`` as the reference scripts do.
    """
    out_dir = Path(out_dir)
    paths = []
    for metric, stem in zip(("recall", "recall_subset"), SUBMISSION_STEMS):
        obj = submission[metric]
        validate_cirr_submission(obj)
        if obj["metric"] != metric:
            raise InputError(f"submission[{metric!r}] holds metric {obj['metric']!r}")
        paths.append(write_text(out_dir / f"{stem}_{name}.json", json.dumps(obj, sort_keys=True)))
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------------- encoding
def _cache_file(cache_dir: str | os.PathLike | None, key: str | None) -> Path | None:
    if key is None:
        if cache_dir is not None:
            raise InputError("encode_corpus: cache_dir given without cache_key; build one with cache_key(...)")
        return None
    return Path(cache_dir if cache_dir is not None else default_feature_dir()) / f"{key}.pt"


def _batch_input(batch: Any, key: str | None, device: torch.device | str) -> Any:
    x = batch if key is None else batch[key]
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x


def _encode_batches(encode_fn: Callable[[Any], Tensor], loader: Iterable, key: str | None, index_key: str | None,
                    device: torch.device | str, progress: bool) -> Tensor:
    from tqdm.auto import tqdm

    feats, order = [], []
    for batch in tqdm(loader, desc=f"encode {key or 'corpus'}", disable=not progress, leave=False):
        out = encode_fn(_batch_input(batch, key, device))
        if not isinstance(out, Tensor):
            raise TypeError(f"encode_fn must return a Tensor [B, ...], got {type(out).__name__}")
        feats.append(out.detach().cpu())
        if index_key is not None:
            order.append(torch.as_tensor(batch[index_key]).long().reshape(-1).cpu())
    if not feats:
        raise InputError("encode_corpus: the loader yielded no batches")
    n = sum(len(f) for f in feats)
    if index_key is not None:
        index = torch.cat(order)
        if len(index) != n or not torch.equal(index.sort().values, torch.arange(n)):
            raise InputError(f"encode_corpus: batch['{index_key}'] is not a permutation of 0..{n - 1} "
                             "(an index is repeated or missing)")
    return _place(feats, order if index_key is not None else None, n)


def _place(feats: list[Tensor], order: list[Tensor] | None, n: int) -> Tensor:
    """The batches as one [n, ...] tensor, each batch's rows at its ``order`` positions (loaders may shuffle or
    re-sort the rows; None: in turn), each batch released once placed: a concatenation held the features twice at
    its peak, and a scatter after it three times (100K x 1024 floats: +786 / +1181 MB for 391 MB of features)."""
    first = feats[0]
    dtype = functools.reduce(torch.promote_types, (f.dtype for f in feats))  # as torch.cat promotes
    out = first.new_empty((n, *first.shape[1:]), dtype=dtype)
    row = 0
    for i, part in enumerate(feats):
        if part.shape[1:] != first.shape[1:]:
            raise InputError(f"encode_corpus: batch {i} encodes to rows of shape {tuple(part.shape[1:])}, batch 0 to "
                             f"{tuple(first.shape[1:])}")
        if order is not None and len(order[i]) != len(part):
            raise InputError(f"encode_corpus: batch {i} holds {len(order[i])} indices for {len(part)} encoded rows")
        out[order[i] if order is not None else slice(row, row + len(part))] = part.to(dtype)
        row += len(part)
        feats[i] = None  # type: ignore[call-overload]  # released as soon as it is placed
    return out


@torch.no_grad()
def encode_corpus(encode_fn: Callable[[Any], Tensor], loader: Iterable, *, device: torch.device | str = "cpu",
                  key: str | None = "image", index_key: str | None = None, cache_dir: str | os.PathLike | None = None,
                  cache_key: str | None = None, progress: bool | str = "auto") -> Tensor:
    """Encode every batch of ``loader`` with ``encode_fn(batch[key])``; features come back on the CPU.

    With ``cache_key`` (build it with :func:`cache_key` from the checkpoint digest, dataset name/split/size and
    encoder name) the result is stored in ``cache_dir`` (default ``cirlab.core.paths.cache_dir()/features``), written
    atomically, and loaded instead of recomputed while the key matches. Hits and misses are logged.

    Args:
        encode_fn: e.g. ``model.encode_target`` or ``model.encode_image``; runs under ``torch.no_grad``.
        loader: a DataLoader (or any iterable) of dict batches.
        device: where inputs go before ``encode_fn``.
        key: the batch entry to encode (None: the batch itself).
        index_key: batch entry with each row's corpus index (e.g. ``"gallery_idx"``); rows are scattered back into
            that order and must cover 0..N-1 exactly once.
        cache_dir: cache folder.
        cache_key: the key; no caching without it.
        progress: show a tqdm bar; ``"auto"`` where someone watches it (a terminal, a live Jupyter frontend; not
            papermill or a log file: :func:`cirlab.core.console.wants_a_bar`, the trainer's policy).

    Examples:
        >>> batches = [{"image": torch.ones(2, 3)}, {"image": torch.zeros(1, 3)}]
        >>> encode_corpus(lambda x: x.sum(1, keepdim=True), batches, progress=False).flatten().tolist()
        [3.0, 3.0, 0.0]
    """
    path = _cache_file(cache_dir, cache_key)
    if path is not None and path.is_file():
        cached = _load_cached(path, cache_key)
        if cached is not None:
            log.info("feature cache hit: %s (%s rows)", path, len(cached))
            return cached
    if path is not None:
        log.info("feature cache miss: %s; encoding", path)
    if progress == "auto":
        from cirlab.core.console import wants_a_bar

        progress = wants_a_bar()
    features = _encode_batches(encode_fn, loader, key, index_key, device, bool(progress))
    if path is not None:
        _save_cached(path, cache_key, features)
        log.info("feature cache written: %s (%s rows)", path, len(features))
    return features
