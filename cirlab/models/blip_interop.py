"""Checkpoint interop between the original BLIP / Candidate-Reranking key layouts and cirlab's modules.

Original layouts (digest ``rerank_cala.md`` A.2, A.3, A.6; BLIP ``vit.py`` / ``med.py`` and the re-ranking
``nlvr_encoder.py`` / ``blip_stage2.py``), written down here as the contract the tests generate state dicts from:

**ViT** (``visual_encoder.``; timm-style ``VisionTransformer``) -> transformers ``BlipVisionModel``::

    cls_token [1,1,D]                  -> embeddings.class_embedding
    pos_embed [1,1+P,D]                -> embeddings.position_embedding   (bicubic-resized when P differs)
    patch_embed.proj.{weight,bias}     -> embeddings.patch_embedding.{weight,bias}
    blocks.{i}.norm1.*                 -> encoder.layers.{i}.layer_norm1.*
    blocks.{i}.attn.qkv.*              -> encoder.layers.{i}.self_attn.qkv.*      (same [3D, D] q/k/v order)
    blocks.{i}.attn.proj.*             -> encoder.layers.{i}.self_attn.projection.*
    blocks.{i}.norm2.*                 -> encoder.layers.{i}.layer_norm2.*
    blocks.{i}.mlp.fc{1,2}.*           -> encoder.layers.{i}.mlp.fc{1,2}.*
    norm.*                             -> post_layernorm.*

**MED BERT** (``text_encoder.``) has transformers ``BlipTextModel``'s names already (``embeddings.word_embeddings``,
``embeddings.position_embeddings``, ``embeddings.LayerNorm``, ``encoder.layer.{i}.{attention,crossattention}.
{self.{query,key,value},output.{dense,LayerNorm}}``, ``encoder.layer.{i}.intermediate.dense``,
``encoder.layer.{i}.output.{dense,LayerNorm}``); ``embeddings.position_ids`` is a buffer and ignored.

**Files**:

* BLIP pre-trained ``model_base.pth``: ``{"model": sd}`` with ``visual_encoder.*``, ``text_encoder.*``,
  ``vision_proj``, ``text_proj``, ``temp`` plus pre-training parts stage I does not use (``text_decoder.*``,
  momentum ``*_m.*`` encoders, queues, ``itm_head``), which are reported as unmatched.
* Stage I (``blip.pt`` / ``blip_mean.pt``): ``{"epoch", "BLIP_Retrieval": sd, "optimizer_state_dict"}``, sd with
  ``visual_encoder.*``, ``text_encoder.*``, ``vision_proj.*``, ``text_proj.*``, ``temp``.
* Stage II: ``{"epoch", "BLIP_NLVR": sd, ...}``, sd with ``visual_encoder.*``, ``text_encoder.embeddings.*`` and
  per layer ``text_encoder.encoder.layer.{i}.``::

      {attention,crossattention}.self{0,1}.{query,key,value}.*   -> text_encoder.layers.{i}.{...}.{0,1}.self.*
      {attention,crossattention}.output.dense{0,1}.*             -> text_encoder.layers.{i}.{...}.{0,1}.output.dense.*
      {attention,crossattention}.output.LayerNorm{A,B}.*  -> text_encoder.layers.{i}.{...}.{0,1}.output.LayerNorm.*
      crossattention.output.merge_layer.*  (layers >= 6)         -> text_encoder.layers.{i}.merge.*
      intermediate.dense.*, output.{dense,LayerNorm}.*  (shared) -> text_encoder.layers.{i}.(same)

  and ``cls_head.{0,2}.*``. Loading ``model_base.pth`` into stage II copies every single-stream attention weight
  to both streams, as the original ``load_checkpoint`` does (merge layers and ``cls_head`` stay random).

Every conversion returns an :class:`InteropReport` listing loaded, unmatched (source keys with no destination),
missing (destination keys left untouched), shape-mismatched and ignored keys; ``strict=True`` raises on any
unmatched, missing or mismatched key.
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

logger = logging.getLogger(__name__)

_IGNORED = (re.compile(r".*embeddings\.position_ids$"),)
_CONTAINER_KEYS = ("BLIP_NLVR", "BLIP_Retrieval", "model", "state_dict", "model_state_dict")

_VIT_RULES = [  # (original regex, cirlab template)
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]


@dataclass
class InteropReport:
    """What a conversion did; ``ok`` when every source key found a home and every destination key was filled."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)  # destination keys written
    unmatched: list[str] = field(default_factory=list)  # source keys with no destination
    missing: list[str] = field(default_factory=list)  # destination keys not in the source
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (dest key, source shape, dest shape)
    ignored: list[str] = field(default_factory=list)  # buffers deliberately skipped (position_ids)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.missing or self.mismatched)

    def summary(self) -> str:
        head = (f"{self.source or 'state dict'}: loaded {len(self.loaded)}, unmatched {len(self.unmatched)}, "
                f"missing {len(self.missing)}, shape-mismatched {len(self.mismatched)}, ignored {len(self.ignored)}")
        parts = [head]
        for name, keys in (("unmatched", self.unmatched), ("missing", self.missing)):
            if keys:
                parts.append(f"  {name}: " + ", ".join(keys))
        for key, src, dst in self.mismatched:
            parts.append(f"  shape mismatch {key}: checkpoint {list(src)} vs model {list(dst)}")
        return "\n".join(parts)

    def log(self) -> "InteropReport":
        (logger.info if self.ok else logger.warning)("%s", self.summary())
        return self


