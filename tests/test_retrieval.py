"""cirlab.core.retrieval: chunked top-K equals a full stable sort, re-ranking helpers, top-K/CIRR files,
feature cache."""
from __future__ import annotations

import doctest
import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cirlab import metrics as M
from cirlab import retrieval as R
from cirlab.core.topk import load_topk, save_topk

try:
    import naive_metrics as N
except ImportError:  # tests/ became a package
    from tests import naive_metrics as N

FAST = settings(max_examples=50, deadline=None)


def test_doctests_pass():
    result = doctest.testmod(R, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


@st.composite
def search_case(draw):
    """Small integer embeddings, so dot products tie exactly and often."""
    q, g, d = draw(st.integers(1, 7)), draw(st.integers(2, 40)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    lo = draw(st.sampled_from([0, -2]))
    queries = torch.from_numpy(rng.integers(lo, 3, (q, d)).astype(np.float32))
    gallery = torch.from_numpy(rng.integers(lo, 3, (g, d)).astype(np.float32))
    exclude = torch.from_numpy(np.where(rng.random(q) < 0.3, -1, rng.integers(0, g, q)))
    k = draw(st.integers(1, g - 1))
    return queries, gallery, exclude, k


@FAST
@given(search_case(), st.integers(1, 4), st.integers(1, 16))
def test_chunked_topk_equals_full_stable_sort(case, query_chunk, gallery_chunk):
    queries, gallery, exclude, k = case
    full = (queries @ gallery.T).numpy()
    for exc in (None, exclude):
        scores, idx = R.topk_search(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                                    exclude=exc)
        want_s, want_i = N.naive_topk(full, k, None if exc is None else exc.numpy())
        assert idx.tolist() == want_i.tolist()
        np.testing.assert_array_equal(scores.numpy(), want_s)
        s2, i2 = R.topk_candidates(torch.from_numpy(full), k, exclude=exc, query_chunk=query_chunk,
                                   gallery_chunk=gallery_chunk)
        assert i2.tolist() == want_i.tolist()


@FAST
@given(search_case())
def test_topk_positions_agree_with_target_ranks(case):
    queries, gallery, exclude, k = case
    full = queries @ gallery.T
    target = torch.randint(0, len(gallery), (len(queries),), generator=torch.Generator().manual_seed(k))
    target = torch.where(target == exclude, (target + 1) % len(gallery), target)
    _, idx = R.topk_search(queries, gallery, k, gallery_chunk=3, exclude=exclude)
    ranks = R.target_ranks(full, target, exclude)
    pos = R.candidate_ranks(idx, target)
    assert torch.equal(pos, torch.where(ranks <= k, ranks, 0))


def test_topk_search_does_not_modify_a_given_score_matrix():
    scores = torch.tensor([[0.3, 0.9, 0.1], [0.5, 0.2, 0.4]])
    before = scores.clone()
    R.topk_candidates(scores, 1, exclude=[1, 0])
    assert torch.equal(scores, before)


def test_topk_rejects_bad_inputs():
    q, g = torch.rand(3, 4), torch.rand(5, 4)
    with pytest.raises(ValueError, match="k=5 but only 4 gallery items"):
        R.topk_search(q, g, 5, exclude=[0, 1, -1])
    with pytest.raises(ValueError, match=r"must be \[\*, D\]"):
        R.topk_search(q, torch.rand(5, 3), 2)
    with pytest.raises(ValueError, match="exclude must hold 3 gallery indices"):
        R.topk_search(q, g, 2, exclude=[0, 9, 1])
    bad = g.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gallery contain NaN \(row 3\)"):
        R.topk_search(q, bad, 2)


# ------------------------------------------------------------------ re-ranking
def test_reorder_is_stable_and_fuse_interpolates():
    cand = torch.tensor([[4, 1, 3, 2]])
    s2 = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert R.reorder(cand, s2)[1].tolist() == [[1, 3, 4, 2]]  # ties keep the stage-I order
    s1 = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.equal(R.fuse_scores(s1, s2, 1.0), s1) and torch.equal(R.fuse_scores(s1, s2, 0.0), s2)
    with pytest.raises(ValueError, match="alpha"):
        R.fuse_scores(s1, s2, 1.5)


def test_reorder_and_rerank_refuse_nan_scores():
    """A diverged stage II's NaN scores were sorted first: its re-ranked list led with them, with no word."""
    cand = torch.tensor([[4, 1, 3], [2, 0, 5]])
    scores = torch.tensor([[0.5, 0.2, 0.1], [0.3, float("nan"), 0.9]])
    with pytest.raises(ValueError, match=r"^re-ranking scores of query 1 contain NaN"):
        R.reorder(cand, scores)
    with pytest.raises(ValueError, match="query 7 contain NaN"):  # the query's index, not its row among those scored
        R.rerank(lambda q, c: torch.where(q[:, None] == 7, float("nan"), 0.0).expand(c.shape), torch.tensor([3, 7]),
                 cand)
    # alpha 1 (stage I alone) or 0 (stage II alone) with an infinite score on the other side: not NaN (0 x -inf)
    s1, s2 = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[float("-inf"), 0.5, 0.9]])
    assert R.rerank(lambda q, c: s2, torch.arange(1), cand[:1], stage1_scores=s1, alpha=1.0)[1].tolist() == [[4, 1, 3]]
    assert R.fuse_scores(s2, s1, 0.0).tolist() == s1.tolist()


