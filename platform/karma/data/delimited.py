"""Delimited text files (TSV, CSV, MovieLens '::') parsed in bulk by Arrow, with errors that
name the file and the 1-based line of the first bad row, however deep inside it lies.

Arrow's CSV reader parses a large file in a few seconds, but when it fails it says neither
which line broke nor how. Only then does a vectorised pass over the raw lines find the first
line with the wrong number of fields or a value that is not a number, so the fast path costs
nothing extra and no row ever becomes a Python object.
"""

from __future__ import annotations

import codecs
import io
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from .schema import DataError

Kind = Literal["int", "float", "str"]
ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
# What Arrow's int64/float64 conversion accepts (it trims surrounding blanks).
_PATTERNS = {
    "int": r"^\s*-?[0-9]{1,18}\s*$",
    "float": r"(?i)^\s*[-+]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[-+]?[0-9]+)?|nan|inf|infinity)\s*$",
}
INT_PATTERN = _PATTERNS["int"]
_WORDS = {"int": "an integer", "float": "a number"}
_QUOTED = r'"(?:[^"]|"")*"'  # a double-quoted CSV field; "" escapes a quote
_SEP = "\x1f"  # ASCII unit separator: stands in for a multi-character separator such as '::'


def _clip(line: str, width: int = 80) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def read_bytes(path: Path, encoding: str = "utf-8") -> bytes:
    """The file as UTF-8 bytes, without a byte-order mark. `encoding="auto"` reads UTF-8 and
    falls back to latin-1 (MovieLens-1M's movies.dat is latin-1, the later releases UTF-8)."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # as spreadsheet programs save CSV
        data = data[len(codecs.BOM_UTF8):]
    if encoding == "auto":
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError:
            encoding = "latin-1"
    if encoding.replace("_", "-").lower() not in ("utf-8", "utf8", "ascii"):
        data = data.decode(encoding).encode("utf-8")
    return data


def _spans(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets of every physical line (the end before its CR LF or LF)."""
    buf = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], breaks + 1)).astype(np.int64)
    ends = np.concatenate((breaks, [len(buf)])).astype(np.int64)
    cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13) if len(buf) else np.zeros(len(ends), bool)
    return starts, ends - cr


def _lines(data: bytes) -> tuple[pa.Array, np.ndarray]:
    """Every physical line of `data` without its line break, as one Arrow string array that
    points into `data` (no copy, no Python strings), and whether each one is blank."""
    starts, ends = _spans(data)
    offsets = np.concatenate((starts, [len(data)]))
    raw = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets), pa.py_buffer(data))
    return pc.utf8_rtrim(raw, characters="\r\n"), ends == starts


def _first_invalid_utf8(path: Path, data: bytes) -> DataError | None:
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8")


def data_lines(path: Path, header: bool) -> pa.Array:
    """The non-blank UTF-8 lines of a file after its header line, if any: for files whose last
    field may hold the separator itself."""
    data = path.read_bytes()
    bad = _first_invalid_utf8(path, data)
    if bad is not None:
        raise bad
    lines, blank = _lines(data)
    keep = ~blank
    keep[: int(header)] = False
    return lines.filter(pa.array(keep))


def line_numbers(path: Path, rows, header: bool, spans=None) -> np.ndarray:
    """1-based line numbers of 0-based data rows as `read_delimited` returned them (it skips
    blank lines and the header line). Reads the file again: meant for error messages."""
    starts, ends = _spans(path.read_bytes()) if spans is None else spans
    numbers = np.flatnonzero(ends[int(header):] > starts[int(header):]) + 1 + int(header)
    return numbers[np.asarray(rows, np.int64)]


