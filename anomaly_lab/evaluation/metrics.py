"""Ranking metrics of raw anomaly scores (any range, no sigmoid), computed once on data held on the CPU.

A threshold t makes positive every score >= t. Image metrics and exact pixel metrics take every
distinct score as a threshold; binned pixel metrics take the edges of a histogram of the scores
and come with an upper bound of their error (`BinnedPixelMetrics`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from anomaly_lab.errors import DataError

EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
CHUNK = 1 << 20  # pixels processed at a time when walking the sorted pixels of the exact metrics


def quantile_threshold(scores: Tensor, q: float) -> float:
    """The ``q`` quantile (linear interpolation) of ``scores``: a threshold from normal validation scores.

    Uses numpy, which, unlike ``torch.quantile``, has no limit on the number of values (maps have millions).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    if scores.numel() == 0:
        raise ValueError("cannot choose a threshold from an empty set of scores")
    return float(np.quantile(scores.detach().flatten().cpu().double().numpy(), q))


def ordered_bits(scores: Tensor) -> np.ndarray:
    """uint32 keys of float32 scores that sort as the scores do: the bits with the sign bit set for
    x >= 0, all bits inverted for x < 0 (-0.0 is first made 0.0, its equal)."""
    bits = (scores.detach().cpu().float().flatten() + 0.0).numpy().view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | 0x80000000)


class Curves:
    """AUROC, AP, F1-max and AUPRO from the points of the ROC, PR and PRO curves, fed (in chunks of any
    length) in order of decreasing threshold.

    A point is what one threshold makes positive: ``fp`` normal and ``tp`` anomalous items (images or
    pixels), and ``pro``, the mean over ground-truth regions of the fraction of the region's pixels
    that are positive. Every curve starts at (0, 0). AUROC: trapezoids over (FPR, TPR), as sklearn's
    ``roc_auc_score``. AP: the sum of recall increments times precision, as sklearn's
    ``average_precision_score``. F1 = 2 tp / (tp + fp + anomalous). AUPRO: trapezoids over (FPR, PRO)
    up to ``fpr_limit`` (interpolated at the limit), divided by the limit, so it lies in [0, 1].
    """

    def __init__(self, normals: int, anomalous: int, fpr_limit: float = 0.3) -> None:
        self.normals, self.anomalous, self.fpr_limit = normals, anomalous, fpr_limit
        self.last_fpr = self.last_recall = self.last_pro = 0.0
        self.auroc = self.ap = self.f1 = self.pro_area = 0.0
        self.pro_limit_reached = False

    @property
    def aupro(self) -> float:
        return self.pro_area / self.fpr_limit

    def add(self, fp: np.ndarray, tp: np.ndarray, pro: np.ndarray | None = None) -> None:
        fpr = np.concatenate([[self.last_fpr], fp / self.normals])
        recall = np.concatenate([[self.last_recall], tp / self.anomalous])
        self.auroc += float(np.trapezoid(recall, fpr))
        self.ap += float(np.sum(np.diff(recall) * tp / (tp + fp)))
        self.f1 = max(self.f1, float(np.max(2 * tp / (tp + fp + self.anomalous))))
        self.last_fpr, self.last_recall = float(fpr[-1]), float(recall[-1])
        if pro is not None:
            if not self.pro_limit_reached:
                self._add_pro(fpr, np.concatenate([[self.last_pro], pro]))
            self.last_pro = float(pro[-1])

    def _add_pro(self, fpr: np.ndarray, pro: np.ndarray) -> None:
        inside = int(np.searchsorted(fpr, self.fpr_limit, side="right"))  # fpr[:inside] <= limit
        x, y = fpr[:inside], pro[:inside]
        if inside < len(fpr):
            left = inside - 1
            fraction = (self.fpr_limit - fpr[left]) / (fpr[inside] - fpr[left])
            x = np.append(x, self.fpr_limit)
            y = np.append(y, pro[left] + fraction * (pro[inside] - pro[left]))
            self.pro_limit_reached = True
        self.pro_area += float(np.trapezoid(y, x))


