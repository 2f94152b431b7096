"""Routing on the real datasets in ../shared/datasets: shrinkage versus the reference's 1e-5 ridge.

Skipped, with the reason printed, where the shared datasets are absent (never copied into the repository).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moleflow.backbones import FeatureExtractor
from moleflow.config import BackboneConfig, RouterConfig
from moleflow.data.datasets import load_class, load_images
from moleflow.data.transforms import ImageTransform
from moleflow.router import PrototypeRouter

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CLASSES = ["magnetic_tile", "kolektor", "pcb_deeppcb", "cubes"]


@pytest.fixture(scope="module")
def routing_features():
    if not all((SHARED / c / "train").is_dir() for c in CLASSES):
        pytest.skip(f"the shared datasets are not at {SHARED}; this test needs them")
    extractor = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", embed_dim=128))
    transform = ImageTransform(224, "squash", extractor.mean, extractor.std)
    feats = {}
    with torch.no_grad():
        for name in CLASSES:
            split = load_class(SHARED, name, "folder")
            out = []
            for part in ("train", "test"):
                samples = getattr(split, part)
                chunks = [extractor(load_images(samples[i:i + 64], transform))[1] for i in range(0, len(samples), 64)]
                out.append(torch.cat(chunks))
            feats[name] = tuple(out)
    return feats


def _accuracy(features, covariance: str) -> dict[str, float]:
    router = PrototypeRouter(RouterConfig(covariance=covariance))
    for task, name in enumerate(CLASSES):
        router.add_task(task, features[name][0])
    return {name: (router.route(features[name][1])[0] == task).double().mean().item()
            for task, name in enumerate(CLASSES)}


def test_shrinkage_routes_the_real_sequence(routing_features):
    shrunk = _accuracy(routing_features, "ledoit_wolf")
    ridge = _accuracy(routing_features, "ridge")
    print(f"\nrouting accuracy, Ledoit-Wolf: {shrunk}\nrouting accuracy, 1e-5 ridge: {ridge}")
    assert min(shrunk.values()) >= 0.95
    # cubes has 80 training images for 128 dimensions: the ridge inverse is dominated by its 1e-5 term
    assert shrunk["cubes"] > ridge["cubes"]
