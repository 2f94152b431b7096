"""Does a defect make a known product's part "unknown product", and would the trimmed median stop that without
hiding products never learned? TRAINING images only (issue 23).

    python benchmarks/unknown_check.py --data ../shared/datasets --settings shared boards lighting synthetic \
        --json benchmarks/results/unknown_check.json

The router calls a part an unknown product when its median token is farther from the chosen product's prototype
(in that product's own metric) than the product's unknown limit (2 x the 99th percentile of its held-out normals'
distances, `router.unknown_quantile` / `unknown_margin`). A defect moves the median token, so a large one may push a
known product's part past that limit; the part is still flagged (an unknown part always is), but its verdict no
longer names its product. The candidate re-check: a part beyond the limit is measured again on the median of only
its patches that fit the chosen product's patch memory (standardised distance <= `router.trim_limit`, grown by one
patch, all patches where fewer than a quarter remain: `router.fitting_patches` / `masked_median`, as the trimmed
router does) and is unknown only if that distance is beyond the limit too.

Same settings, splits (60 % fit, 20 % calibration, 20 % evaluation) and pasted defects of 2-20 % as
`benchmarks/routing_stress.py` (its `build_scenarios`), the `cpu` preset's router and memory. Two measurements per
setting, untrimmed (today) and with the re-check:
* `known`: every product's evaluation parts, routed among all the setting's products (pooled metric, median token,
  as the `cpu` preset): the share called unknown, per case (good, defects of 2, 5, 10, 20 %);
* `left_out`: every product's evaluation parts routed among the setting's *other* products, as if it had never
  been learned: the share called known (a never-learned product not noticed), per case.

The rule, written before the first run: the re-check is adopted (in `Inspector.route` and the exported graph,
under `router.trim_limit`) only if it lowers the share of known products' parts with defects of 2-20 % called
unknown, summed over all settings, and the share of never-learned products' parts called known (good and
defective) rises by at most 0.5 points in the mean of every family of settings (shared, lighting, boards,
synthetic).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from moleflow import Config, MoleFlow
from moleflow.router import PrototypeRouter, fitting_patches, masked_median, mean_per_image
from routing_stress import CASES, add_setting_arguments, build_scenarios, encode, fit_products, pasted_cases


def family(setting: str) -> str:
    return setting.split(" ")[0] if " " in setting else ("synthetic" if "/" in setting else setting)


@torch.no_grad()
def setting_rates(model: MoleFlow, products: dict[str, dict[str, list]], rng: np.random.Generator) -> dict:
    """{"known" | "left_out": {case: [untrimmed count, re-checked count, parts]}} for one setting."""
    cfg = model.config
    names = list(products)
    router = PrototypeRouter(cfg.router)
    memory = fit_products(model, products, router)[0]
    limits = router.limits(list(range(len(names))))
    out = {k: {c: [0, 0, 0] for c in CASES} for k in ("known", "left_out")}
    for t, name in enumerate(names):
        for case, images in pasted_cases(products[name]["eval"], rng).items():
            e = encode(model, images)
            for kind, tasks in (("known", list(range(len(names)))), ("left_out", [u for u in range(len(names))
                                                                               if u != t])):
                if not tasks:
                    continue
                own, choice = router.image_distances(e["median"], tasks, e["owner"], e["n"])
                index = choice.argmin(1)
                chosen = torch.tensor(tasks)[index]
                distance = own.gather(1, index.unsqueeze(1)).squeeze(1)
                beyond = distance > limits[chosen]
                rechecked = beyond.clone()
                for u in chosen[beyond].unique().tolist():  # re-check against each chosen product's own memory
                    images_u = (beyond & (chosen == u)).nonzero().squeeze(1)
                    rows = torch.isin(e["owner"], images_u).nonzero().squeeze(1)
                    z = memory.standardised_distance(memory.distances(e["tokens"][rows], u), u)
                    feature = masked_median(e["tokens"][rows], fitting_patches(z, cfg.router.trim_limit))
                    renumber = torch.full((e["n"],), -1, dtype=torch.long)
                    renumber[images_u] = torch.arange(len(images_u))
                    trimmed = mean_per_image(router.distances(feature, [u]), renumber[e["owner"][rows]],
                                             len(images_u))[:, 0]
                    rechecked[images_u] = trimmed > limits[u]
                cell = out[kind][case]
                if kind == "known":  # called unknown
                    cell[0], cell[1] = cell[0] + int(beyond.sum()), cell[1] + int(rechecked.sum())
                else:  # called known
                    cell[0], cell[1] = cell[0] + int((~beyond).sum()), cell[1] + int((~rechecked).sum())
                cell[2] += e["n"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = MoleFlow(Config.from_preset(args.preset))
    rng = np.random.default_rng(args.seed)
    results: dict = {"setting": {k: str(v) for k, v in vars(args).items()}, "settings": {}}
    for name, products in build_scenarios(args, rng).items():
        start = time.perf_counter()
        results["settings"][name] = rates = setting_rates(model, products, rng)
        print(f"{name} ({time.perf_counter() - start:.0f} s)  known products called unknown, today -> re-checked: "
              + " ".join(f"{c} {v[0]}->{v[1]}/{v[2]}" for c, v in rates["known"].items())
              + " | never-learned called known: "
              + " ".join(f"{c} {v[0]}->{v[1]}/{v[2]}" for c, v in rates["left_out"].items()), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    summary: dict = {}
    for name, rates in results["settings"].items():
        fam = summary.setdefault(family(name), {"known_defects": [0, 0, 0], "left_out": [0, 0, 0]})
        for case, v in rates["known"].items():
            if case != "good":
                fam["known_defects"] = [a + b for a, b in zip(fam["known_defects"], v)]
        for v in rates["left_out"].values():
            fam["left_out"] = [a + b for a, b in zip(fam["left_out"], v)]
    for fam, v in summary.items():
        k, lo = v["known_defects"], v["left_out"]
        print(f"{fam}: known defective parts called unknown {100 * k[0] / max(k[2], 1):.1f} -> "
              f"{100 * k[1] / max(k[2], 1):.1f} %; never-learned parts called known {100 * lo[0] / max(lo[2], 1):.1f}"
              f" -> {100 * lo[1] / max(lo[2], 1):.1f} %")
    results["summary"] = summary
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
