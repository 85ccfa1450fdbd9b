"""Modern Hopfield memory (Ramsauer et al. 2021), as used by AnoMem (Jezequel et al. 2023, Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("none", "l2", "layer")


def retrieval_weights(state: Tensor, patterns: Tensor, beta: float) -> Tensor:
    """The softmax of Eq. 1, softmax(beta xi X): state xi [N, d], patterns X [d, N_mem] -> weights [N, N_mem]."""
    return torch.softmax(beta * state @ patterns, dim=-1)


def hopfield_update(queries: Tensor, patterns: Tensor, beta: float) -> Tensor:
    """One retrieval step of Eq. 1: xi <- softmax(beta xi X) X^T.

    queries xi [N, d] (one query per row), patterns X [d, N_mem] (one stored pattern per column) -> [N, d].
    """
    return retrieval_weights(queries, patterns, beta) @ patterns.T


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
    every update that counted. `norm` (see `normalize`) applies to the stored patterns and to the state
    before each update: with l2, beta multiplies cosine similarities."""
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
    `norm`: none (Eq. 1 as written), l2 or layer (see `normalize`), applied to queries and patterns
    alike. The paper says neither.

    Why l2: Eq. 1 as written, with beta = 2 on unnormalised post-ReLU features (norms 15-40), is a
    hard argmax. Each query retrieves one pattern, the retrieval's gradient with respect to the query
    vanishes, patterns never retrieved get no gradient and the few winners are reinforced: the memory
    collapses to a handful of patterns (measured in experiments/anomem_cifar10/README.md). On unit
    vectors beta is the inverse temperature of a softmax over cosine similarities in [-1, 1], so its
    sharpness no longer grows with the features' norm.
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

    def weights(self, z: Tensor) -> Tensor:
        """The softmax weights [N, size] of the first update of Eq. 1 for the vectors of z [..., dim]."""
        flat = z.reshape(-1, z.shape[-1])
        return retrieval_weights(normalize(flat, self.norm), normalize(self.patterns.T, self.norm).T, self.beta)

    @torch.no_grad()
    def restart(self, dead: Tensor, candidates: Tensor, generator: torch.Generator) -> int:
        """Move the patterns flagged in `dead` [size] (bool) onto vectors drawn from `candidates` [N, dim]
        (without replacement where N allows, with `generator`); returns how many moved."""
        count = int(dead.sum())
        if count == 0 or len(candidates) == 0:
            return 0
        if len(candidates) >= count:
            index = torch.randperm(len(candidates), generator=generator)[:count]
        else:
            index = torch.randint(len(candidates), (count,), generator=generator)
        self.patterns[:, dead.to(self.patterns.device)] = candidates[index.to(candidates.device)].T.to(self.patterns)
        return count

    def forward(self, z: Tensor) -> Tensor:
        flat = z.reshape(-1, z.shape[-1])
        return hopfield_retrieve(flat, self.patterns, self.beta, self.max_iter, self.tol, self.norm).reshape(z.shape)


class UsageMonitor:
    """How a memory's patterns are used by the queries of an epoch, from the softmax weights of their
    first Eq. 1 update: `update(weights [N, size])` per batch, `summary(reduce)` at the epoch's end
    (`reduce` sums a tensor over the devices).

    Summary: `used_patterns` (patterns given at least `USED_WEIGHT` of some query's weight) and its
    fraction of the memory; `effective_patterns`, exp of the entropy H of the mean retrieval
    distribution (the memory size when every pattern is retrieved equally, 1 when one pattern takes
    everything); `mean_max_weight`, the largest weight of a query, averaged (1 for a hard argmax, 1/size
    for a uniform retrieval); `distinct_prototypes`, exp(H - mean entropy of a query's weights), i.e.
    exp of the mutual information between a query and the pattern it retrieves: 1 both when all queries
    retrieve the same pattern and when each retrieves all of them uniformly (the prototype then tells
    nothing about the query), about the number of patterns when queries spread sharply over all of them.
    """

    USED_WEIGHT = 0.01

    def __init__(self, size: int):
        self.size = size
        self.reset()

    def reset(self) -> None:
        # [hits per pattern, weight per pattern, sum of max weights, sum of query entropies, query count]
        self.totals = torch.zeros(2 * self.size + 3)

    @torch.no_grad()
    def update(self, weights: Tensor) -> None:
        weights = weights.detach().float()
        hits = (weights >= self.USED_WEIGHT).sum(dim=0).float()
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
        extra = torch.stack([weights.max(dim=-1).values.sum(), entropy.sum(), weights.new_tensor(float(len(weights)))])
        self.totals = self.totals.to(weights.device) + torch.cat([hits, weights.sum(dim=0), extra])

    def unused(self, reduce=lambda tensor: tensor) -> Tensor:
        """[size] bool: the patterns that no query gave `USED_WEIGHT` of its weight."""
        return reduce(self.totals)[: self.size] == 0

    def summary(self, reduce=lambda tensor: tensor) -> dict[str, float]:
        totals = reduce(self.totals)
        hits, weight, (max_sum, entropy_sum, count) = totals[: self.size], totals[self.size: 2 * self.size], totals[-3:]
        used = int((hits > 0).sum())
        if count == 0:
            return {"used_patterns": 0, "used_fraction": 0.0, "effective_patterns": 0.0, "mean_max_weight": 0.0,
                    "distinct_prototypes": 0.0}
        mean = weight / count
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum()
        return {"used_patterns": used, "used_fraction": used / self.size, "effective_patterns": float(entropy.exp()),
                "mean_max_weight": float(max_sum / count), "distinct_prototypes": float((entropy - entropy_sum / count).exp())}
