"""SASRec (Kang & McAuley, ICDM 2018): the ID-only self-attentive sequential recommender, shipped
as a baseline next to KARMA (`model.arch=sasrec`).

One learnable embedding per item, learned positional embeddings, causal pre-norm transformer
blocks and dropout; the hidden state at the most recent history position is the user vector.
Scores are plain inner products with the SAME item table (no normalisation, no temperature) and
the loss is softmax cross-entropy over every item (`sasrec_loss`), the recipe of RecBole's SASRec
with `loss_type=CE`, which the UniSRec/RecFormer papers report as their SASRec baseline.

The model exposes the interface the shared code expects of a recommender: `forward(batch)` /
`interests(batch)` return `z` [B, 1, d]; `item_embeddings(ids)` returns rows of the item table;
`seen_offset()` is None (SASRec has no score of its own for the history's items).
Histories arrive as `karma.data.collate` makes them: LEFT-padded with 0 plus `history_mask`
(item row 0 is a real item, so padding is known only from the mask).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from karma.config import ModelConfig


class IdOnlyTokenizer:
    """Stands in for a text tokenizer where callers expect one: SASRec reads no text, so search
    queries (if the data has them) tokenise to nothing and are ignored."""

    pad_id = 0
    vocab_size = 1

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids) -> str:
        return ""


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) (GELU, 4x width)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d]; with last_only, only the last position's row [B, 1, d]
        (every key is still read: the same numbers as the full block's last row)."""
        B, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed, x = q[:, :, -1:], allowed[:, :, -1:], x[:, -1:]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, x.shape[1], d)))
        return x + self.drop(self.ff(self.norm2(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: ModelConfig, n_items: int, max_len: int):
        super().__init__()
        self.cfg, self.n_items, self.max_len = cfg, n_items, max_len
        d = cfg.sasrec_hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # row 0 = padding, item i at i + 1
        self.pos_emb = nn.Embedding(max_len, d)  # position 0 = the most recent item
        self.emb_drop = nn.Dropout(cfg.sasrec_dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.sasrec_heads, cfg.sasrec_dropout) for _ in range(cfg.sasrec_layers))
        self.final_norm = nn.LayerNorm(d)
        # karma.step.karma_losses divides scores by model.tau; SASRec's own loss does not use it
        self.register_buffer("tau", torch.tensor(1.0), persistent=False)
        self.prompts = SimpleNamespace(query=[])  # read by karma.batch.prepare_batch for queries
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, history: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states [B, L, d] of a left-padded history [B, L] (L capped at max_len); with
        last_only, just the most recent position's [B, 1, d] (the last block skips the rest)."""
        history, mask = history[:, -self.max_len :], mask[:, -self.max_len :].bool()
        B, L = history.shape
        ids = torch.where(mask, history + 1, torch.zeros_like(history))
        pos = torch.arange(L - 1, -1, -1, device=history.device)
        x = self.emb_drop((self.item_emb(ids) + self.pos_emb(pos)) * mask.unsqueeze(-1))
        # query i may read key j <= i when j is a real item; each position always sees itself,
        # so padding rows stay finite (and never reach a real row)
        causal = torch.ones(L, L, dtype=torch.bool, device=history.device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=history.device)
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only=last_only and i == len(self.blocks) - 1)
        return self.final_norm(x)

    def interests(self, batch: dict, chunk: int = 32) -> dict[str, torch.Tensor]:
        """The user vector: the hidden state at the most recent history position, as z [B, 1, d].

        Histories are short on most data sets (median 6 on Amazon Scientific) but a batch is padded
        to its longest one, so rows are encoded in groups of `chunk` of similar length, each cut to
        its own longest history. Positions count back from the most recent item and padding is
        masked, so this gives the same numbers as one padded pass, at a fraction of the cost."""
        history, mask = batch["history"], batch["history_mask"].bool()
        lengths = mask.sum(dim=1)
        order = torch.argsort(lengths)
        cuts = lengths[order].view(-1)[chunk - 1 :: chunk].tolist() + [int(lengths.max())]
        parts = []
        for i, rows in enumerate(order.split(chunk)):
            L = max(1, int(cuts[i]))
            parts.append(self.encode(history[rows, -L:], mask[rows, -L:], last_only=True))
        z = torch.cat(parts)[torch.argsort(order)]
        return {"z": z, "mix_logits": None, "n_tokens": lengths.sum()}

    def forward(self, batch: dict, gen_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.interests(batch)  # no text branches: gen_rows is ignored

    def loss(self, batch: dict, loss_cfg=None, sampler=None, gather=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss (KarmaModel.loss's interface): full softmax cross-entropy; the loss
        config, negative sampler and cross-worker gather do not apply to it."""
        return sasrec_loss(self, batch)

    def seen_offset(self) -> None:
        """KarmaModel.seen_offset's interface: no offset, the history's items rank as any other."""
        return None

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Item table rows [C, d] (all items in row order when ids is None); not normalised."""
        if ids is None:
            return self.item_emb.weight[1:]
        return self.item_emb(ids + 1)

    def scores(self, batch: dict) -> torch.Tensor:
        """Inner-product scores of every item [B, n_items]."""
        return self.interests(batch)["z"][:, 0] @ self.item_embeddings().T


def sasrec_loss(model: SASRec, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax cross-entropy of each target over ALL items (no sampling, no temperature)."""
    out = model(batch)
    logits = out["z"][:, 0] @ model.item_embeddings().T
    loss = F.cross_entropy(logits, batch["target"])
    parts = {"loss": loss.detach(), "loss_action": loss.detach(), "n_tokens": out["n_tokens"]}
    return loss, parts
