"""Out-of-distribution detection (AnoMem, Sec. 4.1 and Table 2): CIFAR-10 in-distribution against
SVHN, LSUN or CIFAR-100 (or CIFAR-100 against CIFAR-10).

Training: every training image of the in-distribution set (minus the validation holdout) is normal and
keeps its class. Test: its test set (label 0) and the whole test set of the other dataset (label 1).
No pixel ground truth. Training on every class of a dataset, with the classes kept, is also what the
linear evaluation of a representation needs (AnoMem Table 4(a), `model.linear_eval=true`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from anomaly_lab.data.cifar import (
    CIFAR10_FILES,
    CIFAR100_LABEL_KEYS,
    cifar10_samples,
    cifar100_samples,
    download_cifar,
)
from anomaly_lab.data.datamodule import AnomalyDataModule, SampleSplit
from anomaly_lab.data.dataset import IMAGE_EXTENSIONS, Sample
from anomaly_lab.data.one_vs_all import require_file, torchvision_download
from anomaly_lab.errors import ConfigError, DataError

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_LAYOUT = "<root>/test_32x32.mat (format 2, cropped digits: X [32, 32, 3, N] uint8, y [N, 1]), as torchvision's SVHN"
LSUN_URL = "https://github.com/facebookresearch/odin (LSUN_resize.tar.gz: the LSUN test set resized to 32x32)"
LSUN_LAYOUT = "<root>/**/*.jpg|png: a folder of images, e.g. the extracted LSUN_resize.tar.gz"
IN_DATASETS = ("cifar10", "cifar100")
OOD_DATASETS = ("svhn", "lsun", "cifar100", "cifar10")


def svhn_samples(root: Path) -> list[Sample]:
    """The SVHN test images (label 1) of torchvision's `test_32x32.mat`."""
    from scipy.io import loadmat

    path = require_file(root / "test_32x32.mat", "SVHN", SVHN_LAYOUT, SVHN_URL, "svhn", "data.ood_root")
    try:
        images = np.ascontiguousarray(loadmat(path)["X"].transpose(3, 0, 1, 2), dtype=np.uint8)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot read SVHN file {path} (expected {SVHN_LAYOUT}): {error!r}") from error
    return [Sample(path / f"{i:05d}", 1, pixels=image) for i, image in enumerate(images)]


def lsun_samples(root: Path) -> list[Sample]:
    """Every image file under `root` (any depth, sorted by path), label 1."""
    if not root.is_dir():
        raise DataError(
            f"LSUN folder {root} not found (expected {LSUN_LAYOUT}). The resized LSUN test set is published at "
            f"{LSUN_URL}: extract it and set data.ood_root=<that folder> or paths.data_root=<a folder holding lsun/>"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root} (expected {LSUN_LAYOUT})")
    return [Sample(p, 1) for p in files]


class OODDataModule(AnomalyDataModule):
    """`in_dataset` (cifar10 or cifar100; `root`: its cifar-10-batches-py or cifar-100-python folder)
    against `ood_dataset` (svhn, lsun, cifar100 or cifar10, read from `ood_root`: the folder holding
    test_32x32.mat, the LSUN image folder, cifar-100-python or cifar-10-batches-py). `label_set`: the
    classes CIFAR-100 keeps in `target` (coarse: 20 superclasses, fine: 100). `category` is
    `<in_dataset>_<ood_dataset>`. `download=True` fetches the CIFAR sets and a missing SVHN with
    torchvision (LSUN has no such download)."""

    dataset_name = "ood"
    has_masks = False

    def __init__(
        self, root: str, ood_root: str, ood_dataset: str = "svhn", image_size=32, *, in_dataset: str = "cifar10",
        label_set: str = "coarse", download: bool = False, **kwargs
    ):
        if in_dataset not in IN_DATASETS:
            raise ConfigError(f"data.in_dataset={in_dataset!r} is unknown: choose one of {', '.join(IN_DATASETS)}")
        if ood_dataset not in OOD_DATASETS or ood_dataset == in_dataset:
            others = ", ".join(name for name in OOD_DATASETS if name != in_dataset)
            raise ConfigError(f"data.ood_dataset={ood_dataset!r} is unknown against {in_dataset}: choose one of {others}")
        if label_set not in CIFAR100_LABEL_KEYS:
            raise ConfigError(f"data.label_set={label_set!r} must be coarse (20 superclasses) or fine (100 classes)")
        super().__init__(root, f"{in_dataset}_{ood_dataset}", image_size, **kwargs)
        self.in_dataset, self.ood_dataset, self.label_set = in_dataset, ood_dataset, label_set
        self.ood_root = Path(ood_root).expanduser()
        self.download = download

    def prepare_data(self) -> None:
        if not self.download:
            return
        cifar10_complete = all((self.root / n).is_file() for names in CIFAR10_FILES.values() for n in names)
        if self.in_dataset == "cifar10" and not cifar10_complete:
            download_cifar(self.root, "cifar10")
        if self.in_dataset == "cifar100" and not (self.root / "train").is_file():
            download_cifar(self.root, "cifar100")
        if self.ood_dataset == "cifar10" and not (self.ood_root / "test_batch").is_file():
            download_cifar(self.ood_root, "cifar10")
        if self.ood_dataset == "cifar100" and not (self.ood_root / "test").is_file():
            download_cifar(self.ood_root, "cifar100")
        elif self.ood_dataset == "svhn" and not (self.ood_root / "test_32x32.mat").is_file():
            from torchvision import datasets

            torchvision_download(
                lambda: datasets.SVHN(str(self.ood_root), split="test", download=True), "SVHN", self.ood_root, SVHN_URL
            )

    def ood_samples(self) -> list[Sample]:
        if self.ood_dataset == "svhn":
            return svhn_samples(self.ood_root)
        if self.ood_dataset == "lsun":
            return lsun_samples(self.ood_root)
        if self.ood_dataset == "cifar10":
            return cifar10_samples(self.ood_root, "test")
        return cifar100_samples(self.ood_root, "test", option="data.ood_root")

    def in_samples(self, split: str) -> list[Sample]:
        if self.in_dataset == "cifar10":
            return cifar10_samples(self.root, split)
        return cifar100_samples(self.root, split, self.label_set)

    def find_samples(self) -> SampleSplit:
        """In-distribution images are normal (label 0) and keep their class in `target` (a linear probe of
        the representation needs it); out-of-distribution images are anomalous (label 1), target -1."""
        out = [replace(s, label=1, target=-1) for s in self.ood_samples()]
        return SampleSplit(self.in_samples("train"), self.in_samples("test") + out)
