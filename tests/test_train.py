"""The training loop: learning signal, schedules, EMA modes, accumulation, selection, run folder."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import cirlab
from cirlab.core.errors import ConfigError
from cirlab.engine.train import (EMA, ResumableSampler, TrainConfig, group_ids, learning_rate, resolve_train_config,
                          schedule_factor, train)
from stub_models import TripletItems  # registers stub_cir / stub_itm


def _model(preset: str = "tiny", **overrides):
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset=preset, **overrides)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-2, log_every=1, tensorboard=False, progress="none",
                selection_metric="R@1")
    return TrainConfig(**{**base, **kw})


def _read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_decreases_and_run_folder(tmp_path):
    model = _model()
    out = tmp_path / "run"
    result = train(model, TripletItems(32), _cfg(epochs=6, lr=3e-2, tensorboard=True), output_dir=out)
    assert result["steps"] == 6 * 4 and result["epochs"] == 6
    first, last = sum(result["losses"][:4]) / 4, sum(result["losses"][-4:]) / 4
    assert last < 0.75 * first, (first, last)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert (out / "checkpoints" / "best.pt").is_file()  # selection "val" without evaluate_fn -> final weights
    records = [r for r in _read_log(out / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 25))
    # the trainer sums *_loss terms and logs every term
    for r in records:
        assert r["loss"] == pytest.approx(r["rank_loss"] + r["aux_loss"], rel=1e-5)
        assert "pos_sim" in r
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())
    assert model.epochs_started == list(range(6))


def test_model_defaults_merge_under_overrides():
    cfg = resolve_train_config(_model(), {"lr": 0.5})
    assert cfg.lr == 0.5 and cfg.epochs == 2 and cfg.batch_size == 8 and cfg.selection_metric == "R@1"
    with pytest.raises(TypeError, match="unknown field"):
        resolve_train_config(_model(), {"learning_rate": 1})
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_a_train_config_object_keeps_the_model_defaults_it_does_not_set(tmp_path):
    """TrainConfig(lr=...) used to replace the model's whole paper recipe with the class defaults (batch 32, one
    epoch, no selection metric) while the dict {"lr": ...} merged over it: the README passes the object."""
    assert TrainConfig(3, tensorboard=False).given() == {"epochs": 3, "tensorboard": False}  # positional: epochs
    as_object = train(_model(), TripletItems(32), TrainConfig(lr=5e-3, epochs=1, tensorboard=False, progress="none"),
                      output_dir=tmp_path / "object")
    as_dict = train(_model(), TripletItems(32), {"lr": 5e-3, "epochs": 1, "tensorboard": False, "progress": "none"},
                    output_dir=tmp_path / "dict")
    assert as_object["steps"] == as_dict["steps"] == 32 // 8  # the model's batch size of 8 in both
    assert as_object["losses"] == as_dict["losses"]
    with pytest.raises(TypeError, match=r"TrainConfig: unknown field 'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig(epoch=2)  # was the dataclass's "unexpected keyword argument", no suggestion
    cfg = TrainConfig(lr=1e-3)
    cfg.batch_size = 4  # set after construction: the caller's too
    assert cfg.given() == {"lr": 1e-3, "batch_size": 4}
    assert resolve_train_config(_model(), cfg.given()).selection_metric == "R@1"  # the model's, kept


def test_a_hand_written_config_yaml_in_the_run_folder_is_never_replaced(tmp_path):
    """Any config.yaml counted as a run: --overwrite deleted the user's own experiment file, comments and all."""
    from cirlab.engine.train import RunFolderError, run_artifacts

    out = tmp_path / "exp"
    out.mkdir()
    mine = "# my settings\ntrain: {lr: 0.001}\n"
    (out / "config.yaml").write_text(mine)
    (out / "notes.txt").write_text("keep")
    assert run_artifacts(out) == []  # not a run
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=r"exp/config.yaml is not a config a cirlab run wrote"):
            train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=out, overwrite=overwrite)
        assert (out / "config.yaml").read_text() == mine and sorted(p.name for p in out.iterdir()) == [
            "config.yaml", "notes.txt"]
    run = tmp_path / "run"
    train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=run)
    assert "config.yaml" in run_artifacts(run)  # the run's own: --overwrite replaces it
    train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=run, overwrite=True)


def test_wrong_inputs_are_refused_before_the_folder_and_a_failed_start_leaves_no_run(tmp_path):
    """fit(model, split) failed in the first step and left config.yaml and tb/: the corrected call was then refused
    as "already holds a run"; a model name or a config file's path failed as AttributeError / TypeError."""
    from cirlab.core.errors import CirlabError

    class Split:  # a CIRSplit's shape: not the training items themselves
        def triplet_dataset(self, transform):
            return TripletItems(16)

    out = tmp_path / "run"
    for call, message in (
            (lambda: train(_model(), Split(), _cfg(), output_dir=out),
             r"needs a dataset of training items .* got a Split; a CIR split gives its training items with "
             r"split.triplet_dataset"),
            (lambda: train("amc", TripletItems(16), _cfg(), output_dir=out), r"needs a model .* got 'amc'"),
            (lambda: train(_model(), TripletItems(16), "configs/amc.yaml", output_dir=out),
             r"cfg is a TrainConfig or a dict .* cirlab.run_experiment\(cirlab.load_config\(path\)\)")):
        with pytest.raises(CirlabError, match=message):
            call()
        assert not out.exists()

    class Broken(TripletItems):
        def __getitem__(self, i):
            raise RuntimeError("a broken image file")

    with pytest.raises(RuntimeError, match="a broken image file"):
        train(_model(), Broken(16), _cfg(epochs=1, tensorboard=True), output_dir=out)
    assert sorted(p.name for p in out.iterdir()) == []  # no config.yaml, log or tb/ of a run that never stepped
    assert train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=out)["steps"] == 2  # no --overwrite needed


