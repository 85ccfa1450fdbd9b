"""Shared fixtures: tiny dataset trees in the MVTec AD and BTAD layouts, written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly_lab.run import train
from tests.helpers import TINY_RUN, compose_config

TREE_IMAGE_SIZE = (40, 48)  # (h, w): not square, to catch swapped axes
DEFECT_COLOUR = (255, 0, 0)  # pure red on gray: the only red pixels of an image are its defect


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), pixels)


def normal_image(index: int) -> np.ndarray:
    h, w = TREE_IMAGE_SIZE
    return np.full((h, w, 3), 100 + index % 50, np.uint8)


def defect_image_and_mask(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with a red rectangle at even coordinates (so a 2x downscale keeps it exact)."""
    image = normal_image(index)
    mask = np.zeros(TREE_IMAGE_SIZE, np.uint8)
    top, left = 2 * (index % 5) + 4, 2 * (index % 7) + 6
    mask[top : top + 10, left : left + 14] = 255
    image[mask > 0] = DEFECT_COLOUR
    return image, mask


@pytest.fixture
def make_mvtec_tree(tmp_path) -> Callable[..., Path]:
    """Write `<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}`; return root."""

    def make(
        category: str = "widget",
        n_train: int = 10,
        n_test_good: int = 3,
        defects: dict[str, int] | None = None,
        root: Path | None = None,
    ) -> Path:
        root = root or tmp_path / "mvtec"
        folder = root / category
        for i in range(n_train):
            write_rgb(folder / "train" / "good" / f"{i:03d}.png", normal_image(i))
        for i in range(n_test_good):
            write_rgb(folder / "test" / "good" / f"{i:03d}.png", normal_image(i))
        for defect, count in (defects or {"crack": 2, "hole": 3}).items():
            for i in range(count):
                image, mask = defect_image_and_mask(i)
                write_rgb(folder / "test" / defect / f"{i:03d}.png", image)
                write_rgb(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
        return root

    return make


@pytest.fixture
def make_btad_tree(tmp_path) -> Callable[..., Path]:
    """Write `<root>/<NN>/{train/ok, test/ok, test/ko, ground_truth/ko}` (masks named by image stem); return root."""

    def make(
        category: str = "01",
        n_train: int = 8,
        n_test_ok: int = 2,
        n_test_ko: int = 3,
        image_ext: str = ".bmp",
        mask_ext: str = ".png",
        mask_suffix: str = "",
    ) -> Path:
        root = tmp_path / "btad"
        folder = root / category
        for i in range(n_train):
            write_rgb(folder / "train" / "ok" / f"{i:04d}{image_ext}", normal_image(i))
        for i in range(n_test_ok):
            write_rgb(folder / "test" / "ok" / f"{i:04d}{image_ext}", normal_image(i))
        for i in range(n_test_ko):
            image, mask = defect_image_and_mask(i)
            write_rgb(folder / "test" / "ko" / f"{100 + i:04d}{image_ext}", image)
            write_rgb(folder / "ground_truth" / "ko" / f"{100 + i:04d}{mask_suffix}{mask_ext}", mask)
        return root

    return make


class TinyRuns:
    """Runs of `model=<name>` trained once per test session on tiny synthetic data (`TINY_RUN`), all
    on one generated dataset under `data_root`; `checkpoint(name)` trains on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data_root = folder / "data"
        self._checkpoints: dict[str, Path] = {}

    def checkpoint(self, model: str) -> Path:
        if model not in self._checkpoints:
            run_dir = self.folder / model
            train(compose_config("train", [f"model={model}", f"paths.data_root={self.data_root}", *TINY_RUN],
                                 output_dir=run_dir))
            self._checkpoints[model] = run_dir / "checkpoints" / "last.ckpt"
        return self._checkpoints[model]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"))
