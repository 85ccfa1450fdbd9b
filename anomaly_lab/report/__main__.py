"""python -m anomaly_lab.report <folder> ... [report.<key>=<value> ...] (see anomaly_lab.report.cli)."""

from anomaly_lab.report.cli import main

main()
