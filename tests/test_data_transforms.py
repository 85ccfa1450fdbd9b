"""Transforms: sizes, binary masks that follow their images, normalisation, grayscale."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from anomaly_lab.data import IMAGENET_MEAN, IMAGENET_STD, build_transform
from anomaly_lab.data.transforms import channel_stats
from anomaly_lab.errors import ConfigError


def random_image_and_mask(h: int = 100, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = (rng.random((h, w)) > 0.7).astype(np.float32)
    return image, mask


@pytest.mark.parametrize(("image_size", "expected"), [(32, (32, 32)), ([37, 29], (37, 29))])
def test_resized_image_and_mask_have_the_size_and_the_mask_stays_binary(image_size, expected):
    image, mask = random_image_and_mask()
    out = build_transform(image_size)(image=image, mask=mask)
    assert out["image"].shape == (3, *expected) and out["image"].dtype == torch.float32
    assert out["mask"].shape == expected
    assert set(torch.unique(out["mask"]).tolist()) <= {0.0, 1.0}


def test_center_crop_after_resize():
    image, mask = random_image_and_mask()
    out = build_transform(64, crop_size=[48, 40])(image=image, mask=mask)
    assert out["image"].shape == (3, 48, 40) and out["mask"].shape == (48, 40)


def test_augmentations_move_the_mask_with_the_image():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :5] = 255
    mask = (image[..., 0] > 0).astype(np.float32)
    out = build_transform(20, augmentations=[A.HorizontalFlip(p=1.0)])(image=image, mask=mask)
    bright = out["image"][0] > 0
    assert torch.equal(bright, out["mask"] > 0) and bool(out["mask"][:, -5:].all())


def test_rgb_normalisation_uses_mean_and_std_per_channel():
    image = np.full((8, 8, 3), 128, np.uint8)
    out = build_transform(8)(image=image)["image"]
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected), atol=1e-4)


def test_grayscale_gives_one_channel_normalised_with_one_mean():
    image = np.full((8, 8, 3), 128, np.uint8)
    out = build_transform(8, mean=[0.5], std=[0.25], channels=1)(image=image)["image"]
    assert out.shape == (1, 8, 8)
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25), atol=1e-3)


def test_channel_stats_average_an_rgb_triple_for_one_channel_and_reject_mismatches():
    assert channel_stats(IMAGENET_MEAN, 1, "mean") == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    with pytest.raises(ConfigError, match="data.mean"):
        channel_stats([0.5, 0.5], 3, "mean")
    with pytest.raises(ConfigError, match="data.channels"):
        channel_stats([0.5], 2, "mean")
    with pytest.raises(ConfigError, match="data.image_size"):
        build_transform([32, 32, 3])
