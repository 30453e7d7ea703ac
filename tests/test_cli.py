"""The CLI and the Python run API: configs, --set, train -> run folder -> eval, safety flags, --help."""
from __future__ import annotations

import dataclasses
import json
import re
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import cirlab
from cirlab.cli import build_parser, main
from cirlab.engine.runs import ConfigError, apply_overrides, load_config, parse_set, run_experiment
from cirlab.core.topk import load_topk
import stub_models  # noqa: F401 - registers stub_cir / stub_itm

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def _write_config(path: Path, synth: Path, **train) -> Path:
    config = {
        "model": "stub_cir", "preset": "tiny", "model_overrides": {"embed_dim": 12},
        "dataset": {"name": "fashioniq", "category": ["dress", "shirt"], "synthetic": {"size": "tiny",
                    "out": str(synth), "image_size": 32}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "log_every": 1, "progress": "log",
                  "selection_metric": "avg", **train},
        "eval": {"splits": ["val", "test"], "k": 5, "batch_size": 16},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _dress_config(path: Path, root: Any, **train: Any) -> Path:
    """A stub_cir run config on a Fashion-IQ tree's dress category (``train`` over two quick steps)."""
    config = {"model": "stub_cir", "preset": "tiny", "model_overrides": {"embed_dim": 12},
              "dataset": {"name": "fashioniq", "root": str(root), "category": "dress"},
              "train": {"max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False, **train},
              "eval": {"splits": ["val"], "k": 5, "batch_size": 8}}
    path.write_text(yaml.safe_dump(config))
    return path


def _check_run_folder(out: Path) -> dict:
    assert (out / "config.yaml").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in log} == {"train", "eval"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    for split in ("val", "test"):
        assert set(metrics["splits"][split]) == {"dress_R@10", "dress_R@50", "shirt_R@10", "shirt_R@50",
                                                 "avg_R@10", "avg_R@50", "avg"}
    assert sorted(p.name for p in (out / "topk").iterdir()) == [
        "test_dress.topk.npz", "test_shirt.topk.npz", "val_dress.topk.npz", "val_shirt.topk.npz"]
    assert load_topk(out / "topk" / "val_dress.topk.npz").k == 5
    return metrics


def _trained_stub(tmp_path: Path, synth: Path) -> Path:
    """A 2-step stub_cir run in ``tmp_path/run`` (the run the eval and resume tests start from)."""
    run = tmp_path / "run"
    assert main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), "--output-dir", str(run),
                 "--set", "train.max_steps=2"]) == 0
    return run


