"""HREM (cirlab.models.hrem): sizes, the dual-encoder contract, pooling, the instance-level relation module against
a per-caption loop reference, gradient paths, losses against hand computations, the connection bug, augmentation,
checkpoint interop with the original layout, tracing frames and a short run on synthetic precomp data."""
from __future__ import annotations

import argparse
import math
import pathlib
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.models import hrem as H
from cirlab.models._text import BERT_BASE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a man riding a horse .", "two dogs play in the snow", "a red car parked near a tree",
            "the cat sleeps on a warm sofa near the big window in the afternoon sun", "kids", "a b c d e f"]


def _tiny(seed: int = 0, fit: bool = True, **kw) -> H.HREM:
    torch.manual_seed(seed)
    model = cirlab.create_model("hrem", "tiny", **kw)
    if fit:
        model.fit_vocab(CAPTIONS)  # whole-word vocabulary for the random tiny BERT
    return model


def _batch(n: int = 6, dim: int = 64, seed: int = 1, image_idx=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image_feats": torch.rand(n, 36, dim, generator=g), "text": CAPTIONS[:n],
            "image_idx": torch.arange(n) if image_idx is None else torch.as_tensor(image_idx),
            "caption_idx": torch.arange(n)}


def test_bert_folder_with_tokenizer_json_only_and_a_vocabulary_too_long(tmp_path):
    """HREM reads a transformers-5 BERT folder (tokenizer.json, no vocab.txt) and refuses a vocab.txt longer than
    the word-embedding table when built (an IndexError at the first training step before)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from cirlab.core.errors import InputError
    from cirlab.models._text import tiny_vocab

    vocab = tiny_vocab(["man", "horse"])
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40)).save_pretrained(tmp_path)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path)
    model = _tiny(fit=False, bert=str(tmp_path))
    ids, lengths = model.tokenize(["A man riding"])
    assert ids[0, :4].tolist() == [vocab.index(t) for t in ("[CLS]", "a", "man", "r")] and lengths.tolist() == [10]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + ["extra"]) + "\n")
    with pytest.raises(InputError, match=rf"HREM: model_overrides.bert=.*{len(vocab) + 1} tokens but .* "
                                         rf"{len(vocab)} rows"):
        _tiny(fit=False, bert=str(tmp_path))


# --------------------------------------------------------------------------------------------- sizes, contract


@pytest.mark.parametrize("preset,mask_weight,cutoff,batch", [("f30k", 1.0, 1.7, 128), ("coco", 1.5, 1.9, 256)])
def test_paper_presets_have_the_paper_module_sizes(preset, mask_weight, cutoff, batch):
    with torch.device("meta"):  # BERT-Base sizes without allocating or loading a weight
        model = cirlab.create_model("hrem", preset, bert="random", bert_config=BERT_BASE_CONFIG)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layer = 3 * 1024 * 1024 + 3 * 1024 + 3 * (1024 * 1024 + 1024) + 4 * 1024  # attention, 2 FFN linears, 2 LN
    assert count(model.img_enc.fc) == 3_675_648  # digest 3.5: FC_MLP 3.68M (incl. the unused BN(1024))
    assert count(model.img_enc.aggr) == count(model.txt_enc.aggr) == layer == 6_301_696  # 6.30M each
    assert count(model.img_enc) == 9_977_344  # image encoder 9.98M
    assert count(model.txt_enc.linear) == 768 * 1024 + 1024 == 787_456  # 0.79M
    pooler = 768 * 768 + 768  # built without BERT's pooler (HREM never uses it); the 109.5M counts it
    assert 109.4e6 < count(model.txt_enc.bert) + pooler < 109.6e6
    assert count(model.relation) == layer + 2 * (10 * 10 + 10 + 10 + 1)  # criterion 6.30M, training only
    cfg = model.config
    assert (cfg.mask_weight, cfg.dws_cutoff, model.default_train_config()["batch_size"]) == (mask_weight, cutoff,
                                                                                           batch)


def test_default_train_config_and_bert_learning_rate():
    from cirlab.engine.train import build_optimizer, resolve_train_config

    model = _tiny()
    cfg = resolve_train_config(model)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.grad_clip) == ("adamw", 5e-4, 1e-4, 30, 2.0)
    assert cfg.schedule == "step" and cfg.lr_milestones == [15, 25] and cfg.lr_gamma == 0.1
    opt = build_optimizer(model, cfg)
    bert = {id(p) for p in model.txt_enc.bert.parameters()}
    lrs = {("bert" if id(g["params"][0]) in bert else "rest"): g["base_lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"bert": 5e-5, "rest": 5e-4})
    scaled = build_optimizer(model, resolve_train_config(model, {"lr": 1e-3}))  # --set train.lr keeps the ratio
    assert {len(g["params"]): g["base_lr"] for g in scaled.param_groups} == pytest.approx(
        {len(g["params"]): g["base_lr"] * 2 for g in opt.param_groups})
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))  # BERT fine-tuned


def test_dual_encoder_scores_are_one_matrix_product():
    model = _tiny().eval()
    batch = _batch()
    with torch.no_grad():
        img, txt = model.encode_image(batch["image_feats"]), model.encode_text(CAPTIONS)
        alone = model.encode_image(batch["image_feats"][2:3])
        one_text = model.encode_text(CAPTIONS[3:4])
    assert img.shape == txt.shape == (6, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(6), atol=1e-5)
    torch.testing.assert_close(model.score(img, txt), img @ txt.T)
    torch.testing.assert_close(alone[0], img[2], atol=1e-5, rtol=0)  # no batch dependence at inference
    torch.testing.assert_close(one_text[0], txt[3], atol=1e-5, rtol=0)  # padding is masked out


def test_tokenize_lengths_count_cls_and_sep_and_pad_to_topk():
    model = _tiny()
    ids, lengths = model.tokenize(["kids", "a man riding a horse ."])
    tok = model._get_tokenizer()
    assert lengths.tolist() == [3, 8] and ids.shape == (2, 10)  # padded to topk = 10 positions
    assert tok.convert_ids_to_tokens(ids[1, :8].tolist()) == ["[CLS]", "a", "man", "riding", "a", "horse", ".",
                                                              "[SEP]"]
    assert ids[0, 3:].eq(tok.pad_token_id).all()
    with pytest.raises(TypeError, match="list of captions"):
        model.tokenize("one caption")


# --------------------------------------------------------------------------------------------- pooling


def test_maxk_pool_by_hand_and_the_carried_k_quirk():
    x = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [2.0, 4.0]],
                      [[7.0, 1.0], [0.0, 0.0], [9.0, 9.0]],  # length 1: only the first position counts
                      [[1.0, 2.0], [4.0, 8.0], [3.0, 6.0]]])
    lengths = torch.tensor([3, 1, 3])
    fixed = H.maxk_pool(x, lengths, k=2)
    assert fixed.tolist() == [[2.5, 4.5], [7.0, 1.0], [3.5, 7.0]]
    quirk = H.maxk_pool(x, lengths, k=2, quirk=True)  # k = 1 from sample 1 on: sample 2 takes its max only
    assert quirk.tolist() == [[2.5, 4.5], [7.0, 1.0], [4.0, 8.0]]
    assert H.masked_mean(x, lengths).tolist()[1] == [7.0, 1.0]


def test_pooled_embedding_is_the_residual_mix():
    model = _tiny().eval()
    feats = torch.rand(3, 36, 64)
    with torch.no_grad():
        enc = model.img_enc(feats)
        local = model.img_enc.fc(feats)
        res = H.maxk_pool(local, enc.lengths, 2)
        enh = model.img_enc.aggr(local.transpose(0, 1)).transpose(0, 1).mean(1)
    torch.testing.assert_close(enc.raw, 0.8 * res + 0.2 * enh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.emb, enc.raw / (enc.raw.norm(dim=-1, keepdim=True) + 1e-8))


# --------------------------------------------------------------------------------------------- relation module


def _loop_word_region(regions, words, cap_len, topk=10):
    """Reference: the original per-caption loop (word selection max(len, topk), SCAN normalisations)."""
    n_img = regions.shape[0]
    reg = F.normalize(regions, dim=-1)
    t2i_k, t2i_m, i2t_k, i2t_m = [], [], [], []
    for c in range(words.shape[0]):
        n = int(cap_len[c])
        w = F.normalize(words[c, :max(n, topk)], dim=-1)
        z = F.leaky_relu(torch.stack([w @ reg[i].T for i in range(n_img)]), 0.1)  # [B_img, n_sel, R]
        row = F.normalize(z, dim=1).max(dim=2).values
        t2i_m.append(row[:, :n].mean(1))
        t2i_k.append(row.topk(topk, dim=1).values)
        col = F.normalize(z, dim=2)[:, :n].max(dim=1).values
        i2t_m.append(col.mean(1))
        i2t_k.append(col.topk(topk, dim=1).values)
    return {"t2i_topk": torch.stack(t2i_k), "t2i_mean": torch.stack(t2i_m),
            "i2t_topk": torch.stack(i2t_k).transpose(0, 1), "i2t_mean": torch.stack(i2t_m).T}


def _loop_graph(model: H.HREM, img: H.Encoded, txt: H.Encoded, bug: bool = False) -> dict:
    """Reference graph built entry by entry (sorting each row for the threshold, distances pair by pair)."""
    cfg, v, t = model.config, img.emb, txt.emb
    b = v.shape[0]
    k = int(b * cfg.threshold)
    sc = _loop_word_region(img.local.detach(), txt.local.detach(), txt.lengths, cfg.topk)

    def top(s):
        return torch.tensor([[s[i, j] >= sorted(s[i].tolist(), reverse=True)[k - 1] for j in range(b)]
                             for i in range(b)])

    ii, tt = (v @ t.T, t @ v.T) if bug else (v @ v.T, t @ t.T)
    connect = {"i2i": top(ii), "t2t": top(tt), "i2t": top(sc["i2t_mean"]), "t2i": top(sc["t2i_mean"])}
    dist = lambda a, c: torch.stack([torch.stack([(a[i] - c[j]).norm() for j in range(b)]) for i in range(b)])  # noqa
    rel = {"i2i": torch.exp(-dist(v, v)), "t2t": torch.exp(-dist(t, t)),
           "i2t": model.relation.mlp_i2t(sc["i2t_topk"]).squeeze(-1) + sc["i2t_mean"],
           "t2i": model.relation.mlp_t2i(sc["t2i_topk"]).squeeze(-1) + sc["t2i_mean"]}
    target = torch.exp(-dist(v, t))

    def kl(g, a):  # KL(softmax(a) || softmax(g)) per row, averaged over rows
        p, q = a.softmax(-1), g.softmax(-1)
        return sum(float((p[i] * (p[i].log() - q[i].log())).sum().detach()) for i in range(b)) / b

    return {"connect": connect, "relevance": rel, "reg": kl(target, rel["i2t"]) + kl(target.T, rel["t2i"]),
            "scores": sc}


def test_word_region_scores_equal_the_per_caption_loop():
    g = torch.Generator().manual_seed(0)
    regions, words = torch.randn(5, 12, 16, generator=g), torch.randn(5, 14, 16, generator=g)
    cap_len = torch.tensor([3, 14, 9, 10, 12])  # shorter than topk (padding words read), longer, equal
    fast = H.word_region_scores(regions, words, cap_len, 10)
    ref = _loop_word_region(regions, words, cap_len, 10)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
    assert fast["z"].shape == (5, 5, 14, 12)
    with pytest.raises(ValueError, match="topk 10"):
        H.word_region_scores(regions[:, :8], words, cap_len, 10)


@pytest.mark.parametrize("bug", [False, True])
def test_relation_graph_equals_the_loop_reference(bug):
    model = _tiny(connection_bug=bug).train()
    with torch.no_grad():
        img, txt, _ = model.encode_batch(_batch())
        graph = model.relation.graph(img, txt)
    ref = _loop_graph(model, img, txt, bug)
    for key in H.EDGE_TYPES:
        assert torch.equal(graph.connect[key], ref["connect"][key]), key
        torch.testing.assert_close(graph.relevance[key], ref["relevance"][key], atol=1e-5, rtol=1e-5, msg=key)
    assert math.isclose(float(graph.reg), ref["reg"], rel_tol=1e-4, abs_tol=1e-6)
    k = int(6 * 0.5)
    assert all(bool((graph.connect[e].sum(1) >= k).all()) for e in H.EDGE_TYPES)
    mask = graph.mask
    connected = graph.joint(graph.connect)
    assert torch.isinf(mask[~connected]).all() and torch.isfinite(mask[connected]).all()
    torch.testing.assert_close(mask[connected], model.config.mask_weight * graph.joint(graph.relevance)[connected])


def test_connection_bug_changes_only_the_intra_modal_blocks():
    fixed, buggy = _tiny(), _tiny(connection_bug=True)
    buggy.load_state_dict(fixed.state_dict())
    fixed.eval(), buggy.eval()
    with torch.no_grad():
        img, txt, _ = fixed.encode_batch(_batch())
        a, b = fixed.relation.graph(img, txt), buggy.relation.graph(img, txt)
    for key in ("i2t", "t2i"):
        assert torch.equal(a.connect[key], b.connect[key])
    for key in H.EDGE_TYPES:
        assert torch.equal(a.relevance[key], b.relevance[key])  # relevance never depends on the bug
    k = 3
    v, t = img.emb, txt.emb
    assert torch.equal(a.connect["i2i"], H.top_share(v @ v.T, k)) and torch.equal(b.connect["i2i"],
                                                                                    H.top_share(v @ t.T, k))
    assert torch.equal(a.connect["t2t"], H.top_share(t @ t.T, k)) and torch.equal(b.connect["t2t"],
                                                                                    H.top_share(t @ v.T, k))
    assert a.connect["i2i"].diagonal().all() and a.connect["t2t"].diagonal().all()  # fixed: self always on
    assert not torch.equal(a.connect["i2i"], b.connect["i2i"]) or not torch.equal(a.connect["t2t"], b.connect["t2t"])


def test_gradient_paths_of_the_relation_module():
    model = _tiny().train()
    assert all(torch.equal(p, q) for p, q in zip(model.relation.mlp_t2i.parameters(),
                                                 model.relation.mlp_i2t.parameters()))  # twins start identical
    img, txt, _ = model.encode_batch(_batch())
    graph = model.relation.graph(img, txt)
    cross = graph.relevance["i2t"].sum() + graph.relevance["t2i"].sum()
    grads = torch.autograd.grad(cross, [img.local, txt.local, img.emb], retain_graph=True, allow_unused=True)
    assert all(g is None for g in grads)  # adjacency branch: detached regions/words, no path to the embeddings
    assert graph.relevance["i2i"].requires_grad and graph.relevance["t2t"].requires_grad  # intra: not detached

    model.zero_grad()
    graph.reg.backward()  # the regulariser reaches the relation MLPs only
    for name, p in model.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == name.startswith(("relation.mlp_t2i.", "relation.mlp_i2t.")), name


def test_enhanced_terms_reach_fusion_and_encoders():
    model = _tiny().train()
    img, txt, labels = model.encode_batch(_batch())
    v_hat, t_hat, graph = model.relation(img, txt)
    assert v_hat.shape == t_hat.shape == (6, 32)
    torch.testing.assert_close(v_hat.norm(dim=-1), torch.ones(6))
    loss = model._pair_loss("vse", img.emb, t_hat, labels) + model._pair_loss("vse", v_hat, t_hat, labels)
    loss.backward()
    assert model.relation.fusion.layers[0].linear1.weight.grad.abs().sum() > 0
    assert model.img_enc.fc.fc.weight.grad.abs().sum() > 0 and model.txt_enc.linear.weight.grad.abs().sum() > 0
    assert model.relation.mlp_t2i[0].weight.grad.abs().sum() > 0  # through the attention bias


def test_fusion_attention_respects_the_connection_mask():
    model = _tiny()
    graph = model.relation_graph(_batch())
    att = graph.attention[0]
    assert att.shape == (12, 12)
    torch.testing.assert_close(att.sum(-1), torch.ones(12))
    assert (att[~graph.joint(graph.connect)] == 0).all()


# --------------------------------------------------------------------------------------------- losses


def test_distance_weights_by_hand():
    sims = torch.tensor([[0.9, 0.2, -0.1], [0.5, 0.8, 0.95], [0.0, -0.6, 0.7]])
    pos = torch.eye(3, dtype=torch.bool)
    w = H.distance_weights(sims, ~pos, d=512, clamp=0.5, cutoff=1.7)
    for i in range(3):
        logs = []
        for j in range(3):
            dist = max(math.sqrt(2 - 2 * float(sims[i, j])), 0.5)
            lw = (2 - 512) * math.log(dist) - (509 / 2) * math.log(1 - dist * dist / 4)
            logs.append(lw if j != i else 0.0)
        top = max(logs)
        raw = [math.exp(lw - top) if (j != i and math.sqrt(2 - 2 * float(sims[i, j])) < 1.7) else 0.0
               for j, lw in enumerate(logs)]
        expected = [r / (sum(raw) + 1e-20) for r in raw]
        torch.testing.assert_close(w[i], torch.tensor(expected), atol=1e-6, rtol=1e-5)
    assert w[2, 1] == 0  # cos -0.6: distance 1.79 >= cutoff 1.7, never sampled


def test_triplet_loss_by_hand_when_the_sampler_is_deterministic():
    # a negative at cos >= 0.875 (distance clamped to 0.5, log-weight 370) outweighs one at cos ~0 (log-weight ~0)
    # by e^-370: the draw is certain, so the loss is the hinge against that negative
    sims = torch.tensor([[0.7, 0.95, 0.0], [0.0, 0.6, 0.9], [0.88, 0.1, 0.5]])
    pos = torch.eye(3, dtype=torch.bool)
    got = H.triplet_dws_direction(sims, pos, margin=0.2)
    expected = (0.2 + 0.95 - 0.7) + (0.2 + 0.9 - 0.6) + (0.2 + 0.88 - 0.5)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    # no negative inside the cutoff (cos > -0.445 for 1.7): multinomial has nothing to draw, the direction is 0
    hopeless = torch.tensor([[0.7, -0.9], [-0.9, 0.6]])
    assert float(H.triplet_dws_direction(hopeless, torch.eye(2, dtype=torch.bool))) == 0.0
    # the original's weights subtract the row maximum over *all* log-weights, including negatives beyond the
    # cutoff (log-weight 422 at cos -0.9): a valid negative at cos 0.3 (24.7) underflows to 0, the row is empty
    # and the whole direction's loss is 0 as well
    far = torch.tensor([[0.7, 0.3, -0.9], [0.3, 0.7, 0.2], [0.2, 0.3, 0.7]])
    assert H.distance_weights(far, ~pos)[0].sum() == 0
    assert float(H.triplet_dws_direction(far, pos)) == 0.0


def test_triplet_loss_runs_both_directions_with_duplicate_images_as_positives():
    im, s = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 1, 2])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    total = H.triplet_dws_loss(im, s, labels, generator=g1)
    pos = labels[:, None] == labels[None, :]
    by_parts = (H.triplet_dws_direction(im @ s.T, pos, generator=g2)
                + H.triplet_dws_direction((im @ s.T).T, pos.T, generator=g2))
    assert torch.equal(total, by_parts) and int(pos.sum()) == 6  # 6 positive pairs per direction


def test_vse_option_is_the_hardest_negative_hinge_after_its_warmup_epoch():
    model = _tiny(base_loss="vse")
    im, s = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scores, labels = im @ s.T, torch.arange(5)
    d = scores.diagonal()
    cost_s = (0.2 + scores - d[:, None]).clamp_min(0).fill_diagonal_(0)
    cost_im = (0.2 + scores - d[None, :]).clamp_min(0).fill_diagonal_(0)
    model.on_epoch_start(0)  # VSE0 (sum of violations) in epoch 0, as GPO / HREM's train.py
    torch.testing.assert_close(model._pair_loss("vse", im, s, labels), cost_s.sum() + cost_im.sum())
    model.on_epoch_start(1)
    torch.testing.assert_close(model._pair_loss("vse", im, s, labels), cost_s.amax(1).sum() + cost_im.amax(0).sum())


def test_training_step_warms_up_then_adds_the_relation_terms():
    model = _tiny(warmup_iters=2, region_drop=0.0, text_augment=False).train()
    seen = []
    for _ in range(3):
        terms = model.training_step(_batch(image_idx=[0, 1, 2, 2, 4, 5]))
        seen.append({k: float(v.detach()) for k, v in terms.items()})
    assert set(seen[0]) == {"base_loss", "cross_loss", "enhanced_loss", "reg_loss", "relation_on", "pos_score"}
    assert [s["relation_on"] for s in seen] == [0.0, 0.0, 1.0]
    assert seen[0]["reg_loss"] == seen[0]["cross_loss"] == seen[0]["enhanced_loss"] == 0.0
    assert seen[2]["reg_loss"] > 0 and seen[2]["cross_loss"] > 0
    assert int(model.iteration) == 3 and "iteration" in model.state_dict()
    ablation = _tiny(instance_module=False)
    assert ablation.relation is None and float(ablation.training_step(_batch())["relation_on"]) == 0.0


def test_one_training_step_has_finite_gradients_everywhere_used():
    model = _tiny().train()
    terms = model.training_step(_batch())
    sum(v for k, v in terms.items() if k.endswith("_loss")).backward()
    unused = {"img_enc.fc.mlp.bns.1.weight", "img_enc.fc.mlp.bns.1.bias"}  # built, never used (as the original)
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------------- augmentation


def test_text_augmentation_rates_and_word_groups():
    model = _tiny()
    tok = model._get_tokenizer()
    pieces = list(range(1000, 3000))
    words = [i // 2 for i in range(len(pieces))]  # 1,000 words of two WordPieces each
    torch.manual_seed(0)
    out = model._augment(pieces, words, tok)
    kept = sum(1 for p in out if p >= 1000) // 2
    masked = out.count(tok.mask_token_id) // 2
    assert out.count(tok.mask_token_id) % 2 == 0  # a word's pieces are masked together
    replaced = (len(out) - 2 * kept - 2 * masked) // 2
    deleted = 1000 - kept - masked - replaced
    assert 770 < kept < 830 and 70 < masked < 130 and 5 <= replaced < 40 and 50 < deleted < 110
    ids, lengths = model.tokenize(CAPTIONS, augment=False)
    assert torch.equal(ids, model.tokenize(CAPTIONS)[0])


def test_region_drop_keeps_order_and_pads_with_zeros():
    feats = torch.arange(1, 2 * 10 + 1, dtype=torch.float32).view(2, 10, 1).repeat(1, 1, 3)
    torch.manual_seed(0)
    out, lengths = H.drop_regions(feats, None, 0.5)
    assert out.shape[1] == int(lengths.max()) and (lengths >= 1).all()
    for b in range(2):
        kept = out[b, :lengths[b], 0]
        assert (kept.diff() > 0).all() and set(kept.tolist()) <= set(feats[b, :, 0].tolist())
        assert (out[b, lengths[b]:] == 0).all()


def test_region_drop_leaves_topk_regions_and_too_few_regions_are_one_line(tmp_path, caplog):
    """Features of 12 regions: the 0.2 drop sometimes left fewer than topk=10 and word_region_scores raised in the
    middle of a run (seed-dependent); 9 regions always did, as a traceback. Only the padded width needs topk: a
    per-image rule cut the drop on 12-region features from 20 % to 6.4 %."""
    torch.manual_seed(0)
    for _ in range(300):  # the padded width always reaches topk (or the most valid regions, when fewer)
        n = int(torch.randint(1, 9, ()))
        valid = torch.randint(1, 13, (n,))
        out, lengths = H.drop_regions(torch.randn(n, 12, 3), valid, float(torch.rand(())) * 0.9, min_keep=10)
        assert out.shape[1] == int(lengths.max()) >= min(10, int(valid.max()))
        assert ((lengths >= 1) & (lengths <= valid)).all()
    dropped = []
    for _ in range(2000 // 32):  # 2000 images of 12 regions, in batches of 32, as configured (region_drop 0.2)
        _, lengths = H.drop_regions(torch.randn(32, 12, 3), None, 0.2, min_keep=10)
        dropped.append(1 - lengths.float() / 12)
    assert abs(float(torch.cat(dropped).mean()) - 0.2) < 0.03
    # fewer valid regions than min_keep: the width reaches the most valid ones (4), by keeping all regions of the
    # image that has them; the other image keeps its drop
    rest = []
    for _ in range(100):
        _, lengths = H.drop_regions(torch.randn(2, 4, 3), torch.tensor([4, 2]), 0.9, min_keep=10)
        assert int(lengths[0]) == 4
        rest.append(int(lengths[1]))
    assert set(rest) == {1, 2}
    # an image that would keep nothing keeps all its valid regions
    _, lengths = H.drop_regions(torch.randn(3, 12, 3), torch.tensor([12, 5, 0]), 1.0, min_keep=10)
    assert lengths.tolist() == [12, 5, 0]
    from fixtures_data import precomp_run_config, write_precomp

    from cirlab.cli import main

    root = write_precomp(tmp_path / "data", regions=9, dim=64, n_images=8)["root"]
    precomp_run_config(tmp_path / "c.yaml", root, regions=9, dim=64, overrides={"warmup_iters": 0})
    assert main(["train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert ("HREM: topk=10 needs at least 10 regions per image (the word-region relevance keeps the 10 best); "
            "these features have 9: set model_overrides.topk to at most 9") in caplog.text


# --------------------------------------------------------------------------------------------- interop, tracing


def test_original_checkpoint_layout_loads_with_a_report(tmp_path):
    # the original layout carries no vocabulary: the tiny BERT keeps its built-in (character) one, as a real
    # BERT keeps its vocab.txt
    model = _tiny(seed=0, fit=False).eval()
    state = model.state_dict()
    img = {k[len("img_enc."):]: v for k, v in state.items() if k.startswith("img_enc.")}
    txt = {f"module.{k[len('txt_enc.'):]}": v for k, v in state.items() if k.startswith("txt_enc.")}  # DataParallel
    txt["module.bert.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers saved this buffer
    txt["module.bert.pooler.dense.weight"] = torch.zeros(32, 32)  # BertModel's pooler, unused by HREM
    txt["module.bert.pooler.dense.bias"] = torch.zeros(32)
    path = tmp_path / "model_best.pth"
    torch.save({"model": [img, txt], "opt": argparse.Namespace(embed_size=32), "epoch": 3}, path)

    fresh = _tiny(seed=7, fit=False).eval()
    from cirlab.core.checkpoint import CheckpointError

    report = H.load_original_checkpoint(fresh, path)  # its argparse options are data: no trust needed
    assert report["missing"] == [] and report["unexpected"] == []
    coded = tmp_path / "coded.pth"  # a file pickling anything else needs the API's (or the CLI's) trust
    torch.save({"model": [img, txt], "opt": pathlib.PurePosixPath("/x")}, coded)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        H.load_original_checkpoint(fresh, coded)
    assert H.load_original_checkpoint(fresh, coded, trust_pickle=True)["missing"] == []
    assert sorted(report["ignored"]) == ["txt_enc.bert.embeddings.position_ids", "txt_enc.bert.pooler.dense.bias",
                                         "txt_enc.bert.pooler.dense.weight"]
    assert "iteration" in report["training_only"] and any(k.startswith("relation.") for k in report["training_only"])
    feats = torch.rand(3, 36, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(fresh.encode_image(feats), fresh.encode_text(CAPTIONS[:4])),
                                   model.score(model.encode_image(feats), model.encode_text(CAPTIONS[:4])))
    img["fc.extra.weight"] = torch.zeros(1)
    del txt["module.linear.bias"]
    report = H.load_original_checkpoint(fresh, {"model": [img, txt]})
    assert report["unexpected"] == ["img_enc.fc.extra.weight"] and report["missing"] == ["txt_enc.linear.bias"]
    with pytest.raises(KeyError, match=r"\[img_enc, txt_enc\]"):
        H.convert_original_checkpoint({"model": [img]})


def test_cirlab_eval_reads_the_original_checkpoint(tmp_path, capsys, caplog):
    """``cirlab eval model_best.pth --model hrem --preset ...`` (no --trust-pickle: the pickled argparse options and
    numpy scalars are read as data): the same metrics as the model that wrote it; a file of other sizes or with a
    missing weight stops with one line naming it."""
    import json

    from fixtures_data import write_precomp

    from cirlab.cli import main
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.engine.runs import model_from_checkpoint, evaluate_split, with_defaults

    data = write_precomp(tmp_path / "data", n_images=4, splits=("dev", "test"))  # 2048-d, as f30k requires
    model = _tiny(seed=3, fit=False, img_dim=2048).eval()
    state = model.state_dict()
    img = {k[len("img_enc."):]: v for k, v in state.items() if k.startswith("img_enc.")}
    txt = {k[len("txt_enc."):]: v for k, v in state.items() if k.startswith("txt_enc.")}
    path = tmp_path / "model_best.pth"
    sizes = {"img_dim": 2048}
    torch.save({"model": [img, txt], "opt": argparse.Namespace(embed_size=32), "epoch": 11,
                "best_rsum": np.float64(412.5)}, path)

    _, meta = model_from_checkpoint(path, model="hrem", preset="tiny", overrides=sizes)
    assert meta["converted_layout"] == "original hrem" and meta["epoch"] == 11
    assert "iteration" in meta["kept_as_built"] and all(k.startswith(("relation.", "iteration"))
                                                         for k in meta["kept_as_built"])
    config = with_defaults({"dataset": {"name": "f30k", "root": str(data["root"])}, "eval": {"protocol": "full"}})
    expected = evaluate_split(model, config, "test")["metrics"]
    args = ["eval", str(path), "--model", "hrem", "--preset", "tiny", "--dataset", "f30k",
            "--root", str(data["root"]), "--split", "test", "--protocol", "full",
            "--set", "model_overrides.img_dim=2048"]
    capsys.readouterr()
    caplog.set_level("INFO", logger="cirlab")
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"] == pytest.approx(expected)
    assert "read as the original hrem layout" in caplog.text and "relation.* (" in caplog.text
    without_split = [a for a in args if a not in ("--split", "test")]
    assert main(without_split) == 0  # no --split, no config: the precomp validation split, dev
    assert set(json.loads(capsys.readouterr().out)["splits"]) == {"dev"}

    # other sizes: one line naming the file; a missing encoder weight: named as missing
    assert main(args + ["--set", "model_overrides.embed_size=64"]) == 2
    assert "does not fit model 'hrem'" in caplog.text and str(path) in caplog.text
    del txt["linear.bias"]
    torch.save({"model": [img, txt]}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(txt_enc.linear.bias\)"):
        model_from_checkpoint(path, model="hrem", preset="tiny", overrides=sizes)
    torch.save({"model": [img]}, path)
    with pytest.raises(CheckpointError, match=r"model_best.pth: HREM checkpoint: expected 'model' = \[img_enc"):
        model_from_checkpoint(path, model="hrem", preset="tiny", overrides=sizes)


def test_relation_frames_and_trace_routes():
    model = _tiny()
    batch = _batch(image_idx=[10, 11, 12, 12, 14, 15])
    batch["caption_idx"] = torch.arange(50, 56)
    frames = H.relation_frames(model, batch, caption=4)
    edges = frames["edges"]
    assert set(edges.matrix) == {"connection", "relevance", "mask", "attention"}
    assert len(edges) == 4 * 12 * 12
    counts = edges[edges.matrix == "connection"].groupby("edge_type").size().to_dict()
    assert counts == {"i2i": 36, "i2t": 36, "t2i": 36, "t2t": 36}
    i2t = edges[(edges.matrix == "relevance") & (edges.edge_type == "i2t")]
    assert set(i2t.row_id) == {10, 11, 12, 14, 15} and set(i2t.col_id) == set(range(50, 56))
    assert set(edges[edges.row_kind == "caption"].row_image) == {10, 11, 12, 14, 15}
    words = frames["word_region"]
    assert set(words.caption_id) == {54} and set(words.image_id) == {10, 11, 12, 14, 15}
    assert words[words.real_word].word.drop_duplicates().tolist() == ["[CLS]", "kids", "[SEP]"]
    assert words.word_pos.max() == 9 and len(words) == 6 * 10 * 36  # "kids": 3 real + 7 padding words (top-k)

    with cirlab.trace_routes(model) as trace:
        model.relation_graph(batch)
    assert set(trace.layers()) >= {"connection", "relevance", "attention", "word_region"}
    frame = trace.to_frame()
    conn = frame[frame.layer == "connection"]
    assert len(conn) == 144 and set(conn.source) >= {"image:10", "caption:55"}
    longest = int(model.tokenize(CAPTIONS)[1].max())
    assert trace.vectors("word_region").shape == (6, 6, longest, 36)  # [B_txt, B_img, L, R]
    assert not cirlab.core.tracing.is_active()


# --------------------------------------------------------------------------------------------- runs and configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("hrem_*.yaml")), ids=lambda p: p.name)
def test_configs_load(path):
    from cirlab.engine import runs

    config = runs.load_config(path)
    assert config["model"] == "hrem" and config["preset"] in cirlab.list_presets("hrem")
    cfg = cirlab.registry.build_config("hrem", config["preset"], **config["model_overrides"])
    assert isinstance(cfg, H.HREMConfig)


def test_tiny_synthetic_run_trains_selects_on_dev_and_reloads(tmp_path):
    from cirlab.engine import runs

    config = runs.load_config(ROOT / "configs" / "hrem_synthetic_tiny.yaml",
                              ["train.max_steps=3", f"output_dir={tmp_path / 'run'}", "train.num_threads=1"])
    config["dataset"]["synthetic"]["out"] = str(tmp_path / "data")
    result = runs.run_experiment(config)
    assert result["steps"] == 3 and set(result["splits"]) == {"test"}
    assert result["selection"]["split"] == "dev"
    metrics = result["splits"]["test"]
    assert {"i2t_R@1", "t2i_R@10", "rsum"} <= set(metrics)
    model, _ = runs.model_from_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert isinstance(model, H.HREM) and int(model.iteration) == 3  # the warm-up position travels with the weights


def test_init_from_a_cirlab_run_or_the_original_file_starts_a_new_run(tmp_path, capsys, caplog):
    """``model_overrides.init_from``: a cirlab run folder gives its best weights (and vocabulary) with the warm-up
    counter back at 0; the original's file (its argparse options pickled beside the weights, read as data) starts
    ``cirlab train`` from its encoders, with ``init_from.json`` in the run folder. A file pickling anything else is
    refused, and no config field can switch unpickling on (a shared config could run code with it)."""
    import json

    from cirlab.cli import main
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.engine import runs

    first = tmp_path / "first"
    config = runs.load_config(ROOT / "configs" / "hrem_synthetic_tiny.yaml",
                              ["train.max_steps=2", f"output_dir={first}", "train.num_threads=1"])
    config["dataset"]["synthetic"]["out"] = str(tmp_path / "data")
    runs.run_experiment(config)
    trained, _ = runs.model_from_checkpoint(first / "checkpoints" / "best.pt")
    assert int(trained.iteration) == 2

    torch.manual_seed(5)
    fresh = cirlab.create_model("hrem", "tiny", img_dim=2048, init_from=str(first))
    fresh.fit_vocab(["words the start does not have"])  # the start's saved vocabulary replaces this one
    caption = ["a blue circle above a green hexagon"]  # words of the synthetic captions
    assert fresh.tokenize(caption)[0].tolist() != trained.tokenize(caption)[0].tolist()
    [report] = fresh.load_init(tmp_path)
    assert report["layout"] == "cirlab" and report["source"] == str(first / "checkpoints" / "best.pt")
    assert int(fresh.iteration) == 0  # a new run: its relation terms wait warmup_iters from its own start
    expected = {k: v for k, v in trained.state_dict().items() if k != "iteration"}
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items() if isinstance(v, torch.Tensor))
    assert fresh.tokenize(caption)[0].tolist() == trained.tokenize(caption)[0].tolist()
    assert json.loads((tmp_path / "init_from.json").read_text())["init_from"] == str(first)

    state = trained.state_dict()  # the original's layout: [img_enc, txt_enc] and its pickled argparse options
    original = tmp_path / "model_best.pth"
    parts = [{k[8:]: v for k, v in state.items() if k.startswith("img_enc.")},
             {k[8:]: v for k, v in state.items() if k.startswith("txt_enc.")}]
    torch.save({"model": parts, "opt": argparse.Namespace(embed_size=32), "epoch": 4,
                "best_rsum": np.float64(301.5)}, original)
    base = ["train", str(ROOT / "configs" / "hrem_synthetic_tiny.yaml"), "--set", "train.max_steps=1",
            "--set", f"dataset.synthetic.out={tmp_path / 'data'}", "--set", "train.num_threads=1",
            "--set", f"model_overrides.init_from={original}"]
    caplog.set_level("INFO", logger="cirlab")
    with pytest.raises(CheckpointError, match="does not exist"):
        cirlab.create_model("hrem", "tiny", init_from=str(tmp_path / "nowhere")).load_init()
    code = tmp_path / "code.pth"  # anything pickled beyond data (here a path object) is code to a weights-only load
    torch.save({"model": parts, "opt": pathlib.PurePosixPath("/x")}, code)
    refused = base[:-1] + [f"model_overrides.init_from={code}", "--output-dir", str(tmp_path / "refused")]
    for extra, said in (([], f"model_overrides.init_from: checkpoint {code} contains pickled Python objects (e.g. "
                              "pathlib.PurePosixPath), which can run arbitrary code when loaded. cirlab refuses it by "
                              "default; a training start is read as weights only"),
                        (["--set", "model_overrides.init_trust_pickle=true"],
                         "--set model_overrides.init_trust_pickle=true: model_overrides (HREMConfig): field "
                         "'init_trust_pickle' is no longer read: a config file cannot switch on unpickling")):
        caplog.clear()
        assert main(refused + extra) == 2
        assert said in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "refused").exists()  # nothing left behind by a refused start

    assert main(base + ["--output-dir", str(tmp_path / "ft")]) == 0  # the original's file: no trust needed
    written = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert written["layout"] == "original" and written["source"] == str(original)
    assert any(k.startswith("relation.") for k in written["kept_as_built"])  # the original never saves it

    # a resumed run continues from its checkpoint, which holds every weight: the start file may have gone since
    original.rename(tmp_path / "moved.pth")
    caplog.clear()
    assert main(base + ["--set", "train.max_steps=2", "--output-dir", str(tmp_path / "ft"), "--resume"]) == 0
    assert "is not read again" in caplog.text
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "ft" / "init_from.json").read_text()) == written  # the start's report is kept
    assert main(base + ["--output-dir", str(tmp_path / "ft2")]) == 2
    assert "model_overrides.init_from" in caplog.text and "does not exist" in caplog.text  # a fresh run still checks
    # replacing that run with one that starts from scratch: the old start's report must not stay as if it were its own
    assert main(base[:-2] + ["--output-dir", str(tmp_path / "ft"), "--overwrite"]) == 0
    assert not (tmp_path / "ft" / "init_from.json").exists()
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["steps"] == 1


def test_bench_diagnosis_gradients_add_up_and_reg_stays_off_the_encoders():
    """bench/hrem_diagnose.py: the per-term gradients sum to the gradient of the summed loss (one backward, the
    trainer's), the KL regulariser has no gradient on the encoders, and the clipped step is at most the clip."""
    import bench_scripts

    mod = bench_scripts.load("hrem_diagnose")
    model, b = _tiny(), _batch()
    torch.manual_seed(0)
    out = mod.measure(model, [b], clip=2.0)
    torch.manual_seed(0)
    model.train()
    terms = model.training_step(b)
    total = sum(terms[k] for k in mod.TERMS)
    params = mod.encoder_parameters(model)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
    assert float(terms["relation_on"]) == 1.0 and out["grad norm enhanced_loss"] > 0
    assert out["grad norm total"] == pytest.approx(float(norm), rel=1e-4)
    assert out["grad norm reg_loss"] == 0.0
    assert out["clipped step along base"] <= 2.0 + 1e-6 and out["base-only clipped step"] <= 2.0


def test_bench_pairs_each_hrem_variant_with_its_baselines():
    """bench/hrem_synthetic.py's report: seed-by-seed differences for HREM and for the pre-fix variant."""
    import bench_scripts

    mod = bench_scripts.load("hrem_synthetic")
    rsum = {"hrem": [500.0, 490.0, 510.0], "no_instance": [495.0, 495.0, 500.0], "hrem_bug": [505.0, 480.0, 520.0]}
    by_variant = {v: [{"seed": s, "test": {"rsum": x}} for s, x in enumerate(xs)] for v, xs in rsum.items()}
    lines = mod._paired(by_variant)
    bug = next(line for line in lines if line.startswith("- hrem_bug - no_instance"))
    assert "+10.0, -15.0, +20.0; mean +5.0" in bug and "hrem_bug higher in 2 of 3 seeds" in bug
    diffs = [10.0, -15.0, 20.0]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / 3 ** 0.5)
    assert f"paired t = {t:.2f}" in bug
    assert any(line.startswith("- HREM - no_instance, test rsum per seed: +5.0, -5.0, +10.0") for line in lines)
    assert not any("vsepp" in line for line in lines)  # no runs of it: no line



