"""`moleflow calibrate`: re-calibrate products' thresholds from more good parts, without retraining: good parts
given as files (--normals), or the parts people reviewed as good on the line (--from-reviews)."""

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
  moleflow calibrate runs/real --from-reviews                       # every product with good parts reviewed
  moleflow calibrate runs/real --from-reviews --product cubes --since 2025-03-01 --replace   # after a change
The new good parts' scores are pooled with the product's existing calibration scores (--replace: used
alone) and the threshold is the conformal rule over them (README: "Decisions and thresholds"). Only the
products' calibration files and the manifest change; their experts and every other product stay
bit-identical. The previous threshold is kept in the product's calibration history (`moleflow tasks RUN --json`).

--from-reviews takes, per product, the parts of the audit sample (the passed parts the review queue samples at
--audit-rate, and the flagged parts the same hash picks) that a person reviewed as good (false_alarm or
good_confirmed), re-scored from their image files (a part whose file is gone or changed is left out and
counted). Reviewed false alarms outside the audit sample are not used: all flagged parts are reviewed but only
a sample of the passed ones, so they would over-weight high scores (README "On the line", feedback.py).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="re-calibrate thresholds from more good parts (files, or reviewed parts)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--product", help="task name (see `moleflow tasks`); required with --normals; with "
                                     "--from-reviews only this product (default: every product with reviewed good parts)")
    p.add_argument("--normals", nargs="+", help="good images of the product: files, folders, globs")
    p.add_argument("--from-reviews", action="store_true",
                   help="use the parts of the audit sample reviewed as good in the verdict store")
    p.add_argument("--store", metavar="URL|FILE", help="with --from-reviews: the verdict store (default "
                                                       "RUN_DIR/verdicts.sqlite)")
    p.add_argument("--audit-rate", type=float, default=None,
                   help="with --from-reviews: the audit rate the review queue used (`serve --audit-rate`, default 0.05)")
    p.add_argument("--since", help="with --from-reviews: only parts inspected at or after this time (ISO 8601)")
    p.add_argument("--until", help="with --from-reviews: only parts inspected before this time")
    p.add_argument("--false-alarm-rate", type=parse_rate, help="the rate to guarantee (default: the product's)")
    p.add_argument("--replace", action="store_true",
                   help="calibrate on the new good parts only (e.g. after a camera change)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    p.add_argument("--no-progress", action="store_true")
    add_lock_option(p)
    p.set_defaults(run=run)


def _load_all(paths: list[Path]) -> list:
    images, bad = [], []
    for path in paths:  # every good part must be readable: a silent skip would change the guarantee
        try:
            images.append(load_rgb(path))
        except MoleflowError as exc:
            bad.append(str(exc))
    if bad:
        raise MoleflowError(f"{bad[0]}" + (f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""))
    return images


def recalibrate_run(args: argparse.Namespace, model: MoleFlow, normals: dict[str, list]) -> None:
    """Re-calibrate each product of `normals` (name -> good images) with `MoleFlow.recalibrate`, save the run
    once and refresh its stored decisions (the caller holds the run's lock)."""
    changes = []
    for name, images in normals.items():
        before = model.task_by_name(name).threshold
        info = model.recalibrate(name, images, args.false_alarm_rate, replace=args.replace)
        changes.append((info, before))
    folder = model.save(args.run_dir)
    refreshed = refresh_decisions(Path(args.run_dir), model)
    for info, before in changes:
        cal = info.calibration
        low, high = cal["false_alarm_interval"]
        print(f"{info.name}: threshold {before:.4f} -> {info.threshold:.4f} ({cal['rule']}); false-alarm rate asked "
              f"{cal['false_alarm_rate']:.2%}, guaranteed {cal['guaranteed_rate']:.2%}, 95% interval "
              f"{low:.2%}-{high:.2%}; unknown-product distance {cal['unknown_distance']:.3g}")
        if cal["warning"]:
            print(f"(!) {cal['warning']}")
    print(f"saved {folder}" + ("; decisions in results.json, scores/ and the report updated" if refreshed else ""))


def run(args: argparse.Namespace) -> int:
    if args.from_reviews:
        if args.normals:
            raise MoleflowError("give either --normals (good images) or --from-reviews (reviewed parts), not both")
        return _from_reviews(args)
    if args.store or args.audit_rate is not None or args.since or args.until:
        raise MoleflowError("--store, --audit-rate, --since and --until go with --from-reviews")
    if not args.normals or not args.product:
        raise MoleflowError("give --product and --normals (good images of it), or --from-reviews")
    images = _load_all(expand_inputs(args.normals))
    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        model.task_by_name(args.product)
        recalibrate_run(args, model, {args.product: images})
    return 0


def _from_reviews(args: argparse.Namespace) -> int:
    from ..feedback import AUDIT_RATE, calibration_parts, check_rate, image_of
    from ..store.verdicts import VerdictStore

    rate = check_rate(AUDIT_RATE if args.audit_rate is None else args.audit_rate)
    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        names = [model.task_by_name(args.product).name] if args.product else [t.name for t in model.tasks]
        normals: dict[str, list] = {}
        with VerdictStore.open(args.store, run_dir=args.run_dir) as store:
            print(f"reviews from {store.name}; audit sample at {rate:.1%}")
            for name in names:
                rows, counts = calibration_parts(store, name, rate, since=args.since, until=args.until)
                paths = [image_of(r) for r in rows]
                found = [p for p in paths if p is not None]
                print(f"{name}: {counts['audit']} parts in the audit sample, {counts['reviewed']} reviewed, "
                      f"{counts['good']} good" + (f", {len(rows) - len(found)} of them without their image file "
                                                   "(gone or changed; left out)" if len(found) < len(rows) else ""))
                if counts["unreviewed"]:
                    print(f"(!) {name}: {counts['unreviewed']} parts of the audit sample are not reviewed yet; the "
                          "guarantee holds for the line once the sample is reviewed completely")
                if counts["false_alarms_outside"]:
                    print(f"    {counts['false_alarms_outside']} reviewed false alarms outside the audit sample are "
                          "not used (they would over-weight high scores)")
                if found:
                    normals[name] = _load_all(found)
        if not normals:
            raise MoleflowError("no product has good parts reviewed in its audit sample with their image files; "
                                "review the queue (GET /reviews/queue, the review page) first")
        recalibrate_run(args, model, normals)
    return 0
