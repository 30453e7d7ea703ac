"""Evaluation runners against naive per-query oracles, on the tiny synthetic data in every layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cirlab
from cirlab.engine.evaluate import encode_dataset, evaluate_cir, evaluate_itm, score_itm, trace_split
from cirlab.core.topk import load_topk
import stub_models  # noqa: F401 - registers stub_cir / stub_itm


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cirlab.data.generators import synthetic

    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, seed=0, size="tiny", image_size=32)
    return root


def _cir_model():
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset="tiny").eval()


def _naive_ranks(model, split):
    """One query at a time: 1 + #(better) + #(tied at a lower index), the reference skipped when excluded."""
    tf = model.image_transform(False)
    q_items, g_items = split.query_dataset(tf), split.gallery_dataset(tf)
    with torch.no_grad():
        gallery = torch.cat([model.encode_target(g_items[i]["image"][None]) for i in range(len(g_items))])
        ranks = []
        for i in range(len(q_items)):
            it = q_items[i]
            s = (model.encode_query(it["ref_image"][None], [it["text"]]) @ gallery.T)[0]
            t, r = it["target_idx"], it["ref_idx"]
            if split.exclude_reference and t == r:
                ranks.append(len(gallery) + 1)
                continue
            better = sum(1 for g in range(len(gallery)) if not (split.exclude_reference and g == r)
                         and (s[g] > s[t] or (s[g] == s[t] and g < t)))
            ranks.append(better + 1)
    return np.array(ranks)


def test_fashioniq_per_category_matches_naive_and_writes_topk(synth, tmp_path):
    from cirlab.data import load_cir

    model = _cir_model()
    splits = [load_cir("fashioniq", synth / "fashioniq", "val", category=c) for c in ("dress", "shirt", "toptee")]
    out = evaluate_cir(model, splits, batch_size=7, k=10, topk_path=tmp_path / "topk")
    for split in splits:
        naive = _naive_ranks(model, split)
        np.testing.assert_array_equal(out["ranks"][f"val_{split.category}"], naive)
        hits = np.mean((naive <= 10) & ~((np.array(split.target_indices()) == np.array(split.ref_indices()))
                                         & split.exclude_reference))
        assert out["metrics"][f"{split.category}_R@10"] == pytest.approx(100 * hits)
    m = out["metrics"]
    assert m["avg_R@10"] == pytest.approx(np.mean([m[f"{c}_R@10"] for c in ("dress", "shirt", "toptee")]))
    assert m["avg"] == pytest.approx((m["avg_R@10"] + m["avg_R@50"]) / 2)
    assert sorted(p.name for p in (tmp_path / "topk").iterdir()) == [
        "val_dress.topk.npz", "val_shirt.topk.npz", "val_toptee.topk.npz"]
    topk = load_topk(tmp_path / "topk" / "val_dress.topk.npz")
    assert topk.k == 10 and len(topk) == len(splits[0].triplets)
    np.testing.assert_array_equal(topk.target_rank, out["ranks"]["val_dress"])
    inside = topk.target_rank <= 10
    for row in np.nonzero(inside)[0]:  # a target ranked r <= K sits at position r of its list
        assert topk.gallery_ids[row, topk.target_rank[row] - 1] == topk.target_ids[row]
    refs = np.array(splits[0].gallery_names)[splits[0].ref_indices()]
    assert not (topk.gallery_ids == refs[:, None]).any()  # the reference is removed (AMC protocol)
    assert topk.meta["protocol"] == "fashioniq" and topk.meta["category"] == "dress"


