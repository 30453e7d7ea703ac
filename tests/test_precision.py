"""Numeric precision in the trainer and the evaluations: non-finite gradients, the fp16 GradScaler's skipped steps and
its state on resume, half-precision models, fp16 on a CPU, and what ``auto`` picks on a GPU."""
from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from torch import nn

import cirlab
from cirlab.core.errors import ConfigError, InputError
from cirlab.engine import train as T
from cirlab.engine.evaluate import evaluate_cir, evaluate_itm, score_itm, score_split
from cirlab.engine.train import NonFiniteGradientError, TrainConfig, train
from stub_models import TripletItems  # registers stub_cir / stub_itm


class Toy(nn.Module):
    """A least-squares fit of ``x . w = 1``; on the 1-based steps in ``bad_steps`` the loss also adds ``sqrt(0)``:
    a finite loss (it adds 0) whose gradient is NaN, the half-precision failure (an underflow to 0 under a sqrt)."""

    model_name = "toy"
    task = "cir"

    def __init__(self, bad_steps: tuple[int, ...] | range = ()) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.bad_steps, self.calls = set(bad_steps), 0

    def training_step(self, batch: dict) -> dict:
        self.calls += 1
        loss = ((batch["x"] @ self.w - 1.0) ** 2).mean()
        if self.calls in self.bad_steps:
            loss = loss + (self.w * 0).sum().sqrt()
        return {"toy_loss": loss}


def _items(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.rand(4, generator=g)} for _ in range(n)]


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=4, lr=1e-2, log_every=1, tensorboard=False, progress="none", selection="last")
    return TrainConfig(**{**base, **kw})


