"""The KARMA ablation grid with the tiny random backbone on CPU (the fallback when no GPU is at
hand): 4 arms x 3 seeds, one epoch each, plain loop, Amazon Scientific. Runs the grid (unless
--summarize) and prints the Markdown table of test metrics (mean ± std over seeds).

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
ARMS = {"action-only": (0.0, 0.0), "plus-generation": (0.5, 0.0), "plus-reconstruction": (0.0, 0.5),
        "karma": (0.5, 0.5)}
SEEDS = (0, 1, 2)
METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")


def run(data: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS:
        for arm, (w_gen, w_rec) in ARMS.items():
            subprocess.run([sys.executable, "jobs/train_plain.py", "--config", "configs/tiny.yaml",
                            "--out", str(OUT / f"{arm}-seed{seed}.json"), "data.source=recbole",
                            f"data.path={data}", "data.max_history=50", "train.epochs=1",
                            "train.eval_max_users=2000", f"train.seed={seed}", f"loss.w_gen={w_gen}",
                            f"loss.w_rec={w_rec}"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def summarize() -> str:
    lines = ["| arm | seeds | " + " | ".join(f"test {m}" for m in METRICS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for arm in ARMS:
        runs = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{arm}-seed*.json"))]
        if not runs:
            continue
        cells = []
        for m in METRICS:
            v = np.array([r["test"][m] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-scientific")
    ap.add_argument("--summarize", action="store_true", help="only print the table of existing results")
    args = ap.parse_args()
    if not args.summarize:
        run(args.data)
    print(summarize())
