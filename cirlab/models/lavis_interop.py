"""Checkpoint interop between LAVIS (``salesforce-lavis`` 1.0.2) BLIP checkpoints and cirlab's BLIP re-ranker.

LAVIS's ``blip_retrieval`` model (``lavis.models.blip_models.blip_retrieval.BlipRetrieval``) keeps the original BLIP
key layout for everything cirlab's stage I has, so the mapping rules are :mod:`cirlab.models.blip_interop`'s (this
module calls them and adds none of its own). What LAVIS adds on top, and what happens to it:

=====================================================  ========================================================
LAVIS key                                              cirlab
=====================================================  ========================================================
``visual_encoder.*`` (timm-style ViT)                  ``visual_encoder.*`` (``BlipVisionModel``) via
                                                       :func:`blip_interop.convert_stage1`
``text_encoder.*`` (MED BERT, ``XBertEncoder``)        ``text_encoder.*`` (``BlipTextModel``), same names
``vision_proj.*``, ``text_proj.*``, ``temp``           same names
``itm_head.{weight,bias}`` (``Linear(D, 2)``)          ``itm_head`` of a stage I built with ``itm_head=True``
                                                       (what the converter builds when ``keep_heads=True`` and
                                                       it makes the model); a given model without the head
                                                       gets it carried through under the same name in the
                                                       returned state dict (``report.heads``)
``visual_encoder_m.*``, ``text_encoder_m.*``,          ignored: momentum encoders (ITC distillation while
``vision_proj_m.*``, ``text_proj_m.*``                 training in LAVIS)
``image_queue``, ``text_queue``, ``idx_queue``,        ignored: ITC feature queues
``queue_ptr``
``*.embeddings.position_ids``                          ignored: a buffer
=====================================================  ========================================================

LAVIS checkpoints on disk are ``torch.save({"model": state_dict, ...})`` files (``blip_coco_retrieval.pth``,
``model_base_capfilt_large.pth``); :func:`read_lavis_checkpoint` also reads ``.safetensors`` state dicts (the test
fixtures in ``tests/fixtures/lavis/``, written by ``tools/lavis_fixtures.py`` inside the separate LAVIS environment).

Outputs, in LAVIS's terms, and how to get them from the converted cirlab model ``m`` (``ids`` = tokenizer output
with ``[CLS]`` first; ``enc_ids`` = the same with ``[ENC]`` at position 0; all verified against LAVIS by
``tests/test_lavis_parity.py``)::

    image_embeds = m.image_tokens(pixels)                       # visual_encoder.forward_features
    image_feat   = m.target_embedding(image_embeds)             # normalize(vision_proj(image_embeds[:, 0]))
    text_feat    = m.text_embedding(ids, mask)                  # normalize(text_proj(forward_text(...)[:, 0]))
    grounded     = m.compose(image_embeds, enc_ids, mask)       # text_encoder(..., encoder_hidden_states=image)
    itm_logits   = m.itm_from_hidden(grounded)                  # itm_head(grounded[:, 0]); logit 1 = match

and from raw inputs: ``m.text_features(texts)``, ``m.itm_logits(images, texts)``, ``m.encode_target(images)``.

BLIP-2 (``blip2_feature_extractor`` / ``blip2`` ``pretrain`` and ``pretrain_vitL``) is converted by
:mod:`cirlab.models._hf_blip2` into CaLa's tower and Q-Formers (:func:`cirlab.models.cala.load_lavis_blip2`);
:func:`lavis_layout` tells the two LAVIS layouts apart and :func:`lavis_blip2_sizes` reads a BLIP-2 state dict's
sizes for :class:`~cirlab.models.cala.CaLaConfig`.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlab.core.errors import MissingPathError
from cirlab.models import blip_interop

logger = logging.getLogger(__name__)

# (group, pattern) of LAVIS-only keys that cirlab deliberately drops
_LAVIS_BLIP_IGNORED = (
    ("momentum encoder", re.compile(r"(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\..*")),
    ("ITC queue", re.compile(r"(image_queue|text_queue|idx_queue|queue_ptr)")),
)
# heads LAVIS has and cirlab's stage I does not: carried through by name
_LAVIS_BLIP_HEADS = re.compile(r"itm_head\.(weight|bias)")


@dataclass
class LavisReport(blip_interop.InteropReport):
    """:class:`~cirlab.models.blip_interop.InteropReport` plus what only LAVIS has.

    ``ignored_groups``: ignored LAVIS keys by reason (momentum encoder, ITC queue, buffer); ``heads``: LAVIS head keys
    with no cirlab module, carried through unchanged in the returned state dict (or dropped, see ``keep_heads``).
    """

    ignored_groups: dict[str, list[str]] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [super().summary()]
        for group, keys in self.ignored_groups.items():
            lines.append(f"  ignored ({group}): {len(keys)} keys")
        if self.heads:
            lines.append("  carried without a cirlab module: " + ", ".join(self.heads))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ reading


def read_lavis_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LAVIS state dict from ``path``: ``.safetensors``, or a ``torch.save`` file (``{"model": sd, ...}`` or bare),
    read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MissingPathError(f"checkpoint not found: {path}")
        from safetensors.torch import load_file

        return load_file(str(path))
    return blip_interop.read_checkpoint(path)


# ------------------------------------------------------------------------------------------------------ layouts

LAVIS_PREFIX = "lavis:"  # init_from: lavis:PATH forces the LAVIS layout
# LAVIS blip_retrieval keys the original re-ranker's and BLIP's model_base.pth files do not share all of
_BLIP_MARKERS = re.compile(r"(visual_encoder_m|text_encoder_m)\..*|image_queue|text_queue|idx_queue|itm_head\.weight")


def lavis_layout(state: dict[str, torch.Tensor]) -> str | None:
    """``"blip2"`` (LAVIS ``Blip2Qformer``: ``Qformer.bert.*`` + ``query_tokens``), ``"blip_retrieval"`` (LAVIS
    ``BlipRetrieval``: a timm ViT, a MED text encoder and at least one of the momentum encoders, ITC queues or ITM
    head, and no captioning decoder), or None (not a LAVIS layout cirlab converts).

    BLIP's ``model_base.pth`` (which LAVIS also downloads) has a ``text_decoder``: it is left to
    :mod:`cirlab.models.blip_interop`, which converts it to stage I and stage II alike.
    """
    keys = list(state)
    if "query_tokens" in state and any(k.startswith("Qformer.bert.") for k in keys):
        return "blip2"
    if (any(k.startswith("visual_encoder.blocks.") for k in keys)
            and any(k.startswith("text_encoder.") for k in keys)
            and not any(k.startswith("text_decoder.") for k in keys)
            and any(_BLIP_MARKERS.fullmatch(k) for k in keys)):
        return "blip_retrieval"
    return None


def strip_lavis_prefix(path: str | os.PathLike) -> str:
    """The file a source names: ``lavis:PATH`` -> ``PATH`` (the prefix only forces the layout), others unchanged."""
    text = str(path)
    return text[len(LAVIS_PREFIX):] if text.startswith(LAVIS_PREFIX) else text


def read_lavis_layout(path: str | os.PathLike, expected: tuple[str, ...] = ("blip_retrieval", "blip2"),
                      ) -> tuple[str, dict[str, torch.Tensor]]:
    """``(layout, state dict)`` of a LAVIS checkpoint file; raises
    :class:`~cirlab.models.blip_interop.InteropError` (one line naming the file and what was expected) when the file
    is missing, unreadable or holds another layout."""
    path = Path(strip_lavis_prefix(path)).expanduser()
    want = " or ".join({"blip_retrieval": "a LAVIS blip_retrieval checkpoint (visual_encoder.blocks.*, "
                                          "text_encoder.*, visual_encoder_m.* / image_queue / itm_head.*)",
                        "blip2": "a LAVIS BLIP-2 checkpoint (Qformer.bert.*, query_tokens)"}[e] for e in expected)
    if not path.is_file():
        raise blip_interop.InteropError(f"{path}: no such file (expected {want})")
    try:
        state = blip_interop.unwrap_state_dict(read_lavis_checkpoint(path), str(path))
    except (ValueError, OSError) as err:  # safetensors / torch errors of damaged files
        raise blip_interop.InteropError(" ".join(str(err).split())) from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for files that are not safetensors
        raise blip_interop.InteropError(f"{path}: not readable ({type(err).__name__}: {err})") from None
    layout = lavis_layout(state)
    if layout not in expected:
        found = f"a LAVIS {layout} checkpoint" if layout else "keys " + ", ".join(list(state)[:3]) + ", ..."
        raise blip_interop.InteropError(f"{path}: expected {want}; found {found}")
    return layout, state


# ------------------------------------------------------------------------------------------------------ sizes


def lavis_blip_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Sizes of a LAVIS ``blip_retrieval`` state dict, read from tensor shapes (head counts are not in the shapes)."""
    sd = blip_interop.unwrap_state_dict(state)
    try:
        patch = sd["visual_encoder.patch_embed.proj.weight"]
        pos = sd["visual_encoder.pos_embed"]
        words = sd["text_encoder.embeddings.word_embeddings.weight"]
    except KeyError as err:
        raise ValueError(f"not a LAVIS BLIP state dict: no {err.args[0]}") from err
    depth = lambda prefix: 1 + max(int(m.group(1)) for k in sd  # noqa: E731
                                   if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))
    grid = math.isqrt(pos.shape[1] - 1)
    return {
        "image_size": grid * patch.shape[-1], "patch_size": patch.shape[-1], "vision_width": patch.shape[0],
        "vision_depth": depth("visual_encoder.blocks."),
        "vision_mlp": sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        "text_width": words.shape[1], "text_depth": depth("text_encoder.encoder.layer."),
        "text_intermediate": sd["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_text_len": sd["text_encoder.embeddings.position_embeddings.weight"].shape[0],
        "embed_dim": sd["vision_proj.weight"].shape[0], "vocab_size": words.shape[0],
    }


def lavis_blip_config(state: dict[str, torch.Tensor], **overrides: Any) -> Any:
    """A :class:`~cirlab.models.blip_rerank.BlipRerankConfig` matching a LAVIS BLIP state dict.

    Head counts are not visible in the shapes: the default is ``width // 64`` (BLIP base and large); pass
    ``vision_heads=`` / ``text_heads=`` for other sizes. The vocabulary size is applied by :func:`build_stage1`.
    """
    from cirlab.models.blip_rerank import BlipRerankConfig

    sizes = lavis_blip_sizes(state)
    sizes.pop("vocab_size")
    sizes.setdefault("vision_heads", max(1, sizes["vision_width"] // 64))
    sizes.setdefault("text_heads", max(1, sizes["text_width"] // 64))
    return BlipRerankConfig(**{**sizes, **overrides})


def default_heads(width: int, preset_width: int, preset_heads: int) -> int:
    """Attention heads for a width read off a state dict (head counts are not in tensor shapes): the preset's when
    its width is the same, else 16 for the LAVIS ViTs of 1024 (CLIP ViT-L) and 1408 (EVA ViT-g) channels, else
    ``width // 64`` (BERT-base, ViT-B)."""
    if width == preset_width:
        return preset_heads
    return {1024: 16, 1408: 16}.get(width, max(1, width // 64))


def lavis_blip2_sizes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """:class:`~cirlab.models.cala.CaLaConfig` size fields of a LAVIS BLIP-2 (``Blip2Qformer``) state dict, read
    from tensor shapes: the tower (``vision``: ``clip_vit`` for ``pretrain_vitL``, ``eva_vit`` for ``pretrain``) and
    the Q-Former. Head counts are not in the shapes (see :func:`default_heads`)."""
    sd = blip_interop.unwrap_state_dict(state)
    if lavis_layout(sd) != "blip2":
        raise ValueError("not a LAVIS BLIP-2 state dict: no Qformer.bert.* / query_tokens")
    layers = lambda pattern: sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})  # noqa: E731
    q = "Qformer.bert."
    cross = layers(re.escape(q) + r"encoder\.layer\.(\d+)\.crossattention\.")
    sizes: dict[str, Any] = {
        "qformer_width": sd[q + "embeddings.word_embeddings.weight"].shape[1],
        "vocab_size": sd[q + "embeddings.word_embeddings.weight"].shape[0],
        "max_text_len": sd[q + "embeddings.position_embeddings.weight"].shape[0],
        "qformer_depth": len(layers(re.escape(q) + r"encoder\.layer\.(\d+)\.")),
        "qformer_intermediate": sd[q + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        "cross_attention_freq": cross[1] - cross[0] if len(cross) > 1 else max(1, len(layers(
            re.escape(q) + r"encoder\.layer\.(\d+)\."))),
        "num_query_tokens": sd["query_tokens"].shape[1],
        "embed_dim": sd["vision_proj.weight"].shape[0],
    }
    if "visual_encoder.conv1.weight" in sd:  # LAVIS clip_vit.py (pretrain_vitL)
        conv = sd["visual_encoder.conv1.weight"]
        grid = math.isqrt(sd["visual_encoder.positional_embedding"].shape[0] - 1)
        sizes.update(vision="clip_vit", vision_width=conv.shape[0], patch_size=conv.shape[-1],
                     image_size=grid * conv.shape[-1],
                     vision_depth=len(layers(r"visual_encoder\.transformer\.resblocks\.(\d+)\.")),
                     vision_mlp=sd["visual_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    elif "visual_encoder.patch_embed.proj.weight" in sd:  # LAVIS eva_vit.py (pretrain)
        conv = sd["visual_encoder.patch_embed.proj.weight"]
        grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
        sizes.update(vision="eva_vit", vision_width=conv.shape[0], patch_size=conv.shape[-1],
                     image_size=grid * conv.shape[-1], vision_depth=len(layers(r"visual_encoder\.blocks\.(\d+)\.")),
                     vision_mlp=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0])
    return {k: int(v) if isinstance(v, int) else v for k, v in sizes.items()}


def build_stage1(config: Any, vocab_size: int | None = None) -> nn.Module:
    """:class:`BlipRerankStage1` for ``config``; the text vocabulary is resized when ``vocab_size`` differs from
    BLIP's 30,524 (``BlipRerankConfig`` has no vocabulary field; the resize is transformers'
    ``resize_token_embeddings``)."""
    from cirlab.models.blip_rerank import BlipRerankStage1

    model = BlipRerankStage1(config)
    if vocab_size is not None and vocab_size != model.text_encoder.config.vocab_size:
        model.text_encoder.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


# ------------------------------------------------------------------------------------------------------ convert


def _split_lavis_keys(state: dict[str, torch.Tensor], report: LavisReport) -> tuple[dict, dict]:
    """(keys for blip_interop, LAVIS heads); ignored keys go to the report."""
    core, heads = {}, {}
    for key, value in state.items():
        group = next((g for g, p in _LAVIS_BLIP_IGNORED if p.fullmatch(key)), None)
        if group is not None:
            report.ignored_groups.setdefault(group, []).append(key)
            report.ignored.append(key)
        elif _LAVIS_BLIP_HEADS.fullmatch(key):
            heads[key] = value
        else:
            core[key] = value
    return core, heads


def convert_lavis_blip(state: dict[str, torch.Tensor], model: nn.Module | None = None, *, config: Any = None,
                       keep_heads: bool = True, strict: bool = False,
                       source: str = "") -> tuple[dict[str, torch.Tensor], LavisReport]:
    """LAVIS ``blip_retrieval`` state dict -> cirlab stage-I state dict, and a report.

    Args:
        state: the LAVIS state dict (or a ``{"model": sd}`` container).
        model: a :class:`BlipRerankStage1` to fill in place; None builds one from ``config``, or from sizes read off
            the state dict (:func:`lavis_blip_config`, :func:`build_stage1`).
        config: a ``BlipRerankConfig`` for the model built when ``model`` is None.
        keep_heads: keep LAVIS's ITM head: a model built here (``model`` and ``config`` None) gets an ``itm_head``
            module that takes it; a given model without one gets ``itm_head.*`` in the returned state dict under
            their LAVIS names. False drops them (they are still listed in ``report.heads``).
        strict: raise :class:`~cirlab.models.blip_interop.InteropError` on unmatched, missing or mismatched keys.
        source: a name for the report.

    Returns:
        ``(state_dict, report)``: the filled model's ``state_dict()`` (plus the carried heads), which loads into a
        stage-I model of the same sizes with ``load_state_dict(..., strict=False)`` (strict once the heads are
        dropped); the report lists loaded, ignored (momentum encoders, queues, buffers), carried heads, unmatched
        and missing keys.
    """
    sd = blip_interop.unwrap_state_dict(state, source or "<state dict>")
    if model is None:
        with_head = keep_heads and "itm_head.weight" in sd
        model = build_stage1(config if config is not None else lavis_blip_config(sd, itm_head=with_head),
                             vocab_size=lavis_blip_sizes(sd)["vocab_size"])
    report = LavisReport(source=source, target="stage1")
    core, heads = _split_lavis_keys(sd, report)
    inner = blip_interop.convert_stage1(core, model, strict=False, source=source)
    report.target = inner.target or report.target
    report.loaded, report.unmatched, report.missing = inner.loaded, inner.unmatched, inner.missing
    report.mismatched = inner.mismatched
    report.ignored += inner.ignored
    if inner.ignored:
        report.ignored_groups["buffer"] = list(inner.ignored)
    own = model.state_dict()
    for key in [k for k in sorted(heads) if k in own]:  # a stage I built with an ITM head takes it directly
        value = heads.pop(key)
        if tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
            continue
        with torch.no_grad():
            model.get_parameter(key).copy_(value)
        report.loaded.append(key)
        if key in report.missing:  # blip_interop's stage-I map does not know the head
            report.missing.remove(key)
    report.heads = sorted(heads)
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if keep_heads:
        out.update({k: v.detach().clone() for k, v in heads.items()})
    if strict and not report.ok:
        raise blip_interop.InteropError(report.summary())
    return out, report


def load_lavis_blip(path: str | os.PathLike, model: nn.Module | None = None, *, config: Any = None,
                    strict: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor], LavisReport]:
    """Read a LAVIS BLIP checkpoint and convert it: ``(stage-I model, LAVIS heads, report)``.

    A model built here (``model`` and ``config`` None) has an ``itm_head`` holding LAVIS's; with a given model or
    config without one, the heads (``itm_head.weight`` / ``itm_head.bias``) come back separately and
    :func:`itm_head` builds the ``Linear`` from them.
    """
    sd = blip_interop.unwrap_state_dict(read_lavis_checkpoint(path), str(path))
    if model is None:
        model = build_stage1(config if config is not None
                             else lavis_blip_config(sd, itm_head="itm_head.weight" in sd),
                             vocab_size=lavis_blip_sizes(sd)["vocab_size"])
    out, report = convert_lavis_blip(sd, model, strict=strict, source=str(path))
    report.log()
    return model, {k: out[k] for k in report.heads if k in out}, report


# ------------------------------------------------------------------------------------------------------ export


def export_lavis_blip(model: nn.Module, *, heads: dict[str, torch.Tensor] | None = None,
                      momentum: bool = True) -> dict[str, torch.Tensor]:
    """cirlab stage I -> a LAVIS ``blip_retrieval`` state dict (``{"model": <this>}`` is what LAVIS's
    ``load_checkpoint`` reads).

    Args:
        model: a :class:`BlipRerankStage1`.
        heads: LAVIS heads to write (``itm_head.*``, e.g. from :func:`load_lavis_blip`); a model attribute
            ``itm_head`` is exported by :func:`blip_interop.export_stage1` on its own.
        momentum: also write the momentum encoders as copies of the main ones (what LAVIS's ``copy_params`` does
            at construction); without them LAVIS keeps its random momentum initialisation. The ITC queues are never
            written: LAVIS then keeps its freshly initialised ones.
    """
    out = blip_interop.export_stage1(model)
    for key, value in (heads or {}).items():
        if not _LAVIS_BLIP_HEADS.fullmatch(key):
            raise KeyError(f"not a LAVIS BLIP head key: {key}")
        out[key] = value.detach().clone()
    if momentum:
        for key in list(out):
            prefix, _, rest = key.partition(".")
            if prefix in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                out[f"{prefix}_m.{rest}"] = out[key].clone()
    return out


# ------------------------------------------------------------------------------------------------------ heads


def itm_head(heads: dict[str, torch.Tensor]) -> nn.Linear:
    """``Linear(D, 2)`` holding LAVIS's ITM head (logit 1 = match)."""
    weight, bias = heads["itm_head.weight"], heads["itm_head.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """LAVIS's text-only ITC feature ``normalize(text_proj(text_encoder.forward_text(ids)[:, 0]))`` on cirlab's
    stage I: the text encoder without image (no cross-attention), ``[CLS]`` first; [B, embed_dim]
    (:meth:`BlipRerankStage1.text_embedding`)."""
    return model.text_embedding(input_ids, attention_mask)


# ------------------------------------------------------------------------------------------------------ configs


def changed_fields(config: Any, base: Any) -> dict[str, Any]:
    """The fields of ``config`` whose values differ from ``base``'s (a preset): a converted model's model_overrides."""
    ours, theirs = config.to_dict(), base.to_dict()
    return {k: v for k, v in ours.items() if v != theirs.get(k)}


def stage1_config_from(state: dict[str, torch.Tensor], preset: str = "cirr", *, itm_head: bool = False,
                       **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """``(BlipRerankConfig, model_overrides)`` for a LAVIS ``blip_retrieval`` state dict: ``preset``'s fields with
    the sizes read off the tensors (:func:`lavis_blip_sizes`; heads: :func:`default_heads`), then ``overrides``.
    ``model_overrides`` are the fields that differ from the preset (what a run config needs to rebuild it)."""
    from cirlab.models._hf_blip import MED_VOCAB_SIZE
    from cirlab.models.blip_rerank import BlipRerankConfig

    base = BlipRerankConfig.from_preset(preset)
    sizes = lavis_blip_sizes(state)
    vocab = sizes.pop("vocab_size")
    sizes["vision_heads"] = default_heads(sizes["vision_width"], base.vision_width, base.vision_heads)
    sizes["text_heads"] = default_heads(sizes["text_width"], base.text_width, base.text_heads)
    sizes["vocab_size"] = 0 if vocab == MED_VOCAB_SIZE else vocab
    config = BlipRerankConfig.from_preset(preset, **{**sizes, "itm_head": itm_head, **overrides})
    return config, changed_fields(config, base)


def cala_config_from(state: dict[str, torch.Tensor], preset: str = "cirr",
                     **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """``(CaLaConfig, model_overrides)`` for a LAVIS BLIP-2 state dict: ``preset``'s fields (loss, frame, lr, ...)
    with the tower and Q-Former sizes read off the tensors (:func:`lavis_blip2_sizes`; heads:
    :func:`default_heads`; ``qformer_init`` random, since every Q-Former weight comes from the checkpoint), then
    ``overrides``; ``model_overrides`` are the fields that differ from the preset."""
    from cirlab.models.cala import CaLaConfig

    base = CaLaConfig.from_preset(preset)
    sizes = lavis_blip2_sizes(state)
    if "vision" in sizes:
        sizes["vision_heads"] = default_heads(sizes["vision_width"], base.vision_width, base.vision_heads)
    sizes["qformer_heads"] = default_heads(sizes["qformer_width"], base.qformer_width, base.qformer_heads)
    config = CaLaConfig.from_preset(preset, **{**sizes, "qformer_init": "random", **overrides})
    return config, changed_fields(config, base)