def test_cli_train_then_eval(tmp_path, synth, capsys):
    cfg = _write_config(tmp_path / "stub.yaml", synth)
    out = tmp_path / "run_josé"  # a non-ASCII run folder: eval's JSON holds its path as itself, not as escapes
    assert main(["train", str(cfg), "--output-dir", str(out), "--set", "train.max_steps=5",
                 "--set", "model_overrides.dropout=0.0"]) == 0
    metrics = _check_run_folder(out)
    assert metrics["steps"] == 5 and metrics["selection"]["split"] == "val"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["train"]["lr"] == 0.01  # resolved config, --set applied
    assert saved["model_overrides"] == {"embed_dim": 12, "dropout": 0.0}
    # train prints metrics.json's record plus the run folder (it printed the splits alone: no way to the run)
    trained = json.loads(capsys.readouterr().out)
    assert trained == {**metrics, "run_dir": str(out.resolve())}

    assert main(["eval", str(out), "--split", "test", "--output", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splits"]["test"] == pytest.approx(metrics["splits"]["test"])  # same weights, same numbers
    written = (tmp_path / "eval.json").read_text(encoding="utf-8")
    assert json.loads(written) == printed and str(out / "checkpoints") in written

    # a checkpoint file alone: the model is rebuilt from the name and config it records
    assert main(["eval", str(out / "checkpoints" / "best.pt"), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"] == pytest.approx(metrics["splits"]["val"])


def test_eval_refuses_to_replace_outputs_before_any_work(tmp_path, synth, capsys, caplog, monkeypatch):
    cfg = _write_config(tmp_path / "stub.yaml", synth)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output-dir", str(out), "--set", "train.max_steps=2"]) == 0
    (tmp_path / "eval.json").write_text("my earlier numbers\n")
    topk = out / "topk" / "test_dress.topk.npz"
    before = topk.read_bytes()
    from cirlab.engine import runs

    monkeypatch.setattr(runs, "model_from_checkpoint", lambda *a, **k: pytest.fail("the model was read"))
    for extra, message in ((["--output", str(tmp_path / "eval.json")], "eval.json exists; pass --overwrite"),
                           (["--output", str(tmp_path)], "is a folder; give the path of a file"),
                           (["--topk-dir", str(out / "topk"), "--set", "eval.k=3"],
                            "test_dress.topk.npz exists; pass --overwrite")):
        caplog.clear()
        assert main(["eval", str(out), "--split", "test", *extra]) == 2
        assert message in caplog.text
    assert (tmp_path / "eval.json").read_text() == "my earlier numbers\n" and topk.read_bytes() == before
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "test", "--output", str(tmp_path / "eval.json"), "--topk-dir",
                 str(out / "topk"), "--set", "eval.k=3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(capsys.readouterr().out)
    assert load_topk(topk).k == 3


def test_eval_num_workers_decodes_the_evaluations_images_in_workers(tmp_path, synth, capsys):
    """Evaluation always decoded its images in the main process: `eval.num_workers` was an unknown field. It gives
    the same numbers as without workers, and is refused where nothing would read it (ITM's precomputed features)."""
    from cirlab.core.errors import ConfigError
    from cirlab.engine import evaluate, runs

    run = _trained_stub(tmp_path, synth)
    capsys.readouterr()
    used, real = [], evaluate.ordered_loader

    def counted(dataset, batch_size, num_workers=0):
        used.append(num_workers)
        return real(dataset, batch_size, num_workers)

    printed = []
    for workers in (0, 2):
        used.clear()
        evaluate.ordered_loader = counted
        try:
            assert main(["eval", str(run), "--split", "val", "--set", f"eval.num_workers={workers}"]) == 0
        finally:
            evaluate.ordered_loader = real
        printed.append(json.loads(capsys.readouterr().out)["splits"]["val"])
        assert used and set(used) == {workers}
    assert printed[0] == pytest.approx(printed[1])
    itm = ROOT / "configs" / "dime_synthetic_tiny.yaml"
    for value, problem in (("2", r"ITM evaluation \(f30k\) reads precomputed features"),
                           ("-1", "expected an integer >= 0, got -1")):
        with pytest.raises(ConfigError, match=rf"eval\.num_workers: {problem}"):
            runs.validate_config(runs.load_config(itm, [f"eval.num_workers={value}"]), str(itm))


def test_eval_refuses_what_it_would_not_read(tmp_path, synth, capsys, caplog):
    """`--checkpoint last` with a checkpoint file evaluated that file; a flag and --set naming one entry let --set
    win (`--split val` scored test); `--k` on an ITM run did nothing. Each is one line now, before any work."""
    run = _trained_stub(tmp_path, synth)
    best = run / "checkpoints" / "best.pt"
    cases = [(["eval", str(best), "--checkpoint", "last"], rf"^cirlab eval {re.escape(str(best))} --checkpoint last: "
              r"--checkpoint picks a file in a run folder's checkpoints/"),
             (["eval", str(run), "--split", "val", "--set", "eval.splits=[test]"],
              r"^--split val and --set eval\.splits both set eval\.splits: give one of them$"),
             (["eval", str(run), "--category", "shirt", "--set", "dataset={category: dress}"],
              r"^--category shirt and --set dataset both set dataset\.category: give one of them$")]
    for argv, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and re.search(message, errors[0]), (argv, errors)
    assert main(["eval", str(best), "--checkpoint", "best", "--split", "val"]) == 0  # the default, named: fine
    capsys.readouterr()
    dime = tmp_path / "dime"
    assert main(["train", str(ROOT / "configs" / "dime_synthetic_tiny.yaml"), "--output-dir", str(dime),
                 "--set", "train.max_steps=1", "--set", f"dataset.synthetic.out={synth}",
                 "--set", "dataset.synthetic.image_size=32"]) == 0
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["eval", str(dime), "--k", "5"]) == 2
    assert "--k 5: top-K files are for composed retrieval (CIR) rankings; f30k is image-text matching" in caplog.text
    capsys.readouterr()


def test_eval_output_written_meanwhile_by_another_eval_is_not_replaced(tmp_path, synth, capsys, caplog, monkeypatch):
    """Two `cirlab eval ... --output same.json` at once both passed the check before the work, and the later write
    replaced the earlier one's result without a word, with rc 0 for both. Without --overwrite the file is now
    created exclusively: the loser gets the usual one-line refusal (its results are on stdout) and the other file
    stays whole."""
    from cirlab.engine import runs

    run = _trained_stub(tmp_path, synth)
    target = tmp_path / "eval.json"
    evaluate = runs.evaluate_split

    def the_other_eval_finishes_first(*args, **kwargs):
        if not target.exists():
            target.write_text('{"checkpoint": "the other eval"}\n')
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_split", the_other_eval_finishes_first)
    capsys.readouterr()
    caplog.clear()
    assert main(["eval", str(run), "--split", "val", "--output", str(target)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"cirlab eval --output: {target} exists" in errors[0], errors
    assert "pass --overwrite" in errors[0] and "Traceback" not in caplog.text
    assert target.read_text() == '{"checkpoint": "the other eval"}\n'
    assert json.loads(capsys.readouterr().out)["splits"]["val"]  # this eval's results are not lost: printed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staged file left
    monkeypatch.chdir(tmp_path)  # a relative run path: the record says where the file is from anywhere
    assert main(["eval", os.path.relpath(run, tmp_path), "--split", "val", "--output", str(target), "--overwrite",
                 "--set", "eval.batch_size=8"]) == 0
    record = json.loads(target.read_text())
    assert record["checkpoint"] == str(run.resolve() / "checkpoints" / "best.pt")
    assert record["code"] and record["settings"] == ["eval.batch_size=8"]  # what scored it, and how


def test_eval_topk_files_written_meanwhile_by_another_eval_are_not_replaced(tmp_path, synth, capsys, caplog,
                                                                            monkeypatch):
    """As for --output: the top-K files of --topk-dir were checked before the work and then replaced without a word
    when a second eval wrote them meanwhile. Without --overwrite they are now placed only where nothing is."""
    from cirlab.engine import runs

    run = _trained_stub(tmp_path, synth)
    topk_dir = tmp_path / "shared_topk"
    evaluate = runs.evaluate_split

    def the_other_eval_finishes_first(*args, **kwargs):
        topk_dir.mkdir(exist_ok=True)
        (topk_dir / "val_dress.topk.npz").write_bytes(b"the other eval's")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_split", the_other_eval_finishes_first)
    caplog.clear()
    assert main(["eval", str(run), "--split", "val", "--topk-dir", str(topk_dir)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(
        f"cirlab eval --topk-dir: {topk_dir / 'val_dress.topk.npz'} exists (written by another process"), errors
    assert (topk_dir / "val_dress.topk.npz").read_bytes() == b"the other eval's"
    assert not [p.name for p in topk_dir.iterdir() if p.name.startswith(".")]  # no staged file left
    assert main(["eval", str(run), "--split", "val", "--topk-dir", str(topk_dir), "--overwrite"]) == 0
    assert load_topk(topk_dir / "val_dress.topk.npz").k == 5
    assert main(["eval", str(run), "--split", "val", "--topk-dir", str(tmp_path / "mine")]) == 0  # a new folder


def test_a_run_that_records_no_image_decoding_is_said_to_when_read(tmp_path, synth, caplog):
    """Runs of cirlab before image_read="viewer" became the default decoded images with convert("RGB"): evaluated or
    resumed now they gave other numbers (images with alpha) without a word. A run records its decoding in
    provenance.json; one that records none is warned about, with the setting that reproduces the old decoding."""
    run = _trained_stub(tmp_path, synth)
    provenance = json.loads((run / "provenance.json").read_text(encoding="utf-8"))
    assert [start["image_read"] for start in provenance["starts"]] == ["viewer"]
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert "does not record how its images were decoded" not in caplog.text
    for start in provenance["starts"]:  # a run written before the decoding was recorded
        del start["image_read"]
    (run / "provenance.json").write_text(json.dumps(provenance), encoding="utf-8")
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert f"{run} does not record how its images were decoded" in caplog.text
    assert "--set dataset.options.image_read=original reproduces them" in caplog.text
    caplog.clear()
    assert main(["eval", str(run), "--split", "val", "--set", "dataset.options.image_read=viewer"]) == 0
    assert "does not record how its images were decoded" not in caplog.text  # chosen on the command line
    assert main(["train", str(run / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "train.max_steps=3"]) == 0
    assert "does not record how its images were decoded (in any start)" in caplog.text  # a resume is told too
    caplog.clear()  # resumed: its new start records viewer, its first steps still decoded the old way
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert "does not record how its images were decoded (in some of its starts)" in caplog.text


def test_a_run_folder_whose_config_names_another_model_than_its_checkpoint_is_refused(tmp_path, synth, caplog,
                                                                                     capsys):
    """A folder assembled from two runs (config.yaml says CaLa, best.pt holds AMC weights) printed the checkpoint
    model's numbers as the config's model's, without a word; the printed record did not name the model either."""
    run = _trained_stub(tmp_path, synth)
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "stub_cir"
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": "amc", "preset": "tiny"}))
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{run}: its config.yaml names model 'amc', but "
                                                     f"{run / 'checkpoints' / 'best.pt'} holds a 'stub_cir' model")


def test_resuming_a_run_folder_with_symbolic_links_where_it_writes_is_refused(tmp_path, synth, caplog):
    """A downloaded run folder whose log.jsonl points at a user's file: --resume appended log lines to that file
    (and a linked checkpoints/ got best.pt and last.pt written into its target)."""
    run = _trained_stub(tmp_path, synth)
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\n")
    (run / "log.jsonl").unlink()
    (run / "log.jsonl").symlink_to(notes)
    caplog.clear()
    assert main(["train", str(run / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "train.max_steps=4"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"symbolic link(s) where the run writes (log.jsonl -> {notes})" in errors[0], errors
    assert notes.read_text() == "my own notes\n"
    elsewhere = tmp_path / "elsewhere"  # a linked checkpoints/: its target's files are not touched either
    (run / "checkpoints").rename(elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    (elsewhere / ".draft.tmp").write_text("another run's write in flight\n")
    (run / "log.jsonl").unlink()
    assert main(["train", str(run / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "train.max_steps=4"]) == 2
    assert (elsewhere / ".draft.tmp").read_text() == "another run's write in flight\n"


def test_eval_names_the_process_rewriting_the_run(tmp_path, synth, caplog, monkeypatch):
    """`cirlab eval RUN` while `cirlab train --overwrite` rewrites RUN: the checkpoint it had just found vanished and
    it said only "checkpoint not found". Now it names the live process holding the run folder, and a run without
    train_summary.json is called "still training" while its lock is held (not "it stopped")."""
    from cirlab.core.io import folder_lock
    from cirlab.engine import runs
    from lock_holder import held_by_another_thread

    run = _trained_stub(tmp_path, synth)
    read = runs.model_from_checkpoint

    def removed_by_the_overwrite(path, **kwargs):
        Path(path).unlink()
        return read(path, **kwargs)

    monkeypatch.setattr(runs, "model_from_checkpoint", removed_by_the_overwrite)
    (run / "train_summary.json").unlink()
    with held_by_another_thread(lambda: folder_lock(run)):
        caplog.clear()
        assert main(["eval", str(run), "--split", "val"]) == 75  # in use: the same command later (was 2)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "best.pt vanished before it was read" in errors[0], errors
    assert f"{run} is being written by another cirlab process (pid {os.getpid()} on " in errors[0]
    assert "the run did not finish (still training: pid " in caplog.text
    assert not (run / ".cirlab.lock").exists()  # the probe left the holder's file to the holder, which removed it


def test_eval_of_a_split_without_targets_needs_a_topk_dir(tmp_path, synth, capsys, caplog, monkeypatch):
    """Fashion-IQ test (no "target" in its caption files) gives rankings only: they were computed, then kept nowhere."""
    from fixtures_data import write_fashioniq

    from cirlab.engine import runs

    out = tmp_path / "run"
    assert main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), "--output-dir", str(out),
                 "--set", "train.max_steps=2"]) == 0
    fiq = write_fashioniq(tmp_path / "fiq", categories=("dress", "shirt"))["root"]
    monkeypatch.setattr(runs, "evaluate_split", lambda *a, **k: pytest.fail("the split was evaluated"))
    caplog.clear()
    assert main(["eval", str(out), "--split", "test", "--root", str(fiq)]) == 2
    assert ("--split test: fashioniq test has no ground-truth targets, so its evaluation gives no metrics, only "
            "rankings; pass --topk-dir DIR to keep them") in caplog.text
    monkeypatch.undo()
    capsys.readouterr()
    caplog.clear()  # the run's own eval.splits (val, test): val is evaluated, test left out with a warning
    assert main(["eval", str(out), "--root", str(fiq)]) == 0
    assert set(json.loads(capsys.readouterr().out)["splits"]) == {"val"}
    assert "left out test: fashioniq test has no ground-truth targets" in caplog.text
    assert main(["eval", str(out), "--split", "test", "--root", str(fiq), "--topk-dir", str(tmp_path / "k")]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"] == {}
    assert {p.name for p in (tmp_path / "k").iterdir()} == {"test_dress.topk.npz", "test_shirt.topk.npz"}


def test_python_api_run_and_resume(tmp_path, synth):
    cfg = load_config(_write_config(tmp_path / "stub.yaml", synth, checkpoint_every=2),
                      ["train.max_steps=3", "output_dir=" + str(tmp_path / "run")])
    first = run_experiment(cfg)
    assert first["steps"] == 3
    _check_run_folder(tmp_path / "run")
    cfg = apply_overrides(cfg, parse_set(["train.max_steps=null"]))
    second = run_experiment(cfg, resume=True)  # continues from step 3 to the end of epoch 2
    steps_per_epoch = second["steps"] // 2
    assert second["steps"] == 2 * steps_per_epoch and second["epochs"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == list(range(1, second["steps"] + 1))  # resumed where it stopped, nothing repeated


def test_set_parsing_is_yaml_typed():
    parsed = dict((".".join(k), v) for k, v in parse_set(
        ["train.lr=2e-4", "train.lr_milestones=[10, 20]", "train.ema_decay=null", "dataset.category=dress",
         "train.shuffle=false", "eval.k=100"]))
    assert parsed == {"train.lr": 2e-4, "train.lr_milestones": [10, 20], "train.ema_decay": None,
                      "dataset.category": "dress", "train.shuffle": False, "eval.k": 100}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["train.lr"])
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides({}, parse_set(["trian.lr=1"]))
    # one string is one entry (papermill -p settings train.lr=1e-3 passes a str), not one per character
    assert parse_set("train.lr=1e-3") == [(["train", "lr"], 1e-3)]
    with pytest.raises(ConfigError, match="expected a list of KEY=VALUE strings, got int 5"):
        parse_set(5)
    with pytest.raises(ConfigError, match="expected a KEY=VALUE string .* got dict"):
        parse_set([{"train.lr": 1}])


def test_bad_configs_fail_early_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: stub_cir\ndataset: {name: shoes}\ntrain: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learning_rate"):
        load_config(bad)
    bad.write_text("model: no_such_model\ndataset: {name: shoes}\n")
    with pytest.raises(ConfigError, match="no_such_model"):
        load_config(bad)
    bad.write_text("model: stub_cir\npreset: huge\ndataset: {name: shoes}\n")
    with pytest.raises(ConfigError, match="preset 'huge'"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_a_mistake_made_on_the_command_line_is_not_blamed_on_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model: stub_cir\ndataset: {name: shoes}\ntrain: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"^--set train\.max_step=5: train: unknown field 'max_step' \(did you mean "
                                          r"'max_steps'\?\)"):
        load_config(good, ["train.lr=0.2", "train.max_step=5"])
    with pytest.raises(ConfigError, match=r"^--set train\.lr=abc: train\.lr: expected a number"):
        load_config(good, ["train.lr=abc"])
    bad = tmp_path / "bad.yaml"  # the file is wrong itself: the file is named, whatever --set adds
    bad.write_text("model: stub_cir\ndataset: {name: shoes}\ntrain: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match=r"^\S*bad\.yaml: train: unknown field 'learning_rate'"):
        load_config(bad, ["train.lr=0.2"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config["model"] in cirlab.list_models()
    assert not str(config["dataset"]["root"]).startswith("/")  # roots come from CIRLAB_DATA or --set
    assert not str(config["output_dir"]).startswith("/")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_select_on_reported_metrics(path):
    """Every config's selection metric is a key its dataset's protocol reports (amc_fashioniq once asked for
    'R@10+R@50', which Fashion-IQ never reports, and stopped after its first training epoch)."""
    from types import SimpleNamespace

    from cirlab.engine.runs import check_selection_metric, default_selection_metric

    config = load_config(path)
    ds = config["dataset"]
    cats = ds.get("category") or ["skin_tone", "gender", "color"]
    cats = [cats] if isinstance(cats, str) else cats
    loaded = [SimpleNamespace(category=c, dataset=ds["name"]) for c in cats]
    same_class = cirlab.create_model(config["model"], "tiny")  # the run's default_train_config, offline
    metric = (config["train"].get("selection_metric") or same_class.default_train_config().get("selection_metric")
              or default_selection_metric(config))
    check_selection_metric(config, metric, "val", loaded, model=object())  # raises ConfigError when unreported


def test_unreported_selection_metric_fails_before_training(tmp_path):
    from fixtures_data import write_fashioniq

    info = write_fashioniq(tmp_path / "data", categories=("hat",))
    config = _own_categories_config(info["root"], tmp_path / "own.yaml")
    config["train"]["selection_metric"] = "R@10+R@50"
    with pytest.raises(ConfigError, match=r"selection_metric 'R@10\+R@50'.*not reported.*avg_R@10"):
        run_experiment(config, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was taken


def _own_categories_config(root: Path, path: Path) -> dict:
    config = {"model": "stub_cir", "preset": "tiny", "model_overrides": {"embed_dim": 12},
            "dataset": {"name": "fashioniq", "root": str(root), "category": None},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2, "progress": "none", "tensorboard": False,
                      "selection_metric": "avg"},
            "eval": {"splits": ["val"], "k": 5, "batch_size": 8}}
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_category_null_reports_the_categories_on_disk(tmp_path):
    from fixtures_data import write_fashioniq

    info = write_fashioniq(tmp_path / "data", categories=("hat", "sock"))
    config = _own_categories_config(info["root"], tmp_path / "own.yaml")
    metrics = run_experiment(config, output_dir=tmp_path / "run")
    assert set(metrics["splits"]["val"]) == {"hat_R@10", "hat_R@50", "sock_R@10", "sock_R@50", "avg_R@10",
                                             "avg_R@50", "avg"}


def test_broken_eval_split_fails_before_training(tmp_path):
    from cirlab.data import DataError
    from fixtures_data import write_fashioniq

    info = write_fashioniq(tmp_path / "data", categories=("hat",))
    broken = Path(info["root"]) / "captions" / "cap.hat.val.json"
    broken.write_text("[{\"candidate\": ")  # truncated JSON in the selection split
    config = _own_categories_config(info["root"], tmp_path / "own.yaml")
    with pytest.raises(DataError, match="cap.hat.val.json"):
        run_experiment(config, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was taken


def test_a_wrong_root_fails_before_the_model_is_built_and_leaves_no_folder(tmp_path, monkeypatch, caplog):
    """A paper-size model takes tens of seconds to build (and may need weights that are not there): a dataset root
    that does not exist stops the run first, in one line, and the run folder it would have made is not left."""
    from cirlab.engine import runs

    def never(config):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(runs, "build_seeded_model", never)
    out = tmp_path / "runs" / "hrem"
    args = ["train", str(ROOT / "configs" / "hrem_f30k.yaml"), "--output-dir", str(out),
            "--set", f"dataset.root={tmp_path / 'nowhere'}"]
    assert main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "nowhere" in errors[0] and "not found" in errors[0]
    assert not (tmp_path / "runs").exists()  # the folders this run made, its parent runs/ too, are removed
    (tmp_path / "mine").mkdir()
    assert main(args[:3] + [str(tmp_path / "mine")] + args[4:]) == 2
    assert (tmp_path / "mine").is_dir()  # a folder that was there before stays, even when empty


def test_a_missing_start_file_fails_before_the_data_and_the_model(tmp_path, monkeypatch, caplog):
    """``init_from`` / ``stage1_checkpoint`` naming nothing on disk (``lavis:`` prefix or not): one line naming the
    field and the path, before any data is read or any model is built; ``init_from: stage1`` is not a path."""
    from cirlab.engine import runs

    def never(*args, **kwargs):
        raise AssertionError("data or model touched before the start paths were checked")

    monkeypatch.setattr(runs, "build_seeded_model", never)
    monkeypatch.setattr(runs, "_prepare_data", never)
    missing = tmp_path / "blip2.pth"
    cases = [("cala_cirr.yaml", "init_from", f"lavis:{missing}"), ("hrem_f30k.yaml", "init_from", str(missing)),
             ("dime_f30k_i2t.yaml", "init_from", str(missing)),
             ("blip_rerank_cirr_stage2.yaml", "stage1_checkpoint", str(missing)),
             # files the model is built from: a missing vocab_file was a traceback from the first training step
             ("cala_synthetic_tiny.yaml", "vocab_file", str(missing)),
             ("blip_rerank_cirr_stage1.yaml", "vocab_file", str(missing)),
             ("amc_fashioniq.yaml", "glove_path", str(missing))]
    for config, field, value in cases:
        caplog.clear()
        out = tmp_path / field
        assert main(["train", str(ROOT / "configs" / config), "--output-dir", str(out),
                     "--set", f"model_overrides.{field}={value}"]) == 2, config
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        how = "starts from" if field in runs.START_FIELDS else "is built from"
        assert errors == [f"model_overrides.{field}: {missing} does not exist (model "
                          f"{runs.load_config(ROOT / 'configs' / config)['model']!r} {how} it)"], config
        assert not out.exists()
    config = {"model": "blip_rerank_stage2", "model_overrides": {"init_from": "stage1"}}
    runs._check_start_paths(config)  # stage II's own stage I: no file to look for


def test_a_missing_pretrained_folder_is_one_line_naming_it(tmp_path, synth, caplog):
    """HREM's BERT or CaLa's MiniLM folder that does not exist: exit 2, one line naming the model and the path."""
    cases = [("hrem_synthetic_tiny.yaml", "bert", "model 'hrem' (model_overrides): HREM: BERT directory"),
             ("cala_synthetic_lite.yaml", "minilm_path", "model_overrides.minilm_path: ")]
    for config, field, says in cases:
        caplog.clear()
        missing = tmp_path / f"no_{field}"
        assert main(["train", str(ROOT / "configs" / config), "--output-dir", str(tmp_path / field),
                     "--set", f"model_overrides.{field}={missing}",
                     "--set", f"dataset.synthetic.out={synth}", "--set", "dataset.synthetic.image_size=32"]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0] and str(missing) in errors[0], errors
        assert not (tmp_path / field).exists()


def test_models_params_counts_paper_presets_on_the_meta_device(capsys, caplog):
    """``cirlab models --params MODEL``: per-module counts of the paper sizes without weights or memory (HREM's
    hub BERT at BERT-base sizes), the same numbers as building the model; clear errors for what cannot count."""
    from cirlab.models import cala as C

    assert main(["models", "--params", "hrem", "--preset", "f30k", "--json"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)["modules"]}
    assert rows["img_enc"]["params"] == 9_977_344 and rows["img_enc"]["frozen"] == 0  # HREM's 9.98M image encoder
    assert rows["total"]["params"] == sum(r["params"] for m, r in rows.items() if m != "total")
    assert main(["models", "--params", "cala", "--set", "encoder=both"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "cala (preset cirr, encoder=both), built on the meta device"
    expected = {r["module"]: r for r in C.parameter_table(C.CaLaConfig.from_preset("cirr", encoder="both"))}
    printed = {line.split()[0]: [int(x.replace(",", "")) for x in line.split()[1:]] for line in table[2:]}
    assert printed == {m: [r["params"], r["trainable"], r["frozen"]] for m, r in expected.items()}
    assert printed["visual"][1] > 0 and printed["tower"][1] == 0  # encoder=both trains the visual Q-Former

    # a lite preset reads its offline weights when built: it is built on the CPU (on the meta device it failed after
    # hundreds of torch warnings)
    assert main(["models", "--params", "hrem", "--preset", "lite", "--json"]) == 0
    lite = {r["module"]: r for r in json.loads(capsys.readouterr().out)["modules"]}
    built = cirlab.create_model("hrem", "lite")
    assert lite["total"]["params"] == sum(p.numel() for p in built.parameters())

    for args, says in ((["models", "--params", "hrme"], "unknown model 'hrme'"),
                       (["models", "--preset", "cirr"], "--preset and --set go with --params"),
                       (["models", "--params", "cala", "--set", "nonsense=1"], "nonsense")):
        caplog.clear()
        assert main(args) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0], errors


def test_models_settings_prints_what_a_run_starts_from(capsys, caplog):
    """``cirlab models --settings MODEL``: the preset's fields and the paper recipe, spelt as run-config entries whose
    printed values read back (YAML) as the values themselves; the recipe follows the preset (HREM's batch 128 on
    F30K, 256 on COCO); no warning about weights that nothing reads."""
    from cirlab.engine.train import TrainConfig
    from cirlab.models.hrem import HREMConfig

    assert main(["models", "--settings", "hrem", "--preset", "f30k", "--json"]) == 0
    f30k = json.loads(capsys.readouterr().out)
    assert f30k["model_overrides"] == json.loads(json.dumps(HREMConfig.from_preset("f30k").to_dict()))
    assert f30k["train"]["batch_size"] == 128 and f30k["train"]["lr_milestones"] == [15, 25]
    assert main(["models", "--settings", "hrem"]) == 0  # the first paper preset by name: coco
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("hrem, preset coco: model fields")
    entries = dict(line.strip().split(" = ", 1) for line in lines if line.startswith("  "))
    assert yaml.safe_load(entries["train.batch_size"]) == 256 and yaml.safe_load(entries["train.ema_decay"]) is None
    assert {k.split(".", 1)[1] for k in entries if k.startswith("train.")} == set(f30k["train"]) | set(
        f30k["train_defaults"]) == {f.name for f in dataclasses.fields(TrainConfig)} - {"test_split", "resume"}
    # every training field once, but those a run derives (dataset.test_split, --resume) and refuses in --set
    coco = HREMConfig.from_preset("coco").to_dict()
    assert {k: yaml.safe_load(v) for k, v in entries.items() if k.startswith("model_overrides.")} == \
        {f"model_overrides.{k}": v for k, v in coco.items()}

    caplog.clear()
    assert main(["models", "--settings", "amc", "--set", "embed_dim=64", "--json"]) == 0
    amc = json.loads(capsys.readouterr().out)
    assert amc["preset"] == "fashioniq" and amc["model_overrides"]["embed_dim"] == 64 and amc["train"]["epochs"] == 50
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.records
    caplog.clear()
    assert main(["models", "--settings", "cala", "--preset", "cirrr"]) == 2
    assert "unknown preset 'cirrr'" in caplog.records[-1].getMessage()
    with pytest.raises(SystemExit):
        main(["models", "--settings", "cala", "--params", "cala"])


def test_same_config_gives_the_same_run(tmp_path, synth):
    """The seed covers the initial weights too: two runs of one config end with identical weights and losses."""
    config = load_config(_write_config(tmp_path / "stub.yaml", synth, max_steps=3, seed=5))
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        torch.manual_seed(len(str(out)) + (out.name == "b"))  # a different global RNG state before each run
        run_experiment(config, output_dir=out)
    weights = [torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"] for out in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [[json.loads(line).get("loss") for line in (out / "log.jsonl").read_text().splitlines()] for out in runs]
    assert losses[0] == losses[1]


def test_every_paper_dataset_has_a_config():
    names = {p.stem for p in CONFIGS}
    for expected in ("amc_fashioniq", "amc_shoes", "dime_f30k_i2t", "dime_f30k_t2i", "dime_coco_i2t",
                     "dime_coco_t2i", "blip_rerank_fashioniq_stage1", "blip_rerank_fashioniq_stage2",
                     "blip_rerank_cirr_stage1", "blip_rerank_cirr_stage2", "amc_synthetic_tiny"):
        assert expected in names


def test_eval_refuses_pickled_checkpoint_without_flag(tmp_path, synth, caplog):
    model = cirlab.create_model("stub_cir", preset="tiny")
    torch.save(model, tmp_path / "released.pt")  # a whole pickled module, like AMC's train_model.pt
    args = ["eval", str(tmp_path / "released.pt"), "--model", "stub_cir", "--preset", "tiny",
            "--dataset", "shoes", "--set", f"dataset.synthetic={{size: tiny, out: {synth}, image_size: 32}}",
            "--split", "test"]
    assert main(args) == 2
    assert "trust_pickle" in caplog.text
    assert main(args + ["--trust-pickle"]) == 0


def test_help_explains_every_option(capsys):
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "models", "data"} <= set(sub.choices)
    for command in ("train", "eval", "models"):
        for action in sub.choices[command]._actions:
            assert action.help and action.help.strip(), f"cirlab {command}: {action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--trust-pickle", "--protocol", "--dataset", "--split", "--topk-dir", "--resume", "--set"):
        assert option in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    assert all(f"  cirlab {command} " in top for command in sub.choices)  # an example for every command
    assert "::" not in top and "``" not in top  # plain text, not the module docstring's reST


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "stub_cir" in out and "tiny" in out


@pytest.mark.slow
def test_amc_tiny_smoke_via_cli(tmp_path, monkeypatch):
    """The shipped tiny config with the real AMC tiny model, 2 steps."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / "amc_synthetic_tiny.yaml"
    out = tmp_path / "amc"
    assert main(["train", str(config), "--output-dir", str(out), "--set", "train.max_steps=2",
                 "--set", "eval.splits=[val]", "--set", "dataset.synthetic.image_size=32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "amc" and "dress_R@10" in metrics["splits"]["val"]
    assert (out / "topk" / "val_dress.topk.npz").is_file()
    # an ensemble of the run with itself ranks exactly as the run alone (mean of two equal cosines)
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    assert main(["eval", str(out), "--split", "val", "--output", str(single)]) == 0
    assert main(["eval", str(out), "--split", "val", "--ensemble", str(out), "--output", str(double)]) == 0
    single, double = json.loads(single.read_text()), json.loads(double.read_text())
    assert double["ensemble"] == [double["checkpoint"]] * 2
    assert double["splits"]["val"] == pytest.approx(single["splits"]["val"])


def test_ensembles_need_members_of_one_paper_model():
    from cirlab.engine.runs import make_ensemble

    amc = cirlab.create_model("amc", "tiny")
    with pytest.raises(ConfigError, match="one model kind"):
        make_ensemble([amc, cirlab.create_model("stub_cir", "tiny")])
    size = amc.config.image_size
    with pytest.raises(ConfigError, match=rf"image transforms differ \(member 1 amc_shoes at {size} px, member 2 "
                                          r"amc_shoes at 32 px\); .* \(member 1: runs/a; member 2: runs/b\)$"):
        make_ensemble([amc, cirlab.create_model("amc", "tiny", image_size=32)], ["runs/a", "runs/b"])
    both = make_ensemble([amc, cirlab.create_model("amc", "tiny")])
    assert both.model_name == "amc_ensemble" and len(both.members) == 2


def test_initial_weights_follow_the_seed_the_trainer_uses():
    """No train.seed: AMC's own default seed (300, the paper's) draws the initial weights, not 0."""
    from cirlab.engine.runs import build_seeded_model
    from cirlab.engine.train import seed_everything

    config = {"model": "amc", "preset": "tiny", "train": {}}
    seed_everything(300)
    tensors = lambda m: {k: v for k, v in m.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
    expected = tensors(cirlab.create_model("amc", "tiny"))
    got = tensors(build_seeded_model(config))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    other = tensors(build_seeded_model({**config, "train": {"seed": 1}}))
    assert not all(torch.equal(expected[k], other[k]) for k in expected)


def test_a_model_on_a_dataset_of_the_other_task_is_one_config_error(tmp_path, caplog):
    """DIME (image-text matching) on Fashion-IQ, AMC (CIR) on Flickr30K: refused by name before any data is read
    (was: a TypeError deep in the caption vocabulary)."""
    from cirlab.engine.runs import validate_config, with_defaults

    with pytest.raises(ConfigError, match=r"dime is an image-text matching model and cannot read 'fashioniq'; "
                                          r"its datasets: f30k, coco"):
        validate_config(with_defaults({"model": "dime", "preset": "tiny", "dataset": {"name": "fashioniq"}}))
    with pytest.raises(ConfigError, match=r"amc is a composed image retrieval model .* its datasets: fashioniq"):
        validate_config(with_defaults({"model": "amc", "preset": "tiny", "dataset": {"name": "f30k"}}))
    validate_config(with_defaults({"model": "blip_rerank_stage1", "preset": "tiny", "dataset": {"name": "cirr"}}))
    # a split listed twice failed with a KeyError after evaluating every split
    with pytest.raises(ConfigError, match=r"eval\.splits: 'val' listed more than once"):
        validate_config(with_defaults({"model": "amc", "preset": "tiny", "dataset": {"name": "fashioniq"},
                                       "eval": {"splits": ["val", "test", "val"]}}))
    # "protocol" names the metric protocol (eval) and the loader's gallery/captions (dataset.options): docs/datasets.md
    # lists the second, `--protocol clip4cir` read "not a protocol of dataset 'fashioniq'; known: fashioniq"
    with pytest.raises(ConfigError, match=r"eval\.protocol: 'rerank' is a protocol of the fashioniq loader .*: set it "
                                          r"with dataset\.options\.protocol=rerank; eval\.protocol names the metric "
                                          r"protocol \(fashioniq\)$"):
        validate_config(with_defaults({"model": "amc", "preset": "tiny", "dataset": {"name": "fashioniq"},
                                       "eval": {"protocol": "rerank"}}))
    # grouping by reference image needs CIR triplets: an ITM run refuses it here, not with a traceback once the
    # data and the model are built
    with pytest.raises(ConfigError, match=r"train\.group_batches groups CIR triplets .* f30k's image-caption pairs"):
        validate_config(with_defaults({"model": "dime", "preset": "tiny", "dataset": {"name": "f30k"},
                                       "train": {"group_batches": 2}}))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: hrem\npreset: tiny\ndataset: {{name: shoes, root: {tmp_path}}}\n")
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "c.yaml: dataset.name: hrem is an image-text matching model" in errors[0].message
    assert errors[0].exc_info is None  # one line, no traceback
    assert not (tmp_path / "run").exists()


def test_settings_that_were_read_and_ignored_are_refused(tmp_path):
    """An edited model_config (the record a run writes) trained the preset's model; dataset.category on CIRR was
    ignored; a config's path, or a dict without an eval section, failed inside the run."""
    import cirlab
    from cirlab.data.generators import synthetic
    from cirlab.engine.runs import validate_config, with_defaults

    base = {"model": "amc", "preset": "tiny", "dataset": {"name": "cirr"}}
    with pytest.raises(ConfigError, match=r"model_config is the record a run writes .*embed_dim: 999 \(builds 64\)"
                                          r".*model_overrides"):
        validate_config(with_defaults({**base, "model_config": {"embed_dim": 999}}))
    validate_config(with_defaults({**base, "model_config": {"embed_dim": 64}}))  # a run's own record, run again
    with pytest.raises(ConfigError, match=r"model_config: unknown field 'embed_dimm' \(did you mean 'embed_dim'\?\)"):
        validate_config(with_defaults({**base, "model_config": {"embed_dimm": 999}}))  # a typo passed as matching
    with pytest.raises(ConfigError, match=r"dataset.category: cirr has no categories"):
        validate_config(with_defaults({**base, "dataset": {"name": "cirr", "category": "dress"}}))
    with pytest.raises(ConfigError, match=r"run_experiment takes a run config .* cirlab.load_config\(path\)"):
        cirlab.run_experiment("configs/amc_synthetic_tiny.yaml")
    data = tmp_path / "data"
    synthetic.generate(data, size="tiny", layouts=["cirr"], image_size=16)
    config = {**base, "dataset": {"name": "cirr", "root": str(data / "cirr")}, "output_dir": str(tmp_path / "run"),
              "train": {"max_steps": 1, "batch_size": 8, "num_threads": 1}}  # no eval section
    assert cirlab.run_experiment(config)["steps"] == 1
    assert with_defaults({**base, "train": None})["train"] == with_defaults(base)["train"]  # null: the defaults


@pytest.mark.parametrize("argv, flag", [(["data", "synth", "--out", "x", "--seed", "-1"], "--seed"),
                                        (["data", "synth", "--out", "x", "--image-size", "0"], "--image-size"),
                                        (["data", "synth", "--out", "x", "--image-size", "100000"], "--image-size"),
                                        (["data", "check", "--dataset", "shoes", "--max-per-kind", "-2"],
                                         "--max-per-kind")])
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    """--seed -1 was a numpy traceback, --image-size 100000 ran out of memory, --max-per-kind -2 listed all but
    two problems (a Python slice). (`eval --k 0` is refused by the eval config check, naming eval.k.)"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert f"argument {flag}: expected a whole number" in text and "Traceback" not in text
    assert not (tmp_path / "x").exists()


def test_synthetic_generate_refuses_a_bad_seed_or_size_by_name(tmp_path):
    from cirlab.data.generators import synthetic

    with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2\\*\\*32 - 1, got -1"):
        synthetic.generate(tmp_path / "s", seed=-1, size="tiny")
    with pytest.raises(ConfigError, match="image_size must be a whole number from 16 to 1024 pixels, got 8"):
        synthetic.generate(tmp_path / "s", size="tiny", image_size=8)
    with pytest.raises(ConfigError, match=r"seed must be a whole number .* got 1\.5"):  # was numpy's, half-written
        synthetic.generate(tmp_path / "s", seed=1.5, size="tiny")
    with pytest.raises(ConfigError, match=r"image_size must be a whole number .* got 32\.0"):  # was PIL's
        synthetic.generate(tmp_path / "s", size="tiny", image_size=32.0)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, verbose", [
    (["train", "amc_synthetic_tiny", "-v"], True), (["-v", "train", "amc_synthetic_tiny"], True),
    (["train", "amc_synthetic_tiny"], False), (["data", "check", "--dataset", "cirr", "--verbose"], True),
    (["report", "--only", "evaluate", "-v"], True), (["models"], False)])
def test_verbose_is_taken_before_or_after_the_command(argv, verbose):
    from cirlab.cli import build_parser

    assert build_parser(argv).parse_args(argv).verbose is verbose


def test_version_names_cirlab_torch_and_transformers_from_one_source(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"cirlab {cirlab.__version__} (torch {version('torch')}, transformers {version('transformers')})"
    assert version("cirlab") == cirlab.__version__  # pyproject reads cirlab.__version__ (dynamic), not its own copy


def test_eval_on_another_dataset_starts_from_that_datasets_defaults_not_the_runs(tmp_path):
    """`cirlab eval RUN --dataset other` kept the run's root (the old dataset's folder), split names and protocol;
    only its categories were reset."""
    import argparse

    import yaml

    from cirlab.cli import _eval_config
    from cirlab.data.catalog import get_dataset
    from cirlab.engine.runs import with_defaults

    stored = with_defaults({"dataset": {"name": "fashioniq", "root": str(tmp_path / "fiq"), "category": ["dress"],
                                        "options": {"captions": "amc"}},
                            "eval": {"protocol": "fashioniq", "splits": ["val"]}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    flags = dict(config=None, dataset=None, root=None, category=None, protocol=None, k=None, batch_size=None,
                 split=None, overrides=[])
    same = _eval_config(argparse.Namespace(**{**flags, "dataset": "fashioniq"}), tmp_path)
    assert same["dataset"]["root"] == str(tmp_path / "fiq") and same["dataset"]["category"] == ["dress"]
    other = _eval_config(argparse.Namespace(**{**flags, "dataset": "f30k", "root": str(tmp_path / "f30k")}),
                         tmp_path)
    assert other["dataset"]["root"] == str(tmp_path / "f30k") and other["dataset"]["category"] is None
    assert other["dataset"]["options"] == {} and other["eval"]["protocol"] is None and other["eval"]["splits"] is None
    spec = get_dataset("f30k")
    assert (other["dataset"]["train_split"], other["dataset"]["val_split"], other["dataset"]["test_split"]) == \
        tuple(spec.splits)
    no_root = _eval_config(argparse.Namespace(**{**flags, "dataset": "f30k"}), tmp_path)
    assert no_root["dataset"]["root"] == ""  # $CIRLAB_DATA/f30k, not the Fashion-IQ folder of the run


def test_a_run_of_the_python_api_is_evaluated_by_the_cli(tmp_path, synth, caplog):
    """The README's `cirlab.fit(..., output_dir=...)` run: `cirlab eval RUN` said "pass ... a run folder" (it had),
    and with --dataset it stopped at the `model_name` key fit wrote into config.yaml."""
    from cirlab.data import load_cir
    from cirlab.data.generators import synthetic

    root = synthetic.ensure(synth, size="tiny", image_size=32) / "fashioniq"
    model = cirlab.create_model("stub_cir", preset="tiny", embed_dim=12)
    train = load_cir("fashioniq", root, "train", category="dress")
    run = tmp_path / "run"
    cirlab.fit(model, train.triplet_dataset(model.image_transform(True)),
               cirlab.TrainConfig(epochs=1, batch_size=8, progress="log"), output_dir=run)
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert set(written) == {"model", "model_config", "train"} and written["model"] == "stub_cir"
    assert main(["eval", str(run)]) == 2
    assert f"{run / 'config.yaml'} records no dataset" in caplog.text and "--dataset and --root" in caplog.text
    assert main(["eval", str(run), "--dataset", "fashioniq", "--root", str(root), "--category", "dress",
                 "--split", "val", "--k", "5"]) == 0
    legacy = {**written, "model_name": "stub_cir"}  # what fit wrote before: still evaluated
    (run / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert main(["eval", str(run), "--dataset", "fashioniq", "--root", str(root), "--category", "dress",
                 "--split", "val", "--k", "5", "--output", str(tmp_path / "m.json")]) == 0


def test_eval_category_is_taken_once(capsys):
    # --split repeats, --category does not: a second one was kept alone, without a word
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "runs/x", "--category", "dress", "--category", "shirt"])
    assert exit_.value.code == 2 and "--category given twice (dress, shirt)" in capsys.readouterr().err


def test_allow_config_change_goes_with_a_resume_from_the_flag_or_the_config(tmp_path, synth, caplog):
    config = _write_config(tmp_path / "stub.yaml", synth, max_steps=2)
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(config), "--output-dir", str(tmp_path / "a"), "--allow-config-change"]) == 2
    assert "--allow-config-change applies to a resume" in caplog.text and not (tmp_path / "a").exists()
    # train.resume in the config (or --set) is a resume too: accepted, as run_experiment reads it
    assert main(["train", str(config), "--output-dir", str(tmp_path / "b"), "--set", "train.resume=auto",
                 "--allow-config-change"]) == 0


def test_a_precomp_split_typo_names_the_config_entry(tmp_path, synth, caplog):
    # the precomp loader says a missing split as a DataError naming the file: the entry that named it leads now
    with caplog.at_level(logging.ERROR):
        assert main(["train", str(ROOT / "configs" / "dime_synthetic_tiny.yaml"), "--output-dir", str(tmp_path / "r"),
                     "--set", "dataset.val_split=devv", "--set", f"dataset.synthetic.out={synth}",
                     "--set", "dataset.synthetic.image_size=32"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("dataset.val_split=devv: "), errors
    assert "split 'devv' not found" in errors[0] and not (tmp_path / "r" / "checkpoints").exists()


def test_a_path_an_ascii_terminal_cannot_show_is_printed_escaped_not_a_failure(tmp_path):
    """PYTHONIOENCODING=ascii (or an ASCII / Latin-1 locale): the last print of a finished command raised
    UnicodeEncodeError and made its success exit 1. Paths it cannot show are escaped; a pasted command is quoted."""
    import subprocess
    import sys

    out = tmp_path / "my nötebooks"
    run = subprocess.run([sys.executable, "-m", "cirlab", "notebooks", str(out)], capture_output=True,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=120)
    assert run.returncode == 0, run.stderr.decode("ascii", "replace")
    text = run.stdout.decode("ascii")
    assert "my n\\xf6tebooks" in text and "jupyter lab '" in text
    assert (out / "quickstart.ipynb").is_file()


def test_a_reader_that_closes_the_pipe_ends_the_output_not_the_command(tmp_path):
    """`cirlab models | head -1`: every print after the reader left raised BrokenPipeError (a traceback, exit 1),
    and `cirlab report | head` stopped the report. The command goes on; the rest of its output is dropped."""
    import subprocess
    import sys

    for command in (["models", "--params", "amc", "--preset", "tiny"], ["notebooks", str(tmp_path / "nb")]):
        proc = subprocess.Popen([sys.executable, "-m", "cirlab", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert (tmp_path / "nb" / "quickstart.ipynb").is_file()  # the work was done


def test_a_command_started_with_stdout_closed_succeeds(tmp_path):
    """`cirlab ... >&-` (a scheduler or daemon with no stdout): Python's sys.stdout is None, and the final flush
    turned a finished command into exit 1 with a traceback (a retry then met "folder already holds a run")."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cirlab", "notebooks", str(tmp_path / "nb")], stdout=None,
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: __import__("os").close(1))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "nb" / "quickstart.ipynb").is_file()


def test_verbose_is_cirlabs_debug_lines_not_every_librarys():
    """-v set the root logger to DEBUG: every library's debug lines (PIL: several per image read). Checked while the
    command runs (afterwards main leaves logging as it found it)."""
    import subprocess
    import sys

    script = ("import logging, sys; import cirlab.cli as c; run = c._run_command\n"
              "def spy(args):\n"
              "    print(logging.getLogger('cirlab.data').isEnabledFor(logging.DEBUG), "
              "logging.getLogger('PIL.PngImagePlugin').isEnabledFor(logging.DEBUG))\n"
              "    return run(args)\n"
              "c._run_command = spy; sys.exit(c.main(['-v', 'models']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "True False"


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, synth, monkeypatch, caplog):
    """An --output or --topk-dir that cannot be written threw away a finished evaluation with a traceback;
    `cirlab notebooks`, `data synth --out` and cirlab's own cache likewise. One line each, before any work."""
    from cirlab.core import io as cio
    from cirlab.engine import runs

    cfg = _write_config(tmp_path / "stub.yaml", synth)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--output-dir", str(run), "--set", "train.max_steps=2"]) == 0
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(runs, "evaluate_split", never)
    cases = [(["eval", str(run), "--output", str(a_file / "m.json")], "cirlab eval --output: cannot write into"),
             (["eval", str(run), "--topk-dir", str(a_file / "topk")], "cirlab eval --topk-dir: cannot write into"),
             (["notebooks", str(a_file / "nbs")], "cirlab notebooks: cannot write into"),
             (["data", "synth", "--out", str(a_file / "synth"), "--size", "tiny"],
              "cirlab data synth: cannot write into")]
    for argv, message in cases:
        caplog.clear()
        assert main(argv) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and f"{a_file} is a file" in errors[0], (argv, errors)
    assert a_file.read_text() == "mine"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # mkdir would fail on it after the evaluation
    caplog.clear()
    assert main(["eval", str(run), "--topk-dir", str(tmp_path / "dangling")]) == 2
    assert "is a broken symbolic link" in caplog.text

    monkeypatch.setattr(cio.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(cio.UnwritableFolderError, match=r"cannot write into .*out \(.* is not writable\)"):
        cio.check_writable([tmp_path / "out"], command="cirlab eval --topk-dir")


def test_a_cache_that_cannot_be_created_names_cirlab_cache(tmp_path, monkeypatch, caplog):
    a_file = tmp_path / "home-is-a-file"
    a_file.write_text("")
    monkeypatch.setenv("CIRLAB_CACHE", str(a_file / "cache"))
    assert main(["train", "amc_synthetic_tiny", "--output-dir", str(tmp_path / "run")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot create the folder" in errors[0] and "set CIRLAB_CACHE" in errors[0]


def test_ctrl_c_twice_ends_training_at_once_without_a_traceback(tmp_path):
    """"send it again to stop at once": the second Ctrl-C raised KeyboardInterrupt wherever Python was, inside
    torch's C++ callbacks (an abort, exit 134) or its exit handlers ("Exception ignored ..."). It now ends the
    process as an unhandled Ctrl-C does; whatever was saved is whole (a second one during the stop keeps last.pt)."""
    import signal
    import subprocess
    import sys
    import time

    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cirlab", "train", "amc_synthetic_tiny",
                                 "--output-dir", str(run), "--set", "train.max_steps=null",
                                 "--set", "train.epochs=200"],
                                stdout=subprocess.DEVNULL, stderr=stderr,  # Ctrl-C as a terminal's job has it:
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and "train: step" not in err.read_text():
        assert proc.poll() is None, err.read_text()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    while time.time() < deadline and "SIGINT: training stopped" not in err.read_text() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # while the command winds up (importing less than a second on this machine)
    code = proc.wait(timeout=120)
    text = err.read_text()
    assert not any(s in text for s in ("Traceback", "terminate called", "Exception ignored")), text
    assert "SIGINT: training stopped" in text and (run / "checkpoints" / "last.pt").is_file()
    assert code in (-signal.SIGINT, 130), text  # ended by the second one (or done before it arrived)


def test_after_a_stop_the_command_ends_at_the_next_ctrl_c_and_the_python_api_gets_its_handler_back(monkeypatch):
    """The mechanism behind the test above, where timing cannot reach it. In the cirlab command, once a run was
    asked to stop, Ctrl-C ends the process (no KeyboardInterrupt inside torch's callbacks or exit handlers). Called
    from Python (a notebook kernel, a prompt, a script) the handler is put back and a second Ctrl-C raises
    KeyboardInterrupt: the cell stops, the session goes on."""
    import signal

    from cirlab.core import console
    from cirlab.engine.train import _StopSignals

    previous = signal.getsignal(signal.SIGINT)
    try:
        for before, command, after in ((signal.default_int_handler, True, signal.SIG_DFL),
                                       (signal.default_int_handler, False, signal.default_int_handler),
                                       (lambda *a: None, False, None)):
            monkeypatch.setattr(console, "_CONSOLE", command)
            signal.signal(signal.SIGINT, before)
            with _StopSignals() as stop:
                stop._handle(signal.SIGINT, None)  # the first Ctrl-C: stop after this step
                if not command:  # the second: the caller's KeyboardInterrupt
                    with pytest.raises(KeyboardInterrupt):
                        stop._handle(signal.SIGINT, None)
            assert signal.getsignal(signal.SIGINT) is (before if after is None else after)
            signal.signal(signal.SIGINT, before)
            with _StopSignals():  # no stop asked: the handler is put back as it was, in the command too
                pass
            assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_training_split_is_read_once_so_its_load_warnings_are_logged_once(tmp_path, caplog):
    from fixtures_data import write_cirr

    info = write_cirr(tmp_path / "cirr")
    path = info["root"] / "cirr" / "captions" / "cap.rc2.train.json"
    entries = json.loads(path.read_text())
    entries[0]["img_set"]["members"] = entries[0]["img_set"]["members"][:5]  # a train-only warning
    path.write_text(json.dumps(entries))
    config = {"model": "amc", "preset": "tiny", "dataset": {"name": "cirr", "root": str(info["root"])},
              "train": {"max_steps": 1, "batch_size": 2, "progress": "none", "tensorboard": False},
              "eval": {"splits": ["val"], "k": 5, "batch_size": 8}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    caplog.set_level("WARNING")
    run_experiment(load_config(tmp_path / "c.yaml"), output_dir=tmp_path / "run")
    warned = [r.getMessage() for r in caplog.records if "has 5 members" in r.getMessage()]
    assert len(warned) == 1, warned


def test_a_relative_root_is_recorded_absolute_so_eval_elsewhere_reads_the_same_data(tmp_path, monkeypatch, caplog,
                                                                                     capsys):
    from fixtures_data import write_fashioniq

    work, other = tmp_path / "work", tmp_path / "other"
    other.mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~/.." is tmp_path whoever runs the tests
    root = write_fashioniq(work / "data", categories=("dress",))["root"]
    _dress_config(work / "c.yaml", os.path.relpath(root, work), max_steps=1, selection_metric="avg")
    monkeypatch.chdir(work)
    assert main(["train", "c.yaml", "--output-dir", "~/../work/runs/r"]) == 0
    run = work / "runs" / "r"  # "~/..": expanded, not a folder named "~" here
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["dataset"]["root"] == str(root)
    assert stored["output_dir"] == str(Path.home() / ".." / "work" / "runs" / "r")
    trained = json.loads((run / "metrics.json").read_text())["splits"]["val"]
    capsys.readouterr()
    monkeypatch.chdir(other)  # no data/ here: the run still knows where its data is
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"] == pytest.approx(trained)
    # a run folder written as typed (earlier versions): read from here, and said so
    stored["dataset"]["root"] = "data/fashioniq"
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert f"gives a relative dataset.root 'data/fashioniq', read from this folder as {other}/data/fashioniq" in \
        caplog.text
    # the root came from the run's config.yaml, not from the user: said so, with --root (not CIRLAB_DATA)
    assert (f"it is the dataset.root recorded in {run / 'config.yaml'}, where the run was trained: "
            f"{other}/data/fashioniq") in caplog.text


def test_options_are_spelled_out_and_a_near_miss_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # was --output: a metrics FILE named evalres
        main(["eval", str(tmp_path), "--out", "evalres/"])
    assert exit_.value.code == 2 and not (tmp_path / "evalres").exists()
    err = capsys.readouterr().err
    assert "cirlab eval: error: unrecognized arguments: --out evalres/ (--out: did you mean --output?)" in err
    with pytest.raises(SystemExit):
        main(["train", "amc_synthetic_tiny", "--sett", "train.lr=1"])
    err = capsys.readouterr().err
    assert err.startswith("usage: cirlab train") and "(--sett: did you mean --set?)" in err
    with pytest.raises(SystemExit):
        main(["data", "check", "--dataset", "cirr", "--ro", "x"])
    assert "cirlab data check: error: unrecognized arguments: --ro x (--ro: did you mean --root?)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # the option it begins, not "--set", which looks as alike to difflib
        main(["train", "amc_synthetic_tiny", "--out", "runs/x"])
    assert "(--out: did you mean --output-dir?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # several options begin it: all of them, not a look-alike (--out)
        main(["report", "--no"])
    assert "(--no: did you mean --notebooks, --no-dime, --no-hrem or --no-cala?)" in capsys.readouterr().err
    # a quoted ~ is the home folder for every path option, as for an unquoted one
    args = build_parser(["eval"]).parse_args(["eval", "~/run", "--output", "~/m.json", "--topk-dir", "~/k",
                                              "--root", "~/data"])
    assert {args.target, args.output, args.topk_dir, args.root} == {str(Path.home() / n)
                                                                    for n in ("run", "m.json", "k", "data")}


def test_a_run_records_its_data_and_code_and_says_when_the_data_changed(tmp_path, caplog, capsys):
    from fixtures_data import write_fashioniq

    root = write_fashioniq(tmp_path / "data", categories=("dress",))["root"]
    _dress_config(tmp_path / "c.yaml", root, selection_metric="avg")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(run)]) == 0
    recorded = json.loads((run / "data_fingerprint.json").read_text())
    assert recorded["root"] == str(root) and "captions/cap.dress.val.json" in recorded["files"]
    assert json.loads((run / "provenance.json").read_text())["starts"][0]["from_step"] == 0
    capsys.readouterr()
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert "trained on other data" not in caplog.text
    # the data under the same path changes (regenerated, edited): eval says so, a resume refuses
    path = root / "captions" / "cap.dress.val.json"
    entries = json.loads(path.read_text())
    entries[0]["target"], entries[1]["target"] = entries[1]["target"], entries[0]["target"]
    path.write_text(json.dumps(entries))
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert (f"{run} was trained on other data than {root} holds now (captions/cap.dress.val.json changed): these "
            "results are not comparable with its metrics.json") in caplog.text
    caplog.clear()
    more = ["--output-dir", str(run), "--resume", "--set", "train.max_steps=3"]
    assert main(["train", str(tmp_path / "c.yaml"), *more]) == 2
    assert "--resume: the data changed since" in caplog.text and "captions/cap.dress.val.json changed" in caplog.text
    assert main(["train", str(tmp_path / "c.yaml"), *more, "--allow-config-change"]) == 0
    starts = json.loads((run / "provenance.json").read_text())["starts"]
    assert [s["from_step"] for s in starts] == [0, 2]
    assert starts[1]["data_changes"] == ["captions/cap.dress.val.json changed"]
    assert starts[1]["config_changes"] == ["train.max_steps: 2 -> 3"]
    # the run finished, and wrote metrics.json, on the data it was resumed on: that is what eval compares with now
    # (the old record warned on every later eval of numbers that were computed on this very data)
    caplog.clear()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert "trained on other data" not in caplog.text
    assert main(["train", str(tmp_path / "c.yaml"), *more[:-1], "train.max_steps=4"]) == 0  # no second refusal


def test_what_stops_the_final_evaluation_says_the_training_is_saved_and_resume_finishes(tmp_path, caplog, capsys):
    from fixtures_data import write_fashioniq

    root = write_fashioniq(tmp_path / "data", categories=("dress",))["root"]
    image = root / "images" / "dress_val_0.png"
    good = image.read_bytes()
    image.write_bytes(b"")  # found only when the val split's images are read: after training (selection=last)
    _dress_config(tmp_path / "c.yaml", root, selection="last")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(run)]) == 2
    assert (f"; the training is done and saved in {run / 'checkpoints'}; the same command with --resume (and without "
            "--overwrite) runs the final evaluation") in caplog.text
    assert not (run / "metrics.json").exists()
    image.write_bytes(good)
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(run), "--resume"]) == 0
    assert set(json.loads((run / "metrics.json").read_text())["splits"]) == {"val"}


def test_a_set_given_twice_or_replacing_a_whole_mapping_is_said(caplog):
    raw = {"model": "amc", "dataset": {"name": "fashioniq", "category": "dress", "root": "/d"}}
    with caplog.at_level(logging.WARNING):
        out = apply_overrides(raw, parse_set(["train.lr=1e-3", "train.lr=5e-3", "dataset={name: fashioniq}"]))
    assert out["train"]["lr"] == 5e-3 and out["dataset"] == {"name": "fashioniq"}
    assert "--set train.lr is given twice (0.001, then 0.005): the last one is used" in caplog.text
    assert ("--set dataset={...} replaces the whole mapping: category='dress', root='/d' from the config no longer "
            "apply (--set dataset.KEY=VALUE changes one entry)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one entry changed, or the same value twice: nothing to say
        apply_overrides(raw, parse_set(["dataset.category=shirt", "train.lr=1", "train.lr=1"]))
    assert caplog.text == ""


def test_eval_refuses_settings_it_would_not_read(tmp_path, synth, caplog):
    out = tmp_path / "run"
    assert main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), "--output-dir", str(out),
                 "--set", "train.max_steps=1"]) == 0
    for setting, says in (("train.lrr=1", "--set train.lrr: cirlab eval reads only the dataset and eval sections"),
                          ("model_overrides.embed_dim=32", "model_overrides apply with --model")):
        caplog.clear()
        assert main(["eval", str(out), "--set", setting, "--split", "val"]) == 2
        assert says in caplog.text
    caplog.clear()  # with --model, on a checkpoint that records its config: that config is what the weights fit
    assert main(["eval", str(out), "--model", "stub_cir", "--set", "model_overrides.embed_dim=32",
                 "--split", "val"]) == 2
    assert ("model_overrides.embed_dim=32 differs from the config the checkpoint records (embed_dim=12)"
            in caplog.text)
    assert main(["eval", str(out), "--model", "stub_cir", "--set", "model_overrides.embed_dim=12",
                 "--split", "val"]) == 0  # the value it records: nothing is lost
    assert main(["eval", str(out), "--model", "stub_cir", "--set", "model_overrides={embed_dim: 12}",
                 "--split", "val"]) == 0  # the whole mapping, spelt at once
    caplog.clear()
    assert main(["eval", str(out), "--model", "stub_cir", "--set", "model_overrides={embed_dim: 32}",
                 "--split", "val", "--ensemble", str(out)]) == 2
    assert "model_overrides.embed_dim=32 differs" in caplog.text
    from cirlab.engine.runs import model_from_checkpoint

    best = out / "checkpoints" / "best.pt"  # a run config's overrides (an ensemble member's) are not asked values
    assert model_from_checkpoint(best, overrides={"embed_dim": 8})[0].config.embed_dim == 12
    typo = yaml.safe_load((tmp_path / "stub.yaml").read_text())
    typo["train"]["max_step"] = 5
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    caplog.clear()
    assert main(["eval", str(out), "--config", str(tmp_path / "typo.yaml"), "--split", "val"]) == 2
    assert "unknown field 'max_step' (did you mean 'max_steps'?)" in caplog.text


def test_a_run_name_is_a_folder_name_not_a_path(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "amc_synthetic_tiny", "--set", "name=../escaped", "--set", "train.max_steps=1"]) == 2
    assert "name '../escaped': it becomes part of a file name" in caplog.text
    assert main(["train", "amc_synthetic_tiny", "--set", "name=.", "--set", "train.max_steps=1"]) == 2
    assert "name '.': it becomes part of a file name" in caplog.text  # was: the run written into runs/ itself
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_eval_says_what_is_wrong_with_the_flag_that_is_wrong(tmp_path, synth, caplog):
    out = tmp_path / "run"
    assert main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), "--output-dir", str(out),
                 "--set", "train.max_steps=1"]) == 0
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    cases = [(["eval", str(text)], f"checkpoint {text} (9 bytes) is a text file, not a checkpoint"),  # was: no dataset
             (["eval", str(out), "--preset", "fashioniq", "--split", "val"], "records its model (stub_cir) and the "
              "config it was built with: drop --preset"),  # was: built from the preset, then a state-dict dump
             (["eval", str(out), "--model", "stub_itm", "--split", "val"], "--model stub_itm: ")]  # was: --split
    for argv, says in cases:
        caplog.clear()
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0], errors
    caplog.clear()
    assert main(["train", str(tmp_path / "stub.yaml"), "--set", "train.lr=null"]) == 2
    assert caplog.text.rstrip().endswith("train.lr: expected a number, got null")


