"""CaLa (SIGIR 2024) on BLIP-2: the backbone against LAVIS's own outputs, the heads against naive loops, the loss
against a hand computation of the released code's formula, interop round trips, sizes and one engine run.

All on the ``tiny`` preset (random init, CPU); the LAVIS fixtures in ``tests/fixtures/lavis/`` were written by LAVIS
1.0.2's own ``Blip2Qformer`` (``tools/lavis_fixtures.py``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench_scripts
import cirlab
from cirlab.models import _hf_blip2 as hb
from cirlab.models import cala as C

FIXTURES = Path(__file__).parent / "fixtures" / "lavis"
ATOL = 1e-5
TEXTS = ["a red dress with long sleeves", "is darker and has a collar", "change the cat to a dog", "make it blue"]


def tiny(**overrides) -> C.CaLa:
    torch.manual_seed(0)
    return cirlab.create_model("cala", "tiny", **overrides)


def batch(n: int = 4, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"ref_image": torch.randn(n, 3, size, size, generator=g),
            "target_image": torch.randn(n, 3, size, size, generator=g), "text": TEXTS[:n]}


# ------------------------------------------------------------------------------------------------ backbone


def _fixture(name: str) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    info = json.loads((FIXTURES / "lavis_fixtures.json").read_text())["models"][name]
    return info, load_file(str(FIXTURES / info["files"]["state"])), load_file(str(FIXTURES / info["files"]["io"]))


def _lavis_sized(info: dict) -> tuple[hb.ImageTower, hb.QFormer]:
    v, q = info["vision"], info["qformer"]
    arch = "clip_vit" if info["vit_model"] == "clip_L" else "eva_vit"
    tower = hb.ImageTower(arch, width=v["width"], depth=v.get("residual_blocks", v.get("depth")), heads=v["heads"],
                          mlp=v["mlp"], image_size=v["image_size"], patch_size=v["patch_size"])
    cfg = hb.qformer_config(width=q["hidden_size"], depth=q["num_hidden_layers"], heads=q["num_attention_heads"],
                            intermediate=q["intermediate_size"], encoder_width=q["encoder_width"],
                            vocab_size=q["vocab_size"], max_positions=q["max_position_embeddings"],
                            cross_attention_freq=q["cross_attention_freq"])
    return tower, hb.QFormer(cfg, q["num_query_token"], info["embed_dim"])


@pytest.mark.parametrize("name", ["blip2_pretrain_vitL", "blip2_pretrain"])
def test_extract_features_match_lavis(name):
    """text / image / multimodal ``extract_features`` (and the ViT, ln_vision, projections) equal LAVIS's to 1e-5
    for both LAVIS towers (CLIP ViT-L layout for CaLa, EVA ViT-g), after converting LAVIS's state dict."""
    from cirlab.models.blip_interop import InteropReport

    info, state, io = _fixture(name)
    tower, qformer = _lavis_sized(info)
    arch = tower.arch
    t_sd, q_sd, ignored, unmatched = hb.lavis_to_cirlab(state, vision_arch=arch)
    report = InteropReport(source=name)
    hb.load_into(tower, t_sd, "tower.", report)
    hb.load_into(qformer, q_sd, "qformer.", report)
    assert report.ok and not unmatched, report.summary()
    assert set(ignored) == {"Q-Former LM head (captioning loss)", "ITM head", "ITC temperature", "buffer"}
    tower.eval(), qformer.eval()
    px, ids, mask = io["inputs.pixel_values"], io["inputs.input_ids"], io["inputs.attention_mask"]
    with torch.no_grad():
        frozen = tower(px)
        ours = {"vit_embeds": tower.vit_tokens(px), "image_embeds_frozen": frozen,
                "image.image_embeds": qformer.image(frozen), "text.text_embeds": qformer.text(ids, mask),
                "multimodal.multimodal_embeds": qformer.multimodal(frozen, ids, mask)}
        ours["image.image_embeds_proj"] = qformer.project_image(ours["image.image_embeds"])
        ours["text.text_embeds_proj"] = qformer.project_text(ours["text.text_embeds"])
    for key, value in ours.items():
        torch.testing.assert_close(value, io[f"outputs.{key}"], atol=ATOL, rtol=0, msg=key)
    # and back: cirlab -> LAVIS layout reproduces every LAVIS tensor cirlab holds, bit for bit
    back = hb.cirlab_to_lavis(tower, qformer)
    lavis_only = {k for keys in ignored.values() for k in keys}
    assert set(back) == set(state) - lavis_only
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_gradient_reaches_every_qformer_mode():
    """LAVIS's extract_features runs under @torch.no_grad (CaLa edits site-packages); cirlab's modes are
    differentiable: each reaches the Q-Former's layers (cross-attention included for the image modes)."""
    model = tiny()
    q, tok = model.multimodal, model.image_tokens(batch()["ref_image"])
    ids, mask = model.tokenize(TEXTS)
    modes = (("text", q.text(ids, mask)), ("image", q.image(tok)), ("multimodal", q.multimodal(tok, ids, mask)))
    for name, out in modes:
        q.zero_grad()
        out.sum().backward()
        layer0 = q.bert.encoder.layer[0]
        assert layer0.attention.attention.query.weight.grad.abs().sum() > 0, name
        cross = layer0.crossattention.attention.key.weight.grad
        assert (cross is not None and cross.abs().sum() > 0) == (name != "text"), name
    assert not any(p.requires_grad for p in model.tower.parameters())


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("frame", ["sum", "artemis"])
@pytest.mark.parametrize("encoder", ["multi", "both"])
def test_gradients_reach_every_trained_group_and_no_frozen_weight(frame, encoder):
    model = tiny(cir_frame=frame, encoder=encoder).train()
    out = model.training_step(batch())
    assert torch.isfinite(out["cala_loss"]) and {"qtm_ce", "tbia_ce", "ctr_ce"} <= set(out)
    out["cala_loss"].backward()
    groups = model.param_groups()
    names = [g["name"] for g in groups]
    expected = ["multimodal.qformer", "multimodal.query_tokens", "textual.qformer", "tac", "hca"]
    expected += ["artemis"] if frame == "artemis" else []
    expected += ["visual.qformer", "visual.query_tokens"] if encoder == "both" else []
    assert names == expected
    for g in groups:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"]), g["name"]
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in in_groups:
            assert not p.requires_grad and p.grad is None, name
    assert all(not p.requires_grad for p in model.tower.parameters())
    assert (encoder == "both") == any(p.requires_grad for p in model.visual.parameters())
    assert model.visual.training == (encoder == "both")  # the original keeps blip_visual in eval mode


