"""Training examples: (history -> next item) rows, their Arrow form, and batch collation.

Examples speak in item ROWS (position in `data.items`, 0..n_items-1), not item ids,
because the model's embedding tables are indexed by row. The id -> row mapping
happens exactly once, here.

Example frame columns:
    user_id  int64
    history  1-D int64 array of item rows, oldest first, at most max_history long
    target   int64 item row
    query    str ("" when the click had no search query)
    shown    1-D int64 array of item rows shown but not clicked (possibly empty)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from .schema import DataError, InteractionData

EXAMPLE_COLUMNS = ("user_id", "history", "target", "query", "shown")


def item_rows(items: pd.DataFrame, item_ids, where: str = "events") -> np.ndarray:
    """Map item ids to item rows (vectorised); unknown ids are a DataError."""
    ids = np.asarray(item_ids, dtype=np.int64)
    rows = pd.Index(items["item_id"]).get_indexer(ids)
    if (rows < 0).any():
        bad = np.unique(ids[rows < 0])
        raise DataError(f"{where}: {len(bad)} item id(s) not in items (e.g. {bad[:5].tolist()}); "
                        "validate the data first")
    return rows.astype(np.int64)


def sequence_positions(events: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Events sorted by (user_id, ts) (stable), each event's position in its user's
    sequence, and its user's sequence length."""
    ev = events.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    g = ev.groupby("user_id", sort=False)
    return ev, g.cumcount().to_numpy(np.int64), g["user_id"].transform("size").to_numpy(np.int64)


def make_examples(data: InteractionData, ev: pd.DataFrame, pos: np.ndarray, select: np.ndarray,
                  max_history: int = 50) -> pd.DataFrame:
    """One example per selected event of `ev` (sorted as by `sequence_positions`) that has
    at least one earlier event; history = that user's previous events, the last `max_history`."""
    if max_history < 1:
        raise DataError(f"max_history must be >= 1, got {max_history}")
    rows = item_rows(data.items, ev["item_id"].to_numpy())
    idx = np.flatnonzero(select & (pos >= 1))
    starts = idx - np.minimum(pos[idx], max_history)  # never crosses into the previous user
    history = [rows[s:e] for s, e in zip(starts.tolist(), idx.tolist())]
    if "query" in ev.columns:
        query = ["" if q is None or pd.isna(q) else str(q) for q in ev["query"].to_numpy()[idx]]
    else:
        query = [""] * len(idx)
    if "shown" in ev.columns:
        lists = [np.zeros(0, np.int64) if v is None else np.asarray(v, np.int64).reshape(-1)
                 for v in ev["shown"].to_numpy()[idx]]
        flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        cuts = np.cumsum([len(v) for v in lists])[:-1]
        shown = np.split(item_rows(data.items, flat, "events.shown"), cuts) if lists else []
    else:
        shown = [np.zeros(0, np.int64) for _ in idx]
    return pd.DataFrame({
        "user_id": ev["user_id"].to_numpy(np.int64)[idx],
        "history": pd.Series(history, dtype=object),
        "target": rows[idx],
        "query": pd.Series(query, dtype=object),
        "shown": pd.Series(shown, dtype=object),
    })


def _list_array(values: Sequence[np.ndarray]) -> pa.ListArray:
    lens = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate([np.asarray(v, np.int32) for v in values]) if len(values) else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32)))


def to_arrow(examples: pd.DataFrame) -> pa.Table:
    """Examples as an Arrow table (what goes to Parquet for the workers): history and shown as
    list<int32>, target int32, user_id int64, query string."""
    missing = [c for c in EXAMPLE_COLUMNS if c not in examples.columns]
    if missing:
        raise DataError(f"examples: missing column(s) {missing}; build them with leave_one_out/time_split")
    return pa.table({
        "user_id": pa.array(examples["user_id"].to_numpy(np.int64)),
        "history": _list_array(list(examples["history"])),
        "target": pa.array(examples["target"].to_numpy().astype(np.int32)),
        "query": pa.array([str(q) for q in examples["query"]], pa.string()),
        "shown": _list_array(list(examples["shown"])),
    })


def item_counts(train_examples: pd.DataFrame, n_items: int) -> np.ndarray:
    """How often each item row is a training TARGET (history occurrences are not counted:
    every target also reappears in later histories, which would double-count long users).
    Used as the popularity distribution for negative sampling and the popularity baseline."""
    t = train_examples["target"].to_numpy(np.int64)
    if len(t) and (t.min() < 0 or t.max() >= n_items):
        raise DataError(f"examples: target rows must lie in [0, {n_items}); got range [{t.min()}, {t.max()}]")
    return np.bincount(t, minlength=n_items).astype(np.int64)


def epoch_order(history_lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                bucket_batches: int = 0) -> np.ndarray:
    """The example rows of one epoch, in batch order: a full permutation cut to whole batches.
    With `bucket_batches` > 0, each run of that many batches is re-cut by history length (a batch
    then pads to a similar length; collate pads to the longest row) and its batches re-shuffled,
    so the epoch still visits every row once and batch order stays random."""
    order = rng.permutation(len(history_lengths))
    order = order[: len(order) // batch_size * batch_size]  # no ragged last batch
    if bucket_batches <= 0:
        return order
    span = batch_size * bucket_batches
    out = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(history_lengths[chunk], kind="stable")]
        cut = chunk.reshape(-1, batch_size)
        out.append(cut[rng.permutation(len(cut))].reshape(-1))
    return np.concatenate(out)


def _columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, list]:
    if isinstance(rows, Mapping):  # dict of columns, e.g. Ray Data numpy batches
        return {k: list(v) for k, v in rows.items()}
    return {k: [r.get(k) for r in rows] for k in ("user_id", "history", "target", "query", "shown")}


def collate(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], max_history: int) -> dict[str, Any]:
    """Batch examples (a list of row dicts, or a dict of column arrays/lists) into tensors.

    history [B, L] LEFT-padded with 0, L = longest history in the batch capped at
    max_history (most recent items kept); history_mask [B, L] True on real items;
    shown [B, S] RIGHT-padded with -1, S >= 1; target/user_id [B]; query list[str].
    """
    import torch  # only batching needs torch; data prep and Ray Data workers stay light

    cols = _columns(rows)
    hist = [np.asarray(h, np.int64).reshape(-1)[-max_history:] for h in cols["history"]]
    b = len(hist)
    L = max([len(h) for h in hist] + [1])
    history = np.zeros((b, L), np.int64)
    mask = np.zeros((b, L), bool)
    for i, h in enumerate(hist):
        if len(h):
            history[i, L - len(h):] = h
            mask[i, L - len(h):] = True
    shown_in = cols.get("shown") or [None] * b
    shown_l = [np.zeros(0, np.int64) if s is None else np.asarray(s, np.int64).reshape(-1) for s in shown_in]
    S = max([len(s) for s in shown_l] + [1])
    shown = np.full((b, S), -1, np.int64)
    for i, s in enumerate(shown_l):
        shown[i, : len(s)] = s
    query = ["" if q is None else str(q) for q in (cols.get("query") or [None] * b)]
    return {
        "history": torch.from_numpy(history),
        "history_mask": torch.from_numpy(mask),
        "target": torch.as_tensor(np.asarray(cols["target"], np.int64)),
        "user_id": torch.as_tensor(np.asarray(cols["user_id"], np.int64)),
        "query": query,
        "shown": torch.from_numpy(shown),
    }
