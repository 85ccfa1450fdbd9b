"""Anomaly detection metrics as torchmetrics ``Metric`` objects, correct under DDP.

Scores are raw anomaly scores of any range: every metric here is built with ``normalization=None``
so torchmetrics never applies a sigmoid (which saturates large scores into ties and, being decided
per batch, may treat two batches differently).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve
from torchmetrics.utilities import dim_zero_cat

EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def quantile_threshold(scores: Tensor, q: float) -> float:
    """The ``q`` quantile (linear interpolation) of ``scores``: a threshold from normal validation scores.

    Uses numpy, which, unlike ``torch.quantile``, has no limit on the number of values (maps have millions).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    if scores.numel() == 0:
        raise ValueError("cannot choose a threshold from an empty set of scores")
    return float(np.quantile(scores.detach().flatten().cpu().double().numpy(), q))


def binary_auroc() -> BinaryAUROC:
    """Exact AUROC (every distinct score a threshold) of raw scores."""
    return BinaryAUROC(thresholds=None, normalization=None)


def binary_average_precision() -> BinaryAveragePrecision:
    """Exact average precision (step-wise area under the precision-recall curve) of raw scores."""
    return BinaryAveragePrecision(thresholds=None, normalization=None)


class F1Max(BinaryPrecisionRecallCurve):
    """The maximum F1 score over every threshold of the exact precision-recall curve.

    F1 = 2 P R / (P + R); points where P + R = 0 count as F1 = 0.
    """

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(thresholds=None, normalization=None, **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        precision, recall, _ = super().compute()
        f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
        return f1.max()


class AUPRO(Metric):
    """Normalised area under the per-region overlap (PRO) curve, up to a false positive rate limit.

    For a threshold t (a pixel is positive when its score >= t):
    - FPR(t): the fraction of normal pixels (of all images) that are positive;
    - PRO(t): the mean, over every connected ground-truth region (8-connectivity, labelled per image),
      of the fraction of the region's pixels that are positive.
    The curve starts at (0, 0), is integrated with the trapezoid rule from FPR 0 to ``fpr_limit``
    (interpolated at exactly the limit) and divided by ``fpr_limit``, so the value lies in [0, 1].

    Thresholds are every distinct score (exact, default) or ``num_thresholds`` evenly spaced between
    the lowest and highest score. Inputs: ``preds`` and ``target`` of shape [B, H, W] or [B, 1, H, W],
    ``target`` binary (1 = anomalous). All maps are kept (states concatenated across processes);
    the curve is computed on CPU, its sums in float64.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.3, num_thresholds: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"AUPRO fpr_limit must be in (0, 1], got {fpr_limit}")
        if num_thresholds is not None and num_thresholds < 2:
            raise ValueError(f"AUPRO num_thresholds must be None (exact) or at least 2, got {num_thresholds}")
        self.fpr_limit = fpr_limit
        self.num_thresholds = num_thresholds
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if (
            preds.shape != target.shape
            or preds.ndim not in (3, 4)
            or (preds.ndim == 4 and preds.shape[1] != 1)
        ):
            raise ValueError(
                "AUPRO expects preds and target of the same shape [B, H, W] or [B, 1, H, W], "
                f"got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        self.preds.append(preds.detach().reshape(-1, *preds.shape[-2:]).float())
        self.target.append((target.reshape(-1, *target.shape[-2:]) > 0.5).to(torch.uint8))

    def compute(self) -> Tensor:
        scores = dim_zero_cat(self.preds).cpu()
        regions = label_regions(dim_zero_cat(self.target).cpu())
        fpr, pro = pro_curve(scores.flatten(), regions.flatten(), self.num_thresholds)
        area = area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit
        return area.to(dtype=torch.float32, device=self.device)


def label_regions(masks: Tensor) -> Tensor:
    """Connected regions (8-connectivity) of binary masks [N, H, W], numbered 1..R across all images; 0 = normal."""
    regions = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for index, mask in enumerate(masks.numpy()):
        labels, count = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
        regions[index] = np.where(labels > 0, labels + num_regions, 0)
        num_regions += count
    if num_regions == 0:
        raise ValueError(
            "AUPRO needs at least one anomalous region in the ground-truth masks, but every mask is empty"
        )
    return torch.from_numpy(regions)


def pro_curve(scores: Tensor, regions: Tensor, num_thresholds: int | None = None) -> tuple[Tensor, Tensor]:
    """FPR and PRO for decreasing thresholds, starting at (0, 0); 1-D scores and region ids (0 = normal).

    PRO(t) = sum over positive pixels of 1 / (R * size of the pixel's region), so both curves are
    cumulative sums over pixels sorted by decreasing score, read at the rank where each threshold cuts.
    """
    normal = regions == 0
    if not normal.any():
        raise ValueError(
            "AUPRO needs normal pixels to measure the false positive rate, but every pixel is anomalous"
        )
    region_sizes = torch.bincount(regions)
    num_regions = int((region_sizes[1:] > 0).sum())
    overlap_weight = torch.where(normal, 0.0, 1.0 / (num_regions * region_sizes[regions].double()))
    normal_weight = normal.double() / normal.sum()

    descending_scores, order = torch.sort(scores, descending=True)
    zero = torch.zeros(1, dtype=torch.float64)
    fpr_at_rank = torch.cat([zero, normal_weight[order].cumsum(0)])
    pro_at_rank = torch.cat([zero, overlap_weight[order].cumsum(0)])
    ranks = threshold_ranks(descending_scores, num_thresholds)
    return fpr_at_rank[ranks], pro_at_rank[ranks]


def threshold_ranks(descending_scores: Tensor, num_thresholds: int | None) -> Tensor:
    """For each threshold, from high to low, the number of pixels scoring >= it; led by 0 (nothing positive).

    Exact: every distinct score is a threshold. Otherwise ``num_thresholds`` evenly spaced from max to min.
    """
    zero = torch.zeros(1, dtype=torch.long)
    if num_thresholds is None:
        last_of_each_value = torch.nonzero(descending_scores[1:] != descending_scores[:-1]).flatten()
        counts = torch.cat([last_of_each_value + 1, torch.tensor([descending_scores.numel()])])
    else:
        ascending = descending_scores.flip(0)
        highest, lowest = float(descending_scores[0]), float(descending_scores[-1])
        thresholds = torch.linspace(highest, lowest, num_thresholds, dtype=ascending.dtype)
        counts = ascending.numel() - torch.searchsorted(ascending, thresholds)
    return torch.cat([zero, counts])


def area_up_to(fpr: Tensor, pro: Tensor, fpr_limit: float) -> Tensor:
    """Trapezoid area under a non-decreasing (fpr, pro) curve from fpr[0] to ``fpr_limit``, interpolated at the limit."""
    inside = int(torch.searchsorted(fpr, torch.tensor([fpr_limit], dtype=fpr.dtype), right=True))
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.numel():
        left, right = inside - 1, inside
        fraction = (fpr_limit - fpr[left]) / (fpr[right] - fpr[left])
        x = torch.cat([x, torch.tensor([fpr_limit], dtype=fpr.dtype)])
        y = torch.cat([y, (pro[left] + fraction * (pro[right] - pro[left])).reshape(1)])
    return torch.trapezoid(y, x)
