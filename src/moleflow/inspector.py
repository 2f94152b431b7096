"""The routed-inference module: the torch modules and the rules that turn features into product, score, decision
and heat map.

    inspector = Inspector(config, device)          # extractor + expert flow + router + memory + map maker
    out = pipeline.inspect(inspector, TorchBackend(inspector), prep)   # prep: data.batch.Prepared (N images)
    out.scores (N,)  out.maps (N, S, S)  out.task_ids (N,)  out.known (N,)  out.anomalous (N,)
    scores, maps, index, distance, known, anomalous = inspector(images)   # square images: the ONNX graph

`MoleFlow.predict`, the evaluation, the ONNX export and serving all go through this module: the pipeline
(pipeline.py: tiles, oracle ids, a subset of tasks; its neural calls in torch or onnxruntime) runs `route` and
`decide`; `forward` is the same composition for a batch of square images over all tasks, written with tensor
ops only so it traces to one ONNX graph. Both call the same pieces: `extractor`, `router` (the one Mahalanobis
formula), `expert_scores` and `outputs`.

Everything needed to score is a parameter or buffer: the router's prototypes and unknown-product limits,
the patch memory, and each task's decision threshold (`threshold_<t>`). Its `state_dict` (without the
backbone, which is identified by its weight hash) plus the resolved config is the checkpoint; which task owns
a tensor is task_keys.py's rule.

A model loaded lazily (`MoleFlow.load(lazy=True)`) has its routing prototypes and thresholds at once, and each
task's expert (flow parts, patch memory) as a `PendingExpert` (the model folder's `LazyPart`; this module
knows no files), read when the task is first used: `ensure_experts` loads them, and every path that runs or
writes an expert calls it first (`decide` for the routed tasks, `patch_scores`, `forward`, `state_dict`,
`model_state`, `state_by_part`), so an unloaded (randomly initialised) expert is never run nor saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch
from torch import nn

from .backbones import FeatureExtractor
from .config import Config
from .data.batch import Prepared
from .data.tiling import stitch_maps
from .errors import MoleflowError
from .memory import PatchMemory
from .model import ExpertFlow
from .router import PrototypeRouter, fitting_patches, masked_median, mean_per_image, patch_misfit
from .scoring import MapMaker, image_scores
from .task_keys import (BACKBONE_PREFIX, HOLDOUT_BUFFERS, calibration_part, expert_part, is_task_buffer, key_owner,
                        key_part)

class PendingExpert(Protocol):
    """A task's expert not read yet (a lazily loaded model): what it holds, and how to read it. The Inspector
    knows no files; the model folder (store/checkpoint.py `LazyPart`) supplies these."""

    path: object  # where it is read from, for messages
    keys: frozenset[str]  # every tensor it holds
    eager: frozenset[str]  # those given to the Inspector already (the router's)
    data_bytes: int  # bytes of all its tensors

    def load(self) -> dict[str, torch.Tensor]:
        """Its tensors not given already (`keys` - `eager`)."""
        ...


@dataclass
class Inspection:
    """Results for N images. Task ids are the router's choice (or the oracle's when given)."""

    scores: torch.Tensor  # (N,) image scores
    maps: torch.Tensor  # (N, S, S) pixel anomaly maps
    # raw patch scores (N, h, w), or with tiling one stitched map per image
    patch_scores: torch.Tensor | list[torch.Tensor]
    task_ids: torch.Tensor  # (N,) long
    known: torch.Tensor  # (N,) bool: False = fits no learned product ("unknown product")
    anomalous: torch.Tensor  # (N,) bool: score above the routed task's calibrated threshold
    router_distance: torch.Tensor  # (N,) distance to the chosen prototype (nan with oracle ids)
    thresholds: torch.Tensor  # (N,) the threshold each image was decided against
    # (N,) float64: how much worse the runner-up product fits than the routed one (log units of the evidence,
    # `Inspector._evidence`; inf when the prototype router alone decided, nan with oracle ids)
    route_margin: torch.Tensor
    ambiguous: torch.Tensor  # (N,) bool: routing was in doubt; the part was scored under every plausible product
    alternatives: list[list[int]]  # (N,) the other plausible products' task ids, best fit first


@dataclass
class Routing:
    """The router's answer for N images among `tasks` (columns)."""

    index: torch.Tensor  # (N,) long: the chosen column
    distances: torch.Tensor  # (N, T) float64: distances to the products' prototypes (nan with oracle ids)
    limits: torch.Tensor  # (T,) float64: the products' unknown-product distance limits (inf with oracle ids)
    margin: torch.Tensor  # (N,) float64: runner-up evidence minus the chosen one's (inf: no runner-up weighed)
    plausible: torch.Tensor  # (N, T) bool: products the part is scored under (the chosen one always)
    evidence: torch.Tensor  # (N, T) float64: `Inspector._evidence` where computed (inf elsewhere): plausible ones' order

    @classmethod
    def oracle(cls, index: torch.Tensor, n_tasks: int) -> "Routing":
        n = len(index)
        return cls(index, torch.full((n, n_tasks), float("nan"), dtype=torch.float64),
                   torch.full((n_tasks,), float("inf"), dtype=torch.float64),
                   torch.full((n,), float("nan"), dtype=torch.float64),
                   torch.nn.functional.one_hot(index.cpu(), n_tasks).bool(),
                   torch.full((n, n_tasks), float("inf"), dtype=torch.float64))

    @property
    def ambiguous(self) -> torch.Tensor:
        return self.plausible.sum(1) > 1

    def distance(self, index: torch.Tensor) -> torch.Tensor:
        """(N,) float64 distance of each image to the prototype of column index[i]."""
        return self.distances.cpu().gather(1, index.cpu().unsqueeze(1)).squeeze(1)

    def known(self, index: torch.Tensor) -> torch.Tensor:
        """(N,) bool: each image within the unknown-product limit of column index[i] (oracle ids: True)."""
        distance = self.distance(index)
        return (distance <= self.limits.cpu()[index.cpu()]) | distance.isnan()


