"""The KARMA model: fused item tokens into a causal LM, H interest tokens read out as embeddings,
and the two train-only decoding branches (generation, reconstruction).

Sequence layouts (left part padded on the left, text part on the right; positions follow the mask):

    action + generation (one shared forward):
        [query: q] [item_1 .. item_L] [INT_1 .. INT_H] [next item:] [target text ...]
    reconstruction (no history):
        [describe the item:] [P_rec(z) as k soft tokens] [next item:] [target text ...]

The interest tokens see only the history (causal attention), so appending the target text for
the generation branch leaves z unchanged: inference simply stops after INT_H.

With the text channel (cfg.text_channel) the retrieval space gains the frozen text embedding
itself beside the learned one: items [e ; t], queries [z ; g * pointed mix of the history's t].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from karma.config import LossConfig, ModelConfig
from karma.step import Gather, NegativeSampler, karma_losses, local_gather
from karma.text import GEN_PROMPT, QUERY_PREFIX, REC_PROMPT, Tokenizer


def linear(d_in: int, d_out: int) -> nn.Linear:
    """A Linear layer whose bias starts at zero. PyTorch's default bias is the same for every
    input: added to every item it swamps each item's own (small) signal, the item tower starts
    collapsed (all items at cosine ~1), and at an LLM fine-tuning rate it stays so."""
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(linear(d_in, d_out), nn.GELU(), linear(d_out, d_out))


class Temperature(nn.Module):
    """The InfoNCE temperature, learnable in log space.

    Parameters sit in small submodules rather than on KarmaModel itself: ZeRO-3 gathers a
    module's partitioned parameters when that module is called, and these are used outside the
    main forward (the loss reads tau after the backbone has run)."""

    def __init__(self, init: float, learn: bool):
        super().__init__()
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-d refuses
        self.log_tau = nn.Parameter(torch.full((1,), math.log(init)), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=1e-3)[0]


class SeenOffset(nn.Module):
    """model.seen_offset: one learned score added to the items of the history the model reads.
    Starts at 0 (the plain score); in its own submodule for the reason Temperature is."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        return self.value[0]


# Items encoded at once when the whole item table is computed without a graph (ranking, export).
ITEM_CHUNK = 16384


class InterestTokens(nn.Module):
    """The H learned <INT> input embeddings appended after the history."""

    def __init__(self, n: int, hidden: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, hidden) * scale)

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1).to(dtype)


