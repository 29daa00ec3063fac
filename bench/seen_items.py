"""How much of a model's top 10 is the user's own history, and what ranking without it gives.

The next item is almost never one the user already has (0.6% of Amazon Scientific's validation
and test targets, none of MovieLens's), yet the offline protocol keeps history items in the
ranking. The Serve endpoint drops them (`exclude_history`, on by default), so both numbers
matter: the protocol's, and what the endpoint would serve. Trains the config once per seed (the
plain loop, its stopping rule), then scores validation and test with the history kept and with
it excluded (`karma.evaluate.target_ranks(served=True)`), and counts the history items in each top 10.

    python bench/seen_items.py --config configs/karma-scientific.yaml --seeds 0 \\
        --out bench/results/seen_items/karma-scientific.json train.analysis_examples=0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

KS = (10, 50)


def seen_report(model, examples, tok, max_history: int) -> dict:
    """Share of top-10 slots held by history items; HR/NDCG@K and MRR with history kept and
    with it excluded; the share of targets that are in the history."""
    import torch

    from karma.batch import history_ids, prepare_batch
    from karma.evaluate import target_ranks
    from karma.metrics import ranking_report
    from karma.retrieval import exact_topk

    ranks = target_ranks(model, examples, tok, max_history, "cpu", served=True)  # [n, 2]: kept, excluded
    shares, repeats = [], []
    with torch.no_grad():
        items = model.item_embeddings().float()
        for b in examples.batches(256, max_history):
            _, top = exact_topk(model.interests(prepare_batch(b, model, tok, "cpu"))["z"].float(), items, 10)
            hist = history_ids(b)
            shares.append((top.unsqueeze(2) == hist.unsqueeze(1)).any(2).float().mean(1))
            repeats.append((hist == b["target"].unsqueeze(1)).any(1).float())
    return {"top10_share_in_history": float(torch.cat(shares).mean()),
            "targets_in_history": float(torch.cat(repeats).mean()),
            "history_kept": ranking_report(ranks[:, 0].double(), KS),
            "history_excluded": ranking_report(ranks[:, 1].double(), KS)}


def run_seed(config: str, seed: int, overrides: list[str]) -> dict:
    import torch

    from karma.config import load_config
    from karma.train.plain import train_plain

    torch.set_num_threads(1)
    cfg = load_config(config, [*overrides, f"train.seed={seed}"])
    res = train_plain(cfg, log=lambda m: None)
    model, tok, prep = res["model"], res["tokenizer"], res["prepared"]
    out = {"seed": seed, "best_epoch": res["best_epoch"]}
    for split in ("valid", "test"):
        out[split] = seen_report(model, getattr(prep.split, split), tok, cfg.data.max_history)
        print(f"[seed {seed}] {split}: " + json.dumps(out[split]), flush=True)
    return out


def main() -> None:
    from karma.config import load_config
    from karma.provenance import provenance, with_provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/seen_items.py " + shlex.join(sys.argv[1:])
    prov = provenance(load_config(args.config, args.overrides), command)
    result = {"what": "share of each top 10 that is the user's own history; metrics with the history kept "
                      "(the offline protocol) and excluded (what the Serve endpoint returns by default)",
              "command": command, "per_seed": [run_seed(args.config, s, args.overrides) for s in args.seeds]}
    args.out.write_text(json.dumps(with_provenance(result, prov), indent=1))


if __name__ == "__main__":
    main()
