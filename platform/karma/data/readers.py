"""Readers: canonical Parquet (one file or a folder of parts per table), RecBole/UniSRec
atomic files, and MovieLens in its three published layouts (100K, CSV, '::').

Each reader returns a validated `InteractionData`; see docs/DATA_FORMAT.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .delimited import INT_PATTERN, data_lines, read_delimited, row_error
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


def _parts(d: Path, table: str) -> tuple[Path | None, list[Path]]:
    """The Parquet file(s) of one table: `{table}.parquet`, or a folder `{table}.parquet/` or
    `{table}/` of part files (as Spark, Dask or pyarrow.dataset write them), read in sorted
    path order; names starting with '.' or '_' (e.g. _SUCCESS) are not data."""
    found = [p for p in (d / f"{table}.parquet", d / table) if p.exists()]
    if len(found) > 1:
        raise DataError(f"{d}: both {found[0].name} and {found[1].name}/ exist; keep one of them for the {table} table")
    if not found:
        return None, []
    if found[0].is_file():
        return found[0], found
    parts = sorted(p for p in found[0].rglob("*") if p.is_file()
                   and not any(q.startswith((".", "_")) for q in p.relative_to(found[0]).parts))
    if not parts:
        raise DataError(f"{found[0]}: the folder holds no Parquet part files; write the {table} table into it "
                        "(e.g. pyarrow.dataset.write_dataset or DataFrame.to_parquet)")
    return found[0], parts


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}); it may be truncated, "
                     "empty or another format under a .parquet name - write it again with "
                     "karma.data.write_parquet or pandas.DataFrame.to_parquet")


def _compatible(a: pa.Schema, b: pa.Schema) -> bool:
    try:
        pa.unify_schemas([a, b], promote_options="permissive")
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def _read_table(parts: list[Path]) -> pd.DataFrame:
    """One table from its Parquet part file(s), concatenated in order by pyarrow.dataset. A part
    Arrow cannot read, or whose columns clash with the others', is a DataError naming it."""
    schemas = []
    for part in parts:  # footers only: cheap, and names the broken part before any data is read
        try:
            schemas.append(pq.read_schema(part))
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(part, err) from None
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        if len(parts) > 1:  # each part's pandas metadata describes that part's index only
            schema = schema.remove_metadata()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        clash = next(p for p, s in zip(parts, schemas) if not _compatible(schemas[0], s))
        raise DataError(f"{clash}: its columns do not match {parts[0].name}'s ({err}); "
                        "write every part file with the same column types") from None
    try:
        return ds.dataset([str(p) for p in parts], schema=schema, format="parquet").to_table().to_pandas()
    except (pa.ArrowException, OSError) as err:
        for part in parts:  # find the part with the broken data pages
            try:
                pq.read_table(part)
            except (pa.ArrowException, OSError) as part_err:
                raise _unreadable(part, part_err) from None
        raise DataError(f"{parts[0].parent}: cannot read the Parquet parts together ({err})") from None


def read_parquet(directory: str | Path) -> InteractionData:
    """Read and validate a canonical Parquet data set directory. Each table is one file
    (`events.parquet`) or a folder of part files (`events/` or `events.parquet/`)."""
    d = Path(directory)
    (items_at, items), (events_at, events), (users_at, users) = (_parts(d, t) for t in ("items", "events", "users"))
    for t, parts in (("items", items), ("events", events)):
        if not parts:
            raise DataError(f"{d / f'{t}.parquet'}: file not found; a data set directory needs items.parquet and "
                            f"events.parquet (or folders items/ and events/ of Parquet part files)")
    items = validate_items(_read_table(items), str(items_at))
    events = validate_events(_read_table(events), items, str(events_at))
    users = validate_users(_read_table(users), str(users_at)) if users else None
    return InteractionData(items=items, events=events, users=users, name=d.name)


# ---------------------------------------------------------------- RecBole / UniSRec

_PAIRS = "'key<TAB>integer index'"
_INTER = "'user<TAB>item item ...<TAB>item' with integer indices"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found; the RecBole atomic format needs "
                        "{name}.text, .item2index, .train.inter, .valid.inter and .test.inter")
    return path


def _read_pairs(path: Path) -> pa.Table:
    """`key<TAB>index` lines (no header) as columns key, index."""
    return read_delimited(path, {"key": "str", "index": "int"}, "\t", expected=_PAIRS)


