"""HREM: image-text matching with fragment-level and instance-level relations, a dual encoder at inference.

Paper: Zheren Fu, Zhendong Mao, Yan Song, Yongdong Zhang. *Learning Semantic Relationship among Instances for
Image-Text Matching*. CVPR 2023, pp. 15159-15168.
Original code (behavioural reference; nothing here is copied): https://github.com/CrossmodalGroup/HREM @ 1ad2612
(``lib/encoders.py``, ``lib/mlp.py``, ``lib/mca.py``, ``lib/loss.py``, ``graph_lib.py``, ``train.py``).

* **Fragment level** (the encoders, used at inference): BUTD regions -> ``fc(x) + MLP(x)`` (BatchNorm over all
  ``B x R`` rows, padding included) and BERT words -> ``Linear(768, 1024)``; each modality is pooled twice, by
  MaxK (mean of the 2 largest values per channel over the valid positions, the "residual" view) and by a
  one-layer Transformer encoder + masked mean (the "enhanced" view), combined ``0.8 / 0.2`` and L2-normalised.
  Scoring is one matrix product ``img @ txt.T``.
* **Instance level** (:class:`InstanceRelation`, training only, from iteration ``warmup_iters``): the batch's
  ``B`` images and ``B`` captions form one ``2B``-node graph. Connections keep the top ``threshold`` share of each
  row (i2i/t2t by embedding similarity, i2t/t2i by SCAN-style word-region matching on detached features);
  relevance is ``exp(-distance)`` within a modality and a small MLP over the top-10 word-region scores (+ their
  mean) across modalities, pulled towards ``exp(-distance(v, t))`` by a KL regulariser. One Transformer layer over
  the joint graph, with ``mask_weight x relevance`` as additive attention bias on connected edges and ``-inf``
  elsewhere, gives relation-enhanced embeddings that enter extra triplet terms.

Deviations from the original code and quirks, each behind a named config field (original behaviour in brackets):

* ``connection_bug=False`` [True before the 2023-10-25 fix, commit fb854a9]: the released code chose the i2i
  and t2t connections from the cross-modal similarities ``v t^T`` and ``t v^T``. The README numbers predate the fix.
* ``maxk_quirk=False`` [True]: the original MaxK lowers ``k`` for the rest of the batch after a sample shorter
  than ``k``; here every sample uses ``min(k, its length)``. Equal whenever every sample has >= 2 positions.
* Model selection is a run setting: ``train.selection: val`` (dev, cirlab's default) or ``train.selection: test``
  / ``paper`` (the original validates and keeps ``model_best`` on the test split; optimistic, label it).
* The warm-up counter (``iteration``) is a buffer saved with the weights, so a resumed run keeps its position
  [a Python counter, reset on restart]. A new run started from weights (``init_from``: a cirlab run, or the
  original's ``model_best.pth``) restarts it at 0. A loss that samples no negative
  (every row empty) is 0, as the original's ``try/except`` around ``torch.multinomial`` makes it.
* Word-region matching (:func:`word_region_scores`) is one batched tensor ``[B_txt, B_img, L, R]`` instead of a
  Python loop over captions; it keeps the loop's padding behaviour (see its docstring). Token ids are padded to at
  least ``topk`` positions so that short batches have the padding words the loop would read (it would fail
  without them).

Not options (cirlab's trainer and evaluation, the same for every model):

* A non-finite loss stops the run with a one-line error naming the step and its loss terms; the original
  (``lib/vse.py``) logs it and skips the step. Training on past a NaN would hide what caused it, and a skipped
  backward on one process of a distributed run would leave the others waiting.
* Evaluation scores in float32 (the original fills float64 arrays): the ranking differs only on near-ties.
"""
from __future__ import annotations

import copy
import logging
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
from cirlab.core.errors import InputError
from cirlab.models._text import BertVocabMixin, load_bert
from cirlab.models._truncation import say_cut
from cirlab.models.dime import MaxViolationWarmup, contrastive_loss  # VSE++ hinge and its warm-up, DIME's
from cirlab.models.registry import register_model

logger = logging.getLogger(__name__)

EDGE_TYPES = ("i2i", "i2t", "t2i", "t2t")  # blocks of the joint graph: rows (queries) x columns (keys)
LOSSES = ("trip", "vse")  # distance-weighted triplet (the code's default) | VSE++ hinge (ContrastiveLoss)


