"""CaLa's CLIP RN50x4 path (Jiang et al., SIGIR 2024; https://github.com/Chiangsonw/CaLa, ``--encoder-arch clip``):
the backbone's two outputs, the CLIP heads' map layouts and cls tokens (the released quirks as named options), the
training contract in both frames, sizes of the paper RN50x4 from the meta device, interop with OpenAI / CaLa files,
and one engine run on synthetic CIRR (the released CLIP validation crashes; this one must run).

All on the ``tiny_clip`` preset (random init, CPU) except the meta-device checks of the paper preset.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.models import _clip_rn
from cirlab.models import cala as C

TEXTS = ["a red dress with long sleeves", "is darker and has a collar", "change the cat to a dog", "make it blue"]


def tiny(**overrides) -> C.CaLa:
    torch.manual_seed(0)
    return cirlab.create_model("cala", "tiny_clip", **overrides)


def batch(n: int = 4, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"ref_image": torch.randn(n, 3, size, size, generator=g),
            "target_image": torch.randn(n, 3, size, size, generator=g), "text": TEXTS[:n]}


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("frame", ["sum", "artemis"])
def test_gradients_reach_every_trained_group_and_no_frozen_weight(frame):
    model = tiny(cir_frame=frame).train()
    assert model.tower is None and model.multimodal is None and model.clip is not None
    bn = model.clip.visual.bn1
    stats = bn.running_mean.clone()
    out = model.training_step(batch())
    assert torch.isfinite(out["cala_loss"]) and {"qtm_ce", "tbia_ce", "ctr_ce"} <= set(out)
    out["cala_loss"].backward()
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["clip.text", "tac", "hca"] + (["artemis"] if frame == "artemis" else [])
    assert [g["lr_scale"] for g in groups] == [1.0, 2.0, 2.0] + ([10.0] if frame == "artemis" else [])
    for g in groups:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"]), g["name"]
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in in_groups:
            assert not p.requires_grad and p.grad is None, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    extra = {"clip.logit_scale"} | ({"artemis.temperature"} if frame == "artemis" else set())  # both unused
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("clip.visual.")} | extra
    # the frozen tower stays in eval mode (its BatchNorm statistics do not move) unless clip_bn_train_mode
    assert not model.clip.visual.training and torch.equal(bn.running_mean, stats)
    quirk = tiny(cir_frame=frame, clip_bn_train_mode=True).train()
    assert quirk.clip.visual.training
    quirk.training_step(batch())
    assert not torch.equal(quirk.clip.visual.bn1.running_mean, stats)  # released clip_model.train(): stats drift
    assert not quirk.eval().clip.visual.training


def test_group0_schedule_and_config_checks():
    groups = tiny(lr_schedule="group0", lr=1e-5).param_groups()
    assert [g["scheduled"] for g in groups] == [True, False, False]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 2e-5, 2e-5])
    with pytest.raises(ValueError, match="always frozen"):
        C.CaLaConfig.from_preset("tiny_clip", encoder="both")
    with pytest.raises(ValueError, match="must equal clip_embed_dim"):
        C.CaLaConfig.from_preset("tiny_clip", clip_text_width=48)
    with pytest.raises(ValueError, match="multiple of 32"):
        C.CaLaConfig.from_preset("tiny_clip", image_size=80)
    with pytest.raises(ValueError, match="clip_map_layout"):
        C.CaLaConfig.from_preset("tiny_clip", clip_map_layout="transpose")
    cfg = C.CaLaConfig.from_preset("tiny_clip")
    assert cfg.clip_vision_layers == [1, 1, 1, 1] and C.CaLaConfig.from_dict(cfg.to_dict()) == cfg
    # the CLIP path's switches on the BLIP-2 path, or ARTEMIS's without its frame, would be read by nothing
    for field, value in (("clip_bn_train_mode", True), ("clip_cls_token", "zero"), ("clip_artemis_trained", False)):
        with pytest.raises(ValueError, match=f"CaLaConfig.{field}={value!r} is read only with backbone="):
            C.CaLaConfig.from_preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="clip_artemis_trained=False is read only with cir_frame='artemis'"):
        C.CaLaConfig.from_preset("tiny_clip", clip_artemis_trained=False)


def test_a_stored_blip2_config_with_a_clip_switch_still_loads(caplog):
    # such a run was made when the switch was accepted and never read: it loads with the default, which it used
    stored = {**C.CaLaConfig.from_preset("tiny").to_dict(), "clip_bn_train_mode": True, "clip_cls_token": "zero"}
    with pytest.raises(ValueError, match="is read only with backbone="):
        C.CaLaConfig.from_dict(stored)
    cfg = C.CaLaConfig.from_stored(stored, "run/checkpoints/best.pt")
    assert (cfg.clip_bn_train_mode, cfg.clip_cls_token) == (False, "learned")
    assert "run/checkpoints/best.pt: the stored BLIP-2 config sets clip_cls_token='zero', clip_bn_train_mode=True" \
        in caplog.text
    clip = {**C.CaLaConfig.from_preset("tiny_clip").to_dict(), "clip_bn_train_mode": True}
    assert C.CaLaConfig.from_stored(clip).clip_bn_train_mode  # read on the CLIP path: kept


def test_released_clip_artemis_is_never_trained():
    # the released CLIP optimizer has three groups (text tower, TAC, HCA): its ARTEMIS frame keeps ARTEMIS's init
    released = tiny(cir_frame="artemis", clip_artemis_trained=False)
    assert [g["name"] for g in released.param_groups()] == ["clip.text", "tac", "hca"]
    assert not any(p.requires_grad for p in released.artemis.parameters())
    terms = released.training_step(batch())
    sum(v for k, v in terms.items() if k.endswith("_loss")).backward()
    assert all(p.grad is None for p in released.artemis.parameters())
    assert all(p.grad is not None for p in released.tac.parameters())
    default = tiny(cir_frame="artemis")
    assert [g["name"] for g in default.param_groups()] == ["clip.text", "tac", "hca", "artemis"]


def test_logits_and_retrieval_use_the_pooled_clip_vectors():
    """QTM = 100 normalize(attnpool(ref) + eot(text)) . normalize(attnpool(target)); TBIA = 10 HCA(maps, ln_final
    sequence) . attnpool(ref); CTR = 10 eot(text) . TAC(maps); encode_query / encode_target rank with the QTM."""
    model = tiny().eval()
    b = batch()
    with torch.no_grad():
        feats = model.features(b["ref_image"], b["text"], b["target_image"])
        ids = feats["ids"]
        eot = feats["F_c"][torch.arange(len(ids)), ids.argmax(-1)] @ model.clip.text_projection
        torch.testing.assert_close(feats["text_feats"], eot)
        assert feats["F_c"].shape == (4, 16, 32) and feats["F_r"].shape == (4, 256, 2, 2)
        assert feats["ref_feats"].shape == (4, 32) and feats["F_r_visual"] is feats["F_r"]
        logits = model.logits(feats)
        text, ref = feats["text_feats"], feats["ref_feats"]
        tgt = F.normalize(feats["target_feats"], dim=-1)
        torch.testing.assert_close(logits["qtm"], 100 * F.normalize(ref + text, dim=-1) @ tgt.T)
        torch.testing.assert_close(logits["tbia"], 10 * model.hca(feats["F_r"], feats["F_c"], feats["F_t"]) @ ref.T)
        torch.testing.assert_close(logits["ctr"], 10 * text @ model.tac(feats["F_r"], feats["F_t"]).T)
        q = model.encode_query(b["ref_image"], b["text"])
        torch.testing.assert_close(100 * q @ model.encode_target(b["target_image"]).T, logits["qtm"],
                                   atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ heads


def _hand_map() -> torch.Tensor:
    """[1, 3, 2, 2] with value 100 c + 10 y + x at channel c, row y, column x."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(2), indexing="ij")
    return (100 * c + 10 * y + x).float()[None]


