"""Speed and footprint measurements behind `moleflow bench speed` (targets live in BENCHMARKS.md, not in tests).

Measured on one task of `n_train` generated images of a realistic size (default 640 x 480, resized to
the model's input by the normal preprocessing), or on the first class of a dataset root:
  * preprocessing and backbone feature time per image (batch 32);
  * training: seconds per epoch and per task (feature extraction, training loop, calibration);
  * inference: images/s at batch 32 and single-image latency (median of `latency_runs` after warm-up), with
    the torch engine (`MoleFlow.predict`) or the onnx engine (engine.py: backbone and experts in onnxruntime);
  * peak resident memory (and peak GPU memory on a GPU);
  * bytes and parameters added per task, in memory and on disk.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..detector import MoleFlow


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def generated_images(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """n normal images of a generated textured product at width x height."""
    from ..data.synthetic import generate_product

    side = max(width, height)
    product = generate_product("brick", n, 1, 1, size=side, seed=seed)
    return [Image.fromarray(a).resize((width, height), Image.Resampling.BILINEAR) for a in product.train_images]


def dataset_images(root: Path, n: int) -> tuple[list[Image.Image], str]:
    from ..data.datasets import list_classes, load_class
    from ..data.transforms import load_rgb

    name = list_classes(root, "folder")[0]
    samples = load_class(root, name, "folder").train[:n]
    return [load_rgb(s.image) for s in samples], name


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if platform.system() != "Darwin" else peak / 1024**2


def speed_benchmark(cfg: Config, device: str = "cpu", n_train: int = 300, size: tuple[int, int] = (640, 480),
                    batch_size: int = 32, latency_runs: int = 30, data_root: Path | None = None,
                    precision: str = "fp32", engine: str = "torch", engine_options: dict[str, Any] | None = None,
                    run_dir: Path | None = None) -> dict[str, Any]:
    """Run every measurement once and return them as a JSON-able dict.

    `engine`: "torch" (`MoleFlow.predict`) or "onnx" (engine.OnnxEngine with `engine_options`) for the
    inference rows. `run_dir`: measure inference on that run's model instead of training one (no training rows)."""
    if run_dir is not None:
        model = MoleFlow.load(run_dir, device=device)
        model.precision = precision
        cfg = model.config
    else:
        model = MoleFlow(cfg, device=device, precision=precision)
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_fit = 0 if run_dir is not None else n_train
    if data_root is not None:
        images, source = dataset_images(data_root, n_fit + batch_size)
    else:
        images = generated_images(n_fit + batch_size, *size)
        source = f"generated {size[0]}x{size[1]}"
    train_images, probe_images = images[:n_fit], images[n_fit:]
    probe = model.to_tensor(probe_images)
    model.extract(probe[:4])  # warm-up
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None},
        "config": {"preset": cfg.preset, "backbone": cfg.backbone.name, "embed_dim": model.extractor.embed_dim,
                   "image_size": cfg.data.image_size, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                   "coupling_blocks": cfg.model.num_coupling_blocks, "dia_blocks": cfg.model.dia_blocks,
                   "lora_rank": cfg.model.lora_rank, "precision": precision, "score_source": cfg.score.source,
                   "tiling": cfg.data.tiling},
        "images": source,
        "model": str(run_dir) if run_dir is not None else "trained here",
    }
    if run_dir is None:
        x_train, t_pre = _timed(lambda: model.to_tensor(train_images), torch.device("cpu"))
        _, t_feat = _timed(lambda: model.extract(x_train, batch_size), dev)
        info, t_fit = _timed(lambda: model.fit_task(x_train, name="bench"), dev)
        result.update({
            "n_train": n_train,
            "preprocess_ms_per_image": 1000 * t_pre / n_train,
            "backbone_ms_per_image": 1000 * t_feat / n_train,
            "train": {"task_seconds": t_fit, "loop_seconds": info.train["seconds"],
                      "epoch_seconds": info.train["seconds"] / cfg.train.epochs, "steps": info.train["steps"],
                      "images_trained": info.n_train, "skipped_batches": info.train["skipped_batches"]}})
    result["memory_tokens"] = {str(t): int(getattr(model.memory, f"bank_{t}").shape[0])
                               for t in model.flow.task_ids} if model.memory is not None else None
    result["inference"] = inference_speed(model, probe, probe_images, batch_size, latency_runs, engine,
                                          engine_options or {})
    result["memory"] = {"peak_rss_mb": peak_rss_mb(),
                        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}
    result["per_task"] = _per_task_footprint(model)
    return result


