"""CPC-AD (de Haan & Löwe 2021): contrastive predictive coding losses as anomaly scores.

An image is cut into overlapping patches (paper: 768 px images, 256 px patches, 64 px sub-patches,
each with 50 % overlap) and every patch into a grid of G x G overlapping sub-patches, each encoded by
a ResNet-18 v2 up to its third residual stage (grayscale, trained from scratch) into a vector z.
Without an autoregressive model (the Greedy InfoMax form, Eq. 2), a linear W_k predicts the
sub-patch k + `skip_step` cells away, z_{t+k+skip}, from z_t, for k = 1..`prediction_steps`; the
InfoNCE loss contrasts the positive against `negatives` = 16 other encodings. Four directions
(context from above, below, left and right) have their own W_k and, with `separate_encoders`, their
own encoder: the paper's "four separate models" (section 5). Training negatives come from the
current batch; at test time they come from a bank of encodings of the normal training images, built
in `fit_normal`, so that an anomalous sub-patch only ever appears as the positive (section 4).

Scores (Eq. 3): a sub-patch's score is its InfoNCE loss, the mean over every direction and step
that predicts it within its patch. Map: the mean of the scores of all sub-patches covering a pixel,
constant on cells of half a sub-patch, at the resized image size (section 5.2). Image score: the
mean of the top `top_fraction` = 5 % of the sub-patch scores (section 5.1; `max` and `mean` are the
alternatives of section 4).

Choices where the paper is silent (config keys): `prediction_steps` (5, Greedy InfoMax's value for
its 7 x 7 grid); `skip_step` (cells left out between a context and its first target; null: as many
as make them share no pixel, Greedy InfoMax's choice, 1 at 50 % overlap; 0: the nearest,
half-overlapping neighbour is predicted); `norm` (`batch`, as in ResNet v2, its statistics over all
the sub-patches of a training batch; `group`, per sub-patch; `none`, as in Greedy InfoMax's
encoders); `stem` (`imagenet`, ResNet's, or `small`, a 3x3 stride-1 conv for sub-patches of a few
pixels); `negative_bank_size` (how many normal encodings the test bank keeps, drawn with the seed);
`encoder_chunk` (sub-patches per encoder call, bounds memory); `map_blur_sigma` (0: the paper does
not smooth). Not config keys: the training loss is the mean over directions and steps of the mean
pair loss; the 16 negatives are drawn per context position and shared by its K steps and four
directions (as Greedy InfoMax draws them once per position), each direction's taken from its own
encoder's encodings of the same sub-patches; test negatives are drawn with a generator seeded by
`seed` at every call and are the same for every image, so that an image's score does not depend on
its batch. The class defaults (skip_step 0, batch norm, imagenet stem, one shared encoder) are those
of runs written before these options existed, so that their saved configs rebuild the same network;
`conf/model/cpc_ad.yaml` holds the framework's defaults and `experiment=cpc_ad_mvtec` the paper's.

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
from anomaly_lab.models.cpc_ad.patches import grid_size, no_shared_pixel_skip, unfold_patches
from anomaly_lab.models.cpc_ad.scores import IMAGE_SCORES, image_scores, subpatch_map
from anomaly_lab.nn.buffers import take_checkpoint_shapes


def per_direction(tensor: Tensor) -> Tensor:
    """[E, ...] tensors of the E encoders as [4, ...], one per direction: a view when E = 1 (shared)."""
    return tensor.expand(len(DIRECTIONS), *tensor.shape[1:])


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
        skip_step: int | None = 0,
        negatives: int = 16,
        encoder_stages: int = 3,
        norm: str = "batch",
        stem: str = "imagenet",
        separate_encoders: bool = False,
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
        self.skip_step = no_shared_pixel_skip(subpatch_size, subpatch_stride) if skip_step is None else skip_step
        if self.skip_step < 0:
            raise ConfigError(f"model.skip_step={skip_step} must be >= 0 (or null: no pixel shared)")
        if not 1 <= prediction_steps < self.grid - self.skip_step:
            raise ConfigError(
                f"model.prediction_steps={prediction_steps} must be in [1, {self.grid - self.skip_step - 1}] "
                f"with model.skip_step={self.skip_step} on a {self.grid} x {self.grid} sub-patch grid"
            )
        if (self.grid - 1) // 2 < self.skip_step + 1:  # the middle row is then nobody's target
            raise ConfigError(
                f"model.skip_step={self.skip_step}: on a {self.grid} x {self.grid} sub-patch grid the middle "
                f"sub-patches would never be predicted; use a smaller skip_step or a larger patch_size"
            )
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"model.image_score={image_score!r} must be one of {', '.join(IMAGE_SCORES)}")
        if not 0 < top_fraction <= 1:
            raise ConfigError(f"model.top_fraction={top_fraction} must be in (0, 1]")
        for option, value in (("negatives", negatives), ("encoder_chunk", encoder_chunk),
                              ("negative_bank_size", negative_bank_size)):
            if value < 1:
                raise ConfigError(f"model.{option}={value} must be >= 1")
        self.encoders = nn.ModuleList(
            PreActResNet18(in_channels, encoder_stages, norm, stem)
            for _ in range(len(DIRECTIONS) if separate_encoders else 1)
        )
        dims = self.encoders[0].out_channels
        weights = torch.empty(len(DIRECTIONS), prediction_steps, dims, dims)
        for weight in weights.flatten(0, 1):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Linear does
        self.predictors = nn.Parameter(weights)
        self.register_buffer("negative_bank", torch.empty(len(self.encoders), 0, dims))
        self._train_generator = torch.Generator().manual_seed(seed)

    def reseed_training(self, seed: int) -> None:
        self._train_generator.manual_seed(seed)

    # --- encodings ------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Each encoder's encodings of the image's grid of sub-patches: [B, C, H, W] -> [E, B, ny, nx, D]
        (E = 4 separate encoders, one per direction of DIRECTIONS, or 1 shared).

        The encoder runs on `encoder_chunk` sub-patches at a time, except BatchNorm in training, which
        takes all of a batch's sub-patches in one call so that their statistics are the batch's, not a
        chunk's: with per-sample (or no) normalisation, or in eval mode, the chunk changes nothing.
        """
        hp = self.hparams
        for length in images.shape[-2:]:
            grid_size(length, hp.patch_size, hp.patch_stride, "model.patch_size/patch_stride vs data.image_size")
        subpatches = unfold_patches(images, hp.subpatch_size, hp.subpatch_stride)
        batch, ny, nx = subpatches.shape[:3]
        flat = subpatches.reshape(-1, *subpatches.shape[3:])
        chunk = len(flat) if self.training and hp.norm == "batch" else hp.encoder_chunk
        encodings = [torch.cat([encoder(part) for part in flat.split(chunk)]) for encoder in self.encoders]
        return torch.stack(encodings).view(len(self.encoders), batch, ny, nx, -1)

    def patch_grids(self, encodings: Tensor) -> Tensor:
        """Each patch's G x G window of the sub-patch grid, for each direction:
        [E, B, ny, nx, D] -> [4, B, Py, Px, G, G, D] (a view; shared encodings are expanded)."""
        step = self.hparams.patch_stride // self.hparams.subpatch_stride
        grids = encodings.unfold(2, self.grid, step).unfold(3, self.grid, step).permute(0, 1, 2, 3, 5, 6, 4)
        return per_direction(grids)

    # --- training -------------------------------------------------------------------------------
    def training_loss(self, images: Tensor) -> Tensor:
        """The contrastive loss of a batch, with negatives drawn from its own sub-patches (section 3)."""
        encodings = self.encode(images)
        grids = self.patch_grids(encodings)
        pool = encodings.flatten(1, 3)  # [E, B * ny * nx, D]: each encoder's negatives are its own
        index = torch.randint(pool.shape[1], (*grids.shape[1:-1], self.hparams.negatives),
                              generator=self._train_generator)
        negatives = per_direction(pool[:, index.to(pool.device)])
        return directional_info_nce(grids, negatives, self.predictors, self.skip_step)[2]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch.image)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch.image))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # --- the bank of normal encodings, the test negatives ---------------------------------------
    def fit_normal(self, dataloader: DataLoader) -> None:
        """The bank of normal encodings, [E, M, D]: the same M sub-patches for every encoder."""
        encodings = [self.encode(batch.image.to(self.device)).flatten(1, 3).transpose(0, 1) for batch in dataloader]
        bank = self.gather_across_devices(torch.cat(encodings))  # [all sub-patches, E, D]
        bank = bank[bank[:, 0, 0].argsort()]  # one order whatever the number of devices
        generator = torch.Generator().manual_seed(self.hparams.seed)
        keep = torch.randperm(len(bank), generator=generator)[: self.hparams.negative_bank_size]
        self.negative_bank = bank[keep.to(bank.device)].transpose(0, 1).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:  # runs before separate_encoders
            state_dict[prefix + "encoders.0." + key[len(prefix + "encoder."):]] = state_dict.pop(key)
        key = prefix + "negative_bank"
        if key in state_dict:  # the bank's size is known only once fitted
            if state_dict[key].dim() == 2:  # [M, D], one encoder, before separate_encoders
                state_dict[key] = state_dict[key].unsqueeze(0)
        take_checkpoint_shapes(self, state_dict, prefix, ("negative_bank",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def test_negatives(self, grids_shape: torch.Size) -> Tensor:
        """Negatives of the predictions from every position of one image's patches, drawn from the bank
        with the seed, the same sub-patches for each encoder: [4, Py, Px, G, G, N, D], the same for every image."""
        bank = self.negative_bank
        if bank.shape[1] == 0:
            raise RuntimeError("CPCAD.score needs the bank of normal encodings: run fit_normal first")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        index = torch.randint(bank.shape[1], (*grids_shape, self.hparams.negatives), generator=generator)
        return per_direction(bank[:, index.to(bank.device)])

    # --- scoring --------------------------------------------------------------------------------
    def subpatch_scores(self, images: Tensor) -> Tensor:
        """InfoNCE loss of every sub-patch of every patch (Eq. 3): [B, Py, Px, G, G]."""
        grids = self.patch_grids(self.encode(images))
        negatives = self.test_negatives(grids.shape[2:-1])
        total, count, _ = directional_info_nce(grids, negatives, self.predictors, self.skip_step)
        return total / count

    def score(self, images: Tensor) -> ScoreOutput:
        hp = self.hparams
        scores = self.subpatch_scores(images)
        anomaly_map = subpatch_map(scores, hp.patch_stride, hp.subpatch_size, hp.subpatch_stride)
        return ScoreOutput(image_scores(scores, hp.image_score, hp.top_fraction), anomaly_map)
