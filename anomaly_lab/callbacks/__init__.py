"""Callbacks shared by every method: heat-map panels and the run's metrics.json."""

from anomaly_lab.callbacks.results import ResultsWriter, git_commit
from anomaly_lab.callbacks.visualizer import Visualizer

__all__ = ["ResultsWriter", "Visualizer", "git_commit"]
