"""AMC (cirlab/models/amc.py): paper parameter count, tiny-preset behaviour, parity with naive formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cirlab
from cirlab.models import amc as amc_mod
from cirlab.models.amc import AMC, AMCConfig, AMCEnsemble, amc_losses, tokenize


def amc_ensemble_scores(models, ref_images, texts, gallery_images):
    """Naive reference: the mean over models of the query/gallery cosine matrices (the original eval_ensemble.py)."""
    scores = [m.encode_query(ref_images, texts) @ m.encode_target(gallery_images).t() for m in models]
    return torch.stack(scores).mean(dim=0)

CAPTIONS = ["make the red circle blue", "add a small green square at the top left", "remove the triangle",
            "move the star to the right", "is darker", "has long sleeves"]


def tiny(**overrides) -> AMC:
    torch.manual_seed(0)
    model = cirlab.create_model("amc", preset="tiny", **overrides)
    model.fit_vocab(CAPTIONS)
    return model


def batch(b: int = 4, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"ref_image": torch.randn(b, 3, size, size, generator=g),
            "target_image": torch.randn(b, 3, size, size, generator=g),
            "text": [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]}


# ------------------------------------------------------------------------------------------- paper preset


def test_fashioniq_parameter_count_matches_the_digest() -> None:
    """AMC paper sizes: 49.94M + V x 300, from ResNet-50 body, 1x1 conv, LSTM and 2 x (router + CRN + GTN)."""
    d, w, h = 1024, 300, 512
    resnet50_body = 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 minus its fc classifier
    conv1x1 = 2048 * d
    lstm = 4 * d * (w + d) + 2 * 4 * d  # input + recurrent weights, two bias vectors
    router = 2 * d * h + 2 * h + h * 3  # bias-free linears + LayerNorm(512)
    attention_cell = 3 * (d * d + d) + 2 * 2 * d + (d * d // 2 + d // 2) + (d // 2 * d + d)  # QKV, 2 LN, FFN
    crn = (2 * d * d + d) + attention_cell
    gtn = 2 * (d * d + d)
    layer = router + crn + gtn
    assert (round(router / 1e6, 2), round(crn / 1e6, 2), round(gtn / 1e6, 2), round(layer / 1e6, 2)) == (
        1.05, 6.30, 2.10, 9.45)  # the digest's per-module figures
    fixed = resnet50_body + conv1x1 + lstm + 2 * layer
    assert round(fixed / 1e6, 2) == 49.94

    model = cirlab.create_model("amc", preset="fashioniq", pretrained=False)
    model.fit_vocab(f"word{i} shared" for i in range(3000))  # 3001 words + 4 special tokens
    vocab = len(model.vocab)
    count = sum(p.numel() for p in model.parameters())
    print(f"AMC fashioniq preset: {count:,} parameters = {fixed:,} + vocabulary {vocab} x 300")
    assert vocab == 3005
    assert count == fixed + vocab * w
    assert len(model.image_encoder.proj.weight.shape) == 4 and model.image_encoder.proj.bias is None


# ------------------------------------------------------------------------------------------- tiny preset


def test_tiny_forward_backward_shapes_and_gradients() -> None:
    model = tiny().train()
    b = batch()
    out = model.training_step(b)
    assert set(out) == {"cls_loss", "sim_loss", "batch_acc"}
    assert all(torch.isfinite(v) for v in out.values())
    (out["cls_loss"] + out["sim_loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.image_encoder.backbone.stages[0][0].weight.grad.abs().sum() > 0  # backbone is fine-tuned
    assert model.layers[0].router.mlp[0].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        q = model.encode_query(b["ref_image"], b["text"])
        t = model.encode_target(b["target_image"])
        tokens = model.image_tokens(b["ref_image"])
    assert q.shape == t.shape == (4, 64)
    assert tokens.shape == (4, 64, 64)  # 64 px -> 8x8 grid of 64-d tokens
    assert torch.allclose(q.norm(dim=-1), torch.ones(4)) and torch.allclose(t.norm(dim=-1), torch.ones(4))


def test_query_target_wiring_and_gradient_through_the_target() -> None:
    """f_q = norm(mean of layer-2 tokens), f_t = norm(mean of the raw grid tokens); the target path is trained."""
    model = tiny().eval()
    b = batch()
    with torch.no_grad():
        tokens = model.image_tokens(b["ref_image"])
        outs, gates = model.fuse(tokens, model.sentence(b["text"]))
        assert len(outs) == len(gates) == 2
        assert torch.allclose(model.encode_query(b["ref_image"], b["text"]), F.normalize(outs[1].mean(1), dim=-1),
                              atol=1e-6)
        assert not torch.allclose(outs[0].mean(1), outs[1].mean(1))  # layer 1 alone is not the query
        target_tokens = model.image_tokens(b["target_image"])
        assert torch.allclose(model.encode_target(b["target_image"]), F.normalize(target_tokens.mean(1), dim=-1),
                              atol=1e-6)
    # gradient reaches the shared encoder through the target image alone (the original does not detach it)
    model.train()
    ref = b["ref_image"].clone().requires_grad_(True)
    tgt = b["target_image"].clone().requires_grad_(True)
    out = model.training_step({**b, "ref_image": ref, "target_image": tgt})
    (out["cls_loss"] + out["sim_loss"]).backward()
    assert tgt.grad is not None and tgt.grad.abs().sum() > 0
    assert ref.grad is not None and ref.grad.abs().sum() > 0


def test_router_layer_types_are_the_papers() -> None:
    router = tiny().layers[0].router.mlp
    assert [type(m) for m in router] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert router[0].in_features == 2 * 64 and router[3].out_features == 3
    assert router[0].bias is None and router[3].bias is None


def test_gates_are_sigmoid_and_traced_with_both_expert_orders() -> None:
    model = tiny().eval()
    b = batch(3)
    with cirlab.trace_routes(model) as trace:
        trace.set_batch(["q0", "q1", "q2"], modification=["color", "add", "remove"])
        with torch.no_grad():
            model.encode_query(b["ref_image"], b["text"])
    for layer in ("layer1", "layer2"):
        gates = trace.gates(layer)
        assert gates.shape == (3, 3)
        assert ((gates > 0) & (gates < 1)).all()
        assert not torch.allclose(gates.sum(-1), torch.ones(3))  # independent sigmoids, not a softmax
    frame = trace.to_frame()
    assert len(frame) == 3 * 2 * 3
    row = frame[(frame.query_id == "q1") & (frame.layer == "layer2") & (frame.expert == "GTN")].iloc[0]
    assert row.code_index == 2 and row.paper_name == "α2 GTN" and row.modification == "add"
    names = frame.drop_duplicates("expert").set_index("expert")
    assert names.paper_name.to_dict() == {"NIN": "α1 NIN", "CRN": "α3 CRN", "GTN": "α2 GTN"}  # figure numbering
    assert names.code_index.to_dict() == {"NIN": 0, "CRN": 1, "GTN": 2}
    assert list(frame[frame.layer == "layer1"].expert[:3]) == ["NIN", "CRN", "GTN"]
    assert row.weight == pytest.approx(trace.gates("layer2")[1, 2].item())


def test_bn_running_stats_stay_frozen_while_affine_trains() -> None:
    model = tiny().train()
    bns = [m for m in model.image_encoder.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.layers[0].training and model.image_encoder.proj.training
    before = [m.running_mean.clone() for m in bns]
    out = model.training_step(batch())
    out["cls_loss"].backward()
    assert all(torch.equal(m.running_mean, r) for m, r in zip(bns, before))
    assert bns[0].weight.grad.abs().sum() > 0
    unfrozen = tiny(freeze_bn_stats=False).train()
    assert all(m.training for m in unfrozen.image_encoder.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_frozen_backbone_gets_no_gradient() -> None:
    model = tiny(train_backbone=False).train()
    assert not any(p.requires_grad for p in model.image_encoder.backbone.parameters())
    model.training_step(batch())["cls_loss"].backward()
    assert model.image_encoder.proj.weight.grad is not None


def test_learns_on_a_small_batch() -> None:
    model = tiny().train()
    b = batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(25):
        out = model.training_step(b)
        loss = out["cls_loss"] + out["sim_loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert out["batch_acc"].item() == 1.0


# ------------------------------------------------------------------------------------------- parity


def test_tokenisation_and_fashioniq_join() -> None:
    text = amc_mod.join_captions(["Is red, not blue!", "has café-style straps"])
    assert text == "<BOS> Is red, not blue! <AND> has café-style straps <EOS>"
    assert tokenize(text) == ["bos", "is", "red", "not", "blue", "and", "has", "cafstyle", "straps", "eos"]
    vocab = amc_mod.Vocab(["and", "is"])
    assert vocab.encode("<BOS> is <AND> zebra") == [0, 5, 4, 0]  # bos and unknown words -> <UNK> = 0
    assert vocab.encode("!!!") == [0]


@pytest.mark.parametrize("pool", ["masked_max", "zero_floor_max"])
def test_sentence_vector_is_the_masked_max_of_a_naive_loop(pool) -> None:
    model = tiny(text_pool=pool).eval()
    texts = ["remove the triangle", "is darker", "make the red circle blue"]
    enc = model.text_encoder
    with torch.no_grad():
        stc = enc(texts)
        longest = max(len(tokenize(t)) for t in texts)
        for i, text in enumerate(texts):
            ids = torch.tensor([enc.vocab.encode(text)])
            steps, _ = enc.lstm(enc.embed(ids))
            expected = steps[0].max(dim=0).values
            if pool == "zero_floor_max" and ids.shape[1] < longest:  # the original: padded steps are 0 before the
                expected = expected.clamp(min=0)  # max, a floor at 0
            assert torch.allclose(stc[i], expected, atol=1e-6)
            alone = enc([text])[0]  # the same text encoded by itself
            assert torch.allclose(alone, stc[i], atol=1e-6) == (pool == "masked_max" or ids.shape[1] == longest)


def test_experts_router_and_layer_match_the_formulas() -> None:
    torch.manual_seed(3)
    layer = amc_mod.RoutingLayer(AMCConfig.from_preset("tiny"), 1).eval()
    x, s = torch.randn(2, 5, 64), torch.randn(2, 64)
    ln = lambda t: F.layer_norm(t, t.shape[-1:])  # noqa: E731 - non-affine LayerNorm
    nin, crn, gtn = layer.experts
    gtn_ref = ln(x * gtn.gamma(s)[:, None] + gtn.beta(s)[:, None])  # raw gamma
    cell = crn.cell
    u = crn.fuse(torch.cat([x, s[:, None].expand(-1, 5, -1)], -1))
    h = cell.norm1(u)
    q, k, v = (f(h).view(2, 5, 4, 16).transpose(1, 2) for f in (cell.q, cell.k, cell.v))
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(16)).softmax(-1) @ v
    a = a.transpose(1, 2).reshape(2, 5, 64)  # no residual around attention, no output projection
    crn_ref = ln(a + cell.ffn(cell.norm2(a)))
    router = layer.router.mlp
    gates_ref = torch.sigmoid(router(torch.cat([x, s[:, None].expand(-1, 5, -1)], -1).mean(1)))
    with torch.no_grad():
        out, gates = layer(x, s)
        assert torch.allclose(nin(x, s), ln(x), atol=1e-6)
        assert torch.allclose(gtn(x, s), gtn_ref, atol=1e-5)
        assert torch.allclose(crn(x, s), crn_ref, atol=1e-5)
        assert torch.allclose(gates, gates_ref, atol=1e-6)
        mix = gates_ref[:, 0, None, None] * ln(x) + gates_ref[:, 1, None, None] * crn_ref \
            + gates_ref[:, 2, None, None] * gtn_ref
        assert torch.allclose(out, mix, atol=1e-5)
    assert all(m.bias is None for m in router if isinstance(m, nn.Linear))
    assert isinstance(router[1], nn.LayerNorm)


def test_losses_match_a_naive_computation() -> None:
    torch.manual_seed(4)
    q1, q2, t = torch.randn(5, 8), torch.randn(5, 8), F.normalize(torch.randn(5, 8), dim=-1)
    out = amc_losses([q1, q2], t, AMCConfig.from_preset("tiny"))
    cls = 0.0
    for i in range(5):
        logits = [10.0 * F.cosine_similarity(q2[i], t[j], dim=0) for j in range(5)]
        cls += -(logits[i] - torch.logsumexp(torch.stack(logits), 0)) / 5
    r = [F.normalize(torch.cat([q1[i], q2[i]]), dim=0) for i in range(5)]
    sim = sum(((r[i] @ r[j]) - (t[i] @ t[j])) ** 2 for i in range(5) for j in range(5)) / 25
    assert out["cls_loss"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert out["sim_loss"].item() == pytest.approx(sim.item(), rel=1e-5)


def test_ablations_cut_one_modality() -> None:
    b = batch(2)
    with torch.no_grad():
        img_only = tiny(ablation="image_only").eval()
        assert torch.allclose(img_only.encode_query(b["ref_image"], ["is darker"] * 2),
                              img_only.encode_query(b["ref_image"], ["remove the triangle"] * 2))
        txt_only = tiny(ablation="text_only").eval()
        assert torch.allclose(txt_only.encode_query(b["ref_image"], b["text"]),
                              txt_only.encode_query(b["target_image"], b["text"]), atol=1e-6)
        full = tiny().eval()
        assert not torch.allclose(full.encode_query(b["ref_image"], ["is darker"] * 2),
                                  full.encode_query(b["ref_image"], ["remove the triangle"] * 2))


def test_ensemble_scores_are_the_mean_of_cosines() -> None:
    models = [tiny().eval(), tiny(embed_dim=32, num_heads=2).eval()]
    b = batch(3)
    ens = AMCEnsemble(models)
    with torch.no_grad():
        scores = ens.encode_query(b["ref_image"], b["text"]) @ ens.encode_target(b["target_image"]).t()
        expected = sum(m.encode_query(b["ref_image"], b["text"]) @ m.encode_target(b["target_image"]).t()
                       for m in models) / 2
        direct = amc_ensemble_scores(models, b["ref_image"], b["text"], b["target_image"])
    assert torch.allclose(scores, expected, atol=1e-6) and torch.allclose(direct, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- state and files


def test_vocab_round_trips_with_the_state_dict(tmp_path) -> None:
    model = tiny().eval()
    path = tmp_path / "amc.pt"
    torch.save(model.state_dict(), path)
    fresh = cirlab.create_model("amc", preset="tiny").eval()  # empty vocabulary, 4-row table
    assert len(fresh.vocab) == 4
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.vocab.words == model.vocab.words
    b = batch(2)
    with torch.no_grad():
        assert torch.equal(fresh.encode_query(b["ref_image"], b["text"]),
                           model.encode_query(b["ref_image"], b["text"]))
    broken = dict(model.state_dict())
    broken["text_encoder._extra_state"] = {"vocab": ["<UNK>", "<AND>", "<BOS>", "<EOS>", "only"]}
    with pytest.raises(ValueError, match="vocabulary"):
        cirlab.create_model("amc", preset="tiny").load_state_dict(broken)


def test_fit_vocab_from_a_split_adds_each_caption() -> None:
    class Split:  # the CIRSplit fields fit_vocab reads
        triplets = [type("T", (), {"captions": ["Is red", "has a bow!"], "text": "ignored"})()]

    model = cirlab.create_model("amc", preset="tiny")
    assert model.fit_vocab(Split()) == 4 + 5
    assert model.vocab.words[4:] == ["is", "red", "has", "a", "bow"]
    with pytest.raises(TypeError, match=r"AMC.fit_vocab expects the training captions .* got 'a red shirt'"):
        model.fit_vocab("a red shirt")  # was a vocabulary of its 12 letters


def test_encoding_with_an_empty_vocabulary_warns_in_eval_mode_too(caplog) -> None:
    """evaluate_cir on an AMC that never had fit_vocab gave metrics of text-blind queries without a word."""
    model = cirlab.create_model("amc", preset="tiny").eval()
    caplog.set_level("WARNING", logger="cirlab")
    model.text_encoder.token_ids(["make it red"])
    model.text_encoder.token_ids(["make it blue"])
    assert caplog.text.count("AMC: encoding texts with an empty vocabulary") == 1  # once, not per batch
    assert "call model.fit_vocab(train_split) first" in caplog.text


def test_non_ascii_captions_are_said_to_lose_their_characters(caplog) -> None:
    """Captions in another script left an empty vocabulary, and the warning then said to call fit_vocab, which
    had been called: the original tokeniser drops non-ASCII characters (kept here), and that is what is said."""
    model = cirlab.create_model("amc", preset="tiny").eval()
    caplog.set_level("WARNING", logger="cirlab")
    model.fit_vocab(["ein grünes kleid", "a red dress"])
    assert ("AMC: 1 of 2 training captions hold non-ASCII characters, which AMC's tokeniser drops as the original "
            "does (text.encode('ascii', 'ignore'): 'grünes' is read as 'grnes').") in caplog.text
    assert "grnes" in model.vocab.index
    model.fit_vocab(["is red\u00a0with stripes", "is blue"])  # no-break space: no non-ASCII word (StopIteration)
    assert {"redwith", "stripes"} <= set(model.vocab.index)
    caplog.clear()
    model.fit_vocab(["红色的裙子", "更长的袖子"])
    assert "The vocabulary is empty: no caption has an ASCII word." in caplog.text
    model.text_encoder.token_ids(["红色"])
    assert "the training captions gave no word (see the warning of fit_vocab)" in caplog.text


def test_backbone_weights_load_from_a_local_file(tmp_path, caplog) -> None:
    source = tiny()
    with torch.no_grad():
        source.image_encoder.backbone.stages[1][1].weight.fill_(0.5)
    path = tmp_path / "tiny_backbone.pth"
    torch.save(source.image_encoder.backbone.state_dict(), path)
    model = tiny(pretrained=True, backbone_weights=str(path))
    for key, value in source.image_encoder.backbone.state_dict().items():
        assert torch.equal(model.image_encoder.backbone.state_dict()[key], value), key
    torch.save({"stages.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    from cirlab.core.errors import CirlabError

    with pytest.raises(RuntimeError, match="bad.pth") as caught:
        tiny(pretrained=True, backbone_weights=str(tmp_path / "bad.pth"))
    assert isinstance(caught.value, CirlabError)  # one line at the command line (a 43-line traceback before)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny(pretrained=True, backbone_weights=str(tmp_path / "missing.pth"))
    with caplog.at_level("WARNING", logger="cirlab.models.amc"):
        tiny(pretrained=True)  # no file anywhere: random init, said loudly
    assert "randomly initialised" in caplog.text


def test_resnet50_trunk_takes_a_torchvision_checkpoint(tmp_path) -> None:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    with torch.no_grad():
        net.layer4[2].conv3.weight.fill_(0.25)
    path = tmp_path / "resnet50-test.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which the trunk ignores
    trunk = amc_mod.build_backbone(AMCConfig(pretrained=True, backbone_weights=str(path)))
    assert torch.equal(trunk.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    assert not hasattr(trunk, "fc")
    # the paper's resnet50-19c8e357.pth predates BatchNorm's num_batches_tracked buffer: still loads
    legacy = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, path)
    trunk = amc_mod.build_backbone(AMCConfig(pretrained=True, backbone_weights=str(path)))
    assert torch.equal(trunk.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    # a file that lacks a real tensor is refused, naming the file and the key
    torch.save({k: v for k, v in legacy.items() if k != "layer1.0.conv1.weight"}, path)
    with pytest.raises(RuntimeError, match=r"resnet50-test.pth.*layer1\.0\.conv1\.weight"):
        amc_mod.build_backbone(AMCConfig(pretrained=True, backbone_weights=str(path)))


def test_torch_hub_cache_lookup_takes_only_the_v1_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet50-11ad3fa6.pth").write_bytes(b"")  # V2: another training recipe
    assert amc_mod._torch_hub_resnet50() == ""
    (tmp_path / "checkpoints" / "resnet50-0676ba61.pth").write_bytes(b"")
    assert amc_mod._torch_hub_resnet50().endswith("resnet50-0676ba61.pth")


def test_glove_vectors_load_from_a_local_file(tmp_path) -> None:
    rows = {"red": 1.0, "blue": 2.0, "circle": 3.0}
    lines = [f"{w} " + " ".join([str(v)] * 32) for w, v in rows.items()] + ["zzz " + " ".join(["9"] * 32)]
    path = tmp_path / "glove.32d.txt"
    path.write_text("\n".join(lines) + "\n")
    model = tiny(word_vectors="glove", glove_path=str(path))
    table, vocab = model.text_encoder.embed.weight, model.vocab
    assert torch.equal(table[vocab.index["red"]], torch.full((32,), 1.0))
    assert torch.equal(table[vocab.index["circle"]], torch.full((32,), 3.0))
    # a word the file lacks keeps the embedding's own N(0,1) init: the same row a run without GloVe gets
    assert torch.equal(table[vocab.index["triangle"]], tiny().text_encoder.embed.weight[vocab.index["triangle"]])
    found = amc_mod.read_glove(path, ["red", "'circle.", "blue/green", "nope"], 32)  # the original's fallbacks
    assert sorted(found) == ["'circle.", "blue/green", "red"]
    assert torch.equal(found["'circle."], torch.full((32,), 3.0))
    assert torch.equal(found["blue/green"], torch.full((32,), 2.0))
    (tmp_path / "bad.txt").write_text("red 1 2 3\n")
    with pytest.raises(ValueError, match="bad.txt line 1"):
        tiny(word_vectors="glove", glove_path=str(tmp_path / "bad.txt"))


def _glove_line(word: str, value: float, dim: int = 32) -> str:
    return f"{word} " + " ".join([str(value)] * dim)


def test_glove_840b_tokens_with_spaces_are_read_as_whole_tokens(tmp_path) -> None:
    """GloVe 840B holds tokens with spaces ("at name@domain.com", ". . ."): the token is everything before the
    last dim values, so such a line neither breaks the read nor replaces the vector of its first word."""
    path = tmp_path / "glove.840B.like.txt"
    lines = [_glove_line(",", 0.5), _glove_line("at", 1.0), _glove_line("at name@domain.com", 7.0),
             _glove_line(". . .", 8.0), _glove_line("to", 2.0), _glove_line("to name@domain.com", 9.0)]
    path.write_text("\n".join(lines) + "\n")
    model = tiny(word_vectors="glove", glove_path=str(path))  # "at" and "to" are words of CAPTIONS
    table, vocab = model.text_encoder.embed.weight, model.vocab
    assert torch.equal(table[vocab.index["at"]], torch.full((32,), 1.0))
    assert torch.equal(table[vocab.index["to"]], torch.full((32,), 2.0))
    found = amc_mod.read_glove(path, ["at", "at name@domain.com", ". . ."], 32)
    assert {w: float(v[0]) for w, v in found.items()} == {"at": 1.0, "at name@domain.com": 7.0, ". . .": 8.0}


def test_a_word2vec_header_line_is_skipped(tmp_path) -> None:
    """gensim's text format starts with "count dim": it was read as a token "3" with one value and refused."""
    path = tmp_path / "vectors.w2v.txt"
    path.write_text("\n".join(["3 32", _glove_line("at", 1.0), _glove_line("to", 2.0)]) + "\n")
    found = amc_mod.read_glove(path, ["at", "to", "3"], 32)
    assert {w: float(v[0]) for w, v in found.items()} == {"at": 1.0, "to": 2.0}


