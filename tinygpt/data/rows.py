"""Reading the rows of a data file, and the one loop that turns rows into records.

Design choices:
- Files: `.jsonl`, `.json` (a top-level array; a `.json` file holding JSON lines is also read),
  `.parquet` and gzipped `.jsonl.gz`/`.json.gz`. Errors carry `path:line`; for `.json` arrays and
  parquet files the "line" is the 1-based row index, since one row may span many lines.
  With `skip_bad_rows`, every row-level problem is skipped alike: a JSONL line that is not UTF-8
  or not JSON, a row that is not an object, a row that does not convert. The count is returned
  and one `SkippedRowsWarning` names the file and the first such line.
- `load_records` fixes the format by the first row that converts and applies it to every row,
  so a later malformed row is reported as what it lacks, not as an unknown format.
- Two kinds of row problems. A structural one (not JSON, a missing or mistyped field) stops
  with file and line unless `skip_bad_rows`. A `Quirk` is what real published sets contain (an
  empty reply, identical replies, a conversation without a reply): such rows are skipped and
  counted by default. Converters also note changes to rows they keep (leading assistant turns
  dropped, ...). With `strict`, every quirk and every change stops at its row instead. The
  `RowReport` counts each reason with its first line numbers, and one `SkippedRowsWarning` (a
  Notice: shown even with --quiet) states it. Every message names the flag that changes it.
"""
from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq

from ..errors import DataError, Notice

EXTENSIONS = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_SKIP_FIX = "fix or delete the row, or pass --skip-bad-rows to skip such rows"
_STRICT_FIX = "--strict stops at such rows; without it they are skipped (or kept with the change)"
SHOWN_LINES = 5                    # line numbers listed per reason in a report


class SkippedRowsWarning(Notice):
    """Rows of a data file skipped or changed while reading it."""


class Quirk(ValueError):
    """A row as real data sets have them; skipped (and counted by its message) unless strict."""


@dataclass
class RowReport:
    """What reading a file did to its rows: malformed rows skipped (`bad`, with --skip-bad-rows),
    quirky rows skipped and kept rows changed (reason -> line numbers)."""
    path: str
    rows: int = 0
    bad: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    changed: dict = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return len(self.bad) + sum(map(len, self.skipped.values()))

    def summary(self) -> str | None:
        """One line for the log and the warning (None when every row was read as it is)."""
        def lines(ls):
            shown = ", ".join(map(str, ls[:SHOWN_LINES]))
            return f"line{'s' if len(ls) > 1 else ''} {shown}{', ...' if len(ls) > SHOWN_LINES else ''}"
        parts = [f"{len(ls)} {why} ({lines(ls)})" for why, ls in self.skipped.items()]
        if self.bad:
            parts.append(f"{len(self.bad)} malformed ({lines([e.line for e in self.bad])}: {self.bad[0].what})")
        out = []
        if parts:
            out.append(f"skipped {self.n_skipped} of {self.rows} rows: " + "; ".join(parts))
        if self.changed:
            out.append("kept with changes: " + "; ".join(f"{len(ls)} {why} ({lines(ls)})"
                                                          for why, ls in self.changed.items()))
        if not out:
            return None
        flags = " (--strict stops at such rows instead)" if self.skipped or self.changed else ""
        return f"{self.path}: " + "; ".join(out) + flags


def _kind(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise DataError(f"unsupported file type {path.name!r}", path,
                    fix=f"use one of: {', '.join(EXTENSIONS)}")


def read_rows(path, on_bad: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, row) for every row of a data file. Line numbers are 1-based; for `.json`
    arrays and parquet files they are row numbers. Blank JSONL lines are skipped.

    A row that cannot be read (a JSONL line that is not UTF-8 or not JSON, a row that is not an
    object) raises a DataError naming file and line, or, with `on_bad`, is handed to it and
    left out. Errors of the whole file (missing, unreadable, a broken `.json` array) always raise."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise DataError("file not found", path, fix="check the path")
    opener = gzip.open if kind.endswith(".gz") else open
    if kind == ".parquet":
        rows = _parquet_rows(path)
    elif kind in (".json", ".json.gz") and _starts_array(path, opener):
        rows = _json_rows(path, opener)
    else:
        rows = _jsonl_rows(path, opener)
    for line, row in rows:
        if not isinstance(row, (dict, DataError)):
            row = DataError(f"row is a JSON {type(row).__name__}, not an object", path, line)
        if isinstance(row, DataError):  # the readers hand back unreadable lines as errors
            if on_bad is None:
                raise row
            on_bad(row)
            continue
        yield line, row


def _starts_array(path: Path, opener) -> bool:
    """A `.json` file is an array unless it starts with an object (then it holds JSON lines)."""
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read file ({e})", path) from None
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _jsonl_rows(path: Path, opener) -> Iterator[tuple[int, object]]:
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:  # utf-8-sig: tolerate a byte-order mark (it can only start line 1)
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError:
                    yield line_no, DataError("invalid UTF-8", path, line_no)
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = DataError(f"invalid JSON ({e.msg} at column {e.colno})", path, line_no)
                yield line_no, row
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip `.gz` file
        raise DataError(f"cannot read file ({e})", path) from None


def _json_rows(path: Path, opener) -> Iterator[tuple[int, object]]:
    try:
        with opener(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError("invalid UTF-8", path, line) from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read file ({e})", path) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", path, e.lineno) from None
    if not isinstance(rows, list):
        raise DataError("a .json file must hold an array of rows", path)
    yield from enumerate(rows, 1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet file ({str(e).splitlines()[0][:160]})", path) from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


# ---- rows to records ---------------------------------------------------------------------------
def load_records(path, fmt: str | None, detect, convert, skip_bad_rows: bool = False, strict: bool = False):
    """Convert every row of a file -> (records, RowReport). `convert(row, fmt, notes)` returns a
    list of records and appends to `notes` what it changed in a row it keeps; it raises `Quirk`
    for a row to skip and ValueError for a malformed one. The format is fixed by the first row
    that converts. Anything skipped or changed is reported once as a `SkippedRowsWarning`."""
    out, report = [], RowReport(str(path))

    def unreadable(e: DataError):
        report.rows += 1
        if not skip_bad_rows:
            raise DataError(e.what, e.path, e.line, _SKIP_FIX)
        report.bad.append(e)

    for line, row in read_rows(path, unreadable):
        report.rows += 1
        notes: list[str] = []
        try:
            row_fmt = fmt or detect(row)
            records = convert(row, row_fmt, notes)
        except Quirk as e:
            if strict:
                raise DataError(str(e), path, line, _STRICT_FIX) from None
            report.skipped.setdefault(str(e), []).append(line)
            continue
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"bad row ({e})", path, line, _SKIP_FIX) from None
            report.bad.append(DataError(f"bad row ({e})", path, line))
            continue
        if notes and strict:
            raise DataError(notes[0], path, line, _STRICT_FIX)
        for n in dict.fromkeys(notes):
            report.changed.setdefault(n, []).append(line)
        fmt = row_fmt
        out.extend(records)
    text = report.summary()
    if text:
        warnings.warn(text, SkippedRowsWarning, stacklevel=3)
    return out, report
