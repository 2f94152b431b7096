"""Atomic save and load of a whole detector in one file (spec: everything to score all tasks so far).

The file holds the resolved config, the backbone's name and weight hash (not its weights: they come
from their source and are checked against the hash), the flow's shared and per-task weights, the
router's prototypes and every task's metadata and calibration.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .config import Config
from .errors import MoleflowError

if TYPE_CHECKING:
    from .detector import MoleFlow

FORMAT = "moleflow-checkpoint"
VERSION = 1


def atomic_write_bytes(path: str | Path, write) -> Path:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or an error leaves any existing file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(model: "MoleFlow", path: str | Path) -> Path:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "moleflow_version": __version__,
        "config": model.config.to_dict(),
        "backbone": {"name": model.extractor.name, "weights_sha256": model.extractor.weights_sha256,
                     "weights_source": model.extractor.weights_source},
        "task_ids": list(model.flow.task_ids),
        "base_task": model.flow.base_task,
        "flow": {k: v.detach().cpu() for k, v in model.flow.state_dict().items()},
        "router": model.router.state_dict(),
        "memory": None if model.memory is None else {k: v.detach().cpu() for k, v in model.memory.state_dict().items()},
        "tasks": model.task_info_dicts(),
    }
    return atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MoleflowError(f"{path}: checkpoint not found; train a run first (moleflow train ... --out DIR)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise MoleflowError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MoleflowError(f"{path}: not a moleflow checkpoint")
    if payload.get("version", 0) > VERSION:
        raise MoleflowError(f"{path}: written by a newer moleflow (format {payload['version']}); upgrade moleflow")
    return payload


def load_detector(path: str | Path, device: str | torch.device = "cpu",
                  backbone_weights: str | None = None) -> "MoleFlow":
    """Rebuild the detector saved at `path`; its scores equal those of the saved model exactly."""
    from .detector import MoleFlow, TaskInfo

    payload = read_checkpoint(path)
    config = Config.from_dict(payload["config"])
    if backbone_weights is not None:
        config.backbone.weights = backbone_weights
    model = MoleFlow(config, device=device)
    saved_hash = payload["backbone"]["weights_sha256"]
    if model.extractor.weights_sha256 != saved_hash:
        raise MoleflowError(
            f"{path}: the backbone weights found here ({model.extractor.weights_source}) differ from the ones "
            f"the run was trained with (sha256 {saved_hash[:12]}...); pass the same weights file")
    model.flow.base_task = payload["base_task"]
    for task in payload["task_ids"]:
        model.flow.add_task(task)
    model.flow.load_state_dict(payload["flow"], strict=True)
    model.flow.to(model.device).eval()
    model.router.load_state_dict(payload["router"])
    if model.memory is not None:
        if not payload.get("memory"):
            raise MoleflowError(f"{path}: score.source is {config.score.source} but the checkpoint has no patch memory")
        model.memory.load_banks(payload["memory"])
        model.memory.to(model.device)
    names = {f.name for f in fields(TaskInfo)}
    model.tasks = [TaskInfo(**{k: v for k, v in t.items() if k in names}) for t in payload["tasks"]]
    return model
