"""Readers: canonical Parquet, RecBole/UniSRec atomic files, raw MovieLens-100K.

Each reader returns a validated `InteractionData`; see docs/DATA_FORMAT.md.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import DataError, InteractionData, validate, validate_events, validate_items, validate_users

SOURCES = ("synthetic", "recbole", "movielens", "parquet")

# Arrow types of the canonical columns; other columns are written as pandas infers them.
_ARROW_TYPES = {
    "item_id": pa.int64(), "user_id": pa.int64(), "ts": pa.int64(),
    "title": pa.string(), "category": pa.string(), "brand": pa.string(), "text": pa.string(),
    "image": pa.list_(pa.float32()), "query": pa.string(), "shown": pa.list_(pa.int64()),
}


def _to_table(df: pd.DataFrame) -> pa.Table:
    cols = {}
    for c in df.columns:
        t = _ARROW_TYPES.get(c)
        vals = df[c]
        if t is not None and pa.types.is_list(t):
            cols[c] = pa.array([None if v is None else list(v) for v in vals], type=t)
        elif t is not None:
            cols[c] = pa.array(vals.to_numpy(), type=t, from_pandas=True)
        else:
            cols[c] = pa.Array.from_pandas(vals)
    return pa.table(cols)


def write_parquet(data: InteractionData, directory: str | Path) -> Path:
    """Write items.parquet, events.parquet (and users.parquet) into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(_to_table(data.items), out / "items.parquet")
    pq.write_table(_to_table(data.events), out / "events.parquet")
    if data.users is not None:
        pq.write_table(_to_table(data.users), out / "users.parquet")
    return out


def _read_table(path: Path) -> pd.DataFrame:
    """One Parquet file as a DataFrame; a file Arrow cannot read is a DataError naming it."""
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}); it may be truncated, "
                        "empty or another format under a .parquet name - write it again with "
                        "karma.data.write_parquet or pandas.DataFrame.to_parquet") from None


def read_parquet(directory: str | Path) -> InteractionData:
    """Read and validate a canonical Parquet data set directory."""
    d = Path(directory)
    for f in ("items.parquet", "events.parquet"):
        if not (d / f).is_file():
            raise DataError(f"{d / f}: file not found; a data set directory needs items.parquet and events.parquet")
    items = validate_items(_read_table(d / "items.parquet"), str(d / "items.parquet"))
    events = validate_events(_read_table(d / "events.parquet"), items, str(d / "events.parquet"))
    users = None
    if (d / "users.parquet").is_file():
        users = validate_users(_read_table(d / "users.parquet"), str(d / "users.parquet"))
    return InteractionData(items=items, events=events, users=users, name=d.name)


# ---------------------------------------------------------------- RecBole / UniSRec

def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found; the RecBole atomic format needs "
                        "{name}.text, .item2index, .train.inter, .valid.inter and .test.inter")
    return path


