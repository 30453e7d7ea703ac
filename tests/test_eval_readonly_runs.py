"""``cirlab eval`` of a re-ranker run reads the run folder: the top-K files its training wrote (which a stage II's
``eval.stage1_topk`` reads) are never replaced, a missing one is written, and a run folder the user cannot write (a
colleague's) costs only the top-K files, with one warning: the metrics are printed as for any other run."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import cirlab
from cirlab.cli import main
from cirlab.core.topk import load_topk, save_topk


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny stage-I run (its topk/val.topk.npz written by training) and a stage II that re-ranks those files."""
    from cirlab.data.generators import synthetic

    tmp = tmp_path_factory.mktemp("readonly_runs")
    root = Path(synthetic.generate(tmp / "data", size=dataclasses.replace(synthetic.SIZES["tiny"], cirr=(40, 40, 8)),
                                   layouts=["cirr"], image_size=32)["layouts"]["cirr"]["root"])
    base = {"preset": "tiny", "dataset": {"name": "cirr", "root": str(root), "test_split": "test1"},
            "train": {"epochs": 1, "max_steps": 1, "batch_size": 8, "tensorboard": False, "selection": "last",
                      "num_threads": 1},
            "eval": {"splits": ["val"], "batch_size": 16}}
    stage1, stage2 = tmp / "stage1", tmp / "stage2"
    (tmp / "s1.yaml").write_text(yaml.safe_dump({**base, "model": "blip_rerank_stage1"}))
    assert main(["train", str(tmp / "s1.yaml"), "--output-dir", str(stage1)]) == 0
    (tmp / "s2.yaml").write_text(yaml.safe_dump({**base, "model": "blip_rerank_stage2",
                                                 "model_overrides": {"stage1_checkpoint": str(stage1), "rerank_k": 10},
                                                 "eval": {**base["eval"], "stage1_topk": str(stage1)}}))
    assert main(["train", str(tmp / "s2.yaml"), "--output-dir", str(stage2)]) == 0
    return {"stage1": stage1, "stage2": stage2}


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def _other_lists(path: Path) -> None:
    """Rewrite ``path`` with each query's candidates reversed: lists the evaluation does not make."""
    topk = load_topk(path)
    save_topk(path, dataclasses.replace(topk, gallery_ids=topk.gallery_ids[:, ::-1], scores=topk.scores[:, ::-1]))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_eval_keeps_the_runs_topk_files(runs, stage, capsys, caplog, tmp_path):
    """The run's training-time top-K file was replaced by every eval (with other --root/--category: silently other
    inputs for a colleague's stage II). Now it is kept; where the new lists differ, a warning says so."""
    import shutil

    run = tmp_path / stage  # a copy: the stage II of the fixture reads the stage-I run's files
    shutil.copytree(runs[stage], run)
    path = run / "topk" / "val.topk.npz"
    assert path.is_file()
    before = _digest(path)
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert _digest(path) == before
    assert not [w for w in _warnings(caplog) if str(path) in w]  # the same lists: nothing to say
    capsys.readouterr()

    _other_lists(path)
    changed = _digest(path)
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"]
    assert _digest(path) == changed
    said = [w for w in _warnings(caplog) if str(path) in w]
    assert len(said) == 1 and "--topk-dir" in said[0] and "differ" in said[0], _warnings(caplog)


def test_eval_writes_a_missing_topk_file_into_the_run(runs, capsys, caplog):
    """``cirlab eval STAGE1_RUN --split SPLIT`` is how a stage-I top-K of a split training did not evaluate is made.
    The README's step for CIRR test1 ended with a WARNING ("no split has ground-truth targets") and an empty result,
    naming no file; run again, it printed the same lines though it kept the file."""
    run = runs["stage1"]
    test1 = run / "topk" / "test1.topk.npz"
    assert not test1.exists()
    try:
        with caplog.at_level(logging.INFO):
            assert main(["eval", str(run), "--split", "test1"]) == 0
            assert load_topk(test1).meta["split"] == "test1"
            said = [r.getMessage() for r in caplog.records]
            assert not _warnings(caplog), _warnings(caplog)
            assert "test1: no ground-truth targets (a test split: its labels are the evaluation server's), so no " \
                   "metrics, only the rankings" in said
            assert f"test1: top-K lists written to {test1}" in said
            caplog.clear()
            assert main(["eval", str(run), "--split", "test1"]) == 0
            said = [r.getMessage() for r in caplog.records]
            assert f"{test1}: kept as it is (it holds this evaluation's top-K lists already)" in said
            assert not any("written to" in line for line in said) and not _warnings(caplog)
    finally:
        test1.unlink(missing_ok=True)
    capsys.readouterr()


