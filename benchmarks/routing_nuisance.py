"""Can the routing metric learn how defects move a part, from the product's own training images? TRAINING images only.

    python benchmarks/routing_nuisance.py --data ../shared/datasets --max-images 60 --features /tmp/rn60.pt \
        --json benchmarks/results/routing_nuisance.json

The default router chooses the product with one metric for all products, the inverse of the mean of their
covariances (linear discriminant analysis, docs/decisions.md §8): a defect's move d of the routing feature counts
through the direction that separates two products. A line knows more than that: defects move the feature along some
directions far more than the products' normal variation does. Each product can measure it on its own images when it
is learned, without any other product's data: paste synthetic defects (the `painted` kinds of `moleflow tune`,
`data.synthetic_anomalies`: scratch, spot, hole, crack, stain, missing; not the rectangles the validation pastes) into
its training images and record the moves d (defective minus clean median token, per tile). Candidate metric: the
inverse of mean_t(covariance_t) + lambda * mean_t(E[d d^T]_t), which makes a move along a direction defects take
count less (a nuisance covariance added to the within-product one). lambda = 0 is today's router.

Same settings, splits and pasted validation defects as benchmarks/routing_stress.py with the same seed (the moves use
a separate random stream, so the validation's pastes are those of the saved tables): `lambda 0` reproduces
`prototype_pooled` and the default router exactly (asserted). Each candidate also runs with the default trimmed
comparison (gate 0.1, limit 5: `router.trim_limit`), as the default router does.

The rule, written before the first run (that of benchmarks/routing_pooled.py and routing_trimmed.py, base: today's
default router): shared products 100 % (good and defects up to 10 %); among the rest, the best mean routing of
look-alike parts with defects of 2-10 % whose look-alike good parts lose at most 0.5 points; adopted only if it gains
at least 1.0 point there and loses at most 0.5 on the separable settings (good and defects up to 10 %).

Seed 0 (the first run): every lambda gained, and the best eligible, lambda 2, gained 0.996 points, 0.004 short of the
bar, so by the rule alone nothing was adopted. Written after seed 0 and before seeds 1 and 2 ran (`--seed 1 --check
/tmp/rt60_seed1.pt`, `--seed 2 --check /tmp/rt60_seed2.pt`, the splits and pastes of routing_trimmed.py's seeds), a
replication rule for that one candidate, lambda 2 (uncentred), fixed before: adopt it if its gain on look-alike
defects of 2-10 % averaged over the three seeds is at least 1.0 point, and on every seed look-alike good parts lose at
most 0.5 points and the separable settings (good, defects up to 10 %) lose at most 0.5. `--replicate` prints that
candidate's gains on the seed run and nothing is chosen per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_choice import adopt_by_rule, router_summary, separable_settings, wrong_margins  # noqa: E402
from routing_trust import MARGIN, evidence  # noqa: E402
from routing_trust import summary as trust_summary  # noqa: E402
from routing_stress import (add_setting_arguments, build_scenarios, encode, fit_products, pasted_cases,  # noqa: E402
                            trim_masks)

from moleflow import Config, MoleFlow  # noqa: E402
from moleflow.defect_moves import painted_copies  # noqa: E402
from moleflow.router import (PrototypeRouter, masked_median, mean_per_image, pool_precisions,  # noqa: E402
                             pooled_distances)

LAMBDAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
GATE, LIMIT = 0.1, "z5"  # the default router's trimmed comparison


def defect_moves(model: MoleFlow, images: list, clean: dict, rng: np.random.Generator) -> torch.Tensor:
    """(M, D) float64: per tile, the median token of the image with one painted defect minus that of the clean image
    (`clean`: `encode` of the same images)."""
    pasted = painted_copies([np.asarray(im.convert("RGB")) for im in images], rng)  # as the learner measures them
    moved = encode(model, [Image.fromarray(p) for p in pasted])
    return (moved["median"] - clean["median"]).double()


def setting_features(model: MoleFlow, products: dict, rng: np.random.Generator, moves_rng: np.random.Generator
                     ) -> dict:
    """Per product: prototype mean/precision (the router's), its defect moves; per evaluated case: median and trimmed
    median routing features (M, D), owner (M,), n."""
    cfg = model.config
    names = list(products)
    router = PrototypeRouter(cfg.router.__class__(**{**vars(cfg.router), "statistic": "median", "metric": "pooled"}))
    memory, encoded = fit_products(model, products, router)
    out: dict = {"names": names, "products": {}, "cases": {}}
    for t, name in enumerate(names):
        mean, precision = router.prototype(t)
        out["products"][name] = {"mean": mean, "precision": precision,
                                 "moves": defect_moves(model, products[name]["fit"], encoded[name][0], moves_rng)}
    for t, name in enumerate(names):  # the pastes of routing_stress.scenario_tables, in its order
        for case, imgs in pasted_cases(products[name]["eval"], rng).items():
            e = encode(model, imgs)
            z = torch.stack([memory.standardised_distance(memory.distances(e["tokens"], u), u)
                             for u in range(len(names))], 1)
            trimmed = masked_median(e["tokens"], trim_masks(z.min(1).values)[LIMIT])
            out["cases"][f"{name}|{case}"] = {"truth": t, "median": e["median"].double(), "trimmed": trimmed.double(),
                                              "owner": e["owner"], "n": e["n"]}
    return out


def metric(setting: dict, lam: float, centred: bool = False) -> torch.Tensor:
    """(D, D) pooled precision with the defect moves' second moment (times `lam`) added to the mean covariance: the
    router's `pool_precisions`, here also with the moment centred."""
    prods = list(setting["products"].values())
    moments = []
    for p in prods:
        d = p["moves"].numpy()
        d = d - d.mean(0) if centred else d
        moments.append(torch.from_numpy(d.T @ d / len(d)))
    return pool_precisions([p["precision"] for p in prods], moments, lam)


def choices(setting: dict, precision: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per case: (N,) chosen product index, as `Inspector.route` chooses in prototype mode with the trimmed
    comparison: the smallest evidence, the log pooled distance, or where other products are within the gate, the
    trimmed median's log distance among those; and (N,) the margin, runner-up minus chosen evidence."""
    means = torch.stack([p["mean"] for p in setting["products"].values()])
    out = {}
    for key, c in setting["cases"].items():
        def log_distance(x: torch.Tensor) -> torch.Tensor:
            return mean_per_image(pooled_distances(x, means, precision), c["owner"], c["n"]).clamp_min(1e-12).log()
        plain, trim = log_distance(c["median"]), log_distance(c["trimmed"])
        close = plain <= plain.min(1, keepdim=True).values + GATE
        ev = torch.where((close.sum(1) > 1).unsqueeze(1), trim.masked_fill(~close, float("inf")), plain)
        top = ev.topk(2, dim=1, largest=False).values
        out[key] = (ev.argmin(1), top[:, 1] - top[:, 0], ev)
    return out


def tables(features: dict, candidates: dict[str, tuple[float, bool]]) -> dict:
    """routing_choice.py's saved-table form: {setting: {"product|case": {"truth", "prototype" (N, T) own-metric
    distances (which settings are separable), "<candidate>" (N,) choice}}}."""
    out: dict = {}
    for name, setting in features.items():
        prods = list(setting["products"].values())
        chosen = {cand: choices(setting, metric(setting, lam, centred)) for cand, (lam, centred) in candidates.items()}
        out[name] = {}
        for key, c in setting["cases"].items():
            own = torch.stack([mean_per_image(
                ((c["median"] - p["mean"]) @ p["precision"] * (c["median"] - p["mean"])).sum(1).clamp_min(0).sqrt()
                .unsqueeze(1), c["owner"], c["n"]).squeeze(1) for p in prods], 1)
            out[name][key] = {"truth": c["truth"], "prototype": own, **{k: v[key][0] for k, v in chosen.items()},
                              **{f"{k}|margin": v[key][1] for k, v in chosen.items()},
                              **{f"{k}|evidence": v[key][2] for k, v in chosen.items()}}
    return out


REPLICATED = "lambda 2"  # seed 0's best eligible candidate, fixed before seeds 1 and 2 ran
ADOPTED_MARGIN = 0.035  # its ambiguity margin by routing_choice.py's rule on seed 0's validation (as 0.031 was set)


def replication(runs: list[dict]) -> dict:
    """The replication rule of the module doc over the JSONs of several seeds: REPLICATED's gains against lambda 0."""
    gains = []
    for run in runs:
        base, cand = run["candidates"]["lambda 0"], run["candidates"][REPLICATED]
        gains.append({k: 100 * (cand[k] - base[k]) for k in ("look_alike_good", "look_alike_defect",
                                                            "look_alike_defect_20", "separable_good", "separable_defect")})
    mean_defect = float(np.mean([g["look_alike_defect"] for g in gains]))
    adopt = mean_defect >= 1.0 and all(g["look_alike_good"] >= -0.5 and g["separable_good"] >= -0.5
                                       and g["separable_defect"] >= -0.5 for g in gains)
    return {"candidate": REPLICATED, "gains_per_seed": gains, "mean_look_alike_defect_gain": mean_defect,
            "adopted": adopt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(ap)
    ap.add_argument("--features", type=Path, help="save (or read, when it exists) every part's routing features")
    ap.add_argument("--check", type=Path, help="routing_stress.py tables of the same seed: lambda 0 must choose as "
                    "the default router did there")
    ap.add_argument("--replicate", type=Path, nargs="+", help="the JSONs of every seed: apply the replication rule")
    args = ap.parse_args()
    if args.replicate:
        verdict = replication([json.loads(p.read_text()) for p in args.replicate])
        print(json.dumps(verdict, indent=1))
        if args.json:
            args.json.write_text(json.dumps(verdict, indent=1))
        return
    if args.features and args.features.exists():
        features = torch.load(args.features, weights_only=False)
    else:
        torch.manual_seed(args.seed)
        model = MoleFlow(Config.from_preset(args.preset))
        rng, moves_rng = np.random.default_rng(args.seed), np.random.default_rng(10_000 + args.seed)
        features = {}
        for name, products in build_scenarios(args, rng).items():
            start = time.perf_counter()
            features[name] = setting_features(model, products, rng, moves_rng)
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
            if args.features:
                torch.save(features, args.features)
    candidates = {"lambda 0": (0.0, False)}
    candidates |= {f"lambda {lam:g}{c}": (lam, bool(c)) for lam in LAMBDAS if lam for c in ("", " centred")}
    saved = tables(features, candidates)
    if args.check:
        reference = torch.load(args.check, weights_only=False)
        for name, cases in saved.items():
            for key, table in cases.items():
                assert torch.equal(table["lambda 0"], evidence(reference[name][key]).argmin(1)), (name, key)
        print(f"lambda 0 chooses every part as the default router in {args.check}")
    separable = separable_settings(saved)
    summaries = {k: router_summary(saved, lambda t, k=k: t[k], separable) for k in candidates}
    for k, summ in summaries.items():  # routing_choice.py's margin rule: 90th percentile among the wrongly routed
        wrong = [m for m in wrong_margins(saved, lambda t, k=k: (t[k], t[f"{k}|margin"])) if np.isfinite(m)]
        summ["ambiguity_margin"] = float(np.quantile(wrong, 0.9))
    best, chosen = adopt_by_rule(summaries, "lambda 0")
    results: dict = {"setting": {k: str(v) for k, v in vars(args).items()}, "separable_settings": separable,
                     "best_eligible": best, "chosen": chosen, "candidates": summaries}
    for k, s in summaries.items():
        print(f"{k:20s} shared ok {s['shared_ok']!s:5s} look-alike good {100 * s['look_alike_good']:.1f} defects<=10% "
              f"{100 * s['look_alike_defect']:.1f} 20% {100 * s['look_alike_defect_20']:.1f}  separable "
              f"{100 * s['separable_good']:.1f} / {100 * s['separable_defect']:.1f}  margin {s['ambiguity_margin']:.3f}",
              flush=True)
    print(f"best eligible: {best}; chosen: {chosen}")
    # what the verdicts of the replicated candidate are worth (routing_trust.py), at seed 0's margin for it
    results["trust"] = {"candidate": REPLICATED, "ambiguity_margin": ADOPTED_MARGIN,
                        "today": trust_summary(saved, MARGIN, lambda t: t["lambda 0|evidence"]),
                        "replicated": trust_summary(saved, ADOPTED_MARGIN, lambda t: t[f"{REPLICATED}|evidence"])}
    for k in ("today", "replicated"):
        for group in ("separable/good", "separable/defects_2_10", "look_alike/defects_2_10"):
            r = results["trust"][k][group]
            print(f"trust {k:10s} {group:24s} right {100 * r['right']:5.1f} ambiguous {100 * r['ambiguous']:5.1f} "
                  f"right when sure {100 * r['right_when_sure']:6.2f} ({r['wrong_when_sure']} wrong) "
                  f"covered {100 * r['covered']:5.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
