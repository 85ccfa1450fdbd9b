"""Issue #16: bad data stops at setup, before any training, with one message naming the file or option;
16-bit and palette masks; every training normal with `val_ratio=0`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_lab.data import MVTecDataModule
from anomaly_lab.data.dataset import read_mask
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.run import train
from tests.helpers import compose_config


def setup_datamodule(root: Path, **kwargs) -> MVTecDataModule:
    dm = MVTecDataModule(str(root), **{"category": "widget", "image_size": 32, "batch_size": 4, **kwargs})
    dm.setup("fit")
    return dm


def masks_of(dm: MVTecDataModule) -> torch.Tensor:
    return torch.cat([batch.mask for batch in dm.test_dataloader()])


def test_16_bit_and_palette_masks_give_the_labels_of_their_8_bit_twins(make_mvtec_tree):
    root = make_mvtec_tree()
    expected = masks_of(setup_datamodule(root))
    for mask_path in (root / "widget" / "ground_truth").rglob("*.png"):
        binary = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 0
        if mask_path.parent.name == "crack":  # 16-bit, values 0/1: 8-bit reading shifted them all to 0
            Image.fromarray(binary.astype(np.uint16)).save(mask_path)
            assert Image.open(mask_path).mode.startswith("I;16")
        else:  # palette: index 1 where defective, index 0 painted white
            palette = Image.fromarray(binary.astype(np.uint8), mode="L").convert("P")
            palette.putpalette([255, 255, 255, 0, 0, 0])
            palette.save(mask_path)
        assert np.array_equal(read_mask(mask_path) > 0, binary)
    assert torch.equal(masks_of(setup_datamodule(root)), expected) and expected.sum() > 0


def test_truncated_and_corrupt_test_images_stop_setup_naming_the_file(make_mvtec_tree):
    root = make_mvtec_tree()
    image = root / "widget" / "test" / "hole" / "001.png"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated") as error:
        setup_datamodule(root)
    assert str(image) in str(error.value)

    jpeg = root / "widget" / "test" / "hole" / "001.jpg"
    image.unlink()
    assert cv2.imwrite(str(jpeg), np.full((40, 48, 3), 90, np.uint8))
    assert cv2.imwrite(str(root / "widget" / "ground_truth" / "hole" / "001_mask.png"), np.full((40, 48), 255, np.uint8))
    setup_datamodule(root)  # a complete JPEG passes
    jpeg.write_bytes(jpeg.read_bytes()[:-300])
    with pytest.raises(DataError, match="truncated") as error:
        setup_datamodule(root)
    assert str(jpeg) in str(error.value)

    jpeg.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read image") as error:
        setup_datamodule(root)
    assert str(jpeg) in str(error.value)


def test_empty_mask_of_an_anomalous_image_is_an_error_or_a_warning(make_mvtec_tree):
    root = make_mvtec_tree()
    mask = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    assert cv2.imwrite(str(mask), np.zeros((40, 48), np.uint8))
    with pytest.raises(DataError, match="data.empty_masks=warn") as error:
        setup_datamodule(root)
    assert str(mask) in str(error.value)
    with pytest.warns(UserWarning, match="mark no anomalous pixel"):
        setup_datamodule(root, empty_masks="warn")
    with pytest.raises(ConfigError, match="data.empty_masks"):
        setup_datamodule(root, empty_masks="ignore")


def test_a_test_set_of_one_class_stops_setup(make_mvtec_tree):
    root = make_mvtec_tree(defects={"crack": 1})
    shutil.rmtree(root / "widget" / "test" / "crack")
    with pytest.raises(DataError, match=r"only label\(s\) \[0\]") as error:
        setup_datamodule(root)
    assert "mvtec/widget" in str(error.value)


def test_a_crop_larger_than_the_image_size_is_an_option_error(make_mvtec_tree):
    with pytest.raises(ConfigError, match=r"data.crop_size=\[40, 40\] is larger than data.image_size=\[32, 32\]"):
        MVTecDataModule(str(make_mvtec_tree()), "widget", image_size=32, crop_size=40)


def test_val_ratio_0_trains_on_every_normal_and_says_where_thresholds_come_from(make_mvtec_tree):
    dm = setup_datamodule(make_mvtec_tree(n_train=7), val_ratio=0)
    assert len(dm.train_set) == len(dm.normal_set) == len(dm.val_set) == 7
    assert "training normals' own scores" in dm.threshold_source
    held_out = setup_datamodule(make_mvtec_tree(n_train=7), val_ratio=0.3)
    assert (len(held_out.train_set), len(held_out.val_set)) == (5, 2) and "holdout of 2" in held_out.threshold_source


def test_bad_data_stops_a_training_run_before_its_first_step(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    mask = root / "widget" / "ground_truth" / "hole" / "002_mask.png"
    assert cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    cfg = compose_config("train", ["model=cpc_ad", "data=mvtec/bottle", f"data.root={root}", "data.category=widget",
                                   "data.image_size=64", "data.num_workers=0", "trainer.max_epochs=1", f"paths.data_root={tmp_path}",
                                   "callbacks=none", "trainer.enable_progress_bar=false"], output_dir=tmp_path / "run")
    with pytest.raises(DataError, match="a mask must have its image's size") as error:
        train(cfg)
    assert str(mask) in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_threshold_source_is_written_to_metrics(make_mvtec_tree, tmp_path):
    cfg = compose_config("train", ["model=padim", "data=mvtec/bottle", f"data.root={make_mvtec_tree()}",
                                   "data.category=widget", "data.image_size=32", "data.num_workers=0",
                                   "data.val_ratio=0", "callbacks=none", "trainer.enable_progress_bar=false",
                                   f"paths.data_root={tmp_path}"],
                         output_dir=tmp_path / "run")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "data.val_ratio=0" in record["threshold_source"]