def test_glove_files_that_cannot_be_word_vectors_are_one_line_each(tmp_path, caplog) -> None:
    """A zip (as GloVe is downloaded), a binary file, a file of another dimension, a non-number value, and a file
    covering no vocabulary word are each one InputError line naming model_overrides.glove_path and the file (the
    zip and the zero-coverage file trained with random word vectors before); a low coverage is a WARNING."""
    import logging
    import zipfile

    from cirlab.core.errors import InputError

    text = "\n".join(_glove_line(w, 1.0) for w in ("red", "blue", "circle")) + "\n"
    archive = tmp_path / "glove.840B.300d.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("glove.840B.300d.txt", text)
    binary = tmp_path / "vectors.bin"
    binary.write_bytes(b"3 32\nred " + bytes(range(256)))
    wide = tmp_path / "glove.300d.txt"
    wide.write_text("\n".join(_glove_line(w, 1.0, dim=40) for w in ("red", "blue")) + "\n")
    nan_word = tmp_path / "glove.bad_value.txt"
    nan_word.write_text(_glove_line("zzz", 1.0) + "\n" + "red " + " ".join(["x1"] * 32) + "\n")
    other = tmp_path / "glove.other_words.txt"
    other.write_text("\n".join(_glove_line(w, 1.0) for w in ("rouge", "bleu")) + "\n")
    for path, message in ((archive, "zip archive.*unzip it.*glove.840B.300d.txt"), (binary, "binary file"),
                          (wide, "line 1 .*40 values, expected 32"), (nan_word, "line 2 \\('red'\\)"),
                          (other, "covers none of the")):
        with pytest.raises(InputError, match=f"model_overrides.glove_path: {path}.*{message}"):
            tiny(word_vectors="glove", glove_path=str(path))
    low = tmp_path / "glove.low.txt"
    low.write_text(text)
    with caplog.at_level(logging.INFO, logger="cirlab.models.amc"):
        tiny(word_vectors="glove", glove_path=str(low))
    said = [r for r in caplog.records if "covers 3 of" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


# ------------------------------------------------------------------------------------------- config, contract


def test_presets_config_checks_and_train_defaults() -> None:
    assert cirlab.list_presets("amc") == ["fashioniq", "lite", "shoes", "tiny"]
    assert AMCConfig.from_preset("shoes").transform == "amc_shoes"
    train_tf, eval_tf = tiny().image_transform(True), tiny().image_transform(False)
    from PIL import Image

    image = Image.new("RGB", (80, 60), (255, 0, 0))
    assert train_tf(image).shape == eval_tf(image).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="backbone"):
        AMCConfig(backbone="vgg")
    with pytest.raises(ValueError, match="num_heads"):
        AMCConfig(embed_dim=100, num_heads=8)
    defaults = tiny().default_train_config()
    assert (defaults["lr"], defaults["weight_decay"], defaults["batch_size"], defaults["epochs"]) == (
        1e-4, 1e-6, 32, 50)
    assert defaults["lr_milestones"] == [40] and defaults["ema_decay"] == 0.999
    from cirlab.engine.train import TrainConfig, schedule_factor

    cfg = TrainConfig.from_dict(defaults)
    assert schedule_factor(cfg, 39) == 1.0 and schedule_factor(cfg, 40) == pytest.approx(0.1)
    assert cfg.ema_mode == "standard"


