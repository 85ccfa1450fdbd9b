"""Overlapping square patches: grid sizes, unfolding images into patches, folding patch scores to pixels.

A patch grid of `size` and `stride` over a length L has (L - size) / stride + 1 patches along it;
`grid_size` requires this to be exact, so that the patches cover every pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly_lab.errors import ConfigError


def grid_size(length: int, size: int, stride: int, option: str = "patch") -> int:
    """Number of patches of `size`, `stride` apart, that tile `length` exactly (ConfigError otherwise)."""
    if size < 1 or stride < 1 or size > length or (length - size) % stride:
        raise ConfigError(
            f"{option}: patches of {size} px, {stride} px apart, must tile {length} px exactly "
            f"((length - size) divisible by the stride)"
        )
    return (length - size) // stride + 1


def no_shared_pixel_skip(size: int, stride: int) -> int:
    """Grid cells to skip so that a patch and the one it predicts share no pixel: ceil(size / stride) - 1
    (1 for 50 % overlap), Greedy InfoMax's `skip_step`."""
    return -(-size // stride) - 1


def unfold_patches(images: Tensor, size: int, stride: int) -> Tensor:
    """Every patch of [B, C, H, W] as a view [B, ny, nx, C, size, size] (no copy)."""
    grid_size(images.shape[-2], size, stride)
    grid_size(images.shape[-1], size, stride)
    return images.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


def fold_patches(patches: Tensor, stride: int) -> Tensor:
    """Sum patches [B, ny, nx, h, w], laid out `stride` apart, into the map they cover: [B, H, W]."""
    batch, ny, nx, h, w = patches.shape
    columns = patches.permute(0, 3, 4, 1, 2).reshape(batch, h * w, ny * nx)
    out_size = ((ny - 1) * stride + h, (nx - 1) * stride + w)
    return F.fold(columns, out_size, (h, w), stride=stride).squeeze(1)


def average_patch_scores(scores: Tensor, size: int, stride: int, weights: Tensor | None = None) -> Tensor:
    """Per-pixel (weighted) mean of the scores [B, ny, nx] of the patches covering it: [B, 1, H, W].

    `weights` [B, ny, nx] (default 1) weigh the patches: with scores that are means over several
    instances and weights their counts, the result is the mean over all instances. The average is
    computed on cells of gcd(size, stride) pixels, inside which it is constant, and then repeated to
    pixels, so memory grows with the number of cells, not of pixels times patch area.
    """
    weights = torch.ones_like(scores) if weights is None else weights
    cell = math.gcd(size, stride)
    span = size // cell
    expand = (*scores.shape, span, span)
    total = fold_patches((scores * weights)[..., None, None].expand(expand), stride // cell)
    count = fold_patches(weights[..., None, None].expand(expand), stride // cell)
    mean = total / count
    return mean.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1).unsqueeze(1)