def test_the_data_fingerprint_covers_the_folder_the_loader_reads(tmp_path, monkeypatch):
    """A root holding several datasets (what `data synth --out` writes) and an empty root ($CIRLAB_DATA, every
    paper config) fingerprint the dataset's own folder: the first took every dataset's files, the second none."""
    from cirlab.data.generators import synthetic
    from cirlab.engine.runs import data_fingerprint, with_defaults

    synthetic.generate(tmp_path / "data", size="tiny", image_size=16, layouts=["fashioniq", "cirr", "precomp"])
    for root in (str(tmp_path / "data"), ""):
        monkeypatch.setenv("CIRLAB_DATA", str(tmp_path / "data"))
        cir = data_fingerprint(with_defaults({"model": "amc", "dataset": {"name": "fashioniq", "root": root}}))
        assert cir["root"] == str(tmp_path / "data" / "fashioniq") and "captions/cap.dress.val.json" in cir["files"]
        assert not any(name.startswith(("cirr", "precomp")) for name in cir["files"])
        itm = data_fingerprint(with_defaults({"model": "dime", "dataset": {"name": "f30k", "root": root}}))
        assert itm["root"] == str(tmp_path / "data" / "precomp" / "f30k_precomp")
        assert "train_caps.txt" in itm["files"] and len(itm["files"]) > 1


