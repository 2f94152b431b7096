"""Would one metric for every product keep defective look-alike parts with their product? TRAINING images only.

    python benchmarks/routing_pooled.py --data ../shared/datasets --tables /tmp/rp60_tables.pt \
        --json benchmarks/results/routing_pooled.json

Why it might. The router measures an image's distance to each product with that product's own covariance (a
quadratic discriminant). A defect moves the image's feature by some d; the difference of two products' squared
distances then changes by d^T (P_A - P_B) d plus a term linear in d, where P are the products' precisions. Two
look-alike products shrunk from a few dozen images in 152 dimensions differ most in the directions where they have
least data, which is where a defect puts its energy: the quadratic term can outweigh the products' real difference,
and it always favours the product with more variance along d. With one metric for all products (the inverse of the
mean of their covariances, as linear discriminant analysis uses) the quadratic term cancels and only the part of d
along the direction that separates the two products remains.

Measured on the settings, splits and pasted defects of `benchmarks/routing_stress.py` (its `prototype_pooled`
table; every other number of that script is unchanged), candidates:
* `own`: today's default router (gated evidence, weight 2, gate 0.2, each product's own covariance);
* `pooled`: the same router with every prototype distance measured with the pooled metric (gate and evidence);
* `own gate, pooled evidence`: candidates chosen by today's gate, weighed with pooled distances;
* `pooled prototype`: the nearest prototype under the pooled metric, no patch memory.

The rule, fixed before this script first ran (that of `benchmarks/routing_features.py`):
1. the shared four products' good parts and parts with defects up to 10 % must route 100 % right;
2. among those, the highest mean routing of look-alike parts with defects of 2, 5, 10 % (every look-alike setting
   weighted equally), with look-alike good parts no more than 0.5 points below today's;
3. it replaces today's router only if it gains at least 1.0 point there AND loses no more than 0.5 points on the
   separable settings (those where today's prototype routes >= 95 % of good parts right: the hidden pair's
   situation), good or defective. Otherwise today's router stays.
The chosen router's ambiguity margin then follows benchmarks/routing_choice.py's rule (added after the first run,
which chose "pooled prototype"): the 90th percentile of its margins among the look-alike parts it routes wrongly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moleflow import Config, MoleFlow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import choose  # noqa: E402
from routing_stress import add_setting_arguments, build_scenarios, scenario_tables  # noqa: E402

DEFECTS = ("0.02", "0.05", "0.1")
WEIGHT, GATE = 2.0, 0.2
CANDIDATES = ("own", "pooled", "own gate, pooled evidence", "pooled prototype")


def route(table: dict, candidate: str) -> torch.Tensor:
    """Choice (N,) of `candidate` (see the module doc) on one table."""
    if candidate == "own":
        return choose(table, f"evidence_{WEIGHT:g}_{GATE:g}")[0]
    if candidate == "pooled":
        return choose({**table, "prototype": table["prototype_pooled"]}, f"evidence_{WEIGHT:g}_{GATE:g}")[0]
    if candidate == "pooled prototype":
        return table["prototype_pooled"].argmin(1)
    own = table["prototype"]
    candidates = own <= own.min(1).values.unsqueeze(1) * (1 + GATE)
    evidence = table["prototype_pooled"].log() + WEIGHT * table["patch_median_raw"].log()
    doubt = candidates.sum(1) > 1
    return torch.where(doubt, evidence.masked_fill(~candidates, float("inf")).argmin(1), own.argmin(1))


def margin_of(table: dict, candidate: str) -> torch.Tensor:
    """(N,) runner-up minus chosen evidence (log units) of `candidate`; a "pooled prototype" part's evidence is its
    log distance, as `Inspector.route` computes it in prototype mode; inf where the prototype decided alone."""
    if candidate == "pooled prototype":
        top = table["prototype_pooled"].clamp_min(1e-12).log().topk(2, dim=1, largest=False).values
        return top[:, 1] - top[:, 0]
    if candidate == "own":
        return choose(table, f"evidence_{WEIGHT:g}_{GATE:g}")[1]
    return choose({**table, "prototype": table["prototype_pooled"]}, f"evidence_{WEIGHT:g}_{GATE:g}")[1]


def ambiguity_margin(saved: dict, candidate: str) -> float:
    """The rule of benchmarks/routing_choice.py: the 90th percentile of `candidate`'s margins among the look-alike
    parts (good and defects up to 10 %) it routes wrongly, so that nine in ten of them are scored under both
    products."""
    wrong = []
    for setting, tables in saved.items():
        if setting == "shared":
            continue
        for key, table in tables.items():
            if key.split("|")[1] in ("good",) + DEFECTS:
                miss = route(table, candidate) != table["truth"]
                wrong.append(margin_of(table, candidate)[miss])
    margins = torch.cat(wrong)
    return float(torch.quantile(margins[margins.isfinite()], 0.9))


def summarise(saved: dict) -> dict:
    look = [s for s in saved if s != "shared"]
    summary: dict = {}
    for candidate in CANDIDATES:
        per_setting: dict = {}
        for setting, tables in saved.items():
            acc: dict = {}
            for key, table in tables.items():
                right = route(table, candidate) == table["truth"]
                acc.setdefault(key.split("|")[1], []).append(float(right.double().mean()))
            per_setting[setting] = {case: float(np.mean(v)) for case, v in acc.items()}
        shared = per_setting.get("shared", {})
        summary[candidate] = {
            "shared_ok": all(shared.get(c, 0) == 1.0 for c in ("good",) + DEFECTS),
            "look_alike_good": float(np.mean([per_setting[s]["good"] for s in look])),
            "look_alike_defect": float(np.mean([per_setting[s][c] for s in look for c in DEFECTS])),
            "look_alike_defect_20": float(np.mean([per_setting[s]["0.2"] for s in look])),
            "per_setting": per_setting}
    # separable: where today's prototype (own covariance, no patch memory) routes >= 95 % of good parts right
    prototype_good = {s: float(np.mean([float((t["prototype"].argmin(1) == t["truth"]).double().mean())
                                        for k, t in saved[s].items() if k.endswith("|good")])) for s in look}
    separable = [s for s in look if prototype_good[s] >= 0.95]
    for entry in summary.values():
        per = entry["per_setting"]
        entry["separable_good"] = float(np.mean([per[s]["good"] for s in separable]))
        entry["separable_defect"] = float(np.mean([per[s][c] for s in separable for c in DEFECTS]))
    today = summary["own"]
    eligible = [k for k in CANDIDATES if summary[k]["shared_ok"]
                and summary[k]["look_alike_good"] >= today["look_alike_good"] - 0.005]
    best = max(eligible, key=lambda k: summary[k]["look_alike_defect"])
    b = summary[best]
    adopt = (best != "own" and b["look_alike_defect"] >= today["look_alike_defect"] + 0.01
             and b["separable_good"] >= today["separable_good"] - 0.005
             and b["separable_defect"] >= today["separable_defect"] - 0.005)
    chosen = best if adopt else "own"
    return {"rule": __doc__, "summary": summary, "separable_settings": separable, "best": best, "chosen": chosen,
            "ambiguity_margin": ambiguity_margin(saved, chosen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(ap)
    ap.add_argument("--tables", type=Path, help="read saved tables instead of measuring (torch.load), or save them")
    args = ap.parse_args()
    if args.tables and args.tables.exists():
        saved = torch.load(args.tables)
    else:
        torch.manual_seed(args.seed)
        model = MoleFlow(Config.from_preset(args.preset))
        rng = np.random.default_rng(args.seed)
        saved = {}
        for name, products in build_scenarios(args, rng).items():
            start = time.perf_counter()
            saved[name] = {f"{p}|{c}": v for (p, c), v in scenario_tables(model, products, rng).items()}
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
            if args.tables:
                torch.save(saved, args.tables)
    result = summarise(saved)
    for key, s in result["summary"].items():
        print(f"{key:28s} shared ok {s['shared_ok']!s:5s} look-alike good {100 * s['look_alike_good']:5.1f} "
              f"defects<=10% {100 * s['look_alike_defect']:5.1f} 20% {100 * s['look_alike_defect_20']:5.1f} | "
              f"separable good {100 * s['separable_good']:5.1f} defects<=10% {100 * s['separable_defect']:5.1f}")
    print(f"best eligible: {result['best']}; chosen: {result['chosen']}; its ambiguity margin "
          f"{result['ambiguity_margin']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