def test_view_quirk_cuts_the_nchw_memory_and_permute_keeps_positions():
    maps = _hand_map()
    permute = _clip_rn.map_tokens(maps, "permute")
    # token i = position (i // 2, i % 2) with its three channels
    assert permute[0].tolist() == [[0, 100, 200], [1, 101, 201], [10, 110, 210], [11, 111, 211]]
    quirk = _clip_rn.map_tokens(maps, "view_quirk")
    # the released .view(bs, h*w, c): the (channel, row, column) order cut into chunks of 3 numbers
    assert quirk[0].tolist() == [[0, 1, 10], [11, 100, 101], [110, 111, 200], [201, 210, 211]]
    assert torch.equal(quirk, maps.view(1, 4, 3))
    # same numbers, different tokens
    assert sorted(quirk.flatten().tolist()) == sorted(permute.flatten().tolist()) and not torch.equal(quirk, permute)
    # the heads tokenise with their layout: same weights, different pseudo-targets
    torch.manual_seed(0)
    a = C.HingeCrossAttentionCLIP(8, 3, dropout=0.0, layout="permute")
    b = C.HingeCrossAttentionCLIP(8, 3, dropout=0.0, layout="view_quirk")
    b.load_state_dict(a.state_dict())
    text = torch.randn(1, 5, 8)
    ref, tgt = maps / 100, maps.flip(-1) / 100
    with torch.no_grad():
        out_a, out_b = a(ref, text, tgt), b(ref, text, tgt)
        assert not torch.allclose(out_a, out_b)
        plain = C.HingeCrossAttention(8, dropout=0.0)
        plain.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("fc.")})
        tok = lambda m: F.relu(a.fc(m.view(1, 4, 3)))  # noqa: E731 - the released forward, written out
        torch.testing.assert_close(out_b, plain(tok(ref), text, tok(tgt)))


