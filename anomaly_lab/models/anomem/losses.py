"""AnoMem's losses and score merging (Jezequel et al. 2023), as pure functions of tensors.

Notation of the paper: y = 1 means normal. These functions take a boolean `normal` mask instead, so
that a caller passes ``batch.label == 0`` (the Batch's label 1 means anomalous).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from anomaly_lab.errors import ConfigError

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
