"""Checkpoint interop between the original BLIP / Candidate-Reranking key layouts, transformers' BLIP and cirlab.

Layouts of BLIP (https://github.com/salesforce/BLIP: ``models/vit.py``, ``models/med.py``) and of the two-stage
re-ranker of Liu et al., TMLR 2024 (https://github.com/Cuberick-Orion/Candidate-Reranking-CIR:
``src/blip_stage1.py``, ``src/blip_stage2.py``, ``src/nlvr_encoder.py``), written down here as the contract the tests
generate state dicts from. This module knows key names only; it never imports a cirlab model (the models import it).

**ViT** (``visual_encoder.``; timm-style ``VisionTransformer``) <-> transformers ``BlipVisionModel``, one table
(:data:`VIT_NAMES`) read in both directions::

    cls_token [1,1,D]                  <-> embeddings.class_embedding
    pos_embed [1,1+P,D]                <-> embeddings.position_embedding   (bicubic-resized when P differs)
    patch_embed.proj.{weight,bias}     <-> embeddings.patch_embedding.{weight,bias}
    blocks.{i}.norm1.*                 <-> encoder.layers.{i}.layer_norm1.*
    blocks.{i}.attn.qkv.*              <-> encoder.layers.{i}.self_attn.qkv.*      (same [3D, D] q/k/v order)
    blocks.{i}.attn.proj.*             <-> encoder.layers.{i}.self_attn.projection.*
    blocks.{i}.norm2.*                 <-> encoder.layers.{i}.layer_norm2.*
    blocks.{i}.mlp.fc{1,2}.*           <-> encoder.layers.{i}.mlp.fc{1,2}.*
    norm.*                             <-> post_layernorm.*

**MED BERT** (``text_encoder.``) has transformers ``BlipTextModel``'s names already (``embeddings.word_embeddings``,
``embeddings.position_embeddings``, ``embeddings.LayerNorm``, ``encoder.layer.{i}.{attention,crossattention}.
{self.{query,key,value},output.{dense,LayerNorm}}``, ``encoder.layer.{i}.intermediate.dense``,
``encoder.layer.{i}.output.{dense,LayerNorm}``); ``embeddings.position_ids`` is a buffer and ignored.

**Sources** (:func:`read_pretrained` recognises each by its keys, never by its file name):

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
* A transformers BLIP folder (``save_pretrained`` layout: ``config.json`` with ``model_type: blip`` plus
  ``model.safetensors`` / ``pytorch_model.bin``, possibly sharded), e.g. ``BlipForImageTextRetrieval``:
  ``vision_model.*`` (``BlipVisionModel`` names), ``text_encoder.*`` (MED names), ``vision_proj``, ``text_proj``,
  ``itm_head``. It is read into the original layout (``vision_model.X`` -> ``visual_encoder.<original X>``), so one
  converter serves both; it has no ``temp``, which is then reported missing.
* A cirlab run folder (``checkpoints/best.pt``) or checkpoint: cirlab's own names, loaded as they are.
* LAVIS ``blip_retrieval`` checkpoints (``{"model": sd}``, or a ``.safetensors`` state dict) keep the original
  layout: they load as BLIP files do (momentum encoders and queues reported unmatched); see
  :mod:`cirlab.models.lavis_interop` for LAVIS's own report.

Every conversion returns an :class:`InteropReport` listing loaded, unmatched (source keys with no destination),
missing (destination keys left untouched), shape-mismatched and ignored keys; ``strict=True`` raises on any
unmatched, missing or mismatched key. A model's pretrained start (:func:`check_usable` given the model) also refuses
a source that leaves tensors untouched which it should hold (:class:`PartialLoadError`, naming the frozen ones):
only the layers :data:`NEW_LAYERS` declares new per target start random without a switch; the original code's
``load_state_dict(strict=False)`` is the model configs' ``init_partial=True``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlab.core.errors import CirlabError, MissingPathError

logger = logging.getLogger(__name__)

_IGNORED = (re.compile(r".*embeddings\.position_ids$"),)
_CONTAINER_KEYS = ("BLIP_NLVR", "BLIP_Retrieval", "model", "state_dict", "model_state_dict")

# (original BLIP vit.py name, transformers BlipVisionModel name); "{i}" a block index, "{p}" weight|bias
VIT_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.{fc}.{p}", "encoder.layers.{i}.mlp.{fc}.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
_FIELDS = {"i": r"\d+", "p": r"weight|bias", "fc": r"fc[12]"}


def _compile(template: str) -> re.Pattern:
    """``"blocks.{i}.norm1.{p}"`` -> a regex with one named group per field."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(s) if j % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for j, s in enumerate(parts)))