def test_topk_ranks_float64_scores_in_float64_as_target_ranks_does():
    """float64 scores were ranked in float32: two items 1e-12 apart tied, the lower index was listed first, and the
    list contradicted target_ranks (and the CIRR submission's recall file its recall_subset file)."""
    s = torch.tensor([[0.5, 0.5 + 1e-12, 0.1, 0.2]], dtype=torch.float64)
    scores, idx = R.topk_candidates(s, 2)
    assert idx.tolist() == [[1, 0]] and scores.dtype == torch.float64
    assert M.target_ranks(s, [1]).tolist() == [1]
    q, g = torch.tensor([[1.0]], dtype=torch.float64), s.reshape(4, 1)
    assert R.topk_search(q, g, 2)[1].tolist() == [[1, 0]]
    recall, subset = R.cirr_rankings(s, [3], [[0, 1, 2, 3]], list("abcd"), k=2)
    assert recall == [["b", "a"]] and subset[0][:2] == ["b", "a"]
    assert R.topk_candidates(s.float(), 2)[1].tolist() == [[0, 1]]  # a real float32 tie: lower index first


def test_topk_search_refuses_the_nan_products_of_infinite_embeddings():
    """inf x 0 is NaN: such scores were listed first (and the inf item dropped), where target_ranks refuses them."""
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [0.0, float("inf")]])
    with pytest.raises(ValueError, match=r"^scores of query row 0 contain NaN \(an infinite embedding"):
        R.topk_search(q, g, 2)
    finite_scores = torch.tensor([[1.0, 1.0]])
    assert R.topk_search(finite_scores, torch.tensor([[1.0, float("-inf")], [0.0, 1.0]]), 1)[1].tolist() == [[1]]


def test_rerank_batches_and_keeps_out_of_pool_ranks():
    calls = []

    def score_fn(qi: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        calls.append(len(qi))
        return (cand == qi[:, None] + 10).float()  # query i's true target is gallery item i + 10

    query_idx = torch.arange(5)
    cand = torch.stack([torch.tensor([20, 21, 10 + i, 22]) if i % 2 == 0 else torch.tensor([20, 21, 22, 23])
                        for i in range(5)])
    _, new = R.rerank(score_fn, query_idx, cand, batch_size=2)
    assert calls == [2, 2, 1]
    ranks = R.reranked_target_ranks(new, query_idx + 10, stage1_ranks=[3, 80, 3, 60, 3])
    assert ranks.tolist() == [1, 80, 1, 60, 1]


# ------------------------------------------------------------------ files
def test_make_topk_round_trips_through_the_file_format(tmp_path):
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(6, 8, generator=gen), torch.randn(30, 8, generator=gen)
    target = torch.tensor([0, 5, 9, 12, 29, -1])
    scores, idx = R.topk_search(queries, gallery, 10)
    ranks = R.target_ranks(queries @ gallery.T, target.clamp(min=0))
    names = [f"img{i:02d}" for i in range(30)]
    topk = R.make_topk(scores, idx, query_ids=range(6), gallery_ids=names, target=target, ranks=ranks,
                       category=["c"] * 6, meta={"model": "toy", "split": "val"})
    back = load_topk(save_topk(tmp_path / "val.topk.npz", topk))
    assert back.gallery_ids.tolist() == [[names[j] for j in row] for row in idx.tolist()]
    assert back.target_rank.tolist() == ranks[:5].tolist() + [0]
    assert back.target_ids.tolist()[-2:] == ["img29", ""] and back.meta == {"model": "toy", "split": "val", "k": 10}
    np.testing.assert_allclose(back.scores, scores.numpy())
    # without full ranks a target outside the list gets K + 1
    lower = R.make_topk(scores, idx, query_ids=range(6), gallery_ids=names, target=target)
    assert all(r == p or (r == 11 and p > 10) for r, p in zip(lower.target_rank[:5], ranks[:5].tolist()))


def test_make_topk_of_empty_lists_counts_every_known_target_a_miss(tmp_path):
    # K = 0: a one-image gallery with the reference excluded leaves nothing to list
    topk = R.make_topk(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.long), query_ids=["a", "b", "c"],
                       gallery_ids=["x"], target=[0, 0, -1])
    assert topk.target_rank.tolist() == [1, 1, 0] and topk.gallery_ids.shape == (3, 0)
    assert R.candidate_ranks(torch.zeros(2, 0, dtype=torch.long), [0, -1]).tolist() == [0, 0]


