"""`batchrun export`: an output file as OpenAI Batch API output lines, flat JSONL, or CSV.

The output is read one record batch at a time, so a file of millions of rows exports in the
memory of a few thousand.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import orjson

from batchrun.errors import ConfigError
from batchrun.results import Results, open_results

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS: Final = ("openai-batch", "jsonl", "csv")
#: rows per record batch read from the output: bounds memory, amortises the per-batch work
BATCH_ROWS: Final = 1000
#: columns an openai-batch line cannot be built without
_BATCH_REQUIRED: Final = ("id", "status")
_USAGE_FIELDS: Final = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
)
_JSON_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
#: time zone names that are UTC, written as `Z`
_UTC_NAMES: Final = frozenset({"UTC", "Etc/UTC", "+00:00", "Z"})


def export_output(
    output: Path | Results, sink: IO[bytes], *, fmt: str, batch_rows: int = BATCH_ROWS
) -> int:
    """Write every row of `output` to `sink` in `fmt`; return how many rows were written.

    Args:
        output: a batchrun output (a Parquet file, or a directory of them; its checkpoint
            when the job is not finished), or what `results.open_results` gave for it.
        sink: a binary stream, written batch by batch.
        fmt: one of FORMATS.

    Raises:
        ConfigError: `output` is missing, is not Parquet, or lacks a column `fmt` needs.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    results = output if isinstance(output, Results) else open_results(output)
    output, schema = results.output, results.schema
    names = schema.names
    if fmt == "openai-batch":
        missing = [name for name in _BATCH_REQUIRED if name not in names]
        if missing:
            raise ConfigError(f"not a batchrun output (no {missing[0]!r} column)", path=output)
    rows = 0
    for batch in results.iter_batches(batch_rows):
        if fmt == "csv":
            sink.write(_csv_bytes(_iso_timestamps(batch), header=rows == 0))
        elif fmt == "jsonl":
            records = _iso_timestamps(batch).to_pylist()
            sink.write(b"".join(_flat_line(record) for record in records))
        else:
            records = batch.to_pylist()
            sink.write(b"".join(_batch_line(r, rows + i + 1) for i, r in enumerate(records)))
        rows += batch.num_rows
    if fmt == "csv" and rows == 0:  # an empty output still gets its header
        import pyarrow as pa

        sink.write(_csv_bytes(pa.RecordBatch.from_pylist([], schema=schema), header=True))
    return rows


def export_to_file(output: Path | Results, destination: Path, *, fmt: str) -> int:
    """`export_output` into `destination`, replaced only once the export is complete.

    Raises:
        ConfigError: as `export_output`, or `destination` is `output` itself.
    """
    source = output.output if isinstance(output, Results) else output
    if destination.resolve() == source.resolve():
        raise ConfigError("refusing to export a file onto itself", path=destination)
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as sink:
            rows = export_output(output, sink, fmt=fmt)
        os.replace(tmp, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return rows


def _batch_line(row: dict[str, Any], number: int) -> bytes:
    """One OpenAI Batch API output line rebuilt from an output row."""
    status = row.get("http_status")
    message = row.get("error") or row.get("error_class") or "unknown error"
    response: dict[str, Any] | None
    error: dict[str, Any] | None = None
    if row["status"] == "ok":
        response = {
            # a row answered by the server has its status; 200 is what an ok answer means
            "status_code": status if status is not None else 200,
            "request_id": row.get("response_id"),
            "body": _completion(row),
        }
    elif status is not None and status >= 300:
        response = {
            "status_code": status,
            "request_id": row.get("response_id"),
            "body": {"error": {"message": message, "type": row.get("error_class")}},
        }
    else:
        # no HTTP answer (network, timeout), or a 200 that held no usable completion (blank
        # or broken body, unparseable content): readers of this format take a 200 to mean
        # the body is a chat.completion, so these are failures without a response
        response = None
        error = {"code": row.get("error_class"), "message": message}
    line: dict[str, Any] = {
        "id": f"batch_req_{number}",
        "custom_id": str(row["id"]),  # the user's id; the format wants text
        "response": response,
        "error": error,
    }
    if "variant" in row:  # a sweep repeats each custom_id once per variant: say which
        line["variant"] = row["variant"]
    return orjson.dumps(line, option=_JSON_OPTIONS)


def _completion(row: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion object an ok row was made from (as far as the row records it)."""
    usage = {name: row[name] for name in _USAGE_FIELDS if row.get(name) is not None}
    if row.get("reasoning_tokens") is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": row["reasoning_tokens"]}
    return {
        "id": row.get("response_id"),
        "object": "chat.completion",
        "created": _epoch_seconds(row.get("finished_at")),
        "model": row.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": row.get("content"),
                    "reasoning_content": row.get("reasoning_content"),
                },
                "finish_reason": row.get("finish_reason"),
            }
        ],
        "usage": usage,
    }


def _epoch_seconds(value: Any) -> int | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _flat_line(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=_json_default, option=_JSON_OPTIONS)


def _json_default(value: Any) -> Any:
    """JSON for the carried-column values orjson leaves to us."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _iso_timestamps(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with its timestamp columns as ISO 8601 text with `T`, in the column's own
    unit and zone (UTC as `Z`, a naive column without one): how CSV and JSONL both write
    them, so the two exports agree."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column in batch.columns:
        kind = column.type
        if pa.types.is_timestamp(kind):
            zone = "" if kind.tz is None else "Z" if kind.tz in _UTC_NAMES else "%Ez"
            column = pc.strftime(column, format="%Y-%m-%dT%H:%M:%S" + zone)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _csv_bytes(batch: pa.RecordBatch, *, header: bool) -> bytes:
    import pyarrow.csv as pcsv

    buffer = io.BytesIO()
    options = pcsv.WriteOptions(include_header=header)
    pcsv.write_csv(_csv_ready(batch), buffer, write_options=options)
    return buffer.getvalue()


def _csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with nested columns (lists, structs, maps), which CSV cannot hold, as JSON."""
    import pyarrow as pa

    columns = []
    for column in batch.columns:
        kind = column.type
        if pa.types.is_nested(kind):
            texts = [
                None if value is None else orjson.dumps(value, default=_json_default).decode()
                for value in column.to_pylist()
            ]
            column = pa.array(texts, type=pa.large_string())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)
