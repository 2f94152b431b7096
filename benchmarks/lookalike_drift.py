"""Does the line notice a never-learned look-alike product? The per-part checks and the drift monitor, measured.

    python benchmarks/lookalike_drift.py --data ../shared/datasets --out /tmp/lookalike_drift \
        --json benchmarks/results/lookalike_drift.json

docs/decisions.md §8 found that the unknown-product check calls a never-learned look-alike "known" part by part
(another lighting of magnetic_tile: 100 % of its good parts). A line sees parts one after another, though, and
`drift.py` watches each product's stream of passed parts against its calibration scores. This learns one product
from magnetic_tile's lightings `--learned` (exp1-3 by default, mean grey 67-101; the cpu preset, whole tiles held
out for calibration) and feeds it, as a line would, streams of good parts (seeded order):
* `own`: the learned lightings' good TEST images (never trained on): what the line normally sends;
* `exp<k>`: every good image (train and test) of a lighting never learned (exp4-6, mean grey 119-153).
Per stream: the share of parts flagged, called an unknown product, and for the parts that pass, whether the
drift monitor (`DriftMonitor`, its default 1 % false-alert rate per 10,000 good parts) alerts and after how many
passed parts. Test images are read only as a stream to watch; nothing here sets a default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moleflow import Config, MoleFlow
from moleflow.drift import MIN_SCORES, DriftMonitor, conformal_pvalues


def lighting_images(data: Path, lighting: int, splits: tuple[str, ...]) -> list[Path]:
    """magnetic_tile's good images of lighting exp<k> in `splits` ("train", "test")."""
    return sorted(f for s in splits for f in (data / "magnetic_tile" / s / "good").glob(f"exp{lighting}_*"))


def stream_figures(model: MoleFlow, images: list[Path], monitor: DriftMonitor, rng: np.random.Generator) -> dict:
    """What the line sees of a stream of good parts (module doc)."""
    order = [images[i] for i in rng.permutation(len(images))]
    pred = model.predict(order)
    task = model.tasks[0]
    scores = pred.scores.double().numpy()
    known, flagged = pred.known.numpy(), pred.anomalous.numpy() | ~pred.known.numpy()
    calibration = np.asarray(task.calibration["scores"], dtype=np.float64)
    passed = scores[~flagged]
    m = int((calibration <= task.threshold).sum())
    out = {"parts": len(order), "flagged": float(flagged.mean()), "unknown_product": float((~known).mean()),
           "passed": int(len(passed)), "calibration_scores_passing": m,
           "median_router_distance": float(np.median(pred.router_distance.numpy()))}
    if m >= MIN_SCORES and len(passed):
        result = monitor.run(*conformal_pvalues(passed, calibration, task.threshold), m)
        out.update(test="p-values", alert=bool(result.alert), side=result.side if result.alert else None,
                   passed_parts_to_alert=int(result.first) + 1 if result.alert else None,
                   statistic=round(float(result.statistic), 3), threshold=round(float(result.threshold), 3))
    else:
        out.update(test=f"not run: {m} passing calibration scores (< {MIN_SCORES})", alert=None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="where the learned model is saved")
    ap.add_argument("--learned", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--foreign", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    start = time.perf_counter()
    if (args.out / "manifest.json").is_file():
        model = MoleFlow.load(args.out)
    else:
        model = MoleFlow(Config.from_preset("cpu"))
        train = [f for k in args.learned for f in lighting_images(args.data, k, ("train",))]
        model.fit_task(train, name="mt_" + "".join(map(str, args.learned)))
        model.save(args.out)
    task = model.tasks[0]
    result = {"learned": args.learned, "n_train": task.n_train, "n_calibration": task.n_calibration,
              "calibration": {k: task.calibration.get(k) for k in ("held_out_by", "held_out_groups", "groups")},
              "seconds_to_learn": round(time.perf_counter() - start, 1), "streams": {}}
    monitor, rng = DriftMonitor(), np.random.default_rng(args.seed)
    streams = {"own": [f for k in args.learned for f in lighting_images(args.data, k, ("test",))]}
    streams |= {f"exp{k}": lighting_images(args.data, k, ("train", "test")) for k in args.foreign}
    for name, images in streams.items():
        figures = stream_figures(model, images, monitor, rng)
        result["streams"][name] = figures
        print(f"{name:5s} {figures['parts']:4d} parts: flagged {100 * figures['flagged']:5.1f} %, unknown product "
              f"{100 * figures['unknown_product']:5.1f} %, router distance {figures['median_router_distance']:.1f}; "
              f"drift: {figures['test']}, alert {figures['alert']}"
              + (f" ({figures['side']}, after {figures['passed_parts_to_alert']} of {figures['passed']} passed parts)"
                 if figures.get("alert") else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
