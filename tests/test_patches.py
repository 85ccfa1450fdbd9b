"""Unfolding images into overlapping patches and folding patch scores back to pixels."""

from __future__ import annotations

import pytest
import torch

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.cpc_ad.patches import average_patch_scores, fold_patches, grid_size, unfold_patches


def test_grid_size_counts_tiling_patches_and_rejects_the_others():
    assert grid_size(768, 256, 128) == 5 and grid_size(256, 64, 32) == 7 and grid_size(64, 64, 32) == 1
    for length, size, stride in [(100, 64, 32), (32, 64, 32), (64, 16, 0)]:
        with pytest.raises(ConfigError, match="tile"):
            grid_size(length, size, stride)


def test_unfold_patches_is_a_view_of_the_right_windows():
    images = torch.arange(2 * 3 * 10 * 14, dtype=torch.float32).reshape(2, 3, 10, 14)
    patches = unfold_patches(images, 6, 4)
    assert patches.shape == (2, 2, 3, 3, 6, 6)
    assert patches.untyped_storage().data_ptr() == images.untyped_storage().data_ptr()
    for y in range(2):
        for x in range(3):
            torch.testing.assert_close(patches[:, y, x], images[:, :, 4 * y:4 * y + 6, 4 * x:4 * x + 6])


def test_fold_patches_sums_every_patch_over_its_footprint():
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand(2, 3, 2, 4, 4, generator=generator)
    expected = torch.zeros(2, 3 * 2 + 2, 2 * 2 + 2)
    for y in range(3):
        for x in range(2):
            expected[:, 2 * y:2 * y + 4, 2 * x:2 * x + 4] += patches[:, y, x]
    torch.testing.assert_close(fold_patches(patches, 2), expected)


@pytest.mark.parametrize(("size", "stride"), [(4, 2), (6, 4), (3, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_average_patch_scores_is_the_weighted_mean_of_the_covering_patches(size, stride, weighted):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 4, generator=generator)
    weights = torch.randint(1, 4, (2, 3, 4), generator=generator).float() if weighted else torch.ones(2, 3, 4)
    height, width = 2 * stride + size, 3 * stride + size
    total, count = torch.zeros(2, height, width), torch.zeros(2, height, width)
    for y in range(3):
        for x in range(4):
            window = (slice(None), slice(stride * y, stride * y + size), slice(stride * x, stride * x + size))
            total[window] += (scores * weights)[:, y, x, None, None]
            count[window] += weights[:, y, x, None, None]
    result = average_patch_scores(scores, size, stride, weights if weighted else None)
    assert result.shape == (2, 1, height, width)
    torch.testing.assert_close(result[:, 0], total / count)