def test_shoes_and_cirr_subset(synth, tmp_path):
    from cirlab.data import load_cir

    model = _cir_model()
    shoes = load_cir("shoes", synth / "shoes", "test")
    out = evaluate_cir(model, shoes, topk_path=tmp_path / "shoes.topk.npz")
    np.testing.assert_array_equal(out["ranks"]["test"], _naive_ranks(model, shoes))
    assert set(out["metrics"]) == {"R@1", "R@10", "R@50", "avg"}
    # list length: k=50, or the gallery minus the removed reference when that is shorter
    assert load_topk(tmp_path / "shoes.topk.npz").k == min(50, len(shoes.gallery_names) - 1)

    cirr = load_cir("cirr", synth / "cirr", "val")
    out = evaluate_cir(model, cirr, batch_size=16)
    np.testing.assert_array_equal(out["ranks"]["val"], _naive_ranks(model, cirr))
    # subset recall, naive: rank of the target among the non-reference img_set members
    tf = model.image_transform(False)
    g = torch.cat([model.encode_target(cirr.gallery_dataset(tf)[i]["image"][None])
                   for i in range(len(cirr.gallery_names))])
    hits1 = []
    for it, members in zip(cirr.query_dataset(tf), cirr.member_indices()):
        s = (model.encode_query(it["ref_image"][None], [it["text"]]) @ g.T)[0]
        others = [m for m in set(members) if m not in (it["ref_idx"], it["target_idx"])]
        hits1.append(all(s[m] < s[it["target_idx"]] or (s[m] == s[it["target_idx"]] and m > it["target_idx"])
                         for m in others))
    assert out["metrics"]["cirr_Rsubset@1"] == pytest.approx(100 * np.mean(hits1))
    assert out["metrics"]["avg"] == pytest.approx((out["metrics"]["R@5"] + out["metrics"]["cirr_Rsubset@1"]) / 2)


def test_cirr_test1_has_rankings_but_no_metrics(synth, tmp_path):
    from cirlab.data import load_cir

    test1 = load_cir("cirr", synth / "cirr", "test1")
    out = evaluate_cir(_cir_model(), test1, topk_path=tmp_path / "t.topk.npz", k=5)
    assert out["metrics"] == {} and (out["ranks"]["test1"] == 0).all()
    assert (load_topk(tmp_path / "t.topk.npz").target_rank == 0).all()


def test_encoders_outside_the_contract_are_one_line(synth):
    # a user's model whose encoders disagree failed as torch's "mat1 and mat2 shapes cannot be multiplied"
    from cirlab.core.errors import ModelContractError
    from cirlab.data import load_cir

    val = load_cir("cirr", synth / "cirr", "val")
    for encode_query, message in (
            (lambda ref, texts: torch.zeros(len(texts), 3), r"encode_query gives 3-d vectors and encode_target \d+-d"),
            (lambda ref, texts: torch.zeros(len(texts)), r"encode_query gave a tensor of shape \(\d+,\); the CIR "
                                                         r"contract's encoders give \[batch, dim\] tensors"),
            (lambda ref, texts: (torch.zeros(len(texts), 3), None), r"cannot concatenate encoder outputs of type "
                                                                    r"NoneType")):
        model = _cir_model()
        model.encode_query = encode_query
        with pytest.raises(ModelContractError, match=message):
            evaluate_cir(model, val, k=5)


def test_itm_sharded_scores_equal_full_matrix(synth):
    from cirlab.data import load_precomp
    from cirlab import metrics as M

    torch.manual_seed(0)
    model = cirlab.create_model("stub_itm", preset="tiny", region_dim=2048).eval()
    split = load_precomp(synth / "precomp", "f30k", "test")
    with torch.no_grad():
        full = model.encode_image(torch.stack([split.features(i) for i in range(split.num_images)])) @ \
            model.encode_text(split.captions).T
    sharded = score_itm(model, split, shard_size=3, batch_size=2)  # 10 images x 50 captions in 3 x 3 blocks
    torch.testing.assert_close(sharded, full, rtol=0, atol=1e-6)
    out = evaluate_itm(model, split, protocol="f30k", shard_size=4)
    assert out["metrics"] == pytest.approx(M.itm_metrics(full))
    assert out["i2t_ranks"].shape == (10,) and out["t2i_ranks"].shape == (50,)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_itm(model, split, protocol="coco10k")


