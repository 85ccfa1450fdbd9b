"""Metrics, thresholds and the Evaluator callback, the same for every method."""

from anomaly_lab.evaluation.defect_area import DefectAreaEvaluator
from anomaly_lab.evaluation.evaluator import Evaluator
from anomaly_lab.evaluation.metrics import AUPRO, F1Max, quantile_threshold

__all__ = ["AUPRO", "DefectAreaEvaluator", "Evaluator", "F1Max", "quantile_threshold"]