@dataclass
class _Windows:
    """The rows of .inter files: row r is user[r]'s window items[offsets[r]:offsets[r + 1]]
    (the history, then the target), from split[r] (0 train, 1 valid, 2 test)."""
    user: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    split: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _read_inter(path: Path, split: int) -> _Windows:
    """`user<TAB>space-separated history<TAB>target` lines after a header; at least one."""
    t = read_delimited(path, {"user": "int", "history": "str", "target": "int"}, "\t", header="skip",
                       expected=_INTER)
    if t.num_rows == 0:
        raise DataError(f"{path}: no interaction rows (the file is empty or holds only its header); every "
                        ".inter file needs 'user<TAB>history<TAB>target' rows - regenerate the train/valid/test "
                        "files together from the same preprocessing run")
    hist = pc.split_pattern(t["history"], " ").combine_chunks()
    tokens, row = pc.list_flatten(hist), pc.list_parent_indices(hist).to_numpy()
    real = pc.not_equal(tokens, "").to_numpy(zero_copy_only=False)  # from '' or runs of spaces
    tokens, row = tokens.filter(pa.array(real)), row[real]
    try:
        history = pc.cast(tokens, pa.int64()).to_numpy()
    except pa.ArrowInvalid:  # only now look for the token that is not a number
        k = int(np.argmax(~pc.match_substring_regex(tokens, INT_PATTERN).to_numpy(zero_copy_only=False)))
        raise row_error(path, row[k], True, _INTER, f"history item {tokens[k].as_py()!r} is not an integer") from None
    offsets = np.concatenate(([0], np.cumsum(np.bincount(row, minlength=t.num_rows) + 1)))
    items = np.empty(offsets[-1], np.int64)
    items[np.arange(len(row)) + row] = history  # window r starts after r earlier targets
    items[offsets[1:] - 1] = t["target"].to_numpy()
    return _Windows(t["user"].to_numpy(), offsets, items, np.full(t.num_rows, split, np.int8))


def split_recbole_text(text: str) -> tuple[str, str, str]:
    """'{title}. {categories}. {brand}. ' -> (title, categories, brand); missing parts are ''.
    Splitting from the right keeps '. ' inside titles intact."""
    parts = [p.strip() for p in text.rstrip().rstrip(".").rsplit(". ", 2)]
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


def _split_texts(texts: pa.Array) -> dict[str, pa.Array]:
    """`split_recbole_text` over a whole column, in Arrow: title, category, brand."""
    parts = pc.split_pattern(pc.utf8_rtrim(pc.utf8_rtrim_whitespace(texts), characters="."), ". ",
                             max_splits=2, reverse=True)
    out = {}
    for k, col in enumerate(("title", "category", "brand")):
        part = pc.list_slice(parts, k, k + 1)  # empty where the text has fewer parts
        at = np.full(len(texts), -1)
        at[pc.list_parent_indices(part).to_numpy()] = np.arange(pc.list_value_length(part).to_numpy().sum())
        value = pc.take(pc.list_flatten(part), pa.array(at, mask=at < 0))
        out[col] = pc.utf8_trim_whitespace(pc.fill_null(value, ""))
    return out


