#!/usr/bin/env python
"""Write LAVIS reference fixtures for cirlab's converters (run inside ``.venv-lavis``; no network).

Usage (from the repository root)::

    make lavis-fixtures                                    # = .venv-lavis/bin/python tools/lavis_fixtures.py
    .venv-lavis/bin/python tools/lavis_fixtures.py --out DIR

What it does. Every model is built by LAVIS's own registry class from LAVIS's own YAML model config
(``BlipRetrieval.from_config``, ``Blip2Qformer.from_config``), with the sizes overridden to tiny values. LAVIS
would download weights, a BERT config and a tokenizer from the network while doing so; this script patches, at run
time and only in its own process (the installed package is never edited), exactly those entry points:

* ``BaseModel.load_checkpoint_from_config`` -> no-op: the models keep their random initialisation;
* ``create_eva_vit_g`` / ``create_clip_vit_L`` (as bound in ``lavis.models.blip2_models.blip2``) -> build LAVIS's
  own ``eva_vit.VisionTransformer`` / ``clip_vit.VisionTransformer`` with the fixed structural arguments of the
  originals (patch 14, EVA's ``mlp_ratio=4.3637``, q/v-only qkv bias, eps 1e-6, no final norm; CLIP's QuickGELU,
  ``ln_pre``, ``layers - 1`` residual blocks) but a small width/depth, and without the weight download;
* ``VisionTransformerEncoder.from_config`` (BLIP's ViT; its sizes are hard-coded per ``vit_type``) -> the same
  LAVIS class with small sizes;
* ``BertConfig.from_pretrained("bert-base-uncased")`` (Q-Former) -> a small ``BertConfig`` with bert-base's
  non-size settings; ``BertLMHeadModel.from_pretrained("bert-base-uncased", config=...)`` ->
  ``BertLMHeadModel(config)``;
* ``BertTokenizer.from_pretrained("bert-base-uncased")`` -> the same call on a local directory holding a small
  WordPiece ``vocab.txt`` this script writes (``VOCAB`` below; bert's special-token names, so LAVIS's
  ``init_tokenizer`` adds ``[DEC]`` and ``[ENC]`` after it exactly as it does for the real vocabulary);
* any remaining download entry point (``download_cached_file``, ``torch.hub.load_state_dict_from_url``) raises.

The BLIP text encoder's MED config is LAVIS's ``configs/models/med_config.json`` with the sizes replaced, written to
a temporary file and passed as ``med_config_path``.

After construction every floating parameter gets a fixed Gaussian perturbation (std ``PERTURB_STD``), so that no
two tensors are equal (random init leaves LayerNorm weights at 1 and biases at 0, and LAVIS copies the momentum
encoders and the Q-Former ``*_query`` feed-forward blocks from their twins): a converter that swaps two such
tensors then changes the outputs. ``temp`` is set to ``TEMP`` instead.

Everything runs in fp32 on the CPU, in eval mode, single-threaded, deterministic algorithms, seed ``SEED``; the
fixture files are safetensors (byte-stable: npz zip entries carry timestamps). Files written to ``--out``:

* ``<model>.state.safetensors``: the LAVIS ``state_dict()`` exactly as LAVIS names it (momentum encoders, queues,
  ``position_ids`` buffers, the Q-Former LM head included; tied tensors saved as separate copies);
* ``<model>.io.safetensors``: inputs (``inputs.*``) and LAVIS outputs (``outputs.*``);
* ``lavis_fixtures.json``: for each model the LAVIS class and config, every size (enough to build matching cirlab
  modules), the tokenizer ids, the captions, each io tensor's shape/dtype/meaning, the files' sha256, and versions.

Models: ``blip_retrieval`` (BlipRetrieval), ``blip2_pretrain`` (Blip2Qformer with EVA ViT-g) and
``blip2_pretrain_vitL`` (Blip2Qformer with CLIP ViT-L), the latter two registered in LAVIS as
``blip2_feature_extractor``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SEED = 0
PERTURB_STD = 0.02
TEMP = 0.05
CAPTIONS = [
    "a red dress with long sleeves",
    "is darker and has a collar",
    "change the cat to a small zebra on the grass",  # "zebra" is not in VOCAB: [UNK]
]
# bert's special tokens under bert's names; "##er" makes "darker" a two-piece word
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "and", "blue", "cat", "change", "collar", "dark", "dog", "dress", "grass", "has", "is", "long", "on",
         "red", "shirt", "sleeves", "small", "the", "to", "with", "white", "shorter", "##er", "##s", "."]

BLIP_SIZES = {
    "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 2, "vision_heads": 2,
    "vision_mlp_ratio": 4.0,
    "text_width": 32, "text_depth": 2, "text_heads": 2, "text_intermediate": 64, "max_position_embeddings": 64,
    "embed_dim": 256, "queue_size": 8, "max_txt_len": 35,
}
QFORMER_SIZES = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
                 "max_position_embeddings": 64, "num_query_token": 8, "cross_attention_freq": 2}
EVA_SIZES = {"image_size": 42, "patch_size": 14, "width": 48, "depth": 2, "heads": 4, "mlp_ratio": 4.3637}
CLIP_SIZES = {"image_size": 42, "patch_size": 14, "width": 48, "layers": 3, "heads": 4}  # layers - 1 = 2 blocks

# what the real LAVIS models use, for reference (from the LAVIS 1.0.2 source and configs)
FULL_SIZES = {
    "blip_retrieval": {"image_size": 384, "patch_size": 16, "vision_width": 768, "vision_depth": 12, "vision_heads": 12,
                       "vision_mlp_ratio": 4.0, "text_width": 768, "text_depth": 12, "text_heads": 12,
                       "text_intermediate": 3072, "max_position_embeddings": 512, "vocab_size": 30524,
                       "embed_dim": 256, "queue_size": 57600, "max_txt_len": 35},
    "qformer": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "max_position_embeddings": 512, "vocab_size": "30522 + 1 ([DEC]) = 30523", "num_query_token": 32,
                "cross_attention_freq": 2, "embed_dim": 256},
    "eva_clip_g": {"image_size": 224, "patch_size": 14, "width": 1408, "depth": 39, "heads": 16, "mlp_ratio": 4.3637,
                   "mlp": 6144, "precision": "fp16 (Linear/Conv weights), LayerNorm fp32"},
    "clip_L": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 22, "residual_blocks": 21, "heads": 16,
               "mlp": 4096, "precision": "fp16 (Linear/Conv weights), LayerNorm fp32"},
}


# ------------------------------------------------------------------------------------------------ patching


class _NoDownload(RuntimeError):
    pass


def _no_download(*args: Any, **kwargs: Any) -> Any:
    raise _NoDownload(f"lavis_fixtures: a download was attempted ({args[:1]}); this script runs offline")


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` for the duration; restores the previous value (or removes a class attribute that was
    inherited rather than defined on ``obj`` itself)."""
    own = name in vars(obj)
    old = vars(obj)[name] if own else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _tiny_eva_vit_g(img_size: int = 224, drop_path_rate: float = 0.4, use_checkpoint: bool = False,
                    precision: str = "fp16") -> torch.nn.Module:
    """``lavis.models.eva_vit.create_eva_vit_g`` with EVA_SIZES' width/depth/heads and no weight download."""
    from torch import nn

    from lavis.models import eva_vit

    if img_size != EVA_SIZES["image_size"]:
        raise ValueError(f"expected image_size {EVA_SIZES['image_size']}, got {img_size}")
    model = eva_vit.VisionTransformer(
        img_size=img_size, patch_size=EVA_SIZES["patch_size"], use_mean_pooling=False, embed_dim=EVA_SIZES["width"],
        depth=EVA_SIZES["depth"], num_heads=EVA_SIZES["heads"], mlp_ratio=EVA_SIZES["mlp_ratio"], qkv_bias=True,
        drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint)
    if precision == "fp16":
        eva_vit.convert_weights_to_fp16(model)
    return model


