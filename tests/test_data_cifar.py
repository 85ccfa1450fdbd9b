"""CIFAR-10/100 one-vs-all: pickles read as torchvision reads them, class splits and labels, bad input,
the real (cut short) pickles of ../shared/data, and PaDiM end to end on data=cifar10."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_lab.data import CIFAR10DataModule, CIFAR100DataModule
from anomaly_lab.data.cifar import read_cifar_pickle
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.run import train
from tests.helpers import SHARED_DATA, compose_config

CIFAR10_REAL = SHARED_DATA / "cifar-10-batches-py"
CIFAR100_REAL = SHARED_DATA / "cifar-100-python"


def cifar_image(target: int, index: int) -> np.ndarray:
    """RGB [32, 32, 3]: red = 20 * class, green = index, blue = 8 * column (to catch a transposition)."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0], image[..., 1] = 20 * (target % 12), index % 256
    image[..., 2] = (np.arange(32) * 8)[None, :]
    return image


def write_pickle(path: Path, targets: list[int], label_keys: tuple[str, ...], start: int = 0) -> None:
    """A CIFAR pickle: `data` rows of 3072 bytes (R plane, G plane, B plane), one label list per key."""
    images = np.stack([cifar_image(t, start + i) for i, t in enumerate(targets)])
    entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(targets), -1), "filenames": [f"{i}.png" for i in targets]}
    entry.update({key: list(targets) for key in label_keys})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entry, protocol=2))


def write_cifar10(root: Path, per_class_train: int = 3, per_class_test: int = 2) -> Path:
    """`root/cifar-10-batches-py` with five training batches and a test batch, classes cycling 0-9."""
    folder = root / "cifar-10-batches-py"
    train_targets = [c for _ in range(per_class_train) for c in range(10)]
    for b in range(5):  # spread the training images over the five batches
        write_pickle(folder / f"data_batch_{b + 1}", train_targets[b::5], ("labels",), start=100 * b)
    write_pickle(folder / "test_batch", [c for _ in range(per_class_test) for c in range(10)], ("labels",), start=1000)
    return folder


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """`root/cifar-100-python`: fine class i % 100, superclass i % 20 (keys fine_labels, coarse_labels)."""
    folder = root / "cifar-100-python"
    for name, count in (("train", n_train), ("test", n_test)):
        images = np.stack([cifar_image(i % 20, i) for i in range(count)])
        entry = {
            "data": images.transpose(0, 3, 1, 2).reshape(count, -1),
            "fine_labels": [i % 100 for i in range(count)],
            "coarse_labels": [i % 20 for i in range(count)],
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return folder


def setup(dm):
    dm.setup("fit")
    return dm


def test_pickle_rows_become_rgb_images_as_torchvision_reads_them(tmp_path):
    write_pickle(tmp_path / "batch", [4, 7], ("labels",))
    images, labels = read_cifar_pickle(tmp_path / "batch", "labels")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and labels == [4, 7]
    assert np.array_equal(images[1], cifar_image(7, 1))


def test_one_class_training_and_the_whole_test_set_labelled_by_class(tmp_path):
    root = write_cifar10(tmp_path, per_class_train=10, per_class_test=2)
    dm = setup(CIFAR10DataModule(str(root), normal_class=3, val_ratio=0.2, num_workers=0, batch_size=7))
    assert (dm.dataset_name, dm.category, dm.has_masks, dm.image_size) == ("cifar10", "cifar10", False, (32, 32))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 20)
    for split in (dm.train_set, dm.val_set, dm.normal_set):
        assert {s.target for s in split.samples} == {3} and {s.label for s in split.samples} == {0}
    batches = list(dm.test_dataloader())
    labels, targets = torch.cat([b.label for b in batches]), torch.cat([b.target for b in batches])
    assert torch.equal(labels, (targets != 3).long()) and sorted(targets.tolist()) == sorted(list(range(10)) * 2)
    assert all(b.mask is None and b.image.shape[1:] == (3, 32, 32) for b in batches)
    train_paths = {p for b in dm.train_dataloader() for p in b.path}
    assert all("test_batch" not in p for p in train_paths)
    assert not train_paths & {p for b in batches for p in b.path}


def test_images_reach_the_batch_unchanged_up_to_normalisation(tmp_path):
    dm = setup(CIFAR10DataModule(str(write_cifar10(tmp_path)), normal_class=5, num_workers=0, mean=[0] * 3, std=[1] * 3))
    batch = next(iter(dm.test_dataloader()))
    index = int(batch.path[0].rsplit("/", 1)[1])
    expected = torch.from_numpy(cifar_image(int(batch.target[0]), 1000 + index)).permute(2, 0, 1).float() / 255
    assert torch.allclose(batch.image[0], expected, atol=1e-6)


