"""AnoMem's networks: the ResNet encoder cut after the memory layers, and the anomaly-distance head
g^(s) o phi of the semi-supervised stage (Eq. 10)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from anomaly_lab.errors import ConfigError
from anomaly_lab.nn.backbones import RESNET_LAYERS, load_backbone, resnet_layers

STEMS = ("imagenet", "cifar")
CIFAR_STEM_MAX_SIZE = 64  # stem=auto: SimCLR's CIFAR stem up to this image side, the ImageNet stem above


def resolve_stem(stem: str, image_size: int | None) -> str:
    """`stem`, or for stem=auto the stem that suits `image_size` (the model's data.image_size): cifar for
    images of at most CIFAR_STEM_MAX_SIZE px (32 px CIFAR keeps 4 x 4 maps after layer4, not 1 x 1),
    imagenet above (224 px CUB keeps 7 x 7, not 28 x 28)."""
    if stem != "auto":
        return stem
    if image_size is None:
        raise ConfigError("model.stem=auto needs model.image_size (conf/model/anomem.yaml sets ${data.image_size}); "
                          "or set model.stem=imagenet|cifar")
    side = image_size if isinstance(image_size, int) else max(image_size)  # an int or (h, w)
    return "cifar" if side <= CIFAR_STEM_MAX_SIZE else "imagenet"


class ResNetStages(nn.Module):
    """A torchvision ResNet cut after the last of `layers`; `forward(x)` -> the maps of `layers`.

    stem="cifar" replaces the 7x7 stride-2 convolution and the max pool with one 3x3 stride-1
    convolution (SimCLR's CIFAR variant), so that 32 px images keep 4 x 4 maps after layer4.
    """

    def __init__(self, arch: str, weights: str | None, layers: Sequence[str], stem: str = "imagenet"):
        super().__init__()
        layers = resnet_layers(layers)
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} must be auto or one of {', '.join(STEMS)}")
        net = load_backbone(arch, weights)
        if not all(hasattr(net, name) for name in ("conv1", "bn1", "relu", "maxpool", *RESNET_LAYERS)):
            raise ConfigError(f"model.backbone={arch!r}: AnoMem needs a torchvision ResNet (resnet18, resnet50, ...)")
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.layers = layers
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        depth = max(RESNET_LAYERS.index(name) for name in layers) + 1
        self.blocks = nn.ModuleDict({name: getattr(net, name) for name in RESNET_LAYERS[:depth]})
        self.channels = [self._out_channels(self.blocks[name]) for name in layers]

    @staticmethod
    def _out_channels(block: nn.Sequential) -> int:
        last = block[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: Tensor) -> list[Tensor]:
        x, features = self.stem(x), []
        for name, block in self.blocks.items():
            x = block(x)
            if name in self.layers:
                features.append(x)
        return features


class DistanceHead(nn.Module):
    """g^(s) o phi of Eq. 10: average pooling to `pool_size` x `pool_size`, then a two-layer MLP with one
    output, the anomaly distance."""

    def __init__(self, channels: int, pool_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool_size),
            nn.Flatten(),
            nn.Linear(channels * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, deviation: Tensor) -> Tensor:
        return self.net(deviation).squeeze(-1)
