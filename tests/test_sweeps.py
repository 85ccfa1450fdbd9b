"""Sweeps: a joblib multirun through the real train.py (one job fails, the sweep goes on, W&B runs share
the sweep's group), the report on it, and the SLURM launcher config (SLURM itself cannot run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.helpers import CONF, REPO
from tests.test_wandb import offline_env, read_offline_runs

TINY = ["data.image_size=64", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two synthetic jobs in parallel with joblib, and a third whose dataset is missing."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, **offline_env(tmp / "wandb_home"), "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "logger=wandb",
         "data=synthetic/texture,synthetic/object,mvtec/bottle", f"paths.data_root={tmp / 'data'}",
         f"paths.log_dir={tmp / 'logs'}", *TINY],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    (folder,) = (tmp / "logs" / "train" / "multiruns").iterdir()
    return folder, result


def test_joblib_sweep_runs_every_job_and_survives_a_failed_one(sweep):
    folder, result = sweep
    assert result.returncode == 0, result.stderr[-3000:]
    records = {json.loads(p.read_text())["category"]: p.parent.name for p in folder.glob("*/metrics.json")}
    assert records == {"texture": "0", "object": "1"}
    failure = json.loads((folder / "2" / "failed.json").read_text())
    assert failure["model"] == "padim" and failure["category"] == "bottle" and failure["job"] == 2
    assert str(folder.parents[3] / "data" / "mvtec") in failure["error"]
    assert "Traceback" in (folder / "2" / failure["traceback"]).read_text()
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: job 2 (")]
    assert "data=mvtec/bottle" in line and failure["error"] in line
    assert not (folder / "2" / "metrics.json").exists()


def test_wandb_runs_of_one_sweep_share_its_group_and_log_metrics_and_heatmaps(sweep):
    folder, _ = sweep
    runs = {run["files"].parents[2].name: run for run in read_offline_runs(folder)}  # <job>/wandb/offline-run-*
    assert set(runs) == {"0", "1", "2"} and len({run["id"] for run in runs.values()}) == 3
    assert {run["group"] for run in runs.values()} == {folder.name}
    assert runs["2"]["exit_code"] == 1  # the failed job's run is closed as failed
    for job in ("0", "1"):
        run, record = runs[job], json.loads((folder / job / "metrics.json").read_text())
        assert run["exit_code"] == 0
        assert run["tags"] == {"model:padim", "data:synthetic", f"category:{record['category']}", "seed:0"}
        assert run["summary"]["test/image_auroc"] == pytest.approx(record["metrics"]["image_auroc"])
        heatmaps = [m for m in run["media"] if m.parts[:2] == ("media", "images")]
        assert len(heatmaps) == len(list((folder / job / "images").glob("*.png"))) > 0


def test_report_of_the_sweep_lists_classes_and_the_failed_job(sweep):
    folder, _ = sweep
    result = subprocess.run([sys.executable, "-m", "anomaly_lab.report", str(folder)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (folder / "report" / "report.md").read_text()
    failure = json.loads((folder / "2" / "failed.json").read_text())
    assert "## Failed jobs (1)" in markdown
    assert f"| `2` | padim | bottle | 0 | {failure['error'].replace('|', chr(92) + '|')} |" in markdown
    table = (folder / "report" / "image_auroc.csv").read_text().splitlines()
    assert table[0] == "category,padim,padim std,padim runs"
    assert [line.split(",")[0] for line in table[1:]] == ["object", "texture", "mean"]
    assert result.stdout.startswith(markdown)  # the report is also printed


def compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


class Submitted(Exception):
    """Stands for sbatch: carries the submission script instead of sending it."""


def test_submitit_slurm_launcher_sends_one_ddp_task_per_gpu(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    def capture(self, path):
        raise Submitted(Path(path).read_text())

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were installed
    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", capture)
    cfg = compose_hydra(["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4",
                         "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90",
                         f"hydra.sweep.dir={tmp_path}"])
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["gpus_per_node"] == launcher.params["tasks_per_node"] == cfg.trainer.devices == 4
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["data=mvtec/bottle"], ["data=mvtec/screw"]], initial_job_idx=0)
    script = str(submitted.value)
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=1", "--time=90",
                 "--array=0-1"):
        assert f"#SBATCH {line}" in script
    assert "srun" in script and "submitit.core._submit" in script


@pytest.mark.parametrize("launcher", ["joblib", "ray"])
def test_the_other_launcher_configs_compose(launcher):
    cfg = compose_hydra([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.startswith(f"hydra_plugins.hydra_{launcher}_launcher.")
