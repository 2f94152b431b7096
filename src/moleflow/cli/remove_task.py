"""`moleflow remove-task`: delete one product's expert; the others are unaffected."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..detector import MoleFlow
from ..store import run_lock
from .common import add_lock_option

EXAMPLES = """examples:
  moleflow remove-task runs/real cubes
The last task of a run cannot be removed (a run needs at least one product).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("remove-task", help="delete one learned product from a run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("name", help="task name (see `moleflow tasks`)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    add_lock_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        info = model.remove_task(args.name)
        model.save(args.run_dir)
    print(f"removed task {info.name} (classes {', '.join(info.classes)}); {len(model.tasks)} tasks remain")
    return 0
