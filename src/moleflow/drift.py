"""Drift on the line: has a product's score distribution moved away from its calibration?

    p_high, p_low = conformal_pvalues(scores, calibration_scores, threshold)   # parts decided good
    monitor = DriftMonitor()                         # 1 % chance of a false alert per 10,000 good parts
    result = monitor.run(p_high, p_low, m)           # m: passing calibration scores; .alert, .first, .onset, .side
    states = product_drift(store, tasks)             # one `DriftState` per product, from the verdict store

The p-values
------------
A product's calibration scores c_1..c_n (kept in `TaskInfo.calibration["scores"]`, `calibration_record`)
are held-out good parts, exchangeable with the good parts the line makes as long as nothing drifted. The
conformal p-value of a new score s is p = (1 + #{c_i >= s}) / (n + 1): uniform on {1/(n+1), ..., 1} when
nothing drifted. The monitor looks only at parts *decided good* (s <= t, the product's threshold; flagged
parts mix drift with real defects), and those all have p >= (1 + #{c_i > t}) / (n + 1), so p is taken among
the m = #{c_i <= t} calibration scores that pass too:

    p_high = (1 + #{c_i : s <= c_i <= t}) / (m + 1)      small when s is high for a passing part
    p_low  = (1 + #{c_i : c_i <= s}) / (m + 1)           small when s is low

Given that a part passed, each is uniform on {1/(m+1), ..., 1} under no drift (a part and the passing
calibration scores are exchangeable), so P(p <= x) <= x for every x: valid p-values.

The test
--------
Two one-sided CUSUMs (Page's test), S_i = max(0, S_(i-1) + x_i - k), one for scores moving up (towards false
alarms, the harmful direction) and one for scores moving down, on one of two statistics:

  * "rank" (the default): x = sqrt(12) (1/2 - u) and its negative, u = (p_high + 1 - p_low) / 2 the part's
    mid-rank among the passing calibration scores (mean 0 and variance <= 1 under no drift), k = 0.3 + 1.2 /
    sqrt(m) (tuned to a shift of the mean by 0.6 standard deviations, as a change of lighting gives, plus the
    calibration draw's own noise: below);
  * "log": x = -log p_high and -log p_low (Exp(1) under no drift), k = -log(a) / (1 - a) with a = 0.5: the CUSUM
    of the likelihood ratio of Beta(a, 1) p-values against uniform ones (drifted parts 10x as often below
    p = 0.01), which looks at the tail near the threshold.

An alert is raised when either CUSUM reaches h, set by simulation for the product's m: the (1 - rate)
quantile of the largest value either CUSUM reaches within `horizon` passed parts, over simulated products that
do not drift, each with its own m calibration scores. The calibration draw matters: the parts of one product
share its calibration set, so their p-values are uniform only on average over calibration sets, and given
one set their mean is off by about 1 / sqrt(m) standard deviations, for every part (with k = 0.3, an h
simulated from uniform p-values alone gave 40 % false alerts instead of the stated 10 % at m = 40 over 1,000
parts; tests/test_drift.py checks the stated rate with the calibration draw simulated). So a
product that does not drift raises a false alert within `horizon` good parts with probability at most
`false_alert_rate` (default 1 % per 10,000 parts), averaged over its calibration draw, the same kind of
guarantee its conformal threshold gives. Since an unlucky calibration draw shifts the mean rank by about
1 / sqrt(m) standard deviations, the rank CUSUM's k grows by 1.2 / sqrt(m): with k = 0.3 alone h had to be
1,193 at m = 36 (57 at m = 100), and over k = 0.3 ... 0.55 the expected delay h / (0.62 - k) to a shift of
0.62 standard deviations (the lighting shift below) was shortest near 0.3 + 1.2 / sqrt(m) at m = 36, 100
and 300 (a sweep, 2,000 simulated products each). Fewer calibration scores: larger k and h, slower alerts
(`moleflow calibrate` adds scores). The onset estimate is the last part where the alerting CUSUM was 0
before it crossed h (the CUSUM's change-point estimate). h is simulated once per process and m (4,000
products of 10,000 parts: 1-4 s on 2 busy cores; `GET /drift` and `moleflow status` pay it once).

Measured (benchmarks/drift.py, BENCHMARKS.md "Drift"): the false-alert rate on unshifted streams and the
delay to an alert after a lighting shift (brightness x 1.15) on a tiny trained model's parts, for both
statistics; "rank" is the default because it alerted sooner there.

Without calibration scores (a moleflow 0.1 run) or with fewer than `MIN_SCORES` passing ones, the
threshold-only test is used instead: a Bernoulli CUSUM on whether each part (passed or flagged) was flagged,
against the calibrated false-alarm rate (the upper end of its 95 % interval; alternative: twice that), its h
simulated the same way. It also fires on a burst of real defects; its message says so.

Which parts: a product's verdicts in the store decided under its current threshold and recorded after its
last re-calibration (`calibration["history"][-1]["replaced_at"]`: after `moleflow calibrate` the test starts
again, against the new calibration scores), the newest `horizon` of them, oldest first.

"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import MoleflowError

MIN_SCORES = 20  # passing calibration scores the p-value test needs (else the threshold-only test)
FALSE_ALERT_RATE = 0.01  # chance of a false alert ...
HORIZON = 10_000  # ... within this many parts of a product that does not drift
STATISTICS = ("rank", "log")
STATISTIC = "rank"
RANK_K = 0.3  # the mid-rank CUSUM's reference value: tuned to a mean shift of 0.6 standard deviations ...
RANK_K_PER_ROOT_M = 1.2  # ... plus 1.2 / sqrt(m) for the calibration draw's own noise (module docstring)
TUNED_TO = 0.5  # the Beta(a, 1) alternative the -log p CUSUM is tuned to
SIMULATED_PATHS = 4000  # null paths simulated to set h
PATH_POINTS = 200  # points of the statistic's path returned for plots


# ------------------------------------------------------------------------------------------ p-values
def conformal_pvalues(scores: Sequence[float] | np.ndarray, calibration: Sequence[float] | np.ndarray,
                      threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(p_high, p_low) of parts decided good (score <= threshold) against the calibration scores that pass
    too (see the module docstring). scores (N,), calibration (n,) -> two (N,) float arrays in (0, 1]."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    passing = c[c <= threshold]
    m = len(passing)
    at_or_below = np.searchsorted(passing, s, side="right")  # #{c <= s}
    below = np.searchsorted(passing, s, side="left")  # #{c < s}
    p_high = (1.0 + (m - below)) / (m + 1.0)  # #{c in [s, t]}
    p_low = (1.0 + at_or_below) / (m + 1.0)
    return np.clip(p_high, 0, 1), np.clip(p_low, 0, 1)


def reference(tuned_to: float) -> float:
    """The CUSUM reference value k = -log(a) / (1 - a) of the Beta(a, 1) alternative."""
    if not 0.0 < tuned_to < 1.0:
        raise MoleflowError(f"tuned_to={tuned_to}: the Beta(a, 1) alternative needs 0 < a < 1")
    return -math.log(tuned_to) / (1.0 - tuned_to)


# ------------------------------------------------------------------------------------------ CUSUM
def cusum(increments: np.ndarray) -> np.ndarray:
    """Page's CUSUM S_i = max(0, S_(i-1) + increments_i), S_0 = 0, along the last axis (vectorised: S = W -
    min(0, running minimum of W), W the cumulative sum)."""
    w = np.cumsum(np.asarray(increments, dtype=np.float64), axis=-1)
    return w - np.minimum(np.minimum.accumulate(w, axis=-1), 0.0)


def _max_over_paths(draw, horizon: int, paths: int, seed: int, chunk: int = 250) -> np.ndarray:
    """Largest CUSUM value reached within `horizon` steps, per simulated path; `draw(rng, n, horizon)`
    returns the increments of one or more CUSUMs, shape (sides, n, horizon)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, paths, chunk):
        n = min(chunk, paths - start)
        sides = draw(rng, n, horizon)
        out.append(np.max([cusum(side).max(axis=-1) for side in sides], axis=0))
    return np.concatenate(out)


