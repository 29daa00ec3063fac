"""Offline batch recall: the top-K items of every user in a Parquet of histories, scored by a
registered model on a Ray Data actor pool, answered as Serve's `/v1/recall` would answer.

    users/part-0.parquet ...  (user_id int64, history list<int64> of item ids oldest first, query?)
        -> checked on the driver, before any scoring (unknown items, empty histories, nulls,
           duplicated users: refused with a DataError, or written to rejected/ on request)
        -> ray.data.read_parquet, streamed in batches to an actor pool; each actor holds the
           registry version (ModelHandle, as a Serve replica loads it) and its faiss index
        -> one output file per input file: user_id, item_ids list<int64>, scores list<float32>

Answers equal Serve's: the same Job and ModelHandle.run code ranks, the model reads the last
`data.max_history` items of a history, and with `exclude_history` every item of the history is
left out; without it a model.seen_offset model shifts those last items by its offset (Serve
answers a request with a longer history the same way once `limits.max_history` admits it; by
default it refuses one).

Resume: an output file is written under a temporary name and renamed when complete, and carries
in its Parquet metadata the settings and the input it was made from (rows, bytes). A rerun skips
inputs whose output is complete and matches; one made with other settings (model version, k,
exclusion, index, dtype) is refused before anything runs, so a folder never mixes two models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from karma.config import ConfigError
from karma.data import DataError
from karma.serving import ModelSpec

__all__ = ["RecallSettings", "RecallResult", "InputFile", "run_recall", "input_files", "row_problems",
           "OUTPUT_SCHEMA", "METADATA_KEY", "REJECTED_DIR"]

logger = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())),
                           ("scores", pa.list_(pa.float32()))])
METADATA_KEY = b"karma.recall"
REJECTED_DIR = "rejected"
INPUT_HELP = ("a recall input needs the columns user_id (int64), history (list<int64> of item ids, oldest "
              "first) and optionally query (string)")
_SHOW = 5  # example user and item ids in an error message
_READ_ROWS = 65_536  # rows per batch when the driver checks a file
_ROW_GROUP = 8_192  # output rows buffered per Parquet row group

# Why a row cannot be scored, in the order they are checked (a row gets the first that applies),
# with what to do about it.
REASONS: dict[str, str] = {
    "null user_id": "give every row a user_id or drop those rows",
    "null history": "give every row a history or drop those rows",
    "empty history": "drop users without history (the model needs at least one item to read)",
    "null item id in history": "drop the null entries from those histories",
    "unknown item ids": "map the ids to the model's catalogue (items.parquet of its export) or drop those "
                        "items from the histories",
    "duplicate user_id": "keep one row per user (the current history)",
}
# The settings an output file was made with; a rerun into the same folder must match them.
SETTING_KEYS = ("model", "version", "k", "exclude_history", "index", "dtype")


@dataclass(frozen=True)
class RecallSettings:
    """One batch recall job. `model` names a registered model (by alias or version); `actors`
    None means one per GPU on a cluster with GPUs, else one per CPU slot left after the
    readers'. `cpus_per_actor` None means `torch_threads`."""

    input: str
    output: str
    model: ModelSpec
    k: int = 100
    exclude_history: bool = True
    skip_invalid: bool = False
    batch_size: int = 256
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    torch_threads: int = 1
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.model.registered_name:
            raise ConfigError("model: batch recall loads a registered model; set its name (and alias or version)")
        for name in ("k", "batch_size", "torch_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.actors is not None and (isinstance(self.actors, bool) or self.actors < 1):
            raise ConfigError(f"actors must be a positive integer, got {self.actors!r}")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")


@dataclass
class RecallResult:
    output: Path
    model: str
    version: str
    files: int  # input files
    skipped_files: int  # complete outputs found and kept
    written_files: list[str]  # outputs written by this run (relative paths)
    users: int  # users scored by this run
    rejected: int  # rows refused by this run (written under rejected/ with --skip-invalid)
    seconds: float
    users_per_s: float

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "model": self.model, "version": self.version, "files": self.files,
                "skipped_files": self.skipped_files, "written_files": self.written_files, "users": self.users,
                "rejected": self.rejected, "seconds": round(self.seconds, 2),
                "users_per_s": round(self.users_per_s, 1)}