def test_split_names_a_config_leaves_out_are_the_datasets_own():
    from cirlab.engine.runs import protocol_of, with_defaults

    coco = with_defaults({"model": "dime", "dataset": {"name": "coco"}, "eval": {"splits": ["testall"]}})
    assert [coco["dataset"][k] for k in ("train_split", "val_split", "test_split")] == ["train", "dev", "testall"]
    assert protocol_of(coco, "testall") == "coco"  # was "full": one 5K matrix, no 1K folds
    cirr = with_defaults({"model": "amc", "dataset": {"name": "cirr", "test_split": "val"}})
    assert (cirr["dataset"]["val_split"], cirr["dataset"]["test_split"]) == ("val", "val")  # given names stay


def test_stage_one_paths_and_every_path_option_are_recorded_and_read_as_given(tmp_path, monkeypatch, caplog):
    import errno

    from cirlab.engine.runs import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = {"dataset": {"root": "data"}, "eval": {"stage1_topk": "runs/s1"},
              "model_overrides": {"stage1_checkpoint": "~/s1", "init_from": "stage1"}}
    out = with_absolute_paths(config)
    assert out["eval"]["stage1_topk"] == str(tmp_path / "runs" / "s1")
    assert out["dataset"]["root"] == str(tmp_path / "data")
    assert out["model_overrides"] == {"stage1_checkpoint": str(Path.home() / "s1"), "init_from": "stage1"}
    assert config["eval"]["stage1_topk"] == "runs/s1"  # the caller's dict is left as it was
    for argv, field in ((["train", "~/c.yaml"], "config"), (["eval", "r", "--config", "~/c.yaml"], "config"),
                        (["eval", "r", "--ensemble", "~/r2"], "ensemble"), (["notebooks", "~/nb"], "out")):
        value = getattr(build_parser(argv).parse_args(argv), field)
        assert str(Path.home()) in str(value), (argv, value)
    # a full disk anywhere no nearer handler names what was kept: one line, not a traceback
    import cirlab.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / ".cirlab.lock"))

    monkeypatch.setattr(cli, "_run_models", full)
    caplog.clear()
    assert main(["models"]) == 75  # a retry may succeed once there is space (was 2, as for a wrong config)
    assert "runs/.cirlab.lock: cannot write (No space left on device): free space or choose another" in caplog.text


