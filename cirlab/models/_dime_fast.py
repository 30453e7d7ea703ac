"""DIME's full score matrix for evaluation: the interaction module rewritten for many pairs at once (private).

:func:`cirlab.models.dime.score_matrix` calls :func:`score_all`; the training path (``InteractionModule.forward``:
gradients, path vectors, tracing) is untouched. The computation is the same function of the inputs (fp32 scores
agree with the module to float rounding, ~1e-7), organised for speed:

* **Per item, once.** The refined side's layer-0 cells (RIC, IMRC, GLGC's ``fc_1``) and routers, and the context
  side's CMRC projections (biases folded in: attention rows sum to one), come from ``InteractionModule.prepare``.
  Layer-0 GLGC needs no per-pair product at all: ``normalize_tokens(fc_1(x) * g)`` is ``fc_1(x)`` scaled per
  feature by ``g_j / max(|g_j| |fc_1(x)_j|, eps)``, so its output is ``x + (fc_1(x) * x) * f(g)`` with a per-pair
  vector ``f``; the mix of the two per-item layer-0 cells into each layer-1 input is precomputed per item.
* **Exact-length groups.** Captions are grouped by their true length, so no shard carries padding and no mask
  is applied (padding is masked everywhere in the module, ``mask_padding=True``; the i2t context is always
  truncated to the true length). With ``mask_padding=False`` (t2i), padding is a real token and is kept.
* **Cache-sized shards.** About ``rows`` refined tokens per shard (pairs x tokens), so every ``[pairs, tokens, d]``
  intermediate stays in cache; the products run as a few large matrix multiplications per shard.
* **bf16** (``dtype=torch.bfloat16``): weights and activations in bf16 (fp32 accumulation in the products, fp32
  reductions), for CPUs with bf16 dot-product units and GPUs; scores agree with fp32 to about 1e-3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12  # F.normalize's eps
_PATH_EPS = 1e-8
_PATH_THRESHOLD = 1e-4


@dataclass
class _Refined:
    """One block of refined items (images for i2t, captions for t2i), all with the same token count T."""

    x0: Tensor  # [a, T, d] layer-0 input
    glgc: Tensor  # [a, T, d] fc_1(x0) * x0 (layer-0 GLGC's per-item part)
    glgc_norm: Tensor  # [a, d] |fc_1(x0)| over tokens
    base: Tensor  # [4, a, T, d] per-item part of each layer-1 input (RIC, IMRC, x0 share of GLGC)
    p_glgc: Tensor  # [a, 4] layer-0 path weight GLGC -> destination
    p_cmrc: Tensor  # [a, 4] layer-0 path weight CMRC -> destination


@dataclass
class _Context:
    """One block of context items (captions for i2t, images for t2i), all with the same token count L."""

    tokens: Tensor  # [b, L, d]
    proj: list[Tensor]  # 3 x [b, L, 2d]: fc_scale | fc_shift of the tokens, biases folded in
    guide: Tensor  # [b, d] the global vector guiding GLGC and scored against (sentence / image vector)


class _Weights:
    """The interaction module's parameters, transposed once and cast to the compute dtype."""

    def __init__(self, itr: Any, dtype: torch.dtype) -> None:
        def lin(m: Any) -> tuple[Tensor, Tensor]:
            return m.weight.t().to(dtype).contiguous(), m.bias.to(dtype)

        self.layers = []
        for layer in itr.layers():
            att = layer.imrc.sa.att_layer
            ffn = layer.imrc.sa.feed_forward_layer
            qkv_w = torch.cat([m.weight for m in att.linears], 0).t().to(dtype).contiguous()
            qkv_b = torch.cat([m.bias for m in att.linears], 0).to(dtype)
            self.layers.append({
                "glgc": lin(layer.glgc.fc_1), "qkv": (qkv_w, qkv_b), "heads": att.heads,
                "ffn1": lin(ffn.fc1), "ffn2": lin(ffn.fc2),
                "cm1": lin(layer.cmrc.refine.fc_1), "cm2": lin(layer.cmrc.refine.fc_2),
                "lambda": layer.cmrc.refine.lambda_softmax, "routers": [c.router for c in layer.cells()],
            })
        bn = itr.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.bn = (scale.to(dtype), (bn.bias - bn.running_mean * scale).to(dtype))


