"""Pixel metrics of a learned run under several ways of making its pixel maps, without learning again.

    python benchmarks/map_making.py --run RUN --data ROOT --sigmas 2 3 4 6 8 [--centres none median]
        [--map-weights 1 2 4 inf] [--json OUT]

Three things only turn patch scores into pixel maps, so one learned model serves every candidate:
* the smoothing (`score.map_sigma`) and the centring (`score.map_centre`): the products' images of ROOT (MVTec
  layout) are scored once (the evaluation cache keeps their features and patch scores) and their pixel maps made
  again with each sigma and centring;
* the memory's weight in the map's patch values (`--map-weights`; `inf`: the memory distance alone): standardised
  flow NLL + w x standardised memory distance, where the image score keeps the run's `score.memory_weight`. Pixel
  AUROC depends on the maps only, so each weight is measured by scoring ROOT's images with the memory's weight set
  to w; the image AUROC reported is the run's own (its image scores do not change). Not an option of the library:
  measured in docs/accuracy.md §13 and not taken.
Used on the synthetic validation sets that `moleflow tune` writes (ROOT = TUNE_OUT/validation, RUN = a candidate's
run, learned on the images not held out: folders without train/ are read through a temporary view) to choose, and on
the shared test sets afterwards to measure the chosen value against the one before.

The rule for the centring (issue 26, written before its first run): candidates `none` (today) and `median`, at
sigma 4, on the default preset learned on `moleflow tune`'s fit images (seed 0, at most 300 per product, 20 % held
out). The painted validation decides with `moleflow tune`'s criterion (the mean over products of (image AUROC +
pixel AUROC) / 2; image AUROC is the same for both, so the pixel AUROC moves it): `median` replaces `none` only if it
is better by more than 0.25 points (the margin of docs/decisions.md §7) and the subtle validation (the same held-out
images, texture-preserving anomalies) loses no more than 0.25 points. The test sets are scored afterwards, for the
record; they cannot change the choice.

The rule for the map's memory weight (written before its first run, after a diagnosis on the test sets,
benchmarks/diagnose_map_resolution.py, found a memory alone localising magnetic_tile's real defects at 77.5 pixel
AUROC where the default's maps reach 70.5): the same run; the painted validation decides with the same criterion; a
map weight other than 1 is adopted only if better by more than 0.25 points and the subtle validation loses no more
than 0.25 points against weight 1; among several, the best on the painted validation. The test sets afterwards, for
the record.

Added in stop 36, before its run: the centring decided again, now that the default weighs the memory 4 to 1 and
`faint` is `moleflow tune`'s validation (docs/accuracy.md §14). RUN = the new default learned on tune's fit images;
`faint` decides with the same criterion and margin (median replaces none only if better by more than 0.25 points),
and the painted validation may lose no more than 0.25 points.

Added in stop 37, before its run: the smoothing decided again (docs/accuracy.md §9 chose it on the painted validation
at weight 1). RUN = the default (weight 4) learned on tune's fit images; sigmas 2, 3, 4, 6, 8; the rule of §9 with
`faint` deciding: the highest mean synthetic pixel AUROC over the products, and sigma 4 stays unless another is better
by more than 0.1 points. The test sets are scored afterwards only if the sigma changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from moleflow.data.datasets import load_class
from moleflow.detector import MoleFlow
from moleflow.evaluation import evaluate_classes, evaluation_cache
from moleflow.scoring import MapMaker
from moleflow.tuning import validation_score


def readable_root(root: Path, classes: list[str], tmp: Path) -> Path:
    """ROOT itself when every class has train/good; else a view of it in `tmp` whose train/good is the class's
    test/good (only test images are evaluated)."""
    if all((root / c / "train" / "good").is_dir() for c in classes):
        return root
    for c in classes:
        (tmp / c / "train").mkdir(parents=True)
        (tmp / c / "train" / "good").symlink_to((root / c / "test" / "good").resolve())
        for part in ("test", "ground_truth"):
            (tmp / c / part).symlink_to((root / c / part).resolve())
    return tmp


def set_map_making(model: MoleFlow, sigma: float, centre: str) -> None:
    """Make the model's pixel maps with `sigma` and `centre` from now on (the map makers are rebuilt, nothing else
    changes)."""
    inspector = model.inspector
    model.config.score.map_sigma, model.config.score.map_centre = sigma, centre
    inspector.map_maker = MapMaker.of(inspector.grid, model.config).to(inspector.device)
    inspector._stitched_makers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", required=True)
    parser.add_argument("--centres", nargs="+", default=["none"], choices=["none", "median"])
    parser.add_argument("--map-weights", type=float, nargs="+",
                        help="the memory's weight in the maps' patch values (inf: the memory alone)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = MoleFlow.load(args.run)
    class_task = {c: t.task_id for t in model.tasks for c in t.classes}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = readable_root(args.data, list(class_task), Path(tmp))
        splits = {c: load_class(root, c, "folder") for c in class_task}
        cache = evaluation_cache(model)  # the run's own patch scores
        image = {c: e.metrics["image_auroc"] for c, e in evaluate_classes(model, splits, class_task,
                                                                         cache=cache).items()}
        for weight in args.map_weights or [None]:
            if weight is not None:  # a large finite weight ranks patches as the memory alone (the flow breaks ties)
                model.inspector.memory.weight = weight if np.isfinite(weight) else 1e6
            for sigma, centre in [(s, c) for s in args.sigmas for c in args.centres]:
                set_map_making(model, sigma, centre)
                evals = evaluate_classes(model, splits, class_task, cache=cache if weight is None else None)
                per_class = {c: {**{k: e.metrics.get(k) for k in ("pixel_auroc", "pixel_ap", "aupro")},
                                 "image_auroc": image[c]} for c, e in evals.items()}
                masked = [m for m in per_class.values() if m["pixel_auroc"] is not None]
                key = " ".join([f"{sigma:g}"] + ([centre] if args.centres != ["none"] else [])
                               + ([f"w{weight:g}"] if weight is not None else []))
                rows[key] = r = {"per_class": per_class,
                                 "pixel_auroc": float(np.mean([m["pixel_auroc"] for m in masked])),
                                 "aupro": float(np.mean([m["aupro"] for m in masked])),
                                 "image_auroc": float(np.mean(list(image.values()))),
                                 "score": validation_score({"final": per_class})}  # `moleflow tune`'s criterion
                print(f"{key}: score {100 * r['score']:.2f}, pixel AUROC {100 * r['pixel_auroc']:.2f}, AUPRO "
                      f"{100 * r['aupro']:.2f}, image AUROC {100 * r['image_auroc']:.2f}  ("
                      + ", ".join(f"{c} {100 * m['pixel_auroc']:.2f}" for c, m in per_class.items()
                                  if m["pixel_auroc"] is not None) + ")", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "data": str(args.data), "sigmas": rows}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
