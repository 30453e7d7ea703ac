"""Exact top-K engines behind :func:`cirlab.core.retrieval.topk_search` (private; use that function).

All engines return the same lists: the ``k`` best gallery items per query by the fp32 dot product that
``queries @ gallery.T`` computes, ties to the lower gallery index, an excluded item removed.

* ``blocks``: per (query chunk x gallery chunk) block, ``torch.topk`` plus a tie repair, merged across chunks
  (:func:`cirlab.core.retrieval._topk_blocks`). Any device; the reference the others are tested against.
* ``filter`` (CPU): the same fp32 blocks, but instead of ``torch.topk`` each block is compared against a running
  per-query threshold (the k-th best score seen so far, from a cheap group-maximum bound on the first block), so
  only the few items that can still enter the list are kept. No ``topk`` over the block, no merge sort.
* ``bf16`` (CPU with bf16 dot-product units): the block products run in bf16 (about 3x the fp32 rate on such
  CPUs), with a certified error bound ``E_q`` per query; every item whose fp32 score could reach the k-th best
  (``coarse >= lower bound of the k-th best - 2 E_q``) is kept and rescored exactly in fp32 by the same BLAS
  kernel the ``blocks`` path uses, so lists *and* scores are bit-identical to it. The kernel identity is
  checked once per process, dimension and thread count (:func:`rescoring_is_exact`); where it fails, ``bf16``
  is not used.
* ``faiss`` (cirlab's ``faiss`` extra): ``IndexFlatIP.search`` for ``k + 16`` items (``k + 17`` with an
  exclusion), certified the same way (its fp32 scores and torch's differ by at most ``2 gamma_D |q| |g|``), rescored
  exactly; the rows where faiss cannot certify the list (near-ties reaching past its last item) are recomputed by
  ``filter``.

The bound for ``bf16``: with ``q~ = bf16(q)`` and ``g~ = bf16(g)`` (round to nearest, ``u = 2^-8``), products of
bf16 numbers exact in fp32 and fp32 accumulation (checked on this CPU: the error stays under the bound),
``|fp32(q.g) - acc(q~.g~)| <= |q - q~| G + |q~| R + gamma_D (|q| G + |q~| (1 + u) G)`` by Cauchy-Schwarz, with
``G = max |g|``, ``R = max |g - g~|`` over the gallery and ``gamma_D = D 2^-24 / (1 - D 2^-24)``; the bf16 output
adds a relative ``u / (1 - u)``. Norms are inflated for their own rounding and the bound by 10 %: over-estimating
only keeps a few more candidates. Only finite embeddings take this path.
"""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "blocks", "filter", "bf16", "faiss")
_U = 2.0 ** -8 / (1 - 2.0 ** -8) * 1.01  # bf16 relative rounding (round to nearest), inflated
_REPLICAS = 4  # query rows per rescoring product: keeps the BLAS on its regular (non small-matrix) kernel
_MIN_COLUMNS = 16  # ... and at least this many candidate columns
_AUTO_MIN_WORK = 1 << 26  # queries x gallery below which "auto" keeps the simple block path
_FAISS_EXTRA = 16  # items asked of faiss beyond k: room below the k-th place to certify the list


