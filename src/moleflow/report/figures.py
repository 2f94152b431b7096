"""Report figures: small matplotlib builders that return PNG bytes.

Every builder makes its own ``matplotlib.figure.Figure`` rendered by the Agg canvas; pyplot (and its
global state and interactive backends) is never touched, so the builders are safe to call from
library code, threads and notebooks, and nothing leaks between calls.

The builders take plain numbers / arrays, not run directories, so they can be reused (e.g. by an
ablation comparison): `heatmap`, `bar_chart`, `roc_figure`, `pr_figure`, `score_histograms`,
`example_strip`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image as PILImage

from ..heatmap import overlay_tile, resize_rgb as _tile

__all__ = [
    "DPI",
    "bar_chart",
    "daily_rates",
    "example_strip",
    "fig_to_png",
    "heatmap",
    "map_range",
    "overlay_tile",
    "new_figure",
    "pr_curve",
    "pr_figure",
    "roc_curve",
    "roc_figure",
    "score_histograms",
]

DPI = 100
#: Above this many series, curves are drawn as small multiples instead of one shared panel.
MAX_OVERLAY = 10
_NAN_COLOR = "#e6e6e6"
_FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8}


# ---------------------------------------------------------------------------------------------
# Plumbing


def new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A white figure (inches); constrained layout (so labels never overlap) unless told otherwise."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None,
                 facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _small_multiples(n: int, max_cols: int, panel: tuple[float, float], *, sharex: bool = False,
                     sharey: bool = False) -> tuple[Figure, list]:
    """A figure with a grid of n axes (unused cells hidden) and fixed margins in inches.

    Constrained layout costs seconds for a dozen panels; fixed margins are enough here because
    every panel has the same short decorations.
    """
    rows, cols = _grid(max(n, 1), max_cols)
    left, right, bottom, top, wgap, hgap = 0.75, 0.15, 0.6, 0.55, 0.35, 0.45
    width = left + right + cols * panel[0] + (cols - 1) * wgap
    height = bottom + top + rows * panel[1] + (rows - 1) * hgap
    fig = new_figure(width, height, constrained=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wgap / panel[0], hspace=hgap / panel[1])
    axes = list(np.atleast_1d(fig.subplots(rows, cols, sharex=sharex, sharey=sharey, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def fig_to_png(fig: Figure, dpi: int = DPI, palette: bool = False) -> bytes:
    """Render `fig` to PNG bytes. `palette=True` quantises to 256 colours (much smaller for photos)."""
    if not palette:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
        return buf.getvalue()
    fig.set_dpi(dpi)
    fig.canvas.draw()
    img = PILImage.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    # an octree palette keeps the few exact colours of text / colour bars; dithering against it
    # hides the banding of the photos.
    pal = img.quantize(colors=256, method=PILImage.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.quantize(palette=pal, dither=PILImage.Dither.FLOYDSTEINBERG).save(out, format="png", compress_level=9)
    return out.getvalue()


def _styled(builder: Callable[..., bytes]) -> Callable[..., bytes]:
    """Decorator: run a figure builder under the report's font sizes (a local rc context)."""

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_FONT):
            return builder(*args, **kwargs)

    return wrapper


