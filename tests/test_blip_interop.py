"""Checkpoint interop (cirlab.models.blip_interop) on state dicts generated in the original BLIP layouts.

The layouts below are written from the original module structure (BLIP https://github.com/salesforce/BLIP vit.py /
med.py, https://github.com/Cuberick-Orion/Candidate-Reranking-CIR nlvr_encoder.py / blip_stage2.py), independently of
cirlab's own exporter. The init_from tests start models from such files, from a transformers BLIP folder, and from
wrong files.
"""
from __future__ import annotations

import pytest
import torch

import cirlab
from cirlab.models import blip_interop as bi

TEXTS = ["is red", "has two dogs and a cat"]


def tiny(stage: str, seed: int = 0):
    torch.manual_seed(seed)
    return cirlab.create_model(f"blip_rerank_{stage}", preset="tiny")


def vit_layout(c) -> dict[str, tuple]:
    d, m, p = c.vision_width, c.vision_mlp, c.patch_size
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, c.num_image_tokens, d), "patch_embed.proj.weight": (d, 3, p, p),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(c.vision_depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (m, d),
                       b + "mlp.fc1.bias": (m,), b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,)})
    return {"visual_encoder." + k: v for k, v in shapes.items()}


def _att(prefix: str, d: int, kv: int, selves=("self",), dense=("dense",), norms=("LayerNorm",)) -> dict:
    out = {}
    for s in selves:
        out.update({f"{prefix}.{s}.query.weight": (d, d), f"{prefix}.{s}.query.bias": (d,),
                    f"{prefix}.{s}.key.weight": (d, kv), f"{prefix}.{s}.key.bias": (d,),
                    f"{prefix}.{s}.value.weight": (d, kv), f"{prefix}.{s}.value.bias": (d,)})
    for n in dense:
        out.update({f"{prefix}.output.{n}.weight": (d, d), f"{prefix}.output.{n}.bias": (d,)})
    for n in norms:
        out.update({f"{prefix}.output.{n}.weight": (d,), f"{prefix}.output.{n}.bias": (d,)})
    return out


def med_layout(c, twin: bool = False) -> dict[str, tuple]:
    d, f, v = c.text_width, c.text_intermediate, 30524
    shapes = {"embeddings.word_embeddings.weight": (v, d), "embeddings.position_embeddings.weight": (c.max_text_len, d),
              "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
              "embeddings.position_ids": (1, c.max_text_len)}
    kw = dict(selves=("self0", "self1"), dense=("dense0", "dense1"), norms=("LayerNormA", "LayerNormB")) if twin else {}
    for i in range(c.text_depth):
        b = f"encoder.layer.{i}."
        shapes.update(_att(b + "attention", d, d, **kw))
        shapes.update(_att(b + "crossattention", d, c.vision_width, **kw))
        if twin and i >= c.merge_linear_from:
            shapes.update({b + "crossattention.output.merge_layer.weight": (d, 2 * d),
                           b + "crossattention.output.merge_layer.bias": (d,)})
        shapes.update({b + "intermediate.dense.weight": (f, d), b + "intermediate.dense.bias": (f,),
                       b + "output.dense.weight": (d, f), b + "output.dense.bias": (d,),
                       b + "output.LayerNorm.weight": (d,), b + "output.LayerNorm.bias": (d,)})
    return {"text_encoder." + k: v for k, v in shapes.items()}


def stage1_layout(c) -> dict[str, tuple]:
    e = c.embed_dim
    return {**vit_layout(c), **med_layout(c), "vision_proj.weight": (e, c.vision_width), "vision_proj.bias": (e,),
            "text_proj.weight": (e, c.text_width), "text_proj.bias": (e,), "temp": ()}


def stage2_layout(c) -> dict[str, tuple]:
    d = c.text_width
    return {**vit_layout(c), **med_layout(c, twin=True), "cls_head.0.weight": (d, 2 * d), "cls_head.0.bias": (d,),
            "cls_head.2.weight": (2, d), "cls_head.2.bias": (2,)}


