"""The Evaluator callback: thresholds from normal validation images, metrics on the test set."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric

from anomaly_lab.data.batch import Batch
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.evaluation.metrics import (
    AUPRO,
    F1Max,
    binary_auroc,
    binary_average_precision,
    quantile_threshold,
)


class Evaluator(pl.Callback):
    """Chooses thresholds on validation and computes every metric on test, the same for every method.

    Validation (normal held-out images only): image scores and map pixels are gathered across
    processes; ``pl_module.image_threshold`` and ``pl_module.pixel_threshold`` are set in place to
    their ``*_threshold_quantile`` quantiles; logs ``val/image_threshold``, ``val/pixel_threshold``
    (when the model gives maps) and ``val/mean_image_score``. Skipped during the sanity check.

    Test: image AUROC, AP and F1-max of ``image_score`` against ``batch.label``; when ``pixel_metrics``
    and the batches carry masks and maps, pixel AUROC, AUPRO (up to ``aupro_fpr_limit``, normalised
    by it) and F1-max of ``anomaly_map`` against ``batch.mask``. Logged as ``test/<name>`` and kept in
    ``self.results`` (name -> float). Thresholds never come from the test set.
    """

    def __init__(
        self,
        image_threshold_quantile: float = 0.99,
        pixel_threshold_quantile: float = 0.99,
        aupro_fpr_limit: float = 0.3,
        aupro_num_thresholds: int | None = None,
        pixel_metrics: bool = True,
    ) -> None:
        check_fraction("image_threshold_quantile", image_threshold_quantile, allow_zero=True)
        check_fraction("pixel_threshold_quantile", pixel_threshold_quantile, allow_zero=True)
        check_fraction("aupro_fpr_limit", aupro_fpr_limit, allow_zero=False)
        if aupro_num_thresholds is not None and aupro_num_thresholds < 2:
            raise ConfigError(
                f"aupro_num_thresholds must be null (exact) or at least 2, got {aupro_num_thresholds}"
            )
        self.image_threshold_quantile = image_threshold_quantile
        self.pixel_threshold_quantile = pixel_threshold_quantile
        self.pixel_metrics = pixel_metrics

        self.val_image_scores = CatMetric(nan_strategy="error")
        self.val_pixel_scores = CatMetric(nan_strategy="error")

        self.test_labels = CatMetric()
        self.image_metrics = MetricCollection(
            {"image_auroc": binary_auroc(), "image_ap": binary_average_precision(), "image_f1": F1Max()}
        )
        self.pixel_curve_metrics = MetricCollection({"pixel_auroc": binary_auroc(), "pixel_f1": F1Max()})
        self.pixel_aupro = AUPRO(fpr_limit=aupro_fpr_limit, num_thresholds=aupro_num_thresholds)
        self.test_has_pixel_data = False
        self.results: dict[str, float] = {}

    # validation: thresholds

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in (self.val_image_scores, self.val_pixel_scores):
            metric.to(pl_module.device).reset()

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
        self.val_image_scores.update(outputs["image_score"])
        if outputs.get("anomaly_map") is not None:
            self.val_pixel_scores.update(outputs["anomaly_map"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        image_scores = self.val_image_scores.compute()
        image_threshold = quantile_threshold(image_scores, self.image_threshold_quantile)
        pl_module.image_threshold.fill_(image_threshold)
        log_global(pl_module, "val/image_threshold", image_threshold)
        log_global(pl_module, "val/mean_image_score", image_scores.mean())

        if self.val_pixel_scores.update_called:
            pixel_scores = self.val_pixel_scores.compute()
            pixel_threshold = quantile_threshold(pixel_scores, self.pixel_threshold_quantile)
            pl_module.pixel_threshold.fill_(pixel_threshold)
            log_global(pl_module, "val/pixel_threshold", pixel_threshold)

    # test: metrics

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in (self.test_labels, self.image_metrics, self.pixel_curve_metrics, self.pixel_aupro):
            metric.to(pl_module.device).reset()
        self.test_has_pixel_data = False
        self.results = {}

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.test_labels.update(batch.label)
        self.image_metrics.update(outputs["image_score"], batch.label)
        anomaly_map = outputs.get("anomaly_map")
        if self.pixel_metrics and anomaly_map is not None and batch.mask is not None:
            if anomaly_map.shape != batch.mask.shape:
                raise ValueError(
                    f"anomaly_map of shape {tuple(anomaly_map.shape)} does not match the mask "
                    f"{tuple(batch.mask.shape)}: the model must return maps at the batch's image size"
                )
            pixel_target = (batch.mask > 0.5).to(torch.uint8)
            self.pixel_curve_metrics.update(anomaly_map, pixel_target)
            self.pixel_aupro.update(anomaly_map, pixel_target)
            self.test_has_pixel_data = True

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_both_classes(self.test_labels.compute())
        results = self.image_metrics.compute()
        if self.test_has_pixel_data:
            results["pixel_aupro"] = self.pixel_aupro.compute()
            results.update(self.pixel_curve_metrics.compute())
        for name, value in results.items():
            log_global(pl_module, f"test/{name}", value)
        self.results = {name: float(value) for name, value in results.items()}


def log_global(pl_module: pl.LightningModule, name: str, value: Tensor | float) -> None:
    """Log a value computed from data gathered across processes, hence identical on every rank.

    ``sync_dist`` with a max reduction keeps the value exact and tells Lightning it is already global.
    """
    pl_module.log(name, value, sync_dist=True, reduce_fx="max")


def check_both_classes(labels: Tensor) -> None:
    """Stop with a clear message unless the test labels hold both normal (0) and anomalous (1) images."""
    found = sorted(int(label) for label in labels.unique())
    if found != [0, 1]:
        raise DataError(
            "image AUROC, AP and F1 need a test set with both normal (label 0) and anomalous (label 1) "
            f"images, but the {labels.numel()} test images have only label(s) {found}"
        )


def check_fraction(name: str, value: float, allow_zero: bool) -> None:
    """Stop with a message naming the option unless ``value`` is in [0, 1] (or (0, 1])."""
    lowest_ok = value >= 0 if allow_zero else value > 0
    if not (lowest_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"Evaluator option {name} must be in {interval}, got {value}")