def test_step_schedules_match_paper_formulas():
    amc = TrainConfig(lr=1e-4, schedule="step", lr_milestones=[40], epochs=50)
    assert [learning_rate(amc, 1e-4, e, 0) for e in (0, 39, 40, 49)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    dime = TrainConfig(lr=2e-4, schedule="step", lr_step_size=15, epochs=30)
    for e in range(30):  # lr = 2e-4 * 0.1 ** (epoch // 15)
        assert learning_rate(dime, 2e-4, e, 0) == pytest.approx(2e-4 * 0.1 ** (e // 15))


def test_cosine_clamped_and_periodic():
    cos = TrainConfig(schedule="cosine", cosine_epochs=10, epochs=40, min_lr=0.0)
    per = TrainConfig(schedule="periodic_cosine", cosine_epochs=10, epochs=40, min_lr=0.0)
    ref = lambda e: 2e-5 * 0.5 * (1 + math.cos(math.pi * e / 10))  # the re-ranker's unclamped formula
    for e in range(40):
        assert learning_rate(per, 2e-5, e, 0) == pytest.approx(ref(e), abs=1e-15)
        assert learning_rate(cos, 2e-5, e, 0) == pytest.approx(ref(min(e, 10)), abs=1e-15)
    assert learning_rate(per, 2e-5, 20, 0) == pytest.approx(2e-5)  # back up at epoch 20
    assert learning_rate(per, 2e-5, 30, 0) == pytest.approx(0.0, abs=1e-20)
    warm = TrainConfig(schedule="constant", warmup_steps=4)
    assert [learning_rate(warm, 1.0, 0, s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert schedule_factor(TrainConfig(), 7) == 1.0


def test_lr_applied_per_epoch_in_loop(tmp_path):
    cfg = _cfg(epochs=3, schedule="step", lr_milestones=[1, 2], lr_gamma=0.5)
    train(_model(), TripletItems(16), cfg, output_dir=tmp_path)
    lrs = {r["epoch"]: r["lr"] for r in _read_log(tmp_path / "log.jsonl") if r["kind"] == "train"}
    assert lrs == pytest.approx({0: 1e-2, 1: 5e-3, 2: 2.5e-3})


def test_grad_accumulation_equals_big_batch(tmp_path):
    # per-sample loss: 2 micro-batches of 4 accumulate to the gradient of one batch of 8
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        model = _model(loss="cosine")
        train(model, TripletItems(16), _cfg(epochs=1, batch_size=bs, grad_accum_steps=accum, shuffle=False,
                                            grad_clip=0.5), output_dir=tmp_path / f"r{bs}")
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6)


def test_ema_standard_restores_and_paper_mode_replaces(tmp_path):
    seen = {}

    def evaluate(model):
        seen["weights"] = model.image.weight.detach().clone()
        return {"val": {"R@1": 1.0}}

    model = _model()
    train(model, TripletItems(16), _cfg(epochs=1, ema_decay=0.9), output_dir=tmp_path / "std", evaluate_fn=evaluate)
    live = torch.load(tmp_path / "std" / "checkpoints" / "last.pt", weights_only=True)["model"]["image.weight"]
    assert not torch.allclose(seen["weights"], live)  # evaluated on EMA weights, not the live ones (kept for resume)
    best = torch.load(tmp_path / "std" / "checkpoints" / "best.pt", weights_only=True)["model"]
    torch.testing.assert_close(best["image.weight"], seen["weights"])  # best.pt holds what was evaluated
    torch.testing.assert_close(model.image.weight, seen["weights"])  # and so does the model the caller holds

    model = _model()
    train(model, TripletItems(16), _cfg(epochs=1, ema_decay=0.9, ema_mode="paper_no_restore"),
          output_dir=tmp_path / "paper", evaluate_fn=evaluate)
    torch.testing.assert_close(model.image.weight, seen["weights"])  # AMC quirk: live weights ARE the EMA


def test_fit_without_evaluation_leaves_the_saved_model_in_hand_and_claims_no_selection(tmp_path):
    """README's API example: `cirlab.fit` then `evaluate_cir(model)` printed the live weights' recall (45.0) while
    best.pt, what `cirlab eval` loads, held the EMA's (13.75); and train_summary named "rsum" as the selection
    metric of a run that selected nothing."""
    model = _model()
    summary = train(model, TripletItems(16), _cfg(epochs=2, ema_decay=0.9), output_dir=tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0)
    stored = json.loads((tmp_path / "train_summary.json").read_text())
    for record in (summary, stored):
        assert (record["selection"], record["selection_split"], record["selection_metric"]) == ("last", None, None)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_fit_leaves_the_selected_checkpoint_in_hand(tmp_path, ema):
    """With evaluation, the checkpoint selection kept (here the first epoch's) is what the model holds afterwards,
    not the last epoch's weights (live or averaged)."""
    scores = iter([5.0, 1.0, 0.5])
    model = _model()
    summary = train(model, TripletItems(16), _cfg(epochs=3, ema_decay=ema), output_dir=tmp_path,
                    evaluate_fn=lambda m: {"val": {"R@1": next(scores)}})
    assert summary["best_epoch"] == 1
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(best["image.weight"], last["image.weight"])  # the selection mattered
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0)


def test_ema_reseed_after_paper_apply():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.5, "paper_no_restore")
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], 0.5 * w0 + 2.0)  # shadow = d * shadow + (1 - d) * param
    ema.apply_permanently(model)
    with torch.no_grad():
        model.weight.fill_(10.0)  # an optimizer step
    ema.update(model)  # as in the original (aliased param.data): the EMA restarts at the live weights
    assert torch.allclose(ema.shadow["weight"], torch.full_like(model.weight, 10.0))
    ema.update(model)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full_like(model.weight, 5.0))