# ------------------------------------------------------------------------------------------- frozen-feature cache
def _run(model: AMC, pool: torch.Tensor, steps: int = 6) -> tuple[list[float], dict]:
    """A few optimiser steps over batches drawn (seeded) from a small image pool: every image recurs, in batches
    of other sizes and compositions."""
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(pool), generator=g)[:3 + step % 3]
        b = {"ref_image": pool[idx], "target_image": pool[idx.roll(1)],
             "text": [CAPTIONS[int(i) % len(CAPTIONS)] for i in idx]}
        out = model.training_step(b)
        loss = out["cls_loss"] + out["sim_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_frozen_feature_cache_run_equals_uncached_run(tmp_path, monkeypatch) -> None:
    from cirlab.core import featcache

    monkeypatch.setattr(featcache, "_STORES", {})
    pool = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain, plain_state = _run(tiny(train_backbone=False, feature_cache=False).train(), pool)
    cached_model = tiny(train_backbone=False, feature_cache_dir=str(tmp_path)).train()
    cached, cached_state = _run(cached_model, pool)
    assert cached == plain
    assert all(torch.equal(plain_state[k], cached_state[k]) for k in plain_state)
    store = cached_model.image_encoder._feature_store()
    assert store.hits > 0 and store.misses == len(pool)  # every image computed once
    store.flush()
    # a new process (empty registry) reads the memory-mapped segments and still trains identically
    monkeypatch.setattr(featcache, "_STORES", {})
    again_model = tiny(train_backbone=False, feature_cache_dir=str(tmp_path)).train()
    again, _ = _run(again_model, pool)
    assert again == plain and again_model.image_encoder._feature_store().misses == 0


def test_frozen_feature_cache_skips_training_views_of_a_random_transform(tmp_path, monkeypatch, caplog) -> None:
    """With transform "amc" (random crop + flip) every training view was a cache miss written to disk and never read:
    13 GB per Fashion-IQ epoch, and one more open segment per 256 views."""
    from cirlab.core import featcache

    monkeypatch.setattr(featcache, "_STORES", {})
    pool = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain, plain_state = _run(tiny(train_backbone=False, feature_cache=False, transform="amc").train(), pool)
    model = tiny(train_backbone=False, feature_cache_dir=str(tmp_path), transform="amc").train()
    with caplog.at_level("INFO", logger="cirlab.models.amc"):
        cached, cached_state = _run(model, pool)
    assert cached == plain and all(torch.equal(plain_state[k], cached_state[k]) for k in plain_state)
    store = model.image_encoder._feature_store()
    assert (store.hits, store.misses) == (0, 0)  # training never touched the store
    assert sum("not used for training views" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        model.eval().image_encoder(pool)  # evaluation images (centre crop: fixed) are cached
    assert store.misses == len(pool)


def _frozen_encoder(tmp_path, monkeypatch) -> tuple:
    """A tiny AMC's frozen image encoder with its feature store in ``tmp_path`` (a fresh process's registry), and
    three images."""
    from cirlab.core import featcache

    monkeypatch.setattr(featcache, "_STORES", {})
    model = tiny(train_backbone=False, feature_cache_dir=str(tmp_path)).eval()
    return model.image_encoder, torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_frozen_feature_cache_keeps_features_of_each_precision_apart(tmp_path, monkeypatch) -> None:
    """A bf16-autocast run filled the store, and an fp32 run then trained on its bf16 features without a word."""
    enc, images = _frozen_encoder(tmp_path, monkeypatch)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = enc.backbone_features(images)
        full = enc.backbone_features(images)
        assert torch.equal(full, enc._frozen(images))  # computed in fp32, not read from the bf16 entries
        assert not torch.equal(full, half)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(enc.backbone_features(images), half)  # each precision still reuses its own
            half_store = enc._feature_store("cpu")
    full_store = enc._feature_store("cpu")
    assert half_store is not full_store and (half_store.hits, half_store.misses) == (3, 3)
    assert (full_store.hits, full_store.misses) == (0, 3)


def test_only_the_amc_training_transform_draws_at_random() -> None:
    import numpy as np
    from PIL import Image

    from cirlab.data.transforms import build_transform, is_random, list_transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8))
    for name in list_transforms():
        for train in (False, True):
            t = build_transform(name, image_size=32, train=train)
            torch.manual_seed(0)
            views = [t(image) for _ in range(6)]
            differ = any(v.shape != views[0].shape or not torch.equal(v, views[0]) for v in views[1:])
            assert differ == is_random(name, train), (name, train)