def test_param_group_learning_rates_and_schedules():
    model = tiny(cir_frame="artemis", lr=1e-5)
    lrs = {g["name"]: g["lr"] for g in model.param_groups()}
    assert lrs == pytest.approx({"multimodal.qformer": 1e-5, "multimodal.query_tokens": 1e-5,
                                 "textual.qformer": 1e-5, "tac": 2e-5, "hca": 2e-5, "artemis": 1e-4})
    assert all(g["scheduled"] for g in model.param_groups())
    group0 = tiny(lr_schedule="group0").param_groups()
    assert [g["scheduled"] for g in group0] == [True] + [False] * (len(group0) - 1)
    cfg = model.default_train_config()
    assert cfg["optimizer"] == "adamw" and cfg["weight_decay"] == 0.05 and cfg["batch_size"] == 64
    assert cfg["schedule"] == "periodic_cosine" and cfg["cosine_epochs"] == 15 and cfg["epochs"] == 30
    assert cfg["selection_metric"] == C.CIRR_SELECTION and cfg["seed"] == 42
    assert tiny(dataset="fashioniq").default_train_config()["selection_metric"] == "avg"
    # the engine's optimizer takes the groups as they are
    from cirlab.engine.train import TrainConfig, build_optimizer

    opt = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-5))
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in model.param_groups()])


def test_loss_is_the_released_formula_by_hand():
    """The released loss (src/blip_fine_tune.py after commit 213ef3c) on fixed logits: 0.1 CE(TBIA) + 0.9 CE(0.45 CTR
    + 0.55 QTM); the paper form; the pre-fix form."""
    g = torch.Generator().manual_seed(3)
    logits = {k: torch.randn(5, 5, generator=g) * 4 for k in ("qtm", "tbia", "ctr")}

    def ce(x):  # -log softmax of the diagonal, averaged: a naive cross-entropy
        return float(sum(-(x[i, i] - torch.logsumexp(x[i], 0)) for i in range(len(x))) / len(x))

    mix = 0.45 * logits["ctr"] + 0.55 * logits["qtm"]
    code = C.cala_loss(logits, C.CaLaConfig.from_preset("tiny"))
    assert float(code["cala_loss"]) == pytest.approx(0.1 * ce(logits["tbia"]) + 0.9 * ce(mix), rel=1e-6)
    paper = C.cala_loss(logits, C.CaLaConfig.from_preset("tiny", loss_form="paper"))
    total = sum(float(v) for k, v in paper.items() if k.endswith("_loss"))
    assert total == pytest.approx(ce(logits["qtm"]) + 0.1 * ce(logits["tbia"]) + 0.45 * ce(logits["ctr"]), rel=1e-6)
    pre_fix = C.cala_loss(logits, C.CaLaConfig.from_preset("tiny", loss_form="code_pre_fix"))
    assert float(pre_fix["cala_loss"]) == pytest.approx(ce(mix), rel=1e-6)
    plain = C.cala_loss({"qtm": logits["qtm"]}, C.CaLaConfig.from_preset("tiny", hca_weight=0, tac_weight=0))
    assert float(plain["cala_loss"]) == pytest.approx(ce(logits["qtm"]), rel=1e-6)


