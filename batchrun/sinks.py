"""The output schema (defined here and nowhere else), the journal, part files, and compaction.

Each result row is appended, as it completes, to a journal segment in `OUTPUT.parts/`
(`journal-NNNNNN.jsonl`, one JSON line a row, unbuffered), so a killed run loses nothing it
counted as done: the pool queues the rows that finish in one event-loop turn and journals them
with one write before it counts them (`PartWriter.queue`, `write_queued`). Every few thousand
rows, megabytes or seconds (`pool.FLUSH_ROWS`) the buffered rows become `part-NNNNNN.parquet`
(same N), written under a temporary name, fsynced and renamed; then the journal segment is
deleted. A run that starts folds leftover segments into parts first (`recover_journals`).
When every row has a result, the parts are compacted into OUTPUT in input order.
"""

from __future__ import annotations

import base64
import contextlib
import operator
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from batchrun.epoch import MICROSECOND, epoch_us
from batchrun.logs import has_secrets, scrub, secret_in

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

#: internal columns kept in part files only: input position, for ordering and resume
INDEX_COLUMN = "_index"
#: the part of a row's `cost_usd` already counted in earlier rows for the same position in
#: the same run (paid answers journaled while the row was re-asked), so that the spend of a
#: checkpoint is sum(cost_usd - _paid_before) and nothing is counted twice
PAID_BEFORE_COLUMN = "_paid_before"

#: the output file's schema metadata: the job's digest and row count (`runner`, `status`)
METADATA_KEY = b"batchrun"
#: what `batchrun report` needs to know about the job that wrote a file
REPORT_KEY = b"batchrun.report"

#: the usage columns, in output order: each is the `client.Completion` field of the same
#: name, summed over the answers a row paid for. A new usage figure is a field there and a
#: name here.
USAGE_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "reasoning_tokens",
)

PART_PREFIX = "part-"
JOURNAL_PREFIX = "journal-"
#: `--engine ray` checkpoints each shard of the input in a folder of its own in OUTPUT.parts/
SHARD_PREFIX = "shard-"
_JOURNAL_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_APPEND_NEWLINE


