"""One module per method, each a LightningModule over :class:`AnomalyModel`."""

from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.padim import Padim

__all__ = ["AnomalyModel", "Padim", "ScoreOutput"]
