"""What the model knows about each learned task besides its tensors: name, classes, calibration, provenance.

Kept in the model folder's manifest (store/checkpoint.py) for people and tools; the tensors are the truth
(a task's threshold is its `threshold_<t>` buffer, copied here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskInfo:
    """One learned task (product, or several classes in a multi-class scenario)."""

    task_id: int
    name: str
    classes: list[str]
    n_train: int
    n_calibration: int
    threshold: float  # image score above which an image of this task is anomalous (= the inspector's buffer)
    n_tiles: int = 0  # preprocessed tiles of all its images (= images without tiling)
    calibration: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # where its images came from (root, dataset), if known
    step: int = -1  # the learning step that learned it (several products may share one); -1: not known yet
    # its held-out normals routed among the products learned so far, as they are and with a pasted defect:
    # {"n": images, "good": {product: share}, "defect": {...}, "ambiguous": {...}} (`learning.confusability`)
    confusability: dict[str, Any] = field(default_factory=dict)


def task_infos(records: list[dict[str, Any]], thresholds: dict[int, float]) -> list[TaskInfo]:
    """The TaskInfo of each manifest record (fields this version does not know are dropped), its threshold
    taken from `thresholds` (task id -> the tensor's value); a record saved before steps were recorded is its
    own step."""
    known = set(TaskInfo.__dataclass_fields__)
    infos = [TaskInfo(**{k: v for k, v in record.items() if k in known}) for record in records]
    for i, info in enumerate(infos):
        info.threshold = thresholds[info.task_id]
        if info.step < 0:
            info.step = i
    return infos
