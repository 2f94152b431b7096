"""Decision thresholds with a stated guarantee (split conformal), and how many images a rate needs.

    result = conformal_threshold(normal_scores, rate=0.01)
    result.threshold     score above which a part is flagged
    result.supported     the smallest false-alarm rate these n scores can guarantee (1 / (n + 1))
    result.guaranteed    the rate that is guaranteed: max(requested, supported)
    result.interval      95 % interval of the false-alarm rate this threshold will realise on new good parts

The rule (split conformal prediction, Vovk et al.; Angelopoulos & Bates 2021, "A gentle introduction"):
with n normal calibration scores s_(1) <= ... <= s_(n), held out from training and exchangeable with
future good parts, the threshold t = s_(k), k = ceil((n + 1)(1 - rate)), flags a new good part (score > t)
with probability at most rate (exactly, for any n, no distribution assumed). When k > n the requested rate
cannot be guaranteed by n scores; t = s_(n) (the largest) then guarantees 1 / (n + 1) and the result says
so. Conditional on the calibration set, the realised false-alarm rate of t = s_(k) follows
Beta(n + 1 - k, k) (continuous scores), which gives the interval.

Written here rather than taken from a library (MAPIE, crepes): the rule is five lines, and those libraries
target regression/classification wrappers around scikit-learn estimators, not a bare score vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta


@dataclass
class Threshold:
    threshold: float
    rule: str  # how it was made, in words
    n: int  # calibration scores
    rank: int  # k: the threshold is the k-th smallest score (0: no scores)
    requested: float  # false-alarm rate asked for
    supported: float  # smallest rate n scores can guarantee: 1 / (n + 1)
    guaranteed: float  # the rate guaranteed: max(requested, supported)
    interval: tuple[float, float]  # 95 % interval of the realised rate, given these scores
    warning: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out


def images_needed(rate: float) -> int:
    """Calibration scores needed for `rate` to be guaranteed exactly: the smallest n with 1/(n+1) <= rate."""
    return max(1, math.ceil(1.0 / rate - 1.0 - 1e-9))


def conformal_threshold(scores, rate: float, level: float = 0.95) -> Threshold:
    """Split-conformal threshold of normal `scores` (n,) for a false-alarm `rate` (see module doc)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    if n == 0:
        return Threshold(math.inf, "no calibration images: nothing is ever flagged", 0, 0, rate, 1.0, 1.0,
                         (0.0, 1.0), "no calibration images: the decision threshold is undefined (never flags)")
    supported = 1.0 / (n + 1)
    k = math.ceil((n + 1) * (1.0 - rate) - 1e-9)
    warning = ""
    if k > n:
        k = n
        warning = (f"the threshold rests on {n} calibration images, which guarantee a false-alarm rate of "
                   f"{supported:.1%} at best, not the requested {rate:.1%}: expect up to {supported:.1%} false "
                   f"alarms; give the product at least {images_needed(rate)} calibration images (more good "
                   "images, `moleflow calibrate` with extra good parts, or hold more of its images out with "
                   "`score.calibration_keep_train`: docs/decisions.md §1)")
    k = max(k, 1)
    tail = (1.0 - level) / 2
    low, high = beta.ppf([tail, 1.0 - tail], n + 1 - k, k)
    rule = f"conformal: {k}-th smallest of {n} held-out normal scores"
    return Threshold(float(s[k - 1]), rule, n, k, rate, supported, max(rate, supported),
                     (float(low), float(high)), warning)


def calibration_split(n: int, rate: float, fraction: float, keep_train: int) -> int:
    """How many of a task's n training images to hold out for calibration: `fraction` of them, or more, up to
    what `rate` needs (`images_needed`), as long as `keep_train` images remain for training. None below 10
    images or with `fraction` 0."""
    if n < 10 or fraction <= 0:
        return 0
    low = int(n * fraction)
    return int(max(low, min(images_needed(rate), n - keep_train)))


def calibration_record(result: Threshold, scores) -> dict:
    """What a task keeps about its threshold (JSON): the rule, the rates, the interval and the sorted normal
    scores (so that `moleflow calibrate` can pool later good parts with them)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    return {"rule": result.rule, "n": result.n, "rank": result.rank, "false_alarm_rate": result.requested,
            "supported_rate": result.supported, "guaranteed_rate": result.guaranteed,
            "false_alarm_interval": list(result.interval), "warning": result.warning,
            "score_mean": float(s.mean()) if len(s) else None,
            "score_std": float(s.std(ddof=1)) if len(s) > 1 else 0.0, "scores": [float(v) for v in s]}


def threshold_source(calibration: dict) -> str:
    """How a task's threshold was set, in words: its rule and images (`calibration_record`), for predict,
    the service and the review page."""
    rule, source = calibration.get("rule"), calibration.get("source")
    return "; ".join(str(v) for v in (rule, source) if v) or "unknown"
