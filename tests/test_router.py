"""Prototype router: separable tasks, fewer images than dimensions, unknown products, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moleflow.config import RouterConfig
from moleflow.router import PrototypeRouter, estimate_precision


def _cluster(seed: int, n: int, dim: int, centre: float, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return centre + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["mahalanobis", "euclidean"])
@pytest.mark.parametrize("covariance", ["ledoit_wolf", "oas", "ridge"])
def test_routes_separable_tasks(metric, covariance):
    router = PrototypeRouter(RouterConfig(metric=metric, covariance=covariance))
    centres = [-4.0, 0.0, 4.0]
    for task, c in enumerate(centres):
        router.add_task(task, _cluster(task, 100, 8, c))
    test = torch.cat([_cluster(10 + t, 30, 8, c) for t, c in enumerate(centres)])
    ids, dist, known = router.route(test)
    assert ids.tolist() == [0] * 30 + [1] * 30 + [2] * 30
    assert dist.shape == (90,) and known.all()


def _low_rank_task(seed: int, n: int, dim: int, rank: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that vary in a task-specific `rank`-dim subspace plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0]
    def draw(m: int) -> torch.Tensor:
        return offset + torch.randn(m, rank, generator=g, dtype=torch.float64) @ basis.T * 3 \
            + 0.3 * torch.randn(m, dim, generator=g, dtype=torch.float64)
    return draw(n), draw(200)


def test_fewer_images_than_dimensions():
    """40 training images in 128 dimensions: the shrunk covariance is well conditioned and routes held-out
    images correctly (the real-data comparison with the reference's ridge is in test_real_data.py)."""
    dim = 128
    g = torch.Generator().manual_seed(0)
    offsets = [torch.randn(dim, generator=g, dtype=torch.float64) * 0.35 for _ in range(3)]
    tasks = [_low_rank_task(s, 40, dim, 10, o) for s, o in enumerate(offsets)]
    accuracy = {}
    for method in ("ledoit_wolf", "ridge"):
        router = PrototypeRouter(RouterConfig(covariance=method))
        for t, (train, _) in enumerate(tasks):
            router.add_task(t, train)
        test = torch.cat([held for _, held in tasks])
        truth = torch.arange(3).repeat_interleave(200)
        accuracy[method] = (router.route(test)[0] == truth).double().mean().item()
    assert accuracy["ledoit_wolf"] >= 0.97
    shrunk = estimate_precision(tasks[0][0].numpy(), "ledoit_wolf", 0.0)
    ridge = estimate_precision(tasks[0][0].numpy(), "ridge", 1e-5)
    assert np.linalg.cond(shrunk) < 1e3 < np.linalg.cond(ridge)


def test_precision_is_the_inverse_of_the_estimate():
    x = np.random.default_rng(0).normal(size=(20, 30))
    p = estimate_precision(x, "ridge", 1e-5)
    cov = np.cov(x, rowvar=False) + 1e-5 * np.eye(30)
    np.testing.assert_allclose(p @ cov, np.eye(30), atol=1e-5)


def test_unknown_products_are_flagged():
    router = PrototypeRouter(RouterConfig(unknown_quantile=0.99, unknown_margin=1.5))
    router.add_task(0, _cluster(0, 200, 6, 0.0))
    router.add_task(1, _cluster(2, 200, 6, 5.0))
    _, _, known = router.route(_cluster(4, 50, 6, 0.0))
    assert known.float().mean() >= 0.95
    _, _, known_far = router.route(_cluster(5, 50, 6, 40.0))
    assert not known_far.any()


def test_out_of_sample_distances_exceed_in_sample_ones():
    """With N close to D, in-sample Mahalanobis distances are optimistic; cross-fitted ones are not."""
    router = PrototypeRouter(RouterConfig())
    x = _cluster(0, 40, 30, 0.0)
    router.add_task(0, x)
    in_sample = router.distances(x)[:, 0]
    held_out = router.out_of_sample_distances(x)
    fresh = router.distances(_cluster(1, 200, 30, 0.0))[:, 0]
    assert held_out.median() > in_sample.median()
    assert abs(held_out.median() - fresh.median()) < abs(in_sample.median() - fresh.median())


def test_state_is_buffers_and_round_trips():
    router = PrototypeRouter(RouterConfig())
    router.add_task(3, _cluster(0, 30, 4, 1.0))
    assert set(router.state_dict()) == {"mean_3", "precision_3", "unknown_3"}
    state = router.state_dict()
    clone = PrototypeRouter(RouterConfig())
    clone.set_prototype(3, state["mean_3"], state["precision_3"], float(state["unknown_3"]))
    x = _cluster(2, 5, 4, 1.0)
    assert torch.equal(router.distances(x), clone.distances(x))
    assert clone.task_ids == [3]


def test_one_distance_formula():
    """The router's distance is sqrt((x - mean)^T P (x - mean)) with the stored precision."""
    router = PrototypeRouter(RouterConfig())
    router.add_task(0, _cluster(0, 30, 4, 0.0))
    x = _cluster(1, 5, 4, 0.5)
    mean, precision = router.prototype(0)
    diff = x.double() - mean
    expected = torch.einsum("nd,de,ne->n", diff, precision, diff).sqrt()
    torch.testing.assert_close(router.distances(x)[:, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["pooled", "mahalanobis"])
def test_kept_held_out_normals_route_out_of_sample_among_every_product(metric):
    """`holdout_choices` routes a product's kept held-out normals with its prototype built without them and every
    other product's as it is (pooled: the mean of the covariances with the product's own swapped in, as
    `pool_precisions` would compute it afresh); tiles of one image are averaged."""
    from moleflow.router import mahalanobis, pool_precisions

    router = PrototypeRouter(RouterConfig(metric=metric))
    data = {t: _cluster(t, 40, 6, c, spread=1.0 + t) for t, c in enumerate([-1.0, 0.0, 1.0])}
    for t, x in data.items():
        router.add_task(t, x[:30])
        without = router.prototype(t)
        without = (without[0].clone(), without[1].clone())
        router.remove_task(t)
        router.add_task(t, x)  # the prototype of all its images, as learning builds it
        router.set_holdout(t, x[30:].float(), torch.arange(10) // 2, *without)  # 5 images of 2 tiles each
    router.remove_task(1)  # a product without kept normals is routed to, never routed from
    router.add_task(1, data[1])
    tasks = [0, 1, 2]
    choices = router.holdout_choices(tasks)
    assert set(choices) == {0, 2}
    for t, (index, margin) in choices.items():
        means = [router.holdout(t)[2] if u == t else router.prototype(u)[0] for u in tasks]
        precisions = [router.holdout(t)[3] if u == t else router.prototype(u)[1] for u in tasks]
        if metric == "pooled":
            precisions = [pool_precisions(precisions)] * 3
        x = router.holdout(t)[0].double()
        d = torch.stack([mahalanobis(x, m, p) for m, p in zip(means, precisions)], 1)
        d = d.view(5, 2, 3).mean(1).log()
        top = d.topk(2, dim=1, largest=False)
        assert torch.equal(index, top.indices[:, 0])
        assert torch.allclose(margin, top.values[:, 1] - top.values[:, 0], atol=1e-8)
