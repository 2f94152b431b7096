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
    """AdamP as in the reference (betas 0.9/0.999, delta 0.1, wd_ratio 0.1); no silent fallback."""
    if cfg.optimizer == "adamp":
        try:
            from adamp import AdamP
        except ImportError:
            raise MoleflowError("the optimizer AdamP needs the package adamp: pip install adamp==0.3.0 "
                                "(or choose train.optimizer=adamw explicitly)") from None
        return AdamP(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, delta=0.1,
                     wd_ratio=0.1, nesterov=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def batch_order(n: int, cfg: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled batches of indices into the n training images."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(cfg.batch_size))
    if cfg.drop_last and len(batches) > 1 and len(batches[-1]) < cfg.batch_size:
        batches.pop()
    return batches


def fit_task(model: ExpertFlow, task: int, n_samples: int, batch_features: BatchFeatures, cfg: TrainConfig,
             device: torch.device | str = "cpu", progress: bool = False) -> TrainReport:
    """Train task `task` (already added to `model`) on `n_samples` images served by `batch_features`."""
    from tqdm.auto import tqdm

    if n_samples < 1:
        raise MoleflowError(f"task {task} has no training images")
    params = model.set_trainable(task)
    optimizer = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + task)
    base = task == model.base_task
    model.train()
    epochs = task_epochs(n_samples, cfg)
    report = TrainReport(task=task, epochs=epochs, steps=0, skipped_batches=0, seconds=0.0,
                         optimizer=type(optimizer).__name__, trainable_parameters=sum(p.numel() for p in params))
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"task {task}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        lr = learning_rate(epoch, base, cfg, epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, count = 0.0, 0
        for indices in batch_order(n_samples, cfg, generator):
            tokens = batch_features(indices).to(device, non_blocking=True)
            out = model(tokens, task)
            loss = tail_aware_loss(out.nll, cfg.tail_weight, cfg.tail_ratio) + logdet_regularisation(
                out.logdet, cfg.lambda_logdet)
            if not torch.isfinite(loss) or loss.item() > cfg.max_loss:
                report.skipped_batches += 1
                log.warning("task %d epoch %d: skipped a batch with loss %s", task, epoch, loss.item())
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            report.steps += 1
            total += loss.item() * len(indices)
            count += len(indices)
        report.epoch_losses.append(total / count if count else float("nan"))
        bar.set_postfix(loss=f"{report.epoch_losses[-1]:.3f}", lr=f"{lr:.2e}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    report.seconds = time.perf_counter() - start
    if report.skipped_batches:
        log.warning("task %d: %d batches skipped (non-finite or > %g loss)", task, report.skipped_batches,
                    cfg.max_loss)
    return report
