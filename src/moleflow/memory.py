"""Per-task memory of training patch tokens, scored by nearest-neighbour distance (PatchCore style).

Optional (`score.source = "flow+memory"`), not part of the faithful method. Each task keeps a seeded
random share of its own training patch tokens, optionally thinned to `coreset` tokens by PatchCore's greedy
k-center selection (which keeps the coverage of the normal patches with far fewer rows: the search is the
inference bottleneck on a CPU), so nothing of another task is stored or replayed and adding a task leaves
every earlier memory untouched (zero forgetting stays structural).

    memory.add_task(task, tokens)              tokens (N, H, W, D) or an (N, H, W, D) memmap
    memory.distances(tokens, task)             (B, H, W, D) -> (B, H, W) distance to the nearest kept token

Written here rather than taken from anomalib or faiss: the search is one chunked matrix product in torch
(exact, runs on the model's device, no extra dependency), the memory must live in our checkpoint, and
anomalib's k-center sampler comes with its Lightning stack (the greedy loop below is a few lines).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sample_patches(tokens, fraction: float, seed: int, max_tokens: int | None = None) -> torch.Tensor:
    """A seeded random `fraction` (at most `max_tokens`) of the N*H*W patch tokens of `tokens` (N, H, W, D)
    -> (M, D) float32."""
    n, h, w, d = tokens.shape
    total = n * h * w
    keep = max(1, int(round(total * fraction)))
    if max_tokens is not None:
        keep = min(keep, max_tokens)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(total, generator=gen)[:keep].sort().values
    if isinstance(tokens, np.memmap):  # read only the rows we keep, image by image
        flat = tokens.reshape(total, d)
        return torch.from_numpy(np.ascontiguousarray(flat[index.numpy()])).float()
    return torch.as_tensor(tokens).reshape(total, d)[index].float().clone()


def greedy_coreset(points: torch.Tensor, k: int, seed: int, project_dim: int = 128) -> torch.Tensor:
    """Sorted indices (k,) of a greedy k-center coreset of `points` (N, D) (PatchCore, Roth et al. 2022, §3.2):
    start at a seeded random point, then repeatedly add the point farthest from every point chosen so far.
    Distances are taken after a seeded Gaussian projection to `project_dim` dimensions, as PatchCore does
    (Johnson-Lindenstrauss), so the cost is O(k N project_dim). All N when k >= N."""
    n, d = points.shape
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = points.float()
    if d > project_dim:
        x = x @ (torch.randn(d, project_dim, generator=gen) / project_dim ** 0.5)
    sq = x.pow(2).sum(1)
    nearest = torch.full((n,), float("inf"))
    chosen = torch.empty(k, dtype=torch.long)
    current = int(torch.randint(n, (1,), generator=gen))
    for i in range(k):
        chosen[i] = current
        # squared distance to the newest centre, ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product
        nearest = torch.minimum(nearest, sq - 2 * (x @ x[current]) + sq[current])
        nearest[current] = -1.0  # never chosen twice (rounding can leave a chosen point slightly above 0)
        current = int(nearest.argmax())
    return chosen.sort().values


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(Q, D), (M, D) -> (Q,) Euclidean distance of each query to its nearest bank row (exact)."""
    bank_sq = bank.pow(2).sum(1)

    def nearest(q: torch.Tensor) -> torch.Tensor:  # ||q||^2 - 2 q.b + ||b||^2, minimised over the bank
        return (torch.addmm(bank_sq, q, bank.T, beta=1, alpha=-2).min(1).values + q.pow(2).sum(1)).clamp_min(0).sqrt()

    if torch.onnx.is_in_onnx_export() or len(queries) <= chunk:  # no split: the exported graph takes any batch
        return nearest(queries)
    return torch.cat([nearest(q) for q in queries.split(chunk)])


