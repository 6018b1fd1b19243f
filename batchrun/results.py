"""What an output holds, finished or not: the one reader behind `report`, `export` and `status`.

A finished job is its output (a Parquet file, or a directory of them). A job whose output is
not written (stopped by Ctrl-C, no balance, a kill; or still running) is its checkpoint: the
part files and journal segments in OUTPUT.parts/ and its shard folders (`--engine ray`),
the latest result of each input position, in input order. Nothing here writes: a run may
be using the checkpoint at the same time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from batchrun.checkpoint import Checkpoint, check_parts, damaged
from batchrun.errors import ConfigError
from batchrun.sinks import (
    INDEX_COLUMN,
    PAID_BEFORE_COLUMN,
    REPORT_KEY,
    journal_table,
    keep_latest,
    list_journals,
    list_parts,
    output_files,
    part_schema,
    parts_dir,
    read_journal,
    result_column_names,
    scan_part,
    segment_number,
    shard_dirs,
)

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

#: input positions read at a time when a checkpoint is exported: bounds memory
CHUNK_POSITIONS: Final = 20_000
_INTERNAL: Final = (INDEX_COLUMN, PAID_BEFORE_COLUMN)


@dataclass(frozen=True)
class Partial:
    """How far a job whose output is not written has got.

    `describe` is how `report`, `export` and `status` all say it."""

    rows_done: int
    #: the positions the job's last run covers; None when the checkpoint does not say
    rows_total: int | None
    #: pid of a live run writing the checkpoint
    active_pid: int | None = None

    @property
    def unfinished(self) -> bool:
        """Some position of the job's last run has no result yet."""
        return self.rows_total is None or self.rows_done < self.rows_total

    def describe(self) -> str:
        """The one line saying so, e.g. `partial: 1,240 of 10,000 rows; the job is not
        finished`, and what to do."""
        total = "?" if self.rows_total is None else f"{self.rows_total:,}"
        text = f"partial: {self.rows_done:,} of {total} rows; "
        if self.active_pid is not None:
            return text + f"the job is not finished (a run is going on, pid {self.active_pid})"
        if not self.unfinished:
            return text + "every row has a result, the output is not written yet: run again"
        return text + "the job is not finished: run the same command again to resume"


@dataclass(frozen=True)
class CheckpointRows:
    """What a checkpoint holds, read as it is now."""

    checkpoint: Checkpoint
    #: every result row read (parts and journals), with INDEX_COLUMN and `_segment`; a
    #: position may have several: `keep_latest` keeps its last
    raw: pl.LazyFrame
    #: the part schema the rows are cast to
    schema: pa.Schema
    manifest: dict[str, Any]
    active_pid: int | None

    @property
    def rows_total(self) -> int | None:
        rows = self.manifest.get("rows")
        return rows if isinstance(rows, int) else None

    @property
    def limit(self) -> int | None:
        limit = self.manifest.get("limit")
        return limit if isinstance(limit, int) else None

    def latest(self) -> pl.LazyFrame:
        """One row per position done, in input order, without the internal columns."""
        return _without_internal(keep_latest(self.raw))

    def partial(self) -> Partial:
        import polars as pl

        done = self.raw.select(pl.col(INDEX_COLUMN).n_unique()).collect().item()
        return Partial(int(done or 0), self.rows_total, self.active_pid)


def has_checkpoint(output: Path) -> bool:
    """Whether OUTPUT.parts/ holds a manifest or results."""
    checkpoint = Checkpoint(output)
    directory = checkpoint.directory
    return directory.is_dir() and bool(
        checkpoint.exists() or list_parts(directory) or list_journals(directory)
    )


