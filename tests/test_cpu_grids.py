"""bench/ablation_cpu_tiny.py: the commands each grid runs and the tables it prints."""

import json
import shlex

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def grids():
    return load_script("bench/ablation_cpu_tiny.py")


def _commands(grids, monkeypatch, name) -> list[list[str]]:
    calls = []
    monkeypatch.setattr(grids.subprocess, "run", lambda args, **kw: calls.append(["python", *args[1:]]))
    grids.run(grids.GRIDS[name], "/data/sci")
    return calls


@pytest.mark.parametrize("name, arm, seed", [("ablation", "karma", 0), ("negatives", "all", 1), ("recipe", "text-karma", 2),
                                                  ("recipe-text", "karma", 1), ("lr", "scale10", 2)])
def test_run_repeats_the_committed_commands(grids, monkeypatch, name, arm, seed):
    """Each committed result regenerates from the script: same arguments, data path aside, and
    a grid of an older recipe appends the config values it ran with (its `pinned`)."""
    grid = grids.GRIDS[name]
    commands = _commands(grids, monkeypatch, name)
    assert len(commands) == len(grids.SEEDS) * len(grid.arms)
    recorded = shlex.split(json.loads((grid.out / f"{arm}-seed{seed}.json").read_text())["command"])
    mine = next(c for c in commands if any(a.endswith(f"/{arm}-seed{seed}.json") for a in c))
    if grid.pinned:
        assert mine[-len(grid.pinned):] == list(grid.pinned)
        mine = mine[:-len(grid.pinned)]
    assert _portable(mine) == _portable(recorded)


def _portable(args: list[str]) -> list[str]:
    """Arguments without the data path and the checkout's location."""
    return [a[a.index("bench/results/"):] if "bench/results/" in a else a
            for a in args if not a.startswith("data.path=")]


def test_summary_means_spreads_and_pairs(grids, monkeypatch, tmp_path):
    monkeypatch.setattr(grids, "RESULTS", tmp_path)
    grid = grids.GRIDS["negatives"]
    grid.out.mkdir()
    hr = {"sampled1024": [0.10, 0.12, 0.14], "all": [0.11, 0.15, 0.13], "sampled32": [0.2, 0.2, 0.2]}
    for arm, values in hr.items():
        for seed, v in enumerate(values):
            (grid.out / f"{arm}-seed{seed}.json").write_text(json.dumps({"test": {"HR@10": v, "tail/n_queries": 7}}))
    text = grids.summarize(grid)
    assert "| all | 3 | 0.1300 ± 0.0200 |" in text  # mean and sample std of 0.11, 0.15, 0.13
    assert "| sampled32 | 3 | 0.2000 ± 0.0000 |" in text
    assert "Semantic analyses" not in text  # none measured
    # paired by seed against sampled1024: all - base = 0.01, 0.03, -0.01
    assert "each arm minus sampled1024" in text and "| all | 3 | 0.0100 ± 0.0200 |" in text
    assert "| sampled1024 | 3 | 0.0" not in text.split("Paired")[1]  # the baseline has no row there


def test_recipe_figure_draws_each_arm_and_sasrec(grids, monkeypatch, tmp_path):
    monkeypatch.setattr(grids, "RESULTS", tmp_path)
    grid = grids.GRIDS["recipe"]
    grid.out.mkdir()
    for arm, curve in {"karma": [0.03, 0.05, 0.04], "action-only": [0.02, 0.03]}.items():
        (grid.out / f"{arm}-seed0.json").write_text(json.dumps({"epochs": [{"NDCG@10": v} for v in curve]}))
        (grid.out / f"{arm}-seed1.json").write_text(json.dumps({"epochs": [{"NDCG@10": 0.5}]}))
    sasrec = tmp_path / "sasrec.json"
    sasrec.write_text(json.dumps({"per_seed": [{"seed": 1, "valid_ndcg10_per_epoch": [0.9]},
                                               {"seed": 0, "valid_ndcg10_per_epoch": [0.01, 0.02, 0.06, 0.05]}]}))
    curves = grids.curve_figure(grid, tmp_path / "curve.png", sasrec=sasrec)
    assert curves == {"action-only": [0.02, 0.03], "karma": [0.03, 0.05, 0.04], "SASRec": [0.01, 0.02, 0.06, 0.05]}
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