def test_cirr_rankings_build_a_valid_submission(tmp_path):
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 80, generator=gen)
    members = torch.stack([torch.randperm(80, generator=gen)[:6] for _ in range(4)])
    reference = members[:, 2]
    names = [f"test1-{i}-img0" for i in range(80)]
    ranked, subset = R.cirr_rankings(scores, reference, members, names)
    for q in range(4):
        order = torch.argsort(scores[q], descending=True, stable=True).tolist()
        want = [names[j] for j in order if j != int(reference[q])]
        assert ranked[q] == want[:50]
        assert subset[q] == [n for n in want if names.index(n) in members[q].tolist()][:3]
    sub = M.cirr_submission([101, 102, 103, 104], ranked, subset)
    recall_path, subset_path = R.save_cirr_submission(sub, tmp_path, "toy")
    assert recall_path.name == "recall_submission_toy.json"
    assert subset_path.name == "recall_subset_submission_toy.json"
    loaded = json.loads(subset_path.read_text())
    M.validate_cirr_submission(loaded, pair_ids=[101, 102, 103, 104])
    assert list(loaded) == sorted(loaded)  # written with sort_keys=True


def test_cirr_rankings_reject_a_set_too_small():
    with pytest.raises(ValueError, match="query 0: img_set has 2 non-reference members, need 3"):
        R.cirr_rankings(torch.rand(1, 60), [0], [[0, 1, 2, -1]], [str(i) for i in range(60)])


# ------------------------------------------------------------------ encoding and the feature cache
class Counter:
    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return x * 2.0


def _items(n: int = 10) -> list[dict]:
    return [{"image": torch.full((3,), float(i)), "gallery_idx": i} for i in range(n)]


def test_encode_corpus_cache_hit_and_changed_key(tmp_path, caplog):
    loader = DataLoader(_items(), batch_size=4)
    key = R.cache_key("ckpt-abc", "synthetic", "val", 10, "encode_target")
    enc = Counter()
    with caplog.at_level(logging.INFO, logger="cirlab.core.retrieval"):
        first = R.encode_corpus(enc, loader, cache_dir=tmp_path, cache_key=key, progress=False)
        assert enc.batches == 3 and "miss" in caplog.text
        caplog.clear()
        again = R.encode_corpus(enc, loader, cache_dir=tmp_path, cache_key=key, progress=False)
    assert enc.batches == 3 and "hit" in caplog.text  # no encoding on a hit
    assert torch.equal(first, again) and torch.equal(first[:, 0], torch.arange(10.0) * 2)
    other = R.cache_key("ckpt-abd", "synthetic", "val", 10, "encode_target")
    R.encode_corpus(enc, loader, cache_dir=tmp_path, cache_key=other, progress=False)
    assert enc.batches == 6 and len(list(tmp_path.glob("*.pt"))) == 2
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_feature_caches_are_written_with_the_users_umask(tmp_path):
    """A group-shared CIRLAB_CACHE: the gallery cache and the per-item store were 0600 whatever the umask
    (``mkstemp``), so another member's run could not read them and replaced them."""
    import os

    from cirlab.core.featcache import FeatureStore, save_tensor

    old = os.umask(0o002)
    try:
        save_tensor(tmp_path / "gallery" / "g.pt", "key", torch.ones(2, 3))
        store = FeatureStore(tmp_path / "store")
        store.get_or_compute(torch.rand(4, 3), lambda x: x * 2)
        store.flush()
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".cirlab.lock")]
    assert len(written) >= 3  # the gallery file, a segment and its keys
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o664"}, {p.name: oct(p.stat().st_mode & 0o777)
                                                                           for p in written}


def test_feature_store_keeps_a_bounded_number_of_segments_mapped(tmp_path, monkeypatch, caplog):
    """Every segment stayed memory-mapped, each map holding a file descriptor: a store of Fashion-IQ's 77K images
    (300 segments) came near the usual limit of 1024 open files."""
    import os

    from cirlab.core import featcache

    monkeypatch.setattr(featcache, "MAX_MAPPED", 3)
    items = torch.arange(40.0).view(20, 2)
    store = featcache.FeatureStore(tmp_path / "store", flush_rows=2)
    for i in range(0, 20, 2):
        store.get_or_compute(items[i:i + 2], lambda x: x * 10)
    assert len(list((tmp_path / "store").glob("seg-*.npy"))) == 10
    reopened = featcache.FeatureStore(tmp_path / "store", flush_rows=2)  # a later run
    fds = len(os.listdir("/proc/self/fd"))
    got = reopened.get_or_compute(items[torch.randperm(20)], lambda x: pytest.fail("recomputed"))
    assert sorted(got[:, 0].tolist()) == [float(x) for x in range(0, 400, 20)]
    assert len(reopened._mapped) == 3 and len(os.listdir("/proc/self/fd")) <= fds + 3
    # a segment removed since the store was opened: its items are recomputed, once, and stored again
    for seg in (tmp_path / "store").glob("seg-*.npy"):
        seg.unlink()
    reopened._mapped.clear()
    calls = []
    with caplog.at_level(logging.WARNING, logger="cirlab.core.featcache"):
        again = reopened.get_or_compute(items, lambda x: calls.append(len(x)) or x * 10)
        assert torch.equal(again, items * 10) and calls == [20]
        reopened.get_or_compute(items, lambda x: calls.append(len(x)) or x * 10)
    assert calls == [20] and "became unreadable" in caplog.text


