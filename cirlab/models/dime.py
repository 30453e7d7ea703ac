"""DIME: dynamic modality interaction routing for image-text retrieval, with path tracing.

Paper: Leigang Qu, Meng Liu, Jianlong Wu, Zan Gao, Liqiang Nie. *Dynamic Modality Interaction Modeling for
Image-Text Retrieval*. SIGIR 2021, pp. 1104-1113, doi:10.1145/3404835.3462829.
Original code (behavioural reference; nothing here is copied): https://github.com/LgQu/DIME @ 5a711c4
(Apache-2.0): ``lib/``, ``train.py`` and ``evaluation.py`` there are what this file reproduces.

Two directional models share this file:

* ``direction="i2t"`` refines the 36 image regions of every image conditioned on each sentence and scores the
  pooled result against the sentence vector (recipe: lambda 4, one extra random caption per sample);
* ``direction="t2i"`` refines the 32 word positions of every caption conditioned on each image and scores the
  pooled result against the image vector (recipe: lambda 9, one extra random image per sample).

DIME* is the mean of the two models' full score matrices (:func:`ensemble_scores`, :class:`DIMEEnsemble`).

The interaction module has 3 routing layers x 4 cells. Tensors and checkpoints keep the code order
``[RIC, GLGC, IMRC, CMRC]``; the paper's figure numbers these cells 0, 2, 1, 3 (:data:`PAPER_CELL_NUMBER`).
Path matrices are ``[..., destination, source]``.

Deviations from the original code, each behind a named config field (original behaviour in brackets):

* ``mask_padding=True`` [False]: padding word positions are excluded from text pooling, the t2i self-attention
  keys, router means, GLGC/CMRC normalisations, the final BatchNorm statistics and pooling. The original lets
  padding take part everywhere (the original's masking quirk); set ``mask_padding=False`` to reproduce it, e.g. with the
  released checkpoints.
* ``extra_negatives="random"`` [same]: as the original, one random training caption (i2t) or image (t2i) per
  sample, drawn by the dataset (``PrecompSplit.pair_dataset(**model.dataset_extras())``). A batch without them
  (an API user's own dataset) falls back to the previous batch's captions/images, with a warning logged once.
  ``"previous_batch"`` keeps that earlier cirlab behaviour as a named option (no extras on the first step of a
  run or a resume); ``"none"`` turns the extras off. Extras that happen to be the positive are negatives, as in
  the original; ``mask_repeats=True`` masks every same-image pair, extras included.
* ``bert="random"`` (the ``tiny`` preset): :meth:`DIME.fit_vocab` builds a whole-word WordPiece vocabulary from
  the training captions (``runs.fit_to_training_data`` calls it); it is saved in the state dict.
* ``vse_mean_warmup_epochs=N`` [0]: the first N epochs sum all violations, then the hardest negative is
  used (VSE-infinity's first-epoch warm-up). Hardest-negative training from scratch can collapse to equal scores;
  the paper's behaviour is 0.
* The CMRC context projections are computed once per caption/image and mixed by the attention weights
  (``fc(A @ C) = A @ fc(C)`` because every attention row sums to one); exact, and far cheaper per pair.

The unused ``GLGC.fc_2`` and the i2t image BatchNorm are kept by default (``keep_unused_params``) so that
original checkpoints load and the trainable count equals the original's 6.27M.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core import tracing
from cirlab.core.checkpoint import RETIRED_TRUST_FIELD
from cirlab.core.config import (NON_NEGATIVE, POSITIVE, Bound, PresetMixin, check_field_ranges, refuse_indivisible,
                                refuse_unknown_choices)
from cirlab.core.fielddocs import documented
from cirlab.models._text import (  # noqa: F401  (BERT_BASE_CONFIG, tiny_vocab, ... stay importable from here)
    BERT_BASE_CONFIG, BertVocabMixin, convert_original_bert_state_dict, load_bert, make_tokenizer, tiny_vocab,
    word_splitter)
from cirlab.models._truncation import hf_cut_count, say_cut
from cirlab.models.registry import register_model

logger = logging.getLogger(__name__)

CELL_NAMES: tuple[str, ...] = ("RIC", "GLGC", "IMRC", "CMRC")  # code order of every path axis
PAPER_CELL_NUMBER: dict[str, int] = {"RIC": 0, "GLGC": 2, "IMRC": 1, "CMRC": 3}  # figure numbering
PAPER_NAMES: dict[str, str] = {n: f"cell {PAPER_CELL_NUMBER[n]} ({n})" for n in CELL_NAMES}
SELECTION_METRIC = "i2t_R@1+i2t_R@5+t2i_R@1+t2i_R@5"  # the original r1+r5+r1i+r5i
PATH_DIM = 4 * 4 * 2 + 4  # path vector: normalised layer-0 and layer-1 matrices + raw layer-2 gates
_PATH_THRESHOLD = 1e-4  # a destination whose incoming raw weights sum below this is "closed"
_PATH_EPS = 1e-8
EXTRA_NEGATIVES = ("random", "previous_batch", "none")  # DIMEConfig.extra_negatives choices
ORIGINAL_MAX_WORDS = 32  # the original's text budget: [CLS] + 30 WordPieces + [SEP]


@documented
@dataclass
class DIMEConfig(PresetMixin):
    """DIME's sizes and switches; the defaults are the paper's (Flickr30K i2t). One model scores one direction:
    the paper ensembles an i2t and a t2i model (``cirlab eval RUN --ensemble OTHER_RUN``). Presets: ``f30k_i2t``,
    ``f30k_t2i``, ``coco_i2t``, ``coco_t2i`` (paper), ``tiny`` (tests: a random tiny BERT) and ``lite`` (CPU
    demos: MiniLM)."""

    direction: str = "i2t"  # "i2t": refine regions per sentence; "t2i": refine words per image
    img_dim: int = 2048  # precomputed BUTD region feature size
    embed_size: int = 256  # joint embedding / cell width
    bert: str = "bert-base-uncased"  # local BERT dir (HF or original DIME layout), hub id, "minilm" or "random"
    bert_config: dict[str, Any] | None = None  # BertConfig kwargs for bert="random" (default: tiny sizes)
    vocab_file: str | None = None  # WordPiece vocab.txt; default: <bert dir>/vocab.txt, built-in tiny vocab if random
    bert_dropout_in_train: bool = True  # original keeps frozen BERT in train mode, so its dropout is active
    max_words: int = ORIGINAL_MAX_WORDS  # [CLS] + 30 WordPieces + [SEP], padded to this length
    hid_router: int = 512  # router MLP hidden width
    hid_imrc: int = 512  # IMRC feed-forward width
    num_head_imrc: int = 16  # IMRC heads (head size embed_size / heads = 16)
    path_hid: int = 128  # width of the path-vector projection used by the regulariser
    lambda_softmax: float = 4.0  # CMRC attention inverse temperature (README: 4 for i2t, 9 for t2i)
    margin: float = 0.2  # VSE++ hinge margin
    max_violation: bool = True  # hardest negative (VSE++); False sums all violations
    # Epochs that sum all violations before switching to the hardest negative (0 = paper: hardest from the start).
    # Not in DIME; VSE-infinity (GPO, Chen et al. CVPR 2021, its vse_mean_warmup_epochs = 1) warms up this way
    # because hardest-negative training from scratch can collapse to equal scores (loss = 2 x batch x margin).
    # Needs the trainer's on_epoch_start(epoch) hook; only applies when max_violation is True. GPO's name, as HREM's.
    vse_mean_warmup_epochs: int = 0
    path_weight: float = 0.5  # trade-off of the path-similarity regulariser
    # Extra one-directional negatives, captions (i2t) / images (t2i): "random" = the original (one random training
    # caption / image per sample, supplied by the dataset: PrecompSplit.pair_dataset(**model.dataset_extras()));
    # "previous_batch" = the previous training batch's captions / images (none on the first step of a run or a
    # resume); "none". The old bool reads True -> "random", False -> "none".
    extra_negatives: str | bool = "random"  # a bool only as read from configs and checkpoints before the choice
    mask_repeats: bool = False  # treat other captions of the same image in a batch as positives (original: no)
    mask_padding: bool = True  # exclude padding words everywhere (original: False, see module docstring)
    keep_unused_params: bool = True  # keep GLGC.fc_2 and the i2t image BN (unused, in original checkpoints)
    pairs_per_shard: int = 0  # evaluation shard size in pairs (0: from memory on CUDA, 4096 on CPU)
    # Full-matrix evaluation precision (score_matrix): "fp32" (scores within 1e-5 of the module's), "bf16" (within
    # about 2e-3, see reports/benchmarks/dime_eval.md) or "auto" = bf16 on CUDA cards with bf16 in hardware (Ampere
    # and later) and on CPUs with bf16 dot-product units (avx512_bf16 / amx_bf16; CIRLAB_BF16=0 turns it off), fp32
    # elsewhere.
    eval_dtype: str = "auto"
    # pretrained start, applied by load_init when `cirlab train` builds the model
    init_from: str = ""  # a cirlab DIME run folder or checkpoint, or the original's model_best.pth.tar

    # ranges the names do not imply (core.config.check_field_ranges): BERT's position embeddings hold 512 tokens
    # (a larger max_words pads every caption to it: 1e9 aborted natively after 30 s)
    NAME_RANGES: ClassVar[bool] = True  # its fields follow the naming rule of core.config.field_bound
    RANGES: ClassVar[dict[str, Bound]] = {
        "max_words": Bound(3, 512, why="[CLS], one word and [SEP] need 3; BERT's positions hold 512"),
        "lambda_softmax": POSITIVE, "margin": NON_NEGATIVE, "path_weight": NON_NEGATIVE,
        "pairs_per_shard": Bound(0, why="0 = from memory on CUDA, 4096 on CPU"),
    }
    RENAMED: ClassVar[dict[str, str]] = {"max_violation_warmup_epochs": "vse_mean_warmup_epochs"}
    # LgQu/DIME train.py's options that are named otherwise here
    ORIGINAL_NAMES: ClassVar[dict[str, str]] = {
        "trade_off": "path_weight", "extra_stc": "extra_negatives", "extra_img": "extra_negatives",
        "lambda_softmax_CMRC": "lambda_softmax", "bert_path": "bert", "learning_rate": "train.lr",
        "lr_update": "train.lr_step_size", "num_epochs": "train.epochs", "val_step": "train.eval_every_steps"}
    RETIRED: ClassVar[dict[str, str]] = RETIRED_TRUST_FIELD
    PRESETS = {
        "f30k_i2t": {"direction": "i2t", "lambda_softmax": 4.0},
        "f30k_t2i": {"direction": "t2i", "lambda_softmax": 9.0},
        "coco_i2t": {"direction": "i2t", "lambda_softmax": 4.0},
        "coco_t2i": {"direction": "t2i", "lambda_softmax": 9.0},
        "lite": {"direction": "i2t", "lambda_softmax": 4.0, "bert": "minilm"},
        "tiny": {"direction": "i2t", "lambda_softmax": 4.0, "bert": "random", "img_dim": 64, "embed_size": 32,
                 "hid_router": 32, "hid_imrc": 64, "num_head_imrc": 4, "path_hid": 16, "max_words": 16},
    }

    def __post_init__(self) -> None:
        check_field_ranges(type(self), vars(self))  # also when built directly, not through a preset
        if isinstance(self.extra_negatives, bool):  # configs / checkpoints written before the field was a choice
            self.extra_negatives = "random" if self.extra_negatives else "none"
        # vse_mean_warmup_epochs >= 0 and max_words >= 3 are ranges, refused above
        refuse_unknown_choices("DIMEConfig", [("direction", self.direction, ("i2t", "t2i")),
                                              ("extra_negatives", self.extra_negatives, EXTRA_NEGATIVES),
                                              ("eval_dtype", self.eval_dtype, ("auto", "fp32", "bf16"))])
        refuse_indivisible("DIMEConfig", [("embed_size", self.embed_size, "num_head_imrc", self.num_head_imrc)])


# --------------------------------------------------------------------------------------------- small helpers


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis (-2); ``mask`` [..., L] marks valid tokens (None: all valid)."""
    if mask is None:
        return x.mean(-2)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def _masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.amax(-2)
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(-2)


