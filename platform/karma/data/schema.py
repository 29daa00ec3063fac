"""The canonical in-memory data set and its validation.

Every reader ends in `validate`, so the rest of the library can trust that ids are
non-negative int64, text columns are non-null strings, every referenced item exists,
and events are sorted by (user_id, ts). Errors say which file/column is wrong and how
to fix it, because data problems are the most common first-run failure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa

ITEM_COLUMNS = ("item_id", "title", "category", "brand", "text")
EVENT_COLUMNS = ("user_id", "item_id", "ts")
MIN_EVENTS_PER_USER = 2  # one history item + one target = the smallest example


class DataError(ValueError):
    """Bad input data; the message names the file/column and says how to fix it."""


@dataclass
class InteractionData:
    items: pd.DataFrame
    events: pd.DataFrame
    users: pd.DataFrame | None = None
    name: str = ""

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return int(self.events["user_id"].nunique())


def _examples(values, k: int = 5) -> str:
    vals = list(values)
    more = f", ... ({len(vals)} in all)" if len(vals) > k else ""
    return ", ".join(str(v) for v in vals[:k]) + more


def _require_columns(df: pd.DataFrame, required, where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} (present: {list(df.columns)}); "
            f"the required columns are {list(required)} - rename or add them"
        )


def _no_nulls(s: pd.Series, where: str, hint: str) -> None:
    bad = s.isna().to_numpy()
    if bad.any():
        raise DataError(
            f"{where}: column '{s.name}' has {int(bad.sum())} null value(s), "
            f"first at row {int(np.argmax(bad))}; {hint}"
        )


def _first_non_integer(s: pd.Series) -> int:
    """Row of the first value that is not a whole number (to name it in an error)."""
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(num) | (np.mod(num, 1) != 0)
    return int(np.argmax(bad))


def _as_int64(s: pd.Series, where: str, non_negative: bool) -> pd.Series:
    _no_nulls(s, where, "drop those rows or fill the column")
    try:
        if s.dtype.kind == "f" and not np.all(np.mod(s.to_numpy(), 1) == 0):
            raise ValueError("non-integral floats")
        out = s.astype("int64")
    except (ValueError, TypeError, OverflowError) as e:
        row = _first_non_integer(s)
        value = s.iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise DataError(
            f"{where}: column '{s.name}' (dtype {s.dtype}) cannot be cast to int64 ({e}), first at row {row} "
            f"(value {value!r}); ids and timestamps must be whole numbers"
        ) from None
    negative = out.to_numpy() < 0
    if non_negative and negative.any():
        neg = out[negative]
        raise DataError(
            f"{where}: column '{s.name}' has {len(neg)} negative value(s) "
            f"(e.g. {_examples(neg.unique())}), first at row {int(np.argmax(negative))}; ids must be >= 0 - remap them"
        )
    return out


def _as_str(s: pd.Series, where: str, hint: str) -> pd.Series:
    _no_nulls(s, where, hint)
    return s.astype(str)


def _image_column(s: pd.Series, where: str) -> pd.Series:
    _no_nulls(s, where, "give every item an image vector or drop the 'image' column")
    vecs = [np.asarray(v, dtype=np.float32).reshape(-1) for v in s]
    lens = np.array([len(v) for v in vecs])
    if len(lens) and (lens != lens[0]).any():
        first = int(np.argmax(lens != lens[0]))
        raise DataError(
            f"{where}: column 'image' has vectors of unequal length "
            f"({sorted(set(lens.tolist()))}); row 0 has {lens[0]}, row {first} has {lens[first]} - "
            "all frozen image vectors must come from the same encoder"
        )
    return pd.Series(vecs, index=s.index, name="image", dtype=object)


def validate_items(items: pd.DataFrame, where: str = "items") -> pd.DataFrame:
    """Check and normalise the items table; row order is kept (it defines item rows)."""
    _require_columns(items, ITEM_COLUMNS, where)
    df = items.reset_index(drop=True).copy()
    df["item_id"] = _as_int64(df["item_id"], where, non_negative=True)
    dup = df["item_id"][df["item_id"].duplicated()]
    if len(dup):
        raise DataError(
            f"{where}: {len(dup)} duplicate item_id(s) (e.g. {_examples(dup.unique())}); "
            "item ids must be unique - deduplicate the items table"
        )
    df["title"] = _as_str(df["title"], where, "every item needs a title")
    empty = (df["title"].str.strip() == "").to_numpy()
    if empty.any():
        row = int(np.argmax(empty))
        raise DataError(
            f"{where}: column 'title' has {int(empty.sum())} empty value(s), first at row {row} "
            f"(item_id {df['item_id'].iloc[row]}); every item needs a non-empty title"
        )
    for col in ("category", "brand", "text"):
        df[col] = _as_str(df[col], where, f"use '' where '{col}' is unknown")
    if "image" in df.columns:
        df["image"] = _image_column(df["image"], where)
    return df


def _shown_column(s: pd.Series, known: pd.Index, where: str) -> pd.Series:
    """Normalise `shown` to int64 arrays (null and [] both mean 'no impression'). Arrow converts
    the whole column at once; its rows come back as views of one buffer."""
    try:
        lists = pa.array(s.to_numpy(dtype=object), type=pa.list_(pa.int64()), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise DataError(f"{where}: column 'shown' must hold lists of integer item ids ({e})") from None
    lists = pa.ListArray.from_arrays(lists.offsets, lists.values)  # null -> [] (nulls span no values)
    flat = lists.values.to_numpy()
    bad = known.get_indexer(flat) < 0
    if bad.any():
        first_row = int(np.searchsorted(lists.offsets.to_numpy(), np.argmax(bad), side="right") - 1)
        raise DataError(
            f"{where}: column 'shown' references {int(bad.sum())} unknown item id(s) "
            f"(e.g. {_examples(np.unique(flat[bad]))}), first at row {first_row}; every shown item must be in "
            "items - drop them from the lists or add the items"
        )
    return pd.Series(lists.to_pandas().to_numpy(), index=s.index, name="shown", dtype=object)


def _query_column(s: pd.Series) -> pd.Series:
    """`query` as str or None per row."""
    values = s.to_numpy(dtype=object, copy=True)
    missing = pd.isna(values)
    if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
        values[~missing] = [str(q) for q in values[~missing]]  # only for queries that are not text yet
    values[missing] = None
    return pd.Series(values, index=s.index, name="query", dtype=object)


def validate_events(events: pd.DataFrame, items: pd.DataFrame, where: str = "events") -> pd.DataFrame:
    """Check and normalise events against (validated) items; sort by user_id, ts (stable)."""
    _require_columns(events, EVENT_COLUMNS, where)
    df = events.reset_index(drop=True).copy()
    df["user_id"] = _as_int64(df["user_id"], where, non_negative=True)
    df["item_id"] = _as_int64(df["item_id"], where, non_negative=True)
    df["ts"] = _as_int64(df["ts"], where, non_negative=False)
    known = pd.Index(items["item_id"])
    missing = known.get_indexer(df["item_id"]) < 0
    if missing.any():
        unknown = df["item_id"][missing]
        raise DataError(
            f"{where}: {len(unknown)} event(s) reference item ids missing from items "
            f"(e.g. {_examples(unknown.unique())}), first at row {int(np.argmax(missing))}; add those items or "
            "drop the events"
        )
    if "query" in df.columns:  # nullable: most clicks come without a search
        df["query"] = _query_column(df["query"])
    if "shown" in df.columns:
        df["shown"] = _shown_column(df["shown"], known, where)
    user, ts = df["user_id"].to_numpy(), df["ts"].to_numpy()
    if not np.all((user[1:] > user[:-1]) | ((user[1:] == user[:-1]) & (ts[1:] >= ts[:-1]))):
        df = df.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)  # readers mostly sort already
        user = df["user_id"].to_numpy()
    starts = np.flatnonzero(np.concatenate(([True], user[1:] != user[:-1]))) if len(user) else np.zeros(0, int)
    sizes = np.diff(np.append(starts, len(user)))
    short = user[starts[sizes < MIN_EVENTS_PER_USER]]
    if len(short):
        raise DataError(
            f"{where}: {len(short)} user(s) have empty histories (fewer than {MIN_EVENTS_PER_USER} "
            f"events, e.g. user_id {_examples(short)}); a user needs at least "
            f"{MIN_EVENTS_PER_USER} events to make one example - filter them out, e.g. "
            "events[events.groupby('user_id').user_id.transform('size') >= 2]"
        )
    return df


def validate_users(users: pd.DataFrame, where: str = "users") -> pd.DataFrame:
    _require_columns(users, ("user_id",), where)
    df = users.reset_index(drop=True).copy()
    df["user_id"] = _as_int64(df["user_id"], where, non_negative=True)
    dup = df["user_id"][df["user_id"].duplicated()]
    if len(dup):
        raise DataError(
            f"{where}: {len(dup)} duplicate user_id(s) (e.g. {_examples(dup.unique())}); "
            "keep one feature row per user"
        )
    return df


def validate(data: InteractionData, where: str = "") -> InteractionData:
    """Validate all tables; returns a new InteractionData with normalised frames."""
    pre = f"{where}/" if where else ""
    items = validate_items(data.items, f"{pre}items")
    events = validate_events(data.events, items, f"{pre}events")
    users = None if data.users is None else validate_users(data.users, f"{pre}users")
    return replace(data, items=items, events=events, users=users)
