"""`moleflow rename-task`: give a learned product a new name (e.g. one found by `add-task --discover`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..detector import MoleFlow
from ..store import run_lock
from .common import add_lock_option

EXAMPLES = """examples:
  moleflow rename-task runs/line3 discovered-2 bracket_v2
Only the run's manifest changes: experts, prototypes and thresholds stay bit-identical.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("rename-task", help="rename one learned product of a run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("name", help="current task name (see `moleflow tasks`)")
    p.add_argument("new_name", help="the new name")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    add_lock_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        info = model.rename_task(args.name, args.new_name)
        model.save(args.run_dir)
    print(f"renamed {args.name} to {info.name}")
    return 0