def test_a_resume_compares_settings_not_how_an_earlier_version_wrote_them(tmp_path, monkeypatch):
    from cirlab.engine.runs import _as_recorded_now, with_absolute_paths, with_defaults

    monkeypatch.chdir(tmp_path)
    now = with_absolute_paths(with_defaults({"model": "dime", "dataset": {"name": "f30k", "root": "data"},
                                             "model_overrides": {"vse_mean_warmup_epochs": 1}}))
    old = {"model": "dime", "dataset": {**now["dataset"], "root": "data", "val_split": "val"},
           "model_overrides": {"max_violation_warmup_epochs": 1}}  # relative root, old split and field names
    seen = _as_recorded_now(old, now)
    assert seen["dataset"] == now["dataset"] and seen["model_overrides"] == now["model_overrides"]
    other = _as_recorded_now({**old, "dataset": {**old["dataset"], "val_split": "test"}}, now)
    assert other["dataset"]["val_split"] == "test"  # another split is still a difference


def test_eval_refuses_a_topk_dir_for_image_text_matching(tmp_path, caplog):
    run = tmp_path / "itm"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"not read: refused before the model loads")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "stub_itm", "dataset": {"name": "f30k"}}))
    assert main(["eval", str(run), "--topk-dir", str(tmp_path / "k")]) == 2  # was: exit 0, nothing written there
    assert "--topk-dir" in caplog.text and "f30k is image-text matching" in caplog.text
    assert not (tmp_path / "k").exists()