# ---------------------------------------------------------------------------------------------------- per item
def refined_block(itr: Any, prepared: dict[str, Tensor], key: str, sl: slice, length: int | None,
                  dtype: torch.dtype) -> _Refined:
    """The per-item tensors of refined items ``sl`` (tokens cut to ``length`` when given)."""
    def take(name: str) -> Tensor:
        t = prepared[name][sl]
        return (t[:, :length] if length is not None else t).to(dtype)

    x0, ric, imrc, fc = take(key), take("l0_ric"), take("l0_imrc"), take("l0_fc")
    raw = prepared["l0_paths"][sl].float()  # [a, 4 dest, 4 src]
    total = raw.sum(-1, keepdim=True)
    paths = raw / (total + _PATH_EPS)
    gate = (total < _PATH_THRESHOLD).float()  # a closed destination also receives the RIC output
    p = paths.to(dtype)
    g = gate.to(dtype)
    # per destination: p_RIC * relu(x) + p_IMRC * SA(x) + p_GLGC * x (+ gate * relu(x))
    base = torch.stack([(p[:, d, 0, None, None] + g[:, d, 0, None, None]) * ric + p[:, d, 2, None, None] * imrc
                        + p[:, d, 1, None, None] * x0 for d in range(4)])
    return _Refined(x0=x0, glgc=fc * x0, glgc_norm=torch.linalg.vector_norm(fc.float(), dim=1),
                    base=base, p_glgc=paths[:, :, 1].to(dtype), p_cmrc=paths[:, :, 3].to(dtype))


def context_block(itr: Any, prepared: dict[str, Tensor], key: str, guide_key: str, sl: slice | Tensor,
                  length: int | None, dtype: torch.dtype) -> _Context:
    """The per-item tensors of context items ``sl`` (tokens cut to ``length`` when given)."""
    def take(t: Tensor) -> Tensor:
        t = t[sl]
        return t[:, :length] if length is not None else t

    proj = []
    for i, layer in enumerate(itr.layers()):
        r = layer.cmrc.refine
        bias = torch.cat([r.fc_scale.bias, r.fc_shift.bias])  # softmax rows sum to one: fold the biases in
        proj.append((take(prepared[f"ctx{i}"]) + bias).to(dtype).contiguous())
    return _Context(tokens=take(prepared[key]).to(dtype).contiguous(), proj=proj,
                    guide=prepared[guide_key][sl].to(dtype))


# ---------------------------------------------------------------------------------------------------- per pair
def _cmrc(query: Tensor, ctx: _Context, i: int, w: dict, shared_query: bool) -> Tensor:
    """CMRC on [b, a, T, d] queries (or [a, T, d] shared by every context item when ``shared_query``)."""
    b, L, d = ctx.tokens.shape
    if shared_query:
        a, t = query.shape[:2]
        sim = (query.reshape(a * t, d) @ ctx.tokens.reshape(b * L, d).t()).view(a, t, b, L).permute(2, 0, 1, 3)
    else:
        a, t = query.shape[1:3]
        sim = torch.bmm(query.reshape(b, a * t, d), ctx.tokens.transpose(1, 2)).view(b, a, t, L)
    att = F.normalize(F.leaky_relu(sim, 0.1), dim=2)  # over the query tokens
    att = (att * w["lambda"]).softmax(-1).reshape(b, a * t, L)
    mixed = torch.bmm(att, ctx.proj[i]).view(b, a, t, 2 * d)
    q = query.unsqueeze(0) if shared_query else query
    u = torch.addcmul(mixed[..., d:], q, torch.tanh(mixed[..., :d]))  # query * scale + shift
    v = torch.addmm(w["cm1"][1], u.reshape(-1, d), w["cm1"][0]).relu_()
    return torch.addmm(w["cm2"][1], v, w["cm2"][0]).view(b, a, t, d).add_(q)


