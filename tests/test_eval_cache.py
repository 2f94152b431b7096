"""The evaluation cache (`moleflow.eval_cache`): a continual run computes each test image's backbone features
once and scores each (tile, expert) pair once, and its results are those of a run that keeps nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moleflow import Config
from moleflow.continual import ContinualRequest, DataSource, parse_scenario, run_continual
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.eval_cache import CachedBackend, CachedBatch, EvaluationCache
from moleflow.evaluation import evaluation_cache

CLASSES = ["brick", "grass", "hubble"]


def run(root: Path, data: Path, name: str, **overrides) -> dict:
    cfg = Config.from_preset("tiny").with_overrides({"train.epochs": 1, "train.min_steps": 0, "data.image_size": 64,
                                                     **overrides})
    request = ContinualRequest(cfg, DataSource(data), parse_scenario("1-1", CLASSES), root / name, scenario="1-1",
                               report=False, progress=False)
    return run_continual(request)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("evalcache")
    data = write_mvtec_layout(root / "data", CLASSES, n_train=12, n_test_good=3, n_test_defect=3, size=96, seed=0)
    return run(root, data, "kept"), run(root, data, "nothing", **{"train.cache_memory_gb": 0.0})


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "train_seconds"}
    return [without_times(v) for v in value] if isinstance(value, list) else value


def test_a_run_that_keeps_features_gives_the_results_of_one_that_keeps_nothing(runs):
    kept, nothing = runs
    for key in ("steps", "final", "oracle", "continual", "routing_confusion"):
        assert json.dumps(without_times(kept[key]), sort_keys=True) == json.dumps(without_times(nothing[key]),
                                                                                   sort_keys=True), key


def test_each_test_tile_is_scored_once_per_expert(runs):
    kept, nothing = runs
    stats, none = kept["timing"]["evaluation_cache"], nothing["timing"]["evaluation_cache"]
    # 6 test images per class; the steps see 1, 2, 3 classes, then the oracle pass sees all 3: 9 class passes
    assert none == {"tiles_scored": 0, "tiles_reused": 0, "kept_bytes": 0}  # nothing kept: all passed on
    assert stats["kept_bytes"] > 0
    assert stats["tiles_scored"] + stats["tiles_reused"] == 9 * 6
    assert stats["tiles_scored"] <= 3 * 6 + 6  # each image under its own expert once (+ any image routed astray)


def test_nothing_is_kept_while_the_shared_flow_keeps_learning():
    cfg = Config.from_preset("tiny").with_overrides({"model.freeze_base": False})

    class Model:
        config = cfg
    assert evaluation_cache(Model()) is None


class CountingBackend:
    """A backend that scores a tile as its task id plus the tile's first token value, and counts its calls."""

    def __init__(self) -> None:
        self.feature_calls, self.scored_rows = 0, 0

    def features(self, pixels):
        self.feature_calls += 1
        return pixels.permute(0, 2, 3, 1).contiguous(), pixels.mean((2, 3))

    def expert_scores(self, tokens, index, tasks):
        self.scored_rows += len(tokens)
        task = torch.as_tensor(tasks, dtype=torch.float32)[index]
        return tokens[..., 0] + task.view(-1, 1, 1)


def test_the_backend_scores_each_row_and_task_once_and_passes_subsets_on():
    from moleflow.data.batch import Prepared

    inner, cache = CountingBackend(), EvaluationCache(budget_bytes=10**6)
    batch = CachedBatch(Prepared.square(torch.rand(4, 3, 2, 2)), masks=None)
    backend = CachedBackend(inner, batch, cache)
    tokens, _ = backend.features(batch.prep.pixels)
    assert backend.features(torch.empty(0))[0] is tokens and inner.feature_calls == 1
    first = backend.expert_scores(tokens, torch.tensor([0, 0, 1, 1]), [5, 7])
    again = backend.expert_scores(tokens, torch.tensor([0, 0, 0, 0]), [7])  # rows 2, 3 under 7 are kept
    assert inner.scored_rows == 4 + 2
    assert torch.equal(first[2:], again[2:]) and torch.equal(again, tokens[..., 0] + 7)
    backend.expert_scores(tokens[1:2], torch.tensor([0]), [5])  # a subset of rows: passed on, not kept
    assert inner.scored_rows == 7 and (cache.misses, cache.hits) == (6, 2)


def test_a_batch_over_the_budget_keeps_nothing():
    from moleflow.data.batch import Prepared

    inner, cache = CountingBackend(), EvaluationCache(budget_bytes=8)
    batch = CachedBatch(Prepared.square(torch.rand(4, 3, 2, 2)), masks=None)
    backend = CachedBackend(inner, batch, cache)
    backend.features(batch.prep.pixels)
    assert batch.tokens is None and cache.used_bytes == 0 and batch.prep.pixels.numel() == 48


def test_a_class_not_kept_whole_gives_its_bytes_back():
    from moleflow.data.batch import Prepared

    inner = CountingBackend()
    cache = EvaluationCache(budget_bytes=4 * 3 * 2 * 2 * 4 + 4 * 3 * 4)  # one batch of 4 images, not two
    batches = [CachedBatch(Prepared.square(torch.rand(4, 3, 2, 2)), masks=None) for _ in range(2)]
    for batch in batches:
        CachedBackend(inner, batch, cache).features(batch.prep.pixels)
    assert batches[0].tokens is not None and batches[1].tokens is None and cache.used_bytes == cache.budget_bytes
    cache.keep("brick", [batches[0]], whole=False)
    assert cache.batches("brick") is None and cache.used_bytes == 0  # the budget serves the next class
    CachedBackend(inner, batches[1], cache).features(batches[1].prep.pixels)
    cache.keep("grass", [batches[1]], whole=True)
    assert cache.batches("grass") == [batches[1]] and cache.used_bytes == batches[1].feature_bytes > 0

