"""Synthetic anomalies pasted into real normal images, with masks of what was changed (for `moleflow tune`).

    image, mask = paste_anomaly(normal (H, W, 3) uint8, donor (H', W', 3) uint8, kind, rng)

Three sets of kinds (`ANOMALY_SETS`):
* `painted`: the painted defects of `data.synthetic` (scratch, spot, hole, crack, stain, missing) and
  `cutpaste`, a rectangle cut from another normal image of the same product (the donor), turned by a
  multiple of 90 degrees and pasted at a random place (CutPaste, Li et al. 2021);
* `subtle`: texture-preserving changes inside an irregular blob (smoothed noise around a random centre,
  the shape DRAEM draws with Perlin noise; Zavrtanik et al. 2021): `blend`, the product's own texture
  (the donor, turned and moved) blended in with weight `severity`; `shift`, the image's own content
  displaced by 1-5 % of its size (a small structural misalignment); `tint`, brightness changed by
  8-18 % (a low-contrast stain);
* `faint`: the kinds of `painted`, drawn at a lower contrast by `moleflow tune` (`tuning.SEVERITY`).
The mask marks exactly the pixels that changed, so it never claims a pixel that looks normal.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import MoleflowError
from .synthetic import AREA_RANGE, DEFECT_KINDS, apply_defect

ANOMALY_KINDS = DEFECT_KINDS + ("cutpaste",)
SUBTLE_KINDS = ("blend", "shift", "tint")
ANOMALY_SETS = {"painted": ANOMALY_KINDS, "subtle": SUBTLE_KINDS, "faint": ANOMALY_KINDS}


def noise_blob(shape: tuple[int, int], rng: np.random.Generator,
               area_range: tuple[float, float] = AREA_RANGE) -> np.ndarray:
    """An irregular blob (H, W) bool covering a share of the image drawn from `area_range`: white noise smoothed
    at 2-6 % of the short side, weighted by a Gaussian around a random centre, its top share kept."""
    h, w = shape
    side = min(h, w)
    field = gaussian_filter(rng.standard_normal((h, w)), sigma=rng.uniform(0.02, 0.06) * side, mode="wrap")
    field /= field.std() + 1e-12
    area = rng.uniform(*area_range)
    radius = np.sqrt(area * h * w / np.pi)
    cy, cx = rng.uniform(radius, max(radius, h - radius)), rng.uniform(radius, max(radius, w - radius))
    yy, xx = np.ogrid[:h, :w]
    weight = -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2)  # log of a Gaussian bump
    score = weight + 0.5 * field
    return score >= np.quantile(score, 1.0 - area)


def subtle_anomaly(image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator,
                   severity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One `subtle` anomaly (`blend`, `shift` or `tint`, see the module doc) in `image` (uint8 (H, W, 3));
    `donor` (uint8, the same shape) is another normal image of the product. Returns the image and the mask of
    the changed pixels."""
    h, w = image.shape[:2]
    blob = noise_blob((h, w), rng)
    src = image.astype(np.float32)
    if kind == "blend":
        turned = np.rot90(donor, 2 * int(rng.integers(0, 2)))  # 0 or 180 degrees keeps the shape
        moved = np.roll(turned, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1)).astype(np.float32)
        changed = src + min(1.0, severity) * (moved - src)
    elif kind == "shift":
        step = (0.01 + 0.05 * min(1.0, severity)) * min(h, w)
        angle = rng.uniform(0, 2 * np.pi)
        changed = np.roll(src, (int(round(step * np.sin(angle))), int(round(step * np.cos(angle)))), axis=(0, 1))
    elif kind == "tint":
        changed = src * (1.0 + rng.choice([-1.0, 1.0]) * 0.25 * min(1.0, severity))
    else:
        raise MoleflowError(f"unknown subtle anomaly kind {kind!r}; choose from {', '.join(SUBTLE_KINDS)}")
    out = image.copy()
    out[blob] = np.clip(np.rint(changed[blob]), 0, 255).astype(np.uint8)
    return out, np.any(out != image, axis=-1)


def cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
              severity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Paste a turned rectangle of `donor` into `image` (both uint8 (H, W, 3)), blended with weight
    `severity` (1: opaque); mask = the changed pixels (H, W)."""
    h, w = image.shape[:2]
    area = rng.uniform(*AREA_RANGE) * h * w
    aspect = rng.uniform(0.3, 3.0)
    ph = int(np.clip(round(np.sqrt(area * aspect)), 4, h // 2))
    pw = int(np.clip(round(area / max(ph, 1)), 4, w // 2))
    turns = int(rng.integers(0, 4))
    src_h, src_w = (pw, ph) if turns % 2 else (ph, pw)
    dh, dw = donor.shape[:2]
    if dh < src_h or dw < src_w:
        raise MoleflowError(f"donor image {dw}x{dh} is smaller than the patch {src_w}x{src_h}")
    sy, sx = int(rng.integers(0, dh - src_h + 1)), int(rng.integers(0, dw - src_w + 1))
    patch = np.rot90(donor[sy:sy + src_h, sx:sx + src_w], turns)
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = image.copy()
    region = out[y:y + ph, x:x + pw].astype(np.float32)
    blend = region + min(1.0, severity) * (patch.astype(np.float32) - region)
    out[y:y + ph, x:x + pw] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    mask = np.any(out != image, axis=-1)
    return out, mask


def paste_anomaly(image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator,
                  severity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of `kind` in `image` (uint8 (H, W, 3)); returns the image (uint8) and its bool mask (H, W).

    A paste that changes no pixel (a cut-paste of a flat region onto the same flat region) is retried."""
    if kind not in ANOMALY_KINDS + SUBTLE_KINDS:
        raise MoleflowError(f"unknown anomaly kind {kind!r}; choose from {', '.join(ANOMALY_KINDS + SUBTLE_KINDS)}")
    for _ in range(20):
        if kind in SUBTLE_KINDS:
            out, mask = subtle_anomaly(image, donor, kind, rng, severity)
        else:
            out, mask = (cut_paste(image, donor, rng, severity) if kind == "cutpaste"
                         else apply_defect(image, kind, rng, severity))
        if mask.any():
            return out, mask
    return apply_defect(image, "hole", rng, max(severity, 1.0))
