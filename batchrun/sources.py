"""Streaming readers for prompt sets: JSONL (plain or OpenAI Batch API lines) and Parquet.

Rows come out in batches and are never all held in memory. `scan_input` makes one fast pass
before any request is sent: every row must build a request, ids must be unique, and the
carried columns' types are settled, so a bad row stops the run before anything is paid for.
Beside it, the whole file is hashed (`input_identity`), so that a checkpoint is never resumed
against an input edited since.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from batchrun.errors import ConfigError, InputError
from batchrun.job import Job
from batchrun.prompts import (
    RequestShape,
    RowProblem,
    Variant,
    build_request,
    expand_sweep,
    is_batch_line,
)

#: a UTF-8 byte-order mark, which spreadsheet exports put before the first line
_BOM = b"\xef\xbb\xbf"

if TYPE_CHECKING:
    import pyarrow as pa

Format = Literal["jsonl", "parquet"]
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
BATCH_SIZE = 2048


@dataclass(slots=True)
class InputRow:
    """One input row and where it came from."""

    index: int  # 0-based position among the rows
    line: int | None  # 1-based line number, for JSONL
    data: dict[str, Any]

    def where(self, path: Path, message: str, column: str | None = None) -> InputError:
        """An InputError that names this row."""
        if self.line is not None:
            return InputError(message, path=path, line=self.line, column=column)
        return InputError(message, path=path, row=self.index + 1, column=column)


def detect_format(path: Path) -> Format:
    """The input format, from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    if suffixes and suffixes[-1] in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise InputError(
        "unknown input format: use a .jsonl (or .ndjson) or a .parquet file", path=path
    )


#: "are rows [start, end) all done already?": such a batch is counted but not parsed
SkipRows = Callable[[int, int], bool]


def _parse_lines(
    path: Path, start: int, numbers: Sequence[int], lines: list[bytes]
) -> list[InputRow]:
    """The rows of `lines` (JSON objects), the first at input position `start`; `numbers`
    are their line numbers in the file. Each row is parsed in C (`map`), not in a Python
    loop; a bad line is then looked for one by one, to name it."""
    try:
        values = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        values = []
    if len(values) != len(lines) or set(map(type, values)) != {dict}:
        for line_no, line in zip(numbers, lines, strict=True):
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"not valid JSON ({exc})", path=path, line=line_no) from None
            if not isinstance(data, dict):
                raise InputError("each line must be a JSON object", path=path, line=line_no)
    return list(map(InputRow, range(start, start + len(lines)), numbers, values))


@dataclass(frozen=True)
class RowStart:
    """Where input row `row` begins in its file, to read from there (`--engine ray`'s
    shards): at byte `offset` on line `line` of a JSONL file, or in Parquet row group
    `row_group` (which may begin a few rows earlier: those are counted as skipped)."""

    row: int
    offset: int = 0
    line: int = 1
    row_group: int = 0
    #: the row reading begins with: `row`, or the first row of `row_group`
    read_from: int = 0


def row_group_starts(path: Path) -> list[int] | None:
    """The first input row of each Parquet row group, or None for a JSONL file."""
    if detect_format(path) != "parquet":
        return None
    metadata = _open_parquet(path).metadata
    starts, first = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(first)
        first += metadata.row_group(group).num_rows
    return starts


def locate_rows(path: Path, rows: list[int]) -> list[RowStart]:
    """Where each of `rows` (ascending) begins, in one pass over a JSONL file or from a
    Parquet file's footer. Rows past the end are left out."""
    starts = row_group_starts(path)
    if starts is not None:
        first = _open_parquet(path).metadata.num_rows
        found = []
        for row in rows:
            if row < first:
                group = max(g for g, begins in enumerate(starts) if begins <= row)
                found.append(RowStart(row, row_group=group, read_from=starts[group]))
        return found
    wanted = iter(rows)
    found, target = [], next(wanted, None)
    index = offset = 0
    with path.open("rb") as file:
        for line_no, line in enumerate(file, start=1):
            if line.strip() and not (line_no == 1 and line.strip() == _BOM):
                while target is not None and target <= index:
                    found.append(RowStart(target, offset=offset, line=line_no, read_from=target))
                    target = next(wanted, None)
                index += 1
            offset += len(line)
    return found