def test_cifar100_superclasses_by_default_and_fine_classes_on_request(tmp_path):
    root = write_cifar100(tmp_path)
    coarse = setup(CIFAR100DataModule(str(root), normal_class=19, num_workers=0, val_ratio=0.2))
    assert coarse.num_classes == 20 and {s.target for s in coarse.normal_set.samples} == {19}
    assert len(coarse.train_set) + len(coarse.val_set) == 10 and sum(s.label == 0 for s in coarse.test_set.samples) == 5
    fine = setup(CIFAR100DataModule(str(root), normal_class=99, label_set="fine", num_workers=0, val_ratio=0.5))
    assert fine.num_classes == 100 and len(fine.train_set) + len(fine.val_set) == 2
    assert sum(s.label == 0 for s in fine.test_set.samples) == 1
    with pytest.raises(ConfigError, match="label_set"):
        CIFAR100DataModule(str(root), label_set="medium")
    with pytest.raises(ConfigError, match=r"normal_class=20 .*\[0, 20\)"):
        CIFAR100DataModule(str(root), normal_class=20)


@pytest.mark.parametrize("normal_class", [-1, 10, 2.5, "cat"])
def test_normal_class_outside_the_classes_is_a_config_error(tmp_path, normal_class):
    with pytest.raises(ConfigError, match=r"data.normal_class=.*\[0, 10\)"):
        CIFAR10DataModule(str(tmp_path), normal_class=normal_class)


def test_missing_pickle_names_the_file_the_layout_and_the_source(tmp_path):
    root = write_cifar10(tmp_path)
    (root / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 not found .*test_batch.*www.cs.toronto.edu/~kriz/cifar.html"):
        setup(CIFAR10DataModule(str(root), num_workers=0))
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR pickle .*test_batch"):
        read_cifar_pickle(root / "test_batch", "labels")


def test_download_without_internet_fails_with_one_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = CIFAR10DataModule(str(tmp_path / "cifar-10-batches-py"), download=True)
    with pytest.raises(DataError, match=r"could not download CIFAR10 into .*Without internet, download it from https://"):
        dm.prepare_data()
    with pytest.raises(ConfigError, match="to end in cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path / "elsewhere"), download=True).prepare_data()


@pytest.mark.skipif(not CIFAR10_REAL.is_dir(), reason="../shared/data/cifar-10-batches-py not here")
def test_real_cifar10_pickles_split_by_class():
    dm = setup(CIFAR10DataModule(str(CIFAR10_REAL), normal_class=3, num_workers=0))
    train, test = dm.class_samples()
    assert len(train) == 5 * 1017 and len(test) == 1017  # the shared pickles are cut to 1,017 images each
    normals = [s for s in train if s.target == 3]
    assert len(dm.train_set) + len(dm.val_set) == len(normals)
    assert sum(s.label for s in dm.test_set.samples) == sum(s.target != 3 for s in test)


@pytest.mark.skipif(not CIFAR100_REAL.is_dir(), reason="../shared/data/cifar-100-python not here")
def test_real_cifar100_pickles_have_20_superclasses_and_100_classes():
    dm = CIFAR100DataModule(str(CIFAR100_REAL), num_workers=0)
    train, test = dm.class_samples()
    assert (len(train), len(test)) == (486, 916)
    assert {s.target for s in test} == set(range(20))
    fine = CIFAR100DataModule(str(CIFAR100_REAL), label_set="fine").class_samples()[1]
    assert max(s.target for s in fine) == 99 and len({s.target for s in fine}) > 20


@pytest.mark.skipif(not CIFAR10_REAL.is_dir(), reason="../shared/data/cifar-10-batches-py not here")
def test_padim_runs_end_to_end_on_real_cifar10_and_logs_its_auroc(tmp_path):
    cfg = compose_config(
        "train",
        ["data=cifar10", "data.normal_class=1", f"paths.data_root={SHARED_DATA}", "data.num_workers=0",
         "data.batch_size=64", "callbacks=none", "logger=csv",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
        output_dir=tmp_path,
    )
    metrics = train(cfg)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["data"] == "cifar10" and record["category"] == "cifar10"
    assert set(record["metrics"]) == {"image_auroc", "image_ap", "image_f1"}  # no masks: image metrics only
    assert 0 <= record["metrics"]["image_auroc"] <= 1 and metrics["image_auroc"] == pytest.approx(record["metrics"]["image_auroc"])
    assert record["test_images"] == 1017
