"""Tiny deterministic models implementing the cirlab model contract, for engine tests only.

Importing this module registers ``stub_cir`` (task "cir") and ``stub_itm`` (task "itm") in cirlab's registry.
Also provides small in-memory datasets in the data contract's item format.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core.config import PresetMixin
from cirlab.models.registry import register_model
from cirlab.core.tracing import emit

TEXT_BUCKETS = 64


def text_features(texts: list[str]) -> torch.Tensor:
    """Hashed character-trigram counts (crc32, stable across processes): [B, TEXT_BUCKETS]."""
    out = torch.zeros(len(texts), TEXT_BUCKETS)
    for row, text in enumerate(texts):
        padded = f"  {text.lower()} "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i:i + 3].encode()) % TEXT_BUCKETS] += 1.0
    return out


@dataclass
class StubConfig(PresetMixin):
    embed_dim: int = 16  # retrieval space
    image_size: int = 8  # images are [3, image_size, image_size]
    dropout: float = 0.0  # dropout on the query features (exercises the RNG in resume tests)
    loss: str = "contrastive"  # contrastive (in-batch CE) | cosine (per-sample, so DDP == single process)
    region_dim: int = 12  # ITM: region feature size
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}, "tiny_dropout": {"dropout": 0.2}}


class StubCIR(nn.Module):
    def __init__(self, config: StubConfig) -> None:
        super().__init__()
        self.config = config
        pixels = 3 * config.image_size ** 2
        self.image = nn.Linear(pixels, config.embed_dim)
        self.text = nn.Linear(TEXT_BUCKETS, config.embed_dim)
        self.router = nn.Linear(config.embed_dim, 3)
        self.dropout = nn.Dropout(config.dropout)
        self.epochs_started: list[int] = []

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images.flatten(1)), dim=-1)

    def encode_query(self, ref_images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        img = self.image(ref_images.flatten(1))
        txt = self.text(text_features(texts).to(img.device))
        gates = torch.softmax(self.router(img + txt), dim=-1)  # [B, 3]
        emit(self.router, "layer1", gates, experts=["nin", "crn", "gtn"], paper_names={"nin": "NIN"})
        fused = gates[:, :1] * img + gates[:, 1:2] * txt + gates[:, 2:] * (img * txt)
        return F.normalize(self.dropout(fused), dim=-1)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        q = self.encode_query(batch["ref_image"], batch["text"])
        t = self.encode_target(batch["target_image"])
        if self.config.loss == "cosine":
            loss = (1.0 - (q * t).sum(-1)).mean()
        else:
            logits = 10.0 * q @ t.T
            loss = F.cross_entropy(logits, torch.arange(len(q), device=q.device))
        return {"rank_loss": loss, "aux_loss": 0.01 * q.pow(2).mean(), "pos_sim": (q * t).sum(-1).mean().detach()}

    def default_train_config(self) -> dict[str, Any]:
        return {"lr": 1e-2, "epochs": 2, "batch_size": 8, "schedule": "constant", "selection_metric": "R@1"}

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_started.append(epoch)

    def image_transform(self, train: bool) -> Any:
        from torchvision import transforms

        size = self.config.image_size
        steps = [transforms.Resize((size, size))] + ([transforms.RandomHorizontalFlip()] if train else [])
        return transforms.Compose(steps + [transforms.ToTensor()])


class StubITM(nn.Module):
    """A cross-scoring ITM stub: ``score`` needs every (image, caption) pair."""

    def __init__(self, config: StubConfig) -> None:
        super().__init__()
        self.config = config
        self.image = nn.Linear(config.region_dim, config.embed_dim)
        self.text = nn.Linear(TEXT_BUCKETS, config.embed_dim)

    def encode_image(self, image_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(image_feats).mean(1), dim=-1)  # [B, D]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.text(text_features(texts).to(self.text.weight.device)), dim=-1)

    def score(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return image_feats @ text_feats.T  # [Ni, Nt]

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = self.score(self.encode_image(batch["image_feats"]), self.encode_text(batch["text"]))
        labels = torch.arange(len(s), device=s.device)
        return {"itm_loss": F.cross_entropy(10 * s, labels) + F.cross_entropy(10 * s.T, labels)}

    def default_train_config(self) -> dict[str, Any]:
        return {"lr": 1e-2, "epochs": 1, "batch_size": 8}


@register_model("stub_cir", task="cir", config_cls=StubConfig)
def _build_cir(config: StubConfig) -> StubCIR:
    return StubCIR(config)


@register_model("stub_itm", task="itm", config_cls=StubConfig)
def _build_itm(config: StubConfig) -> StubITM:
    return StubITM(config)


# ------------------------------------------------------------------------------------------------ datasets

COLOURS = ["red", "green", "blue", "yellow"]


class TripletItems(torch.utils.data.Dataset):
    """Training items as ``CIRSplit.triplet_dataset`` yields them; a random noise augmentation uses torch's RNG."""

    def __init__(self, n: int = 24, image_size: int = 8, seed: int = 0, noise: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, image_size, image_size, generator=g)
        self.colours = torch.randint(0, len(COLOURS), (n,), generator=g)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        target = i  # the target is the clean reference: learnable in a few steps
        ref = self.images[i] + self.noise * torch.randn_like(self.images[i])  # augmentation: needs the RNG
        return {"query_id": f"q{i}", "ref_image": ref, "text": f"make it {COLOURS[int(self.colours[target])]}",
                "target_image": self.images[target], "category": "all"}