def read_checkpoint(output: Path, *, columns: Sequence[str] | None = None) -> CheckpointRows:
    """The rows in `output`'s checkpoint (only `columns`, if given, besides the position).

    Raises:
        ConfigError: the checkpoint is damaged (a part or journal that does not read, or
            results without a manifest while no run holds the lock).
        FileNotFoundError: a run finished meanwhile and removed its checkpoint.
    """
    import polars as pl

    checkpoint = Checkpoint(output)
    active_pid = checkpoint.lock_holder()
    if checkpoint.exists():
        manifest = checkpoint.read_manifest()
    elif active_pid is None:  # a run writes its manifest before any result
        raise damaged(checkpoint.manifest_path, "missing, yet results are there")
    else:
        manifest = {}
    # journals first: a segment that vanishes meanwhile has become a part, listed after
    folders = [checkpoint.directory, *shard_dirs(checkpoint.directory)]
    journalled: list[tuple[Path, list[dict[str, Any]]]] = []
    for journal in [j for folder in folders for j in list_journals(folder)]:
        try:
            rows = read_journal(journal)
        except FileNotFoundError:
            continue
        if rows:
            journalled.append((journal, rows))
    parts = list_parts(checkpoint.directory)
    schema = _rows_schema(parts, journalled)
    if columns is not None:
        wanted = [INDEX_COLUMN, *(c for c in columns if c != INDEX_COLUMN)]
        schema = _select(schema, wanted)
    target = _polars_types(schema)
    frames: list[pl.LazyFrame] = []
    for journal, rows in journalled:
        try:
            table = journal_table(rows, schema)
        except Exception as exc:  # pyarrow raises several types for a value of another type
            raise damaged(journal, f"a row does not read: {exc}") from None
        journal_frame = pl.from_arrow(table)
        assert isinstance(journal_frame, pl.DataFrame)  # a table gives a frame, not a series
        segment = pl.lit(segment_number(journal), pl.Int64).alias("_segment")
        frames.append(journal_frame.lazy().with_columns(segment))
    for path in parts:
        segment = pl.lit(segment_number(path), pl.Int64).alias("_segment")
        frames.append(scan_part(path, dict(target)).with_columns(segment))
    if frames:
        raw = pl.concat(frames)
    else:
        empty = pl.DataFrame(schema={**target, "_segment": pl.Int64})
        raw = empty.lazy()
    rows_total = manifest.get("rows")
    if isinstance(rows_total, int):
        raw = raw.filter(pl.col(INDEX_COLUMN) < rows_total)
    found = CheckpointRows(checkpoint, raw, schema, manifest, active_pid)
    try:
        found.raw.select(pl.len()).collect()  # every part opens: else name the one that does not
    except FileNotFoundError:
        raise
    except Exception:  # polars raises several types for a bad file
        check_parts(parts)
        raise
    return found


