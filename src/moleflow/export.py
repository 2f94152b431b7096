"""ONNX export of a whole detector: one self-contained graph, images in, routed scores and maps out.

    path = export_onnx(model, "run/export")           # run/export/model.onnx + run/export/export.json
    out = predict_onnx(path, images)                  # images: float32 (N, 3, S, S), normalised
    out["scores"] (N,), out["maps"] (N, S, S), out["task_index"] (N,) int64, out["router_distance"] (N,)

Design: ONE graph, traced from the library's routed-inference module (`inspector.Inspector.forward`, the
same pieces `MoleFlow.predict` runs): the backbone and the patch-feature pipeline, the Mahalanobis router
(each task's prototype mean and precision are float64 constants) and every task's expert. Each image goes
through all T experts and the routed expert's patch NLL is picked with a gather, so the graph has no
data-dependent control flow and dynamic batch size is trivial. That costs T times the flow compute
(the backbone, usually the bulk of the time, runs once), in exchange for a single file that any
ONNX runtime runs without a custom runner, and outputs that match `MoleFlow.predict` (routed,
task-agnostic) to float32 rounding. The alternative, one graph per expert plus a router graph,
only pays off with many tasks and needs moleflow-specific glue on the consumer's side: that is what
`engine.py` does for `moleflow serve` and `moleflow predict --engine onnx` (the backbone and each expert as
their own graphs, moleflow's routing, tiling and stitching in between), which also serves tiled runs.

Outputs, per image:
    scores          float32 (N,)        image score (the model's `score.mode` aggregation)
    maps            float32 (N, S, S)   pixel anomaly map (bilinear upsampling + Gaussian blur)
    task_index      int64   (N,)        index into the task list stored in the metadata (`task_ids`,
                                        `task_names`): the router's choice
    router_distance float64 (N,)        distance to the chosen prototype
    known           bool    (N,)        False: farther than that task's unknown-product distance
    anomalous       bool    (N,)        score above the chosen task's calibrated threshold

The export is traced with PyTorch's TorchScript-based exporter (`dynamo=False`: the dynamo exporter
needs onnxscript and does not yet handle the per-task buffer lookups); the inspector's modules are
untouched. The library's modules are written with export-friendly ops (constant-weight convolutions for the
neighbourhood pooling, constant matrices for the upsampling and blur of the maps, constant indices for
the percentile score), so the graph
is the library's own code, not a re-implementation. `spatial_cluster`
scoring is not exported (a `MoleflowError` says so).

Metadata (`metadata_props` of the ONNX model, every value a string, JSON where structured) is also
written, parsed, to `export.json` beside the model with the input and output names and the files' SHA-256.
A model with more than `EXTERNAL_DATA_ABOVE` bytes of weights (about a hundred `main`-size products) keeps
its tensors in `model.onnx.data` beside the graph (ONNX external data; onnxruntime reads it from there):
protobuf cannot hold more than 2 GB in one file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import ScoreConfig
from .errors import MoleflowError
from .onnx_runtime import onnx_session
from .store.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from .detector import MoleFlow

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the tensors of a large model (ONNX external data)
EXTERNAL_DATA_ABOVE = 1_500_000_000  # weight bytes above which they go to DATA_FILE (protobuf's limit is 2 GB)
EXPORT_JSON = "export.json"
FORMAT = "moleflow-onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps", "task_index", "router_distance", "known", "anomalous")
EXPORTED_SCORE_MODES = ("top_k", "top_k_percent", "percentile", "max", "mean")


def check_score_mode(cfg: ScoreConfig) -> None:
    if cfg.mode not in EXPORTED_SCORE_MODES:
        raise MoleflowError(f"score mode {cfg.mode!r} cannot be exported to ONNX; exported modes: "
                            f"{', '.join(EXPORTED_SCORE_MODES)} (set score.mode to one of them)")


# ------------------------------------------------------------------------------------------ metadata
def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def export_metadata(model: "MoleFlow", opset: int) -> dict[str, Any]:
    """What a consumer needs besides the graph: preprocessing, task list, thresholds, provenance.
    Non-finite thresholds / distances (no calibration data) are written as null (= no limit)."""
    from . import __version__

    extractor = model.extractor
    size = model.config.data.image_size
    return {
        "format": FORMAT,
        "moleflow_version": __version__,
        "task_ids": [t.task_id for t in model.tasks],
        "task_names": [t.name for t in model.tasks],
        "thresholds": [_finite_or_none(t.threshold) for t in model.tasks],
        "unknown_distances": [_finite_or_none(model.router.unknown_threshold(t.task_id)) for t in model.tasks],
        "image_size": size,
        "resize_mode": model.config.data.resize_mode,
        "mean": list(extractor.mean),
        "std": list(extractor.std),
        "backbone": extractor.name,
        "backbone_weights_sha256": extractor.weights_sha256,
        "embed_dim": extractor.embed_dim,
        "score_mode": model.config.score.mode,
        "map_sigma": model.config.score.map_sigma,
        "map_centre": model.config.score.map_centre,
        "router_metric": model.config.router.metric,
        "opset": opset,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 3, size, size],
                  "note": "RGB images resized to image_size and normalised with mean/std"},
        "outputs": list(OUTPUT_NAMES),
    }


def _metadata_strings(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_onnx_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model, parsed back (JSON values decoded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


# ------------------------------------------------------------------------------------------ export
def _check_exportable(model: "MoleFlow") -> None:
    check_score_mode(model.config.score)
    if not model.tasks:
        raise MoleflowError("the model has learned no task yet; nothing to export")
    if model.config.data.tiling != "none":
        raise MoleflowError("data.tiling is on: the single ONNX graph scores one square view per image and "
                            "cannot cut tiles; the onnx engine (`moleflow predict --engine onnx`, `moleflow serve`, "
                            "moleflow.engine) runs tiled runs with ONNX Runtime, or export a run trained with "
                            "data.tiling=none")
    if not model.config.router.enabled:
        raise MoleflowError("router.enabled is false (oracle mode): the ONNX export routes every image itself, "
                            "so it needs the router")
    model.inspector.check_complete()


def export_onnx(model: "MoleFlow", out_dir: str | Path, opset: int = 17,
                external_data_above: int = EXTERNAL_DATA_ABOVE) -> Path:
    """Write `out_dir/model.onnx` and `out_dir/export.json`; return the ONNX path. A model whose weights exceed
    `external_data_above` bytes keeps its tensors in `out_dir/model.onnx.data` (protobuf caps one file at 2 GB).

    The graph reproduces `model.predict(images)` (routed) for normalised images (N, 3, S, S)."""
    try:
        import onnx
    except ImportError:
        raise MoleflowError("the package onnx is not installed; run `pip install onnx onnxruntime`") from None
    _check_exportable(model)
    if opset < 13:
        raise MoleflowError(f"opset {opset} is too old; use 13 or newer (default 17)")
    out_dir = Path(out_dir)
    # trace a CPU copy when the model lives elsewhere; never change the caller's module
    graph = model.inspector if model.device.type == "cpu" else copy.deepcopy(model.inspector).cpu()
    mode = graph.training
    graph.eval()
    size = model.config.data.image_size
    example = torch.zeros(2, 3, size, size)
    dynamic = {INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in OUTPUT_NAMES}}
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    try:
        # traced into a file, not memory: a model over protobuf's 2 GB limit is then written with external data
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp, torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about static shapes: the image size is fixed
            traced = Path(tmp) / ONNX_FILE
            torch.onnx.export(graph, (example,), str(traced), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, do_constant_folding=True)
            proto = onnx.load(str(traced))
    except MoleflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        raise MoleflowError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc
    finally:
        graph.train(mode)
    meta = export_metadata(model, opset)
    for key, value in _metadata_strings(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "moleflow"
    proto.doc_string = "MoLE-Flow continual anomaly detector: routed image scores and anomaly maps"
    info = {**meta, "onnx_file": ONNX_FILE, "input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
    if weight_bytes > external_data_above:
        info.update(_write_with_external_data(onnx, proto, out_dir))
    else:
        data = proto.SerializeToString()
        atomic_write_bytes(out_dir / ONNX_FILE, lambda fh: fh.write(data))
        (out_dir / DATA_FILE).unlink(missing_ok=True)
        info["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(out_dir / EXPORT_JSON, lambda fh: fh.write(json.dumps(info, indent=1).encode()))
    return out_dir / ONNX_FILE


def _write_with_external_data(onnx, proto, out_dir: Path) -> dict[str, str]:
    """Write `proto` as `model.onnx` plus its tensors in `model.onnx.data` (ONNX external data, one file, read
    by onnxruntime from beside the graph): written in a temporary folder, then moved in data first, graph
    last, so a crash never leaves a graph pointing at missing data. Returns the files' SHA-256."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        onnx.save_model(proto, str(Path(tmp) / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        digests = {name: _file_sha256(Path(tmp) / name) for name in (DATA_FILE, ONNX_FILE)}
        os.replace(Path(tmp) / DATA_FILE, out_dir / DATA_FILE)
        os.replace(Path(tmp) / ONNX_FILE, out_dir / ONNX_FILE)
    return {"onnx_sha256": digests[ONNX_FILE], "onnx_data_file": DATA_FILE, "onnx_data_sha256": digests[DATA_FILE]}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ inference
