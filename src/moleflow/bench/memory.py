"""`moleflow bench memory`: peak resident memory and time per image of learning one task of N images.

    results = run_memory([500, 5000], folder=Path("/tmp/bench_memory"), preset="tiny", workers=2)

Each size is learned in a fresh process (so peaks do not mix): generated PNGs on disk -> `MoleFlow.fit_task`
with the images streamed by `workers` loader processes. Reported per size: peak RSS of the learning process
(`ru_maxrss`, its loader workers excluded), the feature cache's bytes (tokens of every training tile, the one
thing that must grow with the task; memory-mapped above `train.cache_memory_gb`), the peak minus the cache,
and seconds per image. Memory that does not grow with the task apart from the cache shows as a flat
"peak - cache" column.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n distinct PNGs of `size` px of one generated product (40 base images, each shifted and flipped)."""
    from ..data.synthetic import generate_product

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    base = generate_product("brick", n_train=40, n_test_good=0, n_test_defect=0, size=size, seed=seed).train_images
    for i, path in enumerate(paths):
        img = np.roll(base[i % len(base)], shift=(i // len(base)) % size, axis=1)
        Image.fromarray(img[:, ::-1] if (i // len(base)) % 2 else img).save(path)
    return paths


def measure_one(folder: Path, n: int, preset: str, overrides: dict[str, Any] | list[str], workers: int,
                threads: int | None) -> dict[str, Any]:
    """Learn one task of the first n images in `folder` in this process; its peak memory and timing."""
    import torch

    from ..config import Config
    from ..detector import MoleFlow

    if threads:
        torch.set_num_threads(threads)
    paths = sorted(folder.glob("*.png"))[:n]
    model = MoleFlow(Config.from_preset(preset).with_overrides(overrides))
    model.loader_workers = workers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    info = model.fit_task([str(p) for p in paths], name="big")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h, w = model.grid
    cache = info.n_tiles * h * w * model.extractor.embed_dim * 4 * (info.n_train / max(1, n))
    return {"n_images": n, "n_train": info.n_train, "n_calibration": info.n_calibration,
            "peak_rss_bytes": peak, "rss_before_learning_bytes": before, "cache_bytes": int(cache),
            "peak_minus_cache_bytes": int(peak - cache), "seconds": seconds, "seconds_per_image": seconds / n,
            "train_seconds": info.train["seconds"], "steps": info.train["steps"]}


def run_memory(sizes: list[int], folder: Path, preset: str = "tiny",
               overrides: dict[str, Any] | list[str] | None = None, workers: int = 2, threads: int | None = None,
               image_size: int = 224) -> dict[str, Any]:
    """Each size in a fresh process; generated images written once to `folder` (the largest size).
    `overrides`: `section.key=value` strings or a dict, applied to `preset`."""
    overrides = overrides if overrides is not None else []
    write_images(folder, max(sizes), image_size)
    rows = []
    for n in sizes:
        args = json.dumps({"folder": str(folder), "n": n, "preset": preset, "overrides": overrides,
                           "workers": workers, "threads": threads})
        done = subprocess.run([sys.executable, "-m", "moleflow.bench.memory", args], check=True,
                              capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"preset": preset, "overrides": overrides, "workers": workers, "threads": threads,
            "image_size": image_size, "rows": rows}


if __name__ == "__main__":  # one measurement, in its own process (see run_memory)
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure_one(Path(spec["folder"]), spec["n"], spec["preset"], spec["overrides"], spec["workers"],
                                 spec["threads"])))
