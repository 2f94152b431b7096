"""A linear layer with a shared base and one LoRA expert per task (the peft pattern, keyed by task id).

    h(x) = W0 x + b0 + (alpha / r) * B_t A_t x + b_t

W0, b0 are shared (trained at task 0, frozen afterwards). A_t (r, in) is Xavier-uniform, B_t (out, r)
is zero, so a new expert starts as a no-op; b_t is a zero-initialised task bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_linear_


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

    def effective_weight(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of task `task`: W0 + s * B_t A_t and b0 + b_t. Merging is exact and cheaper than
        applying A and B to every token, since a batch holds far more tokens than the rank."""
        weight, bias = self.base.weight, self.base.bias
        key = None if task is None else str(task)
        if key is not None and key in self.lora_A:
            weight = weight + self.scaling[key] * (self.lora_B[key] @ self.lora_A[key])
        if key is not None and key in self.task_bias:
            bias = bias + self.task_bias[key]
        return weight, bias

    def forward(self, x: torch.Tensor, task: int | None) -> torch.Tensor:
        weight, bias = self.effective_weight(task)
        return F.linear(x, weight, bias)
