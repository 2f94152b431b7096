"""Where is the missing pixel AUROC? A diagnosis of map resolution with the patch memory alone (issue 26).

    python benchmarks/diagnose_map_resolution.py --data ../shared/datasets --json OUT.json

A diagnosis, not a selection (docs/accuracy.md, "How settings were chosen"): it reads the shared test sets to see
whether finer feature maps are worth offering as a candidate, which validation would then have to choose. For each
masked product, a PatchCore-style memory of 20,000 seeded random training patch tokens scores the test images by
nearest-neighbour distance, under two token grids of EfficientNet-Lite0 at 224 px (whole images squashed, no tiles):
* `stride8`: today's tokens: the stride-8 and stride-16 maps (each a 3x3 mean), side by side on the 28 x 28 grid;
* `stride4`: the stride-4 map (24 channels, 3x3 mean) added, every map on the 56 x 56 grid.
Maps are made as `moleflow` makes them (bilinear upsampling, Gaussian sigma 4) and scored with its pixel AUROC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from moleflow.backbones import _load_into, lite_state_dict
from moleflow.data.datasets import load_class, load_masks
from moleflow.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_rgb
from moleflow.memory import nearest_distance, sample_patches
from moleflow.metrics import pixel_auroc
from moleflow.scoring import anomaly_maps

CLASSES = ("magnetic_tile", "kolektor", "pcb_deeppcb")
SIZE = 224


def backbone() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    _load_into(model, lite_state_dict("tf_efficientnet_lite0"), "tf_efficientnet_lite0")
    return model.eval()


@torch.no_grad()
def tokens(model, pixels: torch.Tensor, grid: str) -> torch.Tensor:
    """(B, 3, S, S) -> (B, H, W, D): each map's 3x3 mean, upsampled bilinearly to the grid's resolution."""
    maps = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=True) for m in model(pixels)]
    if grid == "stride8":
        maps = maps[1:]
    size = maps[0].shape[-2:]
    out = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
           for m in maps]
    return torch.cat(out, 1).permute(0, 2, 3, 1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = backbone()
    transform = ImageTransform(SIZE, "squash", IMAGENET_MEAN, IMAGENET_STD)
    rows: dict[str, dict] = {}
    for c in CLASSES:
        split = load_class(args.data, c, "folder")
        train = [s.image for s in split.train][::max(1, len(split.train) // args.max_train)][:args.max_train]
        masks = load_masks(split.test, transform).numpy()
        rows[c] = {}
        for grid in ("stride8", "stride4"):
            start = time.perf_counter()
            fit = torch.cat([tokens(model, torch.stack([transform(load_rgb(p)) for p in train[i:i + 16]]), grid)
                             for i in range(0, len(train), 16)])
            bank = sample_patches(fit, 1.0, 0, 20000)
            maps = []
            for i in range(0, len(split.test), 16):
                t = tokens(model, torch.stack([transform(load_rgb(s.image)) for s in split.test[i:i + 16]]), grid)
                b, h, w, d = t.shape
                maps.append(anomaly_maps(nearest_distance(t.reshape(-1, d), bank).reshape(b, h, w), SIZE, 4.0))
            score = pixel_auroc(torch.cat(maps).numpy(), masks)
            rows[c][grid] = {"pixel_auroc": float(score), "grid": [h, w], "dim": d,
                             "seconds": time.perf_counter() - start}
            print(f"{c} {grid}: pixel AUROC {100 * score:.2f} ({h} x {w} x {d}, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
    for grid in ("stride8", "stride4"):
        print(f"mean {grid}: {100 * np.mean([rows[c][grid]['pixel_auroc'] for c in CLASSES]):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
