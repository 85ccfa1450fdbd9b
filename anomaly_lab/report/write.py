"""Write a `Report` (anomaly_lab.report.tables): per-metric CSV tables, `results.csv` (one line per method,
class and metric), `failed.csv`, `report.md`, a bar chart per metric and, optionally, a W&B run."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from anomaly_lab.report.runs import Job
from anomaly_lab.report.tables import MEAN_ROWS, Report, ReportOptions, Table


def write_report(report: Report, output_dir: Path, options: ReportOptions) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for table in report.tables:
        _write_csv(output_dir / f"{table.metric}.csv", wide_rows(table))
        if options.chart:
            plot_table(table, output_dir / f"{table.metric}.png")
    _write_csv(output_dir / "results.csv", long_rows(report))
    _write_csv(output_dir / "failed.csv", failed_rows(report))
    markdown = to_markdown(report, options.chart)
    (output_dir / "report.md").write_text(markdown)
    print(markdown)
    if options.wandb:
        log_to_wandb(report, output_dir, options)
    print(f"report written to {output_dir}/ (report.md, <metric>.csv, results.csv, failed.csv"
          f"{', <metric>.png' if options.chart else ''})")


def _write_csv(path: Path, rows: list[list]) -> None:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def _number(value: float | None, signed: bool = False) -> str:
    return "" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def _relative(folder: Path, report: Report) -> str:
    for root in report.folders:
        if folder.is_relative_to(root):
            return str(folder.relative_to(root)) or "."
    return str(folder)


# tables as rows of cells


def _columns(table: Table) -> list[tuple[str, str]]:
    """(method, kind) for each column: ours, std, runs, and paper, diff where the paper has values."""
    columns = []
    for method in table.methods:
        columns += [(method, "ours"), (method, "std"), (method, "runs")]
        if table.paper.get(method):
            columns += [(method, "paper"), (method, "diff")]
    return columns


def _value(table: Table, method: str, kind: str, row: str):
    cell, paper = table.ours[method].get(row), table.paper.get(method, {}).get(row)
    if kind == "ours":
        return None if cell is None else cell.mean
    if kind == "std":
        return None if cell is None else cell.std
    if kind == "runs":
        return None if cell is None or row in MEAN_ROWS else len(cell.values)
    if kind == "paper":
        return None if paper is None else paper[0]
    return table.diff(method, row)


def wide_rows(table: Table) -> list[list]:
    """One line per class (and mean), one column per method, its std, runs, paper value and difference."""
    columns = _columns(table)
    header = ["category", *(method if kind == "ours" else f"{method} {kind}" for method, kind in columns)]
    body = [[row, *("" if (v := _value(table, m, k, row)) is None else v for m, k in columns)] for row in table.rows]
    return [header, *body]


def long_rows(report: Report) -> list[list]:
    rows = [["method", "category", "metric", "mean", "std", "runs", "paper", "diff", "paper_source"]]
    for table in report.tables:
        for method in table.methods:
            for row in table.rows:
                cell, paper = table.ours[method].get(row), table.paper.get(method, {}).get(row)
                if cell is None and paper is None:
                    continue
                values = [_value(table, method, kind, row) for kind in ("ours", "std", "runs", "paper", "diff")]
                rows.append([method, row, table.metric, *("" if v is None else v for v in values),
                             "" if paper is None else paper[1]])
    return rows


def failed_rows(report: Report) -> list[list]:
    rows = [["job", "method", "category", "seed", "overrides", "error"]]
    for job in report.failed:
        overrides = " ".join(f"{k}={v}" for k, v in job.overrides.items())
        rows.append([_relative(job.folder, report), job.method if job.model else "", job.row or "",
                     "" if job.seed is None else job.seed, overrides, job.error])
    return rows


# Markdown


def to_markdown(report: Report, chart: bool) -> str:
    jobs = report.finished
    lines = [
        "# Comparison report", "",
        f"Folders: {', '.join(f'`{f}`' for f in report.folders)}. {len(jobs)} finished jobs, "
        f"{len(report.failed)} failed or without results.",
        "Values: mean over the runs of each class (± sample standard deviation over seeds when there are "
        "several); the means are over classes; `paper`: the published value, `Δ` = ours − paper.", "",
    ]
    for method in dict.fromkeys(job.method for job in jobs):
        runs = [job for job in jobs if job.method == method]
        seeds = sorted({job.seed for job in runs}, key=str)
        lines.append(f"- **{method}**: {len(runs)} runs, {len({job.row for job in runs})} classes, "
                     f"seeds {', '.join(map(str, seeds))}; experiment {runs[0].experiment or '–'}"
                     f"{_measured(runs)}")
    for table in report.tables:
        lines += ["", f"## {table.metric}", "", *_markdown_table(table)]
        if chart:
            lines += ["", f"![{table.metric}]({table.metric}.png)"]
    if report.failed:
        lines += ["", f"## Failed jobs ({len(report.failed)})", "",
                  "| job | method | category | seed | error |", "|---|---|---|---|---|"]
        for job_folder, method, category, seed, _, error in failed_rows(report)[1:]:
            lines.append(f"| `{job_folder}` | {method} | {category} | {seed} | {_escape(error)} |")
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {_escape(note)}" for note in dict.fromkeys(report.notes))]
    return "\n".join(lines) + "\n"


def _measured(runs: list[Job]) -> str:
    """Where the runs' pixel metrics were measured and which normals set their thresholds (counts dropped:
    `a holdout of 21 of the 209 training normals (...)` reads `a holdout of training normals (...)`)."""
    resolutions = sorted({job.pixel_resolution for job in runs if job.pixel_resolution})
    sources = sorted({re.sub(r"\b\d+ (of the \d+ )?", "", job.threshold_source)
                      for job in runs if job.threshold_source})
    text = f"; pixel metrics at {', '.join(resolutions)} resolution" if resolutions else ""
    return text + (f"; thresholds from {'; '.join(sources)}" if sources else "")


def _markdown_table(table: Table) -> list[str]:
    header, rule = ["category"], ["---"]
    for method in table.methods:
        header.append(method)
        if table.paper.get(method):
            header += [f"{method} paper", "Δ"]
    rule += ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(map(_escape, header)) + " |", "| " + " | ".join(rule) + " |"]
    for row in table.rows:
        cells = [f"**{row}**" if row in MEAN_ROWS else row]
        for method in table.methods:
            cell = table.ours[method].get(row)
            text = _number(cell.mean if cell else None)
            if cell and cell.std is not None:
                text += f" ± {cell.std:.3f}"
            cells.append(text)
            if table.paper.get(method):
                cells += [_number(_value(table, method, "paper", row)), _number(table.diff(method, row), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# chart


def plot_table(table: Table, path: Path) -> None:
    """Grouped bars: one group per class (and mean), one bar per method with its std as error bar; the
    paper's value as a black tick on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_methods = max(len(table.methods), 1)
    width = 0.8 / n_methods
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(table.rows) * n_methods + 2), 4.5))
    values, paper_labelled = [], False
    for i, method in enumerate(table.methods):
        offsets = [x - 0.4 + width * (i + 0.5) for x in range(len(table.rows))]
        cells = [table.ours[method].get(row) for row in table.rows]
        means = [c.mean if c else float("nan") for c in cells]
        axes.bar(offsets, means, width, yerr=[(c.std or 0.0) if c else 0.0 for c in cells], label=method, capsize=2)
        paper = [(x, p[0]) for x, row in zip(offsets, table.rows, strict=True)
                 if (p := table.paper.get(method, {}).get(row))]
        if paper:
            axes.hlines([p for _, p in paper], [x - width / 2 for x, _ in paper], [x + width / 2 for x, _ in paper],
                        colors="black", linewidths=2, zorder=3, label=None if paper_labelled else "paper")
            paper_labelled = True
        values += [m for m in means if m == m] + [p for _, p in paper]
    axes.set_ylim(max(0.0, min(min(values, default=0.0) - 0.05, 0.9)), max(1.0, max(values, default=1.0) + 0.02))
    axes.set_xticks(range(len(table.rows)), table.rows, rotation=45, ha="right")
    axes.set_ylabel(table.metric)
    axes.set_title(f"{table.metric} per class")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# Weights & Biases


