"""logger=wandb offline: group, tags, config, summary metrics and heatmaps in the run's files; the
report's tables as a W&B run. Nothing here reaches the network (offline mode, no account)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hydra.utils import instantiate

from anomaly_lab.report import main
from anomaly_lab.run import _end_wandb_run, _trainer
from tests.helpers import compose_config
from tests.test_report import write_job


def offline_env(folder: Path) -> dict[str, str]:
    """Environment of an offline W&B run that keeps its settings and caches under `folder`."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
            "WANDB_CONFIG_DIR": str(folder / "config"), "WANDB_CACHE_DIR": str(folder / "cache"),
            "WANDB_DATA_DIR": str(folder / "data"), "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}


def read_offline_runs(folder: Path) -> list[dict]:
    """Every offline W&B run under `folder`: its run record (group, tags, config), its exit code, its
    summary and the keys of its history, and its media files, read from `run-<id>.wandb` (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, records of crc (4) length (2) type (1) data)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the W&B service writes a finished run's file asynchronously: flush what this process wrote
    runs = []
    for path in sorted(folder.rglob("offline-run-*/run-*.wandb")):
        data, position, chunks, records = path.read_bytes(), 7, b"", []
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # the block's tail is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            chunks += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                   for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
        history = {"/".join(i.nested_key) or i.key for r in records if r.WhichOneof("record_type") == "history"
                   for i in r.history.item}
        config_updates = [*run.config.update, *(u for r in records if r.WhichOneof("record_type") == "config"
                                                for u in r.config.update)]
        runs.append({
            "id": run.run_id, "group": run.run_group, "tags": set(run.tags), "job_type": run.job_type,
            "exit_code": next((r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"), None),
            "config": {u.key: json.loads(u.value_json) for u in config_updates},
            "summary": summary, "history": history,
            "files": path.parent / "files",
            "media": sorted(p.relative_to(path.parent / "files") for p in (path.parent / "files").rglob("media/**/*.*")),
        })
    return runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path / "wandb_home").items():
        monkeypatch.setenv(key, value)


def test_offline_run_records_group_tags_and_config(offline, tmp_path):
    """The loggers run.py builds for a run (the summary metrics and heatmaps of whole runs are checked on
    the sweep of tests/test_sweeps.py)."""
    import wandb

    cfg = compose_config("train", [f"paths.data_root={tmp_path / 'data'}", "logger=wandb",
                                   "logger.wandb.group=padim-vs-fyd", "tags=[demo]"], output_dir=tmp_path / "run")
    trainer, _ = _trainer(cfg, instantiate(cfg.model), instantiate(cfg.data), tmp_path / "run")
    trainer.logger.log_metrics({"test/image_auroc": 0.75})
    _end_wandb_run()
    assert wandb.run is None  # finished: the next job of a sweep in this process starts its own run
    (run,) = read_offline_runs(tmp_path / "run" / "wandb")
    assert run["group"] == "padim-vs-fyd" and run["job_type"] == "train"
    assert run["tags"] == {"model:padim", "data:synthetic", "category:texture", "seed:0", "demo"}
    assert run["config"]["run"]["model"] == "padim" and run["config"]["run"]["category"] == "texture"
    assert run["config"]["model"]["_target_"] == "anomaly_lab.models.Padim"
    assert run["summary"]["test/image_auroc"] == 0.75


def test_report_logs_its_tables_to_a_wandb_run_in_the_sweep_group(offline, tmp_path):
    sweep = tmp_path / "2026-01-01_00-00-00"
    for job, category in enumerate(["carpet", "bottle"]):
        write_job(sweep / str(job), "padim", category, 0, {"image_auroc": 0.9, "pixel_auroc": 0.8})
    report_dir = main([str(sweep), "report.wandb=true"])
    (run,) = read_offline_runs(report_dir)
    assert run["group"] == sweep.name and run["job_type"] == "report"
    tables = {str(m.parent / m.name.rsplit("_", 2)[0]): m for m in run["media"] if m.suffixes == [".table", ".json"]}
    assert set(tables) == {f"media/table/report/{name}" for name in ("image_auroc", "pixel_auroc", "results", "failed")}
    assert {run["summary"][f"report/{name}/_type"] for name in ("image_auroc", "results")} == {"table-file"}
    content = json.loads((run["files"] / tables["media/table/report/image_auroc"]).read_text())
    assert content["columns"][:2] == ["category", "padim"]
    assert [row[0] for row in content["data"]] == ["carpet", "bottle", "texture_mean", "object_mean", "mean"]
    charts = [m for m in run["media"] if m.parts[:3] == ("media", "images", "report")]
    assert len(charts) == 2