def test_random_cls_quirk_changes_tac_between_forwards_and_the_defaults_do_not():
    torch.manual_seed(0)
    maps_r, maps_t = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    outs = {}
    for mode in ("learned", "zero", "random_quirk"):
        torch.manual_seed(1)
        tac = C.TwinAttentionCompositorCLIP(8, 16, steps=4, cls_token=mode).eval()
        with torch.no_grad():
            outs[mode] = (tac(maps_r, maps_t), tac(maps_r, maps_t))
        assert (tac.cls_token is not None) == (mode == "learned")
    assert torch.equal(*outs["learned"]) and torch.equal(*outs["zero"])
    assert not torch.allclose(*outs["random_quirk"])
    # TAC with a cls token = the BLIP-2 TAC on [cls; ReLU(fc(tokens))] for both sequences; token 0 is the cls
    torch.manual_seed(1)
    tac = C.TwinAttentionCompositorCLIP(8, 16, steps=4, cls_token="learned")
    plain = C.TwinAttentionCompositor(8, steps=4)
    plain.load_state_dict({k: v for k, v in tac.state_dict().items() if k.split(".")[0] not in ("fc", "cls_token")})
    with torch.no_grad():
        cls = tac.cls_token.expand(2, -1, -1)
        r, t = (torch.cat([cls, F.relu(tac.fc(m.flatten(2).transpose(1, 2)))], 1) for m in (maps_r, maps_t))
        torch.testing.assert_close(tac(maps_r, maps_t), plain(r, t))
    # in the model: the CTR logits move between two eval-mode forwards with the quirk, QTM does not
    b = batch(2)
    for mode, moves in (("learned", False), ("random_quirk", True)):
        model = tiny(clip_cls_token=mode).eval()
        with torch.no_grad():
            feats = model.features(b["ref_image"], b["text"], b["target_image"])
            one, two = model.logits(feats), model.logits(feats)
        assert torch.equal(one["qtm"], two["qtm"]) and torch.equal(one["tbia"], two["tbia"])
        assert (not torch.equal(one["ctr"], two["ctr"])) == moves, mode


def test_trace_names_clip_tokens():
    model = tiny()
    b = batch(2)
    frame = model.trace(b["ref_image"], b["text"], b["target_image"], ids=["q0", "q1"])
    words = set(frame[(frame.layer == "hca.bridge") & (frame.query_id == "q0")]["source"])
    assert {"red", "dress", "<start_of_text>", "<end_of_text>"} <= words
    assert {f"tac.{s}_attention.step{k}" for s in ("ref", "target") for k in range(1, 5)} <= set(frame["layer"])


# ------------------------------------------------------------------------------------------------ sizes


