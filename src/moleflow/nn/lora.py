"""A linear layer with a shared base and one LoRA expert per task (the peft pattern, keyed by task id).

    h(x) = W0 x + b0 + (alpha / r) * B_t A_t x + b_t

W0, b0 are shared (trained at task 0, frozen afterwards). A_t (r, in) is Xavier-uniform, B_t (out, r)
is zero, so a new expert starts as a no-op; b_t is a zero-initialised task bias.

A mixed batch (`RowTasks`: row i of the batch belongs to its own task) runs in one pass: each layer merges
the weights of the batch's distinct tasks, gathers them per row and applies them with one batched matmul
(`linear`), so the cost does not grow with the number of tasks in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_linear_


@dataclass(frozen=True, eq=False)
class RowTasks:
    """The experts of a mixed batch: row i (of every (B, ...) tensor) uses task `tasks[index[i]]`."""

    tasks: tuple[int, ...]  # distinct task ids
    index: torch.Tensor  # (B,) long, into `tasks`

    @classmethod
    def of(cls, row_tasks: Sequence[int] | torch.Tensor, device: torch.device | None = None) -> "RowTasks":
        """From the task id of each row, (B,)."""
        ids = torch.as_tensor(row_tasks, dtype=torch.long)
        distinct, index = torch.unique(ids.cpu(), return_inverse=True)
        return cls(tuple(distinct.tolist()), index.to(ids.device if device is None else device))

    def select(self, stacked: torch.Tensor) -> torch.Tensor:
        """(K, *S), one value per task of `tasks` -> (B, *S): each row's task's value."""
        return stacked.index_select(0, self.index)

    def gather(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """One tensor per task of `tasks` (all of shape S) -> (B, *S): each row's task's value."""
        return self.select(torch.stack(list(values)))

    def broadcast(self, values: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Like `gather`, shaped (B, 1, ..., 1, *S) to broadcast against x (B, ..., *S)."""
        rows = self.gather(values)
        return rows.view(rows.shape[0], *[1] * (x.dim() - rows.dim()), *rows.shape[1:])


# the expert(s) a forward uses: one task (None: the shared base alone) or one task per row
Task = Union[int, None, RowTasks]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, ..., in) -> (B, ..., out). weight (out, in) shared or (B, out, in) per row; bias (out,) shared,
    (B, out) per row or None. Shared weight and bias is `F.linear` itself."""
    if weight.dim() == 2 and (bias is None or bias.dim() == 1):
        return F.linear(x, weight, bias)
    if weight.dim() == 2:
        out = F.linear(x, weight)
    else:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, in)
        out = torch.bmm(flat, weight.transpose(1, 2)).view(*x.shape[:-1], weight.shape[1])
    if bias is None:
        return out
    # in place: a fresh (B, ..., out) result per broadcast add costs as much as the matmul on the CPU
    return out.add_(bias if bias.dim() == 1 else bias.view(bias.shape[0], *[1] * (x.dim() - 2), bias.shape[1]))


def run_sequential(nets: Sequence[nn.Sequential], rows: RowTasks | None, x: torch.Tensor) -> torch.Tensor:
    """x (B, ..., in) through `nets[0]` (rows None), or row i through `nets[rows.index[i]]` in one pass: the
    nets share one architecture of `nn.Linear` layers and parameter-free activations."""
    if rows is None:
        return nets[0](x)
    for layers in zip(*nets):
        if isinstance(layers[0], nn.Linear):
            bias = None if layers[0].bias is None else rows.gather([layer.bias for layer in layers])
            x = linear(x, rows.gather([layer.weight for layer in layers]), bias)
        else:
            x = layers[0](x)
    return x


def merge_lora(weight: torch.Tensor, scaling: float | torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor
               ) -> torch.Tensor:
    """W0 + s * B A: W0 (out, in); B (out, r) and A (r, in), or stacked (K, out, r), (K, r, in) with s (K, 1, 1)."""
    return weight + scaling * (lora_b @ lora_a)


def owned_by_all(keys: list[str], store: nn.ParameterDict | nn.ModuleDict) -> bool:
    """Whether every task of `keys` has its own tensor in `store` (none: the shared one serves all)."""
    owned = [k in store for k in keys]
    if any(owned) and not all(owned):
        raise ValueError(f"tasks {keys} do not all have this expert part")
    return bool(owned) and all(owned)


class LoRALinear(nn.Module):
    """Linear layer over the last axis of `x` (..., in) -> (..., out) with per-task experts."""

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        init_linear_(self.base, generator)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.task_bias = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_task(self, task: int, rank: int | None, alpha: float | None, use_bias: bool,
                 generator: torch.Generator) -> None:
        """Create task `task`'s expert: LoRA of `rank` (None: none) and/or a task bias."""
        key = str(task)
        if rank is not None:
            a = torch.empty(rank, self.in_features)
            nn.init.xavier_uniform_(a, generator=generator)
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(self.out_features, rank))
            self.scaling[key] = (float(rank) if alpha is None else alpha) / rank
        if use_bias:
            self.task_bias[key] = nn.Parameter(torch.zeros(self.out_features))

    def remove_task(self, task: int) -> None:
        key = str(task)
        for store in (self.lora_A, self.lora_B, self.task_bias):
            if key in store:
                del store[key]
        self.scaling.pop(key, None)

    def effective_weight(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of task `task`: W0 + s * B_t A_t (out, in) and b0 + b_t (out,). Merging is exact and cheaper
        than applying A and B to every token, since a batch holds far more tokens than the rank. With
        `RowTasks`, per row: W (B, out, in) and b (B, out), or the shared W0, b0 where no task has its own."""
        if isinstance(task, RowTasks):
            return self._row_weights(task)
        weight, bias = self.base.weight, self.base.bias
        key = None if task is None else str(task)
        if key is not None and key in self.lora_A:
            weight = merge_lora(weight, self.scaling[key], self.lora_B[key], self.lora_A[key])
        if key is not None and key in self.task_bias:
            bias = bias + self.task_bias[key]
        return weight, bias

    def _row_weights(self, rows: RowTasks) -> tuple[torch.Tensor, torch.Tensor]:
        """The K distinct tasks' weights merged at once (stacked, one batched product), then gathered per row."""
        keys = [str(t) for t in rows.tasks]
        weight, bias = self.base.weight, self.base.bias
        if owned_by_all(keys, self.lora_A):
            scaling = weight.new_tensor([self.scaling[k] for k in keys]).view(-1, 1, 1)
            lora_b = torch.stack([self.lora_B[k] for k in keys])
            weight = rows.select(merge_lora(weight, scaling, lora_b, torch.stack([self.lora_A[k] for k in keys])))
        if owned_by_all(keys, self.task_bias):
            bias = rows.select(bias + torch.stack([self.task_bias[k] for k in keys]))
        return weight, bias

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """x (B, ..., in) -> (B, ..., out) under task `task` (see `Task`)."""
        weight, bias = self.effective_weight(task)
        return linear(x, weight, bias)
