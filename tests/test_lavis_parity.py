"""LAVIS parity: cirlab reproduces LAVIS's BLIP retrieval model from a converted LAVIS state dict (no LAVIS here).

The fixtures in ``tests/fixtures/lavis/`` were written by ``tools/lavis_fixtures.py`` inside the separate LAVIS
environment (``make lavis lavis-fixtures``): a tiny random ``blip_retrieval`` model built by LAVIS 1.0.2's own
classes, its state dict, fixed inputs and LAVIS's outputs. ``lavis_fixtures.json`` holds the sizes and describes
every tensor. Every output must match to 1e-5 (fp32, absolute).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cirlab.models import blip_interop, lavis_interop
from cirlab.models.blip_rerank import BlipRerankConfig

FIXTURES = Path(__file__).parent / "fixtures" / "lavis"
ATOL = 1e-5
OUTPUTS = ["image_embeds", "image_feat", "text_embeds", "text_feat", "sims", "itm_logits", "grounded_embeds",
           "score_i2t", "score_t2i"]


def _manifest() -> dict:
    return json.loads((FIXTURES / "lavis_fixtures.json").read_text())


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name))


def _config(info: dict) -> BlipRerankConfig:
    s = info["sizes"]
    return BlipRerankConfig(image_size=s["image_size"], patch_size=s["patch_size"], vision_width=s["vision_width"],
                            vision_depth=s["vision_depth"], vision_heads=s["vision_heads"], vision_mlp=s["vision_mlp"],
                            text_width=s["text_width"], text_depth=s["text_depth"], text_heads=s["text_heads"],
                            text_intermediate=s["text_intermediate"], max_text_len=s["max_position_embeddings"],
                            embed_dim=s["embed_dim"])


@pytest.fixture(scope="module")
def blip() -> dict:
    info = _manifest()["models"]["blip_retrieval"]
    return {"info": info, "state": _load(info["files"]["state"]), "io": _load(info["files"]["io"])}


@torch.no_grad()
def cirlab_outputs(model: torch.nn.Module, heads: dict[str, torch.Tensor], io: dict) -> dict[str, torch.Tensor]:
    """LAVIS's outputs (as the fixture documents them) computed by the converted cirlab stage-I model."""
    model.eval()
    pixels, ids, mask = io["inputs.pixel_values"], io["inputs.input_ids"], io["inputs.attention_mask"]
    enc_ids = io["inputs.itm_input_ids"]
    head = lavis_interop.itm_head(heads).eval()
    image_embeds = model.image_tokens(pixels)
    image_feat = model.target_embedding(image_embeds)
    text_embeds = model.text_encoder(input_ids=ids, attention_mask=mask, is_decoder=False).last_hidden_state
    text_feat = lavis_interop.text_features(model, ids, mask)
    sims = image_feat @ text_feat.t()
    n = len(ids)
    itm, grounded = [], []
    for i in range(n):
        out = model.compose(image_embeds[i:i + 1].repeat(n, 1, 1), enc_ids, mask)
        itm.append(head(out[:, 0]))
        grounded.append(out[i])
    itm_logits = torch.stack(itm)
    score = itm_logits[..., 1] + sims
    return {"image_embeds": image_embeds, "image_feat": image_feat, "text_embeds": text_embeds,
            "text_feat": text_feat, "sims": sims, "itm_logits": itm_logits, "grounded_embeds": torch.stack(grounded),
            "score_i2t": score, "score_t2i": score.t()}


def _converted(blip: dict, **kwargs) -> tuple[torch.nn.Module, dict, lavis_interop.LavisReport]:
    info = blip["info"]
    model = lavis_interop.build_stage1(_config(info), vocab_size=info["sizes"]["vocab_size"])
    out, report = lavis_interop.convert_lavis_blip(blip["state"], model, source="fixture", **kwargs)
    heads = {k: out[k] for k in report.heads}
    return model, heads, report


@pytest.fixture(scope="module")
def parity(blip) -> dict[str, float]:
    model, heads, report = _converted(blip)
    assert report.ok, report.summary()
    ours = cirlab_outputs(model, heads, blip["io"])
    return {k: (ours[k], blip["io"][f"outputs.{k}"]) for k in OUTPUTS}


# ------------------------------------------------------------------------------------------------ fixture


def test_fixture_files_match_manifest():
    manifest = _manifest()
    for name, info in manifest["models"].items():
        for kind, file in info["files"].items():
            digest = hashlib.sha256((FIXTURES / file).read_bytes()).hexdigest()
            assert digest == info["sha256"][kind], f"{file} changed since tools/lavis_fixtures.py wrote it"
    assert manifest["versions"]["salesforce-lavis"] == "1.0.2"