def test_selection_on_named_split_and_paper_mode(tmp_path, caplog):
    scores = iter([{"val": {"R@1": 5.0}, "test": {"R@1": 1.0}}, {"val": {"R@1": 3.0}, "test": {"R@1": 9.0}}])
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):
        result = train(_model(), TripletItems(16), _cfg(epochs=2, selection_metric="R@1"),
                       output_dir=tmp_path / "v", evaluate_fn=lambda m: next(scores))
    # best_epoch counted from 1, as the log lines below count epochs
    assert result["best_epoch"] == 1 and result["best_score"] == 5.0 and result["selection_split"] == "val"
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval at step")]
    # epochs counted from 1 in the log lines, as the progress line counts them ("train: step 4/8 ... epoch 1")
    assert [m.split(":")[0] for m in evals] == ["eval at step 2, epoch 1", "eval at step 4, epoch 2"]
    caplog.clear()

    scores = iter([{"val": {"R@1": 5.0}, "test": {"R@1": 1.0}}, {"val": {"R@1": 3.0}, "test": {"R@1": 9.0}}])
    with caplog.at_level(logging.WARNING, logger="cirlab.engine.train"):
        result = train(_model(), TripletItems(16), _cfg(epochs=2, selection="paper", selection_metric="R@1"),
                       output_dir=tmp_path / "p", evaluate_fn=lambda m: next(scores))
    assert result["best_epoch"] == 2 and result["best_score"] == 9.0
    assert "selection='paper'" in caplog.text and "'test'" in caplog.text
    evals = [r for r in _read_log(tmp_path / "p" / "log.jsonl") if r["kind"] == "eval"]
    assert [r.get("best", False) for r in evals] == [True, True]


def test_selection_metric_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\['R@10'\] not in split 'val'"):
        train(_model(), TripletItems(16), _cfg(epochs=1, selection_metric="R@10+R@50"), output_dir=tmp_path,
              evaluate_fn=lambda m: {"val": {"R@1": 1.0, "R@50": 2.0}})


def test_a_training_step_outside_the_contract_is_one_line(tmp_path):
    """A user's model whose training_step returns something else failed inside torch ("iteration over a 0-d
    tensor", "'float' object has no attribute 'float'", "element 0 of tensors does not require grad")."""
    from cirlab.core.errors import ModelContractError

    weight = torch.tensor(1.0, requires_grad=True)
    cases = [({"similarity": weight * 2}, r"returned no '\*_loss' term \(keys: \['similarity'\]\)"),
             (weight * 2, r"returned a Tensor; it returns a dict with one or more '\*_loss' scalar tensors"),
             ({"a_loss": 2.0}, r"'a_loss' is float; a loss term is a scalar tensor"),
             ({"a_loss": weight * torch.ones(3)}, r"'a_loss' is Tensor of shape \(3,\); a loss term is a scalar"),
             ({"a_loss": torch.tensor(2.0)}, r"no loss term has a gradient \(a_loss: computed under no_grad")]
    for i, (returned, message) in enumerate(cases):
        model = _model()
        model.training_step = lambda batch, returned=returned: returned
        with pytest.raises(ModelContractError, match=r"^StubCIR.training_step.* " + message):
            train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / str(i))
    model = _model()  # a constant term beside a trained one is fine (HREM's loss without a sampled negative is 0)
    base = model.training_step
    model.training_step = lambda batch: {**base(batch), "zero_loss": torch.tensor(0.0)}
    assert train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "ok")["steps"] > 0


def test_default_train_config_and_param_groups_outside_the_contract(tmp_path):
    from cirlab.core.errors import ModelContractError

    model = _model()
    model.default_train_config = lambda: None
    with pytest.raises(ModelContractError, match=r"default_train_config\(\) returned None; it returns a dict"):
        train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "a")
    model = _model()
    model.param_groups = lambda: [{"params": model.parameters(), "lr_scale": 1.0}]  # a generator, as torch takes it
    assert train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "generator")["steps"] > 0
    model = _model()
    first = next(model.parameters())
    model.param_groups = lambda: [{"params": [first]}]  # the rest would never train
    with pytest.raises(ModelContractError, match=r"param_groups\(\) leaves out \d+ trainable parameter\(s\)"):
        train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "b")
    model = _model()  # a misspelt key trained the group at the full lr without a word (torch keeps any key)
    model.param_groups = lambda: [{"params": list(model.parameters()), "lr_scal": 0.1, "name": "all"}]
    with pytest.raises(ModelContractError, match=r"StubCIR\.param_groups\(\) group 0 \('all'\): unknown key "
                                                 r"'lr_scal' \(did you mean 'lr_scale'\?\); a group takes "):
        train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "c")
    model = _model()  # torch's "some parameters appear in more than one parameter group" named none of them
    name, param = next(model.named_parameters())
    for groups, where in (([{"params": list(model.parameters())}, {"params": [param], "lr": 1e-5}], "groups 0 and 1"),
                          ([{"params": [param] + list(model.parameters())}], "group 0 twice")):
        model.param_groups = lambda groups=groups: groups
        with pytest.raises(ModelContractError, match=rf"StubCIR\.param_groups\(\) lists the parameter {name} in "
                                                     rf"{where}: a parameter belongs to one group"):
            train(model, TripletItems(16), _cfg(epochs=1), output_dir=tmp_path / "d")


def test_sampler_shards_cover_the_global_batches():
    single = list(ResumableSampler(20, seed=3, batch_size=4))
    r0 = list(ResumableSampler(20, seed=3, batch_size=4, rank=0, world_size=2))
    r1 = list(ResumableSampler(20, seed=3, batch_size=4, rank=1, world_size=2))
    for j in range(5):
        assert sorted(single[4 * j:4 * j + 4]) == sorted(r0[2 * j:2 * j + 2] + r1[2 * j:2 * j + 2])
    s = ResumableSampler(20, seed=3, batch_size=4)
    s.set_epoch(0, start=8)
    assert list(s) == single[8:] and len(s) == 12
    s.set_epoch(1)
    assert list(s) != single  # reshuffled per epoch


def _runs(order, groups):
    """The order cut into maximal runs of equal group key."""
    runs = [[order[0]]]
    for a, b in zip(order, order[1:]):
        if groups[a] == groups[b]:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def test_grouped_sampler_keeps_groups_together_in_runs():
    groups = [i % 5 for i in range(40)]  # 5 groups of 8 items
    s = ResumableSampler(40, seed=1, batch_size=8, groups=groups, group_size=4)
    order = list(s)
    assert sorted(order) == list(range(40))  # a permutation: nothing dropped or repeated
    # every group of 8 is cut into runs of exactly 4 (two runs of one group may end up adjacent)
    sizes = [len(r) for r in _runs(order, groups)]
    assert all(n % 4 == 0 for n in sizes) and sum(sizes) == 40
    plain = list(ResumableSampler(40, seed=1, batch_size=8))
    assert max(len(r) for r in _runs(plain, groups)) < 4  # a plain shuffle rarely keeps 4 in a row
    s.set_epoch(1)
    assert list(s) != order  # reshuffled per epoch, runs included
    s.set_epoch(0, start=16)
    assert list(s) == order[16:]  # resume mid-epoch: same order
    with pytest.raises(ValueError, match="one group key per item"):
        ResumableSampler(40, groups=groups[:10], group_size=4)


