"""The semi-supervised setting shared by every dataset: gamma gives the right count of labelled
anomalies, drawn reproducibly with the seed, whose labels reach the Batch, while validation and the
normal statistics stay normal-only; and the one-vs-all split itself."""

from __future__ import annotations

import pytest
import torch

from anomaly_lab.data import CIFAR10DataModule, MVTecDataModule
from anomaly_lab.data.datamodule import draw_labelled_anomalies, labelled_anomaly_count
from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.one_vs_all import one_vs_all_split
from anomaly_lab.errors import ConfigError, DataError
from tests.helpers import compose_config
from tests.test_data_cifar import write_cifar10


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar10(tmp_path, per_class_train=40, per_class_test=2)  # 40 normals, 360 candidate anomalies


def datamodule(root, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(str(root), **{"normal_class": 2, "num_workers": 0, "batch_size": 16, **kwargs})
    dm.setup("fit")
    return dm


def drawn(dm) -> list[str]:
    return [str(s.image_path) for s in dm.train_set.samples if s.label == 1]


def test_one_vs_all_split_labels_by_class():
    train = [Sample(f"train/{i}", 0, target=i % 3) for i in range(9)]
    test = [Sample(f"test/{i}", 0, target=i % 3) for i in range(6)]
    split = one_vs_all_split(train, test, normal_class=1)
    assert [s.target for s in split.normals] == [1, 1, 1] and {s.label for s in split.normals} == {0}
    assert len(split.anomaly_pool) == 6 and {(s.label, s.target != 1) for s in split.anomaly_pool} == {(1, True)}
    assert [s.label for s in split.test] == [int(s.target != 1) for s in split.test] == [1, 0, 1, 1, 0, 1]
    assert split.validation is None
    with pytest.raises(DataError, match="no training image of normal class 5"):
        one_vs_all_split(train, test, normal_class=5)


@pytest.mark.parametrize("gamma", [0.01, 0.05, 0.1, 0.5])
def test_count_makes_gamma_the_fraction_of_the_training_set(gamma):
    for n_normal in (36, 450, 5000):
        n = labelled_anomaly_count(n_normal, gamma)
        assert abs(n / (n + n_normal) - gamma) <= 1 / (n + n_normal)
    assert labelled_anomaly_count(100, 0.0) == 0


def test_a_positive_gamma_gives_at_least_one_labelled_anomaly():
    """CUB-200 has about 50 training images a class: gamma = 0.01 rounds to 0.5 anomalies, which must
    become 1, not a silently one-class run."""
    assert labelled_anomaly_count(50, 0.01) == 1
    assert labelled_anomaly_count(30, 0.01) == 1


def test_gamma_zero_is_one_class(cifar_root):
    dm = datamodule(cifar_root)
    assert drawn(dm) == [] and len(dm.train_set) == 36


def test_labelled_anomalies_join_training_with_their_labels_in_the_batch(cifar_root):
    dm = datamodule(cifar_root, anomaly_ratio=0.1, val_ratio=0.1, seed=1)
    normals = [s for s in dm.train_set.samples if s.label == 0]
    assert len(normals) == 36 and len(drawn(dm)) == labelled_anomaly_count(36, 0.1) == 4
    assert all(s.target != 2 for s in dm.train_set.samples if s.label == 1)
    assert all("data_batch" in p for p in drawn(dm))  # from the other classes' *training* images
    batches = list(dm.train_dataloader())
    labels, targets = torch.cat([b.label for b in batches]), torch.cat([b.target for b in batches])
    assert int(labels.sum()) == 4 and torch.equal(labels, (targets != 2).long())
    # thresholds and normal statistics see normal images only
    for loader in (dm.val_dataloader(), dm.normal_dataloader()):
        assert all(int(b.label.sum()) == 0 and set(b.target.tolist()) == {2} for b in loader)
    assert len(dm.normal_set) == 36


def test_draw_is_reproducible_with_the_seed_and_sample_seed_varies_it(cifar_root):
    first = drawn(datamodule(cifar_root, anomaly_ratio=0.3, seed=0))
    assert len(first) == 15 and first == drawn(datamodule(cifar_root, anomaly_ratio=0.3, seed=0))
    assert first != drawn(datamodule(cifar_root, anomaly_ratio=0.3, seed=1))
    other = drawn(datamodule(cifar_root, anomaly_ratio=0.3, seed=0, sample_seed=7))
    assert other != first and len(other) == 15
    assert other == drawn(datamodule(cifar_root, anomaly_ratio=0.3, seed=3, sample_seed=7))
    # the validation holdout follows `seed` alone, whatever the drawn subset
    holdout = [str(s.image_path) for s in datamodule(cifar_root, anomaly_ratio=0.3, seed=0).val_set.samples]
    assert holdout == [str(s.image_path) for s in datamodule(cifar_root, anomaly_ratio=0.3, seed=0, sample_seed=7).val_set.samples]


def test_draw_without_replacement_and_too_few_candidates():
    pool = [Sample(f"p/{i}", 1) for i in range(10)]
    picked = draw_labelled_anomalies(pool, 10, seed=0)
    assert sorted(str(s.image_path) for s in picked) == sorted(str(s.image_path) for s in pool)
    with pytest.raises(DataError, match="asks for 11 labelled anomalies but only 10"):
        draw_labelled_anomalies(pool, 11, seed=0)


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_gamma_outside_0_1_is_a_config_error(cifar_root, gamma):
    with pytest.raises(ConfigError, match=r"data.anomaly_ratio=.* must be in \[0, 1\)"):
        CIFAR10DataModule(str(cifar_root), anomaly_ratio=gamma)


def test_gamma_on_a_dataset_without_labelled_anomalies_is_a_config_error(make_mvtec_tree):
    dm = MVTecDataModule(str(make_mvtec_tree()), "widget", image_size=16, anomaly_ratio=0.05)
    with pytest.raises(ConfigError, match="needs labelled anomalies for training.*mvtec/widget has none"):
        dm.setup()


def test_configs_expose_gamma_sample_seed_and_normal_class(tmp_path):
    cfg = compose_config("train", ["data=cifar10", "data.normal_class=7", "data.anomaly_ratio=0.05", "seed=4"])
    assert (cfg.data.normal_class, cfg.data.anomaly_ratio, cfg.data.sample_seed, cfg.data.seed) == (7, 0.05, 4, 4)
    assert compose_config("train", ["data=cifar100"]).data.label_set == "coarse"
    assert compose_config("train", ["data=cub200"]).data.crop_to_box is False
