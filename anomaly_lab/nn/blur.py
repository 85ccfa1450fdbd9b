"""Gaussian smoothing of anomaly maps."""

import math

from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur


def blur_maps(maps: Tensor, sigma: float) -> Tensor:
    """Smooth [B, 1, H, W] maps with a Gaussian of std `sigma` pixels (kernel truncated at 4 sigma)."""
    if sigma <= 0:
        return maps
    radius = min(math.ceil(4 * sigma), min(maps.shape[-2:]) - 1)  # reflect padding needs radius < size
    kernel = 2 * radius + 1
    return gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
