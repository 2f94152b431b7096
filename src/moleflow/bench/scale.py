"""How cost grows with the number of learned products: the measurements behind `moleflow bench scale`.

One model learns generated products one after another (1 -> 10 -> 50 -> 100: always adding to the same
model, so each product is learned once). At each count T of `counts` the model is saved to OUT/model (only
the new experts' files are written) and measured:

  * checkpoint: bytes of the model folder, of its manifest, of the shared flow and of one expert (the last
    learned task's `task<t>` + `task<t>-calibration` files); seconds of the save that adds the T-th task to
    the folder holding the first T - 1;
  * add a task: seconds of `MoleFlow.fit_task` for the T-th product (feature extraction, training,
    prototype, calibration; image generation not included);
  * in a fresh Python process (`probe_checkpoint`, run as `python -m moleflow.bench.scale`), so that memory
    and load time are those of a process that only serves the model:
      - `MoleFlow.load` (backbone built + every file read and SHA-256 checked), median of `load_runs`, and
        the file reading + hashing alone (`store.checkpoint.read_model`);
      - resident memory: VmRSS right after the first load, and the peak RSS (ru_maxrss) after all measurements;
      - routing alone: `model.inspector.router(features)` on precomputed routing features (32, D) of the batch
        (Mahalanobis distance to each of the T prototypes, argmin, unknown-product check), median of repeats;
      - `model.predict(images)` (torch engine, decoded uint8 images, preprocessing included) on one batch of 32
        images of min(32, T) different products, and for comparison on 32 images of a single product;
      - routing accuracy: the share of `n_heldout` held-out generated normals per product routed to their own
        product.

Generated products (`scale_products`): the 15 pictures of `data.synthetic.PRODUCTS`, each in up to 7 colour
variants (channel order and gains, or inverted), so up to 105 distinct products.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .speed import peak_rss_mb
from ..config import Config
from ..errors import MoleflowError

# Settings that keep every task cheap, applied on top of the preset (and under the caller's overrides).
SCALE_DEFAULTS: dict[str, Any] = {"train.epochs": 2, "train.min_steps": 0}
BATCH = 32  # images in the mixed predict batch

# colour variants of a source picture: (channel order, per-channel gain, inverted)
_VARIANTS: tuple[tuple[tuple[int, int, int], tuple[float, float, float], bool], ...] = (
    ((0, 1, 2), (1.0, 1.0, 1.0), False),
    ((1, 2, 0), (1.0, 0.75, 0.55), False),
    ((2, 0, 1), (0.55, 0.8, 1.0), False),
    ((0, 2, 1), (0.7, 1.0, 0.6), False),
    ((2, 1, 0), (1.0, 0.6, 0.9), False),
    ((1, 0, 2), (0.9, 0.9, 0.5), False),
    ((0, 1, 2), (1.0, 1.0, 1.0), True),
)


@dataclass(frozen=True)
class ScaleProduct:
    """A generated product: source picture `base` of `data.synthetic.PRODUCTS` in colour variant `variant`."""

    name: str
    base: str
    variant: int


def scale_products(n: int) -> list[ScaleProduct]:
    """`n` distinct generated products: every source picture in variant 0, then every one in variant 1, ..."""
    from ..data.synthetic import PRODUCTS

    bases = list(PRODUCTS)
    limit = len(bases) * len(_VARIANTS)
    if not 1 <= n <= limit:
        raise MoleflowError(f"{n} products asked for; the generator makes 1 to {limit} distinct products")
    return [ScaleProduct(f"{bases[i % len(bases)]}-v{i // len(bases)}", bases[i % len(bases)], i // len(bases))
            for i in range(n)]


def _recolour(images: np.ndarray, variant: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> the same images in colour variant `variant`, uint8 (N, S, S, 3)."""
    order, gain, inverted = _VARIANTS[variant]
    x = images[..., list(order)].astype(np.float32) * np.asarray(gain, np.float32)
    if inverted:
        x = 255.0 - x
    return np.clip(x, 0, 255).round().astype(np.uint8)