@documented
@dataclass
class HREMConfig(PresetMixin):
    """HREM's sizes and switches; the defaults are the paper's (``f30k``/``coco`` differ in the batch size of the
    recipe). Presets: ``f30k``, ``coco`` (paper: BERT-base, the instance module after 8,000 iterations), ``tiny``
    (tests: a random tiny BERT) and ``lite`` (CPU demos: MiniLM). The ``*_quirk``/``*_bug`` switches reproduce the
    original code where it differs from the paper (off by default)."""

    # --- encoders ---
    img_dim: int = 2048  # precomputed BUTD region feature size
    embed_size: int = 1024  # joint embedding width (--embed_size)
    img_hidden: int = 512  # hidden width of the image MLP (embed_size // 2 in the code)
    bert: str = "bert-base-uncased"  # local BERT dir, hub id, "minilm" or "random" (cirlab.models._text)
    bert_config: dict[str, Any] | None = None  # BertConfig kwargs for bert="random" (default: tiny sizes)
    vocab_file: str | None = None  # WordPiece vocab.txt; default: <bert dir>/vocab.txt, tiny vocab if random
    max_words: int = 512  # token limit incl. [CLS]/[SEP] (the original does not truncate; BERT allows 512)
    nhead: int = 16  # heads of the fragment and instance Transformer layers (--nhead)
    dropout: float = 0.1  # their dropout (--dropout)
    residual_weight: float = 0.8  # v = w * MaxK view + (1 - w) * Transformer view (--residual_weight)
    maxk: int = 2  # MaxK pooling k
    maxk_quirk: bool = False  # True: the original's k carried over to later samples of the batch
    # --- training-time augmentation (lib/image_caption.py) ---
    text_augment: bool = True  # per word, p = 0.2: 50% [MASK], 10% random token, 40% deleted
    region_drop: float = 0.2  # each region dropped with this probability (--size_augment 1)
    # --- instance-level relation module (training only) ---
    instance_module: bool = True  # False: the same encoders trained with the base loss only (ablation)
    warmup_iters: int = 8000  # iterations with the base loss only (--warmup)
    threshold: float = 0.5  # share of each row kept as connections (--threshold)
    topk: int = 10  # word-region scores fed to the relevance MLPs (--topk)
    sigma: float = 1.0  # exp(-distance / sigma) relevance and regulariser target
    temperature: float = 1.0  # KL regulariser temperature T
    mask_weight: float = 1.0  # scale of the relevance bias (README: 1.0 F30K, 1.5 COCO); must be > 0
    num_layers_enc: int = 1  # layers of the instance (fusion) Transformer (--num_layers_enc)
    norm_input: bool = True  # fusion input: normalised embeddings (--norm_input 1)
    cross_loss: bool = True  # add trip(v, t_hat) + trip(v_hat, t) (--cross_loss 1)
    reg_loss_weight: float = 10.0  # KL regulariser weight (--reg_loss_weight)
    connection_bug: bool = False  # True: i2i/t2t connections from v t^T / t v^T (code before 2023-10-25)
    # --- losses ---
    base_loss: str = "trip"  # "trip" (distance-weighted sampling) | "vse" (VSE++) (--base_loss)
    gnn_loss: str = "trip"  # loss of the relation-enhanced terms (--gnn_loss)
    margin: float = 0.2  # hinge margin (both losses; the triplet loss hard-codes 0.2)
    dws_dim: int = 512  # "Sampling Matters" dimension d of the distance weights (hard-coded 512, not embed_size)
    dws_clamp: float = 0.5  # distances are clamped below at this value (cut_off)
    dws_cutoff: float = 1.7  # negatives at distance >= this are never sampled (1.7 F30K, 1.9 COCO)
    max_violation: bool = True  # vse: hardest negative after the warm-up epochs (VSE++)
    vse_mean_warmup_epochs: int = 1  # vse: epochs summing all violations first (GPO / HREM train.py)
    mask_repeats: bool = True  # other captions of the same image in a batch are positives (--mask_repeat 1)
    # --- optimisation, read by default_train_config / param_groups ---
    bert_lr_scale: float = 0.1  # BERT learning rate = 0.1 x train.lr (the original: 5e-5 against 5e-4)
    paper_batch_size: int = 128  # the paper's batch (128 F30K, 256 COCO)
    # --- pretrained start, applied by load_init when `cirlab train` builds the model ---
    init_from: str = ""  # a cirlab HREM run folder or checkpoint, or the original's model_best.pth

    RETIRED: ClassVar[dict[str, str]] = RETIRED_TRUST_FIELD
    # CrossmodalGroup/HREM arguments.py's options that are named otherwise here
    ORIGINAL_NAMES: ClassVar[dict[str, str]] = {
        "size_augment": "region_drop", "bert_path": "bert", "learning_rate": "train.lr",
        "lr_schedules": "train.lr_milestones", "decay_rate": "train.lr_gamma", "num_epochs": "train.epochs",
        "val_step": "train.eval_every_steps"}
    # ranges the names do not imply (core.config.check_field_ranges): sigma and the temperature divide distances
    # and scores (0 gave a NaN loss at step 3); a negative bert_lr_scale turns BERT's steps into gradient ascent
    NAME_RANGES: ClassVar[bool] = True  # its fields follow the naming rule of core.config.field_bound
    RANGES: ClassVar[dict[str, Bound]] = {
        "max_words": Bound(3, 512, why="[CLS], one word and [SEP] need 3; BERT's positions hold 512"),
        "sigma": POSITIVE, "temperature": POSITIVE, "mask_weight": POSITIVE, "dws_cutoff": POSITIVE,
        "residual_weight": Bound(0, 1), "threshold": Bound(0, 1, low_open=True), "reg_loss_weight": NON_NEGATIVE,
        "margin": NON_NEGATIVE, "dws_clamp": NON_NEGATIVE, "bert_lr_scale": NON_NEGATIVE,
        "maxk": Bound(1), "paper_batch_size": Bound(1),
        "topk": Bound(1, 512, why="scores of at most max_words words and the regions; the relevance MLPs are topk "
                                  "wide (1e9 failed allocating 4e18 bytes)"),
    }
    PRESETS = {
        "f30k": {"mask_weight": 1.0, "dws_cutoff": 1.7, "paper_batch_size": 128},
        "coco": {"mask_weight": 1.5, "dws_cutoff": 1.9, "paper_batch_size": 256},
        # real MiniLM-L6 (384-d, installs from PyPI), smaller heads; CPU demo runs are hundreds of steps, not 8000
        "lite": {"bert": "minilm", "embed_size": 256, "img_hidden": 128, "warmup_iters": 500,
                 "paper_batch_size": 128},
        "tiny": {"bert": "random", "img_dim": 64, "embed_size": 32, "img_hidden": 16, "nhead": 4, "max_words": 32,
                 "warmup_iters": 0, "paper_batch_size": 32},
    }

    def __post_init__(self) -> None:
        check_field_ranges(type(self), vars(self))  # also when built directly, not through a preset
        # mask_weight > 0 (0 x -inf is NaN in the attention mask), threshold, maxk, topk, region_drop and max_words
        # are ranges, refused above
        refuse_unknown_choices("HREMConfig", [("base_loss", self.base_loss, LOSSES),
                                              ("gnn_loss", self.gnn_loss, LOSSES)])
        refuse_indivisible("HREMConfig", [("embed_size", self.embed_size, "nhead", self.nhead)])


# --------------------------------------------------------------------------------------------- pooling


