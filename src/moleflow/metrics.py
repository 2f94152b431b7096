"""Evaluation metrics: image- and pixel-level detection scores, AUPRO, and continual-learning summaries.

Everything here is plain numpy (scipy only for connected components in AUPRO).

Conventions
-----------
* Higher score = more anomalous. Labels / masks: nonzero (True) = anomalous.
* Every metric that needs both classes returns ``float('nan')`` when one class is missing;
  callers report that as "not available".
* Scores must be finite; a NaN or infinite score raises ``ValueError`` (it means a bug upstream,
  and silently sorting NaNs would give a meaningless number).

Why the ranking metrics are hand-written
----------------------------------------
Pixel metrics pool every pixel of the test set (100 images x 224 x 224 = 5 M values, often 10^7+).
``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` run a stable argsort in float64 plus
several full-length float64 temporaries: seconds and hundreds of MB per call at that size. The
versions below give the *same* numbers (same tie handling, exact, not binned) from two plain
``np.sort`` calls (one per class, in the input dtype; an unstable value sort is ~10x faster than an
argsort) and ``np.searchsorted`` between the two sorted classes. sklearn is used only as the
reference in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "Metric",
    "mean_metrics",
    "auroc",
    "average_precision",
    "f1_max",
    "pixel_auroc",
    "pixel_average_precision",
    "aupro",
    "backward_transfer",
    "forgetting_measure",
    "image_metrics",
    "pixel_metrics",
]

# 8-connectivity inside one image, as the official MVTec AD evaluation code
# (`scipy.ndimage.label(gt, structure=np.ones((3, 3)))`). The 3-D version used on an (N, H, W)
# stack has ones only in the middle slice, so regions never join across images.
_STRUCTURE_2D = np.ones((3, 3), dtype=bool)
_STRUCTURE_STACK = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_STACK[1] = True


# ---------------------------------------------------------------------------------------------
# The reported metrics: one table for results.json, the report, the console and the trial tables


@dataclass(frozen=True)
class Metric:
    """How one reported metric is named: `label` in the report, `header` in console and trial tables.
    Every reported metric is a share in [0, 1], shown in percent; higher is better."""

    label: str
    header: str


#: The metrics of every run, in the order of results.json ("metrics"), final.csv and every table.
METRICS: Mapping[str, Metric] = MappingProxyType({
    "image_auroc": Metric("I-AUROC", "I-AUROC"),
    "image_ap": Metric("I-AP", "I-AP"),
    "image_f1_max": Metric("I-F1max", "I-F1"),
    "pixel_auroc": Metric("P-AUROC", "P-AUROC"),
    "pixel_ap": Metric("P-AP", "P-AP"),
    "aupro": Metric("AUPRO", "AUPRO"),
    "routing_accuracy": Metric("Routing", "routing"),
})
#: {metric key: report label}
METRIC_LABELS: Mapping[str, str] = MappingProxyType({key: m.label for key, m in METRICS.items()})


def mean_metrics(per_class: Mapping[str, Mapping[str, Any] | None],
                 keys: Iterable[str] = tuple(METRICS)) -> dict[str, float | None]:
    """Unweighted mean over classes of each metric in `keys`, skipping classes without a finite value
    (None where no class has one). per_class: {class: {metric: value}}."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(v[key]) for v in per_class.values() if _is_finite_number((v or {}).get(key))]
        out[key] = float(np.mean(values)) if values else None
    return out


