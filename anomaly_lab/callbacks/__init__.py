"""Callbacks shared by every method: heat-map panels, the run's metrics.json, early stopping on the best weights."""

from anomaly_lab.callbacks.early_stopping import EarlyStoppingOnBest
from anomaly_lab.callbacks.results import ResultsWriter, git_commit
from anomaly_lab.callbacks.visualizer import Visualizer

__all__ = ["EarlyStoppingOnBest", "ResultsWriter", "Visualizer", "git_commit"]
