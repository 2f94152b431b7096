"""Zero forgetting: learning a new task leaves every earlier parameter and score bit-identical."""

from __future__ import annotations

import re

import pytest
import torch

from moleflow.inspector import key_owner
from moleflow import MoleFlow
from moleflow.trainer import learning_rate

from helpers import random_images as _images
from helpers import tiny_config


@pytest.mark.parametrize("adapter", ["whitening", "soft_ln"])
def test_second_task_changes_nothing_learned_before(adapter):
    model = MoleFlow(tiny_config(**{"model.task_adapter": adapter}))
    model.fit_task(_images(0, 24), name="a")
    before = {k: v.clone() for k, v in model.inspector.model_state().items()}  # flow, router, thresholds
    shared_ids = {id(p) for p in model.flow.shared_parameters()}
    assert shared_ids, "the model has shared parameters"
    probe = _images(5, 6)
    oracle_before = model.predict(probe, task_ids=[0] * 6)

    model.fit_task(_images(1, 24, shift=1.0), name="b")

    after = model.inspector.model_state()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed while learning task 1"
    new_keys = set(after) - set(before)
    assert new_keys and all(key_owner(k) == 1 for k in new_keys), new_keys
    assert any(k.startswith("router.") for k in new_keys) and "threshold_1" in new_keys
    oracle_after = model.predict(probe, task_ids=[0] * 6)
    assert torch.equal(oracle_after.scores, oracle_before.scores)
    assert torch.equal(oracle_after.maps, oracle_before.maps)


def test_first_task_trains_shared_later_tasks_do_not():
    model = MoleFlow(tiny_config())
    model.flow.add_task()
    model.flow.add_task()
    shared = {id(p) for p in model.flow.shared_parameters()}
    first = {id(p) for p in model.flow.set_trainable(0)}
    assert shared <= first
    second = {id(p) for p in model.flow.set_trainable(1)}
    assert not (second & shared)
    assert second == {id(p) for p in model.flow.task_parameters(1)}
    assert all(not p.requires_grad for p in model.flow.task_parameters(0))


def test_sequential_mode_trains_shared_weights_at_every_task():
    model = MoleFlow(tiny_config(**{"model.freeze_base": False}))
    model.flow.add_task()
    model.flow.add_task()
    shared = {id(p) for p in model.flow.shared_parameters()}
    assert shared <= {id(p) for p in model.flow.set_trainable(1)}


def test_task_separated_gives_each_task_its_own_flow():
    model = MoleFlow(tiny_config(**{"model.task_separated": True}))
    model.flow.add_task()
    model.flow.add_task()
    assert "1" in model.flow.flows
    own = {id(p) for p in model.flow.set_trainable(1)}
    assert {id(p) for p in model.flow.flows["1"].parameters()} <= own
    assert not ({id(p) for p in model.flow.flows["shared"].parameters()} & own)


def test_removing_a_task_leaves_the_others_identical():
    model = MoleFlow(tiny_config())
    model.fit_task(_images(0, 20), name="a")
    model.fit_task(_images(1, 20, shift=1.0), name="b")
    model.fit_task(_images(2, 20, shift=-1.0), name="c")
    probe = _images(9, 4)
    before = model.predict(probe, task_ids=[2] * 4)
    model.remove_task("b")
    assert [t.name for t in model.tasks] == ["a", "c"]
    assert model.flow.task_ids == [0, 2]
    after = model.predict(probe, task_ids=[2] * 4)
    assert torch.equal(before.scores, after.scores)
    assert set(model.predict(probe).task_ids.tolist()) <= {0, 2}


def test_learning_rate_schedule():
    cfg = tiny_config(**{"train.epochs": 10, "train.lr": 1.0, "train.min_lr_ratio": 0.01}).train
    assert learning_rate(0, True, cfg) == pytest.approx(1.0)
    assert learning_rate(5, True, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert learning_rate(0, False, cfg) == pytest.approx(0.5)  # warm-up lr/2, then lr
    assert learning_rate(1, False, cfg) == pytest.approx(1.0)
    assert learning_rate(2, False, cfg) == pytest.approx(1.0)  # cosine restarts after the warm-up
    assert learning_rate(7, False, cfg) == pytest.approx(learning_rate(5, True, cfg))


def test_non_finite_batches_are_skipped_and_counted():
    from moleflow.model import ExpertFlow
    from moleflow.trainer import fit_task

    cfg = tiny_config(**{"train.epochs": 1, "train.batch_size": 4})
    flow = ExpertFlow(cfg.model, dim=32)
    flow.add_task()
    tokens = torch.randn(8, 4, 4, 32)
    tokens[0] = float("nan")  # poisons the batch that contains image 0
    report = fit_task(flow, 0, 8, lambda idx: tokens[idx], cfg.train)
    assert report.skipped_batches == 1
    assert report.steps == 1
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_training_is_deterministic():
    a = MoleFlow(tiny_config())
    b = MoleFlow(tiny_config())
    x = _images(0, 16)
    a.fit_task(x, name="a")
    b.fit_task(x, name="a")
    for (ka, va), (kb, vb) in zip(a.flow.state_dict().items(), b.flow.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
