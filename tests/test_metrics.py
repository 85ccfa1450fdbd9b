"""Metrics against plain references: sklearn, brute-force F1 and a per-threshold AUPRO; binned within its bounds."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

import anomaly_lab.evaluation.metrics as metrics
from anomaly_lab.errors import DataError
from anomaly_lab.evaluation import BinnedPixelMetrics, ExactPixelMetrics, image_metrics, quantile_threshold
from anomaly_lab.evaluation.metrics import ordered_bits


def tied_scores(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw scores far outside [0, 1] (a sigmoid would saturate them) with many ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(30.0 + 3.0 * labels, 4.0), 0)
    return labels, scores


def random_masks_and_maps(seed: int, n: int = 4, size: int = 20, decimals: int | None = 2):
    """Blob masks (several regions, one empty image) and noisy maps, rounded to create ties unless decimals=None."""
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5)) > 0.56).astype(np.uint8)
    masks[0] = 0
    maps = (rng.random((n, size, size)) + 0.6 * masks).astype(np.float32)
    return masks, maps if decimals is None else np.round(maps, decimals)


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        best = max(best, 2 * np.sum(predicted & (labels == 1)) / (predicted.sum() + labels.sum()))
    return best


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


def pixel_metrics_of(masks: np.ndarray, maps: np.ndarray, bits: int | None = None, **kwargs) -> dict[str, float]:
    metric = ExactPixelMetrics(**kwargs) if bits is None else BinnedPixelMetrics(bits=bits, **kwargs)
    metric.update(torch.from_numpy(maps).float(), torch.from_numpy(masks).bool())
    results = metric.compute()
    if bits is not None:
        results["bounds"] = metric.error_bounds
    return results


@pytest.fixture
def small_chunks(monkeypatch):
    """Walk the sorted pixels a few at a time, so that runs of tied scores straddle chunks."""
    monkeypatch.setattr(metrics, "CHUNK", 7)


def test_ordered_bits_sort_as_the_scores():
    scores = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 2.0, 3e38, float("inf")])
    keys = ordered_bits(scores)
    assert np.all(np.diff(keys.astype(np.int64)[[0, 1, 2, 3, 5, 6, 7, 8, 9]]) > 0)
    assert keys[3] == keys[4]  # -0.0 == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_image_metrics_match_sklearn_and_brute_force_on_raw_tied_scores(seed):
    labels, scores = tied_scores(seed)
    results = image_metrics(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert results["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert results["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert results["image_f1"] == pytest.approx(brute_force_f1(labels, scores), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_exact_pixel_metrics_match_references(seed, fpr_limit, small_chunks):
    masks, maps = random_masks_and_maps(seed)
    results = pixel_metrics_of(masks, maps, fpr_limit=fpr_limit)
    assert results["pixel_aupro"] == pytest.approx(brute_force_aupro(masks, maps, fpr_limit), abs=1e-9)
    assert results["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert results["pixel_f1"] == pytest.approx(brute_force_f1(masks.ravel(), maps.ravel()), abs=1e-9)


def test_exact_pixel_metrics_do_not_depend_on_the_chunk_size(monkeypatch):
    masks, maps = random_masks_and_maps(1, n=6, size=32)
    whole = pixel_metrics_of(masks, maps)
    for chunk in (1, 5, 64):
        monkeypatch.setattr(metrics, "CHUNK", chunk)
        assert pixel_metrics_of(masks, maps) == pytest.approx(whole, abs=1e-12)


def test_aupro_of_a_perfect_map_is_one_and_never_above_one():
    masks, _ = random_masks_and_maps(0)
    assert pixel_metrics_of(masks, masks.astype(np.float32))["pixel_aupro"] == pytest.approx(1.0, abs=1e-9)
    for seed in range(5):
        masks, maps = random_masks_and_maps(seed)
        for fpr_limit in (0.01, 0.3, 1.0):
            assert 0.0 <= pixel_metrics_of(masks, 2.0 * masks + maps, fpr_limit=fpr_limit)["pixel_aupro"] <= 1.0


def test_aupro_counts_diagonal_neighbours_as_one_region():
    mask = np.zeros((1, 6, 6), dtype=np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = 1  # one region with 8-connectivity, two with 4-connectivity
    mask[0, 4, 4] = mask[0, 4, 5] = 1  # a second region
    score = np.zeros((1, 6, 6), dtype=np.float32)
    score[0, 1, 1] = score[0, 4, 4] = score[0, 4, 5] = 1.0  # catches half of region one, all of region two
    # curve (0, 0) -> (0, PRO 0.75) -> (1, 1): mean height over [0, 0.3] is 0.75 + 0.25 * 0.3 / 2
    for bits in (None, 4):
        assert pixel_metrics_of(mask, score, bits)["pixel_aupro"] == pytest.approx(0.75 + 0.25 * 0.15, abs=1e-9)


def test_pixels_given_in_any_batches_or_processes_give_the_same_metrics():
    masks, maps = random_masks_and_maps(2, n=6)
    for bits in (None, 8):
        whole = pixel_metrics_of(masks, maps, bits)
        first, second = (ExactPixelMetrics() if bits is None else BinnedPixelMetrics(bits=bits) for _ in range(2))
        for metric, images in ((first, [0, 1]), (second, [2, 3, 4])):
            metric.update(torch.from_numpy(maps[images]), torch.from_numpy(masks[images]).bool())
        first.update(torch.from_numpy(maps[5:]), torch.from_numpy(masks[5:]).bool())
        first.merge(second.state())  # what rank 0 does with another process's state
        merged = first.compute()
        assert merged == pytest.approx({k: v for k, v in whole.items() if k != "bounds"}, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits", [3, 6, 10])
def test_binned_pixel_metrics_lie_within_their_bounds_of_exact(seed, bits):
    masks, maps = random_masks_and_maps(seed, n=8, size=32, decimals=None)
    maps = np.exp(3 * maps) - 10.0  # negative and positive scores over several octaves
    exact, binned = pixel_metrics_of(masks, maps), pixel_metrics_of(masks, maps, bits)
    for name, bound in binned["bounds"].items():
        assert 0 <= bound
        assert abs(binned[name] - exact[name]) <= bound + 1e-12, name
    assert binned["pixel_f1"] <= exact["pixel_f1"] + 1e-12  # its thresholds are some of the exact ones
    if bits == 10:  # bins of 0.1 %: the bounds are small on continuous scores
        assert max(binned["bounds"].values()) < 1e-3


def test_binned_pixel_metrics_are_exact_when_each_score_has_its_own_bin():
    masks, maps = random_masks_and_maps(3, n=5, size=24)  # scores rounded to 0.01 in [0, 1.6]
    exact, binned = pixel_metrics_of(masks, maps), pixel_metrics_of(masks, maps, bits=12)
    assert {k: binned[k] for k in exact} == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("bits", [None, 6])
def test_pixel_metrics_without_any_region_or_normal_pixel_name_the_remedy(bits):
    empty, full = np.zeros((2, 8, 8), dtype=np.uint8), np.ones((2, 8, 8), dtype=np.uint8)
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    with pytest.raises(DataError, match=r"all 2 test masks are empty.*evaluator.pixel_metrics=false"):
        pixel_metrics_of(empty, maps, bits)
    with pytest.raises(DataError, match=r"every pixel of the 2 test masks is anomalous.*pixel_metrics=false"):
        pixel_metrics_of(full, maps, bits)


def test_quantile_threshold_matches_numpy():
    scores = torch.randn(1000)
    assert quantile_threshold(scores, 0.99) == pytest.approx(float(np.quantile(scores.numpy(), 0.99)), rel=1e-6)
    with pytest.raises(ValueError):
        quantile_threshold(scores, 1.5)