def test_group_ids_see_through_subset_and_need_keys():
    class Keyed(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def group_keys(self):
            return ["a", "b", "a", "c"]

    assert group_ids(Keyed()) == [0, 1, 0, 2]
    assert group_ids(torch.utils.data.Subset(Keyed(), [3, 2, 0])) == [2, 0, 0]
    with pytest.raises(ValueError, match="group_keys"):
        group_ids(TripletItems(4))


def test_group_batches_trains_through_the_trainer(tmp_path):
    class GroupedItems(TripletItems):
        def group_keys(self):
            return [int(i) // 4 for i in range(len(self))]

    seen = []
    model = _model()
    step = model.training_step

    def record(batch):
        seen.append([int(q[1:]) for q in batch["query_id"]])
        return step(batch)

    model.training_step = record
    train(model, GroupedItems(32), _cfg(epochs=1, group_batches=4), output_dir=tmp_path)
    for batch in seen:  # batch 8 = two whole groups of 4
        assert all(sum(1 for j in batch if j // 4 == i // 4) == 4 for i in batch)
    with pytest.raises(ValueError, match="group_batches"):
        TrainConfig(group_batches=-1)
    with pytest.raises(ConfigError, match=r"TrainConfig\.seed: must be <= 4294967295"):  # NumPy would refuse it
        TrainConfig(seed=2**32)
    # a dataset without group keys: one ConfigError before the run folder exists (it was a ValueError traceback)
    with pytest.raises(ConfigError, match=r"group_batches needs a training set with group_keys\(\).*TripletItems"):
        train(_model(), TripletItems(8), _cfg(group_batches=4), output_dir=tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_max_steps_stops_mid_epoch(tmp_path):
    result = train(_model(), TripletItems(32), _cfg(epochs=5, max_steps=6), output_dir=tmp_path)
    # 4 steps per epoch: 6 steps are one epoch and half of the next (the count is a fraction, not the whole 1)
    assert result["steps"] == 6 and result["epochs"] == 1.5
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 6 and ckpt["progress"]["batch_in_epoch"] == 2


def test_non_finite_loss_stops_with_the_step(tmp_path):
    model = _model()
    step = model.training_step
    calls = []

    def exploding(batch):
        calls.append(1)
        terms = step(batch)
        if len(calls) == 3:
            terms["rank_loss"] = terms["rank_loss"] * float("nan")
        return terms

    model.training_step = exploding
    with pytest.raises(FloatingPointError, match="step 3.*rank_loss=nan"):
        train(model, TripletItems(32), _cfg(epochs=1), output_dir=tmp_path)


def test_relative_and_unscheduled_param_groups():
    """``lr_scale`` groups follow train.lr; ``scheduled: False`` groups keep their base lr through the schedule."""
    from types import SimpleNamespace

    from cirlab.engine.train import Trainer, build_optimizer

    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def param_groups(self):  # a scaled group first, as HREM's BERT group (0.1 x train.lr)
            return [{"params": list(self.b.parameters()), "lr_scale": 10.0, "lr": 123.0},  # the scale wins
                    {"params": list(self.a.parameters())},
                    {"params": list(self.c.parameters()), "lr_scale": 2.0, "scheduled": False}]

    cfg = TrainConfig(lr=1e-3, schedule="step", lr_milestones=[1], lr_gamma=0.1)
    opt = build_optimizer(Grouped(), cfg)
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-3, 2e-3])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-3, 2e-3])
    after_milestone = SimpleNamespace(optimizer=opt, cfg=cfg, progress=SimpleNamespace(epoch=3, step=100))
    logged = Trainer.set_lr(after_milestone)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4, 2e-3])
    assert logged == pytest.approx(1e-4)  # the log's "lr" is train.lr's, not the first group's


def test_a_batch_larger_than_the_training_set_names_the_largest_that_fits(tmp_path):
    # the paper recipes' batches (CaLa 64) exceed the tiny synthetic sets: the message says what to set
    with pytest.raises(ConfigError, match=r"the training set \(20 items\) is smaller than one optimizer step "
                                                 r"\(batch_size 32 x grad_accum_steps 2\); set train\.batch_size to "
                                                 r"at most 10 .* or train\.drop_last=false"):
        train(_model(), TripletItems(20), _cfg(batch_size=32, grad_accum_steps=2), output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_auto_device_is_this_ranks_card_and_names_are_checked(monkeypatch):
    from cirlab.engine.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match=r"^--device: .*'gpu'"):
        resolve_device("gpu", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    # under torchrun every rank trains and evaluates on its own card, not all of them on cuda:0
    assert resolve_device("auto") == "cuda:1" and resolve_device("auto", local_rank=0) == "cuda:0"
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == "cuda:0"


def test_a_resume_without_last_pt_or_an_overwrite_never_removes_what_a_run_did_not_write(tmp_path):
    from cirlab.engine.train import RunFolderError

    run = tmp_path / "run"
    train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=run)
    (run / "checkpoints" / "last.pt").unlink()  # e.g. deleted to save disk: best.pt and the metrics stay
    with pytest.raises(RunFolderError, match=r"--resume: .* but no checkpoints/last\.pt to continue from; run with "
                                             r"--overwrite instead"):
        train(_model(), TripletItems(16), _cfg(epochs=1, resume="auto"), output_dir=run)
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "train_summary.json").is_file()

    mine = tmp_path / "mine"  # run-like names in a folder no run wrote (no config.yaml, no log.jsonl)
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "my_model.pt").write_text("x")
    (mine / "tb").mkdir()
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=r"holds checkpoints, tb but no run's config\.yaml or log\.jsonl"):
            train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=mine, overwrite=overwrite)
    assert sorted(p.name for p in mine.rglob("*")) == ["checkpoints", "my_model.pt", "tb"]

    torn = tmp_path / "torn"  # killed while writing its first last.pt: only a temporary file in checkpoints/
    train(_model(), TripletItems(16), _cfg(epochs=1), output_dir=torn)
    for name in ("best.pt", "last.pt"):
        (torn / "checkpoints" / name).unlink()
    for name in ("train_summary.json",):
        (torn / name).unlink()
    (torn / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half")
    assert train(_model(), TripletItems(16), _cfg(epochs=1, resume="auto"), output_dir=torn)["steps"] == 2


def test_a_resume_past_the_end_it_now_sets_is_refused_before_config_yaml_is_rewritten(tmp_path):
    train(_model(), TripletItems(16), _cfg(epochs=2), output_dir=tmp_path)  # 2 x 2 steps
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"resume: .* is already at step 4, past the end train\.epochs=1, "
                                          r"train\.max_steps=None sets now \(2 steps\)"):
        train(_model(), TripletItems(16), _cfg(epochs=1, resume="auto"), output_dir=tmp_path)
    assert (tmp_path / "config.yaml").read_text() == before  # it said epochs 1 beside a run of 2
    more = train(_model(), TripletItems(16), _cfg(epochs=3, resume="auto"), output_dir=tmp_path)
    assert more["steps"] == 6 and more["epochs"] == 3
    # exactly at its end (a stop on the last step owes the final evaluation and summary): resumed, not refused
    (tmp_path / "train_summary.json").unlink()
    again = train(_model(), TripletItems(16), _cfg(epochs=3, resume="auto"), output_dir=tmp_path)
    assert again["steps"] == 6 and (tmp_path / "train_summary.json").is_file()


