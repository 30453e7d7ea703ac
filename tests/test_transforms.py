"""Paper transforms: padding math against a naive per-pixel reference on odd sizes, pipelines, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cirlab.data.transforms import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SquarePad, TargetPad,
                                    build_transform, default_transform, list_transforms)


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))  # no black pixel inside


def _naive_pad(image: Image.Image, hp: int, vp: int) -> np.ndarray:
    """Reference: a black canvas, then copy every pixel one by one to (x + hp, y + vp)."""
    src = np.asarray(image)
    h, w = src.shape[:2]
    out = np.zeros((h + 2 * vp, w + 2 * hp, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            out[y + vp, x + hp] = src[y, x]
    return out


def _naive_targetpad_amounts(w: int, h: int, r: float) -> tuple[int, int]:
    # CLIP4Cir TargetPad, spelled out: no padding below the ratio; else truncate half of the missing length
    long_side, short_side = max(w, h), min(w, h)
    if long_side / short_side < r:
        return 0, 0
    scaled = long_side / r
    hp = int((scaled - w) / 2) if scaled > w else 0
    vp = int((scaled - h) / 2) if scaled > h else 0
    return hp, vp


@pytest.mark.parametrize("w,h", [(7, 3), (3, 7), (9, 7), (13, 5), (5, 5), (11, 2), (2, 11), (25, 19), (1, 3)])
def test_targetpad_matches_naive_reference(w, h):
    image = _random_image(w, h)
    hp, vp = _naive_targetpad_amounts(w, h, 1.25)
    np.testing.assert_array_equal(np.asarray(TargetPad(1.25)(image)), _naive_pad(image, hp, vp))


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 60), h=st.integers(1, 60), r=st.sampled_from([1.25, 1.5, 2.0]))
def test_targetpad_property(w, h, r):
    image = _random_image(w, h, seed=w * 100 + h)
    out = TargetPad(r)(image)
    hp, vp = _naive_targetpad_amounts(w, h, r)
    assert out.size == (w + 2 * hp, h + 2 * vp)
    np.testing.assert_array_equal(np.asarray(out), _naive_pad(image, hp, vp))
    ow, oh = out.size
    if max(w, h) / min(w, h) >= r:
        # the long side is never padded and the short side grows to within 2 px of long / r
        assert max(ow, oh) == max(w, h)
        assert max(w, h) / r - 2 < min(ow, oh) <= max(w, h) / r + 1e-9


@pytest.mark.parametrize("w,h", [(5, 8), (8, 5), (7, 7), (4, 9), (10, 3)])
def test_squarepad_matches_naive_reference(w, h):
    image = _random_image(w, h)
    side = max(w, h)
    hp, vp = (side - w) // 2, (side - h) // 2  # int() of a non-negative half = floor
    out = SquarePad()(image)
    np.testing.assert_array_equal(np.asarray(out), _naive_pad(image, hp, vp))
    assert abs(out.size[0] - out.size[1]) <= 1  # odd differences stay one pixel short of square (as CLIP4Cir)


def test_targetpad_pipeline_exact_bars():
    # 20x8 white: ratio 2.5 -> pad to height 16 (4 black rows each side), resize keeps 20x16, crop 16x16
    white = Image.new("RGB", (20, 8), (255, 255, 255))
    out = build_transform("targetpad", 16, normalize="none")(white)
    assert out.shape == (3, 16, 16)
    assert torch.all(out[:, :4] == 0) and torch.all(out[:, 12:] == 0)
    assert torch.allclose(out[:, 5:11], torch.ones(3, 6, 16), atol=1e-6)


@pytest.mark.parametrize("name", list_transforms())
@pytest.mark.parametrize("train", [False, True])
def test_every_transform_output_shape(name, train):
    t = build_transform(name, 12, train=train)
    for w, h in ((17, 9), (9, 17), (13, 13)):
        out = t(_random_image(w, h))
        expected = (3, h, w) if name == "tensor" else (3, 12, 12)
        assert out.shape == expected and out.dtype == torch.float32


@pytest.mark.parametrize("normalize,mean,std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD),
                                               ("clip", CLIP_MEAN, CLIP_STD), ("none", (0, 0, 0), (1, 1, 1))])
def test_normalisation_values(normalize, mean, std):
    white = Image.new("RGB", (9, 9), (255, 255, 255))
    out = build_transform("resize", 6, normalize=normalize)(white)
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(3, 1, 1).expand(3, 6, 6)
    assert torch.allclose(out, expected, atol=1e-5)


def test_paper_default_normalisation():
    white = Image.new("RGB", (9, 9), (255, 255, 255))
    clip = build_transform("targetpad", 6)(white)
    assert torch.allclose(clip[0], torch.full((6, 6), (1 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-5)
    amc = build_transform("amc", 6)(white)
    assert torch.allclose(amc[0], torch.full((6, 6), (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]), atol=1e-5)


def test_amc_train_is_random_and_eval_deterministic():
    image = _random_image(31, 23, seed=3)
    train, evaluate = build_transform("amc", 16, train=True), build_transform("amc", 16, train=False)
    torch.manual_seed(0)
    outs = [train(image) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(evaluate(image), evaluate(image))
    # amc_shoes has no augmentation even for training
    shoes = build_transform("amc_shoes", 16, train=True)
    assert torch.equal(shoes(image), shoes(image)) and torch.allclose(shoes(image), evaluate(image))


def test_amc_eval_keeps_aspect_ratio_unlike_amc():
    # 16x8 image: green | red | blue | green in quarters. amc squashes to 18x18 and keeps every quarter; amc_eval
    # resizes the short side (36x18) and crops the centre 16 columns = original x 4.4..11.6, so the green is cut away
    stripes = np.zeros((8, 16, 3), np.uint8)
    stripes[:, :4] = stripes[:, 12:] = (0, 255, 0)
    stripes[:, 4:8] = (255, 0, 0)
    stripes[:, 8:12] = (0, 0, 255)
    image = Image.fromarray(stripes)
    squashed = build_transform("amc", 16, normalize="none")(image)
    centred = build_transform("amc_eval", 16, normalize="none")(image)
    assert squashed[1, 8, 0] > 0.9 and squashed[1, 8, 15] > 0.9  # green edges survive the squash
    assert centred[0, 8, 0] > 0.9 and centred[2, 8, 15] > 0.9  # red left edge, blue right edge after the crop
    assert centred[1].max() < 0.5  # no green left


def test_default_transform_and_errors():
    image = _random_image(5, 3)
    out = default_transform()(image)
    assert out.shape == (3, 3, 5) and 0 <= out.min() and out.max() <= 1
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy() * 255, np.asarray(image), atol=1e-3)
    grey = build_transform("resize", 4)(Image.new("L", (6, 6), 128))
    assert grey.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="unknown transform"):
        build_transform("nope", 4)
    with pytest.raises(ValueError, match="unknown normalize"):
        build_transform("resize", 4, normalize="zscore")


def test_a_pil_image_given_to_a_transform_is_made_rgb_by_the_loaders_rule():
    # convert("RGB") would clip the 16-bit grey to white and show the red under the transparent pixel
    grey16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    out = build_transform("tensor")(grey16)
    assert out.shape == (3, 4, 4) and torch.allclose(out, torch.full_like(out, 128 / 255))
    cutout = Image.fromarray(np.array([[[255, 0, 0, 0]]], np.uint8), "RGBA")
    assert build_transform("tensor")(cutout)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
