"""Synthetic anomalies pasted into real normal images, with masks of what was changed (for `moleflow tune`).

    image, mask = paste_anomaly(normal (H, W, 3) uint8, donor (H', W', 3) uint8, kind, rng)

Kinds: the painted defects of `data.synthetic` (scratch, spot, hole, crack, stain, missing) and
`cutpaste`, a rectangle cut from another normal image of the same product (the donor), turned by a
multiple of 90 degrees and pasted at a random place (CutPaste, Li et al. 2021). The mask marks exactly
the pixels that changed, so it never claims a pixel that looks normal.
"""

from __future__ import annotations

import numpy as np

from ..errors import MoleflowError
from .synthetic import AREA_RANGE, DEFECT_KINDS, apply_defect

ANOMALY_KINDS = DEFECT_KINDS + ("cutpaste",)


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
    if kind not in ANOMALY_KINDS:
        raise MoleflowError(f"unknown anomaly kind {kind!r}; choose from {', '.join(ANOMALY_KINDS)}")
    for _ in range(20):
        out, mask = (cut_paste(image, donor, rng, severity) if kind == "cutpaste"
                     else apply_defect(image, kind, rng, severity))
        if mask.any():
            return out, mask
    return apply_defect(image, "hole", rng, max(severity, 1.0))
