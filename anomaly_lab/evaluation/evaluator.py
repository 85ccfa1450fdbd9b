"""The Evaluator callback: thresholds from normal validation images, metrics on the test set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly_lab.data.batch import Batch
from anomaly_lab.data.dataset import check_mask_size, read_mask
from anomaly_lab.data.prescan import check_both_classes
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.evaluation.distributed import gather_to_rank_zero, on_rank_zero
from anomaly_lab.evaluation.metrics import (
    BinnedPixelMetrics,
    ExactPixelMetrics,
    image_metrics,
    quantile_threshold,
)

RESOLUTIONS = ("input", "original")
MAX_HISTOGRAM_BITS = 14  # 2^23 bins: 200 MB of histograms


class Evaluator(pl.Callback):
    """Chooses thresholds on validation and computes every metric on test, the same for every method.

    Everything is kept on the CPU; under DDP each process's data is gathered to rank 0, which alone
    computes, and the results are broadcast to every process (`anomaly_lab.evaluation.distributed`).
    Non-finite (NaN or infinite) image scores or map pixels stop validation or test with a `DataError`.

    Validation (normal held-out images only): ``pl_module.image_threshold`` and
    ``pl_module.pixel_threshold`` are set in place to the ``*_threshold_quantile`` quantiles of the
    image scores and map pixels; logs ``val/image_threshold``, ``val/pixel_threshold`` (when the model
    gives maps) and ``val/mean_image_score``. Skipped during the sanity check.

    Test: exact image AUROC, AP and F1-max of ``image_score`` against ``batch.label``; when
    ``pixel_metrics`` and the batches carry masks and maps, pixel AUROC, AUPRO (up to
    ``aupro_fpr_limit``, normalised by it) and F1-max. ``pixel_resolution``: ``input`` compares maps
    and ``batch.mask`` at the model's input size; ``original`` upsamples each map (bilinear) to its
    image's ``batch.original_size`` and compares it with the mask file ``batch.mask_path`` (none:
    no anomalous pixel), the official MVTec AD protocol. ``pixel_histogram_bits``: None keeps every
    pixel (exact, 5 bytes a pixel); an int gives binned metrics with error bounds
    (`BinnedPixelMetrics`). Logged as ``test/<name>`` and kept in ``self.results`` (name -> float).
    ``self.record`` (for metrics.json): ``pixel_resolution`` (``input HxW``, ``original`` or None),
    ``pixel_histogram_bits``, ``pixel_error_bounds`` (binned only) and ``defects``: for each defect
    type of ``batch.defect``, the image AUROC of its images against every normal test image and
    their count; ``metrics_seconds``: this process's time in the test hooks (collecting and computing the
    metrics). Thresholds never come from the test set.
    """

    def __init__(
        self,
        image_threshold_quantile: float = 0.99,
        pixel_threshold_quantile: float = 0.99,
        aupro_fpr_limit: float = 0.3,
        pixel_metrics: bool = True,
        pixel_resolution: str = "input",
        pixel_histogram_bits: int | None = None,
    ) -> None:
        check_fraction("image_threshold_quantile", image_threshold_quantile, allow_zero=True)
        check_fraction("pixel_threshold_quantile", pixel_threshold_quantile, allow_zero=True)
        check_fraction("aupro_fpr_limit", aupro_fpr_limit, allow_zero=False)
        if pixel_resolution not in RESOLUTIONS:
            raise ConfigError(
                f"evaluator.pixel_resolution={pixel_resolution!r} must be 'input' (maps and masks at the "
                "model's input size) or 'original' (maps upsampled to each image's size, against its mask file)"
            )
        if pixel_histogram_bits is not None and not 1 <= pixel_histogram_bits <= MAX_HISTOGRAM_BITS:
            raise ConfigError(
                f"evaluator.pixel_histogram_bits={pixel_histogram_bits} must be null (exact pixel metrics) "
                f"or an integer from 1 to {MAX_HISTOGRAM_BITS} (binned, bins of relative width 2^-bits)"
            )
        self.image_threshold_quantile = image_threshold_quantile
        self.pixel_threshold_quantile = pixel_threshold_quantile
        self.aupro_fpr_limit = aupro_fpr_limit
        self.pixel_metrics = pixel_metrics
        self.pixel_resolution = pixel_resolution
        self.pixel_histogram_bits = pixel_histogram_bits

        self.scores: list[Tensor] = []
        self.val_pixels: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.defects: list[str | None] = []
        self.nonfinite: dict[str, tuple[int, int]] = {}
        self.pixels: ExactPixelMetrics | BinnedPixelMetrics | None = None  # made at each test's start
        self.input_size: tuple[int, int] | None = None
        self.results: dict[str, float] = {}
        self.record: dict[str, Any] = {}

    def _new_pixel_metrics(self) -> ExactPixelMetrics | BinnedPixelMetrics:
        if self.pixel_histogram_bits is None:
            return ExactPixelMetrics(self.aupro_fpr_limit)
        return BinnedPixelMetrics(self.aupro_fpr_limit, self.pixel_histogram_bits)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        crop_size = getattr(trainer.datamodule, "crop_size", None)
        if self.pixel_resolution == "original" and crop_size is not None:
            raise ConfigError(
                f"evaluator.pixel_resolution=original compares maps with whole original masks, but "
                f"data.crop_size={list(crop_size)} crops the images: drop data.crop_size or use pixel_resolution=input"
            )

    def _on_cpu(self, name: str, values: Tensor) -> Tensor:
        """``values`` as float32 on the CPU; counts its non-finite entries under ``name``."""
        values = values.detach().float().cpu()
        bad, total = self.nonfinite.get(name, (0, 0))
        self.nonfinite[name] = (bad + int((~values.isfinite()).sum()), total + values.numel())
        return values

    # validation: thresholds

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scores, self.val_pixels, self.nonfinite = [], [], {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        self.scores.append(self._on_cpu("image scores", outputs["image_score"]))
        if outputs.get("anomaly_map") is not None:
            self.val_pixels.append(self._on_cpu("anomaly-map pixels", outputs["anomaly_map"]).flatten())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        gathered = gather_to_rank_zero([concat(self.scores), concat(self.val_pixels)], self.nonfinite)

        def thresholds() -> tuple[float, float | None, float]:
            check_finite([nonfinite for _, nonfinite in gathered], model_name(pl_module), "validation")
            scores = torch.cat([tensors[0] for tensors, _ in gathered])
            pixels = torch.cat([tensors[1] for tensors, _ in gathered])
            pixel_threshold = quantile_threshold(pixels, self.pixel_threshold_quantile) if pixels.numel() else None
            return quantile_threshold(scores, self.image_threshold_quantile), pixel_threshold, float(scores.mean())

        image_threshold, pixel_threshold, mean_score = on_rank_zero(thresholds)
        pl_module.image_threshold.fill_(image_threshold)
        log_global(pl_module, "val/image_threshold", image_threshold)
        log_global(pl_module, "val/mean_image_score", mean_score)
        if pixel_threshold is not None:
            pl_module.pixel_threshold.fill_(pixel_threshold)
            log_global(pl_module, "val/pixel_threshold", pixel_threshold)

    # test: metrics

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scores, self.labels, self.defects, self.nonfinite = [], [], [], {}
        self.pixels = self._new_pixel_metrics()
        self.input_size = None
        self.results, self.record = {}, {}
        self.metrics_seconds = 0.0

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        started = time.perf_counter()
        self.scores.append(self._on_cpu("image scores", outputs["image_score"]))
        self.labels.append(batch.label.cpu())
        self.defects += batch.defect or [None] * len(batch)
        anomaly_map = outputs.get("anomaly_map")
        if self.pixel_metrics and anomaly_map is not None and batch.mask is not None:
            if self.pixel_resolution == "input":
                self.pixels.update(*self._at_input_size(anomaly_map, batch))
            else:
                self.pixels.update(*self._at_original_size(anomaly_map, batch))
        self.metrics_seconds += time.perf_counter() - started

    def _at_input_size(self, anomaly_map: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        if anomaly_map.shape != batch.mask.shape:
            raise ValueError(
                f"anomaly_map of shape {tuple(anomaly_map.shape)} does not match the mask "
                f"{tuple(batch.mask.shape)}: the model must return maps at the batch's image size"
            )
        self.input_size = tuple(anomaly_map.shape[-2:])
        return self._on_cpu("anomaly-map pixels", anomaly_map[:, 0]), batch.mask[:, 0].cpu() > 0.5

    def _at_original_size(self, anomaly_map: Tensor, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        if batch.original_size is None or len(batch.mask_path) != len(batch):
            raise DataError(
                "evaluator.pixel_resolution=original needs each test image's original size and mask file, "
                f"which the batches of this dataset (e.g. {batch.path[0] if batch.path else 'unnamed'}) do "
                "not carry: use evaluator.pixel_resolution=input"
            )
        maps, masks = [], []
        for score, (height, width), mask_path, path in zip(anomaly_map, batch.original_size.tolist(), batch.mask_path,
                                                           batch.path, strict=True):
            upsampled = F.interpolate(score[None].float(), size=(height, width), mode="bilinear", align_corners=False)
            maps.append(self._on_cpu("anomaly-map pixels", upsampled[0, 0]))
            masks.append(original_mask(mask_path, path, height, width))
        return maps, masks

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        tensors = [concat(self.scores), concat(self.labels), *self.pixels.state()]
        gathered = gather_to_rank_zero(tensors, (self.defects, self.nonfinite, self.input_size))
        self.results, self.record = on_rank_zero(lambda: self._test_metrics(gathered, model_name(pl_module)))
        self.record["metrics_seconds"] = round(self.metrics_seconds + time.perf_counter() - started, 3)
        for name, value in self.results.items():
            log_global(pl_module, f"test/{name}", value)

    def _test_metrics(self, gathered: list[tuple[list[Tensor], Any]], model: str) -> tuple[dict, dict]:
        """Rank 0: every metric from every process's data (its own pixel metrics absorb the others')."""
        check_finite([nonfinite for _, (_, nonfinite, _) in gathered], model, "test")
        scores = torch.cat([tensors[0] for tensors, _ in gathered])
        labels = torch.cat([tensors[1] for tensors, _ in gathered])
        defects = [defect for _, (part, _, _) in gathered for defect in part]
        check_both_classes(labels.tolist(), "the test set")
        results = image_metrics(scores, labels)
        record = {"pixel_resolution": None, "pixel_histogram_bits": self.pixel_histogram_bits,
                  "pixel_error_bounds": None, "defects": per_defect_auroc(scores, labels, defects)}
        for tensors, _ in gathered[1:]:
            self.pixels.merge(tensors[2:])
        if self.pixels.images:
            results.update(self.pixels.compute())
            if self.pixel_resolution == "original":
                record["pixel_resolution"] = "original"
            else:
                height, width = next(size for _, (_, _, size) in gathered if size is not None)
                record["pixel_resolution"] = f"input {height}x{width}"
            if isinstance(self.pixels, BinnedPixelMetrics):
                record["pixel_error_bounds"] = self.pixels.error_bounds
        return results, record


def concat(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors) if tensors else torch.empty(0)


def model_name(pl_module: pl.LightningModule) -> str:
    return getattr(pl_module, "name", type(pl_module).__name__)


def original_mask(mask_path: str | None, image_path: str, height: int, width: int) -> Tensor:
    """The mask file of `image_path` as bool [height, width] (True = anomalous); all False without a file."""
    if mask_path is None:
        return torch.zeros(height, width, dtype=torch.bool)
    mask = read_mask(Path(mask_path))
    check_mask_size(mask_path, mask.shape, image_path, (height, width))
    return torch.from_numpy(mask > 0.5)


def per_defect_auroc(scores: Tensor, labels: Tensor, defects: list[str | None]) -> dict[str, dict[str, float]]:
    """For each defect type of the anomalous images: the image AUROC of its images against every normal image."""
    normal = labels == 0
    results = {}
    for defect in sorted({d for d, label in zip(defects, labels.tolist(), strict=True) if label == 1 and d}):
        of_type = torch.tensor([d == defect for d in defects]) & (labels == 1)
        chosen = normal | of_type
        results[defect] = {"image_auroc": image_metrics(scores[chosen], labels[chosen])["image_auroc"],
                           "count": int(of_type.sum())}
    return results


def check_finite(counts: list[dict[str, tuple[int, int]]], model: str, stage: str) -> None:
    """Stop with one message if any process counted NaN or infinite values (counts: name -> (bad, total))."""
    totals: dict[str, list[int]] = {}
    for process_counts in counts:
        for name, (bad, total) in process_counts.items():
            summed = totals.setdefault(name, [0, 0])
            summed[0], summed[1] = summed[0] + bad, summed[1] + total
    found = [f"{bad:,} of {total:,} {name}" for name, (bad, total) in totals.items() if bad]
    if found:
        raise DataError(
            f"model {model} gave NaN or infinite values at {stage}: {' and '.join(found)}; no threshold or "
            "metric means anything with them: check its training (loss, learning rate) and its normal statistics"
        )


def log_global(pl_module: pl.LightningModule, name: str, value: Tensor | float) -> None:
    """Log a value computed from data gathered across processes, hence identical on every rank.

    ``sync_dist`` with a max reduction keeps the value exact and tells Lightning it is already global.
    """
    pl_module.log(name, value, sync_dist=True, reduce_fx="max")


def check_fraction(name: str, value: float, allow_zero: bool) -> None:
    """Stop with a message naming the option unless ``value`` is in [0, 1] (or (0, 1])."""
    lowest_ok = value >= 0 if allow_zero else value > 0
    if not (lowest_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"Evaluator option {name} must be in {interval}, got {value}")
