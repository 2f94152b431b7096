"""How a learning step is learned into an Inspector: experts, patch memories, prototypes, thresholds.

    learner = Learner(FeatureSource.of(inspector), tasks, progress=False, source=None)
    new = learner.fit_steps([{"a": images_a, "b": images_b}, {"c": images_c}], rates={"c": 0.01})
    learner.recalibrate(tasks[0], more_good_images)          # a new threshold, no retraining

Per product: its images split into training and held-out calibration images (seeded by its task id), training
features from the frozen backbone (cached in memory or memory-mapped, or computed per batch), its expert fitted
(trainer.py: the first step's products side by side with the shared flow, every later one alone, on Ray with
`parallel`), its patch memory and the memory's standardisation, its router prototype, its conformal threshold
(calibration.py) and how confusable its held-out parts are with the products learned before. Every tensor
change goes through the Inspector's own methods (`add_expert`, `set_prototype`, `add_memory`, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .calibration import calibration_record, calibration_split, conformal_threshold
from .config import Config
from .data.batch import Images, Prepared, PreparedDataset, as_rgb
from .data.groups import group_holdout, image_groups
from .defect_moves import move_moment, move_sample, painted_copies
from .errors import MoleflowError
from .features import FeatureSource, token_chunks
from .inspector import Inspector
from .parallel import Parallel
from .pipeline import TorchBackend, inspect
from .router import holdout_routing
from .task_info import TaskInfo
from .trainer import ExpertJob, TrainReport, fit_experts, fit_task

log = logging.getLogger(__name__)

Plan = tuple[dict[str, Images], dict[str, list[str]], dict[str, float]]  # products, their classes, their rates


@dataclass
class ExpertTask:
    """One expert to learn on its own (after the shared flow is frozen): what `learn_expert_remotely` gets."""

    task: int
    name: str
    images: Any  # Images
    rate: float
    classes: list[str]
    step: int


@dataclass
class ExpertData:
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
    batch_features: Callable[[torch.Tensor], torch.Tensor]  # indices (B,) -> tokens (B, H, W, D)
    # {"held_out_by": "image"}, or "group" with "held_out_groups" and "groups": whole parts held out (data/groups.py)
    holdout: dict[str, Any] = field(default_factory=lambda: {"held_out_by": "image"})


def subset(images: Images, index: torch.Tensor) -> Images:
    """The images at `index` (sorted), of a tensor or a list."""
    return images[index] if isinstance(images, torch.Tensor) else [images[i] for i in index.tolist()]


def as_list(images: Images) -> list:
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0))
    return list(images)


def next_step(tasks: list[TaskInfo]) -> int:
    """The number of the next learning step after `tasks` (0 for a new model)."""
    return max((t.step for t in tasks), default=-1) + 1


def calibration_holdout(config: Config, task: int, n: int, rate: float, groups: Sequence[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (training, calibration) of task `task`'s n images: the held-out share sized by the
    false-alarm `rate` (`calibration_split`), drawn with a generator seeded by the task id. With `groups` (one label
    per image, `data.groups.image_groups`) whole groups are held out, at least that many images
    (`data.groups.group_holdout`; one by one when a group is too large for it)."""
    gen = torch.Generator().manual_seed(config.train.seed * 7919 + task)
    score_cfg = config.score
    n_cal = calibration_split(n, rate, score_cfg.calibration_fraction, score_cfg.calibration_keep_train)
    cal = group_holdout(groups, n_cal, gen) if groups is not None else None
    if cal is not None:
        keep = torch.ones(n, dtype=torch.bool)
        keep[cal] = False
        return torch.nonzero(keep).flatten(), cal
    perm = torch.randperm(n, generator=gen)
    return perm[n_cal:].sort().values, perm[:n_cal].sort().values


