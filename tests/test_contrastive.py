"""InfoNCE against a brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_lab.nn.contrastive import info_nce, info_nce_from_scores


def brute_force_info_nce(prediction, positive, negatives) -> float:
    """-log exp(z+ . p) / (exp(z+ . p) + sum_j exp(z_j . p)), one sample, in plain Python."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a.tolist(), b.tolist(), strict=True))
    numerator = math.exp(dot(positive, prediction))
    denominator = numerator + sum(math.exp(dot(negative, prediction)) for negative in negatives)
    return -math.log(numerator / denominator)


def test_info_nce_equals_brute_force_on_small_tensors():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    positives = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    negatives = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    losses = info_nce(predictions, positives, negatives)
    assert losses.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            expected = brute_force_info_nce(predictions[i, j], positives[i, j], negatives[i, j])
            assert losses[i, j].item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_broadcasts_shared_negatives():
    generator = torch.Generator().manual_seed(1)
    predictions, positives = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    negatives = torch.randn(3, 5, 4, generator=generator)  # the same negatives for both leading items
    expected = info_nce(predictions, positives, negatives.expand(2, 3, 5, 4))
    torch.testing.assert_close(info_nce(predictions, positives, negatives), expected)


def test_info_nce_from_scores_is_the_cross_entropy_of_the_positive():
    positive, negative = torch.tensor([2.0, -1.0]), torch.tensor([[0.0, 1.0], [3.0, 3.0]])
    expected = -torch.log_softmax(torch.cat([positive[:, None], negative], 1), dim=1)[:, 0]
    torch.testing.assert_close(info_nce_from_scores(positive, torch.logsumexp(negative, dim=1)), expected)
    # A positive far above its negatives costs nearly nothing; N equal scores cost log(N + 1).
    zeros = torch.logsumexp(torch.zeros(16), dim=0)
    assert info_nce_from_scores(torch.tensor(50.0), zeros).item() < 1e-6
    assert info_nce_from_scores(torch.tensor(0.0), zeros).item() == pytest.approx(math.log(17))
