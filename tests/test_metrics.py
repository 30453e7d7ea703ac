"""cirlab.core.metrics against the naive per-query loops (tests/naive_metrics.py) on random, tied and edge inputs."""
from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cirlab import metrics as M

try:
    import naive_metrics as N
except ImportError:  # tests/ became a package
    from tests import naive_metrics as N

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None)


@st.composite
def cir_case(draw, tied: bool | None = None):
    """Q x G scores (often tied), a target per query, and an exclusion per query (-1 or an index)."""
    q = draw(st.integers(1, 6))
    g = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    tied = draw(st.booleans()) if tied is None else tied
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, size=(q, g)).astype(np.float32) if tied else rng.standard_normal((q, g)).astype(
        np.float32)
    target = rng.integers(0, g, size=q)
    exclude = np.where(rng.random(q) < 0.3, -1, rng.integers(0, g, size=q))
    return scores, target, exclude


def test_doctests_pass():
    result = doctest.testmod(M, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0


# ------------------------------------------------------------------ ranks and recall
@FAST
@given(cir_case())
def test_target_ranks_equal_naive_loop(case):
    scores, target, exclude = case
    got = M.target_ranks(torch.from_numpy(scores), torch.from_numpy(target), torch.from_numpy(exclude)).tolist()
    want = N.naive_ranks(scores, target, exclude)
    g = scores.shape[1]
    assert got == [g + 1 if r is None else r for r in want]


@FAST
@given(cir_case(), st.integers(1, 5))
def test_recall_at_k_equals_naive_loop_for_any_chunk(case, chunk):
    scores, target, exclude = case
    ks = (1, 2, 5, 50)  # 50 > G: a target removed with its reference must still be a miss
    for exc in (None, exclude):
        got = M.recall_at_k(torch.from_numpy(scores), torch.from_numpy(target), ks,
                            None if exc is None else torch.from_numpy(exc), chunk_size=chunk)
        assert got == pytest.approx(N.naive_recall(scores, target, ks, exc))


@FAST
@given(cir_case(tied=True))
def test_tie_variants_bound_the_stable_rank(case):
    scores, target, _ = case
    s, t = torch.from_numpy(scores), torch.from_numpy(target)
    opt, stable, pes = (M.target_ranks(s, t, ties=x) for x in ("optimistic", "stable", "pessimistic"))
    ts = scores[np.arange(len(t)), target][:, None]
    assert opt.tolist() == ((scores > ts).sum(1) + 1).tolist()  # strict count (hrem 7.6)
    assert pes.tolist() == (scores >= ts).sum(1).tolist()  # every tie ahead
    assert bool((opt <= stable).all() and (stable <= pes).all())


def test_ties_resolve_toward_lower_index():
    s = torch.zeros(1, 5)
    assert M.target_ranks(s.repeat(5, 1), torch.arange(5)).tolist() == [1, 2, 3, 4, 5]
    # removing a tied item in front of the target moves it up; removing one behind does not
    assert M.target_ranks(s.repeat(2, 1), torch.tensor([3, 3]), torch.tensor([1, 4])).tolist() == [3, 4]


def test_target_equal_to_excluded_reference_is_a_miss():
    s = torch.tensor([[0.9, 0.1, 0.2]])
    assert M.target_ranks(s, [0], [0]).tolist() == [4]
    assert M.recall_at_k(s, [0], (1, 10), exclude=[0]) == {"R@1": 0.0, "R@10": 0.0}


def test_bad_inputs_raise_with_the_entry():
    s = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"target\[1\] = 4"):
        M.target_ranks(s, [0, 4, 1])
    with pytest.raises(ValueError, match="exclude has 2 entries"):
        M.target_ranks(s, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        M.target_ranks(torch.rand(4), [0])
    with pytest.raises(ValueError, match="ties must be"):
        M.target_ranks(s, [0, 1, 2], ties="random")
    bad = s.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        M.target_ranks(bad, [0, 1, 2], chunk_size=1)


def test_numpy_and_float64_inputs_match_tensor_inputs():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((7, 9))
    target = rng.integers(0, 9, 7)
    assert M.target_ranks(scores, target).tolist() == M.target_ranks(torch.from_numpy(scores).float(),
                                                                     torch.from_numpy(target)).tolist()


# ------------------------------------------------------------------ Fashion-IQ and Shoes
@FAST
@given(cir_case(), cir_case(), cir_case())
def test_fashioniq_equals_naive_per_category(a, b, c):
    cats = dict(zip(M.FIQ_CATEGORIES, (a, b, c)))
    got = M.fashioniq_metrics({k: (torch.from_numpy(s), torch.from_numpy(t)) for k, (s, t, _) in cats.items()})
    for cat, (s, t, _) in cats.items():
        want = N.naive_recall(s, t, (10, 50))
        assert got[f"{cat}_R@10"] == pytest.approx(want["R@10"])
        assert got[f"{cat}_R@50"] == pytest.approx(want["R@50"])
    avg10 = np.mean([got[f"{c}_R@10"] for c in cats])
    avg50 = np.mean([got[f"{c}_R@50"] for c in cats])
    assert got["avg_R@10"] == pytest.approx(avg10) and got["avg"] == pytest.approx((avg10 + avg50) / 2)


def test_fashioniq_amc_variant_removes_the_reference():
    s = torch.tensor([[0.9] + [0.5] * 10 + [0.8]])  # reference (0) is the best match, target (11) second
    assert M.fashioniq_metrics({"dress": (s, [11])}, ks=(1,))["dress_R@1"] == 0.0
    assert M.fashioniq_metrics({"dress": (s, [11], [0])}, ks=(1,))["dress_R@1"] == 100.0


@FAST
@given(cir_case())
def test_shoes_equals_naive_with_reference_removed(case):
    scores, target, exclude = case
    got = M.shoes_metrics((torch.from_numpy(scores), torch.from_numpy(target), torch.from_numpy(exclude)))
    want = N.naive_recall(scores, target, (1, 10, 50), exclude)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["avg"] == pytest.approx(np.mean(list(want.values())))


# ------------------------------------------------------------------ CIRR
@st.composite
def cirr_case(draw):
    q = draw(st.integers(1, 6))
    g = draw(st.integers(7, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    tied = draw(st.booleans())
    scores = rng.integers(0, 4, (q, g)).astype(np.float32) if tied else rng.random((q, g)).astype(np.float32)
    members = np.stack([rng.choice(g, 6, replace=False) for _ in range(q)])
    reference, target = members[:, 0].copy(), members[:, 1].copy()
    if draw(st.booleans()):
        target[0] = reference[0]  # a target that is its own reference: removed with it, a miss (C.5's loop)
    for row in members:
        rng.shuffle(row)  # the reference and target sit anywhere in img_set.members
    return scores, target, reference, members


@FAST
@given(cirr_case())
def test_cirr_equals_c5_loop(case):
    scores, target, reference, members = case
    got = M.cirr_metrics(torch.from_numpy(scores), target, reference, members)
    assert got == pytest.approx(N.naive_cirr(scores, target, reference, members))


def test_cirr_subset_counts_duplicated_and_padded_members_once():
    s = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6]])
    # member 2 listed twice and a -1 pad: the subset is {2, 3, 4} minus nothing, target 3 is second
    assert M.cirr_subset_ranks(s, [3], [0], [[0, 2, 2, 3, 4, -1]]).tolist() == [2]