def _strict_records(path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 is refused on a CPU; the GradScaler's own logic is the same there, and these tests need it."""
    monkeypatch.setattr(T, "check_precision", lambda *args, **kwargs: None)


# ------------------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("precision, grad_clip", [("fp32", None), ("bf16", None), ("bf16", 1.0)])
def test_a_non_finite_gradient_stops_the_run_before_the_weights_and_last_pt(tmp_path, precision, grad_clip):
    """Only the loss was checked: a NaN gradient with a finite loss reached the weights and last.pt, and the next
    step's loss stopped the run, blaming the data, one step late."""
    model = Toy(bad_steps=(3,))
    with pytest.raises(NonFiniteGradientError, match=rf"^non-finite gradient in epoch 1, step 3 \(precision "
                                                     rf"{precision}\): the loss is finite.*\(first in w\)"):
        train(model, _items(), _cfg(precision=precision, grad_clip=grad_clip, checkpoint_every=1),
              output_dir=tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["progress"]["step"] == 2  # the step-2 checkpoint, not one of the refused step
    assert torch.isfinite(model.w).all() and torch.equal(saved["model"]["w"], model.w.detach())
    assert [r["step"] for r in _strict_records(tmp_path / "log.jsonl")] == [1, 2]
    assert issubclass(NonFiniteGradientError, T.NonFiniteLossError)  # it ends a run (and the command) as a NaN loss


# ------------------------------------------------------------------------------------- the fp16 GradScaler


def test_steps_the_fp16_grad_scaler_skips_are_recorded_counted_and_warned_once(tmp_path, fp16_on_cpu, caplog):
    """Skipped steps counted as steps without a word, and log.jsonl held a bare NaN grad_norm (not JSON)."""
    model = Toy(bad_steps=range(1, 12))  # inf/NaN gradients for 11 steps, then finite ones
    with caplog.at_level(logging.WARNING, logger="cirlab"):
        summary = train(model, _items(64), _cfg(precision="fp16", grad_clip=1.0, max_steps=13), output_dir=tmp_path)
    records = [r for r in _strict_records(tmp_path / "log.jsonl") if r["kind"] == "train"]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == list(range(1, 12))
    assert all(r["grad_norm"] is None for r in skipped)  # NaN written as null
    assert all(r["skipped"] is True for r in skipped) and "skipped" not in records[-1]
    assert summary["skipped_steps"] == 11 and summary["steps"] == 13
    assert json.loads((tmp_path / "train_summary.json").read_text())["skipped_steps"] == 11
    assert caplog.text.count("GradScaler skipped the last 10 optimizer steps in a row") == 1
    scaler = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 65536.0 / 2 ** 11  # halved once per skipped step


def test_a_run_without_the_grad_scaler_skips_nothing(tmp_path):
    summary = train(Toy(), _items(), _cfg(precision="bf16", max_steps=2), output_dir=tmp_path)
    assert summary["skipped_steps"] == 0
    assert not any("skipped" in r for r in _strict_records(tmp_path / "log.jsonl"))


# ------------------------------------------------------------------------------------- precision on resume


def test_resuming_into_fp16_from_a_run_without_a_grad_scaler_starts_a_fresh_one(tmp_path, fp16_on_cpu, caplog):
    """A checkpoint of fp32/bf16/auto holds a disabled GradScaler's empty state: an fp16 resume crashed in torch's
    load_state_dict with a traceback."""
    train(Toy(), _items(), _cfg(precision="fp32", max_steps=2), output_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cirlab"):
        summary = train(Toy(), _items(), _cfg(precision="fp16", max_steps=4, resume="auto"), output_dir=tmp_path)
    assert summary["steps"] == 4
    assert "holds no GradScaler state (its steps were in fp32), so the loss scale starts afresh at 65536" in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("in precision fp16; its steps so far were taken in fp32: the run is no longer one uninterrupted run"
               in m for m in warned), warned
    scale = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale == 65536.0 / 2 ** summary["skipped_steps"]  # a live scaler from 65536 (it may skip a first step)


@pytest.mark.parametrize("older_checkpoint", [False, True])
def test_auto_resolving_to_another_precision_on_resume_is_a_warning(tmp_path, monkeypatch, caplog, older_checkpoint):
    """``auto`` is fp32 on a CPU and bf16 on a GPU with bf16: a CPU run resumed on such a GPU changed precision,
    and neither the config nor the log said so. A checkpoint from before the precision was stored in it is read
    through the run's provenance.json."""
    from cirlab.core.checkpoint import save_checkpoint

    train(Toy(), _items(), _cfg(max_steps=2), output_dir=tmp_path)  # auto on a CPU: fp32
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["precision"] == "fp32"
    if older_checkpoint:
        del state["precision"]
        save_checkpoint(last, state)
    monkeypatch.setattr(T, "cuda_native_bf16", lambda device: True)  # auto now resolves to bf16, as on such a GPU
    with caplog.at_level(logging.WARNING, logger="cirlab"):
        train(Toy(), _items(), _cfg(max_steps=3, resume="auto"), output_dir=tmp_path)
    assert ("in precision auto (bf16 on cpu); its steps so far were taken in fp32: the run is no longer one "
            "uninterrupted run") in caplog.text


def test_a_resume_in_the_same_precision_says_nothing_of_it(tmp_path, caplog):
    train(Toy(), _items(), _cfg(precision="bf16", max_steps=2), output_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cirlab"):
        train(Toy(), _items(), _cfg(precision="bf16", max_steps=3, resume="auto"), output_dir=tmp_path)
    assert "uninterrupted" not in caplog.text and "GradScaler" not in caplog.text


# ------------------------------------------------------------------------------------- half-precision models


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_in_one_line_before_any_work(tmp_path, dtype):
    """model.half() failed deep in torch: a dtype mismatch in the first layer, or "Attempting to unscale FP16
    gradients"."""
    name = str(dtype).removeprefix("torch.")
    fix = r"cirlab keeps fp32 weights: call model\.float\(\) first \(half-precision training is train\.precision=bf16"
    torch.manual_seed(0)
    cir = cirlab.create_model("stub_cir", preset="tiny").to(dtype)
    with pytest.raises(InputError, match=rf"^train: stub_cir holds {name} weights \(6 parameter\(s\), e\.g\. "
                                         rf"image\.weight\); {fix}"):
        train(cir, TripletItems(16), _cfg(), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    itm = cirlab.create_model("stub_itm", preset="tiny").to(dtype)
    nothing = object()  # refused before the split is even looked at
    for call, model in ((evaluate_cir, cir), (score_split, cir), (evaluate_itm, itm), (score_itm, itm)):
        with pytest.raises(InputError, match=rf"^{call.__name__}: stub_\w+ holds {name} weights .*{fix}"):
            call(model, nothing)


def test_a_frozen_tower_kept_in_fp16_beside_fp32_weights_is_not_refused():
    """CaLa's and BLIP-2's frozen ViT may be kept in fp16 on purpose (the originals do): the tower casts its input,
    and the trainable weights stay fp32. A wholly frozen model is refused only when all of it is half."""
    torch.manual_seed(0)
    model = cirlab.create_model("cala", preset="tiny").eval()
    model.tower.encoder.half()
    T.refuse_low_precision_weights(model, "evaluate_cir")
    with torch.no_grad():
        assert torch.isfinite(model.encode_target(torch.rand(2, 3, 32, 32))).all()
    model.requires_grad_(False)
    T.refuse_low_precision_weights(model, "evaluate_cir")  # frozen, part fp16: passes
    model.half()
    with pytest.raises(InputError, match="^evaluate_cir: cala holds float16 weights"):
        T.refuse_low_precision_weights(model, "evaluate_cir")


# ------------------------------------------------------------------------------------- fp16 on a CPU


def test_fp16_on_a_cpu_is_refused_in_one_line_before_the_run_starts(tmp_path):
    """AMC's LSTM has no fp16 kernel on a CPU (a oneDNN traceback mid-step) while other models trained: fp16 autocast
    is refused on a CPU for every model."""
    torch.manual_seed(0)
    model = cirlab.create_model("stub_cir", preset="tiny")
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16: fp16 autocast is for CUDA; use bf16 or fp32 on a "
                                          r"CPU$"):
        train(model, TripletItems(16), _cfg(precision="fp16", device="cpu"), output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    T.check_precision("fp16", "cuda:0")  # a GPU's, and the CPU's bf16, are accepted
    T.check_precision("bf16", "cpu")


# ------------------------------------------------------------------------------------- auto on a GPU


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA card (none here) whose bf16 is native or emulated, as torch.cuda.is_bf16_supported answers."""
    card = {"native": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: card["native"] or including_emulation)
    return card


def test_auto_precision_is_bf16_only_on_a_gpu_with_bf16_in_hardware(fake_gpu, caplog):
    """``auto`` chose bf16 on every CUDA card: a V100 or T4 emulates it (slowly, without tensor cores)."""
    gpu = torch.device("cuda:0")
    assert T._autocast_dtype(TrainConfig(), gpu) == torch.bfloat16
    fake_gpu["native"] = False
    assert T._autocast_dtype(TrainConfig(), gpu) is None
    assert T._autocast_dtype(TrainConfig(precision="bf16"), gpu) == torch.bfloat16  # asked for: kept
    with caplog.at_level(logging.INFO, logger="cirlab"):
        T._say_auto_precision(TrainConfig(), gpu, None)
    assert "train.precision=auto: fp32 on cuda:0, which has no bf16 in hardware" in caplog.text
    assert T._autocast_dtype(TrainConfig(), torch.device("cpu")) is None


def test_dime_eval_dtype_auto_is_bf16_only_on_a_gpu_with_bf16_in_hardware(fake_gpu):
    from cirlab.models import dime as D

    torch.manual_seed(0)
    model = cirlab.create_model("dime", "tiny")
    gpu = torch.device("cuda")
    assert D.eval_dtype(model, gpu) == torch.bfloat16
    fake_gpu["native"] = False
    assert D.eval_dtype(model, gpu) == torch.float32
    assert model.eval_precision(gpu) == "float32"  # what the run records


def test_the_command_refuses_fp16_on_a_cpu_before_reading_data(tmp_path, caplog):
    """The refusal came from the trainer, after the data was read and the model built (long on real data)."""
    from cirlab.cli import main

    with caplog.at_level(logging.ERROR):
        assert main(["train", "amc_synthetic_tiny", "--set", "train.precision=fp16", "--set",
                     f"dataset.synthetic.out={tmp_path / 'never'}", "--output-dir", str(tmp_path / "run")]) == 2
    assert "fp16 autocast is for CUDA" in caplog.text
    assert not (tmp_path / "never").exists() and not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:torch.*is deprecated:DeprecationWarning")  # the older names, called here on purpose
def test_the_active_autocast_is_read_on_torch_before_2_4_too(monkeypatch):
    """is_autocast_enabled(device_type) and get_autocast_dtype came in torch 2.4 (pyproject allows 2.1): an older
    torch raised TypeError in every cached gallery encode and frozen AMC backbone pass."""
    from cirlab.core._search import autocast_dtype

    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        enabled = torch.is_autocast_enabled

        def old_is_autocast_enabled(*device):  # torch 2.1-2.3: no argument, and it means CUDA
            if device:
                raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
            return enabled("cuda")

        monkeypatch.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
        monkeypatch.delattr(torch, "get_autocast_dtype")
        assert autocast_dtype("cpu") == torch.bfloat16 and autocast_dtype("cuda") is None
