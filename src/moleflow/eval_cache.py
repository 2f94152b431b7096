"""Test images' backbone features and expert patch scores, kept across the evaluations of one continual run.

A continual run evaluates every learned product after every step, routed, and after the last step once more with
the true product (oracle). With the shared flow frozen (`model.freeze_base`, the default) nothing an evaluation
computes from a test image changes between those passes except its routing: the backbone is frozen, and an
expert is never changed once learned (a new product adds its own). So the first pass over a batch of test images
keeps its preprocessed layout, tokens and routing features, and each (tile, expert) pair is scored once; later
passes route the kept features again among the products learned by then and reuse the kept scores. A run of T
products one per step then computes the backbone once per test image instead of T + 1 times, and scores an image
under an expert once instead of once per step.

Nothing is kept when the shared flow keeps learning (`freeze_base=false`, the `sequential` ablation): its experts
change at every step. The kept tensors are bounded by `budget_bytes` (`train.cache_memory_gb`); batches beyond it
are computed as if there were no cache. Scores are those the uncached pass computes, tile for tile, except where
one batch held tiles of several products: its uncached pass ran them through one mixed flow pass, the cache runs
each product's tiles through that expert's plain forward (equal up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .data.batch import Prepared
from .pipeline import NeuralBackend


@dataclass
class CachedBatch:
    """One batch of a class's test images: `prep` (its tiles' owners and layouts; pixels dropped once the tokens
    are kept), `masks` (N, S, S) from the loader, tokens (M, h, w, D) and routing features (M, D) once computed,
    and per task the patch scores (M, h, w) of the tiles scored under it so far (`scored` (M,) bool)."""

    prep: Prepared
    masks: np.ndarray
    tokens: torch.Tensor | None = None
    routing: torch.Tensor | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    scored: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def feature_bytes(self) -> int:
        """Bytes of the kept tokens and routing features (0 when none are kept)."""
        return 0 if self.tokens is None else tensor_bytes(self.tokens, self.routing)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class EvaluationCache:
    """The kept batches of every class evaluated in one run, under a memory budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes, self.used_bytes = int(budget_bytes), 0
        self.classes: dict[str, list[CachedBatch]] = {}
        self.hits = self.misses = 0  # expert-score tiles reused and computed

    def batches(self, class_name: str) -> list[CachedBatch] | None:
        """The kept batches of a class, in loader order, or None when it was not kept whole."""
        return self.classes.get(class_name)

    def keep(self, class_name: str, batches: list[CachedBatch], whole: bool) -> None:
        """Keep a class's `batches` that hold their features when they are `whole`, all of its batches (a class is
        kept whole or not at all); else give their bytes back to the budget."""
        if whole:
            self.classes[class_name] = batches
        else:
            self.used_bytes -= sum(b.feature_bytes for b in batches)

    def admit(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit the budget (and count them if so)."""
        if self.used_bytes + nbytes > self.budget_bytes:
            return False
        self.used_bytes += nbytes
        return True


class CachedBackend:
    """A `NeuralBackend` for one kept batch: features computed once, each (tile, expert) pair scored once."""

    def __init__(self, inner: NeuralBackend, batch: CachedBatch, cache: EvaluationCache) -> None:
        self.inner, self.batch, self.cache = inner, batch, cache

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        if b.tokens is not None:
            return b.tokens, b.routing
        tokens, routing = self.inner.features(pixels)
        if self.cache.admit(tensor_bytes(tokens, routing)):
            b.tokens, b.routing = tokens, routing
            b.prep = Prepared(pixels.new_empty((0,)), b.prep.owner, b.prep.layouts)
        return tokens, routing

    def expert_scores(self, tokens: torch.Tensor, index: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Rows of the kept tokens: each (row, task) pair scored once. Any other tokens (a subset of rows, scored
        again under a plausible product): passed on."""
        b = self.batch
        if tokens is not b.tokens:
            return self.inner.expert_scores(tokens, index, tasks)
        row_task = torch.as_tensor(tasks, dtype=torch.long)[index.cpu()]
        out = torch.empty(tokens.shape[:3], dtype=torch.float32)
        for task in row_task.unique().tolist():
            rows = row_task == task
            if task not in b.scores:
                b.scores[task] = torch.zeros(tokens.shape[:3], dtype=torch.float32)
                b.scored[task] = torch.zeros(len(tokens), dtype=torch.bool)
            missing = rows & ~b.scored[task]
            if bool(missing.any()):
                where = missing.nonzero().squeeze(1)
                b.scores[task][where] = self.inner.expert_scores(
                    tokens[where.to(tokens.device)], torch.zeros(len(where), dtype=torch.long), [task]).cpu().float()
                b.scored[task][where] = True
            self.cache.misses += int(missing.sum())
            self.cache.hits += int((rows & ~missing).sum())
            out[rows] = b.scores[task][rows]
        return out.to(tokens.device)
