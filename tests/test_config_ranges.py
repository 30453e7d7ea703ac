"""Config values out of their range are refused as the config is read, in one line naming the file, the section and
the field, before any data is generated or any weights are built; the edge values that are valid still load.

Each case is a (bad, edge) pair for one field: the bad value once made a fork bomb (train.num_workers), a traceback
from torch or transformers (sizes of 0, dropout 1.5, heads not dividing a width), a "non-finite loss" steps later that
blamed the data (NaN or 0 temperatures), or a run that exited 0 having ignored it (rerank_k=-1)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from cirlab.core.errors import ConfigError
from cirlab.engine.runs import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _base(model: str) -> dict[str, Any]:
    """The tiny synthetic config of ``model``; the BLIP re-ranker's is CaLa's with the stage-I model."""
    if model == "blip":
        config = yaml.safe_load((CONFIGS / "cala_synthetic_tiny.yaml").read_text())
        return {**config, "model": "blip_rerank_stage1", "model_overrides": {}}  # no CaLa fields
    return yaml.safe_load((CONFIGS / f"{model}_synthetic_tiny.yaml").read_text())


def _write(tmp_path: Path, model: str, key: str, text: str) -> Path:
    """The tiny config of ``model`` with ``section.field`` set to the YAML value ``text``, as a user's file."""
    config = _base(model)
    section, field = key.split(".")
    config[section] = {**(config.get(section) or {}), field: yaml.safe_load(text)}
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# (model, section.field, bad value, valid edge value, what the refusal names)
CASES = [
    # finding 1: a worker-process or thread count far above the CPUs, and a bool that took any value
    ("amc", "train.num_workers", "1000000000", "4", "train.num_workers: must be <="),
    ("amc", "train.num_threads", "1000000000", "1", "train.num_threads: must be <="),
    ("amc", "train.ddp_find_unused_parameters", "abc", "true", "train.ddp_find_unused_parameters"),
    # finding 2: the re-ranker's counts where 0 means "the default", read as real settings when negative
    ("blip", "model_overrides.rerank_k", "-1", "0", "BlipRerankConfig.rerank_k"),
    ("blip", "model_overrides.pair_chunk", "-1", "0", "BlipRerankConfig.pair_chunk"),
    ("blip", "model_overrides.score_chunk", "0", "1", "BlipRerankConfig.score_chunk"),
    ("blip", "model_overrides.merge_linear_from", "-1", "0", "BlipRerankConfig.merge_linear_from"),
    # finding 3: sizes the old name rule missed (num_*, *_layers, *_width, *_freq, vocab_size), huge sizes, heads
    # that do not divide a width, items of a list of sizes
    ("dime", "model_overrides.num_head_imrc", "0", "1", "DIMEConfig.num_head_imrc"),
    ("amc", "model_overrides.num_layers", "0", "1", "AMCConfig.num_layers"),
    ("amc", "model_overrides.cnn_width", "0", "1", "AMCConfig.cnn_width"),
    ("hrem", "model_overrides.num_layers_enc", "0", "1", "HREMConfig.num_layers_enc"),
    ("cala", "model_overrides.cross_attention_freq", "0", "1", "CaLaConfig.cross_attention_freq"),
    ("cala", "model_overrides.vocab_size", "0", "100", "CaLaConfig.vocab_size"),
    ("cala", "model_overrides.qformer_heads", "3", "1", "qformer_heads 3"),
    ("blip", "model_overrides.text_heads", "3", "32", "text_heads 3"),
    ("amc", "model_overrides.embed_dim", "1000000000", "8", "AMCConfig.embed_dim"),
    ("amc", "model_overrides.image_size", "1000000000", "8192", "AMCConfig.image_size"),
    ("dime", "model_overrides.max_words", "1000000000", "512", "DIMEConfig.max_words"),
    ("cala", "model_overrides.tac_steps", "1000000", "0", "CaLaConfig.tac_steps"),
    ("blip", "model_overrides.vocab_size", "1000000000", "0", "BlipRerankConfig.vocab_size"),
    ("hrem", "model_overrides.topk", "1000000000", "1", "HREMConfig.topk"),
    ("cala", "model_overrides.clip_vision_layers", "[1, 0, 1, 1]", "[1, 1, 1, 1]", "clip_vision_layers[1]"),
    # finding 4: drop probabilities
    ("hrem", "model_overrides.dropout", "1.5", "0.0", "HREMConfig.dropout"),
    ("cala", "model_overrides.hca_dropout", "-0.1", "0.5", "CaLaConfig.hca_dropout"),
    ("blip", "model_overrides.frozen_vit_drop_path", "1.5", "0.1", "BlipRerankConfig.frozen_vit_drop_path"),
    # finding 5: NaN / inf anywhere, and scales and temperatures at 0 or below
    ("amc", "model_overrides.logit_scale", ".nan", "0.01", "AMCConfig.logit_scale: expected a finite number"),
    ("amc", "model_overrides.cls_weight", ".inf", "0", "AMCConfig.cls_weight: expected a finite number"),
    ("hrem", "model_overrides.temperature", "0", "0.001", "HREMConfig.temperature"),
    ("hrem", "model_overrides.sigma", "0", "0.5", "HREMConfig.sigma"),
    ("dime", "model_overrides.lambda_softmax", "-1", "9.0", "DIMEConfig.lambda_softmax"),
    ("cala", "model_overrides.qtm_scale", ".inf", "1.0", "CaLaConfig.qtm_scale"),
    ("blip", "model_overrides.temp_init", "0", "0.07", "BlipRerankConfig.temp_init"),
    # finding 6: CaLa's own lr, named where the user set it
    ("cala", "model_overrides.lr", "-1", "0", "model_overrides: CaLaConfig.lr"),
    ("cala", "model_overrides.lr", ".nan", "0.001", "model_overrides: CaLaConfig.lr"),
    # finding 7: a negative lr scale, and a training split the loader does not have
    ("hrem", "model_overrides.bert_lr_scale", "-1", "0", "HREMConfig.bert_lr_scale"),
    ("amc", "dataset.train_split", "nope", "train", "dataset.train_split"),
    # the rest of finding 7: settings nothing read (a test split only the protocol and `selection: paper` read, a
    # train.test_split the run replaced by dataset.test_split, a stage-I top-K for a model that ranks everything),
    # and slips by a factor of 1e17 in Adam's eps or the lr
    ("amc", "dataset.test_split", "nope", "test", "dataset.test_split"),
    ("amc", "dataset.val_split", "vall", "val", "dataset.val_split"),
    ("amc", "train.test_split", "nonsense", "test", "train.test_split"),
    ("amc", "eval.stage1_topk", "/nonexistent.npz", "''", "eval.stage1_topk"),
    ("amc", "train.eps", "1.0e+9", "1.0", "train.eps"),
    ("amc", "train.lr", "1.0e+4", "10", "train.lr"),
]


