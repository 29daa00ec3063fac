"""Training losses for KARMA: the action (InfoNCE) loss over multi-interest heads,
popularity negative sampling with its logQ correction, and token cross-entropy for
the generation and reconstruction branches.

Shapes: B users, H interest heads, d embedding dim, C candidates, N items, T tokens,
V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "head_scores",
    "action_loss",
    "in_rows",
    "popularity_log_prob",
    "sample_negatives",
    "inverse_cdf_sample",
    "chunked_ce_sum",
    "compile_ce_kernels",
    "token_ce",
    "total_loss",
]


def head_scores(
    z: torch.Tensor,
    cand: torch.Tensor,
    reduce: str = "max",
    mix_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score candidates against every interest head and reduce over heads.

    z [B,H,d] (a [B,d] input is treated as H=1), cand [C,d] -> [B,C]; or per-row candidates
    cand [B,C,d] (row b scores only its own) -> [B,C].
    reduce="max": an item is as good as its best-matching interest.
    reduce="mixture": softmax(mix_logits [B,H])-weighted sum of the head scores.
    """
    if z.dim() == 2:
        z = z.unsqueeze(1)
    if z.dim() != 3:
        raise ValueError(f"z must be [B,H,d] or [B,d], got shape {tuple(z.shape)}")
    per_row = cand.dim() == 3 and cand.shape[0] == z.shape[0]
    if not (cand.dim() == 2 or per_row) or cand.shape[-1] != z.shape[2]:
        raise ValueError(f"cand must be [C,{z.shape[2]}] or [B={z.shape[0]},C,{z.shape[2]}], "
                         f"got shape {tuple(cand.shape)}")
    s = torch.einsum("bhd,bcd->bhc" if per_row else "bhd,cd->bhc", z, cand)  # [B,H,C]
    if reduce == "max":
        return s.amax(dim=1)
    if reduce == "mixture":
        if mix_logits is None:
            raise ValueError("mix_logits is required when reduce='mixture'")
        if mix_logits.shape != z.shape[:2]:
            raise ValueError(
                f"mix_logits must be [B,H]={tuple(z.shape[:2])}, got {tuple(mix_logits.shape)}"
            )
        w = torch.softmax(mix_logits.to(s.dtype), dim=-1)
        return (w.unsqueeze(-1) * s).sum(dim=1)
    raise ValueError(f"reduce must be 'max' or 'mixture', got {reduce!r}")


def action_loss(
    z: torch.Tensor,
    cand: torch.Tensor,
    pos_index: torch.Tensor,
    tau: torch.Tensor | float,
    cand_ids: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    reduce: str = "max",
    mix_logits: torch.Tensor | None = None,
    row_cand: torch.Tensor | None = None,
    row_cand_ids: torch.Tensor | None = None,
    row_log_q: float = 0.0,
    seen: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Sampled-softmax InfoNCE over candidates; the positive of row b is cand[pos_index[b]].

    `row_cand` [B,L,d] adds candidates of row b's own (its history's items: negatives every
    row is sure to meet, with log q = `row_log_q`); `row_cand_ids` [B,L] names them, -1 for
    padding. One equal to the row's target (a repeat) is masked, never pushed down.
    `seen` (model.seen_offset) is added to the score of every candidate among row b's
    `row_cand_ids`, the target's too when it repeats one; it needs `cand_ids`.

    logits[b,c] = head_scores[b,c] / tau - log_q[c]. Subtracting the log sampling
    probability (Yi et al. 2019) undoes the popularity bias of in-batch and sampled
    negatives. Where cand_ids[c] == target_ids[b] at c != pos_index[b] the candidate is
    the user's own positive appearing again (a duplicate in the batch or a sampled
    negative), so it is masked out instead of being pushed down.
    """
    scores = head_scores(z, cand, reduce=reduce, mix_logits=mix_logits)  # [B,C]
    B, C = scores.shape
    if seen is not None:
        if cand_ids is None or row_cand_ids is None:
            raise ValueError("seen needs cand_ids and row_cand_ids (the rows' history items)")
        scores = scores + seen * in_rows(cand_ids, row_cand_ids).to(scores.dtype)
    if pos_index.shape != (B,):
        raise ValueError(f"pos_index must be [B]=[{B}], got shape {tuple(pos_index.shape)}")
    if isinstance(tau, (int, float)):
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
    elif tau.numel() != 1:
        raise ValueError(f"tau must be a scalar, got shape {tuple(tau.shape)}")
    logits = scores / tau
    if log_q is not None:
        if log_q.shape != (C,):
            raise ValueError(f"log_q must be [C]=[{C}], got shape {tuple(log_q.shape)}")
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)
    if (cand_ids is None) != (target_ids is None):
        raise ValueError("cand_ids and target_ids must be given together (both or neither)")
    if cand_ids is not None:
        if cand_ids.shape != (C,):
            raise ValueError(f"cand_ids must be [C]=[{C}], got shape {tuple(cand_ids.shape)}")
        if target_ids.shape != (B,):
            raise ValueError(f"target_ids must be [B]=[{B}], got shape {tuple(target_ids.shape)}")
        dup = cand_ids.unsqueeze(0) == target_ids.unsqueeze(1)  # [B,C]
        dup[torch.arange(B, device=dup.device), pos_index] = False
        logits = logits.masked_fill(dup, float("-inf"))
    if row_cand is not None:
        if row_cand_ids is None or target_ids is None or row_cand_ids.shape != row_cand.shape[:2]:
            raise ValueError("row_cand needs row_cand_ids [B,L] and target_ids")
        rs = head_scores(z, row_cand, reduce=reduce, mix_logits=mix_logits)  # [B,L]
        if seen is not None:
            rs = rs + seen
        drop = (row_cand_ids < 0) | (row_cand_ids == target_ids.unsqueeze(1))
        logits = torch.cat([logits, (rs / tau - row_log_q).masked_fill(drop, float("-inf"))], dim=1)
    return F.cross_entropy(logits.float(), pos_index)


def in_rows(ids: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """[B,C] bool: is ids[c] among row b's row_ids [B,L] (-1 = padding)? One isin over
    (row, id) keys: no [B,C,L] comparison. The row stride is fixed (item rows are int32), so
    nothing is read back from the device in the training step."""
    rows = torch.arange(row_ids.shape[0], device=ids.device).unsqueeze(1) * 2**32
    keys = (rows + row_ids).masked_fill(row_ids < 0, -1)
    return torch.isin(rows + ids.unsqueeze(0), keys)


def popularity_log_prob(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """log p[i] with p proportional to (counts[i] + 1) ** power.

    The +1 (add-one smoothing) gives items never seen in training a non-zero chance,
    so every log_q is finite; power < 1 flattens the head of the popularity curve
    (word2vec's 0.75).
    """
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty [N] tensor, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    logw = power * torch.log(counts.double() + 1.0)
    return (logw - torch.logsumexp(logw, dim=0)).float()


def sample_negatives(
    counts: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    power: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n item ids (with replacement) from popularity_log_prob(counts, power).

    Returns (ids [n] int64, log_p [N] float32); callers index log_q = log_p[cand_ids]
    for the whole candidate list (in-batch targets included). Inverse-CDF sampling
    has no category limit (torch.multinomial stops at 2**24 items).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    log_p = popularity_log_prob(counts, power)
    cdf = torch.cumsum(log_p.double().exp(), dim=0)
    return inverse_cdf_sample(cdf, n, generator), log_p


def inverse_cdf_sample(cdf: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n ids drawn from an unnormalised float64 CDF [N]: uniform draws, then a binary search.

    Only device ops (rand, searchsorted, clamp): on a GPU with a GPU generator nothing waits
    for the host, and no shape depends on data."""
    gen_device = generator.device if generator is not None else cdf.device
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device).to(cdf.device)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=cdf.numel() - 1)