def _rows_schema(parts: list[Path], journalled: list[tuple[Path, list[dict[str, Any]]]]) -> Any:
    """The part schema every row is read as: the parts' own, widened to hold all of them (a
    `--limit` run may have written narrower types), else what the journal's values are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for part in parts:
        try:
            schemas.append(pq.read_schema(part))
        except FileNotFoundError:
            raise
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise damaged(part, f"not a readable Parquet file: {exc}") from None
    if schemas:
        try:
            # newest first: its columns' order is the one now written; a column that older
            # parts lack (added since) is null in their rows (`scan_part`)
            newest_first = schemas[::-1]
            unified = pa.unify_schemas(newest_first, promote_options="permissive")
            return unified.remove_metadata()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise damaged(parts[0].parent, f"its part files disagree on types: {exc}") from None
    rows = [row for _, segment in journalled for row in segment]
    known = set(result_column_names()) | set(_INTERNAL)
    carried: dict[str, pa.DataType] = {}
    for name in rows[0] if rows else {}:
        if name not in known:
            values = [row.get(name) for row in rows]
            carried[name] = pa.array(values).type if name != "id" else _id_type(values)
    return part_schema(carried)


def _id_type(values: list[Any]) -> Any:
    import pyarrow as pa

    return pa.int64() if all(isinstance(v, int) for v in values) else pa.string()


def _select(schema: Any, names: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.schema([schema.field(name) for name in names if name in schema.names])


def _polars_types(schema: Any) -> pl.Schema:
    import polars as pl

    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)  # a table gives a frame, not a series
    return frame.schema


def _without_internal(frame: pl.LazyFrame) -> pl.LazyFrame:
    names = frame.collect_schema().names()
    return frame.drop([name for name in _INTERNAL if name in names])


@dataclass(frozen=True)
class Results:
    """An output's rows, finished or partial, for `report` and `export` to read."""

    output: Path
    #: the output's columns (no internal ones), with the `batchrun.report` metadata
    schema: pa.Schema
    #: None for a finished output; how far the job got otherwise
    partial: Partial | None
    _files: tuple[Path, ...] = ()
    _checkpoint: CheckpointRows | None = None

    def scan(self) -> pl.LazyFrame:
        """Every row, in input order, as a lazy frame (read only what a query selects)."""
        import polars as pl

        if self._checkpoint is not None:
            return self._checkpoint.latest()
        return pl.scan_parquet(list(self._files))

    def iter_batches(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Every row, in input order, a record batch of at most `batch_rows` at a time.

        Raises:
            ConfigError: a file does not read.
        """
        if self._checkpoint is None:
            for file in _parquet_files(self.output, self._files):
                yield from _file_batches(file, self.output, batch_rows)
            return
        import polars as pl

        rows = self._checkpoint
        index = pl.col(INDEX_COLUMN)
        end = rows.rows_total
        if end is None:
            end = (rows.raw.select(index.max()).collect().item() or -1) + 1
        for low in range(0, end, CHUNK_POSITIONS):
            in_range = rows.raw.filter((index >= low) & (index < low + CHUNK_POSITIONS))
            chunk = _without_internal(keep_latest(in_range)).collect()
            yield from chunk.to_arrow().cast(self.schema).to_batches(max_chunksize=batch_rows)


def open_results(output: Path) -> Results:
    """The rows of `output`: the written output if the job is finished, else its checkpoint.

    A checkpoint beside a written output is read instead when it covers more rows than are
    done (a run stopped after an earlier `--limit` run wrote the output) or while a run is
    writing it (retrying the output's error rows).

    Raises:
        ConfigError: there is neither an output nor a checkpoint, or they do not read.
    """
    files = output_files(output)
    if has_checkpoint(output):
        try:
            rows = read_checkpoint(output)
            partial = rows.partial()
        except ConfigError:
            if not files:
                raise
            # a damaged checkpoint beside a written output: the output is the job's
        except Exception:  # polars and pyarrow raise several types for a file gone
            if parts_dir(output).exists():
                raise
            # the run finished and removed its checkpoint while we read it
        else:
            # a live run (one retrying error rows beside a written output too) is the job's
            if not files or partial.unfinished or partial.active_pid is not None:
                return Results(output, _output_schema(rows), partial, _checkpoint=rows)
        files = output_files(output)  # a run may have written it meanwhile
    if not files:
        raise ConfigError("no such file", path=output)
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[0])
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"not a Parquet file ({exc})", path=output) from None
    return Results(output, schema, None, _files=tuple(files))


def _output_schema(rows: CheckpointRows) -> Any:
    """The output's columns of a checkpoint's rows, with the report metadata it recorded."""
    import pyarrow as pa

    schema = pa.schema([f for f in rows.schema if f.name not in _INTERNAL])
    report = rows.manifest.get("report")
    if isinstance(report, dict):
        schema = schema.with_metadata({REPORT_KEY: orjson.dumps(report)})
    return schema


def _parquet_files(output: Path, paths: Sequence[Path]) -> list[pq.ParquetFile]:
    import pyarrow.parquet as pq

    try:
        return [pq.ParquetFile(path) for path in paths]
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"not a Parquet file ({exc})", path=output) from None


def _file_batches(file: pq.ParquetFile, output: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa

    batches = file.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as exc:  # a damaged file: say which, not a traceback
            raise ConfigError(f"cannot read the file ({exc})", path=output) from None
        if batch is None:
            return
        yield batch