def _read_pairs(path: Path) -> list[tuple[str, int]]:
    """`key<TAB>index` lines (no header)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected 'key<TAB>integer index', got {line.strip()[:80]!r}")
            out.append((parts[0], int(parts[1])))
    return out


def _read_inter(path: Path) -> list[tuple[int, list[int], int]]:
    """`user<TAB>space-separated history<TAB>target` lines after a header; at least one."""
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f, None)
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                if len(parts) != 3:
                    raise ValueError
                rows.append((int(parts[0]), [int(x) for x in parts[1].split()], int(parts[2])))
            except ValueError:
                raise DataError(f"{path}:{n}: expected 'user<TAB>item item ...<TAB>item' "
                                f"with integer indices, got {line.strip()[:80]!r}") from None
    if not rows:
        raise DataError(f"{path}: no interaction rows (the file is empty or holds only its header); every "
                        ".inter file needs 'user<TAB>history<TAB>target' rows - regenerate the train/valid/test "
                        "files together from the same preprocessing run")
    return rows


def split_recbole_text(text: str) -> tuple[str, str, str]:
    """'{title}. {categories}. {brand}. ' -> (title, categories, brand); missing parts are ''.
    Splitting from the right keeps '. ' inside titles intact."""
    parts = [p.strip() for p in text.rstrip().rstrip(".").rsplit(". ", 2)]
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


def _rebuild(user: int, train: list[list[int]], tail: list[list[int]], L: int) -> list[int]:
    """A user's full sequence from its windows (history + target). `tail` holds the valid
    and/or test windows, which end at the last positions. Train windows shorter than the
    truncation length L start at position 0; windows of length L + 1 may have been cut, so
    they are chained backwards: the L items after an unknown position identify it."""
    windows = train + tail
    n = len(windows) + 1  # every event but the first is exactly one target
    seq: list[int | None] = [None] * n

    def place(w: list[int], end: int) -> None:
        start = end - len(w) + 1
        if start < 0:
            raise DataError(f"user {user}: a window of {len(w)} items does not fit a sequence of {n}; "
                            "the .inter files disagree - regenerate them together")
        for k, item in enumerate(w, start):
            if seq[k] is not None and seq[k] != item:
                raise DataError(f"user {user}: .inter files disagree on position {k} "
                                f"({seq[k]} vs {item}); regenerate them together")
            seq[k] = item

    for i, w in enumerate(tail):
        end = n - len(tail) + i
        place(w, end)
        if len(w) <= L and end != len(w) - 1:  # an uncut history must reach back to position 0
            raise DataError(f"user {user}: the valid/test row has an uncut history that does not start "
                            "the sequence; the .inter files disagree - regenerate them together")
    for w in train:
        if len(w) <= L:  # history shorter than L: the window starts at position 0
            place(w, len(w) - 1)
    before: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for w in windows:
        if len(w) == L + 1:
            before[tuple(w[1:])].add(w[0])
    for k in range(n - 1, L - 1, -1):
        if seq[k - L] is None:
            cand = before.get(tuple(seq[k - L + 1:k + 1]), set())  # type: ignore[arg-type]
            if len(cand) != 1:
                raise DataError(f"user {user}: cannot rebuild position {k - L} from the .inter files "
                                f"({len(cand)} candidates); are train/valid/test from one preprocessing run?")
            seq[k - L] = next(iter(cand))
    if any(s is None for s in seq):
        raise DataError(f"user {user}: the .inter files leave gaps in the sequence; regenerate them together")
    return seq  # type: ignore[return-value]


def read_recbole(path: str | Path, name: str = "Scientific") -> InteractionData:
    """Read UniSRec/RecBole atomic files `{name}.*` from `path`. item_id = the 0-based index
    of .item2index, user_id = the index used in the .inter files; ts = position 0..n-1 in
    the user's sequence, rebuilt from the train/valid/test windows."""
    d = Path(path)
    index = _read_pairs(_need(d / f"{name}.item2index"))
    if not index:
        raise DataError(f"{d / f'{name}.item2index'}: no 'ASIN<TAB>index' lines; the file lists every item of "
                        "the data set - regenerate it with the .inter files")
    texts: dict[str, str] = {}
    with open(_need(d / f"{name}.text"), encoding="utf-8") as f:
        next(f, None)
        for line in f:
            if line.strip():
                asin, _, text = line.rstrip("\n").partition("\t")
                texts[asin] = text
    missing = [a for a, _ in index if a not in texts]
    if missing:
        raise DataError(f"{d / f'{name}.text'}: no text for {len(missing)} item(s) of .item2index "
                        f"(e.g. {missing[:5]}); every indexed item needs a text line")
    rows = []
    for asin, idx in sorted(index, key=lambda p: p[1]):
        title, category, brand = split_recbole_text(texts[asin])
        rows.append((idx, title, category, brand, "", asin))
    items = pd.DataFrame(rows, columns=["item_id", "title", "category", "brand", "text", "asin"])

    splits = {s: _read_inter(_need(d / f"{name}.{s}.inter")) for s in ("train", "valid", "test")}
    trunc = max(len(h) for rs in splits.values() for _, h, _ in rs)  # histories were cut at this length
    windows: dict[str, dict[int, list]] = {s: defaultdict(list) for s in splits}
    for s, rs in splits.items():
        for u, h, t in rs:
            windows[s][u].append(h + [t])
    for s in ("valid", "test"):
        dup = [u for u, ws in windows[s].items() if len(ws) > 1]
        if dup:
            raise DataError(f"{d / f'{name}.{s}.inter'}: users {dup[:5]} have more than one row; "
                            "leave-one-out files hold one row per user")
    users_all = sorted(set().union(*[set(w) for w in windows.values()]))
    ev_u, ev_i, ev_t = [], [], []
    for u in users_all:
        tail = [w[0] for w in (windows["valid"].get(u), windows["test"].get(u)) if w]
        seq = _rebuild(u, windows["train"].get(u, []), tail, trunc)
        ev_u += [u] * len(seq)
        ev_i += seq
        ev_t += range(len(seq))
    events = pd.DataFrame({"user_id": ev_u, "item_id": ev_i, "ts": ev_t})

    users = None
    if (d / f"{name}.user2index").is_file():
        pairs = _read_pairs(d / f"{name}.user2index")
        users = pd.DataFrame({"user_id": [i for _, i in pairs], "reviewer_id": [k for k, _ in pairs]})
    return validate(InteractionData(items=items, events=events, users=users, name=name), str(d))


