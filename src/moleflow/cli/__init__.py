"""`moleflow` command line: one module per subcommand; this file only dispatches.

Every subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. A `MoleflowError`
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from ..errors import MoleflowError

COMMANDS = ("demo", "train", "evaluate", "predict", "watch", "add-task", "tasks", "rename-task", "remove-task", "export", "ablate", "tune", "bench", "info", "migrate", "config", "calibrate", "serve", "status", "unknowns", "sweep")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="moleflow",
        description="Continual industrial anomaly detection with MoLE-Flow: learn products one after another "
                    "from normal images, then score any image without being told its product.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `moleflow COMMAND --help` for each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"moleflow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        import_module(f".{name.replace('-', '_')}", __name__).add_parser(sub)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s" if verbose else "%(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.run(args) or 0)
    except MoleflowError as exc:
        print(f"moleflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moleflow {args.command}: interrupted; files already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
