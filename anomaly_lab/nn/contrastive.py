"""Contrastive losses as pure functions: InfoNCE (CPC-AD) and NT-Xent (SimCLR, AnoMem)."""

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


def nt_xent(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """SimCLR's symmetric NT-Xent over a two-view batch: anchors, positives [..., B, D] -> [...].

    The 2B vectors of the multi-view batch are compared by cosine similarity / `temperature`; for every
    vector, l_NTX = -log exp(sim(z, z+)/tau) / sum_{p != z} exp(sim(z, p)/tau) (AnoMem Eq. 5), the
    positive of anchors[k] being positives[k] and conversely; the result is the mean of the 2B losses
    (Eq. 2 and 4: 1/2B sum_k l(z_k, z'_k) + l(z'_k, z_k)). Leading dimensions are independent batches.
    """
    batch = anchors.shape[-2]
    z = torch.nn.functional.normalize(torch.cat([anchors, positives], dim=-2), dim=-1)
    logits = z @ z.transpose(-1, -2) / temperature  # [..., 2B, 2B]
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.arange(2 * batch, device=z.device).roll(batch)  # k <-> k + B
    positive = logits.gather(-1, partner.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, dim=-1) - positive).mean(dim=-1)