def predict_onnx(onnx_path: str | Path, images: np.ndarray, session=None) -> dict[str, np.ndarray]:
    """Run an exported model on normalised images float32 (N, 3, S, S): {output name: array}."""
    x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != 3:
        raise MoleflowError(f"images must be float32 (N, 3, S, S), got shape {x.shape}")
    session = session or onnx_session(onnx_path)
    expected = session.get_inputs()[0].shape
    if tuple(expected[2:]) != x.shape[2:]:
        raise MoleflowError(f"this model takes images of {expected[2]} x {expected[3]} pixels, got {x.shape[2:]}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: x})))


def compare_with_torch(model: "MoleFlow", onnx_path: str | Path, images: torch.Tensor) -> dict[str, float]:
    """Max absolute differences of the ONNX outputs against `model.predict(images)`, and the share of
    images routed to a different task (0.0 expected)."""
    pred = model.predict(images)
    out = predict_onnx(onnx_path, images.detach().cpu().numpy())
    task_ids = np.asarray([t.task_id for t in model.tasks])[out["task_index"]]
    return {
        "scores": float(np.abs(out["scores"] - pred.scores.numpy()).max()),
        "maps": float(np.abs(out["maps"] - pred.maps.numpy()).max()),
        "router_distance": float(np.abs(out["router_distance"] - pred.router_distance.numpy()).max()),
        "task_mismatch": float((task_ids != pred.task_ids.numpy()).mean()),
        "score_scale": float(np.abs(pred.scores.numpy()).max()),
    }
