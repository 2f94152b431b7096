"""`moleflow info`: parameter counts of a preset (shared and per task), without training anything."""

from __future__ import annotations

import argparse
import json

from ..config import Config
from ..model import ExpertFlow
from .common import format_table

EXAMPLES = """examples:
  moleflow info --preset main --embed-dim 768
  moleflow info --preset cpu --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameter counts of a preset", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="main", help="named preset (default main)")
    p.add_argument("--embed-dim", type=int, help="feature dimension D (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def parameter_report(cfg: Config, dim: int) -> dict:
    model = ExpertFlow(cfg.model, dim)
    model.add_task()
    counts = model.parameter_counts()
    per_task = counts["per_task"][0]
    router = dim + dim * dim if cfg.router.metric == "mahalanobis" else dim  # mean + precision
    return {"preset": cfg.preset, "embed_dim": dim, "shared": counts["shared"],
            "per_task": per_task, "router_floats_per_task": router}


def run(args: argparse.Namespace) -> int:
    cfg = Config.from_preset(args.preset).with_overrides(args.overrides)
    from ..backbones import backbone_spec

    dim = args.embed_dim or cfg.backbone.embed_dim or backbone_spec(cfg.backbone.name).default_dim
    report = parameter_report(cfg, dim)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    rows = [["shared (flow base, contexts, SCM)", f"{report['shared']:,}"]]
    rows += [[f"per task: {k}", f"{v:,}"] for k, v in report["per_task"].items()]
    rows.append(["per task: router prototype (floats, not parameters)", f"{report['router_floats_per_task']:,}"])
    print(f"preset {cfg.preset}, D = {dim}")
    print(format_table(rows, ["group", "parameters"]))
    return 0
