"""Metrics, thresholds and the Evaluator callback, the same for every method."""

from anomaly_lab.evaluation.defect_area import DefectAreaEvaluator
from anomaly_lab.evaluation.evaluator import Evaluator
from anomaly_lab.evaluation.metrics import (
    BinnedPixelMetrics,
    ExactPixelMetrics,
    image_metrics,
    quantile_threshold,
)

__all__ = [
    "BinnedPixelMetrics",
    "DefectAreaEvaluator",
    "Evaluator",
    "ExactPixelMetrics",
    "image_metrics",
    "quantile_threshold",
]
