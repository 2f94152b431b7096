"""AdamP (Heo et al., ICLR 2021), the update of the `adamp` 0.3.0 package, computed for many tensors at once.

    optimizer = AdamP(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01, delta=0.1, wd_ratio=0.1)

Written here rather than imported because the package steps one tensor at a time in Python: a product's expert
has about a hundred small tensors (LoRA factors, biases, whitening), and its step took 22 ms on 2 cores, an eighth
of a windowed training step. This is the same update, term for term: the Adam moments with `torch._foreach_*`
ops over every tensor, and AdamP's projection (remove the radial part of the update of a scale-invariant weight
and shrink its weight decay) for all tensors of one shape stacked. `tests/test_adamp.py` checks it against the
package step by step.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.optim import Optimizer


class AdamP(Optimizer):
    """AdamP with the `adamp` package's arguments and defaults (Nesterov momentum is not offered)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = defaultdict(list)  # tensors at the same step share scalars
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                by_step[state["step"]].append(p)
            for step, params in by_step.items():
                self._update(params, step, group)
        return loss

    def _update(self, params: list[torch.Tensor], step: int, group: dict) -> None:
        """One AdamP step of `params`, all at step number `step`."""
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denom, group["eps"])
        perturb = list(torch._foreach_div(exp_avg, denom))
        wd_ratio = [1.0] * len(params)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            if p.dim() > 1:
                by_shape[tuple(p.shape)].append(i)
        for index in by_shape.values():
            projected, ratios = _projection(torch.stack([params[i] for i in index]),
                                            torch.stack([grads[i] for i in index]),
                                            torch.stack([perturb[i] for i in index]), group)
            for k, i in enumerate(index):
                perturb[i], wd_ratio[i] = projected[k], ratios[k]
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, [1 - group["lr"] * group["weight_decay"] * r for r in wd_ratio])
        torch._foreach_add_(params, perturb, alpha=-group["lr"] / (1 - beta1 ** step))


def _projection(p: torch.Tensor, grad: torch.Tensor, perturb: torch.Tensor, group: dict
                ) -> tuple[torch.Tensor, list[float]]:
    """AdamP's projection of G stacked tensors of one shape (G, C, ...): for each, if its gradient is nearly
    orthogonal to its weight per output channel (else over the whole tensor), the update loses its component
    along the (channel-wise, else whole) unit weight and the weight decay shrinks by `wd_ratio`. Returns the
    updates (G, C, ...) and each tensor's weight-decay factor."""
    eps, delta = group["eps"], group["delta"]
    n, channels = len(p), p.shape[1]
    out, ratios = perturb.clone(), [1.0] * n
    done = torch.zeros(n, dtype=torch.bool)
    for rows in (channels, 1):  # channel view (C, -1), then layer view (1, -1): the package's order
        pv, gv, uv = p.reshape(n, rows, -1), grad.reshape(n, rows, -1), perturb.reshape(n, rows, -1)
        cosine = F.cosine_similarity(gv, pv, dim=2, eps=eps).abs_()  # (G, rows)
        hit = (cosine.amax(1) < delta / math.sqrt(pv.shape[2])) & ~done
        if hit.any():
            unit = pv / pv.norm(dim=2, keepdim=True).add_(eps)
            projected = uv - unit * (unit * uv).sum(dim=2, keepdim=True)
            out[hit] = projected[hit].reshape(out[hit].shape)
            for i in hit.nonzero().flatten().tolist():
                ratios[i] = group["wd_ratio"]
            done |= hit
    return out, ratios
