"""SSAE: self-supervised training with autoencoders (Bauer 2022).

An autoencoder (Table 1, `network.py`) is trained on normal images X whose random patches were
elastically deformed and pasted back through a random shape mask (section 3.2, Fig. 5,
`corruption.py`), to give back X from the corrupted X-hat under objective Eq. 1 (`objective=1`)
or Eq. 3 (`objective=3`), lam = 0.5 (`objectives.py`). At test time images pass unchanged; the
heatmap is the per-pixel residual |F(X) - X| averaged over the colour channels, Gaussian-smoothed
(the base's `map_blur_sigma`), and the image score is its maximum.

The network works in image space: its sigmoid output is compared with the input, so the data
must be un-normalised images in [0, 1]. The model config sets `data.mean: [0, 0, 0]` and
`data.std: [1, 1, 1]`, and fitting stops with a ConfigError if the datamodule normalises otherwise.

Training schedule (section 3.2): progressive resizing — the batch is downsampled inside
`training_step` to `scale` times the loaded size, the scale stepping up with the epoch
(`progressive_resizing`: [[first_epoch, scale], ...]; null = always the full size). Validation and
test always see the full size. The rotations and flips per category of section 4.1 are albumentations
`data.train_augmentations` (see conf/experiment/ssae_mvtec.yaml).

Early stopping (section 4.4: Eq. 3 "must rely on early stopping"; the paper gives no criterion):
with `early_stopping_patience` set, every validation computes the objective on the held-out normals,
corrupted by a generator reseeded at each validation (the same corruptions every epoch), logged as
`val/objective`; from the first epoch of the last progressive-resizing stage on (earlier epochs train
at other sizes), training stops after that many validations without a lower value and ends on the
best epoch's weights (`EarlyStoppingOnBest`). Only normal images are looked at. With
`data.val_ratio=0` there are no held-out normals and the fit stops with a ConfigError.

The SDC dilations (`sdc_dilations`: a list, or `auto` = Table 1's rates scaled to `image_size`, see
network.py) and the corruption's sizes (fractions of the image side, see corruption.py) follow the
image size, so that a CPU-sized run convolves its maps and corrupts its patches as the paper's 512 px
run does.

Where the paper is silent (config keys): the optimiser (Adam, `lr`, `weight_decay`), the resizing
schedule, the patch sizes, deformation strength, shapes and brightness change of the corruption,
the residual's power (`residual_power`: 1 = |F(X) - X|, as the per-channel L2 norm of a scalar;
2 = squared), the smoothing (`map_blur_sigma`) and the image score (`image_score`: max | mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly_lab.callbacks import EarlyStoppingOnBest
from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.ssae.corruption import PatchCorruption
from anomaly_lab.models.ssae.network import SDC_DILATIONS, SsaeNet, sdc_dilations
from anomaly_lab.models.ssae.objectives import objective_eq1, objective_eq3


def check_schedule(schedule: Sequence[Sequence[float]] | None) -> list[tuple[int, float]]:
    """[[first_epoch, scale], ...] -> sorted pairs; first epochs from 0 upwards, scales in (0, 1]."""
    if schedule is None:
        return [(0, 1.0)]
    pairs = [(int(epoch), float(scale)) for epoch, scale in schedule]
    epochs = [epoch for epoch, _ in pairs]
    if not pairs or epochs[0] != 0 or epochs != sorted(set(epochs)) or not all(0 < s <= 1 for _, s in pairs):
        raise ConfigError(
            f"model.progressive_resizing={schedule} must be null or [[first_epoch, scale], ...] with first "
            "epochs increasing from 0 and scales in (0, 1]"
        )
    return pairs


def training_size(schedule: list[tuple[int, float]], epoch: int, size: Sequence[int]) -> tuple[int, int]:
    """The (h, w) to train at in `epoch`: the loaded size times the epoch's scale, a multiple of 8 (>= 8)."""
    scale = [s for first, s in schedule if first <= epoch][-1]
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)


def resolve_dilations(dilations: Sequence[int] | str, image_size: int | None) -> tuple[int, ...]:
    """`sdc_dilations`: a list of rates, or "auto" (Table 1's scaled to `image_size`)."""
    if dilations == "auto":
        if image_size is None:
            raise ConfigError("model.sdc_dilations=auto needs model.image_size (conf/model/ssae.yaml: ${data.image_size})")
        return sdc_dilations(int(image_size))
    if isinstance(dilations, str) or not dilations or any(int(d) < 1 for d in dilations):
        raise ConfigError(f"model.sdc_dilations={dilations} must be 'auto' or a list of rates >= 1, e.g. [1, 2, 4, 8, 16]")
    return tuple(int(d) for d in dilations)


