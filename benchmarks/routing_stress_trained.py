"""A trained run's own routing under pasted defects, for several router settings, end to end through `predict`.

    python benchmarks/routing_stress_trained.py /tmp/la13b --data /tmp/lookalike --set trim_limit=0 trim_limit=5 \
        --json benchmarks/results/routing_stress_trained_exp1_exp3.json

benchmarks/routing_stress.py measures routers on tables it builds itself (a prototype router and patch memory made
the way learning makes them); this checks what a trained model's `Inspector.route` does, the path `predict`,
evaluation and serving take: each product's good TEST images routed as they are and with one pasted defect of 2,
5, 10 and 20 % of the image (`moleflow.routing_stress`, the report's stress test; seeded), under each router
setting. Routing happens at inference, so every setting is measured on the same experts. It reports; it chooses
nothing (the settings were chosen on training images, docs/decisions.md §8).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from moleflow import MoleFlow
from moleflow.routing_stress import inspector_route, routing_under_defects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="dataset root with <class>/test/good")
    ap.add_argument("--set", nargs="+", default=["trim_limit=0", "trim_limit=5"],
                    help="router settings to compare, each field=value[,field=value]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = MoleFlow.load(args.run)
    truth = {c: t.task_id for t in model.tasks for c in t.classes}
    images = {c: [Image.open(f).convert("RGB") for f in sorted((args.data / c / "test" / "good").iterdir())]
              for c in truth}
    default = dict(vars(model.config.router))
    out: dict = {"run": str(args.run), "router": default, "settings": {}}
    for setting in args.set:
        for key, value in default.items():  # each setting starts from the run's router
            setattr(model.config.router, key, value)
        for item in setting.split(","):
            key, value = item.split("=", 1)
            setattr(model.config.router, key, type(default[key])(value))
        table = routing_under_defects(inspector_route(model), images, truth, seed=args.seed)
        out["settings"][setting] = table
        print(setting)
        for c, row in table.items():
            print(f"  {c:12s} n={row['n']:3d} good {100 * row['good']:5.1f} " +
                  " ".join(f"{a}={100 * v:5.1f}" for a, v in row["defective"].items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
