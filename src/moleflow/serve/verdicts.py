"""One image's inspection -> its JSON verdict; heat map and overlay as base64 PNG when asked.

A verdict: product (or "unknown product"), nearest product, task id, score, threshold, threshold source,
decision (normal / anomalous / unknown product), unknown-product flag, router distance, the image's size and
the model version that produced it. The rule is `decisions.verdict_fields`, as in `moleflow predict`.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..decisions import verdict_fields
from ..heatmap import heat_rgb, overlay_tile, product_norm
from .holder import Served

THUMBNAIL = 160  # largest side of a kept thumbnail, pixels (kept as a 256-colour PNG: about a third of the bytes)


@dataclass
class ImageResult:
    """What the model thread returns for one image (CPU values)."""

    task_id: int
    score: float
    threshold: float
    known: bool
    anomalous: bool
    router_distance: float
    map: np.ndarray  # (S, S) float32 pixel anomaly map
    served: Served  # the model that produced it
    route_margin: float | None = None  # decisions.route_fields
    route_ambiguous: bool | None = None
    alternatives: list[int] = field(default_factory=list)  # other plausible products' task ids (ambiguous routing)


def _number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def verdict(result: ImageResult, name: str, width: int, height: int) -> dict[str, Any]:
    """The JSON verdict of one image (`decisions.verdict_fields`; non-finite numbers as null)."""
    tasks = result.served.tasks
    route = {"route_margin": result.route_margin, "route_ambiguous": result.route_ambiguous}
    fields = verdict_fields(tasks[result.task_id], result.known, result.anomalous, _number(result.score),
                            _number(result.threshold), _number(result.router_distance), route,
                            [tasks[t].name for t in result.alternatives])
    return {"file": name, **fields, "width": width, "height": height, "model": result.served.version}


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_images(result: ImageResult, image: Image.Image) -> dict[str, str]:
    """{"heatmap_png", "overlay_png"}: the pixel map coloured on the product's normal range and blended over the
    image as the model saw it (size S x S), drawn by the one heat-map rule (`heatmap.py`). Base64 PNG strings."""
    amap = np.asarray(result.map, dtype=np.float32)
    norm = product_norm(result.served.tasks[result.task_id].calibration, amap)
    picture = result.served.model.transform.to_array(image)
    overlay = overlay_tile(picture, amap, None, norm, len(picture))
    return {"heatmap_png": _png_base64(heat_rgb(amap, norm)), "overlay_png": _png_base64(overlay)}


def thumbnail_png(overlay_b64: str, size: int = THUMBNAIL) -> tuple[bytes, int, int]:
    """A base64 overlay PNG (`verdicts.heat_images`) shrunk to at most `size` pixels: (png, width, height)."""
    image = Image.open(io.BytesIO(base64.b64decode(overlay_b64))).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.quantize(256).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), image.width, image.height
