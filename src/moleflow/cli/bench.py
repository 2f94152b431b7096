"""`moleflow bench`: speed/footprint measurements and the real-data continual benchmark."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import MoleflowError
from ..evaluation import save_json
from .common import add_config_options, apply_runtime, build_config

EXAMPLES = """examples:
  moleflow bench speed --preset cpu --json benchmarks/results/speed_cpu.json
  moleflow bench speed --preset main --backbone-random --device cuda --json speed_gpu.json
  moleflow bench real --data ../shared/datasets --out runs/bench_real --json benchmarks/results/real_offline.json
"""
REAL_SEQUENCE = ["magnetic_tile", "kolektor", "pcb_deeppcb", "cubes"]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed and real-data benchmarks", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    speed = kinds.add_parser("speed", help="training/inference speed, latency, memory, bytes per task",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(speed)
    speed.add_argument("--backbone-random", action="store_true",
                       help="random backbone weights (timing only; e.g. wide_resnet50_2 without a weights file)")
    speed.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    speed.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="inference precision")
    speed.add_argument("--threads", type=int, help="CPU threads")
    speed.add_argument("--n-train", type=int, default=300)
    speed.add_argument("--batch-size", type=int, default=32)
    speed.add_argument("--latency-runs", type=int, default=30)
    speed.add_argument("--data", type=Path, help="use the first class of this dataset root instead of generated images")
    speed.add_argument("--json", type=Path, required=True, help="output JSON")
    speed.set_defaults(run=run_speed)

    real = kinds.add_parser("real", help="continual run magnetic_tile -> kolektor -> pcb_deeppcb -> cubes",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(real)
    real.add_argument("--data", type=Path, required=True, help="folder holding the four shared datasets")
    real.add_argument("--classes", nargs="+", default=REAL_SEQUENCE)
    real.add_argument("--out", type=Path, required=True, help="run directory")
    real.add_argument("--json", type=Path, required=True, help="benchmark JSON")
    real.add_argument("--device", default="cpu")
    real.add_argument("--threads", type=int)
    real.set_defaults(run=run_real)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def run_speed(args: argparse.Namespace) -> int:
    from ..benchmark import speed_benchmark

    apply_runtime(args)
    cfg = build_config(args)
    if args.backbone_random:
        cfg = cfg.with_overrides({"backbone.random_weights": True})
    result = speed_benchmark(cfg, device=args.device, n_train=args.n_train, batch_size=args.batch_size,
                             latency_runs=args.latency_runs, data_root=args.data, precision=args.precision)
    result["command"] = "moleflow " + " ".join(__import__("sys").argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, result)
    print(json.dumps(result, indent=1))
    return 0


def run_real(args: argparse.Namespace) -> int:
    from .train import print_final_table, train_one

    apply_runtime(args)
    missing = [c for c in args.classes if not (args.data / c / "train").is_dir()]
    if missing:
        raise MoleflowError(f"{args.data}: missing {', '.join(missing)}; the real benchmark needs the shared datasets")
    cfg = build_config(args)
    train_args = argparse.Namespace(data=args.data, dataset="folder", scenario="1-1", no_report=False,
                                    no_progress=True, batch_size=32, workers=0, device=args.device)
    start = time.perf_counter()
    results = train_one(train_args, cfg, args.out, list(args.classes), [[c] for c in args.classes])
    wall = time.perf_counter() - start
    bench = {"command": "moleflow " + " ".join(__import__("sys").argv[1:]), "sequence": args.classes,
             "preset": cfg.preset, "backbone": cfg.backbone.name, "feature_cache": cfg.train.feature_cache,
             "final": results["final"], "final_mean": results["final_mean"], "oracle_mean": results["oracle_mean"],
             "continual": results["continual"], "routing_confusion": results["routing_confusion"],
             "train_seconds_per_task": dict(zip(args.classes, results["timing"]["train_seconds"])),
             "eval_seconds": results["timing"]["eval_seconds"], "wall_seconds": wall,
             "environment": results.get("environment")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, bench)
    print_final_table(results)
    print(f"wall time {wall:.0f} s; JSON: {args.json}")
    return 0
