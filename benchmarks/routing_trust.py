"""What is "which product" worth to the line? The default router's verdicts on TRAINING images, by doubt.

    python benchmarks/routing_trust.py --tables /tmp/rt60_tables.pt /tmp/rt60_seed1.pt /tmp/rt60_seed2.pt \
        --json benchmarks/results/routing_trust.json

A verdict names one product, or, when routing is ambiguous (another product's evidence within
`router.ambiguity_margin` of the chosen one's), it says so and names the other plausible products too
(`Inspector.route`, docs/decisions.md §8). For the default `cpu` router (the pooled prototype, compared again on the
median of the fitting patches where products are within 0.1: `trimmed z5, gate 0.1` of benchmarks/routing_trimmed.py)
and its margin 0.031, this reads the tables benchmarks/routing_stress.py saved (held-out training images of the
shared products, the real look-alike settings and the synthetic ones; good and with pasted defects of 2-10 %) and
reports per group of settings (shared, separable as routing_choice.py defines them, every look-alike one):
* `right`: routed to the own product (the issue's figure);
* `ambiguous`: share of parts whose verdict says routing was in doubt;
* `right_when_sure`: routed right among the parts whose verdict names one product without doubt;
* `covered`: the own product is among the products the verdict names (the chosen one and the plausible others).
Nothing here chooses a default: it measures the one the earlier rules chose, seed 0 (whose validation set the margin)
and seeds 1 and 2 (which did not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import DEFECTS, separable_settings  # noqa: E402
from routing_trimmed import route_with_margin  # noqa: E402

ROUTER, GATE, MARGIN = "trimmed z5, gate 0.1", 0.1, 0.031


def evidence(table: dict) -> torch.Tensor:
    """(N, T) log distances that choose, as `Inspector.route` computes them for the default router: the pooled
    prototype's, or where other products are within the gate, the trimmed median's among those (inf elsewhere)."""
    log_pooled = table["prototype_pooled"].clamp_min(1e-12).log()
    close = log_pooled <= log_pooled.min(1).values.unsqueeze(1) + GATE
    trimmed = table["prototype_pooled_trim_z5"].clamp_min(1e-12).log().masked_fill(~close, float("inf"))
    return torch.where((close.sum(1) > 1).unsqueeze(1), trimmed, log_pooled)


def verdicts(table: dict, margin: float, evidence_of: Callable[[dict], torch.Tensor] = evidence
             ) -> dict[str, torch.Tensor]:
    """Per part (N,) bool: routed right, ambiguous, own product among those named, for the router whose evidence
    (N, T) `evidence_of(table)` gives (default: the `trimmed z5, gate 0.1` router of routing_trimmed.py)."""
    ev = evidence_of(table)
    choice = ev.argmin(1)
    if evidence_of is evidence:
        assert torch.equal(choice, route_with_margin(table, ROUTER)[0])  # the router routing_trimmed.py measured
    plausible = ev <= ev.min(1, keepdim=True).values + margin
    truth = torch.full_like(choice, int(table["truth"]))
    return {"right": choice == truth, "ambiguous": plausible.sum(1) > 1,
            "covered": plausible.gather(1, truth.unsqueeze(1)).squeeze(1)}


def summary(saved: dict, margin: float, evidence_of: Callable[[dict], torch.Tensor] = evidence) -> dict:
    separable = separable_settings(saved)
    groups = {"shared": ["shared"], "separable": separable, "look_alike": [s for s in saved if s != "shared"]}
    out: dict = {"separable_settings": separable}
    for group, settings in groups.items():
        for case, cases in (("good", ("good",)), ("defects_2_10", DEFECTS)):
            parts = [verdicts(t, margin, evidence_of) for s in settings for k, t in saved[s].items() if k.split("|")[1] in cases]
            v = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            sure = ~v["ambiguous"]
            out[f"{group}/{case}"] = {
                "n": len(v["right"]), "right": float(v["right"].double().mean()),
                "ambiguous": float(v["ambiguous"].double().mean()),
                "right_when_sure": float(v["right"][sure].double().mean()) if sure.any() else None,
                "wrong_when_sure": int((~v["right"] & sure).sum()),
                "covered": float(v["covered"].double().mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=Path, nargs="+", required=True, help="routing_stress.py tables, one per seed")
    ap.add_argument("--margin", type=float, default=MARGIN)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {"router": ROUTER, "ambiguity_margin": args.margin, "seeds": {}}
    for path in args.tables:
        s = summary(torch.load(path), args.margin)
        result["seeds"][path.name] = s
        print(path.name)
        for key, r in s.items():
            if key == "separable_settings":
                continue
            sure = "-" if r["right_when_sure"] is None else f"{100 * r['right_when_sure']:6.2f}"
            print(f"  {key:24s} n={r['n']:5d} right {100 * r['right']:5.1f}  ambiguous {100 * r['ambiguous']:5.1f}  "
                  f"right when sure {sure} ({r['wrong_when_sure']} wrong)  covered {100 * r['covered']:5.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