class InteropError(ValueError):
    """A strict conversion found unmatched, missing or shape-mismatched keys (the message lists all of them)."""


# ------------------------------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and return its model state dict.

    Unwraps the original containers (``BLIP_NLVR``, ``BLIP_Retrieval``, ``model``) and cirlab's (``model``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for refused or damaged files
        raise ValueError(f"{path}: cannot load with weights_only=True ({type(err).__name__}: {err})") from err
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{source}: no state dict found (expected one of {list(_CONTAINER_KEYS)} or a bare state dict)")


# ------------------------------------------------------------------------------------------------------ key maps


def vit_key_to_cirlab(key: str) -> str | None:
    """Original ViT key (without ``visual_encoder.``) -> ``BlipVisionModel`` key; None when unknown."""
    for pattern, template in _VIT_RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


_VIT_INVERSE = [  # (cirlab regex, original template): the rows of _VIT_RULES read backwards
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]


def vit_key_to_original(key: str) -> str | None:
    """Inverse of :func:`vit_key_to_cirlab`."""
    for pattern, template in _VIT_INVERSE:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


_STREAM = {"0": "0", "1": "1", "A": "0", "B": "1"}


def stage2_text_key_to_cirlab(key: str) -> list[str] | None:
    """Original stage-II (or single-stream MED) text key (without ``text_encoder.``) -> cirlab keys.

    A single-stream key (``attention.self.query.weight`` from ``model_base.pth``) maps to both streams.
    """
    if key.startswith("embeddings."):
        return [key]
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = m.groups()
    prefix = f"layers.{i}."
    m = re.fullmatch(r"(attention|crossattention)\.(?:self([01]?))\.(query|key|value)\.(weight|bias)", rest)
    if m:
        att, s, proj, p = m.groups()
        return [f"{prefix}{att}.{t}.self.{proj}.{p}" for t in ([s] if s else ["0", "1"])]
    m = re.fullmatch(r"(attention|crossattention)\.output\.dense([01]?)\.(weight|bias)", rest)
    if m:
        att, s, p = m.groups()
        return [f"{prefix}{att}.{t}.output.dense.{p}" for t in ([s] if s else ["0", "1"])]
    m = re.fullmatch(r"(attention|crossattention)\.output\.LayerNorm([AB]?)\.(weight|bias)", rest)
    if m:
        att, s, p = m.groups()
        return [f"{prefix}{att}.{t}.output.LayerNorm.{p}" for t in ([_STREAM[s]] if s else ["0", "1"])]
    m = re.fullmatch(r"crossattention\.output\.merge_layer\.(weight|bias)", rest)
    if m:
        return [f"{prefix}merge.{m.group(1)}"]
    if re.fullmatch(r"(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)", rest):
        return [prefix + rest]
    return None


def stage2_text_key_to_original(key: str) -> str | None:
    """cirlab dual-stream key (without ``text_encoder.``) -> original stage-II key."""
    if key.startswith("embeddings."):
        return key
    m = re.fullmatch(r"layers\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = m.groups()
    prefix = f"encoder.layer.{i}."
    m = re.fullmatch(r"(attention|crossattention)\.([01])\.self\.(.*)", rest)
    if m:
        return f"{prefix}{m.group(1)}.self{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"(attention|crossattention)\.([01])\.output\.dense\.(.*)", rest)
    if m:
        return f"{prefix}{m.group(1)}.output.dense{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"(attention|crossattention)\.([01])\.output\.LayerNorm\.(.*)", rest)
    if m:
        return f"{prefix}{m.group(1)}.output.LayerNorm{'AB'[int(m.group(2))]}.{m.group(3)}"
    m = re.fullmatch(r"merge\.(.*)", rest)
    if m:
        return f"{prefix}crossattention.output.merge_layer.{m.group(1)}"
    return prefix + rest


# ------------------------------------------------------------------------------------------------------ helpers


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic resize of a [1, 1+P, D] ViT position embedding to ``num_tokens`` (BLIP's ``interpolate_pos_embed``)."""
    if pos.shape[1] == num_tokens:
        return pos
    old, new = int(math.isqrt(pos.shape[1] - 1)), int(math.isqrt(num_tokens - 1))
    if old * old != pos.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(f"cannot resize a position embedding of {pos.shape[1]} tokens to {num_tokens}")
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    logger.info("resized the ViT position embedding from %dx%d to %dx%d", old, old, new, new)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)


def _assign(target: dict[str, torch.Tensor], report: InteropReport, dest: str, value: torch.Tensor) -> None:
    if dest not in target:
        report.unmatched.append(dest)
        return
    if dest.endswith("position_embedding") and value.dim() == 3 and value.shape != target[dest].shape:
        value = resize_pos_embed(value, target[dest].shape[1])
    if tuple(value.shape) != tuple(target[dest].shape):
        report.mismatched.append((dest, tuple(value.shape), tuple(target[dest].shape)))
        return
    with torch.no_grad():
        target[dest].copy_(value.to(target[dest].dtype))
    report.loaded.append(dest)


def _finish(module: nn.Module, target: dict[str, torch.Tensor], report: InteropReport, strict: bool,
            scope: tuple[str, ...] = ("",)) -> InteropReport:
    done = set(report.loaded)
    report.missing = [k for k in target if k not in done and k.startswith(scope)
                      and not any(p.fullmatch(k) for p in _IGNORED)]
    if strict and not report.ok:
        raise InteropError(report.summary())
    return report


def _vit(src_key: str, value: torch.Tensor, dest_prefix: str, target: dict, report: InteropReport) -> bool:
    if not src_key.startswith("visual_encoder."):
        return False
    dest = vit_key_to_cirlab(src_key[len("visual_encoder."):])
    if dest is None:
        report.unmatched.append(src_key)
    else:
        _assign(target, report, dest_prefix + dest, value)
    return True


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True)) | {k: v for k, v in module.named_parameters()}