def _modified_resnet(width: int = 80, layers=(4, 6, 10, 6), embed: int = 640, grid: int = 9) -> int:
    """Parameters of OpenAI's ModifiedResNet (CLIP ``model.py``), from its module shapes: 3-conv stem, Bottlenecks
    (1x1, 3x3, 1x1 convs, expansion 4, an avgpool + 1x1 conv + BN shortcut when the shape changes), attention pool."""
    bn = lambda c: 2 * c  # noqa: E731 - weight and bias (running stats are buffers)
    h = width // 2
    total = 3 * h * 9 + bn(h) + h * h * 9 + bn(h) + h * width * 9 + bn(width)
    inplanes = width
    for i, blocks in enumerate(layers):
        planes = width * 2 ** i
        for j in range(blocks):
            total += inplanes * planes + bn(planes) + planes * planes * 9 + bn(planes) + planes * 4 * planes
            total += bn(4 * planes)
            if j == 0 and (i > 0 or inplanes != 4 * planes):
                total += inplanes * 4 * planes + bn(4 * planes)
            inplanes = 4 * planes
    c = width * 32
    return total + (grid * grid + 1) * c + 3 * (c * c + c) + c * embed + embed


def _text_tower(w: int = 640, layers: int = 12, ctx: int = 77, vocab: int = 49408, embed: int = 640) -> int:
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    return vocab * w + ctx * w + layers * block + 2 * w + w * embed


def test_paper_rn50x4_shapes_and_parameter_counts_from_the_meta_device():
    cfg = C.CaLaConfig.from_preset("cirr_clip")
    assert (cfg.image_size, cfg.clip_embed_dim, cfg.clip_vision_layers) == (288, 640, [4, 6, 10, 6])
    with torch.device("meta"):
        model = C.CaLa(cfg)
        pooled, maps = model.clip.image_features(torch.empty(2, 3, 288, 288))
        ids = torch.zeros(2, 77, dtype=torch.long)
        eot, seq = model.clip.text_features(ids)
    assert pooled.shape == (2, 640) and maps.shape == (2, 2560, 9, 9)
    assert eot.shape == (2, 640) and seq.shape == (2, 77, 640)
    assert model.clip.map_channels == 2560 and model.clip.grid == 9
    rows = {r["module"]: r for r in C.parameter_table("cirr_clip")}
    vision, text = _modified_resnet(), _text_tower()
    assert rows["clip"]["params"] == vision + text + 1 == 178_300_601  # + logit_scale; OpenAI RN50x4's 178.3M
    assert rows["clip"]["trainable"] == text  # the image tower and logit_scale are frozen
    d, fc = 640, 2560 * 640 + 640
    assert rows["hca"]["params"] == rows["hca"]["trainable"] == 4 * (d * d + d) + fc
    assert rows["tac"]["params"] == 2 * (4 * d * d + 4 * d) + fc + d  # + the learned cls token
    assert "artemis" not in rows
    assert rows["total"]["params"] == vision + text + 1 + 4 * (d * d + d) + 2 * (4 * d * d + 4 * d) + 2 * fc + d


# ------------------------------------------------------------------------------------------------ interop