def _glgc(h: Tensor, guide: Tensor, w: dict) -> Tensor:
    """``(1 + normalize_tokens(fc_1(h) * g)) * h`` on [b, a, T, d] with g [b, d]."""
    b, a, t, d = h.shape
    m = torch.addmm(w["glgc"][1], h.reshape(-1, d), w["glgc"][0]).view(b, a, t, d)
    g = guide[:, None, :]
    norm = (m * m).sum(2, dtype=torch.float32).sqrt_()  # |m| over tokens (vector_norm over dim 2 is slow on CPU)
    factor = (g / torch.clamp(g.abs() * norm, min=_EPS)).to(m.dtype)  # [b, a, d]
    return m.mul_(factor.unsqueeze(2)).mul_(h).add_(h)


def _imrc(h: Tensor, w: dict) -> Tensor:
    """Self-attention block ``y = h + MHA(h); y + FFN(y)`` on [b, a, T, d]."""
    b, a, t, d = h.shape
    heads = w["heads"]
    hd = d // heads
    qkv = torch.addmm(w["qkv"][1], h.reshape(-1, d), w["qkv"][0]).view(b * a, t, 3, heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * a * heads, t, hd).unbind(0)  # [pairs x heads, T, d_h]
    # plain batched products: the fused CPU attention kernel is slow for 36 tokens of 16 dims
    att = torch.bmm(q, k.transpose(1, 2)).mul_(hd ** -0.5).softmax(-1)
    y = torch.bmm(att, v).view(b * a, heads, t, hd).transpose(1, 2).reshape(-1, d).add_(h.reshape(-1, d))
    z = torch.addmm(w["ffn1"][1], y, w["ffn1"][0]).relu_()
    return torch.addmm(w["ffn2"][1], z, w["ffn2"][0]).add_(y).view(b, a, t, d)


def _routers(w: dict, inputs: list[Tensor]) -> Tensor:
    """Raw router outputs [b, a, num_out, 4 src] from the token means of the 4 cell inputs."""
    return torch.stack([r(x.mean(2, dtype=torch.float32)) for r, x in zip(w["routers"], inputs)], -1)


def _mix(embs: list[Tensor], raw: Tensor) -> list[Tensor]:
    """Dense connection: destination d gets ``sum_s paths[d, s] emb_s`` (+ the RIC output when closed)."""
    total = raw.sum(-1, keepdim=True)
    paths = (raw / (total + _PATH_EPS)).to(embs[0].dtype)  # [b, a, 4, 4]
    gate = (total < _PATH_THRESHOLD).to(embs[0].dtype)
    out = []
    for d in range(4):
        h = embs[0] * (paths[:, :, d, 0] + gate[:, :, d, 0])[..., None, None]
        for s in range(1, 4):
            h.addcmul_(embs[s], paths[:, :, d, s][..., None, None])
        out.append(h)
    return out


def _cells(h: list[Tensor], ctx: _Context, i: int, w: dict) -> list[Tensor]:
    return [h[0].relu(), _glgc(h[1], ctx.guide, w), _imrc(h[2], w), _cmrc(h[3], ctx, i, w, shared_query=False)]