# ------------------------------------------------------------------------------------------------------ stage I


def convert_stage1(state: dict[str, torch.Tensor], model: nn.Module, *, strict: bool = False,
                   source: str = "") -> InteropReport:
    """Load an original-layout state dict (``model_base.pth`` or a stage-I file) into :class:`BlipRerankStage1`."""
    target = _params(model)
    report = InteropReport(source=source)
    for key, value in state.items():
        if any(p.fullmatch(key) for p in _IGNORED):
            report.ignored.append(key)
        elif _vit(key, value, "visual_encoder.", target, report):
            pass
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")) or key == "temp":
            if key in target:
                _assign(target, report, key, value.reshape(target[key].shape) if key == "temp" else value)
            else:
                report.unmatched.append(key)
        else:
            report.unmatched.append(key)
    return _finish(model, target, report, strict)


def export_stage1(model: nn.Module) -> dict[str, torch.Tensor]:
    """cirlab stage I -> the original ``BLIP_Retrieval`` state dict."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual_encoder."):
            orig = vit_key_to_original(key[len("visual_encoder."):])
            if orig is None:
                raise KeyError(f"no original name for {key}")
            out["visual_encoder." + orig] = value.clone()
        else:
            out[key] = value.clone()
    return out


# ------------------------------------------------------------------------------------------------------ stage II


def convert_stage2(state: dict[str, torch.Tensor], model: nn.Module, *, strict: bool = False,
                   source: str = "") -> InteropReport:
    """Load an original stage-II file (``BLIP_NLVR``) or ``model_base.pth`` into :class:`BlipRerankStage2`.

    The ViT goes to ``model.stage1.visual_encoder`` (the stage-II ViT is the same frozen BLIP encoder). Only stage
    II's own keys (``text_encoder.*``, ``cls_head.*``) and the ViT count as missing; the stage-I text encoder is
    loaded separately (:func:`convert_stage1` on ``model.stage1``).
    """
    target = _params(model)
    report = InteropReport(source=source)
    for key, value in state.items():
        if any(p.fullmatch(key) for p in _IGNORED):
            report.ignored.append(key)
        elif _vit(key, value, "stage1.visual_encoder.", target, report):
            pass
        elif key.startswith("text_encoder."):
            dests = stage2_text_key_to_cirlab(key[len("text_encoder."):])
            if dests is None:
                report.unmatched.append(key)
            for dest in dests or []:
                _assign(target, report, "text_encoder." + dest, value)
        elif key.startswith("cls_head.") and key in target:
            _assign(target, report, key, value)
        else:
            report.unmatched.append(key)
    return _finish(model, target, report, strict, scope=("text_encoder.", "cls_head.", "stage1.visual_encoder."))


def export_stage2(model: nn.Module) -> dict[str, torch.Tensor]:
    """cirlab stage II -> the original ``BLIP_NLVR`` state dict (ViT, twin text encoder, cls_head)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("stage1.visual_encoder."):
            out["visual_encoder." + vit_key_to_original(key[len("stage1.visual_encoder."):])] = value.clone()
        elif key.startswith("text_encoder."):
            orig = stage2_text_key_to_original(key[len("text_encoder."):])
            if orig is not None and not orig.endswith("position_ids"):
                out["text_encoder." + orig] = value.clone()
        elif key.startswith("cls_head."):
            out[key] = value.clone()
    return out


def load_original_checkpoint(path: str | os.PathLike, model: nn.Module, *, strict: bool = False) -> InteropReport:
    """Read ``path`` (``weights_only=True``) and convert it into a stage-I or stage-II cirlab model."""
    from cirlab.models.blip_rerank import BlipRerankStage2

    state = read_checkpoint(path)
    convert = convert_stage2 if isinstance(model, BlipRerankStage2) else convert_stage1
    return convert(state, model, strict=strict, source=str(path)).log()
