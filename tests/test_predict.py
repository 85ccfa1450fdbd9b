"""predict(cfg) and predict.py: scores, labels at the checkpoint's threshold, overlays and masks of new
images of any size and format, non-image files reported and skipped, nothing overwritten."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from anomaly_lab.deploy.predict import Preprocessing, output_names, predict
from anomaly_lab.errors import ConfigError, DataError
from anomaly_lab.run import load_weights, train, with_run_config
from tests.helpers import REPO, TINY_RUN, compose_config, synthetic_dir


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def ckpt(data_root, tmp_path_factory) -> Path:
    """A tiny PaDiM run (the default model) on synthetic textures."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config("train", [f"paths.data_root={data_root}", *TINY_RUN], output_dir=run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def folder(data_root, tmp_path_factory) -> Path:
    """Test images of the run's dataset as png, jpg (other size), grayscale bmp and tif, and a text file."""
    source = synthetic_dir(data_root) / "test"
    folder = tmp_path_factory.mktemp("images")
    shutil.copy(source / "good" / "000.png", folder / "good.png")
    shutil.copy(source / "scratch" / "000.png", folder / "scratch.png")
    defect = cv2.imread(str(source / "blob" / "000.png"))
    assert cv2.imwrite(str(folder / "blob_wide.jpg"), cv2.resize(defect, (150, 90)))
    (folder / "more").mkdir()
    assert cv2.imwrite(str(folder / "more" / "gray.bmp"), cv2.cvtColor(defect, cv2.COLOR_BGR2GRAY))
    assert cv2.imwrite(str(folder / "more" / "blob.tif"), defect)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_predict(ckpt: Path, output_dir: Path, *overrides: str):
    return predict(compose_config("predict", [f"ckpt_path={ckpt}", *overrides], output_dir=output_dir))


