"""The SSAE autoencoder of Table 1 (Bauer 2022): a convolutional encoder with stacked dilated
convolutions (SDC) at 1/8 resolution and a transposed-convolution decoder back to the input size.

Every convolution but the last is followed by batch normalisation and ReLU; the last (1x1, to the
image channels) by a sigmoid, so outputs lie in [0, 1] like the (un-normalised) input images.
The input height and width must be multiples of 8 (three 2x2 poolings, undone by three stride-2
transposed convolutions).

The SDC dilations are Table 1's (1, 2, 4, 8, 16) at 512 px, where the SDC maps are 64 x 64 and the
largest dilation's 5x5 kernel spans 65 pixels: the whole map. On smaller inputs the same rates convolve
mostly padding (at 128 px, 16 x 16 maps: the dilation-16 branch sees only its centre tap inside the
map). `sdc_dilations(image_size)` scales the rates with the map (rounded, at least 1), keeping the
five branches and their 320 channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly_lab.errors import ConfigError

SDC_DILATIONS = (1, 2, 4, 8, 16)
PAPER_SIZE = 512


def sdc_dilations(image_size: int) -> tuple[int, ...]:
    """Table 1's dilation rates scaled from its 512 px input to `image_size`: (1, 1, 1, 2, 4) at 128 px,
    (1, 1, 2, 4, 8) at 256 px, the paper's at 512 px and above that scaled up."""
    return tuple(max(1, round(d * image_size / PAPER_SIZE)) for d in SDC_DILATIONS)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """A same-size convolution followed by batch normalisation and ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def up_bn_relu(channels: int) -> nn.Sequential:
    """Table 1's "Transp. Conv. 3x3 / 2": doubles height and width, keeps the channels."""
    return nn.Sequential(
        nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class StackedDilatedConv(nn.Module):
    """SDC_{1,2,4,8,16}: parallel 5x5 convolutions of `filters` filters, one per dilation (Table 1: 1, 2, 4, 8
    and 16), concatenated (5 * 64 = 320 channels), each with batch normalisation and ReLU."""

    def __init__(self, in_channels: int, filters: int = 64, dilations: tuple[int, ...] = SDC_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn_relu(in_channels, filters, 5, d) for d in dilations)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class SsaeNet(nn.Module):
    """Table 1: [B, C, H, W] in [0, 1] -> [B, C, H, W] in [0, 1] (C = `channels`, 3 in the paper); `dilations`:
    the rates of each SDC block's five branches."""

    def __init__(self, channels: int = 3, dilations: tuple[int, ...] = SDC_DILATIONS):
        super().__init__()
        width = 64 * len(dilations)
        self.encoder = nn.Sequential(
            conv_bn_relu(channels, 32), conv_bn_relu(32, 32), nn.MaxPool2d(2),
            conv_bn_relu(32, 64), conv_bn_relu(64, 64), nn.MaxPool2d(2),
            conv_bn_relu(64, 128), conv_bn_relu(128, 128), nn.MaxPool2d(2),
        )
        self.sdc = nn.Sequential(
            StackedDilatedConv(128, dilations=dilations),
            *(StackedDilatedConv(width, dilations=dilations) for _ in range(3)),
        )
        self.decoder = nn.Sequential(
            conv_bn_relu(width, 256),
            up_bn_relu(256), conv_bn_relu(256, 256), conv_bn_relu(256, 128),
            up_bn_relu(128), conv_bn_relu(128, 128), conv_bn_relu(128, 64),
            up_bn_relu(64), conv_bn_relu(64, 64), conv_bn_relu(64, 32),
            nn.Conv2d(32, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ConfigError(
                f"SSAE needs image height and width that are multiples of 8, got {tuple(x.shape[-2:])}: "
                "set data.image_size (and data.crop_size) accordingly"
            )
        return torch.sigmoid(self.decoder(self.sdc(self.encoder(x))))