def _tiny_clip_vit_L(img_size: int = 224, use_checkpoint: bool = False, precision: str = "fp16") -> torch.nn.Module:
    """``lavis.models.clip_vit.create_clip_vit_L`` with CLIP_SIZES and no weight download."""
    from lavis.models import clip_vit, eva_vit

    if img_size != CLIP_SIZES["image_size"]:
        raise ValueError(f"expected image_size {CLIP_SIZES['image_size']}, got {img_size}")
    model = clip_vit.VisionTransformer(input_resolution=img_size, patch_size=CLIP_SIZES["patch_size"],
                                       width=CLIP_SIZES["width"], layers=CLIP_SIZES["layers"],
                                       heads=CLIP_SIZES["heads"], use_grad_checkpointing=use_checkpoint)
    if precision == "fp16":
        eva_vit.convert_weights_to_fp16(model)
    return model


def _tiny_blip_vit_from_config(cls: type, cfg: Any, from_pretrained: bool = False) -> torch.nn.Module:
    """``VisionTransformerEncoder.from_config`` with BLIP_SIZES (LAVIS hard-codes 768/12/12 for ``vit_type: base``)."""
    if from_pretrained:
        raise _NoDownload("VisionTransformerEncoder.from_config(from_pretrained=True) downloads DeiT weights")
    norm_eps = cfg.get("vit_layer_norm_epsilon", -1)
    norm_layer = None if norm_eps == -1 else partial(torch.nn.LayerNorm, eps=norm_eps)
    encoder = cls(img_size=cfg.get("image_size"), patch_size=BLIP_SIZES["patch_size"],
                  embed_dim=BLIP_SIZES["vision_width"], depth=BLIP_SIZES["vision_depth"],
                  num_heads=BLIP_SIZES["vision_heads"], mlp_ratio=BLIP_SIZES["vision_mlp_ratio"],
                  use_grad_checkpointing=cfg.get("vit_grad_ckpt", False), ckpt_layer=cfg.get("vit_ckpt_layer", 0),
                  drop_path_rate=cfg.get("vit_drop_path_rate", 0), norm_layer=norm_layer)
    encoder.vision_width = BLIP_SIZES["vision_width"]
    return encoder


