"""Evaluation of a KARMA model on examples (`karma.data.Examples`): full-corpus retrieval metrics
from exact target ranks computed batch by batch (no one holds every user's z), the semantic
analyses (attention sinks, read-out collapse, embedding health, decoded-text fidelity), a
long-tail breakdown of the retrieval metrics and one example's interest-token attention."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from karma.data import Examples, validation_subset  # noqa: F401 (the data layer's rule, named here too)
from karma.metrics import (TAIL_THRESHOLD, effective_rank, fidelity_report, long_tail_report, mean_pairwise_cosine,
                           ranking_report, readout_collapse, sink_stats, uniform_sink_rate)
from karma.model import KarmaModel
from karma.retrieval import exact_ranks
from karma.batch import history_ids, prepare_batch
from karma.text import Tokenizer, item_texts

RANK_CHUNK = 65536  # items scored at once by exact_ranks (its memory: batch x chunk scores)


@torch.no_grad()
def target_ranks(model: KarmaModel, examples: Examples, tok: Tokenizer, max_history: int, device,
                 batch_size: int = 256, chunk_size: int = RANK_CHUNK, served: bool = False) -> torch.Tensor:
    """Each example's full-corpus 1-based target rank (int64 [n], pessimistic on ties;
    `karma.retrieval.exact_ranks`), batch by batch on `device`: memory is one batch's z and
    scores, whatever the number of examples. `served` adds a second column from the same
    forward, [n, 2]: the rank without the example's history items (its last max_history, the
    window the model reads), as the Serve endpoint returns by default; a target always stays.
    Every call runs the same module calls for the same number of examples (under ZeRO-3 each is
    a collective)."""
    model.eval()
    items = model.item_embeddings().float()
    seen = model.seen_offset()
    out = []
    for b in examples.batches(batch_size, max_history):
        z = model.interests(prepare_batch(b, model, tok, device))["z"].float().to(items.device)
        target = b["target"].to(items.device)
        hist = history_ids(b).to(items.device) if (served or seen is not None) else None
        # with model.seen_offset the history's items stay in the ranking, shifted by it
        ranks = exact_ranks(z, items, target, hist if seen is not None else None, chunk_size, exclude_offset=seen)
        if served:
            ranks = torch.stack([ranks, exact_ranks(z, items, target, hist, chunk_size)], 1)
        out.append(ranks.cpu())
    return torch.cat(out) if out else torch.zeros((0, 2) if served else 0, dtype=torch.long)


def retrieval_report(ranks: torch.Tensor | np.ndarray, targets: np.ndarray, ks: Sequence[int] = (10, 50, 200),
                     counts: np.ndarray | None = None, tail_threshold: int = TAIL_THRESHOLD) -> dict[str, float]:
    """HR@K / NDCG@K, MRR and n_queries of the target ranks and, with the training `counts`, their
    long-tail breakdown (`tail/...`): what `karma.retrieval.evaluate_retrieval` reports for the
    same ranks."""
    ranks = torch.as_tensor(ranks)
    out = ranking_report(ranks.double(), tuple(ks))
    out["n_queries"] = int(ranks.shape[0])
    if counts is not None:
        out.update(long_tail_report(ranks, np.asarray(counts)[np.asarray(targets, np.int64)], tail_threshold,
                                    tuple(ks)))
    return out


def retrieval_metrics(model: KarmaModel, examples: Examples, tok: Tokenizer, max_history: int,
                      device, ks=(10, 50, 200), counts: np.ndarray | None = None,
                      tail_threshold: int = TAIL_THRESHOLD) -> dict[str, float]:
    """HR@K / NDCG@K and MRR over the full item pool (exact ranks); with the training
    `counts` (`Prepared.counts`), also their long-tail breakdown (`tail/...`)."""
    ranks = target_ranks(model, examples, tok, max_history, device)
    return retrieval_report(ranks, examples.targets, ks, counts, tail_threshold)


def popularity_metrics(counts: np.ndarray, examples: Examples, ks=(10, 50, 200),
                       tail_threshold: int = TAIL_THRESHOLD) -> dict[str, float]:
    """The most-popular baseline: every user gets the same ranking by training frequency
    (with its long-tail breakdown: the floor a model's `tail/` numbers should clear)."""
    scores = torch.as_tensor(counts, dtype=torch.float64) + torch.linspace(0, 1e-6, len(counts), dtype=torch.float64)
    targets = torch.from_numpy(examples.targets)
    # rank of each target in the single global ordering (pessimistic ties are broken by the tiny ramp)
    order = torch.argsort(scores, descending=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(1, len(order) + 1)
    ranks = rank_of[targets].float()
    return {**ranking_report(ranks, ks=tuple(ks)),
            **long_tail_report(ranks, np.asarray(counts)[targets.numpy()], tail_threshold, tuple(ks))}


@torch.no_grad()
def semantic_analyses(model: KarmaModel, examples: Examples, items: pd.DataFrame, tok: Tokenizer,
                      max_history: int, device, n: int = 256, decode_tokens: int = 24,
                      ) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Sink rate, read-out collapse, effective rank and fidelity of text decoded from z;
    also a few (decoded, reference) text pairs for the eval report. `sink_rate_first_uniform`
    is the sink rate uniform attention would score on the same examples (short prompts
    have a "sink" at their first token by the definition alone)."""
    model.eval()
    sample = examples.head(n)
    report: dict[str, float] = {}
    sink, collapse, zs, preds = [], [], [], []
    for b in sample.batches(64, max_history):
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
    target_items = items.iloc[sample.targets]
    refs = item_texts(target_items)
    report.update(fidelity_report(preds, refs, target_items["category"].astype(str).tolist()))
    return report, list(zip(preds[:8], refs[:8]))


def longest_history(examples: Examples) -> int:
    """Row position of the example with the longest history (the first on ties): a fixed,
    data-independent rule for picking the user whose attention map a report shows."""
    return int(np.argmax(examples.history_lengths))


@torch.no_grad()
def interest_attention(model: KarmaModel, example: Examples, tok: Tokenizer, max_history: int,
                       device) -> tuple[np.ndarray, list[str], list[str]]:
    """Attention of INT_1 over the prompt for the first row of `example`, one row per (layer,
    head): (attn [layers * heads, T], row labels, key labels), ready for
    karma.plots.attention_heatmap. Items are labelled by recency (item-1 = the latest)."""
    model.eval()
    batch = prepare_batch(example.head(1).collate(max_history), model, tok, device)
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
