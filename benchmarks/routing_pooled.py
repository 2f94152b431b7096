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

import sys
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import (adopt_by_rule, choose, nearest_with_margin, router_summary, rule_main,  # noqa: E402
                            separable_settings, wrong_margins)

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


def route_with_margin(table: dict, candidate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice (N,) and margin (N,): runner-up minus chosen evidence (log units) of `candidate`; a "pooled prototype"
    part's evidence is its log distance, as `Inspector.route` computes it in prototype mode; inf where the prototype
    decided alone."""
    if candidate == "pooled prototype":
        return nearest_with_margin(table["prototype_pooled"])
    if candidate == "own":
        return choose(table, f"evidence_{WEIGHT:g}_{GATE:g}")
    return choose({**table, "prototype": table["prototype_pooled"]}, f"evidence_{WEIGHT:g}_{GATE:g}")


def summarise(saved: dict) -> dict:
    separable = separable_settings(saved)
    summary = {c: router_summary(saved, lambda table, c=c: route(table, c), separable) for c in CANDIDATES}
    best, chosen = adopt_by_rule(summary, "own")
    # benchmarks/routing_choice.py's rule: nine in ten of the validation's routing errors are scored under both
    wrong = [m for m in wrong_margins(saved, lambda table: route_with_margin(table, chosen)) if np.isfinite(m)]
    return {"rule": __doc__, "summary": summary, "separable_settings": separable, "best": best, "chosen": chosen,
            "ambiguity_margin": float(np.quantile(wrong, 0.9))}


if __name__ == "__main__":
    rule_main(__doc__, summarise)