class Learner:
    """Learns steps into `features.inspector`; `tasks` are those learned before (read only: the caller keeps the
    list and adds what `fit_steps` returns). `progress`: progress bars; `source`: where the images came from."""

    def __init__(self, features: FeatureSource, tasks: list[TaskInfo], progress: bool = False,
                 source: dict[str, Any] | None = None) -> None:
        self.features, self.tasks, self.progress = features, tasks, progress
        self.source = dict(source or {})
        self.inspector: Inspector = features.inspector
        self.config, self.device = self.inspector.config, self.inspector.device

    # ------------------------------------------------------------------------------ steps
    def fit_steps(self, steps: list[dict[str, Images]], classes: dict[str, list[str]] | None = None,
                  false_alarm_rate: float | None = None, rates: dict[str, float] | None = None,
                  parallel: Parallel | None = None) -> list[list[TaskInfo]]:
        """Learn several steps one after another (see `MoleFlow.fit_step`); returns the new tasks of each step,
        each in task order. On any error the Inspector is left as it was."""
        plans = self._plans(steps, dict(classes or {}), dict(rates or {}), false_alarm_rate, parallel)
        first = not self.inspector.flow.base_tasks  # the first step trains the shared flow
        new: list[int] = []
        try:
            out = self._learn(plans, first, new, parallel)
        except BaseException:
            self.inspector.undo_experts(new, first)  # leave the model as it was
            raise
        for infos in out:
            infos.sort(key=lambda info: info.task_id)
        self._record_draws([info for infos in out for info in infos])
        return out

    @torch.no_grad()
    def _record_draws(self, learned: list[TaskInfo]) -> None:
        """The other direction of confusability: how much of every other product's kept held-out normals each
        newly learned product draws, all products learned now (`router.holdout_routing`). Recorded as its
        `confusability["draws"]` ({product: share}, only those it draws) and logged: learning a look-alike product
        moves an older product's parts, which the older product's own record, made before, cannot show."""
        names = {t.task_id: t.name for t in [*self.tasks, *learned]}
        now = holdout_routing(self.inspector.router, names, self.config.router.ambiguity_margin)
        for info in learned:
            draws = {other: r["routed"][info.name] for other, r in now.items()
                     if other != info.name and r["routed"].get(info.name)}
            if not info.confusability and not draws:
                continue
            info.confusability["draws"] = draws
            if draws:
                log.warning("product %s draws held-out good parts of other products: %s", info.name,
                            ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(draws.items(), key=lambda x: -x[1])))

    def _plans(self, steps: list[dict[str, Images]], classes: dict[str, list[str]], rates: dict[str, float],
               false_alarm_rate: float | None, parallel: Parallel | None) -> list[Plan]:
        """Each step's plan (`_plan_step`), its names checked against each other and the tasks learned."""
        default = self.config.score.false_alarm_rate if false_alarm_rate is None else float(false_alarm_rate)
        if parallel is not None and not self.config.model.freeze_base:
            raise MoleflowError("parallel experts need model.freeze_base=true: with a shared flow that keeps "
                                "learning, every step depends on the one before")
        plans = [self._plan_step(products, classes, rates, default) for products in steps]
        names = [name for products, _, _ in plans for name in products]
        for name in names:
            if any(t.name == name for t in self.tasks) or names.count(name) > 1:
                raise MoleflowError(f"a task named {name!r} is already learned or given twice; remove it first or "
                                    "choose another name")
        return plans

    def _plan_step(self, products: dict[str, Images], classes: dict[str, list[str]], rates: dict[str, float],
                   default: float) -> Plan:
        """A step's products, class names and rates, as experts: pooled into one with `model.experts="task"`."""
        if not products:
            raise MoleflowError("a learning step needs at least one product")
        if self.config.model.experts == "task" and len(products) > 1:  # one expert for the whole step (§12.14)
            name = "+".join(products)
            pooled = [image for images in products.values() for image in as_list(images)]
            return ({name: pooled}, {name: [c for p in products for c in classes.get(p, [p])]},
                    {name: min(float(rates.get(p, default)) for p in products)})  # the strictest of its products
        own = {name: float(rates.get(name, default)) for name in products}
        for name, rate in own.items():
            if not 0.0 < rate < 1.0:
                raise MoleflowError(f"false-alarm rate {rate} for {name}: must be between 0 and 1 (e.g. 0.01)")
        return dict(products), {name: classes.get(name, [name]) for name in products}, own

    def _learn(self, plans: list[Plan], first: bool, new: list[int], parallel: Parallel | None
               ) -> list[list[TaskInfo]]:
        """Add every plan's experts (their ids appended to `new` as they are made) and learn them."""
        together = first and self.config.train.first_step != "first_only"  # the first step's products side by side
        start = next_step(self.tasks)
        out: list[list[TaskInfo]] = [[] for _ in plans]
        alone: list[ExpertTask] = []  # experts trained alone, after the shared flow is frozen
        for k, (products, owned, own_rates) in enumerate(plans):
            for i, (name, images) in enumerate(products.items()):
                base = first and k == 0 and (together or i == 0)
                task = self.inspector.add_expert(base=base)
                new.append(task)
                job = ExpertTask(task, name, images, own_rates[name], owned.get(name, [name]), start + k)
                if base and together:
                    continue
                if base:  # the first product of a first_only first step: trains the shared flow, alone
                    out[k].append(self.learn_alone(job))
                else:
                    alone.append(job)
        if together:  # the first step's products train the shared flow side by side
            products, owned, own_rates = plans[0]
            data = [self._expert_data(task, name, images, own_rates[name])
                    for task, (name, images) in zip(new, products.items())]
            reports = fit_experts(self.inspector.flow,
                                  [ExpertJob(d.task, d.n_train_tiles, d.batch_features) for d in data],
                                  self.config.train, self.device, self.progress)
            out[0] = [self._finish_expert(d, r, owned.get(d.name, [d.name]), start) for d, r in zip(data, reports)]
        if parallel is not None and alone:
            infos = self._learn_on_ray(alone, parallel)
        else:
            infos = [self.learn_alone(job) for job in alone]
        for job, info in zip(alone, infos):
            out[job.step - start].append(info)
        return out

    def learn_alone(self, job: ExpertTask) -> TaskInfo:
        """Train one expert (already added) on its own, then its memory, prototype and threshold."""
        data = self._expert_data(job.task, job.name, job.images, job.rate)
        report = fit_task(self.inspector.flow, job.task, data.n_train_tiles, data.batch_features, self.config.train,
                          self.device, self.progress)
        return self._finish_expert(data, report, job.classes, job.step)

    def _learn_on_ray(self, jobs: list[ExpertTask], spec: Parallel) -> list[TaskInfo]:
        """Train experts (already added, shared flow frozen) as Ray tasks and install what they learned."""
        from .parallel import ray_session, run_remote

        package = {"config": self.config.to_dict(), "backbone_sha256": self.inspector.extractor.weights_sha256,
                   "base_tasks": list(self.inspector.flow.base_tasks), "shared": self.inspector.shared_state(),
                   "threads": spec.cpus_per_task, "device": spec.device, "source": self.source}
        with ray_session(spec) as ray:
            ref = ray.put(package)
            results = run_remote(ray, learn_expert_remotely, [(ref, job) for job in jobs], spec,
                                 [f"expert of {job.name}" for job in jobs])
        infos = []
        for job, (info, state) in zip(jobs, results):
            self.inspector.install_expert(job.task, state)
            infos.append(TaskInfo(**info))
        return infos

    # ------------------------------------------------------------------------------ one expert
    def _expert_data(self, task: int, name: str, images: Images, rate: float) -> ExpertData:
        """Split a product's images into training and calibration (seeded by its task id) and compute the
        training features (cached, or served from the backbone on the fly), streaming the images."""
        n = len(images)
        if n == 0:
            raise MoleflowError(f"no images were given for {name}")
        groups = image_groups(images, self.config.data.group_file)
        train_idx, cal_idx = calibration_holdout(self.config, task, n, rate, groups)
        holdout: dict[str, Any] = {"held_out_by": "image"}
        if groups is not None and len(cal_idx):
            held = {groups[i] for i in cal_idx.tolist()}
            whole = not held & {groups[i] for i in train_idx.tolist()}
            if whole:
                holdout = {"held_out_by": "group", "held_out_groups": len(held), "groups": len(set(groups))}
            else:
                log.info("product %s: a group of images is too large to hold whole groups out for calibration; "
                         "held out image by image", name)
        train_images, cal_images = subset(images, train_idx), subset(images, cal_idx)
        tokens, routing, train_meta = self.features.stream(train_images, keep_tokens=self.config.train.feature_cache)
        if tokens is not None:
            def batch_features(idx: torch.Tensor) -> torch.Tensor:
                return torch.as_tensor(tokens[idx.numpy()] if isinstance(tokens, np.memmap) else tokens[idx])
        else:
            batch_features = self._backbone_batches(train_images, train_meta)
        return ExpertData(task, name, rate, len(train_idx), len(train_meta.owner), len(cal_idx), train_images,
                          cal_images, train_meta, tokens, routing, batch_features, holdout)

    def _backbone_batches(self, images: Images, meta: Prepared) -> Callable[[torch.Tensor], torch.Tensor]:
        """Without a feature cache: tile indices (B,) -> their tokens (B, H, W, D), loading the batch's images."""
        dataset = PreparedDataset(images, self.features.transform, self.config.data.tiling)
        first = torch.searchsorted(meta.owner, torch.arange(len(meta.layouts)))  # each image's first tile

        def batch_features(idx: torch.Tensor) -> torch.Tensor:
            if isinstance(images, torch.Tensor):  # preprocessed already, one tile per image
                tiles = images[idx].float()
            else:
                owners = meta.owner[idx]
                tiles = torch.stack([dataset[int(o)][0][int(j - first[o])] for j, o in zip(idx, owners)])
            return self.inspector.extractor.run(tiles.to(self.device))

        return batch_features

    def _finish_expert(self, d: ExpertData, report: TrainReport, classes: list[str], step: int) -> TaskInfo:
        """After training: the expert's patch memory, router prototype and calibrated threshold."""
        train_tokens = d.tokens
        if self.inspector.memory is not None:
            if train_tokens is None:
                train_tokens = self.features.stream(d.train_images)[0]
            self.inspector.add_memory(d.task, train_tokens)
        cal_tokens, cal_routing, cal_meta = self.features.stream(d.cal_images) if d.n_cal else (None, None, None)
        self.inspector.set_prototype(d.task, d.routing)  # without the held-out images first: they measure confusability
        without = [v.clone() for v in self.inspector.router.prototype(d.task)] if cal_tokens is not None else None
        if self.config.router.defect_weight and isinstance(d.train_images, torch.Tensor):
            log.info("product %s was given as tensors, not images: no defect moves are measured for it, and the pooled "
                     "routing metric uses the other products' (router.defect_weight)", d.name)
        elif self.config.router.defect_weight:
            self._measure_defect_moves(d)
        if cal_tokens is not None:
            tokens, meta, where = cal_tokens, cal_meta, "held-out normal training images"
        else:
            tokens = train_tokens if train_tokens is not None else self.features.stream(d.train_images)[0]
            meta, where = d.train_meta, "training images (none held out; optimistic)"
        info = self._calibrate(d.task, d.name, classes, d.n_train, tokens, meta, where, report, d.rate)
        if cal_tokens is not None:
            info.confusability = self._confusability(d, cal_tokens, cal_routing, cal_meta)
            self.inspector.set_prototype(d.task, torch.cat([d.routing, cal_routing]))  # of all its images (spec)
            # kept to route them again among the products learned later (`router.holdout_routing`), never trained on
            self.inspector.router.set_holdout(d.task, cal_routing, cal_meta.owner, *without)
            info.calibration["unknown_distance"] = self.inspector.router.unknown_threshold(d.task)
        info.n_calibration, info.step, info.source = d.n_cal, step, dict(self.source)
        info.calibration.update(d.holdout)
        info.n_tiles = d.n_train_tiles + (len(cal_meta.owner) if cal_meta is not None else 0)
        return info

    @torch.no_grad()
    def _measure_defect_moves(self, d: ExpertData) -> None:
        """How painted defects move product `d`'s routing feature, from some of its training images (`defect_moves`):
        kept in the router for the pooled metric (`router.defect_weight`). Image inputs only."""
        index = move_sample(d.n_train, self.config.train.seed * 7919 + d.task)
        arrays = [np.asarray(as_rgb(im)) for im in as_list(subset(d.train_images, index))]
        rng = np.random.default_rng(self.config.train.seed * 7919 + d.task + 1)
        moved = self.features.stream(painted_copies(arrays, rng), keep_tokens=False)[1]
        clean = d.routing[torch.isin(d.train_meta.owner, index)]
        self.inspector.router.set_defect_moves(d.task, move_moment(clean, moved))

    # ------------------------------------------------------------------------------ calibration
    @torch.no_grad()
    def _confusability(self, d: ExpertData, tokens, routing: torch.Tensor, meta: Prepared) -> dict[str, Any]:
        """Route product `d`'s held-out normals (tiles' tokens, routing features, owners) among every product
        learned so far, as they are and with one pasted defect covering 10 % of the image (image inputs only):
        the share routed to each product and the share whose routing was ambiguous. Logged when any goes astray."""
        tasks = self.inspector.router.task_ids
        names = {t.task_id: t.name for t in self.tasks} | {d.task: d.name}
        cases = {"good": (torch.as_tensor(np.asarray(tokens)), routing, meta)}
        if not isinstance(d.cal_images, torch.Tensor):
            from .routing_stress import paste_area_defect
            rng = np.random.default_rng(self.config.train.seed * 7919 + d.task)
            arrays = [np.asarray(as_rgb(im)) for im in d.cal_images]
            pasted = [paste_area_defect(a, 0.10, rng, donor=arrays[(i + 1) % len(arrays)]) for i, a in enumerate(arrays)]
            cal_tokens, cal_routing, cal_meta = self.features.stream(pasted)
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
        patch = None
        if self.inspector.memory is not None:  # one flow pass: standardise on the scores, then score with them
            nll, distance = self.standardise_memory(task, tokens)
            patch = self.inspector.memory.standardised_sum(nll, distance, task).float()
        scores, pixel_median, pixel_max = self._score_tokens(tokens, task, meta, patch=patch)
        threshold = conformal_threshold(scores.numpy(), rate)
        self.inspector.set_threshold(task, threshold.threshold)
        calibration = {"source": source, **calibration_record(threshold, scores.numpy()),
                       "unknown_distance": self.inspector.router.unknown_threshold(task),
                       "normal_pixel_median": pixel_median, "normal_pixel_max": pixel_max, "history": []}
        if threshold.warning:
            log.warning("task %s: %s", name, threshold.warning)
        return TaskInfo(task_id=task, name=name, classes=classes, n_train=n_train, n_calibration=0,
                        threshold=threshold.threshold, calibration=calibration, train=report.to_dict())

    @torch.no_grad()
    def standardise_memory(self, task: int, tokens: torch.Tensor, batch_size: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardise `task`'s flow NLL and memory distance on normal tokens (M, H, W, D); returns both (M, H, W)
        on the CPU, so that the caller can score the same tokens without another pass."""
        nll, dist = [], []
        for t in token_chunks(tokens, batch_size):
            t = t.to(self.device)
            nll.append(self.inspector.flow(t, task).nll.cpu())
            dist.append(self.inspector.memory.distances(t, task).cpu())
        nll, dist = torch.cat(nll), torch.cat(dist)
        self.inspector.set_memory_norm(task, nll, dist)
        return nll, dist

    @torch.no_grad()
    def _score_tokens(self, tokens: torch.Tensor, task: int, prep: Prepared, batch_size: int = 64,
                      patch: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
        """Image scores (N,) of normal tiles' tokens (M, H, W, D) (`prep`: their owners, in image order, and
        layouts), and the median of the images' median pixel values and the largest pixel value; `batch_size`
        images at a time, so memory does not grow with the number of images. `patch` (M, H, W): the tiles'
        patch scores when already computed."""
        scores, medians, peak = [], [], float("-inf")
        bounds = torch.searchsorted(prep.owner, torch.arange(prep.n_images + 1))  # each image's first tile
        for start in range(0, prep.n_images, batch_size):
            end = min(start + batch_size, prep.n_images)
            lo, hi = int(bounds[start]), int(bounds[end])
            if patch is None:
                part_patch = torch.cat([self.inspector.patch_scores(t.to(self.device), task).float()
                                        for t in token_chunks(tokens[lo:hi], batch_size)])
            else:
                part_patch = patch[lo:hi].to(self.device)
            part = Prepared(prep.pixels, prep.owner[lo:hi] - start, prep.layouts[start:end])
            image, maps, _ = self.inspector.outputs(part_patch, part)
            scores.append(image.cpu())
            medians.append(maps.flatten(1).median(1).values.cpu())
            peak = max(peak, float(maps.max()))
        return torch.cat(scores), float(torch.cat(medians).median()), peak

    @torch.no_grad()
    def recalibrate(self, info: TaskInfo, normals: Images, false_alarm_rate: float | None = None,
                    replace: bool = False, batch_size: int = 32) -> TaskInfo:
        """Re-calibrate task `info`'s decision threshold and unknown-product limit from more good parts (see
        `MoleFlow.recalibrate`); `info` is updated and returned."""
        from datetime import datetime, timezone

        old = dict(info.calibration)
        rate = float(false_alarm_rate if false_alarm_rate is not None else old.get("false_alarm_rate",
                                                                                  self.config.score.false_alarm_rate))
        if not 0.0 < rate < 1.0:
            raise MoleflowError(f"false-alarm rate {rate}: must be between 0 and 1 (e.g. 0.01 for 1 %)")
        if len(normals) == 0:
            raise MoleflowError(f"no good images were given to calibrate {info.name}")
        new_scores, new_distances = self._own_scores(info.task_id, normals, batch_size)
        pooled = new_scores if replace else np.concatenate([np.asarray(old.get("scores", []), dtype=np.float64),
                                                            new_scores])
        threshold = conformal_threshold(pooled, rate)
        unknown = self.inspector.router.unknown_threshold(info.task_id)
        if len(new_distances) >= 10:
            quantile = float(torch.quantile(new_distances, self.config.router.unknown_quantile))
            unknown = quantile * self.config.router.unknown_margin
        history_entry = {k: old.get(k) for k in ("rule", "n", "false_alarm_rate", "supported_rate",
                                                  "false_alarm_interval", "source", "unknown_distance")}
        history_entry.update({"threshold": info.threshold,
                              "replaced_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
        self.inspector.set_threshold(info.task_id, threshold.threshold)
        self.inspector.set_unknown_limit(info.task_id, unknown)
        source = (f"{len(new_scores)} good parts given to `moleflow calibrate`" if replace else
                  f"{old.get('source', 'held-out normal training images')} + {len(new_scores)} good parts given to "
                  "`moleflow calibrate`")
        info.calibration = {**old, "source": source, **calibration_record(threshold, pooled),
                            "unknown_distance": unknown, "history": list(old.get("history", [])) + [history_entry]}
        info.threshold = threshold.threshold
        info.n_calibration = threshold.n
        if threshold.warning:
            log.warning("task %s: %s", info.name, threshold.warning)
        return info

    def _own_scores(self, task: int, normals: Images, batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores (N,) float64 of good parts under task `task`'s expert and their distances (N,) to its
        prototype: routed among this product alone, one backbone pass gives both (tiles of an image grouped)."""
        backend = TorchBackend(self.inspector, batch_size)
        scores, distances = [], []
        for start in range(0, len(normals), batch_size):
            out = inspect(self.inspector, backend, self.features.prepare(normals[start:start + batch_size]),
                          None, [task])
            scores.append(out.scores.double())
            distances.append(out.router_distance)
        return torch.cat(scores).numpy(), torch.cat(distances)


def learn_expert_remotely(package: dict[str, Any], job: ExpertTask) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Ray task: rebuild the model's shared part from `package` (config, backbone hash, frozen shared tensors,
    base tasks), learn `job`'s expert exactly as `Learner.learn_alone` does, and return its TaskInfo (as a dict)
    and its tensors (expert and calibration parts)."""
    torch.set_num_threads(int(package["threads"]))
    inspector = Inspector(Config.from_dict(package["config"]), package["device"])
    if inspector.extractor.weights_sha256 != package["backbone_sha256"]:
        raise MoleflowError(f"this Ray worker's backbone weights ({inspector.extractor.weights_source}) differ from "
                            "the driver's; every node needs the same weights file at the same path")
    inspector.load_shared_state(list(package["base_tasks"]), package["shared"])
    inspector.add_expert(job.task, base=False)
    info = Learner(FeatureSource.of(inspector), [], source=package["source"]).learn_alone(job)
    return asdict(info), inspector.task_state(job.task)
