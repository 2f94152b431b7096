"""Which router keeps "which product" right under defects and between look-alike products? TRAINING images only.

    python benchmarks/routing_stress.py --data ../shared/datasets --json benchmarks/results/routing_lookalike.json

Settings (each a set of products routed among themselves):
* `shared`: the four shared products (magnetic_tile, kolektor, pcb_deeppcb, cubes);
* `lighting k/j`: a real look-alike pair, magnetic_tile under two lights of the MTD capture series, one step
  (j = k + 1) or two steps (j = k + 2) apart (file prefix exp1 ... exp6: the same tiles photographed under six
  lightings, mean grey 67, 84, 101, 119, 136, 153, each with a spread of 10-21 between images);
  the tile groups (provenance.csv) are split, so no evaluated tile is in either product's memory;
* `boards`: the ten pcb_deeppcb board designs with >= 20 training images, as ten products;
* `<product>/<kind>`: a product against itself under brightness x 1.15, colour gains 1.15/1/0.85, or a 1.15
  zoom (the synthetic look-alikes of docs/decisions.md §2).

Per product its training images are split (seeded; by tile group where there is one) 60 % fit (prototype and
patch memory: seeded random 10 % of the tokens, at most 20,000, thinned to a 1,000-token coreset, exactly the
`cpu` preset), 20 % calibration (standardises the memory distance, joins the prototype, as in training) and
20 % evaluation: routed as they are and with one pasted defect covering 2, 5, 10 and 20 % of the image
(`moleflow.routing_stress.paste_area_defect`). Test images are never read.

Routers compared (all from the same backbone tokens, so the comparison is exact):
* `prototype`: nearest Gaussian prototype of the median token (today's default); `prototype_mean`: of the mean;
  `prototype_pooled`: of the median token, every product's distance measured with one metric, the inverse of the
  mean of the products' covariances (as linear discriminant analysis does; benchmarks/routing_pooled.py);
* `patch_median`: smallest median over the patches of the standardised nearest-neighbour distance to each
  product's patch memory; `patch_vote`: most patches whose nearest memory is that product's;
* `patch_median_raw`: the same with the raw distances (not standardised by each product's held-out patches);
* `patch_paired_<s>`: the products compared on the same patches, the share s of an image's patches that fit their
  best product best (`router.patch_misfit(..., "paired")`; a defect's patches drop out): the smallest geometric
  mean of raw distances over them; `patch_paired_scaled_0.5`: distances divided by each product's mean held-out
  distance first;
* `gated_<g>` / `gated_raw_<g>`: the prototype router, unless the second-nearest prototype is within a factor
  1 + g of the nearest; then `patch_median` / `patch_median_raw` among the products within that factor.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from sklearn.covariance import OAS

from moleflow import Config, MoleFlow
from moleflow.data.datasets import load_class
from moleflow.data.transforms import load_rgb
from moleflow.memory import PatchMemory
from moleflow.router import PrototypeRouter, fitting_patches, mahalanobis, masked_median, mean_per_image, patch_misfit
from moleflow.routing_stress import AREAS, LOOK_ALIKE_KINDS, look_alike, paste_area_defect
from moleflow.scoring import lower_median

SHARED = ("magnetic_tile", "kolektor", "pcb_deeppcb", "cubes")
GATES = (0.02, 0.05, 0.1, 0.2, 0.5)
PAIRED_SHARES = (0.25, 0.5, 0.75, 1.0)
TRIM_LIMITS = (2.0, 3.0, 5.0)  # standardised memory distance above which a patch is left out (benchmarks/routing_trimmed.py)
TRIM_SHARES = (0.1, 0.25)  # or the share of an image's patches that fit no product worst
CASES = ("good",) + tuple(f"{a:g}" for a in AREAS)


FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # normalised tiles (M, 3, S, S) -> routing features (M, D')


@torch.no_grad()
def encode(model: MoleFlow, images: list[Image.Image], batch_size: int = 16,
           extra: dict[str, FeatureFn] | None = None) -> dict:
    """Tokens (M, H, W, D), median and mean routing features (M, D), owner (M,), n images; plus each `extra`
    feature (M, D') of the same tiles under its name."""
    tokens, owners, offset = [], [], 0
    more: dict[str, list] = {k: [] for k in extra or {}}
    for start in range(0, len(images), batch_size):
        prep = model.prepare(images[start:start + batch_size])
        tokens.append(model.extractor.tokens(prep.pixels).float())
        for k, fn in (extra or {}).items():
            more[k].append(fn(prep.pixels).double())
        owners.append(prep.owner + offset)
        offset += prep.n_images
    tokens = torch.cat(tokens)
    flat = tokens.flatten(1, 2)
    return {"tokens": tokens, "median": lower_median(flat, 1), "mean": flat.mean(1),
            "owner": torch.cat(owners), "n": offset, **{k: torch.cat(v) for k, v in more.items()}}


def split_groups(keys: list[str], rng: np.random.Generator) -> tuple[set, set, set]:
    """Seeded 60/20/20 split of distinct keys into fit, calibration and evaluation."""
    distinct = sorted(set(keys))
    order = [distinct[i] for i in rng.permutation(len(distinct))]
    a, b = int(round(0.6 * len(order))), int(round(0.8 * len(order)))
    return set(order[:a]), set(order[a:b]), set(order[b:])


def product_split(files: list[Path], keys: list[str], rng: np.random.Generator, limit: int) -> dict[str, list]:
    """Fit, calibration and evaluation images of one product, split by group (by file where groups are too few)."""
    if len(set(keys)) < 10:
        keys = [str(f) for f in files]
    fit, cal, ev = split_groups(keys, rng)
    out = {"fit": [], "cal": [], "eval": []}
    for f, k in zip(files, keys):
        out["fit" if k in fit else "cal" if k in cal else "eval"].append(f)
    return {s: [load_rgb(f) for f in v[:limit if s == "fit" else max(1, limit // 3)]] for s, v in out.items()}


def pasted_cases(images: list, rng: np.random.Generator) -> dict[str, list]:
    """{"good": images, "<area>": the images with one pasted defect of that area each (`AREAS`)}, drawing from `rng`
    in the order every routing benchmark here draws (so that their pastes are the same)."""
    arrays = [np.asarray(im) for im in images]
    cases = {"good": images}
    for a in AREAS:
        cases[f"{a:g}"] = [Image.fromarray(paste_area_defect(x, a, rng, donor=arrays[(i + 1) % len(arrays)]))
                           for i, x in enumerate(arrays)]
    return cases


def fit_products(model: MoleFlow, products: dict[str, dict[str, list]], router: PrototypeRouter
                 ) -> tuple[PatchMemory, dict[str, tuple[dict, dict]]]:
    """As learning builds them: `router` gets each product's prototype (of its fit and calibration images) and the
    returned patch memory its coreset (of the fit images) standardised on the calibration images. Returns the memory
    and each product's (fit, calibration) `encode`."""
    cfg = model.config
    memory = PatchMemory(cfg.score.memory_fraction, cfg.train.seed, cfg.score.memory_max_tokens, cfg.score.memory_coreset)
    encoded = {}
    for t, name in enumerate(products):
        fit, cal = encoded[name] = tuple(encode(model, products[name][s]) for s in ("fit", "cal"))
        router.add_task(t, torch.cat([fit["median"], cal["median"]]))
        memory.add_task(t, fit["tokens"])
        dist = memory.distances(cal["tokens"], t)
        memory.set_norm(t, dist, dist)
    return memory, encoded


def scenario_tables(model: MoleFlow, products: dict[str, dict[str, list]], rng: np.random.Generator,
                    extra: dict[str, FeatureFn] | None = None) -> dict:
    """For every product's evaluation case: prototype distances (N, T) under both statistics and patch misfits
    (N, T) under both statistics, with the true product's column index; `prototype_<name>` (N, T) for each
    `extra` routing feature (a Gaussian prototype of it per product, as the router builds)."""
    cfg = model.config
    names = list(products)
    # "pooled": distances() stay each product's own; choice_distances() gives the pooled metric's
    routers = {s: PrototypeRouter(cfg.router.__class__(**{**vars(cfg.router), "statistic": s, "metric": "pooled"}))
               for s in ("median", "mean", *(extra or {}))}
    memory = PatchMemory(cfg.score.memory_fraction, cfg.train.seed, cfg.score.memory_max_tokens, cfg.score.memory_coreset)
    scatter = []  # each product's prototype features, centred on its mean (for the pooled OAS metric)
    for t, name in enumerate(names):
        fit, cal = (encode(model, products[name][s], extra=extra) for s in ("fit", "cal"))
        for s, router in routers.items():
            router.add_task(t, torch.cat([fit[s], cal[s]]))
        x = torch.cat([fit["median"], cal["median"]]).double()
        scatter.append(x - x.mean(0))
        memory.add_task(t, fit["tokens"])
        dist = memory.distances(cal["tokens"], t)
        memory.set_norm(t, dist, dist)
    oas = pooled_oas_precision(scatter)
    means = torch.stack([routers["median"].prototype(t)[0] for t in range(len(names))])
    out = {}
    for t, name in enumerate(names):
        for case, imgs in pasted_cases(products[name]["eval"], rng).items():
            e = encode(model, imgs, extra=extra)
            raw = torch.stack([memory.distances(e["tokens"], u) for u in range(len(names))], 1)
            norm = torch.stack([getattr(memory, f"norm_{u}") for u in range(len(names))])  # (T, 4)
            z = torch.stack([memory.standardised_distance(raw[:, u], u) for u in range(len(names))], 1)  # own units
            proto = {s: r.distances(e[s]) for s, r in routers.items()}
            pooled = routers["median"].choice_distances(e["median"])
            out[(name, case)] = {
                "truth": t,
                "prototype": mean_per_image(proto["median"], e["owner"], e["n"]),
                "prototype_mean": mean_per_image(proto["mean"], e["owner"], e["n"]),
                "prototype_pooled": mean_per_image(pooled, e["owner"], e["n"]),
                "patch_median": patch_misfit(z, e["owner"], e["n"], "median"),
                "patch_median_raw": patch_misfit(raw, e["owner"], e["n"], "median"),
                "patch_vote": patch_misfit(z, e["owner"], e["n"], "vote"),
                "patch_paired_scaled_0.5": patch_misfit(raw / norm[:, 2].view(1, -1, 1, 1), e["owner"], e["n"],
                                                        "paired", 0.5),
            }
            # candidates of benchmarks/routing_trimmed.py: the pooled prototype with the pooled scatter shrunk once
            # (OAS), and of the median token over the patches that fit some product (a defect's patches left out)
            out[(name, case)]["prototype_pooled_oas"] = mean_per_image(
                torch.stack([mahalanobis(e["median"].double(), m, oas) for m in means], 1), e["owner"], e["n"])
            worst = z.min(1).values  # (M, H, W): how badly each patch fits its best-fitting product
            for key, mask in trim_masks(worst).items():
                trimmed = routers["median"].choice_distances(masked_median(e["tokens"], mask))
                out[(name, case)][f"prototype_pooled_trim_{key}"] = mean_per_image(trimmed, e["owner"], e["n"])
            for k in extra or {}:
                out[(name, case)][f"prototype_{k}"] = mean_per_image(routers[k].distances(e[k]), e["owner"], e["n"])
            for share in PAIRED_SHARES:
                out[(name, case)][f"patch_paired_{share:g}"] = patch_misfit(raw, e["owner"], e["n"], "paired", share)
    return out


def pooled_oas_precision(centred: list[torch.Tensor]) -> torch.Tensor:
    """(D, D) float64 precision of every product's features (each (N_t, D), centred on its own mean) stacked:
    the within-product scatter pooled first and shrunk once (OAS), instead of the mean of shrunk covariances."""
    x = torch.cat(centred).numpy()
    cov = OAS(assume_centered=True).fit(x).covariance_
    return torch.from_numpy(np.linalg.inv(cov))


def trim_masks(worst: torch.Tensor) -> dict[str, torch.Tensor]:
    """worst (M, H, W) standardised memory distance of each patch to its best-fitting product -> {name: (M, H, W)
    bool, patches kept}: `z<limit>` keeps patches whose distance is at most the limit (`router.fitting_patches`,
    the `router.trim_limit` rule), `q<share>` drops that share of each tile's worst-fitting patches; the dropped
    patches are grown by one patch (a defect spreads over the backbone's receptive field)."""
    masks = {f"z{limit:g}": fitting_patches(worst, limit) for limit in TRIM_LIMITS}
    for share in TRIM_SHARES:
        cut = worst.flatten(1).quantile(1 - share, dim=1).view(-1, 1, 1)
        masks[f"q{share:g}"] = fitting_patches(worst - cut, 0.0)
    return masks


def gated_choice(proto: torch.Tensor, misfit: torch.Tensor, gate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype choice unless the runner-up is within (1 + gate) x the nearest distance: then the smallest patch
    misfit among the products within that factor. Returns choice (N,) and whether the patch vote ran (N,)."""
    nearest = proto.min(1).values
    candidates = proto <= nearest.unsqueeze(1) * (1 + gate)
    doubt = candidates.sum(1) > 1
    choice = torch.where(doubt, misfit.masked_fill(~candidates, float("inf")).argmin(1), proto.argmin(1))
    return choice, doubt


def routers(table: dict) -> dict[str, torch.Tensor]:
    out = {k: table[k].argmin(1) for k in table if k != "truth"}
    for g in GATES:
        out[f"gated_{g:g}"] = gated_choice(table["prototype"], table["patch_median"], g)[0]
        out[f"gated_raw_{g:g}"] = gated_choice(table["prototype"], table["patch_median_raw"], g)[0]
    return out


def accuracy(tables: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{router: {product: {case: accuracy}}}."""
    acc: dict = defaultdict(lambda: defaultdict(dict))
    for (name, case), table in tables.items():
        for router, choice in routers(table).items():
            acc[router][name][case] = float((choice == table["truth"]).double().mean())
    return json.loads(json.dumps(acc))


def margins(tables: dict) -> list[dict]:
    """Per evaluated image: the patch-misfit margin (runner-up minus best) and whether patch_median was right."""
    rows = []
    for (name, case), table in tables.items():
        top2 = table["patch_median"].topk(2, dim=1, largest=False).values if table["patch_median"].shape[1] > 1 else None
        if top2 is None:
            continue
        right = table["patch_median"].argmin(1) == table["truth"]
        rows += [{"product": name, "case": case, "margin": float(m), "right": bool(r)}
                 for m, r in zip(top2[:, 1] - top2[:, 0], right)]
    return rows


def build_scenarios(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, dict[str, dict[str, list]]]:
    """{setting: {product: {"fit" | "cal" | "eval": images}}} for `args.settings` (see the module doc)."""
    scenarios: dict[str, dict[str, dict[str, list]]] = {}

    def groups(cls: str) -> dict[Path, str]:
        with open(args.data / cls / "provenance.csv") as fh:
            return {args.data / cls / r["file"]: r["group"] for r in csv.DictReader(fh) if r["split"] == "train"}

    if "shared" in args.settings:
        scen = {}
        for c in SHARED:
            files = [s.image for s in load_class(args.data, c, "folder").train]
            g = groups(c)
            scen[c] = product_split(files, [g.get(Path(f), str(f)) for f in files], rng, args.max_images)
        scenarios["shared"] = scen
    if "lighting" in args.settings:
        files = [s.image for s in load_class(args.data, "magnetic_tile", "folder").train]
        g = groups("magnetic_tile")
        fit, cal, ev = split_groups([g[Path(f)] for f in files], rng)  # one split for all lightings
        by_exp: dict[str, dict[str, list]] = defaultdict(lambda: {"fit": [], "cal": [], "eval": []})
        for f in files:
            key = g[Path(f)]
            by_exp[Path(f).name.split("_")[0]]["fit" if key in fit else "cal" if key in cal else "eval"].append(f)
        for k, j in [(k, k + 1) for k in range(1, 6)] + [(k, k + 2) for k in range(1, 5)]:
            pair = {}
            for e in (f"exp{k}", f"exp{j}"):
                pair[e] = {s: [load_rgb(f) for f in v[:args.max_images if s == "fit" else max(1, args.max_images // 3)]]
                           for s, v in by_exp[e].items()}
            scenarios[f"lighting {k}/{j}"] = pair
    if "boards" in args.settings:
        files = [s.image for s in load_class(args.data, "pcb_deeppcb", "folder").train]
        g = groups("pcb_deeppcb")
        by_board: dict[str, list] = defaultdict(list)
        for f in files:
            by_board[Path(f).name[:5]].append(f)
        scenarios["boards"] = {b: product_split(v, [g[Path(f)] for f in v], rng, args.max_images)
                               for b, v in sorted(by_board.items()) if len(v) >= 20}
    if "synthetic" in args.settings:
        shared = scenarios.get("shared") or {}
        for c, split in shared.items():
            for kind in LOOK_ALIKE_KINDS:
                twin = {s: [look_alike(im, kind) for im in v] for s, v in split.items()}
                scenarios[f"{c}/{kind}"] = {c: split, f"{c}+{kind}": twin}
    return scenarios


def add_setting_arguments(ap: argparse.ArgumentParser) -> None:
    """The data, model and settings options shared with the scripts that reuse `build_scenarios`."""
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-images", type=int, default=60, help="fit images per product (evaluation: a third)")
    ap.add_argument("--settings", nargs="+", default=["shared", "lighting", "boards", "synthetic"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)


def measured_tables(args: argparse.Namespace, extra_of: Callable[[MoleFlow], dict[str, FeatureFn]] | None = None
                    ) -> dict[str, dict[str, dict]]:
    """{setting: {"product|case": table}} of `scenario_tables` for every setting of `args`: read from `args.tables`
    when that file exists, else measured (with the `extra` features `extra_of(model)` gives) and saved there after
    every setting."""
    if args.tables and args.tables.exists():
        return torch.load(args.tables)
    torch.manual_seed(args.seed)
    model = MoleFlow(Config.from_preset(args.preset))
    rng = np.random.default_rng(args.seed)
    extra = extra_of(model) if extra_of else None
    saved: dict = {}
    for name, products in build_scenarios(args, rng).items():
        start = time.perf_counter()
        saved[name] = {f"{p}|{c}": v for (p, c), v in scenario_tables(model, products, rng, extra).items()}
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.tables:
            torch.save(saved, args.tables)
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(ap)
    ap.add_argument("--tables", type=Path, help="also save every image's distances and misfits (torch.save)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = MoleFlow(Config.from_preset(args.preset))
    rng = np.random.default_rng(args.seed)
    results: dict = {"setting": {k: str(v) for k, v in vars(args).items()}, "accuracy": {}, "margins": {}}
    saved: dict = {}
    scenarios = build_scenarios(args, rng)
    for name, products in scenarios.items():
        start = time.perf_counter()
        tables = scenario_tables(model, products, rng)
        results["accuracy"][name] = accuracy(tables)
        results["margins"][name] = margins(tables)
        if args.tables:
            saved[name] = {f"{p}|{c}": v for (p, c), v in tables.items()}
            torch.save(saved, args.tables)
        sizes = ", ".join(f"{p}: {len(v['eval'])}" for p, v in products.items())
        print(f"{name} ({time.perf_counter() - start:.0f} s; evaluated per product: {sizes})")
        for router, per in results["accuracy"][name].items():
            cells = {case: np.mean([per[p][case] for p in per]) for case in CASES}
            print(f"  {router:18s} " + " ".join(f"{c}={v * 100:5.1f}" for c, v in cells.items()), flush=True)
        if args.json:  # after every setting: a long run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
