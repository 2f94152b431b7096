"""Helpers shared by the tests (imported as `helpers`; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from moleflow import Config


def tiny_config(**overrides) -> Config:
    """The `tiny` preset with `section.key=value` overrides."""
    return Config.from_preset("tiny").with_overrides(overrides)


def product_images(names: tuple[str, ...], n_train: int, n_test_good: int, size: int = 112
                   ) -> dict[str, tuple[list, list]]:
    """Per generated product (seeded by its position): normal training images and good test images (uint8)."""
    from moleflow.data.synthetic import generate_product

    out = {}
    for i, name in enumerate(names):
        data = generate_product(name, n_train=n_train, n_test_good=n_test_good, n_test_defect=0, size=size, seed=i)
        out[name] = (list(data.train_images), list(data.test_images))
    return out


def random_images(seed: int, n: int, size: int = 112, shift: float = 0.0) -> torch.Tensor:
    """n normalised random images (n, 3, size, size)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + shift
