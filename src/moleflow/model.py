"""ExpertFlow: the MoLE normalizing flow with shared weights and per-task experts (spec §2.4-2.9).

    tokens (B,H,W,D) -> + 2-D sinusoidal PE -> adapter_t -> spatial context mixer (shared)
                     -> coupling blocks (shared base + LoRA_t + bias_t) -> DIA_t -> z (B,H,W,D)
    nll per patch = 0.5 ||z||^2 + (D/2) log(2 pi) - log-det           (B,H,W)

Experts are keyed by task id. The active task is an argument of every call; nothing is global. A mixed
batch (row i of its own task) runs in one pass (`forward_rows`): the shared parts once, each expert's
weights gathered per row (`nn.lora.RowTasks`), so its cost does not grow with the tasks in it.
Freezing rules (spec §2.7.3): task 0 trains the shared weights and its own expert; later tasks train
their own expert only, so everything learned earlier stays bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .nn.adapters import (SoftLNAdapter, SpatialContextMixer, WhiteningAdapter, sinusoidal_position_encoding,
                          whitening_gamma_raw_init)
from .nn.coupling import CouplingBlock, PlainSubnet, ScaleContextSubnet
from .nn.dia import DIA
from .nn.lora import LoRALinear, RowTasks, Task, owned_by_all

SHARED_FLOW = "shared"
# patch tokens per flow pass on the CPU: a larger pass's activations spill out of the caches; at D = 152, passes
# of 4 images of 28 x 28 ran 30 % faster than passes of 32, at D = 32 passes of 20 images of 14 x 14 were the
# fastest (BENCHMARKS.md, "How cost grows")
CPU_TOKENS_PER_PASS = 4096


@dataclass
class FlowOutput:
    """Per-patch results of one forward pass."""

    nll: torch.Tensor  # (B, H, W) negative log-likelihood, the patch anomaly score
    logdet: torch.Tensor  # (B, H, W) total log-det (shared flow + DIA)
    z: torch.Tensor  # (B, H, W, D) latent


def _generator(seed: int, stream: int) -> torch.Generator:
    """A fresh generator per (seed, stream): task t's init never depends on what was built before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


class FlowStack(nn.Module):
    """The coupling blocks: (B,H,W,D) -> (B,H,W,D), log-det (B,H,W)."""

    def __init__(self, cfg: ModelConfig, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        half = dim // 2
        blocks = []
        for _ in range(cfg.num_coupling_blocks):
            if cfg.use_scale_context:
                subnet: nn.Module = ScaleContextSubnet(half, cfg.scale_context_kernel, cfg.scale_context_init,
                                                       cfg.scale_context_max, generator)
            else:
                subnet = PlainSubnet(half, generator)
            blocks.append(CouplingBlock(dim, cfg.clamp, subnet, generator))
        self.blocks = nn.ModuleList(blocks)

    def lora_layers(self) -> list[LoRALinear]:
        return [layer for block in self.blocks for layer in block.subnet.lora_layers()]

    def forward(self, x: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[:-1])
        for block in self.blocks:
            x, ld = block(x, task)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, task: int | None) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, task)
        return z


