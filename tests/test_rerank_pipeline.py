"""The two-stage re-ranker end to end through the command line, on tiny presets and synthetic CIRR data:
stage I train -> eval (top-K) -> stage II train (reads that top-K) -> eval -> submit, and convert round trips.

The re-ranked metrics are checked against the library's pieces (cirlab.core.retrieval re-ordering, cirlab.core.metrics)
applied to stage II scores recomputed here, and the submission files against the CIRR server schema and the split."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cirlab
from cirlab.cli import main
from cirlab.core import metrics as M
from cirlab.core import retrieval as R
from cirlab.core.topk import load_topk, save_topk
from cirlab.engine import rerank
from cirlab.engine.runs import model_from_checkpoint
from cirlab.models import blip_interop as bi

K1, K2 = 60, 20  # stage I's top-K file length; candidates stage II re-ranks


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    """Tiny CIRR layout with 80 test1 queries, so its gallery (88 images) fills the server's top-50 lists."""
    from cirlab.data.generators import synthetic

    size = dataclasses.replace(synthetic.SIZES["tiny"], cirr=(40, 40, 80))
    out = tmp_path_factory.mktemp("cirr_syn")
    return Path(synthetic.generate(out, size=size, layouts=["cirr"], image_size=32)["layouts"]["cirr"]["root"])


def _config(path: Path, model: str, root: Path, model_overrides: dict, eval_section: dict) -> Path:
    config = {"model": model, "preset": "tiny", "model_overrides": model_overrides,
              "dataset": {"name": "cirr", "root": str(root), "test_split": "test1"},
              "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": "log",
                        "tensorboard": False, "selection": "val"},
              "eval": {"splits": ["val"], "batch_size": 16, **eval_section}}
    path.write_text(yaml.safe_dump(config))
    return path


