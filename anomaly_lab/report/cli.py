"""Turn sweep folders into comparison tables: per-class x method, one table per metric, with the
texture / object / overall means the MVTec AD papers report, the papers' numbers beside ours, the
difference, a chart per metric and the jobs that failed.

    python -m anomaly_lab.report logs/train/multiruns/<time> [<folder> ...] [report.<key>=<value> ...]

Reads only each job folder's `metrics.json` (or the `failed.json` a failed job leaves), so it also works
on folders copied from another machine; writes `<first folder>/report/` (`report.output_dir`).

- Columns (methods): a run's `model`, plus the sweep parameters that differ between the runs (the job's
  overrides recorded in `metrics.json`, e.g. `fyd_ablation=baseline`, and the experiment), so an ablation
  gives one column per row of the paper's table. Rows: the run's category (its normal class for one-vs-all
  data). Runs differing only by seed are averaged: a cell is mean +- sample standard deviation.
- Means: `mean` over the rows present; on MVTec AD also `texture_mean` and `object_mean`.
- Papers: a run whose `metrics.json` records an experiment (`config.experiment`) is matched with
  `experiments/<experiment>/paper*.csv` (`table,category,metric,value,source`) by category and metric.
  A paper row whose source names a setting (`... fyd_ablation=baseline`, `model.fca_layers=[layer1]`)
  matches only runs with that override; rows the runs cannot tell apart are left out and listed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from anomaly_lab.errors import AnomalyLabError, ConfigError
from anomaly_lab.report.tables import ReportOptions, build_report
from anomaly_lab.report.write import write_report


def parse_arguments(argv: list[str]) -> tuple[list[Path], ReportOptions]:
    """Folders, then Hydra-style options `report.<key>=<value>` (checked against ReportOptions)."""
    folders = [Path(arg) for arg in argv if "=" not in arg]
    schema = OmegaConf.structured({"report": ReportOptions})
    try:
        options = OmegaConf.merge(schema, OmegaConf.from_dotlist([arg for arg in argv if "=" in arg]))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{str(error).splitlines()[0]} (options: report.<key>=<value>, keys: "
                          f"{', '.join(ReportOptions.__dataclass_fields__)})") from None
    if options.report.wandb_mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"report.wandb_mode={options.report.wandb_mode}: expected offline, online or disabled")
    if not folders:
        raise ConfigError("no folder given: python -m anomaly_lab.report logs/train/multiruns/<time> [...]")
    return folders, OmegaConf.to_object(options)["report"]


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0)
    try:
        folders, options = parse_arguments(argv)
        report = build_report(folders, options)
        output_dir = Path(options.output_dir).expanduser() if options.output_dir else folders[0] / "report"
        write_report(report, output_dir, options)
    except AnomalyLabError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    return output_dir


def _usage() -> str:
    return f"{__doc__.strip()}\n\n{ReportOptions.__doc__}"
