"""Degenerate but legal data: galleries smaller than a cut-off or a top-K length, targets that are their own
reference, caption caps that cut an image's captions apart. Every reader of a top-K file agrees with the run's
metrics, and what cannot work is refused before training in one line."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import cirlab
import stub_models  # noqa: F401 - registers stub_cir
from fixtures_data import write_fashioniq, write_json, write_precomp, write_shoes


def _cir_model():
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset="tiny").eval()


def _fiq(tmp_path, n_queries: int, *, target_is_reference: int = 0, protocol: str = "amc"):
    """A Fashion-IQ dress val split of ``n_queries`` images (the amc gallery: the caption files' images), the first
    ``target_is_reference`` entries with their candidate as target."""
    from cirlab.data import load_cir

    tree = write_fashioniq(tmp_path, categories=("dress",), splits=("val",), n_queries=n_queries, n_extra=0)
    if target_is_reference:
        entries = [{**e, "target": e["candidate"]} if i < target_is_reference else e
                   for i, e in enumerate(tree["entries"]["dress", "val"])]
        write_json(tmp_path / "captions" / "cap.dress.val.json", entries)
    return load_cir("fashioniq", tree["root"], "val", category="dress", protocol=protocol)


# ------------------------------------------------------------------------------------ target = its own reference
def test_topk_file_of_targets_that_are_their_reference_reads_as_misses(tmp_path):
    from cirlab.core.topk import load_topk
    from cirlab.engine.evaluate import evaluate_cir
    from cirlab.workbench.analysis import recall_by_category

    split = _fiq(tmp_path / "data", 4, target_is_reference=4)
    out = evaluate_cir(_cir_model(), split, k=50, topk_path=tmp_path / "topk")
    assert out["metrics"]["dress_R@50"] == 0.0  # removed with the reference: a miss, gallery of 4 or not
    topk = load_topk(tmp_path / "topk" / "val_dress.topk.npz")
    assert recall_by_category(topk, [10, 50]) == {"dress": {"R@10": 0.0, "R@50": 0.0}}


def test_reranked_metrics_count_a_removed_target_as_a_miss_whatever_the_stage1_file_holds(tmp_path):
    from cirlab.core.topk import TopK
    from cirlab.engine.rerank import rerank_topk, reranked_metrics

    split = _fiq(tmp_path / "data", 4, target_is_reference=4)
    g = len(split.gallery_names)
    # a stage-I file as earlier versions wrote it: the removed target at rank G + 1, the other 3 candidates listed
    lists = [[n for n in split.gallery_names if n != t.ref_name] for t in split.triplets]
    stage1 = TopK([t.query_id for t in split.triplets], lists, np.zeros((4, g - 1)), [g + 1] * 4,
                  ["dress"] * 4, [t.target_name for t in split.triplets], {"k": g - 1})
    score = lambda rows, cand: torch.zeros(cand.shape)  # noqa: E731 - no candidate is the target anyway
    reranked = rerank_topk(score, split, stage1, 20)
    metrics = reranked_metrics("fashioniq", [split], {"val_dress": reranked})
    assert metrics["dress_R@10"] == metrics["dress_R@50"] == 0.0
    assert (reranked.target_rank > 50).all()  # the re-ranked file says so too, for the workbench


def test_trivial_cutoff_warning_does_not_promise_100_when_targets_are_their_reference(tmp_path, caplog):
    from cirlab.engine import evaluate as E

    split = _fiq(tmp_path / "data", 4, target_is_reference=4)
    E._SAID_TRIVIAL.clear()  # said once per process
    with caplog.at_level("WARNING", logger="cirlab"):
        out = E.evaluate_cir(_cir_model(), split)
    assert out["metrics"]["dress_R@10"] == 0.0
    assert "100 for any model" not in caplog.text
    assert ("val_dress: R@10, R@50 are 0 for any model: every query's target is its own reference, removed from the "
            "ranking with it") in caplog.text


def test_trivial_cutoff_warning_gives_the_share_that_any_model_reaches(tmp_path, caplog):
    from cirlab.engine import evaluate as E

    split = _fiq(tmp_path / "data", 4, target_is_reference=1)
    E._SAID_TRIVIAL.clear()
    with caplog.at_level("WARNING", logger="cirlab"):
        out = E.evaluate_cir(_cir_model(), split)
    assert out["metrics"]["dress_R@10"] == 75.0
    assert ("val_dress: R@10, R@50 are 75 for any model: each query ranks 3 candidates, so every target is within "
            "them but for the 1 of 4 queries whose target is their own reference") in caplog.text


# ------------------------------------------------------------------------------------ 1-image gallery
def test_a_one_image_gallery_writes_an_empty_topk_instead_of_failing(tmp_path):
    from cirlab.core.topk import load_topk
    from cirlab.engine.evaluate import evaluate_cir

    split = _fiq(tmp_path / "data", 1)  # one entry: candidate = target = the only image
    assert len(split.gallery_names) == 1
    out = evaluate_cir(_cir_model(), split, k=50, topk_path=tmp_path / "topk")
    assert out["metrics"]["dress_R@10"] == 0.0
    topk = load_topk(tmp_path / "topk" / "val_dress.topk.npz")
    assert topk.k == 0 and len(topk) == 1 and topk.target_rank[0] > 50


def test_a_one_image_shoes_gallery_writes_an_empty_topk_instead_of_failing(tmp_path):
    from cirlab.core.topk import load_topk
    from cirlab.data import load_cir
    from cirlab.engine.evaluate import evaluate_cir

    tree = write_shoes(tmp_path / "shoes", n_train=3, n_test=1)
    only = tree["test"][0]
    write_json(tree["root"] / "relative_captions_shoes.json",
               [*tree["entries"], {"ImageName": only, "ReferenceImageName": only, "RelativeCaption": "is taller"}])
    split = load_cir("shoes", tree["root"], "test")
    out = evaluate_cir(_cir_model(), split, k=50, topk_path=tmp_path / "topk")
    assert out["metrics"]["R@50"] == 0.0
    assert load_topk(tmp_path / "topk" / "test.topk.npz").k == 0


# ------------------------------------------------------------------------------------ ITM caption cap
def test_a_caption_cap_that_splits_an_image_is_refused_naming_the_option(tmp_path):
    from cirlab.core.errors import ConfigError
    from cirlab.data.precomp import load_precomp

    write_precomp(tmp_path, n_images=4, regions=2, dim=8)
    with pytest.raises(ConfigError, match=r"dataset\.options\.max_captions=7 \(f30k dev, .*dev_caps\.txt\).*"
                                          r"multiple of 5.*e\.g\. 5 or 10"):
        load_precomp(tmp_path, "f30k", "dev", max_captions=7, regions=2, dim=8)
    split = load_precomp(tmp_path, "f30k", "dev", max_captions=10, regions=2, dim=8)
    assert (split.num_images, len(split.captions)) == (2, 10)
    assert len(load_precomp(tmp_path, "f30k", "dev", max_captions=47, regions=2, dim=8).captions) == 20  # no cut


# ------------------------------------------------------------------------------------ stage II, small gallery
def _stage1_file(tmp_path, split, k: int):
    from cirlab.engine.evaluate import evaluate_cir

    evaluate_cir(_cir_model(), split, k=k, topk_path=tmp_path / "stage1")
    return tmp_path / "stage1"


def test_a_stage1_file_of_every_candidate_serves_a_larger_rerank_k(tmp_path):
    from cirlab.engine.rerank import load_stage1_topk

    split = _fiq(tmp_path / "data", 10, protocol="rerank")  # 10 images, the reference not removed
    folder = _stage1_file(tmp_path, split, k=50)
    assert load_stage1_topk(folder, split, k=20).k == 10  # all there is: stage II re-ranks all 10


def test_a_short_stage1_file_names_the_eval_k_that_the_gallery_allows(tmp_path):
    from cirlab.core.errors import ConfigError
    from cirlab.engine.rerank import load_stage1_topk

    split = _fiq(tmp_path / "data", 10, protocol="rerank")
    folder = _stage1_file(tmp_path, split, k=5)
    with pytest.raises(ConfigError, match=r"holds the top 5, stage II re-ranks 10 \(the gallery has only 10 "
                                          r"candidates per query\): write stage I's top-K with eval\.k >= 10$"):
        load_stage1_topk(folder, split, k=20)


def test_the_frozen_stage1_ranks_a_gallery_smaller_than_rerank_k(tmp_path):
    from cirlab.engine.rerank import stage1_topk

    split = _fiq(tmp_path / "data", 10, protocol="rerank")
    reranker = types.SimpleNamespace(stage1=_cir_model())  # no eval.stage1_topk: its own stage I ranks now
    firsts = stage1_topk(reranker, [split], eval_config={}, device="cpu", k=20)
    assert firsts["val_dress"].k == 10


def test_rank_shift_summary_leaves_out_targets_removed_with_their_reference():
    from cirlab.workbench.analysis import known_recall, rank_shift_summary, removed_rank

    never = removed_rank()
    before, after = [3, 1, never], [1, 1, never]
    assert known_recall(after, [10]) == {"R@10": pytest.approx(200 / 3)}  # a miss in the recall's denominator
    summary = rank_shift_summary(before, after)
    assert summary["queries"] == 2 and summary["mean_rank_before"] == 2.0 and summary["improved_pct"] == 50.0


def test_worst_queries_and_the_gallery_caption_skip_a_target_removed_with_its_reference():
    """The never-a-hit rank of a target removed with its reference made its query the 'worst' one in the failure
    galleries, captioned with a 19-digit rank; it has no rank to be worst at and is said as removed."""
    from cirlab.core.topk import TopK
    from cirlab.workbench import analysis, recipes, viz

    removed = analysis.removed_rank()
    topk = TopK(query_ids=["q0", "q1", "q2", "q3"], gallery_ids=[["a", "b"]] * 4, scores=[[0.9, 0.1]] * 4,
                target_rank=[removed, 7, 2, 0])  # removed, a bad rank, a good one, unknown
    assert recipes.worst_queries(topk, n=4) == ["q1", "q2"]
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    viz._gallery_row(axes, {"query_id": "q0", "ref_image": np.zeros((4, 4, 3)), "text": "x", "target_rank": removed,
                            "candidates": [], "candidate_ids": []}, k=1)
    caption = axes[1].texts[0].get_text()
    assert "target rank none (the target is the reference, removed)" in caption and str(removed) not in caption
    plt.close(fig)


def test_coco_1k_on_a_split_of_another_image_count_is_refused_before_training(tmp_path, caplog):
    """eval.protocol=coco1k on a 7-image test split: refused only at the final evaluation, after the whole training
    ("COCO 1K needs a multiple of 5 images"), and --resume met it again. Now refused when the split is read."""
    import yaml

    from cirlab.cli import main
    from fixtures_data import precomp_run_config

    root = write_precomp(tmp_path / "data", dim=12, regions=4, n_images=7)["root"]
    config = precomp_run_config(tmp_path / "c.yaml", root, model="stub_itm", regions=4, dim=12, splits=("test",))
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "eval": {**settings["eval"], "protocol": "coco1k"}}))
    caplog.clear()
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("eval.protocol=coco1k: f30k test (") and \
        "has 7 images, and COCO 1K needs a multiple of 5 images, got 7; use eval.protocol=full" in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()  # before the first step


def test_an_infinite_feature_in_an_evaluation_split_is_refused_before_training(tmp_path, caplog):
    """An inf in test_ims.npy (which `data check` lists) trained the whole run, then failed at the final evaluation
    with "scores row 3 contains NaN", naming no file, and --resume failed again."""
    from cirlab.cli import main
    from fixtures_data import precomp_run_config

    data = write_precomp(tmp_path / "data", dim=12, regions=4, n_images=5)
    test_ims = data["root"] / "f30k_precomp" / "test_ims.npy"
    features = np.load(test_ims)
    features[3, 1, 2] = np.inf
    np.save(test_ims, features)
    config = precomp_run_config(tmp_path / "c.yaml", data["root"], model="stub_itm", regions=4, dim=12,
                                splits=("test",))
    caplog.clear()
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(test_ims) in errors[0] and "image 3" in errors[0] and \
        "NaN or infinite feature values" in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_empty_evaluation_split_is_blamed_only_on_causes_its_dataset_can_have():
    """A Shoes split selecting no caption entry was blamed on "missing_images: drop", an option Shoes does not have,
    and precomp splits were told the same."""
    from cirlab.data.base import no_queries_reason

    assert no_queries_reason("shoes") == "its caption file is empty or names no image of the split"
    assert no_queries_reason("fashioniq").endswith(", or dataset.options.missing_images=drop left every query out")
    assert no_queries_reason("f30k") == "its caption file is empty"


def test_a_provenance_record_nested_too_deeply_records_no_decoding(tmp_path, caplog):
    """A run folder's provenance.json of "[[[[..." made `cirlab eval` end in a RecursionError traceback."""
    import yaml

    from cirlab.engine.runs import say_unrecorded_image_read, with_defaults

    config = with_defaults({"model": "stub_cir", "dataset": {"name": "fashioniq"}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "stub_cir", "dataset": {"name": "fashioniq"}}))
    (tmp_path / "provenance.json").write_text("[" * 100_000 + "]" * 100_000)
    assert say_unrecorded_image_read(tmp_path, config)
    assert "does not record how its images were decoded (in any start)" in caplog.text


