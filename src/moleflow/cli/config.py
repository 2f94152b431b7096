"""`moleflow config`: print the resolved configuration (preset or file, then overrides) as YAML."""

from __future__ import annotations

import argparse

from .common import add_config_options, build_config

EXAMPLES = """examples:
  moleflow config                                   # the default (cpu) preset, every key
  moleflow config --preset main
  moleflow config --preset tiny --set train.epochs=3 --set train.lr=1e-4
  moleflow config --config runs/real/config.yaml --set router.enabled=false > my.yaml
  moleflow train --data DATA --out runs/mine --config my.yaml

The output is the YAML a training run writes to RUN_DIR/config.yaml; every key can be given to --set
as section.key=value. Values are checked against their types: a bad one is a one-line error.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved configuration as YAML", epilog=EXAMPLES,
                       description="Print the configuration a run would use (preset or --config file, then the "
                                   "named options and --set overrides) as YAML, without running anything.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    cfg = build_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