def _expand(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every item of the windows `rows`: its window and its position in that window."""
    lengths = offsets[rows + 1] - offsets[rows]
    window = np.repeat(rows, lengths)
    return window, np.arange(len(window)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


_HASH = np.random.default_rng(20240601).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def _hash(user: np.ndarray, items: np.ndarray) -> np.ndarray:
    """A 64-bit key of (user, item run) per row of `items` [rows, L]; matches are verified."""
    mult = _HASH[np.arange(items.shape[1]) % len(_HASH)]  # runs longer than 4096 reuse multipliers
    with np.errstate(over="ignore"):
        return user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + (items.astype(np.uint64) * mult).sum(
            axis=1, dtype=np.uint64)


def _rebuild(w: _Windows, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's full sequence from its windows, for all users at once: (user, item, ts) per
    event, ts = position 0..n-1. Valid/test windows end at the last positions; train windows
    shorter than the history cut L + 1 start at position 0; the positions no window placed
    are chained backwards: the L items after an unknown position identify the cut window of
    length L + 1 that starts there."""
    users, u = np.unique(w.user, return_inverse=True)
    m = w.lengths
    per_split = [np.bincount(u[w.split == s], minlength=len(users)) for s in range(3)]
    n = per_split[0] + per_split[1] + per_split[2] + 1  # every event but the first is exactly one target
    base = np.concatenate(([0], np.cumsum(n)))

    def fail(user_row: int, what: str) -> DataError:
        return DataError(f"user {users[user_row]}: {what}")

    end = np.where(w.split == 2, n[u] - 1, np.where(w.split == 1, n[u] - 1 - per_split[2][u], m - 1))
    placed = (w.split > 0) | (m <= L)
    start = end - m + 1
    misfit = placed & ((start < 0) | (end >= n[u]))
    if misfit.any():
        r = np.flatnonzero(misfit)[np.argmin(u[misfit])]
        raise fail(u[r], f"a window of {m[r]} items does not fit a sequence of {n[u[r]]}; "
                         "the .inter files disagree - regenerate them together")
    # place valid, then test, then train windows: on a clash the earlier value is reported first
    order = np.flatnonzero(placed)
    order = order[np.lexsort((order, (w.split[order] + 2) % 3))]
    window, k = _expand(w.offsets, order)
    pos = base[u[window]] + start[window] + k
    value = w.items[w.offsets[window] + k]
    by_pos = np.argsort(pos, kind="stable")
    pos, value = pos[by_pos], value[by_pos]
    head = np.concatenate(([True], pos[1:] != pos[:-1]))
    first = value[head][np.cumsum(head) - 1]
    if (value != first).any():
        i = int(np.argmax(value != first))
        user_row = int(np.searchsorted(base, pos[i], side="right") - 1)
        raise fail(user_row, f".inter files disagree on position {pos[i] - base[user_row]} "
                             f"({first[i]} vs {value[i]}); regenerate them together")
    uncut_tail = (w.split > 0) & (m <= L) & (end != m - 1)
    if uncut_tail.any():
        raise fail(u[uncut_tail].min(), "the valid/test row has an uncut history that does not start the "
                                        "sequence; the .inter files disagree - regenerate them together")
    seq = np.zeros(base[-1], np.int64)
    known = np.zeros(base[-1], bool)
    seq[pos[head]], known[pos[head]] = value[head], True
    if not known.all() and L > 0:
        _chain(w, u, L, base, seq, known, fail)
    if not known.all():
        user_row = int(np.searchsorted(base, np.argmin(known), side="right") - 1)
        raise fail(user_row, "the .inter files leave gaps in the sequence; regenerate them together")
    return np.repeat(users, n), seq, np.arange(base[-1]) - np.repeat(base[:-1], n)


def _chain(w: _Windows, u: np.ndarray, L: int, base: np.ndarray, seq: np.ndarray, known: np.ndarray, fail) -> None:
    """Fill unknown positions from the back, one position per step for all users at once: the
    item at p is the first item of the cut window (length L + 1) whose other L items are the
    known seq[p + 1 .. p + L]; exactly one distinct such item must exist."""
    cut = np.flatnonzero(w.lengths == L + 1)
    step = max(1, (1 << 24) // (L + 1))  # hash the windows in blocks of bounded memory
    keys = np.concatenate([np.zeros(0, np.uint64)] + [_hash(u[c], w.items[w.offsets[c][:, None] + np.arange(1, L + 1)])
                                                      for c in np.array_split(cut, range(step, len(cut), step))])
    heads = w.items[w.offsets[cut]]
    by_key = np.lexsort((heads, keys))
    cut, keys, heads = cut[by_key], keys[by_key], heads[by_key]
    n = np.diff(base)
    todo = np.unique(np.searchsorted(base, np.flatnonzero(~known), side="right") - 1)
    last = n[todo] - 1 - L  # the last position a run of L known items can follow
    for j in range(int(last.max(initial=-1)) + 1):
        p = last - j
        live = p >= 0
        g = base[todo[live]] + p[live]
        act = ~known[g]
        if not act.any():
            continue
        rows, g = todo[live][act], g[act]
        run = g[:, None] + np.arange(1, L + 1)
        run_known = known[run].all(axis=1)
        want = seq[run]
        lo = np.searchsorted(keys, _hash(rows, want), side="left")
        hi = np.searchsorted(keys, _hash(rows, want), side="right")
        lookup, k = _expand(np.concatenate(([0], np.cumsum(hi - lo))), np.arange(len(rows)))
        cand = lo[lookup] + k
        same = (u[cut[cand]] == rows[lookup]) & run_known[lookup]
        same &= (w.items[w.offsets[cut[cand]][:, None] + np.arange(1, L + 1)] == want[lookup]).all(axis=1)
        pairs = np.unique(np.stack([lookup[same], heads[cand[same]]]), axis=1)
        count = np.bincount(pairs[0], minlength=len(rows))
        if (count != 1).any():
            i = int(np.argmin(np.where(count != 1, rows, np.iinfo(np.int64).max)))
            raise fail(rows[i], f"cannot rebuild position {g[i] - base[rows[i]]} from the .inter files "
                                f"({count[i]} candidates); are train/valid/test from one preprocessing run?")
        seq[g[pairs[0]]], known[g[pairs[0]]] = pairs[1], True


def read_recbole(path: str | Path, name: str = "Scientific") -> InteractionData:
    """Read UniSRec/RecBole atomic files `{name}.*` from `path`. item_id = the 0-based index
    of .item2index, user_id = the index used in the .inter files; ts = position 0..n-1 in
    the user's sequence, rebuilt from the train/valid/test windows."""
    d = Path(path)
    index = _read_pairs(_need(d / f"{name}.item2index"))
    if index.num_rows == 0:
        raise DataError(f"{d / f'{name}.item2index'}: no 'ASIN<TAB>index' lines; the file lists every item of "
                        "the data set - regenerate it with the .inter files")
    lines = data_lines(_need(d / f"{name}.text"), header=True)
    parts = pc.extract_regex(lines, r"^(?P<asin>[^\t]*)(?:\t(?P<text>.*))?$")  # the text may hold tabs
    text_asins = pd.Index(parts.field("asin").to_numpy(zero_copy_only=False), dtype=str)
    latest = np.flatnonzero(~text_asins.duplicated(keep="last"))  # a later line for the same ASIN wins
    asins = index["key"].combine_chunks()
    at = text_asins[latest].get_indexer(asins.to_numpy(zero_copy_only=False))
    if (at < 0).any():
        missing = asins.filter(pa.array(at < 0)).to_pylist()
        raise DataError(f"{d / f'{name}.text'}: no text for {len(missing)} item(s) of .item2index "
                        f"(e.g. {missing[:5]}); every indexed item needs a text line")
    by_index = np.argsort(index["index"].to_numpy(), kind="stable")
    texts = parts.field("text").take(pa.array(latest[at[by_index]]))
    items = pd.DataFrame({"item_id": index["index"].to_numpy()[by_index],
                          **{c: v.to_numpy(zero_copy_only=False) for c, v in _split_texts(texts).items()},
                          "text": "", "asin": asins.take(pa.array(by_index)).to_numpy(zero_copy_only=False)})

    files = [_read_inter(_need(d / f"{name}.{s}.inter"), i) for i, s in enumerate(("train", "valid", "test"))]
    for f, s in zip(files[1:], ("valid", "test")):
        users, counts = np.unique(f.user, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{d / f'{name}.{s}.inter'}: users {users[counts > 1][:5].tolist()} have more than one "
                            "row; leave-one-out files hold one row per user")
    shift = np.cumsum([0] + [f.offsets[-1] for f in files[:-1]])
    w = _Windows(user=np.concatenate([f.user for f in files]),
                 offsets=np.concatenate([[0]] + [f.offsets[1:] + s for f, s in zip(files, shift)]),
                 items=np.concatenate([f.items for f in files]),
                 split=np.concatenate([f.split for f in files]))
    user, item, ts = _rebuild(w, L=int(w.lengths.max()) - 1)  # histories were cut at the longest one
    events = pd.DataFrame({"user_id": user, "item_id": item, "ts": ts})

    users = None
    if (d / f"{name}.user2index").is_file():
        pairs = _read_pairs(d / f"{name}.user2index")
        users = pd.DataFrame({"user_id": pairs["index"].to_numpy(),
                              "reviewer_id": pd.Series(pairs["key"].to_numpy(zero_copy_only=False), dtype=str)})
    return validate(InteractionData(items=items, events=events, users=users, name=name), str(d))


# ---------------------------------------------------------------- MovieLens

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


@dataclass(frozen=True)
class _Layout:
    """One of the published MovieLens layouts, recognised by its ratings file."""
    ratings: str
    movies: str
    name: str  # what the layout is called in messages
    needs: str  # the files it needs, for a missing or empty file

    def read(self, d: Path, file: str, columns: dict, sep: str, expected: str, **kw) -> pa.Table:
        path = d / file
        if not path.is_file():
            raise DataError(f"{path}: file not found; {self.needs}")
        table = read_delimited(path, columns, sep, expected=expected, **kw)
        if table.num_rows == 0:
            raise DataError(f"{path}: the file is empty; {self.name}'s {self.needs.split(' needs ')[1]} each hold "
                            "one record per line - copy them again from the unpacked MovieLens folder")
        return table


ML_100K = _Layout("u.data", "u.item", "MovieLens-100K", "MovieLens-100K needs u.data, u.item and u.user")
ML_CSV = _Layout("ratings.csv", "movies.csv", "MovieLens CSV (ml-latest, ml-latest-small, ml-20m, ml-25m)",
                 "the MovieLens CSV layout needs ratings.csv and movies.csv")
ML_DAT = _Layout("ratings.dat", "movies.dat", "MovieLens '::' (ML-1M, ML-10M)",
                 "the MovieLens '::' layout needs ratings.dat and movies.dat")
_ML_LAYOUTS = (ML_100K, ML_CSV, ML_DAT)


def _movie_ids(path: Path, ids: np.ndarray, header: bool, expected: str) -> pd.Index:
    """The movies file's ids as an index; one line per movie."""
    known = pd.Index(ids)
    dup = known.duplicated()
    if dup.any():
        first = int(np.argmax(dup))
        raise row_error(path, np.flatnonzero(dup), header, expected, f"movie id {ids[first]} is listed again",
                        "keep one line per movie")
    return known


def _check_rated(layout: _Layout, d: Path, movies: pd.Index, movie: np.ndarray, rating: np.ndarray,
                 header: bool, expected: str) -> None:
    """Every rating names a known movie and holds a finite number; else the first bad line."""
    path = d / layout.ratings
    unknown = np.flatnonzero(movies.get_indexer(movie) < 0)
    if len(unknown):
        raise row_error(path, unknown, header, expected, f"movie {movie[unknown[0]]} is not in {layout.movies}",
                        f"add the movie to {layout.movies} or remove that line")
    bad = np.flatnonzero(~np.isfinite(rating))
    if len(bad):
        raise row_error(path, bad, header, expected, f"rating {rating[bad[0]]} is not a finite number")


def _genre_list(genres: pa.ChunkedArray) -> pa.Array:
    """'Adventure|Animation' -> 'Adventure, Animation'; '(no genres listed)' -> ''."""
    joined = pc.replace_substring(genres, "|", ", ")
    return pc.if_else(pc.equal(genres, "(no genres listed)"), "", joined)


def _ml_100k(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    expected = "24 '|'-separated fields (movie id|title|release date|video release date|IMDb URL|19 genre flags)"
    item = ML_100K.read(d, "u.item", {"item_id": "int", "title": "str", "date": "str", "video": "str", "url": "str",
                                      **{g: "int" for g in GENRES}}, "|", expected, encoding="latin-1")
    known = _movie_ids(d / "u.item", item["item_id"].to_numpy(), False, expected)
    category = np.full(item.num_rows, "", dtype=object)
    for g in GENRES:  # a loop over the 19 genres, each vectorised over all movies
        flag = item[g].to_numpy() == 1
        category[flag] = np.where(category[flag] == "", g, category[flag] + ", " + g)
    date = item["date"].to_numpy(zero_copy_only=False).astype(object)
    items = pd.DataFrame({"item_id": item["item_id"].to_numpy(), "title": item["title"].to_numpy(zero_copy_only=False),
                          "category": category, "brand": "", "text": np.where(date != "", "released " + date, "")})
    expected = "4 tab-separated integers (user id, item id, rating, unix time)"
    data = ML_100K.read(d, "u.data", {"user_id": "int", "item_id": "int", "rating": "int", "ts": "int"}, "\t",
                        expected)
    events = data.to_pandas()
    _check_rated(ML_100K, d, known, events["item_id"].to_numpy(), events["rating"].to_numpy(), False, expected)
    user = ML_100K.read(d, "u.user", {"user_id": "int", "age": "int", "gender": "str", "occupation": "str",
                                      "zip": "str"}, "|", "5 '|'-separated fields (user id|age|gender|occupation|zip)")
    return items, events, user.to_pandas()


def _ml_csv(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    expected = "'movieId,title,genres' with a title holding commas in double quotes"
    movies = ML_CSV.read(d, "movies.csv", {"movieId": "int", "title": "str", "genres": "str"}, ",", expected,
                         header="names", quoted=True, encoding="auto")
    known = _movie_ids(d / "movies.csv", movies["movieId"].to_numpy(), True, expected)
    items = pd.DataFrame({"item_id": movies["movieId"].to_numpy(),
                          "title": movies["title"].to_numpy(zero_copy_only=False),
                          "category": _genre_list(movies["genres"]).to_numpy(zero_copy_only=False),
                          "brand": "", "text": ""})
    expected = "'userId,movieId,rating,timestamp' (integer ids, a rating, unix time)"
    r = ML_CSV.read(d, "ratings.csv", {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "int"},
                    ",", expected, header="names")
    events = pd.DataFrame({"user_id": r["userId"].to_numpy(), "item_id": r["movieId"].to_numpy(),
                           "ts": r["timestamp"].to_numpy(), "rating": r["rating"].to_numpy()})
    _check_rated(ML_CSV, d, known, events["item_id"].to_numpy(), events["rating"].to_numpy(), True, expected)
    return items, events, None


def _ml_dat(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    expected = "'MovieID::Title::Genres'"
    movies = ML_DAT.read(d, "movies.dat", {"item_id": "int", "title": "str", "genres": "str"}, "::", expected,
                         encoding="auto")  # ML-1M is latin-1, ML-10M UTF-8
    known = _movie_ids(d / "movies.dat", movies["item_id"].to_numpy(), False, expected)
    items = pd.DataFrame({"item_id": movies["item_id"].to_numpy(),
                          "title": movies["title"].to_numpy(zero_copy_only=False),
                          "category": _genre_list(movies["genres"]).to_numpy(zero_copy_only=False),
                          "brand": "", "text": ""})
    expected = "'UserID::MovieID::Rating::Timestamp' (integer ids, a rating, unix time)"
    r = ML_DAT.read(d, "ratings.dat", {"user_id": "int", "item_id": "int", "rating": "float", "ts": "int"}, "::",
                    expected)
    events = r.select(["user_id", "item_id", "ts", "rating"]).to_pandas()
    _check_rated(ML_DAT, d, known, events["item_id"].to_numpy(), events["rating"].to_numpy(), False, expected)
    users = None
    if (d / "users.dat").is_file():
        users = ML_DAT.read(d, "users.dat", {"user_id": "int", "gender": "str", "age": "int", "occupation": "int",
                                             "zip": "str"}, "::", "'UserID::Gender::Age::Occupation::Zip-code'",
                            encoding="auto").to_pandas()
    return items, events, users


def _keep_ratings(events: pd.DataFrame, min_rating: float) -> pd.DataFrame:
    """Drop ratings below `min_rating`, then users left with fewer than 2 events; sort by
    (user, ts, item)."""
    events = events[events["rating"].to_numpy() >= min_rating]
    user, ts, item = (events[c].to_numpy() for c in ("user_id", "ts", "item_id"))
    events = events.iloc[np.lexsort((item, ts, user))]
    user = events["user_id"].to_numpy()
    starts = np.flatnonzero(np.concatenate(([True], user[1:] != user[:-1]))) if len(user) else np.zeros(0, int)
    sizes = np.diff(np.concatenate((starts, [len(user)])))
    return events[np.repeat(sizes >= 2, sizes)][["user_id", "item_id", "ts", "rating"]].reset_index(drop=True)


def read_movielens(path: str | Path, min_rating: float = 0) -> InteractionData:
    """MovieLens in the layout its files show: ML-100K (u.data, u.item, u.user), the CSV
    layout of ml-latest(-small), ml-20m and ml-25m (ratings.csv, movies.csv), or the '::'
    layout of ML-1M and ML-10M (ratings.dat, movies.dat, optional users.dat). Items: title,
    category = the genres joined with ", ". Ratings below `min_rating` are dropped, then users
    left with fewer than 2 events. ts = unix time; ties are ordered by item id."""
    d = Path(path)
    found = [layout for layout in _ML_LAYOUTS if (d / layout.ratings).is_file()]
    if not found:
        raise DataError(f"{d}: no MovieLens ratings file; expected u.data (ML-100K), ratings.csv (ml-latest, "
                        "ml-latest-small, ml-20m, ml-25m) or ratings.dat (ML-1M, ML-10M) - point data.path at "
                        "the unpacked MovieLens folder")
    if len(found) > 1:
        raise DataError(f"{d}: holds {' and '.join(f.ratings for f in found)}; keep one MovieLens release per folder")
    layout = found[0]
    items, events, users = {"u.data": _ml_100k, "ratings.csv": _ml_csv, "ratings.dat": _ml_dat}[layout.ratings](d)
    name = "movielens-100k" if layout is ML_100K else d.resolve().name
    return validate(InteractionData(items=items, events=_keep_ratings(events, min_rating), users=users, name=name),
                    str(d))


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
