"""Per-position multivariate Gaussians of feature maps and the Mahalanobis distance to them.

PaDiM and FYD (Eq. 6-7 of Zheng et al.) model the normal features at every position (i, j) of a
feature map with N(mu_ij, Sigma_ij) and score a test feature by its Mahalanobis distance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from anomaly_lab.nn.buffers import take_checkpoint_shapes


class PositionalGaussian(nn.Module):
    """One Gaussian per spatial position, fitted by streaming sums.

    `update` adds a batch of feature maps [B, D, H, W] to running float64 sums (count, sum and sum of
    outer products per position), in place, so memory does not grow with the number of images.
    `finalize` turns them into the mean and the inverse of Sigma + eps * I (eps = 0.01 in PaDiM, by
    Cholesky), stored as float32 buffers that travel with checkpoints; it works in place on the sums
    and inverts `inverse_chunk` positions at a time, so its peak is the sums, the float32 inverse and
    one chunk's temporaries.

    Fitting runs in float64 and scoring in float32 with autocast disabled, whatever the trainer's
    precision: under bf16 autocast the products of Eq. 7 would round to 3 significant digits and
    reorder close scores. Features that arrive in bf16 are scored as their float32 values.
    """

    inverse_chunk = 512

    def __init__(self, covariance_eps: float = 0.01):
        super().__init__()
        self.covariance_eps = covariance_eps
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        # [P, B, D], contiguous: batched products over a strided view are several times slower.
        x = features.flatten(2).permute(2, 0, 1).to(torch.float64, memory_format=torch.contiguous_format)
        if self._sum is None:
            positions, _, dims = x.shape
            self._sum = x.new_zeros(positions, dims)
            self._outer = x.new_zeros(positions, dims, dims)
        self._count += x.shape[1]
        self._sum += x.sum(dim=1)
        with torch.autocast(x.device.type, enabled=False):
            self._outer.baddbmm_(x.transpose(1, 2), x)  # += x^T x per position, without a temporary

    @torch.no_grad()
    def finalize(self, reduce_sum: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        """Mean and inverse covariance (Eq. 6, unbiased) from the sums, reduced over devices by `reduce_sum`."""
        if self._sum is None:
            raise RuntimeError("PositionalGaussian.finalize called before any update")
        count = reduce_sum(torch.tensor(float(self._count), dtype=torch.float64, device=self._sum.device))
        total, outer = reduce_sum(self._sum), reduce_sum(self._outer)
        if count < 2:
            raise ValueError(f"a Gaussian needs at least 2 normal images, got {int(count)}")
        with torch.autocast(total.device.type, enabled=False):
            mean = total / count
            # Sigma = (sum x x^T - n mu mu^T) / (n - 1) + eps I, overwriting the sum of outer products.
            covariance = outer.baddbmm_(mean.unsqueeze(2), mean.unsqueeze(1), alpha=-float(count)).div_(count - 1)
            covariance.diagonal(dim1=1, dim2=2).add_(self.covariance_eps)
            inv_covariance = torch.empty(covariance.shape, dtype=torch.float32, device=covariance.device)
            for start in range(0, covariance.shape[0], self.inverse_chunk):
                chunk = slice(start, start + self.inverse_chunk)
                # Cholesky (Sigma + eps I is symmetric positive definite): torch's batched LU
                # (linalg.inv) runs MKL's getrf on several threads at once for matrices above ~14
                # rows and fails with "Pivots given to lu_solve ..." (pytorch#141358).
                inv_covariance[chunk] = torch.cholesky_inverse(torch.linalg.cholesky(covariance[chunk]))
        self.mean = mean.float()
        self.inv_covariance = inv_covariance
        self.reset()

    def forward(self, features: Tensor) -> Tensor:
        """Mahalanobis distance (Eq. 7) of each position of [B, D, H, W] features: returns [B, H, W]."""
        batch, _, height, width = features.shape
        # [P, B, D] in float32 (a copy: the caller's features are not changed)
        delta = features.flatten(2).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        delta -= self.mean.unsqueeze(1)
        with torch.autocast(delta.device.type, enabled=False):
            squared = torch.bmm(delta, self.inv_covariance).mul_(delta).sum(dim=2)
        return squared.clamp_min(0).sqrt().T.reshape(batch, height, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_checkpoint_shapes(self, state_dict, prefix, ("mean", "inv_covariance"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
