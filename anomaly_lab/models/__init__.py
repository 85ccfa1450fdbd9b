"""The methods: one folder per method (its LightningModule in `model.py`, beside its own networks,
losses and scores), each a LightningModule over :class:`AnomalyModel` (`base.py`); PaDiM and PatchCore,
the baselines, are one module each. Blocks that two methods share live in `anomaly_lab.nn`."""

from anomaly_lab.models.anomem import AnoMem
from anomaly_lab.models.base import AnomalyModel, ScoreOutput
from anomaly_lab.models.cpc_ad import CPCAD
from anomaly_lab.models.fyd import FYD
from anomaly_lab.models.padim import Padim
from anomaly_lab.models.patchcore import Patchcore
from anomaly_lab.models.ssae import Ssae

__all__ = ["AnoMem", "CPCAD", "FYD", "AnomalyModel", "Padim", "Patchcore", "ScoreOutput", "Ssae"]