def _qformer_bert_config() -> Any:
    """bert-base-uncased's config.json values with QFORMER_SIZES' sizes (what ``from_pretrained`` would read)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=QFORMER_SIZES["hidden_size"],
                      num_hidden_layers=QFORMER_SIZES["num_hidden_layers"],
                      num_attention_heads=QFORMER_SIZES["num_attention_heads"],
                      intermediate_size=QFORMER_SIZES["intermediate_size"], hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      max_position_embeddings=QFORMER_SIZES["max_position_embeddings"], type_vocab_size=2,
                      initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                      position_embedding_type="absolute", use_cache=True)


@contextlib.contextmanager
def offline_lavis(vocab_dir: Path) -> Iterator[None]:
    """Every LAVIS / transformers entry point that would reach the network, redirected (see the module docstring)."""
    from transformers import BertConfig, BertTokenizer

    import lavis.common.dist_utils as dist_utils
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models import blip2 as blip2_module
    from lavis.models.blip2_models.Qformer import BertLMHeadModel
    from lavis.models.vit import VisionTransformerEncoder

    tok_from_pretrained = BertTokenizer.from_pretrained.__func__
    cfg_from_pretrained = BertConfig.from_pretrained.__func__
    lm_from_pretrained = BertLMHeadModel.from_pretrained.__func__

    def tokenizer(cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
        return tok_from_pretrained(cls, str(vocab_dir) if name == "bert-base-uncased" else name, *args, **kwargs)

    def config(cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bert-base-uncased":
            return _qformer_bert_config()
        return cfg_from_pretrained(cls, name, *args, **kwargs)

    def lm_head(cls: type, name: str, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        if name == "bert-base-uncased":
            return cls(config)
        return lm_from_pretrained(cls, name, *args, config=config, **kwargs)

    def skip_checkpoint(self: Any, cfg: Any, **kwargs: Any) -> None:
        return None  # random init: the fixture's weights are the (perturbed) LAVIS initialisation

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(BertTokenizer, "from_pretrained", classmethod(tokenizer)))
        stack.enter_context(_patched(BertConfig, "from_pretrained", classmethod(config)))
        stack.enter_context(_patched(BertLMHeadModel, "from_pretrained", classmethod(lm_head)))
        stack.enter_context(_patched(BaseModel, "load_checkpoint_from_config", skip_checkpoint))
        stack.enter_context(_patched(VisionTransformerEncoder, "from_config", classmethod(_tiny_blip_vit_from_config)))
        stack.enter_context(_patched(blip2_module, "create_eva_vit_g", _tiny_eva_vit_g))
        stack.enter_context(_patched(blip2_module, "create_clip_vit_L", _tiny_clip_vit_L))
        stack.enter_context(_patched(torch.hub, "load_state_dict_from_url", _no_download))
        for mod in [m for n, m in list(sys.modules.items()) if n.startswith("lavis") and m is not None]:
            if getattr(mod, "download_cached_file", None) is dist_utils.download_cached_file:
                stack.enter_context(_patched(mod, "download_cached_file", _no_download))
        yield


# ------------------------------------------------------------------------------------------------ helpers


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Add N(0, PERTURB_STD) to every floating parameter (named_parameters order; tied weights once); set temp."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "temp":
                p.fill_(TEMP)
            elif p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * PERTURB_STD)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Fixed pixel values: a per-image smooth pattern plus noise, roughly in the normalised-image range."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(3 * xx * (i + 1) + yy) for i in range(b * c)]).view(b, c, h, w)
    return (base + 0.5 * torch.randn(shape, generator=gen)).float().contiguous()


def _spec(tensors: dict[str, torch.Tensor], docs: dict[str, str]) -> dict[str, Any]:
    missing = sorted(set(tensors) - set(docs))
    if missing:
        raise KeyError(f"undocumented io tensors: {missing}")
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "doc": docs[k]}
            for k, v in sorted(tensors.items())}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    # one metadata entry: safetensors keeps the metadata in a hash map, so several keys come out in random order
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"lavis_fixture": json.dumps(metadata, sort_keys=True)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lavis_config(cls: type, model_type: str, overrides: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cls.default_config_path(model_type)).model
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


class _Loader:
    """What LAVIS's ``compute_sim_matrix`` reads from a data loader: ``dataset.text``, ``dataset.image``, batches."""

    def __init__(self, images: torch.Tensor, texts: list[str]) -> None:
        self.dataset = type("D", (), {"text": list(texts), "image": list(range(len(images)))})()
        self._images = images

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield {"image": self._images}


