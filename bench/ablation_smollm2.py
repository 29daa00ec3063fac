"""The KARMA ablation with the SmolLM2-135M backbone (tune_spaces/ablation.yaml on one GPU):
collect a finished (or cut-short) sweep into one JSON, and print its tables for docs/RESULTS.md.

    # on the GPU host, after jobs/tune.py (bench/gpu_ablation.sh runs all of it):
    python bench/ablation_smollm2.py collect runs/tune/ablation --out bench/results/ablation_smollm2.json \
        --img docs/img --command "..."
    # anywhere:
    python bench/ablation_smollm2.py table [--json PART.json ...]   # parts of one grid are merged

`collect` keeps every trial's numeric metrics (the validation split of the last epoch, and the
test split as `test/...`), its arm, seed and status, and copies the interest-attention heat-map
of each arm's first seed. `table` prints mean ± sample std over seeds per arm (test split), and each
arm's per-seed difference from action-only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from karma.tune import (ARM, TEST_PREFIX, Space, TrialSummary, arms_table, markdown_table,  # noqa: E402
                        read_manifest, summarize, trial_run_name)
from karma.train.ray_job import final_checkpoint_dir  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "ablation_smollm2.json"
SECTIONS = (
    ("Retrieval (test split, full ranking over all items)", ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "MRR")),
    ("Long-tail targets (test; fewer than 5 training interactions)", ("tail/HR@10", "tail/NDCG@10", "tail/MRR")),
    ("Semantic analyses (test split)", ("sink_rate_first", "sink_rate_item", "barcode", "effective_rank",
                                        "token_f1", "category_match")),
)
PAIRED = ("HR@10", "NDCG@10", "sink_rate_first", "effective_rank")


def heatmap_name(arm: str, seed: int) -> str:
    return "ablation_smollm2_" + "".join(c if c.isalnum() else "-" for c in arm.lower()).strip("-") + f"_seed{seed}.png"


def collect(sweep: Path, out: Path, img: Path | None, command: str) -> dict:
    import torch

    manifest = read_manifest(sweep)
    space = Space(**manifest["space"])
    storage = Path(manifest["config"]["dist"]["storage_path"])
    trials = []
    for t in summarize(sweep):
        metrics = {k: float(v) for k, v in t.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        arm, seed = t.params.get(ARM), t.params.get("train.seed")
        trials.append({"trial_id": t.trial_id, "status": t.status, "complete": t.complete, "arm": arm,
                       "seed": seed, "error": t.error, "metrics": metrics})
        heat = final_checkpoint_dir(storage, trial_run_name(space.name, t.trial_id)) / "report" / "interest_attention.png"
        if img is not None and seed == space.seeds[0] and heat.is_file():
            img.mkdir(parents=True, exist_ok=True)
            shutil.copy(heat, img / heatmap_name(str(arm), seed))
    result = {
        "command": command,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "finished": bool(manifest.get("finished")),
        "space": manifest["space"],
        "config": manifest["config"],
        "trials": trials,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    done = sum(t["complete"] for t in trials)
    print(f"{out}: {done}/{len(trials)} trials complete")
    return result


def merge(results: list[dict]) -> dict:
    """Parts of one grid (sweeps of the same space run with different --seeds) as one result; a
    completed trial of an arm and seed replaces one that did not complete (a part cut short)."""
    first = results[0]
    for r in results[1:]:
        if r["space"]["arms"] != first["space"]["arms"]:
            raise SystemExit("--json files are not parts of one grid: their arms differ")
    trials: dict = {}
    for t in (t for r in results for t in r["trials"]):
        key = (t["arm"], t["seed"])
        if key not in trials or (t["complete"] and not trials[key]["complete"]):
            trials[key] = t
    seeds = sorted({s for r in results for s in r["space"]["seeds"]})
    return {**first, "space": {**first["space"], "seeds": seeds}, "trials": list(trials.values())}


def summaries(result: dict) -> list[TrialSummary]:
    return [TrialSummary(t["trial_id"], t["status"], {ARM: t["arm"], "train.seed": t["seed"]}, t["metrics"],
                         t["complete"], None, None, t["error"]) for t in result["trials"]]


def paired(result: dict, base: str = "action-only") -> str:
    """Each arm minus `base` on the same seed: mean ± sample std of the differences."""
    by = {(t["arm"], t["seed"]): t["metrics"] for t in result["trials"] if t["complete"]}
    arms = [a for a in result["space"]["arms"] if a != base]
    lines = [f"| arm − {base} | seeds | " + " | ".join(PAIRED) + " |", "| --- | ---: |" + " ---: |" * len(PAIRED)]
    for arm in arms:
        seeds = [s for s in result["space"]["seeds"] if (arm, s) in by and (base, s) in by]
        cells = []
        for m in PAIRED:
            key = TEST_PREFIX + m
            d = np.array([by[(arm, s)][key] - by[(base, s)][key] for s in seeds
                          if key in by[(arm, s)] and key in by[(base, s)]])
            cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.4f}" if len(d) else "–")
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: dict) -> str:
    trials = summaries(result)
    space = Space(**result["space"])
    full = arms_table(trials, space, result["config"]["train"]["ks"])
    parts = []
    for title, metrics in SECTIONS:
        sub = full[full["metric"].isin(metrics)]
        if len(sub):
            parts.append(f"### {title}\n\n{markdown_table(sub)}\n")
    parts.append(f"### Paired differences from action-only (test split, same seed)\n\n{paired(result)}\n")
    failed = [t for t in result["trials"] if not t["complete"]]
    if failed:
        parts.append("Not in the tables: " + "; ".join(f"{t['arm']} seed {t['seed']} ({t['status']}"
                                                       f"{': ' + t['error'] if t['error'] else ''})" for t in failed))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="a sweep folder -> one JSON (+ heat-maps)")
    c.add_argument("sweep", type=Path)
    c.add_argument("--out", type=Path, default=DEFAULT_JSON)
    c.add_argument("--img", type=Path, help="folder for the heat-map of each arm's first seed")
    c.add_argument("--command", default="", help="the command that ran the sweep, recorded in the JSON")
    t = sub.add_parser("table", help="Markdown tables of collected JSON (several: parts of one grid, merged)")
    t.add_argument("--json", type=Path, action="append", help=f"repeatable; default {DEFAULT_JSON.name}")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        collect(args.sweep, args.out, args.img, args.command)
    else:
        print(table(merge([json.loads(p.read_text()) for p in args.json or [DEFAULT_JSON]])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
