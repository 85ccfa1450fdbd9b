"""WMCA cross-type protocol on a generated look-alike tree: the unseen attack type never reaches
training, other attack types can be labelled anomalies, validation is the dev split's bona fide
faces; and the HDF5 extractor on small generated files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from anomaly_lab.data import WMCA_PROTOCOLS, WMCADataModule
from anomaly_lab.data.wmca_extract import extract, main
from anomaly_lab.errors import ConfigError, DataError
from tests.conftest import write_rgb
from tests.helpers import compose_config

FRAMES = 3  # per video
# (split, attack type) -> number of videos
VIDEOS = {
    ("train", "bonafide"): 3, ("dev", "bonafide"): 1, ("test", "bonafide"): 2,
    ("train", "pp"): 2, ("train", "sr"): 2, ("train", "pm"): 1, ("train", "fm"): 1, ("train", "glasses"): 1,
    ("test", "pp"): 1, ("test", "sr"): 1, ("test", "pm"): 2, ("test", "fm"): 1, ("test", "glasses"): 1,
}  # fmt: skip


def write_wmca(root: Path) -> Path:
    """`root/wmca`: protocol.csv + frames/<split>_<type>_<n>/<frame>.png."""
    folder = root / "wmca"
    rows = []
    for (split, attack), count in VIDEOS.items():
        for n in range(count):
            video = f"{split}_{attack}_{n}"
            rows.append([video, split, attack])
            for f in range(FRAMES):
                write_rgb(folder / "frames" / video / f"{f:03d}.png", np.full((20, 16, 3), 40 * f, np.uint8))
    with open(folder / "protocol.csv", "w", newline="") as file:
        csv.writer(file).writerows([["video_id", "split", "attack_type"], *rows])
    return folder


def setup(root, category, **kwargs) -> WMCADataModule:
    dm = WMCADataModule(str(root), category, **{"image_size": 16, "num_workers": 0, "batch_size": 8, **kwargs})
    dm.setup("fit")
    return dm


def video_types(samples) -> set[str]:
    return {Path(s.image_path).parent.name.split("_")[1] for s in samples}


def frames(split: str, attack: str) -> int:
    return VIDEOS.get((split, attack), 0) * FRAMES


@pytest.mark.parametrize("unseen", ["pp", "sr", "pm", "fm"])
def test_unseen_type_is_out_of_training_and_in_test(tmp_path, unseen):
    dm = setup(write_wmca(tmp_path), unseen, anomaly_ratio=0.5)
    assert (dm.dataset_name, dm.category, dm.has_masks) == ("wmca", unseen, False)
    training = dm.train_set.samples
    assert unseen not in video_types(training)
    assert video_types([s for s in training if s.label == 0]) == {"bonafide"}
    assert len([s for s in training if s.label == 1]) == frames("train", "bonafide")  # gamma 0.5: as many as normals
    assert all(Path(s.image_path).parent.name.startswith("train_") for s in training)
    test = dm.test_set.samples
    assert video_types(test) == {"bonafide", unseen}  # default: bona fide + the unseen type
    assert sum(s.label for s in test) == frames("test", unseen) and len(test) == frames("test", "bonafide") + frames("test", unseen)
    assert all(s.label == int(not Path(s.image_path).parent.name.startswith("test_bonafide")) for s in test)
    batch = next(iter(dm.test_dataloader()))
    assert batch.mask is None and batch.image.shape[1:] == (3, 16, 16)


def test_validation_is_the_dev_splits_bona_fide_faces(tmp_path):
    dm = setup(write_wmca(tmp_path), "pp")
    assert {Path(s.image_path).parent.name for s in dm.val_set.samples} == {"dev_bonafide_0"}
    assert len(dm.normal_set) == len(dm.train_set) == frames("train", "bonafide")
    assert all(int(b.label.sum()) == 0 for b in dm.val_dataloader())


def test_all_is_one_class_against_every_attack(tmp_path):
    root = write_wmca(tmp_path)
    dm = setup(root, "all")
    assert video_types(dm.train_set.samples) == {"bonafide"}
    assert video_types(dm.test_set.samples) == {"bonafide", "pp", "sr", "pm", "fm", "glasses"}
    with pytest.raises(ConfigError, match="wmca/all is the one-class protocol"):
        WMCADataModule(str(root), "all", anomaly_ratio=0.05)
    every = setup(root, "sr", test_all_attacks=True)
    assert video_types(every.test_set.samples) == video_types(dm.test_set.samples)
    assert "sr" not in video_types(every.train_set.samples)


def test_unknown_attack_type_and_bad_layouts(tmp_path):
    with pytest.raises(ConfigError, match="WMCA attack type 'print' is unknown: choose one of pp .paper print."):
        WMCADataModule(str(tmp_path), "print")
    with pytest.raises(DataError, match=r"protocol.csv not found .*frames/<video_id>.*wmca_extract.*idiap.ch"):
        setup(tmp_path / "nowhere", "pp")
    root = write_wmca(tmp_path)
    for png in (root / "frames" / "test_pp_0").iterdir():
        png.unlink()
    with pytest.raises(DataError, match="no images .* in .*test_pp_0"):
        setup(root, "pp")
    (root / "protocol.csv").write_text("video_id,split,attack_type\nv1,validation,bonafide\n")
    with pytest.raises(DataError, match="line 2: .*split in"):
        setup(root, "pp")


@pytest.mark.parametrize("option", WMCA_PROTOCOLS)
def test_configs_name_the_unseen_type(tmp_path, option):
    dm = instantiate(compose_config("train", [f"data=wmca/{option}", f"paths.data_root={tmp_path}"]).data)
    assert dm.category == option and dm.root == tmp_path / "wmca"


# the extractor


def write_hdf5_videos(folder: Path) -> None:
    """Two videos as WMCA stores them: top-level groups Frame_<n> with `array` [3, H, W] uint8
    (frame n filled with n in the red plane), 12 frames each; and protocol.csv (file,split,attack_type)."""
    h5py = pytest.importorskip("h5py")
    for name in ("face/v_bona.hdf5", "face/v_print.hdf5"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / name, "w") as file:
            for n in range(12):
                frame = np.zeros((3, 30, 40), np.uint8)
                frame[0], frame[2, 10:20, 5:15] = n, 255
                file.create_group(f"Frame_{n}").create_dataset("array", data=frame)
    (folder / "protocol.csv").write_text("file,split,attack_type\nface/v_bona.hdf5,train,bonafide\nface/v_print.hdf5,test,pp\n")


def test_extractor_writes_every_nth_colour_frame_and_the_protocol(tmp_path):
    write_hdf5_videos(tmp_path / "h5")
    count = extract(tmp_path / "h5", tmp_path / "out", every=5)
    assert count == 6  # frames 0, 5, 10 of each video
    assert sorted(p.name for p in (tmp_path / "out" / "frames" / "v_bona").iterdir()) == ["000.png", "005.png", "010.png"]
    import cv2

    image = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "frames" / "v_print" / "010.png")), cv2.COLOR_BGR2RGB)
    assert image.shape == (30, 40, 3) and image[0, 0, 0] == 10 and image[15, 10, 2] == 255  # channels first -> RGB
    rows = list(csv.DictReader(open(tmp_path / "out" / "protocol.csv")))
    assert rows == [{"video_id": "v_bona", "split": "train", "attack_type": "bonafide"},
                    {"video_id": "v_print", "split": "test", "attack_type": "pp"}]  # fmt: skip


def test_extractor_crops_to_face_boxes_and_its_output_loads(tmp_path):
    write_hdf5_videos(tmp_path / "h5")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,frame,left,top,width,height\n" + "".join(
        f"face/{v}.hdf5,{n},5,10,10,10\n" for v in ("v_bona", "v_print") for n in range(12)))
    assert main([str(tmp_path / "h5"), str(tmp_path / "wmca"), "--every", "3", "--boxes", str(boxes)]) == 0
    import cv2

    face = cv2.imread(str(tmp_path / "wmca" / "frames" / "v_bona" / "003.png"))
    assert face.shape == (10, 10, 3) and (face[..., 0] == 255).all()  # the blue square only
    split = WMCADataModule(str(tmp_path / "wmca"), "pp", image_size=8, num_workers=0).find_samples()
    assert len(split.normals) + len(split.validation or []) == 4 and sum(s.label for s in split.test) == 4
    assert all(s.image_path.is_file() for s in split.test)


def test_extractor_reports_a_missing_protocol(tmp_path, capsys):
    (tmp_path / "h5").mkdir()
    assert main([str(tmp_path / "h5"), str(tmp_path / "out")]) == 1
    assert "protocol.csv not found" in capsys.readouterr().err
