"""Tests of moleflow.metrics against scikit-learn, a brute-force AUPRO and hand computations."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from moleflow import metrics as M

TOL = 1e-10


def _random_case(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores)  # a handful of distinct values, shared by both classes
    return scores, labels


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float = 2.5,
           quantile: float = 0.9) -> np.ndarray:
    """Blob-shaped masks: a smoothed random field above its per-image quantile."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, sigma, sigma))
    return field > np.quantile(field, quantile, axis=(1, 2), keepdims=True)


def _pixel_case(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = _blobs(rng, shape)
    maps = (rng.normal(size=shape) + 1.5 * masks).astype(np.float32)
    return maps, masks


def _sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


# ---------------------------------------------------------------------------------------------
# Image-level ranking metrics against sklearn


CASES = {
    "random": _random_case(0),
    "random_small": _random_case(1, n=17),
    "ties": _random_case(2, ties=True),
    "ties_many": _random_case(3, n=2000, ties=True),
    "separable": (np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1], dtype=bool)),
    "reversed": (np.array([0.8, 0.9, 0.1, 0.2, 0.3]), np.array([0, 0, 1, 1, 1], dtype=bool)),
    "all_tied": (np.zeros(6), np.array([0, 1, 0, 1, 1, 0], dtype=bool)),
    "int_scores_int_labels": (np.array([3, 1, 2, 2, 5, 0, 2]), np.array([1, 0, 1, 0, 1, 0, 0])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ranking_metrics_match_sklearn(name: str) -> None:
    scores, labels = CASES[name]
    assert abs(M.auroc(scores, labels) - roc_auc_score(labels, scores)) < TOL
    assert abs(M.average_precision(scores, labels) - average_precision_score(labels, scores)) < TOL
    f1, thr = M.f1_max(scores, labels)
    assert abs(f1 - _sklearn_f1_max(scores, labels)) < TOL
    # applying the returned threshold reproduces the F1
    assert abs(f1_score(labels.astype(bool), scores >= thr) - f1) < TOL
    assert thr in set(scores[labels.astype(bool)].tolist())


def test_separable_and_reversed_extremes() -> None:
    s, y = CASES["separable"]
    assert M.auroc(s, y) == 1.0 and M.average_precision(s, y) == 1.0
    assert M.f1_max(s, y) == (1.0, 0.8)
    s, y = CASES["reversed"]
    assert M.auroc(s, y) == 0.0
    assert M.auroc(np.zeros(4), np.array([0, 1, 0, 1])) == 0.5


def test_f1_threshold_prefers_highest_among_ties() -> None:
    # thresholds 0.9 (tp=1, fp=0 -> F1 2/3) and 0.5 (tp=2, fp=2 -> F1 2/3): the higher one wins
    scores = np.array([0.9, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 0, 1], dtype=bool)
    f1, thr = M.f1_max(scores, labels)
    assert abs(f1 - 2 / 3) < TOL and thr == 0.9


def test_one_class_gives_nan() -> None:
    s = np.array([0.1, 0.5, 0.3])
    for y in (np.zeros(3, bool), np.ones(3, bool)):
        assert math.isnan(M.auroc(s, y))
        assert math.isnan(M.average_precision(s, y))
        assert all(math.isnan(v) for v in M.f1_max(s, y))
        assert all(math.isnan(v) for v in M.image_metrics(s, y).values())
    assert math.isnan(M.auroc(np.array([]), np.array([], bool)))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        M.auroc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="negative"):
        M.auroc(np.zeros(3), np.array([-1, 1, 1]))  # {-1, 1} labels are not silently misread
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        M.pixel_auroc(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.zeros((1, 4, 4)), np.ones((1, 4, 4), bool), fpr_limit=0.0)


def test_image_metrics_bundle() -> None:
    s, y = CASES["ties"]
    out = M.image_metrics(s, y)
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max"}
    assert abs(out["image_auroc"] - roc_auc_score(y, s)) < TOL
    assert abs(out["image_ap"] - average_precision_score(y, s)) < TOL
    assert abs(out["image_f1_max"] - _sklearn_f1_max(s, y)) < TOL
    assert all(0.0 <= v <= 1.0 for v in out.values())


# ---------------------------------------------------------------------------------------------
# Pixel level against sklearn


@pytest.mark.parametrize("shape", [(6, 32, 32), (40, 128, 128)])
def test_pixel_metrics_match_sklearn(shape: tuple[int, int, int]) -> None:
    maps, masks = _pixel_case(5, shape)
    assert maps.dtype == np.float32 and masks.any() and not masks.all()
    flat_s, flat_y = maps.ravel(), masks.ravel()
    ref_auc = roc_auc_score(flat_y, flat_s)
    ref_ap = average_precision_score(flat_y, flat_s)
    assert abs(M.pixel_auroc(maps, masks) - ref_auc) < TOL
    assert abs(M.pixel_average_precision(maps, masks) - ref_ap) < TOL
    out = M.pixel_metrics(maps, masks)
    assert set(out) == {"pixel_auroc", "pixel_ap", "aupro"}
    assert abs(out["pixel_auroc"] - ref_auc) < TOL and abs(out["pixel_ap"] - ref_ap) < TOL
    assert out["aupro"] == M.aupro(maps, masks)


