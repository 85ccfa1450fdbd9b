"""PaDiM (Defard et al. 2020): per-position Gaussians of pretrained CNN features.

The "Baseline" of the FYD paper's Table 4: layers 1-3 of a ResNet-18 (or Wide-ResNet-50-2) are
upsampled to layer-1 resolution and concatenated, a random subset of channels is kept (100 for
ResNet-18, 550 for Wide-ResNet-50-2, drawn with the run's seed), each position gets a Gaussian with
covariance + 0.01 I, and the anomaly map is the Mahalanobis distance. The image score is the maximum
of the map once it is at input size and smoothed (sigma 4), as in the PaDiM paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.nn.backbones import FeatureExtractor
from anomaly_lab.nn.gaussian import PositionalGaussian


def concat_pyramid(features: list[Tensor]) -> Tensor:
    """Upsample every feature map to the first one's resolution (nearest) and concatenate channels."""
    size = features[0].shape[-2:]
    return torch.cat([features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]], dim=1)


class Padim(AnomalyModel):
    name = "padim"
    needs_training = False

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_weights: str | None = "IMAGENET1K_V1",
        layers: tuple[str, ...] = ("layer1", "layer2", "layer3"),
        n_features: int | None = 100,
        covariance_eps: float = 0.01,
        seed: int = 0,
        map_blur_sigma: float = 4.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        self.save_hyperparameters()
        self.extractor = FeatureExtractor(backbone, tuple(layers), backbone_weights).eval()
        self.extractor.requires_grad_(False)
        total = sum(self.extractor.channels())
        if n_features is not None and not 0 < n_features <= total:
            raise ConfigError(f"model.n_features={n_features} must be between 1 and {total}, the channels of {layers}")
        generator = torch.Generator().manual_seed(seed)
        channels = torch.randperm(total, generator=generator)[:n_features].sort().values if n_features else None
        self.register_buffer("channel_index", channels if channels is not None else torch.arange(total))
        self.gaussian = PositionalGaussian(covariance_eps)

    def embed(self, images: Tensor) -> Tensor:
        """Concatenated multi-layer features with the selected channels: [B, D, H/4, W/4].

        Each layer gives its selected channels before upsampling, so that only those are upsampled
        and copied; `channel_index` is sorted, so the order is that of the full concatenation.
        """
        selected, start = [], 0
        for features in self.extractor(images):
            end = start + features.shape[1]
            index = self.channel_index[(self.channel_index >= start) & (self.channel_index < end)] - start
            selected.append(features.index_select(1, index))
            start = end
        return concat_pyramid(selected)

    def fit_normal(self, dataloader: DataLoader) -> None:
        self.gaussian.reset()
        for batch in dataloader:
            self.gaussian.update(self.embed(batch.image.to(self.device)))
        self.gaussian.finalize(reduce_sum=self.sum_across_devices)

    def score(self, images: Tensor) -> ScoreOutput:
        return ScoreOutput(image_score=None, anomaly_map=self.gaussian(self.embed(images)).unsqueeze(1))

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # frozen: batch-norm statistics stay those of the backbone
        return self
