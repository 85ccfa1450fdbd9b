"""Spatial transformers of FYD's coarse alignment: identity at initialisation, matrices, warps and their inverses."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.fyd.spatial_transformer import (
    SpatialTransformer,
    compose_affine,
    invert_affine,
    rotation_matrix,
    warp,
)

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def blob(height: int = 32, width: int = 32) -> torch.Tensor:
    """[1, 1, H, W] a smooth off-centre bump (smooth, so bilinear resampling loses little)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) / 0.05).view(1, 1, height, width)


@pytest.mark.parametrize(("kind", "channels"), [("rotation", 3), ("affine", 16)])
def test_spatial_transformer_is_the_identity_at_initialisation(kind, channels):
    torch.manual_seed(0)
    stn = SpatialTransformer(channels, kind=kind)
    x = torch.randn(3, channels, 24, 20)
    out, theta = stn(x)
    assert torch.equal(theta, IDENTITY.expand(3, 2, 3))  # exactly: zero weights, identity bias
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)  # up to float32 rounding of the sampling grid


@pytest.mark.parametrize("kind", ["rotation", "affine"])
def test_spatial_transformer_head_receives_gradient(kind):
    stn = SpatialTransformer(3, kind=kind)
    x = torch.randn(2, 3, 16, 16)
    out, _ = stn(x)
    (out - x.flip(0)).pow(2).mean().backward()
    assert stn.head.weight.grad.abs().sum() > 0


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="kind"):
        SpatialTransformer(3, kind="perspective")


def test_rotation_matrix_matches_cos_sin():
    angle = torch.tensor([0.0, math.pi / 6, -1.0])
    theta = rotation_matrix(angle)
    for a, m in zip(angle.tolist(), theta, strict=True):
        expected = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        torch.testing.assert_close(m, expected)


def test_rotation_by_a_quarter_turn_moves_pixels_like_rot90():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = warp(x, rotation_matrix(torch.tensor([math.pi / 2])))
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-4) for k in (1, 3))


def test_invert_and_compose_affine():
    theta = torch.tensor([[[0.9, -0.3, 0.1], [0.2, 1.1, -0.2]]])
    torch.testing.assert_close(compose_affine(theta, invert_affine(theta)), IDENTITY.unsqueeze(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(compose_affine(invert_affine(theta), theta), IDENTITY.unsqueeze(0), atol=1e-6, rtol=0)


def test_warping_twice_samples_through_the_composition():
    x = blob(48, 48)
    outer = rotation_matrix(torch.tensor([0.4]))
    inner = torch.tensor([[[0.9, 0.0, 0.3], [0.0, 0.9, -0.2]]])
    twice = warp(warp(x, outer), inner)
    once = warp(x, compose_affine(outer, inner))
    torch.testing.assert_close(twice, once, atol=0.05, rtol=0)
    assert (twice - warp(x, compose_affine(inner, outer))).abs().max() > 0.3  # the order matters


def test_warp_back_through_the_inverse_returns_a_rotated_map_to_its_frame():
    mask = blob(64, 64)
    theta = rotation_matrix(torch.tensor([0.6]))
    rotated = warp(mask, theta)  # the map as seen in the aligned (rotated) frame
    assert (rotated - mask).abs().max() > 0.5  # the rotation moved the defect
    back = warp(rotated, invert_affine(theta))
    assert (back - mask).abs().max() < 0.1
    assert back.flatten().argmax() == mask.flatten().argmax()
