"""Early-stopping rules replayed on recorded validation curves: where each rule would have
stopped, and how much of the curve's best validation NDCG@10 it would have kept.

Every committed result JSON records its validation NDCG@10 per epoch (SASRec's under
`per_seed[].valid_ndcg10_per_epoch`, KARMA's under `epochs[].NDCG@10`). A curve only tells what a
rule would have done up to the epoch its own run stopped, so each row says how far it was run;
a rule that would have gone further than that is marked "ran out" (its cost is then a lower bound).

    python bench/early_stop.py                               # the default curves -> bench/results/early_stop.json
    python bench/early_stop.py --curves 'bench/results/one_recipe_movielens/*.json'

The noise column is the median absolute change of NDCG@10 from one epoch to the next over the
curve's last 10 epochs, where the model has stopped improving: what one epoch moves by chance.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from karma.provenance import provenance, with_provenance  # noqa: E402
from karma.train.early_stop import StopRule  # noqa: E402

DEFAULT_CURVES = ("bench/results/sasrec_scientific.json", "bench/results/recipe_text_scientific/*.json",
                  "bench/results/one_recipe_*/*.json", "bench/results/one_recipe_*/sasrec_dropout/*.json",
                  "bench/results/one_recipe_*/probes/*.json")
RULES = {"raw, patience 3": StopRule(3), "raw, patience 10": StopRule(10),
         "3-epoch mean, patience 5": StopRule(5, window=3)}


def curves_of(path: Path) -> dict[str, list[float]]:
    """The validation NDCG@10 curves one result JSON holds, by a readable name."""
    d = json.loads(path.read_text())
    name = str(path.relative_to(ROOT))
    if "per_seed" in d:
        return {f"{name} seed {r['seed']}": r["valid_ndcg10_per_epoch"] for r in d["per_seed"]}
    if "epochs" in d:
        return {name: [e["NDCG@10"] for e in d["epochs"]]}
    return {}


def replay(curve: list[float], rule: StopRule) -> dict:
    stop = next((n for n in range(1, len(curve) + 1) if rule.should_stop(curve[:n])), None)
    n = stop or len(curve)
    return {"epochs": n, "ran_out": stop is None, "best_epoch": int(np.argmax(curve[:n])) + 1,
            "kept": round(max(curve[:n]) - max(curve), 5)}


def noise(curve: list[float]) -> float:
    tail = np.asarray(curve[-10:])
    return float(np.median(np.abs(np.diff(tail)))) if len(tail) > 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", nargs="+", default=list(DEFAULT_CURVES), help="globs under the checkout")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "early_stop.json")
    args = ap.parse_args(argv)
    curves = {}
    for pattern in args.curves:
        for path in sorted(ROOT.glob(pattern)):
            curves.update(curves_of(path))
    rows = [{"curve": name, "epochs_recorded": len(c), "best_epoch": int(np.argmax(c)) + 1,
             "best": round(max(c), 5), "noise": round(noise(c), 5),
             "rules": {label: replay(c, rule) for label, rule in RULES.items()}} for name, c in curves.items()]
    print("| curve | run | best (epoch) | noise | " + " | ".join(RULES) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(RULES))
    for r in rows:
        cells = [f"{x['epochs']}{'+' if x['ran_out'] else ''} ep, {x['kept']:+.4f}" for x in r["rules"].values()]
        print(f"| {r['curve']} | {r['epochs_recorded']} | {r['best']:.4f} ({r['best_epoch']}) | {r['noise']:.4f} | "
              + " | ".join(cells) + " |")
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/early_stop.py", *(argv or sys.argv[1:])])
    rules = {k: vars(v) for k, v in RULES.items()}
    prov = provenance({"rules": rules, "curves": args.curves}, command)
    args.out.write_text(json.dumps(with_provenance({"command": command, "rules": rules, "rows": rows}, prov),
                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
