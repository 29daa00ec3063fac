"""A collated batch made ready for a model: tensors on the device and queries tokenised.

Shared by training, evaluation, export and serving; no training maths here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from karma.text import Tokenizer

if TYPE_CHECKING:
    from karma.model import KarmaModel


def history_ids(batch: dict) -> torch.Tensor:
    """[B,L] item rows of each example's history as collated (its last max_history items), -1 on
    padding: the `exclude` layout of karma.retrieval, and the ids of per-row candidates."""
    return torch.where(batch["history_mask"], batch["history"], torch.full_like(batch["history"], -1))


def prepare_batch(batch: dict, model: KarmaModel, tok: Tokenizer, device: torch.device | str,
                  max_query_tokens: int = 16) -> dict:
    """Move a collated batch to `device`; tokenise queries (left-padded, `query:` prefix)."""
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    queries = batch.get("query") or []
    if any(q for q in queries):
        rows = [model.prompts.query + tok.encode(q)[:max_query_tokens] if q else [] for q in queries]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = True
        out["query_ids"], out["query_mask"] = ids.to(device), mask.to(device)
    return out
