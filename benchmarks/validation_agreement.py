"""Does a synthetic validation rank configurations as the real defects do? An agreement study (issue 26).

    python benchmarks/validation_agreement.py --data ../shared/datasets --out /tmp/agreement \
        --json benchmarks/results/validation_agreement.json

Every candidate (a set of overrides of the `cpu` preset, listed in CANDIDATES, fixed before the first run) learns the
four shared products one after another (1-1) from the same fit images: `moleflow tune`'s split (seed 0, at most 300
training images per product, 20 % of them held out). The one learned model is then scored, task-agnostic after the
last product, on three sets:
* `painted`: the held-out images as they are and with one painted defect or cut-paste each (`moleflow tune`'s
  validation today, `--anomalies painted`);
* `subtle`: the same held-out images with one texture-preserving anomaly each instead (`--anomalies subtle`:
  blends of the product's own texture, small shifts, low-contrast tints in irregular blobs);
* `test`: the shared sets' real test images and defects.
A set's score of a candidate is `moleflow tune`'s criterion: the mean over products of (image AUROC + pixel AUROC) / 2.
The study reports, for each validation set, Spearman's rho and Kendall's tau between its scores and the test scores
over the candidates (scipy.stats). This is a measurement of the validations, not a selection: the test scores rank
the validations, never the candidates.

The rule for the defaults, fixed before the first run: `moleflow tune` uses the validation set with the higher Spearman
rho. A default is changed only if the chosen validation ranks another candidate first by more than 0.25 points
(the margin of docs/decisions.md §7), and only when that validation reaches rho >= 0.8.

Added afterwards (stop 36), before its first run: a third validation, `faint` (`--anomalies faint`: the painted kinds
at severity 0.1-0.3 instead of 0.3-0.7, on the same held-out images), because the painted set's pixel AUROC sits at
94 and moved by less than 0.5 under every map candidate of docs/accuracy.md §12-13. The candidates and the rule
above are unchanged; `faint` is one more validation they rank (`--sets faint` learns each candidate again and scores
the new set, and the painted set again as a check that the model is the one measured before).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from moleflow import Config, MoleFlow
from moleflow.data.datasets import ClassSplit, load_class
from moleflow.evaluation import evaluate_class
from moleflow.tuning import make_validation_split, validation_score

CLASSES = ("magnetic_tile", "kolektor", "pcb_deeppcb", "cubes")
# name -> overrides of the cpu preset: memory sizes, the feature merge, step budgets and windows, the score's source,
# the map's resolution
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "coreset0": ["score.memory_coreset=0"],
    "coreset4000": ["score.memory_coreset=4000"],
    "whole_grid": ["train.step_window=1.0"],
    "merge_mean": ["backbone.feature_merge=mean", "backbone.embed_dim=128"],
    # the gated router and the trimmed median (router.trim_limit, the cpu preset's since stop 35) need the memories
    "flow_only": ["score.source=flow", "router.mode=prototype", "router.trim_limit=0"],
    "steps100": ["train.min_steps=100"],
    "size288": ["data.image_size=288"],  # a finer map: a 36 x 36 token grid instead of 28 x 28
}
SETS = ("painted", "subtle", "faint", "test")
VALIDATIONS = ("painted", "subtle", "faint")


def set_score(per_class: dict[str, dict]) -> float:
    """`moleflow tune`'s criterion: mean over products of (image AUROC + pixel AUROC) / 2 (image AUROC alone where a
    set has no masks: cubes)."""
    return validation_score({"final": per_class})


def splits_for(data: Path, out: Path) -> dict[str, dict[str, ClassSplit]]:
    """{set: {class: split}}: the validations (the same fit and held-out images) and the tests."""
    out_sets: dict[str, dict[str, ClassSplit]] = {s: {} for s in SETS}
    for c in CLASSES:
        real = load_class(data, c, "folder")
        for kind in VALIDATIONS:
            # the study was measured holding images out one by one (before data.group_file): kept, so that it reproduces
            out_sets[kind][c] = make_validation_split(real, out / f"validation_{kind}", 0.2, 300, 0, kind, None)
            assert [s.image for s in out_sets[kind][c].train] == [s.image for s in out_sets["painted"][c].train]
        out_sets["test"][c] = ClassSplit(c, out_sets["painted"][c].train, real.test, real.has_masks)
    return out_sets


def run_candidate(overrides: list[str], splits: dict[str, dict[str, ClassSplit]], sets: tuple[str, ...] = SETS
                  ) -> dict:
    """Learn the classes 1-1 on the fit images; score the final model on `sets`."""
    model = MoleFlow(Config.from_preset("cpu").with_overrides(["data.group_file=null", *overrides]))
    start = time.perf_counter()
    task_of = {c: model.fit_task([s.image for s in splits["painted"][c].train], name=c).task_id for c in CLASSES}
    learn_seconds = time.perf_counter() - start
    out: dict = {"learn_seconds": learn_seconds}
    for kind in sets:
        per_class = {}
        for c in CLASSES:
            ev = evaluate_class(model, splits[kind][c], task_of[c], among=list(task_of.values()))
            per_class[c] = {k: ev.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "routing_accuracy",
                                                         "per_defect_image_auroc")}
        out[kind] = {"score": set_score(per_class), "per_class": per_class}
    out["seconds"] = time.perf_counter() - start
    return out


def measure(results: dict[str, dict], name: str, overrides: list[str], splits: dict[str, dict[str, ClassSplit]],
            more_sets: tuple[str, ...] | list[str] = ()) -> bool:
    """Learn candidate `name` and score it on every set into `results[name]`; a candidate already there is learned
    again only for `more_sets` it lacks (and scored on painted too, which must equal its saved score: the runs are
    seeded, so it is the model measured before). False when nothing was measured."""
    if name not in results:
        results[name] = {"overrides": overrides, **run_candidate(overrides, splits)}
        return True
    missing = [k for k in more_sets if k not in results[name]]
    if not missing:
        return False
    again = run_candidate(overrides, splits, ("painted", *missing))
    if abs(again["painted"]["score"] - results[name]["painted"]["score"]) > 1e-9:
        raise SystemExit(f"{name}: painted score {again['painted']['score']} differs from the saved "
                         f"{results[name]['painted']['score']}: not the model measured before")
    results[name].update({k: again[k] for k in missing})
    return True


def agreement(results: dict[str, dict]) -> dict:
    names = list(results)
    test = [results[n]["test"]["score"] for n in names]
    out = {}
    for kind in [k for k in VALIDATIONS if all(k in results[n] for n in names)]:
        val = [results[n][kind]["score"] for n in names]
        rho, tau = stats.spearmanr(val, test).statistic, stats.kendalltau(val, test).statistic
        out[kind] = {"spearman": float(rho), "kendall": float(tau),
                     "ranked_first": names[int(np.argmax(val))], "margin_over_default":
                     float(max(val) - results["default"][kind]["score"]) if "default" in results else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder for the validation images")
    ap.add_argument("--json", type=Path, required=True, help="results (read back to resume)")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--sets", nargs="+", choices=VALIDATIONS,
                    help="for candidates already measured: learn again and score these validations (and painted)")
    args = ap.parse_args()
    splits = splits_for(args.data, args.out)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    results: dict = saved.get("candidates", {})
    for name in args.candidates:
        if not measure(results, name, CANDIDATES[name], splits, args.sets or ()):
            continue
        r = results[name]
        print(f"{name:12s} " + " ".join(f"{k} {100 * r[k]['score']:.2f}" for k in SETS if k in r)
              + f" ({r['seconds']:.0f} s)", flush=True)
        args.json.write_text(json.dumps({"rule": __doc__, "candidates": results}, indent=1))
    summary = agreement(results) if len(results) >= 3 else {}
    for kind, a in summary.items():
        print(f"{kind}: Spearman {a['spearman']:.3f}, Kendall {a['kendall']:.3f}, first {a['ranked_first']} "
              f"(+{100 * a['margin_over_default']:.2f} over default)")
    args.json.write_text(json.dumps({"rule": __doc__, "candidates": results, "agreement": summary}, indent=1))


if __name__ == "__main__":
    main()