def checkpoint_state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_predict_scores_every_image_and_reports_the_non_image(ckpt, folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        predictions = run_predict(ckpt, tmp_path, f"input={folder}")
    images = ["blob_wide.jpg", "good.png", "more/blob.tif", "more/gray.bmp", "scratch.png"]
    assert [Path(p.path).relative_to(folder).as_posix() for p in predictions] == images
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and str(folder / "notes.txt") in skipped[0]
    with (tmp_path / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == [p.path for p in predictions]
    assert [float(row["image_score"]) for row in rows] == [p.image_score for p in predictions]
    # An overlay and a mask per image, at the original image's size; masks are binary.
    for name, image in zip(["blob_wide", "good", "more/blob", "more/gray", "scratch"], images, strict=True):
        height, width = cv2.imread(str(folder / image), cv2.IMREAD_UNCHANGED).shape[:2]
        overlay = cv2.imread(str(tmp_path / "overlays" / f"{name}.png"))
        mask = cv2.imread(str(tmp_path / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (height, width, 3) and mask.shape == (height, width)
        assert set(np.unique(mask)) <= {0, 255}
    # The anomalous image's mask marks pixels.
    assert (cv2.imread(str(tmp_path / "masks" / "scratch.png"), cv2.IMREAD_UNCHANGED) > 0).any()


def test_scores_are_those_of_the_run_evaluation(ckpt, data_root, tmp_path):
    """Images read by predict go through the run's eval transform: the scores equal the model's on the
    datamodule's test batches."""
    test_folder = synthetic_dir(data_root) / "test"
    predictions = {p.path: p.image_score for p in run_predict(ckpt, tmp_path, f"input={test_folder}")}
    cfg = with_run_config(compose_config("predict", [f"ckpt_path={ckpt}", f"paths.data_root={data_root}"]))
    datamodule, model = instantiate(cfg.data), load_weights(instantiate(cfg.model), ckpt).use_channels_last().eval()
    datamodule.setup("test")
    expected = {}
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            expected.update(zip(batch.path, model(batch.image).image_score.tolist(), strict=True))
    assert predictions.keys() == expected.keys()
    assert [predictions[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-5)


def test_labels_use_the_checkpoint_threshold_and_threshold_overrides_it(ckpt, folder, tmp_path):
    state = checkpoint_state(ckpt)
    stored = float(state["image_threshold"])
    assert np.isfinite(stored)
    predictions = run_predict(ckpt, tmp_path / "stored", f"input={folder}")
    assert [p.label for p in predictions] == [int(p.image_score > stored) for p in predictions]
    scores = sorted(p.image_score for p in predictions)
    middle = (scores[1] + scores[2]) / 2  # two images below, three above
    overridden = run_predict(ckpt, tmp_path / "override", f"input={folder}", f"threshold={middle}")
    assert [p.image_score for p in overridden] == [p.image_score for p in predictions]
    assert [p.label for p in overridden] == [int(p.image_score > middle) for p in predictions]
    assert sum(p.label for p in overridden) == 3


def test_masks_use_the_pixel_threshold(ckpt, folder, tmp_path):
    stored = float(checkpoint_state(ckpt)["pixel_threshold"])
    run_predict(ckpt, tmp_path / "low", f"input={folder / 'scratch.png'}", "pixel_threshold=-1")
    run_predict(ckpt, tmp_path / "stored", f"input={folder / 'scratch.png'}", f"pixel_threshold={stored}")
    run_predict(ckpt, tmp_path / "high", f"input={folder / 'scratch.png'}", "pixel_threshold=1e9")
    fractions = [(cv2.imread(str(tmp_path / run / "masks" / "scratch.png"), cv2.IMREAD_UNCHANGED) > 0).mean()
                 for run in ("low", "stored", "high")]
    assert fractions[0] == 1 and fractions[2] == 0 and 0 < fractions[1] < 1


def test_input_without_any_image_is_an_error(ckpt, tmp_path):
    empty = tmp_path / "texts"
    empty.mkdir()
    (empty / "a.txt").write_text("text")
    with pytest.raises(DataError, match="none of its 1 file"):
        run_predict(ckpt, tmp_path / "out", f"input={empty}")
    with pytest.raises(DataError, match="no such file or folder"):
        run_predict(ckpt, tmp_path / "out2", f"input={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="input=<image or folder> is missing"):
        run_predict(ckpt, tmp_path / "out3")


def test_existing_files_are_never_overwritten(ckpt, folder, tmp_path):
    (tmp_path / "predictions.csv").write_text("mine")
    with pytest.raises(ConfigError, match="predictions.csv exists"):
        run_predict(ckpt, tmp_path, f"input={folder}")
    assert (tmp_path / "predictions.csv").read_text() == "mine"
    assert not (tmp_path / "overlays").exists()


def test_maps_are_brought_back_through_the_centre_crop():
    preprocessing = Preprocessing(resize=(100, 100), crop=(50, 50), mean=(0.0,), std=(1.0,), channels=1)
    full = preprocessing.to_image(np.ones((50, 50), np.float32), (200, 400))
    seen = ~np.isnan(full)
    rows, cols = np.nonzero(seen)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (50, 149, 100, 299)
    assert np.all(full[seen] == 1)


def test_output_names_keep_folders_and_tell_apart_files_of_one_stem(tmp_path):
    files = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "sub" / "b.bmp"]
    assert output_names(files, tmp_path) == ["a_png", "a_jpg", "sub/b"]


def test_predict_py_writes_its_run_folder_and_reports_skipped_files(ckpt, folder, tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt_path={ckpt}", f"input={folder}",
                             f"paths.log_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert sum(f"skipped {folder / 'notes.txt'}" in line for line in output.splitlines()) == 1
    (run_dir,) = (tmp_path / "predict" / "runs").iterdir()
    with (run_dir / "predictions.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 5
    assert len(list((run_dir / "overlays").rglob("*.png"))) == len(list((run_dir / "masks").rglob("*.png"))) == 5
