"""The CNN neighbourhood aggregation of `FeatureExtractor` (constant convolutions, pooling before upsampling)
against the spec's LITERAL procedure (method.md §2.2): unfold every 3x3 neighbourhood (stride 1, zero
padding 1), upsample layer3's neighbourhood tensors bilinearly (align_corners=False) to layer2's grid,
flatten each position's C x 3 x 3 tensor in (channel, ky, kx) order, 1-D adaptive average pooling to D,
mean of the two layers; routing feature = global mean of the tokens. Nothing is downloaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from torch import nn

from moleflow.backbones import FeatureExtractor


def _neighbourhoods(fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C*9, H, W): every 3x3 neighbourhood (stride 1, zero padding 1) via unfold, resized to `size`
    bilinearly (align_corners=False) when the layer's grid differs."""
    b, c, h, w = fmap.shape
    nb = F.unfold(fmap, kernel_size=3, padding=1, stride=1).reshape(b, c * 9, h, w)
    if (h, w) != tuple(size):
        nb = F.interpolate(nb, size=size, mode="bilinear", align_corners=False)
    return nb


def literal_mean(maps: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Spec §2.2 steps 2-5 word for word: tokens (B, H, W, D)."""
    size = tuple(maps[0].shape[-2:])
    layers = []
    for fmap in maps:
        b, c = fmap.shape[:2]
        nb = _neighbourhoods(fmap, size)  # (B, C*9, H, W), channel index c*9 + ky*3 + kx
        vectors = nb.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)  # one C*9 vector per position
        pooled = F.adaptive_avg_pool1d(vectors, dim)  # (B*H*W, 1, D)
        layers.append(pooled.reshape(b, *size, dim))
    return torch.stack(layers).mean(0)


def literal_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore-style merge: each channel's 3x3 neighbourhood mean, layers side by side: (B, H, W, C2 + C3)."""
    size = tuple(maps[0].shape[-2:])
    layers = []
    for fmap in maps:
        b, c = fmap.shape[:2]
        nb = _neighbourhoods(fmap, size).reshape(b, c, 9, *size)
        layers.append(nb.mean(2).permute(0, 2, 3, 1))  # zero padding counts: border sums / 9
    return torch.cat(layers, -1)


class _FixedMaps(nn.Module):
    """Stands in for timm's feature model: returns given layer maps whatever the images."""

    def __init__(self, maps: list[torch.Tensor]) -> None:
        super().__init__()
        self.maps = maps
        self.feature_info = SimpleNamespace(channels=lambda: [m.shape[1] for m in maps])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert images.shape[0] == self.maps[0].shape[0]
        return list(self.maps)


def _extractor_on(maps: list[torch.Tensor], monkeypatch, **overrides) -> FeatureExtractor:
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: _FixedMaps(maps))
    cfg = tiny_config(**{"backbone.random_weights": True, **overrides}).backbone
    return FeatureExtractor(cfg)


def _random_maps(seed: int, b: int, c2: int, c3: int, grid2: tuple[int, int], grid3: tuple[int, int]):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c2, *grid2, generator=g), torch.randn(b, c3, *grid3, generator=g)]


def test_unfold_order_is_channel_ky_kx():
    """The literal reference itself: unfold's channel c*9 + ky*3 + kx is the zero-padded pixel (y+ky-1, x+kx-1)."""
    fmap = torch.randn(1, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    nb = _neighbourhoods(fmap, (4, 5))
    padded = F.pad(fmap, (1, 1, 1, 1))
    for c in range(2):
        for ky in range(3):
            for kx in range(3):
                assert torch.equal(nb[0, c * 9 + ky * 3 + kx], padded[0, c, ky:ky + 4, kx:kx + 5])


@pytest.mark.parametrize("grid2,grid3", [((8, 8), (4, 4)), ((7, 7), (4, 4)), ((6, 10), (3, 5))])
def test_mean_merge_equals_the_literal_procedure(monkeypatch, grid2, grid3):
    maps = _random_maps(1, 2, 8, 16, grid2, grid3)
    ext = _extractor_on(maps, monkeypatch, **{"backbone.embed_dim": 12})
    assert ext.embed_dim == 12 and ext.merge == "mean"
    tokens, routing = ext(torch.zeros(2, 3, 32, 32))
    expected = literal_mean(maps, 12)
    assert tokens.shape == (2, *grid2, 12)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(routing, expected.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    # not trivially equal: the layers and the pooling windows matter
    assert not torch.allclose(expected, literal_mean(maps[:1], 12), atol=1e-3)


def test_mean_merge_pooling_windows_overlap(monkeypatch):
    """C*9 not a multiple of D: adaptive pooling windows of unequal size that share entries (72 -> 20, 144 -> 20)."""
    maps = _random_maps(2, 1, 8, 16, (8, 8), (4, 4))
    ext = _extractor_on(maps, monkeypatch, **{"backbone.embed_dim": 20})
    tokens, routing = ext(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(tokens, literal_mean(maps, 20), atol=1e-5, rtol=0)
    torch.testing.assert_close(routing, tokens.mean(dim=(1, 2)))


def test_concat_merge_equals_its_literal_definition(monkeypatch):
    maps = _random_maps(3, 2, 8, 16, (8, 8), (4, 4))
    ext = _extractor_on(maps, monkeypatch, **{"backbone.feature_merge": "concat", "backbone.embed_dim": None})
    assert ext.embed_dim == 24
    tokens, routing = ext(torch.zeros(2, 3, 32, 32))
    expected = literal_concat(maps)
    assert tokens.shape == (2, 8, 8, 24)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(routing, expected.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    # channel 0 at an interior position is the plain 3x3 mean of layer2's channel 0
    torch.testing.assert_close(tokens[0, 3, 4, 0], maps[0][0, 0, 2:5, 3:6].mean(), atol=1e-6, rtol=0)


def test_whole_random_weight_extractor_matches_the_literal_procedure():
    """End to end on the real (random-weight) EfficientNet-Lite0 feature model of the tiny preset."""
    ext = FeatureExtractor(tiny_config(**{"backbone.random_weights": True, "backbone.embed_dim": 12}).backbone)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        maps = ext.model(images.contiguous(memory_format=torch.channels_last))
        tokens, routing = ext(images)
    maps = [m.contiguous() for m in maps]
    expected = literal_mean(maps, 12)
    scale = max(1.0, float(expected.abs().max()))
    assert tokens.shape == (2, 8, 8, 12)
    torch.testing.assert_close(tokens, expected, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(routing, expected.mean(dim=(1, 2)), atol=1e-5 * scale, rtol=1e-5)
