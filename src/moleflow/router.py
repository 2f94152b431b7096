"""Prototype router: which task (product) does an image belong to? (spec §5)

Each task keeps a Gaussian prototype of the routing features (B, D) of *all* its training images
(deterministic, no shuffled drop_last loader, §12.13). Covariances are shrunk (Ledoit-Wolf by
default, or OAS): one-class tasks often have fewer images than dimensions, where the reference's
1e-5 ridge makes the inverse weight out-of-span directions by 1e5 (kept as `covariance="ridge"`).

Unknown products: a task also stores a distance threshold, the `unknown_quantile` quantile of its
training images' out-of-sample distances (5-fold: each image's distance to a prototype built without
it) times `unknown_margin`. An image farther than that from its nearest prototype fits no learned
product. Cross-fitting gives every training image a calibration distance, so the rule does not rest on
a handful of held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import OAS, LedoitWolf

from .config import RouterConfig
from .errors import MoleflowError


@dataclass
class Prototype:
    mean: torch.Tensor  # (D,) float64
    precision: torch.Tensor  # (D, D) float64; identity for the Euclidean metric
    unknown_threshold: float = float("inf")  # distance above which an image is an unknown product


def estimate_precision(features: np.ndarray, method: str, ridge: float) -> np.ndarray:
    """Inverse covariance (D, D) of `features` (N, D) with shrinkage or the reference's ridge."""
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] < 2:
        raise MoleflowError("a task needs at least 2 training images to build its router prototype")
    if method == "ledoit_wolf":
        cov = LedoitWolf().fit(x).covariance_
    elif method == "oas":
        cov = OAS().fit(x).covariance_
    elif method == "ridge":
        cov = np.cov(x, rowvar=False) + ridge * np.eye(x.shape[1])
    else:
        raise MoleflowError(f"unknown covariance estimator {method!r}")
    try:
        return np.linalg.inv(cov)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(cov)


class PrototypeRouter:
    """Routes routing features (N, D) to the task whose prototype is nearest."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.prototypes: dict[int, Prototype] = {}

    @property
    def task_ids(self) -> list[int]:
        return list(self.prototypes)

    def _prototype(self, x: torch.Tensor) -> Prototype:
        if self.cfg.metric == "mahalanobis":
            precision = torch.from_numpy(estimate_precision(x.numpy(), self.cfg.covariance, self.cfg.ridge))
        else:
            precision = torch.eye(x.shape[1], dtype=torch.float64)
        return Prototype(mean=x.mean(0), precision=precision)

    def out_of_sample_distances(self, x: torch.Tensor, folds: int = 5) -> torch.Tensor:
        """(N, D) -> (N,): each image's distance to a prototype fitted on the other folds (fixed fold order)."""
        folds = min(folds, len(x))
        fold_of = torch.arange(len(x)) % folds
        out = torch.empty(len(x), dtype=torch.float64)
        for k in range(folds):
            held = fold_of == k
            if (~held).sum() < 2:
                continue
            out[held] = self._distance(x[held], self._prototype(x[~held]))
        return out

    def add_task(self, task: int, features: torch.Tensor) -> None:
        """Build task `task`'s prototype from all its training features (N, D) and calibrate its
        unknown-product distance on their out-of-sample distances."""
        x = features.detach().double().cpu()
        proto = self._prototype(x)
        if len(x) >= 4:
            own = self.out_of_sample_distances(x)
            proto.unknown_threshold = float(torch.quantile(own, self.cfg.unknown_quantile)) * self.cfg.unknown_margin
        self.prototypes[task] = proto

    def remove_task(self, task: int) -> None:
        del self.prototypes[task]

    @staticmethod
    def _distance(x: torch.Tensor, proto: Prototype) -> torch.Tensor:
        diff = x - proto.mean
        return ((diff @ proto.precision) * diff).sum(-1).clamp_min(0).sqrt()

    def distances(self, features: torch.Tensor, tasks: list[int] | None = None) -> torch.Tensor:
        """(N, D) -> (N, T) distances to each prototype, columns in `tasks` order (default: all tasks)."""
        tasks = self.task_ids if tasks is None else tasks
        if not tasks:
            raise MoleflowError("the router has no tasks yet; train a task first")
        x = features.detach().double().cpu()
        return torch.stack([self._distance(x, self.prototypes[t]) for t in tasks], dim=1)

    def route(self, features: torch.Tensor, tasks: list[int] | None = None, owner: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, D) -> per image (N,): task ids, distance to that task, known (bool: within its threshold).

        `tasks` restricts the choice (e.g. to the tasks learned up to some step); default all. `owner` (M,)
        groups rows into N images (the tiles of one image): an image goes to the task with the smallest mean
        distance over its rows. Default: every row is its own image."""
        tasks = self.task_ids if tasks is None else list(tasks)
        distances = self.distances(features, tasks)  # (M, T) float64
        if owner is not None:
            n = int(owner.max()) + 1 if len(owner) else 0
            total = torch.zeros(n, len(tasks), dtype=distances.dtype).index_add_(0, owner, distances)
            distances = total / torch.bincount(owner, minlength=n).clamp_min(1).unsqueeze(1).to(distances.dtype)
        best, idx = distances.min(1)
        ids = torch.tensor(tasks, dtype=torch.long)[idx]
        limits = torch.tensor([self.prototypes[t].unknown_threshold for t in tasks], dtype=torch.float64)[idx]
        return ids, best, best <= limits

    def state_dict(self) -> dict:
        return {t: {"mean": p.mean, "precision": p.precision, "unknown_threshold": p.unknown_threshold}
                for t, p in self.prototypes.items()}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = {int(t): Prototype(v["mean"], v["precision"], float(v["unknown_threshold"]))
                           for t, v in state.items()}
