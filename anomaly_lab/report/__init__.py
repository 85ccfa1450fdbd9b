"""Reports of sweeps: collect the runs (`runs`), build the per-metric tables beside the papers' numbers
(`tables`), write them (`write`); `python -m anomaly_lab.report` (`cli`) runs the three."""

from anomaly_lab.report.cli import main, parse_arguments

__all__ = ["main", "parse_arguments"]
