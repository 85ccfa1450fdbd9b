"""The synthetic generator: MVTec layout, exact visible defects, determinism, caching, safety; its datamodule."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly_lab.data import DEFECT_TYPES, SYNTHETIC_KINDS, SyntheticDataModule, generate_synthetic
from anomaly_lab.data.synthetic import MARKER_NAME
from anomaly_lab.errors import ConfigError, DataError

SMALL = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_per_defect": 3}


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path)).astype(np.float32) / 255


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_writes_mvtec_layout_with_a_visible_exact_mask_per_defect(tmp_path, kind):
    folder = generate_synthetic(tmp_path, kind, **SMALL)
    assert folder == tmp_path / kind
    normals = [read_rgb(p) for p in sorted((folder / "train" / "good").glob("*.png"))]
    assert len(normals) == 4 and len(list((folder / "test" / "good").glob("*.png"))) == 2
    typical = np.median(normals, axis=0)
    for defect in DEFECT_TYPES:
        images = sorted((folder / "test" / defect).glob("*.png"))
        assert len(images) == 3
        for image_path in images:
            image = read_rgb(image_path)
            mask = cv2.imread(str(folder / "ground_truth" / defect / f"{image_path.stem}_mask.png"), 0)
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
            assert 0.005 < (mask > 0).mean() < 0.1  # a few % of the image
            change = np.abs(image - typical).max(axis=2)
            assert change[mask > 0].mean() > 0.15 > change[mask == 0].mean()  # clearly visible, only there


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = files(generate_synthetic(tmp_path / "a", "texture", seed=5, **SMALL))
    assert files(generate_synthetic(tmp_path / "b", "texture", seed=5, **SMALL)) == first
    assert files(generate_synthetic(tmp_path / "c", "texture", seed=6, **SMALL)) != first


def test_second_call_does_not_rewrite(tmp_path):
    folder = generate_synthetic(tmp_path, "object", **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert generate_synthetic(tmp_path, "object", **SMALL) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes


def test_other_parameters_regenerate_our_own_dataset(tmp_path):
    generate_synthetic(tmp_path, "texture", **SMALL)
    folder = generate_synthetic(tmp_path, "texture", **{**SMALL, "n_train": 6})
    assert len(list((folder / "train" / "good").glob("*.png"))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texture"]  # no staging or stale folder left


def test_refuses_a_folder_it_did_not_write(tmp_path):
    user_file = tmp_path / "texture" / "notes.txt"
    user_file.parent.mkdir()
    user_file.write_text("mine")
    with pytest.raises(DataError, match=MARKER_NAME) as error:
        generate_synthetic(tmp_path, "texture", **SMALL)
    assert str(tmp_path / "texture") in str(error.value)
    assert user_file.read_text() == "mine" and sorted(p.name for p in user_file.parent.iterdir()) == [
        "notes.txt"
    ]


def test_concurrent_generation_publishes_one_complete_dataset(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: generate_synthetic(tmp_path, "object", **SMALL), range(4)))
    assert set(folders) == {tmp_path / "object"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object"]
    assert files(tmp_path / "object") == files(generate_synthetic(tmp_path / "fresh", "object", **SMALL))


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'stone'"):
        generate_synthetic(tmp_path, "stone")


def test_datamodule_generates_on_setup_with_default_size(tmp_path):
    dm = SyntheticDataModule(str(tmp_path), "texture", batch_size=8)
    dm.setup()
    assert (dm.dataset_name, dm.category, dm.has_masks, dm.image_size) == (
        "synthetic",
        "texture",
        True,
        (128, 128),
    )
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54, 6, 40)
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape == (8, 3, 128, 128) and batch.mask.shape == (8, 1, 128, 128)
    assert [s.label for s in dm.test_set.samples].count(1) == 30