# ---- inputs ----------------------------------------------------------------------------------------


@dataclass
class InputFile:
    """One input Parquet file and what the driver learnt about it."""

    path: Path
    rel: str  # relative to the input folder; names its output file
    rows: int
    bytes: int
    has_query: bool
    problems: dict[str, int] = field(default_factory=dict)  # reason -> rows
    examples: dict[str, list] = field(default_factory=dict)  # reason -> example user ids (row numbers if null)
    unknown_items: list[int] = field(default_factory=list)  # example unknown item ids

    @property
    def rejected(self) -> int:
        return sum(self.problems.values())


def input_files(path: str | Path) -> list[InputFile]:
    """The Parquet file at `path`, or every *.parquet under the folder `path` (sorted; hidden
    and _-prefixed files skipped, as Spark and pyarrow do), with row counts from their footers."""
    root = Path(path).expanduser()
    if root.is_file():
        paths, base = [root], root.parent
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*.parquet") if p.is_file()
                       and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
        base = root
    else:
        raise DataError(f"{root}: no such file or folder; give a Parquet file or a folder of them ({INPUT_HELP})")
    if not paths:
        raise DataError(f"{root}: no *.parquet files in this folder ({INPUT_HELP})")
    out = []
    for p in paths:
        try:
            f = pq.ParquetFile(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{p}: not a readable Parquet file ({e}); rewrite or remove it") from None
        _check_schema(p, f.schema_arrow)
        out.append(InputFile(p.resolve(), str(p.relative_to(base)), f.metadata.num_rows, p.stat().st_size,
                             "query" in f.schema_arrow.names))
    with_query = [f for f in out if f.has_query]
    if with_query and len(with_query) < len(out):
        missing = [f.rel for f in out if not f.has_query]
        raise DataError(f"{root}: {len(with_query)} of {len(out)} files have a query column and {missing[:_SHOW]} "
                        "do not; give every file a query column (null where there is none) or none of them")
    return out


def _check_schema(path: Path, schema: pa.Schema) -> None:
    missing = [c for c in ("user_id", "history") if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (present: {schema.names}); {INPUT_HELP}")
    uid, hist = schema.field("user_id").type, schema.field("history").type
    if not pa.types.is_integer(uid):
        raise DataError(f"{path}: column 'user_id' is {uid}; user ids must be integers ({INPUT_HELP})")
    if not (pa.types.is_list(hist) or pa.types.is_large_list(hist)) or not pa.types.is_integer(hist.value_type):
        raise DataError(f"{path}: column 'history' is {hist}; it must be a list of integer item ids ({INPUT_HELP})")
    if "query" in schema.names:
        q = schema.field("query").type
        if not (pa.types.is_string(q) or pa.types.is_large_string(q) or pa.types.is_null(q)):
            raise DataError(f"{path}: column 'query' is {q}; it must be a string column ({INPUT_HELP})")


def _int64(arr: pa.Array, path: Path | str, column: str) -> pa.Array:
    try:
        return arr.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: column '{column}' holds values outside the 64-bit integer range ({e})") from None


def row_problems(table: pa.Table, known_items: np.ndarray, duplicates: np.ndarray,
                 where: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """Why each row of `table` cannot be scored ("" when it can; the first of REASONS that
    applies), and the unknown item ids met. `known_items` and `duplicates` are sorted int64.

    The driver's check and the actors' filter both call this, so what is refused, counted and
    written to rejected/ is exactly what is left unscored."""
    n = table.num_rows
    reason = np.full(n, "", dtype=object)
    if n == 0:
        return reason, np.zeros(0, np.int64)
    uid = table.column("user_id").combine_chunks()
    uid_null = uid.is_null().to_numpy(zero_copy_only=False)
    uids = _int64(uid, where, "user_id").fill_null(0).to_numpy()
    hist = table.column("history").combine_chunks()
    length = pc.list_value_length(hist).fill_null(-1).to_numpy()
    flat = pc.list_flatten(hist)
    parent = pc.list_parent_indices(hist).to_numpy()
    flat_null = flat.is_null().to_numpy(zero_copy_only=False)
    values = _int64(flat, where, "history").fill_null(0).to_numpy()
    unknown = ~flat_null & ~_isin_sorted(values, known_items)
    # lowest priority first: later assignments win
    reason[_isin_sorted(uids, duplicates) & ~uid_null] = "duplicate user_id"
    reason[np.bincount(parent[unknown], minlength=n) > 0] = "unknown item ids"
    reason[np.bincount(parent[flat_null], minlength=n) > 0] = "null item id in history"
    reason[length == 0] = "empty history"
    reason[length == -1] = "null history"
    reason[uid_null] = "null user_id"
    return reason, values[unknown]


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), bool)
    pos = np.searchsorted(sorted_set, values).clip(0, len(sorted_set) - 1)
    return sorted_set[pos] == values


def _read_batches(f: InputFile, columns: Sequence[str]):
    for batch in pq.ParquetFile(f.path).iter_batches(batch_size=_READ_ROWS, columns=list(columns)):
        yield pa.Table.from_batches([batch])


def check_inputs(files: Sequence[InputFile], known_items: np.ndarray) -> np.ndarray:
    """Fill each file's problem counts and examples; return the duplicated user ids (sorted).

    A user id on more than one row, in one file or across files, is a duplicate: the job cannot
    tell which history is current, so none of its rows is scored. The driver holds 9 bytes per
    row for this (the user ids and a flag), never the histories."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []  # per file: user ids present, row otherwise fine
    for f in files:
        f.problems, f.examples, f.unknown_items = {}, {}, []
        uids, ok, row0 = [], [], 0
        for table in _read_batches(f, ("user_id", "history")):
            reason, unknown = row_problems(table, known_items, np.zeros(0, np.int64), str(f.path))
            uid = table.column("user_id").combine_chunks()
            present = ~uid.is_null().to_numpy(zero_copy_only=False)
            uids.append(_int64(uid, f.path, "user_id").fill_null(0).to_numpy()[present])
            ok.append(reason[present] == "")
            _note(f, reason, uid, row0, unknown)
            row0 += table.num_rows
        seen.append((np.concatenate(uids) if uids else np.zeros(0, np.int64),
                     np.concatenate(ok) if ok else np.zeros(0, bool)))
    s = np.sort(np.concatenate([u for u, _ in seen])) if seen else np.zeros(0, np.int64)
    dups = np.unique(s[1:][s[1:] == s[:-1]])
    for f, (uids, ok) in zip(files, seen):
        hit = ok & _isin_sorted(uids, dups)
        if hit.any():
            f.problems["duplicate user_id"] = int(hit.sum())
            f.examples["duplicate user_id"] = list(dict.fromkeys(uids[hit].tolist()))[:_SHOW]
    return dups


def _note(f: InputFile, reason: np.ndarray, uid: pa.Array, row0: int, unknown: np.ndarray) -> None:
    """Add one batch's problems to f's counts and examples (user ids; row numbers where null)."""
    for r in REASONS:
        rows = np.flatnonzero(reason == r)
        if not len(rows):
            continue
        f.problems[r] = f.problems.get(r, 0) + len(rows)
        shown = f.examples.setdefault(r, [])
        for i in rows[: _SHOW - len(shown)]:
            shown.append(row0 + int(i) if r == "null user_id" else uid[int(i)].as_py())
    f.unknown_items = list(dict.fromkeys(f.unknown_items + unknown[: _SHOW * 4].tolist()))[:_SHOW]


def refusal(files: Sequence[InputFile], model: str, n_items: int, output: Path) -> DataError:
    """The DataError for files with rows that cannot be scored: per file the count, per reason
    up to 5 example user ids (and item ids), the fix, and the --skip-invalid alternative."""
    bad = [f for f in files if f.rejected]
    parts = []
    for f in bad[:_SHOW]:
        lines = [f"{f.path}: {f.rejected} of {f.rows} rows cannot be scored:"]
        for r, n in f.problems.items():
            label = "row" if r == "null user_id" else "user_id"  # a null id has only its row number
            ex = ", ".join(str(u) for u in f.examples.get(r, []))
            items = (f"; item ids {', '.join(str(i) for i in f.unknown_items)} are not among the {n_items} items of "
                     f"{model}" if r == "unknown item ids" else "")
            lines.append(f"  {n} with {r} (e.g. {label} {ex}{items}): {REASONS[r]}")
        parts.append("\n".join(lines))
    more = sum(f.rejected for f in bad[_SHOW:])
    tail = f"\nand {more} more rows in {len(bad) - _SHOW} more files" if len(bad) > _SHOW else ""
    total = sum(f.rejected for f in bad)
    return DataError(
        "\n".join(parts) + tail + f"\nNothing was scored. Fix the input, or rerun with --skip-invalid to score the "
        f"other rows and write these {total} to {output / REJECTED_DIR}/ with their reason.")


def write_rejected(f: InputFile, known_items: np.ndarray, duplicates: np.ndarray, folder: Path) -> Path:
    """f's refused rows (all their columns plus `reason`) to folder/<f.rel>, written atomically."""
    target = folder / f.rel
    columns = ["user_id", "history"] + (["query"] if f.has_query else [])
    full = pq.ParquetFile(f.path).schema_arrow
    schema = pa.schema([full.field(c) for c in columns] + [pa.field("reason", pa.string())])
    with _AtomicParquet(target, schema) as out:
        for table in _read_batches(f, columns):
            reason, _ = row_problems(table, known_items, duplicates, str(f.path))
            keep = reason != ""
            if keep.any():
                out.write(table.filter(pa.array(keep)).append_column("reason", pa.array(reason[keep].tolist(),
                                                                                        pa.string())))
    return target


class _AtomicParquet:
    """A Parquet file written under a hidden temporary name beside `target` and renamed onto it
    only when closed without error: a reader, or a rerun, sees a complete file or none."""

    def __init__(self, target: Path, schema: pa.Schema | None = None) -> None:
        self.target = target
        self.tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _AtomicParquet:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.schema = self.schema or table.schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)

    def ensure_schema(self, schema: pa.Schema) -> None:
        """Start the file with `schema` if nothing was written (an empty file still has one)."""
        if self.writer is None:
            self.schema = self.schema or schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def commit(self) -> None:
        self.writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the bytes are on disk before the name says the file is complete
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.ensure_schema(self.schema)
            self.commit()
        else:
            self.abort()


