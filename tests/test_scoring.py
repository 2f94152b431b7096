"""Image-score aggregations against hand-computed values, and the pixel maps against SciPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from moleflow import Config, MoleflowError
from moleflow.config import ScoreConfig
from moleflow.losses import logdet_regularisation, tail_aware_loss
from moleflow.scoring import MapMaker, anomaly_maps, blur_matrix, image_scores

# One 2 x 5 map with values 1..10 (row-major), and one constant map.
MAP = torch.tensor([[[1.0, 2, 3, 4, 5], [6, 7, 8, 9, 10]], [[2.0] * 5] * 2])


@pytest.mark.parametrize("mode, kwargs, expected", [
    ("top_k", {"top_k": 3}, [(10 + 9 + 8) / 3, 2.0]),
    ("top_k_percent", {"top_k_percent": 0.2}, [(10 + 9) / 2, 2.0]),  # floor(10 * 0.2) = 2 patches
    ("top_k_percent", {"top_k_percent": 0.01}, [10.0, 2.0]),  # at least one patch
    ("percentile", {"percentile": 0.5}, [5.5, 2.0]),  # linear interpolation between 5 and 6
    ("percentile", {"percentile": 0.99}, [9.91, 2.0]),  # 9 + 0.91 * (10 - 9)
    ("max", {}, [10.0, 2.0]),
    ("mean", {}, [5.5, 2.0]),
])
def test_score_modes(mode, kwargs, expected):
    scores = image_scores(MAP, ScoreConfig(mode=mode, **kwargs))
    torch.testing.assert_close(scores, torch.tensor(expected))


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_percentile_equals_torch_quantile(q):
    nll = torch.randn(4, 14, 14, generator=torch.Generator().manual_seed(3)) * 10
    expected = torch.quantile(nll.flatten(1), q, dim=1, interpolation="linear")
    torch.testing.assert_close(image_scores(nll, ScoreConfig(mode="percentile", percentile=q)), expected)


def test_spatial_cluster_by_hand():
    """3x3 map, one high cluster of two adjacent patches (9, 8) and an isolated 7 at a corner."""
    nll = torch.tensor([[[9.0, 8, 0], [0, 0, 0], [0, 0, 7]]])
    cfg = ScoreConfig(mode="spatial_cluster", cluster_weight=0.5, cluster_percentile=0.7, cluster_top_k_ratio=0.25)
    # quantile 0.7 of sorted [0,0,0,0,0,0,7,8,9] at position 5.6 -> 0 + 0.6 * 7 = 4.2: high = {9, 8, 7}
    # neighbours among high: 9 has 1 (the 8), 8 has 1 (the 9), 7 has 0
    # weighted: 9 * 1.125 = 10.125, 8 * 1.125 = 9, 7 * 1 = 7; k = floor(9 * 0.25) = 2
    # A = (10.125 + 9) / 2 = 9.5625, B = (9 + 8) / 2 = 8.5, score = 0.5 * A + 0.5 * B = 9.03125
    torch.testing.assert_close(image_scores(nll, cfg), torch.tensor([9.03125]))


def test_gaussian_blur_matches_scipy():
    x = torch.rand(3, 56, 56, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in x.numpy()])
    k = blur_matrix(56, 4.0)
    np.testing.assert_allclose((k @ x @ k.T).numpy(), expected, atol=1e-12)


def test_anomaly_map_shape_and_peak():
    nll = torch.zeros(2, 7, 7)
    nll[0, 3, 3] = 10.0
    maps = anomaly_maps(nll, size=56, sigma=4.0)
    assert maps.shape == (2, 56, 56)
    peak = np.unravel_index(maps[0].argmax().item(), (56, 56))
    assert abs(peak[0] - 27.5) <= 1 and abs(peak[1] - 27.5) <= 1
    assert torch.all(maps[1] == 0)
    bad = torch.full((1, 7, 7), float("nan"))
    assert torch.isfinite(anomaly_maps(bad, 14, 1.0)).all()


def test_centred_maps_are_the_maps_less_their_median_patch_score():
    nll = torch.randn(3, 7, 9, generator=torch.Generator().manual_seed(5)) * 3
    plain = MapMaker((7, 9), 56, 4.0)(nll)
    centred = MapMaker((7, 9), 56, 4.0, centre=True)(nll)
    median = nll.flatten(1).median(1).values  # the lower median of 63 values: the 32nd
    torch.testing.assert_close(centred, plain - median.view(-1, 1, 1), atol=1e-5, rtol=0)
    # an offset shared by the whole part (its lighting) is not a place: the centred map does not show it
    torch.testing.assert_close(MapMaker((7, 9), 56, 4.0, centre=True)(nll + 5.0), centred, atol=1e-5, rtol=0)
    assert not torch.allclose(MapMaker((7, 9), 56, 4.0)(nll + 5.0), plain)
    made = MapMaker.of((7, 9), Config.from_preset("tiny").with_overrides({"score.map_centre": "median",
                                                                           "data.image_size": 56}))
    torch.testing.assert_close(made(nll), centred)
    with pytest.raises(MoleflowError, match="map_centre"):
        Config.from_preset("tiny").with_overrides({"score.map_centre": "mean"})


def test_tail_aware_loss_by_hand():
    nll = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    # k = max(1, floor(4 * 0.5)) = 2: tails (4 + 3) and (8 + 7) -> 22 / 4 = 5.5; mean 4.5
    loss = tail_aware_loss(nll, tail_weight=0.7, tail_ratio=0.5)
    assert loss.item() == pytest.approx(0.3 * 4.5 + 0.7 * 5.5)
    assert tail_aware_loss(nll, 0.0, 0.5).item() == pytest.approx(4.5)
    assert logdet_regularisation(torch.tensor([[1.0, -2.0]]), 0.1).item() == pytest.approx(0.1 * 2.5)
