"""Exact resume: a run killed mid-epoch and resumed logs the same per-step losses as an uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch

import cirlab
from cirlab.engine.train import TrainConfig, train
from stub_models import TripletItems


class Killed(RuntimeError):
    pass


def _cfg(**kw) -> TrainConfig:
    # dropout + noise augmentation + shuffling + EMA + step schedule: every RNG stream and state matters
    base = dict(epochs=3, batch_size=4, lr=2e-2, log_every=1, tensorboard=False, progress="none",
                schedule="step", lr_milestones=[1, 2], lr_gamma=0.5, ema_decay=0.9, grad_clip=1.0,
                selection="last", checkpoint_every=2, weight_decay=1e-4, optimizer="adamw")
    return TrainConfig(**{**base, **kw})


def _model():
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset="tiny_dropout")


def _losses(log_path) -> dict[int, float]:
    out = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            out[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint
    return out


def _kill_at(step: int):
    def callback(record):
        if record["step"] == step:
            raise Killed(f"killed at step {step}")
    return callback


@pytest.mark.parametrize("accum, kill_step, every", [(1, 7, 2), (2, 4, 3)])
def test_killed_mid_epoch_then_resumed_matches_uninterrupted(tmp_path, accum, kill_step, every):
    data = TripletItems(22)  # 22 items, batch 4: 5 micro-batches per epoch (the last 2 items dropped)
    ref_model = _model()
    cfg = dict(grad_accum_steps=accum, checkpoint_every=every)
    reference = train(ref_model, data, _cfg(**cfg), output_dir=tmp_path / "ref")

    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(_model(), data, _cfg(**cfg), output_dir=run, callbacks=[_kill_at(kill_step)])
    # the last checkpoint before the kill lies in the middle of epoch 1 (5 micro-batches per epoch)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == kill_step - 1
    assert ckpt["progress"]["epoch"] == 1 and 0 < ckpt["progress"]["batch_in_epoch"] < 4
    resumed_model = _model()
    resumed = train(resumed_model, data, _cfg(**cfg, resume="auto"), output_dir=run)

    assert reference["steps"] == resumed["steps"]
    ref_losses = reference["losses"]
    assert resumed["losses"] == ref_losses[kill_step - 1:]  # exact, step by step after the checkpoint
    assert _losses(run / "log.jsonl") == _losses(tmp_path / "ref" / "log.jsonl")
    for key, value in ref_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_max_steps_then_resume_equals_one_run(tmp_path):
    data = TripletItems(20)
    reference = train(_model(), data, _cfg(max_steps=12, checkpoint_every=0), output_dir=tmp_path / "ref")
    first = train(_model(), data, _cfg(max_steps=7, checkpoint_every=0), output_dir=tmp_path / "run")
    second = train(_model(), data, _cfg(max_steps=12, checkpoint_every=0, resume="auto"), output_dir=tmp_path / "run")
    assert first["losses"] + second["losses"] == reference["losses"]


def test_failed_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_model(), TripletItems(12), _cfg(epochs=1), output_dir=run)
    last = run / "checkpoints" / "last.pt"
    good = last.read_bytes()

    def exploding_save(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        train(_model(), TripletItems(12), _cfg(epochs=2, resume="auto"), output_dir=run)
    assert last.read_bytes() == good  # untouched, and no temp file left behind
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


def test_resume_from_non_checkpoint_is_clear(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"model": _model().state_dict()}, bad)
    with pytest.raises(Exception, match="not a resumable cirlab checkpoint"):
        train(_model(), TripletItems(12), _cfg(epochs=1, resume=str(bad)), output_dir=tmp_path / "r")


def test_resume_with_an_unreadable_stored_config_is_one_line_naming_it(tmp_path):
    from cirlab.core.errors import ConfigError
    from cirlab.engine.runs import check_resume_config, read_run_config

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("train: [1\n")
    with pytest.raises(ConfigError, match=r"^--resume: .*config.yaml: not valid YAML \(.*\)$"):
        check_resume_config(tmp_path, {"train": {}})
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"^--resume: .*config.yaml: expected a mapping of sections, got list$"):
        check_resume_config(tmp_path, {"train": {}})
    (tmp_path / "config.yaml").unlink()
    assert read_run_config(tmp_path) == {}


def test_a_resumed_run_logs_each_evaluation_once_and_keeps_the_earlier_ones_in_its_summary(tmp_path, monkeypatch):
    """kill -9 while writing the last.pt that follows an epoch-end evaluation: the last.pt on disk is the one
    written before it (checkpoint_every), so the resumed run evaluates again; its record was kept and logged twice.
    And the summary of a resumed run listed only the evaluations after the resume."""
    from cirlab.engine.train import Trainer

    data = TripletItems(22)  # 5 optimizer steps per epoch at batch 4
    evaluate = lambda model: {"val": {"avg": float(sum(p.sum() for p in model.parameters()))}}  # noqa: E731
    cfg = dict(checkpoint_every=5, selection="val", selection_metric="avg", ema_decay=None)
    real_save = Trainer.save

    def save(self, name):
        if name == "last.pt" and self.progress.epoch == 1 and self.progress.step == 5:  # after the step-5 eval
            raise Killed("killed while writing last.pt")
        real_save(self, name)

    monkeypatch.setattr(Trainer, "save", save)
    with pytest.raises(Killed):
        train(_model(), data, _cfg(**cfg), output_dir=tmp_path / "run", evaluate_fn=evaluate)
    monkeypatch.setattr(Trainer, "save", real_save)
    summary = train(_model(), data, _cfg(resume="auto", **cfg), output_dir=tmp_path / "run", evaluate_fn=evaluate)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [5, 10, 15]
    assert [r["step"] for r in summary["eval_history"]] == [5, 10, 15]
    written = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [r["step"] for r in written["eval_history"]] == [5, 10, 15]
    starts = json.loads((tmp_path / "run" / "provenance.json").read_text())["starts"]
    assert [s["from_step"] for s in starts] == [0, 5] and starts[0]["torch"] == torch.__version__
    assert starts[0]["device"] == "cpu" and starts[0]["precision"] == "float32" and starts[0]["cirlab"]


def test_a_resume_says_when_it_trains_nothing_and_when_a_max_steps_stop_stays_a_best_candidate(tmp_path, caplog):
    """A resume of a finished run said "resumed in epoch 4" of a 3-epoch run and nothing else; an extended max_steps
    stop kept that stop's evaluation as best.pt, which a straight run never made, without a word."""
    import logging

    data = TripletItems(20)  # 5 steps an epoch
    scores = iter([90.0, 10.0, 20.0, 30.0, 40.0, 50.0])  # the first evaluation wins
    evaluate = lambda m: {"val": {"R@1": next(scores)}}  # noqa: E731
    cfg = dict(selection="val", selection_metric="R@1", checkpoint_every=0)
    train(_model(), data, _cfg(max_steps=7, **cfg), output_dir=tmp_path / "run", evaluate_fn=evaluate)
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):
        done = train(_model(), data, _cfg(max_steps=12, resume="auto", **cfg), output_dir=tmp_path / "run",
                     evaluate_fn=evaluate)
    said = [r.getMessage() for r in caplog.records]
    # epoch 1 ended at step 5 (score 90), the max_steps stop evaluated step 7 (10): best is step 5, nothing to say
    assert done["best_step"] == 5 and not any("made because the run stopped there" in m for m in said)

    scores = iter([10.0, 90.0, 20.0, 30.0])  # now the max_steps stop's evaluation (step 7) wins
    evaluate = lambda m: {"val": {"R@1": next(scores)}}  # noqa: E731
    train(_model(), data, _cfg(max_steps=7, **cfg), output_dir=tmp_path / "run2", evaluate_fn=evaluate)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):
        done = train(_model(), data, _cfg(max_steps=12, resume="auto", **cfg), output_dir=tmp_path / "run2",
                     evaluate_fn=evaluate)
    assert done["best_step"] == 7
    assert any("best.pt so far is the evaluation at step 7, made because the run stopped there" in r.getMessage()
               for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):  # finished: 12 steps of 12
        train(_model(), data, _cfg(max_steps=12, resume="auto", **cfg), output_dir=tmp_path / "run2",
              evaluate_fn=lambda m: {"val": {"R@1": 0.0}})
    assert any("had already trained its 12 steps: nothing is left to train" in r.getMessage()
               for r in caplog.records)


