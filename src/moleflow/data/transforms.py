"""Image and mask preprocessing: load, resize to a square, normalise.

Resize modes (masks follow the same geometry, nearest-neighbour):
  * `squash` (default): resize the whole image to size x size, ignoring its aspect ratio. Nothing
    is cut off, so a defect at the border of a long part (kolektor is about 500 x 1250) stays in view.
  * `letterbox`: keep the aspect ratio, pad the short side with black (mask: with normal pixels).
  * `resize_crop`: the reference's short side to `size` plus a centre crop; for square datasets only.

Files as industrial cameras write them (16-bit grey PNG/TIFF, float TIFF, palette, CMYK, with alpha) are
read to 8-bit RGB by `to_rgb8`, which refuses what it cannot read faithfully rather than clip it.
Masks: any non-zero raw value (any bit depth) is anomalous (`mask_to_l`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MoleflowError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# 8-bit modes PIL converts to RGB itself (alpha is dropped, not composited; palettes are looked up)
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                              "YCbCr", "LAB", "HSV"})
_VIA = {"La": "LA"}  # modes PIL cannot convert to RGB directly
_FIX = "convert it to an 8-bit RGB or grey PNG"


def _refuse(path: str | Path | None, mode: str, why: str) -> MoleflowError:
    name = path if path is not None else "image"
    return MoleflowError(f"{name}: cannot use this image (PIL mode {mode}: {why}); {_FIX}")


def _grey16_to_8(values: np.ndarray) -> Image.Image:
    """0..65535 -> 0..255 as value / 257, rounded (65535 -> 255, 257 -> 1): every level is kept in order."""
    return Image.fromarray(np.rint(values.astype(np.float32) / 257.0).astype(np.uint8), "L")


def to_rgb8(img: Image.Image, path: str | Path | None = None) -> Image.Image:
    """Any image as industrial cameras and image tools write it -> 8-bit RGB; `path` names it in errors.

    Rules per PIL mode:
      * 8-bit modes (`1`, `L`, `LA`, `P`, `PA`, `RGB`, `RGBA`, `CMYK`, `YCbCr`, ...): PIL's conversion;
        grey is replicated to 3 channels, palettes are looked up, alpha is dropped (not composited).
      * 16-bit grey (`I;16`, `I;16B`, `I;16L`, `I;16N`; 16-bit PNG/TIFF): the range 0..65535 is scaled to
        0..255 as value / 257, rounded (PIL's own conversion clips everything above 255 to white).
      * `I` (32-bit integer, what older Pillow makes of 16-bit PNGs): read as 16-bit, same scaling;
        refused if any value is negative or above 65535.
      * `F` (32-bit float): values all in [0, 1] are scaled by 255; otherwise values all in [0, 255] are
        kept (rounded); anything else (negative, above 255, NaN, inf) is refused.
    16-bit colour PNG/TIFF are read by PIL as 8-bit RGB(A) (the high byte). Any other mode, and files PIL
    cannot represent at all (e.g. 2-channel or float colour TIFF), raise `MoleflowError`.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _EIGHT_BIT_MODES:
        try:
            return img.convert(_VIA[mode]).convert("RGB") if mode in _VIA else img.convert("RGB")
        except ValueError as exc:
            raise _refuse(path, mode, str(exc)) from None
    if mode.startswith("I;16") or mode == "I":
        try:
            values = np.asarray(img)
        except (TypeError, ValueError) as exc:
            raise _refuse(path, mode, f"numpy cannot read it: {exc}") from None
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise _refuse(path, mode, f"integer values {int(values.min())}..{int(values.max())} "
                                      f"outside the 16-bit range 0..65535")
        return _grey16_to_8(values).convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not np.isfinite(values).all():
            raise _refuse(path, mode, "float values include NaN or infinity")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0.0 or hi > 255.0:
            raise _refuse(path, mode, f"float values {lo:g}..{hi:g}; only 0..1 (scaled by 255) or 0..255 "
                                      f"are understood")
        scale = 255.0 if hi <= 1.0 else 1.0
        return Image.fromarray(np.rint(values * scale).astype(np.uint8), "L").convert("RGB")
    raise _refuse(path, mode, "not a grey or colour mode moleflow can read")


def mask_to_l(mask: Image.Image, path: str | Path | None = None) -> Image.Image:
    """A mask in any mode -> 0/255 `L` image; a pixel is anomalous if any of its raw values is non-zero.

    Raw values, not PIL's conversion to `L`: a 16-bit or float mask with small values (1, 0.3) stays
    anomalous there. Colour masks count a pixel as anomalous if any colour channel is non-zero (alpha is
    ignored); palette masks are looked up first.
    """
    mode = mask.mode
    try:
        if mode in ("1", "L", "F", "I") or mode.startswith("I;16"):
            values = np.asarray(mask)
            hit = values != 0
        else:
            rgb = mask.convert(_VIA[mode]).convert("RGB") if mode in _VIA else mask.convert("RGB")
            hit = np.asarray(rgb).any(axis=-1)
    except (TypeError, ValueError) as exc:
        name = path if path is not None else "mask"
        raise MoleflowError(f"{name}: cannot use this mask (PIL mode {mode}: {exc}); "
                            f"save it as an 8-bit grey PNG, non-zero = anomalous") from None
    return Image.fromarray(hit.astype(np.uint8) * 255, "L")


# what a broken file raises in PIL's decoders (SyntaxError: "broken PNG file"; EOFError, struct.error: cut short)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


def _tiff_layout(path: str | Path) -> str | None:
    """'TIFF with 2 samples of 16-bit unsigned integer' for a TIFF PIL cannot open; None if not a TIFF."""
    try:
        from PIL import TiffImagePlugin

        with open(path, "rb") as f:
            header = f.read(8)
            if header[:4] not in (b"II*\x00", b"MM\x00*"):
                return None
            ifd = TiffImagePlugin.ImageFileDirectory_v2(header)
            f.seek(ifd.next)
            ifd.load(f)
        samples = int(ifd.get(277, 1))
        bits = sorted(set(ifd.get(258, (1,))))
        kinds = {1: "unsigned integer", 2: "signed integer", 3: "float"}
        kind = "/".join(kinds.get(k, f"format {k}") for k in sorted(set(ifd.get(339, (1,)))))
        return f"TIFF with {samples} sample{'s' if samples != 1 else ''} of {'/'.join(map(str, bits))}-bit {kind}"
    except Exception:  # noqa: BLE001 - best effort, only to word the error better
        return None


def _open(path: str | Path, what: str, convert: Callable[[Image.Image, str | Path], Image.Image]) -> Image.Image:
    """Fully decode `path` (not only its header) and convert it with `convert(img, path)`."""
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img, path)
    except FileNotFoundError:
        raise MoleflowError(f"{path}: {what} file not found") from None
    except Image.DecompressionBombError as exc:
        raise MoleflowError(f"{path}: {what} too large for PIL's safety limit ({exc}); downscale the file "
                            f"or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError as exc:
        layout = _tiff_layout(path)
        if layout is None:
            raise MoleflowError(f"{path}: cannot read this {what} ({' '.join(str(exc).split())}); "
                                f"replace or remove the file") from None
        raise MoleflowError(f"{path}: cannot read this {what}: {layout} per pixel, which PIL cannot "
                            f"represent; {_FIX}") from None
    except _DECODE_ERRORS as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise MoleflowError(f"{path}: cannot read this {what} ({detail}); replace or remove the file") from None


def load_rgb(path: str | Path, keep_grey: bool = False) -> Image.Image:
    """Open an image file as 8-bit RGB (see `to_rgb8` for 16-bit and float files); `keep_grey`: an 8-bit grey
    file stays grey ("L"; `ImageTransform` triples its channel after resizing, which is cheaper). Raises
    `MoleflowError` if the file is unreadable or its pixel format is not understood."""
    return _open(path, "image", to_rgb8_or_grey if keep_grey else to_rgb8)


def to_rgb8_or_grey(img: Image.Image, path: str | Path | None = None) -> Image.Image:
    """`to_rgb8`, except that 8-bit grey ("L") stays grey (`ImageTransform` triples it after resizing)."""
    return img if img.mode == "L" else to_rgb8(img, path)


def load_mask(path: str | Path) -> Image.Image:
    """Open a mask as a 0/255 single-channel image; any non-zero pixel (of any bit depth) is anomalous."""
    return _open(path, "mask", mask_to_l)


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
    """PIL image (RGB, or any mode `to_rgb8` reads) -> normalised float tensor (3, size, size)."""

    def __init__(self, size: int, mode: str = "squash",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.mode = size, mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Resized RGB uint8 array (size, size, 3), before normalisation (for overlays)."""
        if img.mode == "L":  # grey: resized before its channel is tripled (the same bytes, a third of the work)
            return np.asarray(to_rgb8(_geometry(img, self.size, self.mode, Image.Resampling.LANCZOS)))
        return np.asarray(_geometry(to_rgb8(img), self.size, self.mode, Image.Resampling.LANCZOS))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = self.to_array(img)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """Mask -> bool tensor (size, size) with the image's geometry, resized nearest-neighbour (spec §2.1);
        any non-zero value is anomalous."""
        # nearest picks source pixels, it never blends them: a 1-pixel crack stays 1 pixel wide (or, at a
        # downscale, may fall between the sampled pixels), it is never widened; letterbox pads are normal
        if mask.mode != "L":
            mask = mask_to_l(mask)
        arr = np.asarray(_geometry(mask, self.size, self.mode, Image.Resampling.NEAREST))
        return torch.from_numpy(arr > 0)
