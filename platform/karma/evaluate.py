"""Evaluation of a KARMA model on an example frame: full-corpus retrieval metrics and the
semantic analyses (attention sinks, read-out collapse, embedding health, decoded-text fidelity)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from karma.data import collate
from karma.metrics import effective_rank, fidelity_report, mean_pairwise_cosine, ranking_report, readout_collapse, sink_stats
from karma.model import KarmaModel
from karma.retrieval import evaluate_retrieval
from karma.step import prepare_batch
from karma.text import Tokenizer, item_texts


def batches(examples: pd.DataFrame, batch_size: int, max_history: int):
    for start in range(0, len(examples), batch_size):
        rows = examples.iloc[start : start + batch_size]
        yield collate({c: rows[c].tolist() for c in rows.columns}, max_history)


@torch.no_grad()
def interest_embeddings(model: KarmaModel, examples: pd.DataFrame, tok: Tokenizer, max_history: int,
                        device, batch_size: int = 256) -> np.ndarray:
    """z for every example: [n, H, d] float32."""
    model.eval()
    out = [model.interests(prepare_batch(b, model, tok, device))["z"].float().cpu()
           for b in batches(examples, batch_size, max_history)]
    return torch.cat(out).numpy()


def retrieval_metrics(model: KarmaModel, examples: pd.DataFrame, tok: Tokenizer, max_history: int,
                      device, ks=(10, 50, 200)) -> dict[str, float]:
    """HR@K / NDCG@K over the full item pool (faiss) and exact MRR."""
    z = interest_embeddings(model, examples, tok, max_history, device)
    with torch.no_grad():
        items = model.item_embeddings().float().cpu().numpy()
    return evaluate_retrieval(z, items, examples["target"].to_numpy(), ks=tuple(ks))


def popularity_metrics(counts: np.ndarray, examples: pd.DataFrame, ks=(10, 50, 200)) -> dict[str, float]:
    """The most-popular baseline: every user gets the same ranking by training frequency."""
    scores = torch.as_tensor(counts, dtype=torch.float64) + torch.linspace(0, 1e-6, len(counts), dtype=torch.float64)
    targets = torch.as_tensor(examples["target"].to_numpy())
    # rank of each target in the single global ordering (pessimistic ties are broken by the tiny ramp)
    order = torch.argsort(scores, descending=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(1, len(order) + 1)
    return ranking_report(rank_of[targets].float(), ks=tuple(ks))


@torch.no_grad()
def semantic_analyses(model: KarmaModel, examples: pd.DataFrame, items: pd.DataFrame, tok: Tokenizer,
                      max_history: int, device, n: int = 256, decode_tokens: int = 24,
                      ) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Sink rate, read-out collapse, effective rank and fidelity of text decoded from z;
    also a few (decoded, reference) text pairs for the eval report."""
    model.eval()
    sample = examples.iloc[:n]
    report: dict[str, float] = {}
    sink, collapse, zs, preds = [], [], [], []
    for b in batches(sample, 64, max_history):
        batch = prepare_batch(b, model, tok, device)
        maps = model.attention_maps(batch)
        sink.append(sink_stats(maps["attentions"], maps["attention_mask"], maps["item_mask"]))
        collapse.append(readout_collapse(maps["attentions"], maps["attention_mask"], maps["query_positions"]))
        z = model.interests(batch)["z"]
        zs.append(z.float().cpu())
        preds += [tok.decode(ids) for ids in model.decode_from_z(z, decode_tokens)]
    for part in (sink, collapse):
        for key in part[0]:
            report[key] = float(np.mean([p[key] for p in part]))
    z = torch.cat(zs)[:, 0]
    report["effective_rank"] = float(effective_rank(z))
    report["mean_cosine"] = float(mean_pairwise_cosine(z))
    target_items = items.iloc[sample["target"].to_numpy()]
    refs = item_texts(target_items)
    report.update(fidelity_report(preds, refs, target_items["category"].astype(str).tolist()))
    return report, list(zip(preds[:8], refs[:8]))
