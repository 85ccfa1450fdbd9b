"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

A memory bank of locally aware patch features of the normal training images, thinned by greedy
k-center coreset selection, and nearest-neighbour scoring:
- patch features (section 3.1): layers 2 and 3 of a frozen CNN, each averaged over the 3 x 3
  neighbourhood of every position (the paper's patch size p = 3), layer 3 upsampled (bilinear) to
  layer 2's resolution, concatenated. `feature_dim` (an int) pools each layer's channels to that size
  and then their concatenation, as the authors' implementation does for WRN-50 (1024); null keeps
  the concatenation (384 channels for ResNet-18), as anomalib does.
- coreset (section 3.2, Algorithm 1): greedy k-center over the features after a random Gaussian
  projection to `projection_dim` (the paper's d* = 128) for the selection only, `coreset_ratio` of
  the bank kept (the paper's 10 % or 1 %), starting from a point drawn with the run's seed.
- scores (section 3.3): a patch's score is the distance to its nearest neighbour in the bank; the
  image score is the largest one, s* (Eq. 6), re-weighted by how far the test patch lies from the
  neighbourhood of its nearest bank feature m* (Eq. 7): s = (1 - softmax(d)_0) s*, where d are the
  test patch's distances to the `num_neighbors` nearest bank features of m* (m* first). The paper does
  not give that neighbourhood's size; 9 is anomalib's, 1 turns the re-weighting off (s = s*). The map
  is the patch scores, upsampled (bilinear) and blurred with sigma 4, as in PaDiM.

The bank and each bank feature's neighbourhood are buffers: they travel with checkpoints and into
the ONNX graph as constants. Under DDP each device embeds its share of the normal images, the shares
are gathered back into dataset order, and every device selects the same coreset as one process would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.nn.backbones import FeatureExtractor, resnet_layers
from anomaly_lab.nn.buffers import take_checkpoint_shapes
from anomaly_lab.nn.coreset import greedy_coreset, nearest_neighbours


class Patchcore(AnomalyModel):
    name = "patchcore"
    needs_training = False

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_weights: str | None = "IMAGENET1K_V1",
        layers: tuple[str, ...] = ("layer2", "layer3"),
        feature_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        coreset_block_size: int | None = 1024,
        num_neighbors: int = 9,
        search_chunk: int = 2048,
        seed: int = 0,
        map_blur_sigma: float = 4.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        self.save_hyperparameters()
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"model.coreset_ratio={coreset_ratio}: expected a fraction in (0, 1]")
        for key, value in (("feature_dim", feature_dim), ("projection_dim", projection_dim),
                           ("coreset_block_size", coreset_block_size)):
            if value is not None and value < 1:
                raise ConfigError(f"model.{key}={value}: expected a positive integer or null")
        if num_neighbors < 1:
            raise ConfigError(f"model.num_neighbors={num_neighbors}: expected at least 1 (1: no re-weighting)")
        self.extractor = FeatureExtractor(backbone, tuple(resnet_layers(layers)), backbone_weights).eval()
        self.extractor.requires_grad_(False)
        self.register_buffer("memory_bank", torch.empty(0))
        self.register_buffer("support_index", torch.empty(0, dtype=torch.long))

    def embed(self, images: Tensor) -> Tensor:
        """Locally aware patch features [B, D, h, w] at the first layer's resolution (section 3.1)."""
        layers = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in self.extractor(images)]
        size = layers[0].shape[-2:]
        layers = [layers[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in layers[1:]]
        dim = self.hparams.feature_dim
        if dim is None:
            return torch.cat(layers, dim=1)
        # Channel pooling, per position: each layer to `dim`, then their concatenation to `dim`.
        pooled = torch.cat([pool_channels(f, dim) for f in layers], dim=1)
        return pool_channels(pooled, dim)

    @torch.no_grad()
    def fit_normal(self, dataloader: DataLoader) -> None:
        bank = self.gather_in_dataset_order(self._embed_all(dataloader)).flatten(0, 1)  # [N, D]
        size = max(1, int(len(bank) * self.hparams.coreset_ratio))
        if size < len(bank):
            generator = torch.Generator().manual_seed(self.hparams.seed)
            start = int(torch.randint(len(bank), (1,), generator=generator))
            selected = greedy_coreset(self._project(bank, generator), size, start, self.hparams.coreset_block_size)
            bank = bank[selected.to(bank.device)]
        self.memory_bank = bank.contiguous()
        neighbours = min(self.hparams.num_neighbors, len(bank))
        self.support_index = nearest_neighbours(bank, bank, neighbours, self.hparams.search_chunk)[1]

    def _embed_all(self, dataloader: DataLoader) -> Tensor:
        """[n, h*w, D] patch features of this device's images, written into one preallocated tensor."""
        features, filled = None, 0
        for batch in dataloader:
            patches = self.embed(batch.image.to(self.device)).flatten(2).transpose(1, 2)  # [B, h*w, D]
            if features is None:
                features = patches.new_empty(len(dataloader.sampler), *patches.shape[1:])
            features[filled: filled + len(patches)] = patches
            filled += len(patches)
        if features is None:
            raise ConfigError(f"{self.name} needs normal training images to fill its memory bank; got none")
        return features[:filled]

    def _project(self, bank: Tensor, generator: torch.Generator) -> Tensor:
        """The bank under a random Gaussian projection to `projection_dim` (Johnson-Lindenstrauss), for selection."""
        dim = self.hparams.projection_dim
        if dim is None or dim >= bank.shape[1]:
            return bank
        projection = torch.randn(bank.shape[1], dim, generator=generator) / dim**0.5
        return bank @ projection.to(bank.device, bank.dtype)

    def score(self, images: Tensor) -> ScoreOutput:
        features = self.embed(images)
        batch, dim, height, width = features.shape
        patches = features.flatten(2).transpose(1, 2).reshape(-1, dim)  # [B*h*w, D]
        distances, nearest = nearest_neighbours(patches, self.memory_bank, 1, self.hparams.search_chunk)
        patch_scores = distances.view(batch, height * width)
        image_score, position = patch_scores.max(dim=1)  # s* (Eq. 6)
        neighbours = min(self.hparams.num_neighbors, self.support_index.shape[1])  # fewer than fitted: the nearest
        if neighbours > 1:
            rows = torch.arange(batch, device=images.device)
            anchor = nearest.view(batch, height * width)[rows, position]  # m*
            test_patch = patches.view(batch, height * width, dim)[rows, position]  # m^test,*
            support = self.memory_bank[self.support_index[anchor, :neighbours]]  # [B, b, D], m* first
            weight = 1 - torch.softmax((support - test_patch.unsqueeze(1)).norm(dim=2), dim=1)[:, 0]
            image_score = weight * image_score  # Eq. 7
        return ScoreOutput(image_score=image_score, anomaly_map=patch_scores.view(batch, 1, height, width))

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # frozen: batch-norm statistics stay those of the backbone
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_checkpoint_shapes(self, state_dict, prefix, ("memory_bank", "support_index"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def pool_channels(features: Tensor, size: int) -> Tensor:
    """[B, C, h, w] -> [B, size, h, w]: adaptive average pooling along the channels of each position."""
    batch, _, height, width = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(batch * height * width, 1, -1)
    return F.adaptive_avg_pool1d(flat, size).view(batch, height, width, size).permute(0, 3, 1, 2)
