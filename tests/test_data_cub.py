"""CUB-200-2011 one-vs-all: official split, 0-based classes, optional crop to the bird's box, bad input,
and the real 10-class subset of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_lab.data import CUBDataModule
from anomaly_lab.errors import ConfigError, DataError
from tests.conftest import write_rgb
from tests.helpers import SHARED_DATA

CUB_REAL = SHARED_DATA / "cub" / "CUB_200_2011"
BOX = (8, 4, 16, 12)  # left, top, width, height of the white "bird" in every generated image


def write_cub(root: Path, n_classes: int = 3, per_class: int = 6) -> Path:
    """`root/CUB_200_2011` in the published layout; images 40x48 gray with a white box; odd images are train."""
    folder = root / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        for i in range(per_class):
            image_id += 1
            image = np.full((40, 48, 3), 60, np.uint8)
            image[BOX[1] : BOX[1] + BOX[3], BOX[0] : BOX[0] + BOX[2]] = 255
            write_rgb(folder / "images" / name / f"Bird_{c}_{i:04d}.jpg", image)
            images.append(f"{image_id} {name}/Bird_{c}_{i:04d}.jpg")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {image_id % 2}")
            boxes.append(f"{image_id} {BOX[0]}.0 {BOX[1]}.0 {BOX[2]}.0 {BOX[3]}.0")
    for name, lines in {"images.txt": images, "image_class_labels.txt": labels,
                        "train_test_split.txt": split, "bounding_boxes.txt": boxes}.items():  # fmt: skip
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def setup(root, **kwargs) -> CUBDataModule:
    dm = CUBDataModule(str(root), **{"image_size": 24, "num_workers": 0, "batch_size": 8, **kwargs})
    dm.setup("fit")
    return dm


def test_official_split_and_labels_by_class(tmp_path):
    dm = setup(write_cub(tmp_path), normal_class=1, val_ratio=0.34)
    assert (dm.dataset_name, dm.category, dm.has_masks) == ("cub200", "cub200", False)
    assert len(dm.train_set) + len(dm.val_set) == 3 and len(dm.test_set) == 9
    train_paths = {str(s.image_path) for s in dm.train_set.samples + dm.val_set.samples}
    assert all("002.Bird_2" in p for p in train_paths) and not train_paths & {str(s.image_path) for s in dm.test_set.samples}
    batches = list(dm.test_dataloader())
    labels, targets = torch.cat([b.label for b in batches]), torch.cat([b.target for b in batches])
    assert torch.equal(labels, (targets != 1).long()) and sorted(targets.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(b.mask is None for b in batches)


def test_crop_to_box_keeps_only_the_bird(tmp_path):
    root = write_cub(tmp_path)
    whole = next(iter(setup(root, mean=[0] * 3, std=[1] * 3).test_dataloader())).image
    cropped = next(iter(setup(root, crop_to_box=True, mean=[0] * 3, std=[1] * 3).test_dataloader())).image
    assert cropped.min() > 0.9  # the box is all white
    assert whole.min() < 0.3


def test_missing_metadata_or_images_names_the_path_and_the_source(tmp_path):
    root = write_cub(tmp_path)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"train_test_split.txt not found .*images.txt.*caltech.edu"):
        setup(root)
    with pytest.raises(DataError, match=r"images folder .*nowhere/images not found"):
        setup(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"normal_class=200 .*\[0, 200\)"):
        CUBDataModule(str(root), normal_class=200)


def test_a_class_without_images_says_which_classes_exist(tmp_path):
    with pytest.raises(DataError, match=r"no training image of normal class 7; .*\[0, 1, 2\]"):
        setup(write_cub(tmp_path), normal_class=7)


@pytest.mark.skipif(not CUB_REAL.is_dir(), reason="../shared/data/cub/CUB_200_2011 not here")
def test_real_cub_subset():
    dm = setup(CUB_REAL, normal_class=9, crop_to_box=True)
    train, test = dm.class_samples()
    assert len(train) + len(test) == 543 and {s.target for s in train} == set(range(10))
    assert len(dm.train_set) + len(dm.val_set) == sum(s.target == 9 for s in train)
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape[1:] == (3, 24, 24) and batch.target is not None
