"""Grids of tiny-backbone runs on CPU (the fallback when no GPU is at hand), plain loop, Amazon
Scientific (or MovieLens latest-small), 3 seeds per arm. Runs a grid (unless --summarize) and prints Markdown tables of test
metrics (mean ± std over seeds): retrieval, its long-tail breakdown, the semantic analyses when
measured, and each arm's paired difference from the grid's baseline arm.

- `ablation`: the KARMA ablation, 4 arms (which decoding branches are on), one epoch each; seed 0
  of every arm also draws the interest token's attention for one fixed test user.
- `negatives`: the action loss's candidates (KARMA weights), 3 epochs each: 32 or 1,024
  popularity-sampled negatives with logQ, or a full softmax over all items.
- `recipe-text`: the CPU recipe (configs/karma-scientific.yaml: the text channel, trained to
  convergence with early stopping on validation NDCG@10 over all validation users, test metrics
  of the best epoch), arms action-only, KARMA and text KARMA (titles of the last 5 history items
  in the prompt).
- `recipe-text-decode0.25`: the same with the decoding branches on a quarter of each batch (the
  recipe's value before; same quality, dearer epochs).
- `recipe`: the recipe before the text channel (lr 3e-3), the same three arms.
- `recipe-wide`: that recipe's lead, action-only and KARMA with a full softmax, a 64-wide model
  and dropout 0.1.
- `one-recipe-scientific` and `one-recipe-movielens`: the recipe with the early-stopping rule both
  data sets and SASRec share (configs/karma-scientific.yaml, configs/karma-movielens.yaml: only
  their data fields differ), arms action-only and KARMA. The recipe-* grids above stopped after 3
  raw epochs without a gain and pin that.
- `lr`: SmolLM2's schedule (batch 128, lr 3e-4, 100 warm-up steps, 1,024 negatives, one epoch)
  with the parts KARMA adds to the backbone at 1x, 10x or 30x that learning rate.

    python bench/ablation_cpu_tiny.py --data ../shared/data/amazon-scientific [--grid negatives]
    python bench/ablation_cpu_tiny.py --grid one-recipe-movielens --data ../shared/data/ml-latest-small
    python bench/ablation_cpu_tiny.py --summarize [--grid negatives]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = Path("docs") / "img"  # heat-maps, relative to ROOT
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Grid:
    folder: str  # under bench/results
    arms: dict[str, tuple[str, ...]]  # name -> config overrides
    baseline: str  # the arm the paired differences subtract
    epochs: int
    analysis_examples: int  # test users for the semantic analyses (0 = none)
    extra: tuple[str, ...] = ()  # further overrides, before the seed
    heatmaps: bool = False  # seed 0 of each arm draws its attention heat-map
    config: str = "configs/tiny.yaml"
    eval_users: int = 2000  # validation users scored each epoch (0 = all)
    pinned: tuple[str, ...] = ()  # config values of an older recipe, last on the command line
    source: str = "recbole"  # data.source of the data set the runs read (--data gives its path)

    @property
    def out(self) -> Path:
        return RESULTS / self.folder


RECIPE_ARMS = {
    "action-only": ("loss.w_gen=0.0", "loss.w_rec=0.0"),
    "karma": ("loss.w_gen=0.5", "loss.w_rec=0.5"),
    "text-karma": ("loss.w_gen=0.5", "loss.w_rec=0.5", "model.history_text_items=5")}
PRE_TEXT_CHANNEL = ("model.text_channel=false", "train.lr=3e-3")
RAW_PATIENCE_3 = ("train.early_stop_patience=3", "train.early_stop_window=1")  # the stop before the shared rule
ONE_RECIPE_ARMS = {arm: RECIPE_ARMS[arm] for arm in ("action-only", "karma")}


def recipe_grid(folder: str, arms: dict[str, tuple[str, ...]] = RECIPE_ARMS,
                config: str = "configs/karma-scientific.yaml", **kw) -> Grid:
    """A grid of the CPU recipe (configs/karma-scientific.yaml): trained to convergence with early
    stopping on all validation users, the semantic analyses on 512 test users."""
    return Grid(folder, arms, baseline="action-only", epochs=40, analysis_examples=512, config=config,
                eval_users=0, **kw)


GRIDS = {
    "ablation": Grid("ablation_cpu_tiny", {
        "action-only": ("loss.w_gen=0.0", "loss.w_rec=0.0"),
        "plus-generation": ("loss.w_gen=0.5", "loss.w_rec=0.0"),
        "plus-reconstruction": ("loss.w_gen=0.0", "loss.w_rec=0.5"),
        "karma": ("loss.w_gen=0.5", "loss.w_rec=0.5")},
        baseline="action-only", epochs=1, analysis_examples=512, heatmaps=True),
    "negatives": Grid("negatives_tiny", {
        "sampled32": ("loss.negatives=sampled", "loss.n_negatives=32"),
        "sampled1024": ("loss.negatives=sampled", "loss.n_negatives=1024"),
        "all": ("loss.negatives=all",)},
        baseline="sampled1024", epochs=3, analysis_examples=0, extra=("train.log_every=300",)),
    "lr": Grid("lr_scale_tiny", {
        "scale1": ("train.new_lr_scale=1",),
        "scale10": ("train.new_lr_scale=10",),
        "scale30": ("train.new_lr_scale=30",)},
        baseline="scale1", epochs=1, analysis_examples=0,
        extra=("train.batch_size=128", "train.lr=3e-4", "train.warmup_steps=100", "loss.n_negatives=1024",
               "train.log_every=0")),
    "one-recipe-scientific": recipe_grid("one_recipe_scientific", ONE_RECIPE_ARMS),
    "one-recipe-movielens": recipe_grid("one_recipe_movielens", ONE_RECIPE_ARMS, source="movielens",
                                        config="configs/karma-movielens.yaml"),
    # The grids below ran on earlier values of the recipe's config: they pin those values, after
    # the arguments their committed commands show.
    "recipe-text": recipe_grid("recipe_text_scientific", pinned=RAW_PATIENCE_3),
    # This one decoded a quarter of each batch; its runs wrote to recipe_text_scientific/ and were
    # moved here when the recipe changed.
    "recipe-text-decode0.25": recipe_grid("recipe_text_decode0.25_scientific",
                                          pinned=("loss.decode_fraction=0.25", *RAW_PATIENCE_3)),
    # These two ran before the recipe gained the text channel (and lr 1e-3).
    "recipe": recipe_grid("recipe_scientific", pinned=(*PRE_TEXT_CHANNEL, *RAW_PATIENCE_3)),
    # The recipe's lead (one seed so far): a full softmax, a 64-wide model and dropout 0.1.
    "recipe-wide": recipe_grid("recipe_wide_scientific", {arm: RECIPE_ARMS[arm] for arm in ("action-only", "karma")},
                               extra=("loss.negatives=all", "model.tiny_hidden=64", "model.embed_dim=64",
                                      "model.id_dim=64", "model.tiny_intermediate=128", "model.dropout=0.1"),
                               pinned=(*PRE_TEXT_CHANNEL, *RAW_PATIENCE_3)),
}
# (title, section of the result JSON, metrics)
TABLES = (
    ("Retrieval (test)", "test", ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "MRR")),
    ("Long-tail targets (test; fewer than 5 training interactions)", "test",
     ("tail/n_queries", "tail/HR@10", "tail/HR@50", "tail/HR@200", "tail/NDCG@200", "tail/MRR")),
    ("Semantic analyses (first {n} test users)", "analyses",
     ("sink_rate_first", "sink_rate_first_uniform", "sink_rate_item", "top1_share", "entropy", "barcode",
      "effective_rank", "mean_cosine", "token_f1", "category_match")),
)
PAIRED = ("HR@10", "NDCG@10", "tail/HR@200", "sink_rate_first", "effective_rank", "token_f1")


def heatmap_path(arm: str) -> Path:
    return IMG / f"ablation_tiny_{arm}_seed0.png"


def run(grid: Grid, data: str, jobs: int = 1) -> None:
    """Every (seed, arm) run of the grid, `jobs` processes at a time (one torch thread each)."""
    grid.out.mkdir(parents=True, exist_ok=True)
    commands = []
    for seed in SEEDS:
        for arm, overrides in grid.arms.items():
            heatmap = ["--heatmap", str(heatmap_path(arm))] if grid.heatmaps and seed == 0 else []
            commands.append([sys.executable, "jobs/train_plain.py", "--config", grid.config,
                             "--out", str(grid.out / f"{arm}-seed{seed}.json"), *heatmap, f"data.source={grid.source}",
                             f"data.path={data}", "data.max_history=50", f"train.epochs={grid.epochs}",
                             f"train.eval_max_users={grid.eval_users}",
                             f"train.analysis_examples={grid.analysis_examples}",
                             *grid.extra, f"train.seed={seed}", *overrides, *grid.pinned])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda c: subprocess.run(c, cwd=ROOT, check=True, env=env), commands))  # re-raises failures


def load_runs(grid: Grid) -> dict[str, list[dict]]:
    """Each arm's result JSONs, with the seed from the file name."""
    return {arm: [{**json.loads(p.read_text()), "seed": int(p.stem.rsplit("seed", 1)[1])}
                  for p in sorted(grid.out.glob(f"{arm}-seed*.json"))] for arm in grid.arms}


