"""Bringing anomaly maps to the input size and smoothing them, as one linear map per axis."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel_1d(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _axis_operator(length: int, size: int, sigma: float, radius: int, like: Tensor) -> Tensor:
    """[length, size]: linear resizing (align_corners=False) from `length` to `size` samples, then the
    Gaussian of std `sigma` truncated at `radius` with reflected borders, as a matrix (row i: the
    output of the i-th unit vector)."""
    rows = torch.eye(length, dtype=like.dtype, device=like.device).unsqueeze(1)  # [length, 1, length]
    if size != length:
        rows = F.interpolate(rows, size=size, mode="linear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel_1d(sigma, radius, like.dtype, like.device)
        rows = F.conv1d(F.pad(rows, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
    return rows.squeeze(1)


def resize_and_blur(maps: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """[B, 1, h, w] maps -> [B, 1, *size]: bilinear resizing (align_corners=False) then a Gaussian blur
    of std `sigma` pixels (0: none) truncated at 4 sigma, borders reflected.

    Both steps are linear and separable, so each axis is one matrix and the whole is two matrix
    products, A_h^T @ map @ A_w: several times faster on CPU than a one-channel convolution. They run
    in float32 with autocast disabled: under bf16 autocast the maps would round to 3 significant
    digits, tie close pixels, and the order of ties would follow the float rounding of each device.
    """
    height, width = int(size[0]), int(size[1])
    maps = maps.float()
    if sigma <= 0 and maps.shape[-2:] == (height, width):
        return maps
    radius = min(math.ceil(4 * sigma), height - 1, width - 1)  # reflect padding needs radius < size
    with torch.autocast(maps.device.type, enabled=False):
        rows = _axis_operator(maps.shape[-2], height, sigma, radius, maps)
        columns = _axis_operator(maps.shape[-1], width, sigma, radius, maps)
        return rows.T @ maps @ columns