# ---------------------------------------------------------------------------------------------------- choice
@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product units (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``).

    ``CIRLAB_BF16=0`` / ``1`` overrides the detection.
    """
    env = os.environ.get("CIRLAB_BF16")
    if env in ("0", "1"):
        return env == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cuda_native_bf16(device: Any) -> bool:
    """Whether ``device`` is a CUDA card that computes bf16 in hardware (compute capability 8.0 and later, or ROCm).
    torch's own check counts emulated bf16 as support by default: a V100 or T4 then ran every product in bf16
    without tensor cores, losing precision for no speed."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False
    if not torch.cuda.is_available():  # no card to ask (check_device refuses such a device): bf16, as before
        return True
    with torch.cuda.device(device):  # the card asked for, not the current one
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.4 has no including_emulation: native bf16 is compute capability 8+
            return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device_type: str) -> Any:
    """The dtype autocast computes in on ``device_type`` ("cpu", "cuda") at this point, None where it is off: what
    a cache of computed features must be keyed by. torch before 2.4 asks per device under other names."""
    import torch

    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch 2.1-2.3: is_autocast_enabled() takes no device, and means CUDA
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def choose_backend(backend: str, queries: Tensor, gallery: Tensor, k: int) -> str:
    """The engine for one search: ``backend`` itself, or for ``"auto"`` the fastest exact one that applies."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cpu = queries.device.type == "cpu" and gallery.device.type == "cpu"
    fp32 = queries.dtype == torch.float32 and gallery.dtype == torch.float32
    if backend != "auto":
        if backend in ("filter", "bf16", "faiss") and not (cpu and fp32):
            raise ValueError(f"backend {backend!r} needs float32 CPU tensors; use 'blocks' (or 'auto')")
        if backend == "faiss" and faiss_module() is None:
            from cirlab.core.errors import MissingExtraError, install_hint

            raise MissingExtraError("backend 'faiss' needs cirlab's faiss extra (faiss is not installed, or does "
                                    f"not import): {install_hint('faiss')}")
        if backend in ("bf16", "faiss") and not rescoring_is_exact(queries.shape[1]):
            log.warning("topk_search: this BLAS does not reproduce its fp32 block products in the rescoring "
                        "kernel; using 'filter' instead of %r", backend)
            return "filter"
        return backend
    if not (cpu and fp32) or len(queries) * len(gallery) < _AUTO_MIN_WORK or len(gallery) < 64 * k:
        return "blocks"
    if cpu_has_bf16() and rescoring_is_exact(queries.shape[1]):
        return "bf16"
    return "faiss" if faiss_module() is not None and rescoring_is_exact(queries.shape[1]) else "filter"


# ---------------------------------------------------------------------------------------------------- exact rescoring
def product(q: Tensor, g: Tensor, out: Tensor | None = None) -> Tensor:
    """``q @ g.T`` computed by the BLAS's regular kernel whatever the block shape: a block whose query rows are not
    a multiple of :data:`_REPLICAS` is padded with zero rows to one, and one of fewer than :data:`_MIN_COLUMNS`
    gallery rows (the last chunk) likewise, because BLAS libraries switch to another kernel (another summation
    order) there: below 4 rows on one thread, and on several threads for small row counts that are not a multiple
    of 4 (2 threads: 5-7 and 9-11 rows differed in the last bits from the same rows in a large block). A score
    therefore never depends on which other queries or gallery items share its block, nor on the batch size."""
    m, n = len(q), len(g)
    if m % _REPLICAS == 0 and n >= _MIN_COLUMNS:
        return torch.mm(q, g.T, out=out) if out is not None else q @ g.T
    if m % _REPLICAS:
        q = torch.cat([q, q.new_zeros(-m % _REPLICAS, q.shape[1])])
    if n < _MIN_COLUMNS:
        g = torch.cat([g, g.new_zeros(_MIN_COLUMNS - n, g.shape[1])])
    res = (q @ g.T)[:m, :n]
    return out.copy_(res) if out is not None else res


def rescore(queries: Tensor, gallery_np: np.ndarray, idx: np.ndarray, buffer: np.ndarray | None = None) -> Tensor:
    """fp32 scores ``queries[i] . gallery[idx[i, j]]`` [m, w], computed by the BLAS kernel of ``queries @ gallery.T``.

    Each query row is repeated :data:`_REPLICAS` times and at least :data:`_MIN_COLUMNS` columns are used so that
    the batched product runs the same kernel (same accumulation order) as the large block products. ``buffer``
    (float32, at least m x w x D elements) receives the gathered rows, so repeated calls do not fault in new pages.
    """
    m, w = idx.shape
    if w < _MIN_COLUMNS:
        idx = np.concatenate([idx, np.zeros((m, _MIN_COLUMNS - w), dtype=idx.dtype)], 1)
    d, cols = gallery_np.shape[1], idx.shape[1]
    out = None if buffer is None or buffer.size < m * cols * d else buffer[:m * cols * d].reshape(m, cols, d)
    cand = torch.from_numpy(gallery_np.take(idx, axis=0, out=out))  # [m, cols, D]
    rows = queries[:, None, :].expand(m, _REPLICAS, d).contiguous()
    return torch.bmm(rows, cand.transpose(1, 2))[:, 0, :w]


def rescoring_is_exact(dim: int) -> bool:
    """Whether :func:`rescore` reproduces ``q @ g.T`` bit for bit on this machine's BLAS (checked once per dim and
    torch thread count: the BLAS splits its work by the thread count, and a process may change it between calls)."""
    return _rescoring_is_exact(dim, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _rescoring_is_exact(dim: int, threads: int) -> bool:
    gen = torch.Generator().manual_seed(dim)
    q, g = torch.randn(64, dim, generator=gen), torch.randn(2048, dim, generator=gen)
    ref = q @ g.T  # a block shaped like the real ones, not a small-matrix special case
    idx = np.sort(np.stack([np.random.default_rng(i).choice(2048, 40, replace=False) for i in range(64)]), axis=1)
    got = rescore(q, g.numpy(), idx)
    same = bool(torch.equal(got, ref.gather(1, torch.from_numpy(idx))))
    if not same:
        log.info("topk_search: the rescoring kernel differs from the block product for dim %d", dim)
    return same


# ---------------------------------------------------------------------------------------------------- helpers
def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values given as int16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.int32) << 16).view(np.float32)


def _order_key(bits: np.ndarray) -> np.ndarray:
    """int16 keys whose integer order is the float order of the bf16 values they encode (-0 just below +0)."""
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def _bf16_key_at_most(theta: np.ndarray) -> np.ndarray:
    """Order key of the largest bf16 value <= ``theta`` (per row), so ``key(x) >= it`` keeps every ``x >= theta``."""
    t = np.nan_to_num(theta.astype(np.float32), nan=-np.inf, neginf=-np.inf)
    bits = torch.from_numpy(np.ascontiguousarray(t)).bfloat16().view(torch.int16).numpy().copy()
    key = _order_key(bits)
    key[_bf16_to_f32(bits) > theta] -= 2  # rounded up: step down (two values: past -0 when it rounded to +0)
    return key


def _kth_largest(rows: np.ndarray, vals: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Per row the k-th largest of ``vals`` (rows sorted), -inf where a row holds fewer than k values."""
    counts = np.bincount(rows, minlength=n_rows)
    out = np.full(n_rows, -np.inf)
    full = counts >= k
    if full.any():
        starts = np.cumsum(counts) - counts
        padded = np.full((n_rows, int(counts.max())), -np.inf, dtype=np.float32)
        padded[rows, np.arange(len(rows)) - starts[rows]] = vals
        out[full] = -np.partition(-padded[full], k - 1, axis=1)[:, k - 1]
    return out


