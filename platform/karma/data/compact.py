"""Compact training examples: every user's item sequence stored once, each split an index into it,
history windows cut only when a batch is collated.

An example frame stores each history window whole, so an event sits in up to `max_history`
examples; at 10^7 events that multiplies the data set by the window length. Here:

    Sequences   every user's events once, CSR-style, in (user_id, ts) order:
                offsets int64 [U+1] (user u's events are offsets[u]:offsets[u+1]),
                items int32 [N] (item ROWS, as everywhere), user_ids int64 [U];
                when the data has them, query (Arrow strings [N], "" = no query) and
                shown lists (shown_offsets int64 [N+1], shown_items int32 [S], item rows)
    Examples    one split: (seq, pos) int32 pairs. The target is event `pos` of sequence
                `seq`; the history is that user's previous events, the last `max_history`
                (so a user's first event is never a target and no window crosses users)

On disk (`write_examples`, read memory-mapped by `read_examples`):

    sequences/offsets.npy  items.npy  user_ids.npy  [query.arrow]  [shown_offsets.npy  shown_items.npy]
    <split>.npy            int32 [n, 2]: the (seq, pos) pairs of each split (train, valid, test)
    examples.json          max_history and the number of examples per split

`Examples.collate` gives exactly the tensors `karma.data.collate` gives for the same rows in
the frame form (`to_frame` / `from_frame` convert, for small outputs and hand-made fixtures).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .examples import item_rows
from .schema import DataError, InteractionData

SEQUENCE_ARRAYS = ("offsets", "items", "user_ids", "shown_offsets", "shown_items")
META = "examples.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Sequences:
    """Every user's events once, sorted by (user_id, ts); see the module docstring."""

    offsets: np.ndarray  # int64 [U+1]
    items: np.ndarray  # int32 [N] item rows
    user_ids: np.ndarray  # int64 [U]
    query: pa.ChunkedArray | None = None  # large_string [N], "" = no query
    shown_offsets: np.ndarray | None = None  # int64 [N+1]
    shown_items: np.ndarray | None = None  # int32 [S] item rows

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_events(self) -> int:
        return len(self.items)

    @classmethod
    def from_events(cls, data: InteractionData, order: np.ndarray, pos: np.ndarray) -> Sequences:
        """The sequences of `data.events` in the order `order` (from `sequence_positions`, with
        each sorted event's position `pos` in its user's sequence). Vectorised: no Python
        object per event except where pandas already holds one (query strings, shown lists)."""
        ev = data.events
        starts = np.flatnonzero(pos == 0)
        offsets = np.append(starts, len(pos)).astype(np.int64)
        user_ids = ev["user_id"].to_numpy(np.int64)[order[starts]]
        items = item_rows(data.items, ev["item_id"].to_numpy()[order]).astype(np.int32)
        query = shown_offsets = shown_items = None
        if "query" in ev.columns:
            query = _strings(ev["query"], "events.query").take(pa.array(order))
        if "shown" in ev.columns:
            shown_offsets, shown_ids = _lists(ev["shown"], order)
            shown_items = item_rows(data.items, shown_ids, "events.shown").astype(np.int32)
        return cls(offsets, items, user_ids, query, shown_offsets, shown_items)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in SEQUENCE_ARRAYS:
            value = getattr(self, name)
            if value is not None:
                _save_npy(folder / f"{name}.npy", value)
            else:  # an earlier preparation's file would be read as this data's
                (folder / f"{name}.npy").unlink(missing_ok=True)
        (folder / "query.arrow").unlink(missing_ok=True)
        if self.query is not None:
            table = pa.table({"query": self.query})
            tmp = folder / "query.arrow.tmp"
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            os.replace(tmp, folder / "query.arrow")

    @classmethod
    def load(cls, folder: Path) -> Sequences:
        """Memory-mapped: pages are read on demand and shared by every process on the host."""
        arrays: dict[str, Any] = {}
        for name in SEQUENCE_ARRAYS:
            path = folder / f"{name}.npy"
            arrays[name] = np.load(path, mmap_mode="r") if path.is_file() else None
        if arrays["offsets"] is None:
            raise DataError(f"{folder}: no offsets.npy; this is not a prepared sequences folder "
                            "(karma.data.write_examples writes one)")
        path = folder / "query.arrow"
        if path.is_file():
            arrays["query"] = pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("query")
        return cls(**arrays)


