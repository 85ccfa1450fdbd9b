"""CPC-AD's loss (de Haan & Löwe 2021, Eq. 2): the InfoNCE of every linear prediction of a sub-patch
encoding from the one `step` cells away, in the four directions, inside each patch's G x G grid."""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly_lab.nn.contrastive import info_nce_from_scores

# Where the context lies with respect to the sub-patch it predicts.
DIRECTIONS = ("above", "below", "left", "right")


def context_and_target(direction: str, step: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(row, column) slices of a G x G grid: contexts, and the targets `step` cells away in `direction`."""
    full, head, tail = slice(None), slice(None, -step), slice(step, None)
    return {
        "above": ((head, full), (tail, full)),  # the context is above: predict the sub-patch below
        "below": ((tail, full), (head, full)),
        "left": ((full, head), (full, tail)),
        "right": ((full, tail), (full, head)),
    }[direction]


def directional_info_nce(grids: Tensor, negatives: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """InfoNCE of every prediction W_k z_t -> z_{t+k} inside each patch, in the four directions (Eq. 2).

    grids [..., G, G, D]: the sub-patch encodings of each patch; negatives [..., G, G, N, D]: the
    negatives of the predictions made from each context position (leading dimensions broadcast with
    those of `grids`); weights [4, K, D, D]: W_k of each direction of DIRECTIONS. Returns (sum of the
    losses of which each sub-patch is the target, their count, both [..., G, G]; and the training
    loss: the mean over directions and steps of the mean loss).
    """
    total = grids.new_zeros(torch.broadcast_shapes(grids.shape[:-1], negatives.shape[:-2]))
    count = torch.zeros_like(total)
    mean_losses = []
    for direction, direction_weights in zip(DIRECTIONS, weights, strict=True):
        # Every step's prediction from every position, and the log-sum-exp of their scores against the
        # negatives, in three products over whole grids; then each step's positives.
        predictions = torch.einsum("...d,ked->k...e", grids, direction_weights)  # [K, ..., G, G, D]
        negative_logits = torch.einsum("k...e,...ne->k...n", predictions, negatives)  # [K, ..., G, G, N]
        negative_lse = torch.logsumexp(negative_logits, dim=-1)  # [K, ..., G, G]
        for step in range(1, len(direction_weights) + 1):
            (context_rows, context_cols), (target_rows, target_cols) = context_and_target(direction, step)
            prediction = predictions[step - 1][..., context_rows, context_cols, :]
            positive = (prediction * grids[..., target_rows, target_cols, :]).sum(dim=-1)
            losses = info_nce_from_scores(positive, negative_lse[step - 1][..., context_rows, context_cols])
            total[..., target_rows, target_cols] += losses
            count[..., target_rows, target_cols] += 1
            mean_losses.append(losses.mean())
    return total, count, torch.stack(mean_losses).mean()
