"""One module per method, each a LightningModule over :class:`AnomalyModel`."""

from anomaly_lab.models.anomem import AnoMem
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.cpc_ad import CPCAD
from anomaly_lab.models.fyd import FYD
from anomaly_lab.models.padim import Padim
from anomaly_lab.models.ssae import Ssae

__all__ = ["AnoMem", "CPCAD", "FYD", "AnomalyModel", "Padim", "ScoreOutput", "Ssae"]
