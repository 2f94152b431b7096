"""Do the learned experts themselves say "which product" better than the gated router on look-alike parts with
defects? TRAINING images only.

    python benchmarks/routing_experts.py --data ../shared/datasets --json benchmarks/results/routing_experts.json

Setting: magnetic_tile's capture series photographs the same tiles under six lightings (exp1 ... exp6; see
routing_stress.py). Its training tiles are split by tile group (provenance.csv; seeded) into fit and evaluation
groups; each lighting's fit images (at most --max-images) are learned as one product, one per step, with the
default `cpu` preset (its own held-out images calibrate it, as in `moleflow train`). For every pair of lightings
one or two steps apart, each lighting's evaluation images, as they are and with one pasted defect covering 2, 5,
10 and 20 % of the image (`moleflow.routing_stress.paste_area_defect`), are routed between the pair's two products:

* `gated`: the default router (`Inspector.route` among the pair: prototype, patch memory where in doubt);
* `expert_fit`: the product whose expert gives the image the smaller median standardised patch score
  (`Inspector.patch_scores`: flow NLL + memory distance, each standardised on that product's own held-out normal
  patches, so the two experts' scores are in the same units); a defect moves only a minority of the patches;
* `gated+expert_fit`: `gated`, except for parts whose routing it calls ambiguous (`router.ambiguity_margin`):
  there `expert_fit` between the plausible products (the parts the decision already scores under both experts);
* `decided`: the product the verdict reports (`MoleFlow.predict` among the pair): `gated`, except that an ambiguous
  part flagged under the routed product but normal under another plausible one is reported against that one
  (`Inspector.decide`). `gated` is then what a decision that keeps the router's product for the report (and applies
  the several-products rule to the flag only) would report; the flag is the same under both (the share of ambiguous
  parts flagged is saved per pair as `flagged_ambiguous`). The rule for it, written before `decided` was first
  measured: the report keeps the router's product if, two steps apart, `gated` routes parts with defects of
  2-10 % at least 1 point better than `decided` while good parts lose at most 0.5 points.

Printed and saved: accuracy per router, pair and case, and the means over pairs; one step apart (k/k+1) the two
lightings overlap in mean grey (spread 10-21 around steps of 17), so no router should be expected near 100 % there.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moleflow import Config, MoleFlow
from moleflow.data.datasets import load_class
from moleflow.data.transforms import load_rgb
from moleflow.routing_stress import AREAS, paste_area_defect

CASES = ("good",) + tuple(f"{a:g}" for a in AREAS)
ROUTERS = ("gated", "expert_fit", "gated+expert_fit", "decided")


def lighting_split(data: Path, rng: np.random.Generator, max_fit: int, max_eval: int
                   ) -> dict[str, dict[str, list[Path]]]:
    """{exp1..exp6: {"fit": paths, "eval": paths}}: magnetic_tile's training images split by tile group."""
    with open(data / "magnetic_tile" / "provenance.csv") as fh:
        group = {data / "magnetic_tile" / r["file"]: r["group"] for r in csv.DictReader(fh) if r["split"] == "train"}
    files = [Path(s.image) for s in load_class(data, "magnetic_tile", "folder").train]
    keys = sorted({group[f] for f in files})
    rng.shuffle(keys)
    evaluated = set(keys[: len(keys) // 4])
    out: dict[str, dict[str, list[Path]]] = defaultdict(lambda: {"fit": [], "eval": []})
    for f in files:
        out[f.name.split("_")[0]]["eval" if group[f] in evaluated else "fit"].append(f)
    return {k: {"fit": v["fit"][:max_fit], "eval": v["eval"][:max_eval]} for k, v in sorted(out.items())}


@torch.no_grad()
def encode_cases(model: MoleFlow, paths: list[Path], rng: np.random.Generator) -> dict[str, dict]:
    """Per case: tokens (N, h, w, D), routing features (N, D) of the images as they are and with pasted defects."""
    arrays = [np.asarray(load_rgb(p)) for p in paths]
    cases = {"good": [Image.fromarray(a) for a in arrays]}
    for area in AREAS:
        cases[f"{area:g}"] = [Image.fromarray(paste_area_defect(a, area, rng, donor=arrays[(i + 1) % len(arrays)]))
                              for i, a in enumerate(arrays)]
    out = {}
    for case, images in cases.items():
        prep = model.prepare(images)  # elongated tiles are cut in two (data.tiling=aspect)
        tokens, routing = model.inspector.extract(prep.pixels)
        out[case] = {"tokens": tokens.float(), "routing": routing.float(), "owner": prep.owner, "n": len(images),
                     "images": images}
    return out


@torch.no_grad()  # the experts' parameters require gradients: without this every activation would be kept
def median_fit(model: MoleFlow, encoded: dict, task: int) -> torch.Tensor:
    """(N,) median over each image's patches (all its tiles) of its standardised patch scores under `task`."""
    patch = model.inspector.patch_scores(encoded["tokens"], task).flatten(1).cpu()  # (M, h*w)
    return torch.stack([patch[encoded["owner"] == i].flatten().median() for i in range(encoded["n"])])


@torch.no_grad()
def route_pair(model: MoleFlow, encoded: dict, pair: list[int], truth: int, fit: dict[int, torch.Tensor]
               ) -> dict[str, float]:
    """Accuracy of each router on one lighting's encoded case, among `pair` (task ids); `fit`: task -> (N,)
    median standardised patch score of these images under that task's expert."""
    routed = model.inspector.route(encoded["tokens"], encoded["routing"], encoded["owner"], encoded["n"], pair)
    gated = torch.tensor(pair)[routed.index]
    scores = torch.stack([fit[t] for t in pair], 1)  # (N, 2)
    plausible = routed.plausible.cpu()
    by_fit = torch.tensor(pair)[scores.argmin(1)]
    among = scores.masked_fill(~plausible, float("inf")).argmin(1)
    combined = torch.where(routed.ambiguous.cpu(), torch.tensor(pair)[among], gated)
    # the decision changes only ambiguous parts: only they go through `predict`
    decided, ambiguous = gated.clone(), routed.ambiguous.cpu().nonzero().squeeze(1).tolist()
    flagged = float("nan")
    if ambiguous:
        verdict = model.predict([encoded["images"][i] for i in ambiguous], among=pair)
        decided[ambiguous] = verdict.task_ids.cpu()
        flagged = float((verdict.anomalous.cpu() | ~verdict.known.cpu()).double().mean())
    return {"gated": float((gated == truth).double().mean()), "expert_fit": float((by_fit == truth).double().mean()),
            "gated+expert_fit": float((combined == truth).double().mean()),
            "decided": float((decided == truth).double().mean()),
            "ambiguous": float(routed.ambiguous.double().mean()), "flagged_ambiguous": flagged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--max-images", type=int, default=60, help="fit images per lighting (evaluation: a third)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", type=Path, help="keep the learned lighting products here (and reuse them if there)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    split = lighting_split(args.data, rng, args.max_images, max(1, args.max_images // 3))
    start = time.perf_counter()
    if args.model and (args.model / "model").is_dir():  # learned by an earlier run of this benchmark
        model = MoleFlow.load(args.model)
    else:
        model = MoleFlow(Config.from_preset("cpu"))
        for name, v in split.items():
            model.fit_task([load_rgb(p) for p in v["fit"]], name=name)
        if args.model:
            model.save(args.model)
    tasks = {t.name: t.task_id for t in model.tasks}
    learn_seconds = time.perf_counter() - start
    encoded = {name: encode_cases(model, v["eval"], rng) for name, v in split.items()}
    fit = {name: {case: {t: median_fit(model, e, t) for t in tasks.values()} for case, e in cases.items()}
           for name, cases in encoded.items()}
    pairs = [(k, k + 1) for k in range(1, 6)] + [(k, k + 2) for k in range(1, 5)]
    table: dict = {}
    for k, j in pairs:
        a, b = f"exp{k}", f"exp{j}"
        if a not in tasks or b not in tasks:
            continue
        ids = [tasks[a], tasks[b]]
        table[f"{k}/{j}"] = {case: {name: route_pair(model, encoded[name][case], ids, tasks[name], fit[name][case])
                                    for name in (a, b)} for case in CASES}
    summary: dict = {}
    for step in (1, 2):
        chosen = [key for key in table if int(key.split("/")[1]) - int(key.split("/")[0]) == step]
        summary[f"{step} step"] = {r: {case: float(np.mean([table[key][case][name][r] for key in chosen
                                                            for name in table[key][case]]))
                                       for case in CASES} for r in ROUTERS + ("ambiguous",)}
        for r in ROUTERS + ("ambiguous",):
            cells = summary[f"{step} step"][r]
            print(f"{step} step apart, {r:18s} " + " ".join(f"{c}={100 * v:5.1f}" for c, v in cells.items()))
    for key, cases in table.items():
        print(key, " ".join(f"{r}: " + "/".join(f"{100 * np.mean([cases[c][n][r] for n in cases[c]]):.0f}"
                                              for c in CASES) for r in ROUTERS))
    if args.json:
        args.json.write_text(json.dumps({"setting": {k: str(v) for k, v in vars(args).items()},
                                         "products": {k: {s: len(v) for s, v in d.items()} for k, d in split.items()},
                                         "learn_seconds": learn_seconds, "summary": summary, "pairs": table},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
