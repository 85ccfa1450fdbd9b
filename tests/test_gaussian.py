"""The streaming per-position Gaussian and the Mahalanobis distance against a direct computation."""

import numpy as np
import pytest
import torch

from anomaly_lab.nn.gaussian import PositionalGaussian


def reference_distances(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """Per-position mean and covariance with numpy, then sqrt((x-mu)^T Sigma^-1 (x-mu)) position by position."""
    n, d, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            mean = x.mean(axis=0)
            cov = np.cov(x, rowvar=False) + eps * np.eye(d)
            inv = np.linalg.inv(cov)
            for b in range(test.shape[0]):
                delta = test[b, :, i, j] - mean
                out[b, i, j] = np.sqrt(delta @ inv @ delta)
    return out


def test_streaming_fit_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(23, 5, 3, 4, generator=gen) * 3 + 1
    test = torch.randn(4, 5, 3, 4, generator=gen)
    gaussian = PositionalGaussian(covariance_eps=0.01)
    for chunk in train.split(7):  # uneven batches
        gaussian.update(chunk)
    gaussian.finalize()
    expected = reference_distances(train.double().numpy(), test.double().numpy(), 0.01)
    np.testing.assert_allclose(gaussian(test).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_reduce_sum_combines_shards_like_one_device():
    features = torch.randn(12, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    whole = PositionalGaussian()
    whole.update(features)
    whole.finalize()
    # Two "devices" each see half; reduce_sum adds the other shard's sums as an all-reduce would.
    shards = [PositionalGaussian(), PositionalGaussian()]
    shards[0].update(features[::2])
    shards[1].update(features[1::2])
    other = {"count": float(shards[1]._count), "sum": shards[1]._sum, "outer": shards[1]._outer}

    def reduce_sum(t):
        if t.ndim == 0:
            return t + other["count"]
        return t + (other["sum"] if t.ndim == 2 else other["outer"])

    shards[0].finalize(reduce_sum)
    torch.testing.assert_close(shards[0].mean, whole.mean)
    torch.testing.assert_close(shards[0].inv_covariance, whole.inv_covariance)


def test_fitted_statistics_travel_through_state_dict():
    fitted = PositionalGaussian()
    fitted.update(torch.randn(6, 3, 2, 2))
    fitted.finalize()
    fresh = PositionalGaussian()
    assert not fresh.fitted
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.fitted
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(fresh(x), fitted(x))


def test_too_few_images_is_an_error():
    gaussian = PositionalGaussian()
    gaussian.update(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian.finalize()
