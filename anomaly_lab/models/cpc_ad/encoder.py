"""ResNet v2 (pre-activation, He et al. 2016) encoders, trained from scratch.

`PreActResNet18(stages=3)` is a ResNet-18 v2 up to its third residual stage, the CPC-AD encoder
(following CPC, Oord et al. 2019, which takes the third residual block of a ResNet v2 and mean-pools
it to one vector per patch). Each stage holds two basic pre-activation blocks; stage widths 64, 128,
256, 512 with strides 1, 2, 2, 2 after the stem: `imagenet`, the usual 7x7 conv stride 2 and 3x3
max-pool stride 2 (a 64 px sub-patch reaches stage 1 at 16 x 16), or `small`, one 3x3 conv stride 1
(the CIFAR ResNets' stem: a 16 px sub-patch reaches stage 1 at 16 x 16 rather than 4 x 4).
"""

from __future__ import annotations

from torch import Tensor, nn

from anomaly_lab.errors import ConfigError

WIDTHS = (64, 128, 256, 512)


NORMS = ("batch", "group", "none")
STEMS = ("imagenet", "small")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """`batch`: BatchNorm2d (statistics over the sub-patches of one call); `group`: GroupNorm with 32
    groups, per sub-patch; `none`: identity (the Greedy InfoMax encoders use no normalisation)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm={kind!r} must be one of {', '.join(NORMS)}")


def stem_layer(kind: str, in_channels: int) -> nn.Module:
    if kind == "imagenet":
        return nn.Sequential(nn.Conv2d(in_channels, WIDTHS[0], 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
    if kind == "small":
        return nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
    raise ConfigError(f"model.stem={kind!r} must be one of {', '.join(STEMS)}")


class PreActBlock(nn.Module):
    """norm -> ReLU -> conv3x3(stride) -> norm -> ReLU -> conv3x3, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.norm1 = norm_layer(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm2 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.norm1(x))
        # A projection shortcut takes the pre-activated input, as in the v2 paper.
        identity = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(self.relu(self.norm2(self.conv1(activated))))
        return out + identity


class PreActResNet18(nn.Module):
    """ResNet-18 v2 up to residual stage `stages` (1-4), mean-pooled: [N, C, h, w] -> [N, width]."""

    def __init__(self, in_channels: int = 1, stages: int = 3, norm: str = "batch", stem: str = "imagenet"):
        super().__init__()
        if not 1 <= stages <= 4:
            raise ConfigError(f"model.encoder_stages={stages} must be between 1 and 4")
        norm_layer(norm, WIDTHS[0])  # validates the option
        self.stem = stem_layer(stem, in_channels)
        layers, channels = [], WIDTHS[0]
        for stage in range(stages):
            width, stride = WIDTHS[stage], 1 if stage == 0 else 2
            layers += [PreActBlock(channels, width, stride, norm), PreActBlock(width, width, 1, norm)]
            channels = width
        self.blocks = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))
