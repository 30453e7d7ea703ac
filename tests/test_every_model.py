"""Every registered model, through the same contract: a new model gets these checks by registering.

For each name in ``cirlab.list_models()``: the ``tiny`` preset builds and satisfies its task's protocol; one
training step on synthetic data gives a finite loss whose gradient reaches trainable weights; a trace block
records the router's emissions (for models that declare ``trace_kind``); the engine evaluates it on synthetic
data with its task's protocol; and a checkpoint round trip rebuilds a model with identical outputs.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import cirlab
from cirlab.core.checkpoint import save_checkpoint
from cirlab.core.contracts import TASK_PROTOCOLS, Model, TracedModel, check_model
from cirlab.engine import runs
from cirlab.engine.train import _model_meta

MODELS = cirlab.list_models(shipped=True)  # not the stub models other test modules register


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cirlab.data.generators import synthetic

    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, seed=0, size="tiny", image_size=32)
    return root


def _config(name: str, synth: Path) -> dict:
    task = cirlab.registry.get_entry(name).task
    if task == "itm":
        ds = {"name": "f30k", "root": str(synth / "precomp"), "val_split": "dev", "options": {"dim": None}}
    else:
        ds = {"name": "fashioniq", "root": str(synth / "fashioniq"), "category": "dress"}
    config = runs.with_defaults({"name": name, "model": name, "preset": "tiny", "dataset": ds,
                                 "eval": {"k": 5, "batch_size": 16, "shard_size": 16}})
    fields = {f.name for f in dataclasses.fields(cirlab.registry.get_entry(name).config_cls)}
    if task == "itm" and "img_dim" in fields:  # the synthetic precomp features' size
        feats = np.load(synth / "precomp" / "f30k_precomp" / "train_ims.npy", mmap_mode="r")
        config["model_overrides"] = {"img_dim": int(feats.shape[-1])}
    return config


def _model(name: str, config: dict):
    torch.manual_seed(0)
    model = runs.build_model(config)
    runs.fit_to_training_data(model, config)
    return model


def _batch(model, config: dict, n: int = 4) -> dict:
    dataset = runs.train_dataset(config, model)
    return torch.utils.data.default_collate([dataset[i] for i in range(n)])


@pytest.mark.parametrize("name", MODELS)
def test_tiny_preset_satisfies_its_task_protocol(name):
    model = cirlab.create_model(name, "tiny")
    check_model(model)
    assert isinstance(model, Model) and isinstance(model, TASK_PROTOCOLS[model.task])
    assert model.model_name == name and model.task == cirlab.registry.get_entry(name).task
    protocol = TASK_PROTOCOLS[model.task]  # the protocol's argument names, so keyword calls work on every model
    for method in ("encode_query", "encode_target", "encode_image", "encode_text", "score"):
        if hasattr(protocol, method):
            want = list(inspect.signature(getattr(protocol, method)).parameters)[1:]
            assert list(inspect.signature(getattr(model, method)).parameters)[:len(want)] == want, method


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_learns_something(name, synth):
    config = _config(name, synth)
    model = _model(name, config).train()
    terms = model.training_step(_batch(model, config))
    loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_trace_records_what_the_model_declares(name, synth):
    config = _config(name, synth)
    model = _model(name, config).eval()
    with torch.no_grad(), cirlab.trace_routes(model) as trace:
        _infer(model, config)
    frame = trace.to_frame()
    if isinstance(model, TracedModel):
        assert len(frame) > 0 and set(frame["layer"]) and frame["weight"].notna().all()
    else:
        assert len(frame) == 0  # nothing is recorded for a model without routers


@pytest.mark.parametrize("name", MODELS)
def test_engine_evaluates_it_on_synthetic_data(name, synth, tmp_path):
    config = _config(name, synth)
    model = _model(name, config).eval()
    if model.task == "rerank":
        # a re-ranker scores a first stage's top-K; its end-to-end evaluation is in test_rerank_pipeline
        scores = _infer(model, config)
        assert scores.shape == (2, 3) and torch.isfinite(scores).all()
        return
    split = config["dataset"]["val_split"]
    result = runs.evaluate_split(model, config, split, topk_dir=tmp_path)
    metrics = result["metrics"]
    assert set(metrics) == runs.reported_metric_names(config, runs.load_split(config, split), split)
    assert all(0.0 <= v <= 100.0 * 6 for v in metrics.values())


def _infer(model, config: dict) -> torch.Tensor:
    """The task's inference path on two synthetic queries."""
    if model.task == "itm":
        split = runs.load_split(config, "dev")
        return model.score(model.encode_image(split.features(0)[None]), model.encode_text(split.captions[:2]))
    batch = _batch(model, config, n=2)
    if model.task == "cir":
        return model.encode_query(batch["ref_image"], batch["text"])
    split = runs.load_split(config, "val")[0]
    images = torch.stack([split.gallery_dataset(model.image_transform(False))[i]["image"] for i in range(3)])
    model.attach_gallery(_TinyStore(model, images))
    queries = {"ref_image": batch["ref_image"], "text": batch["text"]}
    return model.score_candidates(queries, torch.tensor([[0, 1, 2], [2, 1, 0]]))