class Inspector(nn.Module):
    """Frozen backbone, MoLE flow with per-task experts, prototype router, patch memory, map maker."""

    def __init__(self, config: Config, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.device = torch.device(device)
        self.extractor = FeatureExtractor(config.backbone)
        self.flow = ExpertFlow(config.model, self.extractor.embed_dim, seed=config.train.seed)
        self.router = PrototypeRouter(config.router)
        score = config.score
        self.memory = (PatchMemory(score.memory_fraction, config.train.seed, score.memory_max_tokens,
                                   score.memory_coreset, score.memory_weight, score.memory_combine)
                       if score.source == "flow+memory" else None)
        self.extractor.to(self.device)
        size = config.data.image_size
        with torch.no_grad():  # the token grid of this backbone at this image size, e.g. 28 x 28 at 224 px
            self.grid = tuple(self.extractor.tokens(torch.zeros(1, 3, size, size, device=self.device)).shape[1:3])
        self.map_maker = MapMaker.of(self.grid, config)
        self._stitched_makers: dict[tuple[int, int], MapMaker] = {}  # map makers of stitched (tiled) grids
        self._pending: dict[int, PendingExpert] = {}  # experts of a lazily loaded model not read yet, by task id
        self.to(self.device)
        self.eval()

    # ------------------------------------------------------------------------------ tasks
    @property
    def task_ids(self) -> list[int]:
        return list(self.flow.task_ids)

    def add_expert(self, task: int | None = None, base: bool | None = None) -> int:
        """Create a new task's expert (on the module's device) and return its id; no prototype or threshold yet.
        `base`: it trains the shared weights with its own (default: only the first task)."""
        task = self.flow.add_task(task, base)
        self.place()
        return task

    def place(self) -> None:
        """Move tensors just created (on the CPU) to the module's device; on the CPU nothing needs to move, and
        walking every expert's tensors per new expert would make T experts cost O(T^2)."""
        if self.device.type != "cpu":
            self.to(self.device)

    def undo_experts(self, tasks: list[int], first_step: bool) -> None:
        """Remove the experts of a learning step that failed (`tasks`, just added); after a failed first step
        no task has trained the shared flow."""
        for task in tasks:
            self.remove_task(task)
        if first_step:
            self.flow.base_tasks = []

    def set_threshold(self, task: int, value: float) -> None:
        self.register_buffer(f"threshold_{task}", torch.tensor(float(value), dtype=torch.float64, device=self.device))

    def set_prototype(self, task: int, features: torch.Tensor) -> None:
        """Task `task`'s router prototype and unknown-product limit from its routing features (N, D), replacing
        any it has (its other router buffers, such as how defects move its feature, are kept)."""
        self.router.fit_task(task, features)
        self.place()

    def set_unknown_limit(self, task: int, limit: float) -> None:
        """Task `task`'s unknown-product distance limit; its prototype is kept."""
        mean, precision = self.router.prototype(task)
        self.router.set_prototype(task, mean, precision, limit)

    def add_memory(self, task: int, tokens) -> None:
        """Task `task`'s patch memory from its normal training tokens (N, H, W, D) (in memory or memory-mapped)."""
        self.memory.add_task(task, tokens)
        self.place()

    def set_memory_norm(self, task: int, nll: torch.Tensor, distance: torch.Tensor) -> None:
        """Standardise task `task`'s flow NLL and memory distance by their values (N, H, W) on normal tokens."""
        self.memory.set_norm(task, nll, distance)
        self.place()

    def threshold(self, task: int) -> float:
        return float(getattr(self, f"threshold_{task}"))

    def remove_task(self, task: int) -> None:
        """Delete everything task `task` owns; every other task is untouched."""
        self._pending.pop(task, None)
        if task in self.flow.task_ids:
            self.flow.remove_task(task)
        if task in self.router.task_ids:
            self.router.remove_task(task)
        if self.memory is not None:
            self.memory.remove_task(task)
        if hasattr(self, f"threshold_{task}"):
            delattr(self, f"threshold_{task}")

    def check_complete(self) -> None:
        """Every task has an expert, a prototype, a threshold (and a memory when scored with one)."""
        for t in self.flow.task_ids:
            missing = [what for what, ok in (("router prototype", t in self.router.task_ids),
                                            ("threshold", hasattr(self, f"threshold_{t}")),
                                            ("patch memory", self._has_memory(t))) if not ok]
            if missing:
                raise MoleflowError(f"task {t} has no {', '.join(missing)}; the model is incomplete")

    def _has_memory(self, task: int) -> bool:
        """Task `task` has its patch memory (or is scored without one); a pending expert's is in its file."""
        if self.memory is None or self.memory.has(task):
            return True
        return task in self._pending and f"memory.bank_{task}" in self._pending[task].keys

    # ------------------------------------------------------------------------------ lazy experts
    @property
    def pending_tasks(self) -> list[int]:
        """Tasks of a lazily loaded model whose expert has not been read yet."""
        return sorted(self._pending)

    def ensure_experts(self, tasks: Iterable[int]) -> None:
        """Read the pending experts among `tasks` (SHA-256 checked again) into the model; others stay pending."""
        for task in [t for t in tasks if t in self._pending]:
            self._materialise(task)

    def _materialise(self, task: int) -> None:
        """Load pending task `task`'s expert file: its memory buffers are created, its flow tensors replace the
        placeholders made at load; it stays pending (and unusable) if anything fails."""
        part = self._pending[task]
        state = part.load()
        self._create_task_buffers(state)
        expected = {k for k in self._model_state() if key_part(k) == expert_part(task) and k not in part.eager}
        if set(state) != expected:
            raise MoleflowError(f"{part.path}: the tensors of task {task} do not fit this model (missing "
                                f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}); "
                                "restore it from a copy of the run")
        self.load_state_dict(state, strict=False)
        del self._pending[task]
        self.place()

    def expert_state(self, task: int) -> dict[str, torch.Tensor]:
        """The shared tensors and task `task`'s own (its expert materialised first, no other)."""
        self.ensure_experts([task])
        return {k: v for k, v in self._model_state().items() if key_owner(k) in (None, task)}

    def task_bytes(self, task: int) -> int:
        """Bytes of task `task`'s tensors (expert and calibration parts), without reading a pending expert."""
        part = self._pending.get(task)
        loaded = sum(v.numel() * v.element_size() for k, v in self._model_state().items()
                     if key_owner(k) == task and (part is None or k not in part.keys))
        return loaded + (part.data_bytes if part is not None else 0)

    # ------------------------------------------------------------------------------ state
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False
                   ) -> dict[str, torch.Tensor]:
        """nn.Module.state_dict, every pending expert materialised first when asked directly (save, export,
        hashing); as a part of a wrapper graph of one expert (engine.py) nothing is read."""
        if destination is None and not prefix:
            self.ensure_experts(list(self._pending))
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _model_state(self) -> dict[str, torch.Tensor]:
        """`model_state` as it is, pending experts' placeholders included: for key checks only."""
        return {k: v for k, v in super().state_dict().items() if not k.startswith(BACKBONE_PREFIX)}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The state_dict without the backbone (its weights come from their source, checked by hash); every
        expert materialised."""
        self.ensure_experts(list(self._pending))
        return self._model_state()

    def state_by_part(self) -> dict[str, dict[str, torch.Tensor]]:
        """`model_state` split into checkpoint parts (`key_part`): shared, and per task its expert and its
        calibration."""
        parts: dict[str, dict[str, torch.Tensor]] = {"shared": {}}
        for t in self.task_ids:
            parts[expert_part(t)], parts[calibration_part(t)] = {}, {}
        for key, value in self.model_state().items():
            part = key_part(key)
            if part not in parts:
                raise MoleflowError(f"tensor {key} belongs to {part}, a task the model does not have")
            parts[part][key] = value.detach().cpu()
        return parts

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors no task owns (the shared flow): what an expert learned elsewhere starts from."""
        return {k: v for k, v in self.model_state().items() if key_owner(k) is None}

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        """Task `task`'s own tensors (expert and calibration parts), on the CPU: what `install_expert` takes."""
        return {k: v.detach().cpu() for k, v in self.model_state().items() if key_owner(k) == task}

    def load_shared_state(self, base_tasks: list[int], shared: dict[str, torch.Tensor]) -> None:
        """Load the shared tensors `shared_state` gave (`base_tasks`: the tasks that trained them) into a model
        without tasks, to learn a later expert on it."""
        self.flow.base_tasks = list(base_tasks)
        self.load_state_dict(shared, strict=False)
        missing = [k for k in self.model_state() if k not in shared]
        if missing:
            raise MoleflowError(f"the shared state sent to the worker lacks {missing[:3]}")

    def _create_task_buffers(self, state: dict[str, torch.Tensor]) -> None:
        """Create the per-task buffers (prototypes, unknown limits, memories, thresholds) that `state` holds."""
        for key, value in state.items():  # per-task buffers are created from the saved values
            owner, name = key_owner(key), key.rsplit(".", 1)[-1]
            if owner is None or not is_task_buffer(name):
                continue
            if key.startswith("router."):
                if name.startswith("mean_"):
                    self.router.set_prototype(owner, value, state[f"router.precision_{owner}"],
                                              float(state[f"router.unknown_{owner}"]))
                elif name.startswith("defectmove_"):
                    self.router.set_defect_moves(owner, value)
                elif name.startswith("holdout_"):
                    self.router.set_holdout(owner, *(state[f"router.{kind}_{owner}"] for kind in HOLDOUT_BUFFERS))
            elif key.startswith("memory."):
                if self.memory is None:
                    raise MoleflowError(f"the checkpoint has a patch memory ({key}) but score.source is "
                                        f"{self.config.score.source}")
                self.memory.register_buffer(name, value.clone())
            else:
                self.register_buffer(name, value.clone())

    def install_expert(self, task: int, state: dict[str, torch.Tensor]) -> None:
        """Load task `task`'s tensors (expert, prototype, memory, threshold; as learned elsewhere, e.g. by a Ray
        worker) into its expert, already added here; every other tensor is untouched."""
        self._create_task_buffers(state)
        expected = {k for k in self.model_state() if key_owner(k) == task}
        if set(state) != expected or any(key_owner(k) != task for k in state):
            raise MoleflowError(f"the tensors learned for task {task} do not fit this model: missing "
                                f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        self.load_state_dict(state, strict=False)
        self.flow.eval()
        self.place()

    def load_model_state(self, task_ids: list[int], base_tasks: list[int], state: dict[str, torch.Tensor],
                         pending: dict[int, PendingExpert] | None = None) -> None:
        """Rebuild the experts of `task_ids` (`base_tasks`: those that trained the shared weights, removed ones
        included) and load `state` (as written by `model_state`), strictly; the experts in `pending` (task id ->
        its file, whose other tensors `state` lacks) are read on first use (`ensure_experts`)."""
        pending = dict(pending or {})
        for task in task_ids:
            self.flow.add_task(task, base=task in base_tasks)
        self.flow.base_tasks = list(base_tasks)
        self._create_task_buffers(state)
        for task, part in pending.items():  # a file may hold only its own task's expert
            stray = sorted(k for k in part.keys if key_part(k) != expert_part(task))
            if task not in task_ids or stray:
                raise MoleflowError(f"{part.path}: holds tensors that are not task {task}'s expert "
                                    f"({stray[:3] or 'an unknown task'})")
        later = {k for part in pending.values() for k in part.keys - part.eager}
        expected = set(self._model_state()) | {k for k in later if k.startswith("memory.") and self.memory is not None}
        missing, unexpected = expected - set(state) - later, (set(state) | later) - expected
        if missing or unexpected:
            raise MoleflowError(f"the checkpoint does not fit this configuration: missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]}")
        self.load_state_dict({**state, **{k: v for k, v in super().state_dict().items()
                                          if k.startswith(BACKBONE_PREFIX)}}, strict=not pending)
        self._pending = pending
        self.router.task_ids.sort(key=task_ids.index)
        self.to(self.device)
        self.eval()
        self.check_complete()

    # ------------------------------------------------------------------------------ pieces
    def patch_scores(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        """Patch anomaly scores (B, H, W) of tokens (B, H, W, D) under task `task`: the flow's NLL (spec §6),
        or with a memory the standardised sum of NLL and memory distance."""
        if task in self._pending:
            self.ensure_experts([task])
        nll = self.flow(tokens, task).nll
        return nll if self.memory is None else self.memory.combine(nll, tokens, task)

    def expert_scores(self, tokens: torch.Tensor, index: torch.Tensor, tasks: list[int],
                      batch_size: int = 64) -> torch.Tensor:
        """Patch scores (M, H, W) of tokens (M, H, W, D), row i scored by the expert of task tasks[index[i]].

        Eager: one flow pass per chunk of `batch_size` rows (on the CPU, fewer: `ExpertFlow.rows_per_pass`)
        whatever products they hold (`forward_rows`: each row through its own expert; a chunk of one product is
        that expert's plain forward), then each product's patch memory on its own rows. Traced for export: every expert runs on every row and the routed one is
        gathered (no data-dependent control flow)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            every = torch.stack([self.patch_scores(tokens, t).float() for t in tasks], dim=1)  # (M, T, H, W)
            h, w = tokens.shape[1:3]
            return every.gather(1, index.view(-1, 1, 1, 1).expand(-1, 1, h, w)).squeeze(1)
        out = tokens.new_empty(tokens.shape[:3], dtype=torch.float32)
        row_task = torch.as_tensor(tasks, dtype=torch.long, device=index.device)[index]  # (M,) each row's task
        rows_per_pass = self.flow.rows_per_pass(tokens, batch_size)
        for chunk in torch.arange(len(index), device=index.device).split(rows_per_pass):
            ids = row_task[chunk]
            distinct = ids.unique().tolist()
            if len(distinct) == 1:  # one product: its expert's plain forward, bit-identical to scoring it alone
                out[chunk] = self.patch_scores(tokens[chunk], distinct[0]).float()
                continue
            nll = self.flow.forward_rows(tokens[chunk], ids).nll
            if self.memory is None:
                out[chunk] = nll.float()
                continue
            for task in distinct:  # nearest patches come from each product's own memory, so per product
                own = (ids == task).nonzero().squeeze(1)
                out[chunk[own]] = self.memory.combine(nll[own], tokens[chunk[own]], task).float()
        return out

    def outputs(self, patch: torch.Tensor, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | list]:
        """Tiles' patch scores (M, h, w) -> image scores (N,), pixel maps (N, S, S) and patch maps: (N, h, w)
        without tiling, else one stitched (k*h, w) or (h, k*w) map per image."""
        if not prep.tiled:
            patch = patch[prep.owner.argsort().to(patch.device)]
            return image_scores(patch, self.config.score), self.map_maker(patch), patch
        patch_maps, scores, maps = [], [], []
        for i, layout in enumerate(prep.layouts):
            stitched = stitch_maps(patch[(prep.owner == i).nonzero().squeeze(1).to(patch.device)], layout)
            grid = tuple(stitched.shape)
            if grid not in self._stitched_makers:
                self._stitched_makers[grid] = MapMaker.of(grid, self.config).to(self.device)
            patch_maps.append(stitched)
            scores.append(image_scores(stitched[None], self.config.score)[0])
            maps.append(self._stitched_makers[grid](stitched[None])[0])
        return torch.stack(scores), torch.stack(maps), patch_maps

    def thresholds(self, tasks: list[int]) -> torch.Tensor:
        """(T,) float64 decision thresholds of `tasks`."""
        return torch.stack([getattr(self, f"threshold_{t}") for t in tasks])

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles (B, 3, S, S) on the module's device -> patch tokens (B, H, W, D) and routing features (B, D)."""
        tokens = self.extractor.run(pixels)
        return tokens, self.router.features(tokens)

    def extract(self, pixels: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles (M, 3, S, S) -> tokens (M, H, W, D) and routing features (M, D) on the module's device."""
        parts = [self.features(chunk.to(self.device)) for chunk in pixels.split(batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # ------------------------------------------------------------------------------ routing
    def route(self, tokens: torch.Tensor, routing: torch.Tensor, owner: torch.Tensor, n: int, tasks: list[int]
              ) -> Routing:
        """Which of `tasks` each of n images is (tiles: tokens (M, H, W, D), routing features (M, D), owner (M,)).

        `router.mode`: "prototype" takes the nearest prototype (its evidence: the log distance). "patch" and
        "gated" also compare the images' patches with the candidate products' patch memories
        (`router.patch_misfit`: the median over an image's patches of the distance to the nearest remembered patch,
        which a defect on a minority of them cannot move far): "patch" chooses on that misfit alone among all
        products; "gated", where the runner-up prototype is within a factor 1 + `router.gate` of the nearest,
        weighs prototype distance and patch misfit among those products (`_evidence`). Prototype distances here
        are the router's choice distances (`router.metric`); the distance reported is in the chosen product's
        own metric. Products whose evidence is within `router.ambiguity_margin` (log units) of the best are
        plausible."""
        cfg = self.config.router
        distances, choice = self.router.image_distances(routing, tasks, owner, n)  # (N, T) float64: own, choosing
        nearest, index = choice.min(1)
        n_tasks = len(tasks)
        margin = torch.full((n,), float("inf"), dtype=torch.float64, device=distances.device)
        evidence = torch.full((n, n_tasks), float("inf"), dtype=torch.float64, device=distances.device)
        plausible = torch.nn.functional.one_hot(index, n_tasks).bool()
        if cfg.mode == "prototype" and n_tasks > 1:
            evidence = choice.clamp_min(1e-12).log()
            if cfg.trim_limit:
                evidence = self._trimmed_evidence(tokens, evidence, owner, n, tasks)
            top = evidence.topk(2, dim=1, largest=False)
            index = top.indices[:, 0]  # the smallest evidence chooses (trimmed: the median of the fitting patches)
            margin = top.values[:, 1] - top.values[:, 0]
            plausible = torch.nn.functional.one_hot(index, n_tasks).bool() | (evidence <= top.values[:, :1]
                                                                                + cfg.ambiguity_margin)
        elif n_tasks > 1:
            gate = float("inf") if cfg.mode == "patch" else cfg.gate
            candidates = choice <= nearest.unsqueeze(1) * (1 + gate)
            doubt = candidates.sum(1) > 1
            if bool(doubt.any()):
                images = doubt.nonzero().squeeze(1)
                rows = torch.isin(owner, images).nonzero().squeeze(1)
                renumber = torch.full((n,), -1, dtype=torch.long, device=owner.device)
                renumber[images] = torch.arange(len(images), device=owner.device)
                columns = candidates[images].any(0).nonzero().squeeze(1).tolist()
                self.ensure_experts([tasks[c] for c in columns])  # their memories
                z = tokens.new_full((len(rows), n_tasks, *tokens.shape[1:3]), float("inf"))
                for c in columns:
                    z[:, c] = self.memory.distances(tokens[rows], tasks[c])
                fit = self._evidence(choice[images], patch_misfit(z, renumber[owner[rows]], len(images)))
                fit = fit.masked_fill(~candidates[images], float("inf"))
                top = fit.topk(2, dim=1, largest=False)
                index[images] = top.indices[:, 0]
                margin[images] = top.values[:, 1] - top.values[:, 0]
                evidence[images] = fit
                plausible[images] = fit <= top.values[:, :1] + cfg.ambiguity_margin
        return Routing(index, distances, self.router.limits(tasks), margin, plausible, evidence)

    def _trimmed_evidence(self, tokens: torch.Tensor, evidence: torch.Tensor, owner: torch.Tensor, n: int,
                          tasks: list[int]) -> torch.Tensor:
        """evidence (N, T): log choice distances -> the same where the nearest product stands alone; where others
        are within `router.trim_gate` of it, those products' log choice distances of the median over only the
        patches that fit one of them (`router.fitting_patches` under `router.trim_limit`; a defect's patches fit
        none), the rest inf. Reads the memories of those products only (tokens (M, H, W, D), owner (M,))."""
        cfg = self.config.router
        candidates = evidence <= evidence.min(1, keepdim=True).values + cfg.trim_gate
        doubt = candidates.sum(1) > 1
        if not bool(doubt.any()):
            return evidence
        images = doubt.nonzero().squeeze(1)
        rows = torch.isin(owner, images).nonzero().squeeze(1)
        renumber = torch.full((n,), -1, dtype=torch.long, device=owner.device)
        renumber[images] = torch.arange(len(images), device=owner.device)
        row_candidates = candidates[images][renumber[owner[rows]]]  # (K, T): each tile's image's candidates
        columns = row_candidates.any(0).nonzero().squeeze(1).tolist()
        self.ensure_experts([tasks[c] for c in columns])  # their memories
        fitting = tokens.new_full((len(rows), len(tasks), *tokens.shape[1:3]), float("inf"))
        for c in columns:
            fitting[:, c] = self.memory.standardised_distance(self.memory.distances(tokens[rows], tasks[c]), tasks[c])
        trimmed = mean_per_image(self._trimmed_distances(tokens[rows], fitting, row_candidates, tasks),
                                 renumber[owner[rows]], len(images))
        out = evidence.clone()
        out[images] = trimmed.clamp_min(1e-12).log().masked_fill(~candidates[images], float("inf"))
        return out

    def _trimmed_distances(self, tokens: torch.Tensor, fitting: torch.Tensor, close: torch.Tensor, tasks: list[int]
                           ) -> torch.Tensor:
        """tokens (M, H, W, D), fitting (M, T, H, W) standardised memory distances, close (M, T) bool -> (M, T)
        float64 choice distances of the median over the patches within `router.trim_limit` of one of the close
        products (`route` and `forward` share it)."""
        worst = fitting.masked_fill(~close.view(*close.shape, 1, 1), float("inf")).min(1).values
        keep = fitting_patches(worst, self.config.router.trim_limit)
        return self.router.choice_distances(masked_median(tokens, keep), tasks)

    def _evidence(self, distances: torch.Tensor, misfit: torch.Tensor) -> torch.Tensor:
        """(N, T) prototype distances and patch misfits -> (N, T) how badly each product fits, in log units (lower
        is better; differences are log ratios, so no unit of the features enters): "gated" weighs both,
        log distance + `router.patch_weight` x log misfit; "patch" takes the log misfit alone."""
        log_misfit = misfit.clamp_min(1e-12).log()
        if self.config.router.mode == "patch":
            return log_misfit
        return distances.clamp_min(1e-12).log() + self.config.router.patch_weight * log_misfit

    def oracle_routing(self, task_ids: Sequence[int] | torch.Tensor) -> tuple[Routing, list[int]]:
        """The routing that oracle `task_ids` (N,) give (checked by `pipeline.check_request`), and the tasks its
        index points into."""
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        tasks = sorted(set(ids.tolist()))
        return Routing.oracle(torch.tensor([tasks.index(t) for t in ids.tolist()], dtype=torch.long), len(tasks)), tasks

    # ------------------------------------------------------------------------------ inference
    def decide(self, prep: Prepared, routed: Routing, tasks: list[int], scorer) -> Inspection:
        """Score the N images of `prep` under their routed products and decide; results on the CPU.

        `scorer(rows (K,) or None for all, index (K,)) -> patch scores (K, h, w)` scores tiles `rows` under
        tasks[index] (the torch or onnxruntime experts). An ambiguous part is also scored under each other plausible product: it is
        flagged only if flagged under all of them, else it is reported against the best-fitting product under which
        it is normal. A good part of a plausible product is then flagged at most as often as under its own
        threshold, so each product's false-alarm guarantee holds; a defect that looks normal to a look-alike
        product's expert is missed (measured in docs/decisions.md §8)."""
        index = routed.index.cpu()
        owner = prep.owner.cpu()
        self.ensure_experts([tasks[i] for i in index.unique().tolist()])  # only the routed ones are read
        patch = scorer(None, index[owner])
        scores, maps, patch_maps = self.outputs(patch, prep)
        scores, maps = scores.float().cpu(), maps.float().cpu()
        patch_maps = patch_maps.cpu() if isinstance(patch_maps, torch.Tensor) else [m.cpu() for m in patch_maps]
        limits = self.thresholds(tasks).cpu()
        chosen_limits = limits[index]
        anomalous = scores.double() > chosen_limits
        plausible, evidence = routed.plausible.cpu(), routed.evidence.cpu()
        alternatives: list[list[int]] = [[] for _ in range(len(index))]
        for i in routed.ambiguous.cpu().nonzero().squeeze(1).tolist():
            order = [c for c in evidence[i].argsort().tolist() if plausible[i, c] and c != int(index[i])]
            alternatives[i] = [tasks[c] for c in order]
            if not anomalous[i]:
                continue  # normal under the best-fitting product: reported against it
            rows = (owner == i).nonzero().squeeze(1)
            part = Prepared(prep.pixels, torch.zeros(len(rows), dtype=torch.long), [prep.layouts[i]])
            for c in order:  # the first plausible product under which the part is normal, if any
                self.ensure_experts([tasks[c]])
                s, m, p = self.outputs(scorer(rows, torch.full((len(rows),), c, dtype=torch.long)), part)
                if float(s[0]) <= float(limits[c]):
                    index[i], scores[i], maps[i], chosen_limits[i], anomalous[i] = c, s[0].float(), m[0].float(), limits[c], False
                    patch_maps[i] = p[0].cpu()
                    # the other plausible products are now those besides c: the router's choice among them
                    alternatives[i] = [tasks[x] for x in evidence[i].argsort().tolist() if plausible[i, x] and x != c]
                    break
        return Inspection(scores=scores, maps=maps, patch_scores=patch_maps,
                          task_ids=torch.tensor(tasks, dtype=torch.long)[index], known=routed.known(index),
                          anomalous=anomalous, router_distance=routed.distance(index), thresholds=chosen_limits,
                          route_margin=routed.margin.cpu(), ambiguous=routed.ambiguous.cpu(), alternatives=alternatives)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Square images (N, 3, S, S) routed among all tasks -> scores (N,) float32, maps (N, S, S) float32,
        task index (N,) int64 into `task_ids`, router distance (N,) float64, known (N,) bool, anomalous (N,)
        bool. The traced graph of the ONNX export; `pipeline.inspect` gives the same values."""
        tasks = self.task_ids
        self.ensure_experts(tasks)  # traced: every expert is in the graph
        tokens, routing = self.features(images)
        tokens = tokens.float()
        cfg, n_tasks = self.config.router, len(tasks)
        if cfg.mode == "prototype" and ((cfg.ambiguity_margin == 0 and not cfg.trim_limit) or n_tasks == 1):
            index, distance, known = self.router(routing, tasks)
            patch = self.expert_scores(tokens, index, tasks)
            scores = image_scores(patch, self.config.score)
            anomalous = scores.double() > self.thresholds(tasks).index_select(0, index)
            return scores, self.map_maker(patch), index, distance, known, anomalous
        # `route` and `decide` written with tensor ops only: every expert scores every image, the rule picks
        distances, choice = self.router.image_distances(routing, tasks)  # (N, T): own metrics, choosing
        nearest, first = choice.min(1)
        reads_memory = cfg.mode != "prototype" or cfg.trim_limit
        if reads_memory:  # the memory distances that routing reads are the ones scoring needs: one search each
            z = torch.stack([self.memory.distances(tokens, t) for t in tasks], dim=1)  # (N, T, H, W)
            every = torch.stack([self.memory.standardised_sum(self.flow(tokens, t).nll, z[:, c], t).float()
                                 for c, t in enumerate(tasks)], dim=1)  # (N, T, H, W)
        else:
            every = torch.stack([self.patch_scores(tokens, t).float() for t in tasks], dim=1)  # (N, T, H, W)
        if cfg.mode == "prototype":  # every product a candidate, the evidence its log distance (`route`)
            candidates = torch.ones_like(choice, dtype=torch.bool)
            fit = choice.clamp_min(1e-12).log()
            if cfg.trim_limit:  # `_trimmed_evidence`, for every image
                close = fit <= fit.min(1, keepdim=True).values + cfg.trim_gate
                fitting = torch.stack([self.memory.standardised_distance(z[:, c], t) for c, t in enumerate(tasks)], 1)
                trimmed = self._trimmed_distances(tokens, fitting, close, tasks).clamp_min(1e-12).log()
                fit = torch.where((close.sum(1) > 1).unsqueeze(1), trimmed.masked_fill(~close, float("inf")), fit)
        else:
            gate = float("inf") if cfg.mode == "patch" else cfg.gate
            candidates = choice <= nearest.unsqueeze(1) * (1 + gate)
            fit = self._evidence(choice, patch_misfit(z)).masked_fill(~candidates, float("inf"))
        best, by_fit = fit.min(1)
        doubt = candidates.sum(1) > 1
        index = torch.where(doubt, by_fit, first)
        own = torch.nn.functional.one_hot(index, n_tasks).bool()
        plausible = (doubt.unsqueeze(1) & (fit <= best.unsqueeze(1) + cfg.ambiguity_margin)) | own  # no bool Where
        h, w = every.shape[2:]
        all_scores = image_scores(every.flatten(0, 1), self.config.score).reshape(-1, n_tasks)  # dynamic batch
        normal = plausible & (all_scores.double() <= self.thresholds(tasks).unsqueeze(0))
        # the routed product if the part is normal there, else the best-fitting plausible one where it is normal
        order = torch.where(own, torch.full_like(fit, float("-inf")), fit)
        rank = torch.where(normal, order, torch.full_like(fit, float("inf")))
        anomalous = ~normal.any(1)
        index = torch.where(anomalous, index, rank.argmin(1))
        patch = every.gather(1, index.view(-1, 1, 1, 1).expand(-1, 1, h, w)).squeeze(1)
        distance = distances.gather(1, index.unsqueeze(1)).squeeze(1)
        known = distance <= self.router.limits(tasks).index_select(0, index)
        return all_scores.gather(1, index.unsqueeze(1)).squeeze(1), self.map_maker(patch), index, distance, known, anomalous
