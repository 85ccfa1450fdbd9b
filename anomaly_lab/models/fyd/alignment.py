"""FYD's coarse alignment (Zheng et al. 2022): the ICA loss of Eq. 2 and the ResNet whose layers are
followed by FCA spatial transformers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.fyd.spatial_transformer import SpatialTransformer
from anomaly_lab.nn.backbones import RESNET_LAYERS, load_backbone, resnet_layers


def ica_loss(aligned: Tensor, partner: Tensor) -> Tensor:
    """L_ICA of Eq. 2, averaged: the l2 norm over channels of aligned[b] - aligned[partner[b]] at every
    pixel, averaged over pixels and pairs (Eq. 2 sums; lambda_1 absorbs the constant)."""
    return torch.linalg.vector_norm(aligned - aligned[partner], dim=1).mean()


class AlignedResNet(nn.Module):
    """The stem and `layers` of a torchvision ResNet, with an affine spatial transformer (FCA) after
    each layer in `fca_layers`; `forward(x) -> (features of each layer, {layer: FCA theta})`."""

    def __init__(self, arch: str, weights: str | None, layers: Sequence[str], fca_layers: Sequence[str],
                 stn_kwargs: dict):
        super().__init__()
        layers, fca_layers = resnet_layers(layers), list(fca_layers)
        if any(name not in layers for name in fca_layers):
            raise ConfigError(f"model.fca_layers={fca_layers}: every FCA layer must be one of model.layers={layers}")
        net = load_backbone(arch, weights)
        if not all(hasattr(net, name) for name in ("conv1", "bn1", "relu", "maxpool", *layers)):
            raise ConfigError(f"model.backbone={arch!r}: FYD needs a ResNet (resnet18, wide_resnet50_2, ...)")
        self.layers = layers
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        depth = RESNET_LAYERS.index(layers[-1]) + 1
        self.blocks = nn.ModuleDict({name: getattr(net, name) for name in RESNET_LAYERS[:depth]})
        channels = self._channels()
        self.fca = nn.ModuleDict(
            {name: SpatialTransformer(channels[name], kind="affine", **stn_kwargs) for name in fca_layers}
        )

    @torch.no_grad()
    def _channels(self) -> dict[str, int]:
        """Output channels of each block (a dummy pass in eval mode: batch-norm statistics stay untouched)."""
        was_training = self.training
        self.eval()
        x, channels = self.stem(torch.zeros(1, 3, 64, 64)), {}
        for name, block in self.blocks.items():
            x = block(x)
            channels[name] = x.shape[1]
        self.train(was_training)
        return channels

    def channels(self) -> list[int]:
        return [self._channels()[name] for name in self.layers]

    def forward(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        x, features, thetas = self.stem(x), [], {}
        for name, block in self.blocks.items():
            x = block(x)
            if name in self.fca:
                x, thetas[name] = self.fca[name](x)
            if name in self.layers:
                features.append(x)
        return features, thetas
