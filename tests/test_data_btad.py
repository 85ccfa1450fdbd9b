"""BTAD layout: ok/ko splits, masks matched by file stem across .bmp and .png, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomaly_lab.data import BTAD_CATEGORIES, BTADDataModule
from anomaly_lab.errors import DataError


def datamodule(root: Path, category: str = "01") -> BTADDataModule:
    dm = BTADDataModule(str(root), category, image_size=[20, 24], batch_size=4, val_ratio=0.25)
    dm.setup()
    return dm


@pytest.mark.parametrize(
    ("image_ext", "mask_ext", "mask_suffix"),
    [(".bmp", ".png", ""), (".png", ".png", ""), (".bmp", ".bmp", ""), (".png", ".png", "_mask")],
)
def test_splits_labels_and_masks_matched_by_stem(make_btad_tree, image_ext, mask_ext, mask_suffix):
    dm = datamodule(make_btad_tree(image_ext=image_ext, mask_ext=mask_ext, mask_suffix=mask_suffix))
    assert (dm.dataset_name, dm.has_masks, BTAD_CATEGORIES) == ("btad", True, ("01", "02", "03"))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 5)
    batches = list(dm.test_dataloader())
    labels = torch.cat([b.label for b in batches])
    masks = torch.cat([b.mask for b in batches])
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert masks.shape == (5, 1, 20, 24)
    assert [bool(m.any()) for m in masks] == [False, False, True, True, True]
    assert all("/test/ko/" in s.image_path.as_posix() for s in dm.test_set.samples if s.label == 1)


def test_missing_root_says_where_btad_is_published(tmp_path):
    with pytest.raises(DataError, match="avires.dimi.uniud.it") as error:
        datamodule(tmp_path / "btad")
    assert str(tmp_path / "btad") in str(error.value)


def test_missing_product_lists_the_products_found(make_btad_tree):
    root = make_btad_tree(category="02")
    with pytest.raises(DataError, match="02") as error:
        datamodule(root, category="03")
    assert str(root / "03") in str(error.value)


def test_ko_image_without_mask_is_an_error(make_btad_tree):
    root = make_btad_tree()
    (root / "01" / "ground_truth" / "ko" / "0101.png").unlink()
    with pytest.raises(DataError, match="no mask") as error:
        datamodule(root)
    assert str(root / "01" / "test" / "ko" / "0101.bmp") in str(error.value)


def test_empty_train_folder_is_an_error(make_btad_tree):
    root = make_btad_tree()
    for image in (root / "01" / "train" / "ok").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="no images") as error:
        datamodule(root)
    assert str(root / "01" / "train" / "ok") in str(error.value)
