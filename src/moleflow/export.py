"""ONNX export of a whole detector: one self-contained graph, images in, routed scores and maps out.

    path = export_onnx(model, "run/export")           # run/export/model.onnx + run/export/export.json
    out = predict_onnx(path, images)                  # images: float32 (N, 3, S, S), normalised
    out["scores"] (N,), out["maps"] (N, S, S), out["task_index"] (N,) int64, out["router_distance"] (N,)

Design: ONE graph holding the backbone and the patch-feature pipeline, the Mahalanobis router (each
task's prototype mean and precision are float64 constants) and every task's expert. Each image goes
through all T experts and the routed expert's patch NLL is picked with a gather, so the graph has no
data-dependent control flow and dynamic batch size is trivial. That costs T times the flow compute
(the backbone, usually the bulk of the time, runs once), in exchange for a single file that any
ONNX runtime runs without a custom runner, and outputs that match `MoleFlow.predict` (routed,
task-agnostic) to float32 rounding. The alternative, one graph per expert plus a router graph,
only pays off with many tasks and needs moleflow-specific glue on the consumer's side.

Outputs, per image:
    scores          float32 (N,)        image score (the model's `score.mode` aggregation)
    maps            float32 (N, S, S)   pixel anomaly map (bilinear upsampling + Gaussian blur)
    task_index      int64   (N,)        index into the task list stored in the metadata (`task_ids`,
                                        `task_names`): the router's choice
    router_distance float64 (N,)        distance to the chosen prototype
    known           bool    (N,)        False: farther than that task's unknown-product distance
    anomalous       bool    (N,)        score above the chosen task's calibrated threshold

The export is traced with PyTorch's TorchScript-based exporter (`dynamo=False`), through a dedicated
wrapper module that uses only tensor ops and constant buffers; the library's modules are untouched.
Parts rewritten for export (numerically equal up to float rounding): the CNN 3x3 neighbourhood
aggregation + adaptive channel pooling becomes one constant-weight convolution per layer (unfold then
a linear pooling is a linear map of the 3x3 neighbourhood, i.e. a convolution; adaptive pooling to a
non-divisor size has no ONNX equivalent), the 'reflect' padding of the blur uses constant index
tensors, and the percentile score uses a sort with constant interpolation indices. `spatial_cluster`
scoring is not exported (a `MoleflowError` says so).

Metadata (`metadata_props` of the ONNX model, every value a string, JSON where structured) is also
written, parsed, to `export.json` beside the model with the input and output names.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_bytes
from .config import ScoreConfig
from .errors import MoleflowError
from .nn.adapters import WhiteningAdapter, sinusoidal_position_encoding
from .scoring import _reflect_index, gaussian_kernel1d

if TYPE_CHECKING:
    from .detector import MoleFlow

ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"
FORMAT = "moleflow-onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps", "task_index", "router_distance", "known", "anomalous")
EXPORTED_SCORE_MODES = ("top_k", "top_k_percent", "percentile", "max", "mean")


# ------------------------------------------------------------------------------------------ pieces
def adaptive_pool_matrix(length: int, size: int) -> torch.Tensor:
    """(size, length) matrix M with M @ v == F.adaptive_avg_pool1d(v, size) for a vector v of `length`."""
    m = torch.zeros(size, length, dtype=torch.float64)
    for j in range(size):
        start, end = (j * length) // size, -((-(j + 1) * length) // size)  # floor, ceil
        m[j, start:end] = 1.0 / (end - start)
    return m.float()


def export_scores(nll: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """`scoring.image_scores` written with export-friendly ops (static k and indices). (B,H,W) -> (B,)."""
    flat = nll.flatten(1)
    n = flat.shape[1]
    if cfg.mode == "top_k":
        return flat.topk(min(cfg.top_k, n), dim=1).values.mean(1)
    if cfg.mode == "top_k_percent":
        return flat.topk(max(1, int(n * cfg.top_k_percent)), dim=1).values.mean(1)
    if cfg.mode == "max":
        return flat.max(1).values
    if cfg.mode == "mean":
        return flat.mean(1)
    if cfg.mode == "percentile":
        # torch.quantile(..., interpolation="linear"): position q * (n - 1) in the sorted values
        pos = float(cfg.percentile) * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        ordered = flat.sort(dim=1).values
        low, high = ordered[:, lo], ordered[:, hi]
        return low + frac * (high - low)
    raise MoleflowError(f"score mode {cfg.mode!r} cannot be exported to ONNX; exported modes: "
                        f"{', '.join(EXPORTED_SCORE_MODES)} (set score.mode to one of them)")


class _Blur(nn.Module):
    """`scoring.gaussian_blur` with the kernel and the reflect-padding indices as constant buffers."""

    def __init__(self, size: int, sigma: float) -> None:
        super().__init__()
        self.size, self.enabled = size, sigma > 0
        kernel = gaussian_kernel1d(sigma) if self.enabled else torch.ones(1)
        radius = kernel.numel() // 2
        self.register_buffer("kernel", kernel.view(1, 1, -1))
        self.register_buffer("index", _reflect_index(size, radius, None))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # (B, S, S)
        if not self.enabled:
            return maps
        s = self.size
        x = maps.index_select(2, self.index).reshape(-1, 1, self.index.numel())
        x = F.conv1d(x, self.kernel).reshape(-1, s, s)
        x = x.transpose(1, 2).index_select(2, self.index).reshape(-1, 1, self.index.numel())
        return F.conv1d(x, self.kernel).reshape(-1, s, s).transpose(1, 2)


class ExportGraph(nn.Module):
    """images (N,3,S,S) -> scores, maps, task_index, router_distance, known, anomalous (see module doc)."""

    def __init__(self, model: "MoleFlow") -> None:
        super().__init__()
        cfg = model.config
        extractor = model.extractor
        self.kind = extractor.spec.kind
        self.dim = extractor.embed_dim
        self.image_size = cfg.data.image_size
        self.score_cfg = cfg.score
        export_scores(torch.zeros(1, 2, 2), cfg.score)  # unsupported modes fail here, before any tracing
        self.backbone = extractor.model
        self.flow = model.flow
        self.task_ids = [t.task_id for t in model.tasks]
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=next(extractor.parameters()).device)
            if self.kind == "cnn":
                maps = self.backbone(probe)
                self.grid = tuple(int(v) for v in maps[0].shape[-2:])
                for i, fmap in enumerate(maps):
                    c = fmap.shape[1]
                    pool = adaptive_pool_matrix(c * 9, self.dim)  # over the (channel, ky, kx) vector
                    self.register_buffer(f"aggregate{i}", pool.reshape(self.dim, c, 3, 3))
            else:
                maps = self.backbone.forward_intermediates(probe, indices=list(_vit_blocks()), intermediates_only=True)
                channels = maps[0].shape[1]
                self.grid = tuple(int(v) for v in maps[0].shape[-2:])
                self.vit_pool = channels != self.dim
                if self.vit_pool:
                    pool = adaptive_pool_matrix(channels, self.dim)
                    self.register_buffer("aggregate0", pool.reshape(self.dim, channels, 1, 1))
        self.register_buffer("position", sinusoidal_position_encoding(*self.grid, self.dim))
        protos = [model.router.prototypes[t] for t in self.task_ids]
        self.register_buffer("proto_mean", torch.stack([p.mean.double().cpu() for p in protos]))  # (T, D)
        self.register_buffer("proto_precision", torch.stack([p.precision.double().cpu() for p in protos]))
        self.register_buffer("unknown_limit", torch.tensor([p.unknown_threshold for p in protos], dtype=torch.float64))
        self.register_buffer("threshold", torch.tensor([t.threshold for t in model.tasks], dtype=torch.float32))
        self.blur = _Blur(self.image_size, cfg.score.map_sigma)
        self.to(probe.device)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """FeatureExtractor.forward's tokens (N, H, W, D), export-friendly."""
        if self.kind == "cnn":
            maps = self.backbone(images)
            layers = []
            for i, fmap in enumerate(maps):
                pooled = F.conv2d(fmap, getattr(self, f"aggregate{i}"), padding=1)
                if tuple(pooled.shape[-2:]) != self.grid:
                    pooled = F.interpolate(pooled, size=self.grid, mode="bilinear", align_corners=False)
                layers.append(pooled)
            return torch.stack(layers).mean(0).permute(0, 2, 3, 1)
        maps = self.backbone.forward_intermediates(images, indices=list(_vit_blocks()), intermediates_only=True)
        mean = torch.stack(maps).mean(0)
        if self.vit_pool:
            mean = F.conv2d(mean, self.aggregate0)
        return mean.permute(0, 2, 3, 1)

    def expert_nll(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        """`MoLEFlow.forward(tokens, task).nll` with static shapes: the positional encoding is a constant and
        the whitening adapter's layer norm gets its normalised shape as a constant (the library's
        `x.shape[-1:]` is a traced value the TorchScript exporter cannot turn into an ONNX attribute)."""
        flow = self.flow
        x = tokens
        if flow.cfg.use_pos_embedding:
            x = x + self.position
        key = str(task)
        if key in flow.adapters:
            adapter = flow.adapters[key]
            if isinstance(adapter, WhiteningAdapter):
                x = F.layer_norm(x, (self.dim,), eps=1e-5)
                gamma = 0.5 + 1.5 * torch.sigmoid(adapter.gamma_raw)
                x = gamma * x + 2.0 * torch.tanh(adapter.beta_raw)
            else:
                x = adapter(x)
        if flow.scm is not None:
            x = flow.scm(x)
        z, logdet = flow.flow_forward(x, task)
        log_prob = -0.5 * z.pow(2).sum(-1) - 0.5 * flow.dim * math.log(2 * math.pi) + logdet
        return -log_prob

    def forward(self, images: torch.Tensor):
        tokens = self.tokens(images)  # (N, H, W, D)
        # router: Mahalanobis (or Euclidean: identity precision) distance to every prototype, in float64
        feats = tokens.mean(dim=(1, 2)).double()
        diff = feats.unsqueeze(1) - self.proto_mean.unsqueeze(0)  # (N, T, D)
        projected = torch.matmul(diff.unsqueeze(2), self.proto_precision.unsqueeze(0)).squeeze(2)
        distances = (projected * diff).sum(-1).clamp_min(0).sqrt()  # (N, T)
        best, index = distances.min(1)
        # every expert on every image, then the routed one's patch NLL
        nll_all = torch.stack([self.expert_nll(tokens, t).float() for t in self.task_ids], dim=1)  # (N, T, H, W)
        h, w = self.grid
        pick = index.view(-1, 1, 1, 1).expand(-1, 1, h, w)
        nll = nll_all.gather(1, pick).squeeze(1)  # (N, H, W)
        scores = export_scores(nll, self.score_cfg)
        up = F.interpolate(nll.unsqueeze(1), size=(self.image_size, self.image_size), mode="bilinear",
                           align_corners=True).squeeze(1)
        smooth = self.blur(up)
        maps = torch.where(torch.isnan(smooth), torch.zeros_like(smooth), smooth)
        infinite = torch.isinf(maps)  # nan_to_num(nan=0, posinf=1, neginf=0)
        maps = torch.where(infinite, (maps > 0).to(maps.dtype), maps)
        known = best <= self.unknown_limit.index_select(0, index)
        anomalous = scores > self.threshold.index_select(0, index)
        return scores, maps, index, best, known, anomalous


def _vit_blocks() -> tuple[int, ...]:
    from .backbones import VIT_BLOCKS

    return VIT_BLOCKS


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
        "unknown_distances": [_finite_or_none(model.router.prototypes[t.task_id].unknown_threshold)
                              for t in model.tasks],
        "image_size": size,
        "resize_mode": model.config.data.resize_mode,
        "mean": list(extractor.mean),
        "std": list(extractor.std),
        "backbone": extractor.name,
        "backbone_weights_sha256": extractor.weights_sha256,
        "embed_dim": extractor.embed_dim,
        "score_mode": model.config.score.mode,
        "map_sigma": model.config.score.map_sigma,
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
    export_scores(torch.zeros(1, 2, 2), model.config.score)  # unsupported score modes fail first
    if not model.tasks:
        raise MoleflowError("the model has learned no task yet; nothing to export")
    if not model.config.router.enabled:
        raise MoleflowError("router.enabled is false (oracle mode): the ONNX export routes every image itself, "
                            "so it needs the router")
    missing = [t.task_id for t in model.tasks
               if t.task_id not in model.router.prototypes or t.task_id not in model.flow.task_ids]
    if missing:
        raise MoleflowError(f"tasks {missing} have no router prototype or expert; the model is incomplete")


@torch.no_grad()
def _self_check(graph: ExportGraph, model: "MoleFlow") -> None:
    """The export-friendly rewrites must equal the library's modules (guards against library drift)."""
    size = model.config.data.image_size
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    reference = model.extractor(probe)[0]
    tokens = graph.tokens(probe)
    problems = []
    if tokens.shape != reference.shape or not torch.allclose(tokens, reference, rtol=1e-4, atol=1e-4):
        problems.append("backbone tokens")
    for task in graph.task_ids:
        ref = model.flow(reference, task).nll
        if not torch.allclose(graph.expert_nll(reference, task), ref, rtol=1e-5, atol=1e-4):
            problems.append(f"task {task}'s patch NLL")
    if problems:
        raise MoleflowError(f"the export graph does not reproduce the model ({', '.join(problems)}); this model's "
                            "configuration is not supported by the ONNX export")


def export_onnx(model: "MoleFlow", out_dir: str | Path, opset: int = 17) -> Path:
    """Write `out_dir/model.onnx` (self-contained) and `out_dir/export.json`; return the ONNX path.

    The graph reproduces `model.predict(images)` (routed) for normalised images (N, 3, S, S)."""
    try:
        import onnx
    except ImportError:
        raise MoleflowError("the package onnx is not installed; run `pip install onnx onnxruntime`") from None
    _check_exportable(model)
    if opset < 13:
        raise MoleflowError(f"opset {opset} is too old; use 13 or newer (default 17)")
    out_dir = Path(out_dir)
    # trace a CPU copy when the model lives elsewhere; never change the caller's modules
    src = model
    if model.device.type != "cpu":
        src = copy.copy(model)
        src.extractor = copy.deepcopy(model.extractor).cpu()
        src.flow = copy.deepcopy(model.flow).cpu()
    flow_mode = src.flow.training
    graph = ExportGraph(src).cpu().eval()
    size = model.config.data.image_size
    _self_check(graph, src)
    example = torch.zeros(2, 3, size, size)
    dynamic = {INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in OUTPUT_NAMES}}
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about static shapes: the image size is fixed
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, do_constant_folding=True)
    except MoleflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        raise MoleflowError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc
    finally:
        src.flow.train(flow_mode)
    proto = onnx.load_from_string(buffer.getvalue())
    meta = export_metadata(model, opset)
    for key, value in _metadata_strings(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "moleflow"
    proto.doc_string = "MoLE-Flow continual anomaly detector: routed image scores and anomaly maps"
    data = proto.SerializeToString()
    path = atomic_write_bytes(out_dir / ONNX_FILE, lambda fh: fh.write(data))
    info = {**meta, "onnx_file": ONNX_FILE, "onnx_sha256": hashlib.sha256(data).hexdigest(),
            "input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
    atomic_write_bytes(out_dir / EXPORT_JSON, lambda fh: fh.write(json.dumps(info, indent=1).encode()))
    return path


# ------------------------------------------------------------------------------------------ inference
def onnx_session(onnx_path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported model."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MoleflowError("the package onnxruntime is not installed; run `pip install onnxruntime`") from None
    path = Path(onnx_path)
    if not path.is_file():
        raise MoleflowError(f"{path}: ONNX model not found; export one with `moleflow export RUN_DIR --format onnx`")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
