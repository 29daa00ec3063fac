"""Assemble a KarmaModel from a Config and the item table (the only place that does I/O for it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from karma.backbone import load_backbone
from karma.config import Config
from karma.model import KarmaModel, Prompts
from karma.text import Tokenizer, item_texts, load_text_table, text_embeddings, tokenize_items


def image_matrix(items: pd.DataFrame) -> torch.Tensor | None:
    if "image" not in items.columns:
        return None
    return torch.tensor(np.stack(items["image"].to_numpy()).astype(np.float32))


def build_model(cfg: Config, items: pd.DataFrame, log=print, seed: int | None = None,
                text_table: str | Path | None = None, counts: np.ndarray | None = None) -> tuple[KarmaModel, Tokenizer]:
    """A fresh KARMA model (pretrained backbone where configured) and its tokenizer; with
    model.arch=sasrec the ID-only SASRec baseline and a tokenizer stand-in (it reads no text).

    The frozen item text embeddings come from `text_table` when given (the table the Ray job's
    text task stored; loaded, never recomputed, so a missing file is an error), else they are
    computed once into `data.cache_dir` and reused (the plain run, tests, benchmarks). `counts`
    (each item's training-target count) is what model.id_shrinkage weighs the learned half by."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    if cfg.model.arch == "sasrec":
        from karma.sasrec import IdOnlyTokenizer, SASRec

        return SASRec(cfg.model, n_items=len(items), max_len=cfg.data.max_history), IdOnlyTokenizer()
    texts = item_texts(items)
    if text_table is not None:
        text_emb = load_text_table(text_table, len(items))
        if log:
            log(f"item text embeddings loaded from {text_table}")
    else:
        text_emb = text_embeddings(texts, cfg.data.text_encoder, cfg.data.cache_dir, log=log)
    backbone, tok = load_backbone(cfg.model, texts, cfg.data.cache_dir, log=log)
    tokens, lengths = tokenize_items(texts, tok, cfg.data.text_max_tokens)
    model = KarmaModel(
        cfg.model, backbone, n_items=len(items),
        item_tokens=torch.from_numpy(tokens), item_token_len=torch.from_numpy(lengths),
        pad_id=tok.pad_id, prompts=Prompts.from_tokenizer(tok),
        text_emb=None if text_emb is None else torch.from_numpy(text_emb),
        image_emb=image_matrix(items), tau_init=cfg.loss.tau_init, learn_tau=cfg.loss.learn_tau,
        item_counts=None if counts is None else torch.as_tensor(np.asarray(counts)),
    )
    return model, tok
