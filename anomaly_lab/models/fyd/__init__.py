"""FYD, "Focus Your Distribution" (Zheng et al. 2022): coarse-to-fine non-contrastive learning."""

from anomaly_lab.models.fyd.model import FYD

__all__ = ["FYD"]
