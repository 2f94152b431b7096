"""The router choice of docs/decisions.md §8, from what benchmarks/routing_stress.py measured on TRAINING images.

    python benchmarks/routing_choice.py --tables /tmp/rs60_tables.pt --json benchmarks/results/routing_choice.json

The rule, fixed before the comparison ran:
1. a router must route the four shared products' good parts and their parts with defects up to 10 % of the
   image 100 % right (what the prototype router does);
2. among those, the highest mean routing accuracy of parts with a pasted defect of 2, 5 and 10 % over the
   look-alike settings (the real lighting pairs, the ten board designs, the synthetic look-alike pairs),
   each setting weighted equally;
3. provided its mean accuracy on good look-alike parts is not more than 0.5 points below the prototype router's;
4. within 0.5 points of the best, the cheaper router wins (prototype, then gated with the smallest gate, then the
   evidence routers with the smallest gate, then patch).
The `evidence` family (prototype and patch memory weighed together) was added after a first comparison of the
others on these same training images showed that neither the gated patch vote nor the patch vote alone gained
more than 3 points; it is chosen by the same rule, on the same images, never on test images.
The `paired` family (each product's distances over the same patches, the share that fits best; a defect's patches
drop out) was measured after this choice and is reported beside the candidates, not eligible under the rule
(docs/decisions.md §8).
The ambiguity margin is then the 90th percentile of the chosen router's margins among the look-alike parts
(good and defects up to 10 %) it routes wrongly, so that nine in ten routing errors of the validation are
scored under both products.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DEFECTS = ("0.02", "0.05", "0.1")


def misfits(table: dict, distance: str) -> torch.Tensor:
    return table["patch_median" if distance == "standardised" else "patch_median_raw"]


def choose(table: dict, router: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice (N,) and margin (N,) of `router` on one table; margin: runner-up minus best misfit for standardised
    misfits, runner-up over best minus 1 for raw ones (scale-free); inf where the prototype decided alone.
    `evidence_<w>_<g>`: among the products whose prototype is within a factor 1 + g of the nearest, the smallest
    log(prototype distance) + w log(raw patch misfit); margin: runner-up minus best evidence."""
    proto = table["prototype"]
    if router == "prototype":
        return proto.argmin(1), torch.full((len(proto),), float("inf"), dtype=torch.float64)
    if router.startswith(("evidence", "paired")):
        # evidence_<w>_<g>: the median patch misfit; paired<s>_<w>_<g>: the paired misfit over the share s of
        # patches that fit best (`router.patch_misfit(..., "paired")`)
        family, weight, gate = router.split("_")
        misfit = table["patch_median_raw"] if family == "evidence" else table[f"patch_paired_{family[6:]}"]
        candidates = proto <= proto.min(1).values.unsqueeze(1) * (1 + float(gate))
        evidence = (proto.log() + float(weight) * misfit.log()).masked_fill(~candidates, float("inf"))
        top = evidence.topk(2, dim=1, largest=False).values
        doubt = candidates.sum(1) > 1
        margin = torch.where(doubt, top[:, 1] - top[:, 0], torch.full_like(top[:, 0], float("inf")))
        return torch.where(doubt, evidence.argmin(1), proto.argmin(1)), margin
    kind, _, gate = router.rpartition("_")
    raw = "raw" in router
    fit = misfits(table, "raw" if raw else "standardised")
    if router.startswith("patch"):
        candidates = torch.ones_like(proto, dtype=torch.bool)
    else:
        nearest = proto.min(1).values.unsqueeze(1)
        candidates = proto <= nearest * (1 + float(gate))
    fit = fit.masked_fill(~candidates, float("inf"))
    doubt = candidates.sum(1) > 1
    top = fit.topk(2, dim=1, largest=False).values
    margin = (top[:, 1] / top[:, 0] - 1) if raw else (top[:, 1] - top[:, 0])
    choice = torch.where(doubt, fit.argmin(1), proto.argmin(1))
    return choice, torch.where(doubt, margin, torch.full_like(margin, float("inf")))


