"""Diagnosis (d) of docs/accuracy.md: image-score aggregation and map smoothing of a trained run.

    python benchmarks/diagnose_scoring.py RUN_DIR --data ROOT [--classes ...] [--json OUT]

Scores every test image of the run's classes once (router on), keeps the patch maps, and re-aggregates
them with several image-score rules and map blurs. For selection use it on a `moleflow tune` validation
folder (`--data OUT/validation`); on the real test sets it is a diagnosis only, never a way to pick
defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moleflow.config import ScoreConfig
from moleflow.data.datasets import load_class, load_masks
from moleflow.detector import MoleFlow
from moleflow.metrics import auroc, pixel_metrics
from moleflow.scoring import MapMaker, image_scores

RULES = {"max": ScoreConfig(mode="max"), "top3": ScoreConfig(mode="top_k", top_k=3),
         "top10": ScoreConfig(mode="top_k", top_k=10), "top1%": ScoreConfig(mode="top_k_percent", top_k_percent=0.01),
         "p99": ScoreConfig(mode="percentile", percentile=0.99), "mean": ScoreConfig(mode="mean")}
SIGMAS = (0.0, 2.0, 4.0, 8.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--classes", nargs="+")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = MoleFlow.load(args.run)
    classes = args.classes or [c for t in model.tasks for c in t.classes]
    size = model.config.data.image_size
    out: dict = {}
    for cls in classes:
        split = load_class(args.data, cls)
        labels = np.array([s.label for s in split.test])
        patch_maps = []
        for start in range(0, len(split.test), 32):
            pred = model.predict([s.image for s in split.test[start:start + 32]])
            maps = pred.patch_scores if isinstance(pred.patch_scores, list) else list(pred.patch_scores)
            patch_maps += [m.float() for m in maps]
        res: dict = {"image_auroc": {}}
        for name, rule in RULES.items():
            scores = np.array([float(image_scores(m[None], rule)[0]) for m in patch_maps])
            res["image_auroc"][name] = auroc(scores, labels)
        if split.has_masks:
            masks = load_masks(split.test, model.transform).numpy()
            res["pixel"] = {}
            for sigma in SIGMAS:
                makers: dict = {}
                pix = np.stack([makers.setdefault(tuple(m.shape), MapMaker(tuple(m.shape), size, sigma))(m[None])[0]
                                .numpy() for m in patch_maps])
                res["pixel"][f"sigma{sigma:g}"] = {k: float(v) for k, v in pixel_metrics(pix, masks).items()}
        out[cls] = res
        print(cls, json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
