"""`moleflow export`: write a trained run's detector as a self-contained ONNX model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import MoleflowError

log = logging.getLogger(__name__)

EXAMPLES = """example:
  moleflow export runs/mvtec --format onnx
      writes runs/mvtec/export/model.onnx and runs/mvtec/export/export.json
  moleflow export runs/mvtec --format onnx --out deploy/ --opset 17 --backbone-weights wrn50.pth

The ONNX model takes normalised images float32 (N, 3, S, S) named "images" and returns scores (N,),
maps (N, S, S), task_index (N,), router_distance (N,), known (N,) and anomalous (N,); image size,
normalisation, task names and thresholds are in its metadata and in export.json. Run it with
onnxruntime, or in Python with moleflow.export.predict_onnx(path, images).
"""

FORMATS = ("onnx",)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a trained run to ONNX", epilog=EXAMPLES,
                       description="Export the detector of RUN_DIR (backbone, router and every task's "
                                   "expert) as one ONNX graph reproducing `predict` (routed, task-agnostic).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or its model folder)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="export format (default onnx)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--backbone-weights", help="local backbone weights file, if the run's backbone needs one")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check that onnxruntime reproduces the PyTorch model on two random images")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..detector import MoleFlow
    from ..export import EXPORT_JSON, compare_with_torch, export_onnx

    run_dir = Path(args.run_dir)
    if getattr(args, "format", "onnx") != "onnx":
        raise MoleflowError(f"unknown export format {args.format!r}; choose one of {', '.join(FORMATS)}")
    from ..store.checkpoint import find_model

    checkpoint = find_model(run_dir)
    out = getattr(args, "out", None) or (run_dir if run_dir.is_dir() else run_dir.parent) / "export"
    model = MoleFlow.load(checkpoint, backbone_weights=getattr(args, "backbone_weights", None))
    path = export_onnx(model, out, opset=getattr(args, "opset", 17))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and {Path(out) / EXPORT_JSON}")
    print(f"tasks: {', '.join(t.name for t in model.tasks)}; score mode {model.config.score.mode}")
    if not getattr(args, "no_verify", False):
        import torch

        size = model.config.data.image_size
        probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        diff = compare_with_torch(model, path, probe)
        tolerance = 1e-4 * max(1.0, diff["score_scale"])
        print(f"check against PyTorch on 2 random images: max |score diff| {diff['scores']:.2e}, "
              f"max |map diff| {diff['maps']:.2e}, routing differs on {diff['task_mismatch']:.0%}")
        if diff["task_mismatch"] > 0 or max(diff["scores"], diff["maps"]) > tolerance:
            raise MoleflowError(f"the ONNX model does not reproduce the PyTorch model (differences {diff}); "
                                "the file is kept for inspection")
    return 0
