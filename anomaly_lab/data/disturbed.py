"""Disturbed MVTec (Zheng et al. 2022, FYD, Table 3 and supplement Fig. 5-6): MVTec AD with random
colour or spatial perturbations of every image, training and test alike.

- `disturbance="color"`: random brightness/contrast and contrast-limited adaptive histogram
  equalisation (CLAHE). The paper leaves out tile, wood and capsule (colour differences are their
  anomalies): asking for them is an error.
- `disturbance="spatial"`: random zoom in/out, rotation and horizontal/vertical flips; the masks
  follow. Transistor gets zoom only ("we can not apply flip or rotation in transistor").

The paper gives no magnitudes or probabilities: every one is a constructor key, with our choices as
defaults. Each image gets one fixed perturbation, drawn from a generator seeded by the run's seed and
a hash of the image's pixels, so the disturbed dataset is the same in every epoch, every loader
worker and every run with the same seed (a static dataset, as the paper built). The perturbation is
applied to the image as read (before resizing), then the usual transform runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

from anomaly_lab.data.mvtec import MVTecDataModule
from anomaly_lab.errors import ConfigError

DISTURBANCES = ("color", "spatial")
COLOR_EXCLUDED = ("tile", "wood", "capsule")
NO_FLIP_OR_ROTATION = ("transistor",)


def disturbance_transform(
    disturbance: str,
    category: str,
    brightness_limit: float = 0.2,
    contrast_limit: float = 0.2,
    clahe_clip_limit: float = 4.0,
    clahe_p: float = 0.5,
    scale: Sequence[float] = (0.8, 1.2),
    rotate_limit: float = 45.0,
    flip_p: float = 0.5,
) -> A.Compose:
    """The albumentations pipeline of one disturbance for one category, with the paper's exclusions."""
    if disturbance == "color":
        if category in COLOR_EXCLUDED:
            raise ConfigError(
                f"data.disturbance=color is not defined for {category}: the paper leaves out {list(COLOR_EXCLUDED)}"
            )
        steps = [
            A.RandomBrightnessContrast(brightness_limit=brightness_limit, contrast_limit=contrast_limit, p=1.0),
            A.CLAHE(clip_limit=clahe_clip_limit, p=clahe_p),
        ]
    elif disturbance == "spatial":
        rotate = 0.0 if category in NO_FLIP_OR_ROTATION else rotate_limit
        steps = [A.Affine(scale=tuple(scale), rotate=(-rotate, rotate), border_mode=cv2.BORDER_REFLECT_101, p=1.0)]
        if category not in NO_FLIP_OR_ROTATION:
            steps += [A.HorizontalFlip(p=flip_p), A.VerticalFlip(p=flip_p)]
    else:
        raise ConfigError(f"data.disturbance={disturbance!r}: expected one of {DISTURBANCES}")
    return A.Compose(steps)


class DisturbedTransform:
    """Apply a fixed per-image disturbance (seeded by `seed` and the image's pixels), then `transform`."""

    def __init__(self, disturbance: A.Compose, transform: A.Compose, seed: int):
        self.disturbance = disturbance
        self.transform = transform
        self.seed = seed

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict:
        self.disturbance.set_random_seed((zlib.crc32(image.tobytes()) + self.seed * 1_000_003) % 2**32)
        inputs = {"image": image} if mask is None else {"image": image, "mask": mask}
        return self.transform(**self.disturbance(**inputs))

    def set_random_seed(self, seed: int) -> None:
        """Reseed the training augmentations (loader workers); the disturbance stays per image."""
        self.transform.set_random_seed(seed)


class DisturbedMVTecDataModule(MVTecDataModule):
    """MVTec AD with FYD's Disturbed-MVTec perturbations on training, validation and test images.

    `disturbance`: "color" or "spatial"; the other keys are the magnitudes of `disturbance_transform`.
    """

    dataset_name = "disturbed_mvtec"

    def __init__(
        self,
        *args,
        disturbance: str = "spatial",
        brightness_limit: float = 0.2,
        contrast_limit: float = 0.2,
        clahe_clip_limit: float = 4.0,
        clahe_p: float = 0.5,
        scale: Sequence[float] = (0.8, 1.2),
        rotate_limit: float = 45.0,
        flip_p: float = 0.5,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.cache != "none":
            raise ConfigError(
                f"data.cache={self.cache} cannot serve Disturbed MVTec: its disturbances apply to each original "
                "image before the resize that a cache stores; set data.cache=none"
            )
        self.disturbance = disturbance
        self.disturbance_pipeline = disturbance_transform(
            disturbance, self.category, brightness_limit, contrast_limit, clahe_clip_limit, clahe_p,
            scale, rotate_limit, flip_p,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        for dataset in (self.train_set, self.normal_set, self.val_set, self.test_set):
            dataset.transform = DisturbedTransform(self.disturbance_pipeline, dataset.transform, self.seed)
