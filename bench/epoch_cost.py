"""What one training epoch costs: tiny KARMA against the SASRec baseline on the same data and
machine, measured side by side in one process (arms alternate, so drift in the host's load hits
both), one torch thread each. An epoch = one pass over the training examples plus the validation
scoring the recipe does after it (all validation users).

    python bench/epoch_cost.py --data ../shared/data/amazon-scientific [--rounds 2]

Writes bench/results/epoch_cost_cpu.json: per arm and round the train and eval seconds, the
median epoch per arm and its ratio to SASRec's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, overrides): the recipe's arms, KARMA before the text channel (the recipe's
# values then), and KARMA as it was before the cost switches
ARMS = {
    "sasrec": ("configs/sasrec-scientific.yaml", ()),
    "karma": ("configs/karma-scientific.yaml", ()),
    "text-karma": ("configs/karma-scientific.yaml", ("model.history_text_items=5",)),
    "karma-before-text-channel": ("configs/karma-scientific.yaml",
                                  ("model.text_channel=false", "loss.decode_fraction=0.25")),
    "karma-unbucketed-full-decoding": ("configs/karma-scientific.yaml",
                                       ("loss.decode_fraction=1.0", "train.bucket_batches=0")),
}


def one_epoch(config: str, overrides: tuple[str, ...] | list[str], data: str) -> dict:
    from karma.config import load_config
    from karma.train.plain import train_plain

    cfg = load_config(ROOT / config, [f"data.path={data}", *overrides, "train.epochs=1",
                                      "train.early_stop_patience=0", "train.analysis_examples=0",
                                      "train.log_every=0", "train.device=cpu"])
    r = train_plain(cfg, log=lambda m: None)
    e = r["epochs"][0]
    return {"train_s": round(e["train_seconds"], 2), "eval_s": round(e["eval_seconds"], 2),
            "epoch_s": round(e["train_seconds"] + e["eval_seconds"], 2), "steps": r["steps"],
            "batch_size": cfg.train.batch_size, "valid_NDCG@10": round(e["NDCG@10"], 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/amazon-scientific")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "epoch_cost_cpu.json")
    ap.add_argument("overrides", nargs="*", help="section.key=value, applied to every arm")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {a: [] for a in args.arms}
    start = time.time()
    for rnd in range(args.rounds):
        for arm in args.arms:
            config, overrides = ARMS[arm]
            r = one_epoch(config, [*overrides, *args.overrides], args.data)
            r["load_avg_1m"] = round(os.getloadavg()[0], 2)
            runs[arm].append(r)
            print(f"round {rnd + 1} {arm}: train {r['train_s']:.1f}s + eval {r['eval_s']:.1f}s "
                  f"({r['steps']} steps of {r['batch_size']})", flush=True)
    median = {a: float(np.median([r["epoch_s"] for r in rs])) for a, rs in runs.items()}
    base = median.get("sasrec")
    out = {
        "what": "seconds per epoch (train + validation scoring of all validation users), Amazon Scientific, "
                "one torch thread, arms alternating in one process",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "arms": {a: {"config": ARMS[a][0], "overrides": list(ARMS[a][1])} for a in args.arms},
        "runs": runs,
        "median_epoch_s": median,
        "ratio_to_sasrec": {a: round(m / base, 2) for a, m in median.items()} if base else None,
        "wall_s": round(time.time() - start, 1),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for a, m in median.items():
        print(f"{a:>32}: {m:6.1f} s/epoch" + (f"  {m / base:.2f}x SASRec" if base else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
