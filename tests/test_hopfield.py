"""The Hopfield memory (AnoMem Eq. 1) against by-hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_lab.models.anomem.memory import HopfieldMemory, UsageMonitor, hopfield_retrieve, hopfield_update


def test_update_equals_eq1_by_hand():
    patterns = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)  # X [d=2, N=3]
    query = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    beta = 2.0
    scores = [beta * (0.2 * patterns[0, j] + -0.4 * patterns[1, j]) for j in range(3)]
    weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    expected = [sum(weights[j] * float(patterns[i, j]) for j in range(3)) for i in range(2)]
    assert torch.allclose(hopfield_update(query, patterns, beta), torch.tensor([expected], dtype=torch.float64))


def test_retrieval_of_a_stored_pattern_returns_it_at_high_beta():
    generator = torch.Generator().manual_seed(0)
    patterns = torch.nn.functional.normalize(torch.randn(16, 10, generator=generator), dim=0)
    noisy = patterns.T + 0.05 * torch.randn(10, 16, generator=generator)
    retrieved = hopfield_retrieve(noisy, patterns, beta=50.0, max_iter=10, tol=1e-6)
    assert torch.allclose(retrieved, patterns.T, atol=1e-4)


def test_iterations_stop_at_the_cap_or_at_convergence():
    patterns = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    query = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    once = hopfield_retrieve(query, patterns, beta=2.0, max_iter=1, tol=0.0)
    assert torch.allclose(once, hopfield_update(query, patterns, 2.0))
    twice = hopfield_retrieve(query, patterns, beta=2.0, max_iter=2, tol=0.0)
    assert torch.allclose(twice, hopfield_update(once, patterns, 2.0))
    converged = hopfield_retrieve(query, patterns, beta=2.0, max_iter=1000, tol=1e-7)
    assert torch.allclose(hopfield_update(converged, patterns, 2.0), converged, atol=1e-5)


def test_memory_keeps_leading_dimensions_and_learns_its_patterns():
    memory = HopfieldMemory(dim=5, size=7, beta=2.0, max_iter=3)
    z = torch.randn(2, 3, 5)
    out = memory(z)
    assert out.shape == z.shape
    out.sum().backward()
    assert memory.patterns.shape == (5, 7) and memory.patterns.grad.abs().sum() > 0
    normalized = HopfieldMemory(dim=5, size=7, norm="l2")
    normalized.patterns = memory.patterns
    assert torch.allclose(normalized(3 * z), normalized(z), atol=1e-5)  # retrieval by direction


def test_l2_normalises_patterns_as_well_as_queries():
    """hopfield_norm=l2: beta multiplies cosine similarities, so rescaling a stored pattern changes nothing
    and one update equals softmax(beta cos(q, x_j)) over unit patterns, by hand."""
    generator = torch.Generator().manual_seed(3)
    memory = HopfieldMemory(dim=4, size=5, beta=8.0, max_iter=1, tol=0.0, norm="l2")
    with torch.no_grad():
        memory.patterns.copy_(torch.randn(4, 5, generator=generator))
    queries = torch.randn(3, 4, generator=generator, dtype=torch.float32)
    unit_q = queries / queries.norm(dim=1, keepdim=True)
    unit_x = memory.patterns.detach() / memory.patterns.detach().norm(dim=0, keepdim=True)
    expected = torch.stack([
        sum(w * unit_x[:, j] for j, w in enumerate(torch.softmax(8.0 * (unit_x.T @ q), dim=0))) for q in unit_q])
    assert torch.allclose(memory(queries), expected, atol=1e-5)
    assert torch.allclose(memory.weights(queries), torch.softmax(8.0 * unit_q @ unit_x, dim=1), atol=1e-6)
    rescaled = HopfieldMemory(dim=4, size=5, beta=8.0, max_iter=1, tol=0.0, norm="l2")
    with torch.no_grad():
        rescaled.patterns.copy_(memory.patterns * torch.tensor([0.1, 1.0, 5.0, 30.0, 2.0]))
    assert torch.allclose(rescaled(queries), memory(queries), atol=1e-5)


def test_usage_monitor_by_hand_on_hard_and_uniform_retrievals():
    hard = torch.eye(4)[[0, 0, 1, 2]]  # four queries, patterns 0 (twice), 1 and 2; pattern 3 unused
    monitor = UsageMonitor(4)
    monitor.update(hard[:2])
    monitor.update(hard[2:])  # accumulated over batches
    summary = monitor.summary()
    mean = [0.5, 0.25, 0.25]
    entropy = -sum(p * math.log(p) for p in mean)
    assert summary["used_patterns"] == 3 and summary["used_fraction"] == 0.75
    assert summary["effective_patterns"] == pytest.approx(math.exp(entropy))
    assert summary["mean_max_weight"] == 1.0
    assert summary["distinct_prototypes"] == pytest.approx(math.exp(entropy))  # every query is certain
    uniform = UsageMonitor(4)
    uniform.update(torch.full((5, 4), 0.25))
    summary = uniform.summary()
    assert summary["used_patterns"] == 4 and summary["effective_patterns"] == pytest.approx(4.0)
    assert summary["mean_max_weight"] == 0.25 and summary["distinct_prototypes"] == pytest.approx(1.0)
    faint = UsageMonitor(200)  # 1/200 = 0.005 < 1 %: no pattern counts as used
    faint.update(torch.full((3, 200), 1 / 200))
    assert faint.summary()["used_patterns"] == 0
    assert UsageMonitor(3).summary()["used_patterns"] == 0  # nothing seen


def test_restart_moves_only_the_unused_patterns_onto_candidates():
    memory = HopfieldMemory(dim=3, size=4)
    before = memory.patterns.detach().clone()
    monitor = UsageMonitor(4)
    monitor.update(torch.eye(4)[[1, 1, 3]])  # patterns 0 and 2 unused
    dead = monitor.unused()
    assert dead.tolist() == [True, False, True, False]
    candidates = torch.tensor([[10.0, 0, 0], [0, 20.0, 0], [0, 0, 30.0]])
    assert memory.restart(dead, candidates, torch.Generator().manual_seed(0)) == 2
    after = memory.patterns.detach()
    assert torch.equal(after[:, [1, 3]], before[:, [1, 3]])
    moved = {tuple(after[:, j].tolist()) for j in (0, 2)}
    assert len(moved) == 2 and moved <= {tuple(c.tolist()) for c in candidates}  # distinct candidates
    assert memory.restart(torch.zeros(4, dtype=torch.bool), candidates, torch.Generator()) == 0