@pytest.mark.parametrize("name", ["blip_retrieval", "blip2_pretrain", "blip2_pretrain_vitL"])
def test_fixture_io_is_described(name):
    """Every io tensor of every model (BLIP-2 ones too, for the BLIP-2 converter) has the documented shape/dtype."""
    info = _manifest()["models"][name]
    io = _load(info["files"]["io"])
    assert sorted(io) == sorted(info["io"])
    for key, spec in info["io"].items():
        assert list(io[key].shape) == spec["shape"] and str(io[key].dtype) == f"torch.{spec['dtype']}", key
    assert len(_load(info["files"]["state"])) == info["state_keys"]


# ------------------------------------------------------------------------------------------------ report


def test_convert_report_lists_loaded_ignored_and_heads(blip):
    model, heads, report = _converted(blip)
    state = blip["state"]
    assert report.ok and not report.unmatched and not report.missing and not report.mismatched
    momentum = [k for k in state if re.match(r"(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.", k)]
    assert sorted(report.ignored_groups["momentum encoder"]) == sorted(momentum) and momentum
    assert sorted(report.ignored_groups["ITC queue"]) == ["idx_queue", "image_queue", "queue_ptr", "text_queue"]
    assert report.ignored_groups["buffer"] == ["text_encoder.embeddings.position_ids"]
    assert report.heads == ["itm_head.bias", "itm_head.weight"]
    # every LAVIS key is accounted for exactly once
    accounted = len(report.loaded) + len(report.ignored) + len(report.heads)
    assert accounted == len(state), report.summary()
    assert "momentum encoder" in report.summary()
    # the returned state dict loads into a fresh model of the same sizes; the heads are extra keys
    out, _ = lavis_interop.convert_lavis_blip(state, source="fixture")
    fresh = lavis_interop.build_stage1(_config(blip["info"]), vocab_size=blip["info"]["sizes"]["vocab_size"])
    missing, unexpected = fresh.load_state_dict(out, strict=False)
    assert not missing and sorted(unexpected) == ["itm_head.bias", "itm_head.weight"]
    dropped, _ = lavis_interop.convert_lavis_blip(state, source="fixture", keep_heads=False)
    fresh.load_state_dict(dropped, strict=True)


def test_a_model_with_an_itm_head_takes_it(blip):
    """Forward-compatible: a stage I that has ``itm_head`` gets LAVIS's ITM head loaded instead of carried."""
    info = blip["info"]
    model = lavis_interop.build_stage1(_config(info), vocab_size=info["sizes"]["vocab_size"])
    model.itm_head = torch.nn.Linear(info["sizes"]["text_width"], 2)
    out, report = lavis_interop.convert_lavis_blip(blip["state"], model)
    assert report.ok and report.heads == [] and "itm_head.weight" in report.loaded
    assert torch.equal(model.itm_head.weight, blip["state"]["itm_head.weight"])
    back = lavis_interop.export_lavis_blip(model)
    assert torch.equal(back["itm_head.bias"], blip["state"]["itm_head.bias"])


def test_sizes_are_read_from_the_state_dict(blip):
    s = blip["info"]["sizes"]
    cfg = lavis_interop.lavis_blip_config(blip["state"], vision_heads=s["vision_heads"], text_heads=s["text_heads"])
    assert cfg == _config(blip["info"])
    assert lavis_interop.lavis_blip_sizes(blip["state"])["vocab_size"] == s["vocab_size"]
    # without a model or config the converter builds one from those sizes (heads: width // 64, here 1)
    out, report = lavis_interop.convert_lavis_blip(blip["state"])
    assert report.ok, report.summary()
    assert out["text_encoder.embeddings.word_embeddings.weight"].shape[0] == s["vocab_size"]


def test_load_lavis_checkpoint_file(blip, tmp_path):
    """A LAVIS ``torch.save({"model": sd})`` file (the layout of LAVIS's released .pth files) and a safetensors file."""
    path = tmp_path / "blip_retrieval_tiny.pth"
    torch.save({"model": blip["state"], "epoch": 3}, path)
    cfg = _config(blip["info"])
    for source in (path, FIXTURES / blip["info"]["files"]["state"]):
        model, heads, report = lavis_interop.load_lavis_blip(source, config=cfg)
        assert report.ok and report.source == str(source)
        assert sorted(heads) == ["itm_head.bias", "itm_head.weight"]
        ours = cirlab_outputs(model, heads, blip["io"])
        assert (ours["itm_logits"] - blip["io"]["outputs.itm_logits"]).abs().max() <= ATOL
    with pytest.raises(FileNotFoundError):
        lavis_interop.read_lavis_checkpoint(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", OUTPUTS)
def test_outputs_match_lavis(parity, name):
    ours, ref = parity[name]
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL}"


