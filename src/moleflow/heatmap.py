"""The heat-map rule, in one place: how a pixel anomaly map is coloured and laid over its image.

    product_norm(calibration, amap)        the colour range of a product's maps: median to maximum of its
                                           calibration images' maps (falls back to this map's own range)
    heat_rgb(amap, norm)                   (S, S, 3) uint8: the map coloured with jet under `norm`
    overlay_tile(image, amap, mask, norm, size)   the map blended over the image, mask outline drawn

`moleflow predict`, `moleflow serve` and the report all draw through these functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from PIL import Image as PILImage


def product_norm(calibration: Mapping[str, Any], amap: np.ndarray) -> Normalize:
    """A product's normal range of map values (`normal_pixel_median` to `normal_pixel_max` of its calibration
    images), so that a map looks calm when the part is normal; the map's own min/max where not calibrated."""
    amap = np.asarray(amap)
    vmin = float(calibration.get("normal_pixel_median", float(amap.min())))
    vmax = max(float(calibration.get("normal_pixel_max", float(amap.max()))), vmin + 1e-6)
    return Normalize(vmin, vmax)


def heat_rgb(amap: np.ndarray, norm: Normalize, cmap: str = "jet") -> np.ndarray:
    """(S, S, 3) uint8: `amap` (S, S) coloured with `cmap` under `norm` (nan drawn as the range's low end)."""
    amap = np.asarray(amap, dtype=np.float32)
    return (colormaps[cmap](np.clip(norm(np.nan_to_num(amap, nan=norm.vmin)), 0, 1))[..., :3] * 255).astype(np.uint8)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """An (S,S,3) uint8 image resized to (size,size,3) (bilinear)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(PILImage.fromarray(rgb).resize((size, size), PILImage.Resampling.BILINEAR))


def _mask_tile(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask resized to (size,size) (nearest)."""
    if mask.shape == (size, size):
        return mask
    return np.asarray(PILImage.fromarray(mask.astype(np.uint8) * 255).resize(
        (size, size), PILImage.Resampling.NEAREST)) > 127


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def overlay_tile(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, norm: Normalize,
                 size: int, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """(size,size,3) uint8: `amap` coloured with `cmap` under `norm`, blended over `image`, with the
    outline of `mask` (if it has any pixel) drawn white on a black rim."""
    amap = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=norm.vmin, posinf=norm.vmax, neginf=norm.vmin)
    heat = (colormaps[cmap](np.clip(norm(amap), 0, 1))[..., :3] * 255).astype(np.float32)
    blend = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * heat
    out = resize_rgb(np.clip(blend + 0.5, 0, 255).astype(np.uint8), size).copy()
    if mask is not None and np.any(mask):
        m = _mask_tile(np.asarray(mask, dtype=bool), size)
        inner = _dilate(m) & ~m | (m & ~_erode(m))
        outer = _dilate(_dilate(m)) & ~_dilate(m)
        out[outer] = 0
        out[inner] = 255
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary erosion."""
    return ~_dilate(~mask)
