"""`moleflow remove-task`: delete one product's expert; the others are unaffected."""

from __future__ import annotations

import argparse

from .common import add_edit_options, edit_run

EXAMPLES = """examples:
  moleflow remove-task runs/real cubes
The last task of a run cannot be removed (a run needs at least one product).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("remove-task", help="delete one learned product from a run", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def remove(model):
        return model.remove_task(args.name), len(model.tasks)

    info, left = edit_run(args, remove)
    print(f"removed task {info.name} (classes {', '.join(info.classes)}); {left} tasks remain")
    return 0
