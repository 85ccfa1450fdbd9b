"""CPC-AD's loss (de Haan & Löwe 2021, Eq. 2): the InfoNCE of every linear prediction of a sub-patch
encoding from the one `offset` cells away, in the four directions, inside each patch's G x G grid."""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly_lab.nn.contrastive import info_nce_from_scores

# Where the context lies with respect to the sub-patch it predicts.
DIRECTIONS = ("above", "below", "left", "right")


def context_and_target(direction: str, offset: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(row, column) slices of a G x G grid: contexts, and the targets `offset` cells away in `direction`."""
    full, head, tail = slice(None), slice(None, -offset), slice(offset, None)
    return {
        "above": ((head, full), (tail, full)),  # the context is above: predict the sub-patch below
        "below": ((tail, full), (head, full)),
        "left": ((full, head), (full, tail)),
        "right": ((full, tail), (full, head)),
    }[direction]


def directional_info_nce(
    grids: Tensor, negatives: Tensor, weights: Tensor, skip_step: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """InfoNCE of every prediction W_k z_t -> z_{t+k+skip_step} inside each patch, in the four
    directions (Eq. 2; Greedy InfoMax's skip_step leaves out the nearest `skip_step` cells).

    grids [4, ..., G, G, D]: each direction's sub-patch encodings of each patch (an expanded view when
    the directions share one encoder); negatives [4, ..., G, G, N, D]: the negatives of the
    predictions made from each context position (dimensions after the first broadcast with those of
    `grids`); weights [4, K, D, D]: W_k of each direction of DIRECTIONS. Returns (sum of the losses of
    which each sub-patch is the target, their count, both [..., G, G]; and the training loss: the mean
    over directions and steps of the mean loss).
    """
    total = grids.new_zeros(torch.broadcast_shapes(grids.shape[1:-1], negatives.shape[1:-2]))
    count = torch.zeros_like(total)
    mean_losses = []
    for direction, direction_grids, direction_negatives, direction_weights in zip(
        DIRECTIONS, grids, negatives, weights, strict=True
    ):
        # Every step's prediction from every position, and the log-sum-exp of their scores against the
        # negatives, in three products over whole grids; then each step's positives.
        predictions = torch.einsum("...d,ked->k...e", direction_grids, direction_weights)  # [K, ..., G, G, D]
        negative_logits = torch.einsum("k...e,...ne->k...n", predictions, direction_negatives)  # [K, ..., G, G, N]
        negative_lse = torch.logsumexp(negative_logits, dim=-1)  # [K, ..., G, G]
        for step in range(1, len(direction_weights) + 1):
            (context_rows, context_cols), (target_rows, target_cols) = context_and_target(direction, step + skip_step)
            prediction = predictions[step - 1][..., context_rows, context_cols, :]
            positive = (prediction * direction_grids[..., target_rows, target_cols, :]).sum(dim=-1)
            losses = info_nce_from_scores(positive, negative_lse[step - 1][..., context_rows, context_cols])
            total[..., target_rows, target_cols] += losses
            count[..., target_rows, target_cols] += 1
            mean_losses.append(losses.mean())
    return total, count, torch.stack(mean_losses).mean()
