"""Checkpoints: every model loads the Lightning way (`Model.load_from_checkpoint`) under torch.load's
default weights_only=True and scores as `run.load_weights` does; a run written before the package's
move to one folder per method (tests/fixtures/run_before_the_move, CPC-AD, commit dee6cd1) still
evaluates to the metrics it recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate

from anomaly_lab.run import evaluate, load_weights, with_run_config
from tests.helpers import CONF, compose_config

MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
BEFORE_THE_MOVE = Path(__file__).parent / "fixtures" / "run_before_the_move"


@pytest.mark.parametrize("model_name", MODELS)
def test_load_from_checkpoint_under_weights_only_scores_as_the_run_does(model_name, tiny_runs):
    ckpt = tiny_runs.checkpoint(model_name)
    torch.load(ckpt, map_location="cpu", weights_only=True)  # nothing in it needs unpickling code
    run_cfg = with_run_config(compose_config("predict", [f"ckpt_path={ckpt}"]))
    expected = load_weights(instantiate(run_cfg.model), ckpt).eval()
    loaded = get_class(run_cfg.model._target_).load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert type(loaded) is type(expected)
    assert torch.equal(loaded.image_threshold, expected.image_threshold) and loaded.image_threshold.isfinite()
    images = torch.rand(2, run_cfg.data.channels, run_cfg.data.image_size, run_cfg.data.image_size)
    with torch.no_grad():
        got, want = loaded(images), expected(images)
    torch.testing.assert_close(got.image_score, want.image_score, rtol=0, atol=0)


def test_a_run_written_before_the_move_evaluates_to_its_recorded_metrics(tmp_path):
    run = shutil.copytree(BEFORE_THE_MOVE, tmp_path / "run")
    recorded = json.loads((run / "metrics.json").read_text())["metrics"]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert "CPCAD" in (run / "config.yaml").read_text()  # its _target_ is the pre-move anomaly_lab.models.CPCAD
    metrics = evaluate(compose_config("eval", [f"ckpt_path={ckpt}", f"paths.data_root={tmp_path / 'data'}"],
                                      output_dir=tmp_path / "eval"))
    assert metrics.keys() >= recorded.keys()
    for name, value in recorded.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
