"""Inference export: everything serving needs, in formats that load without pickle.

    export/
      config.json            the full training Config
      backbone_config.json   the backbone's Hugging Face config (architecture only)
      model.safetensors      all KARMA weights and item buffers, in the trained dtype
      tokenizer/             word vocabulary (json) or Hugging Face tokenizer files
      items.parquet          item row, item_id, title, category, brand, embedding (item tower)
      meta.json              sizes, dtype, config digest, library version
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from karma import __version__
from karma.backbone import backbone_from_config, with_lora
from karma.config import Config, from_dict
from karma.data import collate
from karma.model import KarmaModel, Prompts
from karma.batch import prepare_batch
from karma.text import Tokenizer, load_tokenizer


def _backbone_config(model: KarmaModel) -> dict:
    base = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    return base.config.to_dict()


def export_model(model: KarmaModel, tok: Tokenizer, cfg: Config, items: pd.DataFrame, out_dir: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None, item_emb: np.ndarray | None = None) -> Path:
    """Write the export folder. `state_dict` and `item_emb` override what the module would give
    (a gathered ZeRO-3 state, item embeddings computed on every rank)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    # safetensors refuses tensors that share memory (tied embeddings): store each once, cloned.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "backbone_config.json").write_text(json.dumps(_backbone_config(model), indent=2, default=str))
    tok.save(out / "tokenizer")
    if item_emb is None:
        with torch.no_grad():
            item_emb = model.item_embeddings().float().cpu().numpy()
    emb = item_emb
    table = pa.table({
        "row": pa.array(np.arange(len(items), dtype=np.int64)),
        "item_id": pa.array(items["item_id"].to_numpy(np.int64)),
        "title": pa.array(items["title"].astype(str).tolist()),
        "category": pa.array(items["category"].astype(str).tolist()),
        "brand": pa.array(items["brand"].astype(str).tolist()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
    })
    pq.write_table(table, out / "items.parquet")
    dtype = str(state["interest.weight"].dtype).replace("torch.", "")
    meta = {
        "karma_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_digest": cfg.digest(), "n_items": len(items), "n_interest": cfg.model.n_interest,
        "embed_dim": cfg.model.embed_dim, "dtype": dtype,
        "text_dim": int(model.items.text_emb.shape[1]) if model.items.mlp_txt is not None else 0,
        "image_dim": int(model.items.image_emb.shape[1]) if model.items.mlp_img is not None else 0,
        "text_tokens": int(model.item_tokens.shape[1]), "pad_id": model.pad_id,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


@dataclass
class InferenceModel:
    """The interest path of an exported model, plus its item table and embeddings."""

    model: KarmaModel
    tok: Tokenizer
    cfg: Config
    items: pd.DataFrame  # row, item_id, title, category, brand
    item_emb: np.ndarray  # [N, d] float32 item-tower embeddings
    meta: dict
    device: torch.device

    @cached_property
    def _id_index(self) -> pd.Index:
        return pd.Index(self.items["item_id"])  # its hash table is built once, on first lookup

    def rows_of(self, item_ids) -> np.ndarray:
        """Item ids -> rows; -1 where unknown (the caller decides how to complain)."""
        return self._id_index.get_indexer(np.asarray(item_ids, dtype=np.int64))

    @torch.inference_mode()
    def encode(self, histories: list, queries: list | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Interest embeddings [B, H, d] and mixture logits [B, H] (None for a max-reduce model)
        for histories given as item ROWS (oldest first)."""
        b = len(histories)
        rows = {"user_id": [0] * b, "history": [np.asarray(h, dtype=np.int64) for h in histories],
                "target": [0] * b, "query": [q or "" for q in queries] if queries else [""] * b,
                "shown": [np.zeros(0, np.int64)] * b}
        batch = prepare_batch(collate(rows, self.cfg.data.max_history), self.model, self.tok, self.device)
        out = self.model.interests(batch)
        mix = out["mix_logits"]
        return out["z"].float().cpu().numpy(), None if mix is None else mix.float().cpu().numpy()

    def interests(self, histories: list, queries: list | None = None) -> np.ndarray:
        """Interest embeddings [B, H, d] for histories given as item ROWS (oldest first)."""
        return self.encode(histories, queries)[0]


def load_export(path: str | Path, device: str = "cpu", dtype: str | None = None) -> InferenceModel:
    """Rebuild the model from an export folder. `dtype` defaults to the trained one, so the
    reloaded model computes exactly what the trained one did."""
    path = Path(path)
    missing = [n for n in ("config.json", "backbone_config.json", "model.safetensors", "meta.json", "items.parquet")
               if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a KARMA export: missing {missing}")
    cfg = from_dict(json.loads((path / "config.json").read_text()))
    meta = json.loads((path / "meta.json").read_text())
    tok = load_tokenizer(path / "tokenizer")
    backbone = with_lora(backbone_from_config(json.loads((path / "backbone_config.json").read_text()), cfg.model),
                         cfg.model)
    n, t = meta["n_items"], meta["text_tokens"]
    model = KarmaModel(
        cfg.model, backbone, n_items=n, item_tokens=torch.zeros(n, t, dtype=torch.long),
        item_token_len=torch.zeros(n, dtype=torch.long), pad_id=meta["pad_id"], prompts=Prompts.from_tokenizer(tok),
        text_emb=torch.zeros(n, meta["text_dim"]) if meta["text_dim"] else None,
        image_emb=torch.zeros(n, meta["image_dim"]) if meta["image_dim"] else None,
        tau_init=cfg.loss.tau_init,
        # the saved item_trust buffer replaces these zeros (train_trust is for training only)
        item_counts=torch.zeros(n) if cfg.model.id_shrinkage > 0 or cfg.model.train_id_shrinkage > 0 else None,
    )
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype or meta["dtype"]]
    dev = torch.device(device)
    model.to(dev).eval()
    # Cast parameters only, as the training engines do: buffers such as RoPE's inverse
    # frequencies stay fp32, so the reloaded model computes what the trained one did.
    for p in model.parameters():
        p.data = p.data.to(torch_dtype)
    table = pq.read_table(path / "items.parquet")
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    items = table.drop(["embedding"]).to_pandas()
    return InferenceModel(model, tok, cfg, items, emb, meta, dev)
