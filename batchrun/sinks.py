"""The output schema (defined here and nowhere else), Parquet part files, and compaction.

Results are written as they complete into `OUTPUT.parts/part-NNNNNN.parquet`, each file
written under a temporary name, fsynced and renamed, so a killed run leaves only whole parts.
When every row has a result, the parts are compacted into OUTPUT in input order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

#: internal columns kept in part files only: input position, for ordering and resume
INDEX_COLUMN = "_index"


def _result_fields() -> list[tuple[str, pa.DataType]]:
    import pyarrow as pa

    return [
        ("status", pa.string()),
        ("content", pa.large_string()),
        ("reasoning_content", pa.large_string()),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("prompt_cache_hit_tokens", pa.int64()),
        ("prompt_cache_miss_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("http_status", pa.int32()),
        ("error", pa.string()),
        ("response_id", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("error_class", pa.string()),
        ("cost_usd", pa.float64()),
    ]


def output_schema(carried: dict[str, pa.DataType]) -> pa.Schema:
    """The output file's schema: `id`, the carried input columns, then the result columns."""
    import pyarrow as pa

    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(name, kind) for name, kind in carried.items() if name != "id"]
    fields += [pa.field(name, kind) for name, kind in _result_fields()]
    return pa.schema(fields)


def part_schema(carried: dict[str, pa.DataType]) -> pa.Schema:
    """The schema of part files: the output's plus the input position."""
    import pyarrow as pa

    return output_schema(carried).append(pa.field(INDEX_COLUMN, pa.int64(), nullable=False))


def parts_dir(output: Path) -> Path:
    """Where a run keeps its results until the output file is complete."""
    return output.with_name(output.name + ".parts")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, fsync it, rename it into place."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as file:
        pq.write_table(table, file, compression="zstd")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _carried_value(value: Any, kind: pa.DataType) -> Any:
    import pyarrow as pa

    if value is None or not pa.types.is_large_string(kind) or isinstance(value, str):
        return value
    import orjson

    return orjson.dumps(value).decode()  # nested or mixed values travel as JSON text


class PartWriter:
    """Buffers result rows and writes them out as numbered part files.

    `add` is cheap and never blocks; `take` hands the buffer over so that the caller can
    write it in a worker thread with `write_part`.
    """

    def __init__(self, directory: Path, *, carried: dict[str, pa.DataType]) -> None:
        self.directory = directory
        self.schema = part_schema(carried)
        self._carried = carried
        self._json_carried = {
            name: kind for name, kind in carried.items() if str(kind) == "large_string"
        }
        self._rows: list[dict[str, Any]] = []
        self._next = _next_part_number(directory)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: dict[str, Any]) -> None:
        for name, kind in self._json_carried.items():
            row[name] = _carried_value(row.get(name), kind)
        self._rows.append(row)

    def take(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """The buffered rows and the path to write them to, or None if there are none."""
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        path = self.directory / f"part-{self._next:06d}.parquet"
        self._next += 1
        return path, rows

    def write_part(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """Write one part file (blocking: call it in a worker thread)."""
        import pyarrow as pa

        table = pa.Table.from_pylist(rows, schema=self.schema)
        write_atomically(table, path)


def _next_part_number(directory: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in list_parts(directory)]
    return max(numbers, default=0) + 1


def list_parts(directory: Path) -> list[Path]:
    """The whole part files in a checkpoint, oldest first; temporary leftovers are ignored."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("part-*.parquet") if p.stem.split("-")[1].isdigit())


def scan_parts(directory: Path) -> Any:
    """A polars LazyFrame over all part files with a `_part` column naming each row's file,
    or None when there are none."""
    import polars as pl

    parts = list_parts(directory)
    if not parts:
        return None
    return pl.scan_parquet(parts, include_file_paths="_part")


def latest_results(frame: Any) -> Any:
    """One row per input position: the latest result written for it, in input order."""
    return frame.sort([INDEX_COLUMN, "_part"]).unique(
        subset=[INDEX_COLUMN], keep="last", maintain_order=True
    )


def compact(directory: Path, output: Path, *, schema: pa.Schema, rows: int) -> int:
    """Fold the results for the first `rows` input rows into the output file, in input
    order, written atomically. Returns the number of rows written."""
    import polars as pl

    frame = scan_parts(directory)
    if frame is None:
        return 0
    table = (
        latest_results(frame.filter(pl.col(INDEX_COLUMN) < rows))
        .select(schema.names)
        .collect()
        .to_arrow()
    )
    write_atomically(table.cast(schema), output)
    return int(table.num_rows)
