"""Helpers shared by the tests (imported as `helpers`; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from moleflow import Config


def tiny_config(**overrides) -> Config:
    """The `tiny` preset with `section.key=value` overrides."""
    return Config.from_preset("tiny").with_overrides(overrides)


def random_images(seed: int, n: int, size: int = 112, shift: float = 0.0) -> torch.Tensor:
    """n normalised random images (n, 3, size, size)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + shift