# ---- resume ------------------------------------------------------------------------------------------


def output_path(output: Path, f: InputFile) -> Path:
    return output / f.rel


def _recorded(path: Path) -> dict | None:
    """The metadata an output file was written with; None when it is missing or unreadable."""
    try:
        meta = pq.read_metadata(path)
        return {**json.loads(meta.metadata[METADATA_KEY]), "num_rows": meta.num_rows}
    except (OSError, pa.ArrowInvalid, KeyError, TypeError, ValueError):
        return None


def plan(files: Sequence[InputFile], output: Path, settings: dict, log: Callable[[str], None]) -> list[InputFile]:
    """The files still to score: those without a complete output made from the same input.
    Refuses (ConfigError) when a complete output was made with other settings."""
    todo, conflicts = [], {}
    for f in files:
        path = output_path(output, f)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by an interrupted run
            stale.unlink(missing_ok=True)
        if not path.exists():
            todo.append(f)
            continue
        rec = _recorded(path)
        if rec is None:
            log(f"recall: {path} is unreadable or not a recall output; scoring {f.rel} again")
            todo.append(f)
            continue
        changed = {k: (rec.get(k), settings[k]) for k in SETTING_KEYS if rec.get(k) != settings[k]}
        if changed:
            conflicts[f.rel] = changed
        elif (rec.get("input_rows"), rec.get("input_bytes")) != (f.rows, f.bytes):
            log(f"recall: {f.rel} changed since its output was written; scoring it again")
            todo.append(f)
        elif rec["num_rows"] != f.rows - int(rec.get("rejected", 0)):
            log(f"recall: {path} holds {rec['num_rows']} rows, not {f.rows - int(rec.get('rejected', 0))}; "
                "scoring it again")
            todo.append(f)
    if conflicts:
        rel, changed = next(iter(conflicts.items()))
        what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        pin = changed.get("version")
        hint = f" (pin --version {pin[0]} to finish it with the same model)" if pin and pin[0] else ""
        raise ConfigError(
            f"output {output} holds recall results made with other settings ({len(conflicts)} file(s), e.g. {rel}: "
            f"{what}); one folder never mixes two settings. Rerun with the settings it was made with{hint}, or "
            "write to a new --output folder")
    return todo


