"""Image and mask preprocessing: load, resize to a square, normalise.

Resize modes (masks follow the same geometry, nearest-neighbour):
  * `squash` (default): resize the whole image to size x size, ignoring its aspect ratio. Nothing
    is cut off, so a defect at the border of a long part (kolektor is about 500 x 1250) stays in view.
  * `letterbox`: keep the aspect ratio, pad the short side with black (mask: with normal pixels).
  * `resize_crop`: the reference's short side to `size` plus a centre crop; for square datasets only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MoleflowError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _open(path: str | Path, mode: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError:
        raise MoleflowError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MoleflowError(f"{path}: cannot read this {what} ({exc}); replace or remove the file") from None


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 3-channel RGB (grey images are replicated). Raises `MoleflowError` if unreadable."""
    return _open(path, "RGB", "image")


def load_mask(path: str | Path) -> Image.Image:
    """Open a mask as a single-channel image; any non-zero pixel is anomalous."""
    return _open(path, "L", "mask")


def _geometry(img: Image.Image, size: int, mode: str, resample: int) -> Image.Image:
    w, h = img.size
    if mode == "squash":
        return img.resize((size, size), resample)
    if mode == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new(img.mode, (size, size), 0)
        canvas.paste(img.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if mode == "resize_crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise MoleflowError(f"unknown resize mode {mode!r}; use squash, letterbox or resize_crop")


class ImageTransform:
    """PIL RGB image -> normalised float tensor (3, size, size)."""

    def __init__(self, size: int, mode: str = "squash",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.mode = size, mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Resized RGB uint8 array (size, size, 3), before normalisation (for overlays)."""
        return np.asarray(_geometry(img.convert("RGB"), self.size, self.mode, Image.Resampling.LANCZOS))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = self.to_array(img)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """Mask -> bool tensor (size, size) with the image's geometry; a pixel is anomalous if any source pixel is."""
        # area resampling, then any covered pixel counts: thin defects (cracks) survive downscaling
        arr = np.asarray(_geometry(mask.convert("L"), self.size, self.mode, Image.Resampling.BOX))
        return torch.from_numpy(arr > 0)