def _iter_jsonl(
    path: Path, batch_size: int, skip: SkipRows | None, start: RowStart | None = None
) -> Iterator[list[InputRow] | int]:
    """Batches of at most `batch_size` rows, read `batch_size` lines at a time (`islice`: the
    lines are split and gathered in C, the scan and the pool each read every line). A chunk
    with blank lines (rare: looked for in C) drops them, each line keeping its number."""
    try:
        file = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})", path=path) from None
    index = start.read_from if start else 0
    line_no = start.line if start else 1  # the number of the next line read
    with file:
        if start is not None:
            file.seek(start.offset)
        while lines := list(islice(file, batch_size)):
            numbers: Sequence[int] = range(line_no, line_no + len(lines))
            line_no += len(lines)
            if numbers[0] == 1 and lines[0].startswith(_BOM):
                lines[0] = lines[0][len(_BOM) :]
            if not lines[0] or any(map(bytes.isspace, lines)):
                kept = [(n, line) for n, line in zip(numbers, lines, strict=True) if line.strip()]
                numbers, lines = [n for n, _ in kept], [line for _, line in kept]
            if lines:
                yield _batch(path, index, numbers, lines, skip)
                index += len(lines)


def _batch(
    path: Path, start: int, numbers: Sequence[int], lines: list[bytes], skip: SkipRows | None
) -> list[InputRow] | int:
    if skip is not None and skip(start, start + len(lines)):
        return len(lines)
    return _parse_lines(path, start, numbers, lines)


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq  # lazy import: pyarrow adds ~160 ms to start-up

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"not a readable Parquet file ({exc})", path=path) from None


def _iter_parquet(
    path: Path, batch_size: int, skip: SkipRows | None, start: RowStart | None = None
) -> Iterator[list[InputRow] | int]:
    file = _open_parquet(path)
    index = start.read_from if start else 0
    groups = range(start.row_group if start else 0, file.metadata.num_row_groups)
    try:
        for record_batch in file.iter_batches(batch_size=batch_size, row_groups=groups):
            count = record_batch.num_rows
            if skip is not None and skip(index, index + count):
                yield count
            else:
                rows = record_batch.to_pylist()
                yield [InputRow(index + i, None, data) for i, data in enumerate(rows)]
            index += count
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable Parquet file ({exc})", path=path) from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("no such file", path=path)
    if not path.is_file():
        raise InputError("not a file", path=path)


def iter_batches(
    path: Path,
    *,
    batch_size: int = BATCH_SIZE,
    limit: int | None = None,
    skip: SkipRows | None = None,
    start: RowStart | None = None,
) -> Iterator[list[InputRow]]:
    """Stream a prompt set as batches of rows, stopping after `limit` rows if given.

    Args:
        skip: says which batches are all done already (on resume); those are counted but
            not parsed, and not yielded.
        start: read from there (`locate_rows`) rather than from the first row; `limit`
            still counts from the first row.
    """
    _check_file(path)
    reader = _iter_parquet if detect_format(path) == "parquet" else _iter_jsonl
    seen = start.read_from if start else 0
    for item in reader(path, batch_size, skip, start):
        count = item if isinstance(item, int) else len(item)
        if limit is not None and seen + count >= limit:
            if not isinstance(item, int):
                yield item[: limit - seen]
            return
        seen += count
        if not isinstance(item, int):
            yield item