# ---- scoring (inside Ray Data actors) ------------------------------------------------------------


class RecallScorer:
    """A Ray Data actor: one registered model version (loaded as a Serve replica loads it) and
    its index; maps a batch of input rows to their top-k items. Rows that `row_problems` refuses
    are dropped with `skip_invalid` (the driver wrote them to rejected/) and fail the job without
    it (the driver found none, so the input changed under the job)."""

    def __init__(self, spec: dict, version: str, k: int, exclude_history: bool, skip_invalid: bool,
                 duplicates: np.ndarray, torch_threads: int = 1) -> None:
        import faiss
        import ray
        import torch

        from karma.serving import ModelHandle

        torch.set_num_threads(torch_threads)  # actors share the cores: no oversubscription
        faiss.omp_set_num_threads(torch_threads)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.handle = ModelHandle.load(ModelSpec(**spec), version, device)
        self.ids = self.handle.model.items["item_id"].to_numpy(np.int64)
        self.known = np.sort(self.ids)
        self.k, self.exclude, self.skip, self.duplicates = k, exclude_history, skip_invalid, duplicates

    def __call__(self, batch: pa.Table) -> pa.Table:
        from karma.serving import Job, NonFiniteError

        reason, _ = row_problems(batch, self.known, self.duplicates)
        bad = reason != ""
        if bad.any():
            if not self.skip:
                paths = sorted(set(batch.column("path").filter(pa.array(bad)).to_pylist()))
                raise DataError(f"{paths[0]}: {int(bad.sum())} rows cannot be scored ({sorted(set(reason[bad]))}) "
                                "although the check before scoring passed: the input changed during the job; "
                                "rerun it")
            batch = batch.filter(pa.array(~bad))
        hist = batch.column("history").combine_chunks()
        lengths = pc.list_value_length(hist).to_numpy()
        flat = _int64(pc.list_flatten(hist), "input", "history").to_numpy()
        rows = np.split(self.handle.model.rows_of(flat).astype(np.int64), np.cumsum(lengths)[:-1])
        queries = batch.column("query").to_pylist() if "query" in batch.column_names else [None] * batch.num_rows
        jobs = [Job("recall", r, q or None, self.k, self.exclude) for r, q in zip(rows, queries)]
        answers = self.handle.run(jobs)
        failed = [i for i, a in enumerate(answers) if "error" in a]
        users = _int64(batch.column("user_id").combine_chunks(), "input", "user_id")
        if failed:
            raise NonFiniteError(f"{answers[failed[0]]['error']} ({len(failed)} users in one batch, e.g. user_id "
                                 f"{[users[i].as_py() for i in failed[:_SHOW]]})")
        n = np.array([len(a["item_ids"]) for a in answers], np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
        flat_ids = np.concatenate([a["item_ids"] for a in answers]) if answers else np.zeros(0, np.int64)
        flat_s = np.concatenate([a["scores"] for a in answers]) if answers else np.zeros(0, np.float32)
        return pa.table({
            "user_id": users,
            "item_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids.astype(np.int64))),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(flat_s.astype(np.float32))),
            "path": batch.column("path"),
        })


# ---- the driver ------------------------------------------------------------------------------------


class OutputFiles:
    """Routes scored rows to their input's output file and commits a file the moment its last
    row arrives (rows come in input order, so about one file is open at a time)."""

    def __init__(self, output: Path, todo: Sequence[InputFile], settings: dict, log: Callable[[str], None]) -> None:
        self.output, self.log = output, log
        self.todo = {_key(f.path): f for f in todo}
        self.settings = settings
        self.received = dict.fromkeys(self.todo, 0)
        self.buffers: dict[str, list[pa.Table]] = {}
        self.open: dict[str, _AtomicParquet] = {}
        self.written: list[str] = []

    def _schema(self, f: InputFile) -> pa.Schema:
        record = {**self.settings, "input": f.rel, "input_rows": f.rows, "input_bytes": f.bytes,
                  "rejected": f.rejected}
        return OUTPUT_SCHEMA.with_metadata({METADATA_KEY: json.dumps(record).encode()})

    def expected(self, key: str) -> int:
        f = self.todo[key]
        return f.rows - f.rejected

    def start(self) -> None:
        """Commit the files that have nothing to score (empty, or every row refused)."""
        for key in self.todo:
            if self.expected(key) == 0:
                self._finish(key)

    def add(self, table: pa.Table) -> None:
        paths = table.column("path")
        for p in pc.unique(paths).to_pylist():
            key = _key(p)
            part = table.filter(pc.equal(paths, p)).drop_columns(["path"])
            if key not in self.todo:
                raise RuntimeError(f"scored rows of {p}, which is not an input of this job")
            self.received[key] += part.num_rows
            buf = self.buffers.setdefault(key, [])
            buf.append(part)
            if sum(t.num_rows for t in buf) >= _ROW_GROUP:
                self._flush(key)
            if self.received[key] > self.expected(key):
                raise RuntimeError(f"{p}: {self.received[key]} scored rows, more than its {self.expected(key)}")
            if self.received[key] == self.expected(key):
                self._finish(key)

    def _flush(self, key: str) -> None:
        buf = self.buffers.pop(key, [])
        if key not in self.open:
            f = self.todo[key]
            self.open[key] = _AtomicParquet(output_path(self.output, f), self._schema(f)).__enter__()
        if buf:
            self.open[key].write(pa.concat_tables(buf))

    def _finish(self, key: str) -> None:
        self._flush(key)
        out = self.open.pop(key)
        out.ensure_schema(out.schema)
        out.commit()
        self.written.append(self.todo[key].rel)

    def check_complete(self) -> None:
        short = [(self.todo[k].rel, self.received[k], self.expected(k)) for k in self.todo
                 if self.todo[k].rel not in self.written]
        if short:
            raise RuntimeError(f"the stream ended before these files were complete (file, rows, expected): {short}")

    def abort(self) -> None:
        for out in self.open.values():
            out.abort()
        self.open.clear()


def _key(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(str(path)))


class _Progress:
    """A plain line every `every_s` seconds: users done / total, users/s, files written, ETA.
    The rate is counted from the first answered batch, so the actors' start-up does not hide it."""

    def __init__(self, total: int, files: int, every_s: float, log: Callable[[str], None]) -> None:
        self.total, self.files, self.every, self.log = total, files, every_s, log
        self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, users) of the first batch
        self.done = 0

    def update(self, n: int, written: int, force: bool = False) -> None:
        now = time.monotonic()
        self.done += n
        if self.first is None:
            self.first = (now, self.done)
        if not force and now - self.last < self.every:
            return
        self.last = now
        span = now - self.first[0]
        rate = (self.done - self.first[1]) / span if span > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "-"
        pct = 100.0 * self.done / max(self.total, 1)
        self.log(f"recall: {self.done:,} / {self.total:,} users ({pct:.1f}%), {rate:,.0f} users/s, "
                 f"{written} of {self.files} files written, eta {eta}")