def _result_fields() -> list[tuple[str, pa.DataType]]:
    import pyarrow as pa

    return [
        ("status", pa.string()),
        ("content", pa.large_string()),
        ("reasoning_content", pa.large_string()),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        *((name, pa.int64()) for name in USAGE_COLUMNS),
        ("attempts", pa.int32()),
        ("rate_limited", pa.int32()),
        ("latency_s", pa.float64()),
        ("queued_s", pa.float64()),
        ("http_status", pa.int32()),
        ("error", pa.string()),
        ("response_id", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("error_class", pa.string()),
        ("cost_usd", pa.float64()),
        ("cost_worst_case", pa.bool_()),
        ("cached", pa.bool_()),
    ]


def result_column_names() -> list[str]:
    """The names of the columns every result row has after the job's own columns."""
    return [name for name, _ in _result_fields()]


def output_schema(carried: dict[str, pa.DataType]) -> pa.Schema:
    """The output file's schema: `id`, the carried input columns, then the result columns.

    `carried["id"]`, if there, is the id column's type (the ids keep the input's type);
    otherwise ids are strings.
    """
    import pyarrow as pa

    fields = [pa.field("id", carried.get("id", pa.string()), nullable=False)]
    fields += [pa.field(name, kind) for name, kind in carried.items() if name != "id"]
    fields += [pa.field(name, kind) for name, kind in _result_fields()]
    return pa.schema(fields)


def part_schema(carried: dict[str, pa.DataType]) -> pa.Schema:
    """The schema of part files: the output's plus the input position and the cost already
    journaled."""
    import pyarrow as pa

    return (
        output_schema(carried)
        .append(pa.field(INDEX_COLUMN, pa.int64(), nullable=False))
        .append(pa.field(PAID_BEFORE_COLUMN, pa.float64()))
    )


def parts_dir(output: Path) -> Path:
    """Where a run keeps its results until the output file is complete."""
    return output.with_name(output.name + ".parts")


def part_path(directory: Path, number: int) -> Path:
    return directory / f"{PART_PREFIX}{number:06d}.parquet"


def journal_path(directory: Path, number: int) -> Path:
    """The journal segment whose rows become part `number`."""
    return directory / f"{JOURNAL_PREFIX}{number:06d}.jsonl"


def segment_number(path: Path) -> int:
    """N of `part-N.parquet` or `journal-N.jsonl`."""
    return int(path.stem.split("-")[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name, fsynced and renamed to `path` if the block
    ends without an error (the temporary is removed if it does not)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_atomically(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, fsync it, rename it into place."""
    import pyarrow.parquet as pq

    with _atomic_file(path) as file:
        pq.write_table(table, file, compression="zstd")


def _carried_value(value: Any, kind: pa.DataType) -> Any:
    import pyarrow as pa

    if value is None or not pa.types.is_large_string(kind) or isinstance(value, str):
        return value
    import orjson

    return orjson.dumps(value).decode()  # nested or mixed values travel as JSON text


#: the result columns a row made by `rows.RowMaker` holds as epoch microseconds (an int:
#: orjson writes it without a call back into Python, and the part writer converts the column
#: at once); a row made elsewhere may hold `datetime`s there, which are written as before
EPOCH_US_COLUMNS = ("started_at", "finished_at")


def _journal_default(value: Any) -> Any:
    """JSON for the values orjson leaves to us; `journal_table` turns them back."""
    if isinstance(value, datetime):
        return epoch_us(value)  # exact, any unit fits
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value // MICROSECOND
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _write_all(fd: int, data: bytes) -> None:
    """Append all of `data`, or nothing: a torn line left by a full disk would swallow the
    line written after it once space is back, so it is cut off again before raising."""
    written = 0
    try:
        while written < len(data):  # more than one write only on a full disk or a signal
            written += os.write(fd, data[written:])
    except BaseException:
        if written:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size - written)
        raise


class PartWriter:
    """Journals result rows as they come, and writes them out as numbered part files.

    `add` appends the row to the current journal segment (one `os.write`, no fsync: the OS
    has it, so a killed process loses nothing) and buffers it. `queue` encodes a row without
    writing it, and `write_queued` journals every queued row in one write and buffers them:
    the pool queues the rows finished in one event-loop turn and counts them once written.
    `take` hands the buffer over and starts the next segment, so that the caller can write
    the part in a worker thread with `write_part`, which then deletes the segment.
    """

    def __init__(
        self, directory: Path, *, carried: dict[str, pa.DataType], first_segment: int = 1
    ) -> None:
        """Args:
        first_segment: the lowest segment number to use (a shard's parts are numbered above
            the parts of the folder holding it, so that the later result still wins).
        """
        self.directory = directory
        self.schema = part_schema(carried)
        self._carried = carried
        self._json_carried = {
            name: kind for name, kind in carried.items() if str(kind) == "large_string"
        }
        self._rows: list[dict[str, Any]] = []
        self._queued: list[dict[str, Any]] = []
        self._queued_lines: list[bytes] = []
        self._next = max(_next_segment(directory), first_segment)
        self._journal: int | None = None  # descriptor of journal segment `_next`, once opened
        #: write calls made to the journal so far (each holds one or more whole lines)
        self.writes = 0
        #: bytes journalled in the current segment (its rows are the ones buffered)
        self.journal_bytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    def _encode(self, row: dict[str, Any]) -> bytes:
        """The row's journal line, before any secret is looked for."""
        for name, kind in self._json_carried.items():
            row[name] = _carried_value(row.get(name), kind)
        return orjson.dumps(row, default=_journal_default, option=_JOURNAL_OPTIONS)

    def _line(self, row: dict[str, Any]) -> bytes:
        """The row's journal line. Registered secrets are redacted, in the row too: a server
        may echo the key inside an answer. The encoded line is searched for them first, so
        a row without one is not scrubbed field by field."""
        line = self._encode(row)
        if has_secrets() and secret_in(line):
            for name, value in row.items():  # in place, like the carried values above
                row[name] = scrub(value)
            line = orjson.dumps(row, default=_journal_default, option=_JOURNAL_OPTIONS)
        return line

    def _write(self, data: bytes) -> None:
        if self._journal is None:
            self._journal = os.open(
                journal_path(self.directory, self._next),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o644,
            )
        _write_all(self._journal, data)
        self.writes += 1
        self.journal_bytes += len(data)

    def add(self, row: dict[str, Any]) -> None:
        """Journal a result row at once and buffer it for the next part.

        Raises:
            OSError: the journal could not be written (the row is then neither journalled
                nor buffered).
        """
        line = self._line(row)
        self._write(line)
        self._rows.append(row)

    def queue(self, row: dict[str, Any]) -> None:
        """Encode a result row for the journal; the next `write_queued` writes it (and
        redacts secrets)."""
        self._queued_lines.append(self._encode(row))
        self._queued.append(row)

    def write_queued(self) -> list[dict[str, Any]]:
        """Journal every queued row with one write and buffer them for the next part.

        Returns:
            The rows journalled, oldest first (none if nothing was queued).

        Raises:
            OSError: the journal could not be written (the queued rows are then neither
                journalled nor buffered, and the queue is empty).
        """
        rows, lines = self._queued, self._queued_lines
        if not rows:
            return rows
        self._queued, self._queued_lines = [], []
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        if has_secrets() and secret_in(data):  # one search for all the rows, not one a row
            data = b"".join([self._line(row) for row in rows])
        self._write(data)
        self._rows += rows
        return rows

    def take(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """The buffered rows and the path to write them to, or None if there are none."""
        if not self._rows:
            return None
        self.close()
        rows, self._rows = self._rows, []
        self.journal_bytes = 0
        path = part_path(self.directory, self._next)
        self._next += 1
        return path, rows

    def write_part(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """Write one part file, then drop its journal segment (blocking: call it in a
        worker thread)."""
        write_atomically(part_table(rows, self.schema), path)
        journal_path(path.parent, segment_number(path)).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the current journal segment; its rows stay journalled until written."""
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None


def part_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Result rows as a part file's table: what `pa.Table.from_pylist` makes of them, with
    the `EPOCH_US_COLUMNS` held as epoch microseconds converted a column at once (pyarrow
    converts a timezone-aware `datetime` one at a time, asking it for its offset)."""
    import pyarrow as pa

    columns = []
    for field, values in zip(schema, _columns_of(rows, schema.names), strict=True):
        name, kind = field.name, field.type
        if name in EPOCH_US_COLUMNS:
            try:
                columns.append(_epoch_us_column(values, kind))
                continue
            except (pa.ArrowTypeError, pa.ArrowInvalid):  # `datetime`s: a row made elsewhere
                pass
        columns.append(pa.array(values, kind))
    return pa.Table.from_arrays(columns, schema=schema)


#: microseconds in one unit of a timestamp column
_UNIT_US = {"s": 1_000_000, "ms": 1000, "us": 1}


def _columns_of(rows: list[dict[str, Any]], names: list[str]) -> list[Sequence[Any]]:
    """The values of each named column of `rows`; None where a row lacks the column.

    Rows made by the pool hold every column: one `itemgetter` call a row and a transpose in
    C take half the time of a list a column. A row lacking one (written elsewhere, or
    before a column was added) has them gathered with `dict.get`."""
    if not rows or len(names) < 2:  # (one name: itemgetter gives no tuple)
        return [[row.get(name) for row in rows] for name in names]
    try:
        return list(zip(*map(operator.itemgetter(*names), rows), strict=True))
    except KeyError:
        return [[row.get(name) for row in rows] for name in names]


def _epoch_us_column(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    """A timestamp column from epoch microseconds, in its unit (whole units, as a
    `datetime` is written). The division is done in Python: an Arrow cast would import
    pyarrow.compute, ~45 ms that a small run otherwise never pays.

    Raises:
        pa.ArrowTypeError, pa.ArrowInvalid: a value is not an int (a `datetime`).
    """
    import pyarrow as pa

    if not all(type(v) is int or v is None for v in values):
        raise pa.ArrowTypeError("not epoch microseconds")
    if kind.unit == "ns":
        values = [None if v is None else v * 1000 for v in values]
    elif (per := _UNIT_US[kind.unit]) != 1:
        values = [None if v is None else v // per for v in values]
    return pa.array(values, kind)


def _next_segment(directory: Path) -> int:
    numbers = [segment_number(p) for p in [*list_parts(directory), *list_journals(directory)]]
    return max(numbers, default=0) + 1


def _numbered(directory: Path, prefix: str, suffix: str) -> list[Path]:
    if not directory.is_dir():
        return []
    found = directory.glob(f"{prefix}*{suffix}")
    return sorted((p for p in found if p.stem[len(prefix) :].isdigit()), key=segment_number)


def shard_path(directory: Path, number: int) -> Path:
    """The folder of shard `number` in a checkpoint."""
    return directory / f"{SHARD_PREFIX}{number:04d}"


def shard_dirs(directory: Path) -> list[Path]:
    """The shard folders in a checkpoint (`--engine ray`), in shard order."""
    if not directory.is_dir():
        return []
    found = directory.glob(f"{SHARD_PREFIX}*")
    return sorted(p for p in found if p.is_dir() and p.name[len(SHARD_PREFIX) :].isdigit())


def list_parts(directory: Path) -> list[Path]:
    """The whole part files in a checkpoint and its shard folders, oldest first; temporary
    leftovers are ignored.

    Shards hold disjoint input positions, so only the order within a folder matters; a
    shard's parts are numbered above the folder's own (`PartWriter(first_segment=)`), so
    sorting by number keeps the later result last wherever it was written.
    """
    parts = _numbered(directory, PART_PREFIX, ".parquet")
    for shard in shard_dirs(directory):
        parts += _numbered(shard, PART_PREFIX, ".parquet")
    return sorted(parts, key=segment_number)


def own_parts(directory: Path) -> list[Path]:
    """The part files of one folder, leaving its shard folders out."""
    return _numbered(directory, PART_PREFIX, ".parquet")


def list_journals(directory: Path) -> list[Path]:
    """The journal segments in a checkpoint, oldest first."""
    return _numbered(directory, JOURNAL_PREFIX, ".jsonl")


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The rows of a journal segment; a torn line (the tail a kill cut short) is skipped."""
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict) and INDEX_COLUMN in row and "status" in row:
            rows.append(row)
    return rows


def _journal_column(values: list[Any], kind: pa.DataType) -> pa.Array:
    import pyarrow as pa

    types = pa.types
    if types.is_timestamp(kind):  # epoch microseconds, as `part_table` converts them
        return _epoch_us_column(values, kind)
    if types.is_duration(kind):
        return pa.array(values, pa.int64()).cast(pa.duration("us")).cast(kind, safe=False)
    if types.is_binary(kind) or types.is_large_binary(kind) or types.is_fixed_size_binary(kind):
        return pa.array([None if v is None else base64.b64decode(v) for v in values], kind)
    parse: Any = None
    if types.is_date(kind):
        parse = date.fromisoformat
    elif types.is_time(kind):
        parse = time.fromisoformat
    elif types.is_decimal(kind):
        parse = Decimal
    if parse is not None:
        values = [None if v is None else parse(v) for v in values]
    elif types.is_large_string(kind):  # carried JSON text; a `--limit` run may have had ints
        values = [_carried_value(v, kind) for v in values]
    elif types.is_string(kind):  # ids: text when not every id is a number
        values = [v if v is None or isinstance(v, str) else str(v) for v in values]
    return pa.array(values, kind)


def journal_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Journalled rows as the part file `write_part` would have written from them."""
    import pyarrow as pa

    columns = [_journal_column([row.get(f.name) for row in rows], f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def recover_journals(directory: Path, *, schema: pa.Schema) -> int:
    """Fold the journal segments a stopped or killed run left into part files, and clear
    temporary leftovers of part writes. Returns the number of rows recovered.

    Only call it holding the run lock: a live run's segments and temporaries are in use.
    """
    for leftover in directory.glob(f".{PART_PREFIX}*.tmp-*"):
        leftover.unlink(missing_ok=True)
    recovered = 0
    journals = list_journals(directory)
    for journal in journals:
        part = part_path(directory, segment_number(journal))
        # the part exists when the kill came between its rename and the segment's removal:
        # it already holds exactly the segment's rows
        if not part.exists():
            rows = read_journal(journal)
            if rows:
                write_atomically(journal_table(rows, schema), part)
                recovered += len(rows)
        journal.unlink()
    if journals:
        _fsync(directory)
    return recovered


def scan_part(path: Path, types: dict[str, pl.DataType]) -> pl.LazyFrame:
    """A polars LazyFrame of one part file's columns `types` (name -> polars type), in that
    order and cast to those types; a column the part lacks is null. Parts written before a
    column was added to the schema (`rate_limited`, say) so read as parts written now.
    """
    import polars as pl
    import pyarrow.parquet as pq

    # the footer, read by pyarrow: polars' `collect_schema` calls back into Python, where a
    # Ctrl-C then becomes a panic rather than a KeyboardInterrupt
    present = set(pq.read_schema(path).names)
    frame = pl.scan_parquet(path)
    absent = [pl.lit(None, kind).alias(name) for name, kind in types.items() if name not in present]
    if absent:
        frame = frame.with_columns(absent)
    return frame.select(list(types)).cast(pl.Schema(types))


def read_part(path: Path, schema: pa.Schema) -> pa.Table:
    """One part file's columns of `schema`, in its order and cast to its types; a column the
    part lacks (written before the column was added, like `rate_limited`) is null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)  # one footer read: its schema, then the columns
    present = set(file.schema_arrow.names)
    # a part of at most a few thousand rows, read one at a time: no thread pool for it
    table = file.read(columns=[name for name in schema.names if name in present], use_threads=False)
    for field in schema:
        if field.name not in present:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    table = table.select(schema.names)
    return table if table.schema.equals(schema) else _cast(table, schema)


def _kernels() -> Any:
    """Arrow's compute module without its wrappers (issue 12): `pyarrow.compute` is Python
    wrappers it generates at import over `pyarrow._compute` (~45 ms a run); the kernels,
    `call_function` and the option classes are the same, and `_compute` loads in ~5 ms."""
    try:
        import pyarrow._compute as kernels
    except ImportError:  # a pyarrow that moved it: the public module has the same names
        import pyarrow.compute as kernels
    return kernels


def _kernel(name: str, *args: Any, options: Any = None) -> Any:
    """Arrow's compute function `name` on `args`, called by name through `_kernels`."""
    return _kernels().call_function(name, list(args), options)


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table.cast(schema)` (same checks: names, nulls in a non-null field, a safe cast)
    through `_kernel`, as `Table.cast` would import pyarrow.compute."""
    import pyarrow as pa

    if table.schema.names != schema.names:
        raise ValueError(f"cannot cast {table.schema.names} to {schema.names}")
    columns = []
    for column, field in zip(table.itercolumns(), schema, strict=True):
        if not field.nullable and column.null_count > 0:
            raise ValueError(f"casting a field with null values to non-nullable: {field}")
        if column.type != field.type:
            column = _kernel("cast", column, options=_kernels().CastOptions.safe(field.type))
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def keep_latest(frame: Any) -> Any:
    """One row per input position, in input order: the latest result written for it.

    `frame` has a `_segment` column holding each row's part number (or journal segment
    number: segment N holds the rows of part N). Within a segment the later row wins: a
    row's paid answers are journaled before its final row, in the same segment."""
    # sorting on the number and keeping each position's last row, rather than `unique`,
    # keeps this within tens of MB for a million rows
    import polars as pl

    index = pl.col(INDEX_COLUMN)
    return (
        frame.sort([INDEX_COLUMN, "_segment"], maintain_order=True)
        .filter(index.ne_missing(index.shift(-1)))
        .drop("_segment")
    )


#: compaction writes the output this many input positions at a time, one row group each
COMPACT_CHUNK_ROWS = 20_000
#: up to this many rows, an output's rows are gathered as Python values
#: (`_latest_rows_in_python`) rather than with Arrow's kernels (`_kernel`, ~5 ms to load);
#: past it the kernels are cheaper
SMALL_COMPACT_ROWS = 2_000


def output_files(output: Path) -> list[Path]:
    """The Parquet files that make up `output`, in row order: the file itself, or the
    `part-NNNNN.parquet` files of an output written as a directory (`output_file_rows`).

    This is the one place that knows both shapes; everything that reads an output reads it
    through here. An empty list: there is no output.
    """
    if output.is_dir():
        files = sorted(output.iterdir())
        # only a folder of nothing but our file names is an output: never a user's folder,
        # which --restart would otherwise remove
        if files and all(_OUTPUT_FILE.fullmatch(path.name) for path in files):
            return files
        return []
    return [output] if output.is_file() else []


def output_exists(output: Path) -> bool:
    """Whether `output` is written, as one file or as a directory of files."""
    return bool(output_files(output))


def read_output_schema(output: Path) -> pa.Schema:
    """The schema (and batchrun metadata) of an output; every file of a directory has it.

    Raises:
        FileNotFoundError: there is no output.
    """
    import pyarrow.parquet as pq

    files = output_files(output)
    if not files:
        raise FileNotFoundError(output)
    return pq.read_schema(files[0])


def read_output_table(output: Path, *, columns: list[str] | None = None) -> pa.Table:
    """An output's rows (or some columns of them), in order, as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(path, columns=columns) for path in output_files(output)]
    if not tables:
        raise FileNotFoundError(output)
    return pa.concat_tables(tables)


def remove_output(output: Path) -> None:
    """Delete an output, a file or a directory of files; nothing if there is none."""
    import shutil

    if output.is_dir():
        shutil.rmtree(output)
    else:
        output.unlink(missing_ok=True)


#: the files of an output written as a directory: `part-00000.parquet`, ...
_OUTPUT_FILE = re.compile(rf"{PART_PREFIX}\d{{5}}\.parquet")


def _output_file_path(directory: Path, number: int) -> Path:
    return directory / f"{PART_PREFIX}{number:05d}.parquet"


def compact(
    directory: Path,
    output: Path,
    *,
    schema: pa.Schema,
    rows: int,
    file_rows: int | None = None,
) -> int:
    """Fold the results for the first `rows` input rows into the output, in input order,
    written atomically. Returns the number of rows written.

    Args:
        file_rows: past this many rows the output is a directory of `part-NNNNN.parquet`
            files of at most `file_rows` rows each (same schema and metadata), built as
            `.OUTPUT.tmp-PID/` and renamed into place whole; None: always one file.

    Memory stays flat whatever the size: the output is written one range of input
    positions at a time, reading only the parts that hold results in that range (known from
    each part's footer), with pyarrow alone: no polars, whose import and thread pools cost
    a small run a third of its start-up and a large one 100 MB.
    """
    import pyarrow.parquet as pq

    parts = list_parts(directory)
    if not parts:
        return 0
    spans = [span for span in _part_spans(parts) if span.low < rows]
    small = rows <= SMALL_COMPACT_ROWS

    def chunks(start: int, stop: int) -> Iterator[pa.Table]:
        """The output's rows for input positions [start, stop), a range at a time."""
        for low in range(start, stop, COMPACT_CHUNK_ROWS):
            high = min(low + COMPACT_CHUNK_ROWS, stop)
            holding = [span for span in spans if span.low < high and span.high >= low]
            if holding:
                table = _latest_rows_in_python(holding, schema, low, high) if small else None
                if table is None:  # not small, or a part needs a cast: Arrow's kernels
                    table = _latest_rows(holding, schema, low, high)
                if table.num_rows:
                    yield table

    written = 0
    with _atomic_output(output) as tmp:
        if file_rows is None or rows <= file_rows:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as out:
                for table in chunks(0, rows):
                    out.write_table(table)
                    written += table.num_rows
            return written
        tmp.mkdir()
        # file k holds input positions [k * file_rows, (k + 1) * file_rows): every file is
        # full but the last, and the files' name order is the input order
        for number, start in enumerate(range(0, rows, file_rows)):
            path = _output_file_path(tmp, number)
            with pq.ParquetWriter(path, schema, compression="zstd") as out:
                for table in chunks(start, min(start + file_rows, rows)):
                    out.write_table(table)
                    written += table.num_rows
            _fsync(path)
        _fsync(tmp)
    return written


@dataclass(frozen=True, slots=True)
class _PartSpan:
    """A part file, its number, and the lowest and highest input position it holds."""

    path: Path
    segment: int
    low: int
    high: int


def _part_spans(parts: list[Path]) -> list[_PartSpan]:
    """The span of each part that holds rows."""
    # the footers are not kept for the reads: they add up over a big run's parts
    spans = []
    for path in parts:
        positions = _index_bounds(path)
        if positions:
            spans.append(_PartSpan(path, segment_number(path), min(positions), max(positions)))
    return spans


def _index_bounds(path: Path) -> list[int]:
    """The lowest and highest input position of each row group of a part, from the
    statistics in its footer; all its positions when a writer left no statistics."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    bounds = []
    for number in range(meta.num_row_groups):
        group = meta.row_group(number)
        columns = (group.column(i) for i in range(group.num_columns))
        stats = next((c.statistics for c in columns if c.path_in_schema == INDEX_COLUMN), None)
        if stats is None or not stats.has_min_max:
            return list(pq.read_table(path, columns=[INDEX_COLUMN])[INDEX_COLUMN].to_pylist())
        bounds += [stats.min, stats.max]
    return bounds


def _latest_rows(holding: list[_PartSpan], schema: pa.Schema, low: int, high: int) -> pa.Table:
    """The output's rows for input positions [low, high): each position's latest row, in
    input order, cast to the output's types.

    Parts written by a `--limit` run may hold narrower types than the whole input has (a
    carried column null in the first rows, ints before floats, ids that later turn mixed):
    each part is cast to the output's types before they meet. The latest row is the one of
    the highest part number, and within a part the last (a row's paid answers are
    journaled before its final row, in the same segment).
    """
    import pyarrow as pa

    wanted = schema.append(pa.field(INDEX_COLUMN, pa.int64(), nullable=False))
    tables = []
    for span in holding:
        table = read_part(span.path, wanted)
        index = table[INDEX_COLUMN]
        if span.low < low or span.high >= high:
            within = _kernel(
                "and",
                _kernel("greater_equal", index, pa.scalar(low, pa.int64())),
                _kernel("less", index, pa.scalar(high, pa.int64())),
            )
            table = _kernel("filter", table, within)
        segment = pa.array([span.segment] * table.num_rows, pa.int64())
        tables.append(table.append_column("_segment", segment))
    table = pa.concat_tables(tables)
    # a stable sort: rows of one position stay in segment order, and in file order within one
    order = _kernels().SortOptions([(INDEX_COLUMN, "ascending"), ("_segment", "ascending")])
    table = _kernel("take", table, _kernel("sort_indices", table, options=order))
    positions = table[INDEX_COLUMN].to_pylist()
    last = [i for i, here in enumerate(positions[:-1]) if here != positions[i + 1]]
    if positions:
        last.append(len(positions) - 1)
    picked = _kernel("take", table, pa.array(last, pa.int64()))
    return _cast(picked.select(schema.names), schema)


def _python_exact(kind: pa.DataType) -> bool:
    """Whether a column of this type comes back unchanged from Python values: the types
    results and JSONL inputs have (timestamps to the microsecond, as `datetime` holds them);
    a Parquet input's other types (nanoseconds, decimals, nested) go through the kernels."""
    import pyarrow as pa

    types = pa.types
    if types.is_timestamp(kind):
        return bool(kind.unit != "ns" and kind.tz in (None, "UTC"))
    return bool(
        types.is_null(kind)
        or types.is_boolean(kind)
        or types.is_integer(kind)
        or types.is_float32(kind)
        or types.is_float64(kind)
        or types.is_string(kind)
        or types.is_large_string(kind)
        or types.is_binary(kind)
        or types.is_large_binary(kind)
        or types.is_date32(kind)
    )


def _latest_rows_in_python(
    holding: list[_PartSpan], schema: pa.Schema, low: int, high: int
) -> pa.Table | None:
    """`_latest_rows` for a small output, without Arrow's kernels (issue 12): the rows are
    picked as Python values and built into the output's columns, so a small run never
    imports pyarrow.compute.

    It applies when every column's type comes back exactly from Python values
    (`_python_exact`) and every part already has the output's types; otherwise (a part of a
    narrower `--limit` run, which needs a cast) it returns None and the caller takes
    `_latest_rows`. The latest row wins as there: of the highest part, and within a part the
    last.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not all(_python_exact(field.type) for field in schema):
        return None
    parts: list[dict[str, list[Any]]] = []
    latest: dict[int, tuple[int, int]] = {}  # position -> (part, row), the later overwriting
    for number, span in enumerate(holding):
        file = pq.ParquetFile(span.path)
        present = file.schema_arrow
        names = [name for name in schema.names if name in present.names]
        if any(present.field(name).type != schema.field(name).type for name in names):
            return None
        columns = file.read(columns=[*names, INDEX_COLUMN], use_threads=False).to_pydict()
        positions = columns.pop(INDEX_COLUMN)
        for name in schema.names:  # a column the part lacks (written before it was added)
            columns.setdefault(name, [None] * len(positions))
        for row, position in enumerate(positions):
            if low <= position < high:
                latest[position] = (number, row)
        parts.append(columns)
    picks = [latest[position] for position in sorted(latest)]
    arrays = []
    for field in schema:
        values = [part[field.name] for part in parts]
        arrays.append(pa.array([values[part][row] for part, row in picks], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def _atomic_output(output: Path) -> Iterator[Path]:
    """A temporary path, `.OUTPUT.tmp-PID`, for the block to write a file or a directory at;
    when the block ends without an error it replaces `output`, whichever shape either has.

    A file over a file is one rename. Otherwise the old output is first renamed aside (to
    `.OUTPUT.tmp-PID.old`) and removed after: a kill in between leaves no output but the
    checkpoint, which is only discarded after compaction, so the next run compacts again.
    `Checkpoint.recover` clears whatever `.OUTPUT.tmp-*` a kill left.
    """
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        if tmp.is_file() and not output.is_dir():
            os.replace(tmp, output)
        else:
            old = tmp.with_name(tmp.name + ".old")
            if output.exists():
                os.replace(output, old)
            os.replace(tmp, output)
            remove_output(old)
    except BaseException:
        remove_output(tmp)
        raise
    _fsync(output.parent)
