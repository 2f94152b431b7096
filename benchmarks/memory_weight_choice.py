"""How much the patch memory counts in a patch's score (`score.memory_weight`), chosen on the painted validation.

    python benchmarks/memory_weight_choice.py --data ../shared/datasets --out /tmp/agreement \
        --json benchmarks/results/memory_weight_choice.json

A patch's score is its standardised flow NLL plus `score.memory_weight` times its standardised distance to the
product's patch memory (1: their plain sum, the `cpu` default since the memory came). The pixel map is that score,
upsampled and smoothed; pixel AUROC misses its goal of 82 on the shared sets (issue 26), and the flow alone localises
worse than the sum (docs/accuracy.md §10: flow_only), so the weight is the cheapest lever between the two.

Every candidate learns the four shared products 1-1 on `moleflow tune`'s fit images exactly as the agreement study
does (benchmarks/validation_agreement.py: the same splits, learning and scoring), then is scored on the painted and
subtle validations and on the real test sets.

The rule, fixed before the first run: the painted validation decides (the agreement study chose it for `moleflow
tune`), with tune's criterion, the mean over products of (image AUROC + pixel AUROC) / 2. The default weight 1
changes only if another candidate's painted score is higher by more than 0.25 points (the margin of
docs/decisions.md §7); among several such, the highest. The test scores are recorded for the report and never
enter the choice.

Added in stop 35, before its run: how the two terms combine (`score.memory_combine`): "max", a patch as anomalous as
its more alarmed source, at weight 1 (`--weights 1 --combine max`, candidate "max 1"), one of the per-pixel
combinations issue 26 names. Same learning, scoring and rule: it replaces the plain sum only if its painted score
is higher than weight 1's by more than 0.25 points. The weight-1 sum row is not run again (the runs are seeded;
it reproduced docs/accuracy.md §10's default row exactly).

Added in stop 36, before its run: the agreement study now chooses the `faint` validation for `moleflow tune`
(Spearman 0.905 against the painted set's 0.810; benchmarks/validation_agreement.py). The rule above, with `faint`
deciding in the painted set's place: each candidate is learned again and scored on `faint` (`--sets faint`; its
painted score must equal the saved one), and the weight 1 sum changes only if another candidate's faint score is
higher by more than 0.25 points; among several such, the highest. `max 1` is one of the candidates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from validation_agreement import SETS, VALIDATIONS, measure, splits_for

WEIGHTS = (0.5, 1.0, 2.0, 4.0)
MARGIN = 0.0025  # 0.25 points


def choose(results: dict[str, dict], deciding: str = "painted") -> tuple[str, float]:
    """The rule above: (chosen candidate, its margin over the default on the `deciding` validation)."""
    scored = [w for w in results if deciding in results[w]]
    default = results["1"][deciding]["score"]
    best = max(scored, key=lambda w: results[w][deciding]["score"])
    margin = results[best][deciding]["score"] - default
    return (best if margin > MARGIN else "1"), margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder for the validation images")
    ap.add_argument("--json", type=Path, required=True, help="results (read back to resume)")
    ap.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    ap.add_argument("--combine", default="sum", choices=("sum", "max"))
    ap.add_argument("--sets", nargs="+", choices=VALIDATIONS,
                    help="for weights already measured: learn again and score these validations (and painted)")
    args = ap.parse_args()
    splits = splits_for(args.data, args.out)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    results: dict = saved.get("candidates", {})
    for weight in args.weights:
        name = f"{weight:g}" if args.combine == "sum" else f"{args.combine} {weight:g}"
        overrides = [f"score.memory_weight={weight}", f"score.memory_combine={args.combine}"]
        if not measure(results, name, overrides, splits, args.sets or ()):
            continue
        r = results[name]
        sets = [k for k in SETS if k in r]
        pixel = {k: float(np.mean([m["pixel_auroc"] for m in r[k]["per_class"].values() if m["pixel_auroc"] is not None]))
                 for k in sets}
        print(f"weight {name:5s} " + " ".join(f"{k} {100 * r[k]['score']:.2f} (P {100 * pixel[k]:.2f})" for k in sets)
              + f" ({r['seconds']:.0f} s)", flush=True)
        args.json.write_text(json.dumps({"rule": __doc__, "candidates": results}, indent=1))
    summary = {}
    for deciding in ("painted", "faint"):  # painted decided until stop 36, faint (the agreement study's choice) since
        if deciding in results.get("1", {}):
            chosen, margin = choose(results, deciding)
            summary[deciding] = {"chosen": chosen, "best_margin_over_default": margin}
            print(f"{deciding} decides: weight {chosen} (best margin over weight 1: {100 * margin:+.2f} points)")
    args.json.write_text(json.dumps({"rule": __doc__, "candidates": results, "choice": summary}, indent=1))


if __name__ == "__main__":
    main()