def cell(values: np.ndarray, count: bool = False) -> str:
    if np.isnan(values).all():
        return "–"  # not measured by these runs
    if count and np.all(values == values[0]):
        return f"{int(values[0])}"  # a count every seed shares (e.g. tail/n_queries)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {std:.4f}"


def table(runs: dict[str, list[dict]], section: str, metrics: tuple[str, ...]) -> list[str]:
    lines = ["| arm | seeds | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    for arm, rs in runs.items():
        rs = [r for r in rs if section in r]
        if rs:
            cells = [cell(np.array([r[section].get(m, np.nan) for r in rs], dtype=float), m.endswith("n_queries"))
                     for m in metrics]
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def metric(run: dict, name: str) -> float:
    return run.get("analyses", {}).get(name, run["test"].get(name, np.nan))


def paired(runs: dict[str, list[dict]], baseline: str) -> list[str]:
    """Each arm minus the baseline arm, seed by seed (the same seed: the same init and batch order)."""
    base = {r["seed"]: r for r in runs[baseline]}
    lines = [f"| arm − {baseline} | seeds | " + " | ".join(PAIRED) + " |", "| --- | --- |" + " --- |" * len(PAIRED)]
    for arm, rs in runs.items():
        pairs = [(r, base[r["seed"]]) for r in rs if arm != baseline and r["seed"] in base]
        if pairs:
            cells = [cell(np.array([metric(r, m) - metric(b, m) for r, b in pairs])) for m in PAIRED]
            lines.append(f"| {arm} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


def summarize(grid: Grid) -> str:
    runs = load_runs(grid)
    out = []
    for title, section, metrics in TABLES:
        if any(section in r for rs in runs.values() for r in rs):  # analyses only where measured
            title = title.format(n=grid.analysis_examples)
            out += [f"### {title}", "", *table(runs, section, metrics), ""]
    out += [f"### Paired by seed: each arm minus {grid.baseline} (test)", "", *paired(runs, grid.baseline)]
    return "\n".join(out)


def curve_figure(grid: Grid, path: Path, seed: int = 0, sasrec: Path = RESULTS / "sasrec_scientific.json") -> dict:
    """Validation NDCG@10 per epoch of each arm's run of `seed`, with SASRec's run of the same seed
    beside them (bench/sasrec_scientific.py records its curve), as a PNG; returns the curves."""
    from karma.plots import metric_curve

    curves = {arm: [e["NDCG@10"] for e in r["epochs"]] for arm, rs in load_runs(grid).items()
              for r in rs if r["seed"] == seed and "epochs" in r}
    if sasrec.is_file():
        for r in json.loads(sasrec.read_text())["per_seed"]:
            if r["seed"] == seed:
                curves["SASRec"] = r["valid_ndcg10_per_epoch"]
    metric_curve(curves, "validation NDCG@10", path=ROOT / path)
    return curves


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="the data set's folder (default: ../shared/data/amazon-scientific, or "
                                   "../shared/data/ml-latest-small for a MovieLens grid)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="ablation")
    ap.add_argument("--summarize", action="store_true", help="only print the tables of existing results")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one process and torch thread each")
    ap.add_argument("--figure", type=Path, help="also draw seed 0's validation NDCG@10 per epoch (PNG), "
                                                "SASRec's beside the arms")
    args = ap.parse_args()
    if not args.summarize:
        grid = GRIDS[args.grid]
        default = "../shared/data/ml-latest-small" if grid.source == "movielens" else "../shared/data/amazon-scientific"
        run(grid, args.data or default, args.jobs)
    if args.figure:
        curve_figure(GRIDS[args.grid], args.figure)
    print(summarize(GRIDS[args.grid]))
