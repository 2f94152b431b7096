"""Feature cache: the backbone runs once per training image per task, and the cache changes nothing."""

from __future__ import annotations

import torch

from moleflow import MoleFlow

from helpers import random_images, tiny_config


def _count_backbone_images(model: MoleFlow) -> list[int]:
    """Count the images the backbone is run on (`FeatureExtractor.run`, whichever runtime computes them)."""
    seen = [0]
    original = model.extractor.run

    def counting(x, *args, **kwargs):
        seen[0] += len(x)
        return original(x, *args, **kwargs)

    model.extractor.run = counting
    return seen


def test_backbone_runs_once_per_training_image():
    cfg = tiny_config(**{"train.epochs": 3})
    model = MoleFlow(cfg)
    seen = _count_backbone_images(model)
    model.fit_task(random_images(0, 20), name="a")
    assert seen[0] == 20  # 18 training + 2 calibration images, each once, for 3 epochs
    model.fit_task(random_images(1, 12, shift=1.0), name="b")
    assert seen[0] == 32


def _trained_state(**overrides) -> dict[str, torch.Tensor]:
    model = MoleFlow(tiny_config(**{"train.epochs": 2, **overrides}))
    model.fit_task(random_images(0, 20), name="a")
    model.fit_task(random_images(1, 20, shift=1.0), name="b")
    return model.flow.state_dict()


def test_cache_gives_bit_identical_parameters():
    cached = _trained_state()
    uncached = _trained_state(**{"train.feature_cache": False})
    memmapped = _trained_state(**{"train.cache_memory_gb": 1e-9})
    assert cached.keys() == uncached.keys() == memmapped.keys()
    for key in cached:
        assert torch.equal(cached[key], uncached[key]), key
        assert torch.equal(cached[key], memmapped[key]), key