def test_logits_are_the_papers_formulas():
    """QTM = 100 normalize(ref + text) . normalize(target); TBIA rows = pseudo-target i vs references; CTR rows =
    text i vs TAC of pair j."""
    model = tiny().eval()
    b = batch()
    with torch.no_grad():
        feats = model.features(b["ref_image"], b["text"], b["target_image"])
        logits = model.logits(feats)
        text, ref, tgt = feats["F_c"][:, 0], feats["F_r"][:, 0], F.normalize(feats["F_t"][:, 0], dim=-1)
        torch.testing.assert_close(logits["qtm"], 100 * F.normalize(ref + text, dim=-1) @ tgt.T)
        pseudo = model.hca(feats["F_r"], feats["F_c"], feats["F_t"])
        torch.testing.assert_close(logits["tbia"], 10 * pseudo @ ref.T)
        gap = model.tac(feats["F_r_visual"], feats["F_t"])
        torch.testing.assert_close(logits["ctr"], 10 * text @ gap.T)
        # the query the engine ranks with is the QTM query; the gallery is the visual Q-Former's query 0
        torch.testing.assert_close(model.encode_query(b["ref_image"], b["text"]) * 100 @ tgt.T, logits["qtm"],
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model.encode_target(b["target_image"]), tgt)


# ------------------------------------------------------------------------------------------------ heads vs loops


def test_hca_matches_a_naive_per_sample_loop():
    torch.manual_seed(0)
    hca = C.HingeCrossAttention(8).eval()
    r, c, t = torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 4, 8)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    lin = lambda m, x: [sum(m.weight[o, i] * x[i] for i in range(8)) + m.bias[o] for o in range(8)]  # noqa: E731
    for use_mask in (False, True):
        out = hca(r, c, t, text_mask=mask if use_mask else None)
        for b in range(3):
            q = [lin(hca.ref_query, r[b, i]) for i in range(5)]
            k = [lin(hca.text_key, c[b, j]) for j in range(7)]
            kt = [lin(hca.target_key, t[b, j]) for j in range(4)]
            v = [lin(hca.value, t[b, j]) for j in range(4)]
            dot = lambda x, y: sum(a * bb for a, bb in zip(x, y)) / math.sqrt(8)  # noqa: E731
            # only reference query 0 is kept: hinge logits over target tokens through every text token
            hinge = [sum(dot(q[0], k[j]) * dot(k[j], kt[u]) * (float(mask[b, j]) if use_mask else 1.0)
                         for j in range(7)) for u in range(4)]
            p = torch.softmax(torch.stack(hinge), 0)
            expected = sum(p[u] * torch.stack(v[u]) for u in range(4))
            torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


def test_tac_matches_a_naive_per_sample_loop():
    torch.manual_seed(0)
    tac = C.TwinAttentionCompositor(6, steps=4).eval()
    ref, tgt = torch.randn(2, 5, 6), torch.randn(2, 5, 6)

    def attend(mha, q, kv):  # one head: softmax(q Wq (kv Wk)^T / sqrt(d)) kv Wv, then out_proj
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        qq, kk, vv = q @ w[:6].T + bias[:6], kv @ w[6:12].T + bias[6:12], kv @ w[12:].T + bias[12:]
        rows = []
        for i in range(len(qq)):
            scores = torch.stack([qq[i] @ kk[j] / math.sqrt(6) for j in range(len(kk))])
            rows.append(sum(a * vv[j] for j, a in enumerate(torch.softmax(scores, 0))))
        return torch.stack(rows) @ mha.out_proj.weight.T + mha.out_proj.bias

    out = tac(ref, tgt)
    for b in range(2):
        o1 = attend(tac.ref_attention, ref[b], tgt[b])
        o2 = attend(tac.target_attention, tgt[b], ref[b])
        for _ in range(3):  # the same weights again, each fed its own previous output as key/value
            o1, o2 = attend(tac.ref_attention, ref[b], o1), attend(tac.target_attention, tgt[b], o2)
        torch.testing.assert_close(out[b], (o1[0] + o2[0]) / 2, atol=1e-5, rtol=1e-5)


