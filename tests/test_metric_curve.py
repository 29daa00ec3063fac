"""karma.plots.metric_curve: one line per named curve, curves of different lengths, a real PNG."""

from __future__ import annotations

import pytest
from matplotlib.image import imread

from karma.plots import metric_curve


def test_one_line_per_arm(tmp_path):
    curves = {"KARMA": [0.10, 0.14, 0.15, 0.149], "action-only": [0.09, 0.12], "SASRec": [0.05, 0.08, 0.11]}
    fig = metric_curve(curves, "validation NDCG@10", tmp_path / "img" / "curve.png")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == list(curves)
    assert list(ax.get_lines()[1].get_xdata()) == [1, 2]  # epochs count from 1
    assert ax.get_ylabel() == "validation NDCG@10"
    assert imread(tmp_path / "img" / "curve.png").shape[0] > 200


@pytest.mark.parametrize("curves", [{}, {"KARMA": []}])
def test_refuses_empty_curves(curves):
    with pytest.raises(ValueError, match="metric_curve"):
        metric_curve(curves, "NDCG@10")
