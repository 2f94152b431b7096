"""Diagnosis (a) and (c) of docs/accuracy.md: how far do the features alone go, and what does geometry cost?

    python benchmarks/diagnose_features.py [--data ../shared/datasets] [--json benchmarks/results/diagnose_features.json]

For each set, a PatchCore-style nearest-neighbour score (no flow, no training) on three feature paths of
the same frozen EfficientNet-Lite0 at 224 px:
  * ``mean128``: moleflow's faithful tokens (3x3 neighbourhoods pooled to D = 128, mean of the two layers);
  * ``concat152``: the backbone's raw channels side by side (3x3 average, layer 3 upsampled, 40 + 112);
  * ``concat152_aspect``: the same with the image's aspect ratio kept (short side 224), for elongated parts.
Memory bank: a seeded random 10 % of the training patches (train capped at 300 images, as the PatchCore
reference run). Image score: the largest patch distance; pixel map: bilinear + Gaussian sigma 4 at 224 px.
Nothing here is tuned: it bounds what a density model on each feature path can reach.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moleflow.backbones import FeatureExtractor
from moleflow.config import BackboneConfig
from moleflow.data.datasets import load_class
from moleflow.data.transforms import IMAGENET_MEAN, IMAGENET_STD, load_mask, load_rgb
from moleflow.memory import nearest_distance
from moleflow.metrics import image_metrics, pixel_metrics
from moleflow.scoring import anomaly_maps

SETS = ("magnetic_tile", "kolektor", "pcb_deeppcb", "cubes")


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def geometry(img: Image.Image, aspect: bool) -> tuple[int, int]:
    if not aspect:
        return 224, 224
    w, h = img.size
    s = 224 / min(w, h)
    return max(224, round(w * s / 8) * 8), max(224, round(h * s / 8) * 8)


@torch.no_grad()
def features(extractors: dict[str, FeatureExtractor], paths, path_kind: str) -> list[torch.Tensor]:
    ext = extractors["mean" if path_kind == "mean128" else "concat"]
    out = []
    for p in paths:
        img = load_rgb(p)
        out.append(ext.tokens(to_tensor(img, geometry(img, path_kind.endswith("aspect")))[None])[0])
    return out


def run_set(ext: dict[str, FeatureExtractor], root: Path, name: str, kind: str, cap: int = 300) -> dict:
    split = load_class(root, name, "folder")
    train = split.train[:cap]
    t0 = time.perf_counter()
    bank = torch.cat([f.reshape(-1, f.shape[-1]) for f in features(ext, [s.image for s in train], kind)])
    gen = torch.Generator().manual_seed(0)
    bank = bank[torch.randperm(len(bank), generator=gen)[: max(1, len(bank) // 10)]]
    feats = features(ext, [s.image for s in split.test], kind)
    scores, maps, masks = [], [], []
    for f, s in zip(feats, split.test):
        d = nearest_distance(f.reshape(-1, f.shape[-1]), bank).reshape(f.shape[:2])
        scores.append(float(d.max()))
        m = anomaly_maps(d[None], 224, 4.0)[0]  # any (h, w) grid -> 224 x 224 (the masks' squash geometry)
        maps.append(m.numpy())
        if split.has_masks:
            mk = load_mask(s.mask).resize((224, 224), Image.NEAREST) if s.mask else None
            masks.append((np.asarray(mk) > 0).astype(np.uint8) if mk is not None else np.zeros((224, 224), np.uint8))
    labels = np.array([s.label for s in split.test])
    scores_np = np.array(scores)
    out = {k: float(v) for k, v in image_metrics(scores_np, labels).items()}
    if split.has_masks:
        out.update({k: float(v) for k, v in pixel_metrics(np.stack(maps), np.stack(masks)).items()})
    types = sorted({s.defect_type for s in split.test if s.label == 1})
    out["per_defect_image_auroc"] = {
        t: float(image_metrics(scores_np[[(s.label == 0 or s.defect_type == t) for s in split.test]],
                               labels[[(s.label == 0 or s.defect_type == t) for s in split.test]])["image_auroc"])
        for t in types}
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(here.parent.parent / "shared" / "datasets"))
    ap.add_argument("--json", default=str(here / "results" / "diagnose_features.json"))
    ap.add_argument("--kinds", nargs="+", default=["mean128", "concat152", "concat152_aspect"])
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = {merge: FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", feature_merge=merge,
                                                 embed_dim=128 if merge == "mean" else None))
           for merge in ("mean", "concat")}
    out = Path(args.json)
    results: dict = json.loads(out.read_text()) if out.is_file() else {}  # adds to earlier results
    for name in args.sets:
        for kind in args.kinds:
            r = run_set(ext, Path(args.data), name, kind)
            results.setdefault(name, {})[kind] = r
            print(name, kind, {k: round(100 * v, 1) for k, v in r.items() if isinstance(v, float) and k != "seconds"},
                  f"{r['seconds']:.0f}s", flush=True)
            Path(args.json).write_text(json.dumps(results, indent=1))  # after every set, so a long run keeps its results


if __name__ == "__main__":
    main()
