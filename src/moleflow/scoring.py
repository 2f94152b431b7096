"""Image scores and pixel anomaly maps from per-patch NLL maps (spec §6). Everything is batched torch.

* image score: an aggregation of the raw (unsmoothed) patch map (B, H, W) -> (B,);
* pixel map: bilinear upsampling (align_corners=True) to the image size, then a Gaussian blur with
  sigma 4 that matches `scipy.ndimage.gaussian_filter` (truncate 4, 'reflect' borders), both folded
  into two small matrix products per map on the tensor's device (`MapMaker`), instead of per-image
  SciPy calls; optionally the map's median patch score taken off first (`score.map_centre`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Config, ScoreConfig
from .errors import MoleflowError


def image_scores(nll: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """Aggregate patch NLL maps (B, H, W) into image scores (B,) with `cfg.mode`."""
    flat = nll.flatten(1)
    n = flat.shape[1]
    if cfg.mode == "top_k":
        return flat.topk(min(cfg.top_k, n), dim=1).values.mean(1)
    if cfg.mode == "top_k_percent":
        return flat.topk(max(1, int(n * cfg.top_k_percent)), dim=1).values.mean(1)
    if cfg.mode == "percentile":  # = torch.quantile(interpolation="linear"), with static indices (ONNX)
        pos = cfg.percentile * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi, frac = min(lo + 1, n - 1), pos - lo
        ordered = flat.sort(dim=1).values
        return ordered[:, lo] + frac * (ordered[:, hi] - ordered[:, lo])
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


def reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices of a 'reflect' (half-sample symmetric, d c b a | a b c d) padding of length n by radius."""
    idx = torch.remainder(torch.arange(-radius, n + radius), 2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 matrix K with K @ v == scipy.ndimage.gaussian_filter1d(v, sigma) ('reflect')."""
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    kernel = gaussian_kernel1d(sigma, dtype=torch.float64)
    radius = kernel.numel() // 2
    index = reflect_index(size, radius)  # padded position p reads source index[p]
    k = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        k[i].index_add_(0, index[i:i + 2 * radius + 1], kernel)
    return k


def upsample_matrix(n: int, size: int) -> torch.Tensor:
    """(size, n) float64 matrix U with U @ v == 1-D linear interpolation (align_corners=True) of v to size."""
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # (n, 1, n)
    return F.interpolate(eye, size=size, mode="linear", align_corners=True).squeeze(1).T.contiguous()


class MapMaker(torch.nn.Module):
    """Patch maps (B, h, w) -> pixel maps (B, S, S): bilinear upsampling (align_corners=True) then the
    Gaussian blur of scipy.ndimage.gaussian_filter ('reflect', truncate 4), then NaN/inf cleaning.

    Both steps are separable linear maps, so they are folded into one matrix per axis:
    map = A_h @ nll @ A_w^T with A = blur_matrix @ upsample_matrix (S x h). Two small matmuls per map
    replace an upsample and two 33-tap convolutions over S x S pixels; the result is the same up to float
    rounding, runs on the tensor's device, and exports to ONNX as two MatMuls.

    With `centre`, each patch map's median is subtracted first (every row of A sums to 1, so this is the
    pixel map minus that median): the map then shows where a part is worse than the rest of itself.
    """

    def __init__(self, grid: tuple[int, int], size: int, sigma: float, centre: bool = False) -> None:
        super().__init__()
        blur = blur_matrix(size, sigma)
        self.centre = centre
        self.register_buffer("rows", blur @ upsample_matrix(grid[0], size), persistent=False)  # float64
        self.register_buffer("cols", blur @ upsample_matrix(grid[1], size), persistent=False)

    @classmethod
    def of(cls, grid: tuple[int, int], config: Config) -> "MapMaker":
        """The map maker of patch maps on `grid` under `config` (image size, `score.map_sigma`, `map_centre`)."""
        return cls(grid, config.data.image_size, config.score.map_sigma, config.score.map_centre == "median")

    def forward(self, nll: torch.Tensor) -> torch.Tensor:
        rows, cols = self.rows.to(nll.dtype), self.cols.to(nll.dtype)
        if self.centre:
            nll = nll - lower_median(nll.flatten(1), 1).view(-1, 1, 1)
        return clean_maps(rows @ nll @ cols.T)


def lower_median(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The lower median along `dim` (torch.median's), that dimension removed: a sort and a constant index, so that
    it exports to ONNX. Maps, routing features and patch misfits share it."""
    middle = (values.shape[dim] - 1) // 2
    return values.sort(dim=dim).values.select(dim, middle)


def clean_maps(maps: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +inf -> 1, -inf -> 0 (spec §6), written with where() so it also exports to ONNX."""
    maps = torch.where(torch.isnan(maps), torch.zeros_like(maps), maps)
    return torch.where(torch.isinf(maps), (maps > 0).to(maps.dtype), maps)


def anomaly_maps(nll: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Pixel anomaly maps (B, size, size) from patch NLL maps (B, h, w): upsample, blur, clean non-finite."""
    return MapMaker(tuple(nll.shape[-2:]), size, sigma).to(nll.device)(nll)
