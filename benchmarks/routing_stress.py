"""Which routing feature can a defect not move? Measured on held-out TRAINING normals only.

    python benchmarks/routing_stress.py --data ../shared/datasets \
        --classes magnetic_tile kolektor pcb_deeppcb cubes --json benchmarks/results/routing_stress.json

For each product, 80 % of its training images (seeded) build the router prototypes; the other 20 % are
routed as they are and with one pasted defect covering 2, 5, 10 and 20 % of the image
(`moleflow.routing_stress.paste_area_defect`). Two settings:
* the products themselves (routing among the given products);
* look-alike pairs: each product against a copy of itself under a small global change (brightness
  x 1.15, colour gains 1.15 / 1 / 0.85, or a 1.15 zoom), the hardest case for a router.
Every routing statistic (`router.statistic`) is computed from the same backbone tokens, so the comparison
is exact. Only the backbone and the router run; test images are never read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moleflow import Config, MoleFlow
from moleflow.data.datasets import load_class
from moleflow.data.transforms import load_rgb
from moleflow.router import PrototypeRouter
from moleflow.routing_stress import AREAS, LOOK_ALIKE_KINDS, look_alike, paste_area_defect

STATISTICS = ("mean", "median")


@torch.no_grad()
def features(model: MoleFlow, images, batch_size: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{statistic: (per-tile features (M, D), owner (M,))} of PIL images, tiles as the model cuts them."""
    per_stat = {s: [] for s in STATISTICS}
    owners, offset = [], 0
    for start in range(0, len(images), batch_size):
        prep = model.prepare(images[start:start + batch_size])
        tokens = model.extractor.tokens(prep.pixels)
        for s in STATISTICS:
            router = PrototypeRouter(model.config.router.__class__(**{**vars(model.config.router), "statistic": s}))
            per_stat[s].append(router.features(tokens))
        owners.append(prep.owner + offset)
        offset += prep.n_images
    owner = torch.cat(owners)
    return {s: (torch.cat(v), owner) for s, v in per_stat.items()}


def route_accuracy(cfg, train: dict[int, tuple[torch.Tensor, torch.Tensor]], test: tuple[torch.Tensor, torch.Tensor],
                   truth: int) -> float:
    router = PrototypeRouter(cfg)
    for task, (x, _) in train.items():
        router.add_task(task, x)
    ids = router.route(test[0], None, test[1])[0]
    return float((ids == truth).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--classes", nargs="+", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-images", type=int, default=120, help="training images used per product (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = MoleFlow(Config.from_preset(args.preset))
    rng = np.random.default_rng(args.seed)
    fit, held = {}, {}
    for c in args.classes:
        samples = load_class(args.data, c, "folder").train
        order = rng.permutation(len(samples))[: args.max_images]
        cut = int(round(0.8 * len(order)))
        fit[c] = [load_rgb(samples[i].image) for i in order[:cut]]
        held[c] = [load_rgb(samples[i].image) for i in order[cut:]]
        print(f"{c}: {len(fit[c])} prototype images, {len(held[c])} held-out normals")

    def pasted(images, area):
        arrays = [np.asarray(im) for im in images]
        from PIL import Image
        return [Image.fromarray(paste_area_defect(a, area, rng, donor=arrays[(i + 1) % len(arrays)]))
                for i, a in enumerate(arrays)]

    results: dict = {"setting": vars(args) | {"data": str(args.data), "json": str(args.json)}, "products": {},
                     "look_alike": {}}
    # 1. routing among the products themselves
    fit_f = {c: features(model, fit[c]) for c in args.classes}
    for t, c in enumerate(args.classes):
        cases = {"good": held[c], **{f"{a:g}": pasted(held[c], a) for a in AREAS}}
        feats = {k: features(model, v) for k, v in cases.items()}
        for s in STATISTICS:
            cfg = model.config.router.__class__(**{**vars(model.config.router), "statistic": s})
            train = {i: fit_f[k][s] for i, k in enumerate(args.classes)}
            results["products"].setdefault(s, {})[c] = {k: route_accuracy(cfg, train, f[s], t) for k, f in feats.items()}
        print(c, {s: results["products"][s][c] for s in STATISTICS})
    # 2. look-alike pairs: product vs the same product under a global change
    for c in args.classes:
        for kind in LOOK_ALIKE_KINDS:
            twin_fit = [look_alike(im, kind) for im in fit[c]]
            twin_held = [look_alike(im, kind) for im in held[c]]
            pair_fit = {0: features(model, fit[c]), 1: features(model, twin_fit)}
            row = {}
            for truth, images in ((0, held[c]), (1, twin_held)):
                cases = {"good": images, **{f"{a:g}": pasted(images, a) for a in AREAS}}
                feats = {k: features(model, v) for k, v in cases.items()}
                for s in STATISTICS:
                    cfg = model.config.router.__class__(**{**vars(model.config.router), "statistic": s})
                    train = {i: pair_fit[i][s] for i in (0, 1)}
                    for k, f in feats.items():
                        row.setdefault(s, {}).setdefault(k, []).append(route_accuracy(cfg, train, f[s], truth))
            results["look_alike"][f"{c}/{kind}"] = {s: {k: float(np.mean(v)) for k, v in d.items()}
                                                    for s, d in row.items()}
            print(c, kind, results["look_alike"][f"{c}/{kind}"])
    summary = {}
    for s in STATISTICS:
        prod = [v for c in args.classes for v in results["products"][s][c].values()]
        look = results["look_alike"]
        summary[s] = {
            "products_mean": float(np.mean(prod)),
            "look_alike_good": float(np.mean([look[k][s]["good"] for k in look])),
            **{f"look_alike_{a:g}": float(np.mean([look[k][s][f"{a:g}"] for k in look])) for a in AREAS},
            "look_alike_min_up_to_10pct": float(min(look[k][s][f"{a:g}"] for k in look for a in AREAS if a <= 0.1)),
        }
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
