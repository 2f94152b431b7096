"""Every option of the service in one dataclass; uvicorn worker processes receive it as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from ..errors import MoleflowError

ENV_VAR = "MOLEFLOW_SERVE_SETTINGS"  # JSON of a ServeSettings, read by `app.app_from_env` in each worker


@dataclass
class ServeSettings:
    """What `moleflow serve` was asked for. `cache_dir` (the onnx engine's graphs) defaults to
    RUN/export/engine (`holder.ModelHolder.cache_dir`)."""

    run: str
    engine: str = "onnx"  # "onnx" (onnxruntime, CPU) or "torch"
    max_batch: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_queue: int = 256  # images waiting for the model; beyond that requests get 503
    max_images: int = 32  # images in one request
    max_pixels: int = 25_000_000  # width x height of one image (6000 x 6000 = 36 MP is refused)
    max_body_mb: float = 64.0  # bytes of one request body
    watch_interval: float = 2.0  # seconds between checks of RUN/model/manifest.json; 0 = no watching
    threads: int | None = None  # intra-op threads of the engine (default: one per core)
    optimization: str = "all"  # onnxruntime graph optimisation level
    cache_dir: str | None = None
    backbone_weights: str | None = None
    recent: int = 100  # verdicts kept for GET /verdicts and the review page
    store: str | None = None  # SQLAlchemy URL of the verdict store every verdict is recorded in; None = none
    tokens: dict[str, str] = field(default_factory=dict)  # name -> bearer token; empty = no access control
    audit_rate: float = 0.05  # share of passed parts sampled into the review queue (feedback.py)
    thumbnails: bool = False  # keep a small overlay PNG of every queued part in the store
    keep_images: str | None = None  # folder where every uploaded image is kept (by SHA-256), recorded as its path
    drift_interval: float = 60.0  # seconds between drift checks for /health; 0 = only on GET /drift
    min_pile: int = 10  # unknown parts with image files needed before GET /unknowns clusters them

    def __post_init__(self) -> None:
        from ..engine import ENGINES
        from ..onnx_runtime import OPTIMIZATION_LEVELS

        checks = [(self.engine in ENGINES, f"engine {self.engine!r}: use one of {', '.join(ENGINES)}"),
                  (self.max_batch >= 1, "--max-batch must be at least 1"),
                  (self.max_wait_ms >= 0, "--max-wait-ms must be 0 or more"),
                  (self.max_queue >= self.max_images, "--max-queue must be at least --max-images"),
                  (self.max_images >= 1, "--max-images must be at least 1"),
                  (self.max_pixels >= 1, "--max-pixels must be at least 1"),
                  (self.max_body_mb > 0, "--max-body-mb must be positive"),
                  (self.watch_interval >= 0, "--watch-interval must be 0 (off) or more seconds"),
                  (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
                  (self.optimization in OPTIMIZATION_LEVELS,
                   f"--optimization {self.optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}"),
                  (self.recent >= 0, "--recent must be 0 or more"),
                  (all(self.tokens.values()), "--token: an empty token is not accepted"),
                  (0.0 <= self.audit_rate <= 1.0, "--audit-rate must be between 0 and 1"),
                  (not (self.thumbnails or self.keep_images) or self.store,
                   "--thumbnails and --keep-images need the verdict store (not --no-store)"),
                  (self.drift_interval >= 0, "--drift-interval must be 0 (only on request) or more seconds"),
                  (self.min_pile >= 2, "--min-pile must be at least 2")]
        for ok, message in checks:
            if not ok:
                raise MoleflowError(message)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_env(cls) -> "ServeSettings":
        text = os.environ.get(ENV_VAR)
        if not text:
            raise MoleflowError(f"{ENV_VAR} is not set; start the service with `moleflow serve RUN`")
        return cls.from_json(text)