def test_cirr_rejects_broken_queries():
    s = torch.rand(2, 8)
    with pytest.raises(ValueError, match="query 1: target 5 is not among its img_set members"):
        M.cirr_metrics(s, [1, 5], [0, 0], [[0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 6]])

def test_cirr_target_that_is_the_reference_is_a_miss():
    # the target first in every ranking, but it is the query's reference: removed with it, as the original's loop does
    s = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    members = [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert M.cirr_subset_ranks(s, [1, 1], [1, 0], members).tolist() == [7, 1]
    got = M.cirr_metrics(s, [1, 1], [1, 0], members)
    assert got["R@50"] == got["cirr_Rsubset@3"] == 50.0
    assert got == pytest.approx(N.naive_cirr(s.numpy(), [1, 1], [1, 0], members))


def _submission_lists(n: int = 3):
    ranked = [[f"dev-{q}-{i}" for i in range(50)] for q in range(n)]
    subset = [[f"set-{q}-{i}" for i in range(3)] for q in range(n)]
    return [12060 + q for q in range(n)], ranked, subset


def test_cirr_submission_schema_round_trip():
    pairs, ranked, subset = _submission_lists()
    sub = M.cirr_submission(pairs, ranked, subset)
    for metric, k in (("recall", 50), ("recall_subset", 3)):
        obj = json.loads(json.dumps(sub[metric], sort_keys=True))
        assert obj["version"] == "rc2" and obj["metric"] == metric
        assert sorted(key for key in obj if key.isdigit()) == ["12060", "12061", "12062"]
        assert all(len(obj[str(p)]) == k for p in pairs)
        M.validate_cirr_submission(obj, pair_ids=pairs)


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(version="rc1"), "'version' must be 'rc2'"),
    (lambda o: o.update(metric="recall@50"), "'metric' must be one of"),
    (lambda o: o.update({"12060": o["12060"][:49]}), "pair 12060 has 49 names, expected 50"),
    (lambda o: o.update({"12061": ["x"] * 50}), "pair 12061 repeats an image name"),
    (lambda o: o.update({"012062": o.pop("12062")}), "key '012062' is not a pair id"),
    (lambda o: o.update({"12060": "dev-0-0"}), "pair 12060 must map to a list"),
    (lambda o: o.pop("12061"), r"missing pair ids \['12061'\]"),
])
def test_cirr_submission_schema_errors(edit, message):
    pairs, ranked, subset = _submission_lists()
    obj = M.cirr_submission(pairs, ranked, subset)["recall"]
    edit(obj)
    with pytest.raises(ValueError, match=message):
        M.validate_cirr_submission(obj, pair_ids=pairs)