class Ssae(AnomalyModel):
    name = "ssae"

    def __init__(
        self,
        objective: int = 1,
        lam: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        channels: int = 3,
        progressive_resizing: Sequence[Sequence[float]] | None = None,
        patch_size: Sequence[float] = (0.1, 0.4),
        elastic_alpha: float = 0.2,
        elastic_sigma: float = 0.02,
        brightness: float = 0.0,
        shape_vertices: Sequence[int] = (3, 10),
        residual_power: int = 1,
        image_score: str = "max",
        sdc_dilations: Sequence[int] | str = SDC_DILATIONS,
        image_size: int | None = None,
        early_stopping_patience: int | None = None,
        seed: int = 0,
        map_blur_sigma: float = 4.0,
    ):
        super().__init__(map_blur_sigma=map_blur_sigma)
        if objective not in (1, 3):
            raise ConfigError(f"model.objective={objective} must be 1 (Eq. 1) or 3 (Eq. 3)")
        if not 0 <= lam <= 1:
            raise ConfigError(f"model.lam={lam} must be in [0, 1]")
        if residual_power not in (1, 2):
            raise ConfigError(f"model.residual_power={residual_power} must be 1 (|F(X) - X|) or 2 (squared)")
        if image_score not in ("max", "mean"):
            raise ConfigError(f"model.image_score={image_score!r} must be 'max' or 'mean' (of the heatmap)")
        if early_stopping_patience is not None and early_stopping_patience < 1:
            raise ConfigError(f"model.early_stopping_patience={early_stopping_patience} must be null (off) or >= 1")
        self.save_hyperparameters()
        self.schedule = check_schedule(progressive_resizing)
        self.net = SsaeNet(channels, resolve_dilations(sdc_dilations, image_size))
        corruption = (tuple(patch_size), elastic_alpha, elastic_sigma, brightness, tuple(shape_vertices))
        self.corruption = PatchCorruption(*corruption, seed=seed)
        self.validation_corruption = PatchCorruption(*corruption, seed=seed + 1)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and (any(m != 0 for m in mean) or any(s != 1 for s in std)):
            raise ConfigError(
                f"SSAE reconstructs images in [0, 1], but the data is normalised with mean={list(mean)} "
                f"std={list(std)}: set data.mean=[0,0,0] and data.std=[1,1,1] (as conf/model/ssae.yaml does)"
            )
        if self.hparams.early_stopping_patience is not None and getattr(datamodule, "val_ratio", None) == 0:
            raise ConfigError(
                "model.early_stopping_patience needs held-out normals to watch, but data.val_ratio=0: set "
                "data.val_ratio > 0 (e.g. 0.1) or model.early_stopping_patience=null (train every epoch)"
            )

    def configure_callbacks(self) -> list:
        patience = self.hparams.early_stopping_patience
        last_stage = self.schedule[-1][0]  # the objective is watched once training runs at its last size
        return [] if patience is None else [EarlyStoppingOnBest("val/objective", patience, start_epoch=last_stage)]

    def reseed_training(self, seed: int) -> None:
        self.corruption.reseed(seed)

    def loss(self, images: Tensor, corruption: PatchCorruption | None = None) -> Tensor:
        """Corrupt the images, reconstruct them and return the configured objective (Eq. 1 or Eq. 3)."""
        corrupted, mask = (corruption or self.corruption)(images)
        output = self.net(corrupted)
        if self.hparams.objective == 1:
            return objective_eq1(output, images, mask, self.hparams.lam)
        return objective_eq3(output, images, corrupted, mask, self.hparams.lam)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images = batch.image
        size = training_size(self.schedule, self.current_epoch, images.shape[-2:])
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
            images = images.clamp(0, 1)
        loss = self.loss(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("train/size", float(size[0]), on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.validation_corruption.reseed(self.hparams.seed + 1)

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor | None]:
        """The base's scoring (thresholds), and during fitting the objective on the held-out normals, corrupted
        the same way at every validation: what early stopping watches."""
        if self.trainer.state.fn == "fit":
            normal = batch.image[batch.label == 0]
            if len(normal):
                self.log("val/objective", self.loss(normal, self.validation_corruption), on_epoch=True,
                         sync_dist=True, batch_size=len(normal))
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def score(self, images: Tensor) -> ScoreOutput:
        """The residual map in float32, whatever the trainer's precision (bf16 would round the residuals
        to 3 significant digits and tie close scores)."""
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            residual = (self.net(images) - images).abs().pow(self.hparams.residual_power).mean(dim=1, keepdim=True)
        image_score = residual.flatten(1).mean(dim=1) if self.hparams.image_score == "mean" else None
        return ScoreOutput(image_score=image_score, anomaly_map=residual)
