"""FYD, "Focus Your Distribution" (Zheng et al. 2022): coarse-to-fine non-contrastive learning.

Training (Eq. 5): L = lambda_1 * L_ICA + lambda_2 * L_FAS, end to end.
- ICA (image-level coarse alignment, Eq. 1-2, Algorithm 2, supplement Fig. 4): a spatial transformer
  regressing one rotation angle per image, identity at initialisation, trained by the pixel-wise l2
  distance between the aligned images of randomly paired batch members (`ica_loss`), lr `ica_lr`.
- FCA (feature-level coarse alignment): 6-parameter affine spatial transformers, identity at
  initialisation, after each backbone layer in `fca_layers` (Table 6), trained only through L_FAS.
- Fine alignment (Eq. 3-4, Algorithm 1): the last backbone layer (after its FCA) of the batch and of
  a shuffled copy go through a dense SimSiam head (1x1-conv encoder f and predictor g); the loss is
  the symmetric negative cosine with stop-gradient (`anomaly_lab.models.fyd.simsiam`).
- Backbone: the first three blocks of a ResNet-18 (or Wide-ResNet-50-2), fine-tuned by L_FAS.
- Optimiser (supplement): SGD, momentum 0.9, weight decay 1e-5, lr 1e-4 (ICA 0.01), one cosine
  cycle; batch 32 and 224 x 224 images are data keys (conf/model/fyd.yaml).

Scoring (Eq. 6-7): the aligned fine-tuned layers are concatenated per position (upsampled to the
first layer's resolution), a Gaussian per position is fitted on the training normals
(`PositionalGaussian`, all C1+C2+C3 channels by default), and the anomaly map is the Mahalanobis
distance. One frame for all layers: each FCA warps its layer and, through the blocks after it, every
deeper layer, so each layer's features are warped on by the FCAs after it into the frame of the last
one (the most aligned) before they are concatenated. The map, in that frame, is warped back through
the inverse of ICA's rotation composed with every FCA so that it lines up with the input image and
its mask. The image score is the map's maximum (the paper); the map is first smoothed by
`map_blur_sigma` as PaDiM does (FYD names no smoothing: `map_blur_sigma: 0` takes the maximum of the
raw distances).

Switches for the ablations (Table 4): `ica`, `fca_layers`, `non_contrastive`; all off is the PaDiM
baseline on the same backbone (nothing is trained). The distance-variance score of Eq. 8-11
(`distance_variance: true`) is logged as `test/distance_variance` (Eq. 10 on the training normals;
Eq. 11 is its mean over categories).

Where the paper is silent (config keys): the number of epochs (`trainer.max_epochs`); `n_features`
(null, the default: all channels, Eq. 6; an integer: PaDiM's random subset drawn with `seed`, 100 for
ResNet-18 and 550 for Wide-ResNet-50-2, for memory); `covariance_eps` (PaDiM's 0.01); `head_dim` and
`predictor_hidden` of f and g; the localisation network's widths (`stn_channels`, `stn_hidden`,
`stn_pool`); the cosine schedule's step (per optimiser step); `stn_padding`, what the spatial
transformers sample outside their input (`border` by default: with `zeros` a rotation brings dark
corners in and the alignment losses can fall by moving content out of the frame); the warp-back
repeats the map's border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.fyd.alignment import AlignedResNet, ica_loss
from anomaly_lab.models.fyd.simsiam import DenseSimSiam
from anomaly_lab.models.fyd.spatial_transformer import SpatialTransformer, compose_affine, invert_affine, warp
from anomaly_lab.models.padim import concat_pyramid
from anomaly_lab.nn.gaussian import PositionalGaussian


def distance_variance(count: Tensor, total: Tensor, total_squares: Tensor) -> Tensor:
    """S_cls of Eq. 10 from streaming sums over N images of the [H, W] Mahalanobis distances D (Eq. 9):
    the variance over images (divided by N), sum D^2 / N - (sum D / N)^2, averaged over positions."""
    mean = total / count
    return (total_squares / count - mean * mean).clamp_min(0).mean()


class FYD(AnomalyModel):
    name = "fyd"

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_weights: str | None = "IMAGENET1K_V1",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        ica: bool = True,
        fca_layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        non_contrastive: bool = True,
        lambda_1: float = 1.0,
        lambda_2: float = 1.0,
        lr: float = 1e-4,
        ica_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        head_dim: int = 256,
        predictor_hidden: int = 64,
        stn_channels: Sequence[int] = (8, 16),
        stn_hidden: int = 32,
        stn_pool: int = 4,
        stn_padding: str = "border",
        n_features: int | None = None,
        covariance_eps: float = 0.01,
        distance_variance: bool = False,
        seed: int = 0,
        map_blur_sigma: float = 4.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        self.save_hyperparameters()
        fca_layers = list(fca_layers or [])
        if fca_layers and not non_contrastive:
            raise ConfigError(
                f"model.fca_layers={fca_layers} needs model.non_contrastive=true: FCA is trained only by its loss"
            )
        self.needs_training = ica or non_contrastive  # all off: the PaDiM baseline, nothing to train
        stn = {"conv_channels": tuple(stn_channels), "hidden": stn_hidden, "pool_size": stn_pool,
               "padding_mode": stn_padding}
        self.ica = SpatialTransformer(3, kind="rotation", **stn) if ica else None
        self.backbone = AlignedResNet(backbone, backbone_weights, layers, fca_layers, stn)
        self.backbone.requires_grad_(non_contrastive)
        channels = self.backbone.channels()
        self.siamese = DenseSimSiam(channels[-1], head_dim, predictor_hidden) if non_contrastive else None
        total = sum(channels)
        if n_features is not None and not 0 < n_features <= total:
            raise ConfigError(f"model.n_features={n_features} must be between 1 and {total}, the channels of {layers}")
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(total, generator=generator)[:n_features].sort().values if n_features else torch.arange(total)
        self.register_buffer("channel_index", index)
        self.gaussian = PositionalGaussian(covariance_eps)
        self.register_buffer("normal_distance_variance", torch.tensor(float("nan")))
        self._pairing = torch.Generator().manual_seed(seed)

    def reseed_training(self, seed: int) -> None:
        self._pairing.manual_seed(seed)

    # --- features, in the aligned frame ---------------------------------------------------------
    def align(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """ICA: the images rotated to the common pose and the [B, 2, 3] rotation (None without ICA)."""
        return self.ica(images) if self.ica is not None else (images, None)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Concatenated aligned features with the selected channels [B, D, h, w], and the [B, 2, 3]
        map from their positions to the input image's (None when no alignment applies)."""
        aligned, theta = self.align(images)
        features, frame = self.in_one_frame(*self.backbone(aligned))
        selected, start = [], 0
        for layer in features:
            end = start + layer.shape[1]
            index = self.channel_index[(self.channel_index >= start) & (self.channel_index < end)] - start
            selected.append(layer.index_select(1, index))
            start = end
        if frame is not None:
            theta = frame if theta is None else compose_affine(theta, frame)
        return concat_pyramid(selected), theta

    def in_one_frame(self, features: list[Tensor], fca_thetas: dict[str, Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """Each layer's features warped by the FCAs after it into the last FCA's frame, and the [B, 2, 3] map
        from that frame to the ICA-aligned image's (the FCAs composed in order; None without FCA)."""
        later, in_frame = None, []
        for name, feature in zip(reversed(self.backbone.layers), reversed(features), strict=True):
            in_frame.append(feature if later is None else warp(feature, later, self.hparams.stn_padding))
            if name in fca_thetas:
                later = fca_thetas[name] if later is None else compose_affine(fca_thetas[name], later)
        return in_frame[::-1], later

    # --- training -------------------------------------------------------------------------------
    def _partner(self, batch_size: int) -> Tensor:
        """A random pairing of the batch (Algorithm 1-2: x2 = x[rand_permutation(N)]), from the run's seed."""
        return torch.randperm(batch_size, generator=self._pairing).to(self.device)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        aligned, _ = self.align(batch.image)
        loss = aligned.new_zeros(())
        if self.ica is not None:
            loss_ica = ica_loss(aligned, self._partner(len(aligned)))
            self.log("train/loss_ica", loss_ica)
            loss = loss + self.hparams.lambda_1 * loss_ica
        if self.siamese is not None:
            features, _ = self.backbone(aligned)
            loss_fas = self.siamese(features[-1], self._partner(len(aligned)))
            self.log("train/loss_fas", loss_fas)
            loss = loss + self.hparams.lambda_2 * loss_fas
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = []
        if self.ica is not None:
            groups.append({"params": list(self.ica.parameters()), "lr": hp.ica_lr})
        if self.siamese is not None:
            groups.append({"params": [*self.backbone.parameters(), *self.siamese.parameters()], "lr": hp.lr})
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- normal statistics and scoring ----------------------------------------------------------
    def fit_normal(self, dataloader: DataLoader) -> None:
        self.gaussian.reset()
        for batch in dataloader:
            self.gaussian.update(self.embed(batch.image.to(self.device))[0])
        self.gaussian.finalize(reduce_sum=self.sum_across_devices)
        if self.hparams.distance_variance:
            sums = 0.0  # per position: number of images, sum of D, sum of D^2
            for batch in dataloader:
                d = self.gaussian(self.embed(batch.image.to(self.device))[0]).double()
                sums = sums + torch.stack([torch.full_like(d[0], len(d)), d.sum(0), d.pow(2).sum(0)])
            count, total, total_squares = self.sum_across_devices(sums)
            self.normal_distance_variance.fill_(distance_variance(count, total, total_squares))

    def score(self, images: Tensor) -> ScoreOutput:
        features, theta = self.embed(images)
        anomaly_map = self.gaussian(features).unsqueeze(1)
        if theta is not None:  # from the aligned frame back to the input's
            anomaly_map = warp(anomaly_map, invert_affine(theta), padding_mode="border")
        return ScoreOutput(image_score=None, anomaly_map=anomaly_map)

    def on_test_epoch_end(self) -> None:
        if self.hparams.distance_variance:
            self.log("test/distance_variance", self.normal_distance_variance)
