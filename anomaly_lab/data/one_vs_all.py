"""The one-vs-all protocol (AnoMem, Sec. 4.1; FYD, CIFAR-10 appendix, after Golan and El-Yaniv 2018).

One class is normal, every other class anomalous: training holds the normal class's training images
only (plus, in the semi-supervised setting, labelled anomalies drawn from the other classes' training
images: `anomaly_ratio`, the paper's gamma), and the test set is the dataset's whole test split with
label 1 for every image outside the normal class. Sweeping `normal_class` over every class and
averaging gives the paper's number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from anomaly_lab.data.datamodule import AnomalyDataModule, SampleSplit
from anomaly_lab.data.dataset import Sample
from anomaly_lab.errors import ConfigError, DataError


def require_file(path: Path, dataset: str, layout: str, url: str, subfolder: str, option: str = "data.root") -> Path:
    """`path`, or a DataError naming it, the expected layout, where `dataset` is published and the
    option (`option`, or paths.data_root holding `subfolder`) that points at it."""
    if not path.is_file():
        raise DataError(
            f"{dataset} file {path} not found (expected {layout}). {dataset} is published at {url}: extract it "
            f"so that this file exists, then set {option}=<its folder> or paths.data_root=<a folder holding "
            f"{subfolder}/>"
        )
    return path


def torchvision_download(make: Callable[[], object], dataset: str, folder: Path, url: str) -> None:
    """Run a torchvision dataset constructor with download=True; without internet, one DataError."""
    try:
        make()
    except Exception as error:  # urllib, http and checksum errors differ across versions: all mean "not here"
        raise DataError(
            f"could not download {dataset} into {folder} ({type(error).__name__}: {error}). Without internet, "
            f"download it from {url}, extract it there and set data.download=false"
        ) from error


def one_vs_all_split(train: list[Sample], test: list[Sample], normal_class: int) -> SampleSplit:
    """Training images of `normal_class` (label 0), the other classes' training images as the pool of
    labelled anomalies (label 1), and every test image, labelled 1 unless of `normal_class`.

    Every sample must carry its class in `target`.
    """
    normals = [replace(s, label=0) for s in train if s.target == normal_class]
    if not normals:
        found = sorted({s.target for s in train})
        raise DataError(
            f"no training image of normal class {normal_class}; the training split holds classes {found}"
        )
    pool = [replace(s, label=1) for s in train if s.target != normal_class]
    labelled_test = [replace(s, label=int(s.target != normal_class)) for s in test]
    return SampleSplit(normals, labelled_test, pool)


class OneVsAllDataModule(AnomalyDataModule):
    """Base of the one-vs-all datasets: subclasses list every image with its class in `class_samples`.

    `normal_class` (0-based, in [0, `num_classes`)) is the normal class. The anomaly pool of the
    semi-supervised setting is the other classes' training images; the validation holdout is drawn
    from the normal class's training images only. No pixel ground truth: `mask` is None and only image
    metrics are computed. `Batch.target` holds each image's class.
    """

    has_masks = False

    def __init__(self, root: str, category: str, normal_class: int = 0, image_size=32, **kwargs):
        super().__init__(root, category, image_size, **kwargs)
        if isinstance(normal_class, bool) or not isinstance(normal_class, int) or not 0 <= normal_class < self.num_classes:
            raise ConfigError(
                f"data.normal_class={normal_class!r} must be an integer class index in [0, {self.num_classes}) "
                f"for {self.category}"
            )
        self.normal_class = normal_class

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def class_samples(self) -> tuple[list[Sample], list[Sample]]:
        """(training samples, test samples), each with its class index in `target`."""
        raise NotImplementedError

    def find_samples(self) -> SampleSplit:
        return one_vs_all_split(*self.class_samples(), self.normal_class)
