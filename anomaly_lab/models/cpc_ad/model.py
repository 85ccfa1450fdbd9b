"""CPC-AD (de Haan & Löwe 2021): contrastive predictive coding losses as anomaly scores.

An image is cut into overlapping patches (paper: 768 px images, 256 px patches, 64 px sub-patches,
each with 50 % overlap) and every patch into a grid of G x G overlapping sub-patches, each encoded by
a ResNet-18 v2 up to its third residual stage (grayscale, trained from scratch) into a vector z.
Without an autoregressive model (the Greedy InfoMax form, Eq. 2), a linear W_k predicts the
sub-patch k steps away, z_{t+k}, from z_t, for k = 1..`prediction_steps`; the InfoNCE loss contrasts
the positive against `negatives` = 16 other encodings. Four directions (context from above, below,
left and right) have their own W_k. Training negatives come from the current batch; at test time
they come from a bank of encodings of the normal training images, built in `fit_normal`, so that an
anomalous sub-patch only ever appears as the positive (section 4).

Scores (Eq. 3): a sub-patch's score is its InfoNCE loss, the mean over every direction and step
that predicts it within its patch. Map: the mean of the scores of all sub-patches covering a pixel,
constant on cells of half a sub-patch, at the resized image size (section 5.2). Image score: the
mean of the top `top_fraction` = 5 % of the sub-patch scores (section 5.1; `max` and `mean` are the
alternatives of section 4).

Choices where the paper is silent (config keys): `prediction_steps` (5, Greedy InfoMax's value for
its 7 x 7 grid), `norm` (batch norm, as in ResNet v2; `none` as in Greedy InfoMax's encoders),
`negative_bank_size` (how many normal encodings the test bank keeps, drawn with the seed),
`encoder_chunk` (sub-patches per encoder call, bounds memory), `map_blur_sigma` (0: the paper does
not smooth). Not config keys: the training loss is the mean over directions and steps of the mean
pair loss; the 16 negatives are drawn per context position and shared by its K steps and four directions
(as Greedy InfoMax draws them once per position); test negatives are drawn with a generator seeded by
`seed` at every call and are the same for every image, so that an image's score does not depend on
its batch. The four directions share one encoder (the paper's "four separate models" is read, as in
the issue, as four predictors).

Sub-patches that patches share (the patch stride must be a multiple of the sub-patch stride) are
encoded once: the encoder runs on the image's grid of sub-patches in chunks, and each patch takes its
G x G window of the encodings, which at test time is exactly what encoding every patch apart gives
(768 px: 529 encodings per image instead of 1225).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.cpc_ad.encoder import PreActResNet18
from anomaly_lab.models.cpc_ad.info_nce import DIRECTIONS, directional_info_nce
from anomaly_lab.models.cpc_ad.patches import grid_size, unfold_patches
from anomaly_lab.models.cpc_ad.scores import IMAGE_SCORES, image_scores, subpatch_map


class CPCAD(AnomalyModel):
    name = "cpc_ad"

    def __init__(
        self,
        in_channels: int = 1,
        patch_size: int = 256,
        patch_stride: int = 128,
        subpatch_size: int = 64,
        subpatch_stride: int = 32,
        prediction_steps: int = 5,
        negatives: int = 16,
        encoder_stages: int = 3,
        norm: str = "batch",
        encoder_chunk: int = 256,
        image_score: str = "top_mean",
        top_fraction: float = 0.05,
        negative_bank_size: int = 65536,
        lr: float = 1.5e-4,
        seed: int = 0,
        map_blur_sigma: float = 0.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        self.save_hyperparameters()
        self.grid = grid_size(patch_size, subpatch_size, subpatch_stride, "model.subpatch_size/subpatch_stride")
        if patch_stride % subpatch_stride:
            raise ConfigError(
                f"model.patch_stride={patch_stride} must be a multiple of model.subpatch_stride={subpatch_stride}"
            )
        if not 1 <= prediction_steps < self.grid:
            raise ConfigError(f"model.prediction_steps={prediction_steps} must be in [1, {self.grid - 1}]")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"model.image_score={image_score!r} must be one of {', '.join(IMAGE_SCORES)}")
        if not 0 < top_fraction <= 1:
            raise ConfigError(f"model.top_fraction={top_fraction} must be in (0, 1]")
        for option, value in (("negatives", negatives), ("encoder_chunk", encoder_chunk),
                              ("negative_bank_size", negative_bank_size)):
            if value < 1:
                raise ConfigError(f"model.{option}={value} must be >= 1")
        self.encoder = PreActResNet18(in_channels, encoder_stages, norm)
        dims = self.encoder.out_channels
        weights = torch.empty(len(DIRECTIONS), prediction_steps, dims, dims)
        for weight in weights.flatten(0, 1):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Linear does
        self.predictors = nn.Parameter(weights)
        self.register_buffer("negative_bank", torch.empty(0, dims))
        self._train_generator = torch.Generator().manual_seed(seed)

    def reseed_training(self, seed: int) -> None:
        self._train_generator.manual_seed(seed)

    # --- encodings ------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Encodings of the image's grid of sub-patches: [B, C, H, W] -> [B, ny, nx, D]."""
        hp = self.hparams
        for length in images.shape[-2:]:
            grid_size(length, hp.patch_size, hp.patch_stride, "model.patch_size/patch_stride vs data.image_size")
        subpatches = unfold_patches(images, hp.subpatch_size, hp.subpatch_stride)
        batch, ny, nx = subpatches.shape[:3]
        flat = subpatches.reshape(-1, *subpatches.shape[3:])
        encodings = torch.cat([self.encoder(chunk) for chunk in flat.split(hp.encoder_chunk)])
        return encodings.view(batch, ny, nx, -1)

    def patch_grids(self, encodings: Tensor) -> Tensor:
        """Each patch's G x G window of the sub-patch grid: [B, ny, nx, D] -> [B, Py, Px, G, G, D]."""
        step = self.hparams.patch_stride // self.hparams.subpatch_stride
        return encodings.unfold(1, self.grid, step).unfold(2, self.grid, step).permute(0, 1, 2, 4, 5, 3)

    # --- training -------------------------------------------------------------------------------
    def training_loss(self, images: Tensor) -> Tensor:
        """The contrastive loss of a batch, with negatives drawn from its own sub-patches (section 3)."""
        encodings = self.encode(images)
        grids = self.patch_grids(encodings)
        pool = encodings.reshape(-1, encodings.shape[-1])
        index = torch.randint(len(pool), (*grids.shape[:-1], self.hparams.negatives), generator=self._train_generator)
        return directional_info_nce(grids, pool[index.to(pool.device)], self.predictors)[2]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch.image)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.image))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # --- the bank of normal encodings, the test negatives ---------------------------------------
    def fit_normal(self, dataloader: DataLoader) -> None:
        encodings = [self.encode(batch.image.to(self.device)).flatten(0, 2) for batch in dataloader]
        bank = self.gather_across_devices(torch.cat(encodings))
        bank = bank[bank[:, 0].argsort()]  # one order whatever the number of devices
        generator = torch.Generator().manual_seed(self.hparams.seed)
        keep = torch.randperm(len(bank), generator=generator)[: self.hparams.negative_bank_size]
        self.negative_bank = bank[keep.to(bank.device)].contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "negative_bank"
        if key in state_dict:  # the bank's size is known only once fitted
            self.negative_bank = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def test_negatives(self, grids_shape: torch.Size) -> Tensor:
        """Negatives of the predictions from every position of one image's patches, drawn from the bank
        with the seed: [Py, Px, G, G, N, D], the same for every image."""
        if len(self.negative_bank) == 0:
            raise RuntimeError("CPCAD.score needs the bank of normal encodings: run fit_normal first")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        index = torch.randint(len(self.negative_bank), (*grids_shape, self.hparams.negatives), generator=generator)
        return self.negative_bank[index.to(self.negative_bank.device)]

    # --- scoring --------------------------------------------------------------------------------
    def subpatch_scores(self, images: Tensor) -> Tensor:
        """InfoNCE loss of every sub-patch of every patch (Eq. 3): [B, Py, Px, G, G]."""
        grids = self.patch_grids(self.encode(images))
        total, count, _ = directional_info_nce(grids, self.test_negatives(grids.shape[1:-1]), self.predictors)
        return total / count

    def score(self, images: Tensor) -> ScoreOutput:
        hp = self.hparams
        scores = self.subpatch_scores(images)
        anomaly_map = subpatch_map(scores, hp.patch_stride, hp.subpatch_size, hp.subpatch_stride)
        return ScoreOutput(image_scores(scores, hp.image_score, hp.top_fraction), anomaly_map)