def test_artemis_scores_match_a_naive_pair_loop():
    torch.manual_seed(0)
    art = C.Artemis(6)
    r, m, t = torch.randn(3, 6), torch.randn(3, 6), F.normalize(torch.randn(4, 6), dim=-1)
    l2 = lambda x: x / x.norm()  # noqa: E731
    scores = art(r, m, t).detach()
    for i in range(3):
        a_em, a_is = art.attention_em(m[i]), art.attention_is(m[i])
        for j in range(4):
            em = l2(art.transform_m(m[i])) @ l2(a_em * t[j])
            is_ = l2(a_is * r[i]) @ l2(a_is * t[j])
            assert float(scores[i, j]) == pytest.approx(float((em + is_).detach()), abs=1e-5)
    assert float(scores.abs().max()) <= 2.0 + 1e-6


def test_artemis_scores_on_a_sum_frame_model_is_one_line():
    # public method: a sum-frame model has no ARTEMIS head (was an AttributeError on self.artemis = None)
    with pytest.raises(ValueError, match="cir_frame='artemis'.*cir_frame='sum'"):
        tiny(cir_frame="sum").artemis_scores(torch.zeros(1, 3, 32, 32), ["a"], torch.zeros(2, 16))


# ------------------------------------------------------------------------------------------------ modes, trace


def test_eval_mode_and_validate_in_train_mode():
    model = tiny().eval()
    assert not model.multimodal.training and not model.textual.training
    q1 = model.encode_query(batch()["ref_image"], TEXTS)
    assert torch.equal(q1, model.encode_query(batch()["ref_image"], TEXTS))  # deterministic in eval mode
    noisy = tiny(validate_in_train_mode=True).eval()
    assert noisy.multimodal.training and noisy.textual.training and not noisy.visual.training
    with torch.no_grad():
        a, b = (noisy.encode_query(batch()["ref_image"], TEXTS) for _ in range(2))
    assert not torch.equal(a, b)  # dropout on, as the released training loop validates
    both = tiny(validate_in_train_mode=True, encoder="both").eval()  # the released loop trains the visual copy too
    assert both.multimodal.training and both.textual.training and both.visual.training
    assert not tiny(encoder="both").eval().visual.training


def test_trace_gives_tidy_frames_with_token_strings():
    model = tiny()
    b = batch(2)
    with cirlab.trace_routes(model) as outer:
        frame = model.trace(b["ref_image"], b["text"], b["target_image"], ids=["q0", "q1"])
    assert len(outer.records) > 0  # the emissions also reach an enclosing trace_routes block
    layers = set(frame["layer"])
    assert {"hca.ref_to_text", "hca.text_to_target", "hca.hinge", "hca.bridge"} <= layers
    assert {f"tac.{s}_attention.step{k}" for s in ("ref", "target") for k in range(1, 5)} <= layers
    words = set(frame[(frame.layer == "hca.bridge") & (frame.query_id == "q0")]["source"])
    assert {"red", "dress", "sleeves", "[CLS]"} <= words
    hinge = frame[frame.layer == "hca.hinge"].groupby(["query_id", "destination"])["weight"].sum()
    assert hinge.to_numpy() == pytest.approx(1.0, abs=1e-5)  # softmax over target queries
    assert model.training  # mode restored
    with cirlab.trace_routes(model) as quiet, torch.no_grad():
        model.eval().encode_query(b["ref_image"], b["text"])
    assert quiet.records == []  # HCA/TAC are training-only heads: inference emits nothing


# ------------------------------------------------------------------------------------------------ sizes


def _lavis_clip_vit_l() -> int:
    """Parameters of LAVIS ``create_clip_vit_L`` (width 1024, 21 blocks, patch 14, 224 px) + ``ln_vision``,
    written from the module shapes of ``lavis/models/clip_vit.py``."""
    w, tokens = 1024, (224 // 14) ** 2 + 1
    block = (3 * w * w + 3 * w) + (w * w + w) + 2 * 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)
    return 3 * w * 14 * 14 + w + tokens * w + 2 * w + 21 * block + 2 * w