@pytest.mark.parametrize("model, key, bad, edge, names", CASES, ids=[f"{c[0]}-{c[1]}={c[2]}" for c in CASES])
def test_a_value_out_of_range_is_refused_in_one_line_and_the_edge_value_loads(tmp_path, model, key, bad, edge,
                                                                              names):
    path = _write(tmp_path, model, key, bad)
    message = _refusal(path)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message  # the file
    assert key.split(".")[0] in message and names in message, message  # the section and the field
    config = load_config(_write(tmp_path, model, key, edge))
    section, field = key.split(".")
    value = config[section][field]
    assert value == yaml.safe_load(edge) or (isinstance(value, float) and math.isnan(value)), value


def test_a_command_line_override_names_the_setting_and_the_field(tmp_path):
    """``--set`` values pass the same checks; the refusal names the override as given."""
    with pytest.raises(ConfigError, match=r"^--set model_overrides\.rerank_k=-1: model_overrides: "
                                          r"BlipRerankConfig\.rerank_k: expected a value >= 0, got -1"):
        load_config(_write(tmp_path, "blip", "model_overrides.rerank_k", "0"), ["model_overrides.rerank_k=-1"])


@pytest.mark.parametrize("setting", ["train.num_workers=1000000000", "model_overrides.num_head_imrc=0"])
def test_cirlab_train_refuses_before_generating_data_or_writing_the_run(tmp_path, monkeypatch, capsys, caplog,
                                                                         setting):
    """The fork bomb (``num_workers=1e9`` started ~1,800 worker processes) and the modulo by zero in DIME's config
    check (a traceback): ``cirlab train`` returns 2 with one line, and neither the synthetic data nor the run
    folder exists afterwards."""
    import cirlab.engine.train
    from cirlab.cli import main

    # the cap's source: without it (code before the cap) the test stops here instead of starting the fork bomb
    monkeypatch.setattr(cirlab.engine.train, "available_cpus", lambda: 2)
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "dime_synthetic_tiny.yaml"), "--set", setting, "--output-dir", str(out)]) == 2
    field = setting.split("=")[0].split(".")[1]
    output = capsys.readouterr().err + caplog.text
    assert [line for line in output.splitlines() if field in line] and "Traceback" not in output, output
    assert not out.exists() and not (tmp_path / "cache" / "synthetic").exists()