def test_encode_corpus_recomputes_a_corrupt_cache(tmp_path, caplog):
    key = R.cache_key("x")
    (tmp_path / f"{key}.pt").write_bytes(b"not a torch file")
    enc = Counter()
    with caplog.at_level(logging.WARNING, logger="cirlab.core.retrieval"):
        feats = R.encode_corpus(enc, DataLoader(_items(3), batch_size=2), cache_dir=tmp_path, cache_key=key,
                                progress=False)
    assert enc.batches == 2 and "unreadable" in caplog.text and feats.shape == (3, 3)
    assert torch.equal(R.encode_corpus(enc, [], cache_dir=tmp_path, cache_key=key, progress=False), feats)


def test_encode_corpus_scatters_shuffled_batches_back_by_index():
    loader = DataLoader(_items(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    feats = R.encode_corpus(Counter(), loader, index_key="gallery_idx", progress=False)
    assert feats[:, 0].tolist() == [2.0 * i for i in range(10)]
    duplicated = [{"image": torch.ones(2, 3), "gallery_idx": torch.tensor([0, 0])}]
    with pytest.raises(ValueError, match="not a permutation"):
        R.encode_corpus(Counter(), duplicated, index_key="gallery_idx", progress=False)


def test_encode_corpus_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="cache_dir given without cache_key"):
        R.encode_corpus(Counter(), _items(2), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="must return a Tensor"):
        R.encode_corpus(lambda x: x.tolist(), [{"image": torch.ones(1, 2)}], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        R.encode_corpus(Counter(), [], progress=False)
    mixed = [{"image": torch.ones(2, 3, dtype=torch.bfloat16)}, {"image": torch.full((1, 3), 1 / 3)}]
    assert R.encode_corpus(lambda x: x, mixed, progress=False).dtype == torch.float32  # promoted, as torch.cat does
    uneven = [{"image": torch.ones(2, 3), "gallery_idx": torch.tensor([0, 1, 2])},
              {"image": torch.ones(2, 3), "gallery_idx": torch.tensor([3])}]
    with pytest.raises(ValueError, match="batch 0 holds 3 indices for 2 encoded rows"):
        R.encode_corpus(lambda x: x, uneven, index_key="gallery_idx", progress=False)
    ragged = [{"image": torch.ones(2, 3)}, {"image": torch.ones(1, 4)}]
    with pytest.raises(ValueError, match=r"batch 1 encodes to rows of shape \(4,\), batch 0 to \(3,\)"):
        R.encode_corpus(lambda x: x, ragged, progress=False)


def test_digests_change_with_content(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-2")
    assert R.file_digest(a) != R.file_digest(b) and R.file_digest(a) == R.file_digest(a)
    lin = torch.nn.Linear(3, 2)
    d0 = R.state_dict_digest(lin)
    with torch.no_grad():
        lin.bias[0] += 1
    assert R.state_dict_digest(lin) != d0


def test_extra_state_digests_see_whole_arrays_and_are_the_same_in_every_process():
    """Extra state was digested by repr: numpy elides arrays of over 1000 elements, so two tables collided (wrong
    cache hits), and a set prints in hash order, so the digest changed per process (the cache never hit)."""
    import os
    import subprocess
    import sys

    from cirlab.core.errors import ModelContractError

    table = np.zeros(2000, np.float32)
    other = table.copy()
    other[1000] = 1.0
    assert R.state_dict_digest({"t": table}) != R.state_dict_digest({"t": other})
    assert R.state_dict_digest({"t": table}) != R.state_dict_digest({"t": table.astype(np.float64)})
    assert R.state_dict_digest({"b": b"ab"}) != R.state_dict_digest({"b": b"ac"})
    code = ("from cirlab.core.featcache import state_dict_digest; "
            "print(state_dict_digest({'words': {'red', 'blue', 'green', 'sleeveless', 'v-neck', 'cafe'}}))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(4)}
    assert len(digests) == 1
    unpicklable = r"cannot digest the extra state 'f': a function is none of .* and it does not pickle"
    with pytest.raises(ModelContractError, match=unpicklable):
        R.state_dict_digest({"f": lambda: 0})


def test_rerank_topk_fuses_with_stage1_scores_only_when_asked():
    from types import SimpleNamespace

    from cirlab.core.topk import TopK
    from cirlab.engine import rerank

    names = [f"g{i}" for i in range(6)]
    split = SimpleNamespace(gallery_index={n: i for i, n in enumerate(names)}, gallery_names=names,
                            target_indices=lambda: [2, 5], has_targets=True, exclude_reference=False)
    first = TopK(["q0", "q1"], [["g0", "g1", "g2"], ["g3", "g4", "g0"]], [[0.9, 0.8, 0.1], [0.9, 0.5, 0.4]], [3, 9])

    def stage2(rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return (cand == 2).float() * 0.5  # stage II likes g2 a little

    alone = rerank.rerank_topk(stage2, split, first, 3)
    assert alone.gallery_ids[0].tolist() == ["g2", "g0", "g1"] and alone.target_rank.tolist() == [1, 9]
    assert alone.gallery_ids[1].tolist() == ["g3", "g4", "g0"]  # target outside the pool: not scored, order kept
    np.testing.assert_allclose(alone.scores[1], rerank.MISS_SCORE)
    fused = rerank.rerank_topk(stage2, split, first, 3, alpha=0.9)  # 0.9 * stage I dominates: g2 stays last
    assert fused.gallery_ids[0].tolist() == ["g0", "g1", "g2"] and fused.target_rank.tolist() == [3, 9]
    np.testing.assert_allclose(fused.scores[0], [0.81, 0.72, 0.14], rtol=1e-6)


# ------------------------------------------------------------------ top-K backends (cirlab.core._search)
from cirlab.core import _search  # noqa: E402

BACKENDS = ["blocks", "filter", "bf16"] + (["faiss"] if _search.faiss_module() is not None else [])


@FAST
@given(search_case(), st.integers(1, 4), st.integers(1, 16), st.sampled_from(BACKENDS))
def test_every_backend_equals_full_stable_sort(case, query_chunk, gallery_chunk, backend):
    """Integer embeddings tie exactly and often: every backend must put the lower gallery index first."""
    queries, gallery, exclude, k = case
    full = (queries @ gallery.T).numpy()
    for exc in (None, exclude):
        scores, idx = R.topk_search(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                                    exclude=exc, backend=backend)
        want_s, want_i = N.naive_topk(full, k, None if exc is None else exc.numpy())
        assert idx.tolist() == want_i.tolist()
        np.testing.assert_array_equal(scores.numpy(), want_s)


def _embeddings(n, d, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    return scale * (x + shift)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("case", ["unit", "large_norms", "negative_scores", "duplicates"])
def test_backends_bit_identical_to_blocks(backend, case):
    """Realistic sizes (several query and gallery chunks): indices and fp32 scores equal the block path bit for bit."""
    q, g = _embeddings(300, 64, 0), _embeddings(6000, 64, 1)
    if case == "large_norms":
        q, g = q * 37.5, g * torch.linspace(0.1, 80.0, len(g))[:, None]
    elif case == "negative_scores":  # every score is negative: the bf16 filter compares sign-aware keys
        direction = torch.nn.functional.normalize(torch.ones(64), dim=0)
        g = torch.nn.functional.normalize(g + 3 * direction, dim=1)
        q = torch.nn.functional.normalize(q - 3 * direction, dim=1)
    elif case == "duplicates":  # exact ties at and around the k-th place
        g[1000:1400] = g[:400]
        g[5000:5050] = g[4000]
    exclude = torch.randint(-1, len(g), (len(q),), generator=torch.Generator().manual_seed(2))
    for k in (1, 20):
        for exc in (None, exclude):
            want = R.topk_search(q, g, k, query_chunk=128, gallery_chunk=1024, exclude=exc, backend="blocks")
            got = R.topk_search(q, g, k, query_chunk=128, gallery_chunk=1024, exclude=exc, backend=backend)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (case, k, exc is None)


def test_bf16_rescoring_reproduces_the_block_product():
    if not _search.rescoring_is_exact(512):
        pytest.skip("this BLAS computes small products with another kernel: 'auto' never picks bf16 here")
    q, g = _embeddings(2000, 512, 3), _embeddings(20000, 512, 4)
    want = R.topk_search(q, g, 50, backend="blocks")
    got = R.topk_search(q, g, 50, backend="bf16")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_backend_choice_and_guards():
    q, g = _embeddings(8, 16, 0), _embeddings(500, 16, 1)
    assert _search.choose_backend("auto", q, g, 5) == "blocks"  # small: the simple path
    with pytest.raises(ValueError, match="backend must be one of"):
        R.topk_search(q, g, 5, backend="hnsw")
    with pytest.raises(ValueError, match="float32 CPU"):
        R.topk_search(q.double(), g.double(), 5, backend="filter")
    g_inf = g.clone()
    g_inf[3, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        R.topk_search(q, g_inf, 5, backend="filter")
    assert R.topk_search(q, g_inf, 5)[1].shape == (8, 5)  # auto falls back to blocks
    big_q, big_g = _embeddings(1100, 16, 2), _embeddings(65000, 16, 3)
    exact = _search.rescoring_is_exact(16)
    # both CPUs, whatever this one is: with bf16 (avx512_bf16 / AMX), and without (or CIRLAB_BF16=0)
    for bf16, expected in (("1", "bf16"), ("0", "faiss" if _search.faiss_module() is not None else "filter")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CIRLAB_BF16", bf16)
            _search.cpu_has_bf16.cache_clear()
            assert _search.choose_backend("auto", big_q, big_g, 50) == (expected if exact else "filter")
    _search.cpu_has_bf16.cache_clear()  # the machine's own answer again


def test_cpu_bf16_detection_can_be_overridden(monkeypatch):
    _search.cpu_has_bf16.cache_clear()
    monkeypatch.setenv("CIRLAB_BF16", "0")
    assert _search.cpu_has_bf16() is False
    monkeypatch.setenv("CIRLAB_BF16", "1")
    _search.cpu_has_bf16.cache_clear()
    assert _search.cpu_has_bf16() is True
    _search.cpu_has_bf16.cache_clear()


def test_topk_fields_refuse_fractional_ranks_and_wrong_shapes():
    from cirlab.core.topk import TopK

    g, s = [["a"], ["b"]], [[0.9], [0.8]]
    with pytest.raises(ValueError, match=r"TopK: target_rank must hold whole ranks >= 0 \(0 = unknown\): 1 of 2 "
                                         r"entries are not, at positions \[0\] \(values \[1.7\]\)"):
        TopK(["q0", "q1"], g, s, [1.7, 0])
    assert TopK(["q0", "q1"], g, s, [2.0, 0]).target_rank.tolist() == [2, 0]  # 0 = unknown stays allowed
    with pytest.raises(ValueError, match=r"TopK: query_ids must be a 1-D list, got shape \(\) \(str\)"):
        TopK("abc", [["a"]] * 3, [[0.9]] * 3, [1, 2, 3])
    with pytest.raises(ValueError, match=r"TopK: scores has shape \(3, 1\), expected \[2 queries, K\]"):
        TopK(["q0", "q1"], g, [[0.9]] * 3, [1, 2])
    with pytest.raises(ValueError, match=r"TopK: target_rank has shape \(3,\), expected \[2\]"):
        TopK(["q0", "q1"], g, s, [1, 2, 3])
    with pytest.raises(ValueError, match=r"TopK: category must have 2 entries \(one per query\), got shape \(\)"):
        TopK(["q0", "q1"], g, s, [1, 2], category="dress")
    assert TopK(["q0", "q1"], ["a", "b"], [0.9, 0.8], [1, 2]).gallery_ids.shape == (2, 1)  # a flat [Q] list still fits


def test_topk_k_is_a_whole_number():
    """k=2.0 failed inside torch (``empty(): ... got float``) and k=True as a size mismatch."""
    q, g = torch.rand(3, 4), torch.rand(6, 4)
    for bad in (2.0, True, 0):
        with pytest.raises(ValueError, match=rf"k \(a top-K list's length\) must be a whole number >= 1, got {bad}"):
            R.topk_search(q, g, bad)
    assert R.topk_search(q, g, np.int64(2))[1].shape == (3, 2)


def test_topk_meta_may_hold_paths(tmp_path):
    """A Path in meta (a checkpoint, a data root) failed the save with JSON's TypeError."""
    from cirlab.core.topk import TopK, load_topk, save_topk

    topk = TopK(["q0"], [["a"]], [[0.5]], [1], meta={"checkpoint": tmp_path / "best.pt"})
    assert load_topk(save_topk(tmp_path / "x.topk.npz", topk)).meta == {"checkpoint": str(tmp_path / "best.pt")}


def test_load_topk_names_a_file_that_is_not_one(tmp_path):
    from cirlab.core.topk import load_topk

    (tmp_path / "readme.py").write_text("print('hi')\n")
    with pytest.raises(ValueError, match=r"readme.py: not a top-K file \(cirlab writes them as .topk.npz"):
        load_topk(tmp_path / "readme.py")  # was numpy's "pickled data ... allow_pickle=False"
    with pytest.raises(FileNotFoundError, match="top-K file not found"):
        load_topk(tmp_path / "none.topk.npz")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_score_does_not_depend_on_the_batch_size(threads):
    """On 2 threads the BLAS took another summation order for 5-7 and 9-11 query rows: a query's scores (and so
    near-tie orders) changed in the last bits with how many queries were searched with it, and ``bf16`` was not
    bit-identical to ``blocks`` on small batches."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        q, g = torch.randn(40, 32, generator=gen), torch.randn(700, 32, generator=gen)
        whole = R.topk_search(q, g, 20, backend="blocks")
        for m in (1, 2, 3, 5, 6, 7, 9, 10, 11, 13):
            part = R.topk_search(q[:m], g, 20, backend="blocks")
            assert torch.equal(part[0], whole[0][:m]) and torch.equal(part[1], whole[1][:m]), m
            if _search.cpu_has_bf16() and _search.rescoring_is_exact(32):
                assert torch.equal(R.topk_search(q[:m], g, 20, backend="bf16")[0], whole[0][:m]), m
    finally:
        torch.set_num_threads(before)


def test_encoding_draws_a_bar_only_where_someone_watches(monkeypatch, capsys):
    """encode_corpus drew a tqdm bar by default, also under papermill and into log files (the trainer's "auto"
    policy did not): "auto" now follows that policy."""
    from cirlab.core import console, retrieval

    batches = [{"image": torch.ones(2, 3)}, {"image": torch.zeros(1, 3)}]
    for watched in (False, True):
        monkeypatch.setattr(console, "live_frontend", lambda: watched)
        out = retrieval.encode_corpus(lambda x: x.sum(1, keepdim=True), batches)
        assert out.flatten().tolist() == [3.0, 3.0, 0.0]
        assert ("encode image" in capsys.readouterr().err) is watched


# ------------------------------------------------------------------ exclusion next to -inf scores, chunk sizes
@st.composite
def inf_case(draw):
    """Tie-heavy integer scores where many (or all) entries are -inf, an exclusion on most queries."""
    q, g = draw(st.integers(1, 6)), draw(st.integers(2, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scores = rng.integers(-2, 3, (q, g)).astype(np.float32)
    scores[rng.random((q, g)) < draw(st.sampled_from([0.3, 0.8, 1.0]))] = -np.inf
    exclude = np.where(rng.random(q) < 0.2, -1, rng.integers(0, g, q))
    return scores, exclude, draw(st.integers(1, g - 1))


@FAST
@given(inf_case(), st.integers(1, 4), st.integers(1, 8))
def test_excluded_item_never_listed_among_minus_inf_scores(case, query_chunk, gallery_chunk):
    """The excluded item was masked with -inf, tied with real -inf scores and won by its lower index: it came back
    in the list. The list must equal a stable sort with the item removed, and agree with target_ranks."""
    scores, exclude, k = case
    full, exc = torch.from_numpy(scores), torch.from_numpy(exclude)
    want_s, want_i = N.naive_topk(scores, k, exclude)
    got_s, got_i = R.topk_candidates(full, k, exclude=exc, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert got_i.tolist() == want_i.tolist()
    np.testing.assert_array_equal(got_s.numpy(), want_s)
    for target in range(scores.shape[1]):  # each listed item sits at its target_ranks rank
        tgt = torch.full((len(scores),), target)
        ranks = M.target_ranks(full, tgt, exc)
        pos = R.candidate_ranks(got_i, tgt)
        assert torch.equal(pos, torch.where(ranks <= k, ranks, 0))


def test_excluded_item_is_dropped_by_every_backend_when_scores_reach_minus_inf():
    # the reviewer's case: topk_candidates gave [[2, 0]] with item 0 excluded
    inf = float("inf")
    assert R.topk_candidates(torch.tensor([[-inf, -inf, 0.5]]), 2, exclude=[0])[1].tolist() == [[2, 1]]
    # embeddings whose products overflow to -inf for half of the gallery: the search backends meet real -inf too
    rng = np.random.default_rng(0)
    gallery = np.concatenate([np.where(rng.random((30, 1)) < 0.5, -1e30, 0.0),
                              rng.integers(-1, 2, (30, 2))], 1).astype(np.float32)
    queries = np.concatenate([np.full((5, 1), 1e30), rng.integers(-1, 2, (5, 2))], 1).astype(np.float32)
    full = torch.from_numpy(queries) @ torch.from_numpy(gallery).T
    assert bool(torch.isneginf(full).any()) and not bool(torch.isnan(full).any())
    exclude = torch.from_numpy(np.nonzero(gallery[:, 0] < 0)[0][:5])  # each query excludes a -inf item
    want_i = N.naive_topk(full.numpy(), 25, exclude.numpy())[1]
    for backend in BACKENDS:
        got = R.topk_search(torch.from_numpy(queries), torch.from_numpy(gallery), 25, gallery_chunk=7,
                            exclude=exclude, backend=backend)[1]
        assert got.tolist() == want_i.tolist(), backend


def test_chunk_sizes_are_whole_numbers_of_at_least_one():
    """query_chunk=-1 returned uninitialised memory as indices, gallery_chunk=-1 a bare TypeError, 0 a bare
    ValueError from range()."""
    from cirlab.core.errors import InputError

    q, g = torch.rand(3, 4), torch.rand(6, 4)
    s = q @ g.T
    for name in ("query_chunk", "gallery_chunk"):
        for bad in (-1, 0, 1.5):
            pattern = rf"^{name} must be a whole number >= 1, got {bad!r}$"
            with pytest.raises(InputError, match=pattern):
                R.topk_search(q, g, 2, **{name: bad})
            with pytest.raises(InputError, match=pattern):
                R.topk_candidates(s, 2, **{name: bad})
    with pytest.raises(InputError, match=r"^query_chunk must be a whole number >= 1, got -1$"):
        R.cirr_rankings(s, [0, 1, 2], [[0, 1, 2, 3, 4]] * 3, list("abcdef"), k=2, query_chunk=-1)
    with pytest.raises(InputError, match=r"^batch_size must be a whole number >= 1, got 0$"):
        R.rerank(lambda qi, c: c.float(), torch.arange(3), torch.tensor([[1, 2]] * 3), batch_size=0)
    assert torch.equal(R.topk_candidates(s, 2, query_chunk=np.int64(1))[1], R.topk_candidates(s, 2)[1])


def test_cirr_rankings_say_member_lists_must_be_padded():
    from cirlab.core.errors import InputError

    with pytest.raises(InputError, match=r"padded with -1 to one length, got lists of lengths \[4, 5\]"):
        R.cirr_rankings(torch.rand(2, 8), [0, 1], [[0, 1, 2, 3], [1, 2, 3, 4, 5]], list("abcdefgh"), k=2)
    assert R.subset_topk(torch.rand(2, 8), [0, 1], [[0, 1, 2, 3, -1], [1, 2, 3, 4, 5]]).shape == (2, 3)


def test_subset_topk_agrees_with_cirr_subset_ranks_on_float64_near_ties_and_refuses_nan():
    """float64 scores were cast to float32 first, so two members 1e-12 apart tied and the lower index was listed
    where cirr_subset_ranks ranked the higher-scored one first; a NaN member was listed first, silently."""
    from cirlab.core.errors import InputError

    scores = torch.tensor([[5.0, 1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    best = R.subset_topk(scores, [0], [[0, 1, 2, 3]], k=1)
    assert best.tolist() == [[2]] and M.cirr_subset_ranks(scores, [2], [0], [[0, 1, 2, 3]]).tolist() == [1]
    half = R.subset_topk(scores.to(torch.bfloat16), [0], [[0, 1, 2, 3]], k=2)
    assert half.tolist() == [[1, 2]]  # bfloat16 cannot tell them apart: a tie, lower index first
    nan = torch.tensor([[0.9, float("nan"), 0.8, 0.3, 0.5]])
    with pytest.raises(InputError, match=r"^query 0: scores contain NaN among its img_set members$"):
        R.subset_topk(nan, [0], [[0, 1, 2, 3]], k=2)
    assert R.subset_topk(nan, [1], [[0, 1, 2, 3]], k=2).tolist() == [[0, 2]]  # NaN on the removed reference: fine


def test_subset_topk_lists_members_scored_minus_infinity_never_the_reference_or_a_pad():
    """A stage-II scorer giving log-probabilities can score a member -inf; the masked reference / -1 pad / repeat
    (also -inf) won the tie by its lower index, so the submission listed them while cirr_subset_ranks did not."""
    from cirlab.core import metrics as M

    inf = float("-inf")
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 8, generator=gen)
    scores[scores < 0.3] = inf  # many members at -inf, ties among them
    reference = torch.arange(6)
    members = [[r, (r + 1) % 8, (r + 2) % 8, -1, (r + 3) % 8, (r + 1) % 8] for r in range(6)]

    def naive(q: int) -> list[int]:  # kept members once each, by (score descending, index ascending)
        kept = sorted({m for m in members[q] if m >= 0 and m != q})
        return sorted(kept, key=lambda m: (-float(scores[q, m]), m))[:3]

    got = R.subset_topk(scores, reference, members, k=3)
    assert got.tolist() == [naive(q) for q in range(6)]
    targets = got[:, 0]
    assert M.cirr_subset_ranks(scores, targets, reference, members).tolist() == [1] * 6  # the metric agrees


def test_a_reopened_feature_store_says_how_much_disk_it_takes(tmp_path, caplog):
    """Nothing prunes the cache and real data fills gigabytes: the store's line says its size, not only its items."""
    import logging

    from cirlab.core.featcache import FeatureStore

    store = FeatureStore(tmp_path / "store", flush_rows=1)
    store.get_or_compute(torch.arange(4000.0).view(2, 2000), lambda t: t)
    store.flush()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "store").glob("seg-*"))
    with caplog.at_level(logging.INFO, logger="cirlab"):
        FeatureStore(tmp_path / "store")
    assert f"2 cached items, {on_disk / 1e6:.1f} MB" in caplog.text and on_disk > 16000


def test_a_feature_store_with_an_emptied_segment_skips_it_and_computes_those_rows_again(tmp_path, caplog):
    """Segments are written without fsync (thousands of files): a power cut can leave one empty, which made
    opening the store raise EOFError from numpy, ending the training that opened it."""
    from cirlab.core.featcache import FeatureStore

    store = FeatureStore(tmp_path / "store", flush_rows=2)
    rows = torch.arange(8.0).view(4, 2)
    for half in (rows[:2], rows[2:]):  # a segment each
        store.get_or_compute(half, lambda t: t * 10)
    store.flush()
    segments = sorted((tmp_path / "store").glob("seg-*.npy"))
    assert len(segments) == 2
    segments[0].write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cirlab"):
        reopened = FeatureStore(tmp_path / "store")
    assert "skipping unreadable segment" in caplog.text and len(reopened) == 2
    assert torch.equal(reopened.get_or_compute(rows, lambda t: t * 10), rows * 10)
    assert (reopened.hits, reopened.misses) == (2, 2)
