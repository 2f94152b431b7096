"""Can the pooled router leave a defect out of the routing feature, or estimate its metric better? TRAINING images only.

    python benchmarks/routing_trimmed.py --data ../shared/datasets --max-images 60 --tables /tmp/rt60_tables.pt \
        --json benchmarks/results/routing_trimmed.json

Why it might. Today's router (`router.metric=pooled`, `router.mode=prototype`; docs/decisions.md §8) reads the
coordinate-wise median of an image's patch tokens. A defect covering 10 % of a part, spread by the backbone's
receptive fields, moves that median; between look-alike products that differ in lighting or colour, a dark hole
or a bright spot moves it exactly along what separates them. Two candidates, measured on the settings, splits and
pasted defects of `benchmarks/routing_stress.py` (its `prototype_pooled_oas` and `prototype_pooled_trim_*` tables;
every other table of that script is unchanged, and `prototype_pooled` reproduces benchmarks/routing_pooled.py):

* `pooled OAS`: the nearest prototype under one metric estimated once from every product's prototype images, each
  centred on its product's mean, shrunk by OAS, instead of the mean of the products' separately shrunk covariances
  (more images behind one estimate, so less shrinkage). It needs each product's scatter stored (not built).
* `trimmed <mask>, gate <g>`: the pooled prototype; where the runner-up's log distance is within g of the nearest's,
  the products within g are compared again on the median of only the patches that fit some product: a patch whose
  standardised distance to its best-fitting product's patch memory is above a limit (`z2`, `z3`, `z5`), or the
  share of a tile's worst-fitting patches (`q0.1`, `q0.25`), is left out, grown by one patch. Gates 0.032 (today's
  ambiguity margin: only the parts that are already scored twice), 0.1, 0.3 and inf (every part, every product).
  Cost where adopted: the memory's nearest-neighbour search of the products within the gate (the validation takes
  the best fit over all products of a setting; for the pairs that is the same thing).

The rule, fixed before this script first ran (that of benchmarks/routing_pooled.py, today's router as the base):
1. the shared four products' good parts and parts with defects up to 10 % must route 100 % right;
2. among those, the highest mean routing of look-alike parts with defects of 2, 5, 10 % (every look-alike setting
   weighted equally), with look-alike good parts no more than 0.5 points below today's;
3. it replaces today's router only if it gains at least 1.0 point there AND loses no more than 0.5 points on the
   separable settings (those where the own-covariance prototype routes >= 95 % of good parts right: the hidden
   pair's situation), good or defective. Otherwise today's router stays.
A chosen router's ambiguity margin then follows benchmarks/routing_choice.py's rule: the 90th percentile of its
margins (runner-up minus chosen log distance, in the distances that made the choice) among the look-alike parts it
routes wrongly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import (adopt_by_rule, nearest_with_margin, router_summary, rule_main,  # noqa: E402
                            separable_settings, wrong_margins)
from routing_stress import TRIM_LIMITS, TRIM_SHARES  # noqa: E402

TODAY = "pooled prototype"
GATES = (0.032, 0.1, 0.3, float("inf"))
MASKS = tuple(f"z{v:g}" for v in TRIM_LIMITS) + tuple(f"q{v:g}" for v in TRIM_SHARES)
CANDIDATES = (TODAY, "pooled OAS") + tuple(f"trimmed {m}, gate {g:g}" for m in MASKS for g in GATES)


def route_with_margin(table: dict, candidate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice (N,) and margin (N,) of `candidate` (see the module doc): runner-up minus chosen log distance."""
    if candidate == TODAY:
        return nearest_with_margin(table["prototype_pooled"])
    if candidate == "pooled OAS":
        return nearest_with_margin(table["prototype_pooled_oas"])
    mask, gate = candidate.removeprefix("trimmed ").split(", gate ")
    log_pooled = table["prototype_pooled"].clamp_min(1e-12).log()
    candidates = log_pooled <= log_pooled.min(1).values.unsqueeze(1) + float(gate)
    trimmed = table[f"prototype_pooled_trim_{mask}"].clamp_min(1e-12).log().masked_fill(~candidates, float("inf"))
    top = trimmed.topk(2, dim=1, largest=False).values
    doubt = candidates.sum(1) > 1
    pooled_choice, pooled_margin = nearest_with_margin(table["prototype_pooled"])
    return (torch.where(doubt, trimmed.argmin(1), pooled_choice),
            torch.where(doubt, top[:, 1] - top[:, 0], pooled_margin))


def summarise(saved: dict) -> dict:
    separable = separable_settings(saved)
    summary = {c: router_summary(saved, lambda table, c=c: route_with_margin(table, c)[0], separable)
               for c in CANDIDATES}
    best, chosen = adopt_by_rule(summary, TODAY)
    wrong = [m for m in wrong_margins(saved, lambda table: route_with_margin(table, chosen)) if np.isfinite(m)]
    return {"rule": __doc__, "summary": summary, "separable_settings": separable, "best": best, "chosen": chosen,
            "ambiguity_margin": float(np.quantile(wrong, 0.9))}


if __name__ == "__main__":
    rule_main(__doc__, summarise)