def test_a_modulo_by_zero_in_a_config_check_is_a_config_error(tmp_path, monkeypatch):
    """A config class's own check that divides by a field (``embed_size % heads``) reaches `cirlab train` as one
    line, not as a ZeroDivisionError traceback."""
    import cirlab.models.registry as registry

    def divide(*args: Any, **kwargs: Any) -> Any:
        return 32 % 0

    monkeypatch.setattr(registry, "build_config", divide)
    with pytest.raises(ConfigError, match=r"model_overrides: integer (division or )?modulo by zero"):
        load_config(CONFIGS / "dime_synthetic_tiny.yaml")


@pytest.mark.parametrize("cls_name, field, bad", [
    ("AMCConfig", "ffn_ratio", 0.0), ("DIMEConfig", "margin", float("nan")), ("HREMConfig", "dropout", 1.5),
    ("CaLaConfig", "vision_heads", 0), ("BlipRerankConfig", "score_chunk", 0)])
def test_a_config_built_directly_checks_its_ranges_too(cls_name, field, bad):
    """Not only presets and config files: ``HREMConfig(dropout=1.5)`` in a notebook is refused naming the field."""
    import importlib

    module = {"AMCConfig": "amc", "DIMEConfig": "dime", "HREMConfig": "hrem", "CaLaConfig": "cala",
              "BlipRerankConfig": "blip_rerank"}[cls_name]
    cls = getattr(importlib.import_module(f"cirlab.models.{module}"), cls_name)
    with pytest.raises(ValueError, match=rf"{cls_name}\.{field}"):
        cls(**{field: bad})


@pytest.mark.parametrize("cls_name, field, bad, says", [
    ("AMCConfig", "backbone", "resnet", "did you mean 'resnet50'?"),
    ("DIMEConfig", "eval_dtype", "bf-16", "did you mean 'bf16'?"),
    ("HREMConfig", "gnn_loss", "vse2", "did you mean 'vse'?"),
    ("CaLaConfig", "loss_form", "Paper", "expected one of"),
    ("BlipRerankConfig", "dataset", "CIRR", "did you mean 'cirr'?")])
def test_a_choice_out_of_its_list_is_refused_alike_in_every_model_config(cls_name, field, bad, says):
    """One rule for every model's choice fields: the field, the value, the choices and the nearest spelling, as a
    config error (the five configs once each worded it their own way, without the hint)."""
    import importlib

    from cirlab.core.config import FieldValueError

    module = {"AMCConfig": "amc", "DIMEConfig": "dime", "HREMConfig": "hrem", "CaLaConfig": "cala",
              "BlipRerankConfig": "blip_rerank"}[cls_name]
    cls = getattr(importlib.import_module(f"cirlab.models.{module}"), cls_name)
    with pytest.raises(FieldValueError, match=rf"^{cls_name}\.{field}: expected one of .*, got {bad!r}") as caught:
        cls(**{field: bad})
    assert says in str(caught.value)


@pytest.mark.parametrize("cls_name, settings, says", [
    ("AMCConfig", {"embed_dim": 64, "num_heads": 3}, "embed_dim 64 is not divisible by num_heads 3"),
    ("DIMEConfig", {"embed_size": 32, "num_head_imrc": 5}, "embed_size 32 is not divisible by num_head_imrc 5"),
    ("HREMConfig", {"embed_size": 32, "nhead": 5}, "embed_size 32 is not divisible by nhead 5")])