def test_itm_scores_refuse_a_block_of_the_wrong_shape(synth):
    """The matrix is filled in place (it was held twice): a score block of the wrong shape must not leave
    uninitialised entries."""
    from cirlab.core.errors import ModelContractError
    from cirlab.data import load_precomp

    model = cirlab.create_model("stub_itm", preset="tiny", region_dim=2048).eval()
    split = load_precomp(synth / "precomp", "f30k", "test")
    score = model.score
    model.score = lambda im, tx: score(im, tx)[:, :-1]
    with pytest.raises(ModelContractError, match=r"score gave a \(3, 2\) block for 3 images x 3 captions"):
        score_itm(model, split, shard_size=3)


def test_coco_protocols_score_folds_only_and_report_both(synth):
    """coco1k scores only its 5 diagonal blocks (1/5 of the pairs) and equals the fold mean of the full matrix;
    coco reports 1K and 5K from one full matrix."""
    from cirlab.data import load_precomp
    from cirlab import metrics as M

    torch.manual_seed(0)
    model = cirlab.create_model("stub_itm", preset="tiny", region_dim=2048).eval()
    split = load_precomp(synth / "precomp", "f30k", "test")  # 10 images x 50 captions: folds of 2 images
    full = score_itm(model, split)
    pairs = []
    score = model.score
    model.score = lambda im, tx: pairs.append(im.shape[0] * tx.shape[0]) or score(im, tx)
    one_k = evaluate_itm(model, split, protocol="coco1k", shard_size=4)
    assert sum(pairs) == full.numel() // 5
    assert one_k["metrics"] == pytest.approx(M.coco_1k_metrics(full))
    assert one_k["t2i_ranks"].max() <= 2  # ranks within a fold of 2 images
    both = evaluate_itm(model, split, protocol="coco")["metrics"]
    assert {k[3:] for k in both if k.startswith("1k_")} == {k[3:] for k in both if k.startswith("5k_")} == set(
        M.itm_metrics(full))
    assert both["1k_rsum"] == pytest.approx(one_k["metrics"]["rsum"])
    assert both["5k_rsum"] == pytest.approx(M.itm_metrics(full)["rsum"])


def test_coco_protocols_apply_to_the_test_split_only():
    from cirlab.engine.runs import itm_protocol

    config = {"dataset": {"name": "coco", "test_split": "testall"}, "eval": {"protocol": None}}
    assert itm_protocol(config, "testall") == "coco" and itm_protocol(config, "dev") == "full"
    config["eval"]["protocol"] = "coco1k"
    assert itm_protocol(config, "testall") == "coco1k" and itm_protocol(config, "dev") == "full"
    f30k = {"dataset": {"name": "f30k", "test_split": "test"}, "eval": {"protocol": None}}
    assert itm_protocol(f30k, "test") == itm_protocol(f30k, "dev") == "full"


def test_collect_routes_frame(synth):
    from cirlab.data import load_cir

    split = load_cir("fashioniq", synth / "fashioniq", "val", category="dress")
    frame = trace_split(_cir_model(), split, n=9, batch_size=4)
    assert len(frame) == 9 * 3  # 9 queries x 3 experts
    assert set(frame["expert"]) == {"nin", "crn", "gtn"}
    assert frame["query_id"].tolist()[:3] == [split.triplets[0].query_id] * 3
    assert set(frame["modification"]) <= {"color", "add", "remove", "move", "size"}
    np.testing.assert_allclose(frame.groupby("query_id")["weight"].sum().to_numpy(), 1.0, rtol=1e-5)


