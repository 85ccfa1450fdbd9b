"""AnoMem's losses, scores and networks (Jezequel et al. 2023), as pure functions and small modules.

Notation of the paper: y = 1 means normal. These functions take a boolean `normal` mask instead, so
that a caller passes ``batch.label == 0`` (the Batch's label 1 means anomalous).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly_lab.errors import ConfigError
from anomaly_lab.nn.backbones import load_backbone

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
STEMS = ("imagenet", "cifar")
VARIANCE_AXES = ("batch", "sample")
VARIANCE_EPS = 1e-4  # inside the square root of Eq. 6, so that its gradient stays finite at zero variance


def mem(z: Tensor, retrieved: Tensor, normal: Tensor) -> Tensor:
    """Eq. 3: Mem(z, y) = y HF(z) + (1 - y) z. z, retrieved (= HF(z)) [..., B, D]; normal [B] bool."""
    return torch.where(normal.unsqueeze(-1), retrieved, z)


def variance_loss(retrieved: Tensor, normal: Tensor, axis: str = "batch") -> Tensor:
    """Eq. 6, L_V = -1/sum_k y_k sum_k y_k sqrt(Var[Mem(z_k, y_k)]), over the normal samples only
    (Mem(z_k, 1) = HF(z_k) = `retrieved` [..., B, D]); normal [B] bool -> [...] (0 without normals).

    The paper does not say over what Var runs. axis="sample": the variance of each retrieved vector
    over its D components, as Eq. 6 is written (one term per sample). axis="batch": the variance of
    each component over the normal samples (what must not vanish when the prototypes collapse to one
    point, the failure the loss is introduced for; VICReg's form), averaged over the components.
    Population variances; `VARIANCE_EPS` is added under the root.
    """
    if axis not in VARIANCE_AXES:
        raise ConfigError(f"model.variance_axis={axis!r} must be one of {', '.join(VARIANCE_AXES)}")
    if not bool(normal.any()):
        return retrieved.new_zeros(retrieved.shape[:-2])
    chosen = retrieved[..., normal, :]
    if axis == "sample":
        return -torch.sqrt(chosen.var(dim=-1, correction=0) + VARIANCE_EPS).mean(dim=-1)
    return -torch.sqrt(chosen.var(dim=-2, correction=0) + VARIANCE_EPS).mean(dim=-1)


def double_hinge(distance: Tensor, normal: Tensor, margin: float) -> Tensor:
    """Eq. 11, per sample: y max(d - 1/M, 0) + (1 - y) max(M - d, 0); normal [B] bool (y = 1)."""
    return torch.where(normal, (distance - 1 / margin).clamp_min(0), (margin - distance).clamp_min(0))


def merge_scales(scores: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Eq. 13: sum_s lambda^(s) s^(s) / sum_s lambda^(s), for scores of one shape."""
    return sum(w * s for w, s in zip(weights, scores, strict=True)) / sum(weights)


def sample_positions(height: int, width: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Omega of Eq. 7: floor(H W r) flat positions of an H x W map drawn without replacement (at least 1)."""
    count = max(1, math.floor(height * width * ratio))
    return torch.randperm(height * width, generator=generator)[:count]


def nearest_prototype(z: Tensor, prototypes: Tensor) -> Tensor:
    """The closest (L2) prototype of each vector: z [N, D], prototypes [D, K] -> [N, D] (the k-means
    baseline of Table 4 uses this in place of the Hopfield retrieval)."""
    return prototypes.T[torch.cdist(z, prototypes.T).argmin(dim=-1)]


def kmeans(vectors: Tensor, k: int, iterations: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means: centroids [D, k] of vectors [N, D], initialised on k distinct vectors drawn with
    `generator`; an emptied cluster keeps its centroid."""
    if len(vectors) < k:
        raise ConfigError(f"k-means needs at least {k} vectors (the memory size) and got {len(vectors)}")
    centroids = vectors[torch.randperm(len(vectors), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = torch.cat([torch.cdist(chunk, centroids).argmin(dim=1) for chunk in vectors.split(8192)])
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids.T.contiguous()


class ResNetStages(nn.Module):
    """A torchvision ResNet cut after the last of `layers`; `forward(x)` -> the maps of `layers`.

    stem="cifar" replaces the 7x7 stride-2 convolution and the max pool with one 3x3 stride-1
    convolution (SimCLR's CIFAR variant), so that 32 px images keep 4 x 4 maps after layer4.
    """

    def __init__(self, arch: str, weights: str | None, layers: Sequence[str], stem: str = "imagenet"):
        super().__init__()
        layers = list(layers)
        if not layers or any(name not in RESNET_LAYERS for name in layers):
            raise ConfigError(f"model.layers={layers}: expected a non-empty list out of {list(RESNET_LAYERS)}")
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} must be one of {', '.join(STEMS)}")
        net = load_backbone(arch, weights)
        if not all(hasattr(net, name) for name in ("conv1", "bn1", "relu", "maxpool", *RESNET_LAYERS)):
            raise ConfigError(f"model.backbone={arch!r}: AnoMem needs a torchvision ResNet (resnet18, resnet50, ...)")
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.layers = layers
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        depth = max(RESNET_LAYERS.index(name) for name in layers) + 1
        self.blocks = nn.ModuleDict({name: getattr(net, name) for name in RESNET_LAYERS[:depth]})
        self.channels = [self._out_channels(self.blocks[name]) for name in layers]

    @staticmethod
    def _out_channels(block: nn.Sequential) -> int:
        last = block[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: Tensor) -> list[Tensor]:
        x, features = self.stem(x), []
        for name, block in self.blocks.items():
            x = block(x)
            if name in self.layers:
                features.append(x)
        return features


class DistanceHead(nn.Module):
    """g^(s) o phi of Eq. 10: average pooling to `pool_size` x `pool_size`, then a two-layer MLP with one
    output, the anomaly distance."""

    def __init__(self, channels: int, pool_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(),
            nn.Linear(channels * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, deviation: Tensor) -> Tensor:
        return self.net(deviation).squeeze(-1)


def fit_linear_probe(features: Tensor, targets: Tensor, num_classes: int, steps: int,
                     weight_decay: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression (L-BFGS, `steps` iterations, L2 `weight_decay`) on frozen
    features [N, D] -> (weight [K, D], bias [K]); the linear evaluation protocol of Table 4(a)."""
    weight = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()