def test_the_last_step_is_logged_whatever_log_every_says(tmp_path):
    # 4 steps at log_every=3: the first, the third and the last (the notebook's progress stopped at step 70 of 75)
    train(_model(), TripletItems(16), _cfg(epochs=2, log_every=3), output_dir=tmp_path)
    assert [r["step"] for r in _read_log(tmp_path / "log.jsonl") if r["kind"] == "train"] == [1, 3, 4]


def test_ctrl_c_handling_leaves_an_ignored_sigint_alone():
    """A background job of a shell script is started with Ctrl-C ignored; training must not take it over (a
    Ctrl-C of the script's foreground command would stop it too), but still stops cleanly on SIGTERM."""
    import signal

    from cirlab.engine.train import _StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stop_signal_handlers_are_left_alone_where_the_interpreter_refuses_them(monkeypatch):
    """An embedded interpreter may refuse signal.signal (ValueError): the final evaluation's SIGTERM handling went
    on without it in the loop but raised out of stop_signals_interrupt; both now run without their handlers."""
    import signal

    from cirlab.core.signals import stop_signals_interrupt
    from cirlab.engine import train as train_mod

    def refuse(sig, handler):
        raise ValueError("signal only works in main thread of the main interpreter")

    monkeypatch.setattr(train_mod.signal, "signal", refuse)
    with stop_signals_interrupt():
        ran = True
    with train_mod._StopSignals() as stop:
        assert stop._previous == {}
    assert ran and signal.getsignal(signal.SIGTERM) is not stop._handle


def test_tensorboard_is_left_out_where_it_would_name_another_folder(tmp_path, monkeypatch, caplog):
    """tensorboard names files in UTF-8 whatever the locale: under Latin-1, a run folder with a non-ASCII letter
    is another folder to it, and its writer thread failed mid-training. Such a run logs to log.jsonl only."""
    from cirlab.engine import train as train_mod

    assert train_mod.utf8_paths_agree(tmp_path / "rün", "utf-8")
    assert not train_mod.utf8_paths_agree(tmp_path / "rün", "latin-1")
    assert train_mod.utf8_paths_agree(tmp_path / "run", "latin-1")  # ASCII names are the same in both
    monkeypatch.setattr(train_mod.sys, "getfilesystemencoding", lambda: "latin-1")
    with caplog.at_level("WARNING"):
        assert train_mod._RunLog._tensorboard(tmp_path / "rün") is None
    assert "tensorboard cannot write into" in caplog.text and "log.jsonl only" in caplog.text
    assert not (tmp_path / "rün" / "tb").exists()


