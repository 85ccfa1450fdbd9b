"""Contrastive losses as pure functions."""

from __future__ import annotations

import torch
from torch import Tensor


def info_nce_from_scores(positive: Tensor, negative_logsumexp: Tensor) -> Tensor:
    """InfoNCE from scores: the positive's score s_pos [...] and log sum_j exp(s_j) over the negatives [...].

    The cross-entropy of the positive among the N + 1 candidates,
    ``-log exp(s_pos) / (exp(s_pos) + sum_j exp(s_j))`` (CPC-AD Eq. 1-2), one loss per sample, without
    reduction, so that a caller can use the losses as scores. Taking the negatives' log-sum-exp lets a
    caller reduce them once for several positives.
    """
    return torch.logaddexp(positive, negative_logsumexp) - positive


def info_nce(predictions: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
    """InfoNCE with dot-product scores: predictions, positives [..., D]; negatives [..., N, D] -> [...].

    The score of a candidate z is z^T prediction (in CPC-AD, prediction = W_k z_t, Eq. 2).
    """
    positive = (predictions * positives).sum(dim=-1)
    negative = (negatives @ predictions.unsqueeze(-1)).squeeze(-1)
    return info_nce_from_scores(positive, torch.logsumexp(negative, dim=-1))
