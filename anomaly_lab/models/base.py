"""The LightningModule base of every method: scoring, normal-data statistics and evaluation steps."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.nn.blur import resize_and_blur
from anomaly_lab.seeding import derive_seed


class ScoreOutput(NamedTuple):
    """image_score [B] (None: take the maximum of the evaluated map); anomaly_map [B, 1, h, w] or None."""

    image_score: Tensor | None
    anomaly_map: Tensor | None


class AnomalyModel(pl.LightningModule):
    """Base of every anomaly detector.

    A method writes `score` and, when it learns, `training_step` and `configure_optimizers`. Methods
    that keep statistics of normal data override `fit_normal`; the base runs it once after training
    (whenever weights changed) and before any validation, test or prediction, on every device, with
    that device's share of the normal training images. The base owns the validation, test and
    predict steps: it scores, brings the map to the input size (bilinear), smooths it with a
    Gaussian of std `map_blur_sigma` (0 turns it off) and hands ``{"image_score", "anomaly_map"}``
    on to the Evaluator callback.

    Class attributes: `name` (the method's config name), `needs_training` (False: `train` skips the
    fit loop and only fits normal statistics), `trainer_settings` (Trainer arguments the method
    requires, applied over the trainer config).
    """

    name: ClassVar[str] = "anomaly_model"
    needs_training: ClassVar[bool] = True
    trainer_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, map_blur_sigma: float = 4.0):
        super().__init__()
        self.map_blur_sigma = map_blur_sigma
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("normal_fitted", torch.tensor(False))
        self.fit_normal_seconds = 0.0

    # --- what a method writes -------------------------------------------------------------------
    def score(self, images: Tensor) -> ScoreOutput:
        raise NotImplementedError

    def fit_normal(self, dataloader: DataLoader) -> None:
        """Fit statistics of normal data; combine devices with `sum_across_devices` or `gather_across_devices`."""

    def training_record(self) -> dict[str, Any]:
        """What the method measured during training, written into metrics.json beside the metrics."""
        return {}

    def reseed_training(self, seed: int) -> None:
        """Reseed the method's own random streams of training (negatives, pairings, corruptions)."""

    def setup(self, stage: str) -> None:
        self.use_channels_last()

    def use_channels_last(self) -> AnomalyModel:
        """Keep 4-D weights channels-last, so that convolutions run in that layout (oneDNN on CPU,
        tensor cores on GPU): 20-35 % faster training and scoring for every method here on CPU
        (measured in the README, "Memory layout"); results differ only by rounding."""
        return self.to(memory_format=torch.channels_last)

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Hyper-parameters as plain lists and dicts (Hydra hands lists and dicts in as OmegaConf
        containers), so that `Model.load_from_checkpoint(path)` works under torch.load's weights_only=True."""
        key = self.CHECKPOINT_HYPER_PARAMS_KEY
        if key in checkpoint:
            checkpoint[key] = plain_containers(checkpoint[key])

    # --- reproducible training --------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """Reseed every random stream of training from (run seed, epoch, rank): an epoch draws the same
        numbers whether the run went through or was resumed from the previous epoch's checkpoint."""
        seed = derive_seed(self.hparams.get("seed", 0), self.current_epoch, self.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.reseed_training(seed)

    # --- scoring at evaluation size -------------------------------------------------------------
    def forward(self, images: Tensor) -> ScoreOutput:
        """Scores with the map at the input size and smoothed: what the evaluation sees."""
        out = self.score(images)
        anomaly_map = out.anomaly_map
        if anomaly_map is not None:
            anomaly_map = resize_and_blur(anomaly_map, images.shape[-2:], self.map_blur_sigma)
        image_score = out.image_score
        if image_score is None:
            if anomaly_map is None:
                raise RuntimeError(f"{type(self).__name__}.score returned neither an image score nor a map")
            image_score = anomaly_map.flatten(1).amax(dim=1)
        return ScoreOutput(image_score, anomaly_map)

    def _evaluation_step(self, batch: Batch) -> dict[str, Tensor | None]:
        out = self(batch.image)
        return {"image_score": out.image_score, "anomaly_map": out.anomaly_map}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor | None]:
        return self._evaluation_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor | None]:
        return self._evaluation_step(batch)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return {**self._evaluation_step(batch), "path": batch.path}

    # --- normal statistics, fitted lazily once the weights are final ----------------------------
    @property
    def has_normal_statistics(self) -> bool:
        return type(self).fit_normal is not AnomalyModel.fit_normal

    def on_train_batch_end(self, *args: Any) -> None:
        self.normal_fitted.fill_(False)  # the weights changed: the statistics must be fitted again

    def on_validation_start(self) -> None:
        self._prepare_scoring()

    def on_test_start(self) -> None:
        self._prepare_scoring()

    def on_predict_start(self) -> None:
        self._prepare_scoring()

    def _prepare_scoring(self) -> None:
        self._share_normalisation_statistics()
        self._ensure_normal_fitted()

    def _share_normalisation_statistics(self) -> None:
        """Give every device rank 0's batch-norm running statistics before scoring. DDP keeps the
        weights equal, but each device updates these buffers from its own last batches; scoring with
        them would make an image's score depend on the device that scores it."""
        if self._trainer is None or self.trainer.world_size == 1:
            return
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                    if buffer is not None:
                        buffer.copy_(self.trainer.strategy.broadcast(buffer, src=0))

    def _ensure_normal_fitted(self) -> None:
        if not self.has_normal_statistics or bool(self.normal_fitted):
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "normal_dataloader"):
            raise ConfigError(
                f"{self.name} must fit statistics of normal images before scoring: pass the datamodule "
                "(trainer.validate/test(model, datamodule=...)) or a checkpoint whose statistics are fitted"
            )
        start = time.perf_counter()
        was_training = self.training
        self.eval()
        with torch.no_grad():
            self.fit_normal(datamodule.normal_dataloader(self.global_rank, self.trainer.world_size))
        self.train(was_training)
        self.normal_fitted.fill_(True)
        self.fit_normal_seconds += time.perf_counter() - start

    def sum_across_devices(self, tensor: Tensor) -> Tensor:
        """Sum a tensor over all devices (identity on one device or without a Trainer)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def gather_across_devices(self, tensor: Tensor) -> Tensor:
        """Concatenate a tensor's first dimension over all devices in rank order; the devices may hold
        different lengths (identity on one device or without a Trainer). Sort the result if its order
        must not depend on the number of devices."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        lengths = self.all_gather(torch.tensor(len(tensor), device=tensor.device)).tolist()
        padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        gathered = self.all_gather(padded)  # [world_size, longest, ...]
        return torch.cat([part[:length] for part, length in zip(gathered, lengths, strict=True)])

    def gather_in_dataset_order(self, tensor: Tensor) -> Tensor:
        """Gather per-image rows of this device's share of `normal_dataloader` (every world_size-th image
        from the rank) from all devices, in the order of the dataset: what one process would hold."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        world_size = self.trainer.world_size
        gathered = self.gather_across_devices(tensor)  # rank 0's images, then rank 1's, ...
        offsets = [0]
        for rank in range(world_size - 1):
            offsets.append(offsets[-1] + len(range(rank, len(gathered), world_size)))
        order = [offsets[image % world_size] + image // world_size for image in range(len(gathered))]
        return gathered[torch.tensor(order, device=gathered.device)]


def plain_containers(value: Any) -> Any:
    """`value` with every mapping turned into a dict and every sequence but strings and tuples into a list."""
    if isinstance(value, Mapping):
        return {key: plain_containers(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, tuple)):
        return [plain_containers(item) for item in value]
    return value