def test_ctrl_c_in_fit_is_a_keyboard_interrupt_for_a_scripts_clean_up(tmp_path):
    import os
    import signal

    from cirlab.core.errors import CirlabError

    def ctrl_c(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler stops after this step

    # a background job of a non-interactive shell (make test &, CI) starts with SIGINT ignored, which the trainer
    # leaves alone: the test takes Ctrl-C as a terminal's job has it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            cirlab.fit(_model(), TripletItems(40), _cfg(epochs=3), output_dir=tmp_path / "run", callbacks=[ctrl_c])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(caught.value, CirlabError) and caught.value.exit_code == 130
    assert "Resume" in str(caught.value) and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_seed_of_the_initial_weights_is_recorded_with_the_run(tmp_path):
    for seed in (0, 3):
        model = cirlab.create_model("stub_cir", preset="tiny", seed=seed)
        cirlab.fit(model, TripletItems(16), _cfg(epochs=1, selection="last"), output_dir=tmp_path / f"s{seed}")
        starts = json.loads((tmp_path / f"s{seed}" / "provenance.json").read_text())["starts"]
        assert starts[0]["model_init_seed"] == seed
    cirlab.fit(cirlab.create_model("stub_cir", preset="tiny"), TripletItems(16), _cfg(epochs=1, selection="last"),
               output_dir=tmp_path / "none")
    assert "model_init_seed" not in json.loads((tmp_path / "none" / "provenance.json").read_text())["starts"][0]


def test_a_step_evaluated_by_eval_every_steps_is_not_evaluated_again_at_the_epoch_end(tmp_path):
    evaluate = lambda model: {"val": {"R@1": 1.0}}  # noqa: E731
    cirlab.fit(_model(), TripletItems(40), _cfg(epochs=2, batch_size=8, eval_every_steps=5), output_dir=tmp_path / "r",
               evaluate_fn=evaluate)  # 5 steps per epoch: every epoch end is a multiple of 5
    steps = [r["step"] for r in _read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"]
    assert steps == [5, 10]  # was [5, 5, 10, 10]


def test_max_steps_ending_on_an_eval_every_steps_step_evaluates_it_once(tmp_path):
    evaluate = lambda model: {"val": {"R@1": 1.0}}  # noqa: E731
    cirlab.fit(_model(), TripletItems(40), _cfg(epochs=2, batch_size=8, eval_every_steps=3, max_steps=3),
               output_dir=tmp_path / "r", evaluate_fn=evaluate)
    steps = [r["step"] for r in _read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"]
    assert steps == [3]  # was [3, 3]


def test_the_default_selection_metric_follows_the_task_and_a_missing_one_keeps_the_work(tmp_path):
    """cirlab.fit of a CIR model selected on "rsum" (ITM's headline) by default: a bare KeyError after the whole
    first epoch, and nothing saved. The default is the task's own now; a metric the evaluation does not report is a
    one-line ConfigError, with the training so far in last.pt for a resume."""
    import dataclasses

    cir = lambda model: {"val": {"avg": 1.0, "R@1": 0.5}}  # noqa: E731
    base = {k: v for k, v in dataclasses.asdict(_cfg(epochs=1)).items() if k != "selection_metric"}
    model = _model()  # a CIR model whose recipe names no selection metric (AMC's does not)
    model.default_train_config = lambda: {"lr": 1e-2}
    summary = cirlab.fit(model, TripletItems(16), TrainConfig(**base), output_dir=tmp_path / "auto", evaluate_fn=cir)
    assert summary["selection_metric"] == "avg" and (tmp_path / "auto" / "checkpoints" / "best.pt").is_file()
    assert TrainConfig().selection_metric == "auto"
    with pytest.raises(ConfigError, match=r"model selection: metric\(s\) \['R@10'\] not in split 'val' \(available: "
                                          r"\['R@1', 'avg'\]\); set train\.selection_metric .*saved in .*last\.pt"):
        cirlab.fit(_model(), TripletItems(16), _cfg(epochs=2, selection_metric="R@10", ema_decay=0.5),
                   output_dir=tmp_path / "r", evaluate_fn=cir)
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()
    # with an EMA too, the resume continues the live weights (last.pt was written with the average swapped in)
    resumed_model, straight_model = _model(), _model()
    resumed = cirlab.fit(resumed_model, TripletItems(16), _cfg(epochs=2, selection_metric="avg", resume="auto",
                                                               ema_decay=0.5), output_dir=tmp_path / "r", evaluate_fn=cir)
    straight = cirlab.fit(straight_model, TripletItems(16), _cfg(epochs=2, selection_metric="avg", ema_decay=0.5),
                          output_dir=tmp_path / "s", evaluate_fn=cir)
    assert resumed["steps"] == straight["steps"] and resumed["best_step"] == straight["best_step"]
    with pytest.raises(ConfigError, match=r"evaluate_fn returned no split 'val' .*; set train\.selection to one of "
                                          r"them and resume"):  # the split is what is missing, not the metric
        cirlab.fit(_model(), TripletItems(16), _cfg(epochs=1, selection_metric="avg"), output_dir=tmp_path / "n",
                   evaluate_fn=lambda m: {"dev": {"avg": 1.0}, "test": {"avg": 1.0}})
    live = [torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["model"] for run in "rs"]
    assert all(torch.equal(live[0][k], live[1][k]) for k in live[1])  # the live weights, not the average
    assert [r["step"] for r in _read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"] == [
        r["step"] for r in _read_log(tmp_path / "s" / "log.jsonl") if r["kind"] == "eval"]


def test_seeded_items_draw_per_item_streams_and_leave_the_callers_untouched():
    """Item i of epoch e is drawn under its own seed in torch, random and numpy, whatever was drawn before; the
    caller's streams continue as if no item had been read (only the CPU generator is touched now: torch.manual_seed
    re-seeded the CUDA ones and cost a stack trace per item)."""
    import random

    import numpy as np

    from cirlab.engine.train import SeededItems

    class Draws:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2).tolist(), random.random(), float(np.random.rand())

    items = SeededItems(Draws(), seed=5)
    first = [items[i] for i in range(4)]
    torch.rand(7), random.random(), np.random.rand(3)  # the caller draws in between
    assert [items[i] for i in (3, 2, 1, 0)] == first[::-1]
    items.epoch = 1
    assert items[0] != first[0]
    seed = int(np.random.SeedSequence([5, 0, 2]).generate_state(1)[0])
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    assert first[2] == Draws()[2]  # the documented rule: the item's seed in all three
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    items[1]
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def test_the_model_holds_best_pt_after_fit_with_a_paper_no_restore_ema(tmp_path):
    """eval_every_steps on an epoch's last step saved best.pt; the epoch end then copied the EMA into the live
    weights (AMC's paper mode) and, the step being evaluated already, nothing reloaded best.pt: a caller (and the
    final evaluation of cirlab train) scored other weights than the run's checkpoint."""
    model = _model()
    cirlab.fit(model, TripletItems(16), _cfg(epochs=1, batch_size=8, ema_decay=0.5, ema_mode="paper_no_restore",
                                             eval_every_steps=2, selection_metric="avg"),
               output_dir=tmp_path / "r", evaluate_fn=lambda m: {"val": {"avg": 1.0}})
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_a_batch_too_small_for_in_batch_negatives_is_refused_before_training(tmp_path):
    """A loss over in-batch negatives is exactly 0 for a batch of one item: batch_size=1 (which the small-set
    refusal even suggested for a 1-item set) trained for every step on nothing, and ended with rc 0. Models that
    contrast within the batch declare min_micro_batch; gradient accumulation adds no negatives."""
    model = _model()
    type(model).min_micro_batch = 2
    try:
        for kw, said in (({"batch_size": 1}, r"^StubCIR contrasts each item with the other items of its batch, so a "
                                              r"batch needs at least 2 items per process \(train.batch_size 1\); "
                                              r"grad_accum_steps adds no negatives"),
                         ({"batch_size": 1, "grad_accum_steps": 4}, r"at least 2 items per process"),
                         ({"batch_size": 8}, r"^the training set \(1 items\) is smaller than one optimizer step .* "
                                             r"needs at least 2 items per batch")):
            items = TripletItems(1 if kw["batch_size"] == 8 else 16)
            with pytest.raises(ConfigError, match=said):
                train(model, items, _cfg(epochs=1, **kw), output_dir=tmp_path / "r")
            assert not (tmp_path / "r" / "checkpoints").exists()
        assert train(model, TripletItems(16), _cfg(epochs=1, batch_size=2), output_dir=tmp_path / "ok")["steps"] > 0
    finally:
        del type(model).min_micro_batch
    assert cirlab.create_model("amc", "tiny").min_micro_batch == 2 and not hasattr(_model(), "min_micro_batch")


def test_a_decimal_comma_is_named():
    """--set train.lr=0,001 (a German keyboard's number) was refused as "expected a number, got '0,001'"."""
    from cirlab.engine.train import validate_train_values

    with pytest.raises(ConfigError, match=r"^train\.lr: expected a number \(write 0\.001: a decimal point, not a "
                                          r"comma\), got '0,001'$"):
        validate_train_values({"lr": "0,001"})
    with pytest.raises(ConfigError, match=r"^train\.lr: expected a number, got 'fast'$"):
        validate_train_values({"lr": "fast"})


def test_a_checkpoint_write_blames_the_disk_only_for_the_disks_errors(tmp_path, monkeypatch):
    """A DataLoader worker killed by SIGTERM made torch raise inside the write of last.pt; save_checkpoint reported
    it as "cannot write checkpoint ... (RuntimeError: DataLoader worker ... is killed ...; 68015 MiB free on that
    disk)", sending the user to a disk that was not full. Only an OSError is the disk's; another error breaking into
    the write comes out as itself; torch's own write error is named without the free-space guess."""
    import errno

    from cirlab.core.checkpoint import CheckpointWriteError, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(2)})
    good = path.read_bytes()

    def killed_worker(*args, **kwargs):  # raised wherever the main process is, here inside torch's writer
        try:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def writer_failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    monkeypatch.setattr(torch, "save", killed_worker)
    with pytest.raises(RuntimeError) as caught:
        save_checkpoint(path, {"w": torch.zeros(2)})
    assert not isinstance(caught.value, CheckpointWriteError)
    assert "DataLoader worker (pid 123)" in str(caught.value.__context__)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"\(OSError: .*No space left on device; \d+ MiB free on that "
                                                   r"disk\); the previous last\.pt is kept unchanged"):
        save_checkpoint(path, {"w": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", writer_failed)
    with pytest.raises(CheckpointWriteError, match=r"\(RuntimeError: .*unexpected pos 128 vs 0\); the previous"
                       ) as caught:
        save_checkpoint(path, {"w": torch.zeros(2)})
    assert "MiB free" not in str(caught.value)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_log_mode_progress_lines_carry_the_wall_clock_as_the_log_lines_do(tmp_path, capsys):
    """Progress lines in a batch job's log had no time ("1s elapsed" restarts at every resume): when a step ran, or
    how long a hang lasted, could not be told. They start with the log lines' %(asctime)s now."""
    import re
    import time

    before = time.time()
    cirlab.fit(_model(), TripletItems(16), _cfg(epochs=1, progress="log", selection="last"), output_dir=tmp_path / "r")
    lines = [line for line in capsys.readouterr().err.splitlines() if "train: step" in line]
    assert len(lines) == 2, lines  # 2 steps, log_every=1
    for line in lines:
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) train: step \d/2 ", line)
        assert stamp, line
        when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))  # logging's own format, local time
        assert before - 1 <= when <= time.time(), line


