"""Albumentations pipelines: resize, optional centre crop, augmentations, normalisation, tensor.

Masks passed with ``mask=`` follow their image through every geometric step; albumentations resizes
masks with nearest interpolation, so a binary mask stays binary.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2

from anomaly_lab.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_size(size: int | Sequence[int], option: str) -> tuple[int, int]:
    """An int or [h, w] as (h, w)."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"{option}={list(size)} must be a positive int or [height, width]")
    return size


def channel_stats(values: Sequence[float], channels: int, option: str) -> tuple[float, ...]:
    """`mean` or `std` for `channels` channels; with one channel an RGB triple is averaged."""
    values = tuple(float(v) for v in values) if isinstance(values, Sequence) else (float(values),)
    if channels not in (1, 3):
        raise ConfigError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB)")
    if channels == 1 and len(values) == 3:
        values = (sum(values) / 3,)
    if len(values) != channels:
        raise ConfigError(f"data.{option}={list(values)} must hold {channels} value(s), one per channel")
    return values


def build_transform(
    image_size: int | Sequence[int],
    crop_size: int | Sequence[int] | None = None,
    augmentations: Sequence[A.BasicTransform] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> A.Compose:
    """Resize -> [CenterCrop] -> augmentations -> [ToGray] -> Normalize -> tensor [C, H, W].

    Input: an RGB uint8 image [H, W, 3] and an optional float mask [H, W]. `channels=1` converts
    images to one luminance channel after the augmentations (so colour augmentations still apply).
    """
    steps: list[A.BasicTransform] = [A.Resize(*as_size(image_size, "data.image_size"))]
    if crop_size is not None:
        steps.append(A.CenterCrop(*as_size(crop_size, "data.crop_size")))
    steps.extend(augmentations or [])
    if channels == 1:
        steps.append(A.ToGray(num_output_channels=1, p=1.0))
    steps += [
        A.Normalize(mean=channel_stats(mean, channels, "mean"), std=channel_stats(std, channels, "std")),
        ToTensorV2(),
    ]
    return A.Compose(steps)
