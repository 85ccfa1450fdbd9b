"""predict(cfg): score new images with a trained model, and export its scoring path to ONNX.

The model, its weights, fitted statistics and thresholds come from the checkpoint and the config of
the training run beside it (`run.with_run_config`, `run.load_weights`, as `evaluate` does); images are
read (png, jpg, bmp, tif; grayscale or RGB, any size) and brought to the model's input by the run's
eval transform (`build_transform` with its data keys: resize, centre crop, channels, normalisation).

Written into this run's folder (never over an existing file): `predictions.csv` (path, image_score,
label: 1 when the score is above the image threshold), and for models with maps, per image,
`overlays/<name>.png` (the map over the image, the colour scale from 0 to twice the pixel threshold,
so the threshold is its middle) and `masks/<name>.png` (255 where the map is above the pixel
threshold). Maps are brought back to the original image size; with a centre crop, the pixels
outside the crop were not seen by the model and count as normal. `<name>` is the image's path
relative to the input folder, without its extension (with it, as `_ext`, when two files share a stem).

Thresholds: the checkpoint's `image_threshold` and `pixel_threshold` (quantiles of the scores of
the validation normals of the training run); `threshold=` and `pixel_threshold=` override them.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from anomaly_lab.data.dataset import IMAGE_EXTENSIONS, read_image
from anomaly_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, as_size, build_transform
from anomaly_lab.deploy.onnx import OnnxEngine, export_onnx
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.run import _save_config, load_weights, with_run_config

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx")
EXPORT_FORMATS = ("onnx",)


@dataclass(frozen=True)
class Prediction:
    path: str
    image_score: float
    label: int


@dataclass(frozen=True)
class Preprocessing:
    """The run's eval transform and the geometry needed to bring maps back to the original image."""

    resize: tuple[int, int]
    crop: tuple[int, int] | None
    mean: Sequence[float]
    std: Sequence[float]
    channels: int

    @classmethod
    def from_data_config(cls, data: DictConfig) -> Preprocessing:
        crop = data.get("crop_size")
        return cls(as_size(data.image_size, "data.image_size"), None if crop is None else as_size(crop, "data.crop_size"),
                   tuple(data.get("mean", IMAGENET_MEAN)), tuple(data.get("std", IMAGENET_STD)), data.get("channels", 3))

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop or self.resize

    def transform(self):
        return build_transform(self.resize, self.crop, None, self.mean, self.std, self.channels)

    def to_image(self, anomaly_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """A map [h, w] at the model's input size, at the original (height, width); NaN where the model
        saw nothing (outside the centre crop)."""
        height, width = image_size
        if self.crop is None:
            return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
        (resized_h, resized_w), (crop_h, crop_w) = self.resize, self.crop
        top, left = (resized_h - crop_h) // 2, (resized_w - crop_w) // 2  # albumentations' CenterCrop
        y0, y1 = round(top * height / resized_h), round((top + crop_h) * height / resized_h)
        x0, x1 = round(left * width / resized_w), round((left + crop_w) * width / resized_w)
        full = np.full((height, width), np.nan, np.float32)
        if y1 > y0 and x1 > x0:
            full[y0:y1, x0:x1] = cv2.resize(anomaly_map, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        return full


def predict(cfg: DictConfig) -> list[Prediction]:
    """Score `cfg.input` and/or export the model (`cfg.export`) of the checkpoint `cfg.ckpt_path`."""
    task = {key: cfg.get(key) for key in ("input", "threshold", "pixel_threshold", "export", "engine",
                                          "onnx_path", "batch_size", "device")}
    _check_options(task)
    cfg = with_run_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    root, files = find_inputs(Path(task["input"])) if task["input"] is not None else (None, [])
    names = output_names(files, root) if files else []
    model = load_weights(instantiate(cfg.model), Path(cfg.ckpt_path)).eval()
    if model.has_normal_statistics and not bool(model.normal_fitted):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} holds no fitted statistics of normal data: "
                          "use the checkpoint that train.py writes after validation (checkpoints/last.ckpt)")
    preprocessing = Preprocessing.from_data_config(cfg.data)
    onnx_file = output_dir / "model.onnx"
    exporting = task["export"] == "onnx" or (task["engine"] == "onnx" and task["onnx_path"] is None)
    new_files = [output_dir / folder / f"{name}.png" for name in names for folder in ("overlays", "masks")]
    _check_new(new_files + ([output_dir / "predictions.csv"] if files else []) + ([onnx_file] if exporting else []))
    _save_config(cfg, output_dir / "config.yaml")
    if exporting:
        _export(model, preprocessing, onnx_file, int(cfg.seed))
    if not files:
        return []

    image_threshold = float(model.image_threshold if task["threshold"] is None else task["threshold"])
    pixel_threshold = float(model.pixel_threshold if task["pixel_threshold"] is None else task["pixel_threshold"])
    _finite(image_threshold, "threshold", cfg.ckpt_path)
    thresholds = (image_threshold, pixel_threshold)
    if task["engine"] == "onnx":
        engine, device = OnnxEngine(Path(task["onnx_path"] or onnx_file)), "cpu"
    else:
        engine, device = model.use_channels_last().to(task["device"]), task["device"]
    predictions = []
    for batch in _batches(files, names, preprocessing, task["batch_size"]):
        with torch.no_grad():
            out = engine(torch.stack([item.tensor for item in batch]).to(device))
        predictions += _write_outputs(batch, out, thresholds, preprocessing, output_dir, cfg.ckpt_path)
    if not predictions:
        raise DataError(f"input={task['input']}: none of its {len(files)} file(s) is a readable image "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    write_predictions(output_dir / "predictions.csv", predictions)
    log.info(f"{len(predictions)} images scored, {sum(p.label for p in predictions)} anomalous at image threshold "
             f"{image_threshold:.6g}: {output_dir / 'predictions.csv'}")
    return predictions


def _export(model: AnomalyModel, preprocessing: Preprocessing, path: Path, seed: int) -> None:
    """The model's scoring path as ONNX, its thresholds and preprocessing as metadata."""
    example = torch.randn(2, preprocessing.channels, *preprocessing.input_size,
                          generator=torch.Generator().manual_seed(seed))
    metadata = {"model": model.name, "image_threshold": float(model.image_threshold),
                "pixel_threshold": float(model.pixel_threshold), "image_size": list(preprocessing.resize),
                "crop_size": list(preprocessing.crop) if preprocessing.crop else None,
                "mean": list(preprocessing.mean), "std": list(preprocessing.std), "channels": preprocessing.channels}
    export_onnx(model, example, path, metadata)
    log.info(f"ONNX model written to {path}")


def _write_outputs(batch: list[_Item], out: ScoreOutput, thresholds: tuple[float, float],
                   preprocessing: Preprocessing, output_dir: Path, ckpt_path: str) -> list[Prediction]:
    """The batch's predictions; its overlays and masks written when the model gives maps."""
    image_threshold, pixel_threshold = thresholds
    if out.anomaly_map is not None:
        _finite(pixel_threshold, "pixel_threshold", ckpt_path)
    scores = out.image_score.float().cpu().numpy()
    for i, item in enumerate(batch):
        if out.anomaly_map is not None:
            anomaly_map = preprocessing.to_image(out.anomaly_map[i, 0].float().cpu().numpy(), item.rgb.shape[:2])
            write_png(output_dir / "overlays" / f"{item.name}.png", overlay(item.rgb, anomaly_map, pixel_threshold))
            write_png(output_dir / "masks" / f"{item.name}.png", binary_mask(anomaly_map, pixel_threshold))
    return [Prediction(str(item.path), float(score), int(score > image_threshold)) for item, score in zip(batch, scores, strict=True)]


def _check_options(task: dict) -> None:
    if task["engine"] not in ENGINES:
        raise ConfigError(f"engine={task['engine']} must be one of {', '.join(ENGINES)}")
    if task["export"] is not None and task["export"] not in EXPORT_FORMATS:
        raise ConfigError(f"export={task['export']} must be null or one of {', '.join(EXPORT_FORMATS)}")
    if task["input"] is None and task["export"] is None:
        raise ConfigError("input=<image or folder> is missing (or export=onnx to export the model only)")
    if task["onnx_path"] is not None and task["engine"] != "onnx":
        raise ConfigError(f"onnx_path={task['onnx_path']} is used by engine=onnx only")
    if not isinstance(task["batch_size"], int) or task["batch_size"] < 1:
        raise ConfigError(f"batch_size={task['batch_size']} must be an integer >= 1")


def _finite(threshold: float, option: str, ckpt_path: str) -> None:
    if not math.isfinite(threshold):
        raise ConfigError(f"ckpt_path={ckpt_path} holds no {option.replace('_', ' ')} (validation did not set it): "
                          f"give one with {option}=<value>")


def find_inputs(path: Path) -> tuple[Path, list[Path]]:
    """(the folder names are relative to, the files to try): a file alone, or every file under a folder
    (recursively, sorted); hidden files and folders (names starting with '.') are left out."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise DataError(f"input={path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"input={path}: the folder holds no file (expected {', '.join(IMAGE_EXTENSIONS)} images)")
    return path, files


def output_names(files: list[Path], root: Path) -> list[str]:
    """Each file's output name: its path relative to `root` without extension; with the extension as
    `_ext` when several files share that stem."""
    stems = [f.relative_to(root).with_suffix("") for f in files]
    counts = Counter(stems)
    return [(stem if counts[stem] == 1 else stem.with_name(f"{stem.name}_{f.suffix.lstrip('.')}")).as_posix()
            for f, stem in zip(files, stems, strict=True)]


def _check_new(paths: list[Path]) -> None:
    existing = next((p for p in paths if p.exists()), None)
    if existing is not None:
        raise ConfigError(f"{existing} exists and predict never overwrites a file: choose another paths.output_dir")


@dataclass
class _Item:
    path: Path
    name: str
    rgb: np.ndarray  # the original image, RGB uint8 [H, W, 3]
    tensor: torch.Tensor  # what the model sees


def _batches(files: list[Path], names: list[str], preprocessing: Preprocessing, size: int) -> Iterator[list[_Item]]:
    """The readable images in batches of `size`; every other file is reported on one line and skipped."""
    transform, batch = preprocessing.transform(), []
    for path, name in zip(files, names, strict=True):
        try:
            rgb = read_image(path)
        except DataError:
            log.warning(f"skipped {path}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or unreadable")
            continue
        batch.append(_Item(path, name, rgb, transform(image=rgb)["image"]))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The map in the JET colours over the image (half each), from 0 to 2 x the pixel threshold (the
    image's largest value when the threshold is not positive); the image alone where the map is NaN."""
    scale = 2 * pixel_threshold if pixel_threshold > 0 else max(float(np.nanmax(anomaly_map)), 1e-12)
    heat = np.nan_to_num(np.clip(anomaly_map / scale, 0, 1), nan=0.0)
    colours = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(rgb, 0.5, colours, 0.5, 0)
    return np.where(np.isnan(anomaly_map)[..., None], rgb, blended)


def binary_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """uint8 [H, W]: 255 where the map is above the threshold, 0 elsewhere (and where it is NaN)."""
    return np.where(np.nan_to_num(anomaly_map, nan=-np.inf) > pixel_threshold, 255, 0).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), pixels):
        raise DataError(f"cannot write {path}")


def write_predictions(path: Path, predictions: list[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "image_score", "label"])
        writer.writerows((p.path, repr(p.image_score), p.label) for p in predictions)