def test_evaluations_due_match_a_step_by_step_count():
    """The ETA's count of evaluations still due, against walking the steps: every eval_every-th epoch end, every
    eval_every_steps step, the last step (the last epoch or a max_steps stop), each step once."""
    from cirlab.engine.train import evaluations_after

    for per_epoch, epochs, every, every_steps, cap in [(10, 5, 1, 0, None), (10, 5, 2, 0, None), (7, 4, 0, 3, None),
                                                         (10, 5, 2, 4, 37), (6, 3, 1, 6, None), (5, 2, 3, 0, 8)]:
        total = min(cap or per_epoch * epochs, per_epoch * epochs)

        def evaluated(s):
            epoch_end = s % per_epoch == 0 and every and (s // per_epoch) % every == 0
            return bool(epoch_end or (every_steps and s % every_steps == 0) or s == total)

        for step in range(total + 1):
            naive = sum(evaluated(s) for s in range(step + 1, total + 1))
            assert evaluations_after(step, total, per_epoch, epochs, every, every_steps) == naive, (
                per_epoch, epochs, every, every_steps, cap, step)


def test_the_eta_follows_the_recent_step_rate_and_counts_the_evaluations_due(tmp_path, monkeypatch):
    """The ETA was elapsed / steps done x steps left from the start: 2-3.5x too long after a feature-caching first
    epoch, and "ETA 0s" was followed by the evaluations still due. It takes the recent rate and adds them now."""
    from cirlab.engine import train as train_mod

    clock = [1000.0]
    monkeypatch.setattr(train_mod.time, "monotonic", lambda: clock[0])
    cfg = TrainConfig(epochs=4, eval_every=1, progress="log", tensorboard=False)
    log = train_mod._RunLog(tmp_path, cfg, 400, active=True, start_step=0, steps_per_epoch=100, evaluates=True)
    record = {"epoch": 0, "loss": 1.0, "lr": 1e-3}
    for step in range(1, 101):  # the first epoch: 10 s a step (features are cached)
        clock[0] += 10.0
        log.line({**record, "step": step})
    # 300 steps x 10 s; none measured yet of the 4 evaluations due (this step's comes after its line)
    assert log.eta(100) == "50m00s + 4 evaluations"
    clock[0] += 60.0
    log.evaluated(60.0)
    for step in range(101, 201):  # then 1 s a step
        clock[0] += 1.0
        line = log.line({**record, "epoch": 1, "step": step})
    # 200 steps left x 120 s / 102 steps (the last 120 s of stepping: 2 steps at 10 s, 100 at 1 s) + 3 x 60 s
    assert line.endswith("ETA 6m55s"), line


def test_elapsed_and_eta_ignore_the_wall_clock_being_set_back_or_forward(tmp_path, monkeypatch):
    """An NTP correction an hour back mid-run printed "-3589s elapsed"; an hour forward, "ETA 11h00m" for a run
    that ended 13 s later: durations are measured on the monotonic clock."""
    from cirlab.engine import train as train_mod

    wall = [2_000_000_000.0]
    monkeypatch.setattr(train_mod.time, "time", lambda: wall[0])
    cfg = TrainConfig(epochs=1, progress="log", tensorboard=False)
    log = train_mod._RunLog(tmp_path, cfg, 1000, active=True, start_step=0)
    record = {"epoch": 0, "loss": 1.0, "lr": 1e-3}
    log.line({**record, "step": 1})
    for jump in (-3600.0, 2 * 3600.0):
        wall[0] += jump
        line = log.line({**record, "step": 2})
        assert "-" not in line.split("|")[1] and " 0s elapsed" in line and "h" not in line.split("|")[1], line


def test_log_records_carry_their_wall_clock(tmp_path):
    import time

    before = time.time()
    cirlab.fit(_model(), TripletItems(16), _cfg(epochs=1, selection="last"), output_dir=tmp_path / "r")
    records = _read_log(tmp_path / "r" / "log.jsonl")
    assert records and all(before - 1 <= r["time"] <= time.time() for r in records)


def test_a_terminal_of_no_width_gets_log_lines_not_an_invisible_bar(monkeypatch):
    """tqdm draws nothing on a terminal that reports 0 columns (some `docker exec -t` or CI pseudo-terminals): a
    run there showed no progress at all."""
    import os

    from cirlab.core import console

    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(console, "live_frontend", lambda: False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    assert not console.wants_a_bar()
    # `stty cols 120` in a 0x0 pseudo-terminal (docker run -t): a width and no rows, where tqdm draws nothing either
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 0)))
    assert not console.wants_a_bar()
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 40)))
    assert console.wants_a_bar()


