"""Metrics against plain references: sklearn, brute-force F1 and a per-threshold AUPRO."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly_lab.evaluation import AUPRO, F1Max, quantile_threshold
from anomaly_lab.evaluation.metrics import binary_auroc, binary_average_precision


def tied_scores(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw scores far outside [0, 1] (a sigmoid would saturate them) with many ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(30.0 + 3.0 * labels, 4.0), 0)
    return labels, scores


def random_masks_and_maps(seed: int, n: int = 4, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (several regions, one empty image) and noisy maps rounded to create ties."""
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5)) > 0.56).astype(np.uint8)
    masks[0] = 0
    maps = np.round(rng.random((n, size, size)) + 0.6 * masks, 2)
    return masks, maps


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Loop over each distinct threshold; trapezoid from (0, 0) up to the limit; divide by the limit."""
    regions = []
    for image_index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image_index, labels == k) for k in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        fprs.append((positive & normal).sum() / normal.sum())
        pros.append(np.mean([positive[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = np.searchsorted(fprs, fpr_limit, side="right")
    x, y = fprs[:inside], pros[:inside]
    if inside < len(fprs):
        before, after = inside - 1, inside
        slope = (pros[after] - pros[before]) / (fprs[after] - fprs[before])
        x = np.append(x, fpr_limit)
        y = np.append(y, pros[before] + slope * (fpr_limit - fprs[before]))
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def aupro_of(masks: np.ndarray, maps: np.ndarray, **kwargs) -> float:
    metric = AUPRO(**kwargs)
    metric.update(torch.from_numpy(maps).float(), torch.from_numpy(masks))
    return float(metric.compute())


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_and_ap_match_sklearn_on_raw_tied_scores(seed):
    labels, scores = tied_scores(seed)
    auroc, ap = binary_auroc(), binary_average_precision()
    for chunk in np.array_split(np.arange(len(labels)), 4):
        preds, target = torch.tensor(scores[chunk], dtype=torch.float32), torch.tensor(labels[chunk])
        auroc.update(preds, target)
        ap.update(preds, target)
    assert float(auroc.compute()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert float(ap.compute()) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_f1max_matches_brute_force_over_thresholds(seed):
    labels, scores = tied_scores(seed)
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_positives = np.sum(predicted & (labels == 1))
        best = max(best, 2 * true_positives / (predicted.sum() + labels.sum()))
    metric = F1Max()
    metric.update(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert float(metric.compute()) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    masks, maps = random_masks_and_maps(seed)
    assert aupro_of(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
        brute_force_aupro(masks, maps, fpr_limit), abs=1e-3
    )


def test_aupro_of_a_perfect_map_is_one_and_never_above_one():
    masks, _ = random_masks_and_maps(0)
    assert aupro_of(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-9)
    for seed in range(5):
        masks, maps = random_masks_and_maps(seed)
        for fpr_limit in (0.01, 0.3, 1.0):
            assert 0.0 <= aupro_of(masks, 2.0 * masks + maps, fpr_limit=fpr_limit) <= 1.0


def test_aupro_with_evenly_spaced_thresholds_is_close_to_exact():
    masks, maps = random_masks_and_maps(1, n=6, size=32)
    exact = aupro_of(masks, maps)
    assert aupro_of(masks, maps, num_thresholds=500) == pytest.approx(exact, abs=5e-3)


def test_aupro_updates_over_batches_equal_one_update_with_all_data():
    masks, maps = random_masks_and_maps(2, n=6)
    metric = AUPRO()
    for batch in np.array_split(np.arange(len(masks)), 3):
        metric.update(
            torch.from_numpy(maps[batch]).float()[:, None], torch.from_numpy(masks[batch]).float()[:, None]
        )
    assert float(metric.compute()) == pytest.approx(aupro_of(masks, maps), abs=1e-7)


def test_aupro_counts_diagonal_neighbours_as_one_region():
    mask = np.zeros((1, 6, 6), dtype=np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = 1  # one region with 8-connectivity, two with 4-connectivity
    mask[0, 4, 4] = mask[0, 4, 5] = 1  # a second region
    score = np.zeros((1, 6, 6), dtype=np.float32)
    score[0, 1, 1] = score[0, 4, 4] = score[0, 4, 5] = 1.0  # catches half of region one, all of region two
    # curve (0, 0) -> (0, PRO 0.75) -> (1, 1): mean height over [0, 0.3] is 0.75 + 0.25 * 0.3 / 2
    assert aupro_of(mask, score, fpr_limit=0.3) == pytest.approx(0.75 + 0.25 * 0.15, abs=1e-6)


def test_aupro_without_any_region_raises():
    with pytest.raises(ValueError, match="at least one anomalous region"):
        aupro_of(np.zeros((2, 8, 8), dtype=np.uint8), np.random.default_rng(0).random((2, 8, 8)))


def test_quantile_threshold_matches_numpy():
    scores = torch.randn(1000)
    assert quantile_threshold(scores, 0.99) == pytest.approx(
        float(np.quantile(scores.numpy(), 0.99)), rel=1e-6
    )
    with pytest.raises(ValueError):
        quantile_threshold(scores, 1.5)
