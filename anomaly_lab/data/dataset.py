"""Image files on disk -> transformed sample dicts {image, label, path, mask?}."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly_lab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image file, its label (0 normal, 1 anomalous) and its mask file (None: no anomalous pixel)."""

    image_path: Path
    label: int
    mask_path: Path | None = None


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _decode(path: Path, flags: int) -> np.ndarray:
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
    except (OSError, ValueError, cv2.error) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    if image is None:
        raise DataError(f"cannot read image {path}: not a valid {', '.join(IMAGE_EXTENSIONS)} file")
    return image


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; grayscale files are repeated over the three channels."""
    return cv2.cvtColor(_decode(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """Binary float32 [H, W]: 1 where the mask file is non-zero."""
    return (_decode(path, cv2.IMREAD_GRAYSCALE) > 0).astype(np.float32)


class AnomalyDataset(Dataset):
    """Samples read and transformed on access.

    With `with_masks`, every item has a mask [1, H, W] (all zeros for samples without a mask file),
    so that batches never mix samples with and without masks.
    """

    def __init__(self, samples: list[Sample], transform: A.Compose, with_masks: bool):
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image_path)
        item = {"label": sample.label, "path": str(sample.image_path)}
        if not self.with_masks:
            item["image"] = self.transform(image=image)["image"]
            return item
        if sample.mask_path is None:
            mask = np.zeros(image.shape[:2], dtype=np.float32)
        else:
            mask = read_mask(sample.mask_path)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{sample.image_path} is {image.shape[1]}x{image.shape[0]}: a mask must have its image's size"
                )
        out = self.transform(image=image, mask=mask)
        item["image"] = out["image"]
        item["mask"] = (torch.as_tensor(out["mask"]) > 0.5).float().unsqueeze(0)
        return item