class PatchMemory(nn.Module):
    """Memory banks keyed by task id: `bank_<t>` (M_t, D) and `norm_<t>` (4,) = mean and std of the flow NLL
    and of the memory distance over held-out normal patches of the task (set by `set_norm`).

    A task keeps a seeded random `fraction` (at most `max_tokens`) of its training tokens; with `coreset` > 0
    that sample is then thinned to `coreset` tokens by `greedy_coreset`. A patch's score is its standardised NLL
    plus `weight` times its standardised memory distance (`combination="sum"`), or the larger of the two ("max")."""

    def __init__(self, fraction: float, seed: int = 0, max_tokens: int | None = None, coreset: int = 0,
                 weight: float = 1.0, combination: str = "sum") -> None:
        super().__init__()
        self.fraction, self.seed, self.max_tokens, self.coreset = fraction, seed, max_tokens, coreset
        self.weight, self.combination = weight, combination

    def has(self, task: int) -> bool:
        return hasattr(self, f"bank_{task}")

    def add_task(self, task: int, tokens) -> None:
        """Keep a seeded `fraction` of task `task`'s training tokens (N, H, W, D), thinned to a coreset."""
        seed = self.seed * 1_000_003 + task
        bank = sample_patches(tokens, self.fraction, seed, self.max_tokens)
        if self.coreset:
            bank = bank[greedy_coreset(bank, self.coreset, seed)].clone()
        self.register_buffer(f"bank_{task}", bank)

    def set_norm(self, task: int, nll: torch.Tensor, distance: torch.Tensor) -> None:
        """Standardisation of task `task` from normal patch maps: nll and distance (N, H, W)."""
        n, d = nll.double().flatten(), distance.double().flatten()
        stats = torch.stack([n.mean(), n.std().clamp_min(1e-6), d.mean(), d.std().clamp_min(1e-6)])
        self.register_buffer(f"norm_{task}", stats.float())

    def remove_task(self, task: int) -> None:
        for name in (f"bank_{task}", f"norm_{task}"):
            if hasattr(self, name):
                delattr(self, name)

    def distances(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        """tokens (B, H, W, D) -> (B, H, W) distance of each patch to task `task`'s nearest kept patch."""
        bank = getattr(self, f"bank_{task}").to(tokens.dtype)
        b, h, w, d = tokens.shape
        return nearest_distance(tokens.reshape(-1, d), bank).reshape(b, h, w)

    def combine(self, nll: torch.Tensor, tokens: torch.Tensor, task: int) -> torch.Tensor:
        """Patch score (B, H, W): standardised flow NLL + `weight` x standardised memory distance of task `task`."""
        return self.standardised_sum(nll, self.distances(tokens, task), task)

    def standardised_sum(self, nll: torch.Tensor, distance: torch.Tensor, task: int) -> torch.Tensor:
        """Patch score (B, H, W) of a flow NLL and a memory distance (B, H, W) already computed under task `task`."""
        norm = getattr(self, f"norm_{task}").to(nll.dtype)
        flow = (nll - norm[0]) / norm[1]
        memory = self.weight * self.standardised_distance(distance.to(nll.dtype), task)
        return torch.maximum(flow, memory) if self.combination == "max" else flow + memory

    def standardised_distance(self, distance: torch.Tensor, task: int) -> torch.Tensor:
        """Memory distances (B, H, W) under task `task` in units of its held-out normal patches' distances."""
        norm = getattr(self, f"norm_{task}").to(distance.dtype)
        return (distance - norm[2]) / norm[3]

    def load_banks(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the buffers of a saved `state_dict()`."""
        for name, value in state.items():
            self.register_buffer(name, value.clone())


def patch_scores(flow: nn.Module, memory: PatchMemory | None, tokens: torch.Tensor, task: int) -> torch.Tensor:
    """The patch anomaly score (B, H, W) of tokens (B, H, W, D) under task `task`: the flow's NLL (spec §6),
    or with a memory the standardised sum of NLL and memory distance. Detector and ONNX export share it."""
    nll = flow(tokens, task).nll
    return nll if memory is None else memory.combine(nll, tokens, task)
