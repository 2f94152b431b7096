"""Pixel metrics of a learned run under several map smoothings (`score.map_sigma`), without learning again.

    python benchmarks/map_smoothing.py --run RUN --data ROOT --sigmas 2 3 4 6 8 [--json OUT]

The smoothing only turns patch maps into pixel maps (image scores come from the patch maps), so one learned model
serves every candidate: its products' test images of ROOT (MVTec layout) are scored once (the evaluation cache
keeps their features and patch scores) and their pixel maps made again with each sigma. Used on the synthetic
validation sets that `moleflow tune` writes (ROOT = TUNE_OUT/validation, RUN = a candidate's run, learned on the
images not held out: folders without train/ are read through a temporary view) to choose the default, and on the
shared test sets afterwards to measure the chosen value against the one before.
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


def set_sigma(model: MoleFlow, sigma: float) -> None:
    """Make the model's pixel maps with `sigma` from now on (the map makers are rebuilt, nothing else changes)."""
    inspector = model.inspector
    model.config.score.map_sigma = sigma
    inspector.map_maker = MapMaker(inspector.grid, model.config.data.image_size, sigma).to(inspector.device)
    inspector._stitched_makers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = MoleFlow.load(args.run)
    class_task = {c: t.task_id for t in model.tasks for c in t.classes}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = readable_root(args.data, list(class_task), Path(tmp))
        splits = {c: load_class(root, c, "folder") for c in class_task}
        cache = evaluation_cache(model)
        for sigma in args.sigmas:
            set_sigma(model, sigma)
            evals = evaluate_classes(model, splits, class_task, cache=cache)
            per_class = {c: {k: e.metrics.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}
                         for c, e in evals.items()}
            masked = [m for m in per_class.values() if m["pixel_auroc"] is not None]
            rows[f"{sigma:g}"] = {"per_class": per_class,
                                  "pixel_auroc": float(np.mean([m["pixel_auroc"] for m in masked])),
                                  "aupro": float(np.mean([m["aupro"] for m in masked])),
                                  "image_auroc": float(np.mean([m["image_auroc"] for m in per_class.values()]))}
            r = rows[f"{sigma:g}"]
            print(f"sigma {sigma:g}: pixel AUROC {100 * r['pixel_auroc']:.2f}, AUPRO {100 * r['aupro']:.2f}, "
                  f"image AUROC {100 * r['image_auroc']:.2f}  ("
                  + ", ".join(f"{c} {100 * m['pixel_auroc']:.2f}" for c, m in per_class.items()
                              if m["pixel_auroc"] is not None) + ")", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "data": str(args.data), "sigmas": rows}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