def test_collect_routes_on_amc_joins_category_and_both_expert_names(synth):
    from cirlab.data import load_cir

    splits = [load_cir("fashioniq", synth / "fashioniq", "val", category=c) for c in ("dress", "shirt")]
    torch.manual_seed(0)
    model = cirlab.create_model("amc", preset="tiny", image_size=32)
    model.fit_vocab(splits[0])
    frames = [trace_split(model, s, n=5, batch_size=4) for s in splits]
    for frame, cat in zip(frames, ("dress", "shirt")):
        assert len(frame) == 5 * 2 * 3  # queries x layers x experts
        assert set(frame["category"]) == {cat}
        assert set(frame["layer"]) == {"layer1", "layer2"}
        assert set(zip(frame["expert"], frame["paper_name"])) == {("NIN", "α1 NIN"), ("CRN", "α3 CRN"),
                                                                  ("GTN", "α2 GTN")}
        assert ((frame["weight"] > 0) & (frame["weight"] < 1)).all()


def test_encode_dataset_keeps_order():
    data = [{"x": torch.tensor([float(i)])} for i in range(7)]
    out = encode_dataset(lambda b: b["x"] * 2, data, batch_size=3)
    assert out.flatten().tolist() == [2.0 * i for i in range(7)]


def test_gathered_shards_reassemble_in_dataset_order():
    from cirlab.engine.evaluate import _interleave

    n, world = 7, 3
    items = torch.arange(n, dtype=torch.float32)[:, None]
    shards = [items[r::world] for r in range(world)]
    assert _interleave(shards, world, n).flatten().tolist() == list(range(n))
    pair = _interleave([(s, s * 10) for s in shards], world, n)
    assert pair[1].flatten().tolist() == [10.0 * i for i in range(n)]


def test_collect_routes_on_dime_keeps_dataset_ids_and_both_cell_numberings(synth):
    from cirlab.data import load_precomp

    split = load_precomp(synth / "precomp", "f30k", "test")
    torch.manual_seed(0)
    model = cirlab.create_model("dime", preset="tiny", img_dim=split.features(0).shape[-1])
    frame = trace_split(model, split, n=7)
    layer0 = frame[frame.layer == "layer0"]
    assert (layer0.caption_id == layer0.caption_idx).all() and (layer0.image_id == layer0.image_idx).all()
    assert sorted(set(layer0.caption_idx)) == list(range(7))
    final = frame[frame.layer == "layer2"]
    assert set(zip(final.source, final.source_paper_name)) == {
        ("RIC", "cell 0 (RIC)"), ("GLGC", "cell 2 (GLGC)"), ("IMRC", "cell 1 (IMRC)"), ("CMRC", "cell 3 (CMRC)")}


def test_the_gallery_cache_holds_models_with_extra_state_and_follows_the_transform(synth, tmp_path):
    """AMC keeps its vocabulary in ``get_extra_state`` (a dict): the cache's digest raised AttributeError on it. A
    cached gallery encoded at 32 px was then reused for a 24-px evaluation (the key held weights, not transform)."""
    from cirlab.data import load_cir
    from cirlab.data.transforms import build_transform

    split = load_cir("fashioniq", synth / "fashioniq", "val", category="dress")
    torch.manual_seed(0)
    model = cirlab.create_model("amc", preset="tiny", image_size=32).eval()
    model.fit_vocab(split)
    cache = tmp_path / "cache"
    for size in (32, 24):
        transform = build_transform("amc_shoes", image_size=size, train=False)
        plain = evaluate_cir(model, split, transform=transform, batch_size=8)["ranks"]["val_dress"]
        cached = evaluate_cir(model, split, transform=transform, batch_size=8, cache_dir=cache)["ranks"]["val_dress"]
        np.testing.assert_array_equal(cached, plain)
    assert len(list(cache.rglob("*.pt"))) == 2  # one gallery file per transform
    original = load_cir("fashioniq", synth / "fashioniq", "val", category="dress", image_read="original")
    evaluate_cir(model, original, transform=transform, batch_size=8, cache_dir=cache)
    assert len(list(cache.rglob("*.pt"))) == 3  # how the images were decoded is part of the key
    from cirlab.core.featcache import state_dict_digest

    digest = lambda words: state_dict_digest({"w": torch.ones(2), "vocab": {"words": words, "size": 2}})  # noqa: E731
    assert digest(["a", "b"]) == digest(["a", "b"]) != digest(["a", "c"])  # extra state is part of the key too


