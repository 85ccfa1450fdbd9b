"""The per-metric class x method tables of `python -m anomaly_lab.report`, with the papers' numbers
(`experiments/<experiment>/paper*.csv`) beside ours (see `anomaly_lab.report.cli` for what the report
holds)."""

from __future__ import annotations

import csv
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from anomaly_lab.errors import ConfigError
from anomaly_lab.report.runs import Job, canonical, find_jobs, name_methods, natural_key

# The MVTec AD texture categories (as anomaly_lab.data.mvtec.MVTEC_TEXTURES, repeated here so that the
# report does not import torch); the other ten categories are objects.
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                 "transistor", "zipper")


# The evaluator's metrics first, in this order; any other metric (a method's own protocol) after them.
METRIC_ORDER = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_aupro", "pixel_f1")


MEAN_ROWS = ("texture_mean", "object_mean", "mean")


# Other names of the mean rows in the papers' csv files.
PAPER_ROW_ALIASES = {"avg_all": "mean", "avg_textures": "texture_mean", "avg_objects": "object_mean",
                     "average": "mean"}


SETTING = re.compile(r"([A-Za-z_][\w.]*)=(\[[^\]]*\]|[^\s,;)]+)")


@dataclass
class ReportOptions:
    """Options of `python -m anomaly_lab.report <folder> ... report.<key>=<value>`:

    report.output_dir=null          where to write; null: <first folder>/report
    report.metrics=null             e.g. [image_auroc,pixel_auroc]; null: every metric the runs recorded
    report.experiments_dir=null     where experiments/<experiment>/paper*.csv are; null: the project's
    report.chart=true               a PNG bar chart per metric
    report.wandb=false              also log the tables and charts as a W&B run in the sweep's group
    report.wandb_project=anomaly-lab
    report.wandb_entity=null
    report.wandb_mode=offline       offline (upload later with `wandb sync`), online or disabled
    """

    output_dir: str | None = None
    metrics: list[str] | None = None
    experiments_dir: str | None = None
    chart: bool = True
    wandb: bool = False
    wandb_project: str = "anomaly-lab"
    wandb_entity: str | None = None
    wandb_mode: str = "offline"


@dataclass
class Cell:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Table:
    """One metric: ours[method][row], paper[method][row] (value, source), rows and methods in order."""

    metric: str
    rows: list[str]
    methods: list[str]
    ours: dict[str, dict[str, Cell]]
    paper: dict[str, dict[str, tuple[float, str]]]

    def diff(self, method: str, row: str) -> float | None:
        ours, paper = self.ours[method].get(row), self.paper.get(method, {}).get(row)
        return None if ours is None or paper is None else ours.mean - paper[0]


@dataclass
class Report:
    folders: list[Path]
    jobs: list[Job]
    tables: list[Table]
    notes: list[str]

    @property
    def finished(self) -> list[Job]:
        return [job for job in self.jobs if job.error is None]

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if job.error is not None]


def build_report(folders: list[Path], options: ReportOptions) -> Report:
    jobs = [job for folder in folders for job in find_jobs(folder)]
    if not jobs:
        raise ConfigError(f"no job folders (metrics.json or failed.json) under {', '.join(map(str, folders))}")
    name_methods(jobs)
    finished = [job for job in jobs if job.error is None]
    if len({job.data for job in finished}) > 1:  # e.g. cifar10 and cifar100 classes: keep them apart
        for job in finished:
            job.row = f"{job.data}/{job.row}"
    notes = _duplicate_notes(finished)
    recorded = {metric for job in finished for metric in job.metrics}
    metrics = list(options.metrics) if options.metrics else sorted(recorded, key=_metric_key)
    unknown = [m for m in metrics if m not in recorded]
    if finished and unknown:
        raise ConfigError(f"report.metrics: {', '.join(unknown)} not recorded by any run "
                          f"(recorded: {', '.join(sorted(recorded, key=_metric_key))})")
    papers = PaperTables(_experiments_dir(options), notes)
    tables = [_table(metric, finished, papers, notes) for metric in metrics]
    return Report(folders, jobs, tables, notes)


