"""FolderDataModule: a user's own image folders (normal, abnormal per defect type, optional masks) on
trees the tests write; the splits, the mask layouts, every bad input, one end-to-end run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomaly_lab.data import FolderDataModule
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.run import train
from tests.helpers import compose_config

SIZE = 32


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def normal(index: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 100 + index, np.uint8)


def defect(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with a pure red square (BGR) and its mask."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4 + 2 * index : 14 + 2 * index, 6:16] = 255
    image = normal(index)
    image[mask > 0] = (0, 0, 255)
    return image, mask


def make_tree(root: Path, n_good: int = 10, defects: dict[str, int] | None = None, masks: str | None = "subfolders",
              suffix: str = "_mask") -> Path:
    """`root/good/*.png`, `root/<defect>/*.png` and masks in `root/masks/<defect>/` ("subfolders"),
    `root/masks/` ("flat") or none; returns root."""
    for i in range(n_good):
        write(root / "good" / f"g{i:02d}.png", normal(i))
    for name, count in (defects or {"scratch": 2, "dent": 3}).items():
        for i in range(count):
            image, mask = defect(i)
            write(root / name / f"{name}{i}.png", image)
            if masks is not None:
                write(root / "masks" / (name if masks == "subfolders" else "") / f"{name}{i}{suffix}.png", mask)
    return root


def folder_data(root: Path, **kwargs) -> FolderDataModule:
    kwargs = {"normal_dir": "good", "abnormal_dirs": ["scratch", "dent"], "mask_dir": "masks",
              "image_size": SIZE, "batch_size": 4, **kwargs}
    dm = FolderDataModule(str(root), **kwargs)
    dm.setup()
    return dm


def names(samples) -> list[str]:
    return [Path(s.image_path).name for s in samples]


def red(images: torch.Tensor, dm: FolderDataModule) -> torch.Tensor:
    """[B, 1, H, W] True where the denormalised image is red (the written defects)."""
    rgb = images * torch.tensor(dm.std).view(1, 3, 1, 1) + torch.tensor(dm.mean).view(1, 3, 1, 1)
    return ((rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.1)).unsqueeze(1)


@pytest.mark.parametrize(("layout", "suffix"), [("subfolders", "_mask"), ("flat", "_mask"), ("flat", "")])
def test_abnormal_folders_are_defect_types_with_their_masks(tmp_path, layout, suffix):
    dm = folder_data(make_tree(tmp_path / "pcb", masks=layout, suffix=suffix))
    assert (dm.dataset_name, dm.category, dm.has_masks) == ("folder", "pcb", True)
    abnormal = [s for s in dm.test_set.samples if s.label == 1]
    assert [(s.defect, Path(s.image_path).name) for s in abnormal] == [
        ("scratch", "scratch0.png"), ("scratch", "scratch1.png"), ("dent", "dent0.png"), ("dent", "dent1.png"),
        ("dent", "dent2.png")]
    assert all(Path(s.mask_path).stem == Path(s.image_path).stem + suffix for s in abnormal)
    batches = list(dm.test_dataloader())
    assert all(torch.equal(red(b.image, dm), b.mask.bool()) for b in batches)
    assert sum(b.label.sum().item() for b in batches) == 5


def test_custom_mask_suffix_and_mask_extension(tmp_path):
    root = make_tree(tmp_path / "pcb", masks="subfolders", suffix="-gt")
    for mask in (root / "masks").rglob("*.png"):
        write(mask.with_suffix(".bmp"), cv2.imread(str(mask)))
        mask.unlink()
    dm = folder_data(root, mask_suffix="-gt")
    assert all(s.mask_path.name.endswith("-gt.bmp") for s in dm.test_set.samples if s.label == 1)


def test_without_masks_image_metrics_only_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        dm = folder_data(make_tree(tmp_path / "pcb", masks=None), mask_dir=None)
    assert not dm.has_masks and all(b.mask is None for b in dm.test_dataloader())
    assert "no masks (data.mask_dir is not set): the run reports image metrics only" in caplog.text


def test_pixel_metrics_off_ignores_masks_even_when_some_are_missing(tmp_path, caplog):
    root = make_tree(tmp_path / "pcb")
    (root / "masks" / "dent" / "dent1_mask.png").unlink()
    with caplog.at_level(logging.INFO):
        dm = folder_data(root, pixel_metrics=False)
    assert not dm.has_masks and all(s.mask_path is None for s in dm.test_set.samples)
    assert "data.pixel_metrics=false: masks ignored" in caplog.text


def test_carved_normal_test_split_is_seeded_disjoint_and_never_trained_on(tmp_path):
    root = make_tree(tmp_path / "pcb", n_good=20)

    def split(**kwargs) -> tuple[set[str], set[str], set[str]]:
        dm = folder_data(root, **kwargs)
        test = {n for s, n in zip(dm.test_set.samples, names(dm.test_set.samples), strict=True) if s.label == 0}
        return set(names(dm.train_set.samples)), set(names(dm.val_set.samples)), test

    train, val, test = split(normal_test_ratio=0.25, split_seed=3)
    assert len(test) == 5 and len(train | val | test) == 20 and not (train | val) & test and not train & val
    assert split(normal_test_ratio=0.25, split_seed=3) == (train, val, test)
    assert split(normal_test_ratio=0.25, split_seed=3, seed=7)[2] == test  # the run's seed does not move it
    assert split(normal_test_ratio=0.25, split_seed=4)[2] != test
    assert len(split()[2]) == 4  # default: 0.2 of the normals


def test_normal_test_dir_gives_the_normal_test_images_and_every_normal_trains(tmp_path):
    root = make_tree(tmp_path / "pcb", n_good=8)
    for i in range(3):
        write(tmp_path / "elsewhere" / f"t{i}.png", normal(i))
    dm = folder_data(root, normal_test_dir=str(tmp_path / "elsewhere"), val_ratio=0)
    assert sorted(names(dm.train_set.samples)) == [f"g{i:02d}.png" for i in range(8)]
    assert [n for s, n in zip(dm.test_set.samples, names(dm.test_set.samples), strict=True) if s.label == 0] == [
        "t0.png", "t1.png", "t2.png"]


def test_odd_extensions_subfolders_and_hidden_files(tmp_path):
    root = make_tree(tmp_path / "pcb", n_good=4, masks=None)
    good = root / "good"
    write(good / "upper.JPG", normal(1))
    write(good / "lot2" / "deep" / "b.bmp", normal(2))
    write(good / "lot2" / "c.TIF", normal(3))
    write(good / ".hidden.png", normal(4))
    write(good / ".cache" / "d.png", normal(5))
    (good / "notes.txt").write_text("not an image")
    dm = folder_data(root, mask_dir=None, val_ratio=0, normal_test_ratio=0.1)
    everything = {s.image_path.relative_to(good).as_posix() for s in dm.train_set.samples + dm.test_set.samples
                  if s.label == 0}
    assert everything == {"g00.png", "g01.png", "g02.png", "g03.png", "upper.JPG", "lot2/deep/b.bmp", "lot2/c.TIF"}
    next(iter(dm.normal_dataloader()))  # the odd formats read
    only_png = folder_data(root, mask_dir=None, extensions=["png"], normal_test_ratio=0.25)
    assert all(s.image_path.suffix == ".png" for s in only_png.train_set.samples + only_png.test_set.samples)


def error_message(error_type: type[Exception], root: Path, **kwargs) -> str:
    with pytest.raises(error_type) as error:
        folder_data(root, **kwargs)
    return str(error.value)


def test_missing_folders_name_the_option_and_the_path(tmp_path):
    root = make_tree(tmp_path / "pcb")
    message = error_message(DataError, tmp_path / "nowhere")
    assert "data.root" in message and str(tmp_path / "nowhere") in message
    message = error_message(DataError, root, normal_dir="ok")
    assert "data.normal_dir=ok" in message and str(root / "ok") in message and "good" in message  # lists folders
    message = error_message(DataError, root, abnormal_dirs=["scratch", "crack"])
    assert "data.abnormal_dirs[1]=crack" in message and str(root / "crack") in message
    message = error_message(DataError, root, normal_test_dir="test_good")
    assert "data.normal_test_dir=test_good" in message and str(root / "test_good") in message
    message = error_message(DataError, root, mask_dir="gt")
    assert "data.mask_dir=gt" in message and str(root / "gt") in message


def test_folder_without_images_names_it_and_the_extensions(tmp_path):
    root = make_tree(tmp_path / "pcb")
    write(root / "empty" / "a.webp", normal(0))
    message = error_message(DataError, root, abnormal_dirs=["empty"], mask_dir=None)
    assert "data.abnormal_dirs[0]=empty" in message and str(root / "empty") in message
    assert ".png" in message and ".webp" in message and "data.extensions" in message


def test_no_abnormal_folder_says_how_to_fix_it(tmp_path):
    message = error_message(ConfigError, make_tree(tmp_path / "pcb"), abnormal_dirs=[], mask_dir=None)
    assert "data.abnormal_dirs" in message and "normal images only" in message


def test_abnormal_image_without_mask_is_named_unless_pixel_metrics_are_off(tmp_path):
    root = make_tree(tmp_path / "pcb")
    (root / "masks" / "dent" / "dent1_mask.png").unlink()
    message = error_message(DataError, root)
    assert str(root / "dent" / "dent1.png") in message and "data.pixel_metrics=false" in message
    assert str(root / "masks" / "dent" / "dent1_mask.<ext>") in message


def test_one_flat_mask_for_two_abnormal_images_is_an_error(tmp_path):
    root = make_tree(tmp_path / "pcb", masks="flat")
    write(root / "dent" / "scratch0.png", defect(0)[0])  # same stem as scratch/scratch0.png
    message = error_message(DataError, root)
    assert str(root / "masks" / "scratch0_mask.png") in message and str(root / "dent" / "scratch0.png") in message


@pytest.mark.parametrize(("options", "named"), [
    ({"abnormal_dirs": ["scratch", "good/lot"]}, ("data.normal_dir", "data.abnormal_dirs[1]")),
    ({"normal_test_dir": "good/lot"}, ("data.normal_dir", "data.normal_test_dir")),
    ({"mask_dir": "good/lot"}, ("data.normal_dir", "data.mask_dir")),
])
def test_an_image_in_two_folders_is_an_error(tmp_path, options, named):
    root = make_tree(tmp_path / "pcb", defects={"scratch": 1, "dent": 1}, masks="flat")
    image, mask = defect(0)
    write(root / "good" / "lot" / "scratch0.png", image)
    write(root / "good" / "lot" / "dent0_mask.png", mask)
    message = error_message(DataError, root, **options)
    assert str(root / "good" / "lot") in message and all(option in message for option in named)


@pytest.mark.parametrize(("options", "named"), [
    ({"normal_test_ratio": 1.5}, "data.normal_test_ratio=1.5"),
    ({"normal_test_ratio": 0.2, "normal_test_dir": "x"}, "data.normal_test_dir=x"),
    ({"extensions": []}, "data.extensions"),
])
def test_bad_options_are_named(tmp_path, options, named):
    assert named in error_message(ConfigError, tmp_path, **options)


def test_train_on_folders_without_masks_reports_image_metrics_only(tmp_path):
    root = make_tree(tmp_path / "pcb", n_good=12, masks=None)
    cfg = compose_config("train", [
        "model=padim", "data=folder", f"data.root={root}", "data.abnormal_dirs=[scratch,dent]",
        f"data.image_size={SIZE}", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
        f"paths.data_root={tmp_path}",
        "callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ], output_dir=tmp_path / "run")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (record["data"], record["category"]) == ("folder", "pcb")
    assert set(record["metrics"]) == {"image_auroc", "image_ap", "image_f1"}
    assert record["metrics"]["image_auroc"] == pytest.approx(1.0)