def nearest_with_margin(distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """distance (N, T) -> the nearest (N,) and the margin (N,): runner-up minus nearest log distance (the evidence
    `Inspector.route` computes in prototype mode)."""
    top = distance.clamp_min(1e-12).log().topk(2, dim=1, largest=False).values
    return distance.argmin(1), top[:, 1] - top[:, 0]


def setting_accuracy(saved: dict, route: Callable[[dict], torch.Tensor]) -> dict[str, dict[str, float]]:
    """{setting: {case: share routed right}} of a router `route(table) -> choice (N,)` over saved tables."""
    per_setting: dict = {}
    for setting, tables in saved.items():
        acc: dict = {}
        for key, table in tables.items():
            acc.setdefault(key.split("|")[1], []).append(float((route(table) == table["truth"]).double().mean()))
        per_setting[setting] = {case: float(np.mean(v)) for case, v in acc.items()}
    return per_setting


def separable_settings(saved: dict) -> list[str]:
    """The look-alike settings where the prototype (each product's own covariance, no patch memory) routes >= 95 %
    of good parts right: the hidden pair's situation."""
    per = setting_accuracy(saved, lambda table: table["prototype"].argmin(1))
    return [s for s in saved if s != "shared" and per[s]["good"] >= 0.95]


def router_summary(saved: dict, route: Callable[[dict], torch.Tensor], separable: list[str]) -> dict:
    """What every rule here reads of one router: the shared products all right, look-alike good parts and parts with
    defects up to 10 % (and of 20 %), the same on the separable settings, and every setting's figures."""
    per = setting_accuracy(saved, route)
    look = [s for s in saved if s != "shared"]
    shared = per.get("shared", {})
    return {"shared_ok": all(shared.get(c, 0) == 1.0 for c in ("good",) + DEFECTS),
            "look_alike_good": float(np.mean([per[s]["good"] for s in look])),
            "look_alike_defect": float(np.mean([per[s][c] for s in look for c in DEFECTS])),
            "look_alike_defect_20": float(np.mean([per[s]["0.2"] for s in look])),
            "separable_good": float(np.mean([per[s]["good"] for s in separable])),
            "separable_defect": float(np.mean([per[s][c] for s in separable for c in DEFECTS])),
            "per_setting": per}


def adopt_by_rule(summaries: dict[str, dict], today: str) -> tuple[str, str]:
    """The rule of routing_features.py, routing_pooled.py and routing_trimmed.py over `router_summary`s by candidate:
    the shared products all right; among those, the best look-alike defects (2-10 %) with look-alike good parts at
    most 0.5 points below `today`'s; it replaces `today` only if it gains at least 1.0 point there and loses at most
    0.5 on the separable settings, good or defective. Returns (best eligible, chosen)."""
    base = summaries[today]
    eligible = [k for k, s in summaries.items()
                if s["shared_ok"] and s["look_alike_good"] >= base["look_alike_good"] - 0.005]
    best = max(eligible, key=lambda k: summaries[k]["look_alike_defect"])
    b = summaries[best]
    adopt = (best != today and b["look_alike_defect"] >= base["look_alike_defect"] + 0.01
             and b["separable_good"] >= base["separable_good"] - 0.005
             and b["separable_defect"] >= base["separable_defect"] - 0.005)
    return best, best if adopt else today


def print_summaries(summaries: dict[str, dict], width: int = 28) -> None:
    """One line per router of what `adopt_by_rule` reads."""
    for key, s in summaries.items():
        print(f"{key:{width}s} shared ok {s['shared_ok']!s:5s} look-alike good {100 * s['look_alike_good']:5.1f} "
              f"defects<=10% {100 * s['look_alike_defect']:5.1f} 20% {100 * s['look_alike_defect_20']:5.1f} | "
              f"separable good {100 * s['separable_good']:5.1f} defects<=10% {100 * s['separable_defect']:5.1f}")


def rule_main(doc: str, summarise: Callable[[dict], dict], extra_of: Callable | None = None) -> None:
    """The command line of a script that measures (or reads) routing_stress.py's tables and applies `adopt_by_rule`:
    `summarise(saved) -> {"summary", "best", "chosen", ...}` (with "ambiguity_margin" where it sets one), printed and
    written to --json. `extra_of(model)` gives extra routing features to measure (routing_stress.measured_tables)."""
    from routing_stress import add_setting_arguments, measured_tables  # it imports the model: only where measuring

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(ap)
    ap.add_argument("--tables", type=Path, help="read saved tables instead of measuring (torch.load), or save them")
    args = ap.parse_args()
    result = summarise(measured_tables(args, extra_of))
    print_summaries(result["summary"], max(28, *(len(k) + 1 for k in result["summary"])))
    margin = f"; its ambiguity margin {result['ambiguity_margin']:.3f}" if "ambiguity_margin" in result else ""
    print(f"best eligible: {result['best']}; chosen: {result['chosen']}{margin}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def wrong_margins(saved: dict, route: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """The margins of a router `route(table) -> (choice (N,), margin (N,))` on the look-alike parts (good and defects
    up to 10 %) it routes wrongly."""
    out: list[float] = []
    for setting, tables in saved.items():
        if setting == "shared":
            continue
        for key, table in tables.items():
            if key.split("|")[1] in ("good",) + DEFECTS:
                choice, margin = route(table)
                out += margin[choice != table["truth"]].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    saved = torch.load(args.tables)
    routers = ["prototype"] + [f"gated{raw}_{g:g}" for raw in ("", "_raw") for g in (0.02, 0.05, 0.1, 0.2, 0.5)] + [
        f"evidence_{w:g}_{g:g}" for g in (0.2, 0.5) for w in (0.5, 1, 2, 4)] + ["patch_median", "patch_median_raw"]
    # measured after the choice (stop 29): reported beside the rule's candidates, not eligible under it
    # the shares routing_stress.py saved tables for (tables saved before stop 29 have none)
    first_table = next(iter(next(iter(saved.values())).values()))
    shares = [k.removeprefix("patch_paired_") for k in first_table if re.fullmatch(r"patch_paired_[0-9.]+", k)]
    challengers = [f"paired{s}_{w:g}_{g:g}" for s in shares for g in (0.2, 0.5) for w in (1, 2, 4)]
    measured = routers + challengers
    separable = separable_settings(saved)
    summary = {router: router_summary(saved, lambda table, r=router: choose(table, r)[0], separable)
               for router in measured}
    base = summary["prototype"]["look_alike_good"]
    eligible = [r for r in routers if summary[r]["shared_ok"] and summary[r]["look_alike_good"] >= base - 0.005]
    best = max(summary[r]["look_alike_defect"] for r in eligible)
    chosen = next(r for r in eligible if summary[r]["look_alike_defect"] >= best - 0.005)  # routers are in cost order
    wrong = wrong_margins(saved, lambda table: choose(table, chosen))
    finite = [m for m in wrong if np.isfinite(m)]
    margin = float(np.quantile(finite, 0.9)) if finite else 0.0
    for r in measured:
        s = summary[r]
        print(f"{r:18s} shared ok {s['shared_ok']!s:5s} look-alike good {100 * s['look_alike_good']:5.1f} "
              f"defects<=10% {100 * s['look_alike_defect']:5.1f} | separable good {100 * s['separable_good']:5.1f} "
              f"defects<=10% {100 * s['separable_defect']:5.1f}" + ("   <- chosen" if r == chosen else ""))
    print(f"chosen {chosen}; its wrongly routed look-alike parts: {len(wrong)}, {len(finite)} with a patch "
          f"vote; ambiguity margin (90th percentile of their margins) {margin:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"rule": __doc__, "summary": summary, "chosen": chosen,
                                         "ambiguity_margin": margin, "separable_settings": separable,
                                         "wrong_routed": len(wrong),
                                         "wrong_routed_with_vote": len(finite)}, indent=1))


if __name__ == "__main__":
    main()