def random_state(layout: dict[str, tuple], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        out[k] = (torch.arange(shape[-1]).expand(shape).clone() if k.endswith("position_ids")
                  else 0.02 * torch.randn(shape, generator=g) + (1.0 if k.endswith(("norm1.weight", "LayerNorm.weight"))
                                                                  else 0.0))
    out["temp"] = torch.tensor(0.05) if "temp" in out else None
    return {k: v for k, v in out.items() if v is not None}


def stage1_outputs(m, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    m.eval()
    return m.encode_query(imgs, TEXTS), m.encode_target(imgs)


# ------------------------------------------------------------------------------------------------ stage I


def test_stage1_original_layout_loads_strictly_into_the_right_modules():
    m = tiny("stage1")
    state = random_state(stage1_layout(m.config))
    report = bi.convert_stage1(state, m, strict=True)
    assert report.ok and report.ignored == ["text_encoder.embeddings.position_ids"]
    sd = m.state_dict()
    torch.testing.assert_close(sd["visual_encoder.encoder.layers.1.self_attn.qkv.weight"],
                               state["visual_encoder.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(sd["visual_encoder.embeddings.class_embedding"], state["visual_encoder.cls_token"])
    torch.testing.assert_close(sd["visual_encoder.post_layernorm.bias"], state["visual_encoder.norm.bias"])
    torch.testing.assert_close(sd["text_encoder.encoder.layer.0.crossattention.self.key.weight"],
                               state["text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    assert float(m.temp.detach()) == pytest.approx(0.05)


def test_stage1_round_trip_file_keeps_outputs(tmp_path):
    src = tiny("stage1", seed=5)
    exported = bi.export_stage1(src)
    layout = stage1_layout(src.config)
    layout.pop("text_encoder.embeddings.position_ids")  # a buffer cirlab does not persist
    assert {k: tuple(v.shape) for k, v in exported.items()} == layout
    path = tmp_path / "blip_mean.pt"
    torch.save({"epoch": 3, "BLIP_Retrieval": exported, "optimizer_state_dict": {}}, path)
    dst = tiny("stage1", seed=9)
    before = stage1_outputs(dst)
    report = bi.load_original_checkpoint(path, dst, strict=True)
    assert report.ok and len(report.loaded) == len(layout)
    for a, b in zip(stage1_outputs(src), stage1_outputs(dst)):
        torch.testing.assert_close(a, b)
    assert (before[0] - stage1_outputs(dst)[0]).abs().max() > 1e-3  # the load did change the model


def test_model_base_extras_are_reported_and_strict_raises():
    m = tiny("stage1")
    state = random_state(stage1_layout(m.config))
    state.update({"text_decoder.bert.embeddings.word_embeddings.weight": torch.zeros(3, 2),
                  "visual_encoder_m.cls_token": torch.zeros(1), "image_queue": torch.zeros(2, 2),
                  "visual_encoder.blocks.0.attn.unknown": torch.zeros(1)})
    del state["text_proj.bias"]
    report = bi.convert_stage1(state, m, strict=False)
    assert sorted(report.unmatched) == ["image_queue", "text_decoder.bert.embeddings.word_embeddings.weight",
                                        "visual_encoder.blocks.0.attn.unknown", "visual_encoder_m.cls_token"]
    assert report.missing == ["text_proj.bias"]
    with pytest.raises(bi.InteropError, match="image_queue") as err:
        bi.convert_stage1(state, tiny("stage1"), strict=True)
    assert "text_proj.bias" in str(err.value)


def test_shape_mismatch_reported_and_pos_embed_resized():
    m = tiny("stage1")
    state = random_state(stage1_layout(m.config))
    state["text_proj.weight"] = torch.zeros(3, 3)
    state["visual_encoder.pos_embed"] = torch.randn(1, 1 + 8 * 8, m.config.vision_width)  # 8x8 grid -> 4x4
    report = bi.convert_stage1(state, m, strict=False)
    assert report.mismatched == [("text_proj.weight", (3, 3), (16, 32))]
    assert "visual_encoder.embeddings.position_embedding" in report.loaded
    pos = m.visual_encoder.embeddings.position_embedding
    torch.testing.assert_close(pos[:, 0], state["visual_encoder.pos_embed"][:, 0])  # CLS position kept


def test_pickled_checkpoint_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"a": torch.zeros(1)}, "obj": bi.InteropReport()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt contains pickled Python objects .* re-save its weights alone"):
        bi.read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        bi.read_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------ stage II


def stage2_scores(m):
    g = torch.Generator().manual_seed(4)
    m.eval()
    ids, mask = m.stage1.tokenize(TEXTS)
    z = torch.randn(2, ids.shape[1], m.config.text_width, generator=g)
    cand = m.stage1.image_tokens(torch.randn(2, 3, 32, 32, generator=g))
    with torch.no_grad():
        return m.pair_scores(z, ids, mask, cand)


def test_stage2_original_layout_strict_and_round_trip(tmp_path):
    m = tiny("stage2")
    state = random_state(stage2_layout(m.config))
    report = bi.convert_stage2(state, m, strict=True)
    assert report.ok
    layer = m.text_encoder.layers[1]
    torch.testing.assert_close(layer.crossattention[1].self.value.weight,
                               state["text_encoder.encoder.layer.1.crossattention.self1.value.weight"])
    torch.testing.assert_close(layer.attention[1].output.LayerNorm.bias,
                               state["text_encoder.encoder.layer.1.attention.output.LayerNormB.bias"])
    merge = state["text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight"]
    torch.testing.assert_close(layer.merge.weight, merge)
    # round trip: cirlab -> original file -> a fresh cirlab model, same scores
    exported = bi.export_stage2(m)
    layout = stage2_layout(m.config)
    layout.pop("text_encoder.embeddings.position_ids")
    assert {k: tuple(v.shape) for k, v in exported.items()} == layout
    path = tmp_path / "stage2.pt"
    torch.save({"epoch": 0, "BLIP_NLVR": exported}, path)
    fresh = tiny("stage2", seed=7)
    fresh.stage1.load_state_dict(m.stage1.state_dict())  # the stage-I text encoder comes from the stage-I file
    assert bi.load_original_checkpoint(path, fresh, strict=True).ok
    torch.testing.assert_close(stage2_scores(fresh), stage2_scores(m))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_export_of_a_vit_key_with_no_original_name_is_a_clear_key_error(monkeypatch, stage):
    # a ViT tensor added without a table entry: both exporters name the key (stage II used to fail on str + None)
    m = tiny(stage)
    table = bi.vit_key_to_original
    monkeypatch.setattr(bi, "vit_key_to_original",
                        lambda key: None if key == "embeddings.class_embedding" else table(key))
    export = bi.export_stage1 if stage == "stage1" else bi.export_stage2
    with pytest.raises(KeyError, match="no original name for .*visual_encoder.embeddings.class_embedding"):
        export(m)


def test_model_base_into_stage2_duplicates_streams():
    m = tiny("stage2")
    c = m.config
    state = random_state({**vit_layout(c), **med_layout(c)})  # single-stream MED, as in model_base.pth
    report = bi.convert_stage2(state, m, strict=False)
    assert not report.unmatched
    assert sorted(report.missing) == sorted(["cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight",
                                             "cls_head.2.bias", "text_encoder.layers.1.merge.weight",
                                             "text_encoder.layers.1.merge.bias"])  # random-init, as the original
    for i in range(c.text_depth):
        layer = m.text_encoder.layers[i]
        for block in ("attention", "crossattention"):
            src = state[f"text_encoder.encoder.layer.{i}.{block}.self.query.weight"]
            a, b = getattr(layer, block)
            torch.testing.assert_close(a.self.query.weight, src)
            torch.testing.assert_close(b.self.query.weight, src)
            ln = state[f"text_encoder.encoder.layer.{i}.{block}.output.LayerNorm.weight"]
            torch.testing.assert_close(b.output.LayerNorm.weight, ln)
    with pytest.raises(bi.InteropError, match="merge"):
        bi.convert_stage2(state, tiny("stage2"), strict=True)


# ------------------------------------------------------------------------------------------------ init_from


def model_base_file(path, config, seed: int = 1):
    """A ``model_base.pth``-style file for ``config``: ``{"model": sd}`` with the pre-training parts stage I ignores."""
    state = random_state(stage1_layout(config), seed=seed)
    state.update({"text_decoder.bert.embeddings.word_embeddings.weight": torch.zeros(3, 2),
                  "visual_encoder_m.cls_token": torch.zeros(1, 1, config.vision_width),
                  "image_queue": torch.zeros(2, 4), "itm_head.weight": torch.zeros(2, config.text_width)})
    torch.save({"model": state}, path)
    return state


def test_init_from_original_blip_file_loads_like_the_python_converter(tmp_path):
    import json

    path = tmp_path / "model_base.pth"
    state = model_base_file(path, tiny("stage1").config)
    torch.manual_seed(11)
    started = cirlab.create_model("blip_rerank_stage1", preset="tiny", init_from=str(path))
    reports = started.load_init(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert saved["init_from"] == str(path) and len(saved["reports"]) == 1
    report = saved["reports"][0]
    assert report["missing"] == [] and report["mismatched"] == []  # every key stage I uses came from the file
    assert sorted(report["unmatched"]) == ["image_queue", "itm_head.weight",
                                           "text_decoder.bert.embeddings.word_embeddings.weight",
                                           "visual_encoder_m.cls_token"]
    assert report["loaded"] == reports[0].loaded and len(report["loaded"]) == len(started.state_dict())
    by_hand = tiny("stage1", seed=12)
    assert bi.convert_stage1(state, by_hand).missing == []
    for a, b in zip(stage1_outputs(started), stage1_outputs(by_hand)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stage2_init_from_blip_and_a_stage1_file(tmp_path):
    base = tmp_path / "model_base.pth"
    c = tiny("stage1").config
    state = model_base_file(base, c, seed=2)
    stage1_file = tmp_path / "blip_mean.pt"
    stage1_src = tiny("stage1", seed=3)
    torch.save({"epoch": 0, "BLIP_Retrieval": bi.export_stage1(stage1_src)}, stage1_file)
    m = cirlab.create_model("blip_rerank_stage2", preset="tiny", init_from=str(base),
                            stage1_checkpoint=str(stage1_file))
    reports = m.load_init()
    assert [r.target for r in reports] == ["stage2", "stage1"]
    assert sorted(reports[0].missing) == ["cls_head.0.bias", "cls_head.0.weight", "cls_head.2.bias",
                                          "cls_head.2.weight", "text_encoder.layers.1.merge.bias",
                                          "text_encoder.layers.1.merge.weight"]  # random, as the paper's
    assert reports[1].missing == []
    by_hand = tiny("stage2", seed=4)
    bi.convert_stage2(state, by_hand)
    bi.convert_stage1(bi.export_stage1(stage1_src), by_hand.stage1)
    # the frozen stage I (ViT included) is the stage-I file's: loaded after the BLIP start
    torch.testing.assert_close(m.stage1.state_dict()["visual_encoder.post_layernorm.bias"],
                               stage1_src.state_dict()["visual_encoder.post_layernorm.bias"])
    for name in ("text_encoder.layers.0.crossattention.1.self.query.weight",
                 "text_encoder.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(m.state_dict()[name], by_hand.state_dict()[name])


def hf_blip_config(c):
    """A transformers ``BlipConfig`` of the sizes of the re-ranker config ``c``."""
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=c.vision_width, num_hidden_layers=c.vision_depth,
                           num_attention_heads=c.vision_heads, intermediate_size=c.vision_mlp, image_size=c.image_size,
                           patch_size=c.patch_size, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=30524, hidden_size=c.text_width, num_hidden_layers=c.text_depth,
                         num_attention_heads=c.text_heads, intermediate_size=c.text_intermediate,
                         encoder_hidden_size=c.vision_width, max_position_embeddings=c.max_text_len),
        image_text_hidden_size=c.embed_dim)


def test_init_from_a_transformers_blip_folder(tmp_path):
    from transformers import BlipForImageTextRetrieval

    m = tiny("stage1")
    torch.manual_seed(5)
    ref = BlipForImageTextRetrieval(hf_blip_config(m.config)).eval()
    ref.save_pretrained(tmp_path / "hf_blip")
    report = m.load_pretrained(tmp_path / "hf_blip")[0]
    assert report.missing == ["temp"]  # transformers' retrieval model has no ITC temperature
    assert "temp" in report.missing_why  # declared new (blip_interop.NEW_LAYERS): said, not refused or warned
    assert sorted(report.unmatched) == ["itm_head.bias", "itm_head.weight"] and not report.mismatched
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref.vision_model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(m.eval().image_tokens(images), expected)
    for name, value in ref.text_encoder.state_dict().items():
        torch.testing.assert_close(m.text_encoder.state_dict()[name], value)
    torch.testing.assert_close(m.text_proj.weight, ref.text_proj.weight)


@pytest.mark.parametrize("kind", ["text", "other_model", "other_size", "absent", "empty_folder"])
def test_a_wrong_init_from_file_is_one_clear_line(tmp_path, kind):
    from cirlab.core.checkpoint import CheckpointError

    path = tmp_path / f"bad_{kind}.pt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "other_model":
        torch.save({"model": {"encoder.fc.weight": torch.zeros(2, 2)}}, path)
    elif kind == "other_size":
        lite = cirlab.create_model("blip_rerank_stage1", preset="tiny", text_width=48, text_heads=2)
        torch.save({"BLIP_Retrieval": bi.export_stage1(lite)}, path)
    elif kind == "empty_folder":
        path.mkdir()
    m = cirlab.create_model("blip_rerank_stage1", preset="tiny", init_from=str(path))
    with pytest.raises(CheckpointError) as err:
        m.load_init(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and message.startswith("model_overrides.init_from: ")
    assert not (tmp_path / "init_from.json").exists()


def test_a_report_of_many_shape_mismatches_logs_a_sample():
    from cirlab.models.blip_interop import InteropReport

    report = InteropReport(source="f.pt", target="cala",
                           mismatched=[(f"layer.{i}.weight", (4, 4), (8, 8)) for i in range(40)])
    lines = report.summary().splitlines()
    assert lines[0] == "f.pt -> cala: loaded 0, unmatched 0, missing 0, shape-mismatched 40, ignored 0"
    assert lines[1:13] == [f"  shape mismatch layer.{i}.weight: checkpoint [4, 4] vs model [8, 8]" for i in range(12)]
    assert lines[13:] == ["  ... (28 more shape mismatches)"]
    assert len(report.to_dict()["mismatched"]) == 40  # the JSON report keeps them all


# ------------------------------------------------------------------------------------------------ partial starts


def _caption_folder(tmp_path, config):
    """A transformers BLIP *captioning* folder (``BlipForConditionalGeneration``): the right ViT, but a text
    decoder instead of the retrieval model's text encoder and projections."""
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(7)
    BlipForConditionalGeneration(hf_blip_config(config)).save_pretrained(tmp_path / "blip_caption")
    return tmp_path / "blip_caption"


def test_a_captioning_folder_is_refused_in_one_line_unless_init_partial(tmp_path):
    """It used to load its 30 ViT tensors, warn about 61 missing ones and train with a random text encoder, rc 0;
    as the frozen stage I of stage II it stayed random for the whole run."""
    from cirlab.core.checkpoint import CheckpointError

    folder = _caption_folder(tmp_path, tiny("stage1").config)
    m = cirlab.create_model("blip_rerank_stage1", preset="tiny", init_from=str(folder))
    with pytest.raises(CheckpointError) as err:
        m.load_init(tmp_path / "run1")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model_overrides.init_from: {folder}: ")
    assert "tensors of stage1 are not in it (text_encoder.* (" in message and "FROZEN" not in message
    assert "model_overrides.init_partial=true" in message and not (tmp_path / "run1" / "init_from.json").exists()
    # stage II's stage I is frozen: said so, with the other field's name
    m2 = cirlab.create_model("blip_rerank_stage2", preset="tiny", stage1_checkpoint=str(folder))
    with pytest.raises(CheckpointError, match=r"^model_overrides\.stage1_checkpoint: .*all FROZEN, they would stay "
                                              r"random for the whole run and never train"):
        m2.load_init()
    # the original's load_state_dict(strict=False), by name: loads what fits, warns about the rest
    reports = cirlab.create_model("blip_rerank_stage2", preset="tiny", stage1_checkpoint=str(folder),
                                  init_partial=True).load_init()
    assert reports[0].loaded and any(k.startswith("text_encoder.") for k in reports[0].missing)


def test_a_file_missing_part_of_the_frozen_vit_is_refused_and_new_layers_are_not(tmp_path):
    from cirlab.core.checkpoint import CheckpointError

    c = tiny("stage1").config
    state = random_state(stage1_layout(c), seed=2)
    partial = {k: v for k, v in state.items() if not k.startswith("visual_encoder.blocks.1.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    m = cirlab.create_model("blip_rerank_stage1", preset="tiny", init_from=str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointError, match=r"tensors of stage1 are not in it \(visual_encoder\.encoder\.layers\.1"
                                              r"\.\* \(\d+\)\): all FROZEN"):
        m.load_init()
    # stage II from the complete file: its merge layers and cls_head are new (declared), not a partial source
    torch.save({"model": state}, tmp_path / "full.pth")
    stage2 = cirlab.create_model("blip_rerank_stage2", preset="tiny", init_from=str(tmp_path / "full.pth"))
    report = stage2.load_init()[0]
    assert report.missing and bi.explain_missing(report) == [] and "merge layers and cls_head" in report.missing_why


def test_lavis_prefix_on_a_folder_says_it_is_a_folder(tmp_path):
    from cirlab.core.checkpoint import CheckpointError

    (tmp_path / "blip_itm").mkdir()
    (tmp_path / "blip_itm" / "config.json").write_text("{}")
    for stage in ("stage1", "stage2"):
        m = cirlab.create_model(f"blip_rerank_{stage}", preset="tiny", init_from=f"lavis:{tmp_path / 'blip_itm'}")
        with pytest.raises(CheckpointError, match=r"^model_overrides\.init_from: .*blip_itm is a folder; a LAVIS "
                                                  r"checkpoint is one \.pth file.*without the lavis: prefix"):
            m.load_init()


def test_missing_keys_group_by_module_prefix_and_an_empty_list_is_empty():
    """group_keys looped forever on an empty list (all() of nothing is True)."""
    assert bi.group_keys([]) == ""
    keys = [f"text_encoder.layers.{i}.w" for i in range(3)] + ["temp"]
    assert bi.group_keys(keys) == "text_encoder.* (3), temp"


def test_a_dime_or_hrem_original_file_given_to_convert_says_what_reads_it(tmp_path, caplog):
    """It said "no state dict found (expected one of ['model', ...])" of a file whose 'model' is DIME's three state
    dicts."""
    from cirlab.cli import main

    src = tmp_path / "model_best.pth.tar"
    torch.save({"model": [{"a": torch.zeros(1)}, {"b": torch.zeros(1)}, {"c": torch.zeros(1)}], "epoch": 3}, src)
    with pytest.raises(ValueError, match=r"'model' holds 3 state dicts, as DIME's and HREM's original files do; "
                                         r"cirlab convert handles the re-ranker's and CaLa's: read this one with "
                                         r"`cirlab eval .* --model dime\|hrem --preset PRESET`"):
        bi.unwrap_state_dict(torch.load(src), str(src))
    assert main(["convert", str(src), str(tmp_path / "out.pt")]) == 2
    assert "holds 3 state dicts" in caplog.text and not (tmp_path / "out.pt").exists()
