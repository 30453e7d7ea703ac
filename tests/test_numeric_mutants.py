"""Tests that kill single-line mutants of the numeric core that the rest of the suite let through (found by a
mutation audit). Each compares cirlab with a naive loop written here, or with a value worked out by hand,
on tiny tie-heavy inputs: the tie rules other than "stable", the ``ties`` argument reaching every protocol, the
torch path of the ITM ranks (GPU, non-float dtypes), stable re-ordering, duplicated CIRR members, flat top-K fields,
and the loss terms that only differ from their mutants with duplicate images or non-default weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cirlab.core import metrics as M
from cirlab.core import retrieval as R
from cirlab.core.topk import TopK


# ------------------------------------------------------------------------------------------------ naive references
def naive_rank(row, target: int, exclude: int = -1, ties: str = "stable"):
    """1-based rank of ``target`` once ``exclude`` is removed, one comparison per gallery item; None when the target
    is the excluded item. Ties: "stable" counts an equal score ahead only at a lower index, "optimistic" never,
    "pessimistic" always."""
    if target == exclude:
        return None
    t = row[target]
    ahead = 0
    for j, v in enumerate(row):
        if j == target or j == exclude:
            continue
        if v > t or (v == t and (ties == "pessimistic" or (ties == "stable" and j < target))):
            ahead += 1
    return ahead + 1


def naive_subset_rank(row, target: int, reference: int, members, ties: str = "stable"):
    """Rank of ``target`` among the distinct ``img_set`` members other than the reference (-1 pads)."""
    if target == reference:
        return None
    group = []
    for m in members:
        if m >= 0 and m != reference and m != target and m not in group:
            group.append(m)
    t = row[target]
    return 1 + sum(row[m] > t or (row[m] == t and (ties == "pessimistic" or (ties == "stable" and m < target)))
                   for m in group)


def naive_itm_ranks(sims: np.ndarray, cpi: int, ties: str):
    """i2t: the best rank among an image's own captions; t2i: the rank of each caption's image among all images."""
    n, c = sims.shape
    i2t = [min(naive_rank(sims[i], j, ties=ties) for j in range(cpi * i, cpi * (i + 1))) for i in range(n)]
    t2i = [naive_rank(sims[:, j], j // cpi, ties=ties) for j in range(c)]
    return i2t, t2i


def naive_itm_metrics(sims: np.ndarray, cpi: int, ties: str) -> dict:
    out = {}
    for direction, ranks in zip(("i2t", "t2i"), naive_itm_ranks(sims, cpi, ties)):
        for k in (1, 5, 10):
            out[f"{direction}_R@{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{direction}_medr"] = float(math.floor(np.median([r - 1 for r in ranks])) + 1)
        out[f"{direction}_meanr"] = sum(ranks) / len(ranks)
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def recall(ranks, k: int) -> float:
    return 100.0 * sum(r is not None and r <= k for r in ranks) / len(ranks)


# tie-heavy rows; every (target, exclude) pair of every row is one query
ROWS = np.array([[1, 2, 2, 0, 2, 1], [0, 0, 0, 0, 0, 0], [3, 1, 2, 1, 3, 2]], dtype=np.float32)
QUERIES = [(r, t, e) for r in range(len(ROWS)) for t in range(ROWS.shape[1]) for e in range(-1, ROWS.shape[1])]
SCORES = torch.from_numpy(ROWS[[r for r, _, _ in QUERIES]])
TARGET = [t for _, t, _ in QUERIES]
EXCLUDE = [e for _, _, e in QUERIES]


def naive_ranks(ties: str, exclude=True):
    return [naive_rank(ROWS[r], t, e if exclude else -1, ties) for r, t, e in QUERIES]


# ------------------------------------------------------------------------------------------------ target ranks
@pytest.mark.parametrize("ties", M.TIES)
def test_target_ranks_follow_each_tie_rule_for_every_exclusion(ties):
    g = ROWS.shape[1]
    got = M.target_ranks(SCORES, TARGET, EXCLUDE, ties=ties, chunk_size=7).tolist()
    assert got == [g + 1 if r is None else r for r in naive_ranks(ties)]


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_every_cir_protocol_passes_the_tie_rule_on(ties):
    ks = (1, 2, 3)
    want = {f"R@{k}": recall(naive_ranks(ties), k) for k in ks}
    assert want != {f"R@{k}": recall(naive_ranks("stable"), k) for k in ks}  # the rules differ on these rows
    assert M.recall_at_k(SCORES, TARGET, ks, EXCLUDE, ties=ties) == pytest.approx(want)
    shoes = M.shoes_metrics((SCORES, TARGET, EXCLUDE), ks=ks, ties=ties)
    assert {k: shoes[k] for k in want} == pytest.approx(want)
    assert shoes["avg"] == pytest.approx(sum(want.values()) / 3)
    fiq = M.fashioniq_metrics({"dress": (SCORES, TARGET), "shirt": (SCORES, TARGET, EXCLUDE)}, ks=ks, ties=ties)
    kept = naive_ranks(ties, exclude=False)
    for k in ks:
        assert fiq[f"dress_R@{k}"] == pytest.approx(recall(kept, k))
        assert fiq[f"shirt_R@{k}"] == pytest.approx(want[f"R@{k}"])


# ------------------------------------------------------------------------------------------------ CIRR
def _cirr_queries():
    """Every (target, reference) pair of a 6-member set (a duplicate and a pad included) over 9 tied scores."""
    rows = np.array([[2, 1, 2, 0, 1, 2, 1, 0, 2], [1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 2, 1, 2, 1, 0, 2, 1, 1]],
                    dtype=np.float32)
    members = [0, 2, 4, 5, 2, 8, -1]
    real = [0, 2, 4, 5, 8]
    qs = [(r, t, ref) for r in range(len(rows)) for t in real for ref in real]
    return rows, members, qs


@pytest.mark.parametrize("ties", M.TIES)
def test_cirr_subset_ranks_and_metrics_follow_each_tie_rule(ties):
    rows, members, qs = _cirr_queries()
    scores = torch.from_numpy(rows[[r for r, _, _ in qs]])
    target, reference = [t for _, t, _ in qs], [ref for _, _, ref in qs]
    mem = [members] * len(qs)
    sub = [naive_subset_rank(rows[r], t, ref, members, ties) for r, t, ref in qs]
    got = M.cirr_subset_ranks(scores, target, reference, mem, ties=ties).tolist()
    assert got == [len(members) + 1 if r is None else r for r in sub]
    glob = [naive_rank(rows[r], t, ref, ties) for r, t, ref in qs]
    want = {f"R@{k}": recall(glob, k) for k in M.CIRR_KS}
    want.update({f"cirr_Rsubset@{k}": recall(sub, k) for k in M.CIRR_SUBSET_KS})
    want["avg"] = (want["R@5"] + want["cirr_Rsubset@1"]) / 2
    assert M.cirr_metrics(scores, target, reference, mem, ties=ties) == pytest.approx(want)


def test_subset_topk_lists_a_repeated_member_once():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5]])
    members = [[0, 1, 1, 2, 5, -1]]  # member 1 twice, reference 0
    order = sorted({m for m in members[0] if m >= 0 and m != 0}, key=lambda m: (-float(scores[0, m]), m))
    assert R.subset_topk(scores, [0], members, k=3).tolist() == [order[:3]] == [[1, 2, 5]]


# ------------------------------------------------------------------------------------------------ ITM
def _itm_sims(n: int, cpi: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, (n, cpi * n)).astype(np.float32)


@pytest.mark.parametrize("ties", M.TIES)
@pytest.mark.parametrize("cpi", [1, 2, 5])
def test_itm_ranks_follow_each_tie_rule_in_every_block_layout(ties, cpi):
    for seed in range(3):
        sims = _itm_sims(4, cpi, seed)
        want = naive_itm_ranks(sims, cpi, ties)
        for chunk in (1, 3, None):
            got = M.itm_ranks(torch.from_numpy(sims), captions_per_image=cpi, ties=ties, chunk_size=chunk)
            assert [r.tolist() for r in got] == [list(w) for w in want], (seed, chunk)
        # the torch path (CUDA tensors, non-float dtypes) must agree with the NumPy one
        got = M.itm_ranks(torch.from_numpy(sims).long(), captions_per_image=cpi, ties=ties, chunk_size=2)
        assert [r.tolist() for r in got] == [list(w) for w in want], seed


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_itm_and_coco_1k_metrics_pass_the_tie_rule_on(ties):
    sims = _itm_sims(4, 5, 7)
    want = naive_itm_metrics(sims, 5, ties)
    assert want != naive_itm_metrics(sims, 5, "stable")
    assert M.itm_metrics(torch.from_numpy(sims), ties=ties) == pytest.approx(want)
    folds = [naive_itm_metrics(sims[2 * f:2 * f + 2, 10 * f:10 * f + 10], 5, ties) for f in range(2)]
    fold_mean = {k: (folds[0][k] + folds[1][k]) / 2 for k in want}
    assert M.coco_1k_metrics(torch.from_numpy(sims), folds=2, ties=ties) == pytest.approx(fold_mean)


# ------------------------------------------------------------------------------------------------ re-ranking, top-K
def test_reorder_keeps_the_incoming_order_of_ties_in_long_lists():
    gen = torch.Generator().manual_seed(0)
    cand = torch.randperm(1000, generator=gen)[:60].reshape(2, 30)
    scores = torch.randint(0, 3, (2, 30), generator=gen).float()
    want = [[int(cand[q, j]) for j in sorted(range(30), key=lambda j: -float(scores[q, j]))] for q in range(2)]
    got_scores, got = R.reorder(cand, scores)
    assert got.tolist() == want  # Python's sort is stable: equal scores keep their stage-I order
    assert got_scores.tolist() == [sorted(row, reverse=True) for row in scores.tolist()]


def test_topk_reads_flat_fields_as_rows_of_k():
    names = [f"g{i}" for i in range(6)]
    t = TopK(["q0", "q1"], names, np.arange(6, dtype=np.float32), [1, 0])
    assert t.gallery_ids.tolist() == [["g0", "g1", "g2"], ["g3", "g4", "g5"]]
    assert t.scores.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert t.to_frame()["top1"].tolist() == ["g0", "g3"]


# ------------------------------------------------------------------------------------------------ HREM losses
# labels [0, 0, 1, 2]: items 0 and 1 show the same image, so (0, 1) and (1, 0) are positives too. Each anchor has one
# negative at cos >= 0.875 (distance clamped to 0.5, log-weight ~370) and the others near cos 0 (log-weight ~2): the
# draw is certain (e^-368 underflows to 0), and the hardest negative (the largest score) is the one drawn.
DUP_SIMS = torch.tensor([[0.7, 0.6, 0.95, 0.0],
                         [0.5, 0.8, 0.1, 0.9],
                         [0.9, 0.0, 0.6, 0.05],
                         [0.0, 0.05, 0.92, 0.4]])
DUP_LABELS = torch.tensor([0, 0, 1, 2])


def test_triplet_direction_with_duplicate_images_by_hand():
    from cirlab.models import hrem as H

    pos = DUP_LABELS[:, None] == DUP_LABELS[None, :]
    s, lab = DUP_SIMS.tolist(), DUP_LABELS.tolist()
    total = 0.0
    for a in range(4):
        neg = max((j for j in range(4) if lab[j] != lab[a]), key=lambda j: s[a][j])
        total += sum(max(0.0, 0.2 + s[a][neg] - s[a][p]) for p in range(4) if lab[p] == lab[a])
    assert total == pytest.approx(0.45 + 0.55 + 0.6 + 0.3 + 0.5 + 0.72)
    got = H.triplet_dws_direction(DUP_SIMS, pos, margin=0.2, generator=torch.Generator().manual_seed(0))
    assert float(got) == pytest.approx(total, rel=1e-6)


@pytest.fixture(scope="module")
def hrem_vse():
    import cirlab

    torch.manual_seed(0)
    return cirlab.create_model("hrem", "tiny", base_loss="vse")


def _naive_vse(scores, labels, margin: float, hardest: bool, mask: bool = True) -> float:
    s, lab, n = scores.tolist(), labels.tolist(), len(labels)
    total = 0.0
    for i in range(n):  # image i against the captions of other images
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i and not (mask and lab[j] == lab[i])]
        total += max(costs, default=0.0) if hardest else sum(costs)
    for j in range(n):  # caption j against the other images
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j and not (mask and lab[i] == lab[j])]
        total += max(costs, default=0.0) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("epoch, hardest", [(0, False), (1, True)])
def test_hrem_vse_loss_masks_pairs_of_the_same_image(hrem_vse, epoch, hardest):
    gen = torch.Generator().manual_seed(5)
    im, s = F.normalize(torch.randn(4, 8, generator=gen), dim=-1), F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    im[1] = im[0]  # the same image twice
    hrem_vse.on_epoch_start(epoch)
    want = _naive_vse(im @ s.T, DUP_LABELS, hrem_vse.config.margin, hardest)
    assert want != pytest.approx(_naive_vse(im @ s.T, DUP_LABELS, hrem_vse.config.margin, hardest, mask=False))
    got = hrem_vse._pair_loss("vse", im, s, DUP_LABELS)
    assert float(got) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ CaLa, AMC losses
def _ce(x) -> float:
    return float(sum(-(x[i, i] - torch.logsumexp(x[i], 0)) for i in range(len(x))) / len(x))


@pytest.mark.parametrize("ablation", ["image_only", "text_only"])
def test_cala_ablations_train_on_the_qtm_logits_alone(ablation):
    from cirlab.models import cala as C

    g = torch.Generator().manual_seed(1)
    logits = {k: torch.randn(4, 4, generator=g) * 3 for k in ("qtm", "tbia", "ctr")}
    out = C.cala_loss(logits, C.CaLaConfig.from_preset("tiny", ablation=ablation))
    assert [k for k in out if k.endswith("_loss")] == ["cala_loss"]
    assert float(out["cala_loss"]) == pytest.approx(_ce(logits["qtm"]), rel=1e-6)


def test_amc_batch_accuracy_by_hand():
    from cirlab.models.amc import AMCConfig, amc_losses

    eye = torch.eye(3)
    layers = [torch.rand(3, 3), eye[[0, 2, 2]]]  # query 1 points at target 2: rows 0 and 2 are right
    out = amc_losses(layers, eye, AMCConfig.from_preset("tiny"))
    assert float(out["batch_acc"]) == pytest.approx(2 / 3)


def test_amc_loss_weights_scale_their_own_terms():
    from cirlab.models.amc import AMCConfig, amc_losses

    gen = torch.Generator().manual_seed(2)
    q1, q2 = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    t = F.normalize(torch.randn(4, 6, generator=gen), dim=-1)
    cfg = AMCConfig.from_preset("tiny", cls_weight=2.0, sim_weight=0.5)
    out = amc_losses([q1, q2], t, cfg)
    logits = torch.stack([torch.stack([cfg.logit_scale * F.cosine_similarity(q2[i], t[j], dim=0) for j in range(4)])
                          for i in range(4)])
    r = [F.normalize(torch.cat([q1[i], q2[i]]), dim=0) for i in range(4)]
    mse = sum(float((r[i] @ r[j] - t[i] @ t[j]) ** 2) for i in range(4) for j in range(4)) / 16
    assert float(out["cls_loss"]) == pytest.approx(2.0 * _ce(logits), rel=1e-5)
    assert float(out["sim_loss"]) == pytest.approx(0.5 * mse, rel=1e-5)
