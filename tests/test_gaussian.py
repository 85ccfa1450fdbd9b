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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_under_bf16_autocast_equal_the_float32_computation(dtype):
    """100 channels, 8 x 8 positions, a mean large against the spread (as backbone features under
    autocast): without autocast disabled inside, the distances differed here by up to 0.5 % relative."""
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(200, 100, 8, 8, generator=gen) + 20).to(dtype)
    test = (torch.randn(6, 100, 8, 8, generator=gen) * 1.5 + 20).to(dtype)
    exact = PositionalGaussian()
    exact.update(train.float())
    exact.finalize()
    expected = exact(test.float())
    mixed = PositionalGaussian()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.update(train)
        mixed.finalize()
        scores = mixed(test)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)


def test_inverse_of_large_covariances_on_several_threads():
    """All channels of a backbone (hundreds) on 2 threads: torch's batched LU fails there, Cholesky does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        features = torch.randn(300, 260, 4, 4, generator=torch.Generator().manual_seed(2))
        gaussian = PositionalGaussian()
        gaussian.update(features)
        gaussian.finalize()
    finally:
        torch.set_num_threads(threads)
    x = features.flatten(2).permute(2, 0, 1).double()  # [P, N, D]
    centred = x - x.mean(dim=1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / (x.shape[1] - 1) + 0.01 * torch.eye(260, dtype=torch.float64)
    identity = covariance @ gaussian.inv_covariance.double()
    torch.testing.assert_close(identity, torch.eye(260, dtype=torch.float64).expand_as(identity), atol=1e-4, rtol=0)