def _lavis_qformer(encoder_width: int = 1024) -> int:
    """``Qformer.bert`` of LAVIS's Blip2Qformer (BERT-base, vocab 30523, cross-attention every 2nd layer, query
    feed-forward twins) + 32 query tokens + vision_proj + text_proj (no LM head, ITM head or temp)."""
    d, ffn = 768, 3072
    lin = lambda i, o: i * o + o  # noqa: E731
    attention = 3 * lin(d, d) + lin(d, d) + 2 * d
    cross = lin(d, d) + 2 * lin(encoder_width, d) + lin(d, d) + 2 * d
    feed_forward = lin(d, ffn) + lin(ffn, d) + 2 * d
    layers = sum(attention + 2 * feed_forward + (cross if i % 2 == 0 else 0) for i in range(12))
    embeddings = 30523 * d + 512 * d + 2 * d
    return embeddings + layers + 32 * d + 2 * lin(d, 256)


def test_paper_size_parameter_counts_from_the_meta_device():
    rows = {r["module"]: r for r in C.parameter_table("cirr")}
    assert rows["tower"]["params"] == _lavis_clip_vit_l() == 265_391_104 and rows["tower"]["trainable"] == 0
    for copy in ("multimodal", "textual", "visual"):
        assert rows[copy]["params"] == _lavis_qformer()
    assert rows["visual"]["trainable"] == 0  # encoder "multi"
    d = 768
    assert rows["hca"]["params"] == 4 * (d * d + d) and rows["tac"]["params"] == 2 * (4 * d * d + 4 * d)
    # one shared tower instead of CaLa's three ViT-L copies
    assert rows["total"]["params"] == _lavis_clip_vit_l() + 3 * _lavis_qformer() + 4 * (d * d + d) + 8 * (d * d + d)
    both = {r["module"]: r for r in C.parameter_table(C.CaLaConfig.from_preset("cirr", encoder="both"))}
    assert both["visual"]["trainable"] > 0


# ------------------------------------------------------------------------------------------------ interop


def test_lavis_checkpoint_loads_into_tower_and_every_copy(tmp_path):
    info, state, _ = _fixture("blip2_pretrain_vitL")
    v, q = info["vision"], info["qformer"]
    model = tiny(image_size=v["image_size"], patch_size=v["patch_size"], vision_width=v["width"],
                 vision_depth=v["residual_blocks"], vision_heads=v["heads"], vision_mlp=v["mlp"],
                 qformer_width=q["hidden_size"], qformer_depth=q["num_hidden_layers"],
                 qformer_heads=q["num_attention_heads"], qformer_intermediate=q["intermediate_size"],
                 num_query_tokens=q["num_query_token"], vocab_size=q["vocab_size"],
                 max_text_len=q["max_position_embeddings"], embed_dim=info["embed_dim"])
    torch.save({"model": state}, tmp_path / "blip2_pretrain_vitL.pth")  # LAVIS's checkpoint container
    (report,) = model.load_pretrained(tmp_path / "blip2_pretrain_vitL.pth")
    assert report.ok, report.summary()
    assert "itm_head.weight" in report.ignored and "temp" in report.ignored
    for copy in ("textual", "multimodal", "visual"):
        assert torch.equal(getattr(model, copy).query_tokens, state["query_tokens"])
    assert torch.equal(model.tower.ln_vision.weight, state["ln_vision.weight"])


def test_cala_files_round_trip(tmp_path):
    """cirlab -> the released code's tuned_*.pt files -> a fresh cirlab model: every tensor equal; HCA's unused
    *2 projections are reported as ignored."""
    model = tiny(cir_frame="artemis")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    files = C.export_cala_files(model, tmp_path / "saved_models", suffix="arithmetic")
    assert sorted(f.name for f in files) == sorted(
        f"tuned_{n}_arithmetic.pt" for n in ("blip_text", "blip_multi", "blip_visual", "tac", "hca", "artemis"))
    saved = torch.load(files[0], weights_only=True)
    assert set(saved) == {"epoch", "Blip2Qformer"}
    assert "Qformer.bert.embeddings.LayerNorm.weight" in saved["Blip2Qformer"]
    assert "reference_as_query_attention.in_proj_weight" in torch.load(
        tmp_path / "saved_models" / "tuned_tac_arithmetic.pt", weights_only=True)["TwinAttentionCompositorBLIP2"]
    fresh = tiny(cir_frame="artemis")
    torch.manual_seed(5)
    reports = fresh.load_pretrained(tmp_path / "saved_models")
    assert all(r.ok for r in reports), "\n".join(r.summary() for r in reports)
    hca = next(r for r in reports if r.target == "hca")
    assert sorted(hca.ignored) == sorted(f"{k}2.{p}" for k in ("query_ref", "key_text", "key_tar", "value")
                                         for p in ("weight", "bias"))
    assert "ignored 8 (defined but never used by the released CaLa forward" in hca.summary()  # the why, logged
    assert hca.to_dict()["ignored_why"] and not next(r for r in reports if r.target == "tac").ignored_why
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_a_text_embedding_smaller_than_the_tokenizer_is_one_line_not_an_index_error():
    """`cirlab eval` of the README's converted LAVIS test file (a 32-row vocabulary) ended in torch's IndexError."""
    from cirlab.core.errors import InputError

    model = tiny(vocab_size=32)
    with pytest.raises(InputError, match=r"the tokenizer has 30523 tokens and the model's text embedding 32 rows: "
                                         r"set vocab_file"):
        model.tokenize(["a red dress"])
    ids, _ = tiny().tokenize(["a red dress"])  # the full vocabulary: the same text passes
    assert int(ids.max()) < tiny().config.vocab_size


