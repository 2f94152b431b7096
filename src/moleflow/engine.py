"""Inference engines: the one routed inspection, run by PyTorch or by ONNX Runtime.

    engine = make_engine(model, "onnx", cache_dir="RUN/export/engine")   # or "torch"
    out = engine.inspect(model.prepare(images))     # an inspector.Inspection: scores (N,), maps (N, S, S), ...

Both run the one inspection pipeline (pipeline.py, what `MoleFlow.predict` runs); they differ in its backend,
what runs the two neural pieces. `torch` runs the Inspector's own modules (`pipeline.TorchBackend`).
`onnx` runs them as ONNX graphs in onnxruntime (CPU):
    features.onnx      tiles (M, 3, S, S) -> tokens (M, h, w, D), routing features (M, D)
                       (the frozen backbone: about two thirds of the CPU time)
    expert<t>.onnx     tokens (B, h, w, D) -> patch scores (B, h, w) of task t
                       (`Inspector.patch_scores`: the flow's NLL, plus the patch memory with flow+memory)
Everything between and after the graphs is the pipeline's and the Inspector's own code: the router
(`inspector.router`, the one Mahalanobis formula, tiles of one image routed together), the choice of expert per
tile, stitching tiles back (`inspector.outputs`: image scores, pixel maps) and the thresholds. So
`data.tiling=aspect`, both score sources and every score mode give the torch engine's answer up to float rounding
(tested), and each tile runs only its routed expert: the cost does not grow with the number of products. (The
single graph of `export.export_onnx`, traced from `Inspector.forward`, runs every expert on every image and cannot
tile; it stays the portable artifact for consumers without moleflow.)

Graphs are cached in `cache_dir` under names that carry a hash of what they were traced from (backbone
weights and settings; the shared flow, the task's expert and the score settings), so adding a product exports
only its expert and an unchanged product is never re-exported. The engine makes an expert's graph and
session when the first tile is routed to it, so a model of many products (loaded lazily) reads, exports and
holds only the experts it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .data.batch import Prepared
from .errors import MoleflowError
from .onnx_runtime import trace_onnx
from .inspector import Inspection, Inspector
from .pipeline import TorchBackend, inspect
from .store.atomic import atomic_write_bytes
from .task_keys import scores_patches

if TYPE_CHECKING:
    from .detector import MoleFlow

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx")
QUANTIZE = ("none", "int8")
GRAPH_VERSION = 1  # bump when the graphs' inputs/outputs change: old cache entries are then not reused


class Engine(Protocol):
    """Routes, scores and decides prepared images."""

    name: str
    model: "MoleFlow"

    def inspect(self, prep: Prepared, task_ids: Sequence[int] | None = None) -> Inspection: ...


# ------------------------------------------------------------------------------------------ torch
class TorchEngine:
    """The inspection pipeline with its PyTorch backend (the reference)."""

    name = "torch"

    def __init__(self, model: "MoleFlow", batch_size: int = 32) -> None:
        self.model, self.batch_size = model, batch_size
        self.backend = TorchBackend(model.inspector, batch_size)

    def inspect(self, prep: Prepared, task_ids: Sequence[int] | None = None) -> Inspection:
        return inspect(self.model.inspector, self.backend, prep, task_ids)


# ------------------------------------------------------------------------------------------ graphs
class _FeaturesGraph(nn.Module):
    """Tiles (M, 3, S, S) -> tokens (M, h, w, D) float32, routing features (M, D) float32."""

    def __init__(self, inspector: Inspector) -> None:
        super().__init__()
        self.inspector = inspector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, routing = self.inspector.features(images)
        return tokens.float(), routing.float()


class _ExpertGraph(nn.Module):
    """Tokens (B, h, w, D) -> patch scores (B, h, w) float32 of one task."""

    def __init__(self, inspector: Inspector, task: int) -> None:
        super().__init__()
        self.inspector, self.task = inspector, task

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inspector.patch_scores(tokens, self.task).float()


def _state_hash(state: dict[str, torch.Tensor], extra: dict) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _common_key(opset: int) -> dict:
    from . import __version__

    return {"version": GRAPH_VERSION, "moleflow": __version__, "torch": torch.__version__, "opset": opset}


def features_key(model: "MoleFlow", opset: int, quantize: str) -> str:
    """Cache key (16 hex digits) of the features graph: backbone weights and settings."""
    cfg = model.config
    return _state_hash({}, {**_common_key(opset), "quantize": quantize, "backbone": asdict(cfg.backbone),
                            "router": asdict(cfg.router), "weights": model.extractor.weights_sha256,
                            "size": cfg.data.image_size})


def expert_key(model: "MoleFlow", task: int, opset: int) -> str:
    """Cache key (16 hex digits) of task `task`'s expert graph: what it is traced from, the shared flow and its
    expert (read if still pending; no other expert is)."""
    cfg = model.config
    used = {k: v for k, v in model.inspector.expert_state(task).items() if scores_patches(k)}
    return _state_hash(used, {**_common_key(opset), "task": task, "model": asdict(cfg.model),
                              "score": asdict(cfg.score)})


def graph_keys(model: "MoleFlow", opset: int, quantize: str) -> dict[str, str]:
    """Cache key of each graph: "features" and one per task id (str) -> 16 hex digits."""
    keys = {"features": features_key(model, opset, quantize)}
    for task in model.inspector.task_ids:
        keys[str(task)] = expert_key(model, task, opset)
    return keys


def _check_engine_model(model: "MoleFlow", quantize: str) -> None:
    if quantize not in QUANTIZE:
        raise MoleflowError(f"quantize {quantize!r}: use one of {', '.join(QUANTIZE)}")
    if not model.tasks:
        raise MoleflowError("the model has learned no task yet; nothing to export")
    model.inspector.check_complete()
    if model.device.type != "cpu":
        raise MoleflowError("the onnx engine exports from a model on the CPU; load it with device cpu")


def export_features_graph(model: "MoleFlow", cache: Path, opset: int, quantize: str) -> Path:
    """Write (or reuse) the features graph in `cache`; return its path."""
    size = model.config.data.image_size
    path = cache / f"features-{features_key(model, opset, quantize)}.onnx"
    if not path.is_file():
        data = trace_onnx(_FeaturesGraph(model.inspector), torch.zeros(2, 3, size, size), ["images"],
                      ["tokens", "routing"], opset)
        if quantize == "int8":
            data = _quantize_int8(data)
        atomic_write_bytes(path, lambda fh: fh.write(data))
        log.info("exported the backbone graph: %s", path)
    return path


def export_expert_graph(model: "MoleFlow", task: int, cache: Path, opset: int) -> Path:
    """Write (or reuse) task `task`'s expert graph in `cache` (its expert read first if pending); return its path."""
    (h, w), dim = model.grid, model.extractor.embed_dim
    path = cache / f"expert{task}-{expert_key(model, task, opset)}.onnx"
    if not path.is_file():
        example = torch.randn(2, h, w, dim, generator=torch.Generator().manual_seed(0))
        data = trace_onnx(_ExpertGraph(model.inspector, task), example, ["tokens"], ["patch_scores"], opset)
        atomic_write_bytes(path, lambda fh, data=data: fh.write(data))
        log.info("exported the expert graph of task %d: %s", task, path)
    return path


