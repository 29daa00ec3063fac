"""Evaluation of a KARMA model on an example frame: full-corpus retrieval metrics and the
semantic analyses (attention sinks, read-out collapse, embedding health, decoded-text fidelity),
a long-tail breakdown of the retrieval metrics and one example's interest-token attention."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from karma.data import collate
from karma.metrics import (TAIL_THRESHOLD, effective_rank, fidelity_report, long_tail_report, mean_pairwise_cosine,
                           ranking_report, readout_collapse, sink_stats, uniform_sink_rate)
from karma.model import KarmaModel
from karma.retrieval import evaluate_retrieval
from karma.batch import prepare_batch
from karma.text import Tokenizer, item_texts


def validation_subset(valid: pd.DataFrame, max_users: int) -> pd.DataFrame:
    """The validation examples scored each epoch, by one rule for every training path: a fixed
    random sample of `max_users` (seed 0, independent of the training seed; 0 = all), kept in
    their original order. The first N would favour whichever users the reader lists first."""
    if not max_users or max_users >= len(valid):
        return valid
    return valid.sample(n=max_users, random_state=0).sort_index()


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
                      device, ks=(10, 50, 200), counts: np.ndarray | None = None,
                      tail_threshold: int = TAIL_THRESHOLD) -> dict[str, float]:
    """HR@K / NDCG@K and MRR over the full item pool (exact ranks); with the training
    `counts` (`Prepared.counts`), also their long-tail breakdown (`tail/...`)."""
    z = interest_embeddings(model, examples, tok, max_history, device)
    with torch.no_grad():
        items = model.item_embeddings().float().cpu().numpy()
    return evaluate_retrieval(z, items, examples["target"].to_numpy(), ks=tuple(ks), target_counts=counts,
                              tail_threshold=tail_threshold)


def popularity_metrics(counts: np.ndarray, examples: pd.DataFrame, ks=(10, 50, 200),
                       tail_threshold: int = TAIL_THRESHOLD) -> dict[str, float]:
    """The most-popular baseline: every user gets the same ranking by training frequency
    (with its long-tail breakdown: the floor a model's `tail/` numbers should clear)."""
    scores = torch.as_tensor(counts, dtype=torch.float64) + torch.linspace(0, 1e-6, len(counts), dtype=torch.float64)
    targets = torch.as_tensor(np.array(examples["target"], dtype=np.int64))  # a copy: Arrow columns are read-only
    # rank of each target in the single global ordering (pessimistic ties are broken by the tiny ramp)
    order = torch.argsort(scores, descending=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(1, len(order) + 1)
    ranks = rank_of[targets].float()
    return {**ranking_report(ranks, ks=tuple(ks)),
            **long_tail_report(ranks, np.asarray(counts)[targets.numpy()], tail_threshold, tuple(ks))}


@torch.no_grad()
def semantic_analyses(model: KarmaModel, examples: pd.DataFrame, items: pd.DataFrame, tok: Tokenizer,
                      max_history: int, device, n: int = 256, decode_tokens: int = 24,
                      ) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Sink rate, read-out collapse, effective rank and fidelity of text decoded from z;
    also a few (decoded, reference) text pairs for the eval report. `sink_rate_first_uniform`
    is the sink rate uniform attention would score on the same examples (short prompts
    have a "sink" at their first token by the definition alone)."""
    model.eval()
    sample = examples.iloc[:n]
    report: dict[str, float] = {}
    sink, collapse, zs, preds = [], [], [], []
    for b in batches(sample, 64, max_history):
        batch = prepare_batch(b, model, tok, device)
        maps = model.attention_maps(batch)
        sink.append({**sink_stats(maps["attentions"], maps["attention_mask"], maps["item_mask"]),
                     "sink_rate_first_uniform": uniform_sink_rate(maps["attention_mask"])})
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


def longest_history(examples: pd.DataFrame) -> int:
    """Row position of the example with the longest history (the first on ties): a fixed,
    data-independent rule for picking the user whose attention map a report shows."""
    return int(np.argmax(examples["history"].map(len).to_numpy()))


@torch.no_grad()
def interest_attention(model: KarmaModel, example: pd.DataFrame, tok: Tokenizer, max_history: int,
                       device) -> tuple[np.ndarray, list[str], list[str]]:
    """Attention of INT_1 over the prompt for the first row of `example`, one row per (layer,
    head): (attn [layers * heads, T], row labels, key labels), ready for
    karma.plots.attention_heatmap. Items are labelled by recency (item-1 = the latest)."""
    model.eval()
    batch = prepare_batch(next(batches(example.iloc[:1], 1, max_history)), model, tok, device)
    maps = model.attention_maps(batch)
    q = int(maps["query_positions"][0, 0])
    attn = torch.cat([a[0, :, q, :] for a in maps["attentions"]]).float().cpu().numpy()
    heads = maps["attentions"][0].shape[1]
    rows = [f"L{layer + 1} H{head + 1}" for layer in range(len(maps["attentions"])) for head in range(heads)]
    return attn, rows, _key_labels(maps)


def _key_labels(maps: dict) -> list[str]:
    is_item = maps["item_mask"][0].tolist()
    valid = maps["attention_mask"][0].tolist()
    interest = maps["query_positions"][0].tolist()
    left = sum(is_item)
    labels = []
    for t, (item, ok) in enumerate(zip(is_item, valid)):
        if item:
            labels.append(f"item-{left}")
            left -= 1
        elif t in interest:
            labels.append(f"INT{interest.index(t) + 1}")
        else:
            labels.append("query" if ok else "pad")
    return labels
