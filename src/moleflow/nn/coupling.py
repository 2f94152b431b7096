"""The shared affine coupling block of the flow and its LoRA subnet with scale context (spec §2.7).

Tokens are channels-last maps (B, H, W, D); the spatial layout travels with the tensor, so the
subnet's context convolution needs no global state (fixes spec §12.12).

Forward of one block, u = [u1, u2] split at D/2 along channels:
    a = subnet(u1; task)                 a = [a_s, a_t], each (B, H, W, D/2)
    ls = clamp * tanh(0.1 * a_s)         log-scale, |ls| < clamp
    v2 = u2 * exp(ls) + 0.1 * a_t        log-det per patch = sum(ls)
    out = permute([u1, v2])              fixed random channel permutation (no log-det)
The FrEIA global affine (`AllInOneBlock`) is dropped: its parameters were never trained (§2.7.1).
`task` is one task's id or `RowTasks` (one task per row of a mixed batch); only the LoRA layers read it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear, Task


class ScaleContextSubnet(nn.Module):
    """Subnet (B,H,W,D/2) -> (B,H,W,D) whose scale branch also sees a depthwise-conv context of u1.

    ctx = alpha * dwconv_k(u1), alpha = max_alpha * sigmoid(theta) (shared, trained at task 0);
    s = L_s2(relu(L_s1([u1, ctx]))), t = L_t2(relu(L_t1(u1))). All four linears carry LoRA experts.
    """

    def __init__(self, half: int, kernel: int, init_alpha: float, max_alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        hidden = 2 * half
        self.context = nn.Conv2d(half, half, kernel, padding=kernel // 2, groups=half)
        nn.init.zeros_(self.context.weight)
        nn.init.zeros_(self.context.bias)
        self.max_alpha = max_alpha
        ratio = min(max(init_alpha / max_alpha, 1e-6), 1 - 1e-6)
        self.theta = nn.Parameter(torch.tensor(float(torch.logit(torch.tensor(ratio)))))
        self.s1 = LoRALinear(2 * half, hidden, generator)
        self.s2 = LoRALinear(hidden, half, generator)
        self.t1 = LoRALinear(half, hidden, generator)
        self.t2 = LoRALinear(hidden, half, generator)

    def lora_layers(self) -> list[LoRALinear]:
        return [self.s1, self.s2, self.t1, self.t2]

    def forward(self, u1: torch.Tensor, task: Task) -> torch.Tensor:
        alpha = self.max_alpha * torch.sigmoid(self.theta)
        ctx = alpha * self.context(u1.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        s = self.s2(F.relu(self.s1(torch.cat([u1, ctx], dim=-1), task)), task)
        t = self.t2(F.relu(self.t1(u1, task)), task)
        return torch.cat([s, t], dim=-1)


class PlainSubnet(nn.Module):
    """Subnet without scale context (`no_scale_context`): L2(relu(L1(u1))), D/2 -> D -> D."""

    def __init__(self, half: int, generator: torch.Generator) -> None:
        super().__init__()
        self.l1 = LoRALinear(half, 2 * half, generator)
        self.l2 = LoRALinear(2 * half, 2 * half, generator)

    def lora_layers(self) -> list[LoRALinear]:
        return [self.l1, self.l2]

    def forward(self, u1: torch.Tensor, task: Task) -> torch.Tensor:
        return self.l2(F.relu(self.l1(u1, task)), task)


class CouplingBlock(nn.Module):
    """One shared affine coupling block with a fixed channel permutation. Maps (B,H,W,D) -> (B,H,W,D)."""

    def __init__(self, dim: int, clamp: float, subnet: nn.Module, generator: torch.Generator) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"coupling needs an even channel count, got {dim}")
        self.half, self.clamp, self.subnet = dim // 2, clamp, subnet
        perm = torch.randperm(dim, generator=generator)
        self.register_buffer("perm", perm)
        # The permutation is applied as a product with its 0/1 matrix, split by input half, which also
        # replaces the concatenation: exact (each output is 1 * one input + zeros) and 2-3x faster on CPU
        # than a channel gather, whose backward is a slow scatter (FrEIA does the same).
        matrix = torch.eye(dim)[perm]  # out[i] = in[perm[i]]
        self.register_buffer("perm_first", matrix[:, : self.half].contiguous(), persistent=False)
        self.register_buffer("perm_second", matrix[:, self.half :].contiguous(), persistent=False)

    def _scale_shift(self, u1: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.subnet(u1, task)
        log_scale = self.clamp * torch.tanh(0.1 * a[..., : self.half])
        return log_scale, 0.1 * a[..., self.half :]

    def forward(self, u: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B,H,W,D) -> (v (B,H,W,D), log-det per patch (B,H,W))."""
        u1, u2 = u[..., : self.half], u[..., self.half :]
        log_scale, shift = self._scale_shift(u1, task)
        v2 = u2 * torch.exp(log_scale) + shift
        out = F.linear(u1, self.perm_first.to(u.dtype)) + F.linear(v2, self.perm_second.to(u.dtype))
        return out, log_scale.sum(-1)

    def inverse(self, v: torch.Tensor, task: Task) -> torch.Tensor:
        """Exact inverse of `forward`."""
        v = v[..., torch.argsort(self.perm)]
        u1, v2 = v[..., : self.half], v[..., self.half :]
        log_scale, shift = self._scale_shift(u1, task)
        return torch.cat([u1, (v2 - shift) * torch.exp(-log_scale)], dim=-1)
