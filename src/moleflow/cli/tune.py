"""`moleflow tune`: choose a configuration on synthetic anomalies in held-out training normals."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..continual import learn_and_evaluate, run_meta
from ..data.datasets import load_class
from ..data.synthetic_anomalies import ANOMALY_SETS
from ..detector import MoleFlow
from ..errors import MoleflowError
from ..store.run import save_json, write_config
from ..metrics import METRICS
from ..tuning import CANDIDATES, DEFAULT_ANOMALIES, VALIDATION_METRICS, Candidate, parse_candidate, tune
from .common import (add_config_options, add_data_options, add_runtime_options, apply_runtime, build_config,
                     class_sequence, format_table)

EXAMPLES = """examples:
  # compare the default candidates on the four shared sets (never reads their test images)
  moleflow tune --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes --out runs/tune
  # then train the chosen configuration
  moleflow train --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes \\
      --config runs/tune/chosen.yaml --out runs/tuned
  # your own candidates (name:overrides), built on --preset
  moleflow tune --data DATA --out runs/t --candidate e12:train.epochs=12 --candidate e24:train.epochs=24
"""


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="choose settings on synthetic anomalies in held-out training images",
                       description="Hold out part of each product's normal training images, paste synthetic "
                                   "anomalies (with exact masks) into copies of them, learn the products one after "
                                   "another with every candidate configuration, and choose the candidate with the "
                                   "best synthetic image + pixel AUROC. Test images are never read.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="a candidate as overrides of --preset (repeatable); default: the built-in candidates "
                        f"{', '.join(CANDIDATES)} on the cpu preset")
    p.add_argument("--holdout", type=float, default=0.2, help="share of training images held out (default 0.2)")
    p.add_argument("--max-train", type=int, default=300,
                   help="use at most this many training images per product (default 300; 0 = all)")
    p.add_argument("--anomalies", choices=sorted(ANOMALY_SETS), default=DEFAULT_ANOMALIES,
                   help="the synthetic anomalies pasted into the held-out images: faint (drawn defects and cut-paste "
                        "at a low contrast; default: it ranks settings most like real defects, docs/accuracy.md "
                        "§14), painted (the same at a higher contrast) or subtle (texture-preserving blends, "
                        "shifts and tints in irregular blobs)")
    add_config_options(p)
    add_runtime_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    if not 0.0 < args.holdout < 0.9:
        raise MoleflowError(f"--holdout {args.holdout}: must be in (0, 0.9)")
    base = build_config(args)
    if args.candidate:
        candidates = [parse_candidate(c, base) for c in args.candidate]
    else:
        candidates = [Candidate(name, Config.from_preset("cpu").with_overrides(o)) for name, o in CANDIDATES.items()]
    _, tasks = class_sequence(args)

    def run_candidate(cand: Candidate, load_split, run_dir: Path) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir / "config.yaml", cand.config)
        model = MoleFlow(cand.config, device=args.device)
        meta = run_meta(cand.config, {"candidate": cand.name, "dataset": {"root": str(args.data), "validation":
                                                                          "synthetic anomalies in held-out normals"}})
        return learn_and_evaluate(model, load_split, tasks, run_dir, meta, progress=not args.no_progress,
                                  batch_size=args.batch_size, num_workers=args.workers, examples_per_kind=0)

    result = tune(candidates, lambda c: load_class(args.data, c, args.dataset), tasks, args.out, run_candidate,
                  holdout=args.holdout, max_train=args.max_train or None, seed=base.train.seed,
                  anomalies=args.anomalies, group_file=base.data.group_file)
    save_json(args.out / "tune.json", result)
    chosen = next(c for c in candidates if c.name == result["chosen"])
    write_config(args.out / "chosen.yaml", chosen.config)
    rows = [[r["name"], f"{100 * r['validation_score']:.2f}"]
            + [f"{100 * (r['validation_mean'][key] or 0):.1f}" for key in VALIDATION_METRICS] + [f"{r['seconds']:.0f}"]
            for r in result["candidates"]]
    headers = ["candidate", "score"] + [f"syn {METRICS[key].header}" for key in VALIDATION_METRICS] + ["seconds"]
    print(format_table(rows, headers))
    print(f"chosen: {result['chosen']}  ->  {args.out / 'chosen.yaml'}")
    return 0
