"""Fit one task of the continual sequence (spec §4): optimiser, schedule, clipping, skipped batches.

The trainer sees features, not images: `batch_features(indices)` returns the backbone tokens of those
training images, from a cache (computed once per task) or from the backbone on the fly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import TrainConfig
from .errors import MoleflowError
from .losses import logdet_regularisation, tail_aware_loss
from .model import ExpertFlow
from .nn.adamp import AdamP

log = logging.getLogger(__name__)

BatchFeatures = Callable[[torch.Tensor], torch.Tensor]  # indices (B,) -> tokens (B, H, W, D)


@dataclass
class TrainReport:
    """What happened while fitting one task."""

    task: int
    epochs: int
    steps: int
    skipped_batches: int
    seconds: float
    optimizer: str
    trainable_parameters: int
    epoch_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    """Optimiser steps in one epoch over n training images (the last partial batch counts unless drop_last)."""
    full, rest = divmod(n, cfg.batch_size)
    return full + (1 if rest and not (cfg.drop_last and full) else 0)


def task_epochs(n: int, cfg: TrainConfig) -> int:
    """Epochs a task of n images trains for: `epochs`, or more when that gives fewer than `min_steps` steps."""
    return max(cfg.epochs, math.ceil(cfg.min_steps / max(1, steps_per_epoch(n, cfg))))


def learning_rate(epoch: int, base_task: bool, cfg: TrainConfig, epochs: int | None = None) -> float:
    """Learning rate of `epoch` (0-based) of a run of `epochs` (default `cfg.epochs`). Cosine from lr to
    min_lr_ratio * lr over the run; tasks after the first start with a linear warm-up of `warmup_epochs`
    (lr/W, 2lr/W, ...) and then run the cosine from epoch W on (spec §4)."""
    epochs = cfg.epochs if epochs is None else epochs
    lr_min = cfg.lr * cfg.min_lr_ratio
    step = epoch
    if not base_task and cfg.warmup_epochs > 0:
        if epoch < cfg.warmup_epochs:
            return cfg.lr * (epoch + 1) / cfg.warmup_epochs
        step = epoch - cfg.warmup_epochs
    return lr_min + (cfg.lr - lr_min) * (1 + math.cos(math.pi * step / epochs)) / 2


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamP as in the reference (betas 0.9/0.999, delta 0.1, wd_ratio 0.1; nn/adamp.py, the `adamp` package's
    update for many tensors at once), or AdamW when asked for explicitly."""
    if cfg.optimizer == "adamp":
        return AdamP(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, delta=0.1, wd_ratio=0.1)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def batch_order(n: int, cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled batches of indices into the n training images."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(cfg.batch_size))
    if cfg.drop_last and len(batches) > 1 and len(batches[-1]) < cfg.batch_size:
        batches.pop()
    return batches


def step_window(grid: tuple[int, int], share: float, generator: torch.Generator) -> tuple[slice, slice] | None:
    """A random window (rows, columns) of the token grid (H, W) for one optimiser step, drawn from `generator`:
    a side of `share` of the grid's (at least 3), placed so that every token lies in it equally often (the start
    is uniform over every placement that overlaps the grid, and the window is cut at the grid's edge: windows
    kept inside the grid would train the edge tokens up to side times less often than the middle ones);
    None (the whole grid) when `share` is 1."""
    if share >= 1.0:
        return None
    window = []
    for n in grid:
        side = min(n, max(3, round(n * share)))
        start = int(torch.randint(n + side - 1, (1,), generator=generator)) - (side - 1)
        window.append(slice(max(0, start), min(n, start + side)))
    return window[0], window[1]


@dataclass
class ExpertJob:
    """One expert to train: its task id, its number of training images, and their features."""

    task: int
    n_samples: int
    batch_features: BatchFeatures


def fit_task(model: ExpertFlow, task: int, n_samples: int, batch_features: BatchFeatures, cfg: TrainConfig,
             device: torch.device | str = "cpu", progress: bool = False) -> TrainReport:
    """Train task `task` (already added to `model`) on `n_samples` images served by `batch_features`."""
    return fit_experts(model, [ExpertJob(task, n_samples, batch_features)], cfg, device, progress)[0]


def _schedule(job: ExpertJob, cfg: TrainConfig, epochs: int) -> list[tuple[int, torch.Tensor]]:
    """(epoch, indices) of every batch `job` trains on, in order: `epochs` shuffled epochs, drawn from the job's
    own seeded generator (so an expert sees the same batches alone or trained beside others)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + job.task)
    return [(epoch, indices) for epoch in range(epochs) for indices in batch_order(job.n_samples, cfg, generator)]


def job_epochs(jobs: list[ExpertJob], cfg: TrainConfig, base: bool) -> list[int]:
    """Epochs of each job: its own `task_epochs`; with `train.first_step="balanced"` a base step of several
    products gives every product as many optimiser steps as the one with the most (smaller ones repeat epochs)."""
    epochs = [task_epochs(job.n_samples, cfg) for job in jobs]
    if base and len(jobs) > 1 and cfg.first_step == "balanced":
        most = max(e * steps_per_epoch(job.n_samples, cfg) for e, job in zip(epochs, jobs))
        epochs = [max(e, math.ceil(most / steps_per_epoch(job.n_samples, cfg))) for e, job in zip(epochs, jobs)]
    return epochs


def fit_experts(model: ExpertFlow, jobs: list[ExpertJob], cfg: TrainConfig, device: torch.device | str = "cpu",
                progress: bool = False) -> list[TrainReport]:
    """Train several experts (already added to `model`) side by side, one report each.

    Every expert gets exactly the batches, epochs and learning-rate schedule it would get alone (`_schedule`;
    unless a first step asks for `train.first_step="balanced"`, `job_epochs`);
    their batches are interleaved evenly over the run (batch k of an expert with K batches sits at (k + 1/2) / K),
    one optimiser step per batch, updating that expert and, for base tasks, the shared weights. So the shared
    flow of a first step with several products learns from all of them, in proportion to their batches, while
    each product keeps its own adapter, LoRA, task bias and DIA. One job is plain single-task training.
    """
    from tqdm.auto import tqdm

    for job in jobs:
        if job.n_samples < 1:
            raise MoleflowError(f"task {job.task} has no training images")
    params = model.set_trainable([job.task for job in jobs])
    optimizer = make_optimizer(params, cfg)
    epochs_of = job_epochs(jobs, cfg, any(job.task in model.base_tasks for job in jobs))
    schedules = [_schedule(job, cfg, e) for job, e in zip(jobs, epochs_of)]
    order = sorted((((k + 0.5) / len(sched), j, k) for j, sched in enumerate(schedules) for k in range(len(sched))))
    windows = [torch.Generator().manual_seed(cfg.seed * 1_000_033 + job.task) for job in jobs]
    reports, sums = [], []
    for job, epochs in zip(jobs, epochs_of):
        reports.append(TrainReport(task=job.task, epochs=epochs, steps=0, skipped_batches=0, seconds=0.0,
                                   optimizer=type(optimizer).__name__,
                                   trainable_parameters=sum(p.numel() for p in params)))
        sums.append([[0.0, 0] for _ in range(epochs)])
    model.train()
    start = time.perf_counter()
    label = f"task {jobs[0].task}" if len(jobs) == 1 else f"tasks {'+'.join(str(j.task) for j in jobs)}"
    for _, j, k in tqdm(order, desc=label, unit="batch", disable=not progress, leave=False):
        job, report = jobs[j], reports[j]
        epoch, indices = schedules[j][k]
        lr = learning_rate(epoch, job.task in model.base_tasks, cfg, report.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = job.batch_features(indices).to(device, non_blocking=True)
        out = model(tokens, job.task, step_window(tokens.shape[1:3], cfg.step_window, windows[j]))
        loss = tail_aware_loss(out.nll, cfg.tail_weight, cfg.tail_ratio) + logdet_regularisation(
            out.logdet, cfg.lambda_logdet)
        if not torch.isfinite(loss) or loss.item() > cfg.max_loss:
            report.skipped_batches += 1
            log.warning("task %d epoch %d: skipped a batch with loss %s", job.task, epoch, loss.item())
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        report.steps += 1
        sums[j][epoch][0] += loss.item() * len(indices)
        sums[j][epoch][1] += len(indices)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - start
    for report, per_epoch in zip(reports, sums):
        report.epoch_losses = [total / count if count else float("nan") for total, count in per_epoch]
        report.seconds = seconds  # the whole side-by-side run
        if report.skipped_batches:
            log.warning("task %d: %d batches skipped (non-finite or > %g loss)", report.task, report.skipped_batches,
                        cfg.max_loss)
    return reports