# --------------------------------------------------------------------------------------------- encoders


class EncoderImagePrecomp(nn.Module):
    """Region features -> Linear (Xavier) -> L2 per region; global = mean -> (BN, t2i only) -> L2."""

    def __init__(self, cfg: DIMEConfig) -> None:
        super().__init__()
        self.use_bn = cfg.direction == "t2i"
        self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        if self.use_bn or cfg.keep_unused_params:
            self.bn = nn.BatchNorm1d(cfg.embed_size)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgn = self.fc(feats)
        img = rgn.mean(1)
        if self.use_bn:
            img = self.bn(img)
        return F.normalize(img, dim=-1), F.normalize(rgn, dim=-1)


class EncoderText(nn.Module):
    """Frozen BERT -> 1D-CNN heads (K=1,2,3) + shared ``mapping`` + ``fc`` residual, word and sentence L2-normed."""

    def __init__(self, cfg: DIMEConfig, bert: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = bert
        for p in self.bert.parameters():
            p.requires_grad_(False)
        hid = bert.config.hidden_size
        self.fc = nn.Linear(hid, cfg.embed_size)
        self.convs1 = nn.ModuleList(nn.Conv2d(1, cfg.embed_size, (k, hid)) for k in (1, 2, 3))
        self.mapping = nn.Linear(3 * cfg.embed_size, cfg.embed_size)

    def train(self, mode: bool = True) -> "EncoderText":
        super().train(mode)
        if not self.cfg.bert_dropout_in_train:
            self.bert.eval()
        return self

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # BERT is frozen: no graph, far less memory
            hidden = self.bert(input_ids=ids, attention_mask=mask.long(),
                               token_type_ids=torch.zeros_like(ids)).last_hidden_state
        pool_mask = mask if self.cfg.mask_padding else None
        x_emb = self.fc(hidden)
        x = hidden.unsqueeze(1)
        # K=2 pads one step at the end, K=3 one at each side, so every head keeps max_words positions
        feats = [F.relu(conv(F.pad(x, (0, 0, pad_top, pad_bottom)))).squeeze(3)
                 for conv, (pad_top, pad_bottom) in zip(self.convs1, ((0, 0), (0, 1), (1, 1)))]
        word = self.mapping(torch.cat(feats, 1).transpose(1, 2)) + x_emb
        pooled = [_masked_max(f.transpose(1, 2), pool_mask) for f in feats]
        stc = self.mapping(torch.cat(pooled, 1)) + _masked_mean(x_emb, pool_mask)
        out = {"wrd": F.normalize(word, dim=-1), "stc": F.normalize(stc, dim=-1), "mask": mask.bool()}
        if self.training:  # target of the path regulariser: mean of the (dropout-noisy) BERT states
            out["bert"] = F.normalize(_masked_mean(hidden.detach().float(), pool_mask), dim=-1)
        return out


# --------------------------------------------------------------------------------------------- cells


class Router(nn.Module):
    """relu(tanh(MLP(mean of the cell input))); last bias 1.5 so every path starts open (tanh 1.5 = 0.905)."""

    def __init__(self, num_out: int, embed: int, hid: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed, hid), nn.ReLU(True), nn.Linear(hid, num_out))
        nn.init.constant_(self.mlp[2].bias, 1.5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.tanh(self.mlp(pooled)))


