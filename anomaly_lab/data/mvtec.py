"""MVTec AD (Bergmann et al. 2019): 15 categories of industrial objects and textures."""

from __future__ import annotations

from pathlib import Path

from anomaly_lab.data.datamodule import AnomalyDataModule
from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.layout import check_category_dir, find_mask, mask_index, require_images, require_subdirs

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_LAYOUT = (
    "<root>/<category>/train/good/*.png, <root>/<category>/test/<good|defect type>/*.png, "
    "<root>/<category>/ground_truth/<defect type>/<image name>_mask.png"
)


class MVTecDataModule(AnomalyDataModule):
    """MVTec AD layout: `root` holds the category folders.

    Test images in `test/good` are normal (empty masks); every other `test/<defect type>` folder is
    anomalous (label 1) with masks `ground_truth/<defect type>/<image stem>_mask.*`, binarised (> 0).
    """

    dataset_name = "mvtec"
    has_masks = True

    def find_samples(self) -> tuple[list[Sample], list[Sample]]:
        category_dir = check_category_dir(
            self.root, self.category, "MVTec AD", MVTEC_URL, MVTEC_LAYOUT, "mvtec"
        )
        return mvtec_samples(category_dir)


def mvtec_samples(category_dir: Path) -> tuple[list[Sample], list[Sample]]:
    """(training normals, test samples) of one category folder in MVTec layout (see `MVTecDataModule`)."""
    normals = [Sample(p, 0) for p in require_images(category_dir / "train" / "good", MVTEC_LAYOUT)]
    test = []
    for type_dir in require_subdirs(category_dir / "test", MVTEC_LAYOUT):
        images = require_images(type_dir, MVTEC_LAYOUT)
        if type_dir.name == "good":
            test += [Sample(p, 0) for p in images]
            continue
        mask_dir = category_dir / "ground_truth" / type_dir.name
        masks = mask_index(mask_dir)
        test += [Sample(p, 1, find_mask(masks, mask_dir, p, ("_mask",)), defect=type_dir.name) for p in images]
    return normals, test
