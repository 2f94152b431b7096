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

With `metric="pooled"` the product is chosen with one metric for all products, the inverse of the mean of their
covariances (linear discriminant analysis), plus `defect_weight` x the mean of the moments of how painted defects
moved each product's feature (`defect_moves`, buffer `defectmove_<t>`); the distance reported and the unknown-product
limit stay in the chosen product's own metric.

The prototypes are float64 buffers of an `nn.Module` (`mean_<t>` (D,), `precision_<t>` (D, D),
`unknown_<t>` ()), so they are part of the inspector's state_dict, move with it and export to ONNX.
`mahalanobis` is the one distance formula: routing, calibration and the exported graph all use it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import OAS, LedoitWolf
from torch import nn

from .config import RouterConfig
from .errors import MoleflowError
from .scoring import lower_median
from .task_keys import HOLDOUT_BUFFERS, ROUTING_BUFFERS


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


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N, D), (D,), (D, D) -> (N,) sqrt((x - mean)^T P (x - mean)) in x's dtype (float64 expected)."""
    diff = x - mean
    return ((diff @ precision) * diff).sum(-1).clamp_min(0).sqrt()


def defect_term(moments: list[torch.Tensor], weight: float) -> np.ndarray | float:
    """`weight` x the mean of the products' defect-move moments (D, D) (`defect_moves`; those that have one) that the
    pooled covariance adds (0 without any)."""
    return weight * np.mean([m.cpu().numpy() for m in moments], axis=0) if weight and len(moments) else 0.0


def pool_precisions(precisions: list[torch.Tensor], moments: list[torch.Tensor] = (), weight: float = 0.0
                    ) -> torch.Tensor:
    """(D, D) float64 products' precisions -> the one metric of `metric="pooled"`: the inverse of the mean of their
    covariances (linear discriminant analysis) plus `defect_term` (the defects' moves as a nuisance when `weight` >
    0). In NumPy, so that an ONNX trace takes it as a constant."""
    cov = np.mean([np.linalg.inv(p.cpu().numpy()) for p in precisions], axis=0) + defect_term(moments, weight)
    return torch.from_numpy(np.linalg.inv(cov)).to(precisions[0].device)


