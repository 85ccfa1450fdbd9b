"""CPC-AD's scores (de Haan & Löwe 2021, sections 4 and 5): one per image from its sub-patch scores,
and the pixel map they cover."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anomaly_lab.models.cpc_ad.patches import average_patch_scores, fold_patches

IMAGE_SCORES = ("top_mean", "max", "mean")


def image_scores(scores: Tensor, reduction: str, top_fraction: float) -> Tensor:
    """One score per image from its sub-patch scores [B, ...]: mean of the top fraction, max, or mean."""
    flat = scores.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    top = max(1, math.ceil(top_fraction * flat.shape[1]))
    return flat.topk(top, dim=1).values.mean(dim=1)


def subpatch_map(scores: Tensor, patch_stride: int, subpatch_size: int, subpatch_stride: int) -> Tensor:
    """Pixel map of sub-patch scores [B, Py, Px, G, G] (section 5.2): every pixel gets the mean score of
    all the sub-patches (of all patches) covering it; [B, 1, H, W]."""
    step = patch_stride // subpatch_stride
    # Sum the scores of the patches' sub-patches on the image's sub-patch grid, then average per pixel.
    sums, counts = fold_patches(scores, step), fold_patches(torch.ones_like(scores), step)
    return average_patch_scores(sums / counts, subpatch_size, subpatch_stride, weights=counts)
