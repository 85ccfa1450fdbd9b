"""The thresholded protocol of the MVTec AD paper (Bergmann et al. 2019), as used by SSAE (Bauer
2022, section 4.2, Eq. 4-5): a minimum defect area per category fixes the threshold on normal
validation images, and test images are classified at that threshold.

A pixel is anomalous when its score is above the threshold t; a region is an 8-connected set of
such pixels. t is the lowest score value such that, on every normal validation heatmap, the
largest region is smaller than the minimum defect area ("just below" it). The largest region can
only shrink as t grows, so t is found by bisection over the sorted distinct validation scores.

On test, an image is anomalous when its largest region is at least the minimum area; pixels are
anomalous when above t (no region filtering: the paper does not say). Logged as
``test/<prefix>_<metric>``: tpr, tnr and their mean (Eq. 4, Table 2), image_f1 (Eq. 5, image level)
and pixel_f1 (Eq. 5, pixels accumulated over the test set, Table 4), and the threshold. The
threshold is computed from the datamodule's validation loader (normal held-out images) at the
start of each test, after the model's own test-start preparations; test images never set it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from scipy import ndimage

from anomaly_lab.data.batch import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.evaluation.evaluator import log_global
from anomaly_lab.evaluation.metrics import EIGHT_CONNECTIVITY


def largest_region(binary: np.ndarray) -> int:
    """Pixel count of the largest 8-connected region of a 2-D boolean map (0 if none)."""
    labels, count = ndimage.label(binary, structure=EIGHT_CONNECTIVITY)
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


def largest_regions(maps: np.ndarray, threshold: float) -> np.ndarray:
    """For maps [N, H, W]: the largest region of (map > threshold) of each map."""
    return np.array([largest_region(m > threshold) for m in maps], dtype=np.int64)


def min_area_pixels(min_defect_area: float, height: int, width: int) -> int:
    """The minimum defect area, a fraction of the map's area, in pixels (at least 1)."""
    return max(1, math.ceil(min_defect_area * height * width))


def defect_area_threshold(maps: np.ndarray, min_area: int) -> float:
    """The lowest distinct score t of normal maps [N, H, W] such that every map's largest region
    of (map > t) has fewer than `min_area` pixels. The highest score always qualifies (nothing is
    above it); bisection finds the first qualifying value, the largest region being non-increasing in t."""
    values = np.unique(maps)
    low, high = 0, len(values) - 1  # values[high] qualifies
    while low < high:
        middle = (low + high) // 2
        if largest_regions(maps, values[middle]).max() < min_area:
            high = middle
        else:
            low = middle + 1
    return float(values[high])


def f1(tp: float, fp: float, fn: float) -> float:
    """Eq. 5: 2 TP / (2 TP + FP + FN); 0 when there is nothing positive at all."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


class DefectAreaEvaluator(pl.Callback):
    """Section 4.2's threshold protocol for any model that returns anomaly maps.

    min_defect_area: the category's minimum defect area, as a fraction of the heatmap's area
    (resolution independent; the protocol fixes one per category, the paper gives no values).
    prefix: the metric names' prefix (``test/<prefix>_tpr`` ...).
    """

    def __init__(self, min_defect_area: float = 0.001, prefix: str = "defect_area") -> None:
        if not 0 < min_defect_area < 1:
            raise ConfigError(f"callbacks.defect_area.min_defect_area={min_defect_area} must be in (0, 1)")
        self.min_defect_area = min_defect_area
        self.prefix = prefix
        self.threshold = float("nan")
        self.min_area = 0
        self.counts: dict[str, float] = {}
        self.has_masks = False
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        maps = self._validation_maps(trainer, pl_module)
        self.min_area = min_area_pixels(self.min_defect_area, *maps.shape[-2:])
        self.threshold = defect_area_threshold(maps, self.min_area)
        self.counts = dict.fromkeys(("image_tp", "image_fp", "image_tn", "image_fn", "pixel_tp", "pixel_fp", "pixel_fn"), 0.0)
        self.has_masks = False
        self.results = {}

    def _validation_maps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray:
        """Heatmaps [N, H, W] of every normal validation image: each device scores its share of the
        split, and every device gets all the maps."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ConfigError("DefectAreaEvaluator needs a datamodule with normal validation images")
        maps = []
        with torch.no_grad():
            for batch in datamodule.val_dataloader():
                anomaly_map = pl_module(batch.image.to(pl_module.device)).anomaly_map
                if anomaly_map is None:
                    raise ConfigError(f"DefectAreaEvaluator needs anomaly maps, but {type(pl_module).__name__} gives none")
                maps.append(anomaly_map[:, 0].float())
        return pl_module.gather_across_devices(torch.cat(maps)).cpu().numpy()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        maps = outputs["anomaly_map"][:, 0].float().cpu().numpy()
        predicted = largest_regions(maps, self.threshold) >= self.min_area
        actual = batch.label.cpu().numpy() == 1
        self.counts["image_tp"] += float((predicted & actual).sum())
        self.counts["image_fp"] += float((predicted & ~actual).sum())
        self.counts["image_tn"] += float((~predicted & ~actual).sum())
        self.counts["image_fn"] += float((~predicted & actual).sum())
        if batch.mask is not None:
            positive, truth = maps > self.threshold, batch.mask[:, 0].cpu().numpy() > 0.5
            self.counts["pixel_tp"] += float((positive & truth).sum())
            self.counts["pixel_fp"] += float((positive & ~truth).sum())
            self.counts["pixel_fn"] += float((~positive & truth).sum())
            self.has_masks = True

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summed = pl_module.sum_across_devices(torch.tensor(list(self.counts.values()), dtype=torch.float64,
                                                           device=pl_module.device))
        c = dict(zip(self.counts, summed.tolist(), strict=True))
        tpr = c["image_tp"] / max(c["image_tp"] + c["image_fn"], 1.0)
        tnr = c["image_tn"] / max(c["image_tn"] + c["image_fp"], 1.0)
        results = {"tpr": tpr, "tnr": tnr, "tpr_tnr_mean": (tpr + tnr) / 2,
                   "image_f1": f1(c["image_tp"], c["image_fp"], c["image_fn"]), "threshold": self.threshold}
        if self.has_masks:
            results["pixel_f1"] = f1(c["pixel_tp"], c["pixel_fp"], c["pixel_fn"])
        for name, value in results.items():
            log_global(pl_module, f"test/{self.prefix}_{name}", torch.tensor(value, dtype=torch.float32))
        self.results = results
