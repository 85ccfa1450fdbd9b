"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, Algorithm 1) and nearest-neighbour search.

Greedy k-center starts from one point and adds, again and again, the point farthest from the centers
chosen so far. Done plainly, every step reads all N points to update their distance to the nearest
center: 21,400 steps over 214,000 patch features for one MVTec category, an hour on two CPU cores.

`greedy_coreset` gives the same selection with far less reading. The points are cut into blocks;
each block keeps its points' squared distances to the centers it has seen (`applied`) and their
maximum, an upper bound on the block's true maximum (more centers only lower distances). A step takes
the block with the highest bound; if that block has not seen every center, it applies the missing
ones with one matrix product and goes back into the queue with its new bound; once the block at the
top is up to date, its bound is exact and no other block can hold a farther point, so its farthest
point is the next center. Most blocks are far from the new centers and are only brought up to date
when their bound reaches the top, many centers at once: matrix products instead of one pass over
all points per step. Ties go to the lowest index, as `argmax` over all points would.

The distances are squared, from one matrix product per block and chunk of centers (float32 on the
points' device); selection compares them only, so the square root is never taken.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

CENTER_CHUNK = 512  # centers applied to a block in one matrix product: [block_size, 512] distances at a time


def squared_distances(x: Tensor, y: Tensor, y_squared_norms: Tensor | None = None) -> Tensor:
    """||x_i - y_j||^2 for [n, d] x and [m, d] y as ||x||^2 + ||y||^2 - 2 x.y (one matrix product), >= 0: [n, m]."""
    if y_squared_norms is None:
        y_squared_norms = y.square().sum(dim=1)
    products = torch.addmm(y_squared_norms.unsqueeze(0), x, y.T, alpha=-2.0)
    return products.add_(x.square().sum(dim=1, keepdim=True)).clamp_min_(0)


def greedy_coreset(points: Tensor, size: int, start: int = 0, block_size: int | None = 1024) -> Tensor:
    """Indices [size] of the greedy k-center selection over [N, d] `points`, starting from index `start`.

    Exact: the same indices as the plain greedy loop on the same distances. `block_size` (None: all
    points in one block, the plain loop, one pass over the points per step: best on a GPU, where a pass
    is cheap and every refresh of a block synchronises with the host) trades the number of refreshes
    against their size; 1024 is fastest on a CPU (README, "PatchCore").
    """
    count = points.shape[0]
    if not 0 < size <= count:
        raise ValueError(f"a coreset of {size} out of {count} points")
    block_size = count if block_size is None else min(block_size, count)
    squared_norms = points.square().sum(dim=1)
    centers = torch.empty(size, dtype=torch.long)
    centers[0] = start
    center_points = points.new_empty(size, points.shape[1])
    center_norms = squared_norms.new_empty(size)
    center_points[0], center_norms[0] = points[start], squared_norms[start]
    distances = torch.full((count,), float("inf"), dtype=points.dtype, device=points.device)
    starts = range(0, count, block_size)
    applied = [0] * len(starts)
    queue = [(-float("inf"), block) for block in range(len(starts))]  # (-bound, block): highest bound first
    for step in range(1, size):
        while True:
            _, block = queue[0]
            rows = slice(starts[block], starts[block] + block_size)
            block_distances = distances[rows]  # a view: updated in place
            if applied[block] == step:
                break
            for first in range(applied[block], step, CENTER_CHUNK):
                last = min(first + CENTER_CHUNK, step)
                nearest = squared_distances(points[rows], center_points[first:last], center_norms[first:last]).amin(dim=1)
                torch.minimum(block_distances, nearest, out=block_distances)
            applied[block] = step
            heapq.heapreplace(queue, (-block_distances.max().item(), block))
        farthest = starts[block] + int(block_distances.argmax())
        centers[step] = farthest
        distances[farthest] = -1.0  # chosen: never again, even where rounding leaves its distance above 0
        center_points[step], center_norms[step] = points[farthest], squared_norms[farthest]
    return centers


def nearest_neighbours(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = 2048,
                       bank_squared_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Euclidean distances [n, k] and indices [n, k] of the `k` nearest rows of [m, d] `bank` to each of
    [n, d] `queries`, nearest first; `chunk` queries at a time, so the peak is [chunk, m] distances."""
    if bank_squared_norms is None:
        bank_squared_norms = bank.square().sum(dim=1)
    found = [squared_distances(part, bank, bank_squared_norms).topk(k, dim=1, largest=False)
             for part in queries.split(chunk)]
    return torch.cat([d for d, _ in found]).sqrt_(), torch.cat([i for _, i in found])