def l2norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x|| + eps)`` over the last axis (the code's l2norm; F.normalize clamps instead); in fp32 for an
    fp16 ``x`` (eps 1e-8 is 0 in fp16: a zero row gave 0 / 0), returned in ``x``'s dtype."""
    if x.dtype == torch.float16:
        return l2norm(x.float(), eps).to(x.dtype)
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, size]`` bool, True at the first ``lengths[b]`` positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def maxk_pool(x: torch.Tensor, lengths: torch.Tensor, k: int = 2, quirk: bool = False) -> torch.Tensor:
    """Per channel, the mean of the ``k`` largest values over the valid positions: ``[B, L, D] -> [B, D]``.

    A sample with fewer than ``k`` positions uses all of them; with ``quirk`` that smaller k also applies to every
    later sample of the batch (the original loop reassigns k).
    """
    lengths = lengths.to(x.device)
    kk = torch.clamp(lengths, max=k)
    if quirk:
        kk = torch.cummin(kk, dim=0).values
    top = x.masked_fill(~valid_mask(lengths, x.shape[1])[..., None], float("-inf"))
    top = top.topk(min(k, x.shape[1]), dim=1).values  # [B, k, D], sorted descending
    keep = torch.arange(top.shape[1], device=x.device)[None, :] < kk[:, None]
    return top.masked_fill(~keep[..., None], 0.0).sum(1) / kk[:, None].to(x.dtype)


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    m = valid_mask(lengths.to(x.device), x.shape[1])[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def fragment_encoder(cfg: HREMConfig, layers: int = 1) -> nn.TransformerEncoder:
    """PyTorch's post-LN, ReLU, sequence-first Transformer encoder (``d_model = ffn = embed_size``), as the
    original builds it; parameter names match its checkpoints (``layers.0.self_attn.in_proj_weight``, ...)."""
    layer = nn.TransformerEncoderLayer(cfg.embed_size, cfg.nhead, dim_feedforward=cfg.embed_size,
                                       dropout=cfg.dropout)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


@dataclass
class Encoded:
    """One modality of a batch: ``emb`` [B, D] L2-normalised, ``raw`` [B, D] before the norm, ``local``
    [B, L, D] projected regions / words before pooling, ``lengths`` [B] valid positions."""

    emb: torch.Tensor
    raw: torch.Tensor
    local: torch.Tensor
    lengths: torch.Tensor


class _PooledEncoder(nn.Module):
    """MaxK view + Transformer view of projected tokens, ``w * res + (1 - w) * enh``, then L2 norm."""

    aggr: nn.TransformerEncoder
    cfg: HREMConfig

    def pool(self, local: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        cfg = self.cfg
        res = maxk_pool(local, lengths, cfg.maxk, cfg.maxk_quirk)
        pad = ~valid_mask(lengths.to(local.device), local.shape[1])
        enh = self.aggr(local.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)  # sequence-first
        raw = cfg.residual_weight * res + (1 - cfg.residual_weight) * masked_mean(enh, lengths)
        return Encoded(l2norm(raw), raw, local, lengths.to(local.device))


# --------------------------------------------------------------------------------------------- encoders


class _MLP(nn.Module):
    """``Linear -> BN -> ReLU -> Linear``; BN over every row of ``[B * R, .]`` (padding rows included). A second
    ``BatchNorm1d(out)`` is built but never used, as in the original (its checkpoints hold it)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = F.relu(self.bns[0](self.layers[0](x.reshape(-1, shape[-1]))))
        return self.layers[1](h).view(*shape[:-1], -1)


class FCMLP(nn.Module):
    """``fc(x) + mlp(x)``: the image projection; Xavier-uniform weights and zero biases on every Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp = _MLP(in_dim, hidden, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mlp(x)


class EncoderImage(_PooledEncoder):
    """Regions ``[B, R, img_dim]`` (+ lengths) -> :class:`Encoded` (``emb`` [B, D])."""

    def __init__(self, cfg: HREMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = FCMLP(cfg.img_dim, cfg.img_hidden, cfg.embed_size)
        self.aggr = fragment_encoder(cfg)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> Encoded:
        if lengths is None:
            lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long, device=feats.device)
        return self.pool(self.fc(feats), lengths)


class EncoderText(_PooledEncoder):
    """Token ids ``[B, L]`` (+ lengths incl. [CLS]/[SEP]) -> BERT (fine-tuned) -> ``Linear`` -> :class:`Encoded`."""

    def __init__(self, cfg: HREMConfig, bert: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = bert
        self.linear = nn.Linear(bert.config.hidden_size, cfg.embed_size)  # PyTorch default init
        self.aggr = fragment_encoder(cfg)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, pad_id: int = 0) -> Encoded:
        hidden = self.bert(input_ids=ids, attention_mask=(ids != pad_id).long()).last_hidden_state
        return self.pool(self.linear(hidden), lengths)


# --------------------------------------------------------------------------------------------- instance level


def word_region_scores(regions: torch.Tensor, words: torch.Tensor, cap_len: torch.Tensor,
                       topk: int = 10) -> dict[str, torch.Tensor]:
    """SCAN-style word-region matching of every caption with every image, as one tensor (no loop).

    ``regions`` [B_img, R, D] and ``words`` [B_txt, L, D] are the projected features (the caller detaches them).
    Per caption ``c`` the original reads ``n_c = max(cap_len[c], topk)`` word positions, so captions shorter than
    ``topk`` tokens bring padding-word features into the word-axis normalisation and the t2i top-k; every region
    row is used, padded ones included (``img_len_use=False``). With ``Z = leaky_relu(words . regions, 0.1)``:

    * t2i: ``Z`` L2-normalised over the selected words, max over regions -> per-word scores; ``mean`` over the real
      words, ``topk`` over the selected words;
    * i2t: ``Z`` L2-normalised over regions, max over the real words -> per-region scores; ``mean`` and ``topk``
      over all regions.

    Returns ``t2i_topk`` [B_txt, B_img, k], ``t2i_mean`` [B_txt, B_img], ``i2t_topk`` [B_img, B_txt, k],
    ``i2t_mean`` [B_img, B_txt] and ``z`` [B_txt, B_img, L, R] (the leaky-ReLU scores, padding words included).
    """
    length = words.shape[1]
    if length < topk or regions.shape[1] < topk:
        raise ValueError(f"word_region_scores: topk {topk} needs >= {topk} word positions and regions, got "
                         f"{length} and {regions.shape[1]}")
    cap_len = cap_len.to(words.device)
    reg = F.normalize(regions, dim=-1)
    wrd = F.normalize(words, dim=-1)
    z = F.leaky_relu(torch.einsum("tld,ird->tilr", wrd, reg), 0.1)  # [B_txt, B_img, L, R]
    pos = torch.arange(length, device=words.device)
    selected = (pos[None, :] < cap_len.clamp_min(topk)[:, None])[:, None, :, None]  # [B_txt, 1, L, 1]
    real = (pos[None, :] < cap_len[:, None])[:, None, :]  # [B_txt, 1, L]
    # t2i: normalise over the selected words (zeros elsewhere add nothing to the norm), best region per word
    row = F.normalize(z * selected, dim=2).amax(3)  # [B_txt, B_img, L]
    t2i_mean = (row * real).sum(-1) / cap_len[:, None].to(row.dtype)
    t2i_topk = row.masked_fill(~selected[..., 0], float("-inf")).topk(topk, dim=-1).values
    # i2t: normalise over regions, best real word per region
    col = F.normalize(z, dim=3).masked_fill(~real[..., None], float("-inf")).amax(2)  # [B_txt, B_img, R]
    return {"t2i_topk": t2i_topk, "t2i_mean": t2i_mean, "i2t_topk": col.topk(topk, dim=-1).values.transpose(0, 1),
            "i2t_mean": col.mean(-1).t(), "z": z}


def top_share(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Connections: ``scores[i, j] >= the k-th largest score of row i`` (ties keep every equal entry)."""
    return scores - scores.topk(k, dim=1).values[:, -1:] >= 0


def kl_regulariser(target: torch.Tensor, relevance: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(relevance / T) || softmax(target / T))`` per row, ``batchmean``, times ``T^2``.

    The original computes ``F.kl_div(log_softmax(target), softmax(relevance))``: the learned relevance is the
    *target distribution* of ``kl_div``, so the gradient reaches it (and the relation MLPs behind it) while the
    detached ``target`` stays put.
    """
    log_p = F.log_softmax(target / temperature, dim=-1)
    return F.kl_div(log_p, F.softmax(relevance / temperature, dim=-1), reduction="batchmean") * temperature ** 2


@dataclass
class RelationGraph:
    """The instance-level graph of one batch. Blocks are ``[rows, columns]`` with rows the queries of the fusion
    attention: ``i2i`` [B_img, B_img], ``i2t`` [B_img, B_txt], ``t2i`` [B_txt, B_img], ``t2t`` [B_txt, B_txt]."""

    connect: dict[str, torch.Tensor]  # bool blocks
    relevance: dict[str, torch.Tensor]  # float blocks (i2t / t2i: MLP(top-k) + mean)
    scores: dict[str, torch.Tensor]  # word_region_scores output
    reg: torch.Tensor  # KL regulariser (unweighted)
    mask: torch.Tensor  # [2B, 2B] additive attention bias: mask_weight * relevance, -inf where not connected
    attention: torch.Tensor | None = None  # [layers, 2B, 2B] fusion attention (heads averaged), when asked

    def joint(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.cat([blocks["i2i"], blocks["i2t"]], 1), torch.cat([blocks["t2i"], blocks["t2t"]], 1)])


class RelationMLP(nn.Sequential):
    """``Linear(k, k) -> ReLU -> Dropout(0) -> Linear(k, 1)``: top-k word-region scores -> one relevance."""

    def __init__(self, k: int) -> None:
        super().__init__(nn.Linear(k, k), nn.ReLU(), nn.Dropout(0.0), nn.Linear(k, 1))


class InstanceRelation(nn.Module):
    """Connection + relevance relations over the batch and the fusion Transformer (HREM's ``GraphLoss``)."""

    def __init__(self, cfg: HREMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fusion = fragment_encoder(cfg, cfg.num_layers_enc)
        self.mlp_t2i = RelationMLP(cfg.topk)
        self.mlp_i2t = copy.deepcopy(self.mlp_t2i)  # the twins start identical

    def graph(self, img: Encoded, txt: Encoded) -> RelationGraph:
        """Connections, relevances and the regulariser for a batch (``img.emb`` and ``txt.emb`` normalised)."""
        cfg, v, t = self.cfg, img.emb, txt.emb
        k_img, k_txt = int(v.shape[0] * cfg.threshold), int(t.shape[0] * cfg.threshold)
        scores = word_region_scores(img.local.detach(), txt.local.detach(), txt.lengths, cfg.topk)
        with torch.no_grad():
            vd, td = v.detach(), t.detach()
            # fixed code: i2i from image-image, t2t from caption-caption similarities; before 2023-10-25 the
            # cross-modal ones (the first commit's i2i = v t^T and t2t = t v^T)
            s_ii, s_tt = (vd @ td.t(), td @ vd.t()) if cfg.connection_bug else (vd @ vd.t(), td @ td.t())
            connect = {"i2i": top_share(s_ii, k_img), "t2t": top_share(s_tt, k_txt),
                       "i2t": top_share(scores["i2t_mean"], k_txt), "t2i": top_share(scores["t2i_mean"], k_img)}
        relevance = {"i2i": torch.exp(-torch.cdist(v, v) / cfg.sigma), "t2t": torch.exp(-torch.cdist(t, t) / cfg.sigma),
                     "i2t": self.mlp_i2t(scores["i2t_topk"]).squeeze(-1) + scores["i2t_mean"],
                     "t2i": self.mlp_t2i(scores["t2i_topk"]).squeeze(-1) + scores["t2i_mean"]}
        target = torch.exp(-torch.cdist(v, t) / cfg.sigma).detach()  # [B_img, B_txt]
        reg = (kl_regulariser(target, relevance["i2t"], cfg.temperature)
               + kl_regulariser(target.t(), relevance["t2i"], cfg.temperature))
        out = RelationGraph(connect, relevance, scores, reg, torch.empty(0))
        out.mask = cfg.mask_weight * out.joint(relevance).masked_fill(~out.joint(connect), float("-inf"))
        return out

    def forward(self, img: Encoded, txt: Encoded, attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, RelationGraph]:
        """``(v_hat, t_hat, graph)``: relation-enhanced, L2-normalised embeddings [B, D] of both modalities."""
        g = self.graph(img, txt)
        x = torch.cat([img.emb, txt.emb] if self.cfg.norm_input else [img.raw, txt.raw]).unsqueeze(1)  # [2B, 1, D]
        if attention or tracing.is_active():
            g.attention = self._attention(x, g.mask)
        h = self.fusion(x, mask=g.mask).squeeze(1)
        b = img.emb.shape[0]
        if tracing.is_active():
            self._emit(g, img, txt)
        return F.normalize(h[:b], dim=-1), F.normalize(h[b:], dim=-1), g

    @torch.no_grad()
    def _attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each fusion layer's attention map (heads averaged), recomputed for inspection."""
        maps = []
        for layer in self.fusion.layers:
            maps.append(layer.self_attn(x, x, x, attn_mask=mask, need_weights=True)[1][0])
            x = layer(x, src_mask=mask)
        return torch.stack(maps)

    def _emit(self, g: RelationGraph, img: Encoded, txt: Encoded) -> None:
        names = getattr(self, "_node_names", None) or node_names(img.emb.shape[0], txt.emb.shape[0])
        joint = {"connection": g.joint(g.connect).float(), "relevance": g.joint(g.relevance), "mask": g.mask}
        if g.attention is not None:
            joint.update({f"attention{i}" if i else "attention": a for i, a in enumerate(g.attention)})
        for layer, mat in joint.items():
            tracing.emit(self, layer, mat[None], kind="path", sources=names, destinations=names)
        tracing.emit(self, "word_region", g.scores["z"].detach().float(), kind="vector")


def node_names(n_img: int, n_txt: int, image_ids: Sequence[Any] | None = None,
               caption_ids: Sequence[Any] | None = None) -> list[str]:
    """Labels of the joint graph's nodes: ``image:<id>`` then ``caption:<id>``."""
    image_ids = list(range(n_img)) if image_ids is None else list(image_ids)
    caption_ids = list(range(n_txt)) if caption_ids is None else list(caption_ids)
    return [f"image:{i}" for i in image_ids] + [f"caption:{c}" for c in caption_ids]


# --------------------------------------------------------------------------------------------- losses


def positives(labels_rows: torch.Tensor, labels_cols: torch.Tensor) -> torch.Tensor:
    return labels_rows[:, None] == labels_cols[None, :]


@torch.no_grad()
def distance_weights(sims: torch.Tensor, neg: torch.Tensor, d: int = 512, clamp: float = 0.5,
                     cutoff: float = 1.7) -> torch.Tensor:
    """Negative-sampling distribution per row ("Sampling Matters", Wu et al. ICCV 2017), as HREM's TripletLoss.

    ``q(dist) ~ dist^(2-d) (1 - dist^2/4)^((3-d)/2)`` on unit vectors (``dist = sqrt(2 - 2 sim)``, clamped below at
    ``clamp``), computed in log space, normalised per row; positives and negatives at ``dist >= cutoff`` get 0.
    Non-finite log-weights count as 0 before the row maximum is subtracted, as in the original. That maximum runs
    over every negative, those beyond ``cutoff`` included, whose log-weight is large again (422 at cos -0.9): a row
    holding one such negative and only far-from-clamp valid ones underflows to all zeros, and the direction's loss
    is then 0 (:func:`triplet_dws_direction`). Rare with 1024-d embeddings; common with small random ones.
    """
    dist = (2 - 2 * sims).sqrt().clamp(min=clamp)
    logw = (2.0 - d) * dist.log() - ((d - 3.0) / 2.0) * (1.0 - 0.25 * dist * dist).log()
    bad = ~torch.isfinite(logw)
    logw = (logw * neg).masked_fill(bad, 0.0)
    w = (logw - logw.amax(1, keepdim=True)).exp() * (neg & (dist < cutoff))
    return w / (w.sum(1, keepdim=True) + 1e-20)


def triplet_dws_direction(sims: torch.Tensor, pos: torch.Tensor, margin: float = 0.2, d: int = 512,
                          clamp: float = 0.5, cutoff: float = 1.7,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One direction (rows = anchors): for every positive pair, one negative drawn from
    :func:`distance_weights`; ``sum relu(margin + s_an - s_ap)``. 0 when some anchor has no negative to draw
    (the original's ``torch.multinomial`` raises and the direction's loss is set to 0)."""
    anchor, positive = pos.nonzero(as_tuple=True)
    weights = distance_weights(sims.detach().float(), ~pos, d, clamp, cutoff)[anchor]
    if anchor.numel() == 0 or bool((weights.sum(1) <= 0).any()):
        return sims.sum() * 0.0
    negative = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return F.relu(margin + sims[anchor, negative] - sims[anchor, positive]).sum()


def triplet_dws_loss(im: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, d: int = 512,
                     clamp: float = 0.5, cutoff: float = 1.7, generator: torch.Generator | None = None) -> torch.Tensor:
    """HREM's default loss: distance-weighted triplet over ``im @ s.T`` in both directions (image anchors, then
    caption anchors); ``labels`` (image ids) make duplicate images positives."""
    sims = im @ s.t()
    pos = positives(labels, labels)
    kw = dict(margin=margin, d=d, clamp=clamp, cutoff=cutoff, generator=generator)
    return triplet_dws_direction(sims, pos, **kw) + triplet_dws_direction(sims.t(), pos.t(), **kw)


# --------------------------------------------------------------------------------------------- model


class HREM(MaxViolationWarmup, BertVocabMixin, nn.Module):
    """Dual encoder (``encode_image``, ``encode_text``, ``score`` = matrix product) trained with the
    instance-level relation module (``training_step``)."""

    model_name = "hrem"
    task = "itm"
    min_micro_batch = 2  # its loss contrasts each item with the batch's others: one alone gives 0

    def __init__(self, cfg: HREMConfig, bert: nn.Module | None = None, vocab: Any = None) -> None:
        super().__init__()
        self.config = cfg
        if bert is None:
            bert, vocab = load_bert(cfg, owner="HREM")
        self._vocab, self._built_vocab, self._tokenizer = vocab, vocab, None
        self.img_enc = EncoderImage(cfg)
        self.txt_enc = EncoderText(cfg, bert)
        self.relation = InstanceRelation(cfg) if cfg.instance_module else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # warm-up counter (GraphLoss calls)

    @property
    def device(self) -> torch.device:
        return self.img_enc.fc.fc.weight.device

    # -- text --------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N, L] ids, [N] lengths)``: ``[CLS] WordPieces [SEP]`` (lengths count both), zero-padded to the
        longest caption and to at least ``topk`` positions; ``augment`` applies the training-time word
        augmentation (:meth:`_augment`)."""
        if isinstance(texts, str):
            raise TypeError("HREM expects a list of captions, got one string")
        tok = self._get_tokenizer()
        enc = tok(list(texts), add_special_tokens=False)
        seqs = []
        for i, pieces in enumerate(enc["input_ids"]):
            if augment:
                pieces = self._augment(pieces, enc.word_ids(i), tok)
            seqs.append([tok.cls_token_id, *pieces[: self.config.max_words - 2], tok.sep_token_id])
        say_cut(logger, self, "HREM", sum(len(p) + 2 > self.config.max_words for p in enc["input_ids"]), len(seqs),
                self.config.max_words, "WordPieces ([CLS] and [SEP] included)")
        width = max(max(len(s) for s in seqs), self.config.topk)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])

    @staticmethod
    def _augment(pieces: list[int], word_ids: list[int | None], tok: Any) -> list[int]:
        """Per word (all of its WordPieces together), with probability 0.2: every piece -> [MASK] (half of
        those), -> a random vocabulary entry (a tenth), or the word is deleted (the rest)."""
        out: list[int] = []
        groups: dict[int | None, list[int]] = {}
        for piece, word in zip(pieces, word_ids):
            groups.setdefault(word, []).append(piece)
        draws = torch.rand(len(groups)).tolist()
        for (_, group), p in zip(groups.items(), draws):
            if p >= 0.2:
                out += group
            elif p < 0.1:  # p / 0.2 < 0.5
                out += [tok.mask_token_id] * len(group)
            elif p < 0.12:  # p / 0.2 < 0.6
                out += torch.randint(len(tok), (len(group),)).tolist()
        return out

    # -- contract ----------------------------------------------------------------------------------------
    def _image(self, image_feats: torch.Tensor, lengths: torch.Tensor | None = None) -> Encoded:
        if image_feats.dim() != 3 or image_feats.shape[-1] != self.config.img_dim:
            raise ValueError(f"HREM.encode_image: expected [N, regions, {self.config.img_dim}] features, "
                             f"got {tuple(image_feats.shape)}")
        lengths = lengths.to(self.device) if lengths is not None else None
        return self.img_enc(image_feats.to(self.device, torch.float32), lengths)

    def _text(self, texts: Sequence[str], augment: bool = False) -> Encoded:
        ids, lengths = self.tokenize(texts, augment)
        return self.txt_enc(ids.to(self.device), lengths.to(self.device), self._get_tokenizer().pad_token_id)

    def encode_image(self, image_feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, D]`` L2-normalised image embeddings from region features ``[N, R, img_dim]``."""
        return self._image(image_feats, lengths).emb

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` L2-normalised caption embeddings."""
        return self._text(texts).emb

    def score(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[Ni, Nt]`` cosine scores: one matrix product (the instance module is training-only)."""
        return image @ text.t()

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``trip(v, t)``; from iteration ``warmup_iters`` also ``trip(v, t_hat) + trip(v_hat, t)`` (cross),
        ``trip(v_hat, t_hat)`` (enhanced) and ``reg_loss_weight x KL`` (reg). Every key is present at every step
        (zeros before the warm-up) so logs and gradient accumulation see one set of terms."""
        cfg = self.config
        img, txt, labels = self.encode_batch(batch)
        zero = img.emb.sum() * 0.0
        terms = {"base_loss": self._pair_loss(cfg.base_loss, img.emb, txt.emb, labels)}
        relation_on = (self.relation is not None and int(self.iteration) >= cfg.warmup_iters
                       and img.emb.shape[0] >= 2)
        terms.update(cross_loss=zero, enhanced_loss=zero, reg_loss=zero)
        if relation_on:
            v_hat, t_hat, graph = self.relation(img, txt)
            if cfg.cross_loss:
                terms["cross_loss"] = (self._pair_loss(cfg.gnn_loss, img.emb, t_hat, labels)
                                       + self._pair_loss(cfg.gnn_loss, v_hat, txt.emb, labels))
            terms["enhanced_loss"] = self._pair_loss(cfg.gnn_loss, v_hat, t_hat, labels)
            terms["reg_loss"] = cfg.reg_loss_weight * graph.reg
        self.iteration += 1
        terms["relation_on"] = torch.tensor(float(relation_on))
        terms["pos_score"] = (img.emb * txt.emb).sum(-1).mean().detach()
        return terms

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Encoded, Encoded, torch.Tensor]:
        """Both modalities of a training batch (with the augmentations in train mode) and the loss labels."""
        cfg = self.config
        feats = torch.as_tensor(batch["image_feats"]).to(self.device, torch.float32)
        n = feats.shape[0]
        # per-image region counts: no shipped dataset gives them (precomp items are fixed-size [R, D], every region
        # real), a dataset of one's own with padded regions may
        lengths = batch.get("image_lengths")
        lengths = torch.as_tensor(lengths).to(self.device) if lengths is not None else None
        if feats.shape[1] < cfg.topk:  # word_region_scores keeps the topk best regions: raised mid-step
            raise InputError(f"HREM: topk={cfg.topk} needs at least {cfg.topk} regions per image (the word-region "
                             f"relevance keeps the {cfg.topk} best); these features have {feats.shape[1]}: set "
                             f"model_overrides.topk to at most {feats.shape[1]}")
        if self.training and cfg.region_drop > 0:
            feats, lengths = drop_regions(feats, lengths, cfg.region_drop, min_keep=cfg.topk)
        img = self._image(feats, lengths)
        txt = self._text(list(batch["text"]), augment=self.training and cfg.text_augment)
        ids = batch.get("image_idx")
        labels = torch.as_tensor(ids).reshape(-1) if cfg.mask_repeats and ids is not None else torch.arange(n)
        return img, txt, labels.to(self.device)

    def _pair_loss(self, kind: str, im: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if kind == "trip":
            return triplet_dws_loss(im, s, labels, cfg.margin, cfg.dws_dim, cfg.dws_clamp, cfg.dws_cutoff)
        return contrastive_loss(im @ s.t(), im.shape[0], cfg.margin, self.uses_max_violation(), labels, labels)

    def default_train_config(self) -> dict[str, Any]:
        """The original ``train.py``: AdamW lr 5e-4 (BERT 5e-5 via :meth:`param_groups`), weight decay 1e-4 on
        every parameter, 30 epochs, x0.1 at epochs 15 and 25, grad-norm clip 2, batch 128 (F30K) / 256 (COCO),
        validation every epoch selecting on rsum (cirlab: on dev unless ``train.selection`` says otherwise)."""
        return {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "epochs": 30,
                "batch_size": self.config.paper_batch_size, "schedule": "step", "lr_milestones": [15, 25],
                "lr_gamma": 0.1, "grad_clip": 2.0, "selection_metric": "rsum",
                # the relation module has no gradient before warmup_iters: DDP must expect unused parameters
                "ddp_find_unused_parameters": True}

    def param_groups(self) -> list[dict[str, Any]]:
        """BERT at ``bert_lr_scale x train.lr``; everything else (projections, fragment and instance modules) at
        ``train.lr``. Relative, so that ``--set train.lr=...`` keeps the original's 1:10 ratio."""
        bert = {id(p) for p in self.txt_enc.bert.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) in bert and p.requires_grad],
                 "lr_scale": self.config.bert_lr_scale},
                {"params": [p for p in self.parameters() if id(p) not in bert and p.requires_grad]}]

    def load_original(self, checkpoint: Any, source: str) -> dict[str, list[str]]:
        """The original's ``model_best.pth`` (``cirlab eval FILE --model hrem --preset f30k``):
        the two encoders must fit exactly; the instance module and the warm-up counter, which it never saves,
        stay as built (:func:`load_original_checkpoint` is the lenient, reporting form)."""
        from cirlab.core.checkpoint import CheckpointError, load_converted

        try:
            state, ignored = convert_original_checkpoint(checkpoint)
        except KeyError as err:
            raise CheckpointError(f"{source}: {err.args[0]}") from None
        return {"ignored": ignored, "kept_as_built": load_converted(self, state, source, kept_as_built=_TRAINING_ONLY)}

    def load_init(self, report_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Apply ``config.init_from`` (``cirlab train`` calls this once). From the original's file only the two
        encoders come (the relation module stays as built). The warm-up counter restarts at 0 either way: this is
        a new run, whose relation terms begin ``warmup_iters`` iterations after its own start."""
        from cirlab.core.checkpoint import apply_init_from

        reports = apply_init_from(self, self.config.init_from, report_dir=report_dir)
        self.iteration.zero_()
        return reports

    # -- inspection --------------------------------------------------------------------------------------
    @torch.no_grad()
    def relation_graph(self, batch: dict[str, Any]) -> RelationGraph:
        """The instance-level graph of ``batch`` in eval mode (no augmentation, attention maps included); emits
        to an active :func:`cirlab.trace_routes` block. Needs ``instance_module``."""
        if self.relation is None:
            raise ValueError("HREM.relation_graph: this model has no instance module (instance_module=False)")
        was = self.training
        self.eval()
        try:
            img, txt, _ = self.encode_batch(batch)
            ids_img = batch.get("image_idx", range(img.emb.shape[0]))
            ids_cap = batch.get("caption_idx", range(txt.emb.shape[0]))
            self.relation._node_names = node_names(len(ids_img), len(ids_cap), torch.as_tensor(ids_img).tolist(),
                                                   torch.as_tensor(ids_cap).tolist())
            return self.relation(img, txt, attention=True)[2]
        finally:
            self.relation._node_names = None
            self.train(was)


def drop_regions(feats: torch.Tensor, lengths: torch.Tensor | None, p: float,
                 min_keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each valid region iff ``rand > p`` (order kept), re-pad with zeros to the longest kept set
    (the original's ``--size_augment``).

    cirlab's rules on top (neither changes a batch the original handles): an image that would keep no region keeps
    all its valid ones; and the padded width (the longest kept set) is at least ``min(min_keep, the most valid
    regions of an image)``: when no image keeps that many, the image with the most valid regions keeps all of them,
    and every other image keeps its drop. HREM passes ``topk``: the word-region relevance reads the ``topk`` best
    of the padded width (padding included), so only the width needs it. With BUTD's 36 regions the original never
    meets the case; with 12 it raised in the middle of a run. A per-image rule would have cut the drop on
    12-region features from 20 % to about 6 %.
    """
    b, r, _ = feats.shape
    if lengths is None:
        lengths = torch.full((b,), r, dtype=torch.long, device=feats.device)
    valid = valid_mask(lengths, r)
    keep = (torch.rand(b, r, device=feats.device) > p) & valid
    keep = torch.where(keep.any(1, keepdim=True), keep, valid)  # nothing kept: keep all
    keep = _widen_to(keep, valid, min_keep)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept regions first, in order
    new_len = keep.sum(1)
    out = feats.gather(1, order[..., None].expand_as(feats))[:, : int(new_len.max())]
    return out * valid_mask(new_len, out.shape[1])[..., None].to(out.dtype), new_len


def _widen_to(keep: torch.Tensor, valid: torch.Tensor, min_keep: int) -> torch.Tensor:
    """``keep`` with one image's drop undone when the longest kept set is shorter than ``min_keep`` (capped at the
    most valid regions any image has): restoring the image with the most valid regions reaches the width while
    every other image keeps its drop, so the augmentation stays as strong as configured."""
    if keep.shape[0] == 0:  # an empty batch has no width to reach
        return keep
    n_valid = valid.sum(1)
    if int(keep.sum(1).max()) >= min(min_keep, int(n_valid.max())):
        return keep
    keep = keep.clone()
    widest = int(n_valid.argmax())
    keep[widest] = valid[widest]
    return keep


# --------------------------------------------------------------------------------------------- tracing


def relation_frames(model: HREM, batch: dict[str, Any], caption: int | None = 0) -> dict[str, Any]:
    """Tidy pandas frames of the instance-level graph of one batch (eval mode), for the relation explorer.

    ``"edges"``: one row per (matrix, row node, column node), ``matrix`` in connection | relevance | mask |
    attention (first fusion layer, heads averaged); ``edge_type`` i2i | i2t | t2i | t2t; ``row_kind`` /
    ``col_kind`` image | caption, ``row_id`` / ``col_id`` the dataset id of that image or caption, ``row_image`` /
    ``col_image`` the image id (a caption's own image), ``weight``. Rows are the attention queries.

    ``"word_region"`` (when ``caption`` is a batch position): caption ``caption``'s word positions against every
    region of every image in the batch: ``caption_id``, ``image_id``, ``word_pos``, ``word``, ``real_word`` (False
    for the padding words the top-k quirk reads), ``region``, ``score`` (leaky-ReLU cosine), ``t2i`` (normalised over
    the selected words) and ``i2t`` (normalised over regions).
    """
    import pandas as pd

    g = model.relation_graph(batch)
    n = int(torch.as_tensor(batch["image_feats"]).shape[0])
    img_ids = torch.as_tensor(batch.get("image_idx", torch.arange(n))).tolist()
    cap_ids = torch.as_tensor(batch.get("caption_idx", torch.arange(n))).tolist()
    kinds = ["image"] * n + ["caption"] * n
    letter = ["i"] * n + ["t"] * n
    ids, owner = img_ids + cap_ids, img_ids + img_ids
    mats = {"connection": g.joint(g.connect).float(), "relevance": g.joint(g.relevance), "mask": g.mask}
    if g.attention is not None:
        mats["attention"] = g.attention[0]
    rows = []
    for name, mat in mats.items():
        m = mat.detach().float().cpu()
        for i in range(2 * n):
            for j in range(2 * n):
                rows.append((name, f"{letter[i]}2{letter[j]}", i, j, kinds[i], ids[i], kinds[j], ids[j], owner[i],
                             owner[j], float(m[i, j])))
    edges = pd.DataFrame(rows, columns=["matrix", "edge_type", "row", "col", "row_kind", "row_id", "col_kind",
                                        "col_id", "row_image", "col_image", "weight"])
    out = {"edges": edges}
    if caption is not None:
        out["word_region"] = _word_region_frame(model, g, batch, caption, img_ids, cap_ids)
    return out


def _word_region_frame(model: HREM, g: RelationGraph, batch: dict[str, Any], c: int, img_ids: list,
                       cap_ids: list) -> Any:
    import pandas as pd

    ids, lengths = model.tokenize([list(batch["text"])[c]])
    words = model._get_tokenizer().convert_ids_to_tokens(ids[0].tolist())
    z = g.scores["z"][c].detach().float().cpu()  # [B_img, L, R]
    length, topk = int(lengths[0]), model.config.topk
    n_sel = min(max(length, topk), z.shape[1])
    sel = z[:, :n_sel]
    t2i = F.normalize(sel, dim=1)
    i2t = F.normalize(sel, dim=2)
    rows = []
    for i in range(z.shape[0]):
        for w in range(n_sel):
            for r in range(z.shape[2]):
                rows.append((cap_ids[c], img_ids[i], w, words[w] if w < len(words) else "[PAD]", w < length, r,
                             float(sel[i, w, r]), float(t2i[i, w, r]), float(i2t[i, w, r])))
    return pd.DataFrame(rows, columns=["caption_id", "image_id", "word_pos", "word", "real_word", "region",
                                       "score", "t2i", "i2t"])


# --------------------------------------------------------------------------------------------- checkpoints


_TRAINING_ONLY = ("relation.", "iteration")  # not in the original checkpoints (the criterion is not saved)


def convert_original_checkpoint(checkpoint: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An original HREM ``model_best.pth`` (``{"model": [img_enc, txt_enc], "opt": ...}``, or the bare list) as a
    cirlab state dict, plus the keys deliberately dropped: ``bert.embeddings.position_ids`` (present or not
    depending on the transformers version that saved it) and ``bert.pooler.*`` (HREM never uses the pooler).
    ``module.`` prefixes (DataParallel, ``--multi_gpu 1``) are stripped."""
    parts = checkpoint.get("model") if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, dict) for p in parts):
        raise KeyError("HREM checkpoint: expected 'model' = [img_enc, txt_enc] state dicts")
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for prefix, part in zip(("img_enc.", "txt_enc."), parts):
        for key, value in part.items():
            key = key.removeprefix("module.")
            if key.endswith("position_ids") or key.startswith("bert.pooler."):
                ignored.append(prefix + key)
                continue
            state[prefix + key] = value
    return state, ignored


def load_original_checkpoint(model: HREM, checkpoint: Any, *, trust_pickle: bool = False) -> dict[str, list[str]]:
    """Load an original HREM checkpoint (a path or the loaded object) into ``model``; returns the report
    ``{"missing", "unexpected", "ignored", "training_only"}`` and logs every unmatched key. ``training_only``
    lists the instance module and the warm-up counter, which the original never saves (kept as built).

    The original file also pickles its argparse ``opt`` (and numpy scalars): read as data
    (:func:`cirlab.core.checkpoint.data_globals`), without ``trust_pickle``; a file pickling anything else needs it."""
    if isinstance(checkpoint, (str, Path)):
        from cirlab.core.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    state, ignored = convert_original_checkpoint(checkpoint)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "_extra_state"]
    report = {"missing": [k for k in missing if not k.startswith(_TRAINING_ONLY)],
              "unexpected": list(result.unexpected_keys), "ignored": ignored,
              "training_only": [k for k in missing if k.startswith(_TRAINING_ONLY)]}
    for kind in ("missing", "unexpected"):
        if report[kind]:
            logger.warning("HREM checkpoint: %d %s keys: %s", len(report[kind]), kind, report[kind][:10])
    if ignored:
        logger.info("HREM checkpoint: ignored %s", ignored)
    return report


@register_model("hrem", task="itm", config_cls=HREMConfig)
def build_hrem(config: HREMConfig) -> HREM:
    return HREM(config)