def _pad_rows(rows: np.ndarray, cols: np.ndarray, n_rows: int, fill: int) -> np.ndarray:
    """Ragged (row-sorted) column lists -> [n_rows, max count] padded with ``fill``."""
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    out = np.full((n_rows, max(1, int(counts.max()) if len(counts) else 1)), fill, dtype=np.int64)
    out[rows, np.arange(len(rows)) - starts[rows]] = cols
    return out


class _Bound:
    """Error bound of the coarse scores of one query block: ``|coarse - fp32| <= eps + rel |coarse|`` (per query).

    ``fp32`` coarse scores are the exact ones (``eps = rel = 0``).
    """

    def __init__(self, q: Tensor, qb: Tensor | None, g_max: float, g_res: float) -> None:
        """``g_max``, ``g_res``: the largest fp32 gallery norm and bf16 residual norm ``|g - bf16(g)|``."""
        if qb is None:
            self.eps, self.rel = np.zeros(len(q)), 0.0
            return
        d = q.shape[1]
        gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
        grow = 1 + 4 * d * 2.0 ** -24  # fp32 norms are computed with a relative error below this
        qn, qbn, qd = (torch.linalg.vector_norm(x, dim=1).double().numpy() * grow
                       for x in (q, qb.float(), q - qb.float()))
        g_max, g_res = g_max * grow, g_res * grow
        # |q.g - q~.g~| <= |q - q~| |g| + |q~| |g - g~|, plus fp32 accumulation on both sides
        self.eps = (qd * g_max + qbn * g_res + gamma * (qn * g_max + qbn * (1 + _U) * g_max)) * 1.1 + 1e-30
        self.rel = _U

    def lower(self, coarse: np.ndarray) -> np.ndarray:
        """A lower bound of the fp32 score of an item whose coarse score is ``coarse`` (per row)."""
        return coarse - self.eps if not self.rel else coarse - self.rel * np.abs(coarse) - self.eps

    def threshold(self, low: np.ndarray) -> np.ndarray:
        """The smallest coarse score an item with fp32 score >= ``low`` can have (per row)."""
        y = low - self.eps
        if not self.rel:
            return y
        return np.where(y >= 0, y / (1 + self.rel), y / (1 - self.rel))


