"""SSAE (Bauer 2022): an autoencoder trained to undo elastic patch corruptions."""

from anomaly_lab.models.ssae.model import Ssae

__all__ = ["Ssae"]
