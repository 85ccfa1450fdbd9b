"""MVTec AD layout: splits, labels, masks aligned with images, loaders, bad input, the real bottle category."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from anomaly_lab.data import MVTEC_CATEGORIES, MVTEC_TEXTURES, Batch, MVTecDataModule
from anomaly_lab.errors import DataError

BOTTLE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"


def datamodule(root: Path, **kwargs) -> MVTecDataModule:
    kwargs = {"category": "widget", "image_size": [20, 24], "batch_size": 4, **kwargs}
    dm = MVTecDataModule(str(root), **kwargs)
    dm.setup("fit")
    return dm


def paths(loader) -> list[str]:
    return [p for batch in loader for p in batch.path]


def red_pixels(images: torch.Tensor, dm: MVTecDataModule) -> torch.Tensor:
    """[B, 1, H, W] True where the denormalised image is red (the generated defects)."""
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    rgb = images * std + mean
    return ((rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.1)).unsqueeze(1)


def test_constants_list_the_15_categories_and_5_textures():
    assert len(MVTEC_CATEGORIES) == 15 and set(MVTEC_TEXTURES) <= set(MVTEC_CATEGORIES)


def test_counts_labels_and_masks_per_split(make_mvtec_tree):
    dm = datamodule(make_mvtec_tree(n_train=10, n_test_good=3, defects={"crack": 2, "hole": 3}))
    assert (dm.dataset_name, dm.category, dm.has_masks, dm.image_size) == ("mvtec", "widget", True, (20, 24))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 1, 8)
    test = list(dm.test_dataloader())
    assert all(isinstance(b, Batch) for b in test)
    labels = torch.cat([b.label for b in test])
    assert labels.dtype == torch.long and labels.tolist() == [1] * 2 + [0] * 3 + [1] * 3  # crack, good, hole
    for batch in test:
        assert batch.image.shape[1:] == (3, 20, 24) and batch.mask.shape[1:] == (1, 20, 24)
        assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
        for label, mask, path in zip(batch.label, batch.mask, batch.path, strict=True):
            assert bool(mask.any()) == bool(label) == ("/good/" not in path)


def test_masks_coincide_with_the_defect_pixels_after_resize(make_mvtec_tree):
    dm = datamodule(make_mvtec_tree())
    for batch in dm.test_dataloader():
        assert torch.equal(red_pixels(batch.image, dm), batch.mask.bool())


def test_validation_holdout_follows_split_seed_is_disjoint_and_from_train_normals_only(make_mvtec_tree):
    root = make_mvtec_tree(n_train=20)
    dm = datamodule(root, val_ratio=0.25, seed=3)
    train, val = set(paths(dm.train_dataloader())), paths(dm.val_dataloader())
    assert len(val) == 5 and not train & set(val) and len(train | set(val)) == 20
    assert all("/train/good/" in p for p in val)
    assert paths(datamodule(root, val_ratio=0.25, seed=3).val_dataloader()) == val
    assert paths(datamodule(root, val_ratio=0.25, seed=4).val_dataloader()) == val  # the run's seed: same split
    assert paths(datamodule(root, val_ratio=0.25, seed=3, split_seed=1).val_dataloader()) != val
    every = datamodule(root, val_ratio=0.0)  # every normal trains; thresholds from their own scores
    assert len(every.train_set) == len(every.val_set) == 20 and "val_ratio=0" in every.threshold_source


def test_train_loader_shuffles_reproducibly_with_the_seed(make_mvtec_tree):
    root = make_mvtec_tree(n_train=20)
    first = paths(datamodule(root, seed=1).train_dataloader())
    assert first == paths(datamodule(root, seed=1).train_dataloader())
    assert first != sorted(first)


def test_train_augmentations_are_reproducible_with_the_seed(make_mvtec_tree):
    root = make_mvtec_tree(n_train=8)

    def first_batch(seed: int) -> torch.Tensor:
        dm = datamodule(root, seed=seed, train_augmentations=[A.ColorJitter(brightness=0.5, p=1.0)])
        return next(iter(dm.train_dataloader())).image

    assert torch.equal(first_batch(0), first_batch(0)) and not torch.equal(first_batch(0), first_batch(1))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_normal_loader_shards_cover_the_training_normals_exactly_once(make_mvtec_tree, world_size):
    dm = datamodule(make_mvtec_tree(n_train=11))
    shards = [paths(dm.normal_dataloader(rank, world_size)) for rank in range(world_size)]
    everything = [p for shard in shards for p in shard]
    assert sorted(everything) == sorted(s.image_path.as_posix() for s in dm.train_set.samples)
    assert len(everything) == len(set(everything)) == 10
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_grayscale_source_images_load_as_rgb_and_channels_1_gives_one_channel(make_mvtec_tree):
    root = make_mvtec_tree()
    cv2.imwrite(str(root / "widget" / "train" / "good" / "000.png"), np.full((40, 48), 90, np.uint8))
    assert next(iter(datamodule(root).normal_dataloader())).image.shape[1] == 3
    gray = datamodule(root, channels=1)
    assert len(gray.mean) == 1 and next(iter(gray.test_dataloader())).image.shape[1] == 1


def test_missing_root_says_where_to_get_the_dataset(tmp_path):
    with pytest.raises(DataError) as error:
        datamodule(tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "https://www.mvtec.com" in message
    assert "data.root" in message and "paths.data_root" in message


def test_missing_category_lists_the_categories_found(make_mvtec_tree):
    root = make_mvtec_tree(category="widget")
    with pytest.raises(DataError, match="widget") as error:
        datamodule(root, category="gadget")
    assert str(root / "gadget") in str(error.value)


def test_empty_train_folder_is_an_error(make_mvtec_tree):
    root = make_mvtec_tree()
    for image in (root / "widget" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="no images") as error:
        datamodule(root)
    assert str(root / "widget" / "train" / "good") in str(error.value)


def test_defect_image_without_mask_is_an_error(make_mvtec_tree):
    root = make_mvtec_tree()
    (root / "widget" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="no mask") as error:
        datamodule(root)
    assert str(root / "widget" / "test" / "hole" / "001.png") in str(error.value)


def test_unreadable_image_is_an_error_naming_the_file(make_mvtec_tree):
    root = make_mvtec_tree()
    broken = root / "widget" / "test" / "good" / "001.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read") as error:
        datamodule(root)  # setup's pre-scan, before any training
    assert str(broken) in str(error.value)


def test_mask_of_another_size_is_an_error_naming_both_files(make_mvtec_tree):
    root = make_mvtec_tree()
    mask = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="size") as error:
        datamodule(root)
    assert str(mask) in str(error.value) and str(root / "widget" / "test" / "crack" / "000.png") in str(
        error.value
    )


@pytest.mark.skipif(not (BOTTLE_ROOT / "bottle").is_dir(), reason="no ../shared/data/mvtec/bottle here")
def test_real_bottle_category_loads():
    dm = MVTecDataModule(str(BOTTLE_ROOT), "bottle", image_size=64, batch_size=8)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 209 and len(dm.val_set) == 21
    assert len(dm.test_set) == 83 and sum(s.mask_path is not None for s in dm.test_set.samples) == 63
    defect = next(i for i, s in enumerate(dm.test_set.samples) if s.label == 1)
    item = dm.test_set[defect]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert 0 < item["mask"].mean() < 0.5 and set(item["mask"].unique().tolist()) == {0.0, 1.0}
