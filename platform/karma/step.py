"""One KARMA training step's maths, shared by the plain loop and the DeepSpeed/Ray workers.

`karma_losses` is pure model + batch -> losses; how batches arrive, how gradients are applied
and how targets are gathered across workers is the caller's business (passed in as `gather`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from karma.config import LossConfig
from karma.losses import action_loss, popularity_log_prob, token_ce, total_loss
from karma.model import KarmaModel
from karma.text import Tokenizer

# all-gather of a [B] tensor across workers -> ([W*B] tensor, offset of this worker's rows)
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def local_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


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


class NegativeSampler:
    """Popularity-sampled negatives (counts ** 0.75) and the log-probabilities for logQ."""

    def __init__(self, counts: np.ndarray, n: int, seed: int = 0):
        self.n = n
        self.log_p = popularity_log_prob(torch.as_tensor(counts, dtype=torch.float64)).float()
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])

    def sample(self) -> torch.Tensor:
        if self.n == 0:
            return torch.empty(0, dtype=torch.long)
        return torch.multinomial(self.log_p.exp(), self.n, replacement=True, generator=self.gen)


def karma_losses(model: KarmaModel, batch: dict, loss: LossConfig, sampler: NegativeSampler | None,
                 gather: Gather = local_gather) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts (tensors: reading them syncs a GPU, so callers
    convert only when they log). A zero weight skips that branch's compute entirely."""
    target = batch["target"]
    b = target.shape[0]
    # The decoding branches run on the first n_dec rows: a prefix, so slicing needs no host sync.
    n_dec = max(1, math.ceil(loss.decode_fraction * b))
    decode = torch.arange(b, device=target.device) < n_dec

    out = model(batch, gen_rows=decode if loss.w_gen > 0 else None)
    z = out["z"]

    # Candidates: every worker's targets (in-batch negatives), then popularity samples.
    all_targets, offset = gather(target)
    negs = sampler.sample().to(target.device) if sampler is not None else target.new_empty(0)
    cand_ids = torch.cat([all_targets, negs])
    cand = model.item_embeddings(cand_ids)
    log_q = sampler.log_p.to(target.device)[cand_ids] if (sampler is not None and loss.logq_correction) else None
    pos = torch.arange(b, device=target.device) + offset
    l_act = action_loss(z, cand, pos, model.tau, cand_ids=cand_ids, target_ids=target, log_q=log_q,
                        reduce=model.cfg.head_reduce, mix_logits=out["mix_logits"])

    n_tokens = out["n_tokens"]
    l_gen = l_rec = None
    if loss.w_gen > 0:
        l_gen = token_ce(out["gen_logits"].unsqueeze(0), out["gen_labels"].unsqueeze(0))
    if loss.w_rec > 0:
        rec = model.reconstruct(z[:n_dec], target[:n_dec])
        l_rec = token_ce(rec["rec_logits"].unsqueeze(0), rec["rec_labels"].unsqueeze(0))
        n_tokens = n_tokens + rec["n_tokens"]
    total = total_loss(l_act, l_gen, l_rec, w_gen=loss.w_gen, w_rec=loss.w_rec)
    # n_tokens: real (unpadded) positions through the backbone, for tokens/s
    parts = {"loss": total.detach(), "loss_action": l_act.detach(), "tau": model.tau.detach(), "n_tokens": n_tokens}
    if l_gen is not None:
        parts["loss_gen"] = l_gen.detach()
    if l_rec is not None:
        parts["loss_rec"] = l_rec.detach()
    return total, parts