def test_with_and_without_the_instance_module_the_encoders_start_the_same():
    """The random tiny BERT's fitted word table has its own generator (seeded by the run's seed), so building the
    instance module first does not shift it: paired runs (bench/hrem_synthetic.py) differ only by the module, and
    before the warm-up ends their steps are identical."""
    with_module, without = _tiny(seed=3), _tiny(seed=3, instance_module=False)
    state = without.state_dict()
    assert with_module.relation is not None and without.relation is None
    assert all(torch.equal(with_module.state_dict()[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))
    other_seed = _tiny(seed=4, instance_module=False)
    assert not torch.equal(other_seed.txt_enc.bert.get_input_embeddings().weight,
                           without.txt_enc.bert.get_input_embeddings().weight)
    losses = []
    for model in (with_module, without):
        model.config.warmup_iters = 10
        model.train()
        torch.manual_seed(0)  # the trainer re-seeds before its first step
        losses.append(model.training_step(_batch(image_idx=list(range(6))))["base_loss"])
    assert torch.equal(losses[0], losses[1])


def test_hrem_l2norm_of_a_zero_fp16_row_is_zero_not_nan():
    from cirlab.models.hrem import l2norm

    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float16)
    out = l2norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.tensor([[0.0, 0.0], [0.6, 0.8]]), atol=1e-3, rtol=0)