def _block_bytes(files: Sequence[InputFile], batch_size: int, batches: int = 8) -> int:
    """Bytes of a read block holding about `batches` batches, from the inputs' Parquet footers
    (uncompressed size per row), at least 1 MiB."""
    rows = size = 0
    for f in files[:16]:
        meta = pq.read_metadata(f.path)
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = size / rows if rows else 256
    return max(1 << 20, int(per_row * batch_size * batches))


def _init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one with one logical CPU more
    than the cores, for the readers beside the actors (as the training job does)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def _pool(s: RecallSettings) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster Ray is connected to."""
    import ray

    res = ray.cluster_resources()
    gpus = s.gpus_per_actor if s.gpus_per_actor is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
    if gpus > 0:
        cpus = s.cpus_per_actor if s.cpus_per_actor is not None else 1.0
        return s.actors or max(1, int(res.get("GPU", 0) // gpus)), cpus, gpus
    cpus = s.cpus_per_actor if s.cpus_per_actor is not None else float(s.torch_threads)
    free = res.get("CPU", 1) - 1  # one slot for the readers
    return s.actors or max(1, int(free // cpus) if cpus > 0 else 1), cpus, 0.0


def run_recall(s: RecallSettings, log: Callable[[str], None] = print) -> RecallResult:
    """Score every user of `s.input` not yet scored in `s.output`; see the module docstring."""
    t0 = time.monotonic()
    output = Path(s.output).expanduser().resolve()
    source = Path(s.input).expanduser().resolve()
    base = source if source.is_dir() else source.parent
    if output == base or (source.is_dir() and output.is_relative_to(base)):
        raise ConfigError(f"output {output} is or lies inside the input folder {base}; outputs would overwrite the "
                          "input or be read as input by the next run: write to another folder")
    files = input_files(source)
    spec = s.model
    version = spec.resolve_version()  # pinned: an alias moving mid-job cannot mix two versions
    from karma.registry import export_dir_of

    uri = spec.resolved_uri()
    export = export_dir_of(spec.registered_name, version, uri)
    known = np.sort(pq.read_table(export / "items.parquet", columns=["item_id"]).column(0).to_numpy())
    meta = json.loads((export / "meta.json").read_text())
    model = f"registered model {spec.registered_name!r} version {version}"
    settings = {"model": spec.registered_name, "version": version, "k": s.k, "exclude_history": s.exclude_history,
                "index": spec.index, "dtype": spec.dtype or meta["dtype"]}
    todo = plan(files, output, settings, log)
    log(f"recall: {model}, k={s.k}; {len(files)} input files, {len(files) - len(todo)} already complete, "
        f"{len(todo)} to score")
    duplicates = check_inputs(files, known)
    refused = [f for f in todo if f.rejected]
    if refused and not s.skip_invalid:
        raise refusal(refused, model, len(known), output)
    for f in refused:
        path = write_rejected(f, known, duplicates, output / REJECTED_DIR)
        log(f"recall: {f.rel}: {f.rejected} of {f.rows} rows refused ({f.problems}), written to {path}")
    users = sum(f.rows - f.rejected for f in todo)
    result = RecallResult(output, spec.registered_name, version, len(files), len(files) - len(todo), [], 0,
                          sum(f.rejected for f in todo), 0.0, 0.0)
    if not todo:
        result.seconds = time.monotonic() - t0
        return result

    import ray
    import ray.data

    _init_ray()
    actors, cpus, gpus = _pool(s)
    log(f"recall: {users:,} users in {len(todo)} files on {actors} actor(s) ({cpus:g} CPU, {gpus:g} GPU each), "
        f"batches of {s.batch_size}")
    sink = OutputFiles(output, todo, settings, log)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # files finish one after another, so few are open
    # An actor scores a whole block: blocks of ~8 batches keep every actor busy and memory flat.
    ctx.target_max_block_size = _block_bytes(todo, s.batch_size)
    ctx.enable_progress_bars = False  # the plain progress lines below say what a log needs
    t_score = time.monotonic()
    try:
        sink.start()
        columns = ["user_id", "history"] + (["query"] if todo[0].has_query else [])
        ds = ray.data.read_parquet([str(f.path) for f in todo], include_paths=True, file_extensions=None)
        ds = ds.select_columns(columns + ["path"]).map_batches(
            RecallScorer, batch_size=s.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
            num_gpus=gpus or None,
            fn_constructor_kwargs=dict(spec={**_spec_dict(spec), "tracking_uri": uri}, version=version, k=s.k,
                                       exclude_history=s.exclude_history, skip_invalid=s.skip_invalid,
                                       duplicates=duplicates, torch_threads=s.torch_threads))
        progress = _Progress(users, len(todo), s.progress_every_s, log)
        for batch in ds.iter_batches(batch_size=s.batch_size, batch_format="pyarrow"):
            before = len(sink.written)
            sink.add(batch)
            progress.update(batch.num_rows, len(sink.written), force=len(sink.written) > before)
        sink.check_complete()
    except BaseException:
        sink.abort()  # what is committed stays; the file in progress is scored again next time
        raise
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars = saved
    scored = time.monotonic() - t_score
    result.written_files, result.users = sink.written, users
    result.seconds, result.users_per_s = time.monotonic() - t0, users / max(scored, 1e-9)
    log(f"recall: {users:,} users scored in {scored:.1f}s ({result.users_per_s:,.0f} users/s), "
        f"{len(sink.written)} files written to {output}")
    return result


def _spec_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)
