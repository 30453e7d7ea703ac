"""The image transforms of the papers, by name (PIL RGB image in, float tensor ``[3, S, S]`` out).

=============  ==========================================================================  ===========
name           pipeline (S = ``image_size``, R = round(S * 256 / 224), e.g. 256 for 224)     normalize
=============  ==========================================================================  ===========
``targetpad``  TargetPad(1.25) -> Resize(S, bicubic, shorter side) -> CenterCrop(S); same   clip
               for train and eval (CLIP4Cir ``targetpad_transform``, used by Candidate
               Re-ranking and CaLa)
``squarepad``  SquarePad -> Resize(S, bicubic) -> CenterCrop(S) (CLIP4Cir alternative)       clip
``amc``        train: Resize((R, R)) -> RandomCrop(S) -> RandomHorizontalFlip; eval:         imagenet
               Resize((R, R)) -> CenterCrop(S) (AMC Fashion-IQ ``train.py``; the resize
               does not keep the aspect ratio)
``amc_shoes``  Resize((R, R)) -> CenterCrop(S) for train and eval (AMC Shoes: no             imagenet
               augmentation)
``amc_eval``   Resize(R, shorter side) -> CenterCrop(S) (AMC's standalone ``eval.py``, which  imagenet
               differs from its in-training validation; record which one a number used)
``resize``     Resize((S, S))                                                                imagenet
``tensor``     ToTensor only: any size, values in [0, 1] (the loaders' default)              none
=============  ==========================================================================  ===========

``normalize`` is "imagenet", "clip" or "none"; None picks the column above. torchvision is imported when a transform
is built, never at module import.
"""
from __future__ import annotations

from typing import Any, Callable

from cirlab.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD), "none": None}
TARGET_RATIO = 1.25  # CLIP4Cir / re-ranking / CaLa default


def _pad(image: Any, hp: int, vp: int) -> Any:
    """Black border of ``hp`` columns left and right and ``vp`` rows top and bottom (torchvision F.pad, fill 0)."""
    from PIL import Image

    if hp == 0 and vp == 0:
        return image
    w, h = image.size
    out = Image.new(image.mode, (w + 2 * hp, h + 2 * vp), 0)
    out.paste(image, (hp, vp))
    return out


class TargetPad:
    """Pad an elongated image with black bars towards aspect ratio ``target_ratio`` (not to a square).

    Images whose ratio ``max(w, h) / min(w, h)`` is already below the target are returned unchanged. Otherwise the
    short side is padded by ``int((max(w, h) / r - side) / 2)`` on each end, the truncating arithmetic of CLIP4Cir
    (so the result can fall a pixel or two short of the exact ratio).
    """

    def __init__(self, target_ratio: float = TARGET_RATIO) -> None:
        self.target_ratio = target_ratio

    def padding(self, w: int, h: int) -> tuple[int, int]:
        """(horizontal, vertical) padding per side for a ``w`` x ``h`` image."""
        if max(w, h) / min(w, h) < self.target_ratio:
            return 0, 0
        scaled = max(w, h) / self.target_ratio
        return max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)

    def __call__(self, image: Any) -> Any:
        return _pad(image, *self.padding(*image.size))

    def __repr__(self) -> str:
        return f"TargetPad(target_ratio={self.target_ratio})"


class SquarePad:
    """Pad with black bars to (almost) a square: ``int((max(w, h) - side) / 2)`` per end, CLIP4Cir's arithmetic
    (an odd difference leaves the result one pixel short of square; the following centre crop squares it)."""

    def padding(self, w: int, h: int) -> tuple[int, int]:
        side = max(w, h)
        return int((side - w) / 2), int((side - h) / 2)

    def __call__(self, image: Any) -> Any:
        return _pad(image, *self.padding(*image.size))

    def __repr__(self) -> str:
        return "SquarePad()"


def _to_rgb(image: Any) -> Any:
    """A PIL image given straight to a transform is made RGB by the loaders' rule (16-bit scaled, transparency on
    white: :func:`cirlab.data.base.to_rgb`), not by ``convert("RGB")``, which clips and drops alpha."""
    from cirlab.data.base import to_rgb

    return to_rgb(image) if getattr(image, "mode", "RGB") != "RGB" else image


def _resize_size(image_size: int) -> int:
    # AMC resizes to 256 and crops 224; keep that 256/224 ratio at other sizes
    return int(round(image_size * 256 / 224))


def _pipeline(name: str, size: int, train: bool) -> list[Any]:
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    big = _resize_size(size)
    if name == "targetpad":
        return [TargetPad(TARGET_RATIO), T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    if name == "squarepad":
        return [SquarePad(), T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    if name == "amc":
        if train:
            return [T.Resize([big, big]), T.RandomCrop(size), T.RandomHorizontalFlip()]
        return [T.Resize([big, big]), T.CenterCrop(size)]
    if name == "amc_shoes":
        return [T.Resize([big, big]), T.CenterCrop(size)]
    if name == "amc_eval":
        return [T.Resize(big), T.CenterCrop(size)]
    if name == "resize":
        return [T.Resize([size, size])]
    if name == "tensor":
        return []
    raise ConfigError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")


# name -> default normalisation
TRANSFORMS: dict[str, str] = {
    "targetpad": "clip", "squarepad": "clip", "amc": "imagenet", "amc_shoes": "imagenet", "amc_eval": "imagenet",
    "resize": "imagenet", "tensor": "none",
}


# transforms whose training variant draws at random (a crop, a flip): no two epochs see the same view of an image
RANDOM_IN_TRAINING = frozenset({"amc"})


def is_random(name: str, train: bool) -> bool:
    """Whether ``build_transform(name, train=train)`` can give two different tensors for the same image."""
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return train and name in RANDOM_IN_TRAINING


def list_transforms() -> list[str]:
    return list(TRANSFORMS)


def build_transform(name: str, image_size: int = 224, train: bool = False,
                    normalize: str | None = None) -> Callable[[Any], Any]:
    """A named paper transform: PIL image -> float tensor ``[3, image_size, image_size]``.

    Args:
        name: one of :data:`TRANSFORMS` (table in the module doc).
        image_size: output side S.
        train: training variant (only ``amc`` differs: random crop + horizontal flip).
        normalize: "imagenet" | "clip" | "none"; None = the transform's paper default.
    """
    from torchvision import transforms as T

    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    norm = TRANSFORMS[name] if normalize is None else normalize
    if norm not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {normalize!r}; known: {', '.join(NORMALIZATIONS)}")
    steps = [_to_rgb, *_pipeline(name, image_size, train), T.ToTensor()]
    if NORMALIZATIONS[norm] is not None:
        steps.append(T.Normalize(*NORMALIZATIONS[norm]))
    return T.Compose(steps)


def default_transform() -> Callable[[Any], Any]:
    """ToTensor only: float ``[3, H, W]`` in [0, 1], any size (pass a sized transform to batch mixed sizes)."""
    return build_transform("tensor")
