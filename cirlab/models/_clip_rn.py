"""CaLa's CLIP backbone: OpenAI CLIP with a ModifiedResNet image tower (RN50x4 in the paper), on open_clip's modules.

CaLa (Jiang et al., SIGIR 2024; https://github.com/Chiangsonw/CaLa) runs its CLIP path on the OpenAI ``clip``
package with two edits of its ``model.py``: ``ModifiedResNet.forward`` also returns the layer-4 map, and
``encode_text`` also returns the ``ln_final`` sequence. cirlab edits nothing installed: :class:`ClipRN` is built from
``open_clip_torch``'s own classes (``open_clip.model.CLIP``: the ModifiedResNet with its attention pool, the text
transformer with QuickGELU, the layout of OpenAI's state dicts) and reads the two extra outputs by calling the
modules step by step:

* :meth:`ClipRN.image_features` -> ``(attnpool(x) [B, E], x [B, 32 * width, S/32, S/32])``; RN50x4 at 288 px:
  (B x 640, B x 2560 x 9 x 9).
* :meth:`ClipRN.text_features` -> ``(ln_final(x)[eot] @ text_projection [B, E], ln_final(x) [B, 77, W])``;
  RN50x4: (B x 640, B x 77 x 640).

Models are always created without pretrained weights (``open_clip`` never downloads here); a CLIP state dict comes
from a user file through :func:`read_clip_state` (OpenAI's TorchScript ``RN50x4.pt``, a ``torch.save`` state dict,
``.safetensors``, or CaLa's ``tuned_clip_*.pt`` ``{"epoch", "CLIP": sd}``). The BPE vocabulary ships inside the
``open_clip_torch`` package (:class:`ClipTokenizer`). ``open_clip`` is imported only when a CLIP model is built.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cirlab.core.errors import MissingPathError
from cirlab.core.paths import environ_kept

MAP_LAYOUTS = ("permute", "view_quirk")
# keys of OpenAI state dicts that are no parameters of the model: hyper-parameters saved alongside, and the causal
# mask (a buffer of TorchScript exports, rebuilt here from the context length)
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# open_clip's tokenizer module sets TOKENIZERS_PARALLELISM=false when imported, over a value the user chose for
# their own Hugging Face tokenizers (and every child process then inherits it): given back after the imports
_OPEN_CLIP_SETS = ("TOKENIZERS_PARALLELISM",)


def map_tokens(maps: torch.Tensor, layout: str = "permute") -> torch.Tensor:
    """A [B, C, H, W] map as B x (H*W) tokens of C features.

    ``permute`` (cirlab's default): token ``i`` is position ``i`` (row-major) with all its C channels.
    ``view_quirk``: the released CaLa heads' ``maps.view(bs, h*w, c)`` without a permute: the NCHW memory is cut
    into consecutive chunks of C numbers, so token ``i`` holds elements ``i*C .. (i+1)*C - 1`` of the flattened
    (channel, row, column) order -- pieces of several channels at all positions, not one position's features.
    """
    b, c, h, w = maps.shape
    if layout == "view_quirk":
        return maps.reshape(b, h * w, c)  # == .view on a contiguous map; reshape also accepts channels_last
    if layout != "permute":
        raise ValueError(f"map layout {layout!r}; expected one of {MAP_LAYOUTS}")
    return maps.flatten(2).transpose(1, 2)


class ClipRN(nn.Module):
    """OpenAI CLIP with a ModifiedResNet tower; parameters named as OpenAI's state dicts (``visual.*``,
    ``transformer.*``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``, ``text_projection``,
    ``logit_scale``), so those load without renaming."""

    def __init__(self, *, embed_dim: int = 640, layers: Sequence[int] = (4, 6, 10, 6), width: int = 80,
                 image_size: int = 288, text_width: int = 640, text_heads: int = 10, text_layers: int = 12,
                 context_length: int = 77, vocab_size: int = 49408) -> None:
        super().__init__()
        with environ_kept(_OPEN_CLIP_SETS):
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        if image_size % 32:
            raise ValueError(f"ModifiedResNet needs an image size divisible by 32, got {image_size}")
        model = CLIP(embed_dim,
                     vision_cfg=CLIPVisionCfg(layers=tuple(layers), width=width, image_size=image_size),
                     text_cfg=CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                                          heads=text_heads, layers=text_layers),
                     quick_gelu=True)  # OpenAI's CLIP models were trained with QuickGELU
        # adopt open_clip's modules under OpenAI's names (the text tower's forward is written below, to keep
        # the ln_final sequence, so CLIP's own forward is not needed)
        self.visual = model.visual
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.embed_dim, self.context_length = embed_dim, context_length
        self.map_channels = width * 32  # the ResNet feature width (RN50x4: 80 * 32 = 2560)
        self.grid = image_size // 32  # layer-4 map side (RN50x4 at 288 px: 9)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled [B, E], layer-4 map [B, 32*width, S/32, S/32])``: the released edit of
        ``ModifiedResNet.forward`` returning ``(attnpool(x), x)``."""
        v = self.visual
        x = images.to(v.conv1.weight.dtype)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        return v.attnpool(x), x

    def text_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eot feature @ text_projection [B, E], ln_final sequence [B, L, W])``: the released edit of
        ``encode_text``; the end-of-text token is the largest id of each row, as in OpenAI CLIP."""
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
        eot = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return eot @ self.text_projection, x


class ClipTokenizer:
    """OpenAI CLIP's BPE (the vocabulary file inside ``open_clip_torch``): ``[SOT] tokens [EOT]`` padded with 0 to
    ``context_length`` and truncated there (the end-of-text token kept last), as ``clip.tokenize(...,
    truncate=True)``, which CaLa's CLIP training uses."""

    def __init__(self, context_length: int = 77) -> None:
        with environ_kept(_OPEN_CLIP_SETS):
            from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N, context_length] long, mask [N, context_length] long)``; mask 1 up to and including EOT."""
        ids = self._bpe(list(texts), context_length=self.context_length).long()
        eot = ids.argmax(dim=-1, keepdim=True)
        mask = (torch.arange(ids.shape[1])[None, :] <= eot).long()
        return ids, mask

    def cut_count(self, texts: Sequence[str], ids: torch.Tensor) -> int:
        """How many of ``texts`` :meth:`encode` cut (``ids`` its output): only a row without padding can have been
        cut; its whole text is BPE-encoded again (as :meth:`encode` did: counting only its first words missed the
        cuts of texts whose leading words CLIP's cleaning removes, such as ``&nbsp;``)."""
        full = [text for text, last in zip(texts, ids[:, -1].tolist()) if last != 0]
        return sum(len(self._bpe.encode(text)) + 2 > self.context_length for text in full)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Token strings of one row (``</w>`` word ends dropped; padding after EOT shown as ``<pad>``)."""
        ids = [int(i) for i in ids]
        end = max(range(len(ids)), key=ids.__getitem__) if ids else -1
        dec = self._bpe.decoder
        return [dec[i].replace("</w>", "") if k <= end else "<pad>" for k, i in enumerate(ids)]


@functools.lru_cache(maxsize=4)
def clip_tokenizer(context_length: int = 77) -> ClipTokenizer:
    return ClipTokenizer(context_length)


def read_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict in OpenAI's layout from ``path``: ``.safetensors``; a ``torch.save`` file read with
    ``weights_only=True`` (a bare state dict, ``{"state_dict": sd}``, or CaLa's ``{"epoch", "CLIP": sd}``); or
    OpenAI's released TorchScript archive (``RN50x4.pt``), read with ``torch.jit.load`` (no pickle). ``module.``
    prefixes and OpenAI's saved hyper-parameters are dropped; tensors come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"CLIP weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif is_torchscript(path):  # OpenAI's released files
        # torch deprecates TorchScript (a FutureWarning) and these files are in it: that notice alone is hidden;
        # the one torch gives on Python 3.14+ ("not supported ... and may break") reaches the user
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - one line naming the file
            raise ValueError(f"{path}: not a weights-only torch file ({' '.join(str(err).split())[:200]})") from None
    state = _unwrap_state(state, str(path))
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key in _OPENAI_EXTRAS or not torch.is_tensor(value):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip whose entries include ``<archive>/code/`` (``torch.save`` zips have none)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _unwrap_state(obj: Any, source: str) -> dict[str, Any]:
    from cirlab.core.checkpoint import find_state_dict

    state = find_state_dict(obj)
    if state is None:
        raise ValueError(f"{source}: no CLIP state dict found")
    return state


def is_clip_state(state: dict[str, Any]) -> bool:
    """OpenAI/open_clip CLIP layout with a ModifiedResNet tower."""
    return "visual.attnpool.positional_embedding" in state and "token_embedding.weight" in state


def config_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``CaLaConfig`` CLIP fields that fit a ModifiedResNet CLIP state dict (what ``clip.load`` infers)."""
    counts = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
    grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    return {"clip_vision_layers": counts, "clip_vision_width": state["visual.layer1.0.conv1.weight"].shape[0],
            "image_size": grid * 32, "clip_embed_dim": state["text_projection"].shape[1],
            "clip_text_width": text_width, "clip_text_heads": max(1, text_width // 64),  # OpenAI's rule
            "clip_text_layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
            "clip_context_length": state["positional_embedding"].shape[0],
            "clip_vocab_size": state["token_embedding.weight"].shape[0]}
