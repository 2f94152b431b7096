"""Images in, preprocessed tiles out: the one place where user inputs become model tensors.

    prep = prepare_images(["a.png", pil_image, uint8_array], transform, tiling="aspect")
    prep.pixels (M, 3, S, S)   prep.owner (M,) image of each tile   prep.layouts (N,) how each image was cut
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import MoleflowError
from .tiling import TileLayout, split_tiles, tile_layout
from .transforms import ImageTransform, load_rgb, to_rgb8

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Images = Union[Sequence[ImageInput], torch.Tensor]


@dataclass
class Prepared:
    """Preprocessed images: `pixels` (M, 3, S, S) holds the tiles of N images (M = N without tiling);
    `owner` (M,) the image of each tile; `layouts` (N,) how each image was cut (in tile order)."""

    pixels: torch.Tensor
    owner: torch.Tensor
    layouts: list[TileLayout]

    @classmethod
    def square(cls, pixels: torch.Tensor) -> "Prepared":
        """One tile per image."""
        n = len(pixels)
        return cls(pixels, torch.arange(n), [TileLayout()] * n)

    @property
    def n_images(self) -> int:
        return len(self.layouts)

    @property
    def tiled(self) -> bool:
        return any(layout.count > 1 for layout in self.layouts)

    def select(self, images: torch.Tensor) -> "Prepared":
        """The tiles of the images `images` (sorted indices), with `owner` renumbered 0..len-1."""
        keep = torch.isin(self.owner, images)
        renumber = torch.full((len(self.layouts),), -1, dtype=torch.long)
        renumber[images] = torch.arange(len(images))
        return Prepared(self.pixels[keep], renumber[self.owner[keep]], [self.layouts[i] for i in images.tolist()])


def as_rgb(item: ImageInput) -> Image.Image:
    """A file path, PIL image or array (H, W), (H, W, 3|4) of uint8/uint16 -> 8-bit RGB PIL image."""
    if isinstance(item, (str, Path)):
        return load_rgb(item)
    if isinstance(item, np.ndarray):
        item = Image.fromarray(item)
    if not isinstance(item, Image.Image):
        raise MoleflowError(f"an image must be a file path, a PIL image or a numpy array, got {type(item).__name__}")
    return to_rgb8(item, "<in-memory image>")


def prepare_images(images: Images, transform: ImageTransform, tiling: str = "none") -> Prepared:
    """Preprocess images (cut into tiles when `tiling` says so) into normalised tiles (M, 3, S, S).

    A float tensor (N, 3, S, S) is taken as already preprocessed, one tile per image."""
    if isinstance(images, torch.Tensor):
        size = transform.size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise MoleflowError(f"an image tensor must be (N, 3, {size}, {size}), got {tuple(images.shape)}")
        return Prepared.square(images.float())
    out, owner, layouts = [], [], []
    for i, item in enumerate(images):
        item = as_rgb(item)
        layout = tile_layout(*item.size, tiling)
        for tile in split_tiles(item, layout):
            out.append(transform(tile))
            owner.append(i)
        layouts.append(layout)
    if not out:
        raise MoleflowError("no images were given")
    return Prepared(torch.stack(out), torch.tensor(owner, dtype=torch.long), layouts)
