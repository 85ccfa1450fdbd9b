"""The section 4.2 threshold protocol (DefectAreaEvaluator) on maps with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.evaluation import DefectAreaEvaluator
from anomaly_lab.evaluation.defect_area import defect_area_threshold, largest_region, min_area_pixels
from anomaly_lab.models import AnomalyModel, ScoreOutput


def test_largest_region_uses_eight_connectivity():
    binary = np.zeros((6, 6), dtype=bool)
    binary[0, 0] = binary[1, 1] = binary[2, 2] = True  # diagonal chain: one region of 3
    binary[4:6, 4:6] = True  # a 2x2 block: 4
    assert largest_region(binary) == 4
    binary[3, 3] = True  # joins the chain to the block
    assert largest_region(binary) == 8
    assert largest_region(np.zeros((3, 3), dtype=bool)) == 0


def test_threshold_is_the_lowest_score_keeping_every_region_below_the_minimum_area():
    maps = np.zeros((2, 10, 10), dtype=np.float32)
    maps[0, 1:4, 1:4] = 0.5  # a 9-pixel region above 0
    maps[0, 6:8, 6:8] = 0.8  # a 4-pixel region above 0 and 0.5
    maps[1, 0, 0:3] = 0.3  # 3 pixels above 0
    assert defect_area_threshold(maps, min_area=5) == pytest.approx(0.5)
    assert defect_area_threshold(maps, min_area=4) == pytest.approx(0.8)
    assert defect_area_threshold(maps, min_area=10) == pytest.approx(0.0)


def test_threshold_matches_a_scan_of_every_value():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 12, 12)).astype(np.float32)
    for min_area in (1, 3, 7, 20):
        expected = next(float(v) for v in np.unique(maps)
                        if max(largest_region(m > v) for m in maps) < min_area)
        assert defect_area_threshold(maps, min_area) == expected


def test_min_area_is_a_fraction_of_the_map_area_rounded_up():
    assert min_area_pixels(0.001, 512, 512) == 263
    assert min_area_pixels(5 / 256, 16, 16) == 5
    assert min_area_pixels(1e-9, 8, 8) == 1


class MapIsImage(AnomalyModel):
    """The anomaly map is the image's first channel, unchanged (no smoothing)."""

    needs_training = False

    def __init__(self):
        super().__init__(map_blur_sigma=0.0)

    def score(self, images):
        return ScoreOutput(image_score=None, anomaly_map=images[:, :1])


def blob(rows: slice, cols: slice, size: int = 16) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[0, rows, cols] = 1.0
    return image


class FixedData(pl.LightningDataModule):
    def __init__(self, val: Batch, test: Batch):
        super().__init__()
        self.val, self.test = val, test

    def val_dataloader(self):
        return DataLoader([self.val], batch_size=None, collate_fn=lambda b: b)

    def test_dataloader(self):
        return DataLoader([self.test], batch_size=None, collate_fn=lambda b: b)


def test_callback_thresholds_on_validation_and_counts_test_images_and_pixels():
    # Validation: one normal map with a 4-pixel region; minimum area 5 px -> threshold 0 (every
    # positive pixel counts), set without the test maps, which hold larger regions.
    val = Batch(image=torch.stack([blob(slice(0, 2), slice(0, 2)), blob(slice(0, 0), slice(0, 0))]),
                label=torch.zeros(2, dtype=torch.long))
    images = torch.stack([
        blob(slice(0, 2), slice(0, 2)),    # normal, 4-px region: true negative
        blob(slice(5, 8), slice(5, 8)),    # normal, 9-px region: false positive
        blob(slice(5, 8), slice(5, 8)),    # anomalous, 9-px region on its 9-px mask: true positive
        blob(slice(2, 3), slice(0, 4)),    # anomalous, 4-px region, mask of 8 px: false negative
    ])
    masks = torch.stack([torch.zeros(1, 16, 16), torch.zeros(1, 16, 16),
                         blob(slice(5, 8), slice(5, 8)), blob(slice(2, 4), slice(0, 4))])
    test = Batch(image=images, label=torch.tensor([0, 0, 1, 1]), mask=masks)
    callback = DefectAreaEvaluator(min_defect_area=5 / 256)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.test(MapIsImage(), datamodule=FixedData(val, test), verbose=False)

    assert callback.min_area == 5 and callback.threshold == 0.0
    results = callback.results
    assert results["tpr"] == 0.5 and results["tnr"] == 0.5 and results["tpr_tnr_mean"] == 0.5
    assert results["image_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # pixels: TP = 9 + 4, FP = 4 + 9, FN = 4
    assert results["pixel_f1"] == pytest.approx(2 * 13 / (2 * 13 + 13 + 4))
    assert float(trainer.callback_metrics["test/defect_area_tpr_tnr_mean"]) == 0.5
    assert float(trainer.callback_metrics["test/defect_area_pixel_f1"]) == pytest.approx(26 / 43)