def test_a_width_its_heads_do_not_divide_is_a_config_error_naming_both_fields(cls_name, settings, says):
    import importlib

    from cirlab.core.config import FieldValueError

    cls = getattr(importlib.import_module(f"cirlab.models.{cls_name[:-6].lower()}"), cls_name)
    with pytest.raises(FieldValueError, match=f"{cls_name}: {says}"):
        cls(**settings)


def test_every_preset_of_every_model_still_builds_and_every_shipped_config_loads():
    """The ranges refuse no value a preset or a shipped config uses (run with the tests above, which fail before
    the ranges existed)."""
    from cirlab.core.config import field_bound
    from cirlab.models.registry import build_config, get_entry, list_models, list_presets

    for model in list_models():
        for preset in list_presets(model):
            build_config(model, preset)
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path)
    assert field_bound(get_entry("hrem").config_cls, "bert_lr_scale") is not None


@pytest.mark.parametrize("settings, total, says", [
    ({"warmup_steps": 1000, "max_steps": 6}, 6, "train.warmup_steps=1000 covers the whole run (6 optimizer steps)"),
    ({"schedule": "constant", "min_lr": 1e-6, "lr_milestones": [3]}, 100,
     "train.schedule='constant' does not read train.lr_milestones=[3], train.min_lr=1e-06"),
    ({"schedule": "step", "lr_step_size": 5, "lr_milestones": [40]}, 100, "lr_step_size=5 is used instead"),
])
def test_settings_that_do_nothing_are_warned_about(settings, total, says):
    """Warnings, not errors: a model's paper recipe fills in its schedule's fields, so a run that only changes
    ``train.schedule`` carries them; the same settings read by their schedule say nothing."""
    from cirlab.engine.train import TrainConfig, setting_warnings

    assert any(says in w for w in setting_warnings(TrainConfig(**settings), total)), \
        setting_warnings(TrainConfig(**settings), total)
    fine = [TrainConfig(warmup_steps=5, max_steps=6), TrainConfig(schedule="cosine", min_lr=1e-6),
            TrainConfig(schedule="step", lr_milestones=[3]), TrainConfig(schedule="step", lr_step_size=5)]
    assert all(not setting_warnings(cfg, 6) for cfg in fine)


def test_a_recipes_own_schedule_fields_are_not_warned_about():
    """A tiny config's constant schedule carries AMC's recipe milestones ([40]): the user chose none of them, and every
    run warned; the same value set by the user under that schedule is still said."""
    from cirlab.engine.train import TrainConfig, setting_warnings

    cfg = TrainConfig(schedule="constant", lr_milestones=[40], cosine_epochs=15)
    assert setting_warnings(cfg, 100, recipe={"schedule": "step", "lr_milestones": [40], "cosine_epochs": 15}) == []
    said = setting_warnings(cfg, 100, recipe={"lr_milestones": [40]})
    assert len(said) == 1 and "cosine_epochs=15" in said[0] and "lr_milestones" not in said[0]


def test_a_users_own_config_keeps_its_zeros_for_off():
    """The wide naming rule (lengths, counts, frequencies >= 1) was applied to a user's registered config too: its
    `max_len=0` ("no truncation") or `num_negatives=0` was refused as "a positive size". Only cirlab's own configs
    follow it (NAME_RANGES); widths, heads and NaN are refused for every config, as before."""
    import dataclasses

    from cirlab.core.config import FieldValueError, PresetMixin, check_field_ranges

    @dataclasses.dataclass
    class MyConfig(PresetMixin):
        dim: int = 8
        max_len: int = 0
        num_negatives: int = 0
        log_freq: int = 0
        dropout: float = 0.0

    check_field_ranges(MyConfig, vars(MyConfig()))
    for bad in ({"dim": 0}, {"dropout": float("nan")}):
        with pytest.raises(FieldValueError, match=f"MyConfig.{next(iter(bad))}"):
            check_field_ranges(MyConfig, vars(MyConfig(**bad)))
    from cirlab.models.hrem import HREMConfig

    with pytest.raises(FieldValueError, match="num_layers_enc"):
        HREMConfig.from_preset("tiny", num_layers_enc=0)
