"""Which task owns a tensor: the one naming rule of the model's state_dict keys and checkpoint parts.

    key_owner("flow.flows.3.lora_A.0.weight") == 3     key_owner("router.mean_3") == 3
    key_owner("flow.flows.shared.0.weight") is None    (shared: trained by the first step, then frozen)
    key_part("threshold_3") == "task3-calibration"     key_part("memory.bank_3") == "task3"

A tensor belongs to task t when it is an entry `t` of a per-task container (adapters, DIA blocks, flows, LoRA
factors, task biases) or a per-task buffer `<name>_<t>` (router prototype and unknown-product limit, patch
memory and its norm, decision threshold). The inspector, the model folder (store/checkpoint.py) and the onnx
engine's graph cache all ask this module.
"""

from __future__ import annotations

import re

# per-task buffers, by what they are for
# the router's prototype and how painted defects moved its feature (`defect_moves`): loaded with the model (routing
# needs every one)
ROUTING_BUFFERS = ("mean", "precision", "defectmove")
# the held-out normals' routing features, each row's image, and the prototype without them
# (`PrototypeRouter.set_holdout`): how the product routes among every product learned since; never trained on
HOLDOUT_BUFFERS = ("holdout", "holdoutimage", "holdoutmean", "holdoutprecision")
CALIBRATION_BUFFERS = ("threshold", "unknown")  # decision threshold, unknown-product limit: `moleflow calibrate`
MEMORY_BUFFERS = ("bank", "norm")  # the patch memory and its standardisation
TASK_BUFFERS = ROUTING_BUFFERS + HOLDOUT_BUFFERS + CALIBRATION_BUFFERS + MEMORY_BUFFERS

_TASK_BUFFER = re.compile(rf"({'|'.join(TASK_BUFFERS)})_(\d+)")
_BUFFER_KEY = re.compile(rf"(?:^|\.){_TASK_BUFFER.pattern}$")
_CONTAINER_KEY = re.compile(r"(?:^|\.)(?:adapters|dias|flows|lora_A|lora_B|task_bias)\.(\d+)(?:\.|$)")
_EXPERT_PART = re.compile(r"task(\d+)")

SHARED_PART = "shared"
BACKBONE_PREFIX = "extractor."  # the frozen backbone: identified by its weights' hash, never saved
ROUTING_PREFIX = "router."  # an expert file's tensors loaded with the model


def is_task_buffer(name: str) -> bool:
    """`name` (the last part of a key) is a per-task buffer `<name>_<t>`."""
    return _TASK_BUFFER.fullmatch(name) is not None


def key_owner(key: str) -> int | None:
    """The task that owns state_dict key `key`, or None for shared tensors."""
    match = _CONTAINER_KEY.search(key)
    if match is not None:
        return int(match.group(1))
    match = _BUFFER_KEY.search(key)
    return None if match is None else int(match.group(2))


def _buffer_kind(key: str) -> str | None:
    match = _BUFFER_KEY.search(key)
    return None if match is None else match.group(1)


def expert_part(task: int) -> str:
    """The checkpoint part of task `task`'s expert: flow parts, prototype, patch memory."""
    return f"task{task}"


def calibration_part(task: int) -> str:
    """The checkpoint part of task `task`'s calibration: decision threshold and unknown-product limit."""
    return f"task{task}-calibration"


def expert_part_owner(part: str) -> int | None:
    """The task whose expert part `part` is, or None (the shared part, a calibration part)."""
    match = _EXPERT_PART.fullmatch(part)
    return None if match is None else int(match.group(1))


def key_part(key: str) -> str:
    """The checkpoint part a state_dict key is stored in: "shared", "task<t>" (the expert: flow parts,
    prototype, memory) or "task<t>-calibration" (decision threshold and unknown-product limit, the only
    tensors `moleflow calibrate` changes)."""
    owner = key_owner(key)
    if owner is None:
        return SHARED_PART
    return calibration_part(owner) if _buffer_kind(key) in CALIBRATION_BUFFERS else expert_part(owner)


def scores_patches(key: str) -> bool:
    """The tensor enters a task's patch scores (shared flow, the expert's flow parts, its patch memory), so
    an expert graph depends on it; prototypes, limits and thresholds do not."""
    return _buffer_kind(key) not in ROUTING_BUFFERS + HOLDOUT_BUFFERS + CALIBRATION_BUFFERS
