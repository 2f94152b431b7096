"""`moleflow tasks`: list the learned tasks of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..detector import MoleFlow
from .common import describe_confusability, describe_routing_now, format_table

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
    now = model.routing_now()
    for info in model.tasks:
        params = model.flow.task_parameters(info.task_id)
        n_params = sum(p.numel() for p in params)
        bytes_ = model.inspector.task_bytes(info.task_id)  # a lazily loaded expert is not read for this
        cal = info.calibration
        rate = cal.get("false_alarm_rate")
        n_cal = int(cal.get("n", 0))
        rows.append({"task_id": info.task_id, "step": info.step, "name": info.name, "classes": info.classes,
                     "parameters": n_params, "trained_shared_flow": info.task_id in model.flow.base_tasks,
                     "bytes": bytes_, "n_train": info.n_train, "threshold": info.threshold,
                     "false_alarm_rate": rate, "calibration": cal.get("source"), "n_calibration": cal.get("n"),
                     "rule": cal.get("rule", "quantile (moleflow 0.1)"),
                     "supported_rate": cal.get("supported_rate", 1.0 / (n_cal + 1)),
                     "false_alarm_interval": cal.get("false_alarm_interval"), "warning": cal.get("warning", ""),
                     "recalibrations": len(cal.get("history", [])), "confusability": info.confusability,
                     "held_out_by": cal.get("held_out_by", "image"), "held_out_groups": cal.get("held_out_groups"),
                     "groups": cal.get("groups"), "routing_now": now.get(info.name)})
    return rows


def run(args: argparse.Namespace) -> int:
    model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
    rows = task_table(model)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0

    def held_out(r: dict) -> str:
        if r["held_out_by"] == "group":
            return f"{r['n_calibration']} ({r['held_out_groups']} of {r['groups']} parts)"
        return str(r["n_calibration"])

    def interval(r: dict) -> str:
        low, high = r["false_alarm_interval"] or (None, None)
        return "n/a" if low is None else f"{low:.1%}-{high:.1%}"

    table = [[r["task_id"], r["step"], r["name"], ",".join(r["classes"]), f"{r['parameters']:,}", f"{r['bytes'] / 1e6:.2f} MB",
              r["n_train"], f"{r['threshold']:.3f}" + (" (!)" if r["warning"] else ""),
              f"{r['false_alarm_rate']:.1%}", f"{r['supported_rate']:.1%}", interval(r), held_out(r)]
             for r in rows]
    print(format_table(table, ["id", "step", "name", "classes", "parameters", "size", "train imgs", "threshold",
                               "FAR asked", "FAR supported", "FAR 95% interval", "calibration images"]))
    for r in rows:
        if r["warning"]:
            print(f"(!) {r['name']}: {r['warning']}")
    for r in rows:
        if r["confusability"]:
            print("routing when learned: " + describe_confusability(r["name"], r["confusability"]))
    for line in describe_routing_now({r["name"]: r["routing_now"] for r in rows if r["routing_now"]}):
        print(line)
    print(f"backbone {model.extractor.name} (sha256 {model.extractor.weights_sha256[:12]}), "
          f"shared flow {sum(p.numel() for p in model.flow.shared_parameters()):,} parameters")
    return 0