def export_graphs(model: "MoleFlow", cache_dir: str | Path, opset: int = 17, quantize: str = "none"
                  ) -> dict[str, Path]:
    """Write (or reuse) the features graph and one expert graph per task in `cache_dir`; return their paths
    keyed "features" and str(task id). `quantize="int8"`: the backbone's weights as dynamic int8."""
    _check_engine_model(model, quantize)
    cache = Path(cache_dir)
    paths = {"features": export_features_graph(model, cache, opset, quantize)}
    for task in model.inspector.task_ids:
        paths[str(task)] = export_expert_graph(model, task, cache, opset)
    return paths


def _quantize_int8(data: bytes) -> bytes:
    """Dynamic int8 quantisation (weights int8, activations quantised at run time) of a float graph."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise MoleflowError("onnxruntime is not installed; run `pip install onnxruntime`") from None
    with tempfile.TemporaryDirectory(prefix="moleflow-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
        return dst.read_bytes()


# ------------------------------------------------------------------------------------------ onnx engine
class OnnxEngine:
    """The routed inspection with the backbone and the experts in onnxruntime (see the module docstring)."""

    name = "onnx"

    def __init__(self, model: "MoleFlow", cache_dir: str | Path | None = None, threads: int | None = None,
                 optimization: str = "all", quantize: str = "none", batch_size: int = 32, opset: int = 17,
                 expert_batch: int = 4, spinning: bool = False) -> None:
        from .onnx_runtime import onnx_session

        self.model, self.batch_size, self.quantize, self.opset = model, batch_size, quantize, opset
        # idle onnxruntime threads sleep rather than spin (`spinning=False`): measured faster when other threads
        # (a server's request threads, other processes) share the cores, see BENCHMARKS.md
        # tiles per expert call: with a patch memory, one call holds a (tiles * h * w, memory size) distance
        # matrix (4 tiles at 28 x 28 against 20,000 tokens: 250 MB); larger calls are no faster
        self.expert_batch = expert_batch
        self._tmp = None
        if cache_dir is None:  # a private folder, deleted with the engine
            self._tmp = tempfile.TemporaryDirectory(prefix="moleflow-onnx-")
            cache_dir = self._tmp.name
        _check_engine_model(model, quantize)
        self.cache = Path(cache_dir)
        self._session_options = (threads, optimization, spinning)
        self.paths = {"features": export_features_graph(model, self.cache, opset, quantize)}
        self.features_session = onnx_session(self.paths["features"], *self._session_options)
        pending = set(model.inspector.pending_tasks)
        for task in model.inspector.task_ids:  # experts in memory already: exported now (a failure shows here)
            if task not in pending:
                self.paths[str(task)] = export_expert_graph(model, task, self.cache, opset)
        self.experts: dict[int, Any] = {}  # task id -> session, opened when the first tile is routed to it

    def _expert(self, task: int) -> Any:
        """Task `task`'s onnxruntime session, opened on first use; a lazily loaded expert is read and its graph
        exported (or found in the cache) then."""
        if task not in self.experts:
            from .onnx_runtime import onnx_session

            if str(task) not in self.paths:
                self.paths[str(task)] = export_expert_graph(self.model, task, self.cache, self.opset)
            self.experts[task] = onnx_session(self.paths[str(task)], *self._session_options)
        return self.experts[task]

    # the pipeline's neural backend (pipeline.NeuralBackend)
    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles (M, 3, S, S) -> tokens (M, h, w, D), routing features (M, D): the features graph."""
        tokens, routing = [], []
        for chunk in pixels.split(self.batch_size):
            t, r = self.features_session.run(None, {"images": np.ascontiguousarray(chunk.numpy(), dtype=np.float32)})
            tokens.append(torch.from_numpy(t))
            routing.append(torch.from_numpy(r))
        return torch.cat(tokens), torch.cat(routing)

    def expert_scores(self, tokens: torch.Tensor, index: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Patch scores (M, h, w): row i scored by the expert graph of tasks[index[i]] only."""
        out = torch.empty(tokens.shape[:3], dtype=torch.float32)
        for i in index.unique().tolist():
            rows = (index == i).nonzero().squeeze(1)
            for chunk in rows.split(self.expert_batch):
                (patch,) = self._expert(tasks[i]).run(None, {"tokens": tokens[chunk].numpy()})
                out[chunk] = torch.from_numpy(patch)
        return out

    def inspect(self, prep: Prepared, task_ids: Sequence[int] | None = None) -> Inspection:
        """The inspection pipeline (routed, or with oracle `task_ids` (N,)), this engine its neural backend."""
        return inspect(self.model.inspector, self, prep, task_ids)


def make_engine(model: "MoleFlow", kind: str = "torch", **options) -> Engine:
    """An engine of `kind` ("torch" or "onnx") for `model`; `options` go to the engine's constructor
    (onnx: cache_dir, threads, optimization, quantize, batch_size; torch: batch_size)."""
    if kind == "torch":
        return TorchEngine(model, options.get("batch_size", 32))
    if kind == "onnx":
        return OnnxEngine(model, **options)
    raise MoleflowError(f"engine {kind!r}: use one of {', '.join(ENGINES)}")