def test_cirr_submission_rejects_short_lists_and_length_mismatch():
    pairs, ranked, subset = _submission_lists()
    with pytest.raises(ValueError, match="expected 3"):
        M.cirr_submission(pairs, ranked, [s[:2] for s in subset])
    with pytest.raises(ValueError, match="differ in length"):
        M.cirr_submission(pairs[:2], ranked, subset)


# ------------------------------------------------------------------ ITM
@st.composite
def itm_case(draw):
    n = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        return rng.integers(0, 3, (n, 5 * n)).astype(np.float32)
    return rng.standard_normal((n, 5 * n)).astype(np.float32)


@FAST
@given(itm_case(), st.integers(1, 4))
def test_itm_equals_vsepp_loop(sims, chunk):
    got = M.itm_metrics(torch.from_numpy(sims), chunk_size=chunk)
    assert got == pytest.approx(N.naive_itm(sims))
    assert (M.i2t_ranks(sims) - 1).tolist() == N.naive_i2t_ranks(sims).tolist()
    assert (M.t2i_ranks(sims) - 1).tolist() == N.naive_t2i_ranks(sims).tolist()


@FAST
@given(itm_case())
def test_optimistic_ties_equal_the_hrem_oracle(sims):
    assert (M.i2t_ranks(sims, ties="optimistic") - 1).tolist() == N.hrem_i2t_ranks(sims).tolist()
    assert (M.t2i_ranks(sims, ties="optimistic") - 1).tolist() == N.hrem_t2i_ranks(sims).tolist()


def test_hrem_verified_vector():
    sims = np.random.default_rng(0).permutation(45).reshape(3, 15) / 45
    assert (M.i2t_ranks(sims) - 1).tolist() == [1, 0, 1]
    assert (M.t2i_ranks(sims) - 1).tolist() == [2, 0, 2, 2, 1, 2, 0, 1, 1, 2, 0, 0, 2, 1, 1]
    m = M.itm_metrics(sims)
    assert m["t2i_R@1"] == pytest.approx(100 * 4 / 15) and m["t2i_meanr"] == pytest.approx(1 + 17 / 15)


def test_medr_uses_numpy_median_on_even_counts():
    ranks = torch.tensor([1, 1, 5, 9])  # rank0 median (0 + 4) / 2 = 2 -> medr 3; torch.median would give 1
    assert M.itm_metrics_from_ranks(ranks, ranks)["i2t_medr"] == 3.0


