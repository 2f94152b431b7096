"""The drift test (drift.py): conformal p-values of passed parts, the CUSUMs and their simulated thresholds,
the stated false-alert rate on streams that do not drift, detection of shifted streams, and the per-product
states read from a real verdict store. Pure numbers: no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moleflow import MoleflowError
from moleflow.drift import DriftMonitor, conformal_pvalues, cusum, flag_threshold, product_drift, pvalue_threshold
from moleflow.store.verdicts import VerdictStore, sqlite_url


def test_pvalues_count_the_passing_calibration_scores():
    cal = np.array([1.0, 2.0, 3.0, 4.0, 10.0])  # threshold 4: m = 4 scores pass, 10 does not count
    p_high, p_low = conformal_pvalues([0.5, 2.0, 2.5, 4.0], cal, threshold=4.0)
    # p_high = (1 + #{c in [s, t]}) / (m + 1), p_low = (1 + #{c <= s}) / (m + 1)
    np.testing.assert_allclose(p_high, [5 / 5, 4 / 5, 3 / 5, 2 / 5])
    np.testing.assert_allclose(p_low, [1 / 5, 3 / 5, 3 / 5, 5 / 5])


def test_pvalues_of_passed_parts_are_uniform_when_nothing_drifted():
    rng = np.random.default_rng(0)
    us = []
    for _ in range(400):
        cal = rng.gamma(4.0, 1.0, 60)
        t = np.sort(cal)[56]  # the 57th of 60: about 5 % flagged
        new = rng.gamma(4.0, 1.0, 50)
        p_high, p_low = conformal_pvalues(new[new <= t], cal, t)
        assert (p_high > 0).all() and (p_high <= 1).all()
        us.append(0.5 * (p_high + 1 - p_low))
    u = np.concatenate(us)
    assert abs(u.mean() - 0.5) < 0.01
    for level in (0.1, 0.25, 0.5):  # the mid-rank is uniform on the grid: P(u <= x) close to x
        assert abs((u <= level).mean() - level) < 0.02


def test_cusum_is_pages_recursion():
    x = np.random.default_rng(1).normal(-0.2, 1.0, 500)
    s, expected = 0.0, []
    for v in x:
        s = max(0.0, s + v)
        expected.append(s)
    np.testing.assert_allclose(cusum(x), expected, atol=1e-9)


@pytest.mark.parametrize("statistic", ["rank", "log"])
def test_the_false_alert_rate_holds_on_streams_that_do_not_drift(statistic):
    """400 products that do not drift, each with its own 40 passing calibration scores and 1,000 passed parts,
    watched by a monitor that promises at most 10 % false alerts per 1,000 parts: about that many. The same
    streams against a threshold simulated with uniform p-values alone (no calibration draw) alert far more
    often: the parts of one product share its calibration set."""
    monitor = DriftMonitor(false_alert_rate=0.10, horizon=1000, statistic=statistic, paths=2000)
    rng = np.random.default_rng(7)
    alerts = naive = 0
    h_naive = pvalue_threshold(None, 0.10, 1000, statistic, monitor.reference(40), paths=2000)  # same k
    for _ in range(400):
        cal = rng.lognormal(1.0, 0.3, 42)
        t = np.sort(cal)[39]
        new = rng.lognormal(1.0, 0.3, 1100)
        new = new[new <= t][:1000]
        result = monitor.run(*conformal_pvalues(new, cal, t), m=40)
        alerts += result.alert
        naive += result.path.max() >= h_naive
    rate = alerts / 400
    assert rate <= 0.10 + 3 * math.sqrt(0.1 * 0.9 / 400), rate  # within Monte Carlo error of the stated rate
    if statistic == "rank":  # ignoring the calibration draw: too many (the tail statistic "log" is hardly affected)
        assert naive / 400 > 0.10 + 3 * math.sqrt(0.1 * 0.9 / 400), naive


def test_a_shift_is_found_soon_and_its_onset_estimated():
    rng = np.random.default_rng(2)
    cal = rng.normal(0.0, 1.0, 200)
    t = np.sort(cal)[197]
    before, after = rng.normal(0.0, 1.0, 400), rng.normal(0.8, 1.0, 400)  # lighting: scores up by 0.8 sd
    stream = np.concatenate([before[before <= t], after[after <= t]])
    change = int((before <= t).sum())
    monitor = DriftMonitor(horizon=2000, paths=2000)
    result = monitor.run(*conformal_pvalues(stream, cal, t), m=198)
    assert result.alert and result.side == "higher"
    assert change < result.first < change + 80, (change, result.first)  # found within 80 parts
    assert abs(result.onset - change) < 40 and result.path.shape == (len(stream),)
    assert result.statistic >= result.threshold or result.path.max() >= result.threshold

    lower = np.concatenate([before[before <= t], rng.normal(-1.0, 1.0, 400)])
    down = monitor.run(*conformal_pvalues(lower, cal, t), m=198)
    assert down.alert and down.side == "lower" and down.first > change

    quiet = monitor.run(*conformal_pvalues(before[before <= t], cal, t), m=198)
    assert not quiet.alert and quiet.first is None and quiet.side is None


def test_the_threshold_only_test_watches_the_flag_rate():
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(horizon=2000, paths=1000)
    calm = monitor.run_flags(rng.random(2000) < 0.02, rate=0.02)
    assert not calm.alert
    burst = np.concatenate([rng.random(500) < 0.02, rng.random(500) < 0.10])
    result = monitor.run_flags(burst, rate=0.02)
    assert result.alert and result.side == "more flags" and 500 <= result.first < 700
    assert flag_threshold(0.02, 0.01, 2000, 1000) == result.threshold
    with pytest.raises(MoleflowError, match="between 0 and 1"):
        monitor.run_flags([True], rate=0.0)


def test_bad_settings_are_refused():
    for kwargs, word in (({"false_alert_rate": 1.5}, "false_alert_rate"), ({"horizon": 3}, "horizon"),
                         ({"statistic": "ks"}, "statistic"), ({"k": -1.0}, "reference value")):
        with pytest.raises(MoleflowError, match=word):
            DriftMonitor(**kwargs)


def _row(product: str, score: float, threshold: float, decision: str | None = None) -> dict:
    return {"sha256": None, "path": "p.png", "product": product, "nearest_product": product, "score": score,
            "threshold": threshold, "decision": decision or ("normal" if score <= threshold else "anomalous"),
            "source": "watch"}


def test_product_drift_reads_the_store_and_restarts_after_recalibration(tmp_path):
    rng = np.random.default_rng(4)
    cal_a, cal_b = np.sort(rng.normal(0, 1, 100)), np.sort(rng.normal(0, 1, 100))
    tasks = [{"name": "brick", "threshold": float(cal_a[97]), "calibration": {"scores": cal_a.tolist()}},
             {"name": "grass", "threshold": float(cal_b[97]), "calibration": {"scores": cal_b.tolist()}},
             {"name": "old", "threshold": 2.0, "calibration": {"false_alarm_interval": [0.001, 0.03]}}]
    with VerdictStore(sqlite_url(tmp_path / "v.sqlite")) as store:
        t_a, t_b = tasks[0]["threshold"], tasks[1]["threshold"]
        store.add_many([_row("brick", s, t_a) for s in rng.normal(0, 1, 300)]
                       + [_row("brick", s, t_a) for s in rng.normal(1.0, 1, 300)]  # brick drifts
                       + [_row("grass", s, t_b) for s in rng.normal(0, 1, 600)]  # grass does not
                       + [_row("grass", s, 99.0) for s in rng.normal(5, 1, 200)]  # an older threshold: not counted
                       + [_row("old", s, 2.0) for s in rng.normal(0, 1, 400)])
        monitor = DriftMonitor(horizon=1000, paths=2000)
        states = {s.product: s for s in product_drift(store, tasks, monitor)}
        brick, grass, old = states["brick"], states["grass"], states["old"]
        assert brick.alert and brick.direction == "higher" and brick.test == "p-values"
        assert 300 < brick.alert_verdict_id < 420 and brick.onset_at <= brick.alert_at
        assert brick.parts_to_alert and "calibrate --from-reviews" in brick.message
        assert not grass.alert
        assert grass.parts < 600 and grass.calibration_scores == 98 and len(grass.path) <= 200
        assert old.test == "flag rate" and not old.alert and old.parts == 400
        json_ready = brick.to_dict()
        assert json_ready["product"] == "brick" and isinstance(json_ready["path"], list)
        # brick recalibrated: a new threshold, nothing decided under it yet, so no alert
        tasks[0]["threshold"] = float(cal_a[98])
        again = {s.product: s for s in product_drift(store, tasks, monitor)}["brick"]
        assert not again.alert and again.parts == 0 and "no parts" in again.message


def test_warm_up_simulates_every_threshold_a_check_needs(tmp_path):
    """A service simulates the drift thresholds while loading (`warm_up`), so its first check simulates nothing."""
    from moleflow.drift import warm_up
    from moleflow.store.verdicts import VerdictStore, verdict_record

    monitor = DriftMonitor(paths=400, horizon=200)
    rng = np.random.default_rng(5)
    tasks = [{"name": "p-values", "threshold": 3.0, "calibration": {"scores": list(rng.normal(0, 1, 60))}},
             {"name": "flag rate", "threshold": 3.0, "calibration": {"false_alarm_interval": [0.001, 0.037]}}]
    with VerdictStore(f"sqlite:///{tmp_path / 'v.sqlite'}") as store:
        store.add_many([verdict_record({"product": t["name"], "score": float(x), "threshold": 3.0,
                                        "decision": "normal"}, sha256=None, path=f"{i}.png", model_sha256=None,
                                       engine="torch", latency_ms=1.0, source="serve")
                        for t in tasks for i, x in enumerate(rng.normal(0, 1, 30))])
        warm_up(tasks, monitor)
        before = (pvalue_threshold.cache_info().misses, flag_threshold.cache_info().misses)
        states = product_drift(store, tasks, monitor)
    assert [(s.test, s.parts) for s in states] == [("p-values", 30), ("flag rate", 30)]
    assert (pvalue_threshold.cache_info().misses, flag_threshold.cache_info().misses) == before