def _printed(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def runs(cirr_root, tmp_path_factory) -> dict[str, Path]:
    """Stage I from an original-BLIP-layout file, its top-K files, then stage II on them (both through the CLI)."""
    tmp = tmp_path_factory.mktemp("rerank_runs")
    torch.manual_seed(0)
    blip = cirlab.create_model("blip_rerank_stage1", preset="tiny")
    torch.save({"model": {**bi.export_stage1(blip), "text_decoder.cls.bias": torch.zeros(3)}}, tmp / "model_base.pth")
    run1, run2 = tmp / "stage1", tmp / "stage2"
    cfg1 = _config(tmp / "s1.yaml", "blip_rerank_stage1", cirr_root, {"init_from": str(tmp / "model_base.pth")},
                   {"k": K1})
    assert main(["train", str(cfg1), "--output-dir", str(run1)]) == 0
    assert main(["eval", str(run1), "--split", "test1"]) == 0  # writes run1/topk/test1.topk.npz
    cfg2 = _config(tmp / "s2.yaml", "blip_rerank_stage2", cirr_root,
                   {"stage1_checkpoint": str(run1), "init_from": "stage1", "rerank_k": K2}, {})
    assert main(["train", str(cfg2), "--output-dir", str(run2), "--set", f"eval.stage1_topk={run1}"]) == 0
    return {"stage1": run1, "stage2": run2, "tmp": tmp}


def test_a_copied_stage1_run_writes_its_topk_into_itself(runs, tmp_path):
    """cirlab eval of a copied (or moved) stage-I run wrote into the folder its config.yaml names, not the copy."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["stage1"], copy)
    (copy / "topk" / "test1.topk.npz").unlink()
    before = (runs["stage1"] / "topk" / "test1.topk.npz").stat().st_mtime_ns
    assert main(["eval", str(copy), "--split", "test1"]) == 0
    assert (copy / "topk" / "test1.topk.npz").is_file()
    assert (runs["stage1"] / "topk" / "test1.topk.npz").stat().st_mtime_ns == before  # the original untouched


def test_stage1_run_starts_from_the_blip_file_and_writes_its_topk(runs, cirr_root):
    run1 = runs["stage1"]
    report = json.loads((run1 / "init_from.json").read_text())["reports"][0]
    assert report["missing"] == [] and report["unmatched"] == ["text_decoder.cls.bias"]
    val, test = load_topk(run1 / "topk" / "val.topk.npz"), load_topk(run1 / "topk" / "test1.topk.npz")
    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    assert val.k == len(split.gallery_names) - 1 and test.k == K1  # the tiny val gallery is shorter than K1
    assert val.meta["stage"] == "stage1" and (test.target_rank == 0).all()
    metrics = json.loads((run1 / "metrics.json").read_text())["splits"]["val"]
    np.testing.assert_allclose(M.recall_from_ranks(val.target_rank, (1, 5, 10))["R@5"], metrics["R@5"])


def test_stage2_metrics_equal_the_library_on_the_same_scores(runs, cirr_root, capsys):
    run1, run2 = runs["stage1"], runs["stage2"]
    model, _ = model_from_checkpoint(run2 / "checkpoints" / "best.pt")
    model.eval()
    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    first = load_topk(run1 / "topk" / "val.topk.npz")
    second = load_topk(run2 / "topk" / "val.topk.npz")
    assert list(first.query_ids) == [t.query_id for t in split.triplets] and second.k == K2
    score = model.candidate_scorer(split)
    index = split.gallery_index
    cand = torch.tensor([[index[n] for n in row[:K2]] for row in first.gallery_ids])
    target = torch.tensor(split.target_indices())
    hit = torch.from_numpy((first.target_rank >= 1) & (first.target_rank <= K2))
    rows = hit.nonzero()[:, 0]
    scores = score(rows, cand[rows])
    new_scores, new_order = R.reorder(cand[rows], scores)
    order = cand.clone()
    order[rows] = new_order
    ranks = R.reranked_target_ranks(order, target, first.target_rank)
    np.testing.assert_array_equal(second.target_rank, ranks.numpy())
    np.testing.assert_allclose(second.scores[rows.numpy()], new_scores.numpy(), rtol=1e-5, atol=1e-6)
    assert (second.scores[~hit.numpy()] == rerank.MISS_SCORE).all()  # misses: not scored, stage-I order kept
    # Recall_subset: the five non-reference members scored by stage II, ranked by the metric function
    members = torch.tensor(split.member_indices())
    reference = torch.tensor(split.ref_indices())
    keep = members != reference[:, None]
    full = torch.full((len(members), len(split.gallery_names)), -1e9)
    member_scores = score(torch.arange(len(members)), members)
    full[torch.arange(len(members))[:, None].expand_as(members)[keep], members[keep]] = member_scores[keep]
    subset = M.cirr_subset_ranks(full, target, reference, members)
    expected = M.cirr_metrics_from_ranks(ranks, subset)
    reported = json.loads((run2 / "metrics.json").read_text())["splits"]["val"]
    assert reported == pytest.approx(expected)
    assert reported["R@50"] == json.loads((run1 / "metrics.json").read_text())["splits"]["val"]["R@50"]
    # cirlab eval of the stage II run gives the same numbers, with the top-K file or ranking stage I again
    for extra in ([], ["--set", "eval.stage1_topk="]):
        capsys.readouterr()
        assert main(["eval", str(run2), "--split", "val", *extra]) == 0
        assert _printed(capsys)["splits"]["val"] == pytest.approx(expected)


def test_submit_writes_valid_server_files_for_both_stages(runs, cirr_root, capsys):
    split = cirlab.data.load_cir("cirr", cirr_root, "test1")
    pair_ids = [t.query_id for t in split.triplets]
    written = {}
    for stage in ("stage1", "stage2"):
        capsys.readouterr()
        assert main(["submit", str(runs[stage]), "--split", "test", "--name", stage]) == 0
        paths = _printed(capsys)
        assert Path(paths["recall"]).name == f"recall_submission_{stage}.json"
        written[stage] = {m: json.loads(Path(paths[m]).read_text()) for m in ("recall", "recall_subset")}
        for metric, obj in written[stage].items():
            M.validate_cirr_submission(obj, pair_ids=pair_ids)
            assert obj["version"] == "rc2" and obj["metric"] == metric
            assert list(obj) == sorted(obj)  # json.dump(sort_keys=True), as the reference scripts write
        for t in split.triplets:
            assert t.ref_name not in written[stage]["recall"][t.query_id]
            assert set(written[stage]["recall_subset"][t.query_id]) <= set(t.extras["members"]) - {t.ref_name}
    first = load_topk(runs["stage1"] / "topk" / "test1.topk.npz")
    for i, qid in enumerate(first.query_ids):  # stage II re-orders stage I's first K2; the rest keeps stage I's order
        one, two = written["stage1"]["recall"][qid], written["stage2"]["recall"][qid]
        assert one == list(first.gallery_ids[i, :50])
        assert sorted(two[:K2]) == sorted(one[:K2]) and two[K2:] == one[K2:]


def test_submit_names_its_checkpoint_as_eval_does(runs, tmp_path, capsys, caplog):
    """`cirlab submit --checkpoint last` was "checkpoint not found" where `cirlab eval --checkpoint last` works."""
    out = tmp_path / "sub"
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--checkpoint", "last", "--out", str(out)]) == 0
    assert len(list(out.glob("*.json"))) == 2
    caplog.clear()
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--checkpoint", "bset", "--out", str(out)]) == 2
    assert "has no checkpoints/bset (a run still training or stopped early?); it has best.pt, last.pt: try " \
           "--checkpoint best.pt" in caplog.text
    capsys.readouterr()


def test_submit_refuses_a_split_with_a_short_gallery(runs, caplog):
    for stage in ("stage1", "stage2"):  # stage II refused stage I's shorter file first, with advice that could not work
        caplog.clear()
        assert main(["submit", str(runs[stage]), "--split", "val"]) == 2  # 43 candidates < the server's 50
        assert re.search(rf"cirlab submit: \S+{stage}, split val of \S+: k=50 but only 43 gallery items can "
                         r"be ranked per query$", caplog.text.strip()), caplog.text
    caplog.clear()
    assert "test_split" not in caplog.text
    caplog.clear()  # a config whose test split is its validation split (the tiny configs): said, not silent
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--set", "dataset.test_split=val"]) == 2
    assert "--split test ranks split 'val': the run config's dataset.test_split is its validation split" in caplog.text
    assert "split val (--split test: the run config's dataset.test_split is its validation split) of" in caplog.text


def test_submit_refuses_to_replace_its_files_before_any_work(runs, tmp_path, capsys, caplog, monkeypatch):
    from cirlab.engine import runs as run_module

    out = tmp_path / "sub"
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--name", "again", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["recall_submission_again.json", "recall_subset_submission_again.json"]
    monkeypatch.setattr(run_module, "model_from_checkpoint", lambda *a, **k: pytest.fail("the model was read"))
    caplog.clear()
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--name", "again", "--out", str(out)]) == 2
    assert "recall_submission_again.json exists; pass --overwrite" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["submit", str(runs["stage1"]), "--split", "test", "--name", "again", "--out", str(out),
                 "--overwrite"]) == 0
    assert not (runs["stage1"] / "submission" / f"recall_submission_{runs['stage1'].name}_val.json").exists()


def test_convert_round_trips_through_the_original_format(runs, cirr_root, tmp_path, capsys, caplog):
    run1 = runs["stage1"]
    assert main(["convert", str(run1), str(tmp_path / "blip_mean.pt"), "--to", "original"]) == 0
    written = (tmp_path / "blip_mean.pt").read_bytes()
    assert main(["convert", str(run1), str(tmp_path / "blip_mean.pt"), "--to", "original"]) == 2  # nothing lost
    assert (tmp_path / "blip_mean.pt").read_bytes() == written
    assert main(["convert", str(run1), str(tmp_path / "blip_mean.pt"), "--to", "original", "--overwrite"]) == 0
    original = torch.load(tmp_path / "blip_mean.pt", weights_only=True)
    assert set(original) == {"epoch", "BLIP_Retrieval"} and "visual_encoder.blocks.0.attn.qkv.weight" in \
        original["BLIP_Retrieval"]
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "blip_mean.pt"), str(tmp_path / "back.pt"), "--to", "cirlab",
                 "--preset", "tiny"]) == 0
    summary = _printed(capsys)
    assert summary["model"] == "blip_rerank_stage1" and summary["missing"] == [] and summary["unmatched"] == 0
    back, _ = model_from_checkpoint(tmp_path / "back.pt")
    trained, _ = model_from_checkpoint(run1 / "checkpoints" / "best.pt")
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    caplog.set_level("INFO", logger="cirlab")  # the converted file evaluates (was: KeyError 'converted_layout')
    assert main(["eval", str(tmp_path / "back.pt"), "--dataset", "cirr", "--root", str(cirr_root), "--split",
                 "val"]) == 0
    assert f"back.pt: written by cirlab convert from {tmp_path / 'blip_mean.pt'} (original BLIP layout)" in caplog.text
    caplog.clear()  # the original file itself: it said only "does not fit" with a list of missing keys
    assert main(["eval", str(tmp_path / "blip_mean.pt"), "--model", "blip_rerank_stage1", "--preset", "tiny",
                 "--dataset", "cirr", "--root", str(cirr_root), "--split", "val"]) == 2
    assert f"blip_mean.pt holds weights in the original BLIP layout, not cirlab's: convert it first (cirlab convert " \
           f"{tmp_path / 'blip_mean.pt'} OUT.pt --to cirlab --preset PRESET)" in caplog.text
    # stage II: the twin encoder and its frozen stage I as two original files, and back into one cirlab checkpoint
    run2 = runs["stage2"]
    assert main(["convert", str(run2), str(tmp_path / "blip.pt"), "--to", "original",
                 "--stage1-out", str(tmp_path / "stage1.pt")]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "blip.pt"), str(tmp_path / "s2.pt"), "--to", "cirlab", "--preset", "tiny",
                 "--stage1", str(tmp_path / "stage1.pt")]) == 0
    assert _printed(capsys)["model"] == "blip_rerank_stage2"
    back2, _ = model_from_checkpoint(tmp_path / "s2.pt")
    trained2, _ = model_from_checkpoint(run2 / "checkpoints" / "best.pt")
    for key, value in trained2.state_dict().items():
        torch.testing.assert_close(back2.state_dict()[key], value, rtol=0, atol=0)


def test_submit_writes_the_server_files_of_a_cala_run(cirr_root, tmp_path, capsys):
    """CaLa's CIRR submission goes through the same ``cirlab submit`` as the re-ranker's: the two server files,
    valid for the split, ranked by the model's own query-gallery scores with the reference removed."""
    cfg = _config(tmp_path / "cala.yaml", "cala", cirr_root, {}, {})
    run = tmp_path / "cala_run"
    assert main(["train", str(cfg), "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["submit", str(run), "--split", "test"]) == 0
    paths = _printed(capsys)
    split = cirlab.data.load_cir("cirr", cirr_root, "test1")
    files = {m: json.loads(Path(paths[m]).read_text()) for m in ("recall", "recall_subset")}
    for metric, obj in files.items():
        M.validate_cirr_submission(obj, pair_ids=[t.query_id for t in split.triplets])
        assert obj["metric"] == metric
    model, _ = model_from_checkpoint(run / "checkpoints" / "best.pt")
    first = split.triplets[0]
    transform = model.image_transform(False)

    def image(name: str) -> torch.Tensor:
        return transform(Image.open(split.image_path(name)).convert("RGB"))

    with torch.no_grad():
        model.eval()
        query = model.encode_query(image(first.ref_name)[None], [first.text])
        names = [n for n in split.gallery_names if n != first.ref_name]
        gallery = model.encode_target(torch.stack([image(n) for n in names]))
        order = (query @ gallery.T)[0].argsort(descending=True)[:50]
    assert files["recall"][first.query_id] == [names[i] for i in order]


def test_train_with_a_wrong_init_from_stops_in_one_line(cirr_root, tmp_path, caplog):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    cfg = _config(tmp_path / "s1.yaml", "blip_rerank_stage1", cirr_root, {"init_from": str(bad)}, {"k": 10})
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and str(bad) in errors[0] and "init_from" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stage2_with_unusable_stage1_topk_stops_before_the_first_step(runs, cirr_root, tmp_path, caplog,
                                                                      monkeypatch):
    """Stage II re-ranking more candidates than stage I's top-K holds, or a final split without a top-K file, failed
    at the first evaluation: after an epoch of training, leaving a run folder that then needed --overwrite. Both
    files are there before training, so the run stops before it, in one line, and the folder holds no run."""
    from cirlab.engine import train as engine_train

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the stage-I top-K files were checked")

    monkeypatch.setattr(engine_train, "train", no_training)
    run1 = runs["stage1"]
    short = load_topk(run1 / "topk" / "val.topk.npz").k  # the tiny val gallery is shorter than K1
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    (only_val / "val.topk.npz").write_bytes((run1 / "topk" / "val.topk.npz").read_bytes())
    # a file of every candidate serves any rerank_k (stage II re-ranks them all); one cut short does not
    cut = tmp_path / "cut"
    cut.mkdir()
    full = load_topk(run1 / "topk" / "val.topk.npz")
    save_topk(cut / "val.topk.npz", dataclasses.replace(full, gallery_ids=full.gallery_ids[:, :short - 5],
                                                        scores=full.scores[:, :short - 5]))
    cases = [({"rerank_k": short + 5}, {"stage1_topk": str(cut)},
              f"{cut / 'val.topk.npz'} holds the top {short - 5}, stage II re-ranks {short} (the gallery has only "
              f"{short} candidates per query): write stage I's top-K with eval.k >= {short}"),
             ({"rerank_k": K2}, {"splits": ["val", "test1"], "stage1_topk": str(only_val)},
              f"no stage-I top-K file {only_val / 'test1.topk.npz'}")]
    for i, (overrides, eval_section, message) in enumerate(cases):
        caplog.clear()
        cfg = _config(tmp_path / f"s2_{i}.yaml", "blip_rerank_stage2", cirr_root,
                      {"stage1_checkpoint": str(run1), "init_from": "stage1", **overrides},
                      {"stage1_topk": str(run1), **eval_section})
        out = tmp_path / f"run_{i}"
        assert main(["train", str(cfg), "--output-dir", str(out)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and message in errors[0], errors
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert not {"config.yaml", "log.jsonl", "checkpoints", "tb"} & set(left), left


def test_submit_and_convert_explain_every_option():
    import argparse

    from cirlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("submit", "convert"):
        for action in sub.choices[command]._actions:
            assert action.help and action.help.strip(), f"cirlab {command}: {action.dest} has no help"


def test_figure8_states_its_sign_keeps_labels_apart_and_reads_counts():
    from cirlab.workbench import analysis, viz

    rng = np.random.default_rng(0)
    before = rng.integers(1, 51, 400)
    after = np.clip(before - rng.integers(-5, 12, 400), 1, 50)
    table = analysis.rank_shift_table(before, after, 50)
    fig = viz.plot_figure8(table, title="dress")
    top, bottom = fig.axes
    np.testing.assert_allclose([p.get_height() for p in top.patches], table["average_delta"])
    assert "> 0: moved up" in top.get_ylabel() and "rank stage I" in top.get_ylabel()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    top_box, bottom_box = top.get_window_extent(renderer), bottom.get_window_extent(renderer)
    label = bottom.yaxis.label.get_window_extent(renderer)
    assert label.y0 >= bottom_box.y0 - 1 and label.y1 <= bottom_box.y1 + 1  # "Queries" stays in its own panel
    assert not label.overlaps(top.yaxis.label.get_window_extent(renderer))
    assert bottom.get_yscale() == "symlog"
    ticks = [t.get_text() for t in bottom.get_yticklabels() if t.get_text()]
    assert ticks == ["0", "1", "10"] and bottom.get_ylim()[1] > table["count"].max()  # plain numbers, head room
    top_ticks = [t for t in top.get_yticklabels() if t.get_text()]
    lowest = min(t.get_window_extent(renderer).y0 for t in top_ticks)
    highest = max(t.get_window_extent(renderer).y1 for t in bottom.get_yticklabels() if t.get_text())
    assert lowest > highest  # tick labels of the two panels do not meet at the seam
    assert top_box.y0 >= bottom_box.y1 - 1


def test_pipeline_replaces_its_own_runs_and_refuses_others_before_training(cirr_root, tmp_path, monkeypatch):
    """run_pipeline (the rank_shift notebook) re-runs over the two runs it finished; a `cirlab train` run in
    <out>/stage2 is refused before stage I trains, and kept."""
    from cirlab.engine import runs as engine_runs
    from cirlab.engine.train import RunFolderError

    trained = []

    def fake_run(config, *, device=None, overwrite=False):  # what each stage would be trained with
        out = Path(config["output_dir"])
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "last.pt").write_bytes(config["name"].encode() + bytes(len(trained)))
        trained.append((config["name"], overwrite))
        return {"name": config["name"]}

    monkeypatch.setattr(engine_runs, "run_experiment", fake_run)
    out = tmp_path / "rs"
    rerank.run_pipeline("cirr", cirr_root, out)
    assert trained == [("stage1", False), ("stage2", False)]
    rerank.run_pipeline("cirr", cirr_root, out)  # a re-run: its own runs, replaced
    assert trained[2:] == [("stage1", True), ("stage2", True)]
    (out / "stage2" / "checkpoints" / "last.pt").write_bytes(b"someone else's")  # trained into since
    with pytest.raises(RunFolderError, match=r"re-rank pipeline folder .*stage2 already holds a run"):
        rerank.run_pipeline("cirr", cirr_root, out)
    assert len(trained) == 4 and (out / "stage2" / "checkpoints" / "last.pt").read_bytes() == b"someone else's"
    rerank.run_pipeline("cirr", cirr_root, out, overwrite=True)
    assert trained[4:] == [("stage1", True), ("stage2", True)]


def test_submit_refuses_unsafe_names_foreign_runs_and_bad_outputs_before_any_work(runs, tmp_path, caplog,
                                                                                  monkeypatch):
    """--name ../x wrote outside --out (and both files resolved to one path); a Fashion-IQ run ended in an unpack
    error; --out naming a file failed after the ranking; a missing GPU was a torch traceback."""
    from cirlab.engine import runs as run_module

    monkeypatch.setattr(run_module, "model_from_checkpoint", lambda *a, **k: pytest.fail("the model was read"))
    stage1 = str(runs["stage1"])
    cases = [(["--name", "../../escape"], r"--name '\.\./\.\./escape': it becomes part of a file name"),
             (["--name", "a/b"], r"--name 'a/b': it becomes part of a file name"),
             (["--out", str(tmp_path / "afile.txt")], r"--out \S+afile\.txt is a file"),
             (["--device", "cuda:99"], r"--device: 'cuda:99' asked for, but")]
    (tmp_path / "afile.txt").write_text("x")
    for extra, message in cases:
        caplog.clear()
        assert main(["submit", stage1, "--out", str(tmp_path / "sub"), *extra]) == 2, extra
        assert re.search(message, caplog.text), (extra, caplog.text)
    assert not (tmp_path / "sub").exists() and not list(tmp_path.parent.glob("escape*"))
    fiq = tmp_path / "fiq_run"
    fiq.mkdir()
    config = yaml.safe_load((runs["stage1"] / "config.yaml").read_text())
    config["dataset"].update(name="fashioniq", test_split="val")
    (fiq / "config.yaml").write_text(yaml.safe_dump(config))
    caplog.clear()
    assert main(["submit", str(fiq)]) == 2
    assert "is a fashioniq run; the submission files are for the CIRR test server" in caplog.text


def test_pipeline_configs_read_the_dataset_name_as_every_config_does(tmp_path):
    from cirlab.engine.rerank import pipeline_configs

    for name, test, options in (("fiq", "val", {"protocol": "rerank"}), ("CIRR", "test1", {})):
        first, second = pipeline_configs(name, tmp_path, tmp_path / "out")  # aliases and case lost both
        assert (first["dataset"]["test_split"], first["dataset"]["options"]) == (test, options)
        assert second["dataset"]["name"] == first["dataset"]["name"] != name