@dataclass(frozen=True, slots=True)
class RowIds:
    """Where each row's id comes from, and the type it keeps in the output.

    A batch line's id is its custom_id; any other row's is its value in `column`, or its
    position (as text, "0", "1", ...) when there is no column.
    """

    column: str | None
    #: whether the ids are written as text: yes unless every id is a whole number
    as_text: bool = True

    @classmethod
    def choose(cls, setting: str | Literal[False] | None, first: dict[str, Any]) -> RowIds:
        """The id source for a job's `id_column` setting; `first` is the input's first row.

        Precedence: the named column, then a column named `id`, then `custom_id`, then the
        position; `False` forces the position.
        """
        if setting is False:
            return cls(None)
        if setting is not None:
            return cls(setting)
        for name in ("id", "custom_id"):
            if name in first:
                return cls(name)
        return cls(None)

    def value(self, row: InputRow, path: Path) -> Any:
        """The row's id as its own type (a scalar). Raises InputError if it has none."""
        data = row.data
        if is_batch_line(data):
            column = "custom_id"
        elif self.column is None:
            return str(row.index)
        else:
            column = self.column
        value = data.get(column)
        if value is None:
            raise row.where(
                path,
                "the id column is missing or null: give every row an id, or set id_column = "
                "false (--id-column '') to number the rows by position",
                column=column,
            )
        # a tuple, not `dict | list`, which would build a union type on each call (a row's)
        if isinstance(value, (dict, list)):
            raise row.where(path, "an id must be a single value, not a list or object", column)
        return value

    def text(self, row: InputRow, path: Path) -> str:
        """The row's id as text (for logs and duplicate checks)."""
        return str(self.value(row, path))

    def output_value(self, row: InputRow, path: Path) -> Any:
        """The row's id as the output's `id` column holds it."""
        value = self.value(row, path)
        return str(value) if self.as_text else value

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.string() if self.as_text else pa.int64()


def input_identity(path: Path, *, cancel: threading.Event | None = None) -> dict[str, Any]:
    """The input's name, size and a hash of all its bytes: any edit changes it.

    SHA-256 over 8 MiB reads: OpenSSL's uses the CPU's SHA instructions, about 1 GB/s here
    (blake2b: 0.57 GB/s), so 0.06 s for a 1M-row, 56 MB JSONL file whose scan takes 5 s.
    `scan_input` runs it in a thread beside its own pass and hands the result on in its
    `InputSummary`, so the checkpoint's check costs nothing more.
    """
    stat = path.stat()
    digest = hashlib.sha256()
    buffer = bytearray(min(8 << 20, max(stat.st_size, 1 << 16)))  # a small file, a small buffer
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while read := file.readinto(buffer):
            digest.update(view[:read])
            if cancel is not None and cancel.is_set():
                return {}  # nobody waits for it any more
    return {"name": path.name, "size": stat.st_size, "sha256": digest.hexdigest()}


@dataclass
class InputSummary:
    """What the scan learnt about a prompt set."""

    #: results the job makes: input rows times sweep combinations
    rows: int
    batch_format: bool
    #: `id` and its type first, then carried column -> Arrow type, in the job's order, then
    #: the job's own columns (sweep variant and values, parsed fields)
    carried_types: dict[str, pa.DataType] = field(default_factory=dict)
    #: requests per input row (a sweep's combinations)
    variants: int = 1
    #: every model the requests name (job, sweep, row columns, batch line bodies)
    models: set[str] = field(default_factory=set)
    #: where row ids come from, and their type
    ids: RowIds = field(default_factory=lambda: RowIds(None))
    #: the input's name, size and whole-file hash (`input_identity`)
    identity: dict[str, Any] = field(default_factory=dict)


def _arrow_type_of(values: set[type]) -> pa.DataType:
    import pyarrow as pa

    values.discard(type(None))
    if not values:
        return pa.string()
    if values <= {bool}:
        return pa.bool_()
    if values <= {int}:
        return pa.int64()
    if values <= {int, float}:
        return pa.float64()
    if values <= {str}:
        return pa.string()
    return pa.large_string()  # mixed or nested: carried as JSON text


def scan_input(job: Job) -> InputSummary:
    """Check every row of the input before anything is sent, and count the rows.

    Raises:
        InputError: naming the file, the line or row, and the column.
    """

    path = job.input
    variants = expand_sweep(job.sweep)
    try:
        shapes = [RequestShape.from_job(job, variant.settings) for variant in variants]
    except RowProblem as exc:  # a bad template is the job's fault, but name the input
        raise InputError(str(exc), path=path) from None
    _check_file(path)
    detect_format(path)
    identity: dict[str, Any] = {}
    cancel = threading.Event()

    def hash_input() -> None:
        with contextlib.suppress(OSError):  # then asked again below, where it is raised
            identity.update(input_identity(path, cancel=cancel))

    hasher = threading.Thread(target=hash_input, name="input-hash", daemon=True)
    hasher.start()
    try:
        summary = _scan(job, path, variants, shapes)
    except BaseException:
        cancel.set()  # a bad row (or Ctrl-C) is reported now, not after hashing a big file
        raise
    finally:
        hasher.join()
    if not identity:  # the thread failed (an unreadable file): say so from here
        identity = input_identity(path)
    summary.identity = identity
    return summary


