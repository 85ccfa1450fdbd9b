"""anomaly_lab.report on run folders written here: tables, means, paper columns, variants, failed jobs."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_lab.errors import ConfigError
from anomaly_lab.report import main, parse_arguments
from anomaly_lab.report.tables import MVTEC_OBJECTS, MVTEC_TEXTURES, PaperTables, ReportOptions, build_report
from tests.helpers import REPO

TEXTURES, OBJECTS = ["carpet", "grid"], ["bottle", "screw"]


def write_job(folder: Path, model: str, category: str, seed: int, metrics: dict, experiment=None, overrides=(),
              **record):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "model": model, "data": "mvtec", "category": category, "seed": seed,
        "config": {"model": model, "data": f"mvtec/{category}", "trainer": "default", "experiment": experiment},
        "metrics": metrics, **({"overrides": [f"data=mvtec/{category}", f"seed={seed}", *overrides]}
                               if overrides is not None else {}), **record,
    }))


def score(model: str, category: str, seed: int) -> float:
    """A distinct value per run, so that every mean below is checked against its own inputs."""
    return round(0.5 + 0.01 * len(model) + 0.02 * len(category) + 0.003 * seed, 6)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """padim on 2 textures + 2 objects, seeds 0 and 1; fyd with an experiment and a paper table; one
    failed job and one job folder left without any result."""
    root = tmp_path_factory.mktemp("multirun")
    job = 0
    for category in TEXTURES + OBJECTS:
        for seed in (0, 1):
            write_job(root / str(job), "padim", category, seed,
                      {"image_auroc": score("padim", category, seed), "pixel_auroc": 0.9})
            job += 1
    for category in ["carpet", "bottle"]:
        write_job(root / str(job), "fyd", category, 0, {"image_auroc": score("fyd", category, 0)}, experiment="tab1")
        job += 1
    failed = root / str(job)
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps({
        "error": "DataError: /data/mvtec/screw: no such folder", "model": "fyd", "category": "screw", "seed": 0,
        "config": {"model": "fyd", "data": "mvtec/screw", "experiment": "tab1"}, "overrides": ["data=mvtec/screw"],
    }))
    (root / str(job + 1) / ".hydra").mkdir(parents=True)  # killed before it wrote anything
    return root


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("experiments")
    (folder / "tab1").mkdir()
    (folder / "tab1" / "paper.csv").write_text(
        "table,category,metric,value,source\n"
        "1,carpet,image_auroc,0.9,Table 1\n"
        "1,bottle,image_auroc,0.8,Table 1\n"
        "1,avg_all,image_auroc,0.85,Table 1 average\n"
        "1,carpet,pixel_auroc,0.99,Table 1\n"
    )
    (folder / "ablation").mkdir()
    (folder / "ablation" / "paper.csv").write_text(
        "table,category,metric,value,source\n"
        "4,mean,image_auroc,0.7,\"Table 4, row variant=small\"\n"
        "4,mean,image_auroc,0.8,\"Table 4, row variant=large\"\n"
        "4,bottle,image_auroc,0.6,\"Table 4, Baseline\"\n"
        "4,bottle,image_auroc,0.65,\"Table 4, Ours\"\n"
    )
    return folder


@pytest.fixture(scope="module")
def report_dir(sweep, experiments) -> Path:
    return main([str(sweep), f"report.experiments_dir={experiments}"])


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as file:
        return {row["category"]: row for row in csv.DictReader(file)}


def test_table_holds_the_mean_and_std_over_seeds_of_each_class(report_dir):
    table = read_csv(report_dir / "image_auroc.csv")
    for category in TEXTURES + OBJECTS:
        values = [score("padim", category, seed) for seed in (0, 1)]
        assert float(table[category]["padim"]) == pytest.approx(statistics.fmean(values))
        assert float(table[category]["padim std"]) == pytest.approx(statistics.stdev(values))
        assert table[category]["padim runs"] == "2"
    assert list(table)[:4] == [c for c in MVTEC_TEXTURES + MVTEC_OBJECTS if c in TEXTURES + OBJECTS]


def test_texture_object_and_overall_means_are_over_the_class_means(report_dir):
    table = read_csv(report_dir / "image_auroc.csv")
    class_mean = {c: statistics.fmean(score("padim", c, s) for s in (0, 1)) for c in TEXTURES + OBJECTS}
    assert float(table["texture_mean"]["padim"]) == pytest.approx(statistics.fmean(class_mean[c] for c in TEXTURES))
    assert float(table["object_mean"]["padim"]) == pytest.approx(statistics.fmean(class_mean[c] for c in OBJECTS))
    assert float(table["mean"]["padim"]) == pytest.approx(statistics.fmean(class_mean.values()))
    assert list(table)[-3:] == ["texture_mean", "object_mean", "mean"]


def test_paper_values_and_differences_sit_beside_the_matching_method(report_dir):
    table = read_csv(report_dir / "image_auroc.csv")
    assert float(table["carpet"]["fyd paper"]) == 0.9 and float(table["bottle"]["fyd paper"]) == 0.8
    assert float(table["carpet"]["fyd diff"]) == pytest.approx(score("fyd", "carpet", 0) - 0.9)
    # The paper's avg_all row is its mean; ours is over the classes fyd ran.
    fyd_mean = statistics.fmean([score("fyd", "carpet", 0), score("fyd", "bottle", 0)])
    assert float(table["mean"]["fyd diff"]) == pytest.approx(fyd_mean - 0.85)
    assert "padim paper" not in table["carpet"]  # padim ran without an experiment: no paper column
    assert table["grid"]["fyd"] == "" and table["grid"]["fyd paper"] == ""


def test_failed_and_unfinished_jobs_are_listed_with_their_error_line(report_dir, sweep):
    failed = list(csv.DictReader((report_dir / "failed.csv").open()))
    assert [(row["job"], row["method"], row["category"]) for row in failed] == [("10", "fyd", "screw"), ("11", "", "")]
    assert failed[0]["error"] == "DataError: /data/mvtec/screw: no such folder"
    assert "still running, killed or interrupted" in failed[1]["error"]
    markdown = (report_dir / "report.md").read_text()
    assert "## Failed jobs (2)" in markdown and "DataError: /data/mvtec/screw: no such folder" in markdown


def test_markdown_and_chart_per_metric(report_dir):
    markdown = (report_dir / "report.md").read_text()
    assert "| category | padim | fyd | fyd paper | Δ |" in markdown
    assert "| **mean** |" in markdown
    for metric in ("image_auroc", "pixel_auroc"):
        assert (report_dir / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{metric}]({metric}.png)" in markdown
    results = list(csv.DictReader((report_dir / "results.csv").open()))
    # fyd recorded no pixel_auroc: no column for it, even though its paper has a value.
    assert {(r["method"], r["metric"]) for r in results} == {
        ("padim", "image_auroc"), ("padim", "pixel_auroc"), ("fyd", "image_auroc")}
    fyd = {r["category"]: r for r in results if r["method"] == "fyd"}
    assert (fyd["carpet"]["paper"], fyd["carpet"]["paper_source"]) == ("0.9", "Table 1")


def test_sweep_parameters_name_the_columns_and_pick_the_paper_row(tmp_path, experiments):
    for job, (variant, category) in enumerate([(v, c) for v in ("small", "large") for c in ("bottle", "carpet")]):
        write_job(tmp_path / "sweep" / str(job), "fyd", category, 0, {"image_auroc": 0.5 + job / 10},
                  experiment="ablation", overrides=[f"variant={variant}", "trainer=cpu"])
    report = build_report([tmp_path / "sweep"], ReportOptions(experiments_dir=str(experiments)))
    (table,) = report.tables
    assert table.methods == ["fyd (variant=small)", "fyd (variant=large)"]  # trainer=cpu is common to all
    assert table.paper["fyd (variant=small)"]["mean"][0] == 0.7
    assert table.paper["fyd (variant=large)"]["mean"][0] == 0.8
    assert table.ours["fyd (variant=large)"]["mean"].mean == pytest.approx(statistics.fmean([0.7, 0.8]))
    # Two paper rows for bottle that no recorded setting tells apart: left out and said so.
    assert "bottle" not in table.paper["fyd (variant=small)"]
    assert any("cannot tell apart" in note and "Baseline" in note for note in report.notes)


def test_jobs_that_recorded_no_overrides_are_not_told_apart_by_them(tmp_path):
    write_job(tmp_path / "0", "padim", "carpet", 0, {"image_auroc": 0.9}, overrides=None)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "failed.json").write_text(json.dumps({
        "error": "RuntimeError: out of memory", "model": "padim", "category": "grid", "seed": 0,
        "overrides": ["data=mvtec/grid", "trainer=gpu"]}))
    report = build_report([tmp_path], ReportOptions())
    assert [job.method for job in report.jobs] == ["padim", "padim"]
    assert report.failed[0].error == "RuntimeError: out of memory"


def test_the_report_says_where_pixel_metrics_were_measured_and_what_set_the_thresholds(tmp_path):
    for job, (category, count) in enumerate([("carpet", 21), ("bottle", 20)]):
        write_job(tmp_path / str(job), "padim", category, 0, {"pixel_auroc": 0.9}, pixel_resolution="original",
                  threshold_source=f"a holdout of {count} of the {10 * count} training normals "
                                   "(data.val_ratio=0.1, data.split_seed=0)")
    write_job(tmp_path / "2", "fyd", "carpet", 0, {"pixel_auroc": 0.8}, pixel_resolution="input 256x256",
              threshold_source="the 280 training normals' own scores (data.val_ratio=0: every normal trains)")
    main([str(tmp_path), "report.chart=false"])
    lines = {line.split("**")[1]: line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
             if line.startswith("- **")}
    assert lines["padim"].endswith("; pixel metrics at original resolution; thresholds from a holdout of "
                                   "training normals (data.val_ratio=0.1, data.split_seed=0)")
    assert lines["fyd"].endswith("; pixel metrics at input 256x256 resolution; thresholds from the training "
                                 "normals' own scores (data.val_ratio=0: every normal trains)")


def test_missing_classes_are_named_in_the_notes(report_dir):
    notes = (report_dir / "report.md").read_text().split("## Notes")[1]
    # On MVTec AD the papers' means are over the 15 classes.
    missing = [c for c in MVTEC_TEXTURES + MVTEC_OBJECTS if c not in ("carpet", "bottle")]
    assert f"image_auroc, fyd: means over 2 of 15 classes (no result for {', '.join(missing)})" in notes


def test_every_experiment_paper_table_of_the_project_reads(tmp_path):
    notes = []
    papers = PaperTables(REPO / "experiments", notes)
    for folder in sorted((REPO / "experiments").glob("*/")):
        if list(folder.glob("paper*.csv")):
            rows = papers.rows(folder.name)
            assert rows and all(float(row["value"]) == float(row["value"]) for row in rows)
    assert notes == []


def test_options_are_checked_and_errors_are_one_line(tmp_path, sweep):
    folders, options = parse_arguments([str(sweep), "report.wandb=true", "report.metrics=[image_auroc]"])
    assert folders == [sweep] and options.wandb is True and options.metrics == ["image_auroc"]
    with pytest.raises(ConfigError, match="wandbx"):
        parse_arguments([str(sweep), "report.wandbx=true"])
    with pytest.raises(ConfigError, match="image_aupro"):
        build_report([sweep], ReportOptions(metrics=["image_aupro"]))
    result = subprocess.run([sys.executable, "-m", "anomaly_lab.report", str(tmp_path / "nowhere")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder (expected a multirun folder, " \
                                    "logs/train/multiruns/<time>)"
