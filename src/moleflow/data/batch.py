"""Images in, preprocessed tiles out: the one place where user inputs become model tensors.

    prep = prepare_images(["a.png", pil_image, uint8_array], transform, tiling="aspect")
    prep.pixels (M, 3, S, S)   prep.owner (M,) image of each tile   prep.layouts (N,) how each image was cut
    for prep in stream_prepared(images, transform, "aspect", batch_size=32, num_workers=2): ...  # a batch at a time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import MoleflowError
from .tiling import TileLayout, split_tiles, tile_layout
from .transforms import ImageTransform, load_rgb, to_rgb8, to_rgb8_or_grey

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

    def without_pixels(self) -> "Prepared":
        """The same tiles' owners and layouts (all that stitching maps needs), pixels dropped."""
        return Prepared(self.pixels.new_empty(0), self.owner, self.layouts)

    @staticmethod
    def concat(parts: Sequence["Prepared"]) -> "Prepared":
        """The images of several, in order (pixels concatenated where present)."""
        if len(parts) == 1:
            return parts[0]
        owners, offset = [], 0
        for part in parts:
            owners.append(part.owner + offset)
            offset += part.n_images
        return Prepared(torch.cat([p.pixels for p in parts]), torch.cat(owners),
                        [layout for p in parts for layout in p.layouts])


def as_rgb(item: ImageInput, keep_grey: bool = False) -> Image.Image:
    """A file path, PIL image or array (H, W), (H, W, 3|4) of uint8/uint16 -> 8-bit RGB PIL image (`keep_grey`:
    8-bit grey stays grey, for `ImageTransform`)."""
    if isinstance(item, (str, Path)):
        return load_rgb(item, keep_grey)
    if isinstance(item, np.ndarray):
        item = Image.fromarray(item)
    if not isinstance(item, Image.Image):
        raise MoleflowError(f"an image must be a file path, a PIL image or a numpy array, got {type(item).__name__}")
    return (to_rgb8_or_grey if keep_grey else to_rgb8)(item, "<in-memory image>")


class PreparedDataset(Dataset):
    """Image i -> its preprocessed tiles (k, 3, S, S) and layout, loaded when asked (DataLoader workers)."""

    def __init__(self, images: Sequence[ImageInput], transform: ImageTransform, tiling: str = "none") -> None:
        self.images, self.transform, self.tiling = images, transform, tiling

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, TileLayout]:
        item = as_rgb(self.images[index], keep_grey=True)
        layout = tile_layout(*item.size, self.tiling)
        return torch.stack([self.transform(tile) for tile in split_tiles(item, layout)]), layout


def collate_prepared(items: Sequence[tuple[torch.Tensor, TileLayout]]) -> Prepared:
    """Items of `PreparedDataset` -> one Prepared of those images, in order."""
    if not items:
        raise MoleflowError("no images were given")
    counts = torch.tensor([len(tiles) for tiles, _ in items])
    return Prepared(torch.cat([tiles for tiles, _ in items]), torch.repeat_interleave(torch.arange(len(items)), counts),
                    [layout for _, layout in items])


def _checked_tensor(images: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    size = transform.size
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise MoleflowError(f"an image tensor must be (N, 3, {size}, {size}), got {tuple(images.shape)}")
    return images.float()


def prepare_images(images: Images, transform: ImageTransform, tiling: str = "none") -> Prepared:
    """Preprocess images (cut into tiles when `tiling` says so) into normalised tiles (M, 3, S, S).

    A float tensor (N, 3, S, S) is taken as already preprocessed, one tile per image."""
    if isinstance(images, torch.Tensor):
        return Prepared.square(_checked_tensor(images, transform))
    dataset = PreparedDataset(images, transform, tiling)
    return collate_prepared([dataset[i] for i in range(len(dataset))])


def stream_prepared(images: Images, transform: ImageTransform, tiling: str = "none", batch_size: int = 32,
                    num_workers: int = 0) -> Iterator[Prepared]:
    """`prepare_images` of `batch_size` images at a time, loaded by `num_workers` worker processes (torch
    DataLoader): a task's images are never all in memory at once."""
    if isinstance(images, torch.Tensor):
        images = _checked_tensor(images, transform)
        for chunk in images.split(batch_size):
            yield Prepared.square(chunk)
        return
    if len(images) == 0:
        raise MoleflowError("no images were given")
    yield from DataLoader(PreparedDataset(images, transform, tiling), batch_size=batch_size, shuffle=False,
                          num_workers=num_workers, collate_fn=collate_prepared)


def tile_count(item: ImageInput, tiling: str) -> int:
    """How many tiles `item` is cut into under `tiling`, from its size alone (a file's header)."""
    if tiling == "none":
        return 1
    if isinstance(item, (str, Path)):
        try:
            with Image.open(item) as img:
                size = img.size
        except (OSError, ValueError):
            size = as_rgb(item).size  # raises the loader's clear error for an unreadable file
    elif isinstance(item, np.ndarray):
        size = (item.shape[1], item.shape[0])
    else:
        size = as_rgb(item).size
    return tile_layout(*size, tiling).count
