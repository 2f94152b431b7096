"""The one inspection pipeline: prepared images in, an `Inspection` out; only the neural calls have backends.

    out = inspect(inspector, TorchBackend(inspector), prep)               # PyTorch (`MoleFlow.predict`)
    out = inspect(inspector, onnx_engine, prep, task_ids=[0, 0])          # onnxruntime (engine.OnnxEngine)

The steps, the same whichever backend runs the networks:
    check_request       what no inspection accepts (no task learned, oracle mode without ids, bad ids)
    backend.features    tiles (M, 3, S, S) -> tokens (M, h, w, D), routing features (M, D)   [neural]
    Inspector.route     which product each image is (tiles of an image routed together), or the oracle's ids
    backend.expert_scores  tokens -> patch scores (M, h, w) under each tile's routed expert      [neural]
    Inspector.decide    image scores, pixel maps, thresholds; a part in doubt also scored under every plausible
                        product (through `backend.expert_scores` again)
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .data.batch import Prepared
from .errors import MoleflowError
from .inspector import Inspection, Inspector


class NeuralBackend(Protocol):
    """What runs the two neural pieces of an inspection."""

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles (M, 3, S, S) -> tokens (M, h, w, D) float32 and routing features (M, D) float32."""
        ...

    def expert_scores(self, tokens: torch.Tensor, index: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Tokens (K, h, w, D) -> patch scores (K, h, w) float32, row i under the expert of tasks[index[i]]."""
        ...


class TorchBackend:
    """The Inspector's own modules in PyTorch, `batch_size` tiles at a time (the reference)."""

    def __init__(self, inspector: Inspector, batch_size: int = 32) -> None:
        self.inspector, self.batch_size = inspector, batch_size

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, routing = self.inspector.extract(pixels, self.batch_size)
        return tokens.float(), routing.float()

    def expert_scores(self, tokens: torch.Tensor, index: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        return self.inspector.expert_scores(tokens, index.to(self.inspector.device), tasks, self.batch_size)


def check_request(inspector: Inspector, n_images: int, task_ids: Sequence[int] | torch.Tensor | None = None,
                  among: Sequence[int] | None = None) -> None:
    """Refuse what no inspection of `n_images` images accepts, before any image is processed: a model without
    tasks, routing in oracle mode (`router.enabled` false) among several tasks, oracle `task_ids` (N,) of
    another length or naming tasks the model does not have."""
    tasks = inspector.task_ids if among is None else list(among)
    if not tasks:
        raise MoleflowError("the model has learned no task yet; call fit_task first")
    if task_ids is None:
        if not inspector.config.router.enabled and len(tasks) > 1:
            raise MoleflowError("router.enabled is false (oracle mode): pass task ids (`task_ids`, "
                                "moleflow predict --task NAME)")
        return
    ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
    if len(ids) != n_images:
        raise MoleflowError(f"{len(ids)} task ids for {n_images} images")
    unknown = set(ids.tolist()) - set(inspector.task_ids)
    if unknown:
        raise MoleflowError(f"unknown task ids {sorted(unknown)}; learned tasks: {inspector.task_ids}")


@torch.no_grad()
def inspect(inspector: Inspector, backend: NeuralBackend, prep: Prepared,
            task_ids: Sequence[int] | torch.Tensor | None = None, among: Sequence[int] | None = None) -> Inspection:
    """Route (or take oracle `task_ids` (N,)), score and decide the N images of `prep`; results on the CPU.
    `among` restricts routing to some tasks (e.g. those learned up to a step); default all."""
    check_request(inspector, prep.n_images, task_ids, among)
    tokens, routing = backend.features(prep.pixels)
    if task_ids is None:
        tasks = inspector.task_ids if among is None else list(among)
        routed = inspector.route(tokens, routing, prep.owner.to(tokens.device), prep.n_images, tasks)
    else:
        routed, tasks = inspector.oracle_routing(task_ids)

    def scorer(rows: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        return backend.expert_scores(tokens if rows is None else tokens[rows.to(tokens.device)], index, tasks)

    return inspector.decide(prep, routed, tasks, scorer)


def concat_inspections(parts: list[Inspection]) -> Inspection:
    """One `Inspection` of the images of several, in order."""
    if len(parts) == 1:
        return parts[0]
    patch = [p.patch_scores for p in parts]
    return Inspection(
        scores=torch.cat([p.scores for p in parts]), maps=torch.cat([p.maps for p in parts]),
        patch_scores=torch.cat(patch) if all(isinstance(p, torch.Tensor) for p in patch)
        else [m for p in patch for m in p],
        task_ids=torch.cat([p.task_ids for p in parts]), known=torch.cat([p.known for p in parts]),
        anomalous=torch.cat([p.anomalous for p in parts]),
        router_distance=torch.cat([p.router_distance for p in parts]),
        thresholds=torch.cat([p.thresholds for p in parts]), route_margin=torch.cat([p.route_margin for p in parts]),
        ambiguous=torch.cat([p.ambiguous for p in parts]), alternatives=[a for p in parts for a in p.alternatives])
