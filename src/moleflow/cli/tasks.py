"""`moleflow tasks`: list the learned tasks of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..detector import MoleFlow
from .common import format_table
from .predict import checkpoint_path

EXAMPLES = """examples:
  moleflow tasks runs/real
  moleflow tasks runs/real --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("tasks", help="list learned tasks (products) of a run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.set_defaults(run=run)


def task_table(model: MoleFlow) -> list[dict]:
    rows = []
    for info in model.tasks:
        params = model.flow.task_parameters(info.task_id)
        n_params = sum(p.numel() for p in params)
        proto = model.router.prototypes[info.task_id]
        bytes_ = sum(p.numel() * p.element_size() for p in params) + \
            proto.mean.numel() * proto.mean.element_size() + proto.precision.numel() * proto.precision.element_size()
        rows.append({"task_id": info.task_id, "name": info.name, "classes": info.classes, "parameters": n_params,
                     "bytes": bytes_, "n_train": info.n_train, "threshold": info.threshold,
                     "false_alarm_rate": info.calibration.get("false_alarm_rate"),
                     "calibration": info.calibration.get("source"), "n_calibration": info.n_calibration})
    return rows


def run(args: argparse.Namespace) -> int:
    model = MoleFlow.load(checkpoint_path(args.run_dir), backbone_weights=args.backbone_weights)
    rows = task_table(model)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [[r["task_id"], r["name"], ",".join(r["classes"]), f"{r['parameters']:,}", f"{r['bytes'] / 1e6:.2f} MB",
              r["n_train"], f"{r['threshold']:.3f} @ {r['false_alarm_rate']:.0%} FAR ({r['n_calibration']} held-out)"]
             for r in rows]
    print(format_table(table, ["id", "name", "classes", "parameters", "size", "train imgs", "threshold"]))
    print(f"backbone {model.extractor.name} (sha256 {model.extractor.weights_sha256[:12]}), "
          f"shared flow {sum(p.numel() for p in model.flow.shared_parameters()):,} parameters")
    return 0