@dataclass(frozen=True, eq=False)
class Examples:
    """One split: example i is event `pos[i]` of sequence `seq[i]`, with the `max_history`
    events before it as its history. Subsets (`take`) share the sequences."""

    sequences: Sequences
    seq: np.ndarray  # int32 [n]
    pos: np.ndarray  # int32 [n]
    max_history: int

    def __len__(self) -> int:
        return len(self.seq)

    @classmethod
    def at(cls, sequences: Sequences, events: np.ndarray, max_history: int) -> Examples:
        """Examples whose targets are the given events (indices into `sequences.items`)."""
        if max_history < 1:
            raise DataError(f"max_history must be >= 1, got {max_history}")
        if sequences.n_users >= 2**31 or np.diff(sequences.offsets).max(initial=0) >= 2**31:
            raise DataError(f"{sequences.n_users} users or their longest sequence do not fit the int32 "
                            "example index (2^31)")
        seq = np.searchsorted(sequences.offsets, events, side="right") - 1
        pos = events - sequences.offsets[seq]
        return cls(sequences, seq.astype(np.int32), pos.astype(np.int32), max_history)

    def take(self, rows) -> Examples:
        """The examples at `rows` (an index array or a slice), in that order."""
        return Examples(self.sequences, self.seq[rows], self.pos[rows], self.max_history)

    def head(self, n: int) -> Examples:
        return self.take(slice(0, n))

    @property
    def events(self) -> np.ndarray:
        """Each example's target event: its index into `sequences.items` (int64)."""
        return self.sequences.offsets[self.seq] + self.pos

    @property
    def targets(self) -> np.ndarray:
        """Target item rows, int64."""
        return self.sequences.items[self.events].astype(np.int64)

    @property
    def user_ids(self) -> np.ndarray:
        return self.sequences.user_ids[self.seq].astype(np.int64)

    @property
    def history_lengths(self) -> np.ndarray:
        """len(history) of each example: min(pos, max_history)."""
        return np.minimum(self.pos, self.max_history)

    def collate(self, max_history: int | None = None) -> dict[str, Any]:
        """These examples as one batch: the tensors `karma.data.collate` makes of their frame
        rows (history LEFT-padded with 0 and capped at `max_history`, most recent kept;
        history_mask; shown RIGHT-padded with -1; target; user_id; query strings)."""
        import torch  # only batching needs torch

        s = self.sequences
        cap = self.max_history if max_history is None else min(max_history, self.max_history)
        e = self.events
        n = len(e)
        hist_len = np.minimum(self.pos, cap).astype(np.int64)
        L = max(int(hist_len.max(initial=0)), 1)
        cols = np.arange(L)
        mask = cols >= (L - hist_len)[:, None]
        history = np.where(mask, s.items[np.where(mask, e[:, None] - L + cols, 0)], 0).astype(np.int64)
        if s.shown_offsets is None:
            shown = np.full((n, 1), -1, np.int64)
        else:
            start, stop = s.shown_offsets[e], s.shown_offsets[e + 1]
            S = max(int((stop - start).max(initial=0)), 1)
            cols = np.arange(S)
            real = cols < (stop - start)[:, None]
            shown = np.full((n, S), -1, np.int64)
            if real.any():
                shown[real] = s.shown_items[(start[:, None] + cols)[real]]
        query = s.query.take(pa.array(e)).to_pylist() if s.query is not None else [""] * n
        return {
            "history": torch.from_numpy(history),
            "history_mask": torch.from_numpy(mask),
            "target": torch.from_numpy(s.items[e].astype(np.int64)),
            "user_id": torch.from_numpy(s.user_ids[self.seq].astype(np.int64)),
            "query": query,
            "shown": torch.from_numpy(shown),
        }

    def batches(self, batch_size: int, max_history: int | None = None) -> Iterator[dict[str, Any]]:
        """Collated batches of `batch_size` examples in order (the last one may be short)."""
        for start in range(0, len(self), batch_size):
            yield self.take(slice(start, start + batch_size)).collate(max_history)

    def to_frame(self) -> pd.DataFrame:
        """The example frame (user_id, history, target, query, shown): one Python object per
        row, for small outputs (a probe file, a fixture)."""
        s, e = self.sequences, self.events
        hist_len = self.history_lengths.astype(np.int64)
        history = [s.items[a:b].astype(np.int64) for a, b in zip((e - hist_len).tolist(), e.tolist())]
        if s.shown_offsets is None:
            shown = [np.zeros(0, np.int64) for _ in range(len(e))]
        else:
            cuts = zip(s.shown_offsets[e].tolist(), s.shown_offsets[e + 1].tolist())
            shown = [s.shown_items[a:b].astype(np.int64) for a, b in cuts]
        query = s.query.take(pa.array(e)).to_pylist() if s.query is not None else [""] * len(e)
        return pd.DataFrame({
            "user_id": self.user_ids,
            "history": pd.Series(history, dtype=object),
            "target": self.targets,
            "query": pd.Series(query, dtype=object),
            "shown": pd.Series(shown, dtype=object),
        })

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, max_history: int | None = None) -> Examples:
        """Examples from an example frame (user_id, history, target[, query][, shown]): each row
        becomes its own sequence, its history then its target. `max_history` defaults to the
        longest history, so collation cuts nothing the frame held."""
        missing = [c for c in ("user_id", "history", "target") if c not in frame.columns]
        if missing:
            raise DataError(f"example frame: missing column(s) {missing}; it needs user_id, history, target "
                            "and optionally query and shown")
        hist = [np.asarray(h, np.int64).reshape(-1) for h in frame["history"]]
        n = len(hist)
        lens = np.fromiter((len(h) for h in hist), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens + 1, out=offsets[1:])
        targets = offsets[1:] - 1  # each sequence's last event
        is_target = np.zeros(offsets[-1], bool)
        is_target[targets] = True
        items = np.zeros(offsets[-1], np.int64)
        items[~is_target] = np.concatenate(hist) if n else []
        items[targets] = frame["target"].to_numpy(np.int64)
        query = shown_offsets = shown_items = None
        if "query" in frame.columns:
            text = np.full(offsets[-1], "", dtype=object)
            text[targets] = ["" if q is None or (not isinstance(q, str) and pd.isna(q)) else str(q)
                             for q in frame["query"]]
            query = pa.chunked_array([pa.array(text, pa.large_string())])
        if "shown" in frame.columns:
            lists = [np.zeros(0, np.int64) if v is None else np.asarray(v, np.int64).reshape(-1)
                     for v in frame["shown"]]
            counts = np.zeros(offsets[-1], np.int64)
            counts[targets] = [len(v) for v in lists]
            shown_offsets = np.zeros(offsets[-1] + 1, np.int64)
            np.cumsum(counts, out=shown_offsets[1:])
            shown_items = (np.concatenate(lists) if lists else np.zeros(0, np.int64)).astype(np.int32)
        seqs = Sequences(offsets, items.astype(np.int32), frame["user_id"].to_numpy(np.int64), query,
                         shown_offsets, shown_items)
        cap = max_history if max_history is not None else max(int(lens.max(initial=0)), 1)
        return cls(seqs, np.arange(n, dtype=np.int32), lens.astype(np.int32), cap)


