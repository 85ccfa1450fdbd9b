"""Contrastive views from the datamodule: `train_views` augmented draws per training image, seeded per
image and epoch, only in the training loader."""

from __future__ import annotations

import albumentations as A
import pytest
import torch

from anomaly_lab.data import Batch, CIFAR10DataModule
from anomaly_lab.errors import ConfigError
from tests.test_data_cifar import write_cifar10

AUGMENT = [A.RandomResizedCrop(size=(32, 32), scale=(0.2, 1.0)), A.HorizontalFlip(p=0.5),
           A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0)]


def datamodule(root, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(str(root), **{"normal_class": 1, "num_workers": 0, "batch_size": 4, "seed": 3, **kwargs})
    dm.setup("fit")
    return dm


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar10(tmp_path, per_class_train=10, per_class_test=1)


def test_training_batches_carry_distinct_views_and_evaluation_batches_none(cifar_root):
    dm = datamodule(cifar_root, train_views=2, view_augmentations=AUGMENT)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.views.shape == (4, 2, 3, 32, 32) and batch.image.shape == (4, 3, 32, 32)
    assert not torch.equal(batch.views[:, 0], batch.views[:, 1])
    assert not torch.equal(batch.views[:, 0], batch.image)  # the image keeps the (empty) training augmentations
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.normal_dataloader()):
        assert next(iter(loader)).views is None
    assert next(iter(datamodule(cifar_root).train_dataloader())).views is None  # train_views=0: none


def test_views_depend_on_seed_and_epoch_only(cifar_root):
    def views(dm, epoch: int, num_workers: int = 0) -> torch.Tensor:
        dm.num_workers = num_workers
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b.views for b in loader])

    first = views(datamodule(cifar_root, train_views=2, view_augmentations=AUGMENT), 0)
    again = datamodule(cifar_root, train_views=2, view_augmentations=AUGMENT)
    assert torch.equal(first, views(again, 0))
    assert torch.equal(first, views(again, 0, num_workers=2))  # the same with loader workers
    assert not torch.equal(first, views(again, 1))
    other_seed = datamodule(cifar_root, train_views=2, view_augmentations=AUGMENT, seed=4)
    assert not torch.equal(first.sort(dim=0).values, views(other_seed, 0).sort(dim=0).values)


def test_views_need_augmentations(cifar_root):
    with pytest.raises(ConfigError, match="data.view_augmentations"):
        datamodule(cifar_root, train_views=2)
    with pytest.raises(ConfigError, match="data.train_views=-1"):
        datamodule(cifar_root, train_views=-1, view_augmentations=AUGMENT)