def _perturbed(**overrides) -> C.CaLa:
    model = tiny(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_openai_state_dicts_load_from_torch_save_and_torchscript(tmp_path):
    model = _perturbed()
    state = {**model.clip.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(16)}
    torch.save(state, tmp_path / "clip.pt")
    with warnings.catch_warnings():  # torch.jit is deprecated (and warns while tracing); OpenAI's files are TorchScript
        warnings.simplefilter("ignore")
        ids = model.tokenize(TEXTS[:1])[0]
        torch.jit.trace_module(model.clip, {"text_features": (ids,)}, check_trace=False).save(str(tmp_path / "jit.pt"))
    with warnings.catch_warnings(record=True) as seen:  # a user reading OpenAI's RN50x4.pt saw torch's deprecation
        warnings.simplefilter("always")
        inferred = _clip_rn.config_from_state(_clip_rn.read_clip_state(tmp_path / "jit.pt"))
        assert [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
        assert inferred.pop("clip_text_heads") == 1  # OpenAI's rule, width // 64 (the tiny tower has 2 heads)
        assert inferred == {k: v for k, v in model.config.to_dict().items() if k in inferred}
        for name in ("clip.pt", "jit.pt"):
            fresh = tiny(init_from=str(tmp_path / name))
            reports = fresh.load_init()
            assert len(reports) == 1 and reports[0].ok, reports[0].summary()
            for k, v in model.clip.state_dict().items():
                assert torch.equal(fresh.clip.state_dict()[k], v), (name, k)
    from cirlab.core.errors import CheckpointError

    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP"):
        tiny(init_from=str(tmp_path / "other.pt")).load_init()
    with pytest.raises(CheckpointError, match="do not fit"):
        cirlab.create_model("cala", "tiny_clip", clip_embed_dim=48, clip_text_width=48,
                            init_from=str(tmp_path / "clip.pt")).load_init()


@pytest.mark.parametrize("drop", ["visual.", "visual.layer4."])
def test_a_clip_file_without_its_frozen_image_tower_is_refused_unless_init_partial(tmp_path, drop):
    """A CLIP file missing (part of) the frozen ModifiedResNet trained with it random, rc 0."""
    from cirlab.core.errors import CheckpointError

    keep = "visual.attnpool.positional_embedding"  # what makes it a CLIP RN file
    state = {k: v for k, v in _perturbed().clip.state_dict().items() if not k.startswith(drop) or k == keep}
    torch.save(state, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError) as err:
        tiny(init_from=str(tmp_path / "clip.pt")).load_init()
    message = str(err.value)
    assert message.startswith(f"model_overrides.init_from: {tmp_path / 'clip.pt'}: ") and "\n" not in message
    assert f"tensors of cala clip are not in it (clip.{drop}" in message
    assert "all FROZEN, they would stay random" in message and "model_overrides.init_partial=true" in message
    reports = tiny(init_from=str(tmp_path / "clip.pt"), init_partial=True).load_init()  # the original's strict=False
    assert reports[0].missing and all(k.startswith("clip." + drop) for k in reports[0].missing)


def test_cala_clip_files_round_trip(tmp_path):
    """cirlab -> the released CLIP path's tuned_clip / tuned_tac / tuned_hca files -> a fresh model: equal."""
    model = _perturbed(clip_cls_token="zero")
    files = C.export_cala_files(model, tmp_path / "saved", suffix="arithmetic")
    assert sorted(f.name for f in files) == [f"tuned_{n}_arithmetic.pt" for n in ("clip", "hca", "tac")]
    load = lambda n: torch.load(tmp_path / "saved" / f"tuned_{n}_arithmetic.pt", weights_only=True)  # noqa: E731
    assert set(load("clip")) == {"epoch", "CLIP"} and "visual.attnpool.c_proj.weight" in load("clip")["CLIP"]
    tac = load("tac")["TwinAttentionCompositorCLIP"]
    assert {"fc.weight", "reference_as_query_attention.in_proj_weight"} <= set(tac) and "cls_token" not in tac
    assert {"fc1.weight", "query_ref1.weight", "query_ref2.weight"} <= set(load("hca")["HingebasedCrossAttentionCLIP"])
    fresh = tiny(clip_cls_token="zero")
    reports = fresh.load_pretrained(tmp_path / "saved")
    assert all(r.ok for r in reports), "\n".join(r.summary() for r in reports)
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    learned = tiny().load_pretrained(tmp_path / "saved")  # the released TAC has no cls parameter
    assert next(r for r in learned if r.target == "tac").missing == ["tac.cls_token"]


def test_the_clip_file_helpers_refuse_a_blip2_cala_in_one_line(tmp_path):
    """The public CLIP-path loaders and exporter on a BLIP-2 CaLa: a ValueError naming the backbone and the helper to
    use (was an AttributeError on model.clip = None / model.hca.fc), and no empty folder left by the exporter."""
    files = C.export_cala_clip_files(tiny(), tmp_path / "saved")
    blip2 = cirlab.create_model("cala", "tiny")
    with pytest.raises(ValueError, match="BLIP-2 path .*load_lavis_blip2"):
        C.load_clip_weights(blip2, files[0])
    with pytest.raises(ValueError, match="BLIP-2 path .*load_lavis_blip2"):
        C.load_cala_clip_files(blip2, tmp_path / "saved")
    with pytest.raises(ValueError, match="this CaLa is BLIP-2 .*use export_cala_files"):
        C.export_cala_clip_files(blip2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_command_reads_clip_files_back(tmp_path, capsys, caplog):
    """`cirlab convert RUN DIR --to original` wrote a CLIP run's tuned_clip files that `cirlab convert DIR OUT --model
    cala` then refused ("reads ... tuned_blip_*.pt"); it reads them back now, sizes and all, and says which presets
    fit when the preset is the BLIP-2 path."""
    from cirlab.cli import main
    from cirlab.engine import runs

    model = _perturbed(clip_cls_token="zero", clip_text_heads=4)  # a head count other than width // 64
    C.export_cala_files(model, tmp_path / "saved", suffix="arithmetic")
    assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "x.pt"), "--model", "cala"]) == 2
    assert "holds CaLa's CLIP saves and preset 'cirr' is the BLIP-2 path; pass one of cirr_clip, fashioniq_clip, " \
        "tiny_clip" in caplog.text and not (tmp_path / "x.pt").exists()
    out = tmp_path / "back.pt"
    assert main(["convert", str(tmp_path / "saved"), str(out), "--model", "cala", "--preset", "tiny_clip",
                 "--set", "clip_cls_token=zero", "--set", "clip_text_heads=4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing"] == [] and summary["model_overrides"] == {"clip_cls_token": "zero", "clip_text_heads": 4}
    rebuilt, _ = runs.model_from_checkpoint(out)
    assert rebuilt.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_checkpoint_round_trip(tmp_path):
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.engine import runs
    from cirlab.engine.train import _model_meta

    model = _perturbed().eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), **_model_meta(model)})
    rebuilt, meta = runs.model_from_checkpoint(path)
    assert meta["model_name"] == "cala" and rebuilt.config == model.config
    b = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode_query(b["ref_image"], b["text"]),
                                   model.encode_query(b["ref_image"], b["text"]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cirlab.data.generators import synthetic

    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, seed=0, size="tiny", image_size=32, layouts=("cirr",))
    return root