def test_state_dict_round_trips_to_lavis(blip):
    model, heads, _ = _converted(blip)
    back = lavis_interop.export_lavis_blip(model, heads=heads)
    state = blip["state"]
    queues = {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
    assert set(back) - set(state) == set()
    assert set(state) - set(back) <= queues | {k for k in state if k.endswith("position_ids")}
    for key, value in back.items():
        if re.match(r"(visual_encoder|text_encoder|vision_proj|text_proj)_m\.", key):
            main = re.sub(r"^(\w+?)_m\.", r"\1.", key)
            assert torch.equal(value, back[main]), key  # momentum = copy of the main weights
        else:
            assert torch.equal(value, state[key].reshape(value.shape)), key
    no_momentum = lavis_interop.export_lavis_blip(model, heads=heads, momentum=False)
    assert not any("_m." in k for k in no_momentum)


# ------------------------------------------------------------------------------------------------ it fails when wrong


def _max_diff(blip, model, heads) -> dict[str, float]:
    ours = cirlab_outputs(model, heads, blip["io"])
    return {k: (ours[k] - blip["io"][f"outputs.{k}"]).abs().max().item() for k in OUTPUTS}


def test_a_corrupted_mapping_rule_fails_parity(blip, monkeypatch):
    """Swap the ViT's norm1/norm2 rule in blip_interop's key map: every key still finds a home (the report is clean),
    but LAVIS's outputs are no longer reproduced."""
    rule = blip_interop.vit_key_to_cirlab
    swap = {"layer_norm1": "layer_norm2", "layer_norm2": "layer_norm1"}

    def corrupted(key: str) -> str | None:
        dest = rule(key)
        return re.sub(r"layer_norm[12]", lambda m: swap[m.group(0)], dest) if dest else dest

    assert corrupted("blocks.0.norm1.weight") == "encoder.layers.0.layer_norm2.weight"
    monkeypatch.setattr(blip_interop, "vit_key_to_cirlab", corrupted)
    model, heads, report = _converted(blip)
    assert report.ok, "the corruption is silent in the key bookkeeping"
    diffs = _max_diff(blip, model, heads)
    failing = [k for k in OUTPUTS if diffs[k] > ATOL]
    assert diffs["image_embeds"] > 100 * ATOL, diffs
    # everything downstream of the ViT fails; the text-only path does not touch the ViT
    assert sorted(failing) == sorted(set(OUTPUTS) - {"text_embeds", "text_feat"}), diffs


def test_loading_the_momentum_encoder_instead_fails_parity(blip):
    """The fixture's momentum encoders differ from the main ones, so a converter that took ``*_m`` would be caught."""
    swapped = {}
    for key, value in blip["state"].items():
        m = re.match(r"(visual_encoder|text_encoder|vision_proj|text_proj)(_m)?\.(.*)", key)
        if m:
            swapped[f"{m.group(1)}{'' if m.group(2) else '_m'}.{m.group(3)}"] = value
        else:
            swapped[key] = value
    model, heads, report = _converted({**blip, "state": swapped})
    assert report.ok
    diffs = _max_diff(blip, model, heads)
    assert min(diffs[k] for k in ("image_feat", "text_feat", "itm_logits")) > 100 * ATOL, diffs


# ------------------------------------------------------------------------------------------------ ITM head, text ITC


def _vocab_file(tmp_path: Path) -> Path:
    """The fixture's tokenizer vocabulary (``lavis_fixtures.json``: ``vocab``) as a vocab.txt."""
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(_manifest()["vocab"]) + "\n")
    return path


def _with_head(blip, **overrides) -> torch.nn.Module:
    info = blip["info"]
    cfg = BlipRerankConfig(**{**_config(info).to_dict(), "itm_head": True, "vocab_size": info["sizes"]["vocab_size"],
                              **overrides})
    model = lavis_interop.build_stage1(cfg)
    _, report = lavis_interop.convert_lavis_blip(blip["state"], model, source="fixture")
    assert report.ok and report.heads == [] and {"itm_head.weight", "itm_head.bias"} <= set(report.loaded)
    return model.eval()


def test_itm_head_is_off_by_default_and_frozen():
    from cirlab.models.blip_rerank import BlipRerankStage1

    plain = BlipRerankStage1(BlipRerankConfig.from_preset("tiny"))
    assert plain.itm_head is None and not any(k.startswith("itm_head.") for k in plain.state_dict())
    with pytest.raises(RuntimeError, match="no ITM head"):
        plain.itm_from_hidden(torch.zeros(1, 3, 32))
    headed = BlipRerankStage1(BlipRerankConfig.from_preset("tiny", itm_head=True))
    assert isinstance(headed.itm_head, torch.nn.Linear) and headed.itm_head.out_features == 2
    assert not any(p.requires_grad for p in headed.itm_head.parameters())  # stage I's loss never reaches it