# ------------------------------------------------------------------------------------------------ BLIP


def blip_retrieval(tmp: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    import torch.nn.functional as F

    from lavis.common.registry import registry
    from lavis.models.albef_models import compute_sim_matrix

    cls = registry.get_model_class("blip_retrieval")
    med = json.loads(Path(registry.get_path("library_root"), "configs/models/med_config.json").read_text())
    med.update(hidden_size=BLIP_SIZES["text_width"], num_hidden_layers=BLIP_SIZES["text_depth"],
               num_attention_heads=BLIP_SIZES["text_heads"], intermediate_size=BLIP_SIZES["text_intermediate"],
               max_position_embeddings=BLIP_SIZES["max_position_embeddings"], vocab_size=len(VOCAB) + 2,
               encoder_width=BLIP_SIZES["vision_width"])
    med_path = tmp / "med_config_tiny.json"
    med_path.write_text(json.dumps(med, indent=2, sort_keys=True))
    cfg = _lavis_config(cls, "coco", {"image_size": BLIP_SIZES["image_size"], "queue_size": BLIP_SIZES["queue_size"],
                                      "med_config_path": str(med_path), "vit_grad_ckpt": False, "vit_ckpt_layer": 0,
                                      "embed_dim": BLIP_SIZES["embed_dim"], "max_txt_len": BLIP_SIZES["max_txt_len"]})
    torch.manual_seed(SEED)
    model = cls.from_config(cfg)
    _perturb(model, SEED + 1)
    model.eval()

    tok = model.tokenizer
    images = _images((len(CAPTIONS), 3, BLIP_SIZES["image_size"], BLIP_SIZES["image_size"]), SEED + 2)
    text = tok(CAPTIONS, padding="max_length", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
    itm_ids = text.input_ids.clone()
    itm_ids[:, 0] = tok.enc_token_id
    with torch.no_grad():
        image_embeds = model.visual_encoder.forward_features(images)  # [B, 1+P, Dv]
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_out = model.text_encoder.forward_text(text)  # mode="text": no cross-attention
        text_embeds = text_out.last_hidden_state
        text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
        sims = image_feat @ text_feat.t()
        nb = len(CAPTIONS)
        itm_logits, grounded = [], []
        for i in range(nb):  # image i against every text (as LAVIS's compute_sim_matrix scores its top-k)
            enc = image_embeds[i:i + 1].repeat(nb, 1, 1)
            out = model.text_encoder(itm_ids, attention_mask=text.attention_mask, encoder_hidden_states=enc,
                                     encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long),
                                     return_dict=True)
            itm_logits.append(model.itm_head(out.last_hidden_state[:, 0, :]))
            grounded.append(out.last_hidden_state[i])
        itm_logits = torch.stack(itm_logits)  # [B_img, B_txt, 2]
        grounded = torch.stack(grounded)  # [B, L, D]: text i encoded over image i (LAVIS forward's output_pos)
        score_i2t, score_t2i = compute_sim_matrix(model=model, data_loader=_Loader(images, CAPTIONS), k_test=nb)
    score_i2t, score_t2i = torch.from_numpy(score_i2t).float(), torch.from_numpy(score_t2i).float()
    # LAVIS's own evaluation path agrees with the pieces above (it pads to 35 as well)
    torch.testing.assert_close(score_i2t, itm_logits[..., 1] + sims, rtol=0, atol=1e-5)
    torch.testing.assert_close(score_t2i, (itm_logits[..., 1] + sims).t(), rtol=0, atol=1e-5)

    io = {
        "inputs.pixel_values": images,
        "inputs.input_ids": text.input_ids,
        "inputs.attention_mask": text.attention_mask,
        "inputs.itm_input_ids": itm_ids,
        "outputs.image_embeds": image_embeds,
        "outputs.image_feat": image_feat,
        "outputs.text_embeds": text_embeds,
        "outputs.text_feat": text_feat,
        "outputs.sims": sims,
        "outputs.itm_logits": itm_logits,
        "outputs.grounded_embeds": grounded,
        "outputs.score_i2t": score_i2t,
        "outputs.score_t2i": score_t2i,
    }
    docs = {
        "inputs.pixel_values": "[B,3,H,W] fp32 image tensor fed to the ViT (already 'normalised'; no processor)",
        "inputs.input_ids": "[B,L] tokenizer(captions, padding='max_length', truncation=True, max_length=35); "
                            "[CLS] first (text-only ITC path)",
        "inputs.attention_mask": "[B,L] 1 = token, 0 = padding",
        "inputs.itm_input_ids": "[B,L] input_ids with position 0 replaced by enc_token_id ([ENC]) for the "
                                "image-grounded encoder (ITM)",
        "outputs.image_embeds": "[B,1+P,Dv] visual_encoder.forward_features(pixel_values): all ViT tokens after "
                                "the final norm",
        "outputs.image_feat": "[B,E] normalize(vision_proj(image_embeds[:,0]))",
        "outputs.text_embeds": "[B,L,D] text_encoder.forward_text(...).last_hidden_state (mode='text', no "
                               "cross-attention)",
        "outputs.text_feat": "[B,E] normalize(text_proj(text_embeds[:,0]))",
        "outputs.sims": "[B_img,B_txt] image_feat @ text_feat.T (cosine, no temperature)",
        "outputs.itm_logits": "[B_img,B_txt,2] itm_head(text_encoder(itm_input_ids, attention_mask, "
                              "encoder_hidden_states=image_embeds[i]).last_hidden_state[:,0]); logit 1 = match",
        "outputs.grounded_embeds": "[B,L,D] image-grounded text encoding of text i over image i: "
                                   "text_encoder(itm_input_ids, attention_mask, encoder_hidden_states=image_embeds)"
                                   ".last_hidden_state (LAVIS forward's output_pos)",
        "outputs.score_i2t": "[B_img,B_txt] LAVIS compute_sim_matrix(k_test=B): itm_logits[...,1] + sims",
        "outputs.score_t2i": "[B_txt,B_img] LAVIS compute_sim_matrix(k_test=B): the transpose of score_i2t",
    }
    info = {
        "lavis_name": "blip_retrieval", "lavis_class": f"{cls.__module__}.{cls.__qualname__}",
        "lavis_config": "configs/models/blip_retrieval_coco.yaml (model_type 'coco') + overrides",
        "config_overrides": {k: (v if k != "med_config_path" else "<tiny MED config below>")
                             for k, v in cfg.items() if k in ("image_size", "queue_size", "med_config_path",
                                                              "vit_grad_ckpt", "vit_ckpt_layer", "embed_dim",
                                                              "max_txt_len")},
        "sizes": {**BLIP_SIZES, "vision_mlp": int(BLIP_SIZES["vision_width"] * BLIP_SIZES["vision_mlp_ratio"]),
                  "vocab_size": len(VOCAB) + 2, "num_image_tokens": (BLIP_SIZES["image_size"] //
                                                                      BLIP_SIZES["patch_size"]) ** 2 + 1,
                  "vision_layer_norm_eps": 1e-6, "text_layer_norm_eps": med["layer_norm_eps"],
                  "hidden_act": med["hidden_act"]},
        "med_config": med,
        "tokenizer": {"vocab_size_with_specials": len(tok), "pad_token_id": tok.pad_token_id,
                      "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                      "dec_token_id": tok.bos_token_id, "enc_token_id": tok.enc_token_id},
        "temp": TEMP,
        "eval_mode": True,
    }
    return model, _state(model), io, {"info": info, "docs": docs}


# ------------------------------------------------------------------------------------------------ BLIP-2


def blip2_qformer(model_type: str) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    from lavis.common.registry import registry

    cls = registry.get_model_class("blip2_feature_extractor")
    vit = EVA_SIZES if model_type == "pretrain" else CLIP_SIZES
    cfg = _lavis_config(cls, model_type, {"image_size": vit["image_size"], "vit_precision": "fp32",
                                          "num_query_token": QFORMER_SIZES["num_query_token"],
                                          "cross_attention_freq": QFORMER_SIZES["cross_attention_freq"],
                                          "drop_path_rate": 0, "use_grad_checkpoint": False})
    torch.manual_seed(SEED)
    model = cls.from_config(cfg)
    _perturb(model, SEED + 1)
    model.eval()

    images = _images((len(CAPTIONS), 3, vit["image_size"], vit["image_size"]), SEED + 2)
    text = model.tokenizer(CAPTIONS, return_tensors="pt", padding=True)  # as extract_features tokenizes
    samples = {"image": images, "text_input": list(CAPTIONS)}
    with torch.no_grad():
        vit_out = model.visual_encoder(images)
        image_embeds_frozen = model.ln_vision(vit_out)
        f_img = model.extract_features(samples, mode="image")
        f_txt = model.extract_features(samples, mode="text")
        f_mm = model.extract_features(samples, mode="multimodal")
        # LAVIS compute_sim_matrix / forward: ITC similarity = max over the query tokens
        sims = torch.einsum("iqe,te->itq", f_img.image_embeds_proj, f_txt.text_embeds_proj[:, 0]).max(-1).values

    io = {
        "inputs.pixel_values": images,
        "inputs.input_ids": text.input_ids,
        "inputs.attention_mask": text.attention_mask,
        "outputs.vit_embeds": vit_out,
        "outputs.image_embeds_frozen": image_embeds_frozen,
        "outputs.image.image_embeds": f_img.image_embeds,
        "outputs.image.image_embeds_proj": f_img.image_embeds_proj,
        "outputs.text.text_embeds": f_txt.text_embeds,
        "outputs.text.text_embeds_proj": f_txt.text_embeds_proj,
        "outputs.multimodal.multimodal_embeds": f_mm.multimodal_embeds,
        "outputs.sims": sims,
    }
    docs = {
        "inputs.pixel_values": "[B,3,H,W] fp32 image tensor (already 'normalised'; no processor)",
        "inputs.input_ids": "[B,L] tokenizer(captions, padding=True) exactly as extract_features tokenizes "
                            "([CLS] first, no truncation, no [ENC])",
        "inputs.attention_mask": "[B,L] 1 = token, 0 = padding",
        "outputs.vit_embeds": "[B,N,Dv] visual_encoder(pixel_values) (EVA: no final norm; CLIP: ln_pre, no ln_post)",
        "outputs.image_embeds_frozen": "[B,N,Dv] ln_vision(visual_encoder(pixel_values)): the Q-Former's "
                                       "cross-attention input",
        "outputs.image.image_embeds": "[B,Q,D] extract_features(mode='image').image_embeds: Qformer.bert("
                                      "query_embeds=query_tokens, encoder_hidden_states=image_embeds_frozen)"
                                      ".last_hidden_state",
        "outputs.image.image_embeds_proj": "[B,Q,E] extract_features(mode='image').image_embeds_proj: "
                                           "normalize(vision_proj(image_embeds))",
        "outputs.text.text_embeds": "[B,L,D] extract_features(mode='text').text_embeds: Qformer.bert(input_ids, "
                                    "attention_mask).last_hidden_state (no queries, no cross-attention)",
        "outputs.text.text_embeds_proj": "[B,L,E] extract_features(mode='text').text_embeds_proj: "
                                         "normalize(text_proj(text_embeds)) (every token; ITC uses [:,0])",
        "outputs.multimodal.multimodal_embeds": "[B,Q,D] extract_features(mode='multimodal').multimodal_embeds: "
                                                "Qformer.bert(input_ids, query_embeds=query_tokens, attention_mask="
                                                "cat[ones(Q), attention_mask], encoder_hidden_states="
                                                "image_embeds_frozen).last_hidden_state[:, :Q]",
        "outputs.sims": "[B_img,B_txt] max over queries of image_embeds_proj[i] @ text_embeds_proj[j,0] "
                        "(LAVIS's ITC similarity)",
    }
    qcfg = model.Qformer.config
    info = {
        "lavis_name": "blip2_feature_extractor", "lavis_model_type": model_type,
        "lavis_class": f"{cls.__module__}.{cls.__qualname__}",
        "lavis_config": f"{cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]} + overrides",
        "config_overrides": {k: cfg[k] for k in ("image_size", "vit_precision", "num_query_token",
                                                 "cross_attention_freq", "drop_path_rate", "use_grad_checkpoint")},
        "vit_model": cfg.get("vit_model", "eva_clip_g"),
        "vision": ({**EVA_SIZES, "mlp": int(EVA_SIZES["width"] * EVA_SIZES["mlp_ratio"]), "layer_norm_eps": 1e-6,
                    "hidden_act": "gelu (exact)", "qkv_bias": "q_bias and v_bias only (k bias = 0)",
                    "final_norm": False, "num_tokens": (EVA_SIZES["image_size"] // EVA_SIZES["patch_size"]) ** 2 + 1}
                   if model_type == "pretrain" else
                   {**CLIP_SIZES, "residual_blocks": CLIP_SIZES["layers"] - 1, "mlp": 4 * CLIP_SIZES["width"],
                    "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "conv1_bias": False, "ln_pre": True,
                    "ln_post": False, "attention": "torch.nn.MultiheadAttention (in_proj_weight [3D,D], out_proj)",
                    "num_tokens": (CLIP_SIZES["image_size"] // CLIP_SIZES["patch_size"]) ** 2 + 1}),
        "ln_vision_eps": model.ln_vision.eps,
        "qformer": {"hidden_size": qcfg.hidden_size, "num_hidden_layers": qcfg.num_hidden_layers,
                    "num_attention_heads": qcfg.num_attention_heads, "intermediate_size": qcfg.intermediate_size,
                    "max_position_embeddings": qcfg.max_position_embeddings, "vocab_size": qcfg.vocab_size,
                    "encoder_width": qcfg.encoder_width, "cross_attention_freq": qcfg.cross_attention_freq,
                    "cross_attention_layers": [i for i in range(qcfg.num_hidden_layers)
                                               if i % qcfg.cross_attention_freq == 0],
                    "num_query_token": qcfg.query_length, "layer_norm_eps": qcfg.layer_norm_eps,
                    "hidden_act": qcfg.hidden_act},
        "embed_dim": model.vision_proj.out_features,
        "max_txt_len": model.max_txt_len,
        "tokenizer": {"vocab_size_with_specials": len(model.tokenizer), "pad_token_id": model.tokenizer.pad_token_id,
                      "cls_token_id": model.tokenizer.cls_token_id, "sep_token_id": model.tokenizer.sep_token_id,
                      "dec_token_id": model.tokenizer.bos_token_id},
        "temp": TEMP,
        "eval_mode": True,
    }
    return model, _state(model), io, {"info": info, "docs": docs}


# ------------------------------------------------------------------------------------------------ main


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("salesforce-lavis", "torch", "transformers", "timm", "numpy", "safetensors")}


def write_fixtures(out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "generator": "tools/lavis_fixtures.py (make lavis-fixtures, inside .venv-lavis)",
        "seed": SEED, "perturb_std": PERTURB_STD, "temp": TEMP, "captions": CAPTIONS, "vocab": VOCAB,
        "dtype": "float32", "device": "cpu", "versions": _versions(), "full_sizes": FULL_SIZES,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        vocab_dir = tmp_path / "bert-tiny-vocab"
        vocab_dir.mkdir()
        (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        builders: list[tuple[str, Callable[[], Any]]] = [
            ("blip_retrieval", lambda: blip_retrieval(tmp_path)),
            ("blip2_pretrain", lambda: blip2_qformer("pretrain")),
            ("blip2_pretrain_vitL", lambda: blip2_qformer("pretrain_vitL")),
        ]
        with offline_lavis(vocab_dir):
            for name, build in builders:
                _, state, io, extra = build()
                meta = {"model": name, "generator": "tools/lavis_fixtures.py"}
                sha_state = _save(state, out / f"{name}.state.safetensors", {**meta, "content": "lavis state_dict"})
                sha_io = _save(io, out / f"{name}.io.safetensors", {**meta, "content": "inputs and outputs"})
                manifest["models"][name] = {
                    **extra["info"],
                    "files": {"state": f"{name}.state.safetensors", "io": f"{name}.io.safetensors"},
                    "sha256": {"state": sha_state, "io": sha_io},
                    "state_keys": len(state),
                    "io": _spec(io, extra["docs"]),
                }
                print(f"{name}: {len(state)} state tensors, {len(io)} io tensors")
    (out / "lavis_fixtures.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/lavis"), help="output folder")
    args = parser.parse_args(argv)
    write_fixtures(args.out)
    for p in sorted(args.out.iterdir()):
        print(f"{p.stat().st_size:>9}  {hashlib.sha256(p.read_bytes()).hexdigest()}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
