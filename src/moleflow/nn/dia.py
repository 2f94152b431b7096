"""DIA: a task-specific stack of affine coupling blocks applied after the shared flow (spec §2.8).

Block i keeps one half of the channels and transforms the other (halves alternate with i):
    s~ = clamp * tanh(S(keep) / clamp),  changed' = changed * exp(s~) + T(keep),  log-det = sum(s~)
S and T are MLPs half -> hidden -> hidden -> half with zero-initialised last layers (identity at start).
`DIA.forward_rows(dias, rows, x)` runs a mixed batch in one pass, row i through the DIA of its task.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from .init import init_linear_
from .lora import RowTasks, run_sequential

Net = Callable[[torch.Tensor], torch.Tensor]


def _mlp(half: int, hidden: int, generator: torch.Generator) -> nn.Sequential:
    layers = [nn.Linear(half, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, half)]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            init_linear_(layer, generator)
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class DIABlock(nn.Module):
    """One DIA coupling block on (B,H,W,D); `swap` selects which half is transformed."""

    def __init__(self, dim: int, hidden: int, swap: bool, clamp: float, generator: torch.Generator) -> None:
        super().__init__()
        self.half, self.swap, self.clamp = dim // 2, swap, clamp
        self.scale_net = _mlp(self.half, hidden, generator)
        self.shift_net = _mlp(self.half, hidden, generator)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[..., : self.half], x[..., self.half :]
        return (b, a) if self.swap else (a, b)

    def _merge(self, keep: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([changed, keep] if self.swap else [keep, changed], dim=-1)

    def _scale_shift(self, keep: torch.Tensor, nets: tuple[Net, Net] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        scale_net, shift_net = (self.scale_net, self.shift_net) if nets is None else nets
        s = self.clamp * torch.tanh(scale_net(keep) / self.clamp)
        return s, shift_net(keep)

    def forward(self, x: torch.Tensor, nets: tuple[Net, Net] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,H,W,D) -> (y (B,H,W,D), log-det per patch (B,H,W)). `nets`: the scale and shift nets to use
        instead of this block's own (per-row nets of a mixed batch)."""
        keep, changed = self._split(x)
        s, t = self._scale_shift(keep, nets)
        return self._merge(keep, changed * torch.exp(s) + t), s.sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        keep, changed = self._split(y)
        s, t = self._scale_shift(keep)
        return self._merge(keep, (changed - t) * torch.exp(-s))


class DIA(nn.Module):
    """`n_blocks` DIA blocks with alternating halves; (B,H,W,D) -> (z, log-det (B,H,W))."""

    def __init__(self, dim: int, n_blocks: int, hidden_ratio: float, clamp: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.blocks = nn.ModuleList(DIABlock(dim, hidden, i % 2 == 1, clamp, generator) for i in range(n_blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_rows([self], None, x)

    @staticmethod
    def forward_rows(dias: Sequence["DIA"], rows: RowTasks | None, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,H,W,D): row i through dias[rows.index[i]] (rows None: every row through dias[0]) -> (z, log-det
        (B,H,W)). The DIAs share one architecture; their MLPs run per row with gathered weights."""
        logdet = x.new_zeros(x.shape[:-1])
        for blocks in zip(*(d.blocks for d in dias)):
            nets = None if rows is None else (partial(run_sequential, [b.scale_net for b in blocks], rows),
                                              partial(run_sequential, [b.shift_net for b in blocks], rows))
            x, ld = blocks[0](x, nets)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z)
        return z