def test_a_copied_recipe_run_is_still_the_recipes_and_a_retrained_one_is_not(tmp_path):
    """The mark recorded last.pt's mtime: a `cp -r` or a clone of a notebook's run folder was refused on the
    notebook's re-run as a run it did not finish. It records the content now; old marks are still honoured."""
    import os
    import shutil

    from cirlab.engine.train import RECIPE_MARK, mark_recipe_run, recipe_wrote

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.pt"
    torch.save({"w": torch.arange(300000.0)}, last)  # over 2 MiB: the first and the last MiB are read
    mark_recipe_run(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, copy_function=shutil.copy)  # cp -r: new mtimes
    assert recipe_wrote(run) and recipe_wrote(copy)
    torch.save({"w": torch.arange(300000.0) + 1}, copy / "checkpoints" / "last.pt")  # trained into: same size
    assert (copy / "checkpoints" / "last.pt").stat().st_size == last.stat().st_size and not recipe_wrote(copy)
    st = last.stat()
    (run / RECIPE_MARK).write_text(json.dumps({"last_checkpoint": [st.st_size, st.st_mtime_ns]}))  # an old mark
    assert recipe_wrote(run)
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not recipe_wrote(run)


def test_a_recipe_run_without_its_last_checkpoint_is_still_the_recipes(tmp_path):
    """`cirlab runs` says a finished run's last.pt may be deleted to free disk: the notebook's re-run then refused its
    own run folder (the mark fingerprinted last.pt alone). Its best.pt is fingerprinted too now."""
    from cirlab.engine.train import mark_recipe_run, recipe_wrote

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"w": torch.arange(10.0)}, run / "checkpoints" / "last.pt")
    torch.save({"w": torch.arange(5.0)}, run / "checkpoints" / "best.pt")
    mark_recipe_run(run)
    (run / "checkpoints" / "last.pt").unlink()
    assert recipe_wrote(run)
    torch.save({"w": torch.arange(5.0) + 1}, run / "checkpoints" / "best.pt")  # another run's best: not the recipe's
    assert not recipe_wrote(run)


@pytest.mark.parametrize("eval_every", [0, 3])
def test_a_max_steps_stop_on_an_epoch_end_is_evaluated_as_the_last_step(tmp_path, eval_every):
    """max_steps that ends a run exactly at an epoch end skipped the last evaluation unless that epoch was due one:
    its last steps never reached selection, and with eval_every=0 no best.pt was written at all."""
    steps = []
    train(_model(), TripletItems(16), _cfg(epochs=5, max_steps=4, eval_every=eval_every, selection="val"),
          output_dir=tmp_path / "r", evaluate_fn=lambda m: steps.append(1) or {"val": {"R@1": float(len(steps))}})
    evaluated = [r["step"] for r in _read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "eval"]
    # 2 steps per epoch: the cap ends epoch 2, which neither setting makes due
    assert evaluated == [4] and (tmp_path / "r" / "checkpoints" / "best.pt").is_file()


def test_keep_epoch_checkpoints_keeps_every_epoch_or_the_last_n_across_a_resume(tmp_path):
    """``true`` keeps every epoch's full training state; an integer N the last N (a resume keeps counting)."""
    train(_model(), TripletItems(16), _cfg(epochs=3, keep_epoch_checkpoints=True), output_dir=tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").glob("epoch_*.pt")) == \
        ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    run = tmp_path / "two"
    train(_model(), TripletItems(16), _cfg(epochs=3, keep_epoch_checkpoints=2), output_dir=run)
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_3.pt"]
    train(_model(), TripletItems(16), _cfg(epochs=5, keep_epoch_checkpoints=2, resume="auto"), output_dir=run)
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_4.pt", "epoch_5.pt"]
    state = torch.load(run / "checkpoints" / "epoch_5.pt", weights_only=True)
    assert state["progress"]["epoch"] == 5 and "optimizer" in state  # a state to resume from, as last.pt
    with pytest.raises(ConfigError, match="keep_epoch_checkpoints: expected true .*, false, or the number"):
        resolve_train_config(_model(), {"keep_epoch_checkpoints": -1})
