"""Report figures: ranking metrics, interest-token attention, ablation arms, metric curves.

Figures are built on the Agg canvas directly (no pyplot), so nothing needs a display and no
global figure registry grows in long-running drivers. Each function returns the Figure and
also writes a PNG when given a path (ready for `RunTracker.log_figure` either way).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_RANK_KEY = re.compile(r"^(HR|NDCG)@(\d+)$")
_DPI = 120


def _figure(width: float, height: float, **kwargs) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=_DPI, bbox_inches="tight")
    return fig


def hr_bars(metrics: Mapping[str, float], path: str | Path | None = None) -> Figure:
    """Grouped bars of HR@K and NDCG@K for every K found among keys like "HR@10"."""
    values: dict[tuple[str, int], float] = {}
    for key, value in metrics.items():
        m = _RANK_KEY.match(str(key))
        if m:
            values[(m.group(1), int(m.group(2)))] = float(value)
    if not values:
        raise ValueError(
            f"hr_bars: no keys like 'HR@10' or 'NDCG@10' in metrics (got {sorted(metrics)[:8]})"
        )
    ks = sorted({k for _, k in values})
    fig = _figure(max(4.0, 1.2 * len(ks) + 2.0), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(ks))
    width = 0.38
    for offset, name, color in ((-width / 2, "HR", "#4C72B0"), (width / 2, "NDCG", "#DD8452")):
        heights = [values.get((name, k), np.nan) for k in ks]
        bars = ax.bar(x + offset, heights, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, [f"@{k}" for k in ks])
    ax.set_xlabel("cut-off K")
    ax.set_ylabel("score")
    finite = [v for v in values.values() if np.isfinite(v)]
    ax.set_ylim(0, max(max(finite, default=1.0) * 1.18, 1e-3))  # room for the value labels
    ax.set_title("Retrieval quality")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path)


def _tick_step(n: int, max_labels: int) -> int:
    return max(1, int(np.ceil(n / max_labels)))


def attention_heatmap(
    attn: np.ndarray,
    row_labels: Sequence[str],
    key_labels: Sequence[str],
    title: str,
    path: str | Path | None = None,
    row_title: str = "example",
) -> Figure:
    """Heatmap of the interest token's attention (rows: examples, or the layers and heads of
    one example; columns: positions)."""
    a = np.asarray(attn, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"attention_heatmap: attn must be 2-D [rows, keys], got shape {a.shape}")
    if len(row_labels) != a.shape[0]:
        raise ValueError(
            f"attention_heatmap: {len(row_labels)} row_labels for {a.shape[0]} rows of attn")
    if len(key_labels) != a.shape[1]:
        raise ValueError(
            f"attention_heatmap: {len(key_labels)} key_labels for {a.shape[1]} keys of attn")
    rows, keys = a.shape
    fig = _figure(min(14.0, 3.0 + 0.16 * keys), min(10.0, 1.6 + 0.45 * rows),
                  layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(a, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.9)
    # Thin the ticks so long sequences stay readable.
    step = _tick_step(keys, 40)
    ax.set_xticks(range(0, keys, step), [str(key_labels[i]) for i in range(0, keys, step)],
                  rotation=90, fontsize=7)
    rstep = _tick_step(rows, 25)
    ax.set_yticks(range(0, rows, rstep), [str(row_labels[i]) for i in range(0, rows, rstep)],
                  fontsize=8)
    ax.set_xlabel("sequence position")
    ax.set_ylabel(row_title)
    ax.set_title(title)
    return _finish(fig, path)


def arms_plot(table: pd.DataFrame, path: str | Path | None = None, per_row: int = 5) -> Figure:
    """One panel per metric, `per_row` panels a row: a bar per arm (mean) with its std as error bar."""
    missing = {"arm", "metric", "mean", "std"} - set(table.columns)
    if missing:
        raise ValueError(
            f"arms_plot: table lacks columns {sorted(missing)}; it needs arm, metric, mean, std")
    if table.empty:
        raise ValueError("arms_plot: table has no rows")
    if per_row < 1:
        raise ValueError(f"arms_plot: per_row must be >= 1, got {per_row}")
    metrics = list(dict.fromkeys(table["metric"]))  # first-seen order
    arms = list(dict.fromkeys(table["arm"]))
    ncols = min(len(metrics), per_row)
    nrows = -(-len(metrics) // ncols)
    fig = _figure(max(4.0, 3.2 * ncols), 3.8 * nrows, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[len(metrics):]:  # empty slots of the last row
        fig.delaxes(ax)
    axes = grid[: len(metrics)]
    colors = [f"C{i % 10}" for i in range(len(arms))]
    for ax, metric in zip(axes, metrics):
        sub = table[table["metric"] == metric].set_index("arm")
        means = [float(sub["mean"].get(a, np.nan)) for a in arms]
        stds = np.nan_to_num([float(sub["std"].get(a, np.nan)) for a in arms])
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=colors)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(str(metric))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel("mean ± std over seeds")
    return _finish(fig, path)


def metric_curve(values_by_arm: Mapping[str, Sequence[float]], metric: str, path: str | Path | None = None,
                 xlabel: str = "epoch") -> Figure:
    """One line per named curve (an arm, a model, a run) of `metric` against epochs 1..n; curves
    may differ in length (early stopping)."""
    if not values_by_arm or not all(len(v) for v in values_by_arm.values()):
        raise ValueError(f"metric_curve: give at least one non-empty curve (got {dict(values_by_arm)!r})")
    fig = _figure(6.0, 3.6, layout="constrained")
    ax = fig.add_subplot()
    longest = 0
    for name, values in values_by_arm.items():
        y = np.asarray(values, dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, marker="o", markersize=3, label=str(name))
        longest = max(longest, len(y))
    ax.set_xticks(range(1, longest + 1, _tick_step(longest, 20)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _finish(fig, path)
