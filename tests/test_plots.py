"""karma.plots writes real PNGs of plausible size and refuses malformed input by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from karma.plots import arms_plot, attention_heatmap, hr_bars


def _png_shape(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    return img.shape[0], img.shape[1]


def test_hr_bars_png(tmp_path: Path) -> None:
    metrics = {"HR@1": 0.05, "HR@10": 0.21, "NDCG@10": 0.11, "HR@50": 0.4, "NDCG@50": 0.15,
               "MRR": 0.08, "loss": 3.2}
    fig = hr_bars(metrics, tmp_path / "sub" / "hr.png")
    assert isinstance(fig, Figure)
    h, w = _png_shape(tmp_path / "sub" / "hr.png")
    assert 250 < h < 1500 and 400 < w < 2500
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["@1", "@10", "@50"]
    assert len(ax.patches) == 6  # HR and NDCG bar per K (a missing NDCG@1 is an empty bar)
    with pytest.raises(ValueError, match="HR@10"):
        hr_bars({"loss": 1.0})


def test_attention_heatmap_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    attn = rng.random((4, 60))
    attn /= attn.sum(axis=1, keepdims=True)
    out = tmp_path / "attn.png"
    fig = attention_heatmap(attn, [f"user {i}" for i in range(4)],
                            [f"t{j}" for j in range(60)], "interest token attention", out)
    h, w = _png_shape(out)
    assert 200 < h < 1500 and 600 < w < 2500
    assert len(fig.axes) == 2  # heatmap + colour bar
    assert len(fig.axes[0].get_xticklabels()) <= 40  # thinned for readability
    with pytest.raises(ValueError, match="key_labels"):
        attention_heatmap(attn, ["a"] * 4, ["b"] * 3, "x")
    with pytest.raises(ValueError, match="2-D"):
        attention_heatmap(attn[0], ["a"], ["b"] * 60, "x")


def test_arms_plot_png(tmp_path: Path) -> None:
    table = pd.DataFrame({
        "arm": ["action", "action", "karma", "karma", "gen-only", "gen-only"],
        "metric": ["HR@10", "sink_share"] * 3,
        "mean": [0.20, 0.61, 0.24, 0.35, 0.22, 0.40],
        "std": [0.01, 0.05, 0.02, 0.04, np.nan, 0.03],
    })
    out = tmp_path / "arms.png"
    fig = arms_plot(table, out)
    h, w = _png_shape(out)
    assert 250 < h < 1500 and 500 < w < 2500
    assert [ax.get_title() for ax in fig.axes] == ["HR@10", "sink_share"]
    assert len(fig.axes[0].patches) == 3
    with pytest.raises(ValueError, match="std"):
        arms_plot(table.drop(columns=["std"]))


def test_arms_plot_wraps_many_metrics(tmp_path: Path) -> None:
    metrics = ["HR@10", "NDCG@10", "MRR", "tail/HR@10", "tail/NDCG@10", "sink_rate_first", "token_f1"]
    table = pd.DataFrame([{"arm": arm, "metric": m, "mean": 0.1 * (i + 1), "std": 0.01}
                          for arm in ("action-only", "KARMA") for i, m in enumerate(metrics)])
    out = tmp_path / "arms.png"
    fig = arms_plot(table, out, per_row=4)
    h, w = _png_shape(out)
    assert h > w / 3 and w < 2500  # two rows of four slots, not one row of seven panels
    assert [ax.get_title() for ax in fig.axes] == metrics  # the empty eighth slot is removed
    with pytest.raises(ValueError, match="per_row"):
        arms_plot(table, per_row=0)


def test_attention_heatmap_row_title() -> None:
    attn = np.full((4, 6), 1 / 6)
    fig = attention_heatmap(attn, ["L1 H1", "L1 H2", "L2 H1", "L2 H2"], [f"item-{k}" for k in range(5, 0, -1)] + ["INT1"],
                            "one user", row_title="layer, head")
    assert fig.axes[0].get_ylabel() == "layer, head"
