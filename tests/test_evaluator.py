"""The Evaluator driven by a real Trainer: thresholds from validation only, test metrics equal references,
at the input size and at the masks' own (evaluator.pixel_resolution=original)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.evaluation import Evaluator, ExactPixelMetrics

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
    aupro = ExactPixelMetrics()  # checked against a brute-force reference in test_metrics.py
    aupro.update(torch.from_numpy(maps[:, 0]), torch.from_numpy(masks[:, 0]).bool())
    expected = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "pixel_auroc": roc_auc_score(masks.flatten(), maps.flatten()),
        "pixel_aupro": aupro.compute()["pixel_aupro"],
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


def with_value(samples: list[dict], index: int, value: float) -> list[dict]:
    """The samples with one pixel of image `index` set to `value` (the stand-in's map and score follow)."""
    image = samples[index]["image"].clone()
    image[0, 0, 0] = value
    return [*samples[:index], {**samples[index], "image": image}, *samples[index + 1 :]]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scores_stop_test_and_validation_naming_the_counts_and_model(value):
    test = with_value(normal_samples(8, seed=1) + anomalous_samples(8, seed=2), 9, value)
    expected = (r"model MapIsImage gave NaN or infinite values at test: 1 of 16 image scores and "
                r"1 of 2,304 anomaly-map pixels")
    with pytest.raises(DataError, match=expected):
        trainer_with(Evaluator()).test(MapIsImage(), loader(test), verbose=False)
    validation = with_value(normal_samples(5, seed=5), 0, value)
    with pytest.raises(DataError, match=r"at validation: 1 of 5 image scores and 1 of 720 anomaly-map pixels"):
        trainer_with(Evaluator()).validate(MapIsImage(), loader(validation), verbose=False)


def test_per_defect_image_auroc_of_each_type_against_every_normal_matches_sklearn():
    normals = normal_samples(6, seed=3, offset=0.3)
    dents = [{**s, "defect": "dent"} for s in anomalous_samples(3, seed=4)]
    scratches = [{**s, "defect": "scratch"} for s in anomalous_samples(5, seed=5, offset=0.5)]
    evaluator = Evaluator()
    trainer_with(evaluator).test(MapIsImage(), loader(normals + dents + scratches), verbose=False)

    def score(samples: list[dict]) -> list[float]:
        return [float(s["image"].max()) for s in samples]

    for name, defect in (("dent", dents), ("scratch", scratches)):
        labels = [0] * len(normals) + [1] * len(defect)
        assert evaluator.record["defects"][name] == {
            "image_auroc": pytest.approx(roc_auc_score(labels, score(normals) + score(defect)), abs=1e-12),
            "count": len(defect),
        }
    assert set(evaluator.record["defects"]) == {"dent", "scratch"}


def test_pixel_states_are_compact_cpu_tensors_and_the_record_names_the_resolution():
    evaluator = Evaluator()
    test = normal_samples(4, seed=1) + anomalous_samples(4, seed=2)
    trainer_with(evaluator).test(MapIsImage(), loader(test), verbose=False)
    state = evaluator.pixels.state()
    assert {t.device.type for t in state} == {"cpu"}
    assert {t.dtype for t in state} == {torch.float32, torch.bool}
    assert sum(t.numel() * t.element_size() for t in state) == 5 * len(test) * SIZE * SIZE
    seconds = evaluator.record.pop("metrics_seconds")
    assert evaluator.record == {"pixel_resolution": f"input {SIZE}x{SIZE}", "pixel_histogram_bits": None,
                                "pixel_error_bounds": None, "defects": {}}
    assert 0 < seconds < 60


def test_binned_evaluator_records_bounds_that_hold_against_exact():
    test = normal_samples(8, seed=1) + anomalous_samples(8, seed=2)
    exact, binned = Evaluator(), Evaluator(pixel_histogram_bits=6)
    for evaluator in (exact, binned):
        trainer_with(evaluator).test(MapIsImage(), loader(test), verbose=False)
    bounds = binned.record["pixel_error_bounds"]
    assert set(bounds) == {"pixel_auroc", "pixel_aupro", "pixel_f1"} and binned.record["pixel_histogram_bits"] == 6
    for name, bound in bounds.items():
        assert abs(binned.results[name] - exact.results[name]) <= bound + 1e-12, name


def test_bad_evaluator_options_name_the_option():
    with pytest.raises(ConfigError, match="evaluator.pixel_resolution='native' must be 'input'"):
        Evaluator(pixel_resolution="native")
    with pytest.raises(ConfigError, match="evaluator.pixel_histogram_bits=20 must be null"):
        Evaluator(pixel_histogram_bits=20)
    cropped = SimpleNamespace(datamodule=SimpleNamespace(crop_size=(224, 224)))
    with pytest.raises(ConfigError, match=r"data.crop_size=\[224, 224\] crops the images"):
        Evaluator(pixel_resolution="original").setup(cropped, MapIsImage(), "test")


# evaluator.pixel_resolution=original

INPUT = 4  # the model's input size: every map is 4 x 4
ORIGINAL_SIZES = [(6, 10), (9, 7), (7, 9), (10, 6), (5, 11)]  # (h, w): two normal images, then three anomalous


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resizing with half-pixel centres (align_corners=False), one output pixel at a time."""
    out = np.zeros((height, width))
    for row in range(height):
        for col in range(width):
            (r0, r1, wr), (c0, c1, wc) = (
                neighbours(index, size, len_in) for index, size, len_in in
                ((row, height, image.shape[0]), (col, width, image.shape[1]))
            )
            top = (1 - wc) * image[r0, c0] + wc * image[r0, c1]
            bottom = (1 - wc) * image[r1, c0] + wc * image[r1, c1]
            out[row, col] = (1 - wr) * top + wr * bottom
    return out


def neighbours(index: int, size_out: int, size_in: int) -> tuple[int, int, float]:
    source = max((index + 0.5) * size_in / size_out - 0.5, 0.0)
    low = min(int(np.floor(source)), size_in - 1)
    return low, min(low + 1, size_in - 1), source - low


def hand_made_test_set(folder: Path) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    """Samples (4 x 4 maps, masks downscaled by nearest neighbour as the data pipeline does) and, per
    image, the reference map upsampled to its original size and its original mask. The defects are
    one-pixel lines and dots, which the 4 x 4 masks mostly lose."""
    rng = np.random.default_rng(0)
    samples, maps, masks = [], [], []
    for index, (height, width) in enumerate(ORIGINAL_SIZES):
        mask = np.zeros((height, width), np.uint8)
        mask_path = None
        if index >= 2:
            mask[index % height, 1:-2] = 255  # a thin line
            mask[-2, index % width] = 255  # a dot
            mask_path = folder / f"mask_{index}.png"
            assert cv2.imwrite(str(mask_path), mask)
        small_map = rng.random((INPUT, INPUT)).astype(np.float32)
        small_mask = cv2.resize(mask, (INPUT, INPUT), interpolation=cv2.INTER_NEAREST) > 0
        samples.append({"image": torch.from_numpy(small_map)[None], "label": int(index >= 2), "path": f"image_{index}.png",
                        "mask": torch.from_numpy(small_mask).float()[None], "original_size": (height, width),
                        "mask_path": None if mask_path is None else str(mask_path)})
        maps.append(bilinear(small_map, height, width))
        masks.append(mask > 0)
    return samples, maps, masks


def test_original_resolution_equals_a_brute_force_computation_and_differs_from_input(tmp_path):
    samples, maps, masks = hand_made_test_set(tmp_path)
    original, at_input = Evaluator(pixel_resolution="original"), Evaluator()
    for evaluator in (original, at_input):
        trainer_with(evaluator).test(MapIsImage(), loader(samples), verbose=False)

    scores, truth = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    precision, recall, _ = precision_recall_curve(truth, scores)
    aupro = ExactPixelMetrics()  # checked against a brute-force reference in test_metrics.py
    aupro.update([torch.from_numpy(m).float() for m in maps], [torch.from_numpy(m) for m in masks])
    expected = {"pixel_auroc": roc_auc_score(truth, scores), "pixel_aupro": aupro.compute()["pixel_aupro"],
                "pixel_f1": np.nanmax(2 * precision * recall / (precision + recall))}
    for name, value in expected.items():
        assert original.results[name] == pytest.approx(value, abs=1e-6), name
        assert abs(at_input.results[name] - value) > 1e-3, name
    assert original.record["pixel_resolution"] == "original"
    assert at_input.record["pixel_resolution"] == f"input {INPUT}x{INPUT}"
    assert original.results["image_auroc"] == at_input.results["image_auroc"]


def test_a_mask_file_of_another_size_than_its_image_is_named(tmp_path):
    samples, _, _ = hand_made_test_set(tmp_path)
    samples[3]["original_size"] = (12, 12)
    with pytest.raises(DataError, match=r"mask .*mask_3.png is 6x10 but its image is 12x12"):
        trainer_with(Evaluator(pixel_resolution="original")).test(MapIsImage(), loader(samples), verbose=False)


def test_a_dataset_without_original_sizes_asks_for_the_input_resolution(tmp_path):
    samples, _, _ = hand_made_test_set(tmp_path)
    samples = [{k: v for k, v in s.items() if k not in ("original_size", "mask_path")} for s in samples]
    with pytest.raises(DataError, match="needs each test image's original size and mask file.*pixel_resolution=input"):
        trainer_with(Evaluator(pixel_resolution="original")).test(MapIsImage(), loader(samples), verbose=False)


# under DDP: two CPU processes


class RecordingEvaluator(Evaluator):
    """Writes each process's results and record to `folder`/rank<k>.json (the spawned processes' copies)."""

    def __init__(self, folder: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_epoch_end(trainer, pl_module)
        outcome = {"results": self.results, "record": self.record, "images": self.pixels.images}
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))


def test_two_processes_compute_once_on_rank_zero_and_share_one_process_results(tmp_path):
    test = (normal_samples(6, seed=1) + [{**s, "defect": "dent"} for s in anomalous_samples(5, seed=2)]
            + [{**s, "defect": "scratch"} for s in anomalous_samples(5, seed=3, offset=0.2)])
    single = Evaluator()
    trainer_with(single).test(MapIsImage(), loader(test), verbose=False)

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RecordingEvaluator(str(tmp_path))])
    trainer.test(MapIsImage(), loader(test), verbose=False)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["results"] == rank1["results"] == pytest.approx(single.results, abs=1e-12)
    for record in (rank0["record"], rank1["record"], single.record):
        assert record.pop("metrics_seconds") > 0  # each process's own time in the test hooks
    assert rank0["record"] == rank1["record"] == single.record
    assert (rank0["images"], rank1["images"]) == (len(test), len(test) // 2)  # rank 0 absorbed rank 1's pixels


def test_a_non_finite_score_on_one_process_stops_both_with_the_message(tmp_path):
    test = with_value(normal_samples(4, seed=1) + anomalous_samples(4, seed=2), 5, float("nan"))  # rank 1's share
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RecordingEvaluator(str(tmp_path))])
    with pytest.raises(Exception, match="gave NaN or infinite values at test: 1 of 8 image scores"):
        trainer.test(MapIsImage(), loader(test), verbose=False)
    assert not list(tmp_path.glob("rank*.json"))  # neither process went on to results