def log_to_wandb(report: Report, output_dir: Path, options: ReportOptions) -> None:
    """One W&B run (job type `report`) in the sweep's group: a table per metric, the long results table,
    the failed jobs and the charts."""
    import wandb

    group = report.folders[0].resolve().name
    run = wandb.init(project=options.wandb_project, entity=options.wandb_entity, group=group,
                     job_type="report", name=f"report-{group}", dir=str(output_dir), mode=options.wandb_mode,
                     config={"folders": [str(f) for f in report.folders]}, reinit="finish_previous")
    logged = {}
    for table in report.tables:
        header, *rows = wide_rows(table)
        logged[f"report/{table.metric}"] = wandb.Table(columns=header, data=[_wandb_row(r) for r in rows])
        chart = output_dir / f"{table.metric}.png"
        if chart.is_file():
            logged[f"report/{table.metric}_chart"] = wandb.Image(str(chart))
    header, *rows = long_rows(report)
    logged["report/results"] = wandb.Table(columns=header, data=[_wandb_row(r) for r in rows])
    header, *rows = failed_rows(report)
    logged["report/failed"] = wandb.Table(columns=header, data=[[str(v) for v in r] for r in rows])
    run.log(logged)
    run.finish()
    wandb.teardown()  # flush the run's files (the W&B service writes them asynchronously)
    if options.wandb_mode == "offline":
        print(f"W&B: the report's tables are in {Path(run.dir).parent}; upload with: wandb sync {Path(run.dir).parent}")
    elif options.wandb_mode == "online":
        print(f"W&B: the report's tables are at {run.url}")


def _wandb_row(row: list) -> list:
    """Numbers as floats and empty cells as None, so that W&B keeps numeric columns."""
    return [None if v == "" else v if isinstance(v, str) else float(v) for v in row]
