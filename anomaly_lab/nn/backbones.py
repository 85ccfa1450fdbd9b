"""torchvision backbones as multi-layer feature extractors, with weights that fail clearly offline."""

from __future__ import annotations

import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor

from anomaly_lab.errors import ConfigError, WeightsUnavailableError

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resnet_layers(layers: Sequence[str]) -> list[str]:
    """`layers` (model.layers) as a list: a non-empty choice out of RESNET_LAYERS, else a ConfigError."""
    layers = list(layers)
    if not layers or any(name not in RESNET_LAYERS for name in layers):
        raise ConfigError(f"model.layers={layers}: expected a non-empty list out of {list(RESNET_LAYERS)}")
    return layers


def resolve_weights(arch: str, weights: str | None):
    """Map a weights name such as ``IMAGENET1K_V1`` to torchvision's enum member for ``arch`` (None: random)."""
    if weights is None:
        return None
    enum = get_model_weights(arch)
    try:
        return enum[weights]
    except KeyError:
        raise ConfigError(
            f"backbone_weights={weights!r} is not a weights name of {arch}; "
            f"expected one of {[w.name for w in enum]} or null for random initialisation"
        ) from None


def load_backbone(arch: str, weights: str | None) -> nn.Module:
    """Build a torchvision classification model, with pretrained weights from torchvision's cache or the web."""
    if arch not in list_models():
        raise ConfigError(f"backbone={arch!r} is not a torchvision model name (e.g. resnet18, wide_resnet50_2)")
    weight_enum = resolve_weights(arch, weights)
    try:
        return get_model(arch, weights=weight_enum)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        if weight_enum is None or not _is_download_failure(err):
            raise
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weight_enum.url).name
        raise WeightsUnavailableError(
            f"Cannot download the {arch} weights {weights} ({weight_enum.url}) and no copy is cached: "
            f"put the file at {target}, or set backbone_weights to null (model.backbone_weights=null) for random initialisation."
        ) from None


def _is_download_failure(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, urllib.error.URLError) or any(
        word in text for word in ("urlopen", "network", "name resolution", "connection", "timed out")
    )


class FeatureExtractor(nn.Module):
    """The named intermediate layers of a torchvision model; later layers are pruned and never run."""

    def __init__(self, arch: str = "resnet18", layers: tuple[str, ...] = ("layer1", "layer2", "layer3"),
                 weights: str | None = None):
        super().__init__()
        self.layers = list(layers)
        self.body = create_feature_extractor(load_backbone(arch, weights), return_nodes={n: n for n in self.layers})

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.body(images)
        return [features[name] for name in self.layers]

    @torch.no_grad()
    def channels(self, image_size: int = 64) -> list[int]:
        """Channel count of each returned layer (one dummy forward pass)."""
        was_training = self.training
        self.eval()
        out = self(torch.zeros(1, 3, image_size, image_size))
        self.train(was_training)
        return [f.shape[1] for f in out]
