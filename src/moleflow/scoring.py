"""Image scores and pixel anomaly maps from per-patch NLL maps (spec §6). Everything is batched torch.

* image score: an aggregation of the raw (unsmoothed) patch map (B, H, W) -> (B,);
* pixel map: bilinear upsampling (align_corners=True) to the image size, then a Gaussian blur with
  sigma 4 that matches `scipy.ndimage.gaussian_filter` (truncate 4, 'reflect' borders) on the
  tensor's device instead of per-image SciPy calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ScoreConfig
from .errors import MoleflowError


def image_scores(nll: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """Aggregate patch NLL maps (B, H, W) into image scores (B,) with `cfg.mode`."""
    flat = nll.flatten(1)
    n = flat.shape[1]
    if cfg.mode == "top_k":
        return flat.topk(min(cfg.top_k, n), dim=1).values.mean(1)
    if cfg.mode == "top_k_percent":
        return flat.topk(max(1, int(n * cfg.top_k_percent)), dim=1).values.mean(1)
    if cfg.mode == "percentile":
        return torch.quantile(flat, cfg.percentile, dim=1, interpolation="linear")
    if cfg.mode == "max":
        return flat.max(1).values
    if cfg.mode == "mean":
        return flat.mean(1)
    if cfg.mode == "spatial_cluster":
        return spatial_cluster_scores(nll, cfg.cluster_weight, cfg.cluster_percentile, cfg.cluster_top_k_ratio)
    raise MoleflowError(f"unknown score mode {cfg.mode!r}")


def spatial_cluster_scores(nll: torch.Tensor, weight: float, percentile: float, top_k_ratio: float) -> torch.Tensor:
    """Favour clustered high scores: patches above each image's `percentile` quantile are weighted by
    1 + n/8 (n = above-threshold 8-neighbours); score = weight * topk-mean(weighted) + (1 - weight) *
    topk-mean(raw), k = max(1, floor(N * top_k_ratio)). nll: (B, H, W) -> (B,)."""
    b, h, w = nll.shape
    flat = nll.flatten(1)
    high = (flat >= torch.quantile(flat, percentile, dim=1, keepdim=True)).float().view(b, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, dtype=high.dtype, device=high.device)
    kernel[0, 0, 1, 1] = 0
    neighbours = F.conv2d(high, kernel, padding=1).view(b, -1)
    weighted = flat * torch.where(high.view(b, -1) > 0, 1 + neighbours / 8, torch.ones_like(neighbours))
    k = max(1, int(h * w * top_k_ratio))
    a = weighted.topk(k, dim=1).values.mean(1)
    raw = flat.topk(k, dim=1).values.mean(1)
    return weight * a + (1 - weight) * raw


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """SciPy's 1-D Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a 'reflect' (half-sample symmetric, d c b a | a b c d) padding of length n by radius."""
    idx = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter(sigma) per map."""
    if sigma <= 0:
        return maps
    b, h, w = maps.shape
    kernel = gaussian_kernel1d(sigma, device=maps.device, dtype=maps.dtype)
    radius = kernel.numel() // 2
    x = maps.index_select(2, _reflect_index(w, radius, maps.device)).reshape(b * h, 1, -1)
    x = F.conv1d(x, kernel.view(1, 1, -1)).reshape(b, h, w)
    x = x.transpose(1, 2).index_select(2, _reflect_index(h, radius, maps.device)).reshape(b * w, 1, -1)
    return F.conv1d(x, kernel.view(1, 1, -1)).reshape(b, w, h).transpose(1, 2).contiguous()


def anomaly_maps(nll: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Pixel anomaly maps (B, size, size) from patch NLL maps (B, H, W): upsample, blur, clean non-finite."""
    up = F.interpolate(nll.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)
    smooth = gaussian_blur(up, sigma)
    return torch.nan_to_num(smooth, nan=0.0, posinf=1.0, neginf=0.0)


def decision_threshold(normal_scores: torch.Tensor, false_alarm_rate: float) -> float:
    """Threshold = the (1 - rate) quantile of held-out normal training scores; score > threshold is anomalous."""
    if normal_scores.numel() == 0:
        return math.inf
    return float(torch.quantile(normal_scores.double(), 1.0 - false_alarm_rate))
