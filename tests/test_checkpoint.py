"""Checkpoint safety: weights_only loads, pickled modules refused unless trusted, clear errors on damaged files."""
from __future__ import annotations

import logging

import pytest
import torch

import cirlab
from cirlab.core.checkpoint import (CheckpointError, load_checkpoint, load_model_weights, model_state_dict,
                               save_checkpoint)


def test_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "c" / "x.pt", {"model": model.state_dict(), "epoch": 3})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "cirlab-checkpoint-v1" and ckpt["epoch"] == 3
    other = torch.nn.Linear(3, 2)
    load_model_weights(other, path)
    assert torch.equal(other.weight, model.weight)
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_names_the_file(tmp_path, damage):
    path = save_checkpoint(tmp_path / "x.pt", {"model": torch.nn.Linear(30, 20).state_dict()})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 50, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_module_refused_unless_trusted(tmp_path, caplog):
    path = tmp_path / "train_model.pt"
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.save(module, path)  # like AMC's released checkpoints: a whole pickled model
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="cirlab.core.checkpoint"):
        loaded = load_checkpoint(path, trust_pickle=True)
    assert "weights_only=False" in caplog.text
    assert isinstance(loaded, torch.nn.Sequential)
    target = torch.nn.Sequential(torch.nn.Linear(2, 2))
    load_model_weights(target, path, trust_pickle=True)  # the state dict is taken out of the module
    assert torch.equal(target[0].weight, module[0].weight)


class _RunsCode:
    """Unpickling calls os.system: a weights-only load must refuse it as code, not call the file corrupt."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_data_loads_without_trust_and_code_is_named_as_code(tmp_path):
    """argparse options and numpy scalars (what HREM's and DIME's training scripts pickle beside the weights) are
    data: read without trust_pickle. A global of a module torch blocks outright (os.system) was called "corrupt or
    truncated" because torch words that refusal differently; it is now refused as pickled code."""
    import argparse

    import numpy as np

    saved = {"model": {"w": torch.ones(2)}, "opt": argparse.Namespace(lr=2e-4, name="x", dims=[1, 2]),
             "best_rsum": np.float64(501.25), "step": np.int64(7), "epoch": 3}
    torch.save(saved, tmp_path / "released.pth")
    loaded = load_checkpoint(tmp_path / "released.pth")
    assert loaded["opt"] == saved["opt"] and loaded["best_rsum"] == 501.25 and loaded["step"] == 7
    torch.save({"model": {"w": torch.ones(2)}, "x": _RunsCode()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"contains pickled Python objects \(e.g. posix.system\), which can run "
                                              r"arbitrary code"):
        load_checkpoint(tmp_path / "code.pth")


def test_model_state_dict_shapes(tmp_path):
    sd = {"w": torch.ones(1)}
    assert model_state_dict({"state_dict": sd}) is sd and model_state_dict(sd) is sd
    with pytest.raises(CheckpointError, match="no model weights"):
        model_state_dict({"epoch": 1}, tmp_path / "x.pt")


def test_find_state_dict_reads_every_container_the_converters_meet():
    from cirlab.core.checkpoint import find_state_dict

    sd = {"w": torch.zeros(2)}
    module = torch.nn.Linear(1, 1)
    assert find_state_dict(sd) is sd and find_state_dict({"model": sd, "optimizer": {}}) is sd
    assert find_state_dict({"state_dict": module}).keys() == module.state_dict().keys()
    assert find_state_dict({"epoch": 3, "Blip2Qformer": sd}) is sd  # CaLa's saved files
    assert find_state_dict({"epoch": 3, "Blip2Qformer": {"model": sd}}) is sd
    assert find_state_dict({"BLIP_NLVR": sd, "other": {}}, ("BLIP_NLVR",)) is sd
    assert find_state_dict({"a": {}, "b": {}}) is None and find_state_dict([sd]) is None and find_state_dict({}) is None


def test_a_file_in_an_original_layout_is_written_as_given_and_a_failed_write_is_one_error(tmp_path, monkeypatch):
    from cirlab.core.checkpoint import CheckpointWriteError, save_checkpoint
    from cirlab.models import blip_rerank

    save_checkpoint(tmp_path / "orig.pt", {"epoch": 0, "BLIP_NLVR": {"w": torch.ones(1)}}, stamp=False)
    assert set(torch.load(tmp_path / "orig.pt", weights_only=True)) == {"epoch", "BLIP_NLVR"}  # no "format" key

    def full(*args, **kwargs):  # torch's zip writer on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    monkeypatch.setattr(torch, "save", full)
    model = cirlab.create_model("blip_rerank_stage1", preset="tiny")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*s1.pt .*no s1.pt was written"):
        blip_rerank.export_original(model, tmp_path / "s1.pt")  # was a 32-line traceback from cirlab convert


def test_argparse_options_load_on_a_torch_without_safe_globals(tmp_path, monkeypatch):
    """torch 2.4 has add_safe_globals but no safe_globals context: the AttributeError was raised inside the load's
    try and every checkpoint was called "corrupt or truncated"."""
    import argparse

    torch.save({"model": {"w": torch.ones(1)}, "opt": argparse.Namespace(a=1)}, tmp_path / "released.pth")
    added = []
    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda globs: added.extend(globs))
    from cirlab.core import checkpoint

    context = checkpoint._data_globals_allowed()
    assert argparse.Namespace in added
    with context:
        pass
    assert load_checkpoint(tmp_path / "released.pth", trust_pickle=True)["opt"].a == 1  # loads, never "corrupt"