def _is_finite_number(value: Any) -> bool:
    """True for a real, finite number (None, NaN, strings and bools are not)."""
    return (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


# ---------------------------------------------------------------------------------------------
# Input handling and the shared sorted representation


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    a = np.asarray(scores)
    if a.dtype.kind not in "fiub":
        a = a.astype(np.float64)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or infinite values; every score must be finite")
    return a


def _as_labels(labels: np.ndarray, shape: tuple[int, ...], name: str = "labels") -> np.ndarray:
    b = np.asarray(labels)
    if b.shape != shape:
        raise ValueError(f"{name} have shape {b.shape} but the scores have shape {shape}")
    if b.dtype == np.bool_:
        return b
    if b.size and b.min() < 0:
        raise ValueError(f"{name} must be 0/1 (or bool, or nonzero = anomalous); got negative values")
    return b != 0


class _Split(NamedTuple):
    """Scores of each class, sorted ascending (same dtype as the input)."""

    pos: np.ndarray
    neg: np.ndarray


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> _Split:
    s = _as_scores(scores)
    y = _as_labels(labels, s.shape)
    s, y = s.ravel(), y.ravel()
    return _Split(np.sort(s[y]), np.sort(s[~y]))


def _runs(sorted_asc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of equal values in an ascending array."""
    change = np.flatnonzero(sorted_asc[1:] != sorted_asc[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [sorted_asc.size]))
    return starts, ends


# ---------------------------------------------------------------------------------------------
# Ranking metrics on a sorted split


def _auroc_sorted(sp: _Split) -> float:
    n_pos, n_neg = sp.pos.size, sp.neg.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with ties counted 1/2: identical to the area under sklearn's ROC step curve
    # (trapezoids over distinct thresholds). One searchsorted per distinct positive value.
    starts, ends = _runs(sp.pos)
    values = sp.pos[starts]
    below = np.searchsorted(sp.neg, values, side="left")  # negatives strictly below
    below_or_equal = np.searchsorted(sp.neg, values, side="right")
    twice_u = np.sum((ends - starts).astype(np.int64) * (below + below_or_equal).astype(np.int64))
    return float(twice_u) / (2.0 * n_pos * n_neg)


def _pr_points(sp: _Split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, tp, fp, positives at that threshold) for each distinct positive score, descending.

    Only the distinct *positive* values matter for AP and F1max: at a value held only by negatives,
    recall does not change (no AP term) and F1 is strictly below the next higher positive value.
    """
    starts, ends = _runs(sp.pos)
    values = sp.pos[starts][::-1]
    tp = (sp.pos.size - starts)[::-1].astype(np.float64)
    fp = (sp.neg.size - np.searchsorted(sp.neg, values, side="left")).astype(np.float64)
    return values, tp, fp, (ends - starts)[::-1].astype(np.float64)


def _ap_sorted(sp: _Split) -> float:
    n_pos, n_neg = sp.pos.size, sp.neg.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, tp, fp, n_here = _pr_points(sp)
    # sum over thresholds of (R_n - R_{n-1}) * P_n; R_n - R_{n-1} = (positives at this value) / P.
    return float(np.sum(n_here * (tp / (tp + fp))) / n_pos)


def _f1_max_sorted(sp: _Split) -> tuple[float, float]:
    n_pos, n_neg = sp.pos.size, sp.neg.size
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    values, tp, fp, _ = _pr_points(sp)
    f1 = 2.0 * tp / (tp + fp + n_pos)  # = 2PR / (P + R)
    best = int(np.argmax(f1))  # descending order: ties go to the highest threshold
    return float(f1[best]), float(values[best])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of `scores` (any shape) against binary `labels` (same shape), equal to
    ``sklearn.metrics.roc_auc_score`` including ties. NaN if only one class is present."""
    return _auroc_sorted(_split_sorted(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, the definition of ``sklearn.metrics.average_precision_score``:
    sum over distinct thresholds of (R_n - R_{n-1}) P_n. `scores`, `labels`: same shape.
    NaN if only one class is present (with no negatives AP would be trivially 1)."""
    return _ap_sorted(_split_sorted(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold achieving it.

    The threshold is a score value; predict anomalous when ``score >= threshold``. If several
    thresholds tie for the best F1, the highest is returned. ``(nan, nan)`` if only one class.
    """
    return _f1_max_sorted(_split_sorted(scores, labels))


# ---------------------------------------------------------------------------------------------
# Pixel level


def _as_stack(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = _as_scores(maps, "maps")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W) or (H, W), got {np.shape(maps)}")
    g = _as_labels(masks, np.shape(maps), "masks").reshape(m.shape)
    return m, g


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel ROC AUC pooled over all pixels. maps: float (N, H, W); masks: bool (N, H, W).
    Exact (equal to sklearn on the flattened arrays). NaN if no anomalous or no normal pixel."""
    m, g = _as_stack(maps, masks)
    return _auroc_sorted(_Split(np.sort(m[g]), np.sort(m[~g])))


def pixel_average_precision(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel average precision pooled over all pixels. maps: float (N, H, W); masks: bool (N, H, W).
    Exact (equal to sklearn on the flattened arrays). NaN if no anomalous or no normal pixel."""
    m, g = _as_stack(maps, masks)
    return _ap_sorted(_Split(np.sort(m[g]), np.sort(m[~g])))


def _segment_area(neg_counts: np.ndarray, pro_a: np.ndarray, pro_b: np.ndarray, n_neg: int,
                  x_max: float) -> float:
    """Trapezoid area under a PRO curve from FPR 0 to `x_max`, PRO interpolated at `x_max`.

    The curve is given as consecutive segments, thresholds descending: segment i goes from
    (F_i, pro_a[i]) to (F_i + neg_counts[i] / n_neg, pro_b[i]), F_i = sum(neg_counts[:i]) / n_neg.
    Vertical moves between segments (PRO rising at a fixed FPR) add no area and are implicit, as
    are the start (0, 0) and the end (1, 1). Same result as `trapezoid(..., x_max)` of the MVTec AD
    evaluation code on the full point list.
    """
    cum = np.cumsum(neg_counts)
    fpr_b = cum / n_neg
    n_full = int(np.searchsorted(fpr_b, x_max, side="right"))  # segments ending at or before x_max
    c = neg_counts[:n_full]
    area = float(np.dot(c, pro_a[:n_full] + pro_b[:n_full])) / (2.0 * n_neg)
    if n_full < cum.size:
        x0 = (cum[n_full] - neg_counts[n_full]) / n_neg  # <= x_max < fpr_b[n_full]
        if x0 < x_max:
            y0, y1 = pro_a[n_full], pro_b[n_full]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (fpr_b[n_full] - x0)
            area += float((x_max - x0) * (y0 + y_at) / 2.0)
    return area


def _region_weights(g: np.ndarray) -> np.ndarray | None:
    """Per anomalous pixel (in `g[g]` order): 1 / (size of its region * number of regions)."""
    labels, n_regions = ndimage.label(g, structure=_STRUCTURE_STACK)
    if n_regions == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
    per_label = np.zeros(n_regions + 1)
    per_label[1:] = 1.0 / (sizes[1:] * n_regions)
    return per_label[labels[g]]


def _aupro(m: np.ndarray, g: np.ndarray, fpr_limit: float, num_thresholds: int | None,
           neg_sorted: np.ndarray | None = None) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    weights = _region_weights(g)
    n_neg = g.size - int(np.count_nonzero(g))
    if weights is None or n_neg == 0:
        return float("nan")
    pos = m[g]

    if num_thresholds is not None:
        if int(num_thresholds) < 2:
            raise ValueError(f"num_thresholds must be at least 2 (or None for exact), got {num_thresholds}")
        k = int(num_thresholds)
        thr = np.linspace(float(m.min()), float(m.max()), k)
        # bin b holds scores in [thr[b], thr[b+1]); a pixel counts at every threshold <= its bin.
        # Reversed: thresholds descending, one straight segment from each point to the next.
        neg_counts = np.bincount(np.searchsorted(thr, m[~g], side="right") - 1, minlength=k)[::-1]
        pos_hist = np.bincount(np.searchsorted(thr, pos, side="right") - 1, weights=weights, minlength=k)
        pro_b = np.minimum(np.cumsum(pos_hist[::-1]), 1.0)
        pro_a = np.concatenate(([0.0], pro_b[:-1]))
        return _segment_area(neg_counts, pro_a, pro_b, n_neg, fpr_limit) / fpr_limit

    # Exact over every distinct score. For each distinct normal-pixel value u (descending) the
    # curve has a segment from (FPR(> u), PRO(> u)) to (FPR(>= u), PRO(>= u)): horizontal, or
    # diagonal when anomalous pixels share the value u. Between consecutive normal values FPR is
    # constant, so thresholds held only by anomalous pixels add collinear points on vertical
    # moves (no area, same interpolation): this is the official curve over all distinct
    # thresholds. It needs a value sort of the normal pixels and an argsort of the anomalous ones.
    neg = np.sort(m[~g]) if neg_sorted is None else neg_sorted
    # Only the top of the curve matters: keep the normal values down to the (k+1)-th largest,
    # k = floor(fpr_limit * n_neg) + 1 (one spare against rounding); the segment of that value
    # ends beyond fpr_limit, so the interpolation point is always inside what is kept.
    k = int(np.floor(fpr_limit * n_neg)) + 1
    first = 0 if k >= n_neg else int(np.searchsorted(neg, neg[n_neg - k - 1], side="left"))
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    # pro_ge[i] = sum of the weights of pos[i:], i.e. PRO at threshold pos[i]
    pro_ge = np.zeros(pos.size + 1)
    pro_ge[:-1] = np.minimum(np.cumsum(weights[order][::-1])[::-1], 1.0)
    starts, ends = _runs(neg[first:])
    starts, ends = starts[::-1], ends[::-1]
    values = neg[first:][starts]
    pro_a = pro_ge[np.searchsorted(pos, values, side="right")]
    pro_b = pro_ge[np.searchsorted(pos, values, side="left")]
    return _segment_area(ends - starts, pro_a, pro_b, n_neg, fpr_limit) / fpr_limit


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3,
          num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD definition).

    maps: float (N, H, W); masks: bool (N, H, W). Regions are the 8-connected components of each
    image's mask (``scipy.ndimage.label`` with a 3x3 structure of ones, as the MVTec AD code).
    At threshold t (anomalous if score >= t): PRO = mean over all regions of all images of the
    fraction of the region's pixels at or above t; FPR = fraction of all normal pixels at or above
    t. The PRO(FPR) curve, from (0, 0) through every distinct score to (1, 1), is integrated with
    the trapezoid rule from 0 to `fpr_limit` (PRO interpolated at exactly `fpr_limit`) and divided
    by `fpr_limit`: a perfect map gives 1.0, a constant map fpr_limit / 2.

    Exact by default; `num_thresholds` evaluates only that many evenly spaced thresholds between
    the smallest and largest score (an approximation). NaN if there is no anomalous region or no
    normal pixel.
    """
    m, g = _as_stack(maps, masks)
    return _aupro(m, g, fpr_limit, num_thresholds)


# ---------------------------------------------------------------------------------------------
# Continual-learning summaries


def _continual_setup(R: np.ndarray, first_step: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(R as float64, first_step per column, columns learned before the last step), or None when T < 2."""
    r = np.asarray(R, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"R must be a 2-D (steps, items) matrix, got shape {r.shape}")
    n_steps, n_items = r.shape
    if first_step is None:
        if n_items > n_steps:
            raise ValueError(
                f"R has {n_items} columns but {n_steps} steps: pass first_step to say when each was learned")
        fs = np.arange(n_items)
    else:
        fs = np.asarray(first_step)
        if fs.shape != (n_items,) or fs.dtype.kind not in "iu":
            raise ValueError(f"first_step must be {n_items} integers (one per column of R), got {first_step!r}")
        if n_items and (fs.min() < 0 or fs.max() >= n_steps):
            raise ValueError(f"first_step values must be in [0, {n_steps - 1}], got {first_step!r}")
    if n_steps < 2:
        return None
    fs = fs.astype(np.int64)
    return r, fs, np.flatnonzero(fs < n_steps - 1)


def _mean_over_items(R: np.ndarray, first_step: np.ndarray | None,
                     per_item: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> float:
    """Mean of the finite values of `per_item(r, first_step, columns)` ((len(columns),): one per item learned
    before the last step); NaN when T < 2 or no value is finite. Checks R and first_step (`_continual_setup`)."""
    setup = _continual_setup(R, first_step)
    if setup is None:
        return float("nan")
    values = per_item(*setup)
    values = values[np.isfinite(values)]
    return float(np.mean(values)) if values.size else float("nan")


def backward_transfer(R: np.ndarray, first_step: np.ndarray | None = None) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017).

    R: (T, M) with R[j, i] = metric of item i evaluated after learning step j (NaN before it was
    learned). first_step: (M,) step at which each item was learned (default: item i at step i).
    BWT = mean over items learned before the last step of R[T-1, i] - R[first_step[i], i].
    Negative = forgetting. Items whose two values are not both finite are left out.
    NaN when T < 2 or no item qualifies.
    """
    return _mean_over_items(R, first_step, lambda r, fs, cols: r[r.shape[0] - 1, cols] - r[fs[cols], cols])


def forgetting_measure(R: np.ndarray, first_step: np.ndarray | None = None) -> float:
    """Forgetting measure (Chaudhry et al. 2018), same R and first_step as `backward_transfer`.

    FM_i = max over j in [first_step[i], T-2] of R[j, i], minus R[T-1, i]: the drop from the best
    value the item had before the last step. FM = mean of FM_i over items learned before the last
    step (>= 0 up to improvements at the last step; larger = more forgetting). NaN entries in the
    range are ignored; items with no finite value there are left out.
    NaN when T < 2 or no item qualifies.
    """
    def drop(r: np.ndarray, fs: np.ndarray, cols: np.ndarray) -> np.ndarray:
        last = r.shape[0] - 1
        window = np.where(np.arange(last)[:, None] >= fs[cols][None, :], r[:last, cols], -np.inf)
        return np.where(np.isnan(window), -np.inf, window).max(axis=0) - r[last, cols]

    return _mean_over_items(R, first_step, drop)


# ---------------------------------------------------------------------------------------------
# Bundles


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level metrics. scores: (N,) float; labels: (N,) bool.

    Returns ``image_auroc``, ``image_ap``, ``image_f1_max`` (fractions in [0, 1]; NaN if only one
    class is present).
    """
    sp = _split_sorted(scores, labels)
    return {
        "image_auroc": _auroc_sorted(sp),
        "image_ap": _ap_sorted(sp),
        "image_f1_max": _f1_max_sorted(sp)[0],
    }


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level metrics. maps: float (N, H, W); masks: bool (N, H, W).

    Returns ``pixel_auroc``, ``pixel_ap``, ``aupro`` (exact, to `fpr_limit`). NaN if there is no
    anomalous (or no normal) pixel. The sort of the normal pixels is shared by all three.
    """
    m, g = _as_stack(maps, masks)
    sp = _Split(np.sort(m[g]), np.sort(m[~g]))
    return {
        "pixel_auroc": _auroc_sorted(sp),
        "pixel_ap": _ap_sorted(sp),
        "aupro": _aupro(m, g, fpr_limit, None, neg_sorted=sp.neg),
    }
