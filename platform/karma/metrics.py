"""Evaluation metrics: full-corpus ranking, AUC/gAUC, attention-sink and read-out
statistics, embedding health and semantic fidelity of decoded text.

Inputs may be torch tensors or numpy arrays; results are python floats (or dicts of
floats). Ranks are 1-based and may be float +inf for "not retrieved" (see
karma.retrieval.ranks_from_topk); every ranking metric counts those as misses.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "target_ranks",
    "hit_rate",
    "ndcg",
    "mrr",
    "ranking_report",
    "long_tail_report",
    "TAIL_THRESHOLD",
    "auc",
    "gauc",
    "sink_stats",
    "uniform_sink_rate",
    "readout_collapse",
    "effective_rank",
    "mean_pairwise_cosine",
    "token_f1",
    "category_match",
    "fidelity_report",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _t(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _np(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------- ranking


def target_ranks(
    scores: ArrayLike, targets: ArrayLike, exclude_mask: ArrayLike | None = None
) -> torch.Tensor:
    """1-based rank of each target in its row, pessimistic on ties.

    rank = 1 + #(other, non-excluded items with score >= target's score), so a model
    that scores everything equal gets the worst rank rather than the best. NaN
    scores count against the target (a NaN target ranks last).
    """
    s, t = _t(scores), _t(targets).long()
    if s.dim() != 2:
        raise ValueError(f"scores must be [B,N], got shape {tuple(s.shape)}")
    B, N = s.shape
    if t.shape != (B,):
        raise ValueError(f"targets must be [B]=[{B}], got shape {tuple(t.shape)}")
    if B and (int(t.min()) < 0 or int(t.max()) >= N):
        raise ValueError(f"targets must lie in [0, {N}), got range [{int(t.min())}, {int(t.max())}]")
    rows = torch.arange(B, device=s.device)
    t = t.to(s.device)
    tgt = s[rows, t].unsqueeze(1)
    keep = torch.ones_like(s, dtype=torch.bool)
    if exclude_mask is not None:
        ex = _t(exclude_mask).to(s.device).bool()
        if ex.shape != s.shape:
            raise ValueError(f"exclude_mask must be [B,N]={(B, N)}, got shape {tuple(ex.shape)}")
        keep &= ~ex
    keep[rows, t] = False
    beats = (s >= tgt) | s.isnan() | tgt.isnan()
    return 1 + (beats & keep).sum(dim=1)


def _ranks(ranks: ArrayLike) -> np.ndarray:
    r = _np(ranks).reshape(-1)
    if r.size == 0:
        raise ValueError("ranks must be non-empty")
    if np.any(np.isnan(r)) or np.any(r < 1):
        raise ValueError("ranks must be >= 1 (inf allowed for 'not found')")
    return r


def hit_rate(ranks: ArrayLike, k: int) -> float:
    """Share of targets ranked within the top k."""
    return float(np.mean(_ranks(ranks) <= k))


def ndcg(ranks: ArrayLike, k: int) -> float:
    """Mean of 1/log2(rank+1) for rank <= k, else 0 (one relevant item per query)."""
    r = _ranks(ranks)
    hit = r <= k
    gain = np.zeros_like(r)
    gain[hit] = 1.0 / np.log2(r[hit] + 1.0)
    return float(gain.mean())


def mrr(ranks: ArrayLike) -> float:
    """Mean reciprocal rank, no cutoff (an infinite rank contributes 0)."""
    return float(np.mean(1.0 / _ranks(ranks)))


def ranking_report(ranks: ArrayLike, ks: Sequence[int] = (10, 50, 200)) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    out["MRR"] = mrr(ranks)
    return out


TAIL_THRESHOLD = 5  # a long-tail target has fewer training interactions than this


def long_tail_report(
    ranks: ArrayLike,
    target_counts: ArrayLike,
    threshold: int = TAIL_THRESHOLD,
    ks: Sequence[int] = (10, 50, 200),
    prefix: str = "tail/",
) -> dict[str, float]:
    """ranking_report over the queries whose target has fewer than `threshold` training
    interactions (`target_counts[i]` belongs to query i's target), keys prefixed `tail/`;
    `tail/n_queries` counts them. With no such query the metrics are nan, not an error:
    a split may simply have no rare targets."""
    r = _ranks(ranks)
    c = _np(target_counts).reshape(-1)
    if c.shape != r.shape:
        raise ValueError(f"target_counts must have one count per rank ({r.size}), got {c.size}")
    if np.any(c < 0) or np.any(np.isnan(c)):
        raise ValueError("target_counts must be non-negative")
    tail = c < threshold
    n = int(tail.sum())
    report = ranking_report(r[tail], ks) if n else {
        **{f"{m}@{k}": float("nan") for k in ks for m in ("HR", "NDCG")}, "MRR": float("nan")}
    out: dict[str, float] = {f"{prefix}{key}": value for key, value in report.items()}
    out[f"{prefix}n_queries"] = n
    return out


# ---------------------------------------------------------------- AUC


def _avg_ranks_sorted(keys_equal_prev: np.ndarray) -> np.ndarray:
    """Average 1-based ranks for an already sorted array, given which entries tie
    with their predecessor; ties share the mean of the positions they span."""
    n = keys_equal_prev.size
    starts = np.flatnonzero(~keys_equal_prev)  # start of each run of equal keys
    lengths = np.diff(np.append(starts, n))
    avg = starts + (lengths + 1) / 2.0
    return np.repeat(avg, lengths)


def auc(pos_scores: ArrayLike, neg_scores: ArrayLike) -> float:
    """P(score of a random positive > a random negative), ties counting 1/2.

    Mann-Whitney U from tie-averaged ranks: O(n log n).
    """
    p, n = _np(pos_scores).reshape(-1), _np(neg_scores).reshape(-1)
    if p.size == 0 or n.size == 0:
        raise ValueError(f"pos_scores and neg_scores must be non-empty, got {p.size} and {n.size}")
    allv = np.concatenate([p, n])
    order = np.argsort(allv, kind="stable")
    sv = allv[order]
    eq_prev = np.zeros(sv.size, dtype=bool)
    eq_prev[1:] = sv[1:] == sv[:-1]
    ranks = np.empty(sv.size)
    ranks[order] = _avg_ranks_sorted(eq_prev)
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * n.size))


def gauc(group_ids: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> float:
    """Per-group AUC averaged with weights = rows per group, over groups holding both
    a positive and a negative; nan when no group qualifies. Vectorised over groups."""
    g = _np(group_ids, dtype=np.int64).reshape(-1)
    y = _np(labels).reshape(-1)
    s = _np(scores).reshape(-1)
    if not (g.size == y.size == s.size):
        raise ValueError(f"group_ids, labels, scores must have equal length, got {g.size}, {y.size}, {s.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if g.size == 0:
        return float("nan")
    _, gi = np.unique(g, return_inverse=True)
    order = np.lexsort((s, gi))  # by group, then score
    gs, ss = gi[order], s[order]
    same_group_prev = np.zeros(gs.size, dtype=bool)
    same_group_prev[1:] = gs[1:] == gs[:-1]
    tie_prev = same_group_prev & np.append(False, ss[1:] == ss[:-1])
    pos_in_sorted = _avg_ranks_sorted(tie_prev)  # global positions, tie-averaged
    group_start = np.flatnonzero(~same_group_prev)  # first sorted index of each group
    ranks = pos_in_sorted - group_start[gs]  # 1-based rank within the group
    G = group_start.size
    n = np.bincount(gs, minlength=G).astype(np.float64)
    n_pos = np.bincount(gs, weights=y[order], minlength=G)
    r_pos = np.bincount(gs, weights=ranks * y[order], minlength=G)
    n_neg = n - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    auc_g = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(auc_g * n[ok]) / np.sum(n[ok]))


# ---------------------------------------------------------------- attention


def _check_attn(attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> tuple[int, int]:
    if len(attentions) == 0:
        raise ValueError("attentions must hold at least one layer")
    B, T = attention_mask.shape
    for i, a in enumerate(attentions):
        if a.dim() != 4 or a.shape[0] != B or a.shape[2] != T or a.shape[3] != T:
            raise ValueError(f"attentions[{i}] must be [B,heads,T,T] with B={B}, T={T}, got {tuple(a.shape)}")
    return B, T


def sink_stats(
    attentions: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    item_mask: torch.Tensor,
    threshold: float = 0.3,
) -> dict[str, float]:
    """Attention-sink rates in the sense of Gu et al. (ICLR 2025).

    Importance of key k in (example, layer, head) = mean attention it receives from
    the valid queries q >= k. A (example, layer, head) triple has a sink at k when
    that exceeds `threshold`. Reported: share of triples with a sink at the first
    valid (non-pad) position, and share with a sink at any item position (an item at
    the first valid position counts for both).
    """
    m = _t(attention_mask).bool()
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be [B,T], got shape {tuple(m.shape)}")
    im = _t(item_mask).bool()
    if im.shape != m.shape:
        raise ValueError(f"item_mask must be [B,T]={tuple(m.shape)}, got shape {tuple(im.shape)}")
    B, T = _check_attn(attentions, m)
    dev = attentions[0].device
    m, im = m.to(dev), im.to(dev)
    if not m.any(dim=1).all():
        raise ValueError("attention_mask has an example with no valid token")
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=dev))  # [q,k]: q >= k
    qk = causal.unsqueeze(0) & m.unsqueeze(2)  # valid queries q >= k, [B,q,k]
    n_q = qk.sum(dim=1).clamp(min=1)  # [B,k]
    first = m.float().argmax(dim=1)  # first valid position (left padding)
    key_ok = (im & m).unsqueeze(1)  # [B,1,k]
    rows = torch.arange(B, device=dev)
    n_first = n_item = n_total = 0
    for a in attentions:
        a = a.float() * qk.unsqueeze(1)  # [B,heads,q,k]
        imp = a.sum(dim=2) / n_q.unsqueeze(1)  # [B,heads,k]
        sink = imp > threshold
        n_first += int(sink[rows, :, first].sum())
        n_item += int((sink & key_ok).any(dim=2).sum())
        n_total += sink.shape[0] * sink.shape[1]
    return {"sink_rate_first": n_first / n_total, "sink_rate_item": n_item / n_total}


def uniform_sink_rate(attention_mask: torch.Tensor, threshold: float = 0.3) -> float:
    """The sink_rate_first that uniform causal attention scores on these examples: the level
    short sequences reach with no sink at all. Uniform attention gives the first of n valid
    tokens the importance H_n / n (harmonic number), above 0.3 for every n <= 9."""
    m = _t(attention_mask).bool()
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be [B,T], got shape {tuple(m.shape)}")
    n = m.sum(dim=1).cpu().double()
    if not (n > 0).all():
        raise ValueError("attention_mask has an example with no valid token")
    harmonic = torch.cumsum(1.0 / torch.arange(1, m.shape[1] + 1, dtype=torch.float64), 0)
    importance = harmonic[n.long() - 1] / n
    return float((importance > threshold).double().mean())


def readout_collapse(
    attentions: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    query_positions: torch.Tensor,
) -> dict[str, float]:
    """How concentrated the attention of the interest (INT) query rows is.

    top1_share: mean max attention weight of the INT rows over layers and heads.
    entropy: mean entropy of those rows divided by log(#valid causal keys) (0 when
      only one key is visible).
    barcode: share of examples whose argmax key (last layer, heads and INT rows
      averaged), counted back from the last valid token, is the most common such
      offset; near 1 means every user's read-out stares at the same slot.
    """
    m = _t(attention_mask).bool()
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be [B,T], got shape {tuple(m.shape)}")
    B, T = _check_attn(attentions, m)
    dev = attentions[0].device
    m = m.to(dev)
    qp = _t(query_positions).long().to(dev)
    if qp.dim() == 1:
        qp = qp.unsqueeze(1)
    if qp.dim() != 2 or qp.shape[0] != B:
        raise ValueError(f"query_positions must be [B,H] with B={B}, got shape {tuple(qp.shape)}")
    if int(qp.min()) < 0 or int(qp.max()) >= T:
        raise ValueError(f"query_positions must lie in [0, {T})")
    pos = torch.arange(T, device=dev)
    valid = m.unsqueeze(1) & (pos.view(1, 1, T) <= qp.unsqueeze(2))  # [B,H,k]
    n_keys = valid.sum(dim=2)  # [B,H]
    log_n = torch.log(n_keys.clamp(min=1).float())
    idx = qp.unsqueeze(1).unsqueeze(-1)  # [B,1,H,1]
    top1, ent, last_rows = [], [], None
    for a in attentions:
        rows = a.float().gather(2, idx.expand(-1, a.shape[1], -1, T))  # [B,heads,H,T]
        p = rows * valid.unsqueeze(1)
        p = p / p.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        top1.append(p.amax(dim=-1).mean())
        h = -(p * torch.log(p.clamp(min=1e-30))).sum(dim=-1)  # [B,heads,H]
        hn = torch.where(n_keys.unsqueeze(1) > 1, h / log_n.clamp(min=1e-12).unsqueeze(1), torch.zeros_like(h))
        ent.append(hn.mean())
        last_rows = p
    arg = last_rows.mean(dim=(1, 2)).argmax(dim=-1)  # [B]
    last_valid = T - 1 - m.flip(1).float().argmax(dim=1)
    offset = (last_valid - arg).cpu()
    mode_count = int(torch.bincount(offset - offset.min()).max())
    return {
        "top1_share": float(torch.stack(top1).mean()),
        "entropy": float(torch.stack(ent).mean()),
        "barcode": mode_count / B,
    }


# ---------------------------------------------------------------- embedding health


def effective_rank(z: ArrayLike) -> float:
    """exp(Shannon entropy of the singular values normalised to sum 1)
    (Roy & Vetterli 2007): d for an isotropic [N,d] cloud, 1 for a rank-1 one."""
    x = _t(z).detach().double().cpu()
    if x.dim() != 2:
        raise ValueError(f"z must be [N,d], got shape {tuple(x.shape)}")
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return float("nan")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(z: ArrayLike) -> float:
    """Mean cosine over distinct pairs i != j, in O(N d) memory:
    sum_{i != j} <u_i,u_j> = |sum_i u_i|^2 - sum_i |u_i|^2 with u the unit rows."""
    x = _t(z).detach().double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"z must be [N,d] with N >= 2, got shape {tuple(x.shape)}")
    u = torch.nn.functional.normalize(x, dim=1)
    N = u.shape[0]
    off = u.sum(dim=0).square().sum() - u.square().sum()
    return float(off / (N * (N - 1)))


# ---------------------------------------------------------------- text fidelity

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _words(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation (any Unicode P* char) and the
    articles a/an/the, split on whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _ARTICLES.sub(" ", text).split()


def token_f1(pred: str, ref: str) -> float:
    """Bag-of-words F1 between normalised pred and ref (SQuAD style)."""
    p, r = _words(pred), _words(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    common = sum(min(p.count(w), r.count(w)) for w in set(p) & set(r))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def category_match(pred: str, category: str) -> float:
    """1.0 if every normalised word of `category` occurs among pred's words, else 0.0;
    nan for an empty category (nothing to check)."""
    c = _words(category)
    if not c:
        return float("nan")
    pw = set(_words(pred))
    return 1.0 if all(w in pw for w in c) else 0.0


def fidelity_report(
    preds: Sequence[str], refs: Sequence[str], categories: Sequence[str] | None = None
) -> dict[str, float]:
    """Mean token F1 against refs and nan-mean category match (nan if none apply)."""
    if len(preds) != len(refs):
        raise ValueError(f"preds and refs must have equal length, got {len(preds)} and {len(refs)}")
    if categories is not None and len(categories) != len(preds):
        raise ValueError(f"categories must have length {len(preds)}, got {len(categories)}")
    f1 = [token_f1(p, r) for p, r in zip(preds, refs)]
    cm = [category_match(p, c) for p, c in zip(preds, categories)] if categories is not None else []
    cm = [x for x in cm if not math.isnan(x)]
    return {
        "token_f1": float(np.mean(f1)) if f1 else float("nan"),
        "category_match": float(np.mean(cm)) if cm else float("nan"),
    }
