"""A parameter-free text baseline: rank every item by the cosine between its frozen MiniLM text
embedding and a recency-weighted mean of the user's last history items' embeddings. No training.
Same protocol as every model here (full ranking over all items, test split, long-tail breakdown).

It measures how much of the next item the item text alone already predicts, which is the signal
the text channel (model.text_channel) keeps at full width. The recency decay and the number of
items are picked on the validation split; the test numbers are of that pick.

    python bench/text_knn.py --data ../shared/data/amazon-scientific
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from karma.config import DataConfig
from karma.pipeline import prepare
from karma.retrieval import evaluate_retrieval
from karma.text import item_texts, text_embeddings

ROOT = Path(__file__).resolve().parents[1]
GRID = [(n, decay) for n in (1, 2, 3, 5) for decay in (1.0, 0.7, 0.5)]


def queries(text: np.ndarray, histories, n: int, decay: float) -> np.ndarray:
    """Per user: sum over the last n items of decay**(items back) * text embedding."""
    out = np.zeros((len(histories), text.shape[1]), dtype=np.float32)
    for row, hist in enumerate(histories):
        last = np.asarray(hist[-n:], dtype=np.int64)
        weights = decay ** np.arange(len(last) - 1, -1, -1, dtype=np.float32)
        out[row] = weights @ text[last]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of the RecBole atomic data set")
    ap.add_argument("--name", default="Scientific")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "text_knn_scientific.json"))
    args = ap.parse_args()
    cfg = DataConfig(source="recbole", path=args.data, name=args.name, max_history=50,
                     cache_dir=str(ROOT / ".cache" / "karma"))
    prep = prepare(cfg)
    text = text_embeddings(item_texts(prep.data.items), cfg.text_encoder, cfg.cache_dir)

    def measure(split, n, decay):
        q = queries(text, split.to_frame()["history"].tolist(), n, decay)
        return evaluate_retrieval(q, text, split.targets, target_counts=prep.counts)

    scores = {(n, decay): measure(prep.split.valid, n, decay)["NDCG@10"] for n, decay in GRID}
    n, decay = max(scores, key=scores.get)
    valid = {f"last{k}-decay{d}": v for (k, d), v in scores.items()}
    test = measure(prep.split.test, n, decay)
    result = {"what": "text kNN: cosine of frozen MiniLM item text to a recency-weighted mean of the last "
                      "history items' text; no training; full ranking, test split",
              "command": shlex.join(["python", "bench/text_knn.py", *sys.argv[1:]]),
              "valid_ndcg10_per_setting": valid, "picked": {"last_items": n, "decay": decay},
              "test": test}
    from karma.provenance import provenance, with_provenance

    Path(args.out).write_text(json.dumps(with_provenance(result, provenance(cfg, result["command"])), indent=2) + "\n")
    print(f"picked last {n} items, decay {decay} (validation NDCG@10 {scores[n, decay]:.4f})")
    print(f"test HR@10={test['HR@10']:.4f} NDCG@10={test['NDCG@10']:.4f} "
          f"tail/HR@10={test['tail/HR@10']:.4f} tail/HR@200={test['tail/HR@200']:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