def shard_scores(ref: _Refined, ctx: _Context, weights: _Weights) -> Tensor:
    """Scores [b context items, a refined items] of one shard, float32."""
    w0, w1, w2 = weights.layers
    # layer 0: only CMRC and GLGC's per-pair scale are per pair
    e_cmrc = _cmrc(ref.x0, ctx, 0, w0, shared_query=True)  # [b, a, T, d]
    g = ctx.guide[:, None, :]
    f = g / torch.clamp(g.abs() * ref.glgc_norm.to(g.dtype)[None], min=_EPS)  # [b, a, d]
    h1 = []
    for d in range(4):
        coef = (f * ref.p_glgc[None, :, d, None])[:, :, None]  # [b, a, 1, d]
        h = torch.addcmul(ref.base[d].unsqueeze(0), ref.glgc.unsqueeze(0), coef)
        h1.append(h.addcmul_(e_cmrc, ref.p_cmrc[None, :, d, None, None]))
    # layer 1
    raw1 = _routers(w1, h1)  # [b, a, 4 dest, 4 src]
    h2 = _mix(_cells(h1, ctx, 1, w1), raw1)
    # layer 2 and the final aggregation
    raw2 = _routers(w2, h2)[:, :, 0]  # [b, a, 4]
    embs2 = _cells(h2, ctx, 2, w2)
    gates = (raw2 < _PATH_THRESHOLD / 4).float()
    denom = gates.sum(-1, keepdim=True) + raw2.sum(-1, keepdim=True)
    weights_ = (raw2 / denom).to(embs2[0].dtype)
    out = embs2[0] * weights_[:, :, 0, None, None]
    for j in range(1, 4):
        out.addcmul_(embs2[j], weights_[:, :, j, None, None])
    if bool(gates.any()):  # closed cells pass their input through
        skip = (gates / denom).to(out.dtype)
        for j in range(4):
            out.addcmul_(h2[j], skip[:, :, j, None, None])
    scale, shift = weights.bn
    z = torch.addcmul(shift, out, scale)  # BatchNorm (eval)
    pooled = F.normalize(z.mean(2, dtype=torch.float32) + z.amax(2).float(), dim=-1)
    return (pooled * ctx.guide.float()[:, None, :]).sum(-1)


# ---------------------------------------------------------------------------------------------------- driver
@torch.no_grad()
def score_all(itr: Any, img: dict[str, Tensor], txt: dict[str, Tensor], *, dtype: torch.dtype = torch.float32,
              rows: int = 2048, device: torch.device | None = None) -> Tensor:
    """The [Ni, Nt] score matrix (float32, on CPU) of one DIME direction, in cache-sized shards.

    ``img``/``txt`` are the encoders' outputs; ``rows`` is the number of refined tokens (pairs x tokens) per shard.
    """
    device = device or img["img"].device
    img = {k: v.to(device) for k, v in img.items() if k != "ids"}
    txt = {k: v.to(device) for k, v in txt.items() if k != "ids"}
    img, txt = itr.prepare(img, txt)
    i2t = itr.i2t
    ni, nt = img["img"].shape[0], txt["stc"].shape[0]
    weights = _Weights(itr, dtype)
    lengths = txt["mask"].sum(1).cpu()
    trim = i2t or itr.cfg.mask_padding
    groups: dict[int | None, Tensor] = {}
    for length in (sorted(set(lengths.tolist())) if trim else [None]):
        groups[length] = (lengths == length).nonzero()[:, 0] if length is not None else torch.arange(nt)
    out = torch.empty(ni, nt)
    if i2t:  # refined = images (36 regions), context = captions grouped by length
        t = img["rgn"].shape[1]
        for length, cols in groups.items():
            per_img = max(1, rows // (t * min(len(cols), 8)))
            ctx_blocks = [(c, context_block(itr, txt, "wrd", "stc", c, length, dtype))
                          for c in cols.split(max(1, rows // (t * per_img)))]
            for i0 in range(0, ni, per_img):
                ref = refined_block(itr, img, "rgn", slice(i0, i0 + per_img), None, dtype)
                for c, ctx in ctx_blocks:
                    out[i0:i0 + per_img, c] = shard_scores(ref, ctx, weights).t().cpu()
    else:  # refined = captions of one length, context = images
        for length, cols in groups.items():
            t = length or txt["wrd"].shape[1]
            per_cap = max(1, min(len(cols), rows // (t * 8)))
            per_img = max(1, rows // (t * per_cap))
            ctx_blocks = [(slice(i0, i0 + per_img), context_block(itr, img, "rgn", "img", slice(i0, i0 + per_img),
                                                                  None, dtype)) for i0 in range(0, ni, per_img)]
            for c in cols.split(per_cap):
                ref = refined_block(itr, {k: v[c] for k, v in txt.items()}, "wrd", slice(None), length, dtype)
                for sl, ctx in ctx_blocks:
                    out[sl, c] = shard_scores(ref, ctx, weights).cpu()
    return out