def test_stage1_itm_head_and_text_features_match_lavis(blip):
    """``itm_from_hidden`` / ``text_embedding`` on the fixture's token ids: LAVIS's ITM logits and text-only ITC
    features (and so its similarities) to 1e-5."""
    model = _with_head(blip)
    io = blip["io"]
    pixels, ids, mask, enc_ids = (io[f"inputs.{k}"] for k in ("pixel_values", "input_ids", "attention_mask",
                                                                "itm_input_ids"))
    with torch.no_grad():
        image_embeds = model.image_tokens(pixels)
        text_feat = model.text_embedding(ids, mask)
        n = len(ids)
        itm = torch.stack([model.itm_from_hidden(model.compose(image_embeds[i:i + 1].repeat(n, 1, 1), enc_ids, mask))
                           for i in range(n)])
        sims = model.target_embedding(image_embeds) @ text_feat.t()
    for name, ours in (("text_feat", text_feat), ("itm_logits", itm), ("sims", sims)):
        torch.testing.assert_close(ours, io[f"outputs.{name}"], atol=ATOL, rtol=0, msg=name)


def test_itm_logits_and_text_features_from_raw_captions(blip, tmp_path):
    """From strings, with the fixture's vocabulary: cirlab's tokenisation gives LAVIS's ids (padded to the longest
    instead of 35), and ``itm_logits`` (pairs i, i) / ``text_features`` reproduce LAVIS's outputs."""
    model = _with_head(blip, vocab_file=str(_vocab_file(tmp_path)))
    io, captions = blip["io"], _manifest()["captions"]
    ids, mask = model.tokenize_text(captions)
    enc_ids, _ = model.tokenize(captions)
    width = ids.shape[1]
    assert torch.equal(ids, io["inputs.input_ids"][:, :width]) and torch.equal(
        mask, io["inputs.attention_mask"][:, :width])
    assert torch.equal(enc_ids, io["inputs.itm_input_ids"][:, :width])
    assert not io["inputs.attention_mask"][:, width:].any()
    with torch.no_grad():
        logits = model.itm_logits(io["inputs.pixel_values"], captions)
        feats = model.text_features(captions)
    diagonal = io["outputs.itm_logits"].diagonal().t()  # [B_img, B_txt, 2] -> the aligned pairs [B, 2]
    torch.testing.assert_close(logits, diagonal, atol=ATOL, rtol=0)
    torch.testing.assert_close(feats, io["outputs.text_feat"], atol=ATOL, rtol=0)


def test_converter_builds_the_head_when_asked(blip):
    """No model given: ``keep_heads=True`` builds stage I with ``itm_head`` (loaded, nothing carried);
    ``keep_heads=False`` builds it without one; a stage I with a head exports it back to LAVIS's names."""
    out, report = lavis_interop.convert_lavis_blip(blip["state"], source="fixture")
    assert report.ok and report.heads == [] and "itm_head.weight" in report.loaded
    assert torch.equal(out["itm_head.weight"], blip["state"]["itm_head.weight"])
    plain, report = lavis_interop.convert_lavis_blip(blip["state"], keep_heads=False, source="fixture")
    assert "itm_head.weight" not in plain and report.heads == ["itm_head.bias", "itm_head.weight"]
    model = _with_head(blip)
    back = lavis_interop.export_lavis_blip(model)
    assert torch.equal(back["itm_head.weight"], blip["state"]["itm_head.weight"])


def test_a_wrong_itm_head_fails_parity(blip):
    """Swapping the head's two rows (match <-> no match) keeps every shape: only the outputs catch it."""
    state = dict(blip["state"])
    state["itm_head.weight"] = state["itm_head.weight"].flip(0)
    state["itm_head.bias"] = state["itm_head.bias"].flip(0)
    model = _with_head({**blip, "state": state})
    io = blip["io"]
    with torch.no_grad():
        logits = model.itm_from_hidden(model.compose(model.image_tokens(io["inputs.pixel_values"]),
                                                     io["inputs.itm_input_ids"], io["inputs.attention_mask"]))
    assert (logits - io["outputs.itm_logits"].diagonal().t()).abs().max() > 100 * ATOL


def test_lavis_layout_detection(blip):
    from safetensors.torch import load_file

    assert lavis_interop.lavis_layout(blip["state"]) == "blip_retrieval"
    for name in ("blip2_pretrain", "blip2_pretrain_vitL"):
        info = _manifest()["models"][name]
        assert lavis_interop.lavis_layout(load_file(str(FIXTURES / info["files"]["state"]))) == "blip2"
    model_base_like = {**blip["state"], "text_decoder.cls.predictions.bias": torch.zeros(3)}
    assert lavis_interop.lavis_layout(model_base_like) is None  # BLIP's model_base.pth: the original converter's
    stage1_only = {k: v for k, v in blip["state"].items() if not re.match(r".*_m\.|.*queue|itm_head", k)}
    assert lavis_interop.lavis_layout(stage1_only) is None
