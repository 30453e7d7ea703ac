"""DIME against a loop-based reference written from the paper (Qu et al., SIGIR 2021) and its public code
(https://github.com/LgQu/DIME).

tests/test_dime.py covers the plumbing (loss, mixing helpers, sharding, tracing, loading). This file pins the
numerical definition of the model in its original behaviour (``mask_padding=False``):

* a per-pair reference of the interaction module, for both directions: the four cells, the routers, the dense
  connections with the RIC skip, the final aggregation with its skip, BatchNorm scoring and the 36-d path vector.
  It is compared with ``itr_module`` on random routers and BN statistics, and again with paths forced closed
  (or nearly closed) inside the model, so the skip rules and their thresholds are checked in place;
* the image and text encoders against hand computations;
* the paper presets (lambda, direction), the router bias init, BERT dropout and freezing, and the path regulariser.

The reference reads only parameters from the model (weights and biases of its Linear/Conv layers, BN buffers);
every operation between them is written out here, so a change of wiring in ``cirlab/models/dime.py`` shows up.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.models import dime as D
from cirlab.models.registry import build_config
from test_dime import _randomise_routers  # tests/ is on sys.path (as for stub_models)

# different lengths: one truncated at max_words (16 for tiny), one of three tokens ([CLS] kids [SEP])
CAPTIONS = ["a man riding a horse .", "two dogs", "the cat sleeps on a warm sofa near the big window", "kids"]
N_IMAGES = 3
ATOL = 1e-5


# --------------------------------------------------------------------------------------------- primitives


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` from the layer's parameters."""
    return x @ layer.weight.t() + layer.bias


def l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def router(cell: D._Cell, cell_input: torch.Tensor) -> torch.Tensor:
    """relu(tanh(Linear -> ReLU -> Linear)) of the token mean of the cell's own input; one weight per output path."""
    mlp = cell.router.mlp
    hidden = torch.relu(linear(mlp[0], cell_input.mean(0)))
    return torch.relu(torch.tanh(linear(mlp[2], hidden)))


# --------------------------------------------------------------------------------------------- the four cells
# x: [L, d] tokens of one pair (regions for i2t, all word positions for t2i)