def pooled_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N, D) features, (T, D) means, one (D, D) precision P -> (N, T) float64 distances. d^2 = x'Px - 2 x'P m_t
    + m_t'P m_t: two matrix products for all T products instead of T (the same as `mahalanobis` per product up to
    float64 rounding)."""
    x = features.double()
    xp = x @ precision
    squared = (xp * x).sum(1, keepdim=True) - 2 * xp @ means.T + ((means @ precision) * means).sum(1)
    return squared.clamp_min(0).sqrt()


def patch_misfit(z: torch.Tensor, owner: torch.Tensor | None = None, n_images: int | None = None,
                 statistic: str = "median", normal_share: float = 0.5) -> torch.Tensor:
    """How badly each image fits each candidate product, from its patches (lower fits better).

    `z` (M, T, H, W): every tile patch's nearest-neighbour distance to each of T products' patch memories
    (`PatchMemory.distances`). `statistic`: "median", the median over a tile's patches (a defect on a minority
    of the patches cannot move it far: what the router uses), or "vote", minus the share of the tile's patches
    whose nearest memory is that product's (measured and not taken, docs/decisions.md §8), or "paired": the
    products are compared on the same patches, the `normal_share` of the tile's patches that fit their best product
    best (a defect's patches, far from every memory, drop out): the geometric mean of each product's distances over
    those patches. Tiles of one image
    (`owner` (M,) into `n_images`) are averaged, as the prototype router averages their distances.
    Returns (N, T) float64."""
    flat = z.double().flatten(2)  # (M, T, P)
    if statistic == "median":
        per_tile = lower_median(flat, 2)
    elif statistic == "paired":  # non-candidate products arrive as inf and stay inf
        best = flat.min(dim=1).values  # (M, P): how well each patch fits any product
        keep = max(1, int(round(normal_share * flat.shape[2])))
        rows = best.sort(dim=1).indices[:, :keep]  # (M, K): the patches that fit best
        chosen = flat.gather(2, rows.unsqueeze(1).expand(-1, flat.shape[1], -1))  # (M, T, K)
        per_tile = chosen.clamp_min(1e-12).log().mean(2).exp()
    elif statistic == "vote":
        winner = flat.argmin(dim=1)  # (M, P): each patch votes for its nearest product
        per_tile = -torch.nn.functional.one_hot(winner, flat.shape[1]).double().mean(1)
    else:
        raise MoleflowError(f"unknown patch statistic {statistic!r}: use median, paired or vote")
    return per_tile if owner is None else mean_per_image(per_tile, owner, n_images)


def mean_per_image(values: torch.Tensor, owner: torch.Tensor, n_images: int | None = None) -> torch.Tensor:
    """(M, T) values of tiles -> (N, T): the mean over each image's tiles (`owner` (M,) into `n_images`)."""
    n = n_images if n_images is not None else int(owner.max()) + 1
    total = values.new_zeros(n, values.shape[1]).index_add_(0, owner.to(values.device), values)
    return total / torch.bincount(owner, minlength=n).clamp_min(1).unsqueeze(1).to(total)


def fitting_patches(worst: torch.Tensor, limit: float) -> torch.Tensor:
    """worst (M, H, W) standardised memory distance of each patch to the product it fits best -> (M, H, W) bool: the
    patches kept for routing, those within `limit`; a patch beyond it is left out with its 8 neighbours (a defect
    spreads over the backbone's receptive fields)."""
    beyond = (worst > limit).to(worst.dtype).unsqueeze(1)
    return nn.functional.max_pool2d(beyond, 3, 1, 1).squeeze(1) == 0


def masked_median(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """tokens (M, H, W, D), keep (M, H, W) bool -> (M, D) float32: the coordinate-wise lower median over each tile's
    kept patches (over all of its patches where fewer than a quarter are kept). Written as a sort and a gather, so
    that it exports to ONNX: left-out patches sort last."""
    flat, kept = tokens.float().flatten(1, 2), keep.flatten(1)  # (M, P, D), (M, P)
    kept = kept | (kept.sum(1, keepdim=True) < kept.shape[1] // 4)
    values = flat.masked_fill(~kept.unsqueeze(-1), float("inf")).sort(dim=1).values
    middle = (kept.sum(1) - 1) // 2  # (M,)
    return values.gather(1, middle.view(-1, 1, 1).expand(-1, 1, flat.shape[2])).squeeze(1)


class PrototypeRouter(nn.Module):
    """Routes routing features (N, D) to the task whose prototype is nearest."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.task_ids: list[int] = []
        self._pooled: dict[tuple, torch.Tensor] = {}  # pooled precisions, keyed by the precisions they came from

    # ------------------------------------------------------------------------------ features
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Routing features (B, D) of patch tokens (B, H, W, D), without positional encoding (spec §5):
        the mean over the grid, or the coordinate-wise median (`statistic`), in float32."""
        flat = tokens.float().flatten(1, 2)  # (B, H*W, D)
        if self.cfg.statistic == "median":
            return lower_median(flat, 1)
        return flat.mean(1)

    # ------------------------------------------------------------------------------ prototypes
    def fit_prototype(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and precision (D, D) float64 of features (N, D)."""
        x = x.detach().double().cpu()
        if self.cfg.metric != "euclidean":
            precision = torch.from_numpy(estimate_precision(x.numpy(), self.cfg.covariance, self.cfg.ridge))
        else:
            precision = torch.eye(x.shape[1], dtype=torch.float64)
        return x.mean(0), precision

    def out_of_sample_distances(self, x: torch.Tensor, folds: int = 5) -> torch.Tensor:
        """(N, D) -> (N,): each image's distance to a prototype fitted on the other folds (fixed fold order)."""
        x = x.detach().double().cpu()
        folds = min(folds, len(x))
        fold_of = torch.arange(len(x)) % folds
        out = torch.empty(len(x), dtype=torch.float64)
        for k in range(folds):
            held = fold_of == k
            if (~held).sum() < 2:
                continue
            out[held] = mahalanobis(x[held], *self.fit_prototype(x[~held]))
        return out

    def add_task(self, task: int, features: torch.Tensor) -> None:
        """Build task `task`'s prototype from all its training features (N, D) and calibrate its
        unknown-product distance on their out-of-sample distances."""
        if task in self.task_ids:
            raise MoleflowError(f"the router already has task {task}")
        self.fit_task(task, features)

    def fit_task(self, task: int, features: torch.Tensor) -> None:
        """`add_task`, or for a task the router has, its prototype and unknown-product limit built again (its other
        buffers, the defect moves and held-out parts, are kept)."""
        x = features.detach().double().cpu()
        mean, precision = self.fit_prototype(x)
        limit = float("inf")
        if len(x) >= 4:
            own = self.out_of_sample_distances(x)
            limit = float(torch.quantile(own, self.cfg.unknown_quantile)) * self.cfg.unknown_margin
        self.set_prototype(task, mean, precision, limit)

    def _keep(self, name: str, value: torch.Tensor) -> None:
        """Register buffer `name` on the device of the router's buffers (`value`'s own while it has none)."""
        self.register_buffer(name, value.detach().to(next(iter(self.buffers()), value).device))

    def set_prototype(self, task: int, mean: torch.Tensor, precision: torch.Tensor, unknown: float) -> None:
        self._keep(f"mean_{task}", mean.double())
        self._keep(f"precision_{task}", precision.double())
        self._keep(f"unknown_{task}", torch.tensor(float(unknown), dtype=torch.float64, device=mean.device))
        if task not in self.task_ids:
            self.task_ids.append(task)

    def set_defect_moves(self, task: int, moment: torch.Tensor) -> None:
        """Keep task `task`'s defect-move moment (D, D) (`defect_moves.move_moment`): the pooled metric discounts the
        directions its painted defects move the routing feature along (`router.defect_weight`)."""
        self._keep(f"defectmove_{task}", moment.double())

    def defect_moves(self, tasks: list[int]) -> list[torch.Tensor]:
        """The defect-move moments of those of `tasks` that measured one (products learned before they were kept, or
        from tensors instead of images, did not)."""
        return [getattr(self, f"defectmove_{t}") for t in tasks if hasattr(self, f"defectmove_{t}")]

    def remove_task(self, task: int) -> None:
        for kind in ROUTING_BUFFERS + ("unknown",) + HOLDOUT_BUFFERS:
            if hasattr(self, f"{kind}_{task}"):
                delattr(self, f"{kind}_{task}")
        self.task_ids.remove(task)

    def set_holdout(self, task: int, features: torch.Tensor, image: torch.Tensor, mean: torch.Tensor,
                    precision: torch.Tensor) -> None:
        """Keep task `task`'s held-out normals: their routing features (M, D), each row's image index (M,) (the
        tiles of one image share it) and the prototype built without them (mean (D,), precision (D, D)), so that
        `holdout_choices` routes them again, out of sample, among the products learned since. Never trained on."""
        for kind, value in zip(HOLDOUT_BUFFERS, (features.float(), image.long(), mean.double(), precision.double())):
            self._keep(f"{kind}_{task}", value)

    def holdout(self, task: int) -> tuple[torch.Tensor, ...] | None:
        """What `set_holdout` kept for task `task` (features, image, mean, precision), or None: no images were held
        out, or the product was learned before they were kept."""
        if not hasattr(self, f"holdout_{task}"):
            return None
        return tuple(getattr(self, f"{kind}_{task}") for kind in HOLDOUT_BUFFERS)

    def holdout_choices(self, tasks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Route every task's kept held-out normals among `tasks` as `forward` routes an image, each task's own
        prototype built without them (out of sample, as when they measured its confusability): {task: (index into
        `tasks` (N,), margin (N,): the runner-up's log choice distance minus the chosen one's)} for the tasks of
        `tasks` that kept them. Each product's covariance is inverted once, so T products cost O(T) inversions."""
        means = torch.stack([self.prototype(t)[0] for t in tasks])
        pooled = self.cfg.metric == "pooled"
        if pooled:  # the pooled covariance of `pool_precisions`, with one product's covariance swapped in below
            covariances = [np.linalg.inv(self.prototype(t)[1].cpu().numpy()) for t in tasks]
            mean_covariance = np.mean(covariances, axis=0) + defect_term(self.defect_moves(tasks),
                                                                         self.cfg.defect_weight)
        out = {}
        for i, task in enumerate(tasks):
            kept = self.holdout(task)
            if kept is None:
                continue
            features, image, own_mean, own_precision = kept
            task_means = means.clone()
            task_means[i] = own_mean
            if pooled:
                swapped = mean_covariance + (np.linalg.inv(own_precision.cpu().numpy()) - covariances[i]) / len(tasks)
                distance = pooled_distances(features, task_means,
                                            torch.from_numpy(np.linalg.inv(swapped)).to(features.device))
            else:
                precisions = [own_precision if t == task else self.prototype(t)[1] for t in tasks]
                distance = torch.stack([mahalanobis(features.double(), m, p) for m, p in zip(task_means, precisions)], 1)
            log = mean_per_image(distance, image, int(image.max()) + 1).clamp_min(1e-12).log()
            top = log.topk(min(2, len(tasks)), dim=1, largest=False)
            margin = (top.values[:, 1] - top.values[:, 0]) if len(tasks) > 1 else torch.full_like(log[:, 0], float("inf"))
            out[task] = (top.indices[:, 0], margin)
        return out

    def unknown_threshold(self, task: int) -> float:
        return float(getattr(self, f"unknown_{task}"))

    def prototype(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{task}"), getattr(self, f"precision_{task}")

    # ------------------------------------------------------------------------------ routing
    def distances(self, features: torch.Tensor, tasks: list[int] | None = None) -> torch.Tensor:
        """(N, D) -> (N, T) float64 distances to each prototype, columns in `tasks` order (default: all)."""
        tasks = self.task_ids if tasks is None else list(tasks)
        if not tasks:
            raise MoleflowError("the router has no tasks yet; train a task first")
        x = features.double()
        return torch.stack([mahalanobis(x, *self.prototype(t)) for t in tasks], dim=1)

    def pooled_precision(self, tasks: list[int]) -> torch.Tensor:
        """(D, D) float64: the inverse of the mean of the covariances of `tasks` (each the inverse of its stored
        precision), plus `defect_weight` x the mean of their defect-move moments: the one metric of
        `metric="pooled"`. Computed in NumPy, so that an ONNX trace takes it as a
        constant, and kept while those precisions (and defect moves, and their weight) are the same, unmodified."""
        precisions = [self.prototype(t)[1] for t in tasks]
        moments = self.defect_moves(tasks)
        key = (self.cfg.defect_weight,) + tuple((p.data_ptr(), p._version, p.device, float(p.sum()))
                                                for p in precisions + moments)
        if key not in self._pooled:
            self._pooled = {key: pool_precisions(precisions, moments, self.cfg.defect_weight)}  # the latest only
        return self._pooled[key]

    def choice_distances(self, features: torch.Tensor, tasks: list[int] | None = None) -> torch.Tensor:
        """(N, D) -> (N, T) float64 distances that choose the product: with `metric="pooled"` every prototype's
        distance measured with the pooled precision of `tasks` (linear discriminant analysis: a defect's move
        counts only along what separates the products, not through their different covariances; docs/decisions.md
        §8), else `distances`."""
        tasks = self.task_ids if tasks is None else list(tasks)
        if self.cfg.metric != "pooled":
            return self.distances(features, tasks)
        return pooled_distances(features, torch.stack([self.prototype(t)[0] for t in tasks]),
                                self.pooled_precision(tasks))

    def forward(self, features: torch.Tensor, tasks: list[int] | None = None, owner: torch.Tensor | None = None,
                n_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, D) -> per image (N,): index into `tasks`, distance to that task, known (within its limit).

        `tasks` restricts the choice (e.g. to the tasks learned up to some step); default all. `owner` (M,)
        groups rows into `n_images` images (the tiles of one image): an image goes to the task with the
        smallest mean choice distance over its rows; its distance and limit are in that task's own metric.
        Default: every row is its own image."""
        tasks = self.task_ids if tasks is None else list(tasks)
        own, choice = self.image_distances(features, tasks, owner, n_images)
        index = choice.argmin(1)
        best = own.gather(1, index.unsqueeze(1)).squeeze(1)
        return index, best, best <= self.limits(tasks).index_select(0, index)

    def image_distances(self, features: torch.Tensor, tasks: list[int], owner: torch.Tensor | None = None,
                        n_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) -> own (N, T), choice (N, T) float64: each image's distance to each prototype of `tasks` in the
        products' own metrics, and the distances that choose the product (`choice_distances`: the same tensor
        unless `metric="pooled"`); each the mean over an image's rows (`owner` (M,) groups rows into `n_images`
        images, the tiles of one image; default: a row per image)."""
        own = self.distances(features, tasks)  # (M, T)
        choice = self.choice_distances(features, tasks) if self.cfg.metric == "pooled" else None
        if owner is not None:
            own = mean_per_image(own, owner, n_images)
            choice = None if choice is None else mean_per_image(choice, owner, n_images)
        return own, own if choice is None else choice

    def limits(self, tasks: list[int]) -> torch.Tensor:
        """(T,) float64 unknown-product distance limits of `tasks`."""
        return torch.stack([getattr(self, f"unknown_{t}") for t in tasks])

    def route(self, features: torch.Tensor, tasks: list[int] | None = None, owner: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like `forward`, but returns task ids (N,) long instead of indices into `tasks`."""
        tasks = self.task_ids if tasks is None else list(tasks)
        index, best, known = self(features, tasks, owner)
        return torch.tensor(tasks, dtype=torch.long)[index.cpu()], best.cpu(), known.cpu()


def holdout_routing(router: PrototypeRouter, names: dict[int, str], margin: float) -> dict[str, dict]:
    """Where each product's kept held-out normals route now, among every product the router holds (its prototype
    without them for its own; `PrototypeRouter.holdout_choices`): {name: {"n": images, "routed": {name: share},
    "ambiguous": share within `margin` (log units) of the runner-up}} for the products that kept them. By the
    prototypes alone: the trimmed comparison (`router.trim_limit`) needs the images' patches, which are not kept."""
    tasks, out = list(router.task_ids), {}
    if not tasks:
        return out
    for t, (index, gap) in router.holdout_choices(tasks).items():
        chosen = torch.tensor(tasks)[index.cpu()]
        out[names.get(t, str(t))] = {
            "n": len(chosen),
            "routed": {names.get(u, str(u)): float((chosen == u).double().mean()) for u in tasks if (chosen == u).any()},
            "ambiguous": float((gap.cpu() <= margin).double().mean())}
    return out
