"""Item rows, sequence order, popularity counts, the epoch's shuffle and batch collation.

Examples speak in item ROWS (position in `data.items`, 0..n_items-1), not item ids,
because the model's embedding tables are indexed by row. The id -> row mapping
happens exactly once, when the sequences are built (`karma.data.compact`).

`collate` batches example rows given one by one (serving, hand-made batches):
    user_id  int
    history  1-D array of item rows, oldest first
    target   int item row
    query    str ("" or None when the click had no search query)
    shown    1-D array of item rows shown but not clicked (possibly empty)
The training data itself is `karma.data.compact.Examples`, whose `collate` gives the same tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .schema import DataError

if TYPE_CHECKING:
    from .compact import Examples

def item_rows(items: pd.DataFrame, item_ids, where: str = "events") -> np.ndarray:
    """Map item ids to item rows (vectorised); unknown ids are a DataError."""
    ids = np.asarray(item_ids, dtype=np.int64)
    rows = pd.Index(items["item_id"]).get_indexer(ids)
    if (rows < 0).any():
        bad = np.unique(ids[rows < 0])
        raise DataError(f"{where}: {len(bad)} item id(s) not in items (e.g. {bad[:5].tolist()}); "
                        "validate the data first")
    return rows.astype(np.int64)


def sequence_positions(events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, pos, n): the permutation that sorts events by (user_id, ts) (stable: equal ts
    keep their order), and each sorted event's position in its user's sequence and its
    user's sequence length (int64). Vectorised; validated events are already sorted, which
    costs one pass to see."""
    user = events["user_id"].to_numpy(np.int64)
    ts = events["ts"].to_numpy(np.int64)
    step_user, step_ts = np.diff(user), np.diff(ts)
    if (step_user >= 0).all() and ((step_user > 0) | (step_ts >= 0)).all():
        order = np.arange(len(user), dtype=np.int64)
    else:
        order = np.lexsort((ts, user))  # a stable sort, last key first
        user = user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, np.int64)
    lengths = np.diff(np.append(starts, len(user)))
    pos = np.arange(len(user), dtype=np.int64) - np.repeat(starts, lengths)
    return order, pos, np.repeat(lengths, lengths)


def item_counts(train_examples: Examples, n_items: int) -> np.ndarray:
    """How often each item row is a training TARGET (history occurrences are not counted:
    every target also reappears in later histories, which would double-count long users).
    Used as the popularity distribution for negative sampling and the popularity baseline."""
    t = train_examples.targets
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
