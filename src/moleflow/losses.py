"""Training losses (spec §3), always on per-patch means so their scale does not depend on the grid (§12.15)."""

from __future__ import annotations

import torch


def tail_aware_loss(nll: torch.Tensor, tail_weight: float, tail_ratio: float) -> torch.Tensor:
    """(1 - w) * mean NLL + w * mean of each image's top-k patch NLLs, k = max(1, floor(N * ratio)).

    nll: (B, H, W) or (B, N). Gradients flow only through the selected tail patches for the tail term.
    """
    flat = nll.flatten(1)
    mean = flat.mean()
    if tail_weight == 0:
        return mean
    k = max(1, int(flat.shape[1] * tail_ratio))
    tail = flat.topk(k, dim=1).values.mean()
    return (1 - tail_weight) * mean + tail_weight * tail


def logdet_regularisation(logdet: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * mean over patches of the squared total log-det. logdet: (B, H, W)."""
    return weight * logdet.pow(2).mean()