def test_the_explorer_rank_line_says_a_removed_target_was_removed():
    """The explorer printed "target rank 9223372036854775807 of G" for a target removed with its reference."""
    from cirlab.workbench import analysis, widgets

    line = widgets._rank_line(analysis.removed_rank(), 40, {"target_rank": 3}, ("trained", "untrained"))
    assert line == "target rank none (the target is the reference, removed) of 40 (trained)\n3 of 40 (untrained)"


def test_the_decoding_warning_reads_damaged_records_and_names_the_starts_in_order(tmp_path, caplog):
    """A provenance.json with a list or a number for image_read made `cirlab eval` end in a TypeError; the starts'
    decodings were named in alphabetical order, and the one to --set was the alphabetically first."""
    import json

    import yaml

    from cirlab.engine.runs import say_unrecorded_image_read, with_defaults

    config = with_defaults({"model": "stub_cir", "dataset": {"name": "fashioniq"}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "stub_cir", "dataset": {"name": "fashioniq"}}))
    record = tmp_path / "provenance.json"
    record.write_text(json.dumps({"starts": [{"image_read": ["x"]}, {"image_read": 3}]}))
    assert say_unrecorded_image_read(tmp_path, config)
    assert "does not record how its images were decoded (in any start)" in caplog.text
    caplog.clear()
    record.write_text(json.dumps({"starts": [{"image_read": "viewer"}, {"image_read": "original"}]}))
    assert say_unrecorded_image_read(tmp_path, config)
    assert "was trained with dataset.options.image_read=viewer then original, read now with viewer" in caplog.text
    assert "--set dataset.options.image_read=original reproduces the decoding it ended with" in caplog.text
