"""SSAE's training objectives (Bauer 2022, section 3.1), as pure functions of tensors [B, C, H, W].

F(X-hat) is the network's output on the corrupted image, X the original, M the binary mask of the
corrupted pixels (given [B, 1, H, W], it counts once per colour channel, as M in {0, 1}^{n x m x 3}
does) and M-bar = 1 - M. Norms are taken per image over all pixels and channels; the loss of a
batch is the mean over its images.
"""

from __future__ import annotations

from torch import Tensor


def weighted_norm(weight: Tensor, residual: Tensor) -> Tensor:
    """Per image: ||weight (.) residual||_2 / ||weight||_1, with weight >= 0 broadcast to the residual."""
    weight = weight.expand_as(residual)
    numerator = (weight * residual).flatten(1).norm(p=2, dim=1)
    return numerator / weight.flatten(1).sum(dim=1).clamp_min(1e-12)


def objective_eq1(output: Tensor, target: Tensor, mask: Tensor, lam: float = 0.5) -> Tensor:
    """Eq. 1: lam / ||M-bar||_1 * ||M-bar (.) (F(X-hat) - X)||_2 + (1 - lam) / ||M||_1 * ||M (.) (F(X-hat) - X)||_2."""
    residual = output - target
    return (lam * weighted_norm(1 - mask, residual) + (1 - lam) * weighted_norm(mask, residual)).mean()


def objective_eq3(output: Tensor, target: Tensor, corrupted: Tensor, mask: Tensor, lam: float = 0.5) -> Tensor:
    """Eq. 3: lam / ||M-bar||_1 * ||M-bar (.) (F(X-hat) - X)||_2
    - (1 - lam) / ||X-hat - X||_1 * || |X-hat - X| (.) (F(X-hat) - X) ||_2.

    The real-valued mask |X-hat - X| weighs the reward for a large error inside the corruption by how
    much each pixel was actually changed; the corruption guarantees ||X-hat - X||_1 > 0.
    """
    residual = output - target
    change = (corrupted - target).abs()
    return (lam * weighted_norm(1 - mask, residual) - (1 - lam) * weighted_norm(change, residual)).mean()
