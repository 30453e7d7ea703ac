"""Checkpoint interop (cirlab.models.blip_interop) on state dicts generated in the original BLIP layouts.

The layouts below are written from the digest (rerank_cala.md A.2/A.3/A.6) and the original module structure
(BLIP vit.py / med.py, Candidate-Reranking nlvr_encoder.py), independently of cirlab's own exporter.
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
    with pytest.raises(ValueError, match="weights_only"):
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