def test_coco_1k_is_the_mean_over_folds():
    sims = np.random.default_rng(1).integers(0, 4, (10, 50)).astype(np.float32)
    assert M.coco_1k_metrics(torch.from_numpy(sims), folds=5) == pytest.approx(N.naive_coco_1k(sims, folds=5))
    with pytest.raises(ValueError, match="multiple of 5 images"):
        M.coco_1k_metrics(torch.rand(6, 30))
    # the folds a scorer computes alone (evaluate_itm's coco1k): contiguous images with their own captions
    assert M.coco_1k_folds(10, captions_per_image=5)[1] == (range(2, 4), range(10, 20))
    assert M.coco_1k_folds(6, folds=3, captions_per_image=2) == [(range(0, 2), range(0, 4)), (range(2, 4), range(4, 8)),
                                                                  (range(4, 6), range(8, 12))]
    with pytest.raises(ValueError, match=r"\[N images x 5N captions\]"):
        M.itm_metrics(torch.rand(3, 14))


def test_coco_5k_in_bounded_memory():
    """A 5,000 x 25,000 float32 matrix (500 MB) is evaluated with O(chunk) extra memory, not another full copy."""
    script = textwrap.dedent("""
        import json, resource, torch
        from cirlab.core.metrics import coco_5k_metrics
        torch.manual_seed(0)
        n = 5000
        sims = torch.empty(n, 5 * n)
        for r in range(0, n, 500):
            sims[r:r + 500].uniform_()           # in place: no temporary copy while filling
        for i in range(0, n, 2):                 # every even image gets its own captions on top
            sims[i, 5 * i:5 * i + 5] += 1.0
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m5 = coco_5k_metrics(sims, chunk_size=64)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"extra_mb": (peak - base) / 1024, "i2t_R@1": m5["i2t_R@1"], "t2i_R@1": m5["t2i_R@1"]}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                         # a fixed mmap threshold returns freed blocks to the OS, so peak RSS tracks live memory
                         env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # half the images are planted at rank 1 in both directions, the rest are near chance
    assert 50.0 <= res["i2t_R@1"] < 51.0 and 50.0 <= res["t2i_R@1"] < 51.0
    # 64 rows x 25,000 columns of temporaries (~20 MB); any full-size extra copy would be >= 125 MB (bool)
    assert res["extra_mb"] < 64, res


# ------------------------------------------------------------------ argument checks (user review)
def test_recall_refuses_ranks_below_one_nan_and_fractions():
    with pytest.raises(ValueError, match=r"ranks must be whole 1-based ranks >= 1: 2 of 3 entries are not, at "
                                         r"positions \[0, 2\] \(values \[0, -2\]\)"):
        M.recall_from_ranks([0, 1, -2], ks=[1])
    for bad in ([1.7, 1], [1, float("nan")]):
        with pytest.raises(ValueError, match="1 of 2 entries are not"):
            M.recall_from_ranks(bad, ks=[1])
    assert M.recall_from_ranks(np.array([1.0, 3.0]), ks=[1]) == {"R@1": 50.0}  # whole float ranks stay accepted


def test_known_recall_still_drops_unknown_targets():
    from cirlab.workbench.analysis import known_recall

    assert known_recall([0, 1, 2], [1]) == {"R@1": 50.0}  # rank 0 = no ground truth, filtered before recall


def test_recall_cutoffs_are_whole_numbers_and_one_int_is_a_list():
    assert M.recall_from_ranks([1, 2, 5], ks=1) == M.recall_from_ranks([1, 2, 5], ks=[1])
    assert M.shoes_metrics([1, 2], ks=2) == {"R@2": 100.0, "avg": 100.0}
    assert M.itm_metrics_from_ranks([1, 2], [1, 3], ks=2)["rsum"] == 150.0  # 100 + 50
    for ks in ([0], [-1], [1.5], 2.0, []):
        with pytest.raises(ValueError, match="ks must"):
            M.recall_from_ranks([1, 2], ks=ks)


def test_repeated_cutoffs_count_once_in_the_average():
    assert M.shoes_metrics([1, 20], ks=(1, 1, 10)) == M.shoes_metrics([1, 20], ks=(1, 10))


def test_cirr_and_itm_from_ranks_refuse_rank_zero():
    with pytest.raises(ValueError, match=r"subset_ranks must be whole 1-based ranks >= 1: 1 of 2"):
        M.cirr_metrics_from_ranks([1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"t2i ranks must be whole 1-based ranks >= 1: 1 of 2"):
        M.itm_metrics_from_ranks([1, 2], [1, 0.5])


def test_target_indices_must_be_whole():
    s = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"target must hold whole numbers: 2 of 2 entries are not, at positions "
                                         r"\[0, 1\]"):
        M.target_ranks(s, [2.7, 1.2])
    assert M.target_ranks(s, [2.0, 1.0]).tolist() == M.target_ranks(s, [2, 1]).tolist()
    with pytest.raises(ValueError, match="exclude must hold whole numbers: 1 of 2"):
        M.target_ranks(s, [2, 1], [0.5, -1])
    with pytest.raises(ValueError, match="members must hold whole numbers: 1 of 6"):
        M.cirr_subset_ranks(s, [2, 1], [0, 0], [[0, 2, 1.5], [0, 1, 3]])


def test_cirr_subset_ranks_refuse_nan_members_but_not_a_nan_reference():
    """NaN compares false both ways: a NaN target got subset rank 1, so a re-ranker that diverged to NaN reported
    Recall_subset@1 = 100 (every other ranking path refuses NaN)."""
    s = torch.tensor([[0.9, float("nan"), 0.8, 0.3, 0.5]])
    with pytest.raises(ValueError, match=r"^query 0: scores contain NaN among its img_set members"):
        M.cirr_subset_ranks(s, [1], [0], [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="NaN among its img_set members"):
        M.cirr_subset_ranks(s, [2], [0], [[0, 1, 2, 3]])  # a NaN beside the target: its place is undefined too
    assert M.cirr_subset_ranks(s, [2], [1], [[0, 1, 2, 3]]).tolist() == [2]  # NaN on the removed reference
    assert M.cirr_subset_ranks(s, [2], [0], [[0, 2, 3]]).tolist() == [1]  # NaN outside the set


def test_flat_rank_lists_are_ranks_and_score_tuples_are_unchanged():
    assert M.fashioniq_metrics({"dress": [1, 3, 12]}) == M.fashioniq_metrics({"dress": torch.tensor([1, 3, 12])})
    assert M.shoes_metrics([1, 5, 60]) == M.shoes_metrics((1, 5, 60)) == M.shoes_metrics(np.array([1, 5, 60]))
    s = [[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]]
    want = M.recall_at_k(s, [2, 0], M.SHOES_KS, exclude=[1, 2])
    for entry in ((s, [2, 0], [1, 2]), [torch.tensor(s), torch.tensor([2, 0]), torch.tensor([1, 2])]):
        got = M.shoes_metrics(entry)
        assert {k: got[k] for k in want} == want
    assert M.fashioniq_metrics({"dress": (np.array(s), [2, 0])})["dress_R@10"] == 100.0
    with pytest.raises(ValueError, match=r"2 or 3 items, got 4"):
        M.shoes_metrics((torch.tensor(s), [2, 0], [1, 2], [0, 0]))


def test_input_errors_are_one_line_in_notebooks_and_still_value_errors():
    """A bad argument to a metric, a top-K file or an analysis function showed a full traceback through cirlab in
    JupyterLab; as cirlab errors they show as one red line (IPython's _render_traceback_), and stay ValueErrors."""
    from cirlab.core.errors import CirlabError
    from cirlab.workbench import analysis

    for call in (lambda: M.recall_from_ranks([0, 1], ks=[1]), lambda: analysis.pca_2d([[1.0, float("nan")]] * 3)):
        with pytest.raises(ValueError) as err:
            call()
        assert isinstance(err.value, CirlabError) and len(err.value._render_traceback_()) == 1


def test_is_recall_key_knows_every_recall_the_key_builders_make_and_nothing_else():
    # the figures' "recall (%)" bars: CIRR's Rsubset bars were dropped when the test was `"R@" in key`
    from cirlab.core import metrics as m

    recalls = [m.recall_key(10), m.recall_key(50, "dress"), m.subset_key(1), m.itm_key("i2t", 1),
               m.itm_key("t2i", 10), "avg_R@10"]
    assert all(m.is_recall_key(k) for k in recalls)
    others = [m.AVG, m.RSUM, m.itm_key("t2i", "medr"), m.itm_key("i2t", "meanr"), "R@", "R@1x", "loss", "xR@1"]
    assert not any(m.is_recall_key(k) for k in others)


def test_removed_targets_missed_marks_only_targets_that_are_their_reference():
    ranks = M.removed_targets_missed([3, 5, 0, 2], [1, 2, -1, 4], [1, -1, -1, 0])
    assert ranks[0] > 10**9 and ranks[1:].tolist() == [5, 0, 2]  # unknown target (-1 == -1) left alone
    # the rank target_ranks gives such a target (G + 1 = 3) would be a hit at R@5 without it
    s = torch.tensor([[0.9, 0.5]])
    assert M.recall_from_ranks(M.target_ranks(s, [0], [0]), (5,))["R@5"] == 100.0
    assert M.recall_at_k(s, [0], (5,), exclude=[0])["R@5"] == 0.0
    assert M.removed_targets_missed([4], [0], None).tolist() == [4]


# ------------------------------------------------------------------ argument checks (review: chunks, folds, shapes)
def test_chunk_sizes_are_whole_numbers_of_at_least_one():
    """A negative chunk_size made ``range(0, q, chunk)`` empty and returned uninitialised memory as ranks (R@1 0.0
    on a perfect ranking); 0 and 1.5 failed inside ``range`` as bare ValueError/TypeError."""
    from cirlab.core.errors import InputError

    s = torch.eye(3)
    calls = {"target_ranks": lambda c: M.target_ranks(s, [0, 1, 2], chunk_size=c),
             "recall_at_k": lambda c: M.recall_at_k(s, [0, 1, 2], (1,), chunk_size=c),
             "cirr_metrics": lambda c: M.cirr_metrics(s, [0, 1, 2], [1, 2, 0], [[0, 1], [1, 2], [2, 0]], chunk_size=c),
             "itm_metrics": lambda c: M.itm_metrics(torch.rand(2, 10), chunk_size=c),
             "coco_1k_metrics": lambda c: M.coco_1k_metrics(torch.rand(2, 10), folds=2, chunk_size=c)}
    for name, call in calls.items():
        for bad in (-1, 0, 1.5, True):
            with pytest.raises(InputError, match=rf"^chunk_size must be a whole number >= 1, got {bad!r}$"):
                call(bad)
        call(np.int64(1))  # a NumPy integer is a whole number
    assert M.recall_at_k(s, [0, 1, 2], (1,), chunk_size=2) == {"R@1": 100.0}


def test_coco_1k_folds_and_captions_per_image_are_checked():
    """folds=0/-1/1.0 were a ZeroDivisionError, an IndexError and a TypeError; captions_per_image=0 a NumPy error."""
    from cirlab.core.errors import InputError

    sims = torch.eye(4).repeat_interleave(5, dim=1)
    for bad in (0, -1, 1.0):
        with pytest.raises(InputError, match=rf"^folds must be a whole number >= 1, got {bad!r}$"):
            M.coco_1k_metrics(sims, folds=bad)
        with pytest.raises(InputError, match="folds must be"):
            M.coco_1k_folds(4, folds=bad)
    with pytest.raises(InputError, match=r"^captions_per_image must be a whole number >= 1, got 0$"):
        M.itm_metrics(torch.zeros(2, 0), captions_per_image=0)
    with pytest.raises(InputError, match="captions_per_image must be"):
        M.coco_1k_folds(4, folds=2, captions_per_image=0)
    assert M.coco_1k_metrics(sims, folds=np.int64(4))["rsum"] == 600.0


def test_cirr_members_must_be_padded_to_one_length():
    """Ragged member lists failed inside torch ("expected sequence of length 2"); the contract is a [Q, M] table
    padded with -1, and the error now says so. A table with another number of rows is refused, not re-cut."""
    from cirlab.core.errors import InputError

    s = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.2, 0.4, 0.6, 0.9]])
    with pytest.raises(InputError, match=r"^members must be one list per query padded with -1 to one length, "
                                         r"got lists of lengths \[2, 3\]$"):
        M.cirr_metrics(s, [1, 2], [0, 3], [[0, 1], [0, 2, 3]])
    padded = M.cirr_metrics(s, [1, 2], [0, 3], [[0, 1, -1], [0, 2, 3]])
    assert padded == pytest.approx(N.naive_cirr(s.numpy(), [1, 2], [0, 3], [[0, 1, -1], [0, 2, 3]]))
    with pytest.raises(InputError, match=r"members must be a \[2 queries x M\] table, got shape \(4, 3\)"):
        M.cirr_subset_ranks(s, [1, 2], [0, 3], [[0, 1, 2], [0, 2, 3]] * 2)


