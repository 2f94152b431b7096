"""The model folder: a manifest plus one safetensors file per expert, every file checked by SHA-256.

    RUN/model/manifest.json                 format, config, backbone hash, tasks (metadata), files + SHA-256
    RUN/model/shared-<sha12>.safetensors    the shared flow (trained by the first task, then frozen)
    RUN/model/task<t>-<sha12>.safetensors   task t's expert: LoRA, biases, adapter, DIA, prototype, memory
    RUN/model/task<t>-calibration-<sha12>.safetensors   its decision threshold and unknown-product limit

Tensors are stored with safetensors and metadata as JSON, so loading a run someone sent you runs no code.
File names carry the first 12 hex digits of their content's SHA-256: a save writes the new shards first,
then the manifest (atomically), then deletes shards no longer listed, so a crash at any point leaves the
previous manifest and every file it lists intact; an unchanged expert is never rewritten. Loading verifies
every listed file's hash (and the manifest's own checksum) and refuses a mismatch, naming the file.

`read_model_lazily` verifies every hash too, but of each task's expert file keeps in memory only the
router's tensors (routing needs every prototype); the rest is read by its `LazyPart` on first use, which
checks the file's hash again (it may have changed since).

Runs of moleflow 0.1 (one `model.pt`) still load, with `torch.load(weights_only=True)`; the next save of
such a run (add-task, remove-task) writes the model folder, which is then preferred; `moleflow migrate`
converts a run, checks the scores are unchanged and removes `model.pt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..errors import MoleflowError
from ..task_info import task_infos
from ..task_keys import ROUTING_PREFIX, expert_part_owner
from .atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "moleflow-model"
VERSION = 2
MODEL_DIR = "model"
MANIFEST = "manifest.json"
LEGACY_FILE = "model.pt"


_CHUNK = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (nothing kept)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256(json.dumps(body, sort_keys=True).encode())


# ------------------------------------------------------------------------------------------ paths
def find_model(path: str | Path) -> Path:
    """The model of a run: `path` may be a model folder, a run folder holding `model/`, or a legacy
    `model.pt` (or a run folder holding one)."""
    path = Path(path)
    for candidate in (path / MANIFEST, path / MODEL_DIR / MANIFEST):
        if candidate.is_file():
            return candidate.parent
    for candidate in (path, path / LEGACY_FILE):
        if candidate.is_file() and candidate.suffix == ".pt":
            return candidate
    raise MoleflowError(f"{path}: no moleflow model here (no {MODEL_DIR}/{MANIFEST}); train a run first "
                        "(moleflow train ... --out DIR)")


def run_has_model(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / MODEL_DIR / MANIFEST).is_file() or (run_dir / LEGACY_FILE).is_file()


def model_dir_of(path: str | Path) -> Path:
    """Where a save of the model found at (or meant for) `path` goes: RUN/model, or `path` itself when it is
    a model folder."""
    path = Path(path)
    if path.suffix == ".pt":
        return path.parent / MODEL_DIR
    if (path / MANIFEST).is_file() or path.name == MODEL_DIR:
        return path
    return path / MODEL_DIR


# ------------------------------------------------------------------------------------------ save
def write_model(path: str | Path, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Write a model folder: one safetensors file per part in `parts` ("shared", "task<t>",
    "task<t>-calibration") and a manifest holding `meta` (config, backbone, tasks, ...) and every file's
    SHA-256. Return the folder."""
    folder = model_dir_of(path)
    old = _read_manifest(folder) if (folder / MANIFEST).is_file() else None
    old_files = set(old["files"]) if old else set()
    files: dict[str, dict[str, Any]] = {}
    for part, state in parts.items():
        data = st_save({k: v.detach().cpu().contiguous() for k, v in state.items()})
        digest = sha256(data)
        name = f"{part}-{digest[:12]}.safetensors"
        if name not in old_files or not (folder / name).is_file():  # an unchanged part is not rewritten
            atomic_write_bytes(folder / name, lambda fh, data=data: fh.write(data))
        files[name] = {"sha256": digest, "bytes": len(data), "part": part}
    manifest = {"format": FORMAT, "version": VERSION, "moleflow_version": __version__, **meta, "files": files}
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    for name in old_files - set(files):
        (folder / name).unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------------------------------ load
