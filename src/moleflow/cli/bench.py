"""`moleflow bench`: speed/footprint measurements, how cost grows with the number of products, and the real-data
continual benchmark."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import MoleflowError
from ..store.run import save_json
from .common import add_config_options, apply_runtime, build_config, command_parser

EXAMPLES = """examples:
  moleflow bench speed --preset cpu --json benchmarks/results/speed_cpu.json
  moleflow bench speed --preset main --backbone-random --device cuda --json speed_gpu.json
  moleflow bench speed --preset cpu --engine onnx --json benchmarks/results/speed_cpu_onnx.json
  moleflow bench speed --run runs/real --engine onnx --quantize int8 --json speed_int8.json   # no training
  moleflow bench serve runs/real --clients 1 4 16 --json benchmarks/results/serve_cpu.json
  moleflow bench real --data ../shared/datasets --out runs/bench_real --json benchmarks/results/real_offline.json
  moleflow bench scale --counts 1 10 50 100 --preset tiny --out runs/scale --json benchmarks/results/scale_tiny.json
  moleflow bench memory --sizes 500 5000 --preset tiny --set train.epochs=1 --set train.min_steps=0 --workers 2 \
      --threads 1 --json benchmarks/results/memory_tiny.json
"""
REAL_SEQUENCE = ["magnetic_tile", "kolektor", "pcb_deeppcb", "cubes"]


def add_parser(sub) -> None:
    p = command_parser(sub, "bench", "speed and real-data benchmarks", EXAMPLES)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    _add_speed(kinds)
    _add_serve(kinds)
    _add_real(kinds)
    _add_scale(kinds)
    _add_memory(kinds)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def _int_options(p: argparse.ArgumentParser, options: tuple[tuple[str, int | None, str], ...]) -> None:
    """Whole-number options: (flag, default, help) each."""
    for flag, default, help_text in options:
        p.add_argument(flag, type=int, default=default, help=help_text)


def _finish(p: argparse.ArgumentParser, run, json_help: str = "output JSON") -> None:
    """Every kind: --threads, the required --json output and the function that runs it."""
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", type=Path, required=True, help=json_help)
    p.set_defaults(run=run)


def _preset_options(p: argparse.ArgumentParser, set_help: str) -> None:
    """The small-model kinds (scale, memory): a preset (default tiny) and --set overrides."""
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _add_speed(kinds) -> None:
    speed = command_parser(kinds, "speed", "training/inference speed, latency, memory, bytes per task", EXAMPLES)
    add_config_options(speed)
    speed.add_argument("--backbone-random", action="store_true",
                       help="random backbone weights (timing only; e.g. wide_resnet50_2 without a weights file)")
    speed.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    speed.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="inference precision")
    _int_options(speed, (("--n-train", 300, "training images (default 300)"),
                         ("--batch-size", 32, "images per inference batch (default 32)"),
                         ("--latency-runs", 30, "single-image latencies timed (default 30)")))
    speed.add_argument("--data", type=Path, help="use the first class of this dataset root instead of generated images")
    speed.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                       help="inference engine: torch (MoleFlow.predict) or onnx (onnxruntime; see engine.py)")
    speed.add_argument("--optimization", default="all", choices=["disable", "basic", "extended", "all"],
                       help="onnxruntime graph optimisation level (onnx engine)")
    speed.add_argument("--quantize", default="none", choices=["none", "int8"],
                       help="onnx engine: dynamic int8 weights for the backbone graph (measured slower and less "
                            "exact on x86 CPUs, see BENCHMARKS.md; not offered by predict or serve)")
    speed.add_argument("--run", type=Path, dest="run_dir",
                       help="measure inference on this run's model (no training measurements)")
    _finish(speed, run_speed)


def _add_serve(kinds) -> None:
    serve = command_parser(kinds, "serve", "load test of `moleflow serve`: requests/s, p50/p99 latency", EXAMPLES,
                           "Start `moleflow serve RUN_DIR` on a free loopback port and send it POST /predict "
                           "requests (one PNG each) from 1, 4 and 16 concurrent httpx clients.")
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or its model folder)")
    serve.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    serve.add_argument("--requests", type=int, default=200, help="requests per level (default 200)")
    serve.add_argument("--images", type=Path, help="folder of images to send (default: 16 generated 640x480 PNGs)")
    serve.add_argument("--serve-args", default="", metavar="'ARGS'",
                       help="more `moleflow serve` options, written with '=' since they start with '-': "
                            "--serve-args='--engine torch --max-batch 8' or --serve-args=--no-store")
    _finish(serve, run_serve)


def _add_real(kinds) -> None:
    real = command_parser(kinds, "real", "continual run magnetic_tile -> kolektor -> pcb_deeppcb -> cubes", EXAMPLES)
    add_config_options(real)
    real.add_argument("--data", type=Path, required=True, help="folder holding the four shared datasets")
    real.add_argument("--classes", nargs="+", default=REAL_SEQUENCE)
    real.add_argument("--out", type=Path, required=True, help="run directory")
    real.add_argument("--device", default="cpu")
    _finish(real, run_real, "benchmark JSON")


def _add_scale(kinds) -> None:
    scale = command_parser(kinds, "scale", "checkpoint size, load, routing and predict time, memory at 1..100 tasks",
                           EXAMPLES, "Learn generated products one after another into one model and measure, at "
                           "each task count, the checkpoint size, load time, routing and predict time of a mixed "
                           "batch, resident memory and the time to add a task (bench/scale.py).")
    scale.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50, 100],
                       help="task counts to measure at, increasing (default 1 10 50 100; at most 105)")
    _preset_options(scale, "config override on top of the preset and the benchmark's cheap training "
                           "(train.epochs=2, train.min_steps=0)")
    _int_options(scale, (("--n-train", 12, "generated normal images per product (default 12)"),
                         ("--heldout", 3, "held-out generated normals per product for routing accuracy (default 3)"),
                         ("--load-runs", 3, "loads timed per count (median; default 3)"),
                         ("--predict-runs", 5, "predict batches timed per count (median; default 5)")))
    scale.add_argument("--out", type=Path, required=True, help="run directory for the model (must hold no model)")
    _finish(scale, run_scale)


def _add_memory(kinds) -> None:
    memory = command_parser(kinds, "memory", "peak memory and time per image of learning one task of N images",
                            EXAMPLES, "Write generated PNGs to --images and learn one task of each size in a fresh "
                            "process (bench/memory.py): peak RSS, feature-cache bytes, seconds per image.")
    memory.add_argument("--sizes", type=int, nargs="+", default=[500, 5000], help="task sizes (default 500 5000)")
    _preset_options(memory, "config override (repeatable)")
    _int_options(memory, (("--workers", 2, "image-loading worker processes (default 2)"),
                          ("--image-size", 224, "generated image size in px (default 224)")))
    memory.add_argument("--images", type=Path, default=Path("bench_memory_images"),
                        help="folder for the generated images (reused when already there)")
    _finish(memory, run_memory)


def run_speed(args: argparse.Namespace) -> int:
    from ..bench.speed import speed_benchmark

    apply_runtime(args)
    cfg = build_config(args)
    if args.backbone_random:
        cfg = cfg.with_overrides({"backbone.random_weights": True})
    options = {}
    if args.engine == "onnx":
        options = {"threads": args.threads, "optimization": args.optimization, "quantize": args.quantize}
    elif args.quantize != "none":
        raise MoleflowError("--quantize needs --engine onnx")
    result = speed_benchmark(cfg, device=args.device, n_train=args.n_train, batch_size=args.batch_size,
                             latency_runs=args.latency_runs, data_root=args.data, precision=args.precision,
                             engine=args.engine, engine_options=options, run_dir=args.run_dir)
    result["command"] = "moleflow " + " ".join(__import__("sys").argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, result)
    print(json.dumps(result, indent=1))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import shlex

    from ..bench.speed import generated_images
    from ..bench.serving import free_port, load_level, png_bytes, start_server, stop_server
    from ..store.checkpoint import find_model

    find_model(args.run_dir)
    if args.images:
        from .predict import expand_inputs
        from ..data.transforms import load_rgb

        images = [load_rgb(p) for p in expand_inputs([str(args.images)])[:64]]
        source = str(args.images)
    else:
        images, source = generated_images(16, 640, 480, seed=7), "16 generated 640x480 PNGs"
    bodies = png_bytes(images)
    serve_args = [str(args.run_dir), *shlex.split(args.serve_args)]
    port = free_port()
    start = time.perf_counter()
    server = start_server(serve_args, port)
    startup = time.perf_counter() - start
    try:
        levels = []
        for clients in args.clients:
            level = load_level(f"http://127.0.0.1:{port}", bodies, clients, args.requests)
            levels.append(level)
            print(f"{clients:3d} clients: {level['requests_per_second']:6.1f} requests/s, p50 "
                  f"{level['latency_ms_p50']:6.1f} ms, p99 {level['latency_ms_p99']:6.1f} ms, mean batch "
                  f"{level['mean_batch_size']:.1f}")
    finally:
        stop_server(server)
    import os
    import platform

    result = {"command": "moleflow " + " ".join(__import__("sys").argv[1:]), "serve_args": serve_args,
              "images": source, "image_bytes_mean": sum(map(len, bodies)) / len(bodies),
              "startup_seconds": startup, "levels": levels,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, result)
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


def run_scale(args: argparse.Namespace) -> int:
    from ..bench.scale import run_scale as scale_benchmark

    result = scale_benchmark(args.counts, args.preset, args.n_train, args.out, args.threads, overrides=args.overrides,
                             n_heldout=args.heldout, load_runs=args.load_runs, predict_runs=args.predict_runs)
    result["command"] = "moleflow " + " ".join(__import__("sys").argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, result)
    print(f"wall time {result['wall_seconds']:.0f} s; JSON: {args.json}")
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from ..bench.memory import run_memory as memory_benchmark

    result = memory_benchmark(args.sizes, args.images, args.preset, args.overrides, args.workers, args.threads,
                              args.image_size)
    result["command"] = "moleflow " + " ".join(__import__("sys").argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.json, result)
    for row in result["rows"]:
        print(f"{row['n_images']:6d} images: peak RSS {row['peak_rss_bytes'] / 1e6:7.0f} MB, feature cache "
              f"{row['cache_bytes'] / 1e6:6.0f} MB, peak - cache {row['peak_minus_cache_bytes'] / 1e6:7.0f} MB, "
              f"{1000 * row['seconds_per_image']:.1f} ms per image")
    return 0