def test_notebooks_on_a_full_disk_name_the_copy_and_leave_no_half_file(tmp_path, monkeypatch, caplog):
    import errno
    import shutil

    real = shutil.copyfile

    def full(source, target):
        with open(target, "wb"):  # the copy started, then the disk was full
            pass
        raise OSError(errno.ENOSPC, "No space left on device", str(source))

    monkeypatch.setattr(shutil, "copyfile", full)
    assert main(["notebooks", str(tmp_path / "nb")]) == 75
    assert f"cannot write {tmp_path / 'nb'}" in caplog.text and "No space left on device" in caplog.text
    assert [p for p in (tmp_path / "nb").iterdir()] == []  # a retry is not refused over a 0-byte notebook
    monkeypatch.setattr(shutil, "copyfile", real)
    assert main(["notebooks", str(tmp_path / "nb")]) == 0


def test_an_itm_models_img_dim_follows_the_features_or_is_refused_before_training(tmp_path, caplog):
    """Own 512-d precomp features: the tiny preset's img_dim (64) was a 50-line traceback inside the first training
    step, and the shipped configs' img_dim 2048 too; the notebooks set it from the features, cirlab train did not."""
    from fixtures_data import precomp_run_config, write_precomp

    root = write_precomp(tmp_path / "data", regions=12, dim=512, n_images=8)["root"]
    precomp_run_config(tmp_path / "c.yaml", root, regions=12, dim=512, overrides={"warmup_iters": 1})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run")]) == 0
    assert "img_dim set to 512, the width of the region features" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model_config"]["img_dim"] == 512
    caplog.clear()
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "r2"),
                 "--set", "model_overrides.img_dim=2048"]) == 2
    assert (f"model_overrides.img_dim=2048, but {root / 'f30k_precomp' / 'train_ims.npy'} holds 512-d region "
            "features: set model_overrides.img_dim=512 (a config without it follows the features)") in caplog.text
    assert not (tmp_path / "r2" / "checkpoints").exists()
    # the trained run evaluated on features of another width: one line, before any scoring (was a traceback)
    other = write_precomp(tmp_path / "other", regions=12, dim=256, n_images=8)["root"]
    caplog.clear()
    assert main(["eval", str(tmp_path / "run"), "--root", str(other), "--set", "dataset.options.dim=256",
                 "--split", "dev"]) == 2
    assert (f"hrem reads 512-d region features (its img_dim), but {other / 'f30k_precomp' / 'dev_ims.npy'} holds "
            "256-d ones") in caplog.text


