"""The one naming rule of task tensors (task_keys.py): every key of a real model has the owner and part it names."""

from __future__ import annotations

import pytest

from moleflow import task_keys
from moleflow.task_keys import calibration_part, expert_part, expert_part_owner, key_owner, key_part, scores_patches


@pytest.mark.parametrize("key, owner, part", [
    ("flow.flows.3.0.lora_A.weight", 3, "task3"),
    ("flow.adapters.12.scale", 12, "task12"),
    ("flow.blocks.0.lora_B.7", 7, "task7"),
    ("flow.task_bias.2", 2, "task2"),
    ("flow.dias.0.weight", 0, "task0"),
    ("router.mean_4", 4, "task4"),
    ("router.precision_4", 4, "task4"),
    ("memory.bank_5", 5, "task5"),
    ("memory.norm_5", 5, "task5"),
    ("router.unknown_4", 4, "task4-calibration"),
    ("threshold_4", 4, "task4-calibration"),
    ("flow.flows.shared.0.weight", None, "shared"),
    ("flow.blocks.0.perm", None, "shared"),
    ("router.mean", None, "shared"),
    ("flow.blocks.0.threshold_x", None, "shared"),
])
def test_owner_and_part_of_a_key(key, owner, part):
    assert key_owner(key) == owner
    assert key_part(key) == part


def test_parts_name_their_task():
    assert expert_part(3) == "task3" and calibration_part(3) == "task3-calibration"
    assert expert_part_owner("task3") == 3
    assert expert_part_owner("task3-calibration") is None and expert_part_owner("shared") is None


def test_expert_graphs_depend_on_flow_and_memory_only():
    assert scores_patches("flow.flows.3.0.lora_A.weight") and scores_patches("memory.bank_3")
    assert scores_patches("memory.norm_3") and scores_patches("flow.blocks.0.perm")
    assert not any(scores_patches(k) for k in ("router.mean_3", "router.precision_3", "router.unknown_3",
                                                "threshold_3"))


def test_every_key_of_a_model_is_owned_as_the_inspector_says():
    """The keys of a model of two tasks: each task's tensors are owned by it, the rest is shared."""
    from moleflow import MoleFlow

    from helpers import random_images, tiny_config

    model = MoleFlow(tiny_config(**{"score.source": "flow+memory"}))
    model.fit_step({"a": random_images(0, 12), "b": random_images(1, 12, shift=1.0)})
    state = model.inspector.model_state()
    tasks = set(model.inspector.task_ids)
    owners = {key_owner(k) for k in state}
    assert owners == tasks | {None}
    for t in tasks:
        assert f"threshold_{t}" in state and key_part(f"threshold_{t}") == calibration_part(t)
    assert all(not k.startswith(task_keys.BACKBONE_PREFIX) for k in state)


def test_only_this_module_names_task_tensors():
    """No other module of the library decides ownership with its own pattern."""
    import pathlib

    import moleflow

    root = pathlib.Path(moleflow.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "task_keys.py":
            continue
        text = path.read_text()
        assert "lora_A|lora_B" not in text and "(?:threshold|unknown" not in text, path
        assert 'r"task(\\d+)"' not in text, path
