"""End to end: train.py / eval.py on synthetic data, multirun, and the run folder's contents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_lab.run import entry_point, evaluate, train
from tests.helpers import REPO, SHARED_DATA, compose_config

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def texture_run(data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", [f"paths.data_root={data_root}", *QUIET], output_dir=run_dir)
    train(cfg)
    return run_dir


def test_default_run_detects_synthetic_texture_defects(texture_run):
    record = json.loads((texture_run / "metrics.json").read_text())
    assert record["model"] == "padim" and record["data"] == "synthetic" and record["category"] == "texture"
    assert record["metrics"]["image_auroc"] >= 0.9
    assert record["metrics"]["pixel_auroc"] >= 0.9
    assert set(record["metrics"]) == {"image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_aupro", "pixel_f1"}
    assert record["seed"] == 0 and record["test_images"] > 0 and record["test_images_per_second"] > 0
    assert record["fit_seconds"] > 0
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["git_commit"])
    assert record["config"] == {"model": None, "data": None, "trainer": None, "experiment": None}  # no Hydra app here


def test_run_folder_holds_checkpoint_config_and_heatmaps(texture_run):
    assert (texture_run / "checkpoints" / "last.ckpt").is_file()
    assert (texture_run / "config.yaml").read_text().count("_target_: anomaly_lab.models.Padim") == 1
    panels = list((texture_run / "images").glob("*.png"))
    assert any(p.name.startswith("anomalous") for p in panels) and any(p.name.startswith("normal") for p in panels)


def test_thresholds_come_from_validation_normals_and_are_saved(texture_run):
    import torch

    state = torch.load(texture_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    record = json.loads((texture_run / "metrics.json").read_text())
    assert torch.isfinite(state["image_threshold"]) and bool(state["normal_fitted"])
    assert float(state["image_threshold"]) == pytest.approx(record["image_threshold"])


def test_eval_reproduces_the_run_metrics(texture_run, data_root, tmp_path):
    cfg = compose_config("eval", [f"ckpt_path={texture_run / 'checkpoints' / 'last.ckpt'}",
                                  f"paths.data_root={data_root}", *QUIET], output_dir=tmp_path)
    metrics = evaluate(cfg)
    expected = json.loads((texture_run / "metrics.json").read_text())["metrics"]
    assert metrics == pytest.approx(expected, abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == pytest.approx(expected, abs=1e-6)


def test_eval_with_other_data_refits_the_normal_statistics_and_thresholds(texture_run, data_root, tmp_path):
    # val_ratio=0: the held-out normals join the Gaussian fit and thresholds come from the training normals.
    cfg = compose_config("eval", [f"ckpt_path={texture_run / 'checkpoints' / 'last.ckpt'}", f"paths.data_root={data_root}",
                                  "+overrides.data.val_ratio=0", *QUIET], output_dir=tmp_path)
    evaluate(cfg)
    trained, refitted = (json.loads((d / "metrics.json").read_text()) for d in (texture_run, tmp_path))
    assert refitted["image_threshold"] != pytest.approx(trained["image_threshold"])
    assert "val_ratio=0" in refitted["threshold_source"] and "holdout" in trained["threshold_source"]


def test_same_seed_gives_same_metrics_and_train_returns_the_optimized_one(texture_run, data_root, tmp_path):
    cfg = compose_config("train", [f"paths.data_root={data_root}", "callbacks=none", *QUIET], output_dir=tmp_path)
    expected = json.loads((texture_run / "metrics.json").read_text())["metrics"]
    assert entry_point(train)(cfg) == pytest.approx(expected["image_auroc"], abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == pytest.approx(expected, abs=1e-6)


def run_script(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_multirun_runs_one_job_per_class(data_root, tmp_path):
    result = run_script("train.py", "-m", "data=synthetic/texture,synthetic/object", f"paths.data_root={data_root}",
                        f"paths.log_dir={tmp_path}", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))]
    assert sorted(r["category"] for r in records) == ["object", "texture"]
    assert all(r["metrics"]["image_auroc"] >= 0.9 for r in records)


@pytest.mark.parametrize("option", ["model=nope", "data=mvtec/nope"])
def test_unknown_model_or_data_name_stops_with_one_message(option, tmp_path):
    result = run_script("train.py", option, f"paths.log_dir={tmp_path}")
    assert result.returncode != 0
    group, name = option.split("=")
    assert f"Could not find '{group}/{name}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_missing_dataset_names_the_path_and_writes_no_metrics(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_script("train.py", "data=mvtec/bottle", f"paths.data_root={missing}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    assert str(missing / "mvtec") in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_eval_of_a_missing_checkpoint_names_it(tmp_path):
    result = run_script("eval.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1 and "nope.ckpt" in result.stderr


@pytest.mark.skipif(not (SHARED_DATA / "mvtec" / "bottle").is_dir(), reason="../shared/data/mvtec/bottle is absent")
def test_padim_runs_on_the_real_bottle_category(tmp_path):
    cfg = compose_config("train", ["data=mvtec/bottle", f"paths.data_root={SHARED_DATA}", "data.image_size=128",
                                   f"paths.cache_dir={tmp_path / 'cache'}",
                                   "callbacks=none", *QUIET], output_dir=tmp_path)
    metrics = train(cfg)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["category"] == "bottle" and record["test_images"] == 83
    # A randomly initialised ResNet-18 still separates broken bottles well above chance.
    assert metrics["image_auroc"] > 0.7 and metrics["pixel_auroc"] > 0.7


def test_unreadable_image_read_in_a_worker_stops_with_its_path(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree(category="widget", n_train=12)
    broken = root / "widget" / "test" / "good" / "001.png"
    broken.write_bytes(b"not a png")
    result = run_script("train.py", "data=mvtec/bottle", f"data.root={root}", "data.category=widget",
                        "data.num_workers=2", "data.image_size=32", f"paths.log_dir={tmp_path / 'logs'}",
                        f"paths.data_root={tmp_path}", *QUIET)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(broken) in last_line
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "logs").rglob("metrics.json"))


def test_bad_option_value_in_a_constructor_stops_with_its_message(tmp_path):
    result = run_script("train.py", "data.val_ratio=1.5", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: data.val_ratio=1.5 must be in [0, 1)"
    assert "Traceback" not in result.stderr