_VIT_TO_CIRLAB = [(_compile(orig), ours) for orig, ours in VIT_NAMES]
_VIT_TO_ORIGINAL = [(_compile(ours), orig) for orig, ours in VIT_NAMES]


@dataclass
class InteropReport:
    """What a conversion did; ``ok`` when every source key found a home and every destination key was filled."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)  # destination keys written
    unmatched: list[str] = field(default_factory=list)  # source keys with no destination
    missing: list[str] = field(default_factory=list)  # destination keys not in the source
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (dest key, source shape, dest shape)
    ignored: list[str] = field(default_factory=list)  # buffers deliberately skipped (position_ids)
    target: str = ""  # what was loaded: "stage1", "stage2", "stage2 <- stage1 text encoder", ...
    ignored_why: str = ""  # why the ignored keys are not loaded, said with their count
    missing_why: str = ""  # set when the missing keys are expected (parts the source never has): said, not warned

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.missing or self.mismatched)

    def summary(self) -> str:
        into = f" -> {self.target}" if self.target else ""
        head = (f"{self.source or 'state dict'}{into}: loaded {len(self.loaded)}, unmatched {len(self.unmatched)}, "
                f"missing {len(self.missing)}" + (f" ({self.missing_why})" if self.missing and self.missing_why else "")
                + f", shape-mismatched {len(self.mismatched)}, ignored {len(self.ignored)}"
                + (f" ({self.ignored_why})" if self.ignored and self.ignored_why else ""))
        parts = [head]
        for name, keys in (("unmatched", self.unmatched), ("missing", self.missing)):
            if keys:  # model_base.pth has hundreds of unmatched keys: the full lists are in to_dict()
                more = f", ... ({len(keys) - 12} more)" if len(keys) > 12 else ""
                parts.append(f"  {name}: " + ", ".join(keys[:12]) + more)
        for key, src, dst in self.mismatched[:12]:  # a wrong preset mismatches every layer: a sample says it
            parts.append(f"  shape mismatch {key}: checkpoint {list(src)} vs model {list(dst)}")
        if len(self.mismatched) > 12:
            parts.append(f"  ... ({len(self.mismatched) - 12} more shape mismatches)")
        return "\n".join(parts)

    def log(self) -> "InteropReport":
        """Log the summary: a warning when model weights stay as they were (missing) or did not fit (mismatched);
        unmatched source keys are routine (``model_base.pth``'s decoder, momentum encoders and queues)."""
        unexpected = (self.missing and not self.missing_why) or self.mismatched
        (logger.warning if unexpected else logger.info)("%s", self.summary())
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every key list in full (the run folder's ``init_from.json``)."""
        out = asdict(self)
        out["mismatched"] = [{"key": k, "checkpoint": list(s), "model": list(d)} for k, s, d in self.mismatched]
        return out


class InteropError(ValueError):
    """A conversion cannot be used: a strict one found unmatched, missing or shape-mismatched keys, or the file
    holds no BLIP weights (the message names the file)."""


class PartialLoadError(InteropError, CirlabError):
    """A non-strict pretrained load left tensors untouched that its source should have held (a captioning folder
    for a retrieval model, a CLIP file without its image tower): refused unless the model config's
    ``init_partial`` is set. One line (the command line prints it so); the callers prefix the config field."""


# ------------------------------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and return its model state dict.

    Unwraps the original containers (``BLIP_NLVR``, ``BLIP_Retrieval``, ``model``) and cirlab's (``model``).
    """
    return unwrap_state_dict(_load(Path(path)), str(path))


def _load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` as every cirlab command loads a checkpoint: a file that is no checkpoint
    (a README, an HTML page, an LFS pointer) is said to be what it is
    (:func:`cirlab.core.checkpoint.load_checkpoint`); a ValueError (:class:`InteropError`) like every refusal here,
    a FileNotFoundError when there is no file."""
    from cirlab.core.checkpoint import CheckpointError, load_checkpoint

    if not path.is_file():
        raise MissingPathError(f"checkpoint not found: {path}")
    try:  # the converters have no trust_pickle: what works instead
        return load_checkpoint(path, trust_hint="re-save its weights alone (torch.save(state_dict, path)) to convert "
                                                "them")
    except CheckpointError as err:
        raise InteropError(str(err)) from None


def unwrap_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The state dict inside a BLIP / LAVIS file (:func:`cirlab.core.checkpoint.find_state_dict`); ValueError."""
    from cirlab.core.checkpoint import find_state_dict

    state = find_state_dict(obj, _CONTAINER_KEYS)
    if state is not None:
        return state
    parts = obj.get("model") if isinstance(obj, dict) else None
    if isinstance(parts, (list, tuple)) and parts and all(isinstance(p, dict) for p in parts):
        # DIME's model_best.pth.tar (3 state dicts) or HREM's model_best.pth (2): their own models read them
        raise ValueError(f"{source}: 'model' holds {len(parts)} state dicts, as DIME's and HREM's original files do; "
                         "cirlab convert handles the re-ranker's and CaLa's: read this one with `cirlab eval "
                         f"{source} --model dime|hrem --preset PRESET`, or train from it with "
                         "--set model_overrides.init_from=FILE")
    raise ValueError(f"{source}: no state dict found (expected one of {list(_CONTAINER_KEYS)} or a bare state dict)")


@dataclass
class Pretrained:
    """A state dict read by :func:`read_pretrained`, in the original BLIP layout or in cirlab's."""

    kind: str  # "original" (BLIP / released stage files) | "transformers" (read into the original layout) | "cirlab"
    state: dict[str, torch.Tensor]
    source: str  # the path, for reports and errors
    model_name: str = ""  # cirlab checkpoints: the model that wrote it


def read_pretrained(path: str | os.PathLike) -> Pretrained:
    """Read any supported BLIP source (see the module docstring); an unsupported one raises :class:`InteropError`
    naming it, in one line."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "checkpoints" / "best.pt").is_file():  # a cirlab run folder
            return read_pretrained(path / "checkpoints" / "best.pt")
        if (path / "config.json").is_file():
            return Pretrained("transformers", transformers_to_original(read_transformers_folder(path)), str(path))
        cala = " (it holds CaLa's tuned_blip_*.pt files: convert them with --model cala)" if any(
            path.glob("tuned_blip_*.pt")) else ""
        raise InteropError(f"{path}: neither a cirlab run (checkpoints/best.pt) nor a transformers BLIP folder "
                           f"(config.json + model.safetensors){cala}")
    if not path.exists():
        raise InteropError(f"{path}: no such file or folder")
    try:
        obj = _read_weights(path) if path.suffix == ".safetensors" else _load(path)
        state = unwrap_state_dict(obj, str(path))
    except ValueError as err:
        raise InteropError(str(err)) from None
    kind, name = _layout(state)
    held = obj.get("model_name") if isinstance(obj, dict) else None
    if kind is None and held:  # a cirlab checkpoint of another model (an AMC run): say so, not its first keys
        raise InteropError(f"{path} holds {held}; BLIP sources are BLIP / LAVIS / transformers files and cirlab "
                           "blip_rerank runs")
    if kind is None:
        keys = ", ".join(list(state)[:4])
        raise InteropError(f"{path}: not a BLIP checkpoint (expected visual_encoder.blocks.* (BLIP), vision_model.* "
                           f"(transformers) or cirlab blip_rerank keys; found {keys}, ...)")
    if kind == "cirlab":
        name = str(obj.get("model_name") or name) if isinstance(obj, dict) else name
    if kind == "transformers":
        state = transformers_to_original(state)
    return Pretrained(kind, state, str(path), name)


def _layout(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    keys = list(state)
    if any(k.startswith(("visual_encoder.blocks.", "visual_encoder.cls_token")) for k in keys):
        return "original", ""
    if any(k.startswith("vision_model.") for k in keys):
        return "transformers", ""
    if any(k.startswith("stage1.visual_encoder.") for k in keys):
        return "cirlab", "blip_rerank_stage2"
    if any(k.startswith("visual_encoder.encoder.layers.") for k in keys):
        return "cirlab", "blip_rerank_stage1"
    return None, ""


def read_transformers_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a transformers BLIP folder (``save_pretrained`` layout), without building the model."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "blip":
        raise InteropError(f"{folder / 'config.json'}: model_type is {config.get('model_type')!r}, not 'blip'")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_weights(folder / shard).items()}
        if (folder / single).is_file():
            return _read_weights(folder / single)
    raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin next to config.json")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    return read_checkpoint(path)


def transformers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BLIP names -> the original layout (``vision_model.X`` -> ``visual_encoder.<vit.py name>``);
    text encoder and projections keep their names, anything else passes through (and is reported unmatched)."""
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            orig = vit_key_to_original(key[len("vision_model."):])
            out["visual_encoder." + orig if orig else key] = value
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------ key maps


def _translate(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def vit_key_to_cirlab(key: str) -> str | None:
    """Original ViT key (without ``visual_encoder.``) -> ``BlipVisionModel`` key; None when unknown."""
    return _translate(key, _VIT_TO_CIRLAB)


def vit_key_to_original(key: str) -> str | None:
    """Inverse of :func:`vit_key_to_cirlab` (the same table, read backwards)."""
    return _translate(key, _VIT_TO_ORIGINAL)


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


def _finish(target: dict[str, torch.Tensor], report: InteropReport, strict: bool,
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


# Destination keys that a pretrained source is NOT expected to hold, per report target: layers the model adds on top
# of every supported source, started at random as the original code starts them. Any other key a non-strict load
# leaves untouched is refused by check_usable unless the model's config sets init_partial. A declared set, not a
# count: a partial file that happens to miss few tensors is refused as firmly as one that misses a whole tower.
_TWIN_NEW = ((r"text_encoder\.layers\.\d+\.merge\.(weight|bias)", r"cls_head\.\d+\.(weight|bias)"),
             "stage II's merge layers and cls_head: new, random as the original starts them")
NEW_LAYERS: dict[str, tuple[tuple[str, ...], str]] = {
    # transformers' BlipForImageTextRetrieval has no ITC temperature: it starts at temp_init, as BLIP's does
    "stage1": ((r"temp",), "temp: not in transformers BLIP folders, starts at temp_init"),
    "stage2": _TWIN_NEW,  # model_base.pth / an ITM folder / LAVIS: the single-stream MED feeds both streams
    "stage2 streams": _TWIN_NEW,  # init_from: stage1
    # "cala clip": none (the default): an OpenAI / open_clip RN file holds every tensor of the CLIP
}
PARTIAL_OPTION = "init_partial"  # the model config field that allows a partial start (BlipRerankConfig, CaLaConfig)


def explain_missing(report: InteropReport) -> list[str]:
    """The missing keys of ``report`` that its target's source should have held (not in :data:`NEW_LAYERS`); when
    there are none, the expected ones are explained in ``report.missing_why`` (said, not warned)."""
    patterns, why = NEW_LAYERS.get(report.target, ((), ""))
    unexpected = [k for k in report.missing if not any(re.fullmatch(p, k) for p in patterns)]
    if report.missing and not unexpected and not report.missing_why:
        report.missing_why = why
    return unexpected


def group_keys(keys: list[str], limit: int = 4) -> str:
    """``text_encoder.* (58), temp`` / ``clip.visual.layer4.* (24)``: keys grouped by module prefix, for one line."""
    if not keys:
        return ""
    parts = [k.split(".") for k in keys]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    depth = common if common >= 2 else common + 1
    groups: dict[str, int] = {}
    for p in parts:
        name = ".".join(p[:depth]) + (".*" if len(p) > depth else "")
        groups[name] = groups.get(name, 0) + 1
    shown = [f"{name} ({n})" if name.endswith("*") else name for name, n in list(groups.items())[:limit]]
    more = f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else ""
    return ", ".join(shown) + more


def _frozen_keys(model: nn.Module) -> set[str]:
    """Keys that never train: parameters with ``requires_grad=False`` and buffers."""
    return ({k for k, p in model.named_parameters() if not p.requires_grad}
            | {k for k, _ in model.named_buffers()})


def check_complete(report: InteropReport, model: nn.Module) -> InteropReport:
    """Refuse (:class:`PartialLoadError`, one line) a load that left tensors of ``model`` untouched which the source
    should have held (:func:`explain_missing`), unless ``model.config.init_partial``; the line says which are frozen
    (random for the whole run) and how to opt in. With the opt-in they are warned."""
    unexpected = explain_missing(report)
    if not unexpected or getattr(getattr(model, "config", None), PARTIAL_OPTION, False):
        return report
    never_trained = _frozen_keys(model)
    frozen = [k for k in unexpected if k in never_trained]
    into = report.target or "the model"
    message = f"{report.source}: {len(unexpected)} tensors of {into} are not in it ({group_keys(unexpected)})"
    if len(frozen) == len(unexpected):
        message += ": all FROZEN, they would stay random for the whole run and never train"
    elif frozen:
        message += (f", {len(frozen)} of them FROZEN ({group_keys(frozen)}): those would stay random for the whole "
                    "run and never train")
    else:
        message += ": they would start random"
    raise PartialLoadError(f"{message}; is it the right file? To start from it anyway, as the original code's "
                           f"load_state_dict(strict=False) does, set model_overrides.{PARTIAL_OPTION}=true (cirlab "
                           f"convert: --set {PARTIAL_OPTION}=true)")


def refuse_lavis_folder(path: str | os.PathLike, *, reads_transformers: bool = False) -> None:
    """``lavis:FOLDER``: one :class:`InteropError` line saying that a LAVIS checkpoint is one ``.pth`` file (the
    LAVIS reader would say "no such file" of a folder that exists). ``reads_transformers``: the caller also reads
    transformers BLIP folders (the re-ranker), said when the folder is one."""
    from cirlab.models.lavis_interop import strip_lavis_prefix

    where = Path(strip_lavis_prefix(path)).expanduser()
    if where.is_dir():
        plain = ("; a transformers BLIP folder like this one is read without the lavis: prefix"
                 if reads_transformers and (where / "config.json").is_file() else "")
        raise InteropError(f"{where} is a folder; a LAVIS checkpoint is one .pth file: give lavis:{where}/NAME.pth"
                           f"{plain}")


def check_usable(report: InteropReport, model: nn.Module | None = None) -> InteropReport:
    """Raise :class:`InteropError` (one line, naming the source) when a non-strict conversion loaded nothing or
    found tensors of another shape (another model size), and, given the ``model`` it filled, when it left tensors
    the source should have held (:func:`check_complete`); otherwise log the report and return it."""
    if report.mismatched:
        key, src, dst = report.mismatched[0]
        into = report.target or "the model"
        raise InteropError(f"{report.source}: {len(report.mismatched)} tensors do not fit {into} (e.g. {key}: "
                           f"checkpoint {list(src)} vs model {list(dst)}); is the preset right?")
    if not report.loaded:
        raise InteropError(f"{report.source}: nothing in it fits {report.target or 'the model'} "
                           f"(e.g. unmatched {', '.join(report.unmatched[:3])})")
    if model is not None:
        check_complete(report, model)
    return report.log()


# ------------------------------------------------------------------------------------------------------ stage I


def convert_stage1(state: dict[str, torch.Tensor], model: nn.Module, *, strict: bool = False,
                   source: str = "") -> InteropReport:
    """Load an original-layout state dict (``model_base.pth`` or a stage-I file) into :class:`BlipRerankStage1`."""
    target = _params(model)
    report = InteropReport(source=source, target="stage1")
    for key, value in state.items():
        if any(p.fullmatch(key) for p in _IGNORED):
            report.ignored.append(key)
        elif _vit(key, value, "visual_encoder.", target, report):
            pass
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")) or key == "temp":
            if key in target:
                _assign(target, report, key, value.reshape(target[key].shape) if key == "temp" else value)
            else:
                report.unmatched.append(key)
        else:
            report.unmatched.append(key)
    return _finish(target, report, strict)


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
    report = InteropReport(source=source, target="stage2")
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
    return _finish(target, report, strict, scope=("text_encoder.", "cls_head.", "stage1.visual_encoder."))


def export_stage2(model: nn.Module) -> dict[str, torch.Tensor]:
    """cirlab stage II -> the original ``BLIP_NLVR`` state dict (ViT, twin text encoder, cls_head)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("stage1.visual_encoder."):
            # as export_stage1: a ViT key with no table entry is a clear KeyError, not a str + None TypeError
            orig = vit_key_to_original(key[len("stage1.visual_encoder."):])
            if orig is None:
                raise KeyError(f"no original name for {key}")
            out["visual_encoder." + orig] = value.clone()
        elif key.startswith("text_encoder."):
            orig = stage2_text_key_to_original(key[len("text_encoder."):])
            if orig is not None and not orig.endswith("position_ids"):
                out["text_encoder." + orig] = value.clone()
        elif key.startswith("cls_head."):
            out[key] = value.clone()
    return out


def load_cirlab_state(module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "",
                      target: str = "") -> InteropReport:
    """Load a cirlab state dict (same names) into ``module`` with the same report as the converters."""
    own = _params(module)
    report = InteropReport(source=source, target=target)
    for key, value in state.items():
        if any(p.fullmatch(key) for p in _IGNORED) and key not in own:
            report.ignored.append(key)
        elif key in own:
            _assign(own, report, key, value)
        else:
            report.unmatched.append(key)
    return _finish(own, report, strict=False)


def load_original_checkpoint(path: str | os.PathLike, model: nn.Module, *, strict: bool = False) -> InteropReport:
    """Read ``path`` (``weights_only=True``) and convert it into a stage-I or stage-II cirlab model (a model with a
    ``stage1`` sub-module is a stage II)."""
    state = read_checkpoint(path)
    convert = convert_stage2 if isinstance(getattr(model, "stage1", None), nn.Module) else convert_stage1
    return convert(state, model, strict=strict, source=str(path)).log()