def descending_points(
    sorted_keys: np.ndarray, region_weights: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Cumulative (fp, tp, pro) at every distinct score, from the highest, for `Curves.add`.

    ``sorted_keys``: uint64 ascending, one per item, ``ordered_bits(score) << 32 | region`` (region 0:
    normal). ``region_weights[region]``: the region's share of PRO, 1 / (number of regions x its size);
    None: no PRO. Walks the items in chunks, so its memory does not grow with their number.
    """
    fp_carry, tp_carry, pro_carry = 0, 0, 0.0
    for end in range(len(sorted_keys), 0, -CHUNK):
        start = max(0, end - CHUNK)
        block = sorted_keys[start:end][::-1]
        score = block >> np.uint64(32)
        region = (block & np.uint64(0xFFFFFFFF)).astype(np.intp)
        last_of_score = np.empty(len(block), dtype=bool)  # the next item (maybe in the next chunk) scores lower
        last_of_score[:-1] = score[1:] != score[:-1]
        last_of_score[-1] = start == 0 or sorted_keys[start - 1] >> np.uint64(32) != score[-1]
        fp = fp_carry + np.cumsum(region == 0)
        tp = tp_carry + np.cumsum(region != 0)
        fp_carry, tp_carry = int(fp[-1]), int(tp[-1])
        pro = None
        if region_weights is not None:
            pro = pro_carry + np.cumsum(region_weights[region])
            pro_carry = float(pro[-1])
            pro = pro[last_of_score]
        if last_of_score.any():  # else the whole chunk ties with the next one's first items
            yield fp[last_of_score], tp[last_of_score], pro


def image_metrics(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Exact image AUROC, AP and F1-max of scores [N] against labels [N] (1 = anomalous, both present)."""
    anomalous = labels.cpu().numpy() == 1
    keys = np.sort(ordered_bits(scores).astype(np.uint64) << np.uint64(32) | anomalous.astype(np.uint64))
    curves = Curves(int((~anomalous).sum()), int(anomalous.sum()))
    for fp, tp, _ in descending_points(keys):
        curves.add(fp, tp)
    return {"image_auroc": curves.auroc, "image_ap": curves.ap, "image_f1": curves.f1}


def check_pixel_classes(normals: int, anomalous: int, images: int) -> None:
    """Stop with a message naming the remedy unless the test pixels hold both classes."""
    if anomalous == 0:
        raise DataError(
            f"pixel metrics need anomalous regions in the test masks, but all {images} test masks are empty: "
            "give the anomalous test images their masks, or set evaluator.pixel_metrics=false"
        )
    if normals == 0:
        raise DataError(
            f"pixel metrics need normal pixels to count false positives, but every pixel of the {images} "
            "test masks is anomalous: add normal test images, or set evaluator.pixel_metrics=false"
        )


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions (8-connectivity) of a binary mask [H, W]: int32 labels 1..count (0 = normal), count."""
    return ndimage.label(mask, structure=EIGHT_CONNECTIVITY, output=np.int32)


def pixel_results(curves: Curves) -> dict[str, float]:
    return {"pixel_auroc": curves.auroc, "pixel_f1": curves.f1, "pixel_aupro": curves.aupro}


class ExactPixelMetrics:
    """Exact pixel AUROC, F1-max and AUPRO: every pixel is kept on the CPU (float32 score and bool
    target, 5 bytes a pixel); ``compute`` takes 8 more bytes a pixel (one sorted key each).

    A region is a connected set of anomalous pixels (8-connectivity) of one image; see `Curves`.
    `state` and `merge` pass the data of other processes in and out as lists of CPU tensors.
    """

    def __init__(self, fpr_limit: float = 0.3) -> None:
        self.fpr_limit = fpr_limit
        self.maps: list[Tensor] = []
        self.masks: list[Tensor] = []

    def update(self, maps: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
        """Add images: each map [H, W] float and its mask [H, W] bool (True = anomalous), on the CPU."""
        self.maps += [m.float().contiguous() for m in maps]
        self.masks += [m.bool().contiguous() for m in masks]

    @property
    def images(self) -> int:
        return len(self.maps)

    def state(self) -> list[Tensor]:
        return [*self.maps, *self.masks]

    def merge(self, state: list[Tensor]) -> None:
        half = len(state) // 2
        self.update(state[:half], state[half:])

    def compute(self) -> dict[str, float]:
        anomalous = sum(int(m.sum()) for m in self.masks)
        check_pixel_classes(sum(m.numel() for m in self.masks) - anomalous, anomalous, len(self.masks))
        keys = np.empty(sum(m.numel() for m in self.maps), dtype=np.uint64)
        region_sizes, num_regions, position = [], 0, 0
        for score, mask in zip(self.maps, self.masks, strict=True):
            labels, count = label_regions(mask.numpy())
            regions = np.where(labels > 0, labels + num_regions, 0).astype(np.uint64).ravel()
            end = position + len(regions)
            keys[position:end] = ordered_bits(score).astype(np.uint64) << np.uint64(32) | regions
            region_sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
            num_regions, position = num_regions + count, end
        weights = np.concatenate([[0.0], 1.0 / (num_regions * np.concatenate(region_sizes).astype(np.float64))])
        keys.sort()
        curves = Curves(len(keys) - anomalous, anomalous, self.fpr_limit)
        for fp, tp, pro in descending_points(keys, weights):
            curves.add(fp, tp, pro)
        return pixel_results(curves)


class BinnedPixelMetrics:
    """Pixel AUROC, F1-max and AUPRO from histograms of the scores: memory independent of the number
    of pixels (3 x 8 bytes x 2^(9 + bits) bins: 48 MB for ``bits=12``), and an error bound with each value.

    A pixel's bin is the top 9 + ``bits`` bits of its `ordered_bits` (sign, exponent and ``bits``
    mantissa bits): bins of relative width 2^-bits over every float32, so no score range is needed.
    Three histograms: normal pixels, anomalous pixels, and anomalous pixels weighted by 1 / (size of
    their region), which gives PRO. The curves are read at every bin edge; those points are points of
    the exact curves, and between two of them an exact curve is monotone, so it stays in the box they
    span. Hence, over consecutive points i, i+1 (with FPR f, TPR t, PRO p, positives k = tp + fp):
    - |AUROC - exact| <= sum (f[i+1] - f[i]) (t[i+1] - t[i]) / 2, at most half the largest fraction
      of normal pixels in one bin;
    - |AUPRO - exact| <= sum (min(f[i+1], limit) - f[i])+ (p[i+1] - p[i]) / limit;
    - 0 <= exact F1-max - F1-max <= max 2 tp[i+1] / (k[i] + anomalous) - F1-max.
    `error_bounds` gives these numbers after `compute`.
    """

    def __init__(self, fpr_limit: float = 0.3, bits: int = 12) -> None:
        self.fpr_limit = fpr_limit
        self.shift = 23 - bits
        bins = 1 << (9 + bits)
        self.normal = torch.zeros(bins, dtype=torch.int64)
        self.anomalous = torch.zeros(bins, dtype=torch.int64)
        self.overlap = torch.zeros(bins, dtype=torch.float64)  # sum of 1 / region size
        self.counts = torch.zeros(2, dtype=torch.int64)  # regions, images
        self.error_bounds: dict[str, float] = {}

    def update(self, maps: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
        """Add images: each map [H, W] float and its mask [H, W] bool (True = anomalous), on the CPU."""
        for score, mask in zip(maps, masks, strict=True):
            labels, count = label_regions(mask.numpy())
            labels = labels.ravel()
            bins = ordered_bits(score) >> self.shift
            anomalous = labels > 0
            add_to_histogram(self.normal, bins[~anomalous])
            add_to_histogram(self.anomalous, bins[anomalous])
            sizes = np.bincount(labels)
            add_to_histogram(self.overlap, bins[anomalous], 1.0 / sizes[labels[anomalous]])
            self.counts += torch.tensor([count, 1])

    @property
    def images(self) -> int:
        return int(self.counts[1])

    def state(self) -> list[Tensor]:
        return [self.normal, self.anomalous, self.overlap, self.counts]

    def merge(self, state: list[Tensor]) -> None:
        for mine, theirs in zip(self.state(), state, strict=True):
            mine += theirs

    def compute(self) -> dict[str, float]:
        regions, images = self.counts.tolist()
        normals, anomalous = int(self.normal.sum()), int(self.anomalous.sum())
        check_pixel_classes(normals, anomalous, images)
        occupied = torch.nonzero(self.normal + self.anomalous).flatten().flip(0).numpy()  # from the highest bin
        fp = np.cumsum(self.normal.numpy()[occupied])
        tp = np.cumsum(self.anomalous.numpy()[occupied])
        pro = np.cumsum(self.overlap.numpy()[occupied]) / regions
        curves = Curves(normals, anomalous, self.fpr_limit)
        curves.add(fp, tp, pro)
        results = pixel_results(curves)
        f, t, p, k = (np.concatenate([[0.0], a]) for a in (fp / normals, tp / anomalous, pro, fp + tp))
        self.error_bounds = {
            "pixel_auroc": float(np.sum(np.diff(f) * np.diff(t)) / 2),
            "pixel_f1": float(np.max(2 * t[1:] * anomalous / (k[:-1] + anomalous))) - results["pixel_f1"],
            "pixel_aupro": float(np.sum(np.clip(np.minimum(f[1:], self.fpr_limit) - f[:-1], 0, None) * np.diff(p)))
            / self.fpr_limit,
        }
        return results


def add_to_histogram(histogram: Tensor, bins: np.ndarray, weights: np.ndarray | None = None) -> None:
    """Add one (or ``weights``) to ``histogram`` at each of ``bins``, counting only over their range."""
    if len(bins):
        low = int(bins.min())
        counts = np.bincount(bins - low, weights)
        histogram[low : low + len(counts)] += torch.from_numpy(counts)
