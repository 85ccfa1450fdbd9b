"""CPC-AD (de Haan & Löwe 2021): contrastive predictive coding losses as anomaly scores."""

from anomaly_lab.models.cpc_ad.model import CPCAD

__all__ = ["CPCAD"]
