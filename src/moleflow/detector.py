"""The public model object: learn products one after another, then score any image without its task id.

    model = MoleFlow(Config.from_preset("cpu"))
    model.fit_task(train_images_of_product_a, name="a")
    model.fit_task(train_images_of_product_b, name="b")
    pred = model.predict(test_images)      # pred.scores (N,), pred.maps (N,S,S), pred.task_ids (N,)
    model.save("run/model"); model = MoleFlow.load("run/model")

Images are file paths, PIL images, uint8/uint16 arrays or an already normalised float tensor (N,3,S,S).
`MoleFlow` is a facade: its `inspector` (inspector.py) holds every tensor and routes, scores and decides
through the one inspection pipeline (pipeline.py) that evaluation, export and serving also use; learning a step
is learning.py's, reading features from images features.py's, the model folder store/checkpoint.py's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import Config
from .data.batch import Images, Prepared
from .data.groups import image_groups
from .data.transforms import ImageTransform
from .errors import MoleflowError
from .features import FeatureSource
from .inspector import Inspection, Inspector
from .learning import Learner, calibration_holdout, learn_expert_remotely, next_step
from .parallel import Parallel
from .pipeline import NeuralBackend, TorchBackend, check_request, concat_inspections, inspect
from .router import holdout_routing
from .store.checkpoint import read_model, read_model_lazily, write_model
from .task_info import TaskInfo, task_infos

__all__ = ["MoleFlow", "Prediction", "TaskInfo", "concat_inspections", "learn_expert_remotely", "resolve_device"]

Prediction = Inspection  # what `MoleFlow.predict` returns


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoleflowError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


class MoleFlow:
    """Continual anomaly detector: frozen backbone, MoLE flow with per-task experts, prototype router."""

    def __init__(self, config: Config, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        self.config = config
        self.device = resolve_device(device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise MoleflowError(f"precision {precision!r}: use fp32, bf16 or fp16")
        if precision == "fp16" and self.device.type != "cuda":
            raise MoleflowError("fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
        self.precision = precision  # inference only; training always runs in fp32
        self.inspector = Inspector(config, self.device)
        self.features = FeatureSource.of(self.inspector)
        self.transform: ImageTransform = self.features.transform  # images -> normalised tiles
        self.tasks: list[TaskInfo] = []

    # the inspector's parts, for training and introspection
    @property
    def extractor(self):
        return self.inspector.extractor

    @property
    def flow(self):
        return self.inspector.flow

    @property
    def router(self):
        return self.inspector.router

    @property
    def memory(self):
        # raw access to every task's memory bank: a lazily loaded model reads its pending experts first (the
        # training paths use `inspector.memory` for the new task only, so learning reads no other expert)
        self.inspector.ensure_experts(self.inspector.pending_tasks)
        return self.inspector.memory

    @property
    def grid(self) -> tuple[int, int]:
        return self.inspector.grid

    # ------------------------------------------------------------------------------ inputs (features.py)
    @property
    def loader_workers(self) -> int:
        """Image-loading worker processes while learning (torch DataLoader); 0: in this one."""
        return self.features.loader_workers

    @loader_workers.setter
    def loader_workers(self, workers: int) -> None:
        self.features.loader_workers = workers

    def prepare(self, images: Images) -> Prepared:
        """Preprocess images (cut into tiles when `data.tiling` says so) into normalised tiles (M, 3, S, S)."""
        return self.features.prepare(images)

    def to_tensor(self, images: Images) -> torch.Tensor:
        """Preprocessed tiles (M, 3, S, S) of the images (one per image without tiling)."""
        return self.prepare(images).pixels

    def extract(self, images: Images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens (N, H, W, D) and routing features (N, D), on the CPU."""
        return self.features.extract(images, batch_size)

    def image_features(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """Routing features (N, D) float64 per image (the mean over its tiles): what product discovery clusters."""
        return self.features.image_features(images, batch_size)

    def stream_features(self, images: Images, batch_size: int = 32, keep_tokens: bool = True
                        ) -> tuple[torch.Tensor | np.ndarray | None, torch.Tensor, Prepared]:
        """Tokens (M, H, W, D), routing features (M, D) and owners and layouts of the tiles of `images`, streamed
        (`FeatureSource.stream`)."""
        return self.features.stream(images, batch_size, keep_tokens)

    # ------------------------------------------------------------------------------ learning (learning.py)
    @property
    def next_step(self) -> int:
        """The number of the next learning step (0 for a new model)."""
        return next_step(self.tasks)

    def fit_task(self, images: Images, name: str | None = None, classes: Sequence[str] | None = None,
                 progress: bool = False, source: dict[str, Any] | None = None,
                 false_alarm_rate: float | None = None) -> TaskInfo:
        """Learn a new task (one expert) from its normal training images; earlier tasks are not touched.

        Some images are held out (seeded) to calibrate the decision threshold for `false_alarm_rate` (default
        `score.false_alarm_rate`): enough to guarantee it, within `score.calibration_fraction` ..
        `score.calibration_keep_train` images for training (calibration.py); the rest trains the expert. The router
        prototype uses all the images. Several classes given here share the one expert and prototype (the
        spec's multi-class task); `fit_step` gives each product its own.
        """
        name = name or f"task{len(self.tasks)}"
        return self.fit_step({name: images}, {name: list(classes or [name])}, progress, source, false_alarm_rate)[0]

    def fit_step(self, products: dict[str, Images], classes: dict[str, list[str]] | None = None,
                 progress: bool = False, source: dict[str, Any] | None = None,
                 false_alarm_rate: float | None = None, rates: dict[str, float] | None = None,
                 parallel: Parallel | None = None) -> list[TaskInfo]:
        """Learn one step of the sequence: the products `products` (name -> normal training images), one expert
        (adapter, LoRA, task bias, DIA), prototype and threshold each. In the first step of a model they train
        the shared flow together, side by side (`trainer.fit_experts`, `train.first_step`), before it is frozen; later
        steps train each expert alone, exactly as if learned one per step (on Ray with `parallel`). With
        `model.experts="task"` (the spec's behaviour, `repo` preset) the step's products are pooled into one expert.

        `classes` gives a product's class names (default its name); `false_alarm_rate` the rate of every product
        (default `score.false_alarm_rate`) and `rates` some products' own. Returns the new tasks, in order; on
        any error the model is left as it was.
        """
        return self.fit_steps([products], classes, progress, source, false_alarm_rate, rates, parallel)[0]

    def fit_steps(self, steps: list[dict[str, Images]], classes: dict[str, list[str]] | None = None,
                  progress: bool = False, source: dict[str, Any] | None = None,
                  false_alarm_rate: float | None = None, rates: dict[str, float] | None = None,
                  parallel: Parallel | None = None) -> list[list[TaskInfo]]:
        """Learn several steps one after another (each as `fit_step`); returns the new tasks of each step.

        Once the shared flow is frozen every later expert is independent of the others, so with `parallel`
        (parallel.Parallel) the experts of all steps after the first train at the same time as Ray tasks, each
        in its own process from the same shared weights: bit-identical to learning them one by one with as
        many torch threads as `parallel.cpus_per_task`. On any error the model is left as it was."""
        learner = Learner(self.features, self.tasks, progress, source)
        out = learner.fit_steps(steps, classes, false_alarm_rate, rates, parallel)
        for infos in out:
            self.tasks.extend(infos)
        return out

    def calibration_holdout(self, task: int, images: Images, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted indices (training, calibration) of task `task`'s images, as learning drew them
        (`learning.calibration_holdout`, whole groups of `data.group_file`)."""
        groups = image_groups(images, self.config.data.group_file)
        return calibration_holdout(self.config, task, len(images), rate, groups)

    # ------------------------------------------------------------------------------ inference (pipeline.py)
    def predict(self, images: Images, task_ids: Sequence[int] | torch.Tensor | None = None,
                batch_size: int = 32, among: Sequence[int] | None = None) -> Prediction:
        """Score images. Without `task_ids` the router picks each image's task (task-agnostic), among the
        tasks `among` if given (e.g. those learned up to a step of the sequence), else among all.
        Images are loaded and scored `batch_size` at a time."""
        ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        check_request(self.inspector, len(images), ids, among)
        backend = TorchBackend(self.inspector, batch_size)
        return concat_inspections([
            self.inspect_prepared(self.prepare(images[start:start + batch_size]), backend,
                                  None if ids is None else ids[start:start + batch_size], among)
            for start in range(0, len(images), batch_size)])

    def inspect_prepared(self, prep: Prepared, backend: NeuralBackend, task_ids: torch.Tensor | None = None,
                         among: Sequence[int] | None = None) -> Prediction:
        """One batch of prepared images through the inspection pipeline with `backend` (`predict` uses the torch
        backend; the evaluation one that keeps test features across a run, `eval_cache`)."""
        with self._autocast():
            return inspect(self.inspector, backend, prep, task_ids, None if among is None else list(among))

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type,
                              dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @torch.no_grad()
    def recalibrate(self, name: str, normals: Images, false_alarm_rate: float | None = None,
                    replace: bool = False, batch_size: int = 32) -> TaskInfo:
        """Re-calibrate one product's decision threshold and unknown-product limit from more good parts,
        without retraining: its expert, prototype and every other task stay bit-identical.

        The new good parts' scores are pooled with the calibration scores the task already has (or replace
        them, `replace=True`, e.g. after a camera change); the threshold is the conformal rule over the pool.
        The unknown-product limit becomes the `router.unknown_quantile` quantile of the new parts' distances
        to the product's prototype times `router.unknown_margin` (at least 10 parts; else it is kept). The
        previous values are appended to `calibration["history"]`."""
        return Learner(self.features, self.tasks).recalibrate(self.task_by_name(name), normals, false_alarm_rate,
                                                              replace, batch_size)

    @torch.no_grad()
    def routing_now(self) -> dict[str, dict]:
        """Where each product's held-out good parts (kept when it was learned) route now, among every product
        learned: {name: {"n", "routed": {name: share}, "ambiguous": share}} (`router.holdout_routing`)."""
        return holdout_routing(self.router, {t.task_id: t.name for t in self.tasks},
                               self.config.router.ambiguity_margin)

    # ------------------------------------------------------------------------------ lifecycle
    def task_by_name(self, name: str) -> TaskInfo:
        for info in self.tasks:
            if info.name == name:
                return info
        raise MoleflowError(f"no task named {name!r}; tasks: {', '.join(t.name for t in self.tasks) or 'none'}")

    def rename_task(self, name: str, new_name: str) -> TaskInfo:
        """Give task `name` a new name (its class list follows when it was just its name); tensors are untouched."""
        info = self.task_by_name(name)
        if not new_name or any(t.name == new_name for t in self.tasks):
            raise MoleflowError(f"cannot rename {name} to {new_name!r}: "
                                f"{'a task has that name' if new_name else 'the name is empty'}")
        if info.classes == [name]:
            info.classes = [new_name]
        info.name = new_name
        return info

    def remove_task(self, name: str) -> TaskInfo:
        """Delete one task's expert, prototype, memory and threshold; the other tasks are unaffected.
        The last task cannot be removed: a run without tasks has nothing to score with."""
        info = self.task_by_name(name)
        if len(self.tasks) == 1:
            raise MoleflowError(f"{name} is the only learned task; a run needs at least one (train a new run "
                                "instead, or add another product first)")
        self.inspector.remove_task(info.task_id)
        self.tasks.remove(info)
        return info

    def save(self, path: str | Path) -> Path:
        """Write the model folder of `path` (RUN/model: manifest + one safetensors file per expert), atomically;
        return the folder. Experts already on disk are not rewritten."""
        self.inspector.check_complete()
        extractor = self.extractor
        meta = {"config": self.config.to_dict(),
                "backbone": {"name": extractor.name, "weights_sha256": extractor.weights_sha256,
                             "weights_source": extractor.weights_source},
                "task_ids": list(self.flow.task_ids), "base_tasks": list(self.flow.base_tasks),
                "tasks": self.task_info_dicts()}
        return write_model(path, self.inspector.state_by_part(), meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             backbone_weights: str | None = None, lazy: bool = True) -> "MoleFlow":
        """Load a model folder (or a run folder holding one), verifying every file's SHA-256; its scores equal
        those of the saved model exactly. `lazy`: the shared flow, every routing prototype and every
        calibration are loaded now, each task's expert (flow parts, patch memory) when it is first used, its
        file checked again then (`Inspector.ensure_experts`); `lazy=False` (or a moleflow 0.1 `model.pt`)
        loads everything now."""
        found, manifest, state, pending = read_model_lazily(path) if lazy else (*read_model(path), {})
        config = Config.from_dict(manifest["config"])
        if backbone_weights is not None:
            config.backbone.weights = backbone_weights
        model = cls(config, device=device)
        saved_hash = manifest["backbone"]["weights_sha256"]
        if model.extractor.weights_sha256 != saved_hash:
            raise MoleflowError(
                f"{found}: the backbone weights found here ({model.extractor.weights_source}) differ from the ones "
                f"the run was trained with (sha256 {saved_hash[:12]}...); pass the same weights file")
        base = manifest.get("base_tasks")
        if base is None:  # runs saved before several products could share the first step
            base = [] if manifest.get("base_task") is None else [manifest["base_task"]]
        model.inspector.load_model_state(list(manifest["task_ids"]), base, state, pending)
        # the tensor is the truth; the metadata copy is for people and tools
        model.tasks = task_infos(manifest["tasks"], {t: model.inspector.threshold(t) for t in model.inspector.task_ids})
        return model

    def task_info_dicts(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.tasks]
