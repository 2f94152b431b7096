"""The model being served, and its hot reload.

    holder = ModelHolder(settings)
    served = holder.reload()          # load RUN's model (hashes verified), build its engine, warm it, swap it in
    served = holder.current           # what the next batch runs on (None until the first load succeeds)
    holder.manifest_changed()         # has RUN/model/manifest.json changed since the served model was read?

A reload builds the new model completely (loading, ONNX export of new experts, a warm-up inspection) in the
caller's thread, off the request path, and only then replaces `current` with one assignment: a batch that
already started finishes on the model it started with, and no request is dropped. A failed reload leaves
the served model in place and keeps the error (`last_error`) for /health and the POST /reload answer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.batch import Prepared
from ..engine import Engine, make_engine
from ..calibration import threshold_source
from ..errors import MoleflowError
from ..store.checkpoint import MANIFEST, find_model
from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One loaded model with its engine; `version` = the first 12 hex digits of its manifest's SHA-256."""

    model: Any  # detector.MoleFlow
    engine: Engine
    version: str
    manifest_sha256: str
    loaded_at: float
    load_seconds: float
    tasks: dict[int, Any] = field(default_factory=dict)  # task id -> TaskInfo

    def task_rows(self) -> list[dict[str, Any]]:
        """The learned products as JSON rows (GET /tasks)."""
        rows = []
        for info in self.model.tasks:
            cal = info.calibration
            rows.append({"task_id": info.task_id, "name": info.name, "classes": list(info.classes),
                         "threshold": _finite(info.threshold), "threshold_source": threshold_source(cal),
                         "false_alarm_rate": cal.get("false_alarm_rate"), "n_train": info.n_train,
                         "n_calibration": info.n_calibration,
                         "unknown_distance": _finite(self.model.router.unknown_threshold(info.task_id))})
        return rows


def _finite(value: float) -> float | None:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class ModelHolder:
    """Holds the served model of `settings.run`; `reload` replaces it atomically (one reload at a time)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.current: Served | None = None
        self.last_error: str | None = None
        self.last_attempt: dict[str, Any] | None = None
        self.failed_sha256: str | None = None  # manifest a reload failed on: not retried until it changes
        self.reloads = 0
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the manifest last hashed

    # ------------------------------------------------------------------------------ paths
    def manifest_path(self) -> Path:
        folder = find_model(self.settings.run)
        if folder.suffix == ".pt":
            raise MoleflowError(f"{folder}: a moleflow 0.1 checkpoint; run `moleflow migrate {self.settings.run}` "
                                "so that the service can watch and verify its model folder")
        return folder / MANIFEST

    def cache_dir(self) -> Path:
        if self.settings.cache_dir:
            return Path(self.settings.cache_dir)
        return self.manifest_path().parent.parent / "export" / "engine"

    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_path().read_bytes()).hexdigest()

    # ------------------------------------------------------------------------------ loading
    def _load(self) -> Served:
        from ..detector import MoleFlow

        start = time.perf_counter()
        sha = self.manifest_sha256()
        model = MoleFlow.load(self.settings.run, device="cpu", backbone_weights=self.settings.backbone_weights)
        options: dict[str, Any] = {"batch_size": self.settings.max_batch}
        if self.settings.engine == "onnx":
            options.update(cache_dir=self.cache_dir(), threads=self.settings.threads,
                           optimization=self.settings.optimization)
        elif self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        engine = make_engine(model, self.settings.engine, **options)
        size = model.config.data.image_size
        engine.inspect(Prepared.square(torch.zeros(1, 3, size, size)))  # warm-up, off the request path
        if self.settings.store and self.settings.drift_interval > 0:
            from ..drift import warm_up

            warm_up(model.tasks)  # the drift test's thresholds are simulated now, not while answering
        return Served(model=model, engine=engine, version=sha[:12], manifest_sha256=sha, loaded_at=time.time(),
                      load_seconds=time.perf_counter() - start, tasks={t.task_id: t for t in model.tasks})

    def reload(self) -> Served:
        """Load the run's model now and serve it; on failure keep the served one and raise `MoleflowError`."""
        with self._lock:
            started = time.time()
            try:
                served = self._load()
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old model serving
                message = " ".join(str(exc).split()) or type(exc).__name__
                if not isinstance(exc, MoleflowError):
                    message = f"{type(exc).__name__}: {message}"
                self.last_error = message
                try:
                    self.failed_sha256 = self.manifest_sha256()
                except (OSError, MoleflowError):
                    self.failed_sha256 = None
                self.last_attempt = {"at": started, "ok": False, "error": message}
                log.error("reload of %s failed, still serving %s: %s", self.settings.run,
                          self.current.version if self.current else "nothing", message)
                raise MoleflowError(f"reload failed ({message}); still serving "
                                    f"{'model ' + self.current.version if self.current else 'no model'}") from None
            previous = self.current
            self.current = served  # the swap: the next batch runs on the new model
            self.last_error, self.failed_sha256 = None, None
            self.reloads += previous is not None
            self.last_attempt = {"at": started, "ok": True, "version": served.version,
                                 "seconds": served.load_seconds}
            log.info("serving model %s (%d products: %s) after %.1f s", served.version, len(served.model.tasks),
                     ", ".join(t.name for t in served.model.tasks), served.load_seconds)
            return served

    def manifest_changed(self) -> bool:
        """True when the manifest's content differs from the served model's and from a manifest that
        already failed to load (its mtime and size are checked first; the hash only when they change)."""
        try:
            stat = self.manifest_path().stat()
        except (OSError, MoleflowError):
            return False
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature == self._seen:
            return False
        try:
            sha = self.manifest_sha256()
        except (OSError, MoleflowError):
            return False
        self._seen = signature
        current = self.current.manifest_sha256 if self.current else None
        return sha != current and sha != self.failed_sha256
