"""`moleflow calibrate`: re-calibrate one product's threshold from more good parts, without retraining."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.transforms import load_rgb
from ..detector import MoleFlow
from ..errors import MoleflowError
from ..evaluation import refresh_decisions
from ..store import run_lock
from .common import add_lock_option, parse_rate
from .predict import expand_inputs

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow calibrate runs/real --product cubes --normals line3/good_parts/
  moleflow calibrate runs/real --product cubes --normals new_camera/good/ --replace --false-alarm-rate 0.005
The new good parts' scores are pooled with the product's existing calibration scores (--replace: used
alone) and the threshold is the conformal rule over them (README: "Decisions and thresholds"). Only the
product's calibration file and the manifest change; its expert and every other product stay bit-identical.
The previous threshold is kept in the product's calibration history (`moleflow tasks RUN --json`).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="re-calibrate one product's threshold from more good parts",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--product", required=True, help="task name (see `moleflow tasks`)")
    p.add_argument("--normals", nargs="+", required=True, help="good images of the product: files, folders, globs")
    p.add_argument("--false-alarm-rate", type=parse_rate, help="the rate to guarantee (default: the product's)")
    p.add_argument("--replace", action="store_true",
                   help="calibrate on the new good parts only (e.g. after a camera change)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.add_argument("--no-progress", action="store_true")
    add_lock_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    paths = expand_inputs(args.normals)
    images, bad = [], []
    for path in paths:  # every good part must be readable: a silent skip would change the guarantee
        try:
            images.append(load_rgb(path))
        except MoleflowError as exc:
            bad.append(str(exc))
    if bad:
        raise MoleflowError(f"{bad[0]}" + (f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""))
    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        before = model.task_by_name(args.product).threshold
        info = model.recalibrate(args.product, images, args.false_alarm_rate, replace=args.replace)
        folder = model.save(args.run_dir)
        refreshed = refresh_decisions(Path(args.run_dir), model)
    cal = info.calibration
    low, high = cal["false_alarm_interval"]
    print(f"{info.name}: threshold {before:.4f} -> {info.threshold:.4f} ({cal['rule']}); false-alarm rate asked "
          f"{cal['false_alarm_rate']:.2%}, guaranteed {cal['guaranteed_rate']:.2%}, 95% interval {low:.2%}-{high:.2%}; "
          f"unknown-product distance {cal['unknown_distance']:.3g}")
    if cal["warning"]:
        print(f"(!) {cal['warning']}")
    print(f"saved {folder}" + ("; decisions in results.json, scores/ and the report updated" if refreshed else ""))
    return 0