def _table(metric: str, jobs: list[Job], papers: PaperTables, notes: list[str]) -> Table:
    methods = list(dict.fromkeys(job.method for job in jobs if metric in job.metrics))
    ours: dict[str, dict[str, Cell]] = {m: {} for m in methods}
    for job in jobs:
        if metric in job.metrics and job.row is not None:
            ours[job.method].setdefault(job.row, Cell([])).values.append(job.metrics[metric])
    paper = {m: papers.values(_jobs_of(jobs, m), metric) for m in methods}
    classes = {row for cells in ours.values() for row in cells}  # the paper's other classes: in the notes
    mvtec = bool(classes) and classes <= set(MVTEC_TEXTURES + MVTEC_OBJECTS)
    rows = _ordered_rows(classes, mvtec)
    expected = _ordered_rows(set(MVTEC_TEXTURES + MVTEC_OBJECTS), True) if mvtec else rows
    for method, cells in ours.items():
        missing = [row for row in expected if row not in cells]
        if missing and cells:
            notes.append(f"{metric}, {method}: means over {len(cells)} of {len(expected)} classes "
                         f"(no result for {', '.join(missing)})")
        means = {"mean": list(cells)}
        if mvtec:
            means["texture_mean"] = [r for r in cells if r in MVTEC_TEXTURES]
            means["object_mean"] = [r for r in cells if r in MVTEC_OBJECTS]
        for name, members in means.items():
            if members:
                cells[name] = Cell([statistics.fmean(cells[r].mean for r in members)])
    rows += [row for row in MEAN_ROWS if any(row in ours[m] or row in paper[m] for m in methods)]
    return Table(metric, rows, methods, ours, paper)


def _jobs_of(jobs: list[Job], method: str) -> list[Job]:
    return [job for job in jobs if job.method == method]


def _ordered_rows(classes: set[str], mvtec: bool) -> list[str]:
    if mvtec:
        return [c for c in MVTEC_TEXTURES + MVTEC_OBJECTS if c in classes]
    return sorted(classes, key=lambda row: natural_key(Path(row)))


def _metric_key(metric: str) -> tuple:
    return (METRIC_ORDER.index(metric), "") if metric in METRIC_ORDER else (len(METRIC_ORDER), metric)


def _duplicate_notes(jobs: list[Job]) -> list[str]:
    """Runs of one method, class and seed are averaged like seeds, but are probably different settings."""
    seen: dict[tuple, int] = {}
    for job in jobs:
        key = (job.method, job.row, job.seed)
        seen[key] = seen.get(key, 0) + 1
    return [f"{count} runs of {method} on {row} with seed {seed} have the same recorded settings: averaged"
            for (method, row, seed), count in seen.items() if count > 1]


def _experiments_dir(options: ReportOptions) -> Path:
    if options.experiments_dir:
        return Path(options.experiments_dir).expanduser()
    root = os.environ.get("ANOMALY_LAB_ROOT") or Path(__file__).resolve().parents[2]
    return Path(root) / "experiments"


class PaperTables:
    """The papers' numbers of each experiment, `experiments/<experiment>/paper*.csv`."""

    def __init__(self, experiments_dir: Path, notes: list[str]):
        self.experiments_dir = experiments_dir
        self.notes = notes
        self._rows: dict[str, list[dict[str, str]]] = {}

    def rows(self, experiment: str) -> list[dict[str, str]]:
        if experiment not in self._rows:
            files = sorted((self.experiments_dir / experiment).glob("paper*.csv"))
            if not files:
                self.notes.append(f"experiment {experiment}: no {self.experiments_dir / experiment}/paper*.csv, "
                                  "no paper numbers")
            self._rows[experiment] = [row for f in files for row in self._read(f)]
        return self._rows[experiment]

    @staticmethod
    def _read(path: Path) -> list[dict[str, str]]:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        expected = {"table", "category", "metric", "value", "source"}
        if rows and not expected <= set(rows[0]):
            raise ConfigError(f"{path}: expected the columns {', '.join(sorted(expected))}, got {', '.join(rows[0])}")
        return rows

    def values(self, jobs: list[Job], metric: str) -> dict[str, tuple[float, str]]:
        """The paper's value of each row for these runs (one method), or nothing where it is ambiguous."""
        experiments = {job.experiment for job in jobs}
        if len(experiments) != 1 or None in experiments:
            return {}
        settings = [{"experiment": job.experiment, **job.overrides} for job in jobs]
        experiment = experiments.pop()
        matches: dict[str, list[dict[str, str]]] = {}
        unmatched = set()
        for row in self.rows(experiment):
            if row["metric"] != metric:
                continue
            named = {key: canonical(value) for key, value in SETTING.findall(row["source"])}
            if all(s.get(key) == value for s in settings for key, value in named.items()):
                category = PAPER_ROW_ALIASES.get(row["category"], row["category"])
                matches.setdefault(category, []).append(row)
            else:
                unmatched |= {f"{key}={value}" for key, value in named.items()}
        if unmatched and not matches:
            self.notes.append(f"{metric}, {jobs[0].method}: the paper values of {experiment} are for the "
                              f"settings {', '.join(sorted(unmatched))}, which its runs do not record")
        values = {}
        for category, rows in matches.items():
            if len(rows) == 1:
                values[category] = (float(rows[0]["value"]), rows[0]["source"])
            else:
                sources = "; ".join(r["source"] for r in rows)
                self.notes.append(f"{metric}, {jobs[0].method}, {category}: {len(rows)} paper values its runs' "
                                  f"settings cannot tell apart, not shown ({sources})")
        return values