def test_frozen_feature_cache_misses_on_changed_image_transform_or_weights(tmp_path, monkeypatch) -> None:
    enc, images = _frozen_encoder(tmp_path, monkeypatch)
    with torch.no_grad():
        first = enc(images)
        store = enc._feature_store()
        assert (store.misses, store.hits) == (3, 0)
        assert torch.equal(enc(images), first) and store.hits == 3
        edited = images.clone()
        edited[1, 0, 0, 0] += 0.5  # one pixel of one image changed
        enc(edited)
        assert store.misses == 4  # only the edited image is recomputed
        enc(torch.nn.functional.interpolate(images, size=96))  # another transform (size) of the same images
        assert store.misses == 7
        for p in enc.backbone.parameters():  # new backbone weights: a new store, nothing reused
            p.add_(0.01)
        new_store = enc._feature_store()
        assert new_store is not store and new_store.directory != store.directory
        assert not torch.equal(enc(images), first) and new_store.misses == 3


def test_the_lstm_runs_in_fp32_inside_a_cpu_bf16_autocast():
    """oneDNN has no bf16 LSTM on CPUs without AVX-512: a bf16 AMC run on such a CPU (an AMD EPYC) failed "could not
    create a primitive descriptor" at its first step. The LSTM runs in fp32 there, as the original runs it."""
    model = cirlab.create_model("amc", "tiny")
    model.fit_vocab(["a red dress", "make it blue"])
    texts = ["a red dress", "make it blue please"]
    reference = model.text_encoder(texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.text_encoder(texts)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, reference, atol=1e-2)