def token_ce(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk: int = 0
) -> torch.Tensor:
    """Mean cross-entropy over non-ignored positions; logits[:, t] predicts labels[:, t].

    Summing then dividing by max(count, 1) avoids a host sync, and when every label
    is ignored it returns a zero still attached to the graph (grad of zeros), so
    distributed backward passes keep the same set of parameters.

    chunk > 0: rows are upcast to fp32 `chunk` at a time (see `chunked_ce_sum`), so the
    fp32 copy of a [N, V] vocabulary projection never exists whole; 0: one fp32 pass.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B,T,V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [B,T]={tuple(logits.shape[:2])}, got shape {tuple(labels.shape)}"
        )
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    V = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    if chunk:
        total = chunked_ce_sum(flat, flat_labels, chunk, ignore_index)
    else:
        total = F.cross_entropy(flat.float(), flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


def chunked_ce_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of logits [N, V] (any float dtype) against labels [N], computed
    in fp32 `chunk` rows at a time. Saves only the logits (which exist anyway) and one fp32
    log-sum-exp per row; the backward recomputes the softmax chunk by chunk and writes the
    gradient in the logits' dtype. Same value as F.cross_entropy(logits.float(), ...)."""
    return _ChunkedCE.apply(logits, labels, chunk, ignore_index)


def compile_ce_kernels() -> None:
    """torch.compile the per-chunk kernels of `chunked_ce_sum`: the upcast, exp and reductions
    fuse, so each pass reads the low-precision logits once instead of writing fp32 copies."""
    _KERNELS.update(lse=torch.compile(_lse_rows, dynamic=False), grad=torch.compile(_ce_grad_rows, dynamic=False))


def _lse_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.float(), dim=-1)


def _ce_grad_rows(x: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(softmax(x) - onehot(safe)) * scale, rowwise, in x's dtype."""
    p = torch.exp(x.float() - lse.unsqueeze(1))
    p.scatter_add_(1, safe.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
    return (p * scale.unsqueeze(1)).to(x.dtype)


_KERNELS = {"lse": _lse_rows, "grad": _ce_grad_rows}


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk, ignore_index):
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        lse = torch.cat([_KERNELS["lse"](logits[s : s + chunk]) for s in range(0, logits.shape[0], chunk)])
        target = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return ((lse - target) * valid).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe, valid, lse = ctx.saved_tensors
        scale = valid.to(torch.float32) * grad_out.float()
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            grad[s:e] = _KERNELS["grad"](logits[s:e], lse[s:e], safe[s:e], scale[s:e])
        return grad, None, None, None


def total_loss(
    action: torch.Tensor,
    gen: torch.Tensor | None = None,
    rec: torch.Tensor | None = None,
    w_gen: float = 0.0,
    w_rec: float = 0.0,
) -> torch.Tensor:
    """action + w_gen * gen + w_rec * rec; a branch passed as None is skipped."""
    for name, w in (("w_gen", w_gen), ("w_rec", w_rec)):
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {w}")
    loss = action
    if gen is not None:
        loss = loss + w_gen * gen
    if rec is not None:
        loss = loss + w_rec * rec
    return loss
