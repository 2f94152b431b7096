"""`moleflow train`: learn classes one after another and evaluate after every task."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Config
from ..continual import run_continual
from ..data.datasets import load_class, validate_split
from ..errors import MoleflowError
from ..metrics import METRICS
from ..store import check_writable, run_lock
from ..store.run import refuse_existing_run, save_json
from ..trials import Configuration, build_trials, describe, run_trials, seed_statistics, write_trials_report
from .common import (add_config_options, add_data_options, add_lock_option, add_parallel_options, add_rate_option,
                     add_runtime_options, apply_runtime, build_config, class_sequence, command_parser,
                     continual_request, format_table, parse_rates, pct)
from .sweep import add_trial_options, trial_parallel

log = logging.getLogger(__name__)

DESCRIPTION = ("Learn the classes of a dataset as a continual sequence of tasks, evaluate every learned class after "
               "each task with the router (task-agnostic), and write a checkpoint, per-step metric matrices and a "
               "report into --out.")

EXAMPLES = """examples:
  # the four real sets in ../shared/datasets, one after another, offline backbone
  moleflow train --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes --out runs/real
  # MVTec AD with the paper's MAIN configuration (needs WideResNet-50-2 weights)
  moleflow train --data /data/mvtec --dataset mvtec --preset main --backbone-weights wrn50.pth --out runs/mvtec
  # continue a run that was interrupted after some tasks (same command plus --resume)
  moleflow train --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes --out runs/real --resume
  # the four products learned in one step (each keeps its own expert), or with their names hidden
  moleflow train --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes --scenario 4-4 --out runs/s44
  moleflow train --data ../shared/datasets --classes magnetic_tile kolektor pcb_deeppcb cubes --scenario 4-4 --discover --out runs/d44
  # 15 classes: the first learns the shared flow, then 14 experts train 4 at a time on a local Ray
  moleflow train --data /data/mvtec --dataset mvtec --parallel 4 --out runs/mvtec_ray
  # three seeds, 5-5 scenario, 20 epochs
  moleflow train --data /data/mvtec --dataset mvtec --scenario 5-5 --seeds 0 1 2 --set train.epochs=20 --out runs/s55
"""


def add_parser(sub) -> None:
    p = command_parser(sub, "train", "learn classes one after another; evaluate after every task",
                       EXAMPLES, DESCRIPTION)
    add_data_options(p)
    p.add_argument("--discover", type=int, nargs="?", const=10, metavar="MAX_PRODUCTS",
                   help="pool each step's training images WITHOUT their class names and find the products "
                        "(at most MAX_PRODUCTS, default 10) by clustering; one expert per product found. The "
                        "names are used only to score the discovery (purity) and the routing")
    p.add_argument("--seeds", type=int, nargs="+", help="run once per seed (mean and std are reported)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="--out holds a run: delete its outputs (model, results, report) and start again")
    existing.add_argument("--resume", action="store_true",
                          help="--out holds an unfinished run: keep its learned tasks, learn the rest (same config)")
    add_rate_option(p)
    add_config_options(p)
    add_runtime_options(p)
    add_parallel_options(p)
    add_trial_options(p, "--parallel-trials")  # the seeds as Ray tasks (--parallel: experts inside one run)
    add_lock_option(p)
    p.set_defaults(run=run)


def print_final_table(results: dict) -> None:
    """The final metrics per class and their mean (%), the routing gap to the oracle, I-AUROC per defect type."""
    header = ["class"] + [m.header for m in METRICS.values()]
    rows = [[c] + [pct(v.get(k)) for k in METRICS] for c, v in results["final"].items()]
    rows.append(["mean"] + [pct(results["final_mean"].get(k)) for k in METRICS])
    print(format_table(rows, header))
    gap = results["final_mean"]["image_auroc"], results["oracle_mean"]["image_auroc"]
    if None not in gap:
        print(f"oracle (true task given) mean I-AUROC {pct(gap[1])}; routed - oracle = {100 * (gap[0] - gap[1]):+.2f}")
    lines = defect_type_lines(results["final"])
    if lines:
        print("I-AUROC (%) per defect type, (n) = anomalous images:")
        print("\n".join(lines))


def defect_type_lines(final: dict[str, dict]) -> list[str]:
    """"  class: type 71.2 (115), ..." for each class with more than one defect type (one type = its I-AUROC)."""
    lines = []
    for c, v in final.items():
        per_type, counts = v.get("per_defect_image_auroc") or {}, v.get("per_defect_count") or {}
        if len(per_type) > 1:
            lines.append(f"  {c}: " + ", ".join(f"{t} {pct(a)} ({counts.get(t, '?')})" for t, a in per_type.items()))
    return lines


def train_one(args: argparse.Namespace, cfg, run_dir: Path, classes: list[str], tasks: list[list[str]]) -> dict:
    """One continual run of `tasks` (covering `classes`) with `cfg` into `run_dir`, as the options of `args` ask
    (`continual.run_continual`); used by `moleflow demo` and `moleflow bench real`."""
    return run_continual(continual_request(args, cfg, tasks, run_dir, report=not args.no_report))


def summarise_seeds(out: Path, seeds: list[int], runs: list[dict]) -> dict:
    """summary.json: per metric, mean ± std (ddof=1) over the seeds' final means."""
    summary = {"seeds": seeds, "runs": [str(out / f"seed_{s}") for s in seeds], "final_mean": seed_statistics(runs)}
    save_json(out / "summary.json", summary)
    return summary


