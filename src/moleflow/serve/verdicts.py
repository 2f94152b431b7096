"""One image's inspection -> its JSON verdict; heat map and overlay as base64 PNG when asked.

A verdict: product (or "unknown product"), nearest product, task id, score, threshold, threshold source,
decision (normal / anomalous / unknown product), unknown-product flag, router distance, the image's size and
the model version that produced it. The decision rule is `decisions.decision`, as in `moleflow predict`.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..calibration import threshold_source
from ..decisions import UNKNOWN, decision  # noqa: F401 - the one verdict rule (predict, watch, serve)
from .holder import Served


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
    """The JSON verdict of one image."""
    info = result.served.tasks[result.task_id]
    return {"file": name, "product": info.name if result.known else UNKNOWN, "nearest_product": info.name,
            "task_id": result.task_id, "score": _number(result.score), "threshold": _number(result.threshold),
            "threshold_source": threshold_source(info.calibration),
            "decision": decision(result.known, result.anomalous), "unknown_product": not result.known,
            "router_distance": _number(result.router_distance), "route_margin": result.route_margin,
            "route_ambiguous": result.route_ambiguous,
            "plausible_products": [result.served.tasks[t].name for t in result.alternatives],
            "width": width, "height": height,
            "model": result.served.version}


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_images(result: ImageResult, image: Image.Image) -> dict[str, str]:
    """{"heatmap_png", "overlay_png"}: the pixel map coloured on the product's normal range (median to max of
    its calibration images' maps, as `moleflow predict` and the report), and the map blended over the image
    as the model saw it (size S x S). Base64 PNG strings."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from ..report.figures import overlay_tile

    served = result.served
    amap = np.asarray(result.map, dtype=np.float32)
    cal = served.tasks[result.task_id].calibration
    vmin = float(cal.get("normal_pixel_median", float(amap.min())))
    vmax = max(float(cal.get("normal_pixel_max", float(amap.max()))), vmin + 1e-6)
    norm = Normalize(vmin, vmax)
    heat = (colormaps["jet"](np.clip(norm(np.nan_to_num(amap, nan=vmin)), 0, 1))[..., :3] * 255).astype(np.uint8)
    picture = served.model.transform.to_array(image)
    overlay = overlay_tile(picture, amap, None, norm, len(picture))
    return {"heatmap_png": _png_base64(heat), "overlay_png": _png_base64(overlay)}