def _scan(
    job: Job, path: Path, variants: list[Variant], shapes: list[RequestShape]
) -> InputSummary:
    ids: RowIds | None = None
    id_types: set[type] = set()
    carry = job.prompt.carry
    seen_types: dict[str, set[type]] = {name: set() for name in carry}
    seen_columns: set[str] = set()
    # ids are checked for duplicates by 64-bit hash (8 bytes a row, whatever the ids); only
    # when two hashes meet does a second pass find the rows
    hashes = array.array("q")
    models: set[str] = set()
    rows = 0
    batch_format = False
    for batch in iter_batches(path, limit=job.limit):
        for row in batch:
            data = row.data
            try:
                for shape in shapes:
                    body = build_request(data, shape)
                    if len(models) < 1000:  # a cap, in case every row names its own
                        models.add(str(body.get("model")))
            except RowProblem as exc:
                raise row.where(path, str(exc), column=exc.column) from None
            if ids is None:
                ids = RowIds.choose(job.prompt.id_column, data)
            rid = ids.value(row, path)
            # an int64 column cannot hold an id past 2**63: such ids make the ids text
            id_types.add(
                type(rid) if type(rid) is not int or _INT64_MIN <= rid <= _INT64_MAX else str
            )
            hashes.append(hash(str(rid)))
            for name in carry:
                seen_types[name].add(type(data.get(name)))
            if rows == 0:
                batch_format = is_batch_line(data)
                if batch_format and job.sweep:
                    raise ConfigError(
                        "a sweep cannot vary OpenAI batch lines, whose bodies are sent as "
                        "they are: drop the [sweep] table or convert the input",
                        path=job.source,
                    )
            if len(seen_columns) < 10_000:  # a cap, in case every row has its own keys
                seen_columns.update(data)
            rows += 1
    if rows == 0:
        raise InputError("the input has no rows", path=path)
    missing = [name for name in carry if name not in seen_columns]
    if missing:
        raise InputError(
            f"carried column {missing[0]!r} is not in the input "
            f"(columns: {', '.join(sorted(seen_columns))})",
            path=path,
            column=missing[0],
        )
    named = [] if batch_format else [job.prompt.system_column, *job.prompt.row_params]
    absent = [name for name in named if name is not None and name not in seen_columns]
    if absent and len(seen_columns) < 10_000:
        # a column the job takes request values from that no row has is a typo, not a choice:
        # the run would go without the system prompt or parameters the user asked for
        key = "system_column" if absent[0] == job.prompt.system_column else "row_params"
        raise InputError(
            f"{key} names column {absent[0]!r}, which no row has "
            f"(columns: {', '.join(sorted(seen_columns))})",
            path=path,
            column=absent[0],
        )
    assert ids is not None  # there is a row
    if ids.column is not None and id_types == {int}:
        ids = RowIds(ids.column, as_text=False)
    _check_unique_ids(job, hashes, ids)
    _check_carried_id(job, ids)
    carried_types = {"id": ids.arrow_type()}
    carried_types.update(_carried_types(job, seen_types))
    carried_types.update(_job_column_types(job, variants, carried_types))
    return InputSummary(
        rows=rows * len(variants),
        batch_format=batch_format,
        carried_types=carried_types,
        variants=len(variants),
        models=models,
        ids=ids,
    )


def _reserved() -> frozenset[str]:
    from batchrun.sinks import result_column_names

    return frozenset({"id", "variant", *result_column_names()})