def test_a_setting_changed_on_resume_is_the_one_the_optimizer_uses(tmp_path):
    """--resume --allow-config-change --set train.lr=... (or weight_decay) trained on at the checkpoint's rate, the
    optimizer's saved groups winning, while log.jsonl, TensorBoard and config.yaml recorded the new value."""
    data = TripletItems(20)
    for name in ("same", "lower"):
        train(_model(), data, _cfg(max_steps=4, checkpoint_every=0), output_dir=tmp_path / name)
    same = train(_model(), data, _cfg(max_steps=8, checkpoint_every=0, resume="auto"), output_dir=tmp_path / "same")
    lower = train(_model(), data, _cfg(max_steps=8, checkpoint_every=0, resume="auto", lr=1e-9, weight_decay=0.5),
                  output_dir=tmp_path / "lower")
    assert lower["losses"][0] == same["losses"][0]  # the first resumed step: the same weights and batch
    assert lower["losses"][1:] != same["losses"][1:]  # then the new rate: it did not (before) differ at all
    groups = torch.load(tmp_path / "lower" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["base_lr"] for g in groups} == {1e-9} and {g["weight_decay"] for g in groups} == {0.5}


def test_tensorboard_drops_the_points_past_the_checkpoint_a_resume_continues_from(tmp_path):
    """A stop at once (kill -9, a second Ctrl-C) left TensorBoard points past last.pt; the resumed run wrote those
    steps again, and TensorBoard drew each twice, its line jumping back (log.jsonl was cut back, tb/ was not)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, run = TripletItems(22), tmp_path / "run"
    with pytest.raises(Killed):  # last.pt at step 4, points up to step 6
        train(_model(), data, _cfg(checkpoint_every=4, tensorboard=True), output_dir=run, callbacks=[_kill_at(6)])
    train(_model(), data, _cfg(checkpoint_every=4, tensorboard=True, resume="auto"), output_dir=run)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 15  # once each, in order (it was 1..6, 5, 6, 7, ...)


def test_an_evaluation_record_names_its_metric_and_reads_the_same_before_and_after_a_resume(tmp_path):
    """TensorBoard's eval/selection_score was AMC's avg, DIME's rsum and CaLa's sum of seven recalls on one chart;
    train_summary.json's eval_history carried log.jsonl's "time" only after a resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = TripletItems(20)
    evaluate = lambda m: {"val": {"R@1": 10.0, "R@5": 20.0}}  # noqa: E731
    cfg = dict(selection="val", selection_metric="R@1+R@5", checkpoint_every=0, tensorboard=True)
    fresh = train(_model(), data, _cfg(max_steps=6, **cfg), output_dir=tmp_path / "run", evaluate_fn=evaluate)
    resumed = train(_model(), data, _cfg(max_steps=12, resume="auto", **cfg), output_dir=tmp_path / "run",
                    evaluate_fn=evaluate)
    for history in (fresh["eval_history"], resumed["eval_history"]):
        assert all(set(r) >= {"time", "selection_metric", "selection_score"} for r in history)
    assert resumed["eval_history"][:len(fresh["eval_history"])] == fresh["eval_history"]  # one schema throughout
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert "eval/selection/R@1+R@5" in events.Tags()["scalars"] and "eval/selection_score" not in events.Tags()[
        "scalars"]