def _text_color(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour `rgba`."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _grid(n: int, max_cols: int = 5) -> tuple[int, int]:
    """(rows, cols) of a small-multiples grid for n panels."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _label_width(labels: Sequence[str], fontsize: float = 8) -> float:
    """Rough width in inches of the longest label."""
    longest = max((len(str(s)) for s in labels), default=0)
    return 0.6 * fontsize / 72 * longest


# ---------------------------------------------------------------------------------------------
# Heat maps and bars


@_styled
def heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
            title: str, xlabel: str = "", ylabel: str = "",
            text: Sequence[Sequence[str]] | None = None, color_values: np.ndarray | None = None,
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            colorbar_label: str = "", fmt: str = "{:.1f}") -> bytes:
    """Annotated heat map. NaN cells are light grey; `text` overrides the cell annotations.

    values: (R, C) numbers used for the annotations (``fmt``) and, unless `color_values` is given,
    for the colours.
    """
    values = np.asarray(values, dtype=float)
    colors = values if color_values is None else np.asarray(color_values, dtype=float)
    n_rows, n_cols = values.shape
    cell = 0.55 if n_cols <= 10 else 0.45
    width = max(4.5, 1.4 + _label_width(row_labels) + cell * n_cols)
    height = max(2.6, 1.3 + 0.15 * max(len(str(c)) for c in col_labels) * 0.6 + 0.36 * n_rows)
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    cm = colormaps[cmap].with_extremes(bad=_NAN_COLOR)
    finite = colors[np.isfinite(colors)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    im = ax.imshow(np.ma.masked_invalid(colors), cmap=cm, norm=norm, aspect="auto",
                   interpolation="nearest")
    fontsize = 8 if n_cols <= 10 else 6.5
    for r in range(n_rows):
        for c in range(n_cols):
            label = text[r][c] if text is not None else (
                fmt.format(values[r, c]) if np.isfinite(values[r, c]) else "")
            if not label:
                continue
            shade = cm(norm(colors[r, c])) if np.isfinite(colors[r, c]) else (0.9, 0.9, 0.9, 1)
            ax.text(c, r, label, ha="center", va="center", fontsize=fontsize, color=_text_color(shade))
    ax.set_xticks(range(n_cols), [str(c) for c in col_labels],
                  rotation=45 if n_cols > 4 or max(len(str(c)) for c in col_labels) > 8 else 0,
                  ha="right" if n_cols > 4 else "center", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), [str(r) for r in row_labels])
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=colorbar_label, shrink=0.9, fraction=0.05, pad=0.02)
    return fig_to_png(fig)


@_styled
def bar_chart(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
              title: str, ylabel: str, percent: bool = True, ylim: tuple[float, float] | None = None,
              annotate: bool = True) -> bytes:
    """Grouped bar chart: one group per entry of `groups`, one bar per series (e.g. runs).

    Values are fractions when ``percent`` (drawn as %). Missing values (None / NaN) are marked
    "n/a" on the axis instead of being drawn as 0.
    """
    names = list(series)
    n_groups, n_series = len(groups), max(len(names), 1)
    scale = 100.0 if percent else 1.0
    width = min(12.0, max(4.5, 1.5 + 0.35 * n_groups * n_series + 0.25 * n_groups))
    fig = new_figure(width, 3.4)
    ax = fig.add_subplot()
    bar_w = 0.8 / n_series
    x = np.arange(n_groups)
    cmap = colormaps["tab10"]
    for k, name in enumerate(names):
        vals = [v for v in series[name]]
        ok = np.array([v is not None and np.isfinite(v) for v in vals])
        heights = np.array([v * scale if o else 0.0 for v, o in zip(vals, ok)])
        pos = x - 0.4 + bar_w * (k + 0.5)
        bars = ax.bar(pos[ok], heights[ok], bar_w * 0.92, label=name, color=cmap(k % 10))
        if annotate and n_groups * n_series <= 24:
            ax.bar_label(bars, fmt="%.1f" if percent else "%.3g", fontsize=7, padding=1)
        base = ylim[0] if ylim else 0.0
        for p in pos[~ok]:
            ax.text(p, base, "n/a", ha="center", va="bottom", fontsize=7, color="0.4", rotation=90)
    ax.set_xticks(x, [str(g) for g in groups], rotation=30 if n_groups > 5 else 0,
                  ha="right" if n_groups > 5 else "center", rotation_mode="anchor")
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif percent:
        ax.set_ylim(0, 108)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if n_series > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    return fig_to_png(fig)


# ---------------------------------------------------------------------------------------------
# ROC / PR curves


def _cumulative(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True / false positive counts at each distinct threshold (descending), and P, N."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, dtype=int)
    tps = np.cumsum(y)[last] if s.size else np.zeros(0)
    fps = last + 1 - tps
    return tps.astype(float), fps.astype(float), int(y.sum()), int((~y).sum())


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auroc); ties count one half (exact trapezoid). auroc is NaN without both classes."""
    tps, fps, pos, neg = _cumulative(scores, labels)
    if pos == 0 or neg == 0:
        return np.zeros(1), np.zeros(1), float("nan")
    fpr, tpr = np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(recall, precision, average precision) as in scikit-learn. AP is NaN without anomalies."""
    tps, fps, pos, _ = _cumulative(scores, labels)
    if pos == 0 or tps.size == 0:
        return np.zeros(1), np.ones(1), float("nan")
    recall, precision = np.r_[0.0, tps / pos], np.r_[1.0, tps / (tps + fps)]
    return recall, precision, float(np.sum(np.diff(recall) * precision[1:]))


def _curve_panels(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], kind: str, title: str) -> bytes:
    """Shared ROC/PR drawing: one panel for few series, small multiples for many."""
    fn = roc_curve if kind == "roc" else pr_curve
    xlabel, ylabel = ("False positive rate", "True positive rate") if kind == "roc" else ("Recall", "Precision")
    metric = "AUROC" if kind == "roc" else "AP"
    names = list(curves)
    overlay = len(names) <= MAX_OVERLAY
    if overlay:
        fig = new_figure(5.2, 4.4)
        axes = [fig.add_subplot()] * max(len(names), 1)
    else:
        fig, axes = _small_multiples(len(names), 5, (1.9, 1.9), sharex=True, sharey=True)
    cmap = colormaps["tab10"]
    for k, name in enumerate(names):
        ax = axes[k]
        x, y, value = fn(*curves[name])
        value_txt = "n/a" if not np.isfinite(value) else f"{100 * value:.1f}"
        color = cmap(k % 10) if overlay else "tab:blue"
        label = f"{name} ({metric} {value_txt})"
        ax.plot(x, y, color=color, lw=1.6, label=label, drawstyle="default" if kind == "roc" else "steps-pre",
                linestyle="--" if overlay and k >= 10 else "-")
        if kind == "roc" and (not overlay or k == 0):
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
        if not overlay:
            ax.set_title(label, fontsize=8)
    for ax in (axes[:1] if overlay else axes):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([0, 0.5, 1] if not overlay else np.linspace(0, 1, 6))
        ax.set_yticks([0, 0.5, 1] if not overlay else np.linspace(0, 1, 6))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    if overlay:
        axes[0].set_xlabel(xlabel)
        axes[0].set_ylabel(ylabel)
        axes[0].set_title(title)
        if names:
            axes[0].legend(loc="lower right" if kind == "roc" else "lower left", framealpha=0.9)
    else:
        fig.suptitle(title)
        fig.supxlabel(xlabel, fontsize=9)
        fig.supylabel(ylabel, fontsize=9)
    return fig_to_png(fig)


@_styled
def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "Image-level ROC") -> bytes:
    """ROC curves, `curves[name] = (scores, labels)`; AUROC (%) in the legend / panel titles."""
    return _curve_panels(curves, "roc", title)


@_styled
def pr_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
              title: str = "Image-level precision-recall") -> bytes:
    """Precision-recall curves, `curves[name] = (scores, labels)`; AP (%) in the legend / titles."""
    return _curve_panels(curves, "pr", title)


@_styled
def score_histograms(data: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]],
                     title: str = "Image scores: normal vs anomalous") -> bytes:
    """Small multiples of score histograms, `data[name] = (scores, labels, threshold or None)`."""
    names = list(data)
    fig, axes = _small_multiples(len(names), 4, (2.2, 1.45))
    for ax, name in zip(axes, names):
        scores, labels, thr = data[name]
        scores = np.asarray(scores, dtype=float)
        labels = np.asarray(labels).astype(bool)
        finite = scores[np.isfinite(scores)]
        values = finite if thr is None or not np.isfinite(thr) else np.r_[finite, thr]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        ax.hist(scores[~labels], bins=bins, color="tab:blue", alpha=0.55, label="normal", histtype="stepfilled")
        ax.hist(scores[labels], bins=bins, color="tab:red", alpha=0.55, label="anomalous", histtype="stepfilled")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        if thr is not None and np.isfinite(thr):
            ax.axvline(thr, color="black", ls="--", lw=1, label="threshold")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    if names:
        axes[0].legend(fontsize=7, framealpha=0.9)
    fig.suptitle(title, y=1 - 0.12 / fig.get_figheight())
    fig.supxlabel("image score (higher = more anomalous)", fontsize=9)
    fig.supylabel("images", fontsize=9)
    return fig_to_png(fig)


# ---------------------------------------------------------------------------------------------
# Example strips


def map_range(maps: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """A shared colour range for anomaly maps: the [low, high] percentiles of their finite values."""
    vals = np.asarray(maps, dtype=np.float32)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


@_styled
def daily_rates(days_of: Mapping[str, Sequence[Mapping]]) -> bytes:
    """Per product, its realised false-alarm and detection rates (%) per day, one small panel each.

    days_of: {product: [{"day": "YYYY-MM-DD", "false_alarm_rate": float | None, "detection_rate": ...}, ...]};
    days without an estimate (None) are left out of a line, never drawn as 0."""
    names = sorted(days_of)
    fig, axes = _small_multiples(len(names), 3, (3.4, 2.3))
    for ax, name in zip(axes, names):
        days = days_of[name]
        for key, label, style in (("false_alarm_rate", "false alarms", "o-"), ("detection_rate", "detection", "s-")):
            pts = [(i, 100 * d[key]) for i, d in enumerate(days) if d[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=3)
        ax.set_title(name)
        ax.set_ylim(-2, 102)
        ax.set_xticks(range(len(days)))
        ax.set_xticklabels([d["day"][5:] for d in days], rotation=45, fontsize=7)
        ax.set_ylabel("%")
        ax.legend(loc="center right", fontsize=7)
    return fig_to_png(fig)


@_styled
def example_strip(images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                  captions: Sequence[str], groups: Sequence[tuple[str, Sequence[int]]], *,
                  title: str, vrange: tuple[float, float] | None = None, alpha: float = 0.45,
                  colorbar_label: str = "anomaly map (NLL)", tile: int = 140) -> bytes:
    """Examples side by side: image on top, anomaly-map overlay below (one shared colour scale).

    images (K,S,S,3) uint8, maps (K,S,S), masks (K,S,S) bool or None; captions (K,) shown under
    each column; groups: [(group title, indices), ...] drawn left to right (e.g. best / worst).
    The ground-truth outline (when the mask has any pixel) is drawn white on the overlay. Tiles
    are composed in numpy and drawn as one image (pixel-exact, fast); `tile` is their size in px.
    """
    groups = [(name, list(idx)) for name, idx in groups if len(idx)]
    if not groups:
        raise ValueError("example_strip needs at least one example")
    lo, hi = vrange if vrange is not None else map_range(maps[[i for _, idx in groups for i in idx]])
    norm = Normalize(lo, hi)
    gap, group_gap = 6, 26
    n_lines = max(str(captions[i]).count("\n") + 1 for _, idx in groups for i in idx)
    left, right, top, bottom = 26, 95, 50, 14 + 12 * n_lines
    n_cols = sum(len(idx) for _, idx in groups)
    width_px = n_cols * tile + (n_cols - len(groups)) * gap + (len(groups) - 1) * group_gap
    mosaic = np.full((2 * tile + gap, width_px, 3), 255, np.uint8)
    fig_w, fig_h = left + width_px + right, top + mosaic.shape[0] + bottom
    fig = new_figure(fig_w / DPI, fig_h / DPI, constrained=False)
    x = 0
    for name, idx in groups:
        fig.text((left + x + (len(idx) * (tile + gap) - gap) / 2) / fig_w, 1 - (top - 8) / fig_h, name,
                 ha="center", va="bottom", fontsize=9, fontweight="bold")
        for i in idx:
            image = np.asarray(images[i])
            mask = None if masks is None else np.asarray(masks[i])
            mosaic[:tile, x:x + tile] = _tile(image, tile)
            mosaic[tile + gap:, x:x + tile] = overlay_tile(image, maps[i], mask, norm, tile, alpha)
            fig.text((left + x + tile / 2) / fig_w, (bottom - 4) / fig_h, str(captions[i]), ha="center",
                     va="top", fontsize=7, linespacing=1.25)
            x += tile + gap
        x += group_gap - gap
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width_px / fig_w, mosaic.shape[0] / fig_h))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for row, label in ((0, "image"), (1, "anomaly map")):
        y = bottom + mosaic.shape[0] - row * (tile + gap) - tile / 2
        fig.text(6 / fig_w, y / fig_h, label, rotation=90, ha="left", va="center", fontsize=8)
    cax = fig.add_axes(((left + width_px + 14) / fig_w, bottom / fig_h, 12 / fig_w, tile / fig_h))
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap="jet"), cax=cax)
    cbar.set_label(colorbar_label, fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=10)
    return fig_to_png(fig, palette=True)
