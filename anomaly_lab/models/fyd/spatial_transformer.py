"""Spatial transformers (Jaderberg et al. 2015) as used by FYD's coarse alignment (Zheng et al. 2022).

A small localisation network regresses the affine matrix of Eq. 1 of FYD from its input, and the
input is resampled through it. FYD's supplement (Fig. 4) fixes the localisation structure: two 3x3
convolutions each followed by max-pooling, then two fully connected layers; the last one outputs
either one rotation angle (ICA, image level) or the 6 parameters of an affine map (FCA, feature
level). The last layer starts at zero weights and the identity's parameters, so the transformer is
exactly the identity at initialisation.

The paper is silent on widths and on how the conv output is brought to a fixed size for the fully
connected layers: `conv_channels`, `hidden` and `pool_size` (adaptive average pooling) are choices.

Matrices act on normalised coordinates (-1..1, ``align_corners=False``), mapping output positions
to the input positions they sample, as `torch.nn.functional.affine_grid` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly_lab.errors import ConfigError

TRANSFORM_KINDS = ("rotation", "affine")
# grid_sample's fill for positions outside the input. With "zeros" a rotation brings dark corners in,
# and an alignment loss can then be lowered by moving content out of the frame instead of aligning it.
PADDING_MODES = ("border", "reflection", "zeros")


def rotation_matrix(angle: Tensor) -> Tensor:
    """[B] angles (radians) -> [B, 2, 3] rotations about the centre, without translation (ICA's M)."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def warp(x: Tensor, theta: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Resample [B, C, H, W] through [B, 2, 3] matrices (bilinear): out(p) = x(theta @ [p, 1])."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _homogeneous(theta: Tensor) -> Tensor:
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def invert_affine(theta: Tensor) -> Tensor:
    """The inverse of [B, 2, 3] affine matrices (as 3x3 homogeneous maps, `torch.linalg.inv`, on their device)."""
    return torch.linalg.inv(_homogeneous(theta))[:, :2]


def compose_affine(outer: Tensor, inner: Tensor) -> Tensor:
    """[B, 2, 3] matrix of p -> outer(inner(p)): warping by `outer` then by `inner` samples through this."""
    return (_homogeneous(outer) @ _homogeneous(inner))[:, :2]


class SpatialTransformer(nn.Module):
    """Localisation network + resampler; `forward(x) -> (warped x, theta [B, 2, 3])`.

    `kind="rotation"`: the network outputs one angle (FYD's ICA); `kind="affine"`: the 6 entries of
    the matrix (FYD's FCA). `padding_mode` is that of `grid_sample` for positions outside the input
    (`PADDING_MODES`).
    """

    def __init__(
        self,
        in_channels: int,
        kind: str = "affine",
        conv_channels: tuple[int, int] = (8, 16),
        hidden: int = 32,
        pool_size: int = 4,
        padding_mode: str = "border",
    ):
        super().__init__()
        if kind not in TRANSFORM_KINDS:
            raise ConfigError(f"spatial transformer kind={kind!r}: expected one of {TRANSFORM_KINDS}")
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"model.stn_padding={padding_mode!r}: expected one of {PADDING_MODES}")
        self.kind = kind
        self.padding_mode = padding_mode
        c1, c2 = conv_channels
        self.localisation = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(),
            nn.Linear(c2 * pool_size * pool_size, hidden), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(hidden, 1 if kind == "rotation" else 6)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.zeros(1) if kind == "rotation" else torch.tensor([1.0, 0, 0, 0, 1, 0]))

    def theta(self, x: Tensor) -> Tensor:
        """The [B, 2, 3] matrices the localisation network regresses for x."""
        out = self.head(self.localisation(x))
        if self.kind == "rotation":
            return rotation_matrix(out[:, 0])
        return out.view(-1, 2, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.theta(x)
        return warp(x, theta, self.padding_mode), theta