def _diagnose(path: Path, data: bytes, names: list[str], kinds: list[Kind | None], sep: str, quoted: bool,
              header: bool, expected: str, shown_sep: str) -> DataError | None:
    """The first line that Arrow's parse must have failed on, as a DataError, or None."""
    bad = _first_invalid_utf8(path, data)
    if bad is not None:
        return bad
    lines, blank = _lines(data)
    first = int(header)
    text = pc.replace_substring_regex(lines, _QUOTED, "Q") if quoted else lines
    n_fields = pc.add(pc.count_substring(text, sep), 1).to_numpy(zero_copy_only=False)
    problems: list[tuple[int, str]] = []  # (0-based line index, what is wrong)
    wrong = np.flatnonzero(~blank[first:] & (n_fields[first:] != len(names))) + first
    if len(wrong):
        i, found = int(wrong[0]), int(n_fields[wrong[0]])
        problems.append((i, f"{found} field{'s' * (found != 1)} instead of {len(names)}"))
    fields = pc.split_pattern(text, sep)
    ok_count = ~blank & (n_fields == len(names))
    ok_count[:first] = False
    for j, (name, kind) in enumerate(zip(names, kinds)):
        if kind not in _PATTERNS or not ok_count.any():
            continue
        value = pc.list_element(fields.filter(pa.array(ok_count)), j)
        fails = ~pc.match_substring_regex(value, _PATTERNS[kind]).to_numpy(zero_copy_only=False)
        if fails.any():
            k = int(np.argmax(fails))
            problems.append((int(np.flatnonzero(ok_count)[k]),
                             f"{name} {value[k].as_py()!r} is not {_WORDS[kind]}"))
    if not problems:
        return None
    i, what = min(problems)
    got = lines[i].as_py().replace(sep, shown_sep)
    return DataError(f"{path}:{i + 1}: expected {expected}, got {_clip(got)!r} ({what}); fix or remove that line")


def read_delimited(path: Path, columns: dict[str, Kind], sep: str, *, expected: str,
                   header: Literal[None, "skip", "names"] = None, quoted: bool = False,
                   encoding: str = "utf-8") -> pa.Table:
    """Parse `path` into an Arrow table with the given columns (int -> int64, float ->
    float64, str -> string; no nulls: an empty number is an error, an empty string ""). Blank
    lines are skipped. header: None (none), "skip" (the first line is a header; columns are
    positional) or "names" (the first line names the columns; `columns` are picked by name
    and others are read as text). `sep` may be several characters ('::'). `expected` says
    what a line should look like, for the error raised on the first bad line."""
    data = read_bytes(path, encoding)
    shown_sep = sep
    if len(sep) > 1:  # Arrow splits on one character
        data = data.replace(sep.encode(), _SEP.encode())
        sep = _SEP
    names, kinds = list(columns), list(columns.values())
    if header == "names":
        head = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
        present = [h.strip().strip('"') for h in head.split(sep)]
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{path}:1: the header {head!r} lacks column(s) {missing}; expected {expected}")
        names = present
        kinds = [columns.get(h) for h in present]
    if not data or data.isspace():
        return pa.table({c: pa.array([], ARROW_TYPES[k]) for c, k in columns.items()})
    read = pcsv.ReadOptions(column_names=names, skip_rows=int(header is not None))
    parse = pcsv.ParseOptions(delimiter=sep, quote_char='"' if quoted else False, ignore_empty_lines=True)
    convert = pcsv.ConvertOptions(column_types={c: ARROW_TYPES[k] for c, k in zip(names, kinds) if k},
                                  include_columns=list(columns), null_values=[], strings_can_be_null=False,
                                  quoted_strings_can_be_null=False)
    try:
        return pcsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        found = _diagnose(path, data, names, kinds, sep, quoted, header is not None, expected, shown_sep)
        raise (found or DataError(f"{path}: cannot parse ({err}); expected {expected}")) from None


def row_error(path: Path, rows, header: bool, expected: str, what: str,
              fix: str = "fix or remove that line") -> DataError:
    """A DataError for the first of the 0-based data rows `rows` (as `read_delimited`
    returned them) that a later check found bad, naming its line and showing it."""
    rows = np.atleast_1d(np.asarray(rows, np.int64))
    data = path.read_bytes()
    starts, ends = _spans(data)
    line = int(line_numbers(path, rows[:1], header, (starts, ends))[0])
    got = data[starts[line - 1]:ends[line - 1]].decode("utf-8", "replace")
    more = f"; {len(rows) - 1} later line(s) too" if len(rows) > 1 else ""
    return DataError(f"{path}:{line}: expected {expected}, got {_clip(got)!r} ({what}{more}); {fix}")
