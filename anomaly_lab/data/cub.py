"""CUB-200-2011 (Wah et al. 2011): 200 bird species, one-vs-all on the official train/test split."""

from __future__ import annotations

from pathlib import Path

from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.one_vs_all import OneVsAllDataModule, require_file
from anomaly_lab.errors import DataError

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CUB_LAYOUT = (
    "<root>/images/<NNN.Name>/*.jpg, <root>/images.txt (<id> <NNN.Name>/<file>), "
    "<root>/image_class_labels.txt (<id> <class 1-200>), <root>/train_test_split.txt (<id> <1 train|0 test>), "
    "<root>/bounding_boxes.txt (<id> <x> <y> <width> <height>, for crop_to_box); root = CUB_200_2011"
)


def read_table(root: Path, name: str) -> dict[int, list[str]]:
    """A CUB metadata file `<id> <field> ...` as {id: [fields]}."""
    path = require_file(root / name, "CUB-200-2011", CUB_LAYOUT, CUB_URL, "cub/CUB_200_2011")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            table[int(fields[0])] = fields[1:]
        except (ValueError, IndexError):
            raise DataError(f"{path}, line {number}: {line!r} is not '<image id> <value> ...' (expected {CUB_LAYOUT})") from None
    return table


def cub_samples(root: Path, crop_to_box: bool = False) -> tuple[list[Sample], list[Sample]]:
    """(training samples, test samples) with their class (0-based: file class - 1) in `target`, in
    images.txt order; with `crop_to_box`, each sample is cut to its bounding box."""
    if not (root / "images").is_dir():
        raise DataError(
            f"CUB-200-2011 images folder {root / 'images'} not found (expected {CUB_LAYOUT}). CUB-200-2011 is "
            f"published at {CUB_URL}: extract CUB_200_2011.tgz and set data.root=<its CUB_200_2011 folder>"
        )
    images = read_table(root, "images.txt")
    classes = read_table(root, "image_class_labels.txt")
    is_train = read_table(root, "train_test_split.txt")
    boxes = read_table(root, "bounding_boxes.txt") if crop_to_box else {}
    train, test = [], []
    for image_id, (relative,) in images.items():
        if image_id not in classes or image_id not in is_train or (crop_to_box and image_id not in boxes):
            raise DataError(f"CUB-200-2011 image id {image_id} ({relative}) is missing from the metadata files of {root}")
        box = tuple(round(float(v)) for v in boxes[image_id]) if crop_to_box else None
        sample = Sample(root / "images" / relative, 0, target=int(classes[image_id][0]) - 1, box=box)
        (train if is_train[image_id][0] == "1" else test).append(sample)
    return train, test


class CUBDataModule(OneVsAllDataModule):
    """CUB-200-2011 one-vs-all: `normal_class` in 0-199 (the species `NNN` of images/ minus one);
    `root` is the `CUB_200_2011` folder. `crop_to_box` cuts every image to its bird's box
    (bounding_boxes.txt) before resizing; the paper does not say, so the default keeps whole images."""

    dataset_name = "cub200"

    def __init__(
        self, root: str, category: str = "cub200", normal_class: int = 0, *, crop_to_box: bool = False, **kwargs
    ):
        super().__init__(root, category, normal_class, **kwargs)
        self.crop_to_box = crop_to_box

    @property
    def num_classes(self) -> int:
        return 200

    def class_samples(self) -> tuple[list[Sample], list[Sample]]:
        return cub_samples(self.root, self.crop_to_box)
