"""WMCA (George et al. 2019), face presentation-attack detection, in the cross-type protocol of
AnoMem's Table 3 (Sec. 4.1, "intra-dataset cross-type").

Bona fide faces are normal, presentation attacks anomalous. With `category` = pp (paper print), sr
(screen replay), pm (paper mask) or fm (flexible mask), that attack type is unseen in training and
present in test; in the semi-supervised setting (`anomaly_ratio` > 0) labelled anomalies are drawn
from the frames of the other attack types' training videos. `category` = all is the one-class
column: trained on bona fide faces only, tested against every attack type.

Idiap publishes WMCA as one HDF5 file per video; this module reads the extracted layout that
``python -m anomaly_lab.data.wmca_extract`` writes from them:

    <root>/protocol.csv                     header `video_id,split,attack_type`, one row per video;
                                            split: train | dev | test; attack_type: bonafide, pp, sr,
                                            pm, fm, or another WMCA type (kept as labelled-anomaly
                                            candidates, tested only with category all or
                                            test_all_attacks)
    <root>/frames/<video_id>/<frame>.png    the video's frames (face crops)

Every frame is one sample. The validation normals are the frames of the dev split's bona fide videos
(so that no video lends frames to both training and validation); without dev bona fide videos, the
usual holdout of the training frames. The paper does not say whether the test set holds only the
unseen type besides bona fide faces (as in WMCA's leave-one-out protocols, the default) or every
attack type (`test_all_attacks=True`).
"""

from __future__ import annotations

import csv

from anomaly_lab.data.datamodule import AnomalyDataModule, SampleSplit
from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.layout import require_images
from anomaly_lab.data.one_vs_all import require_file
from anomaly_lab.errors import ConfigError, DataError

WMCA_URL = "https://www.idiap.ch/en/dataset/wmca"
WMCA_LAYOUT = (
    "<root>/protocol.csv (video_id,split,attack_type; split train|dev|test; attack_type bonafide|pp|sr|pm|fm|...) "
    "and <root>/frames/<video_id>/*.png, as written by python -m anomaly_lab.data.wmca_extract <hdf5 dir> <root>"
)
BONAFIDE = "bonafide"
ATTACK_TYPES = {"pp": "paper print", "sr": "screen replay", "pm": "paper mask", "fm": "flexible mask"}
WMCA_PROTOCOLS = ("all", *ATTACK_TYPES)
SPLITS = ("train", "dev", "test")


def read_protocol(root) -> list[dict[str, str]]:
    """The rows of `<root>/protocol.csv`, checked."""
    path = require_file(root / "protocol.csv", "WMCA", WMCA_LAYOUT, WMCA_URL, "wmca")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not {"video_id", "split", "attack_type"} <= set(reader.fieldnames):
            raise DataError(f"{path} must have the header video_id,split,attack_type (found {reader.fieldnames})")
        rows = list(reader)
    for number, row in enumerate(rows, 2):
        if row["split"] not in SPLITS or not row["video_id"] or not row["attack_type"]:
            raise DataError(f"{path}, line {number}: {row} needs a video_id, a split in {SPLITS} and an attack_type")
    return rows


class WMCADataModule(AnomalyDataModule):
    """WMCA cross-type: `category` names the unseen attack type (pp, sr, pm, fm) or all (one-class).

    Takes the arguments of :class:`AnomalyDataModule` plus `test_all_attacks`.
    """

    dataset_name = "wmca"
    has_masks = False

    def __init__(self, root: str, category: str = "all", image_size=128, *, test_all_attacks: bool = False, **kwargs):
        if category not in WMCA_PROTOCOLS:
            raise ConfigError(
                f"WMCA attack type {category!r} is unknown: choose one of "
                + ", ".join(f"{k} ({v})" for k, v in ATTACK_TYPES.items())
                + ", or all (one-class, every attack type unseen)"
            )
        super().__init__(root, category, image_size, **kwargs)
        if category == "all" and self.anomaly_ratio > 0:
            raise ConfigError(
                f"data.anomaly_ratio={self.anomaly_ratio}: wmca/all is the one-class protocol (every attack type "
                "unseen, none to label in training); use wmca/pp|sr|pm|fm for the semi-supervised setting"
            )
        self.test_all_attacks = test_all_attacks

    def _frames(self, video_id: str, label: int) -> list[Sample]:
        return [Sample(p, label) for p in require_images(self.root / "frames" / video_id, WMCA_LAYOUT)]

    def find_samples(self) -> SampleSplit:
        normals, validation, test, pool = [], [], [], []
        for row in read_protocol(self.root):
            split, attack, video = row["split"], row["attack_type"], row["video_id"]
            unseen = self.category == "all" or attack == self.category
            if attack == BONAFIDE:
                {"train": normals, "dev": validation, "test": test}[split].extend(self._frames(video, 0))
            elif split == "test" and (unseen or self.test_all_attacks):
                test.extend(self._frames(video, 1))
            elif split == "train" and not unseen:
                pool.extend(self._frames(video, 1))
        if not normals:
            raise DataError(f"{self.root / 'protocol.csv'} lists no bona fide video in the train split")
        return SampleSplit(normals, test, pool, validation or None)
