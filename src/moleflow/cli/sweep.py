"""`moleflow sweep`: one full run per point of a sweep over config values and per seed, serially or as Ray
tasks; one table with mean ± std over seeds."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.datasets import load_class, validate_split
from ..errors import MoleflowError
from ..parallel import Parallel, import_ray
from ..store import check_writable, run_lock
from ..store.run import refuse_existing_run
from ..trials import Trial, build_trials, describe, parse_sweep, run_trials, sweep_configurations, write_trials_report
from .common import (add_config_options, add_data_options, add_lock_option, add_runtime_options, apply_runtime,
                     build_config, class_sequence, command_parser, continual_request)

log = logging.getLogger(__name__)

DESCRIPTION = ("Run one full continual run per point of the cartesian product of the --sweep values and per seed, "
               "each in --out/<point>/seed_<s>, and write a table with mean ± std over seeds (trials.md, "
               "trials.json, trials.csv).")

EXAMPLES = """examples:
  # three LoRA ranks x three seeds = 9 runs in runs/sw/model.lora_rank=<r>/seed_<s>, 3 at once on a local Ray
  moleflow sweep --data ../shared/datasets --classes magnetic_tile kolektor cubes \\
      --sweep model.lora_rank=8,16,32 --seeds 0 1 2 --out runs/sw --parallel 3
  # two keys: their cartesian product (4 points), on a Ray cluster (same moleflow and data path on every node)
  moleflow sweep --data /data/mvtec --dataset mvtec --preset main --backbone-weights /models/wrn50.pth \\
      --sweep model.lora_rank=16,64 --sweep train.epochs=20,60 --seeds 0 1 --out runs/mvtec_sw \\
      --parallel 8 --ray-address ray://head:10001
  # after an interruption: the same command plus --resume (finished trials are reused, not run again)
  moleflow sweep ... --out runs/sw --resume
"""


def add_trial_options(p: argparse.ArgumentParser, flag: str = "--parallel") -> None:
    """`flag N` (trials at once on Ray), --ray-address, --cpus-per-trial and --gpus-per-trial."""
    g = p.add_argument_group("trials on Ray (pip install 'moleflow[ray]')")
    g.add_argument(flag, dest="parallel_trials", type=int, metavar="N",
                   help="run the trials (seeds, sweep points, ablations) as Ray tasks, at most N at once "
                        "(default: one after another in this process)")
    try:
        g.add_argument("--ray-address", metavar="ADDR",
                       help="an existing Ray cluster, e.g. ray://HEAD:10001 (default: a local Ray started for "
                            "the run); every node needs the same moleflow install and the data at the same path")
    except argparse.ArgumentError:  # already there (another option of the command uses Ray too)
        pass
    g.add_argument("--cpus-per-trial", type=int, default=1, metavar="C",
                   help="CPUs each Ray trial asks for; it trains with that many torch threads (default 1)")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                   help="GPUs each Ray trial asks for (with --device cuda; default 0)")


def trial_parallel(args: argparse.Namespace, flag: str = "--parallel") -> Parallel | None:
    """How the trials of `args` are spread over Ray, or None (serially, in this process)."""
    if args.parallel_trials is None:
        if args.ray_address and flag == "--parallel":
            raise MoleflowError(f"--ray-address needs {flag} N (how many trials run at once)")
        return None
    if getattr(args, "parallel", None) is not None:
        raise MoleflowError(f"{flag} and --parallel cannot be combined: run the trials on Ray, or the experts "
                            "inside each run, not both")
    if args.parallel_trials < 1:
        raise MoleflowError(f"{flag} {args.parallel_trials}: give at least 1 (trials at once)")
    if args.cpus_per_trial < 1 or args.gpus_per_trial < 0:
        raise MoleflowError(f"--cpus-per-trial {args.cpus_per_trial} / --gpus-per-trial {args.gpus_per_trial}: "
                            "give at least 1 CPU and no negative GPU count")
    if args.gpus_per_trial > 0 and args.device == "cpu":
        raise MoleflowError("--gpus-per-trial needs --device cuda")
    spec = Parallel(args.parallel_trials, args.ray_address, args.cpus_per_trial, args.gpus_per_trial)
    import_ray()  # the install hint now, before any work
    return spec


def refuse_existing(trials: list[Trial], args: argparse.Namespace) -> None:
    """Without --overwrite or --resume, stop if any trial's folder already holds a run."""
    if not (args.overwrite or args.resume):
        for trial in trials:
            refuse_existing_run(trial.run_dir)


def add_parser(sub) -> None:
    p = command_parser(sub, "sweep", "one run per sweep point and seed (optionally on Ray); mean ± std table",
                       EXAMPLES, DESCRIPTION)
    add_data_options(p)
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="config values to try, parsed like --set (repeatable: the cartesian product)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of every point (default: train.seed)")
    add_trial_run_options(p)
    p.set_defaults(run=run)


def add_trial_run_options(p: argparse.ArgumentParser) -> None:
    """What every command running trials takes: --out, --reports, --overwrite/--resume, config, Ray, runtime."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reports", action="store_true", help="also write a full report for every trial")
    add_config_options(p)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="run every trial again, replacing its folder")
    existing.add_argument("--resume", action="store_true",
                          help="reuse finished trials; continue interrupted ones from their learned tasks")
    add_trial_options(p)
    add_runtime_options(p)
    add_lock_option(p)


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    parallel = trial_parallel(args)
    base = build_config(args)
    classes, tasks = class_sequence(args)
    trials = build_trials(base, args.out, sweep_configurations(parse_sweep(args.sweep, base)),
                          args.seeds or [base.train.seed])
    refuse_existing(trials, args)
    check_writable(args.out)
    for c in classes:  # every image readable before any trial starts
        validate_split(load_class(args.data, c, args.dataset))
    request = continual_request(args, base, tasks, args.out, report=args.reports)
    with run_lock(args.out, args.wait, create=True):
        outcomes = run_trials(trials, request, parallel)
        tables = write_trials_report(args.out, outcomes, describe(base, args.data, tasks, outcomes))
    print(tables)
    print(f"\ntable: {args.out / 'trials.md'}")
    return 0