# ---------------------------------------------------------------------------------------------------- filter / bf16
def filtered_topk(queries: Tensor, gallery: Tensor, k: int, exclude: Tensor | None, query_chunk: int,
                  gallery_chunk: int, coarse: str) -> tuple[Tensor, Tensor]:
    """The ``filter`` (``coarse="fp32"``) and ``bf16`` engines: threshold the block products, keep candidates,
    (bf16) rescore them exactly, order them by (score descending, index ascending)."""
    q_all = queries.detach().contiguous()
    g = gallery.detach().contiguous()
    g_np = g.numpy()
    n_q, n_g = len(q_all), len(g)
    exc = None if exclude is None else exclude.cpu().numpy()
    bf16 = coarse == "bf16"
    g_low, g_max, g_res = [], 0.0, 0.0  # bf16 gallery chunks (converted once), largest norm and residual
    for g0 in range(0, n_g, gallery_chunk) if bf16 else ():
        chunk = g[g0:g0 + gallery_chunk]
        g_low.append(chunk.bfloat16())
        g_max = max(g_max, float(torch.linalg.vector_norm(chunk, dim=1).max()))
        g_res = max(g_res, float(torch.linalg.vector_norm(chunk - g_low[-1].float(), dim=1).max()))
    out_s = torch.empty(n_q, k)
    out_i = torch.empty(n_q, k, dtype=torch.long)
    for q0 in range(0, n_q, query_chunk):
        q = q_all[q0:q0 + query_chunk]
        qb = q.bfloat16() if bf16 else None
        bound = _Bound(q, qb, g_max, g_res)
        rows, cols, vals = _candidates(q, qb, g, g_low, bound, k, None if exc is None else exc[q0:q0 + len(q)],
                                       gallery_chunk)
        scores = _exact_scores(q, g_np, rows, cols, vals, bf16)
        out_s[q0:q0 + len(q)], out_i[q0:q0 + len(q)] = _select(rows, cols, scores, len(q), k, n_g)
    return out_s, out_i


