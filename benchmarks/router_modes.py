"""What each router costs in decisions on a trained run: measured on its TEST images, after the choice.

    python benchmarks/router_modes.py runs/real --json benchmarks/results/router_modes_shared.json
    python benchmarks/router_modes.py /tmp/la13 --data /tmp/lookalike \
        --modes "prototype:metric=mahalanobis,ambiguity_margin=0" "prototype:metric=pooled,ambiguity_margin=0.032"

The routers were chosen on training images (benchmarks/routing_stress.py, docs/decisions.md §8); this script
only reports, per product and router: good and defective parts routed to their own product, parts routed
ambiguously, defective parts flagged (routed and with the true product given), image AUROC, and the realised
false-alarm rate beside the product's stated 95 % interval. Routing happens at inference, so every router is
measured on the same trained experts. Nothing here feeds back into a default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moleflow import MoleFlow
from moleflow.data.datasets import load_class
from moleflow.evaluation import evaluate_classes, threshold_summary

KEYS = ("image_auroc", "pixel_auroc", "routing_accuracy_good", "routing_accuracy_defective", "ambiguous_rate",
        "routing_accuracy_unambiguous", "routing_coverage_good", "routing_coverage_defective",
        "detection_rate", "false_alarm_rate_realised")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, help="dataset root (default: the run's)")
    ap.add_argument("--modes", nargs="+", default=["prototype", "gated:ambiguity_margin=0", "gated"],
                    help="router modes, each optionally with router fields (the run's own otherwise): "
                         "gated:metric=mahalanobis,ambiguity_margin=0.17")
    ap.add_argument("--set", nargs="*", default=[], help="router fields, e.g. gate=0.1 ambiguity_margin=0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = MoleFlow.load(args.run)
    results = json.loads((args.run / "results.json").read_text())
    root = args.data or Path(results["dataset"]["root"])
    class_task = {c: t.task_id for t in model.tasks for c in t.classes}
    splits = {c: load_class(root, c, "folder") for c in class_task}
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(model.config.router, key, type(getattr(model.config.router, key))(value))
    out: dict = {"run": str(args.run), "router": vars(model.config.router) | {"mode": None}, "modes": {}}
    oracle = {c: e.metrics for c, e in evaluate_classes(model, splits, class_task, oracle=True).items()}
    defaults = dict(vars(model.config.router))
    for mode in args.modes:  # "gated" or "gated:ambiguity_margin=0"
        name, _, extra = mode.partition(":")
        for k, v in defaults.items():
            setattr(model.config.router, k, v)
        model.config.router.mode = name
        for item in filter(None, extra.split(",")):
            key, value = item.split("=", 1)
            setattr(model.config.router, key, type(defaults[key])(value))
        final = {c: e.metrics for c, e in evaluate_classes(model, splits, class_task).items()}
        limits = threshold_summary(model, final)
        rows = {}
        for c, m in final.items():
            task = next(t.name for t in model.tasks if c in t.classes)
            rows[c] = {k: m.get(k) for k in KEYS} | {"detection_rate_oracle": oracle[c].get("detection_rate"),
                                                    "image_auroc_oracle": oracle[c].get("image_auroc"),
                                                    "false_alarm_interval": limits[task]["interval"]}
        out["modes"][mode] = rows
        print(f"== router {mode}")
        for c, r in rows.items():
            print(f"  {c:16s} " + " ".join(f"{k}={'n/a' if v is None else round(100 * v, 1) if isinstance(v, float) else v}"
                                            for k, v in r.items()), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
