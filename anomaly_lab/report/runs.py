"""Collect the runs of a report: every job folder under the given folders, read into a `Job` (its
model, class, seed, settings and metrics, or its error), and each job's method name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_lab.errors import ConfigError

# Overrides that choose the row (class), the seed (averaged) or the model (the column's name).
ROW_KEYS = {"data", "data.root", "data.category", "data.normal_class", "seed", "model"}


@dataclass
class Job:
    """One job folder: a finished run (metrics) or a failed one (error)."""

    folder: Path
    model: str | None
    row: str | None
    seed: int | None
    experiment: str | None
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    data: str | None = None  # the dataset's name
    pixel_resolution: str | None = None  # where the pixel metrics were measured: "input HxW" or "original"
    threshold_source: str | None = None  # which normal images set the thresholds
    error: str | None = None
    method: str = ""


def find_jobs(folder: Path) -> list[Job]:
    """Every job folder under `folder` (itself included): one holding metrics.json, failed.json or
    Hydra's .hydra/ (a job that left no result: still running, killed or interrupted)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (expected a multirun folder, logs/train/multiruns/<time>)")
    found = {p.parent for name in ("metrics.json", "failed.json", ".hydra") for p in folder.rglob(name)}
    return [read_job(job_folder) for job_folder in sorted(found, key=natural_key)]


def read_job(folder: Path) -> Job:
    metrics_file, failed_file = folder / "metrics.json", folder / "failed.json"
    results = [f for f in (metrics_file, failed_file) if f.is_file()]
    if not results:
        return Job(folder, None, None, None, None, {}, error="no metrics.json: still running, killed or interrupted")
    newest = max(results, key=lambda f: f.stat().st_mtime)  # a job re-run in its folder leaves both
    try:
        record = json.loads(newest.read_text())
    except (OSError, ValueError) as error:
        return Job(folder, None, None, None, None, {}, error=f"unreadable {newest.name}: {error}")
    config = record.get("config") or {}
    normal_class = record.get("normal_class")
    row = str(normal_class) if normal_class is not None else record.get("category")
    job = Job(folder, record.get("model") or config.get("model"), None if row is None else str(row),
              record.get("seed"), config.get("experiment"), parse_overrides(record.get("overrides") or []),
              data=record.get("data"), pixel_resolution=record.get("pixel_resolution"),
              threshold_source=record.get("threshold_source"))
    if newest == failed_file:
        job.error = record.get("error") or "failed (no error line recorded)"
    else:
        job.metrics = {k: float(v) for k, v in (record.get("metrics") or {}).items() if v is not None}
    return job


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Hydra override strings (`key=value`, `+key=value`) as a dict with blanks and quotes removed."""
    parsed = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            parsed[key.lstrip("+~")] = canonical(value)
    return parsed


def canonical(value: str) -> str:
    return re.sub(r"[\s'\"]", "", value)


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def name_methods(jobs: list[Job]) -> None:
    """A job's method: its model, plus the experiment and overrides that differ between the jobs of
    that model (`fyd (fyd_ablation=baseline)`)."""
    settings = [{"experiment": job.experiment, **job.overrides} for job in jobs]
    for model in {job.model for job in jobs}:
        mine = [(job, s) for job, s in zip(jobs, settings, strict=True) if job.model == model]
        keys = sorted({key for _, s in mine for key in s} - ROW_KEYS)
        # Jobs that recorded no overrides (older metrics.json) tell nothing about the overrides' keys.
        varying = [key for key in keys if key == "experiment" and len({s[key] for _, s in mine}) > 1
                   or len({s.get(key) for job, s in mine if job.overrides}) > 1]
        for job, s in mine:
            details = ", ".join(f"{key}={s[key]}" for key in varying if s.get(key) is not None)
            job.method = f"{model} ({details})" if details else str(model)