def test_recall_cutoffs_past_the_gallery_are_said_to_be_100_for_any_model(tmp_path, caplog):
    from fixtures_data import write_fashioniq

    from cirlab.data import load_cir

    root = write_fashioniq(tmp_path, categories=("dress",), n_queries=12, n_extra=0)["root"]
    split = load_cir("fashioniq", root, "val", category="dress")
    candidates = len(split.gallery_names) - 1  # the reference is removed from its own ranking
    assert 10 < candidates < 50  # R@50 is 100 by construction, R@10 is not
    from cirlab.engine import evaluate as E

    E._SAID_TRIVIAL.clear()  # said once per process: an earlier test may have evaluated such a split
    with caplog.at_level("WARNING", logger="cirlab"):
        out = evaluate_cir(_cir_model(), split)
    assert out["metrics"]["dress_R@50"] == 100.0
    assert (f"val_dress: R@50 is 100 for any model: each query ranks {candidates} candidates, so every target is "
            "within them") in caplog.text and "R@10" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cirlab"):
        evaluate_cir(_cir_model(), split)  # a run evaluates the split every epoch: said once
    assert "for any model" not in caplog.text


def test_score_split_is_the_matrix_evaluate_cir_ranks(synth):
    from cirlab.core.metrics import target_ranks
    from cirlab.data import load_cir
    from cirlab.engine.evaluate import score_split

    split = load_cir("fashioniq", synth / "fashioniq", "val", category="dress")
    model = _cir_model()
    scores = score_split(model, split)  # the defaults: the model's own transform, CPU, no cache
    assert scores.shape == (len(split.triplets), len(split.gallery_names))
    ranks = target_ranks(scores, split.target_indices(), split.ref_indices())
    np.testing.assert_array_equal(ranks.numpy(), evaluate_cir(model, split)["ranks"]["val_dress"])


def test_known_rows_copies_the_score_matrix_only_when_a_target_is_unknown():
    """A boolean index copied the whole [Q, G] matrix before ranking, though every val target is known."""
    from cirlab.engine.evaluate import known_rows

    scores = torch.rand(4, 6)
    assert known_rows(scores, torch.ones(4, dtype=torch.bool)) is scores
    mask = torch.tensor([True, False, True, True])
    assert torch.equal(known_rows(scores, mask), scores[mask])


def test_the_gallery_cache_keeps_features_encoded_under_autocast_apart(synth, tmp_path):
    """The key held no autocast: an fp32 call after a bf16-autocast one read the bf16 gallery features from the cache
    and scored fp32 queries against them."""
    from cirlab.data import load_cir
    from cirlab.engine.evaluate import score_split

    split = load_cir("fashioniq", synth / "fashioniq", "val", category="dress")
    model, cache = _cir_model(), tmp_path / "cache"
    fp32 = score_split(model, split)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = score_split(model, split, cache_dir=cache)
    assert not torch.equal(bf16, fp32)  # the stub's layers do run in bf16 under the autocast
    assert torch.equal(score_split(model, split, cache_dir=cache), fp32)  # its own features, not the bf16 ones
    assert len(list(cache.rglob("*.pt"))) == 2  # one gallery file per precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(score_split(model, split, cache_dir=cache), bf16)  # and each is still reused
    assert len(list(cache.rglob("*.pt"))) == 2