def test_checkpoint_round_trip(tmp_path):
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.engine import runs
    from cirlab.engine.train import _model_meta

    model = tiny().eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), **_model_meta(model)})
    rebuilt, meta = runs.model_from_checkpoint(path)
    assert meta["model_name"] == "cala" and rebuilt.config == model.config
    b = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode_query(b["ref_image"], b["text"]),
                                   model.encode_query(b["ref_image"], b["text"]), rtol=0, atol=0)


def test_convert_command_writes_and_reads_cala_files(tmp_path, capsys, caplog):
    """``cirlab convert RUN DIR --to original`` writes CaLa's tuned_*.pt files; ``cirlab convert DIR OUT --model
    cala`` reads them back into a checkpoint ``cirlab eval`` loads (every tensor equal); nothing is overwritten."""
    from cirlab.cli import main
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.engine import runs
    from cirlab.engine.train import _model_meta

    model = tiny(cir_frame="artemis")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    source = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                             {"model": model.state_dict(), "epoch": 4, **_model_meta(model)})
    files = tmp_path / "cala_files"
    assert main(["convert", str(tmp_path / "run"), str(files), "--to", "original"]) == 0
    written = json.loads(capsys.readouterr().out)["files"]
    assert sorted(written) == sorted(f"tuned_{n}_arithmetic.pt" for n in
                                     ("blip_text", "blip_multi", "blip_visual", "tac", "hca", "artemis"))
    assert torch.load(files / "tuned_tac_arithmetic.pt", weights_only=True)["epoch"] == 4
    before = {f.name: f.read_bytes() for f in files.iterdir()}
    assert main(["convert", str(source), str(files), "--to", "original"]) == 2
    assert "exists; pass --overwrite to replace CaLa's files there" in caplog.text
    assert {f.name: f.read_bytes() for f in files.iterdir()} == before
    assert main(["convert", str(source), str(files), "--to", "original", "--suffix", "second"]) == 0
    assert len(list(files.glob("tuned_*_second.pt"))) == 6 and len(list(files.iterdir())) == 12
    capsys.readouterr()

    out = tmp_path / "back.pt"
    caplog.clear()
    assert main(["convert", str(files), str(out), "--preset", "tiny"]) == 2  # the re-ranker's reader: says which
    assert "it holds CaLa's tuned_blip_*.pt files: convert them with --model cala" in caplog.text
    assert main(["convert", str(files), str(out), "--model", "cala", "--preset", "tiny",
                 "--set", "cir_frame=artemis"]) == 2  # two saves in the folder: which one must be said
    assert "expected one tuned_blip_text_*.pt, found ['tuned_blip_text_arithmetic.pt', 'tuned_blip_text_second" \
        in caplog.text
    assert main(["convert", str(files), str(out), "--model", "cala", "--preset", "tiny", "--suffix", "arithmetic",
                 "--set", "cir_frame=artemis"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing"] == [] and summary["loaded"] > 0 and len(summary["files"]) == 6
    rebuilt, meta = runs.model_from_checkpoint(out)
    assert meta["converted_layout"] == "cala files"
    caplog.clear()
    again = ["convert", str(files), str(out), "--model", "cala", "--preset", "tiny", "--suffix", "arithmetic",
             "--set", "cir_frame=artemis"]
    written = out.read_bytes()
    assert main(again) == 2 and "back.pt exists; pass --overwrite" in caplog.text and out.read_bytes() == written
    assert main(again + ["--overwrite"]) == 0
    capsys.readouterr()
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # a --set size the files do not have: one line naming the file and what to do
    assert main(["convert", str(files), str(tmp_path / "x.pt"), "--model", "cala", "--preset", "tiny",
                 "--suffix", "arithmetic", "--set", "cir_frame=artemis", "--set", "qformer_width=48"]) == 2
    assert "do not fit the model built from preset 'tiny' with the files' sizes and --set" in caplog.text
    assert not (tmp_path / "x.pt").exists()
    # the default preset (cirr, a BLIP-2 of a billion parameters) takes its sizes from the files: nothing of the
    # preset's size is built (it was, with 63 shape warnings, before a one-line refusal)
    assert main(["convert", str(files), str(tmp_path / "y.pt"), "--model", "cala", "--suffix", "arithmetic",
                 "--set", "cir_frame=artemis"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_overrides"]["qformer_width"] == 32 and summary["missing"] == []
    sized, _ = runs.model_from_checkpoint(tmp_path / "y.pt")
    assert sized.config.dataset == "cirr" and sum(p.numel() for p in sized.parameters()) == \
        sum(p.numel() for p in model.parameters())
    for (k, a), (k2, b) in zip(model.state_dict().items(), sized.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


# ------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cirlab.data.generators import synthetic

    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, seed=0, size="tiny", image_size=32, layouts=("fashioniq", "cirr"))
    return root


@pytest.mark.parametrize("frame", ["sum", "artemis"])
def test_run_experiment_trains_and_evaluates_on_synthetic_cirr(frame, synth, tmp_path):
    from cirlab.engine import runs

    config = runs.with_defaults({
        "name": f"cala_{frame}", "model": "cala", "preset": "tiny", "model_overrides": {"cir_frame": frame},
        "dataset": {"name": "cirr", "root": str(synth / "cirr"), "test_split": "val"},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False,
                  "precision": "fp32", "selection": "last"},
        "eval": {"splits": ["val"], "k": 5, "batch_size": 16}})
    result = runs.run_experiment(config, output_dir=tmp_path / "run")
    metrics = result["splits"]["val"]
    assert result["steps"] == 2 and {"R@1", "R@5", "cirr_Rsubset@1", "avg"} <= set(metrics)
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (tmp_path / "run" / "topk" / "val.topk.npz").is_file()


def test_the_model_config_follows_the_run_dataset(tmp_path):
    """A CaLa run on Fashion-IQ selects on Fashion-IQ's metric whatever the preset; an explicit override wins; a
    dataset CaLa has no recipe for is refused before any data is read, naming the field."""
    from cirlab.core.errors import ConfigError
    from cirlab.engine import runs

    base = {"model": "cala", "preset": "tiny", "dataset": {"name": "fashioniq", "root": str(tmp_path)}}
    assert runs.model_config_of(runs.with_defaults(base)).dataset == "fashioniq"
    model = runs.build_model(runs.with_defaults(base))
    assert model.default_train_config()["selection_metric"] == "avg"
    pinned = runs.with_defaults({**base, "model_overrides": {"dataset": "cirr"}})
    assert runs.model_config_of(pinned).dataset == "cirr"
    with pytest.raises(ConfigError, match="dataset.name 'shoes'.*model_overrides.dataset"):
        runs.validate_config(runs.with_defaults({**base, "dataset": {"name": "shoes", "root": str(tmp_path)}}))


def test_bench_diagnosis_measures_every_head_by_hand():
    """bench/cala_diagnose.py: TAC's output norm and the CTR / TBIA / QTM logit statistics equal a hand computation,
    for a model trained without the auxiliary terms too (their heads still exist and are measured)."""
    mod = bench_scripts.load("cala_diagnose")
    b = batch(4)
    for model in (tiny(), tiny(hca_weight=0.0, tac_weight=0.0)):
        out = mod.measure(model, b)
        with torch.no_grad():
            f = model.features(b["ref_image"], b["text"], b["target_image"])
            gap = model.tac(f["F_r_visual"], f["F_t"])
            ctr = model.config.aux_scale * f["F_c"][:, 0] @ gap.t()
            qtm = model.logits(f)["qtm"]
        labels = torch.arange(4)
        assert out["norm tac_gap"] == pytest.approx(float(gap.norm(dim=-1).mean()), rel=1e-5)
        assert out["norm text_feats"] == pytest.approx(float(f["F_c"][:, 0].norm(dim=-1).mean()), rel=1e-5)
        assert out["ctr sd"] == pytest.approx(float(ctr.std()), rel=1e-5)
        assert out["ctr CE"] == pytest.approx(float(F.cross_entropy(ctr, labels)), rel=1e-5)
        assert out["qtm top-1"] == pytest.approx(float((qtm.argmax(1) == labels).float().mean()))
        assert {"tbia sd", "tbia CE", "tbia top-1"} <= set(out)


def test_bench_pooled_r1_counts_every_held_out_query(tmp_path):
    """bench/cala_synthetic.py pools val and test per category (emoji runs keep their final weights, so val is
    held out too); a category's R@1 is over all its queries, not the mean of the two splits' R@1."""
    import numpy as np

    from cirlab.core.topk import TopK, save_topk

    mod = bench_scripts.load("cala_synthetic")
    ranks = {"val_color": [1, 2], "test_color": [1], "val_gender": [1, 1, 3], "test_gender": [5], "train_x": [1]}
    for name, r in ranks.items():
        n = len(r)
        save_topk(tmp_path / f"{name}.topk.npz", TopK(np.arange(n), np.zeros((n, 1), dtype=np.int64),
                                                       np.zeros((n, 1), dtype=np.float32), np.array(r)))
    out = mod.pooled_r1(tmp_path)
    assert out["color_R@1"] == pytest.approx(200 / 3) and out["gender_R@1"] == pytest.approx(50.0)
    assert out["avg_R@1"] == pytest.approx((200 / 3 + 50) / 2) and out["queries"] == 7  # train_x is not held out


def test_a_start_from_a_cirlab_checkpoint_is_recorded_in_init_from_json(tmp_path):
    import json

    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.engine.train import _model_meta

    source = tiny()
    path = tmp_path / "start.pt"
    save_checkpoint(path, {"model": source.state_dict(), **_model_meta(source)})
    model = tiny(init_from=str(path))
    assert model.load_init(tmp_path) == []  # every weight: nothing to report but where it came from
    record = json.loads((tmp_path / "init_from.json").read_text())
    assert record == {"init_from": str(path), "reports": [], "layout": "cirlab", "source": str(path)}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    home = Path.home()  # "~/..." as DIME's and the re-ranker's init_from take it (was: no such file / LAVIS reader)
    relative = os.path.relpath(path, home)
    assert tiny(init_from=f"~/{relative}").load_init(None) == []


def test_an_init_from_folder_cala_does_not_read_is_one_line_with_the_field_and_the_sources(tmp_path):
    """A transformers BLIP-2 folder said "checkpoint not found: <folder>/checkpoints/best.pt" and a run of another
    model lacked the field name."""
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.core.errors import CheckpointError

    folder = tmp_path / "blip2_itm"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "blip-2"}')
    (folder / "model.safetensors").write_bytes(b"")
    for model in (tiny(init_from=str(folder)), cirlab.create_model("cala", "tiny_clip", init_from=str(folder))):
        with pytest.raises(CheckpointError) as err:
            model.load_init()
        assert str(err.value) == (f"model_overrides.init_from: {folder}: a transformers blip-2 folder, which CaLa "
                                  f"does not read; CaLa reads {C.SOURCES}, a CLIP RN file (CLIP presets) or a cirlab "
                                  "cala run")
    with pytest.raises(CheckpointError, match=r"^model_overrides\.init_from: .*neither a cirlab run"):
        tiny(init_from=str(tmp_path)).load_init()
    run = tmp_path / "hrem_run"
    save_checkpoint(run / "checkpoints" / "best.pt", {"model": {"w": torch.zeros(1)}, "model_name": "hrem"})
    with pytest.raises(CheckpointError, match=r"^model_overrides\.init_from: .*holds model 'hrem'"):
        tiny(init_from=str(run)).load_init()
    with pytest.raises(CheckpointError, match=r"^model_overrides\.init_from: .*blip2_itm is a folder; a LAVIS "
                                              r"checkpoint is one \.pth file"):
        tiny(init_from=f"lavis:{folder}").load_init()


def test_inference_precision_is_recorded_as_it_runs():
    """bf16=True runs CaLa's inference under bf16 autocast; the run and `cirlab eval` recorded float32 (no record)."""
    from cirlab.core.contracts import HasEvalPrecision

    for bf16, name in ((False, "float32"), (True, "bfloat16")):
        model = tiny(bf16=bf16)
        assert isinstance(model, HasEvalPrecision) and model.eval_precision("cpu") == name


def test_a_train_lr_over_the_recipe_s_model_lr_says_which_counts(caplog):
    """config.yaml held model_overrides.lr 0.001 and train.lr 2e-06 and nothing said the train value is used."""
    import logging

    from cirlab.engine.train import resolve_train_config

    model = cirlab.create_model("cala", "tiny")
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):
        assert resolve_train_config(model, {"lr": 2e-6}).lr == 2e-6
    assert f"train.lr=2e-06 is used; model_overrides.lr={model.config.lr} (the recipe's value) is not" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cirlab.engine.train"):
        resolve_train_config(model, {"lr": model.config.lr, "epochs": 3})
    assert "is used" not in caplog.text
