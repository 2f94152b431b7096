"""Drift on the line: how soon `drift.py` alerts after a lighting shift, and how often it alerts without one.

    python benchmarks/drift.py [--json benchmarks/results/drift.json] [--scores drift_scores.npz]

1. A tiny model (the `tiny` preset with the default `cpu` preset's tiling and patch memory, 1 epoch, as the
   service tests' run) learns two generated products (brick, grass: 40 training images each). Per product it
   then scores 600 good parts it never saw (seed 1) and the same 300 last of them again with the lighting
   shifted: brightness x 1.15 (`--shift`).
2. For m = 36, 100 and 300 calibration scores: m of the first 300 unshifted scores are the calibration set,
   the threshold is the conformal one at 1 % (as `calibrate` sets it), and the drift monitor (defaults: 1 %
   chance of a false alert per 10,000 good parts) watches streams of parts drawn from the scored parts:
   * delay: 200 unshifted parts (from the last 300 unshifted scores), then shifted parts until the alert (at
     most 3,000); the delay is counted in parts of the product after the shift (passed and flagged), over
     `--repeats` streams; an alert before the shift counts as early;
   * false alerts on unshifted streams: `--null-streams` shuffles of the 600 unshifted scores, each giving a
     calibration set (its first m) and a stream of 300 distinct parts (its last 300), watched by a monitor
     stated at 1 % per 300 parts; the share of streams that ever alert. (Streams drawn with replacement from
     the scored parts are not a fair null: the finite pool's own mean differs from the product's, a drift
     the monitor rightly sees; a first version of this script did that and saw 2-5 % false alerts.)
   for both statistics ("rank", the default, and "log").
3. The same false-alert rate on exact null streams (uniform scores, each stream its own m calibration draws):
   the simulation `drift.pvalue_threshold` sets h by, checked with fresh seeds.

Scores are resampled from ~300 scored parts per condition: streams repeat parts, so the delays measure the
test on this model's score distributions, not new images. Prints a table; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scored_parts(shift: float, threads: int, cache: Path | None) -> dict:
    """Per product: calibration pool (first 300 unshifted), test pool (last 300 unshifted), shifted pool
    (kept in `cache`, an .npz, when given: a second run only simulates)."""
    if cache is not None and cache.is_file():
        saved = np.load(cache)
        return {name: {key: saved[f"{name}/{key}"] for key in ("calibration_pool", "test_pool", "shifted_pool")}
                | {"shifted_routed_to_it": float(saved[f"{name}/routed"]), "shifted_unknown": float(saved[f"{name}/unknown"])}
                for name in ("brick", "grass")}
    import torch

    from moleflow import Config, MoleFlow
    from moleflow.data.synthetic import generate_product

    torch.set_num_threads(threads)
    overrides = {"train.epochs": 1, "data.tiling": "aspect", "score.source": "flow+memory"}
    model = MoleFlow(Config.from_preset("tiny").with_overrides(overrides))
    out = {}
    for name in ("brick", "grass"):
        train = generate_product(name, n_train=40, n_test_good=0, n_test_defect=0, size=112, seed=0).train_images
        start = time.perf_counter()
        model.fit_task(list(train), name=name)
        log(f"{name}: learned in {time.perf_counter() - start:.0f} s")
    for i, name in enumerate(("brick", "grass")):
        made = generate_product(name, n_train=0, n_test_good=600, n_test_defect=0, size=112, seed=1)
        good = list(made.test_images)
        shifted = [np.clip(g.astype(np.float32) * shift, 0, 255).astype(np.uint8) for g in good[300:]]
        start = time.perf_counter()
        ids = [i] * len(good)
        plain = model.predict(good, task_ids=ids).scores.double().numpy()
        moved = model.predict(shifted, task_ids=ids[:300]).scores.double().numpy()
        routed = model.predict(shifted)
        out[name] = {"calibration_pool": plain[:300], "test_pool": plain[300:], "shifted_pool": moved,
                     "shifted_routed_to_it": float((routed.task_ids == i).float().mean()),
                     "shifted_unknown": float((~routed.known).float().mean())}
        log(f"{name}: scored 900 parts in {time.perf_counter() - start:.0f} s; shifted median score "
            f"{np.median(moved):.3f} vs {np.median(plain[300:]):.3f}")
    if cache is not None:
        np.savez(cache, **{f"{n}/{k}": v for n, p in out.items() for k, v in p.items() if k.endswith("pool")},
                 **{f"{n}/routed": p["shifted_routed_to_it"] for n, p in out.items()},
                 **{f"{n}/unknown": p["shifted_unknown"] for n, p in out.items()})
    return out


def _first_alert(monitor, cal: np.ndarray, threshold: float, scores: np.ndarray, m: int) -> int | None:
    from moleflow.drift import conformal_pvalues

    passed = np.flatnonzero(scores <= threshold)
    if not len(passed):
        return None
    result = monitor.run(*conformal_pvalues(scores[passed], cal, threshold), m=m)
    return int(passed[result.first]) if result.alert else None


def delays(pools: dict, m: int, statistic: str, repeats: int, rng: np.random.Generator, before: int = 200,
           after: int = 3000) -> dict:
    from moleflow.calibration import conformal_threshold
    from moleflow.drift import DriftMonitor

    cal = np.sort(pools["calibration_pool"][:m])
    threshold = conformal_threshold(cal, 0.01).threshold
    monitor = DriftMonitor(statistic=statistic)
    m_pass = int((cal <= threshold).sum())
    found, early, missed = [], 0, 0
    for _ in range(repeats):
        stream = np.concatenate([rng.choice(pools["test_pool"], before), rng.choice(pools["shifted_pool"], after)])
        first = _first_alert(monitor, cal, threshold, stream, m_pass)
        if first is None:
            missed += 1
        elif first < before:
            early += 1
        else:
            found.append(first - before + 1)
    flagged_after = float((pools["shifted_pool"] > threshold).mean())
    q = (lambda p: float(np.percentile(found, p))) if found else (lambda p: None)
    return {"m": m, "statistic": statistic, "k": monitor.reference(m_pass), "h": monitor.threshold(m_pass),
            "threshold": float(threshold), "flagged_before": float((pools["test_pool"] > threshold).mean()),
            "flagged_after": flagged_after, "median_delay": q(50), "p10_delay": q(10), "p90_delay": q(90),
            "alerted": len(found), "early": early, "missed": missed, "repeats": repeats}


def null_rate(pools: dict, m: int, statistic: str, streams: int, rng: np.random.Generator,
              horizon: int = 300) -> dict:
    from moleflow.calibration import conformal_threshold
    from moleflow.drift import DriftMonitor

    good = np.concatenate([pools["calibration_pool"], pools["test_pool"]])
    monitor = DriftMonitor(statistic=statistic, horizon=horizon)
    alerts = 0
    for _ in range(streams):
        order = rng.permutation(len(good))
        cal, stream = np.sort(good[order[:m]]), good[order[-horizon:]]  # distinct parts, no resampling
        threshold = conformal_threshold(cal, 0.01).threshold
        alerts += _first_alert(monitor, cal, threshold, stream, int((cal <= threshold).sum())) is not None
    return {"m": m, "statistic": statistic, "streams": streams, "horizon": horizon, "false_alerts": alerts,
            "rate": alerts / streams}


def exact_null(m: int, statistic: str, streams: int, seed: int, horizon: int = 10_000) -> dict:
    from moleflow.drift import DriftMonitor, _null_pvalues

    monitor = DriftMonitor(statistic=statistic)
    rng = np.random.default_rng(seed)
    alerts = 0
    for _ in range(streams):
        p_high, p_low = _null_pvalues(rng, 1, horizon, m)
        alerts += monitor.run(p_high[0], p_low[0], m=m).alert
    return {"m": m, "statistic": statistic, "streams": streams, "horizon": horizon, "false_alerts": alerts,
            "rate": alerts / streams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shift", type=float, default=1.15, help="brightness factor of the lighting shift")
    parser.add_argument("--repeats", type=int, default=200, help="shifted streams per setting")
    parser.add_argument("--null-streams", type=int, default=1000, help="unshifted streams per setting")
    parser.add_argument("--scores", type=Path, help="keep the scored parts in this .npz (reused when it exists)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    parts = scored_parts(args.shift, args.threads, args.scores)
    rng = np.random.default_rng(0)
    rows, nulls, exact = [], [], []
    for name, pools in parts.items():
        for m in (36, 100, 300):
            for statistic in ("rank", "log"):
                clock = time.perf_counter()
                row = {"product": name, **delays(pools, m, statistic, args.repeats, rng)}
                null = {"product": name, **null_rate(pools, m, statistic, args.null_streams, rng)}
                rows.append(row)
                nulls.append(null)
                log(f"{name} m={m} {statistic}: median delay {row['median_delay']} (p90 {row['p90_delay']}, missed "
                    f"{row['missed']}, early {row['early']}); false alerts {null['false_alerts']}/{null['streams']} "
                    f"({time.perf_counter() - clock:.0f} s)")
    for m in (36, 100, 300):
        for statistic in ("rank", "log"):
            exact.append(exact_null(m, statistic, min(args.null_streams, 500), seed=100 + m))
    result = {"command": "python benchmarks/drift.py " + " ".join(sys.argv[1:]), "shift": args.shift,
              "delays": rows, "false_alerts_model": nulls, "false_alerts_exact": exact,
              "parts": {n: {k: v for k, v in p.items() if not k.endswith("pool")} for n, p in parts.items()},
              "seconds": time.perf_counter() - start,
              "environment": {"python": platform.python_version(), "numpy": np.__version__,
                              "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    print(f"| product | m | statistic | k | h | flagged before / after the shift | median delay (p10-p90), parts "
          f"| alerted / early / missed | false alerts, 300 distinct unshifted parts (stated 1 %) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, null in zip(rows, nulls):
        d = row["median_delay"]
        span = "n/a" if d is None else f"**{d:.0f}** ({row['p10_delay']:.0f}-{row['p90_delay']:.0f})"
        print(f"| {row['product']} | {row['m']} | {row['statistic']} | {row['k']:.3f} | {row['h']:.1f} | "
              f"{row['flagged_before']:.1%} / {row['flagged_after']:.1%} | {span} | {row['alerted']} / {row['early']} / "
              f"{row['missed']} | {null['false_alerts']}/{null['streams']} ({null['rate']:.1%}) |")
    print("\nexact null (uniform scores, own calibration draw per stream, 10,000 parts): " + "; ".join(
        f"m={e['m']} {e['statistic']} {e['false_alerts']}/{e['streams']}" for e in exact))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