def inference_speed(model: MoleFlow, probe: torch.Tensor, probe_images: list, batch_size: int,
                    latency_runs: int, engine: str = "torch", options: dict[str, Any] | None = None,
                    batch_runs: int = 5) -> dict[str, Any]:
    """Images/s at `batch_size` (preprocessed tensors (B, 3, S, S): median of `batch_runs` batches after a
    warm-up; and decoded images) and single-image latency (median of `latency_runs` after 5 warm-up runs)
    with the torch or onnx engine."""
    from ..data.batch import Prepared
    from ..engine import make_engine

    dev = model.device
    export_seconds = None
    if engine == "torch":  # MoleFlow.predict: the Inspector, with the model's precision
        def run_tensor(x: torch.Tensor):
            return model.predict(x, batch_size=batch_size)

        def run_images(images: list):
            return model.predict(images, batch_size=batch_size)
    else:
        import tempfile

        cache = tempfile.TemporaryDirectory(prefix="moleflow-bench-")
        runner, export_seconds = _timed(lambda: make_engine(model, engine, cache_dir=cache.name,
                                                            batch_size=batch_size, **(options or {})), dev)

        def run_tensor(x: torch.Tensor):
            return runner.inspect(Prepared.square(x))

        def run_images(images: list):
            return runner.inspect(model.prepare(images))
    run_tensor(probe)  # warm-up
    # the median of several batches: one timed batch right after the warm-up was noisy (onnxruntime settles
    # its arenas over the first runs of a new batch shape)
    batch_times = [_timed(lambda: run_tensor(probe), dev)[1] for _ in range(batch_runs)]
    t_batch = statistics.median(batch_times)
    single = probe[:1]
    for _ in range(5):
        run_tensor(single)
    latencies = [_timed(lambda: run_tensor(single), dev)[1] for _ in range(latency_runs)]
    _, t_e2e = _timed(lambda: run_images(probe_images), dev)
    return {"engine": engine, "engine_options": dict(options or {}), "export_seconds": export_seconds,
            "batch_size": batch_size, "images_per_second": len(probe) / t_batch, "batch_runs": batch_runs,
            "images_per_second_best": len(probe) / min(batch_times),
            "images_per_second_from_decoded_images": len(probe) / t_e2e,
            "single_image_latency_ms_median": 1000 * statistics.median(latencies),
            "single_image_latency_ms_p90": 1000 * float(np.percentile(latencies, 90)),
            "latency_runs": latency_runs}


def _per_task_footprint(model: MoleFlow) -> dict[str, Any]:
    """Parameters and bytes of the last learned task: in memory, and its expert file in the checkpoint."""
    from safetensors.torch import save as st_save

    task = model.flow.task_ids[-1]
    params = sum(p.numel() for p in model.flow.task_parameters(task))
    mean, precision = model.router.prototype(task)
    router_bytes = (mean.numel() + precision.numel()) * mean.element_size()
    parts = model.inspector.state_by_part()
    state = {**parts[f"task{task}"], **parts[f"task{task}-calibration"]}
    return {"parameters": params, "parameter_bytes": params * 4, "router_bytes": router_bytes,
            "checkpoint_bytes": len(st_save({k: v.contiguous() for k, v in state.items()}))}
