"""Images (files on disk or arrays in memory) -> transformed sample dicts {image, label, path, mask?, target?}."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from anomaly_lab.errors import DataError
from anomaly_lab.seeding import derive_seed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image, its label (0 normal, 1 anomalous) and its mask file (None: no anomalous pixel).

    `image_path` is the image file, or, when `pixels` holds the image in memory (RGB uint8 [H, W, 3],
    e.g. one CIFAR image of a pickle), an identifier `<source file>/<index>` that is not read.
    `target`: the class index (one-vs-all datasets), passed on to `Batch.target`.
    `box`: (left, top, width, height) in pixels; the image is cropped to it after reading (datasets
    without masks: masks are not cropped).
    `defect`: the defect type of an anomalous image (e.g. its test folder's name), None otherwise.
    """

    image_path: Path
    label: int
    mask_path: Path | None = None
    target: int | None = None
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    box: tuple[int, int, int, int] | None = None
    defect: str | None = None


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


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """`image` cut to `box` (left, top, width, height), clipped to the image; at least one pixel."""
    height, width = image.shape[:2]
    left, top = min(max(0, box[0]), width - 1), min(max(0, box[1]), height - 1)
    right, bottom = min(width, max(left + 1, box[0] + box[2])), min(height, max(top + 1, box[1] + box[3]))
    return image[top:bottom, left:right]


def read_mask(path: Path) -> np.ndarray:
    """Binary float32 [H, W]: 1 where the mask file is non-zero, at its own bit depth (8- or 16-bit,
    1-bit) and, for palette files, where the palette index is non-zero; alpha is ignored."""
    try:
        with Image.open(path) as mask:
            bands = mask.getbands()
            pixels = np.asarray(mask)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from error
    if pixels.ndim == 3:
        pixels = pixels[..., [i for i, band in enumerate(bands) if band != "A"]].max(axis=2)
    return (pixels != 0).astype(np.float32)


def check_mask_size(mask_path: Path | str, mask_size: tuple[int, ...], image_path: Path | str,
                    image_size: tuple[int, ...]) -> None:
    """DataError unless a mask's (height, width) is its image's."""
    if tuple(mask_size) != tuple(image_size):
        raise DataError(
            f"mask {mask_path} is {mask_size[1]}x{mask_size[0]} but its image is {image_size[1]}x{image_size[0]} "
            f"({image_path}): a mask must have its image's size"
        )


def load_sample(sample: Sample, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """(RGB uint8 image cropped to the sample's box, its float32 0/1 mask when `with_mask` and the sample
    has a mask file (checked against the image's size), the image's (height, width))."""
    image = read_image(sample.image_path) if sample.pixels is None else sample.pixels
    if sample.box is not None:
        image = crop(image, sample.box)
    mask = None
    if with_mask and sample.mask_path is not None:
        mask = read_mask(sample.mask_path)
        check_mask_size(sample.mask_path, mask.shape, sample.image_path, image.shape[:2])
    return image, mask, tuple(image.shape[:2])


class AnomalyDataset(Dataset):
    """Samples read and transformed on access.

    With `with_masks`, every item has a mask [1, H, W] (all zeros for samples without a mask file),
    so that batches never mix samples with and without masks. A key ``(index, epoch)`` (what the
    training sampler yields) seeds the transform with `derive_seed(seed, epoch, index)` first.
    With `views` > 0, every item also has `views` [V, C, H, W]: V independent draws of `view_transform`
    on the image (contrastive views), seeded from ``(index, epoch)`` by `derive_seed(seed, epoch, index, 1)`.
    `decoded` (`anomaly_lab.data.cache.DecodedSamples`): the samples already decoded and resized (data.cache);
    None decodes each file at every access.
    """

    def __init__(self, samples: list[Sample], transform: A.Compose, with_masks: bool, seed: int = 0,
                 views: int = 0, view_transform: A.Compose | None = None, decoded=None):
        if views > 0 and view_transform is None:
            raise ValueError("views > 0 needs a view_transform")
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks
        self.seed = seed
        self.views = views
        self.view_transform = view_transform
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            index, epoch = key
            self.transform.set_random_seed(derive_seed(self.seed, epoch, index))
            if self.views > 0:
                self.view_transform.set_random_seed(derive_seed(self.seed, epoch, index, 1))
        else:
            index = key
        sample = self.samples[index]
        if self.decoded is None:
            image, mask, original_size = load_sample(sample, self.with_masks)
        else:
            image, mask, original_size = self.decoded.read(sample)
        item = {
            "label": sample.label, "path": str(sample.image_path), "defect": sample.defect,
            "mask_path": None if sample.mask_path is None else str(sample.mask_path),
            "original_size": original_size,
        }
        if sample.target is not None:
            item["target"] = sample.target
        if self.views > 0:
            item["views"] = torch.stack([self.view_transform(image=image)["image"] for _ in range(self.views)])
        if not self.with_masks:
            item["image"] = self.transform(image=image)["image"]
            return item
        mask = np.zeros(image.shape[:2], dtype=np.float32) if mask is None else mask.astype(np.float32, copy=False)
        out = self.transform(image=image, mask=mask)
        item["image"] = out["image"]
        item["mask"] = (torch.as_tensor(out["mask"]) > 0.5).float().unsqueeze(0)
        return item
