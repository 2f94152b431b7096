"""`moleflow rename-task`: give a learned product a new name (e.g. one found by `add-task --discover`)."""

from __future__ import annotations

import argparse

from .common import add_edit_options, edit_run

EXAMPLES = """examples:
  moleflow rename-task runs/line3 product-2 bracket_v2
Only the run's manifest changes: experts, prototypes and thresholds stay bit-identical.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("rename-task", help="rename one learned product of a run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_options(p)
    p.add_argument("new_name", help="the new name")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = edit_run(args, lambda model: model.rename_task(args.name, args.new_name))
    print(f"renamed {args.name} to {info.name}")
    return 0
