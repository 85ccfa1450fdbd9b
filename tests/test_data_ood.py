"""OoD protocol: all of CIFAR-10 is normal; the test set is CIFAR-10 test (0) against SVHN's
test_32x32.mat, an LSUN image folder or CIFAR-100 test (1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy.io import savemat

from anomaly_lab.data import OODDataModule
from anomaly_lab.errors import ConfigError, DataError
from tests.conftest import write_rgb
from tests.helpers import compose_config
from tests.test_data_cifar import write_cifar10, write_cifar100


def write_svhn(folder, count: int = 7):
    """torchvision's test_32x32.mat: X [H, W, C, N] uint8, y [N, 1] in 1-10; image i: red 10 * i, blue 8 * column."""
    images = np.zeros((32, 32, 3, count), np.uint8)
    images[:, :, 0, :] = 10 * np.arange(count)
    images[:, :, 2, :] = (8 * np.arange(32))[None, :, None]
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / "test_32x32.mat", {"X": images, "y": (np.arange(count) % 10 + 1)[:, None]})
    return folder


def write_lsun(folder, count: int = 5):
    for i in range(count):  # nested, as in the extracted archives
        write_rgb(folder / "LSUN_resize" / f"{i:04d}.jpg", np.full((36, 36, 3), 200, np.uint8))
    return folder


@pytest.fixture
def cifar10(tmp_path):
    return write_cifar10(tmp_path, per_class_train=2, per_class_test=1)  # 20 train, 10 test


def setup(root, ood_root, ood_dataset, **kwargs) -> OODDataModule:
    dm = OODDataModule(str(root), str(ood_root), ood_dataset, num_workers=0, batch_size=8, val_ratio=0.1, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("ood_dataset", "writer", "n_ood"), [
    ("svhn", lambda p: write_svhn(p / "svhn", 7), 7),
    ("lsun", lambda p: write_lsun(p / "lsun", 5), 5),
    ("cifar100", lambda p: write_cifar100(p, n_train=40, n_test=30), 30),
])  # fmt: skip
def test_test_set_is_cifar10_test_against_the_other_set(tmp_path, cifar10, ood_dataset, writer, n_ood):
    dm = setup(cifar10, writer(tmp_path), ood_dataset)
    assert (dm.category, dm.has_masks, dm.image_size) == (f"cifar10_{ood_dataset}", False, (32, 32))
    assert len(dm.train_set) + len(dm.val_set) == 20  # every CIFAR-10 class is normal
    assert {s.label for s in dm.train_set.samples + dm.val_set.samples} == {0}
    batches = list(dm.test_dataloader())
    labels = torch.cat([b.label for b in batches])
    paths = [p for b in batches for p in b.path]
    assert len(labels) == 10 + n_ood and int(labels.sum()) == n_ood
    assert all((label == 0) == ("test_batch" in path) for label, path in zip(labels.tolist(), paths, strict=True))
    assert all(b.mask is None and b.image.shape[1:] == (3, 32, 32) for b in batches)
    # CIFAR-10 images keep their class (for a linear probe), out-of-distribution images get -1.
    targets = torch.cat([b.target for b in batches])
    assert ((targets >= 0) == (labels == 0)).all() and set(targets[labels == 1].tolist()) <= {-1}


def test_svhn_images_are_read_in_order_and_upright(tmp_path, cifar10):
    dm = setup(cifar10, write_svhn(tmp_path / "svhn", 7), "svhn", mean=[0] * 3, std=[1] * 3)
    svhn = [s for s in dm.test_set.samples if s.label == 1]
    assert [int(s.pixels[0, 0, 0]) for s in svhn] == [10 * i for i in range(7)]
    image = dm.test_set[len(dm.test_set) - 1]["image"]
    assert torch.allclose(image[0], torch.full((32, 32), 60 / 255), atol=1e-6)
    assert torch.allclose(image[2], (8 * torch.arange(32.0) / 255).expand(32, 32), atol=1e-6)  # columns stay columns


def test_missing_ood_data_names_the_path_layout_and_source(tmp_path, cifar10):
    with pytest.raises(DataError, match=r"test_32x32.mat not found .*ufldl.stanford.edu.*data.ood_root="):
        setup(cifar10, tmp_path / "svhn", "svhn")
    with pytest.raises(DataError, match=r"LSUN folder .* not found .*LSUN_resize"):
        setup(cifar10, tmp_path / "lsun", "lsun")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        setup(cifar10, tmp_path / "empty", "lsun")
    with pytest.raises(ConfigError, match="ood_dataset='imagenet' is unknown"):
        OODDataModule(str(cifar10), str(tmp_path), "imagenet")


def test_ood_is_one_class_only(tmp_path, cifar10):
    with pytest.raises(ConfigError, match="needs labelled anomalies"):
        setup(cifar10, write_lsun(tmp_path / "lsun"), "lsun", anomaly_ratio=0.05)


@pytest.mark.parametrize("option", ["svhn", "lsun", "cifar100"])
def test_configs_point_at_the_data_root_subfolders(tmp_path, option):
    cfg = compose_config("train", [f"data=ood/cifar10_{option}", f"paths.data_root={tmp_path}"])
    dm = instantiate(cfg.data)
    folder = {"svhn": "svhn", "lsun": "lsun", "cifar100": "cifar-100-python"}[option]
    assert dm.root == tmp_path / "cifar-10-batches-py" and dm.ood_root == tmp_path / folder


@pytest.mark.parametrize(("label_set", "classes"), [("coarse", 20), ("fine", 100)])
def test_cifar100_in_distribution_keeps_its_classes_against_cifar10(tmp_path, cifar10, label_set, classes):
    """All of CIFAR-100 trains with its classes in `target` (Table 4(a)'s CIFAR-100 column needs them)."""
    cifar100 = write_cifar100(tmp_path, n_train=200, n_test=30)
    dm = OODDataModule(str(cifar100), str(cifar10), "cifar10", in_dataset="cifar100", label_set=label_set,
                       num_workers=0, batch_size=8, val_ratio=0)
    dm.setup("fit")
    assert dm.category == "cifar100_cifar10" and len(dm.train_set) == 200
    assert sorted({s.target for s in dm.train_set.samples}) == list(range(classes))
    test = dm.test_set.samples
    assert sum(s.label == 1 for s in test) == 10 and all(("test_batch" in str(s.image_path)) == (s.label == 1) for s in test)
    with pytest.raises(ConfigError, match="ood_dataset='cifar100' is unknown against cifar100"):
        OODDataModule(str(cifar100), str(cifar10), "cifar100", in_dataset="cifar100")


def test_cifar100_config_points_at_both_folders(tmp_path):
    dm = instantiate(compose_config("train", ["data=ood/cifar100_cifar10", f"paths.data_root={tmp_path}"]).data)
    assert (dm.root, dm.ood_root, dm.in_dataset) == (tmp_path / "cifar-100-python", tmp_path / "cifar-10-batches-py", "cifar100")
