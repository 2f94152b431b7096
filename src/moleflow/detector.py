"""The public model object: learn products one after another, then score any image without its task id.

    model = MoleFlow(Config.from_preset("cpu"))
    model.fit_task(train_images_of_product_a, name="a")
    model.fit_task(train_images_of_product_b, name="b")
    pred = model.predict(test_images)      # pred.scores (N,), pred.maps (N,S,S), pred.task_ids (N,)
    model.save("run/model"); model = MoleFlow.load("run/model")

Images are file paths, PIL images, uint8/uint16 arrays or an already normalised float tensor (N,3,S,S).
`MoleFlow` trains and calibrates; every score it gives comes from its `inspector` (inspector.py), the one
routed-inference module that evaluation, export and serving also use.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import Config
from .data.batch import Images, Prepared, PreparedDataset, prepare_images, stream_prepared, tile_count
from .data.transforms import ImageTransform
from .errors import MoleflowError
from .inspector import Inspection, Inspector
from .parallel import Parallel
from .calibration import calibration_record, calibration_split, conformal_threshold
from .store.checkpoint import read_model, read_model_lazily, write_model
from .task_info import TaskInfo, task_infos
from .task_keys import key_owner
from .trainer import ExpertJob, TrainReport, fit_experts, fit_task

log = logging.getLogger(__name__)

Prediction = Inspection  # what `MoleFlow.predict` returns


@dataclass
class _AloneJob:
    """One expert to learn on its own (after the shared flow is frozen): what `learn_expert_remotely` gets."""

    task: int
    name: str
    images: Any  # Images
    rate: float
    classes: list[str]
    step: int


@dataclass
class _ExpertData:
    """One product's images while its expert is learned: split, and its training features."""

    task: int
    name: str
    rate: float
    n_train: int  # training images
    n_train_tiles: int  # their tiles: the samples the expert trains on
    n_cal: int
    train_images: Any  # Images
    cal_images: Any  # Images
    train_meta: Prepared  # owners and layouts of the training tiles (no pixels)
    tokens: Any  # (N, H, W, D) tensor or memory-mapped array, or None without a feature cache
    routing: torch.Tensor  # (N, D) routing features of the training images
    batch_features: Any  # indices (B,) -> tokens (B, H, W, D)


def token_chunks(tokens: torch.Tensor | np.ndarray, batch_size: int):
    """(B, H, W, D) tensors of consecutive rows of tokens held in memory or memory-mapped."""
    for start in range(0, len(tokens), batch_size):
        yield torch.as_tensor(np.asarray(tokens[start:start + batch_size]))


def _subset(images: Images, index: torch.Tensor) -> Images:
    """The images at `index` (sorted), of a tensor or a list."""
    return images[index] if isinstance(images, torch.Tensor) else [images[i] for i in index.tolist()]


