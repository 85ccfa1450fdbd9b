"""Modern Hopfield memory (Ramsauer et al. 2021), as used by AnoMem (Jezequel et al. 2023, Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("none", "l2", "layer")


def hopfield_update(queries: Tensor, patterns: Tensor, beta: float) -> Tensor:
    """One retrieval step of Eq. 1: xi <- softmax(beta xi X) X^T.

    queries xi [N, d] (one query per row), patterns X [d, N_mem] (one stored pattern per column) -> [N, d].
    """
    return torch.softmax(beta * queries @ patterns, dim=-1) @ patterns.T


def normalize(vectors: Tensor, norm: str) -> Tensor:
    """Vectors [..., d] as the retrieval sees them: unchanged (none), L2-normalised (l2), or layer-normalised
    (layer: zero mean and unit variance over d, without affine parameters, as in Ramsauer et al.'s layers)."""
    if norm == "l2":
        return F.normalize(vectors, dim=-1)
    if norm == "layer":
        return F.layer_norm(vectors, vectors.shape[-1:])
    return vectors


def hopfield_retrieve(queries: Tensor, patterns: Tensor, beta: float, max_iter: int, tol: float,
                      norm: str = "none") -> Tensor:
    """Eq. 1 repeated until it converges: at most `max_iter` updates, the state frozen once no query
    moved by more than `tol` times its norm (the later updates are computed and discarded, so the
    loop has no data-dependent exit and the scoring path exports to ONNX). Differentiable through
    every update that counted. `norm` (see `normalize`) applies to the state before each update and,
    for layer, to the stored patterns too."""
    if norm == "layer":
        patterns = normalize(patterns.T, norm).T
    if queries.numel() == 0:
        return queries
    state = queries
    converged = torch.zeros((), dtype=torch.bool, device=queries.device)
    for _ in range(max_iter):
        new = hopfield_update(normalize(state, norm), patterns, beta)
        with torch.no_grad():
            moved = torch.linalg.vector_norm(new - state, dim=-1) / torch.linalg.vector_norm(state, dim=-1).clamp_min(1e-12)
        state = torch.where(converged, state, new)
        converged = converged | (moved.max() <= tol)
    return state


class HopfieldMemory(nn.Module):
    """A Hopfield layer of size `size`: a learnable pattern matrix X [dim, size] and retrieval by Eq. 1.

    `forward(z)` retrieves every vector of z [..., dim] (any leading shape: a batch, or the spatial
    vectors of feature maps once moved last). `init_std`: the patterns start as N(0, init_std^2);
    `norm`: none (Eq. 1 as written), l2 or layer (see `normalize`). The paper says neither.
    """

    def __init__(self, dim: int, size: int, beta: float = 2.0, max_iter: int = 5, tol: float = 1e-3,
                 init_std: float = 1.0, norm: str = "none"):
        super().__init__()
        if dim < 1 or size < 1 or max_iter < 1:
            raise ValueError(f"HopfieldMemory needs dim, size and max_iter >= 1, got {dim}, {size}, {max_iter}")
        if norm not in NORMS:
            raise ValueError(f"HopfieldMemory norm={norm!r} must be one of {', '.join(NORMS)}")
        self.beta, self.max_iter, self.tol, self.norm = beta, max_iter, tol, norm
        self.patterns = nn.Parameter(torch.randn(dim, size) * init_std)

    def query_space(self, z: Tensor) -> Tensor:
        """z [..., dim] in the space the retrieval compares it in (what a retrieved vector is compared to)."""
        return normalize(z, self.norm)

    def forward(self, z: Tensor) -> Tensor:
        flat = z.reshape(-1, z.shape[-1])
        return hopfield_retrieve(flat, self.patterns, self.beta, self.max_iter, self.tol, self.norm).reshape(z.shape)
