"""BTAD, the BeanTech Anomaly Detection dataset (Mishra et al. 2021): three industrial products."""

from __future__ import annotations

from anomaly_lab.data.datamodule import AnomalyDataModule
from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.layout import check_category_dir, find_mask, mask_index, require_images

BTAD_URL = "http://avires.dimi.uniud.it/papers/btad/btad.zip"
BTAD_CATEGORIES = ("01", "02", "03")
BTAD_LAYOUT = (
    "<root>/<NN>/train/ok/*.bmp|png, <root>/<NN>/test/ok/*, <root>/<NN>/test/ko/*, "
    "<root>/<NN>/ground_truth/ko/<image stem>.png|bmp"
)


class BTADDataModule(AnomalyDataModule):
    """BTAD layout: `root` holds the product folders 01, 02, 03 (BTech_Dataset_transformed in the archive).

    `test/ok` is normal (empty masks), `test/ko` anomalous; the mask of `test/ko/<stem>.<ext>` is
    `ground_truth/ko/<stem>.<png|bmp>` (or `<stem>_mask.*`), binarised (> 0).
    """

    dataset_name = "btad"
    has_masks = True

    def find_samples(self) -> tuple[list[Sample], list[Sample]]:
        category_dir = check_category_dir(self.root, self.category, "BTAD", BTAD_URL, BTAD_LAYOUT, "btad")
        normals = [Sample(p, 0) for p in require_images(category_dir / "train" / "ok", BTAD_LAYOUT)]
        test = [Sample(p, 0) for p in require_images(category_dir / "test" / "ok", BTAD_LAYOUT)]
        mask_dir = category_dir / "ground_truth" / "ko"
        masks = mask_index(mask_dir)
        for image in require_images(category_dir / "test" / "ko", BTAD_LAYOUT):
            test.append(Sample(image, 1, find_mask(masks, mask_dir, image, ("", "_mask")), defect="ko"))
        return normals, test