class _TinyStore:
    """A stand-in gallery token store for the contract check (the real one is built from a split)."""

    def __init__(self, model, images):
        with torch.no_grad():
            self.tokens = model.stage1.image_tokens(images)

    def take(self, idx):
        return self.tokens[torch.as_tensor(idx)]


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip_rebuilds_the_same_model(name, synth, tmp_path):
    config = _config(name, synth)
    model = _model(name, config).eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), **_model_meta(model)})
    rebuilt, meta = runs.model_from_checkpoint(path)
    rebuilt.eval()
    assert type(rebuilt) is type(model) and meta["model_name"] == name
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and (torch.equal(a, b) if torch.is_tensor(a) else a == b), k  # extra state: vocabularies
    with torch.no_grad():
        if model.task == "itm":
            split = runs.load_split(config, "dev")
            feats, texts = split.features(0)[None], split.captions[:3]
            before = model.score(model.encode_image(feats), model.encode_text(texts))
            after = rebuilt.score(rebuilt.encode_image(feats), rebuilt.encode_text(texts))
        else:
            batch = _batch(model, config, n=2)
            stage = model.stage1 if model.task == "rerank" else model
            stage_rebuilt = rebuilt.stage1 if model.task == "rerank" else rebuilt
            before = stage.encode_query(batch["ref_image"], batch["text"])
            after = stage_rebuilt.encode_query(batch["ref_image"], batch["text"])
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_create_model_from_a_config_takes_overrides_and_refuses_what_it_cannot_use():
    """`create_model(config=..., **overrides)` applies the overrides (it used to ignore them); a dict config works;
    another model's config, a preset beside a config and a negative width are one-line config errors."""
    from cirlab.core.errors import ConfigError
    from cirlab.models.registry import build_config, create_model

    base = build_config("hrem", "tiny")
    model = create_model("hrem", config=base, embed_size=base.embed_size * 2)
    assert model.config.embed_size == base.embed_size * 2 and base.embed_size != model.config.embed_size
    assert create_model("hrem", config=dataclasses.asdict(base)).config == base
    with pytest.raises(ConfigError, match=r"config must be its HREMConfig or a dict of its fields, got DIMEConfig"):
        create_model("hrem", config=build_config("dime", "tiny"))
    with pytest.raises(ConfigError, match="pass a preset or a config, not both"):
        create_model("hrem", "tiny", config=base)
    with pytest.raises(ConfigError, match=r"HREMConfig\.embed_size: expected a positive size, got -4"):
        create_model("hrem", "tiny", embed_size=-4)
    with pytest.raises(ConfigError, match=r"HREMConfig\.nhead: expected a positive size, got 0"):
        create_model("hrem", config=base, nhead=0)
    # a negative warm-up was accepted by HREM and read as none (DIME refused its own); every model's counts now
    for name, field in (("hrem", "vse_mean_warmup_epochs"), ("dime", "vse_mean_warmup_epochs"),
                        ("hrem", "warmup_iters"), ("cala", "tac_steps")):
        with pytest.raises(ConfigError, match=rf"Config\.{field}: expected a count >= 0, got -1"):
            create_model(name, "tiny", **{field: -1})
    assert create_model("hrem", "tiny", vse_mean_warmup_epochs=0).config.vse_mean_warmup_epochs == 0
    # a file setting the rest of the config never reads was ignored without a word (GloVe with random word vectors,
    # backbone weights without pretrained, a BERT vocabulary for CaLa's CLIP path)
    for name, fields, reader in (("amc", {"glove_path": "g.txt", "word_vectors": "random"}, "word_vectors='glove'"),
                                 ("amc", {"backbone_weights": "r.pth", "pretrained": False}, "pretrained=True"),
                                 ("cala", {"vocab_file": "v.txt", "backbone": "clip_rn50x4"}, "backbone='blip2'")):
        field = next(iter(fields))
        with pytest.raises(ValueError, match=rf"Config\.{field}='.*' is read only with {re.escape(reader)}"):
            build_config(name, "tiny", **fields)
    with pytest.raises(ConfigError, match=r"unknown field 'embed_sise' \(did you mean 'embed_size'\?\)"):
        create_model("hrem", config=base, embed_sise=8)
