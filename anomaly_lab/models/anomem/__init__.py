"""AnoMem (Jezequel et al. 2023): SimCLR with multi-scale Hopfield memories."""

from anomaly_lab.models.anomem.model import AnoMem

__all__ = ["AnoMem"]
