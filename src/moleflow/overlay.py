"""Anomaly-map overlays: a colour map blended over the image, for predict outputs and reports."""

from __future__ import annotations

import numpy as np


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 colours, values clipped to [vmin, vmax]."""
    from matplotlib import colormaps

    scale = max(vmax - vmin, 1e-12)
    norm = np.clip((amap - vmin) / scale, 0.0, 1.0)
    return (colormaps[cmap](norm)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45,
            mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map over `image` (H, W, 3) uint8; where the map is at or below vmin the image
    shows through untinted. An optional ground-truth `mask` (H, W) is outlined in white."""
    colours = colorize(amap, vmin, vmax).astype(np.float32)
    strength = alpha * np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)[..., None] ** 0.5
    out = image.astype(np.float32) * (1 - strength) + colours * strength
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out.clip(0, 255).astype(np.uint8)