def run(args: argparse.Namespace) -> int:
    apply_runtime(args)
    cfg = build_config(args)
    default_rate, per_product = parse_rates(args.false_alarm_rate)
    if default_rate is not None:
        cfg = cfg.with_overrides({"score.false_alarm_rate": default_rate})
    classes, tasks = class_sequence(args)
    unknown = sorted(set(per_product) - set(classes))
    if unknown:
        raise MoleflowError(f"--false-alarm-rate names {', '.join(unknown)}, which is not among the classes "
                            f"({', '.join(classes)})")
    if args.discover is not None and (args.discover < 1 or per_product):
        raise MoleflowError("--discover needs MAX_PRODUCTS >= 1 and one --false-alarm-rate for all products "
                            "(products found by discovery have no names to give rates to)")
    seeds = args.seeds or [cfg.train.seed]
    if not (args.overwrite or args.resume):  # refuse before any work, and before taking the lock
        for seed in seeds:
            refuse_existing_run(args.out if len(seeds) == 1 else args.out / f"seed_{seed}")
    check_writable(args.out)
    for c in classes:  # every train and test image and mask readable before any training starts
        validate_split(load_class(args.data, c, args.dataset))
    with run_lock(args.out, args.wait, create=True):
        return _run(args, cfg, tasks, seeds)


def _run(args: argparse.Namespace, cfg: Config, tasks: list[list[str]], seeds: list[int]) -> int:
    """One trial per seed (`moleflow.trials`): serially, or as Ray tasks with --parallel-trials."""
    parallel = trial_parallel(args, "--parallel-trials")
    trials = build_trials(cfg, args.out, [Configuration("base", {}, "")], seeds)
    request = continual_request(args, cfg, tasks, args.out, report=not args.no_report)
    log.info("%s: %d tasks, preset %s, backbone %s", ", ".join(str(t.run_dir) for t in trials), len(tasks),
             cfg.preset, cfg.backbone.name)

    def show(outcome) -> None:
        size, reused = cfg.data.image_size, " (reused: finished before)" if outcome.status == "reused" else ""
        print(f"\nseed {outcome.trial.seed}: final results after {len(tasks)} tasks (%, router on; pixel metrics "
              f"on whole images at {size}x{size}{', tiled' if cfg.data.tiling != 'none' else ''}){reused}")
        print_final_table(outcome.results)

    outcomes = run_trials(trials, request, parallel, on_done=show)
    runs = [o.results for o in outcomes]
    if len(seeds) > 1:
        write_trials_report(args.out, outcomes, describe(cfg, args.data, tasks, outcomes))
        summary = summarise_seeds(args.out, seeds, runs)
        print(f"\nmean ± std over seeds {seeds}:")
        for key, v in summary["final_mean"].items():
            if v:
                print(f"  {key:18s} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}")
    report = args.out / ("report.html" if len(seeds) == 1 else f"seed_{seeds[0]}/report.html")
    if not args.no_report:
        print(f"\nreport: {report}")
    return 0
