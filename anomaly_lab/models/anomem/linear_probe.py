"""The linear evaluation protocol of AnoMem's Table 4(a): a logistic regression on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