def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoleflowError(f"{path}: cannot read the model manifest ({exc}); the run is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MoleflowError(f"{path}: not a moleflow model manifest")
    if manifest.get("version", 0) > VERSION:
        raise MoleflowError(f"{path}: written by a newer moleflow (format {manifest['version']}); upgrade moleflow")
    if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
        raise MoleflowError(f"{path}: the manifest's checksum does not match its content; the file was changed "
                            "or damaged; restore it from a copy of the run")
    return manifest


def read_tasks(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(the manifest's SHA-256, the learned tasks as the manifest lists them: name, threshold, calibration,
    ...) without reading any tensor (`moleflow status`); a legacy model.pt is loaded instead."""
    found = find_model(path)
    if found.suffix == ".pt":
        payload, _ = _read_legacy(found)  # its thresholds are the ones its tensors are made from
        thresholds = {t["task_id"]: float(t["threshold"]) for t in payload["tasks"]}
        return sha256_file(found), [asdict(t) for t in task_infos(payload["tasks"], thresholds)]
    manifest = _read_manifest(found)
    return sha256_file(found / MANIFEST), list(manifest.get("tasks", []))


def _unreadable(path: Path, exc: OSError) -> MoleflowError:
    return MoleflowError(f"{path}: cannot read this model file ({exc.strerror or exc}); the run is incomplete; "
                         "restore it from a copy")


def _mismatch(path: Path, since_load: bool = False) -> MoleflowError:
    when = " since the model was loaded" if since_load else ""
    return MoleflowError(f"{path}: SHA-256 does not match the manifest; the file was changed or damaged{when}; "
                         "restore it from a copy of the run")


def _read_verified(path: Path, digest: str, since_load: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, whose bytes must have SHA-256 `digest`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if sha256(data) != digest:
        raise _mismatch(path, since_load)
    try:
        return st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise MoleflowError(f"{path}: not a valid safetensors file ({exc})") from None


def read_model_files(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and all tensors of a model folder, every file verified against its SHA-256."""
    manifest = _read_manifest(folder)
    state: dict[str, torch.Tensor] = {}
    for name, entry in manifest["files"].items():
        state.update(_read_verified(folder / name, entry["sha256"]))
    return manifest, state


@dataclass(frozen=True)
class LazyPart:
    """One task's expert file, verified when the model was loaded and read again (and re-verified) by `load`."""

    task: int
    path: Path
    sha256: str
    keys: frozenset[str]  # every tensor in the file
    eager: frozenset[str]  # those already loaded with the model (the router's)
    data_bytes: int  # bytes of all its tensors

    def load(self) -> dict[str, torch.Tensor]:
        """The file's tensors that were not loaded with the model, its SHA-256 checked again."""
        state = _read_verified(self.path, self.sha256, since_load=True)
        return {k: v for k, v in state.items() if k not in self.eager}


def _open_lazily(path: Path, task: int, digest: str) -> tuple[LazyPart, dict[str, torch.Tensor]]:
    """Verify an expert file by streaming it; return its `LazyPart` and the router's tensors, read alone."""
    try:
        if sha256_file(path) != digest:
            raise _mismatch(path)
        with open(path, "rb") as fh:
            header_bytes = int.from_bytes(fh.read(8), "little")
        data_bytes = path.stat().st_size - 8 - header_bytes  # safetensors tensors fill the rest, without holes
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        with safe_open(str(path), "pt") as fh:
            keys = frozenset(fh.keys())
            # cloned: a tensor of safe_open may share the file's memory map
            eager = {k: fh.get_tensor(k).clone() for k in sorted(keys) if k.startswith(ROUTING_PREFIX)}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise MoleflowError(f"{path}: not a valid safetensors file ({exc})") from None
    return LazyPart(task, path, digest, keys, frozenset(eager), data_bytes), eager


def read_model_files_lazily(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[int, LazyPart]]:
    """Like `read_model_files`, every file verified, but of each task's expert file only the router's tensors are
    loaded; the rest is returned as the task's `LazyPart` (task id -> part)."""
    manifest = _read_manifest(folder)
    state: dict[str, torch.Tensor] = {}
    pending: dict[int, LazyPart] = {}
    for name, entry in manifest["files"].items():
        task = expert_part_owner(str(entry.get("part", "")))
        if task is None:  # the shared flow and the calibrations: small, and needed at once
            state.update(_read_verified(folder / name, entry["sha256"]))
            continue
        part, eager = _open_lazily(folder / name, task, entry["sha256"])
        pending[part.task] = part
        state.update(eager)
    return manifest, state, pending


def _read_legacy(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A moleflow 0.1 `model.pt`, loaded without executing code, as (manifest-like dict, inspector state)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise MoleflowError(f"{path}: cannot read this checkpoint safely ({type(exc).__name__}); it may be damaged "
                            "or not a moleflow file") from None
    if not isinstance(payload, dict) or payload.get("format") != "moleflow-checkpoint":
        raise MoleflowError(f"{path}: not a moleflow checkpoint")
    state = {f"flow.{k}": v for k, v in payload["flow"].items()}
    for t, proto in payload["router"].items():
        state[f"router.mean_{t}"] = proto["mean"]
        state[f"router.precision_{t}"] = proto["precision"]
        state[f"router.unknown_{t}"] = torch.tensor(float(proto["unknown_threshold"]), dtype=torch.float64)
    for k, v in (payload.get("memory") or {}).items():
        state[f"memory.{k}"] = v
    for info in payload["tasks"]:
        state[f"threshold_{info['task_id']}"] = torch.tensor(float(info["threshold"]), dtype=torch.float64)
    log.warning("%s: a moleflow 0.1 single-file checkpoint without integrity hashes; `moleflow migrate %s` "
                "converts it to the checked model folder", path, path.parent)
    return payload, state


def read_model(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(where it was found, manifest, every tensor) of the model at `path`, verified (see `find_model`)."""
    found = find_model(path)
    manifest, state = _read_legacy(found) if found.suffix == ".pt" else read_model_files(found)
    return found, manifest, state


def read_model_lazily(path: str | Path
                      ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[int, LazyPart]]:
    """`read_model`, but the experts of a model folder are left to read on first use (`read_model_files_lazily`);
    a legacy `model.pt` is read whole (no parts)."""
    found = find_model(path)
    if found.suffix == ".pt":
        return (found, *_read_legacy(found), {})
    return (found, *read_model_files_lazily(found))