class ExpertFlow(nn.Module):
    """The MoLE flow over backbone tokens of dimension `dim`: shared coupling blocks plus one expert per
    task (LoRA, task biases, input adapter, DIA). Tasks are added with `add_task`. The detector that routes
    and scores images is `inspector.Inspector`; the user-facing object is `detector.MoleFlow`."""

    def __init__(self, cfg: ModelConfig, dim: int, seed: int = 0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"embed dim must be divisible by 4, got {dim}")
        self.cfg, self.dim, self.seed = cfg, dim, seed
        self.scm = (SpatialContextMixer(dim, cfg.spatial_context_kernel,
                                        residual=cfg.spatial_context_mode == "depthwise_residual")
                    if cfg.use_spatial_context else None)
        self.flows = nn.ModuleDict({SHARED_FLOW: FlowStack(cfg, dim, _generator(seed, 0))})
        self.adapters = nn.ModuleDict()
        self.dias = nn.ModuleDict()
        self.task_ids: list[int] = []
        # the tasks that trained the shared weights with them: the first one added, or every product of a first
        # learning step that holds several (`add_task(base=True)`); the shared weights are frozen after them
        self.base_tasks: list[int] = []

    # ------------------------------------------------------------------------------ tasks
    def add_task(self, task: int | None = None, base: bool | None = None) -> int:
        """Create the expert of a new task (LoRA, task biases, adapter, DIA) and return its id. `base`: the task
        trains the shared weights with its own (default: only when it is the first task)."""
        # a removed base task's id is never given again: `base_tasks` keeps it so that the shared weights stay frozen
        used = self.task_ids + self.base_tasks
        task = (max(used) + 1 if used else 0) if task is None else task
        if task in self.task_ids:
            raise ValueError(f"task {task} already exists")
        cfg, key = self.cfg, str(task)
        # new experts live where the model lives: any existing tensor tells where (with zero coupling blocks,
        # `dia_only`, the shared flow has none, so look at the whole model)
        reference = next(self.parameters(), None)
        if reference is None:
            reference = next(self.buffers(), None)
        gen = _generator(self.seed, task + 1)
        first = (not self.base_tasks) if base is None else base
        if cfg.task_separated and not first:
            self.flows[key] = FlowStack(cfg, self.dim, gen)
        for layer in self._flow(task).lora_layers():
            layer.add_task(task, cfg.lora_rank if cfg.use_lora else None, cfg.lora_alpha, cfg.use_task_bias, gen)
        if cfg.task_adapter == "whitening":
            self.adapters[key] = WhiteningAdapter(
                self.dim, whitening_gamma_raw_init(0 if first else 1, cfg.whitening_identity_init))
        elif cfg.task_adapter == "soft_ln":
            self.adapters[key] = SoftLNAdapter(self.dim, first_task=first, generator=gen)
        if cfg.dia_blocks > 0:
            self.dias[key] = DIA(self.dim, cfg.dia_blocks, cfg.dia_hidden_ratio, cfg.clamp, gen)
        # new tensors are made on the CPU in the default dtype; only a model elsewhere needs a move (moving the
        # whole flow per new expert made learning and loading T experts O(T^2))
        if reference is not None and (reference.device.type != "cpu" or reference.dtype != torch.get_default_dtype()):
            self.to(device=reference.device, dtype=reference.dtype)
        self.task_ids.append(task)
        if first:
            self.base_tasks.append(task)
        return task

    def remove_task(self, task: int) -> None:
        """Delete task `task`'s expert; every other task is untouched."""
        if task not in self.task_ids:
            raise ValueError(f"no task {task}")
        key = str(task)
        for layer in self._flow(task).lora_layers():
            layer.remove_task(task)
        for store in (self.adapters, self.dias):
            if key in store:
                del store[key]
        if key in self.flows and key != SHARED_FLOW:
            del self.flows[key]
        self.task_ids.remove(task)

    def _flow(self, task: int | RowTasks) -> FlowStack:
        """Task `task`'s coupling blocks (a mixed batch's tasks must all use the shared ones)."""
        if isinstance(task, RowTasks):
            return self.flows[SHARED_FLOW]
        return self.flows[str(task)] if str(task) in self.flows else self.flows[SHARED_FLOW]

    @staticmethod
    def _experts(store: nn.ModuleDict, task: int | RowTasks) -> list[nn.Module]:
        """The modules of `store` (adapters, DIAs) of `task`'s task(s), one per distinct task; [] if none has one."""
        keys = [str(t) for t in (task.tasks if isinstance(task, RowTasks) else (task,))]
        return [store[k] for k in keys] if owned_by_all(keys, store) else []

    @staticmethod
    def _run_experts(modules: list[nn.Module], task: int | RowTasks, x: torch.Tensor
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B,H,W,D) through the one task's module, or row i through its row's module (`forward_rows`)."""
        if isinstance(task, RowTasks):
            return type(modules[0]).forward_rows(modules, task, x)
        return modules[0](x)

    # ------------------------------------------------------------------------------ parameters
    def task_parameter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """Parameters owned by task `task`, by group: lora, task_bias, adapter, dia (and flow if separated)."""
        key = str(task)
        groups: dict[str, list[nn.Parameter]] = {"lora": [], "task_bias": [], "adapter": [], "dia": []}
        for layer in self._flow(task).lora_layers():
            if key in layer.lora_A:
                groups["lora"] += [layer.lora_A[key], layer.lora_B[key]]
            if key in layer.task_bias:
                groups["task_bias"].append(layer.task_bias[key])
        if key in self.adapters:
            groups["adapter"] = list(self.adapters[key].parameters())
        if key in self.dias:
            groups["dia"] = list(self.dias[key].parameters())
        if key in self.flows:
            owned = {id(p) for g in groups.values() for p in g}
            groups["flow"] = [p for p in self.flows[key].parameters() if id(p) not in owned]
        return groups

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for group in self.task_parameter_groups(task).values() for p in group]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong to no task: the shared flow's base weights, contexts and the SCM."""
        owned = {id(p) for t in self.task_ids for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in owned]

    def set_trainable(self, tasks: int | list[int]) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze what task(s) `tasks` train (spec §2.7.3, §4); return those: their
        own parameters, and the shared ones when they are base tasks (or without `freeze_base`)."""
        tasks = [tasks] if isinstance(tasks, int) else list(tasks)
        own = [p for t in tasks for p in self.task_parameters(t)]
        if any(t in self.base_tasks for t in tasks) or not self.cfg.freeze_base and not self.cfg.task_separated:
            trainable = self.shared_parameters() + own
        else:
            trainable = own
        for p in self.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def parameter_counts(self) -> dict[str, object]:
        """Shared and per-task parameter counts (per task: by group and total)."""
        per_task = {}
        for t in self.task_ids:
            groups = {name: sum(p.numel() for p in ps) for name, ps in self.task_parameter_groups(t).items()}
            groups["total"] = sum(groups.values())
            per_task[t] = groups
        shared = sum(p.numel() for p in self.shared_parameters())
        return {"shared": shared, "per_task": per_task}

    # ------------------------------------------------------------------------------ forward
    def prepare(self, tokens: torch.Tensor, task: int | RowTasks, window: tuple[slice, slice] | None = None
                ) -> torch.Tensor:
        """Tokens (B,H,W,D) -> flow input: + PE, task adapter (per row with `RowTasks`), spatial context mixer.
        With `window` (rows, columns of the grid): only that part of the flow input (B,h,w,D), computed from the
        window and the mixer's reach around it; equal to slicing the whole grid's (every step is per token
        except the mixer's k x k convolution, whose zero padding stays at the grid's own edges)."""
        b, h, w, d = tokens.shape
        x, encoding = tokens, None
        if self.cfg.use_pos_embedding:
            encoding = sinusoidal_position_encoding(h, w, d, device=x.device).to(x.dtype)
        if window is not None:  # the window and the mixer's reach around it, inside the grid
            reach = 0 if self.scm is None else self.scm.conv.kernel_size[0] // 2
            rows, cols = (slice(max(0, cut.start - reach), min(n, cut.stop + reach)) for cut, n in zip(window, (h, w)))
            x = x[:, rows, cols]
            encoding = None if encoding is None else encoding[rows, cols]
        if encoding is not None:
            x = x + encoding
        adapters = self._experts(self.adapters, task)
        if adapters:
            x = self._run_experts(adapters, task, x)
        if self.scm is not None:
            x = self.scm(x)
        if window is None:
            return x
        return x[:, window[0].start - rows.start:window[0].stop - rows.start,
                 window[1].start - cols.start:window[1].stop - cols.start]

    def flow_forward(self, x: torch.Tensor, task: int | RowTasks) -> tuple[torch.Tensor, torch.Tensor]:
        """The invertible part: coupling blocks then DIA_t (per row with `RowTasks`). (B,H,W,D) -> z,
        log-det (B,H,W)."""
        z, logdet = self._flow(task)(x, task)
        dias = self._experts(self.dias, task)
        if dias:
            z, ld = self._run_experts(dias, task, z)
            logdet = logdet + ld
        return z, logdet

    def flow_inverse(self, z: torch.Tensor, task: int) -> torch.Tensor:
        key = str(task)
        if key in self.dias:
            z = self.dias[key].inverse(z)
        return self._flow(task).inverse(z, task)

    @staticmethod
    def rows_per_pass(tokens: torch.Tensor, limit: int) -> int:
        """How many rows of tokens (B,H,W,D) to score per forward, at most `limit`: on the CPU, rows of at
        most `CPU_TOKENS_PER_PASS` patches in all (at least one row); elsewhere `limit`."""
        if tokens.device.type != "cpu":
            return limit
        return max(1, min(limit, CPU_TOKENS_PER_PASS // max(1, tokens.shape[1] * tokens.shape[2])))

    def forward(self, tokens: torch.Tensor, task: int, window: tuple[slice, slice] | None = None) -> FlowOutput:
        """tokens (B,H,W,D) of images all belonging to `task` -> per-patch NLL, log-det and latent (B,H,W[,D]).
        `window` (rows, columns): only that part of the grid goes through the flow (training on windows,
        `train.step_window`), prepared as it is in the whole grid (its own place's encoding, the mixer's context)."""
        self._check_learned([task])
        return self._output(*self.flow_forward(self.prepare(tokens, task, window), task))

    def forward_rows(self, tokens: torch.Tensor, row_tasks: Sequence[int] | torch.Tensor) -> FlowOutput:
        """tokens (B,H,W,D), row i of task row_tasks[i] ((B,) ids) -> per-patch NLL, log-det and latent, in one
        pass whatever the number of distinct tasks: the shared parts run once on the whole batch and each
        expert's weights are gathered per row. Equal to `forward` on each task's rows up to float rounding
        (bit-identical when all rows have one task: that is `forward`). With `task_separated` (a separate
        FlowStack per task) there is no shared pass: each task's rows run as their own `forward`."""
        rows = RowTasks.of(row_tasks, tokens.device)
        self._check_learned(rows.tasks)
        if len(rows.tasks) == 1:
            return self.forward(tokens, rows.tasks[0])
        if any(str(t) in self.flows for t in rows.tasks):
            return self._forward_per_task(tokens, rows)
        return self._output(*self.flow_forward(self.prepare(tokens, rows), rows))

    def _forward_per_task(self, tokens: torch.Tensor, rows: RowTasks) -> FlowOutput:
        """`forward_rows` as one `forward` per distinct task on its rows (tasks with their own flow)."""
        parts = [(rows.index == i).nonzero().squeeze(1) for i in range(len(rows.tasks))]
        outs = [self.forward(tokens[part], task) for part, task in zip(parts, rows.tasks)]
        back = torch.cat(parts).argsort()  # concatenated task by task -> original row order
        return FlowOutput(*(torch.cat([getattr(o, name) for o in outs])[back] for name in ("nll", "logdet", "z")))

    def _check_learned(self, tasks: Sequence[int]) -> None:
        for task in tasks:
            if task not in self.task_ids:
                raise ValueError(f"task {task} is not learned (tasks: {self.task_ids})")

    def _output(self, z: torch.Tensor, logdet: torch.Tensor) -> FlowOutput:
        """Latent z (B,H,W,D) and log-det (B,H,W) -> per-patch NLL under the standard normal."""
        log_prob = -0.5 * z.pow(2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet
        return FlowOutput(nll=-log_prob, logdet=logdet, z=z)