@pytest.mark.parametrize("frame", ["sum", "artemis"])
def test_run_experiment_trains_and_evaluates_on_synthetic_cirr(frame, synth, tmp_path):
    """Training and the CIRR validation of the CLIP path (which crashes in the released code, src/validate.py as
    released)."""
    from cirlab.engine import runs

    config = runs.with_defaults({
        "name": f"cala_clip_{frame}", "model": "cala", "preset": "tiny_clip",
        "model_overrides": {"cir_frame": frame},
        "dataset": {"name": "cirr", "root": str(synth / "cirr"), "test_split": "val"},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False,
                  "precision": "fp32", "selection": "last"},
        "eval": {"splits": ["val"], "k": 5, "batch_size": 16}})
    result = runs.run_experiment(config, output_dir=tmp_path / "run")
    metrics = result["splits"]["val"]
    assert result["steps"] == 2 and {"R@1", "R@5", "cirr_Rsubset@1", "avg"} <= set(metrics)
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (tmp_path / "run" / "topk" / "val.topk.npz").is_file()


def test_building_a_clip_model_leaves_the_users_tokenizers_parallelism_as_it_was():
    """open_clip's tokenizer module sets TOKENIZERS_PARALLELISM=false when imported: a user's `true` (for their own
    Hugging Face tokenizers, and every child process's) was silently switched off by building a CLIP CaLa. In a
    fresh process: a module imported earlier in this one runs no import-time code again."""
    import os
    import subprocess
    import sys

    code = ("import os, cirlab\n"
            "cirlab.create_model('cala', 'tiny_clip')\n"
            "from cirlab.models._clip_rn import ClipTokenizer\n"
            "ClipTokenizer()\n"
            "print(os.environ.get('TOKENIZERS_PARALLELISM', '<unset>'))")
    for given in ("true", None):
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
        if given:
            env["TOKENIZERS_PARALLELISM"] = given
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-1] == (given or "<unset>")


def test_only_torchs_deprecation_notice_is_hidden_when_reading_a_torchscript_file(tmp_path, monkeypatch):
    """The filter for torch's TorchScript deprecation matched any FutureWarning naming torch.jit: on Python 3.14+
    torch says instead that torch.jit.load "is not supported ... and may break", which the user must see."""
    import types

    from torch.jit import _serialization

    model = _perturbed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = model.tokenize(TEXTS[:1])[0]
        torch.jit.trace_module(model.clip, {"text_features": (ids,)}, check_trace=False).save(str(tmp_path / "jit.pt"))
    monkeypatch.setattr(_serialization, "sys", types.SimpleNamespace(version_info=(3, 14, 0)))  # torch's check
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _clip_rn.read_clip_state(tmp_path / "jit.pt")
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == [
        "`torch.jit.load` is not supported in Python 3.14+ and may break. Please switch to `torch.export`."]
