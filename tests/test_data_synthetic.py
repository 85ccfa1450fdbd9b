"""The synthetic generator: MVTec layout, exact defects (visible ones, and hard ones that need learning),
determinism, caches keyed by their parameters, safety; its datamodule."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score

from anomaly_lab.data import DEFECT_TYPES, SYNTHETIC_KINDS, SyntheticDataModule, generate_synthetic
from anomaly_lab.data.synthetic import HARD_DEFECT_TYPES, MARKER_NAME, synthetic_folder, synthetic_params
from anomaly_lab.errors import ConfigError, DataError
from tests.helpers import compose_config

SMALL = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_per_defect": 3}


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path)).astype(np.float32) / 255


def defect_images(folder: Path, defect: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, boolean mask) of every test image of `defect`."""
    return [
        (read_rgb(p), cv2.imread(str(folder / "ground_truth" / defect / f"{p.stem}_mask.png"), 0) > 0)
        for p in sorted((folder / "test" / defect).glob("*.png"))
    ]


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_writes_mvtec_layout_with_a_visible_exact_mask_per_defect(tmp_path, kind):
    folder = generate_synthetic(tmp_path, kind, **SMALL)
    assert folder.parent == tmp_path and folder.name.startswith(f"{kind}-")
    normals = [read_rgb(p) for p in sorted((folder / "train" / "good").glob("*.png"))]
    assert len(normals) == 4 and len(list((folder / "test" / "good").glob("*.png"))) == 2
    typical = np.median(normals, axis=0)
    for defect in DEFECT_TYPES:
        images = defect_images(folder, defect)
        assert len(images) == 3
        for image, mask in images:
            assert mask.shape == image.shape[:2]
            assert 0.005 < mask.mean() < 0.1  # a few % of the image
            change = np.abs(image - typical).max(axis=2)
            assert change[mask].mean() > 0.15 > change[~mask].mean()  # clearly visible, only there


def test_hard_defects_are_small_and_keep_the_weaves_intensity_contrast_and_colour(tmp_path):
    folder = generate_synthetic(tmp_path, "hard", **{**SMALL, "image_size": 128})
    assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *HARD_DEFECT_TYPES])
    for defect in HARD_DEFECT_TYPES:
        for image, mask in defect_images(folder, defect):
            assert 0.01 < mask.mean() < 0.035
            inside, outside = image[mask], image[~mask]
            assert np.abs(inside.mean(axis=0) - outside.mean(axis=0)).max() < 0.04  # no stain, no foreign hue
            assert 0.7 < inside.std(axis=0).mean() / outside.std(axis=0).mean() < 1.3  # no smoothing, no scratch


@pytest.mark.parametrize("kind", ["texture", "hard"])
def test_same_seed_same_bytes_other_seed_other_images(tmp_path, kind):
    first = files(generate_synthetic(tmp_path / "a", kind, seed=5, **SMALL))
    assert files(generate_synthetic(tmp_path / "b", kind, seed=5, **SMALL)) == first
    assert files(generate_synthetic(tmp_path / "c", kind, seed=6, **SMALL)) != first


def test_second_call_does_not_rewrite(tmp_path):
    folder = generate_synthetic(tmp_path, "object", **SMALL)
    before = mtimes(folder)
    assert generate_synthetic(tmp_path, "object", **SMALL) == folder
    assert mtimes(folder) == before


def test_two_configs_coexist_and_neither_regenerates_when_the_other_is_used(tmp_path):
    def datamodule(data_seed: int) -> SyntheticDataModule:
        cfg = compose_config("train", ["data=synthetic/hard", f"paths.data_root={tmp_path}",
                                       f"data.data_seed={data_seed}", "data.n_train=4"])
        dm = instantiate(cfg.data)
        dm.setup()
        return dm

    first, second = datamodule(0).folder, datamodule(1).folder
    assert first != second and first.parent == second.parent == tmp_path / "synthetic"
    assert files(first).keys() == files(second).keys() and files(first) != files(second)
    before = {folder: mtimes(folder) for folder in (first, second)}
    assert (datamodule(0).folder, datamodule(1).folder) == (first, second)
    assert {folder: mtimes(folder) for folder in (first, second)} == before
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])  # no staging left


def test_refuses_a_folder_it_did_not_write(tmp_path):
    target = synthetic_folder(tmp_path, synthetic_params("texture", **SMALL))
    user_file = target / "notes.txt"
    target.mkdir()
    user_file.write_text("mine")
    with pytest.raises(DataError, match=MARKER_NAME) as error:
        generate_synthetic(tmp_path, "texture", **SMALL)
    assert str(target) in str(error.value)
    assert user_file.read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_refuses_a_folder_whose_marker_records_other_parameters(tmp_path):
    folder = generate_synthetic(tmp_path, "texture", **SMALL)
    (folder / MARKER_NAME).write_text('{"kind": "texture", "seed": 99}')
    before = files(folder)
    with pytest.raises(DataError, match="other parameters"):
        generate_synthetic(tmp_path, "texture", **SMALL)
    assert files(folder) == before


def test_concurrent_generation_publishes_one_complete_dataset(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: generate_synthetic(tmp_path, "object", **SMALL), range(4)))
    (folder,) = set(folders)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert files(folder) == files(generate_synthetic(tmp_path / "fresh", "object", **SMALL))


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'stone'"):
        generate_synthetic(tmp_path, "stone")
    with pytest.raises(ConfigError, match=", ".join(SYNTHETIC_KINDS)):
        SyntheticDataModule(str(tmp_path), "stone")


def test_datamodule_generates_on_setup_with_default_size(tmp_path):
    dm = SyntheticDataModule(str(tmp_path), "texture", batch_size=8, val_ratio=0.1)
    dm.setup()
    assert (dm.dataset_name, dm.category, dm.has_masks, dm.image_size) == (
        "synthetic",
        "texture",
        True,
        (128, 128),
    )
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54, 6, 40)
    assert all(s.image_path.parent.parent.parent == dm.folder for s in dm.test_set.samples)
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape == (8, 3, 128, 128) and batch.mask.shape == (8, 1, 128, 128)
    assert sorted(s.defect for s in dm.test_set.samples if s.label == 1) == sorted(10 * DEFECT_TYPES)


@torch.no_grad()
def test_random_init_padim_cannot_tell_the_hard_defects(tmp_path):
    cfg = compose_config("train", ["data=synthetic/hard", "model=padim", f"paths.data_root={tmp_path}"])
    assert cfg.model.backbone_weights is None
    dm, model = instantiate(cfg.data), instantiate(cfg.model).eval()
    dm.setup()
    model.fit_normal(dm.normal_dataloader())
    scores = torch.cat([model(batch.image).image_score for batch in dm.test_dataloader()])
    labels = [s.label for s in dm.test_set.samples]
    assert labels.count(1) == 3 * labels.count(0) // 2  # 20 normal and 30 anomalous test images
    assert roc_auc_score(labels, scores.numpy()) <= 0.75
