"""One KARMA training step's maths, shared by the plain loop and the DeepSpeed/Ray workers.

`karma_losses` is pure model + batch -> losses; how batches arrive, how gradients are applied
and how targets are gathered across workers is the caller's business (passed in as `gather`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from karma.batch import history_ids
from karma.config import LossConfig
from karma.losses import action_loss, inverse_cdf_sample, popularity_log_prob, token_ce, total_loss

if TYPE_CHECKING:  # the model calls karma_losses (KarmaModel.loss): no import at run time
    from karma.model import KarmaModel

# all-gather of a [B] tensor across workers -> ([W*B] tensor, offset of this worker's rows)
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def local_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


class NegativeSampler:
    """Popularity-sampled negatives (counts ** 0.75) and the log-probabilities for logQ.

    Lives on `device`: the ids and `log_p` are made where the loss needs them, so a step copies
    nothing from the host and never waits for it. On CPU it draws with torch.multinomial (the
    stream earlier checkpoints and runs were made with, replayed bit for bit); elsewhere by
    inverse CDF with a generator on that device (rand + searchsorted, no category limit).
    """

    def __init__(self, counts: np.ndarray, n: int, seed: int = 0, device: torch.device | str = "cpu"):
        self.n = n
        self.device = torch.device(device)
        log_p = popularity_log_prob(torch.as_tensor(counts, dtype=torch.float64)).float()
        self.log_p = log_p.to(self.device)
        # log q of a candidate a row meets for certain (its own history items) on log_p's scale,
        # where n samples bring item i n p(i) times: once is a share of 1 / n
        self.log_q_certain = -math.log(max(n, 1))
        if self.device.type == "cpu":
            self._weights = log_p.exp()  # multinomial's input, computed once instead of every step
        else:
            self._cdf = torch.cumsum(log_p.double().exp(), dim=0).to(self.device)
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "device": self.device.type}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("device", "cpu")  # states from before the device field were CPU ones
        if saved == self.device.type:
            self.gen.set_state(state["gen"])
            return
        # A generator state does not carry across device kinds (a CPU Mersenne Twister vs a GPU
        # Philox counter): continue with a seed derived from it, so a resume stays deterministic.
        digest = hashlib.sha256(state["gen"].cpu().numpy().tobytes()).digest()
        self.gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        warnings.warn(f"NegativeSampler: a {saved} generator state loaded on {self.device.type}; "
                      "negatives continue from a seed derived from it, not the identical stream")

    def sample(self) -> torch.Tensor:
        if self.n == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        if self.device.type == "cpu":
            return torch.multinomial(self._weights, self.n, replacement=True, generator=self.gen)
        return inverse_cdf_sample(self._cdf, self.n, self.gen)


def ce_chunk(loss: LossConfig, device: torch.device) -> int:
    """loss.lm_ce_chunk with its per-device default: 1024 rows on a GPU, unchunked on CPU."""
    if loss.lm_ce_chunk is not None:
        return loss.lm_ce_chunk
    return 0 if device.type == "cpu" else 1024


def karma_losses(model: KarmaModel, batch: dict, loss: LossConfig, sampler: NegativeSampler | None,
                 gather: Gather = local_gather) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts (tensors: reading them syncs a GPU, so callers
    convert only when they log). A zero weight skips that branch's compute entirely.

    Nothing here waits for the device: shapes depend only on the batch's shapes and the
    config (the decoding rows are a prefix, sliced by a Python int), negatives are drawn on the
    sampler's device, and the vocabulary cross-entropy has a fixed shape."""
    target = batch["target"]
    b = target.shape[0]
    n_dec = max(1, math.ceil(loss.decode_fraction * b))
    if loss.negatives == "all":
        # Full softmax: every item once, the target's row is its own id; nothing sampled, so no
        # logQ and no duplicates to mask.
        cand_ids = torch.arange(model.n_items, device=target.device)
        pos, dup_ids, log_q = target, None, None
    else:
        # Candidates: every worker's targets (in-batch negatives), then popularity samples.
        all_targets, offset = gather(target)
        negs = sampler.sample().to(target.device) if sampler is not None else target.new_empty(0)
        cand_ids = torch.cat([all_targets, negs])
        pos, dup_ids = torch.arange(b, device=target.device) + offset, cand_ids
        log_q = sampler.log_p.to(target.device)[cand_ids] if (sampler is not None and loss.logq_correction) else None
    # The row's own history items as negatives too (sampled candidates only: a full softmax has
    # them already): the next item is rarely one already seen, which few samples ever teach.
    hist_ids = None
    if loss.history_negatives and loss.negatives != "all":
        hist_ids = history_ids(batch)
        n_shared = cand_ids.shape[0]
        cand_ids = torch.cat([cand_ids, hist_ids.clamp(min=0).reshape(-1)])
    # One forward call for every branch and the item tower: what compiling the model covers.
    out = model(batch, gen_rows=n_dec if loss.w_gen > 0 else None, rec_rows=n_dec if loss.w_rec > 0 else 0,
                cand_ids=cand_ids)
    cand, row_cand = out["cand"], None
    if hist_ids is not None:
        cand, row_cand = cand[:n_shared], cand[n_shared:].reshape(*hist_ids.shape, -1)
    row_log_q = sampler.log_q_certain if (sampler is not None and loss.logq_correction) else 0.0
    l_act = action_loss(out["z"], cand, pos, out["tau"], cand_ids=dup_ids,
                        target_ids=None if dup_ids is None else target, log_q=log_q,
                        reduce=model.cfg.head_reduce, mix_logits=out["mix_logits"],
                        row_cand=row_cand, row_cand_ids=hist_ids, row_log_q=row_log_q, seen=out.get("seen"))

    l_gen = l_rec = None
    chunk = ce_chunk(loss, target.device)
    if loss.w_gen > 0:
        l_gen = token_ce(out["gen_logits"].unsqueeze(0), out["gen_labels"].unsqueeze(0), chunk=chunk)
    if loss.w_rec > 0:
        l_rec = token_ce(out["rec_logits"].unsqueeze(0), out["rec_labels"].unsqueeze(0), chunk=chunk)
    total = total_loss(l_act, l_gen, l_rec, w_gen=loss.w_gen, w_rec=loss.w_rec)
    # n_tokens: real (unpadded) positions through the backbone, for tokens/s
    parts = {"loss": total.detach(), "loss_action": l_act.detach(), "tau": out["tau"].detach(),
             "n_tokens": out["n_tokens"]}
    if l_gen is not None:
        parts["loss_gen"] = l_gen.detach()
    if l_rec is not None:
        parts["loss_rec"] = l_rec.detach()
    return total, parts