class _AttentionLayer(nn.Module):
    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linears = nn.ModuleList(nn.Linear(embed, embed) for _ in range(3))  # q, k, v; no output projection

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = (lin(x).view(n, length, self.heads, d // self.heads).transpose(1, 2) for lin in self.linears)
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(n, length, d)


class _FeedForward(nn.Module):
    def __init__(self, embed: int, hid: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed, hid)
        self.fc2 = nn.Linear(hid, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class SelfAttention(nn.Module):
    """IMRC body: LayerNorm-free post-residual block, ``y = x + MHA(x); out = y + FFN(y)``."""

    def __init__(self, embed: int, hid: int, heads: int) -> None:
        super().__init__()
        self.att_layer = _AttentionLayer(embed, heads)
        self.feed_forward_layer = _FeedForward(embed, hid)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-2], shape[-1])
        if key_mask is not None:
            key_mask = key_mask.expand(*shape[:-1]).reshape(-1, shape[-2])
        y = flat + self.att_layer(flat, key_mask)
        return (y + self.feed_forward_layer(y)).view(shape)


class Refinement(nn.Module):
    """CMRC body: SCAN attention (LeakyReLU 0.1, L2 over query tokens, softmax(lambda) over context), then
    ``fc_2(relu(fc_1(q * tanh(fc_scale(ctx)) + fc_shift(ctx)))) + q``."""

    def __init__(self, embed: int, lambda_softmax: float) -> None:
        super().__init__()
        self.lambda_softmax = lambda_softmax
        self.fc_scale = nn.Linear(embed, embed)
        self.fc_shift = nn.Linear(embed, embed)
        self.fc_1 = nn.Linear(embed, embed)
        self.fc_2 = nn.Linear(embed, embed)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """Bias-free fc_scale | fc_shift of the context tokens, computed once per caption/image."""
        weight = torch.cat([self.fc_scale.weight, self.fc_shift.weight], 0)
        return context @ weight.t().to(context.dtype)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_proj: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = F.leaky_relu(context @ query.transpose(-1, -2), 0.1)  # [..., cL, qL]
        if query_mask is not None:
            attn = attn * query_mask.unsqueeze(-2).to(attn.dtype)
        attn = F.normalize(attn, dim=-1).transpose(-1, -2) * self.lambda_softmax  # [..., qL, cL]
        if context_mask is not None:
            attn = attn.masked_fill(~context_mask.unsqueeze(-2), float("-inf"))
        attn = attn.softmax(-1)
        d = query.shape[-1]
        if context_proj is None:  # reference path: project the attended context
            ctx = attn @ context
            scale, shift = torch.tanh(self.fc_scale(ctx)), self.fc_shift(ctx)
        else:  # rows of attn sum to 1, so attn @ (C W) + b == (attn @ C) W + b
            mixed = attn @ context_proj
            scale = torch.tanh(mixed[..., :d] + self.fc_scale.bias)
            shift = mixed[..., d:] + self.fc_shift.bias
        return self.fc_2(F.relu(self.fc_1(query * scale + shift))) + query


class _Cell(nn.Module):
    def __init__(self, cfg: DIMEConfig, num_out: int) -> None:
        super().__init__()
        self.router = Router(num_out, cfg.embed_size, cfg.hid_router)


class RectifiedIdentityCell(_Cell):
    pass  # emb = relu(x)


class GlobalLocalGuidanceCell(_Cell):
    """``m = normalize_over_tokens(fc_1(l) * g); out = (1 + m) * l`` with g the other modality's global vector."""

    def __init__(self, cfg: DIMEConfig, num_out: int) -> None:
        super().__init__(cfg, num_out)
        self.fc_1 = nn.Linear(cfg.embed_size, cfg.embed_size)
        if cfg.keep_unused_params:
            self.fc_2 = nn.Linear(cfg.embed_size, cfg.embed_size)  # defined but unused in the original

    def forward(self, local: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None,
                fc_local: torch.Tensor | None = None) -> torch.Tensor:
        m = (self.fc_1(local) if fc_local is None else fc_local) * guide
        if mask is not None:
            m = m * mask.unsqueeze(-1).to(m.dtype)
        # F.normalize(m, dim=-2), written out: a vector norm over the token axis is a slow strided reduction on CPU.
        # The clamp comes before the sqrt (eps 1e-12 squared): a feature that is 0 on every token (the guide's
        # ReLU zeros, bf16 underflow) made sqrt's gradient inf and the step NaN; F.normalize's norm has gradient 0.
        # Under fp16 autocast 1e-24 is 0 and m * m is 0 below 2.4e-4 (NaN at step 1): the norm is taken in fp32
        if m.dtype == torch.float16:
            m = m.float()
        return (1 + m / (m * m).sum(-2, keepdim=True).clamp_min(1e-24).sqrt()) * local


class IntraModelReasoningCell(_Cell):
    def __init__(self, cfg: DIMEConfig, num_out: int) -> None:
        super().__init__(cfg, num_out)
        self.sa = SelfAttention(cfg.embed_size, cfg.hid_imrc, cfg.num_head_imrc)


class CrossModalRefinementCell(_Cell):
    def __init__(self, cfg: DIMEConfig, num_out: int) -> None:
        super().__init__(cfg, num_out)
        self.refine = Refinement(cfg.embed_size, cfg.lambda_softmax)


class RoutingLayer(nn.Module):
    """Four cells with one router each; ``num_out`` = 4 (dense layer) or 1 (final aggregation)."""

    def __init__(self, cfg: DIMEConfig, num_out: int) -> None:
        super().__init__()
        self.num_out = num_out
        self.ric = RectifiedIdentityCell(cfg, num_out)
        self.glgc = GlobalLocalGuidanceCell(cfg, num_out)
        self.imrc = IntraModelReasoningCell(cfg, num_out)
        self.cmrc = CrossModalRefinementCell(cfg, num_out)

    def cells(self) -> tuple[_Cell, ...]:
        return (self.ric, self.glgc, self.imrc, self.cmrc)  # code order


def mix_dense(embs: Sequence[torch.Tensor], raw: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense connection of layers 0 and 1.

    ``raw`` [..., 4 dest, 4 src] router outputs; ``embs`` the 4 cell outputs (broadcastable to ``shape``
    = [Ni, Nt, L, d]). Returns the 4 destination inputs [Ni, Nt, 4, L, d] and the per-destination normalised
    paths. A destination whose raw incoming weights sum below 1e-4 also receives the RIC output (skip).
    """
    if raw.dtype == torch.float16:  # _PATH_EPS is 0 in fp16: a destination whose routers are all 0 gave 0 / 0
        raw = raw.float()
    total = raw.sum(-1, keepdim=True)
    paths = raw / (total + _PATH_EPS)
    gate = (total < _PATH_THRESHOLD).to(paths.dtype)  # [..., 4, 1]
    stacked = torch.stack([e.expand(shape) for e in embs], dim=2)  # [Ni, Nt, 4 src, L, d]
    lead = shape[:2]
    mixed = paths.expand(*lead, 4, 4).to(stacked.dtype) @ stacked.flatten(3)  # [Ni, Nt, 4 dest, L*d]
    if bool(gate.any()):  # rare after init (bias 1.5): skip a full-size pass when no destination is closed
        mixed = mixed + gate.expand(*lead, 4, 1).to(stacked.dtype) * stacked[:, :, 0].flatten(2).unsqueeze(2)
    return mixed.view(*lead, 4, *shape[2:]), paths


def mix_final(embs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], raw: torch.Tensor) -> torch.Tensor:
    """Final aggregation: ``sum_j (p_j emb_j + [p_j < 1e-4/4] input_j) / (sum_j gates + sum_j p_j)``."""
    gates = (raw < _PATH_THRESHOLD / 4).to(raw.dtype)  # [Ni, Nt, 4]
    weights = raw / (gates.sum(-1) + raw.sum(-1)).unsqueeze(-1)
    out = weights[..., 0, None, None] * embs[0]
    for j in range(1, 4):
        out = out.addcmul_(weights[..., j, None, None], embs[j]) if not out.requires_grad else \
            out + weights[..., j, None, None] * embs[j]
    if bool(gates.any()):  # closed cells pass their input through (skip rule)
        skip = gates / (gates.sum(-1) + raw.sum(-1)).unsqueeze(-1)
        for j in range(4):
            out = out + skip[..., j, None, None] * inputs[j]
    return out


# --------------------------------------------------------------------------------------------- interaction


_TEXT_SEQ_KEYS = ("wrd", "mask", "l0_ric", "l0_imrc", "l0_fc", "ctx0", "ctx1", "ctx2")


class InteractionModule(nn.Module):
    """3 routing layers x 4 cells, BatchNorm scoring and the path vector, for one direction."""

    def __init__(self, cfg: DIMEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.i2t = cfg.direction == "i2t"
        self.dynamic_itr_l0 = RoutingLayer(cfg, 4)
        self.dynamic_itr_l1 = RoutingLayer(cfg, 4)
        self.dynamic_itr_l2 = RoutingLayer(cfg, 1)
        self.path_mapping = nn.Linear(PATH_DIM, cfg.path_hid)
        self.bn = nn.BatchNorm1d(cfg.embed_size)

    def layers(self) -> tuple[RoutingLayer, RoutingLayer, RoutingLayer]:
        return (self.dynamic_itr_l0, self.dynamic_itr_l1, self.dynamic_itr_l2)

    # -- pair-independent work, done once per image / caption ------------------------------------------
    def prepare(self, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Add the per-image and per-caption tensors that do not depend on the pair (idempotent)."""
        refined, context = (img, txt) if self.i2t else (txt, img)
        if "l0_paths" not in refined:
            x = refined["rgn"] if self.i2t else refined["wrd"]
            mask = None if self.i2t else self._token_mask(refined)
            l0 = self.dynamic_itr_l0
            pooled = _masked_mean(x, mask)  # all four layer-0 cells route on the same input
            raw = torch.stack([c.router(pooled) for c in l0.cells()], dim=-1)  # [N, 4 dest, 4 src]
            refined = {**refined, "l0_paths": raw, "l0_ric": F.relu(x), "l0_imrc": l0.imrc.sa(x, mask),
                       "l0_fc": l0.glgc.fc_1(x)}
        if "ctx0" not in context:
            c = context["wrd"] if self.i2t else context["rgn"]
            context = {**context, **{f"ctx{i}": layer.cmrc.refine.project_context(c)
                                     for i, layer in enumerate(self.layers())}}
        return (refined, context) if self.i2t else (context, refined)

    def _token_mask(self, txt: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return txt["mask"] if self.cfg.mask_padding else None

    # -- per-pair work ----------------------------------------------------------------------------------
    def forward(self, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor],
                need_paths: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [Ni, Nt] for every pair, and the per-pair 36-d path vectors when ``need_paths``."""
        img, txt = self.prepare(img, txt)
        ni, nt = img["img"].shape[0], txt["stc"].shape[0]
        if self.i2t:
            refined = {k: img[k][:, None] for k in ("l0_ric", "l0_imrc", "l0_fc", "l0_paths", "rgn")}
            x0, tok_mask = refined["rgn"], None
            guide = txt["stc"][None, :, None, :]
            context, ctx_mask = txt["wrd"][None], txt["mask"][None]  # truncation to the true length
            ctx_proj = [txt[f"ctx{i}"][None] for i in range(3)]
        else:
            refined = {k: txt[k][None] for k in ("l0_ric", "l0_imrc", "l0_fc", "l0_paths", "wrd")}
            x0 = refined["wrd"]
            tok_mask = txt["mask"][None] if self.cfg.mask_padding else None
            guide = img["img"][:, None, None, :]
            context, ctx_mask = img["rgn"][:, None], None
            ctx_proj = [img[f"ctx{i}"][:, None] for i in range(3)]
        shape = torch.Size((ni, nt, *x0.shape[2:]))

        def cmrc(layer: RoutingLayer, q: torch.Tensor, i: int) -> torch.Tensor:
            return layer.cmrc.refine(q, context, ctx_proj[i], ctx_mask, tok_mask)

        l0, l1, l2 = self.layers()
        embs0 = [refined["l0_ric"], l0.glgc(x0, guide, tok_mask, refined["l0_fc"]), refined["l0_imrc"],
                 cmrc(l0, x0, 0)]
        h1, p0 = mix_dense(embs0, refined["l0_paths"], shape)

        inputs1 = h1.unbind(2)
        embs1 = self._cells(l1, inputs1, guide, tok_mask, lambda q: cmrc(l1, q, 1))
        raw1 = torch.stack([c.router(_masked_mean(x, tok_mask)) for c, x in zip(l1.cells(), inputs1)], -1)
        h2, p1 = mix_dense(embs1, raw1, shape)

        inputs2 = h2.unbind(2)
        embs2 = self._cells(l2, inputs2, guide, tok_mask, lambda q: cmrc(l2, q, 2))
        raw2 = torch.cat([c.router(_masked_mean(x, tok_mask)) for c, x in zip(l2.cells(), inputs2)], -1)
        out = mix_final(embs2, inputs2, raw2)

        scores = self._score(out, img, txt, tok_mask)
        paths = None
        if need_paths or tracing.is_active():
            paths = torch.cat([p0.expand(ni, nt, 4, 4).flatten(2), p1.flatten(2), raw2], -1).float()
        if tracing.is_active():
            self._emit(img, txt, [p0.expand(ni, nt, 4, 4), p1, raw2.unsqueeze(2)],
                       [refined["l0_paths"].expand(ni, nt, 4, 4), raw1], paths)
        return scores, paths

    @staticmethod
    def _cells(layer: RoutingLayer, inputs: Sequence[torch.Tensor], guide: torch.Tensor,
               tok_mask: torch.Tensor | None, cmrc: Any) -> list[torch.Tensor]:
        return [F.relu(inputs[0]), layer.glgc(inputs[1], guide, tok_mask), layer.imrc.sa(inputs[2], tok_mask),
                cmrc(inputs[3])]

    def _score(self, out: torch.Tensor, img: dict, txt: dict, tok_mask: torch.Tensor | None) -> torch.Tensor:
        ni, nt, length, d = out.shape
        flat = out.reshape(-1, d)
        if tok_mask is not None and self.training:  # BN statistics over real tokens only
            valid = tok_mask.expand(ni, nt, length).reshape(-1)
            normed = flat.clone()
            normed[valid] = self.bn(flat[valid])
        else:
            normed = self.bn(flat)
        z = normed.view(ni, nt, length, d)
        pool_mask = tok_mask.expand(ni, nt, length) if tok_mask is not None else None
        z = F.normalize(_masked_mean(z, pool_mask) + _masked_max(z, pool_mask), dim=-1)
        other = txt["stc"][None] if self.i2t else img["img"][:, None]
        return (z * other.to(z.dtype)).sum(-1)

    def _emit(self, img: dict, txt: dict, normalised: list[torch.Tensor], raw: list[torch.Tensor],
              paths: torch.Tensor) -> None:
        ni, nt = img["img"].shape[0], txt["stc"].shape[0]
        img_ids = img.get("ids", torch.arange(ni)).tolist()
        cap_ids = txt.get("ids", torch.arange(nt)).tolist()
        meta = {"image_id": [i for i in img_ids for _ in range(nt)], "caption_id": cap_ids * ni}
        cells = list(CELL_NAMES)
        for i, mat in enumerate(normalised):  # layers 0-1 normalised, layer 2 its raw output gates (as PATH_DIM)
            dest = cells if mat.shape[-2] == 4 else ["output"]
            tracing.emit(self, f"layer{i}", mat.reshape(ni * nt, *mat.shape[-2:]), kind="path", sources=cells,
                         destinations=dest, paper_names=PAPER_NAMES, meta=meta)
        for i, mat in enumerate(raw):  # before the per-destination normalisation: shows closed paths
            tracing.emit(self, f"layer{i}_raw", mat.reshape(ni * nt, 4, 4), kind="path", sources=cells,
                         destinations=cells, paper_names=PAPER_NAMES, meta=meta)
        tracing.emit(self, "path_vector", paths.reshape(ni * nt, -1), kind="vector", meta=meta)

    def path_similarity(self, paths: torch.Tensor) -> torch.Tensor:
        """Regulariser input: per-pair path vectors [Ni, Nt, 36] averaged over the non-anchor axis."""
        vec = paths.mean(1) if self.i2t else paths.mean(0)
        vec = F.normalize(self.path_mapping(vec), dim=-1)
        return vec @ vec.t()


# --------------------------------------------------------------------------------------------- model


class MaxViolationWarmup:
    """VSE++'s hardest negative after ``config.vse_mean_warmup_epochs`` epochs that sum every violation (the
    warm-up of VSE-infinity, Chen et al. CVPR 2021, github.com/woodfrog/vse_infty, which HREM's ``train.py``
    keeps): DIME's option and HREM's ``vse`` loss follow this one schedule. The config needs ``max_violation``
    and ``vse_mean_warmup_epochs``; the trainer calls :meth:`on_epoch_start`."""

    _epoch = 0  # 0-based epoch, set by the trainer

    def on_epoch_start(self, epoch: int) -> None:
        """Trainer hook (0-based epoch): ends the sum-of-violations warm-up after ``vse_mean_warmup_epochs``."""
        self._epoch = int(epoch)

    def uses_max_violation(self) -> bool:
        """Whether the ranking loss takes the hardest negative now (False: sum of violations)."""
        return bool(self.config.max_violation) and self._epoch >= self.config.vse_mean_warmup_epochs


class DIME(MaxViolationWarmup, BertVocabMixin, nn.Module):
    """One DIME direction: ``encode_image``, ``encode_text``, ``score`` (all pairs) and ``training_step``."""

    model_name = "dime"
    task = "itm"
    trace_kind = "path"  # each routing layer emits its [pairs, D, S] cell-to-cell path matrix

    @classmethod
    def ensemble(cls, models: Sequence["DIME"]) -> "DIMEEnsemble":
        """DIME*: the mean of the members' score matrices (e.g. an i2t and a t2i model)."""
        return DIMEEnsemble(models)

    def __init__(self, cfg: DIMEConfig, bert: nn.Module | None = None, vocab: Any = None) -> None:
        super().__init__()
        self.config = cfg
        if bert is None:
            bert, vocab = load_bert(cfg, owner="DIME")
        self._vocab = vocab  # vocab.txt path, token list (saved in the state dict) or a tokenizer
        self._built_vocab = vocab  # restored when loading a checkpoint saved without a vocabulary
        self._tokenizer: Any = None
        self.img_enc = EncoderImagePrecomp(cfg)
        self.txt_enc = EncoderText(cfg, bert)
        self.itr_module = InteractionModule(cfg)
        self._pool: dict[str, Any] | None = None  # previous batch, for extra_negatives="previous_batch" / fallback
        self._warned: set[str] = set()

    # -- contract -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.img_enc.fc.weight.device

    def eval_precision(self, device: Any) -> str:
        """``eval_dtype`` as resolved on ``device`` ("auto" depends on the CPU): recorded with the run."""
        return str(eval_dtype(self, torch.device(device))).removeprefix("torch.")

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] + first max_words-2 WordPieces + [SEP]``, zero-padded to ``max_words``.

        The original keeps 30 WordPieces but tokenises the whole text first; a text of more than ``4 * max_words``
        words is cut to that many words before tokenising (each word gives at least one WordPiece, so the ids do
        not change), so a pasted book does not stall a batch. A text cut at ``max_words`` is logged (the first
        time as a warning)."""
        most = 4 * self.config.max_words
        words = [t.split(maxsplit=most) for t in texts]  # stops splitting after `most` words
        texts = [" ".join(w[:most]) if len(w) > most else t for t, w in zip(texts, words)]
        tokenizer, limit = self._get_tokenizer(), self.config.max_words
        enc = tokenizer(list(texts), max_length=limit, truncation=True, padding="max_length", return_tensors="pt")
        # the paper's budget is the original's protocol; another one (the tiny preset's 16) is a setting of this run
        whose = ("the original's protocol" if limit == ORIGINAL_MAX_WORDS else
                 f"model_overrides.max_words; the original reads {ORIGINAL_MAX_WORDS}")
        say_cut(logger, self, "DIME", hf_cut_count(tokenizer, texts, enc["attention_mask"], limit), len(texts), limit,
                f"WordPieces ([CLS] and [SEP] included; {whose})")
        return enc["input_ids"], enc["attention_mask"].bool()

    def encode_image(self, image_feats: torch.Tensor, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"img": [N, d], "rgn": [N, R, d], "ids": [N]}`` (L2-normalised)."""
        if image_feats.dim() != 3 or image_feats.shape[-1] != self.config.img_dim:
            raise ValueError(f"DIME.encode_image: expected [N, regions, {self.config.img_dim}] features, "
                             f"got {tuple(image_feats.shape)}")
        img, rgn = self.img_enc(image_feats.to(self.device, torch.float32))
        return {"img": img, "rgn": rgn, "ids": _ids(ids, img.shape[0])}

    def encode_text(self, texts: Sequence[str], ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"stc": [N, d], "wrd": [N, max_words, d], "mask": [N, max_words] bool, "ids": [N]}``."""
        if isinstance(texts, str):
            raise TypeError("DIME.encode_text expects a list of captions, got one string")
        tok, mask = self.tokenize(texts)
        out = self.txt_enc(tok.to(self.device), mask.to(self.device))
        out["ids"] = _ids(ids, tok.shape[0])
        return out

    def score(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [Ni, Nt] for every image-caption pair of :meth:`encode_image`'s and :meth:`encode_text`'s
        outputs (sharded when large; see :func:`score_matrix`)."""
        ni, nt = image["img"].shape[0], text["stc"].shape[0]
        if torch.is_grad_enabled() and self.training:
            return self.itr_module(image, text)[0]
        # on a CPU the module path runs in fp32 and the kernel in eval_dtype: with bf16 every block goes to the
        # kernel, so that one matrix is never part fp32 (its small blocks), part bf16, and recorded as bf16
        module_path = self.device.type != "cpu" or eval_dtype(self, self.device) == torch.float32
        if module_path and ni * nt <= _pairs_per_shard(self, self.device):
            with _autocast(self, self.device):
                return self.itr_module(image, text)[0].float()
        return score_matrix(self, image, text, device=self.device).to(self.device)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """VSE++ hardest-negative hinge (+ extra negatives) and 0.5 x the path-similarity regulariser."""
        cfg = self.config
        feats, texts = batch["image_feats"], list(batch["text"])
        n = feats.shape[0]
        img_idx = torch.as_tensor(batch.get("image_idx", torch.arange(n)))
        extra_feats, extra_text, extra_idx = self._extras(batch, n)
        if extra_feats is not None:
            feats = torch.cat([feats.to(self.device), extra_feats.to(self.device)])
        if extra_text is not None:
            texts = texts + list(extra_text)
        img = self.encode_image(feats)
        txt = self.encode_text(texts)
        scores, paths = self.itr_module(img, txt, need_paths=True)
        row_idx = col_idx = img_idx
        if extra_idx is not None:
            if cfg.direction == "i2t":
                col_idx = torch.cat([img_idx, extra_idx])
            else:
                row_idx = torch.cat([img_idx, extra_idx])
        rank = contrastive_loss(scores, n, cfg.margin, self.uses_max_violation(),
                                row_idx if cfg.mask_repeats else None, col_idx if cfg.mask_repeats else None)
        bert = txt["bert"][:n]
        path_reg = ((self.itr_module.path_similarity(paths) - bert @ bert.t()) ** 2).sum() / n
        return {"rank_loss": rank, "path_loss": cfg.path_weight * path_reg, "path_reg": path_reg.detach(),
                "pos_score": scores[:n, :n].diagonal().mean().detach(),
                # a phase flag in the log: the training curves mark where the warm-up's sum of violations ends
                "max_violation_on": torch.tensor(float(self.uses_max_violation()))}

    def dataset_extras(self) -> dict[str, bool]:
        """Keyword arguments for ``PrecompSplit.pair_dataset``: the random extras every training item must carry
        (``extra_negatives="random"``: one caption per item for i2t, one image for t2i; otherwise none)."""
        if self.config.extra_negatives != "random":
            return {}
        return {"extra_text": True} if self.config.direction == "i2t" else {"extra_image": True}

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _extras(self, batch: dict[str, Any], n: int) -> tuple[Any, Any, Any]:
        """Extra captions (i2t) or images (t2i) and their image ids, per ``extra_negatives``: the batch's random
        extras ("random"), else the previous batch's captions/images ("previous_batch", and the fallback of
        "random" for batches without extras, warned once), or none."""
        mode, i2t = self.config.extra_negatives, self.config.direction == "i2t"
        key, idx_key = ("extra_text", "extra_text_image_idx") if i2t else ("extra_image_feats", "extra_image_idx")
        if mode != "random" and key in batch:
            self._warn_once("ignored", "DIME: the batch carries %r but extra_negatives=%r: ignored", key, mode)
        if mode == "none":
            return None, None, None
        if mode == "random" and key in batch:
            extra = list(batch[key]) if i2t else batch[key]
            if i2t and not all(isinstance(t, str) for t in extra):
                raise TypeError("DIME: batch['extra_text'] must be a list of captions")
            extra_idx = batch.get(idx_key)
            if extra_idx is None:
                if self.config.mask_repeats:
                    raise KeyError(f"DIME: mask_repeats needs {idx_key!r} (the image of every extra) next to {key!r}")
                extra_idx = torch.full((len(extra),), -1)
            extra_idx = torch.as_tensor(extra_idx).reshape(-1)
            if extra_idx.numel() != len(extra):
                raise ValueError(f"DIME: {extra_idx.numel()} {idx_key} for {len(extra)} {key}")
            return (None, extra, extra_idx) if i2t else (extra, None, extra_idx)
        if mode == "random":
            self._warn_once("fallback", "DIME: extra_negatives='random' but the batch has no %r (build the training "
                            "set with PrecompSplit.pair_dataset(**model.dataset_extras())): using the previous "
                            "batch's %s as extra negatives", key, "captions" if i2t else "images")
        pool = self._pool
        img_idx = torch.as_tensor(batch.get("image_idx", torch.full((n,), -1)))
        self._pool = {"items": list(batch["text"]) if i2t else batch["image_feats"].detach().clone(),
                      "image_idx": img_idx.clone()}
        if pool is None:  # first step of a run (or of a resume)
            return None, None, None
        return (None, pool["items"], pool["image_idx"]) if i2t else (pool["items"], None, pool["image_idx"])

    def default_train_config(self) -> dict[str, Any]:
        """Paper optimisation (the original ``train.py`` defaults): Adam 2e-4, x0.1 every 15 epochs, 30 epochs,
        batch 32, clip 2, validation every 2000 steps. Checkpoints are selected on dev by r1 + r5 + r1i + r5i, i.e. the
        trainer's ``selection_metric`` :data:`SELECTION_METRIC` (not rsum)."""
        return {"optimizer": "adam", "lr": 2e-4, "weight_decay": 0.0, "epochs": 30, "batch_size": 32,
                "schedule": "step", "lr_step_size": 15, "lr_gamma": 0.1, "grad_clip": 2.0,
                "eval_every_steps": 2000, "selection_metric": SELECTION_METRIC}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def load_original(self, checkpoint: Any, source: str) -> dict[str, list[str]]:
        """The original's ``model_best.pth.tar`` (``cirlab eval FILE --model dime --preset f30k_t2i``): every
        weight must fit; the vocabulary is the built one (the original saves none)."""
        from cirlab.core.checkpoint import CheckpointError, load_converted

        try:
            state = convert_original_checkpoint(checkpoint)
        except KeyError as err:
            raise CheckpointError(f"{source}: {err.args[0]}") from None
        problem = other_options(checkpoint, self.config)
        if problem:
            raise CheckpointError(f"{source}: {problem}")
        return {"ignored": [], "kept_as_built": load_converted(self, state, source)}

    def load_init(self, report_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Apply ``config.init_from`` (``cirlab train`` calls this once): a cirlab run or checkpoint, or the
        original's file (every weight must fit, as for :meth:`load_original`)."""
        from cirlab.core.checkpoint import apply_init_from

        return apply_init_from(self, self.config.init_from, report_dir=report_dir)

    # the vocabulary (tokenizer cache, fit_vocab for the random tiny BERT, saved token list) comes from
    # cirlab.models._text.BertVocabMixin, shared with HREM

def _ids(ids: torch.Tensor | None, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n)
    ids = torch.as_tensor(ids).reshape(-1).cpu()
    if ids.numel() != n:
        raise ValueError(f"DIME: {ids.numel()} ids for {n} items")
    return ids


def contrastive_loss(scores: torch.Tensor, n: int, margin: float = 0.2, max_violation: bool = True,
                     row_idx: torch.Tensor | None = None, col_idx: torch.Tensor | None = None) -> torch.Tensor:
    """VSE++ hinge on ``scores`` [rows, cols] whose first ``n`` rows/columns are the positive pairs (diagonal).

    Image->caption costs run over the first ``n`` rows and all columns (extra captions are extra negatives);
    caption->image costs over the first ``n`` columns and all rows (extra images). With ``row_idx``/``col_idx``
    (image ids of rows and columns) other pairs of the same image are not counted as negatives.
    """
    pos = scores[:n, :n].diagonal()
    cost_s = (margin + scores[:n] - pos[:, None]).clamp_min(0)  # image i vs every caption
    cost_im = (margin + scores[:, :n] - pos[None, :]).clamp_min(0)  # caption j vs every image
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    pos_s = F.pad(eye, (0, scores.shape[1] - n))
    pos_im = F.pad(eye, (0, 0, 0, scores.shape[0] - n))
    if row_idx is not None and col_idx is not None:
        same = row_idx.to(scores.device)[:, None] == col_idx.to(scores.device)[None, :]
        same &= (row_idx.to(scores.device)[:, None] >= 0)
        pos_s, pos_im = pos_s | same[:n], pos_im | same[:, :n]
    cost_s, cost_im = cost_s.masked_fill(pos_s, 0), cost_im.masked_fill(pos_im, 0)
    if max_violation:
        return cost_s.amax(1).sum() + cost_im.amax(0).sum()
    return cost_s.sum() + cost_im.sum()


# --------------------------------------------------------------------------------------------- evaluation


def _autocast(model: DIME, device: torch.device) -> Any:
    """The module path's precision: bf16 autocast on a GPU when :func:`eval_dtype` says bf16 (``eval_dtype="fp32"``
    keeps fp32 there too); on a CPU the module runs in fp32 (its bf16 path is the fused kernel of
    :func:`score_matrix`)."""
    import contextlib

    if device.type == "cuda" and eval_dtype(model, device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pairs_per_shard(model: DIME, device: torch.device) -> int:
    """Pairs per interaction call: the config value, else sized to free CUDA memory, else 4096 on CPU."""
    if model.config.pairs_per_shard > 0:
        return model.config.pairs_per_shard
    if device.type != "cuda":
        return 4096
    free, _ = torch.cuda.mem_get_info(device)
    # ~40 live [L, d] activations per pair in bf16 (cells, stacked paths, attention), half the free memory
    per_pair = 40 * 36 * model.config.embed_size * 2 + 16 * 36 * 36 * 2
    return int(max(256, min(1 << 16, 0.5 * free / per_pair)))


def _slice(d: dict[str, torch.Tensor], sl: slice | torch.Tensor, device: torch.device | None,
           keep: int | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        v = v[sl]
        if keep is not None and k in _TEXT_SEQ_KEYS:
            v = v[:, :keep]
        out[k] = v.to(device, non_blocking=True) if device is not None and k != "ids" else v
    return out


def eval_dtype(model: DIME, device: torch.device) -> torch.dtype:
    """The precision of :func:`score_matrix` for ``model.config.eval_dtype`` on ``device``; ``auto`` is bf16 on a
    CUDA card with bf16 in hardware (Ampere and later) and on a CPU with bf16 units, else fp32."""
    choice = model.config.eval_dtype
    if choice == "auto":  # bf16 where the hardware has it (emulated bf16 loses precision for no speed)
        from cirlab.core._search import cpu_has_bf16, cuda_native_bf16

        native = cuda_native_bf16(device) if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16()
        choice = "bf16" if native else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


@torch.no_grad()
def score_matrix(model: DIME, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor], *,
                 dtype: torch.dtype | None = None, rows: int = 2048, shard_images: int | None = None,
                 shard_captions: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The full [Ni, Nt] score matrix (returned on CPU, float32).

    By default the evaluation kernel of :mod:`cirlab.models._dime_fast` computes it: per-item work once, captions
    grouped by exact length (no padding), ``rows`` refined tokens per cache-sized shard, in ``dtype`` (default:
    :func:`eval_dtype`; fp32 agrees with the module to ~1e-7, bf16 to ~1e-3). With ``shard_images`` /
    ``shard_captions``, while routes are traced, or in training mode (BatchNorm on batch statistics), the interaction
    module itself runs on the shards (:func:`module_score_matrix`).
    """
    device = torch.device(device) if device is not None else model.device
    if shard_images is not None or shard_captions is not None or tracing.is_active() or model.itr_module.training:
        return module_score_matrix(model, img, txt, shard_images=shard_images, shard_captions=shard_captions,
                                   device=device)
    from cirlab.models._dime_fast import score_all

    return score_all(model.itr_module, img, txt, dtype=dtype or eval_dtype(model, device), rows=rows,
                     device=device)


@torch.no_grad()
def module_score_matrix(model: DIME, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor], *,
                        shard_images: int | None = None, shard_captions: int | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """The full [Ni, Nt] score matrix through the interaction module, in shards (returned on CPU, float32).

    cirlab's strategy: the pair-independent work (layer-0 cells and routers of the refined modality, CMRC
    context projections of the other) is done once per image/caption instead of once per shard; shards are
    as large as memory allows (``pairs_per_shard``; from free memory on CUDA); captions are grouped by length
    so each shard drops the padding columns it does not need (exact: padding is masked); bf16 autocast on CUDA
    when :func:`eval_dtype` says bf16 (fp32 on a CPU).
    """
    itr = model.itr_module
    device = torch.device(device) if device is not None else model.device
    ni, nt = img["img"].shape[0], txt["stc"].shape[0]
    pairs = _pairs_per_shard(model, device)
    if shard_images is None and shard_captions is None:
        shard_captions = max(1, min(nt, int(math.sqrt(pairs))))
    if shard_images is None:
        shard_images = max(1, min(ni, pairs // shard_captions))
    if shard_captions is None:
        shard_captions = max(1, min(nt, pairs // shard_images))
    can_trim = model.config.direction == "i2t" or model.config.mask_padding
    lengths = txt["mask"].sum(1).cpu()
    order = torch.argsort(lengths, descending=True, stable=True) if can_trim else torch.arange(nt)
    out = torch.empty(ni, nt)
    with _autocast(model, device):
        img_dev = {k: (v.to(device) if k != "ids" else v) for k, v in img.items()}
        img_dev = itr.prepare(img_dev, _slice(txt, slice(0, 1), device))[0]  # per-image work, once
        for c0 in range(0, nt, shard_captions):
            cols = order[c0:c0 + shard_captions]
            keep = int(lengths[cols].max()) if can_trim else None
            txt_chunk = _slice(txt, cols, device, keep)
            txt_chunk = itr.prepare(_slice(img_dev, slice(0, 1), None), txt_chunk)[1]  # per-caption work, once
            for i0 in range(0, ni, shard_images):
                img_chunk = _slice(img_dev, slice(i0, i0 + shard_images), None)
                out[i0:i0 + shard_images, cols] = itr(img_chunk, txt_chunk)[0].float().cpu()
    return out


@torch.no_grad()
def naive_score_matrix(model: DIME, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor], *,
                       shard: int = 64, device: torch.device | str | None = None) -> torch.Tensor:
    """The original strategy: a plain loop over ``shard x shard`` blocks, each block computed from scratch."""
    device = torch.device(device) if device is not None else model.device
    ni, nt = img["img"].shape[0], txt["stc"].shape[0]
    base_img = {k: img[k] for k in ("img", "rgn", "ids")}
    base_txt = {k: txt[k] for k in ("stc", "wrd", "mask", "ids")}
    out = torch.empty(ni, nt)
    with _autocast(model, device):
        for i0 in range(0, ni, shard):
            im = _slice(base_img, slice(i0, i0 + shard), device)
            for c0 in range(0, nt, shard):
                out[i0:i0 + shard, c0:c0 + shard] = model.itr_module(
                    im, _slice(base_txt, slice(c0, c0 + shard), device))[0].float().cpu()
    return out


def ensemble_scores(*matrices: torch.Tensor) -> torch.Tensor:
    """DIME*: the mean of the directional models' full score matrices."""
    if not matrices:
        raise ValueError("ensemble_scores needs at least one score matrix")
    shapes = {tuple(m.shape) for m in matrices}
    if len(shapes) != 1:
        raise ValueError(f"ensemble_scores: score matrices differ in shape: {sorted(shapes)}")
    return torch.stack([m.float() for m in matrices]).mean(0)


class DIMEEnsemble(nn.Module):
    """DIME* with the ITM contract: encodes with every member, scores as the mean of their score matrices."""

    model_name = "dime_ensemble"
    task = "itm"

    def __init__(self, models: Sequence[DIME]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.config = models[0].config

    def encode_image(self, image_feats: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [m.encode_image(image_feats) for m in self.members]

    def encode_text(self, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        return [m.encode_text(texts) for m in self.members]

    def score(self, image: list[dict], text: list[dict]) -> torch.Tensor:
        return ensemble_scores(*[m.score(i, t) for m, i, t in zip(self.members, image, text)])

    def eval_precision(self, device: Any) -> str:
        return "/".join(dict.fromkeys(m.eval_precision(device) for m in self.members))


# --------------------------------------------------------------------------------------------- checkpoints


# the original's options (train.py's argparse names, pickled as the file's "opt") that change what its weights
# compute without changing their shapes: a file evaluated with other values loads and scores otherwise
_SCORING_OPTIONS = (("direction", "direction"), ("lambda_softmax_CMRC", "lambda_softmax"), ("max_words", "max_words"))


def other_options(checkpoint: Any, config: DIMEConfig) -> str | None:
    """What the original file's own options (``opt``) say it was trained with that ``config`` does not: a t2i file
    evaluated with the i2t preset loaded every weight and scored rsum 298 for 280, without a word. None when they
    agree or the file records none."""
    opt = checkpoint.get("opt") if isinstance(checkpoint, dict) else None
    recorded = vars(opt) if hasattr(opt, "__dict__") else opt if isinstance(opt, dict) else {}
    other = [(name, field, recorded[name]) for name, field in _SCORING_OPTIONS
             if name in recorded and recorded[name] != getattr(config, field)]
    if not other:
        return None
    said = ", ".join(f"--{name} {value!r} (model_overrides.{field} is {getattr(config, field)!r})"
                     for name, field, value in other)
    direction = recorded.get("direction", config.direction)
    presets = ", ".join(p for p, v in DIMEConfig.PRESETS.items() if v.get("direction") == direction and "_" in p)
    return (f"it was trained with {said}; evaluated so, it would score otherwise: use a preset of its direction "
            f"({presets}) or set those model_overrides")


def convert_original_checkpoint(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An original DIME ``model_best.pth.tar`` (``model`` = [img_enc, txt_enc, itr_module] state dicts) as a
    cirlab state dict; BERT keys go through :func:`convert_original_bert_state_dict`."""
    parts = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(parts, (list, tuple)) or len(parts) != 3:
        raise KeyError("DIME checkpoint: expected 'model' = [img_enc, txt_enc, itr_module] state dicts")
    img, txt, itr = parts
    bert = convert_original_bert_state_dict({k: v for k, v in txt.items() if k.startswith("bert.")})
    state = {f"img_enc.{k}": v for k, v in img.items()}
    state.update({f"txt_enc.bert.{k}": v for k, v in bert.items() if not k.startswith("pooler.")})
    state.update({f"txt_enc.{k}": v for k, v in txt.items() if not k.startswith("bert.")})
    state.update({f"itr_module.{k}": v for k, v in itr.items()})
    return state


@register_model("dime", task="itm", config_cls=DIMEConfig)
def build_dime(config: DIMEConfig) -> DIME:
    return DIME(config)