def test_an_empty_category_of_an_evaluation_split_is_named_before_training(tmp_path, caplog):
    """cap.dress.val.json = [] beside a shirt category with queries: the first evaluation blamed the model
    ("AMC.encode_query gave NoneType; the CIR contract's encoders give [batch, dim] tensors")."""
    from fixtures_data import write_fashioniq

    root = write_fashioniq(tmp_path / "data", categories=("dress", "shirt"))["root"]
    (root / "captions" / "cap.dress.val.json").write_text("[]")
    config = yaml.safe_load(_dress_config(tmp_path / "c.yaml", root, selection_metric="avg").read_text())
    config["dataset"]["category"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert ("dataset 'fashioniq': evaluation split 'val' has no queries in category dress (its caption file is "
            "empty or names no image of the split, or dataset.options.missing_images=drop left every query out); "
            "check the data with `cirlab data check`") in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()
    from cirlab.core.errors import InputError
    from cirlab.data import load_cir

    with pytest.raises(InputError, match=r"evaluate_cir: split 'val' \(category dress\) has no queries"):
        cirlab.evaluate_cir(cirlab.create_model("stub_cir", "tiny"),
                            load_cir("fashioniq", root, "val", category="dress"))


def test_the_final_metrics_are_those_of_best_pt_as_cirlab_eval_reads_it(tmp_path, synth, capsys):
    """The final evaluation scores the model train() leaves, which holds best.pt (loaded a second time before):
    with an EMA in either mode (the trainer-level case of an epoch end after an evaluated step is in test_train),
    metrics.json and `cirlab eval RUN` agree."""
    pnr = ["--set", "train.ema_decay=0.5", "--set", "train.ema_mode=paper_no_restore",
           "--set", "train.eval_every_steps=2"]
    for name, extra in (("ema", ["--set", "train.ema_decay=0.5"]), ("paper_no_restore", pnr)):
        out = tmp_path / name
        assert main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), "--output-dir", str(out),
                     "--set", "train.max_steps=6", "--set", "eval.splits=[val]", *extra]) == 0
        capsys.readouterr()
        assert main(["eval", str(out), "--split", "val", "--output", str(tmp_path / f"{name}.json")]) == 0
        again = json.loads((tmp_path / f"{name}.json").read_text())["splits"]["val"]
        assert json.loads((out / "metrics.json").read_text())["splits"]["val"] == pytest.approx(again, abs=1e-9)


def test_an_itm_split_the_selection_scored_with_best_pt_is_not_scored_again(tmp_path, caplog, capsys):
    from fixtures_data import precomp_run_config, write_precomp

    root = write_precomp(tmp_path / "data", dim=12, regions=4, n_images=8)["root"]
    precomp_run_config(tmp_path / "c.yaml", root, model="stub_itm", regions=4, dim=12, splits=("dev", "test"),
                       max_steps=4, eval_every_steps=2, ema_decay=0.5)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run")]) == 0
    assert "dev: " in caplog.text and "(as evaluated when best.pt was selected)" in caplog.text
    assert caplog.text.count("(as evaluated when best.pt was selected)") == 1  # test is scored: nobody had
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--output", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["splits"]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["splits"]
    assert set(final) == set(again) == {"dev", "test"}
    for split in final:
        assert final[split] == pytest.approx(again[split], abs=1e-9)
    # a resumed run scores again: the selecting evaluation may be an earlier process's, on data since changed
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run"), "--resume",
                     "--set", "train.max_steps=6"]) == 0
    assert "dev: " in caplog.text and "(as evaluated when best.pt was selected)" not in caplog.text


def test_a_model_read_on_another_protocol_than_its_papers_is_told(caplog):
    """cala_synthetic_tiny switched to Fashion-IQ read it with AMC's protocol (the loader's default) silently."""
    from cirlab.engine.runs import say_other_protocol

    config = {"model": "cala", "dataset": {"name": "fashioniq", "options": {}}}
    with caplog.at_level(logging.WARNING):
        assert say_other_protocol(config)
    assert ("cala's paper reads fashioniq with dataset.options protocol: clip4cir; this run reads it with "
            "protocol: amc: its numbers follow another protocol than the paper's") in caplog.text
    for model, options in (("cala", {"protocol": "cala"}), ("blip_rerank_stage1", {"protocol": "rerank"}),
                           ("amc", {}), ("cala", {"protocol": "clip4cir"})):
        assert not say_other_protocol({"model": model, "dataset": {"name": "fashioniq", "options": options}})
    assert say_other_protocol({"model": "amc", "dataset": {"name": "fashioniq", "options": {"protocol": "cala"}}})
    assert not say_other_protocol({"model": "cala", "dataset": {"name": "cirr", "options": {}}})


def test_a_set_value_whose_hash_yaml_would_eat_is_refused_with_the_quoting():
    """--set "dataset.root=/data/run #1": YAML read ' #1' as a comment and the run trained on /data/run without a
    word; a quoted value keeps its '#'."""
    import shlex

    from cirlab.engine.runs import parse_set

    with pytest.raises(ConfigError, match=r"""^--set 'dataset.root=/data/run #1': YAML reads the '#' and what """
                                          r"""follows as a comment, so the value would be '/data/run'; quote it to """
                                          r"""keep it whole \(--set "dataset.root='/data/run #1'"\), or drop the """
                                          r"""comment$"""):
        parse_set(["dataset.root=/data/run #1"])
    with pytest.raises(ConfigError, match="as a comment, so the value would be None"):
        parse_set(["dataset.category=#dress"])
    for raw in ("/data/run #1", "C:\\data #1", "/it's #1"):  # the suggested quoting keeps each value whole
        with pytest.raises(ConfigError) as refused:
            parse_set([f"dataset.root={raw}"])
        suggested = shlex.split(str(refused.value).split("(--set ", 1)[1].split("), or drop", 1)[0])[0]
        assert parse_set([suggested]) == [(["dataset", "root"], raw)]
    assert parse_set(['dataset.root="/data/run #1"', "dataset.root=/data/run#1"]) == [
        (["dataset", "root"], "/data/run #1"), (["dataset", "root"], "/data/run#1")]  # quoted; no space before it