def test_pixel_metrics_with_heavy_ties_match_sklearn() -> None:
    maps, masks = _pixel_case(6, (6, 32, 32))
    maps = np.round(maps * 4).astype(np.float32) / 4
    assert abs(M.pixel_auroc(maps, masks) - roc_auc_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(M.pixel_average_precision(maps, masks) - average_precision_score(masks.ravel(), maps.ravel())) < TOL


def test_pixel_metrics_without_anomalous_pixels_are_nan() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    out = M.pixel_metrics(maps, np.zeros((2, 8, 8), bool))
    assert all(math.isnan(v) for v in out.values())
    assert math.isnan(M.aupro(maps, np.ones((2, 8, 8), bool)))  # no normal pixel: FPR undefined


# ---------------------------------------------------------------------------------------------
# AUPRO


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    # image 0: region R1 = two diagonal neighbours (one region under 8-connectivity), size 2
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps[0, 0, 0], maps[0, 1, 1] = 0.9, 0.5
    maps[0, 0, 3] = maps[0, 3, 0] = 0.8  # 2 normal pixels at 0.8
    maps[0, 3, 1:] = 0.4
    maps[0, 2, 3] = 0.4  # 4 normal pixels at 0.4
    # image 1: region R2 = 2x2 block, size 4, scores 0.9, 0.7, 0.3, 0.3
    masks[1, 2:, 2:] = True
    maps[1, 2, 2], maps[1, 2, 3], maps[1, 3, 2], maps[1, 3, 3] = 0.9, 0.7, 0.3, 0.3
    maps[1, 0, :] = 0.6  # 4 normal pixels at 0.6; the other 16 normal pixels are 0.0
    return maps, masks


def test_aupro_hand_checked() -> None:
    # 2 regions, 26 normal pixels (2 at 0.8, 4 at 0.6, 4 at 0.4, 16 at 0.0).
    #   t    FPR     PRO
    #   0.9  0       (1/2 + 1/4)/2 = 0.375
    #   0.8  2/26    0.375
    #   0.7  2/26    (1/2 + 2/4)/2 = 0.5
    #   0.6  6/26    0.5
    #   0.5  6/26    (2/2 + 2/4)/2 = 0.75
    #   0.4  10/26   0.75           (10/26 = 0.385 > 0.3; PRO is flat here, so PRO(0.3) = 0.75)
    #   0.3  10/26   1.0
    #   0.0  1       1.0
    # Area to 0.3: 0.375*2/26 + 0.5*4/26 + 0.75*(0.3 - 6/26) = 0.225 - 1.75/26;
    # divided by 0.3: 0.75 - 1.75/7.8 = 41/78.
    # Area to 1.0: (0.375*2 + 0.5*4 + 0.75*4 + 1.0*16)/26 = 21.75/26.
    # (With 4-connectivity R1 would be two regions and every PRO value would differ.)
    maps, masks = _hand_case()
    assert abs(M.aupro(maps, masks) - 41 / 78) < 1e-12
    assert abs(M.aupro(maps, masks, fpr_limit=1.0) - 21.75 / 26) < 1e-12
    assert abs(M.pixel_metrics(maps, masks)["aupro"] - 41 / 78) < 1e-12
    assert abs(M.aupro(maps.astype(np.float32), masks) - 41 / 78) < 1e-12
    # masks as 0/255 uint8 and a single (H, W) image are accepted too
    assert abs(M.aupro(maps, masks.astype(np.uint8) * 255) - 41 / 78) < 1e-12
    assert abs(M.aupro(maps[1], masks[1]) - M.aupro(maps[1:], masks[1:])) < 1e-15


def test_aupro_perfect_and_constant_maps() -> None:
    rng = np.random.default_rng(1)
    masks = _blobs(rng, (3, 24, 24))
    perfect = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert abs(M.aupro(perfect, masks) - 1.0) < 1e-12
    assert abs(M.aupro(perfect, masks, fpr_limit=0.05) - 1.0) < 1e-12
    # constant map: one threshold, where FPR = PRO = 1, so the curve is the diagonal (0,0)-(1,1);
    # area under y = x up to L is L^2/2, normalised by L: L/2.
    constant = np.full(masks.shape, 0.25, dtype=np.float32)
    assert abs(M.aupro(constant, masks) - 0.15) < 1e-12
    assert abs(M.aupro(constant, masks, fpr_limit=0.1) - 0.05) < 1e-12
    # a reversed map never finds anything before every normal pixel is flagged
    assert abs(M.aupro(-perfect, masks)) < 1e-12


def _aupro_reference(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Brute force: every distinct threshold, PRO/FPR counted directly, MVTec-style trapezoid."""
    regions = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    x, y = np.array(xs), np.array(ys)
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect.bisect(list(x), fpr_limit)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantised", [False, True])
def test_aupro_matches_brute_force(seed: int, quantised: bool) -> None:
    rng = np.random.default_rng(seed)
    masks = _blobs(rng, (4, 16, 16), sigma=1.5, quantile=0.85)
    maps = rng.normal(size=masks.shape) + 1.0 * masks
    if quantised:  # ties inside regions and between normal and anomalous pixels
        maps = np.round(maps * 5) / 5
    maps = maps.astype(np.float32)
    for limit in (0.05, 0.3, 1.0):
        assert abs(M.aupro(maps, masks, fpr_limit=limit) - _aupro_reference(maps, masks, limit)) < 1e-6


def test_aupro_regions_do_not_cross_images() -> None:
    # a region touching the bottom edge of image 0 and one at the top of image 1 stay 2 regions
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 2, :] = True
    masks[1, 0, 0] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 2, :] = 1.0  # region of size 3 fully found at t = 1
    # at t = 1: PRO = (1 + 0)/2 = 0.5 at FPR 0; the next threshold (0) is FPR 1, PRO 1.
    # area to 0.3: 0.3 * (0.5 + 0.65)/2 = 0.1725 -> /0.3 = 0.575 (one 4-pixel region would be 0.75+)
    assert abs(M.aupro(maps, masks) - 0.575) < 1e-12
    assert abs(_aupro_reference(maps, masks, 0.3) - 0.575) < 1e-12


def test_aupro_binned_approximates_exact() -> None:
    maps, masks = _pixel_case(7, (6, 32, 32))
    exact = M.aupro(maps, masks)
    assert abs(M.aupro(maps, masks, num_thresholds=4000) - exact) < 2e-3
    # on the hand case scaled to integers 0..9, the thresholds 0, 1, ..., 9 hit every distinct value
    hand_maps, hand_masks = _hand_case()
    hand_maps = np.round(hand_maps * 10)
    assert abs(M.aupro(hand_maps, hand_masks, num_thresholds=10) - 41 / 78) < 1e-12
    # with fewer thresholds some steps are merged and the value changes
    assert abs(M.aupro(hand_maps, hand_masks, num_thresholds=4) - 41 / 78) > 1e-3
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(maps, masks, num_thresholds=1)


# ---------------------------------------------------------------------------------------------
# Continual metrics


NAN = float("nan")


def test_bwt_and_fm_hand_checked() -> None:
    R = np.array([
        [0.80, NAN, NAN],
        [0.90, 0.95, NAN],
        [0.70, 0.85, 0.99],
    ])
    # BWT = ((0.70 - 0.80) + (0.85 - 0.95)) / 2 = -0.10
    # FM  = ((max(0.80, 0.90) - 0.70) + (0.95 - 0.85)) / 2 = (0.20 + 0.10) / 2 = 0.15
    assert abs(M.backward_transfer(R) - (-0.10)) < 1e-12
    assert abs(M.forgetting_measure(R) - 0.15) < 1e-12


def test_bwt_and_fm_with_first_step() -> None:
    # 3 steps, 4 classes: classes 0, 1 learned at step 0, class 2 at step 1, class 3 at step 2
    R = np.array([
        [0.9, 0.8, NAN, NAN],
        [0.7, 0.8, 0.6, NAN],
        [0.8, 0.5, 0.9, 0.7],
    ])
    first = np.array([0, 0, 1, 2])
    # BWT over classes 0..2: (0.8-0.9) + (0.5-0.8) + (0.9-0.6) = -0.1 -> /3
    # FM: class 0: max(0.9, 0.7) - 0.8 = 0.1; class 1: 0.8 - 0.5 = 0.3; class 2: 0.6 - 0.9 = -0.3
    assert abs(M.backward_transfer(R, first) - (-0.1 / 3)) < 1e-12
    assert abs(M.forgetting_measure(R, first) - (0.1 / 3)) < 1e-12
    with pytest.raises(ValueError, match="first_step"):
        M.backward_transfer(R)  # 4 columns, 3 steps: default first_step impossible
    with pytest.raises(ValueError, match="first_step"):
        M.backward_transfer(R, np.array([0, 0, 1, 3]))


def test_bwt_and_fm_zero_when_nothing_changes() -> None:
    assert M.backward_transfer(np.zeros((3, 3))) == 0.0
    assert M.forgetting_measure(np.zeros((3, 3))) == 0.0
    # each task keeps the value it had when learned: rows grow, columns stay constant
    values = np.array([0.9, 0.7, 0.8, 0.6])
    R = np.tril(np.tile(values, (4, 1)))
    R[np.triu_indices(4, k=1)] = NAN
    assert M.backward_transfer(R) == 0.0
    assert M.forgetting_measure(R) == 0.0


def test_bwt_and_fm_degenerate_cases() -> None:
    assert math.isnan(M.backward_transfer(np.array([[0.9]])))
    assert math.isnan(M.forgetting_measure(np.array([[0.9]])))
    # a column whose final value is missing is left out
    R = np.array([[0.9, NAN, NAN], [0.8, 0.7, NAN], [NAN, 0.6, 0.5]])
    assert abs(M.backward_transfer(R) - (-0.1)) < 1e-12
    assert abs(M.forgetting_measure(R) - 0.1) < 1e-12
    with pytest.raises(ValueError, match="2-D"):
        M.backward_transfer(np.zeros(3))