class ItemEncoder(nn.Module):
    """e_in(i) = norm(MLP_id(ID[i]) + MLP_txt(text[i]) [+ MLP_img(img[i])]) in the LLM's width."""

    def __init__(self, n_items: int, id_dim: int, hidden: int, text_emb: torch.Tensor | None,
                 image_emb: torch.Tensor | None, out_scale: float, id_init_std: float | None = None,
                 text_center: bool = False, id_dropout: float = 0.0):
        super().__init__()
        self.id_dropout = id_dropout
        self.id_emb = nn.Embedding(n_items, id_dim)
        # Default: ID vectors of about unit norm, like the (normalised) text embeddings beside them.
        nn.init.normal_(self.id_emb.weight, std=id_dim ** -0.5 if id_init_std is None else id_init_std)
        self.mlp_id = mlp(id_dim, hidden)
        self.mlp_txt = self.mlp_img = None
        if text_emb is not None:
            text_emb = text_emb.float()
            if text_center:
                text_emb = F.normalize(text_emb - text_emb.mean(0), dim=-1)
            self.register_buffer("text_emb", text_emb)  # frozen, saved with the weights
            self.mlp_txt = mlp(text_emb.shape[1], hidden)
        if image_emb is not None:
            self.register_buffer("image_emb", image_emb.float())
            self.mlp_img = mlp(image_emb.shape[1], hidden)
        self.norm = nn.LayerNorm(hidden)
        # Match the backbone's token-embedding scale so item tokens look like tokens to it.
        nn.init.constant_(self.norm.weight, out_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.mlp_id(self.id_emb(ids))
        if self.training and self.id_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.id_dropout
            x = x * keep.unsqueeze(-1).to(x.dtype)
        # Frozen buffers keep their dtype when an engine casts the parameters (bf16).
        if self.mlp_txt is not None:
            x = x + self.mlp_txt(self.text_emb[ids].to(x.dtype))
        if self.mlp_img is not None:
            x = x + self.mlp_img(self.image_emb[ids].to(x.dtype))
        return self.norm(x)


class TextPointer(nn.Module):
    """The text channel's query: the interest tokens' attention over the history items' states
    (plus a recency decay, which starts the pointer as a nearest-neighbour of the last items'
    text) mixes those items' frozen text embeddings. Returns g * normalize(mix), [B, H, T]."""

    def __init__(self, hidden: int, dim: int, decay_init: float = 0.5):
        super().__init__()
        self.q = linear(hidden, dim)
        self.k = linear(hidden, dim)
        self.log_decay = nn.Parameter(torch.full((1,), math.log(decay_init)))  # per item back
        self.log_weight = nn.Parameter(torch.zeros(1))  # g, the text half's weight in the query

    def forward(self, h_int: torch.Tensor, h_hist: torch.Tensor, hmask: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        q, k = self.q(h_int.to(self.q.weight.dtype)).float(), self.k(h_hist.to(self.k.weight.dtype)).float()
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [B, H, L]
        back = torch.arange(hmask.shape[1] - 1, -1, -1, device=hmask.device)  # left-padded: last = newest
        logits = logits - self.log_decay.exp() * back
        # finite fill: a row without history gets a uniform (harmless) mix instead of NaN
        a = torch.softmax(logits.masked_fill(~hmask.unsqueeze(1), -1e4), dim=-1)
        return self.log_weight.exp() * F.normalize(a @ text.float(), dim=-1)


@dataclass
class Prompts:
    """Token ids of the fixed prompt pieces, from the backbone's tokenizer."""

    query: list[int]
    gen: list[int]
    rec: list[int]

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "Prompts":
        return cls(tok.encode(QUERY_PREFIX), tok.encode(GEN_PROMPT), tok.encode(REC_PROMPT))


def item_trust(counts: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """c(i) = n(i) / (n(i) + k): how far model.id_shrinkage = k trusts each item's learned half,
    from its training-target count n(i)."""
    n = counts.float()
    return n / (n + shrinkage)


class KarmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module, n_items: int, item_tokens: torch.Tensor,
                 item_token_len: torch.Tensor, pad_id: int, prompts: Prompts, text_emb: torch.Tensor | None = None,
                 image_emb: torch.Tensor | None = None, tau_init: float = 0.07, learn_tau: bool = True,
                 item_counts: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.pad_id = pad_id
        self.prompts = prompts
        emb = backbone.get_input_embeddings().weight
        hidden = emb.shape[1]
        scale = float(emb.detach().float().std())
        self.items = ItemEncoder(n_items, cfg.id_dim, hidden, text_emb, image_emb, scale, cfg.id_init_std,
                                 cfg.text_center, cfg.id_dropout)
        self._hidden = hidden  # a plain int: ZeRO-3 empties partitioned parameters' shapes
        self.interest = InterestTokens(cfg.n_interest, hidden, scale)
        self.interest_head = linear(hidden, cfg.embed_dim)
        if cfg.text_channel and text_emb is None:
            raise ValueError("model.text_channel needs item text embeddings: set data.text_encoder=minilm")
        self.pointer = TextPointer(hidden, cfg.embed_dim) if cfg.text_channel else None
        self.item_head = linear(hidden, cfg.embed_dim)
        if cfg.id_shrinkage > 0 or cfg.train_id_shrinkage > 0:
            if item_counts is None or len(item_counts) != n_items:
                raise ValueError("model.id_shrinkage / model.train_id_shrinkage need the training count of every "
                                 "item (item_counts)")
        if cfg.id_shrinkage > 0:  # saved with the weights: the counts are the training split's
            self.register_buffer("item_trust", item_trust(item_counts, cfg.id_shrinkage))
        if cfg.train_id_shrinkage > 0:  # used in training only, so rebuilt from the counts, not saved
            self.register_buffer("train_trust", item_trust(item_counts, cfg.train_id_shrinkage), persistent=False)
        self.mix_head = linear(hidden, cfg.n_interest) if cfg.head_reduce == "mixture" else None
        rec_in = cfg.embed_dim if cfg.rec_input == "learned" else self.retrieval_dim
        self.rec_proj = linear(rec_in, cfg.rec_soft_tokens * hidden)
        self.token_drop = nn.Dropout(cfg.dropout)
        self.temperature = Temperature(tau_init, learn_tau)
        self.seen = SeenOffset() if cfg.seen_offset else None
        self.register_buffer("item_tokens", item_tokens.long())  # [N, T] target text, EOS, padding
        self.register_buffer("item_token_len", item_token_len.long())  # [N] text + EOS lengths
        # Fixed prompt ids live on the model's device, made once: torch.tensor(list, device=cuda)
        # every step would be a blocking host-to-device copy. Not persistent: weights and
        # checkpoints keep their keys (the ids come from the tokenizer at build time).
        self.register_buffer("gen_prompt_ids", torch.tensor(prompts.gen, dtype=torch.long), persistent=False)
        self.register_buffer("rec_prompt_ids", torch.tensor(prompts.rec, dtype=torch.long), persistent=False)
        self._n_gen_prompt = len(prompts.gen)  # a plain int: slicing with it needs no device value

    # ---- pieces ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self.items.id_emb.num_embeddings

    @property
    def retrieval_dim(self) -> int:
        """Width of z and of the item tower: embed_dim, plus the text's with the text channel."""
        text = self.items.text_emb.shape[1] if self.pointer is not None else 0
        return self.cfg.embed_dim + text

    @property
    def hidden(self) -> int:
        return self._hidden

    @property
    def tau(self) -> torch.Tensor:
        return self.temperature()

    def seen_offset(self) -> float | None:
        """The learned offset of the history's items (model.seen_offset), None when off."""
        return None if self.seen is None else float(self.seen().detach())

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The item tower e_out(i) = normalize(W_o e_in(i)), with the text channel
        [e_out(i) ; t(i)] / sqrt 2 (unit length too), or when retrieving (eval mode) with
        model.id_shrinkage [c(i) e_out(i) ; t(i)] / sqrt(c(i)^2 + 1) (in training, with
        model.train_id_shrinkage's c); all items when ids is None."""
        if ids is None:
            n, device = self.n_items, self.item_tokens.device
            if n > ITEM_CHUNK and not torch.is_grad_enabled():
                # the whole table for ranking or export: chunk by chunk into one output, so the
                # gathered text rows and the tower's activations never exist for every item at once
                out = torch.empty(n, self.retrieval_dim, device=device)
                for a in range(0, n, ITEM_CHUNK):
                    out[a:a + ITEM_CHUNK] = self.item_embeddings(torch.arange(a, min(a + ITEM_CHUNK, n), device=device))
                return out
            ids = torch.arange(n, device=device)
        e = F.normalize(self.item_head(self.items(ids)).float(), dim=-1)
        if self.pointer is None:
            return e
        t = self.items.text_emb[ids].float()
        k = self.cfg.train_id_shrinkage if self.training else self.cfg.id_shrinkage
        if k > 0:
            c = (self.train_trust if self.training else self.item_trust)[ids].unsqueeze(-1)
            return torch.cat([c * e, t], dim=-1) / torch.sqrt(c * c + 1)
        return torch.cat([e, t], dim=-1) / math.sqrt(2.0)

    def _text_part(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings and mask of `[next item:] [target text]`, and the labels [B, T] of the
        text's T labelled positions: the last T, i.e. from column `_n_gen_prompt - 1` on."""
        tokens = self.item_tokens[target]  # [B, T]: text, EOS, padding
        b, t = tokens.shape
        # Real tokens by length, not by pad id: HF tokenizers often pad with EOS itself.
        real = torch.arange(t, device=tokens.device) < self.item_token_len[target].unsqueeze(1)
        p = self.gen_prompt_ids.expand(b, -1)
        ids = torch.cat([p, tokens[:, :-1]], dim=1)
        mask = torch.cat([torch.ones_like(p, dtype=torch.bool), real[:, :-1]], dim=1)
        return self.embed_tokens(ids), mask, tokens.masked_fill(~real, -100)

    def _history_titles(self, hist: torch.Tensor, hmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text KARMA: the first `history_text_tokens` tokens of the last N history items' text,
        as token embeddings [B, N*t, D] and their mask (padding of short titles and of missing
        items stays in place, masked: static shapes, positions follow the mask)."""
        n, t = self.cfg.history_text_items, self.cfg.history_text_tokens
        h, m = hist[:, -n:], hmask[:, -n:]
        tokens = self.item_tokens[h][:, :, :t]  # [B, n, t]
        n_text = (self.item_token_len[h] - 1).unsqueeze(-1)  # the EOS is not part of the title
        real = (torch.arange(tokens.shape[-1], device=h.device) < n_text) & m.unsqueeze(-1)
        return self.embed_tokens(tokens.flatten(1)), real.flatten(1)

    def _prefix(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[query] [history titles] [items] [INT_1..H] embeddings and mask (the INT tokens are the
        last H columns), and the mask of the history's positions (its item tokens, or its title
        tokens when the history is text alone)."""
        hist, hmask = batch["history"], batch["history_mask"]
        parts, masks, is_hist = [], [], []
        if "query_ids" in batch:  # left-padded query tokens with the `query:` prefix
            parts.append(self.embed_tokens(batch["query_ids"]))
            masks.append(batch["query_mask"])
            is_hist.append(torch.zeros_like(batch["query_mask"]))
        if self.cfg.history_text_items:
            emb, m = self._history_titles(hist, hmask)
            parts.append(emb)
            masks.append(m)
            is_hist.append(m if not self.cfg.history_item_tokens else torch.zeros_like(m))
        if self.cfg.history_item_tokens:
            parts.append(self.token_drop(self.items(hist)))
            masks.append(hmask)
            is_hist.append(hmask)
        b = hist.shape[0]
        parts.append(self.interest(b, parts[0].dtype))
        ones = torch.ones(b, self.cfg.n_interest, dtype=torch.bool, device=hist.device)
        masks.append(ones)
        is_hist.append(torch.zeros_like(ones))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1), torch.cat(is_hist, dim=1)

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False):
        # Positions follow the mask, so padding anywhere (left or right) does not shift them.
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        decoder = self.backbone.get_decoder()
        return decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos,
                       output_attentions=output_attentions, use_cache=False)

    def _read_interests(self, hidden: torch.Tensor, n_prefix: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.cfg.n_interest
        h_int = hidden[:, n_prefix - h : n_prefix].float()  # [B, H, D]
        z = F.normalize(self.interest_head(h_int.to(self.interest_head.weight.dtype)).float(), dim=-1)
        if self.pointer is not None:  # the history's item tokens sit just before the INT tokens
            hist, hmask = batch["history"], batch["history_mask"]
            h_hist = hidden[:, n_prefix - h - hist.shape[1] : n_prefix - h]
            t = self.pointer(h_int, h_hist, hmask, self.items.text_emb[hist])
            if self.cfg.query_text_scale != 1 and not self.training:
                t = t * self.cfg.query_text_scale  # retrieval only: more weight on the text half
            z = F.normalize(torch.cat([z, t], dim=-1), dim=-1)
        mix = self.mix_head(h_int[:, 0].to(self.mix_head.weight.dtype)).float() if self.mix_head is not None else None
        return z, mix

    def _lm_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM-head logits [n*T, V] (the head's dtype) of the labelled slice hidden [n, T, D], and
        labels [n*T] with -100 at padding. Static shapes: no boolean indexing, so no host sync
        and nothing that breaks a compiled graph; the cross-entropy ignores the -100 rows and
        upcasts to fp32 in chunks (karma.losses.token_ce)."""
        return self.backbone.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])), labels.reshape(-1)

    def loss(self, batch: dict, loss_cfg: LossConfig, sampler: NegativeSampler | None = None,
             gather: Gather = local_gather) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch and its detached parts: every loop calls this, so no
        loop needs to know which architecture it trains (SASRec has its own)."""
        return karma_losses(self, batch, loss_cfg, sampler, gather)

    # ---- forward passes -----------------------------------------------------------------------
    def interests(self, batch: dict) -> dict:
        """Inference: the interest path only. Returns z [B, H, d] (and mixture logits)."""
        embeds, mask, _ = self._prefix(batch)
        hidden = self._run(embeds, mask).last_hidden_state
        z, mix = self._read_interests(hidden, embeds.shape[1], batch)
        return {"z": z, "mix_logits": mix, "n_tokens": mask.sum()}

    def forward(self, batch: dict, gen_rows: int | torch.Tensor | None = None, rec_rows: int = 0,
                cand_ids: torch.Tensor | None = None) -> dict:
        """Interests, plus in the same forward the generation logits of `gen_rows` (the first n
        rows, or a bool [B] mask), the reconstruction branch from z of the first `rec_rows` rows,
        and the item-tower embeddings of `cand_ids` with the temperature. One call touches every
        parameter a training step uses, so compiling `forward` compiles the step's whole forward
        (and DeepSpeed's DeepCompile, which gathers parameters only inside that graph, can work)."""
        if gen_rows is None:
            out = self.interests(batch)
        else:
            out = self._interests_and_generation(batch, gen_rows)
        if cand_ids is not None:
            out.update(cand=self.item_embeddings(cand_ids), tau=self.tau,
                       seen=None if self.seen is None else self.seen())
        if rec_rows:
            rec = self.reconstruct(out["z"][:rec_rows], batch["target"][:rec_rows])
            out.update(rec_logits=rec["rec_logits"], rec_labels=rec["rec_labels"],
                       n_tokens=out["n_tokens"] + rec["n_tokens"])
        return out

    def _interests_and_generation(self, batch: dict, gen_rows: int | torch.Tensor) -> dict:
        b = batch["history"].shape[0]
        if not isinstance(gen_rows, torch.Tensor) and gen_rows < b:
            # A prefix of rows decodes: only those carry the target text through the backbone; the
            # rest run the interest path alone (z is the same: the text comes after INT_H).
            head = self._interests_and_generation({k: v[:gen_rows] for k, v in batch.items()}, gen_rows)
            rest = self.interests({k: v[gen_rows:] for k, v in batch.items()})
            mix = None if head["mix_logits"] is None else torch.cat([head["mix_logits"], rest["mix_logits"]])
            return {**head, "z": torch.cat([head["z"], rest["z"]]), "mix_logits": mix,
                    "n_tokens": head["n_tokens"] + rest["n_tokens"]}
        embeds, mask, _ = self._prefix(batch)
        n_prefix = embeds.shape[1]
        t_emb, t_mask, labels = self._text_part(batch["target"])
        full_mask = torch.cat([mask, t_mask], 1)
        hidden = self._run(torch.cat([embeds, t_emb], 1), full_mask).last_hidden_state
        z, mix = self._read_interests(hidden, n_prefix, batch)
        text = hidden[:, n_prefix + self._n_gen_prompt - 1 :]  # the T labelled positions
        if isinstance(gen_rows, torch.Tensor):  # a mask: every row projected, labels of the others ignored
            labels = labels.masked_fill(~gen_rows.unsqueeze(1), -100)
        else:  # a prefix of rows: a static slice
            text, labels = text[:gen_rows], labels[:gen_rows]
        logits, flat_labels = self._lm_logits(text, labels)
        return {"z": z, "mix_logits": mix, "gen_logits": logits, "gen_labels": flat_labels,
                "n_tokens": full_mask.sum()}

    def _rec_prefix(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[describe the item:] [P_rec(z)]: the embedding alone, no history. Uses head 0 (its
        learned half, re-normalised, with model.rec_input=learned)."""
        b = z.shape[0]
        instr = self.embed_tokens(self.rec_prompt_ids).unsqueeze(0).expand(b, -1, -1)
        z0 = z[:, 0]
        if self.cfg.rec_input == "learned":
            z0 = F.normalize(z0[:, : self.cfg.embed_dim].float(), dim=-1)
        soft = self.rec_proj(z0.to(self.rec_proj.weight.dtype)).view(b, self.cfg.rec_soft_tokens, self.hidden)
        embeds = torch.cat([instr, soft.to(instr.dtype)], dim=1)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=z.device)

    def reconstruct(self, z: torch.Tensor, target: torch.Tensor) -> dict:
        """Reconstruction branch: decode the target text from z alone."""
        embeds, mask = self._rec_prefix(z)
        t_emb, t_mask, labels = self._text_part(target)
        full_mask = torch.cat([mask, t_mask], 1)
        hidden = self._run(torch.cat([embeds, t_emb], 1), full_mask).last_hidden_state
        logits, flat_labels = self._lm_logits(hidden[:, embeds.shape[1] + self._n_gen_prompt - 1 :], labels)
        return {"rec_logits": logits, "rec_labels": flat_labels, "n_tokens": full_mask.sum()}

    def compile_parts(self, how: str, dynamic: bool | None = None, backend: str = "inductor") -> None:
        """torch.compile in place. "decoder": the backbone's decoder (one graph per input shape);
        "layers": every decoder layer (one graph shared by all, hooks between layers stay
        outside it: the form that suits ZeRO-3); "model": this module's forward (both branches);
        "none": nothing."""
        if how == "none":
            return
        decoder = self.backbone.get_decoder()
        if how == "decoder":
            decoder.compile(dynamic=dynamic, backend=backend)
        elif how == "layers":
            for layer in decoder.layers:
                layer.compile(dynamic=dynamic, backend=backend)
        elif how == "model":
            self.compile(dynamic=dynamic, backend=backend)
        else:
            raise ValueError(f"compile: {how!r} is not one of 'none', 'decoder', 'layers', 'model'")

    @torch.no_grad()
    def decode_from_z(self, z: torch.Tensor, max_tokens: int) -> list[list[int]]:
        """Greedy decoding of item text from z (fidelity analysis); stops at EOS."""
        embeds, mask = self._rec_prefix(z)
        gen = self.gen_prompt_ids.expand(z.shape[0], -1)
        embeds = torch.cat([embeds, self.embed_tokens(gen)], 1)
        out = torch.empty(z.shape[0], 0, dtype=torch.long, device=z.device)
        for _ in range(max_tokens):
            m = torch.ones(embeds.shape[:2], dtype=torch.bool, device=z.device)
            hidden = self._run(embeds, m).last_hidden_state[:, -1]
            nxt = self.backbone.get_output_embeddings()(hidden).argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            embeds = torch.cat([embeds, self.embed_tokens(nxt)], 1)
        return out.tolist()

    @torch.no_grad()
    def attention_maps(self, batch: dict) -> dict:
        """Eager attention maps of the interest path, for sink and collapse analyses."""
        from karma.backbone import set_attention

        embeds, mask, item_mask = self._prefix(batch)
        set_attention(self.backbone, "eager")
        try:
            out = self._run(embeds, mask, output_attentions=True)
        finally:
            set_attention(self.backbone, self.cfg.attn_implementation)
        n = embeds.shape[1]
        query_pos = torch.arange(n - self.cfg.n_interest, n, device=mask.device).expand(mask.shape[0], -1)
        return {"attentions": [a.float() for a in out.attentions], "attention_mask": mask,
                "item_mask": item_mask, "query_positions": query_pos}
