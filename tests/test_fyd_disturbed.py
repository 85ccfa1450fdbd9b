"""Disturbed MVTec (FYD Table 3): per-image seeded perturbations of train and test images, masks that
follow, and the paper's per-category exclusions."""

from __future__ import annotations

import albumentations as A
import pytest
import torch

from anomaly_lab.data import DisturbedMVTecDataModule, MVTecDataModule
from anomaly_lab.data.disturbed import disturbance_transform
from anomaly_lab.errors import ConfigError


def datamodule(root, cls=DisturbedMVTecDataModule, **kwargs):
    kwargs = {"category": "widget", "image_size": [40, 48], "batch_size": 4, **kwargs}
    dm = cls(str(root), **kwargs)
    dm.setup("fit")
    return dm


def images_of(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.mark.parametrize("disturbance", ["color", "spatial"])
def test_train_and_test_images_are_disturbed_reproducibly(make_mvtec_tree, disturbance):
    root = make_mvtec_tree()
    plain = datamodule(root, cls=MVTecDataModule)
    first, second = datamodule(root, disturbance=disturbance), datamodule(root, disturbance=disturbance)
    # (the tree's normal images are uniform gray: only colour changes them, spatial moves the test defects)
    changed = ("train_set", "test_set") if disturbance == "color" else ("test_set",)
    for name in ("train_set", "normal_set", "test_set"):
        disturbed = images_of(getattr(first, name))
        if name in changed:
            assert not torch.allclose(disturbed, images_of(getattr(plain, name)), atol=1e-3)
        assert torch.equal(disturbed, images_of(getattr(second, name)))  # the same in another run
        assert torch.equal(disturbed, images_of(getattr(first, name)))  # and in every epoch
    other_seed = datamodule(root, disturbance=disturbance, seed=1)
    assert not torch.equal(images_of(first.test_set), images_of(other_seed.test_set))


def test_spatial_disturbance_moves_masks_with_their_images(make_mvtec_tree):
    root = make_mvtec_tree()
    dm = datamodule(root, disturbance="spatial", scale=(1.0, 1.0), rotate_limit=0.0, flip_p=1.0)
    plain = datamodule(root, cls=MVTecDataModule)
    item, plain_item = dm.test_set[len(dm.test_set) - 1], plain.test_set[len(plain.test_set) - 1]
    assert item["mask"].sum() > 0
    assert torch.equal(item["mask"], plain_item["mask"].flip(-1).flip(-2))  # both flips, mask and image alike
    torch.testing.assert_close(item["image"], plain_item["image"].flip(-1).flip(-2))


def test_paper_exclusions():
    for category in ("tile", "wood", "capsule"):
        with pytest.raises(ConfigError, match="color"):
            disturbance_transform("color", category)
    with pytest.raises(ConfigError, match="disturbance"):
        disturbance_transform("blur", "bottle")
    transistor = disturbance_transform("spatial", "transistor")
    assert not any(isinstance(t, (A.HorizontalFlip, A.VerticalFlip)) for t in transistor.transforms)
    affine = next(t for t in transistor.transforms if isinstance(t, A.Affine))
    assert tuple(affine.rotate) == (0.0, 0.0) and tuple(affine.scale["x"]) == (0.8, 1.2)  # zoom only
    bottle = disturbance_transform("spatial", "bottle")
    assert any(isinstance(t, A.VerticalFlip) for t in bottle.transforms)


def test_colour_disturbance_on_an_excluded_category_is_a_config_error(make_mvtec_tree):
    root = make_mvtec_tree(category="tile")
    with pytest.raises(ConfigError, match="tile"):
        DisturbedMVTecDataModule(str(root), category="tile", disturbance="color")