def write_examples(folder: str | Path, splits: Mapping[str, Examples]) -> None:
    """The splits (sharing one `Sequences` and one max_history) as the prepared folder's arrays
    (module docstring); `read_examples` reads them back memory-mapped."""
    folder = Path(folder)
    parts = list(splits.values())
    if not parts or any(p.sequences is not parts[0].sequences or p.max_history != parts[0].max_history
                        for p in parts):
        raise ValueError("write_examples: the splits must share one Sequences and one max_history")
    parts[0].sequences.save(folder / "sequences")
    for name, ex in splits.items():
        _save_npy(folder / f"{name}.npy", np.stack([ex.seq, ex.pos], axis=1).astype(np.int32))
    meta = {"format": FORMAT_VERSION, "max_history": parts[0].max_history,
            "splits": {name: len(ex) for name, ex in splits.items()}}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_examples(folder: str | Path) -> dict[str, Examples]:
    """The splits `write_examples` wrote, memory-mapped (nothing is copied into pandas)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise DataError(f"{folder}: no {META}; prepare the data first (karma.data.write_examples writes it)")
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{folder}/{META}: format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; "
                        "prepare the data again")
    seqs = Sequences.load(folder / "sequences")
    out = {}
    for name in meta["splits"]:
        index = np.load(folder / f"{name}.npy", mmap_mode="r")
        out[name] = Examples(seqs, index[:, 0], index[:, 1], int(meta["max_history"]))
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a renamed temporary file: a process still mapping the previous file keeps
    reading it whole (overwriting it in place would cut the pages from under that mapping)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _strings(column: pd.Series, where: str) -> pa.ChunkedArray:
    """A query column (str or missing) as Arrow strings with "" for missing, without a Python
    loop where pandas already holds strings."""
    try:
        arr = pa.array(column, type=pa.large_string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        arr = pa.array(["" if q is None or (not isinstance(q, str) and pd.isna(q)) else str(q) for q in column],
                       pa.large_string())
    return pa.chunked_array([arr.fill_null("")])


def _lists(column: pd.Series, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A list column (arrays of ids, or null) in `order` as CSR: (offsets int64 [n+1], flat int64 ids)."""
    try:
        arr = pa.array(column, type=pa.list_(pa.int64()), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"events.shown: must hold lists of integer item ids ({err})") from None
    arr = arr.take(pa.array(order))
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(arr) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
