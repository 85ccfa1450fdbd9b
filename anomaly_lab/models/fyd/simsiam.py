"""Dense non-contrastive learning: FYD's fine alignment stage (Zheng et al. 2022, Eq. 3-4, Algorithm 1).

A SimSiam-style (Chen and He 2020) encoder f (three 1x1 convolutions) and predictor g (two 1x1
convolutions) act on every position of a feature map; the loss is the symmetric negative cosine
similarity between the prediction of one image and the (stop-gradient) encoding of another image
at the same position.

Eq. 3 writes the cosine's denominator with ||m|| instead of ||g(m)||; we follow Algorithm 1 (the
cosine similarity of p = g(f(x)) and z = f(x'), i.e. SimSiam's D). Eq. 4 sums over the batch and
positions, Algorithm 1 averages; we average, so the loss is in [-1, 1] whatever the batch and map size
(the sum is the mean times a constant, which lambda_2 of Eq. 5 absorbs). The paper gives neither the
widths nor the normalisation layers; we take SimSiam's: batch norm after every layer but the
predictor's last, ReLU between layers, a bottleneck predictor (`predictor_hidden`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) of Algorithm 1: minus the cosine similarity over channels (dim 1) of [B, C, H, W] maps,
    averaged over the batch and every position; z is detached (stop-gradient)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def symmetric_negative_cosine(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """L_FAS of Eq. 4 (averaged): D(p1, z2) / 2 + D(p2, z1) / 2, each target branch stop-gradient."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


def _conv_bn(in_channels: int, out_channels: int, relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class DenseSimSiam(nn.Module):
    """Encoder f (3 layers of 1x1 conv) and predictor g (2 layers of 1x1 conv) over [B, C, H, W] maps.

    `forward(x, partner)` returns L_FAS for the pairs (x[b], x[partner[b]]): Algorithm 1 with the
    shuffled copy x2 = x[partner]. f and g work per sample and per position (batch norm statistics
    are those of the whole batch, which a permutation does not change), so f(x[partner]) =
    f(x)[partner]: each map is encoded once.
    """

    def __init__(self, in_channels: int, dim: int = 256, predictor_hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_bn(in_channels, dim, relu=True), *_conv_bn(dim, dim, relu=True), *_conv_bn(dim, dim, relu=False)
        )
        self.predictor = nn.Sequential(*_conv_bn(dim, predictor_hidden, relu=True), nn.Conv2d(predictor_hidden, dim, 1))

    def forward(self, x: Tensor, partner: Tensor) -> Tensor:
        z = self.encoder(x)
        p = self.predictor(z)
        return symmetric_negative_cosine(p, z, p[partner], z[partner])
