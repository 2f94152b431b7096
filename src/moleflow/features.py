"""Images -> the frozen backbone's features, streamed: what learning and product discovery read.

    source = FeatureSource(inspector, transform)
    tokens, routing, meta = source.stream(images)   # tokens (M, H, W, D) (in memory or memory-mapped), routing (M, D)
    for chunk in token_chunks(tokens, 64): ...       # (B, H, W, D) tensors

Images are loaded `batch_size` at a time by `loader_workers` worker processes (torch DataLoader) and never held all
at once; the backbone runs once per tile. Tokens beyond `train.cache_memory_gb` go to a memory-mapped file.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch

from .data.batch import Images, Prepared, prepare_images, stream_prepared, tile_count
from .data.transforms import ImageTransform
from .errors import MoleflowError
from .inspector import Inspector

log = logging.getLogger(__name__)


def token_chunks(tokens: torch.Tensor | np.ndarray, batch_size: int):
    """(B, H, W, D) tensors of consecutive rows of tokens held in memory or memory-mapped."""
    for start in range(0, len(tokens), batch_size):
        yield torch.as_tensor(np.asarray(tokens[start:start + batch_size]))


class FeatureSource:
    """The Inspector's backbone fed from images: preprocessing (`transform`, `data.tiling`), streaming, token store."""

    def __init__(self, inspector: Inspector, transform: ImageTransform, loader_workers: int = 0) -> None:
        self.inspector, self.transform = inspector, transform
        self.loader_workers = loader_workers  # image-loading worker processes; 0: in this one
        self.config = inspector.config

    @classmethod
    def of(cls, inspector: Inspector) -> "FeatureSource":
        """The source of `inspector`, preprocessing as its backbone expects (`data.image_size`, `resize_mode`)."""
        data = inspector.config.data
        return cls(inspector, ImageTransform(data.image_size, data.resize_mode, inspector.extractor.mean,
                                             inspector.extractor.std))

    def prepare(self, images: Images) -> Prepared:
        """Preprocess images (cut into tiles when `data.tiling` says so) into normalised tiles (M, 3, S, S)."""
        return prepare_images(images, self.transform, self.config.data.tiling)

    def _stream(self, images: Images, batch_size: int):
        return stream_prepared(images, self.transform, self.config.data.tiling, batch_size, self.loader_workers)

    @torch.no_grad()
    def extract(self, images: Images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens (N, H, W, D) and routing features (N, D), on the CPU."""
        tokens, routing = [], []
        for chunk in self.prepare(images).pixels.split(batch_size):
            t, r = self.inspector.features(chunk.to(self.inspector.device))
            tokens.append(t.cpu())
            routing.append(r.cpu())
        return torch.cat(tokens), torch.cat(routing)

    @torch.no_grad()
    def image_features(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """Routing features (N, D) float64 per image (the mean over an image's tiles), loaded `batch_size` at a time:
        what product discovery clusters."""
        out = []
        for prep in self._stream(images, batch_size):
            routing = self.inspector.extract(prep.pixels, batch_size)[1].cpu().double()
            total = routing.new_zeros(prep.n_images, routing.shape[1]).index_add_(0, prep.owner, routing)
            out.append(total / torch.bincount(prep.owner, minlength=prep.n_images).unsqueeze(1))
        return torch.cat(out)

    @torch.no_grad()
    def stream(self, images: Images, batch_size: int = 32, keep_tokens: bool = True
               ) -> tuple[torch.Tensor | np.ndarray | None, torch.Tensor, Prepared]:
        """Backbone tokens (M, H, W, D) and routing features (M, D) of the tiles of `images`, plus their owners and
        layouts (a Prepared without pixels). Tokens that would exceed `train.cache_memory_gb` go to a
        memory-mapped file (deleted when the array is freed); `keep_tokens=False` keeps none (routing only)."""
        tiling = self.config.data.tiling
        n_tiles = len(images) if isinstance(images, torch.Tensor) else sum(tile_count(i, tiling) for i in images)
        tokens = self.token_store(n_tiles) if keep_tokens else None
        routing, metas, filled = [], [], 0
        for prep in self._stream(images, batch_size):
            t, r = self.inspector.extract(prep.pixels, batch_size)
            if tokens is not None:
                tokens[filled:filled + len(t)] = t.cpu().numpy() if isinstance(tokens, np.memmap) else t.cpu()
            routing.append(r.cpu())
            filled += len(t)
            metas.append(prep.without_pixels())
        if filled != n_tiles:
            raise MoleflowError(f"{filled} tiles were loaded where the image sizes gave {n_tiles}; did the images "
                                "change while they were read?")
        return tokens, torch.cat(routing), Prepared.concat(metas)

    def token_store(self, n: int) -> torch.Tensor | np.memmap:
        """An empty (n, H, W, D) float32 array for tokens: in memory up to `train.cache_memory_gb`, else a
        memory-mapped temporary file."""
        h, w = self.inspector.grid
        dim = self.inspector.extractor.embed_dim
        shape = (n, h, w, dim)
        nbytes = 4 * n * h * w * dim
        if nbytes <= self.config.train.cache_memory_gb * 1e9:
            return torch.empty(shape)
        folder = self.config.train.cache_dir or tempfile.gettempdir()
        handle = tempfile.NamedTemporaryFile(prefix="moleflow-cache-", suffix=".f32", dir=folder)
        tokens = np.memmap(handle, dtype=np.float32, mode="w+", shape=shape)
        tokens._moleflow_file = handle  # keeps the file alive as long as the array
        log.info("feature cache: %.1f GB memory-mapped in %s", nbytes / 1e9, folder)
        return tokens
