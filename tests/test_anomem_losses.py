"""AnoMem's losses and scores as pure functions, against by-hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.anomem.losses import (
    VARIANCE_EPS,
    double_hinge,
    mem,
    merge_scales,
    sample_positions,
    variance_loss,
)
from anomaly_lab.models.anomem.memory import HopfieldMemory
from anomaly_lab.models.anomem.model import cosine
from anomaly_lab.models.anomem.prototypes import kmeans, nearest_prototype
from anomaly_lab.nn.contrastive import nt_xent


def test_mem_retrieves_normal_samples_and_leaves_anomalous_ones_untouched():
    z = torch.randn(4, 3)
    retrieved = torch.randn(4, 3)
    normal = torch.tensor([True, False, True, False])
    out = mem(z, retrieved, normal)
    assert torch.equal(out[[0, 2]], retrieved[[0, 2]]) and torch.equal(out[[1, 3]], z[[1, 3]])
    assert torch.equal(mem(z.expand(2, 4, 3), retrieved.expand(2, 4, 3), normal)[1], out)  # positions first


def brute_force_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """Eq. 2/4-5 in plain Python: the mean over the 2B vectors of -log exp(sim(z, z+)/tau) / sum_{p != z} exp(sim(z, p)/tau)."""
    vectors = [v.tolist() for v in torch.cat([a, b])]
    n, batch = len(vectors), len(a)

    def sim(u, v):
        return sum(x * y for x, y in zip(u, v, strict=True)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    total = 0.0
    for i in range(n):
        partner = (i + batch) % n
        denominator = sum(math.exp(sim(vectors[i], vectors[p]) / tau) for p in range(n) if p != i)
        total += -math.log(math.exp(sim(vectors[i], vectors[partner]) / tau) / denominator)
    return total / n


def test_nt_xent_equals_brute_force_and_batches_over_leading_dimensions():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    losses = nt_xent(a, b, 0.1)
    assert losses.shape == (2,)
    for i in range(2):
        assert float(losses[i]) == pytest.approx(brute_force_nt_xent(a[i], b[i], 0.1), rel=1e-9)
    assert float(nt_xent(a[0], a[0] * 3, 0.5)) < float(nt_xent(a[0], b[0], 0.5))  # scale-free positives win


def test_variance_loss_equals_eq6_by_hand_on_both_axes():
    retrieved = torch.tensor([[1.0, 3.0], [2.0, 2.0], [9.0, -9.0]], dtype=torch.float64)
    normal = torch.tensor([True, True, False])  # the third sample is anomalous: not counted
    # axis=sample: per normal sample, the std over its components: sample 0 -> 1, sample 1 -> 0.
    expected = -(math.sqrt(1.0 + VARIANCE_EPS) + math.sqrt(0.0 + VARIANCE_EPS)) / 2
    assert float(variance_loss(retrieved, normal, "sample")) == pytest.approx(expected)
    # axis=batch: per component, the std over the normal samples: (1, 2) -> 0.5, (3, 2) -> 0.5.
    expected = -(math.sqrt(0.25 + VARIANCE_EPS) + math.sqrt(0.25 + VARIANCE_EPS)) / 2
    assert float(variance_loss(retrieved, normal, "batch")) == pytest.approx(expected)
    assert float(variance_loss(retrieved, torch.zeros(3, dtype=torch.bool))) == 0.0
    with pytest.raises(ConfigError, match="variance_axis"):
        variance_loss(retrieved, normal, "channels")


def test_double_hinge_matches_eq11_on_chosen_values():
    d = torch.tensor([0.2, 0.5, 1.0, 0.2, 1.9, 3.0])
    normal = torch.tensor([True, True, True, False, False, False])
    # M = 2: normals pay max(d - 0.5, 0), anomalies max(2 - d, 0).
    assert torch.allclose(double_hinge(d, normal, 2.0), torch.tensor([0.0, 0.0, 0.5, 1.8, 0.1, 0.0]))


def test_scales_merge_by_eq13_and_positions_by_eq7():
    merged = merge_scales([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])], [1.0, 2.0])
    assert torch.allclose(merged, torch.tensor([9.0 / 3, 18.0 / 3]))
    omega = sample_positions(8, 8, 0.3, torch.Generator().manual_seed(0))
    assert len(omega) == 19 and len(set(omega.tolist())) == 19 and omega.max() < 64
    assert len(sample_positions(1, 1, 0.3, torch.Generator())) == 1


def test_kmeans_and_nearest_prototype():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=generator) for c in centres])
    found = kmeans(points, 3, 20, torch.Generator().manual_seed(1))  # [D, K]
    assert found.shape == (2, 3)
    assert sorted(found.T.round().tolist()) == sorted(centres.tolist())
    assert torch.equal(nearest_prototype(torch.tensor([[9.0, 1.0]]), found), found.T[found[0].argmax()].unsqueeze(0))


def test_cosine_schedule_covers_its_stage_only():
    assert cosine(0, 0, 10) == 1.0 and cosine(5, 0, 10) == pytest.approx(0.5) and cosine(10, 0, 10) == 0.0
    assert cosine(3, 5, 10) == 0.0 and cosine(5, 5, 10) == 1.0


def test_variance_loss_keeps_retrieved_prototypes_apart():
    """A memory starting near collapse (every query retrieves almost the same point) trained by the
    contrasted memory loss: with the variance loss the retrieved prototypes spread above a bar that
    the contrastive term alone does not reach in the same steps."""

    def spread_after_training(lambda_v: float) -> float:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(64, 8, generator=generator)
        z_prime = z + 0.1 * torch.randn(64, 8, generator=generator)
        memory = HopfieldMemory(8, 16, beta=2.0, max_iter=5, init_std=0.3)
        assert memory(z).std(dim=0).mean() < 0.01  # nearly collapsed at the start
        optimizer = torch.optim.SGD(memory.parameters(), lr=0.1)
        normal = torch.ones(64, dtype=torch.bool)
        for _ in range(100):
            retrieved = memory(z)
            loss = nt_xent(mem(z, retrieved, normal), z_prime, 0.1) + lambda_v * variance_loss(retrieved, normal)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(memory(z).std(dim=0).mean())

    with_variance, without = spread_after_training(1.0), spread_after_training(0.0)
    assert with_variance > 0.4 > without