def _sides(statistic: str, k: float, p_high: np.ndarray, p_low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The increments of the two CUSUMs (scores higher, scores lower) for p-values of parts decided good."""
    if statistic == "rank":
        u = 0.5 * (p_high + 1.0 - p_low)  # the mid-rank (R + 1/2) / (m + 1): mean 1/2, symmetric
        z = math.sqrt(12.0) * (0.5 - u)  # mean 0, variance <= 1 under no drift
        return z - k, -z - k
    return -np.log(np.clip(p_high, 1e-300, 1.0)) - k, -np.log(np.clip(p_low, 1e-300, 1.0)) - k


def _null_pvalues(rng: np.random.Generator, n: int, length: int, m: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(p_high, p_low) of n simulated streams of `length` passed parts of a product that does not drift, each
    stream against its own m passing calibration scores (None: continuous uniform p-values). After the
    scores' CDF, passing calibration scores and passing parts are independent uniforms."""
    if m is None:
        u = rng.random((n, length))
        return 1.0 - u, u
    offset = np.arange(n, dtype=np.float64)[:, None]  # path i lives in [i, i + 1): one search for all paths
    cal = (np.sort(rng.random((n, m)), axis=1) + offset).ravel()
    new = rng.random((n, length)) + offset
    below = np.searchsorted(cal, new) - m * np.arange(n)[:, None]  # no ties between continuous draws
    return (1.0 + m - below) / (m + 1.0), (1.0 + below) / (m + 1.0)


@lru_cache(maxsize=64)
def pvalue_threshold(m: int | None, false_alert_rate: float = FALSE_ALERT_RATE, horizon: int = HORIZON,
                     statistic: str = STATISTIC, k: float | None = None, paths: int = SIMULATED_PATHS,
                     seed: int = 0) -> float:
    """h of the two-sided p-value CUSUM for a product with m passing calibration scores: the (1 - rate)
    quantile, over `paths` simulated products (each its own calibration draw) and `horizon` passed parts
    each, of the largest value either side reaches."""
    k = default_k(statistic) if k is None else k

    def draw(rng, n, length):
        return _sides(statistic, k, *_null_pvalues(rng, n, length, m))

    return float(np.quantile(_max_over_paths(draw, horizon, paths, seed), 1.0 - false_alert_rate))


def _bernoulli_steps(rate: float) -> tuple[float, float]:
    """Log likelihood ratio increments (flagged, passed) of a flag rate 2 x `rate` against `rate`."""
    alt = min(2.0 * rate, 0.5 * (1.0 + rate))
    return math.log(alt / rate), math.log((1.0 - alt) / (1.0 - rate))


@lru_cache(maxsize=64)
def flag_threshold(rate: float, false_alert_rate: float = FALSE_ALERT_RATE, horizon: int = HORIZON,
                   paths: int = SIMULATED_PATHS, seed: int = 0) -> float:
    """h of the threshold-only (Bernoulli) CUSUM for a calibrated flag rate `rate`, simulated as above."""
    up, down = _bernoulli_steps(rate)

    def draw(rng, n, length):
        return (np.where(rng.random((n, length)) < rate, up, down),)

    return float(np.quantile(_max_over_paths(draw, horizon, paths, seed), 1.0 - false_alert_rate))


@dataclass
class CusumResult:
    """What a CUSUM found on one stream of N parts (indices into the stream, 0-based)."""

    alert: bool
    statistic: float  # the CUSUM now (the larger side)
    threshold: float  # h
    side: str | None  # which CUSUM alerted first: "higher" / "lower" (scores) or "more flags"; None without alert
    first: int | None  # the part at which it first reached h
    onset: int | None  # the last part before `first` at which that CUSUM was 0 (where the change began)
    path: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (N,) the larger side per part


def _result(sides: dict[str, np.ndarray], h: float) -> CusumResult:
    names = list(sides)
    stacked = np.vstack([sides[n] for n in names]) if names else np.zeros((1, 0))
    path = stacked.max(axis=0) if stacked.shape[1] else np.zeros(0)
    firsts = {n: int(np.argmax(sides[n] >= h)) for n in names if len(sides[n]) and (sides[n] >= h).any()}
    if not firsts:
        return CusumResult(False, float(path[-1]) if len(path) else 0.0, h, None, None, None, path)
    side = min(firsts, key=lambda n: (firsts[n], names.index(n)))
    first = firsts[side]
    zeros = np.flatnonzero(sides[side][:first] <= 0.0)
    onset = int(zeros[-1]) + 1 if len(zeros) else 0
    return CusumResult(True, float(path[-1]), h, side, first, onset, path)


def default_k(statistic: str) -> float:
    """The reference value of each statistic (module docstring)."""
    if statistic == "rank":
        return RANK_K
    if statistic == "log":
        return reference(TUNED_TO)
    raise MoleflowError(f"drift statistic {statistic!r}: use one of {', '.join(STATISTICS)}")


@dataclass(frozen=True)
class DriftMonitor:
    """The drift test with its stated false-alert rate (see the module docstring). Pure: `run` looks at one
    stream of p-values (or flags) and keeps nothing."""

    false_alert_rate: float = FALSE_ALERT_RATE
    horizon: int = HORIZON
    statistic: str = STATISTIC  # "rank" (mid-rank CUSUM, the default) or "log" (-log p, Beta(a, 1) tuned)
    k: float | None = None  # the reference value; None: the statistic's default
    paths: int = SIMULATED_PATHS

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alert_rate < 1.0:
            raise MoleflowError(f"false_alert_rate={self.false_alert_rate}: must be between 0 and 1")
        if self.horizon < 10:
            raise MoleflowError(f"horizon={self.horizon}: must be at least 10 parts")
        if self.k is not None and not self.k > 0:
            raise MoleflowError(f"k={self.k}: the CUSUM's reference value must be positive")
        default_k(self.statistic)

    def reference(self, m: int | None = None) -> float:
        """k for a product with m passing calibration scores. "rank": `RANK_K` + `RANK_K_PER_ROOT_M` / sqrt(m),
        so that an unlucky calibration draw (its mean rank off by about 1 / sqrt(m) standard deviations)
        seldom drives the CUSUM up alone (module docstring); "log": fixed."""
        if self.k is not None:
            return float(self.k)
        k = default_k(self.statistic)
        if self.statistic == "rank" and m:
            k += RANK_K_PER_ROOT_M / math.sqrt(m)
        return round(k, 4)

    def threshold(self, m: int | None) -> float:
        """h for a product with m passing calibration scores (None: continuous p-values, no calibration noise)."""
        return pvalue_threshold(None if m is None else int(m), self.false_alert_rate, self.horizon, self.statistic,
                                self.reference(m), self.paths)

    def run(self, p_high: Sequence[float] | np.ndarray, p_low: Sequence[float] | np.ndarray, m: int | None
            ) -> CusumResult:
        """The two-sided p-value CUSUM over a stream of parts decided good (`conformal_pvalues` against m
        passing calibration scores)."""
        up, down = _sides(self.statistic, self.reference(m), np.asarray(p_high, dtype=np.float64),
                          np.asarray(p_low, dtype=np.float64))
        return _result({"higher": cusum(up), "lower": cusum(down)}, self.threshold(m))

    def run_flags(self, flagged: Sequence[bool] | np.ndarray, rate: float) -> CusumResult:
        """The threshold-only test: a Bernoulli CUSUM on each part's flag against the calibrated rate."""
        if not 0.0 < rate < 1.0:
            raise MoleflowError(f"calibrated flag rate {rate}: must be between 0 and 1")
        rate = float(f"{rate:.4g}")  # a handful of distinct thresholds to simulate
        up, down = _bernoulli_steps(rate)
        z = np.asarray(flagged, dtype=bool)
        h = flag_threshold(rate, self.false_alert_rate, self.horizon, self.paths)
        return _result({"more flags": cusum(np.where(z, up, down))}, h)


# ------------------------------------------------------------------------------------------ on the line
@dataclass
class DriftState:
    """One product's drift state, for /health, GET /drift, the review page and `moleflow status`."""

    product: str
    test: str  # "p-values" (two-sided CUSUM) or "flag rate" (threshold only) or "none"
    parts: int  # parts looked at (decided good for the p-value test; passed and flagged for the flag rate)
    calibration_scores: int  # passing calibration scores the p-values rest on
    alert: bool
    statistic: float
    threshold: float | None  # h (None: nothing to test yet)
    direction: str | None = None  # "higher" / "lower" scores than at calibration, or "more flags"
    alert_verdict_id: int | None = None
    alert_at: str | None = None
    onset_verdict_id: int | None = None
    onset_at: str | None = None
    parts_to_alert: int | None = None  # parts from the estimated onset to the alert
    since: str | None = None  # the first part looked at
    false_alert_rate: float = FALSE_ALERT_RATE
    horizon: int = HORIZON
    statistic_kind: str = STATISTIC  # of the p-value test: "rank" or "log"
    message: str = ""
    path: list[float] = field(default_factory=list)  # the statistic, at most PATH_POINTS points

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _thin(path: np.ndarray, points: int = PATH_POINTS) -> list[float]:
    if len(path) <= points:
        return [round(float(v), 4) for v in path]
    idx = np.unique(np.linspace(0, len(path) - 1, points).round().astype(int))
    return [round(float(v), 4) for v in path[idx]]


def _task_fields(task: Any) -> tuple[str, float, dict]:
    if isinstance(task, Mapping):
        return str(task["name"]), float(task["threshold"]), dict(task.get("calibration") or {})
    return str(task.name), float(task.threshold), dict(task.calibration or {})


def calibrated_at(calibration: Mapping[str, Any]) -> str | None:
    """When the product was last re-calibrated (`MoleFlow.recalibrate` keeps it in the history), or None."""
    history = calibration.get("history") or []
    return history[-1].get("replaced_at") if history and isinstance(history[-1], Mapping) else None


def _test_of(task: Any) -> tuple[str, float, dict, np.ndarray, int, float | None]:
    """Which drift test a product gets: (name, threshold, calibration, calibration scores, how many of them
    pass, flag rate). The p-value test when at least `MIN_SCORES` calibration scores pass; else the flag-rate
    test at the rate the calibration promises (its interval's upper end, else the guaranteed or requested
    rate); neither (rate None) when there is no rate in (0, 1)."""
    name, threshold, cal = _task_fields(task)
    scores = np.asarray(cal.get("scores") or [], dtype=np.float64)
    passing = int((scores <= threshold).sum()) if len(scores) else 0
    rate = cal.get("false_alarm_interval", [None, None])[1] or cal.get("guaranteed_rate") or \
        cal.get("false_alarm_rate")
    rate = float(rate) if passing < MIN_SCORES and rate and 0.0 < float(rate) < 1.0 else None
    return name, threshold, cal, scores, passing, rate


def warm_up(tasks: Iterable[Any], monitor: DriftMonitor | None = None) -> None:
    """Simulate and cache the alert thresholds `product_drift` will need for `tasks` (about a second per distinct
    calibration size, once per process), so that a service does it while it loads its model, not while it
    answers requests."""
    monitor = monitor or DriftMonitor()
    for task in tasks:
        *_, passing, rate = _test_of(task)
        if passing >= MIN_SCORES:
            monitor.threshold(passing)
        elif rate is not None:
            monitor.run_flags([], rate)


def product_drift(store: Any, tasks: Iterable[Any], monitor: DriftMonitor | None = None) -> list[DriftState]:
    """The drift state of every product (`tasks`: TaskInfo objects or manifest task dicts with name,
    threshold and calibration) from its verdicts in `store` (a `VerdictStore`)."""
    monitor = monitor or DriftMonitor()
    out = []
    for task in tasks:
        name, threshold, cal, scores, passing, rate = _test_of(task)
        since = calibrated_at(cal)
        common = dict(product=name, false_alert_rate=monitor.false_alert_rate, horizon=monitor.horizon,
                      statistic_kind=monitor.statistic)
        if passing >= MIN_SCORES:
            rows = store.scores(name, "normal", threshold, limit=monitor.horizon, since=since)
            if not rows:
                out.append(DriftState(test="p-values", parts=0, calibration_scores=passing, alert=False, statistic=0.0,
                                      threshold=None, message="no parts passed yet under the current calibration",
                                      **common))
                continue
            p_high, p_low = conformal_pvalues([r[2] for r in rows], scores, threshold)
            result = monitor.run(p_high, p_low, passing)
            test = "p-values"
        else:
            if rate is None:
                out.append(DriftState(test="none", parts=0, calibration_scores=passing, alert=False, statistic=0.0,
                                      threshold=None, message="no calibration scores and no calibrated rate: "
                                      "drift cannot be tested; run `moleflow calibrate`", **common))
                continue
            rows = store.scores(name, ("normal", "anomalous"), threshold, limit=monitor.horizon, since=since)
            result = monitor.run_flags([r[3] == "anomalous" for r in rows], rate)
            test = "flag rate"
        state = DriftState(test=test, parts=len(rows), calibration_scores=passing, alert=result.alert,
                           statistic=round(result.statistic, 4), threshold=round(result.threshold, 4),
                           since=rows[0][1] if rows else None, path=_thin(result.path), **common)
        if result.alert:
            state.direction = result.side
            state.alert_verdict_id, state.alert_at = rows[result.first][0], rows[result.first][1]
            state.onset_verdict_id, state.onset_at = rows[result.onset][0], rows[result.onset][1]
            state.parts_to_alert = result.first - result.onset + 1
            if test == "p-values":
                state.message = (f"{name}: the scores of passed parts are {result.side} than at calibration since about "
                                 f"{state.onset_at} (alert after {state.parts_to_alert} parts): check lighting, camera and "
                                 "material; review parts and recalibrate (`moleflow calibrate --from-reviews`)")
            else:
                state.message = (f"{name}: more parts flagged than the calibrated rate allows since about "
                                 f"{state.onset_at}: drift, or more defective parts than usual")
        elif test == "p-values" and passing < 2 * MIN_SCORES:
            state.message = f"only {passing} calibration scores pass: the test sees coarse p-values"
        out.append(state)
    return out


def alerts(states: Iterable[DriftState]) -> list[str]:
    """The products in alert."""
    return [s.product for s in states if s.alert]
