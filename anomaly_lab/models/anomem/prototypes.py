"""The k-means baseline of AnoMem's Table 4: centroids of training features in place of the Hopfield
memories, and retrieval of the nearest one."""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly_lab.errors import ConfigError


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
