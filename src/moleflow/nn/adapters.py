"""Positional encoding, per-task input adapters and the shared spatial context mixer (spec §2.4-2.6).

All modules work on channels-last token maps (B, H, W, D). A per-task adapter's `forward_rows(adapters, rows,
x)` runs a mixed batch in one pass, row i through the adapter of its task (`lora.RowTasks`); `forward` is its
case of one adapter for every row.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_linear_
from .lora import RowTasks, run_sequential


def _per_row(adapters: Sequence[nn.Module], rows: RowTasks | None, x: torch.Tensor,
             value: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """`value(adapter)` (S) of adapters[0] (rows None), or of each row's adapter shaped (B, 1, ..., 1, *S)."""
    if rows is None:
        return value(adapters[0])
    return rows.broadcast([value(a) for a in adapters], x)


def sinusoidal_position_encoding(height: int, width: int, dim: int,
                                 device: torch.device | None = None) -> torch.Tensor:
    """2-D sinusoidal encoding (H, W, D). Channels [0, D/2) encode the column, [D/2, D) the row;
    within each half, channel 2j = sin(pos * w_j), 2j+1 = cos(pos * w_j), w_j = 10000^(-2j / (D/2))."""
    if dim % 4:
        raise ValueError(f"positional encoding needs D divisible by 4, got {dim}")
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(0, half, 2, dtype=torch.float64) / half)  # (D/4,)

    def encode(n: int) -> torch.Tensor:  # (n, D/2), interleaved sin/cos
        angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]
        return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n, half)

    cols = encode(width)[None, :, :].expand(height, width, half)
    rows = encode(height)[:, None, :].expand(height, width, half)
    return torch.cat([cols, rows], dim=-1).to(dtype=torch.float32, device=device)


class WhiteningAdapter(nn.Module):
    """Parameter-free per-token LayerNorm, then gamma * x + beta with gamma in (0.5, 2), beta in (-2, 2).

    gamma = 0.5 + 1.5 * sigmoid(gamma_raw), beta = 2 * tanh(beta_raw). `gamma_raw_init`: -0.7 for
    task 0 (gamma ~ 0.998), logit(1/3) for later tasks (gamma = 1) or 0 in the reference (gamma = 1.25).
    """

    def __init__(self, dim: int, gamma_raw_init: float) -> None:
        super().__init__()
        self.gamma_raw = nn.Parameter(torch.full((dim,), gamma_raw_init))
        self.beta_raw = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, D) -> (B, H, W, D)."""
        return self.forward_rows([self], None, x)

    @staticmethod
    def forward_rows(adapters: Sequence["WhiteningAdapter"], rows: RowTasks | None, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, D): row i through adapters[rows.index[i]] (rows None: every row through adapters[0])."""
        gamma_raw = _per_row(adapters, rows, x, lambda a: a.gamma_raw)
        beta_raw = _per_row(adapters, rows, x, lambda a: a.beta_raw)
        x = F.layer_norm(x, (adapters[0].gamma_raw.shape[0],), eps=1e-5)  # a static shape (ONNX export)
        gamma = 0.5 + 1.5 * torch.sigmoid(gamma_raw)
        return gamma * x + 2.0 * torch.tanh(beta_raw)


class SoftLNAdapter(nn.Module):
    """The "w/o whitening adapter" alternative (spec §2.5.2): soft LayerNorm, FiLM, gated MLP residual."""

    def __init__(self, dim: int, first_task: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.first_task = first_task
        self.norm = nn.LayerNorm(dim)
        if first_task:
            self.ln_mix = nn.Parameter(torch.tensor(0.01))
        else:
            self.register_buffer("ln_mix", torch.tensor(0.0))
        self.film_gamma = nn.Parameter(torch.ones(dim))
        self.film_beta = nn.Parameter(torch.zeros(dim))
        hidden = dim // 2
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                init_linear_(layer, generator)
        nn.init.normal_(self.mlp[-1].weight, 0.0, 0.01, generator=generator)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, D) -> (B, H, W, D)."""
        return self.forward_rows([self], None, x)

    @staticmethod
    def forward_rows(adapters: Sequence["SoftLNAdapter"], rows: RowTasks | None, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, D): row i through adapters[rows.index[i]] (rows None: every row through adapters[0])."""
        def per_row(value: Callable[[SoftLNAdapter], torch.Tensor]) -> torch.Tensor:
            return _per_row(adapters, rows, x, value)

        norm = adapters[0].norm
        m = per_row(lambda a: a.ln_mix).clamp(0.0, 1.0)
        if rows is None:
            normed = norm(x)
        else:  # layer_norm takes one affine for all rows; per row it is applied after (equal up to rounding)
            normed = (F.layer_norm(x, norm.normalized_shape, eps=norm.eps) * per_row(lambda a: a.norm.weight)
                      + per_row(lambda a: a.norm.bias))
        x1 = m * normed + (1 - m) * x
        x2 = per_row(lambda a: a.film_gamma) * x1 + per_row(lambda a: a.film_beta)
        x3 = x2 + torch.sigmoid(per_row(lambda a: a.gate)) * run_sequential([a.mlp for a in adapters], rows, x2)
        if rows is None:
            return 0.9 * x + 0.1 * x3 if adapters[0].first_task else x3
        first = rows.select(torch.tensor([a.first_task for a in adapters], device=x.device))
        return torch.where(first.view(-1, *[1] * (x.dim() - 1)), 0.9 * x + 0.1 * x3, x3)


class SpatialContextMixer(nn.Module):
    """Shared depthwise k x k box-initialised conv, mixed in through a gate: (1-g) x + g conv(x)."""

    def __init__(self, dim: int, kernel: int, residual: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        nn.init.constant_(self.conv.weight, 1.0 / kernel**2)
        nn.init.zeros_(self.conv.bias)
        self.residual = residual
        self.gate = nn.Parameter(torch.tensor(0.5)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.gate is None:
            return mixed
        g = torch.sigmoid(self.gate)
        return (1 - g) * x + g * mixed


def whitening_gamma_raw_init(task: int, identity: bool) -> float:
    """Initial gamma_raw of task `task`'s whitening adapter (see `WhiteningAdapter`)."""
    if task == 0:
        return -0.7
    return math.log(0.5) if identity else 0.0  # logit(1/3) = log(1/2) -> gamma = 1