def product_images(product: ScaleProduct, n_train: int, n_heldout: int, size: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Normal training images uint8 (n_train, S, S, 3) and held-out normals uint8 (n_heldout, S, S, 3)."""
    from ..data.synthetic import generate_product

    data = generate_product(product.base, n_train, n_heldout, 0, size=size, seed=seed + product.variant)
    return _recolour(data.train_images, product.variant), _recolour(data.test_images, product.variant)


def mixed_batch(heldout: list[np.ndarray], n: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """A batch of `n` images of min(n, T) products, spread evenly over the T products' held-out normals
    (heldout[p]: uint8 (k, S, S, 3)): images uint8 (n, S, S, 3) and their product indices (n,)."""
    t = len(heldout)
    chosen = np.unique(np.linspace(0, t - 1, min(n, t)).round().astype(int))
    owners = np.array([chosen[j % len(chosen)] for j in range(n)])
    images = np.stack([heldout[p][(j // len(chosen)) % len(heldout[p])] for j, p in enumerate(owners)])
    return images, owners


# ------------------------------------------------------------------------------------------ measuring
def vm_rss_mb() -> float | None:
    """Current resident set size of this process in MB (VmRSS of /proc/self/status; None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _median_seconds(fn, runs: int) -> tuple[float, list[float]]:
    """Median and all wall-clock durations of `runs` calls of `fn`."""
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def folder_footprint(folder: Path, task: int) -> dict[str, int]:
    """Bytes of a model folder: total, manifest, shared flow, and task `task`'s expert (+ calibration) files."""
    files = [f for f in folder.iterdir() if f.is_file()]
    size = {f.name: f.stat().st_size for f in files}
    expert = sum(v for k, v in size.items() if k.startswith((f"task{task}-",)) and k.endswith(".safetensors"))
    return {"checkpoint_bytes": sum(size.values()), "checkpoint_files": len(files),
            "manifest_bytes": size.get("manifest.json", 0),
            "shared_bytes": sum(v for k, v in size.items() if k.startswith("shared-")),
            "expert_bytes": expert}


@contextmanager
def _without_warnings(logger_name: str) -> Iterator[None]:
    """Drop the warnings of one logger inside the block (the per-product calibration-size warning, which
    every generated product of a few images raises); the logger is left as it was."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno != logging.WARNING

    drop = _Drop()
    logger = logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def probe_checkpoint(model_dir: Path, data_path: Path, threads: int | None, load_runs: int = 3,
                     predict_runs: int = 5, router_runs: int = 200) -> dict[str, Any]:
    """Measure a saved model as a fresh process sees it (call it in a new process: see module doc).

    `data_path`: an .npz with `batch` uint8 (32, S, S, 3), `batch_owner` (32,), `heldout` uint8 (M, S, S, 3),
    `heldout_owner` (M,) (product indices = task order) and `single` uint8 (32, S, S, 3) of one product."""
    from ..detector import MoleFlow
    from ..store.checkpoint import read_model

    if threads:
        torch.set_num_threads(threads)
    rss_before_load = vm_rss_mb()  # the libraries (torch, timm, ...) imported, no model yet
    start = time.perf_counter()
    model = MoleFlow.load(model_dir)
    first_load = time.perf_counter() - start
    rss_after_load = vm_rss_mb()
    load_all = [first_load]
    if load_runs > 1:
        load_all += _median_seconds(lambda: MoleFlow.load(model_dir), load_runs - 1)[1]
    read_median, _ = _median_seconds(lambda: read_model(model_dir), load_runs)
    data = np.load(data_path)
    task_ids = torch.tensor([t.task_id for t in model.tasks])
    batch = list(data["batch"])

    with torch.no_grad():
        features = model.extract(batch)[1]  # (32, D) routing features
        model.inspector.router(features)  # warm-up
        route_median, route_all = _median_seconds(lambda: model.inspector.router(features), router_runs)
    model.predict(batch)  # warm-up
    predict_median, predict_all = _median_seconds(lambda: model.predict(batch), predict_runs)
    pred = model.predict(batch)
    single = list(data["single"])
    model.predict(single)
    single_median, _ = _median_seconds(lambda: model.predict(single), predict_runs)

    heldout, owner = data["heldout"], torch.as_tensor(data["heldout_owner"])
    routed = torch.cat([model.predict(list(heldout[i:i + BATCH])).task_ids for i in range(0, len(heldout), BATCH)])
    correct = routed == task_ids[owner]
    names = {t.task_id: t.name for t in model.tasks}
    misrouted: dict[str, int] = {}
    for true, got in zip(task_ids[owner][~correct].tolist(), routed[~correct].tolist()):
        key = f"{names[true]} -> {names.get(got, got)}"
        misrouted[key] = misrouted.get(key, 0) + 1
    n_batch = len(batch)
    return {
        "load_seconds_median": statistics.median(load_all), "load_seconds_min": min(load_all),
        "load_seconds_first": first_load, "load_seconds_all": load_all,
        "read_files_seconds_median": read_median,
        "route_ms_per_batch": 1000 * route_median, "route_us_per_image": 1e6 * route_median / n_batch,
        "route_us_per_image_min": 1e6 * min(route_all) / n_batch,
        "predict_mixed_batch": {
            "images": n_batch, "products_in_batch": int(len(np.unique(data["batch_owner"]))),
            "experts_used": int(pred.task_ids.unique().numel()),
            "ms_per_batch": 1000 * predict_median, "ms_per_image": 1000 * predict_median / n_batch,
            "ms_per_batch_min": 1000 * min(predict_all),
            "ms_per_batch_all": [1000 * t for t in predict_all]},
        "predict_one_product_batch_ms": 1000 * single_median,
        "routing_accuracy": float(correct.double().mean()), "routing_heldout_images": int(len(correct)),
        "misrouted": misrouted,
        "routing_accuracy_in_batch": float((pred.task_ids == task_ids[torch.as_tensor(data["batch_owner"])])
                                           .double().mean()),
        "fresh_process": {"rss_mb_before_load": rss_before_load, "rss_mb_after_load": rss_after_load,
                          "peak_rss_mb": peak_rss_mb(), "rss_mb_at_end": vm_rss_mb()},
    }


def _probe_in_subprocess(model_dir: Path, data_path: Path, threads: int | None, load_runs: int,
                         predict_runs: int) -> dict[str, Any]:
    """`probe_checkpoint` in a new Python process (its result is the last line of its stdout)."""
    request = json.dumps({"model_dir": str(model_dir), "data_path": str(data_path), "threads": threads,
                          "load_runs": load_runs, "predict_runs": predict_runs})
    done = subprocess.run([sys.executable, "-m", "moleflow.bench.scale", request], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise MoleflowError(f"measuring {model_dir} in a fresh process failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_average() -> float | None:
    """The machine's 1-minute load average (other processes competing for the cores), None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ the benchmark
def _check_counts(counts: Sequence[int]) -> list[int]:
    counts = [int(c) for c in counts]
    if not counts or counts != sorted(set(counts)) or counts[0] < 1:
        raise MoleflowError(f"--counts {' '.join(map(str, counts))}: give increasing task counts >= 1, "
                            "e.g. 1 10 50 100")
    return counts


def run_scale(counts: list[int], preset: str, n_train: int, out_dir: Path, threads: int | None,
              overrides: dict[str, Any] | list[str] | None = None, n_heldout: int = 3, load_runs: int = 3,
              predict_runs: int = 5, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Learn max(counts) generated products into one model, in order, measuring at each count (module doc).

    `preset` with `SCALE_DEFAULTS` and then `overrides` (`section.key=value`) is the model's config; `n_train`
    generated images per product (a seeded few are held out by calibration), `n_heldout` more per product for
    routing accuracy and the predict batch. The model is written to `out_dir/model` (which must not hold a
    model yet). `threads`: torch CPU threads here and in the measuring processes. Returns a JSON-able dict."""
    from ..store.checkpoint import run_has_model

    counts = _check_counts(counts)
    products = scale_products(counts[-1])
    if n_train < 4:
        raise MoleflowError(f"--n-train {n_train}: a product needs at least 4 images (prototype and calibration)")
    if min(n_heldout, load_runs, predict_runs) < 1:
        raise MoleflowError("--heldout, --load-runs and --predict-runs must be at least 1")
    out_dir = Path(out_dir)
    if run_has_model(out_dir):
        raise MoleflowError(f"{out_dir} already holds a model; the scale benchmark starts from an empty run folder")
    user = overrides if overrides is not None else []
    cfg = Config.from_preset(preset).with_overrides(SCALE_DEFAULTS).with_overrides(user)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _learn_and_measure(cfg, counts, products, n_train, n_heldout, out_dir, threads, load_runs,
                                    predict_runs, seed, progress)
    finally:
        torch.set_num_threads(previous)  # the caller's setting, as it was
    result["settings"].update({"preset": preset, "scale_defaults": dict(SCALE_DEFAULTS), "overrides": user})
    return result


#: What each field of a row means (written into the results).
MEASURED = {
    "checkpoint_bytes": "bytes of every file in RUN/model after saving T tasks",
    "expert_bytes": "bytes of the last task's task<t> + task<t>-calibration safetensors files",
    "add_task_seconds": "MoleFlow.fit_task of the T-th product (features, training, prototype, calibration)",
    "save_seconds": "MoleFlow.save after learning the T-th product into a folder already holding the T - 1 "
                    "others (serialises and hashes every part, writes the new expert's files and the manifest)",
    "load_seconds_median": "MoleFlow.load in a fresh process (backbone + files + SHA-256), median of "
                           "load_runs; load_seconds_first: the first, cold one (lazy imports, weights "
                           "file from disk)",
    "read_files_seconds_median": "store.checkpoint.read_model alone: reading and hashing the files",
    "route_us_per_image": "model.inspector.router(features) on precomputed (32, D) routing features, "
                          "median of 200 calls, per image",
    "predict_mixed_batch": "model.predict(32 decoded uint8 images of min(32, T) products), torch engine, "
                           "median of predict_runs after a warm-up; experts_used = distinct routed experts",
    "predict_one_product_batch_ms": "model.predict(32 images of one product), same timing",
    "routing_accuracy": "share of held-out generated normals (heldout_per_product each) routed to their "
                        "own product",
    "fresh_process": "a new process: VmRSS with the libraries imported (before load), right after the first "
                     "MoleFlow.load, and its ru_maxrss after every measurement (predict included)",
    "bench_process_peak_rss_mb": "ru_maxrss of the learning process so far",
    "_min": "the fastest of the timed runs (less affected by other processes on the machine than the median)"}


def _progress_line(row: dict[str, Any]) -> str:
    """One printed line per product count."""
    mixed = row["predict_mixed_batch"]
    return (f"{row['tasks']:4d} tasks: checkpoint {row['checkpoint_bytes'] / 1e6:7.2f} MB, expert "
            f"{row['expert_bytes'] / 1e3:6.1f} kB, load {row['load_seconds_median']:5.2f} s, route "
            f"{row['route_us_per_image']:7.1f} us/image, predict {mixed['ms_per_batch']:7.1f} ms/batch of "
            f"{mixed['products_in_batch']} products, add task {row['add_task_seconds']:5.2f} s, fresh RSS "
            f"{row['fresh_process']['rss_mb_after_load']:6.1f} MB, routing accuracy "
            f"{100 * row['routing_accuracy']:5.1f} %")


def _learn_and_measure(cfg: Config, counts: list[int], products: list[ScaleProduct], n_train: int,
                       n_heldout: int, out_dir: Path, threads: int | None, load_runs: int, predict_runs: int,
                       seed: int, progress: bool) -> dict[str, Any]:
    """The body of `run_scale`, with torch's threads set."""
    from ..detector import MoleFlow

    size = cfg.data.image_size
    wall, load_before = time.perf_counter(), _load_average()
    model = MoleFlow(cfg)
    heldout: list[np.ndarray] = []
    learn_seconds: list[float] = []
    generate_seconds = 0.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moleflow-scale-") as tmp:
        for count in counts:
            while len(model.tasks) < count:
                if len(model.tasks) == count - 1 and model.tasks:
                    model.save(out_dir)  # so that the timed save below writes the last task's files only
                product = products[len(model.tasks)]
                start = time.perf_counter()
                train, held = product_images(product, n_train, n_heldout, size, seed)
                generate_seconds += time.perf_counter() - start
                heldout.append(held)
                start = time.perf_counter()
                with _without_warnings("moleflow.learning"):
                    model.fit_task(list(train), name=product.name)
                learn_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            folder = model.save(out_dir)
            save_seconds = time.perf_counter() - start
            last = model.tasks[-1]
            batch, batch_owner = mixed_batch(heldout)
            single = np.stack([heldout[-1][j % len(heldout[-1])] for j in range(BATCH)])
            data_path = Path(tmp) / f"probe_{count}.npz"
            np.savez(data_path, batch=batch, batch_owner=batch_owner, single=single,
                     heldout=np.concatenate(heldout), heldout_owner=np.repeat(np.arange(count), n_heldout))
            probe = _probe_in_subprocess(folder, data_path, threads, load_runs, predict_runs)
            data_path.unlink()
            row = {"tasks": count, **folder_footprint(folder, last.task_id),
                   "expert_parameters": sum(p.numel() for p in model.flow.task_parameters(last.task_id)),
                   "save_seconds": save_seconds, "add_task_seconds": learn_seconds[-1],
                   "add_task_seconds_median_last5": statistics.median(learn_seconds[-5:]), **probe,
                   "bench_process_peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            if progress:
                print(_progress_line(row), flush=True)
    return {
        "benchmark": "scale",
        "settings": {"images_per_product": n_train, "heldout_per_product": n_heldout, "image_size": size,
                     "load_runs": load_runs, "predict_runs": predict_runs, "batch_images": BATCH, "seed": seed,
                     "train": {"epochs": cfg.train.epochs, "min_steps": cfg.train.min_steps,
                               "batch_size": cfg.train.batch_size},
                     "model": {"backbone": cfg.backbone.name, "embed_dim": model.extractor.embed_dim,
                               "coupling_blocks": cfg.model.num_coupling_blocks, "dia_blocks": cfg.model.dia_blocks,
                               "lora_rank": cfg.model.lora_rank, "score_source": cfg.score.source},
                     "images_trained_per_product": model.tasks[0].n_train,
                     "calibration_images_per_product": model.tasks[0].n_calibration},
        "products": [p.name for p in products],
        "measured": MEASURED,
        "rows": rows,
        "learn_seconds_per_task": learn_seconds,
        "generate_seconds": generate_seconds,
        "wall_seconds": time.perf_counter() - wall,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu", "load_average_1min_start_end": [load_before, _load_average()]},
        "model_dir": str(Path(out_dir) / "model"),
    }


if __name__ == "__main__":  # the measuring process of `_probe_in_subprocess`
    _request = json.loads(sys.argv[1])
    _result = probe_checkpoint(Path(_request["model_dir"]), Path(_request["data_path"]), _request["threads"],
                               _request["load_runs"], _request["predict_runs"])
    print(json.dumps(_result))
