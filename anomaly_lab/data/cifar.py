"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from their original python pickles, one-vs-all.

The pickles are read as torchvision reads them (``pickle.load(f, encoding="latin1")``, rows of 3072
bytes: 1024 red, 1024 green, 1024 blue, row-major 32x32); the images stay in memory.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.one_vs_all import OneVsAllDataModule, require_file, torchvision_download
from anomaly_lab.errors import ConfigError, DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER, CIFAR100_FOLDER = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_LAYOUT = f"<root>/data_batch_1..5 and <root>/test_batch, root = the {CIFAR10_FOLDER} folder of cifar-10-python.tar.gz"
CIFAR100_LAYOUT = f"<root>/train and <root>/test, root = the {CIFAR100_FOLDER} folder of cifar-100-python.tar.gz"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_LABEL_KEYS = {"coarse": "coarse_labels", "fine": "fine_labels"}  # 20 superclasses, 100 classes


def read_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    """(RGB uint8 images [N, 32, 32, 3], labels) of one CIFAR pickle file."""
    try:
        with open(path, "rb") as file:
            entry = pickle.load(file, encoding="latin1")
        data, labels = entry["data"], entry[label_key]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as error:
        raise DataError(f"cannot read CIFAR pickle {path} (expected keys 'data' and '{label_key}'): {error!r}") from error
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if len(images) != len(labels):
        raise DataError(f"CIFAR pickle {path} holds {len(images)} images but {len(labels)} labels")
    return images, [int(label) for label in labels]


def array_samples(images: np.ndarray, targets: list[int], source: Path, label: int = 0) -> list[Sample]:
    """In-memory samples; each is identified as `<source>/<index>`."""
    return [
        Sample(source / f"{i:05d}", label, target=target, pixels=image)
        for i, (image, target) in enumerate(zip(images, targets, strict=True))
    ]


def cifar10_samples(root: Path, split: str) -> list[Sample]:
    """Every CIFAR-10 image of `split` (train or test), its class (0-9) in `target`."""
    samples = []
    for name in CIFAR10_FILES[split]:
        path = require_file(root / name, "CIFAR-10", CIFAR10_LAYOUT, CIFAR_URL, CIFAR10_FOLDER)
        samples += array_samples(*read_cifar_pickle(path, "labels"), path)
    return samples


def cifar100_samples(root: Path, split: str, label_set: str = "coarse", option: str = "data.root") -> list[Sample]:
    """Every CIFAR-100 image of `split`, its superclass (coarse, 0-19) or class (fine, 0-99) in `target`;
    `option` names the setting that points at `root` in error messages."""
    path = require_file(root / split, "CIFAR-100", CIFAR100_LAYOUT, CIFAR_URL, CIFAR100_FOLDER, option)
    return array_samples(*read_cifar_pickle(path, CIFAR100_LABEL_KEYS[label_set]), path)


def download_cifar(root: Path, which: str) -> None:
    """Download and extract CIFAR-10 or CIFAR-100 with torchvision so that `root` holds the pickles."""
    from torchvision import datasets

    folder = CIFAR10_FOLDER if which == "cifar10" else CIFAR100_FOLDER
    if root.name != folder:
        raise ConfigError(f"data.download=true needs data.root to end in {folder} (torchvision's folder), got {root}")
    make = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    torchvision_download(lambda: make(str(root.parent), download=True), which.upper(), root.parent, CIFAR_URL)


class CIFAR10DataModule(OneVsAllDataModule):
    """CIFAR-10 one-vs-all: `normal_class` in 0-9 (airplane, automobile, bird, cat, deer, dog, frog,
    horse, ship, truck); `root` is the `cifar-10-batches-py` folder. `download=True` fetches it with
    torchvision when a pickle is missing (needs internet)."""

    dataset_name = "cifar10"

    def __init__(self, root: str, category: str = "cifar10", normal_class: int = 0, *, download: bool = False, **kwargs):
        super().__init__(root, category, normal_class, **kwargs)
        self.download = download

    @property
    def num_classes(self) -> int:
        return 10

    def prepare_data(self) -> None:
        if self.download and not all((self.root / n).is_file() for names in CIFAR10_FILES.values() for n in names):
            download_cifar(self.root, "cifar10")

    def class_samples(self) -> tuple[list[Sample], list[Sample]]:
        return cifar10_samples(self.root, "train"), cifar10_samples(self.root, "test")


class CIFAR100DataModule(OneVsAllDataModule):
    """CIFAR-100 one-vs-all: `label_set` coarse (default: the 20 superclasses, `normal_class` in 0-19) or
    fine (the 100 classes, 0-99); `root` is the `cifar-100-python` folder. `download=True` as for CIFAR-10."""

    dataset_name = "cifar100"

    def __init__(
        self,
        root: str,
        category: str = "cifar100",
        normal_class: int = 0,
        *,
        label_set: str = "coarse",
        download: bool = False,
        **kwargs,
    ):
        if label_set not in CIFAR100_LABEL_KEYS:
            raise ConfigError(f"data.label_set={label_set!r} must be coarse (20 superclasses) or fine (100 classes)")
        self.label_set = label_set
        super().__init__(root, category, normal_class, **kwargs)
        self.download = download

    @property
    def num_classes(self) -> int:
        return 20 if self.label_set == "coarse" else 100

    def prepare_data(self) -> None:
        if self.download and not all((self.root / n).is_file() for n in ("train", "test")):
            download_cifar(self.root, "cifar100")

    def class_samples(self) -> tuple[list[Sample], list[Sample]]:
        return (
            cifar100_samples(self.root, "train", self.label_set),
            cifar100_samples(self.root, "test", self.label_set),
        )
