"""The Evaluator driven by a real Trainer: thresholds from validation only, test metrics equal references."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.errors import DataError
from anomaly_lab.evaluation import AUPRO, Evaluator

SIZE = 12


class MapIsImage(pl.LightningModule):
    """A stand-in model: the anomaly map is the image itself, the image score is the map's maximum."""

    def __init__(self, with_maps: bool = True) -> None:
        super().__init__()
        self.with_maps = with_maps
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))

    def step(self, batch: Batch) -> dict:
        anomaly_map = batch.image[:, :1]
        return {
            "image_score": anomaly_map.flatten(1).amax(1),
            "anomaly_map": anomaly_map if self.with_maps else None,
        }

    def validation_step(self, batch: Batch, batch_idx: int) -> dict:
        return self.step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> dict:
        return self.step(batch)


def normal_samples(n: int, seed: int, offset: float = 0.0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "image": offset + torch.rand(1, SIZE, SIZE, generator=generator),
            "label": 0,
            "path": f"normal_{i}.png",
            "mask": torch.zeros(1, SIZE, SIZE),
        }
        for i in range(n)
    ]


def anomalous_samples(n: int, seed: int, offset: float = 0.0) -> list[dict]:
    """Images with a bright square (the defect, also the mask) over noise; rounded scores make ties."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        mask = torch.zeros(1, SIZE, SIZE)
        top, left = torch.randint(0, SIZE - 4, (2,), generator=generator).tolist()
        mask[:, top : top + 4, left : left + 4] = 1.0
        image = offset + (torch.rand(1, SIZE, SIZE, generator=generator) + 0.7 * mask).round(decimals=1)
        samples.append({"image": image, "label": 1, "path": f"anomalous_{i}.png", "mask": mask})
    return samples


def loader(samples: list[dict], with_masks: bool = True) -> DataLoader:
    if not with_masks:
        samples = [{key: value for key, value in s.items() if key != "mask"} for s in samples]
    return DataLoader(samples, batch_size=4, collate_fn=Batch.collate)


def trainer_with(evaluator: Evaluator) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[evaluator],
    )


def stacked(samples: list[dict], key: str) -> np.ndarray:
    return torch.stack([torch.as_tensor(s[key]) for s in samples]).numpy()


def test_thresholds_come_from_validation_and_test_metrics_match_references():
    evaluator = Evaluator(image_threshold_quantile=0.9, pixel_threshold_quantile=0.95)
    model = MapIsImage()
    trainer = trainer_with(evaluator)
    validation = normal_samples(10, seed=0)
    trainer.validate(model, loader(validation), verbose=False)

    validation_maps = stacked(validation, "image")
    expected_image_threshold = np.quantile(validation_maps.reshape(10, -1).max(1), 0.9)
    assert float(model.image_threshold) == pytest.approx(expected_image_threshold, abs=1e-6)
    assert float(model.pixel_threshold) == pytest.approx(np.quantile(validation_maps, 0.95), abs=1e-6)
    assert trainer.callback_metrics["val/image_threshold"] == pytest.approx(
        expected_image_threshold, abs=1e-6
    )
    thresholds_after_validation = (float(model.image_threshold), float(model.pixel_threshold))

    # test scores far above every validation score: a threshold fitted on them would move
    test = normal_samples(8, seed=1, offset=5.0) + anomalous_samples(8, seed=2, offset=5.0)
    logged = trainer.test(model, loader(test), verbose=False)[0]
    assert (float(model.image_threshold), float(model.pixel_threshold)) == thresholds_after_validation

    maps, masks, labels = stacked(test, "image"), stacked(test, "mask"), stacked(test, "label")
    scores = maps.reshape(len(test), -1).max(1)
    precision, recall, _ = precision_recall_curve(masks.flatten(), maps.flatten())
    aupro = AUPRO()  # checked against a brute-force reference in test_metrics.py
    aupro.update(torch.from_numpy(maps), torch.from_numpy(masks))
    expected = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "pixel_auroc": roc_auc_score(masks.flatten(), maps.flatten()),
        "pixel_aupro": float(aupro.compute()),
        "pixel_f1": np.nanmax(2 * precision * recall / (precision + recall)),
    }
    for name, value in expected.items():
        assert logged[f"test/{name}"] == pytest.approx(value, abs=1e-5), name
        assert evaluator.results[name] == pytest.approx(value, abs=1e-5), name
    assert set(evaluator.results) == {*expected, "image_f1"}
    assert 0.0 < evaluator.results["image_f1"] <= 1.0


class TrainableMapIsImage(MapIsImage):
    """Adds a do-nothing training step and records the image threshold when each validation starts."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.threshold_at_validation_start: list[tuple[bool, float]] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.weight.square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_validation_epoch_start(self) -> None:
        self.threshold_at_validation_start.append((self.trainer.sanity_checking, float(self.image_threshold)))


def test_the_sanity_check_does_not_set_thresholds():
    model = TrainableMapIsImage()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Evaluator()],
    )
    trainer.fit(model, loader(normal_samples(4, seed=7)), loader(normal_samples(4, seed=8)))
    (sanity_check, _), (real_validation, threshold_before_real_validation) = (
        model.threshold_at_validation_start
    )
    assert sanity_check and not real_validation
    assert math.isnan(threshold_before_real_validation)
    assert not math.isnan(float(model.image_threshold))


def test_image_metrics_only_when_masks_are_missing():
    evaluator = Evaluator()
    test = normal_samples(6, seed=3) + anomalous_samples(6, seed=4)
    trainer_with(evaluator).test(MapIsImage(), loader(test, with_masks=False), verbose=False)
    assert set(evaluator.results) == {"image_auroc", "image_ap", "image_f1"}


def test_validation_without_maps_leaves_the_pixel_threshold_unset():
    model = MapIsImage(with_maps=False)
    trainer_with(Evaluator()).validate(model, loader(normal_samples(5, seed=5)), verbose=False)
    assert not math.isnan(float(model.image_threshold))
    assert math.isnan(float(model.pixel_threshold))


def test_a_test_set_with_one_class_stops_with_the_labels_found():
    with pytest.raises(DataError, match=r"only label\(s\) \[0\]"):
        trainer_with(Evaluator()).test(MapIsImage(), loader(normal_samples(6, seed=6)), verbose=False)