def test_evaluation_feeds_the_model_where_its_weights_are(synth):
    """The default was device="cpu": a model cirlab.fit had trained on a GPU was fed CPU batches, and "auto" (every
    workbench call's and the CLI's word) failed inside torch."""
    from cirlab.core.errors import ConfigError
    from cirlab.data import load_cir
    from cirlab.engine.evaluate import model_device

    model = _cir_model()
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")  # not cpu: its own
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no weights
    assert model_device(model, "auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device: .*got 'gpu'"):
        model_device(model, "gpu")
    split = load_cir("shoes", synth / "shoes", "val")
    assert evaluate_cir(model, split, device="auto")["metrics"] == evaluate_cir(model, split)["metrics"]
    with pytest.raises(ConfigError, match="got 'gpu'"):
        evaluate_cir(model, split, device="gpu")


def test_evaluate_itm_scores_a_split_as_cirlab_eval_does_without_a_protocol(synth):
    """The default protocol was "full": COCO's testall gave no 1K numbers in Python and both in cirlab eval."""
    import dataclasses

    from cirlab.data import load_precomp
    from cirlab.engine.runs import itm_protocol

    torch.manual_seed(0)
    model = cirlab.create_model("stub_itm", preset="tiny", region_dim=2048).eval()
    f30k = load_precomp(synth / "precomp", "f30k", "test")
    coco = {"dataset": {"name": "coco", "test_split": "testall"}, "eval": {"protocol": None}}
    for split, name in (("testall", "coco"), ("dev", "coco"), ("test", "f30k")):
        as_named = dataclasses.replace(f30k, name=name, split=split)
        config = coco if name == "coco" else {"dataset": {"name": "f30k", "test_split": "test"}, "eval": {}}
        expected = evaluate_itm(model, as_named, protocol=itm_protocol(config, split))["metrics"]
        assert evaluate_itm(model, as_named)["metrics"] == pytest.approx(expected)
        assert ("1k_rsum" in expected) == (split == "testall")
    own = dataclasses.replace(f30k, name="mydata")  # load_precomp reads a set of any name: its whole matrix
    assert evaluate_itm(model, own)["metrics"] == pytest.approx(evaluate_itm(model, f30k, protocol="full")["metrics"])


def test_workbench_calls_give_the_model_back_in_the_mode_it_had(synth):
    """collect_routes and the explorer's query functions left the caller's model in eval mode (its sibling calls put
    the mode back): a notebook tracing routes between epochs of its own loop trained on with dropout off. Every
    module's own flag comes back, a part the user had put in eval mode included, after an error too."""
    from cirlab import workbench as wb
    from cirlab.core.contracts import eval_mode
    from cirlab.data import load_precomp
    from cirlab.workbench import widgets

    def flags(model):
        return [m.training for m in model.modules()]

    torch.manual_seed(0)
    amc = cirlab.create_model("amc", preset="tiny", image_size=32)
    amc.fit_vocab(["a red dress", "is shorter and blue"])
    amc.train()
    amc.text_encoder.eval()  # the user's own choice: a frozen part
    before = flags(amc)
    assert len(set(before)) == 2
    routes, texts = wb.collect_routes(amc, "fashioniq", synth / "fashioniq", n=4)
    assert flags(amc) == before and len(routes)
    query_fn = wb.query_fn_for(amc, "fashioniq", synth / "fashioniq")
    assert flags(amc) == before
    seen = []
    real = amc.encode_query
    amc.encode_query = lambda *a, **kw: seen.append(amc.training) or real(*a, **kw)
    query_fn(next(iter(texts)), "is blue")
    assert seen == [False] and flags(amc) == before  # queried in eval mode, given back after

    split = load_precomp(synth / "precomp", "f30k", "test")
    dime = cirlab.create_model("dime", preset="tiny", img_dim=split.features(0).shape[-1])
    dime.train()
    wb.collect_routes(dime, "f30k", synth / "precomp", split="test", n=3)
    pair_fn = widgets.make_pair_fn(dime, split)
    pair_fn(0, "a red circle")
    assert all(flags(dime))

    with pytest.raises(RuntimeError), eval_mode(amc):
        assert not any(flags(amc))
        raise RuntimeError
    assert flags(amc) == before