def ric(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def glgc(cell: D.GlobalLocalGuidanceCell, local: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """(1 + m) * l with m = fc_1(l) * g L2-normalised over the TOKEN axis (per feature); g: other modality's global."""
    m = linear(cell.fc_1, local) * guide
    return (1 + l2(m, dim=0)) * local


def imrc(cell: D.IntraModelReasoningCell, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm-free post-residual block: y = x + MHA(x) (no output projection, no mask); out = y + FFN(y)."""
    att, ffn = cell.sa.att_layer, cell.sa.feed_forward_layer
    q, k, v = (linear(lin, x) for lin in att.linears)
    d_head = x.shape[-1] // att.heads
    heads = []
    for h in range(att.heads):
        cols = slice(h * d_head, (h + 1) * d_head)
        weights = torch.softmax(q[:, cols] @ k[:, cols].t() / math.sqrt(d_head), dim=-1)
        heads.append(weights @ v[:, cols])
    y = x + torch.cat(heads, dim=-1)
    return y + linear(ffn.fc2, torch.relu(linear(ffn.fc1, y)))


def cmrc(cell: D.CrossModalRefinementCell, query: torch.Tensor, context: torch.Tensor, lam: float) -> torch.Tensor:
    """SCAN attention (LeakyReLU 0.1, L2 over query tokens, softmax(lambda .) over context), then
    fc_2(relu(fc_1(q * tanh(fc_scale(ctx)) + fc_shift(ctx)))) + q."""
    r = cell.refine
    attn = F.leaky_relu(context @ query.t(), 0.1)  # [cL, qL]
    attn = l2(attn, dim=1)  # over the query tokens
    attn = torch.softmax(lam * attn.t(), dim=1)  # [qL, cL]: each query token over the context tokens
    ctx = attn @ context
    modulated = query * torch.tanh(linear(r.fc_scale, ctx)) + linear(r.fc_shift, ctx)
    return linear(r.fc_2, torch.relu(linear(r.fc_1, modulated))) + query


def cell_outputs(layer: D.RoutingLayer, inputs: list[torch.Tensor], guide: torch.Tensor, context: torch.Tensor,
                 lam: float) -> list[torch.Tensor]:
    """Code order [RIC, GLGC, IMRC, CMRC]; cell j works on inputs[j]."""
    return [ric(inputs[0]), glgc(layer.glgc, inputs[1], guide), imrc(layer.imrc, inputs[2]),
            cmrc(layer.cmrc, inputs[3], context, lam)]


# --------------------------------------------------------------------------------------------- routing


def dense_connection(raw: torch.Tensor, embs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Layers 0 and 1: raw[dest, src]; normalise over sources per destination (eps 1e-8); a destination whose raw
    incoming weights sum below 1e-4 also receives the RIC output."""
    normalised = torch.zeros(4, 4)
    outs = []
    for dest in range(4):
        total = raw[dest].sum()
        normalised[dest] = raw[dest] / (total + 1e-8)
        out = sum(normalised[dest, src] * embs[src] for src in range(4))
        if total < 1e-4:
            out = out + embs[0]
        outs.append(out)
    return outs, normalised


def final_aggregation(p: torch.Tensor, embs: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Layer 2: sum_j (p_j emb_j + [p_j < 1e-4 / 4] input_j) / (sum_j gates + sum_j p_j)."""
    gates = [1.0 if float(p[j]) < 1e-4 / 4 else 0.0 for j in range(4)]
    numerator = sum(p[j] * embs[j] + gates[j] * inputs[j] for j in range(4))
    return numerator / (sum(gates) + p.sum())


def batch_norm_eval(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def reference_pair(model: D.DIME, img: dict, txt: dict, i: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and 36-d path vector of image i and caption t."""
    itr, cfg = model.itr_module, model.config
    if cfg.direction == "i2t":  # refine the regions of image i conditioned on caption t
        x = img["rgn"][i]
        context = txt["wrd"][t, :int(txt["mask"][t].sum())]  # words truncated to the true length (CLS/SEP incl.)
        guide = other = txt["stc"][t]
    else:  # refine all word positions of caption t (padding included) conditioned on image i
        x = txt["wrd"][t]
        context = img["rgn"][i]
        guide = other = img["img"][i]
    lam = cfg.lambda_softmax
    l0, l1, l2_ = itr.dynamic_itr_l0, itr.dynamic_itr_l1, itr.dynamic_itr_l2

    # layer 0: every cell (and its router) sees the same input
    embs0 = cell_outputs(l0, [x] * 4, guide, context, lam)
    raw0 = torch.stack([router(cell, x) for cell in l0.cells()], dim=1)  # [dest, src]
    inputs1, paths0 = dense_connection(raw0, embs0)

    # layer 1: cell j works on, and routes from, destination j of layer 0
    embs1 = cell_outputs(l1, inputs1, guide, context, lam)
    raw1 = torch.stack([router(cell, inp) for cell, inp in zip(l1.cells(), inputs1)], dim=1)
    inputs2, paths1 = dense_connection(raw1, embs1)

    # layer 2: one weight per cell, aggregated into the output tokens
    embs2 = cell_outputs(l2_, inputs2, guide, context, lam)
    p2 = torch.cat([router(cell, inp) for cell, inp in zip(l2_.cells(), inputs2)])  # [4]
    out = final_aggregation(p2, embs2, inputs2)

    # scoring: BN (running statistics) over the tokens, mean + max pooling, L2, dot with the other global vector
    z = batch_norm_eval(itr.bn, out)
    pooled = l2(z.mean(0) + z.max(0).values)
    return pooled @ other, torch.cat([paths0.flatten(), paths1.flatten(), p2])


def reference_scores(model: D.DIME, img: dict, txt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ni, nt = img["img"].shape[0], txt["stc"].shape[0]
    scores, paths = torch.zeros(ni, nt), torch.zeros(ni, nt, D.PATH_DIM)
    for i in range(ni):
        for t in range(nt):
            scores[i, t], paths[i, t] = reference_pair(model, img, txt, i, t)
    return scores, paths


# --------------------------------------------------------------------------------------------- model set-up


def _tiny(direction: str = "i2t", seed: int = 0, **overrides) -> D.DIME:
    torch.manual_seed(seed)
    lam = {"i2t": 4.0, "t2i": 9.0}[direction]  # the recipes' lambdas
    overrides = {"mask_padding": False, "lambda_softmax": lam, **overrides}  # original behaviour
    return cirlab.create_model("dime", "tiny", direction=direction, **overrides)


def _randomise(model: D.DIME, seed: int = 0) -> None:
    """Random router heads (spread over [0, 1), some exactly 0) and random BN statistics/affine parameters."""
    g = torch.Generator().manual_seed(seed)
    _randomise_routers(model, weight_std=0.3, bias_mean=0.2, bias_std=0.6, generator=g)
    for bn in (model.itr_module.bn, model.img_enc.bn):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.05)
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.num_features, generator=g))
        bn.weight.data = 0.5 + torch.rand(bn.num_features, generator=g)
        bn.bias.data = torch.randn(bn.num_features, generator=g) * 0.1


def _force(cell: D._Cell, output: int, value: float) -> None:
    """Make one router output a constant: zero weight row, bias atanh(value); value 0 -> relu(tanh(-5)) == 0."""
    last = cell.router.mlp[2]
    last.weight.data[output] = 0.0
    last.bias.data[output] = math.atanh(value) if value > 0 else -5.0


def _force_closures(model: D.DIME) -> None:
    l0, l1, l2_ = model.itr_module.layers()
    for cell in l0.cells():
        _force(cell, 2, 0.0)  # layer-1 IMRC: every incoming path closed -> exactly the RIC output
        _force(cell, 1, 2e-5)  # layer-1 GLGC: incoming sum 8e-5 < 1e-4 -> closed (0.25 each + RIC skip)
    for cell in l1.cells():
        _force(cell, 0, 0.0)  # layer-2 RIC closed
        _force(cell, 3, 5e-5)  # layer-2 CMRC: incoming sum 2e-4 >= 1e-4 -> open, no skip
    _force(l2_.glgc, 0, 0.0)  # final aggregation: GLGC closed -> its input passes through
    _force(l2_.imrc, 0, 1e-5)  # below 1e-4 / 4: closed, although slightly open
    _force(l2_.cmrc, 0, 5e-5)  # between 1e-4 / 4 and 1e-4: open


def _features(n: int = N_IMAGES, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 36, 64, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- interaction module


@pytest.mark.parametrize("closed", [False, True], ids=["random_routers", "forced_closures"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_interaction_module_matches_per_pair_reference(direction, closed):
    model = _tiny(direction).eval()
    _randomise(model)
    if closed:
        _force_closures(model)
    with torch.no_grad():
        img, txt = model.encode_image(_features()), model.encode_text(CAPTIONS)
        scores, paths = model.itr_module(img, txt, need_paths=True)
        ref_scores, ref_paths = reference_scores(model, img, txt)
    assert scores.shape == (N_IMAGES, len(CAPTIONS)) and paths.shape == (N_IMAGES, len(CAPTIONS), D.PATH_DIM)
    assert float(ref_scores.max() - ref_scores.min()) > 0.05  # the scores are not all alike
    assert torch.allclose(paths, ref_paths, atol=ATOL), float((paths - ref_paths).abs().max())
    assert torch.allclose(scores, ref_scores, atol=ATOL), float((scores - ref_scores).abs().max())
    if closed:  # the forced values really reached the model
        l0 = paths[..., :16].reshape(-1, 4, 4)
        assert l0[:, 2].abs().max() == 0  # layer-1 IMRC closed: empty normalised row
        assert torch.allclose(l0[:, 1], torch.full_like(l0[:, 1], 0.25), atol=1e-3)  # nearly closed, still 1/4 each
        raw2 = paths[..., 32:]
        assert raw2[..., 1].abs().max() == 0
        assert torch.allclose(raw2[..., 2], torch.full_like(raw2[..., 2], 1e-5), rtol=1e-3)
        assert torch.allclose(raw2[..., 3], torch.full_like(raw2[..., 3], 5e-5), rtol=1e-3)
    else:  # random routers: the paths vary over pairs (layer 1 onwards) and some are closed by relu
        assert paths[..., 16:32].std(dim=(0, 1)).max() > 1e-3
        assert (paths[..., 32:] == 0).any() or (paths[..., 16:32] == 0).any()


# --------------------------------------------------------------------------------------------- encoders


def test_image_encoder_initialisation_is_xavier_uniform_with_zero_bias():
    fc = _tiny().img_enc.fc  # Linear(64 -> 32)
    weight, bias = fc.weight.detach(), fc.bias.detach()
    bound = math.sqrt(6.0 / (fc.in_features + fc.out_features))  # 0.25; PyTorch's default would be 1/8
    assert weight.abs().max() <= bound + 1e-7
    assert weight.abs().max() > 0.95 * bound
    assert abs(float(weight.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)  # uniform: std = bound/sqrt 3
    assert bias.abs().max() == 0


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_image_encoder_matches_hand_computation(direction):
    model = _tiny(direction).eval()
    _randomise(model)  # also gives the (unused in i2t) image BN non-trivial statistics
    feats = _features(2)
    with torch.no_grad():
        out = model.encode_image(feats)
    fc, bn = model.img_enc.fc, model.img_enc.bn
    for n in range(2):
        regions = feats[n] @ fc.weight.t() + fc.bias  # [36, d]
        assert torch.allclose(out["rgn"][n], regions / regions.norm(dim=-1, keepdim=True), atol=1e-6)
        glob = regions.mean(0)  # mean of the un-normalised regions
        if direction == "t2i":  # BN (running statistics at eval) only in t2i
            glob = (glob - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        assert torch.allclose(out["img"][n], glob / glob.norm(), atol=1e-6)


def _bert_states(model: D.DIME, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = model.tokenize(texts)
    bert = model.txt_enc.bert
    was_training = bert.training
    bert.eval()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids)).last_hidden_state
    bert.train(was_training)
    return hidden, mask


def test_text_encoder_matches_hand_computation():
    model = _tiny().eval()
    enc = model.txt_enc
    hidden, mask = _bert_states(model, CAPTIONS)
    with torch.no_grad():
        out = model.encode_text(CAPTIONS)
    length, hid = hidden.shape[1:]
    assert length == model.config.max_words and not bool(mask.all())  # there is padding to include
    zero = torch.zeros(1, hid)
    for b, h in enumerate(hidden):  # h: [L, 768-like] BERT states of caption b, padding included
        # window of K rows starting at each position: K=2 padded one row at the bottom, K=3 one at each side
        padded = {1: h, 2: torch.cat([h, zero]), 3: torch.cat([zero, h, zero])}
        heads = []
        for k, conv in zip((1, 2, 3), enc.convs1):
            w = conv.weight[:, 0]  # [256-like, K, hid]
            rows = [torch.relu(sum(w[:, s] @ padded[k][pos + s] for s in range(k)) + conv.bias)
                    for pos in range(length)]
            heads.append(torch.stack(rows))  # [L, d]
        residual = h @ enc.fc.weight.t() + enc.fc.bias  # fc(H): [L, d]
        mapping = enc.mapping
        word = torch.cat(heads, -1) @ mapping.weight.t() + mapping.bias + residual  # shared mapping, per word
        sentence = (torch.cat([x.max(0).values for x in heads]) @ mapping.weight.t() + mapping.bias
                    + residual.mean(0))  # max over all positions, mean of the residual
        assert torch.allclose(out["wrd"][b], l2(word), atol=1e-5)
        assert torch.allclose(out["stc"][b], l2(sentence), atol=1e-5)
    assert torch.equal(out["mask"], mask)


def test_regulariser_target_is_mean_of_all_bert_states():
    model = _tiny(bert_dropout_in_train=False)  # deterministic BERT in train mode
    model.train()
    with torch.no_grad():
        out = model.encode_text(CAPTIONS)
    hidden, _ = _bert_states(model, CAPTIONS)
    assert torch.allclose(out["bert"], l2(hidden.mean(1)), atol=1e-6)  # over all positions, padding included
    model.eval()
    with torch.no_grad():
        assert "bert" not in model.encode_text(CAPTIONS)  # a training-only output


# --------------------------------------------------------------------------------------------- presets and training


@pytest.mark.parametrize("preset,direction,lam", [("f30k_i2t", "i2t", 4.0), ("f30k_t2i", "t2i", 9.0),
                                                  ("coco_i2t", "i2t", 4.0), ("coco_t2i", "t2i", 9.0)])
def test_paper_presets(preset, direction, lam):
    cfg = build_config("dime", preset)  # the config only: building the model would fetch bert-base-uncased
    assert isinstance(cfg, D.DIMEConfig)
    assert (cfg.direction, cfg.lambda_softmax) == (direction, lam)
    assert (cfg.img_dim, cfg.embed_size, cfg.max_words, cfg.hid_router, cfg.hid_imrc, cfg.num_head_imrc,
            cfg.path_hid) == (2048, 256, 32, 512, 512, 16, 128)
    assert (cfg.margin, cfg.path_weight, cfg.max_violation, cfg.vse_mean_warmup_epochs) == (0.2, 0.5, True, 0)
    assert cfg.bert == "bert-base-uncased" and cfg.bert_dropout_in_train is True


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_router_and_lambda_initialisation(direction):
    model = _tiny(direction)
    for layer, num_out in zip(model.itr_module.layers(), (4, 4, 1)):
        for cell in layer.cells():
            assert torch.equal(cell.router.mlp[2].bias, torch.full((num_out,), 1.5))  # every path starts open
        assert layer.cmrc.refine.lambda_softmax == model.config.lambda_softmax


def test_bert_dropout_active_in_training_and_bert_frozen():
    torch.manual_seed(0)
    model = cirlab.create_model("dime", "tiny")  # defaults: BERT dropout in training is the original behaviour
    model.train()
    assert model.txt_enc.bert.training
    with torch.no_grad():
        a, b = model.encode_text(CAPTIONS), model.encode_text(CAPTIONS)
    assert not torch.allclose(a["stc"], b["stc"]) and not torch.allclose(a["bert"], b["bert"])
    model.eval()
    with torch.no_grad():
        a, b = model.encode_text(CAPTIONS), model.encode_text(CAPTIONS)
    assert torch.equal(a["stc"], b["stc"]) and torch.equal(a["wrd"], b["wrd"])

    model.train()
    batch = {"image_feats": _features(4), "text": CAPTIONS, "image_idx": torch.arange(4)}
    out = model.training_step(batch)
    (out["rank_loss"] + out["path_loss"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.txt_enc.bert.parameters())
    assert model.txt_enc.mapping.weight.grad is not None and model.txt_enc.mapping.weight.grad.abs().max() > 0


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_path_loss_is_half_the_mean_squared_similarity_gap(direction):
    model = _tiny(direction)  # default path_weight, BERT dropout on: the hooks see the tensors of the step itself
    _randomise(model)
    model.train()
    seen: dict = {}
    model.itr_module.register_forward_hook(lambda m, args, out: seen.update(paths=out[1]))
    model.txt_enc.register_forward_hook(lambda m, args, out: seen.update(bert=out["bert"]))
    n = 4
    first = {"image_feats": _features(n, seed=1), "text": CAPTIONS, "image_idx": torch.arange(n)}
    extra = {"extra_text": CAPTIONS[::-1]} if direction == "i2t" else {"extra_image_feats": _features(n, seed=3)}
    second = {"image_feats": _features(n, seed=2), "text": CAPTIONS[1:] + CAPTIONS[:1], "image_idx": torch.arange(n),
              **extra}
    shapes = []
    for batch in (first, second):  # the second step has n extra negatives: paths of n x 2n (i2t) or 2n x n pairs
        out = model.training_step(batch)
        paths = seen["paths"].detach()
        shapes.append(tuple(paths.shape))
        anchors = paths.mean(1) if direction == "i2t" else paths.mean(0)  # average over the non-anchor axis
        assert anchors.shape == (n, D.PATH_DIM)
        with torch.no_grad():
            vec = l2(linear(model.itr_module.path_mapping, anchors))
            bert = seen["bert"][:n]  # BERT targets of the n paired captions
            expected = ((vec @ vec.t() - bert @ bert.t()) ** 2).sum() / n
        assert float(expected) > 1e-3
        assert torch.allclose(out["path_reg"], expected, rtol=1e-5)
        assert torch.allclose(out["path_loss"], 0.5 * expected, rtol=1e-5)
    assert shapes[1] == ((n, 2 * n, D.PATH_DIM) if direction == "i2t" else (2 * n, n, D.PATH_DIM))