def test_main_called_in_a_session_leaves_logging_as_it_found_it(tmp_path):
    """A notebook calling cirlab.cli.main got logging.basicConfig(INFO) for the rest of the session (every library's
    INFO lines), and with -v cirlab's DEBUG lines too."""
    import subprocess
    import sys

    script = """
import logging, sys
from cirlab.cli import main
root, own = logging.getLogger(), logging.getLogger("cirlab")
before = (list(root.handlers), root.level, own.level)
assert main(["-v", "models"]) == 0
assert (list(root.handlers), root.level, own.level) == before, (root.handlers, root.level, own.level)
print("kept")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("kept"), done.stderr[-2000:]


def test_exit_statuses_tell_a_retry_from_an_input_error(tmp_path, synth, monkeypatch, caplog):
    """A requeue wrapper could not tell "fix your config" from "try again later": a folder in use by another cirlab
    process and a full or over-quota disk ended with 2, as a wrong config does. They end with 75 (EX_TEMPFAIL)."""
    import errno

    import cirlab.cli as cli
    from cirlab.core.errors import ConfigError
    from cirlab.core.io import FolderLockedError, folder_lock
    from cirlab.engine.train import RunWriteError
    from lock_holder import held_by_another_thread

    run = tmp_path / "run"
    with held_by_another_thread(lambda: folder_lock(run)):  # another cirlab process trains into the folder
        caplog.clear()
        assert main(["train", str(_write_config(tmp_path / "c.yaml", synth)), "--output-dir", str(run)]) == 75
    assert "is in use by another cirlab process" in caplog.text

    def full(code: int) -> BaseException:
        try:
            raise OSError(code, os.strerror(code), str(tmp_path / "runs" / "last.pt"))
        except OSError as err:  # as the run reports it: the disk's error behind its own one-line error
            try:
                raise RunWriteError(f"cannot write to the run folder {tmp_path} ({err.strerror})") from err
            except RunWriteError as wrapped:
                return wrapped

    cases = [(FolderLockedError(f"{tmp_path} is in use by another cirlab process (pid 1)"), 75),
             (OSError(errno.ENOSPC, "No space left on device"), 75), (OSError(errno.EDQUOT, "Disk quota exceeded"), 75),
             (full(errno.ENOSPC), 75), (full(errno.EDQUOT), 75),
             (OSError(errno.EROFS, "Read-only file system"), 2), (full(errno.EROFS), 2),  # the folder stays read-only
             (ConfigError("train.lr: not a number"), 2)]
    for error, status in cases:
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(cli, "_run_models", fail)
        assert main(["models"]) == status, error


def test_processes_other_than_rank_0_log_only_warnings_marked_with_their_rank(monkeypatch, capsys):
    """Under torchrun every rank wrote every INFO line (eval at step ..., the SYNTHETIC warning twice, ...): with 8
    GPUs 8 times in the job log. Rank 0 logs as before; the others only warnings and errors, saying which rank."""
    from cirlab.cli import _command_logging

    root, say = logging.getLogger(), logging.getLogger("cirlab.engine.train")
    kept = list(root.handlers)
    root.handlers.clear()  # a fresh process, as torchrun starts: the command adds its own stderr handler
    try:
        for rank in ("0", "3"):
            monkeypatch.setenv("RANK", rank)
            with _command_logging(False):
                say.info("eval at step 5")
                say.warning("SIGTERM received")
            lines = capsys.readouterr().err.splitlines()
            if rank == "0":
                assert [line.split(" ", 2)[2] for line in lines] == [
                    "INFO cirlab.engine.train: eval at step 5", "WARNING cirlab.engine.train: SIGTERM received"]
            else:
                assert [line.split(" ", 2)[2] for line in lines] == [
                    "[rank 3] WARNING cirlab.engine.train: SIGTERM received"]
    finally:
        root.handlers[:] = kept


def test_resume_from_a_moved_copy_of_the_same_data_is_accepted_and_other_data_is_not(tmp_path, caplog):
    """A batch job copying its data to the node's scratch folder resumes from another dataset.root each time: that
    was refused as another setting (--allow-config-change, which also accepts real changes, was the only way)."""
    import shutil

    from fixtures_data import write_fashioniq

    first = write_fashioniq(tmp_path / "job1" / "fiq", categories=("dress",))["root"]
    run = tmp_path / "run"
    assert main(["train", str(_dress_config(tmp_path / "c.yaml", first, selection_metric="avg")), "--output-dir",
                 str(run)]) == 0
    second = tmp_path / "job2" / "fiq"
    shutil.copytree(first, second)
    shutil.rmtree(tmp_path / "job1")
    with caplog.at_level(logging.INFO):
        resumed = _dress_config(tmp_path / "c2.yaml", second, max_steps=3, selection_metric="avg")
        assert main(["train", str(resumed), "--output-dir", str(run), "--resume"]) == 0
    assert f"changed dataset.root: '{first}' -> '{second}'" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"]["root"] == str(second)
    # a copy that differs is other data: refused as before, naming the file
    other = tmp_path / "job3" / "fiq"
    shutil.copytree(second, other)
    split_file = next((other / "image_splits").glob("split.dress.train.json"))
    split_file.write_text(split_file.read_text().replace("]", ', "dress_train_x"]'))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        changed = _dress_config(tmp_path / "c3.yaml", other, max_steps=4, selection_metric="avg")
        assert main(["train", str(changed), "--output-dir", str(run), "--resume"]) == 2
    assert "split.dress.train.json changed" in caplog.text


def test_eval_checkpoint_names_without_pt_and_a_missing_one_lists_the_run_s(tmp_path, synth, caplog, capsys):
    """--checkpoint best (workbench.load_run's spelling) said "no checkpoints/best ... try last.pt" beside best.pt."""
    run = _trained_stub(tmp_path, synth)
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", "best", "--split", "val"]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--checkpoint", "best.pt", "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == by_name["splits"]
    assert main(["eval", str(run), "--checkpoint", "bset", "--split", "val"]) == 2
    assert "has no checkpoints/bset" in caplog.text
    assert "it has best.pt, last.pt: try --checkpoint best.pt" in caplog.text
    (run / "checkpoints" / "best.pt").unlink()  # stopped before its first evaluation
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert "has no checkpoints/best.pt (a run still training or stopped early?); it has last.pt: try --checkpoint " \
           "last.pt" in caplog.text


def test_eval_of_a_released_file_whose_bert_is_not_here_is_one_line(tmp_path, synth, caplog):
    """`cirlab eval model_best.pth --model hrem --preset f30k` offline ended in a traceback (exit 1): the model's BERT
    could not be read while rebuilding it, an OSError nobody turned into the one line training gives."""
    import torch
    from fixtures_data import write_precomp

    write_precomp(tmp_path / "data", splits=("test",))
    released = tmp_path / "model_best.pth"
    torch.save({"model": {}}, released)
    code = main(["eval", str(released), "--model", "hrem", "--preset", "tiny", "--dataset", "f30k", "--root",
                 str(tmp_path / "data"), "--split", "test", "--set", f"model_overrides.bert={tmp_path / 'no_bert'}"])
    assert code == 2
    assert f"model 'hrem' (model_overrides): HREM: BERT directory {tmp_path / 'no_bert'}" in caplog.text


@pytest.mark.parametrize("given, said", [
    # the original training scripts' flags: the --set entry, with the value typed
    (["--batch_size", "32"], "--batch_size: settings are config entries here: --set train.batch_size=32"),
    (["--lr", "1e-4"], "--lr: settings are config entries here: --set train.lr=1e-4"),  # was "did you mean --help?"
    (["--num_epochs=5"], "--num_epochs: settings are config entries here: --set train.epochs=5"),
    (["--margin", "0.2"], "--set model_overrides.margin=0.2 (dime, hrem)"),
    (["--K-value", "50"], "--set model_overrides.rerank_k=50 (blip_rerank_stage1, blip_rerank_stage2)"),
    (["--outptu-dir", "x"], "--outptu-dir: did you mean --output-dir?"),  # a slip of an option is still one
    (["--lr_schedules", "15", "25"], "--set train.lr_milestones=[15,25]"),  # the original's nargs="+": a list
])
def test_an_original_script_s_flag_names_the_config_entry(tmp_path, synth, capsys, given, said):
    with pytest.raises(SystemExit) as err:
        main(["train", str(_write_config(tmp_path / "stub.yaml", synth)), *given])
    assert err.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("entry, said", [
    # the original names whose spelling is another field's: val_step was "did you mean 'max_steps'?", which stops
    # training; log_step "did you mean 'lr_step_size'?", which decays the learning rate
    ("train.val_step=10", "'val_step' (the original code's --val_step; here: eval_every_steps)"),
    ("train.log_step=10", "'log_step' (the original code's --log_step; here: log_every)"),
    ("train.learning_rate=2e-4", "'learning_rate' (the original code's --learning_rate; here: lr)"),
    ("train.margin=0.2", "'margin' (not a field here: the model_overrides.margin setting)"),
    ("model_overrides.trade_off=0.5", "'trade_off' (the original code's --trade_off; here: path_weight)"),
    ("model_overrides.lr=1e-4", "'lr' (not a field here: the train.lr setting)"),
    ("eval.K_value=50", "'K_value' (the original code's --K_value; here: model_overrides.rerank_k"),
])
def test_an_original_name_in_set_says_where_the_setting_is(tmp_path, caplog, entry, said):
    config = Path(__file__).resolve().parents[1] / "configs" / "dime_synthetic_tiny.yaml"
    assert main(["train", str(config), "--set", entry, "--output-dir", str(tmp_path / "run")]) == 2
    assert said in caplog.text and "known: ORIGINAL_NAMES" not in caplog.text
    assert not (tmp_path / "run").exists()


def test_eval_k_on_a_stage_two_re_ranker_is_said_to_be_unread(tmp_path, caplog):
    """validate_stage2.py's --k is the candidates re-ranked, which cirlab names model_overrides.rerank_k: eval.k=5
    on a stage II re-ranked its 50 without a word."""
    from cirlab.engine import runs

    config = Path(__file__).resolve().parents[1] / "configs" / "blip_rerank_cirr_stage2.yaml"
    runs._SAID_UNREAD_K.clear()
    main(["train", str(config), "--set", "preset=tiny", "--set", "eval.k=7", "--output-dir", str(tmp_path / "r")])
    said = [r for r in caplog.records if "eval.k=7 is not read by blip_rerank_stage2" in r.getMessage()]
    assert len(said) == 1 and "model_overrides.rerank_k" in said[0].getMessage()
    caplog.clear()
    main(["train", str(config), "--set", "preset=tiny", "--set", "eval.k=50", "--output-dir", str(tmp_path / "r")])
    assert "is not read by" not in caplog.text  # the default says nothing


@pytest.mark.parametrize("columns", ["1", "2"])
def test_a_terminal_narrower_than_three_columns_does_not_break_every_command(monkeypatch, capsys, columns):
    """COLUMNS=1 or 2 (a bogus CI export, a sliver of a split pane) made every command a ValueError traceback: the
    cache command's description was wrapped to width 0 when the parser was built."""
    monkeypatch.setenv("COLUMNS", columns)
    assert main(["models"]) == 0 and "hrem" in capsys.readouterr().out


def test_resume_and_refusal_messages_say_what_the_folder_holds(tmp_path, synth, caplog, monkeypatch):
    """--resume with another model's config was refused as "the data changed" and pointed at
    --allow-config-change, which then failed at the checkpoint; a second run into a folder did not say whether
    the run there had finished; Ctrl-C of an --overwrite run said "the same command plus --resume", which is refused
    (--resume contradicts --overwrite)."""
    from cirlab.engine import runs
    from cirlab.engine.train import TrainingInterrupted

    config = _write_config(tmp_path / "stub.yaml", synth, max_steps=2, epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    other = yaml.safe_load(config.read_text())
    other.update(model="amc", preset="tiny", model_overrides={})
    (tmp_path / "amc.yaml").write_text(yaml.safe_dump(other))
    caplog.clear()
    assert main(["train", str(tmp_path / "amc.yaml"), "--output-dir", str(run), "--resume"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"--resume: {run} holds a stub_cir run; this config trains amc" in error and "allow-config" not in error
    caplog.clear()
    assert main(["train", str(config), "--output-dir", str(run)]) == 2
    assert "already holds a finished run (" in caplog.text

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGINT: training stopped in epoch 1, step 1; saved x/last.pt. Resume with the "
                                  "same command plus --resume (Python: resume='auto')", 2)
    monkeypatch.setattr(runs, "run_experiment", interrupted)
    caplog.clear()
    assert main(["train", str(config), "--output-dir", str(run), "--overwrite"]) == 130
    assert "the same command plus --resume, without --overwrite" in caplog.text
    caplog.clear()
    assert main(["train", str(config), "--output-dir", str(run)]) == 130
    assert "plus --resume (Python" in caplog.text and "without --overwrite" not in caplog.text


def test_an_unknown_option_without_a_command_and_a_file_given_as_runs_folder_are_named(tmp_path, capsys, caplog):
    """`cirlab --nosuch` said a command was required; `cirlab runs FILE` said "runs folder not found" of a file
    that is there."""
    with pytest.raises(SystemExit) as stop:
        main(["--verbos"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --verbos (--verbos: did you mean --verbose?)" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["runs", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file, not a folder of runs" in caplog.text


def test_verbose_says_what_a_run_resolved_and_read(tmp_path, synth, caplog):
    """`cirlab -v train` / `-v eval` added no line: -v promised debug output and gave none on the main commands."""
    config = _write_config(tmp_path / "stub.yaml", synth, max_steps=1, epochs=1)
    with caplog.at_level(logging.DEBUG, logger="cirlab"):
        assert main(["-v", "train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
        assert main(["-v", "eval", str(tmp_path / "run"), "--split", "val"]) == 0
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("resolved train settings: {'epochs': 1, 'max_steps': 1") for m in debug)
    assert any(m.startswith("split val of fashioniq from ") for m in debug)
    assert any("best.pt: model stub_cir in cirlab's layout, config " in m for m in debug)
