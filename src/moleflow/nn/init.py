"""Seeded parameter initialisers: every random choice takes a `torch.Generator`, never the global RNG."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default `nn.Linear` init (Kaiming-uniform weight, uniform bias), drawn from `generator`."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def init_conv_(conv: nn.Conv2d, generator: torch.Generator) -> None:
    """PyTorch's default `nn.Conv2d` init, drawn from `generator`."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        fan_in = conv.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
