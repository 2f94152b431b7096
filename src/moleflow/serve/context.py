"""What one app's routes share: its settings, model holder, batcher, recent verdicts, recorder and caches.

Built once by `app.create_app` and kept on `app.state.context`; a route gets it with `Depends(context)`.
Nothing is global, so tests and uvicorn workers each build their own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .batcher import Batcher
from .holder import ModelHolder, Served
from .recorder import VerdictRecorder
from .settings import ServeSettings
from .uploads import UploadError


@dataclass
class ServeContext:
    """One app's state (see the module docstring)."""

    settings: ServeSettings
    holder: ModelHolder
    batcher: Batcher
    store: Any = None  # store.verdicts.VerdictStore, or None (--no-store)
    recorder: VerdictRecorder | None = None
    recent: deque = field(default_factory=deque)  # the most recent verdicts, newest first
    drift: dict[str, Any] = field(default_factory=lambda: {"checked_at": None, "alert": [], "error": None,
                                                           "model": None})
    rendered: dict[tuple[int, str], bytes] = field(default_factory=dict)  # (verdict id, model) -> overlay PNG
    clusters: dict[tuple, dict[str, Any]] = field(default_factory=dict)  # (verdict ids, model) -> clusters

    def served_or_503(self) -> Served:
        """The model being served, or a 503 saying why there is none."""
        served = self.holder.current
        if served is None:
            why = f"the model could not be loaded: {self.holder.last_error}" if self.holder.last_error else \
                "the model is still loading; retry in a few seconds (GET /ready)"
            raise UploadError(503, why)
        return served

    def need_store(self) -> Any:
        """The verdict store, or a 404 saying the service runs without one."""
        if self.store is None:
            raise UploadError(404, "no verdict store: the service was started with --no-store, so there is nothing "
                                   "to review; start it without --no-store")
        return self.store

    def learned(self) -> list[str]:
        """The names of the served model's products ([] while loading)."""
        served = self.holder.current
        return [t.name for t in served.model.tasks] if served else []


def context(request: Request) -> ServeContext:
    """The app's context (a FastAPI dependency)."""
    return request.app.state.context


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    """The one error body: `{"error": "one line"}` (plus `extra` fields)."""
    return JSONResponse({"error": " ".join(str(message).split()), **extra}, status_code=status)