# ---------------------------------------------------------------- MovieLens-100K

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


def _read_psv(path: Path, sep: str, ncols: int, names: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found; MovieLens-100K needs u.data, u.item and u.user")
    try:
        df = pd.read_csv(path, sep=sep, header=None, encoding="latin-1", quoting=csv.QUOTE_NONE,
                         dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; MovieLens-100K's u.data, u.item and u.user each hold one "
                        "record per line - copy them again from the unpacked ml-100k folder") from None
    if df.shape[1] != ncols:
        raise DataError(f"{path}: expected {ncols} '{sep}'-separated fields per line, found {df.shape[1]}; "
                        "is this the raw MovieLens-100K file?")
    df.columns = names
    return df


def read_movielens(path: str | Path, min_rating: int = 0) -> InteractionData:
    """Raw MovieLens-100K (u.data, u.item, u.user). Ratings below `min_rating` are dropped,
    then users left with fewer than 2 events. ts = unix time; ties are ordered by item id."""
    d = Path(path)
    item = _read_psv(d / "u.item", "|", 5 + len(GENRES), ["item_id", "title", "date", "video", "url", *GENRES])
    flags = item[list(GENRES)].to_numpy() == "1"
    items = pd.DataFrame({
        "item_id": item["item_id"],
        "title": item["title"],
        "category": [", ".join(g for g, f in zip(GENRES, row) if f) for row in flags],
        "brand": "",
        "text": [f"released {dt}" if dt else "" for dt in item["date"]],
    })
    data = _read_psv(d / "u.data", "\t", 4, ["user_id", "item_id", "rating", "ts"])
    try:
        data = data.astype({"user_id": "int64", "item_id": "int64", "rating": "int64", "ts": "int64"})
    except ValueError as e:
        raise DataError(f"{d / 'u.data'}: fields must be integers (user, item, rating, unix time): {e}") from None
    data = data[data["rating"] >= min_rating]
    data = data[data.groupby("user_id")["user_id"].transform("size") >= 2]
    events = data.sort_values(["user_id", "ts", "item_id"], kind="stable")[["user_id", "item_id", "ts", "rating"]]
    user = _read_psv(d / "u.user", "|", 5, ["user_id", "age", "gender", "occupation", "zip"])
    try:
        user = user.astype({"user_id": "int64", "age": "int64"})
    except ValueError as e:
        raise DataError(f"{d / 'u.user'}: user id and age must be integers: {e}") from None
    return validate(InteractionData(items=items, events=events, users=user, name="movielens-100k"), str(d))


# ---------------------------------------------------------------- dispatch

def load_source(source: str, path: str | None = None, **kw) -> InteractionData:
    """Load a data set by source name: synthetic (path ignored; kw -> SyntheticConfig),
    recbole, movielens or parquet (kw -> the reader)."""
    if source == "synthetic":
        from .synthetic import SyntheticConfig, generate

        fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
        bad = sorted(set(kw) - fields)
        if bad:
            raise DataError(f"source 'synthetic': unknown option(s) {bad}; valid: {sorted(fields)}")
        return generate(SyntheticConfig(**kw))
    readers = {"recbole": read_recbole, "movielens": read_movielens, "parquet": read_parquet}
    if source not in readers:
        raise DataError(f"unknown data source {source!r}; valid sources: {list(SOURCES)}")
    if not path:
        raise DataError(f"source {source!r} needs a path (the data directory)")
    if not Path(path).is_dir():
        raise DataError(f"source {source!r}: {path} is not a directory")
    try:
        inspect.signature(readers[source]).bind(path, **kw)
    except TypeError as e:
        raise DataError(f"source {source!r}: bad option(s) {sorted(kw)}: {e}") from None
    return readers[source](path, **kw)
