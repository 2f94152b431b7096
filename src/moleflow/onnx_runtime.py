"""ONNX graphs and onnxruntime sessions: what the backbone's CPU runtime, the engines and `moleflow export` share.

    graph = trace_onnx(module, example, ["images"], ["tokens"])    # bytes
    session = onnx_session(graph, threads=2)                        # or a path to an .onnx file
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from .errors import MoleflowError

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def trace_onnx(module: torch.nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str],
               opset: int = 17, instead: str = "use --engine torch") -> bytes:
    """ONNX bytes of `module` traced on `example`, with a dynamic first axis on every input and output; a
    failure says what to do `instead`."""
    dynamic = {name: {0: "M"} for name in inputs + outputs}
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about static shapes: the image size is fixed
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        raise MoleflowError(f"ONNX export of the {type(module).__name__.strip('_')} failed "
                            f"({type(exc).__name__}: {exc}); {instead}") from exc
    return buffer.getvalue()


def onnx_session(onnx_model: str | Path | bytes, threads: int | None = None, optimization: str = "all",
                 spinning: bool = True):
    """An onnxruntime CPU session for an exported model (a file, or the graph's bytes): `threads` intra-op threads
    (default: onnxruntime's choice, one per core), graph optimisation level `optimization` (disable, basic,
    extended, all); `spinning=False`: idle intra-op threads sleep instead of spin-waiting (better when other
    threads, e.g. a server's request threads, need the cores between model calls)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MoleflowError("the package onnxruntime is not installed; run `pip install onnxruntime`") from None
    path = "the traced graph" if isinstance(onnx_model, bytes) else Path(onnx_model)
    if isinstance(path, Path) and not path.is_file():
        raise MoleflowError(f"{path}: ONNX model not found; export one with `moleflow export RUN_DIR --format onnx`")
    if optimization not in OPTIMIZATION_LEVELS:
        raise MoleflowError(f"ONNX Runtime optimisation level {optimization!r}: use one of "
                            f"{', '.join(OPTIMIZATION_LEVELS)}")
    levels = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {"disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
                                        "extended": levels.ORT_ENABLE_EXTENDED,
                                        "all": levels.ORT_ENABLE_ALL}[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        source = onnx_model if isinstance(onnx_model, bytes) else str(path)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
        raise MoleflowError(f"{path}: onnxruntime cannot load this model ({' '.join(str(exc).split())[:200]}); "
                            "export it again") from None