def _job_column_types(
    job: Job, variants: list[Variant], taken: dict[str, pa.DataType]
) -> dict[str, pa.DataType]:
    """Columns the job itself adds beside the carried ones: the sweep's and parsed fields."""
    import pyarrow as pa

    from batchrun.structured import arrow_type

    reserved = _reserved() - {"id"}  # carrying `id` is checked with the ids
    for name in job.prompt.carry:
        if name in reserved or name.startswith(("_", "sweep_")):
            raise ConfigError(
                f"carried column {name!r} has the name of an output column batchrun writes: "
                "rename it in the input, or leave it out of carry",
                path=job.source,
            )
    columns: dict[str, pa.DataType] = {}
    if job.sweep:
        columns["variant"] = pa.string()
        for key in (k for k in job.sweep if k != "repeat"):
            columns[f"sweep_{key}"] = _arrow_type_of({type(v) for v in job.sweep[key]})
        if variants[0].repeats > 1:
            columns["sweep_repeat"] = pa.int64()
    if job.parse is not None:
        for name, column in job.parse.reference.items():
            if name not in job.parse.fields or column not in job.prompt.carry:
                raise ConfigError(
                    f"parse.reference maps {name!r} to {column!r}: it must map a parsed field "
                    "to a carried column (add it to carry), so that the output can be scored",
                    path=job.source,
                )
        for name, kind in job.parse.fields.items():
            if name in taken or name in columns or name in reserved or name.startswith("_"):
                raise ConfigError(
                    f"parsed field {name!r} would clash with an output column of that name: "
                    "rename the field or the carried column",
                    path=job.source,
                )
            columns[name] = arrow_type(kind)
    return columns


def _check_carried_id(job: Job, ids: RowIds) -> None:
    """Carrying a column named `id` is carrying the ids, unless they come from elsewhere."""
    if "id" not in job.prompt.carry or ids.column == "id":
        return
    source = f"column {ids.column!r}" if ids.column else "the row positions"
    raise ConfigError(
        f"carried column 'id' would clash with the output's id column, which holds {source}: "
        "leave 'id' out of carry, or set id_column = \"id\"",
        path=job.source,
    )


def _carried_types(job: Job, seen_types: dict[str, set[type]]) -> dict[str, pa.DataType]:
    carry = [name for name in job.prompt.carry if name != "id"]  # the id column has its own
    if detect_format(job.input) == "parquet" and carry:
        schema = _open_parquet(job.input).schema_arrow
        return {name: schema.field(name).type for name in carry}
    return {name: _arrow_type_of(seen_types[name]) for name in carry}


#: up to this many rows, repeated id hashes are found with a Python set (about 5 MB here)
#: rather than by sorting with polars, whose import alone costs a small run 0.2 s
SMALL_ID_CHECK_ROWS = 100_000


def _repeated_hashes(hashes: array.array[int]) -> set[int]:
    """The hashes that occur more than once.

    Sorting finds them in a few MB where a hash table would take a hundred for a million
    rows; a small input takes the hash table.
    """
    if len(hashes) <= SMALL_ID_CHECK_ROWS:
        seen: set[int] = set()
        repeated: set[int] = set()
        for value in hashes:
            if value in seen:
                repeated.add(value)
            seen.add(value)
        return repeated
    import polars as pl
    import pyarrow as pa

    values = pa.Array.from_buffers(pa.int64(), len(hashes), [None, pa.py_buffer(hashes)])
    ordered = pl.Series(values).sort()
    same = ordered.slice(1) == ordered.slice(0, len(ordered) - 1)
    if not same.any():
        return set()
    return set(ordered.slice(1).filter(same).to_list())


def _check_unique_ids(job: Job, hashes: array.array[int], ids: RowIds) -> None:
    """Raise if two rows share an id, naming both; `hashes` holds each row's id hash."""
    suspects = _repeated_hashes(hashes)
    if not suspects:
        return
    path = job.input
    unit = "lines" if detect_format(path) == "jsonl" else "rows"
    first_seen: dict[str, int] = {}
    for batch in iter_batches(path, limit=job.limit):
        for row in batch:
            rid = ids.text(row, path)
            if hash(rid) not in suspects:
                continue
            place = row.line if row.line is not None else row.index + 1
            if rid in first_seen:
                raise InputError(
                    f"duplicate id {rid!r} in {unit} {first_seen[rid]} and {place}", path=path
                )
            first_seen[rid] = place
    # only hash collisions: the ids are unique after all
