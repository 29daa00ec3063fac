"""The KARMA ablation grid with the tiny random backbone on CPU (the fallback when no GPU is at
hand): 4 arms x 3 seeds, one epoch each, plain loop, Amazon Scientific. Runs the grid (unless
--summarize) and prints Markdown tables of test metrics (mean ± std over seeds): retrieval, its
long-tail breakdown, the semantic analyses, and each arm's paired difference from action-only.
Seed 0 of every arm also draws the interest token's attention for one fixed test user.

    python bench/ablation_cpu_tiny.py --data ../shared/data/amazon-scientific
    python bench/ablation_cpu_tiny.py --summarize
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ablation_cpu_tiny"
IMG = Path("docs") / "img"  # heat-maps, relative to ROOT
ARMS = {"action-only": (0.0, 0.0), "plus-generation": (0.5, 0.0), "plus-reconstruction": (0.0, 0.5),
        "karma": (0.5, 0.5)}
SEEDS = (0, 1, 2)
ANALYSIS_EXAMPLES = 512  # test users for the semantic analyses
# (title, section of the result JSON, metrics)
TABLES = (
    ("Retrieval (test)", "test", ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "MRR")),
    ("Long-tail targets (test; fewer than 5 training interactions)", "test",
     ("tail/n_queries", "tail/HR@10", "tail/HR@50", "tail/HR@200", "tail/NDCG@200", "tail/MRR")),
    (f"Semantic analyses (first {ANALYSIS_EXAMPLES} test users)", "analyses",
     ("sink_rate_first", "sink_rate_first_uniform", "sink_rate_item", "top1_share", "entropy", "barcode",
      "effective_rank", "mean_cosine", "token_f1", "category_match")),
)
PAIRED = ("HR@10", "NDCG@10", "tail/HR@200", "sink_rate_first", "effective_rank", "token_f1")


def heatmap_path(arm: str) -> Path:
    return IMG / f"ablation_tiny_{arm}_seed0.png"


def run(data: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS:
        for arm, (w_gen, w_rec) in ARMS.items():
            heatmap = ["--heatmap", str(heatmap_path(arm))] if seed == 0 else []
            subprocess.run([sys.executable, "jobs/train_plain.py", "--config", "configs/tiny.yaml",
                            "--out", str(OUT / f"{arm}-seed{seed}.json"), *heatmap, "data.source=recbole",
                            f"data.path={data}", "data.max_history=50", "train.epochs=1",
                            "train.eval_max_users=2000", f"train.analysis_examples={ANALYSIS_EXAMPLES}",
                            f"train.seed={seed}", f"loss.w_gen={w_gen}", f"loss.w_rec={w_rec}"],
                           cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def load_runs() -> dict[str, list[dict]]:
    """Each arm's result JSONs, with the seed from the file name."""
    return {arm: [{**json.loads(p.read_text()), "seed": int(p.stem.rsplit("seed", 1)[1])}
                  for p in sorted(OUT.glob(f"{arm}-seed*.json"))] for arm in ARMS}


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


def paired(runs: dict[str, list[dict]]) -> list[str]:
    """Each arm minus action-only, seed by seed (the same seed: the same init and batch order)."""
    base = {r["seed"]: r for r in runs["action-only"]}
    lines = ["| arm − action-only | seeds | " + " | ".join(PAIRED) + " |", "| --- | --- |" + " --- |" * len(PAIRED)]
    for arm, rs in runs.items():
        pairs = [(r, base[r["seed"]]) for r in rs if arm != "action-only" and r["seed"] in base]
        if pairs:
            cells = [cell(np.array([metric(r, m) - metric(b, m) for r, b in pairs])) for m in PAIRED]
            lines.append(f"| {arm} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


def summarize() -> str:
    runs = load_runs()
    out = []
    for title, section, metrics in TABLES:
        out += [f"### {title}", "", *table(runs, section, metrics), ""]
    out += ["### Paired by seed: each arm minus action-only (test)", "", *paired(runs)]
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-scientific")
    ap.add_argument("--summarize", action="store_true", help="only print the tables of existing results")
    args = ap.parse_args()
    if not args.summarize:
        run(args.data)
    print(summarize())
