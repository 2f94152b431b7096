"""How defects move a product's routing feature, measured on its own training images (docs/decisions.md §8).

    index = move_sample(n_train_images, seed)       # (K,) sorted: the images whose painted copies are measured
    copies = painted_copies(arrays, rng)            # one painted defect per image, uint8 (H, W, 3) each
    moment = move_moment(clean, moved)              # (M, D), (M, D) routing features of the same tiles -> (D, D)

With `router.metric=pooled` the product is chosen with one metric, the inverse of the mean of the products'
covariances; `router.defect_weight` adds that weight times the mean of the products' move moments E[d d^T] to it, so
that a move along a direction defects take counts less when choosing between look-alike products (a nuisance
covariance). Each product measures its own moves when it is learned, from its own images: no other product's data.
The defects are the painted kinds of `moleflow tune` (scratch, spot, hole, crack, stain, missing), not the rectangles
the routing validation pastes (`routing_stress.paste_area_defect`), so the validation does not grade the metric on
the defects it learned from.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.synthetic import DEFECT_KINDS
from .data.synthetic_anomalies import paste_anomaly

MOVE_IMAGES = 64  # images per product whose painted copies measure its moves (one backbone pass over them)


def move_sample(n_images: int, seed: int, limit: int = MOVE_IMAGES) -> torch.Tensor:
    """(K,) sorted indices of at most `limit` of `n_images` images, seeded."""
    if n_images <= limit:
        return torch.arange(n_images)
    return torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n_images, limit, replace=False)))


def painted_copies(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Each image (uint8 (H, W, 3)) with one painted defect, the kinds in turn; the next image is the donor."""
    return [paste_anomaly(a, arrays[(i + 1) % len(arrays)], DEFECT_KINDS[i % len(DEFECT_KINDS)], rng)[0]
            for i, a in enumerate(arrays)]


def move_moment(clean: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Routing features (M, D) of tiles and of their painted copies -> (D, D) float64 second moment of the moves
    (uncentred: a defect's mean move is a direction to discount too)."""
    if clean.shape != moved.shape:
        raise ValueError(f"the painted copies gave {tuple(moved.shape)} routing features for {tuple(clean.shape)}")
    d = moved.double() - clean.double()
    return d.T @ d / len(d)