def _unwritable(monkeypatch: pytest.MonkeyPatch, run: Path) -> None:
    """Writes into ``run`` fail with EACCES, as in a colleague's run folder (a test run as root passes chmod)."""
    import cirlab.core.topk as topk_module
    from cirlab.engine import rerank

    real = topk_module.save_topk

    def save_topk_denied(path: Any, topk: Any) -> Path:
        if Path(path).absolute().is_relative_to(run.absolute()):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, topk)

    monkeypatch.setattr(topk_module, "save_topk", save_topk_denied)
    monkeypatch.setattr(rerank, "save_topk", save_topk_denied)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_eval_of_a_run_it_cannot_write_prints_the_metrics(runs, stage, capsys, caplog, monkeypatch, tmp_path):
    """On a read-only run the eval evaluated every split, then died with a PermissionError traceback and printed no
    metrics. The top-K file is missing here, so the eval tries to write it."""
    import shutil

    copy = tmp_path / stage
    shutil.copytree(runs[stage], copy)
    (copy / "topk" / "val.topk.npz").unlink()
    _unwritable(monkeypatch, copy)
    caplog.clear()
    assert main(["eval", str(copy), "--split", "val"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert np.isfinite(printed["splits"]["val"]["R@1"])
    said = [w for w in _warnings(caplog) if "--topk-dir DIR" in w]
    assert len(said) == 1 and str(copy) in said[0], _warnings(caplog)
    assert not (copy / "topk" / "val.topk.npz").exists()


def test_train_still_writes_its_runs_topk_files(runs):
    """The rule is cirlab eval's: the training's final evaluation writes the run's files as it makes them."""
    assert load_topk(runs["stage1"] / "topk" / "val.topk.npz").meta["stage"] == "stage1"
    assert load_topk(runs["stage2"] / "topk" / "val.topk.npz").meta["stage"] == "stage2"


def test_a_stage2_ranking_with_its_frozen_stage1_keeps_those_files_too(runs, capsys, caplog, tmp_path):
    """Without ``eval.stage1_topk`` a stage II ranks with its frozen stage I and keeps those lists in
    ``topk/stage1/``: kept like the others, while the re-ranking uses this evaluation's lists, not the kept file."""
    import shutil

    run = tmp_path / "stage2"
    shutil.copytree(runs["stage2"], run)
    command = ["eval", str(run), "--split", "val", "--set", "eval.stage1_topk="]
    assert main(command) == 0
    first = json.loads(capsys.readouterr().out)["splits"]["val"]
    kept = run / "topk" / "stage1" / "val.topk.npz"
    assert load_topk(kept).meta["stage"] == "stage1"
    _other_lists(kept)
    changed = _digest(kept)
    caplog.clear()
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"] == first
    assert _digest(kept) == changed
    assert [w for w in _warnings(caplog) if str(kept) in w and "--topk-dir" in w]


def test_a_split_without_targets_is_refused_up_front_where_the_run_cannot_keep_its_rankings(runs, caplog, monkeypatch,
                                                                                              tmp_path):
    """CIRR test1 on a colleague's re-ranker run: all the ranking was done, nothing kept, exit 0 (an AMC run is
    refused before the work, as a re-ranker run is now)."""
    import shutil

    from cirlab.core import io

    copy = tmp_path / "stage1"
    shutil.copytree(runs["stage1"], copy)
    real = io.why_not_writable
    monkeypatch.setattr(io, "why_not_writable",
                        lambda folder: f"{copy} is not writable" if Path(folder).is_relative_to(copy) else real(folder))
    caplog.clear()
    assert main(["eval", str(copy), "--split", "test1"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no ground-truth targets" in errors[0] and "--topk-dir DIR" in errors[0], errors


def test_the_unwritable_run_warning_is_said_at_each_evaluation(runs, caplog, monkeypatch, tmp_path):
    """Said once per process: a notebook's second `cirlab eval` of the run kept nothing without a word."""
    import shutil

    copy = tmp_path / "stage1"
    shutil.copytree(runs["stage1"], copy)
    (copy / "topk" / "val.topk.npz").unlink()
    _unwritable(monkeypatch, copy)
    for _ in range(2):
        caplog.clear()
        assert main(["eval", str(copy), "--split", "val"]) == 0
        assert len([w for w in _warnings(caplog) if "--topk-dir DIR" in w]) == 1, _warnings(caplog)


def test_a_stage2_on_a_small_gallery_says_how_many_it_re_ranks(runs, caplog):
    """On a gallery of 43 candidates per query, a stage II with K = 100 said "top 100" twice while it ranked 43."""
    from cirlab.data import load_cir

    root = Path(yaml.safe_load((runs["stage1"] / "config.yaml").read_text())["dataset"]["root"])
    split = load_cir("cirr", root, "val")
    model = cirlab.create_model("blip_rerank_stage2", preset="tiny", rerank_k=100)
    with caplog.at_level(logging.INFO, logger="cirlab.engine.rerank"):
        model.evaluate_split([split], eval_config={"batch_size": 16}, device="cpu")
    said = [r.getMessage() for r in caplog.records if r.name == "cirlab.engine.rerank"]
    why = f"not 100: the gallery has only {len(split.gallery_names) - 1} candidates per query"
    assert f"eval.stage1_topk is empty: ranking with the frozen stage I inside the re-ranker (top 43, {why})" in said
    assert f"re-ranked val: top 43 of {len(split.triplets)} queries ({len(split.triplets)} scored; {why})" in said


def test_eval_of_a_reranker_run_says_what_it_does_and_refuses_one_split_twice(runs, tmp_path, capsys, caplog):
    """Two names of one split (val, dev) were scored twice; `--set eval.stage1_topk=` (stage II ranking with its own
    frozen stage I) warned that the data had changed; a kept top-K file of another length was said to differ by
    "other data, category or weights"."""
    import shutil

    with caplog.at_level(logging.ERROR):
        assert main(["eval", str(runs["stage1"]), "--split", "val", "--split", "dev"]) == 2
    assert "splits 'val' and 'dev' are the same split (val): evaluate it once" in caplog.text
    caplog.clear()  # --k on a stage II set nothing; its warning blamed the run's config.yaml and advised a refused flag
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(runs["stage2"]), "--k", "5"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["--k 5: blip_rerank_stage2 re-ranks and writes the top model_overrides.rerank_k candidates per "
                      "query it was trained with (0: the paper's K), which cirlab eval does not change: drop --k"]
    assert not _warnings(caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["eval", str(runs["stage2"]), "--split", "val", "--set", "eval.stage1_topk="]) == 0
    assert "trained on other data" not in caplog.text and not _warnings(caplog), _warnings(caplog)
    run = tmp_path / "stage1"
    shutil.copytree(runs["stage1"], run)
    path = run / "topk" / "val.topk.npz"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["eval", str(run), "--split", "val", "--k", "5"]) == 0
    said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    length = load_topk(path).k
    assert said == [f"{path}: kept as it is: it holds the top {length} per query, this evaluation's top 5 (their "
                    "first 5 agree); pass --topk-dir DIR to keep the new ones"], said
    assert not [w for w in _warnings(caplog) if str(path) in w]
    capsys.readouterr()


def test_training_refuses_two_names_of_one_split_before_it_builds_the_model(runs, tmp_path, caplog):
    """`eval.splits: [val, dev]` scored CIRR's validation split twice at the end of a training (and wrote its top-K
    file twice): refused with the final splits' reading, before the model is built."""
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(runs["stage1"] / "config.yaml"), "--output-dir", str(out),
                     "--set", "eval.splits=[val, dev]"]) == 2
    assert "splits 'val' and 'dev' are the same split (val): evaluate it once" in caplog.text
    assert not (out / "checkpoints").exists()