class _Rows:
    """The candidates of a range of query rows, updated block by block (row indices local to the range)."""

    def __init__(self, r0: int, r1: int, bound: _Bound, k: int, exclude: np.ndarray | None) -> None:
        self.r0, self.b, self.k = r0, r1 - r0, k
        self.bound = _Bound.__new__(_Bound)
        self.bound.eps, self.bound.rel = bound.eps[r0:r1], bound.rel
        self.exclude = None if exclude is None else exclude[r0:r1]
        self.low = np.full(self.b, -np.inf)  # a lower bound of each query's final k-th best fp32 score
        self.rows, self.cols = np.empty(0, np.int64), np.empty(0, np.int64)
        self.vals = np.empty(0, np.float32)

    def update(self, block: np.ndarray, mask: np.ndarray, g0: int, bf16: bool) -> None:
        """Keep the items of ``block`` [rows, n] (bf16 bits or fp32 scores) that can still reach the list."""
        b, n = block.shape
        as_float = _bf16_to_f32 if bf16 else np.asarray
        bound, k = self.bound, self.k
        if not np.isfinite(self.low).all() and n >= k:  # first block: k group representatives bound the k-th best
            groups = min(n, 4 * k)
            reps = block[:, :groups * (n // groups)].reshape(b, groups, -1).max(2)  # one item of each group
            kth = -np.partition(-as_float(reps).astype(np.float64), k - 1, axis=1)[:, k - 1]
            self.low = np.maximum(self.low, bound.lower(kth))
        theta = bound.threshold(self.low)
        if not bf16:
            np.greater_equal(block, theta.astype(np.float32)[:, None], out=mask)  # exact: low is a float32 score
        else:
            key = _bf16_key_at_most(theta)
            np.greater_equal(block if (key > 0).all() else _order_key(block), key[:, None], out=mask)
        flat = np.flatnonzero(mask)
        r, c = np.divmod(flat, n)
        v = as_float(block.reshape(-1)[flat])
        if self.exclude is not None:
            kept = self.exclude[r] != c + g0
            r, c, v = r[kept], c[kept], v[kept]
        rows, cols = np.concatenate([self.rows, r]), np.concatenate([self.cols, c + g0])
        vals = np.concatenate([self.vals, v])
        order = np.argsort(rows, kind="stable")  # by row; columns stay ascending within a row
        rows, cols, vals = rows[order], cols[order], vals[order]
        self.low = np.maximum(self.low, bound.lower(_kth_largest(rows, vals, b, k)))
        keep = vals >= bound.threshold(self.low)[rows]
        self.rows, self.cols, self.vals = rows[keep], cols[keep], vals[keep]


def _candidates(q: Tensor, qb: Tensor | None, g: Tensor, g_low: list, bound: _Bound, k: int,
                exclude: np.ndarray | None, gallery_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every gallery item that can be among a query's k best, as row-sorted (row, column, coarse score) arrays.

    The block products use every torch thread; the filtering that follows is NumPy (one thread per call), so with
    several torch threads the rows are split into as many ranges, filtered concurrently (NumPy releases the GIL).
    """
    b, n_g = len(q), len(g)
    workers = max(1, min(torch.get_num_threads(), 4, b // 64))
    edges = [b * i // workers for i in range(workers + 1)]
    parts = [_Rows(edges[i], edges[i + 1], bound, k, exclude) for i in range(workers)]
    mask = np.empty((b, min(gallery_chunk, n_g)), dtype=bool)
    products = torch.empty(b * min(gallery_chunk, n_g), dtype=torch.float32 if qb is None else torch.bfloat16)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for j, g0 in enumerate(range(0, n_g, gallery_chunk)):
            g1 = min(n_g, g0 + gallery_chunk)
            n = g1 - g0
            out = products.view(-1)[:b * n].view(b, n)  # reused: a fresh 32-64 MB result would fault in new pages
            if qb is not None:
                block = torch.mm(qb, g_low[j].T, out=out).view(torch.int16).numpy()  # bf16 bits [b, n]
            else:
                block = product(q, g[g0:g1], out=out).numpy()
            if exclude is not None:  # the excluded item scores -inf (and is dropped from the candidates)
                inside = np.nonzero((exclude >= g0) & (exclude < g1))[0]
                block[inside, exclude[inside] - g0] = -np.inf if qb is None else np.int16(-128)  # bf16 -inf bits
            m = mask.reshape(-1)[:b * n].reshape(b, n)
            jobs = [(p, block[p.r0:p.r0 + p.b], m[p.r0:p.r0 + p.b]) for p in parts]
            if pool is None:
                parts[0].update(block, m, g0, qb is not None)
            else:
                list(pool.map(lambda job: job[0].update(job[1], job[2], g0, qb is not None), jobs))
    finally:
        if pool is not None:
            pool.shutdown()
    return (np.concatenate([p.rows + p.r0 for p in parts]), np.concatenate([p.cols for p in parts]),
            np.concatenate([p.vals for p in parts]))


def _exact_scores(q: Tensor, g_np: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
                  bf16: bool, batch: int = 64) -> np.ndarray:
    """fp32 scores of the candidates (the coarse ones when they are already fp32), ``batch`` queries at a time.

    The gathers of candidate rows dominate and are single-threaded in NumPy, so with more than one torch thread
    the batches are split over that many worker threads (NumPy and torch release the GIL there).
    """
    if not bf16:
        return vals
    out = np.empty(len(rows), dtype=np.float32)
    counts = np.bincount(rows, minlength=len(q))
    starts = np.cumsum(counts) - counts
    size = batch * max(int(counts.max()), _MIN_COLUMNS) * g_np.shape[1]

    def run(batch_starts: list[int]) -> None:
        buffer = np.empty(size, dtype=np.float32)
        for r0 in batch_starts:
            r1 = min(len(q), r0 + batch)
            lo, hi = starts[r0], starts[r1 - 1] + counts[r1 - 1]
            r, c = rows[lo:hi] - r0, cols[lo:hi]
            scores = rescore(q[r0:r1], g_np, _pad_rows(r, c, r1 - r0, 0), buffer).numpy()
            out[lo:hi] = scores[r, np.arange(hi - lo) - (starts[r0:r1] - lo)[r]]

    batches = list(range(0, len(q), batch))
    workers = min(torch.get_num_threads(), len(batches), 4)
    if workers <= 1:
        run(batches)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [batches[w::workers] for w in range(workers)]))
    return out


def _select(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, b: int, k: int,
            n_g: int) -> tuple[Tensor, Tensor]:
    """The k best per row by (score descending, column ascending); columns arrive ascending within each row."""
    counts = np.bincount(rows, minlength=b)
    if len(counts) < b or counts.min() < k:
        raise RuntimeError("topk_search: a query kept fewer than k candidates (please report this as a bug)")
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(rows)) - starts[rows]
    s = np.full((b, int(counts.max())), -np.inf, dtype=np.float32)
    i = np.full((b, int(counts.max())), n_g, dtype=np.int64)
    s[rows, pos], i[rows, pos] = scores, cols
    st, it = torch.from_numpy(s), torch.from_numpy(i)
    st, perm = st.sort(dim=1, descending=True, stable=True)  # stable: ascending columns first on ties
    return st[:, :k].contiguous(), it.gather(1, perm[:, :k])


# ---------------------------------------------------------------------------------------------------- faiss
def faiss_topk(queries: Tensor, gallery: Tensor, k: int, exclude: Tensor | None, query_chunk: int,
               gallery_chunk: int) -> tuple[Tensor, Tensor]:
    """faiss ``IndexFlatIP`` for :data:`_FAISS_EXTRA` more than k items, certified and rescored exactly; rows it
    cannot certify go through ``filter``.

    faiss's fp32 scores and torch's differ by at most ``eps = 2 gamma_D |q| max|g|`` (any summation order). With
    ``s_k`` faiss's k-th score and ``s_last`` its last returned one, the true k-th best is at least ``s_k - eps``
    and every item faiss did not return is at most ``s_last + eps``; so when ``s_last < s_k - 2 eps`` the items
    faiss returned with a score ``>= s_k - 2 eps`` hold the whole exact list, ties at the k-th place included.
    They are rescored by the block product's kernel and ordered by (score, lower index), as in ``blocks``.
    Asking for k + 1 only (the previous rule) left ~40 % of the rows of a 100k gallery uncertified: near-ties
    within 2 eps of the k-th place are common there.
    """
    faiss = faiss_module()
    q = queries.detach().contiguous()
    gallery = gallery.detach()
    g_np = gallery.contiguous().numpy()
    n_q, n_g = len(q), len(g_np)
    index = faiss.IndexFlatIP(g_np.shape[1])
    index.add(g_np)
    fs, fi = index.search(q.numpy(), min(n_g, k + _FAISS_EXTRA + (exclude is not None)))
    complete = exclude is None and fi.shape[1] >= n_g  # every item returned: nothing outside to bound
    if exclude is not None:  # drop the excluded item (or the last one) so that every row keeps the same count
        exc = exclude.cpu().numpy()
        drop = fi == exc[:, None]
        drop[~drop.any(1), -1] = True
        keep = ~drop
        fs, fi = fs[keep].reshape(n_q, -1), fi[keep].reshape(n_q, -1)
    d = q.shape[1]
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    qn = torch.linalg.vector_norm(q, dim=1).double().numpy()
    gn = float(torch.linalg.vector_norm(gallery, dim=1).max())
    eps = 2.2 * gamma * qn * gn * (1 + 4 * d * 2.0 ** -24) + 1e-30  # |faiss fp32 - torch fp32| (+10 %)
    ok = np.zeros(n_q, dtype=bool)
    if fi.shape[1] >= k:
        floor = fs[:, k - 1].astype(np.float64) - 2 * eps  # below this, no item can reach the k-th place
        ok = (fi.min(1) >= 0) & np.isfinite(fs).all(1)
        if not complete:
            ok &= fs[:, -1] < floor
    out_s, out_i = torch.empty(n_q, k), torch.empty(n_q, k, dtype=torch.long)
    good = np.nonzero(ok)[0]
    if len(good):
        cand = np.where(fs[good] >= floor[good, None], fi[good], n_g)
        cand.sort(axis=1)  # ascending index within a row: the stable sort of _select puts lower indices first
        rows, pos = np.nonzero(cand < n_g)
        cols = cand[rows, pos]
        scores = _exact_scores(q[torch.from_numpy(good)], g_np, rows, cols, np.empty(0, np.float32), True)
        good_t = torch.from_numpy(good)
        out_s[good_t], out_i[good_t] = _select(rows, cols, scores, len(good), k, n_g)
    bad = torch.from_numpy(np.nonzero(~ok)[0])
    if len(bad):
        sub_exc = None if exclude is None else exclude.cpu()[bad]
        out_s[bad], out_i[bad] = filtered_topk(q[bad], gallery, k, sub_exc, query_chunk, gallery_chunk, "fp32")
    return out_s, out_i


__all__ = ["BACKENDS", "choose_backend", "cpu_has_bf16", "filtered_topk", "faiss_topk", "rescore",
           "rescoring_is_exact"]