def _as_list(images: Images) -> list:
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0))
    return list(images)


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
        self.tasks: list[TaskInfo] = []
        self.loader_workers = 0  # image-loading worker processes while learning (torch DataLoader); 0: in this one
        self.transform = ImageTransform(config.data.image_size, config.data.resize_mode,
                                        self.extractor.mean, self.extractor.std)

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

    # ------------------------------------------------------------------------------ inputs
    def prepare(self, images: Images) -> Prepared:
        """Preprocess images (cut into tiles when `data.tiling` says so) into normalised tiles (M, 3, S, S)."""
        return prepare_images(images, self.transform, self.config.data.tiling)

    def to_tensor(self, images: Images) -> torch.Tensor:
        """Preprocessed tiles (M, 3, S, S) of the images (one per image without tiling)."""
        return self.prepare(images).pixels

    @torch.no_grad()
    def extract(self, images: Images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens (N, H, W, D) and routing features (N, D), on the CPU."""
        x = self.to_tensor(images)
        tokens, routing = [], []
        for chunk in x.split(batch_size):
            t, r = self.inspector.features(chunk.to(self.device))
            tokens.append(t.cpu())
            routing.append(r.cpu())
        return torch.cat(tokens), torch.cat(routing)

    @torch.no_grad()
    def image_features(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """Routing features (N, D) float64 per image (the mean over an image's tiles), loaded `batch_size` at a time:
        what product discovery clusters."""
        out = []
        for prep in stream_prepared(images, self.transform, self.config.data.tiling, batch_size, self.loader_workers):
            routing = self.inspector.extract(prep.pixels, batch_size)[1].cpu().double()
            total = routing.new_zeros(prep.n_images, routing.shape[1]).index_add_(0, prep.owner, routing)
            out.append(total / torch.bincount(prep.owner, minlength=prep.n_images).unsqueeze(1))
        return torch.cat(out)

    @torch.no_grad()
    def stream_features(self, images: Images, batch_size: int = 32, keep_tokens: bool = True
                        ) -> tuple[torch.Tensor | np.ndarray | None, torch.Tensor, Prepared]:
        """Backbone tokens (M, H, W, D) and routing features (M, D) of the tiles of `images`, plus their owners and
        layouts (a Prepared without pixels). Images are loaded `batch_size` at a time by `loader_workers` worker
        processes and never held all at once; the backbone runs once per tile. Tokens that would exceed
        `train.cache_memory_gb` go to a memory-mapped file (deleted when the array is freed); `keep_tokens=False`
        keeps none (routing features only)."""
        tiling = self.config.data.tiling
        n_tiles = len(images) if isinstance(images, torch.Tensor) else sum(tile_count(i, tiling) for i in images)
        tokens = self._token_store(n_tiles) if keep_tokens else None
        routing, metas, filled = [], [], 0
        for prep in stream_prepared(images, self.transform, tiling, batch_size, self.loader_workers):
            t, r = self.inspector.extract(prep.pixels, batch_size)
            if tokens is not None:
                tokens[filled:filled + len(t)] = t.cpu().numpy() if isinstance(tokens, np.memmap) else t.cpu()
            routing.append(r.cpu())
            filled += len(t)
            metas.append(prep.without_pixels())
        if filled != n_tiles:
            raise MoleflowError(f"{filled} tiles were loaded where the image sizes gave {n_tiles}; did the images "
                                "change while they were read?")
        return tokens, torch.cat(routing), Prepared.concat(metas)

    def _token_store(self, n: int) -> torch.Tensor | np.memmap:
        """An empty (n, H, W, D) float32 array for tokens: in memory up to `train.cache_memory_gb`, else a
        memory-mapped temporary file."""
        import tempfile

        h, w = self.grid
        shape = (n, h, w, self.extractor.embed_dim)
        nbytes = 4 * n * h * w * self.extractor.embed_dim
        if nbytes <= self.config.train.cache_memory_gb * 1e9:
            return torch.empty(shape)
        folder = self.config.train.cache_dir or tempfile.gettempdir()
        handle = tempfile.NamedTemporaryFile(prefix="moleflow-cache-", suffix=".f32", dir=folder)
        tokens = np.memmap(handle, dtype=np.float32, mode="w+", shape=shape)
        tokens._moleflow_file = handle  # keeps the file alive as long as the array
        log.info("feature cache: %.1f GB memory-mapped in %s", nbytes / 1e9, folder)
        return tokens

    # ------------------------------------------------------------------------------ training
    @property
    def next_step(self) -> int:
        """The number of the next learning step (0 for a new model)."""
        return max((t.step for t in self.tasks), default=-1) + 1

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
        rates = dict(rates or {})
        default = self.config.score.false_alarm_rate if false_alarm_rate is None else float(false_alarm_rate)
        classes = dict(classes or {})
        if parallel is not None and not self.config.model.freeze_base:
            raise MoleflowError("parallel experts need model.freeze_base=true: with a shared flow that keeps "
                                "learning, every step depends on the one before")
        plans = [self._plan_step(products, classes, rates, default) for products in steps]
        names = [name for products, _, _ in plans for name in products]
        for name in names:
            if any(t.name == name for t in self.tasks) or names.count(name) > 1:
                raise MoleflowError(f"a task named {name!r} is already learned or given twice; remove it first or "
                                    "choose another name")
        first = not self.flow.base_tasks  # the first step trains the shared flow
        together = first and self.config.train.first_step != "first_only"  # its products side by side
        start = self.next_step
        new: list[int] = []
        out: list[list[TaskInfo]] = [[] for _ in plans]
        alone: list[_AloneJob] = []  # experts trained alone, after the shared flow is frozen
        try:
            for k, (products, owned, own_rates) in enumerate(plans):
                for i, (name, images) in enumerate(products.items()):
                    base = first and k == 0 and (together or i == 0)
                    task = self.inspector.add_expert(base=base)
                    new.append(task)
                    job = _AloneJob(task, name, images, own_rates[name], owned.get(name, [name]), start + k)
                    if base and together:
                        continue
                    if base:  # the first product of a first_only first step: trains the shared flow, alone
                        out[k].append(self._learn_alone(job, progress, source))
                    else:
                        alone.append(job)
            if together:  # the first step's products train the shared flow side by side
                products, owned, own_rates = plans[0]
                data = [self._expert_data(task, name, images, own_rates[name])
                        for task, (name, images) in zip(new, products.items())]
                reports = fit_experts(self.flow, [ExpertJob(d.task, d.n_train_tiles, d.batch_features) for d in data],
                                      self.config.train, self.device, progress)
                out[0] = [self._finish_expert(d, r, owned.get(d.name, [d.name]), start, source)
                          for d, r in zip(data, reports)]
            if parallel is not None and alone:
                infos = self._learn_on_ray(alone, parallel, source)
            else:
                infos = [self._learn_alone(job, progress, source) for job in alone]
            for job, info in zip(alone, infos):
                out[job.step - start].append(info)
        except BaseException:
            for task in new:
                self.inspector.remove_task(task)  # leave the model as it was
            if first:
                self.flow.base_tasks = []
            raise
        for infos in out:
            infos.sort(key=lambda info: info.task_id)
            self.tasks.extend(infos)
        return out

    def _plan_step(self, products: dict[str, Images], classes: dict[str, list[str]], rates: dict[str, float],
                   default: float) -> tuple[dict[str, Images], dict[str, list[str]], dict[str, float]]:
        """A step's products, class names and rates, as experts: pooled into one with `model.experts="task"`."""
        if not products:
            raise MoleflowError("a learning step needs at least one product")
        if self.config.model.experts == "task" and len(products) > 1:  # one expert for the whole step (§12.14)
            name = "+".join(products)
            pooled = [image for images in products.values() for image in _as_list(images)]
            return ({name: pooled}, {name: [c for p in products for c in classes.get(p, [p])]},
                    {name: min(float(rates.get(p, default)) for p in products)})  # the strictest of its products
        own = {name: float(rates.get(name, default)) for name in products}
        for name, rate in own.items():
            if not 0.0 < rate < 1.0:
                raise MoleflowError(f"false-alarm rate {rate} for {name}: must be between 0 and 1 (e.g. 0.01)")
        return dict(products), {name: classes.get(name, [name]) for name in products}, own

    def _learn_alone(self, job: "_AloneJob", progress: bool, source: dict[str, Any] | None) -> TaskInfo:
        """Train one expert (already added) on its own, then its memory, prototype and threshold."""
        data = self._expert_data(job.task, job.name, job.images, job.rate)
        report = fit_task(self.flow, job.task, data.n_train_tiles, data.batch_features, self.config.train, self.device,
                          progress)
        return self._finish_expert(data, report, job.classes, job.step, source)

    def _learn_on_ray(self, jobs: list["_AloneJob"], spec: Parallel, source: dict[str, Any] | None) -> list[TaskInfo]:
        """Train experts (already added, shared flow frozen) as Ray tasks and install what they learned."""
        from .parallel import ray_session, run_remote

        shared = {k: v for k, v in self.inspector.model_state().items() if key_owner(k) is None}
        package = {"config": self.config.to_dict(), "backbone_sha256": self.extractor.weights_sha256,
                   "base_tasks": list(self.flow.base_tasks), "shared": shared, "threads": spec.cpus_per_task,
                   "device": spec.device, "source": dict(source or {})}
        with ray_session(spec) as ray:
            ref = ray.put(package)
            results = run_remote(ray, learn_expert_remotely, [(ref, job) for job in jobs], spec,
                                 [f"expert of {job.name}" for job in jobs])
        infos = []
        for job, (info, state) in zip(jobs, results):
            self.inspector.install_expert(job.task, state)
            infos.append(TaskInfo(**info))
        return infos

    def calibration_holdout(self, task: int, n: int, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted indices (training, calibration) of task `task`'s n images: the held-out share sized by the
        false-alarm `rate` (`calibration_split`), drawn with a generator seeded by the task id."""
        gen = torch.Generator().manual_seed(self.config.train.seed * 7919 + task)
        perm = torch.randperm(n, generator=gen)
        score_cfg = self.config.score
        n_cal = calibration_split(n, rate, score_cfg.calibration_fraction, score_cfg.calibration_keep_train)
        return perm[n_cal:].sort().values, perm[:n_cal].sort().values

    def _expert_data(self, task: int, name: str, images: Images, rate: float) -> "_ExpertData":
        """Split a product's images into training and calibration (seeded by its task id) and compute the
        training features (cached, or served from the backbone on the fly), streaming the images."""
        n = len(images)
        if n == 0:
            raise MoleflowError(f"no images were given for {name}")
        train_idx, cal_idx = self.calibration_holdout(task, n, rate)
        train_images, cal_images = _subset(images, train_idx), _subset(images, cal_idx)
        tokens, routing, train_meta = self.stream_features(train_images, keep_tokens=self.config.train.feature_cache)
        if tokens is not None:
            def batch_features(idx: torch.Tensor) -> torch.Tensor:
                return torch.as_tensor(tokens[idx.numpy()] if isinstance(tokens, np.memmap) else tokens[idx])
        else:  # the backbone on the fly: load the images of the batch's tiles
            dataset = PreparedDataset(train_images, self.transform, self.config.data.tiling)
            first = torch.searchsorted(train_meta.owner, torch.arange(len(train_meta.layouts)))  # each image's first tile

            def batch_features(idx: torch.Tensor) -> torch.Tensor:
                if isinstance(train_images, torch.Tensor):  # preprocessed already, one tile per image
                    tiles = train_images[idx].float()
                else:
                    owners = train_meta.owner[idx]
                    tiles = torch.stack([dataset[int(o)][0][int(j - first[o])] for j, o in zip(idx, owners)])
                return self.extractor.tokens(tiles.to(self.device))

        return _ExpertData(task, name, rate, len(train_idx), len(train_meta.owner), len(cal_idx), train_images, cal_images,
                           train_meta, tokens, routing, batch_features)

    def _finish_expert(self, d: "_ExpertData", report: TrainReport, classes: list[str], step: int,
                       source: dict[str, Any] | None) -> TaskInfo:
        """After training: the expert's patch memory, router prototype and calibrated threshold."""
        train_tokens = d.tokens
        if self.inspector.memory is not None:
            if train_tokens is None:
                train_tokens = self.stream_features(d.train_images)[0]
            self.inspector.memory.add_task(d.task, train_tokens)
        cal_tokens, cal_routing, cal_meta = self.stream_features(d.cal_images) if d.n_cal else (None, None, None)
        self.router.add_task(d.task, d.routing)  # without the held-out images first: they measure confusability
        self.inspector.place()
        if cal_tokens is not None:
            tokens, meta, where = cal_tokens, cal_meta, "held-out normal training images"
        else:
            tokens = train_tokens if train_tokens is not None else self.stream_features(d.train_images)[0]
            meta, where = d.train_meta, "training images (none held out; optimistic)"
        info = self._calibrate(d.task, d.name, classes, d.n_train, tokens, meta, where, report, d.rate)
        if cal_tokens is not None:
            info.confusability = self._confusability(d, cal_tokens, cal_routing, cal_meta)
            self.router.remove_task(d.task)  # the prototype of all its images, as the spec builds it
            self.router.add_task(d.task, torch.cat([d.routing, cal_routing]))
            info.calibration["unknown_distance"] = self.router.unknown_threshold(d.task)
            self.inspector.place()
        info.n_calibration, info.step, info.source = d.n_cal, step, dict(source or {})
        info.n_tiles = d.n_train_tiles + (len(cal_meta.owner) if cal_meta is not None else 0)
        return info

    @torch.no_grad()
    def _confusability(self, d: "_ExpertData", tokens, routing: torch.Tensor, meta: Prepared) -> dict[str, Any]:
        """Route product `d`'s held-out normals (tiles' tokens, routing features, owners) among every product
        learned so far, as they are and with one pasted defect covering 10 % of the image (image inputs only):
        the share routed to each product and the share whose routing was ambiguous. Logged when any goes astray."""
        tasks = self.router.task_ids
        names = {t.task_id: t.name for t in self.tasks} | {d.task: d.name}
        cases = {"good": (torch.as_tensor(np.asarray(tokens)), routing, meta)}
        if not isinstance(d.cal_images, torch.Tensor):
            from .data.batch import as_rgb
            from .routing_stress import paste_area_defect
            rng = np.random.default_rng(self.config.train.seed * 7919 + d.task)
            arrays = [np.asarray(as_rgb(im)) for im in d.cal_images]
            pasted = [paste_area_defect(a, 0.10, rng, donor=arrays[(i + 1) % len(arrays)]) for i, a in enumerate(arrays)]
            cal_tokens, cal_routing, cal_meta = self.stream_features(pasted)
            cases["defect"] = (torch.as_tensor(np.asarray(cal_tokens)), cal_routing, cal_meta)
        out: dict[str, Any] = {"n": meta.n_images, "among": [names.get(t, str(t)) for t in tasks]}
        for case, (tok, rout, m) in cases.items():
            routed = self.inspector.route(tok.to(self.device).float(), rout.to(self.device).float(),
                                          m.owner.to(self.device), m.n_images, tasks)
            chosen = torch.tensor(tasks)[routed.index.cpu()]
            out[case] = {names.get(t, str(t)): float((chosen == t).double().mean()) for t in tasks if (chosen == t).any()}
            out.setdefault("ambiguous", {})[case] = float(routed.ambiguous.double().mean())
            astray = {k: v for k, v in out[case].items() if k != d.name}
            if astray:
                log.warning("product %s: %.0f %% of its held-out %s parts route to other products: %s", d.name,
                            100 * sum(astray.values()), "good" if case == "good" else "pasted-defect",
                            ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(astray.items(), key=lambda x: -x[1])))
        return out

    def _calibrate(self, task: int, name: str, classes: list[str], n_train: int, tokens, meta: Prepared, source: str,
                   report: TrainReport, rate: float) -> TaskInfo:
        """Decision threshold from the scores of normal tiles' tokens (M, H, W, D) (`meta`: their owners and
        layouts): held-out normal training images or, without any, the training images (`source` says which)."""
        if self.inspector.memory is not None:
            self._set_memory_norm(task, tokens)
        scores, pixel_median, pixel_max = self._score_tokens(tokens, task, meta)
        threshold = conformal_threshold(scores.numpy(), rate)
        self.inspector.set_threshold(task, threshold.threshold)
        calibration = {"source": source, **calibration_record(threshold, scores.numpy()),
                       "unknown_distance": self.router.unknown_threshold(task),
                       "normal_pixel_median": pixel_median, "normal_pixel_max": pixel_max, "history": []}
        if threshold.warning:
            log.warning("task %s: %s", name, threshold.warning)
        return TaskInfo(task_id=task, name=name, classes=classes, n_train=n_train, n_calibration=0,
                        threshold=threshold.threshold, calibration=calibration, train=report.to_dict())

    @torch.no_grad()
    def _set_memory_norm(self, task: int, tokens: torch.Tensor, batch_size: int = 64) -> None:
        """Standardise the flow NLL and the memory distance of `task` on normal tokens (N, H, W, D)."""
        nll, dist = [], []
        for t in token_chunks(tokens, batch_size):
            t = t.to(self.device)
            nll.append(self.flow(t, task).nll.cpu())
            dist.append(self.inspector.memory.distances(t, task).cpu())
        self.inspector.memory.set_norm(task, torch.cat(nll), torch.cat(dist))
        self.inspector.place()

    @torch.no_grad()
    def _score_tokens(self, tokens: torch.Tensor, task: int, prep: Prepared, batch_size: int = 64
                      ) -> tuple[torch.Tensor, float, float]:
        """Image scores (N,) of normal tiles' tokens (M, H, W, D) (`prep`: their owners, in image order, and
        layouts), and the median of the images' median pixel values and the largest pixel value; `batch_size`
        images at a time, so memory does not grow with the number of images."""
        scores, medians, peak = [], [], float("-inf")
        bounds = torch.searchsorted(prep.owner, torch.arange(prep.n_images + 1))  # each image's first tile
        for start in range(0, prep.n_images, batch_size):
            end = min(start + batch_size, prep.n_images)
            lo, hi = int(bounds[start]), int(bounds[end])
            patch = torch.cat([self.inspector.patch_scores(t.to(self.device), task).float()
                               for t in token_chunks(tokens[lo:hi], batch_size)])
            part = Prepared(prep.pixels, prep.owner[lo:hi] - start, prep.layouts[start:end])
            image, maps, _ = self.inspector.outputs(patch, part)
            scores.append(image.cpu())
            medians.append(maps.flatten(1).median(1).values.cpu())
            peak = max(peak, float(maps.max()))
        return torch.cat(scores), float(torch.cat(medians).median()), peak

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Images, task_ids: Sequence[int] | torch.Tensor | None = None,
                batch_size: int = 32, among: Sequence[int] | None = None) -> Prediction:
        """Score images. Without `task_ids` the router picks each image's task (task-agnostic), among the
        tasks `among` if given (e.g. those learned up to a step of the sequence), else among all.
        Images are loaded and scored `batch_size` at a time."""
        if not self.tasks:
            raise MoleflowError("the model has learned no task yet; call fit_task first")
        if task_ids is None and not self.config.router.enabled:
            raise MoleflowError("router.enabled is false (oracle mode): pass task_ids")
        ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        if ids is not None and len(ids) != len(images):
            raise MoleflowError(f"{len(ids)} task ids for {len(images)} images")
        parts = []
        with self._autocast():
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                parts.append(self.inspector.inspect(self.prepare(chunk),
                                                    None if ids is None else ids[start:start + batch_size],
                                                    None if among is None else list(among), batch_size))
        return concat_inspections(parts)

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
        from datetime import datetime, timezone

        info = self.task_by_name(name)
        old = dict(info.calibration)
        rate = float(false_alarm_rate if false_alarm_rate is not None else old.get("false_alarm_rate",
                                                                                  self.config.score.false_alarm_rate))
        if not 0.0 < rate < 1.0:
            raise MoleflowError(f"false-alarm rate {rate}: must be between 0 and 1 (e.g. 0.01 for 1 %)")
        if len(normals) == 0:
            raise MoleflowError(f"no good images were given to calibrate {name}")
        scores, distances = [], []
        for start in range(0, len(normals), batch_size):
            # routed among this product alone: one backbone pass gives its expert's scores and the distances
            # to its prototype (tiles of an image grouped, as in routing)
            out = self.inspector.inspect(self.prepare(normals[start:start + batch_size]), None, [info.task_id],
                                         batch_size)
            scores.append(out.scores.double())
            distances.append(out.router_distance)
        new_scores, new_distances = torch.cat(scores).numpy(), torch.cat(distances)
        pooled = new_scores if replace else np.concatenate([np.asarray(old.get("scores", []), dtype=np.float64),
                                                            new_scores])
        threshold = conformal_threshold(pooled, rate)
        unknown = self.router.unknown_threshold(info.task_id)
        if len(new_distances) >= 10:
            quantile = float(torch.quantile(new_distances, self.config.router.unknown_quantile))
            unknown = quantile * self.config.router.unknown_margin
        history_entry = {k: old.get(k) for k in ("rule", "n", "false_alarm_rate", "supported_rate",
                                                  "false_alarm_interval", "source", "unknown_distance")}
        history_entry.update({"threshold": info.threshold,
                              "replaced_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
        self.inspector.set_threshold(info.task_id, threshold.threshold)
        mean, precision = self.router.prototype(info.task_id)
        self.router.set_prototype(info.task_id, mean, precision, unknown)
        source = (f"{len(new_scores)} good parts given to `moleflow calibrate`" if replace else
                  f"{old.get('source', 'held-out normal training images')} + {len(new_scores)} good parts given to "
                  "`moleflow calibrate`")
        info.calibration = {**old, "source": source, **calibration_record(threshold, pooled),
                            "unknown_distance": unknown, "history": list(old.get("history", [])) + [history_entry]}
        info.threshold = threshold.threshold
        info.n_calibration = threshold.n
        if threshold.warning:
            log.warning("task %s: %s", name, threshold.warning)
        return info

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


def concat_inspections(parts: list[Inspection]) -> Inspection:
    """One `Inspection` of the images of several, in order."""
    if len(parts) == 1:
        return parts[0]
    patch = [p.patch_scores for p in parts]
    return Inspection(
        scores=torch.cat([p.scores for p in parts]), maps=torch.cat([p.maps for p in parts]),
        patch_scores=torch.cat(patch) if all(isinstance(p, torch.Tensor) for p in patch)
        else [m for p in patch for m in p],
        task_ids=torch.cat([p.task_ids for p in parts]), known=torch.cat([p.known for p in parts]),
        anomalous=torch.cat([p.anomalous for p in parts]),
        router_distance=torch.cat([p.router_distance for p in parts]),
        thresholds=torch.cat([p.thresholds for p in parts]), route_margin=torch.cat([p.route_margin for p in parts]),
        ambiguous=torch.cat([p.ambiguous for p in parts]), alternatives=[a for p in parts for a in p.alternatives])


def learn_expert_remotely(package: dict[str, Any], job: _AloneJob) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Ray task: rebuild the model's shared part from `package` (config, backbone hash, frozen shared tensors,
    base tasks), learn `job`'s expert exactly as `MoleFlow._learn_alone` does, and return its TaskInfo (as a dict)
    and its tensors (expert and calibration parts)."""
    torch.set_num_threads(int(package["threads"]))
    model = MoleFlow(Config.from_dict(package["config"]), device=package["device"])
    if model.extractor.weights_sha256 != package["backbone_sha256"]:
        raise MoleflowError(f"this Ray worker's backbone weights ({model.extractor.weights_source}) differ from the "
                            "driver's; every node needs the same weights file at the same path")
    model.flow.base_tasks = list(package["base_tasks"])
    model.inspector.load_state_dict(package["shared"], strict=False)
    missing = [k for k in model.inspector.model_state() if k not in package["shared"]]
    if missing:
        raise MoleflowError(f"the shared state sent to the worker lacks {missing[:3]}")
    model.inspector.add_expert(job.task, base=False)
    info = model._learn_alone(job, False, package["source"])
    return asdict(info), {k: v.detach().cpu() for k, v in model.inspector.model_state().items()
                          if key_owner(k) == job.task}
