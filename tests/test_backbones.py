"""Backbone weights: torchvision names, and one clear message when they cannot be downloaded."""

import urllib.error

import pytest
import torch

from anomaly_lab.errors import ConfigError, WeightsUnavailableError
from anomaly_lab.nn.backbones import FeatureExtractor, load_backbone


def test_offline_without_cache_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "backbone_weights=null" in message


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        load_backbone("resnet18", "IMAGENET_V9")


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet9000"):
        load_backbone("resnet9000", None)


def test_feature_extractor_returns_the_named_layers():
    extractor = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), None)
    shapes = [f.shape for f in extractor(torch.zeros(2, 3, 64, 64))]
    assert shapes == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert not any("layer4" in name for name, _ in extractor.named_modules())
