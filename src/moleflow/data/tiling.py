"""Tiling of elongated images (`data.tiling = "aspect"`), and stitching their patch maps back.

An image whose long side is r times its short side is cut along the long side into k = round(r) (halves up)
equal tiles (at most `MAX_TILES`; k = 1 below r = 1.5), each close to square; every tile then goes
through the usual square preprocessing. A 500 x 1250 kolektor part becomes 3 tiles of about 500 x 417
instead of one 224 x 224 squash that shrinks its length 2.5 times more than its width.

The tiles' patch maps (k, h, w) are put side by side in the image's order ((k*h, w) for a portrait
image, (h, k*w) for a landscape one), which is the patch map of the whole image; pixel maps are made
from it at the image's square evaluation geometry (the masks' `squash` geometry), so metrics and
overlays are on the whole original image. Like anomalib's tiler, but decided per image from its own
aspect ratio, so products of different shapes can share one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

Tiling = Literal["none", "aspect"]
MAX_TILES = 8


@dataclass(frozen=True)
class TileLayout:
    """How one image was cut: `count` tiles along its height (`vertical`) or its width."""

    count: int = 1
    vertical: bool = False


def tile_layout(width: int, height: int, tiling: str) -> TileLayout:
    """The layout of an image of `width` x `height` pixels under `tiling` ("none" or "aspect")."""
    if tiling == "none":
        return TileLayout()
    long, short = max(width, height), max(1, min(width, height))
    ratio = long / short
    count = 1 if ratio < 1.5 else min(MAX_TILES, int(ratio + 0.5))  # 2.5 -> 3
    return TileLayout(count, height > width)


def split_tiles(img: Image.Image, layout: TileLayout) -> list[Image.Image]:
    """Cut `img` into `layout.count` equal tiles along its long side (pixel bounds floor(i * L / k))."""
    if layout.count == 1:
        return [img]
    w, h = img.size
    length = h if layout.vertical else w
    bounds = [i * length // layout.count for i in range(layout.count + 1)]
    if layout.vertical:
        return [img.crop((0, bounds[i], w, bounds[i + 1])) for i in range(layout.count)]
    return [img.crop((bounds[i], 0, bounds[i + 1], h)) for i in range(layout.count)]


def stitch_maps(maps: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Patch maps of one image's tiles (k, h, w), in order -> the image's patch map (k*h, w) or (h, k*w)."""
    if maps.shape[0] != layout.count:
        raise ValueError(f"{maps.shape[0]} tile maps for a layout of {layout.count} tiles")
    return torch.cat(list(maps), dim=0 if layout.vertical else 1)