def test_recall_cutoffs_may_be_an_integer_tensor():
    s = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.4, 0.6]])
    want = M.recall_at_k(s, [2, 1], np.array([1, 2]))
    assert want == {"R@1": 0.0, "R@2": 100.0}
    assert M.recall_at_k(s, [2, 1], torch.tensor([1, 2])) == want
    assert M.recall_from_ranks([1, 3], torch.tensor(1)) == {"R@1": 50.0}
    with pytest.raises(ValueError, match="ks must be a whole number >= 1, got 1.5"):
        M.recall_from_ranks([1, 3], torch.tensor([1.5]))


def test_ranks_as_a_column_list_are_ranks_and_matrices_are_refused():
    """``[[1], [9]]`` (a [Q, 1] tensor's .tolist()) was read as a (scores, target) pair and refused as a 1-D score
    matrix; it is ranks. A [Q, G] matrix given as ranks, or a tuple whose scores are not 2-D, says what it expects."""
    from cirlab.core.errors import InputError

    assert M.shoes_metrics([[1], [9]]) == M.shoes_metrics([1, 9]) == M.shoes_metrics(torch.tensor([[1], [9]]))
    assert M.shoes_metrics([[1], [9], [60]]) == M.shoes_metrics([1, 9, 60])
    assert M.fashioniq_metrics({"dress": [[1], [20]]}) == M.fashioniq_metrics({"dress": [1, 20]})
    assert M.shoes_metrics([torch.tensor([1]), torch.tensor([9])]) == M.shoes_metrics([1, 9])
    with pytest.raises(InputError, match=r"expected 1-based ranks \[Q\] \(or \[Q, 1\]\), or a \(scores \[Q, G\], "
                                         r"target\[, exclude\]\) tuple; got ranks of shape \(2, 2\)"):
        M.shoes_metrics(np.array([[1, 2], [3, 4]]))
    with pytest.raises(InputError, match=r"expected 1-based ranks .* got a tuple that is neither"):
        M.shoes_metrics(([0.1, 0.9, 0.5], [1], [0]))  # one query's scores, not a [1, G] matrix


def test_fashioniq_metrics_says_it_takes_a_mapping():
    with pytest.raises(ValueError, match=r"fashioniq_metrics takes \{category: ranks or \(scores, target\)\}, got a "
                                         r"list \(one category: \{'dress': ranks\}\)"):
        M.fashioniq_metrics([[1], [9]])


def test_a_recall_is_the_exact_share_not_the_mean_s_rounding():
    """100 * mean gave 57.49999999999999 for 23 of 40 (and 13.750000000000002), copied into every CSV export."""
    import torch

    from cirlab.core.metrics import itm_metrics, recall_from_ranks

    ranks = torch.tensor([1] * 23 + [100] * 17)
    assert recall_from_ranks(ranks, (10,))["R@10"] == 57.5
    assert recall_from_ranks(torch.tensor([1] * 11 + [100] * 69), (1,))["R@1"] == 13.75
    sims = torch.eye(8).repeat_interleave(5, dim=1)  # every image's 5 captions score it highest
    assert itm_metrics(sims)["rsum"] == 600.0
