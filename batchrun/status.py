"""What a checkpoint or a finished output holds: the report of `batchrun status OUTPUT`.

It reads only the columns it counts (never the answers) and changes nothing, since a run may
be writing to the checkpoint at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchrun.checkpoint import Checkpoint, check_parts, damaged
from batchrun.errors import ConfigError
from batchrun.sinks import (
    INDEX_COLUMN,
    METADATA_KEY,
    keep_latest,
    list_journals,
    list_parts,
    output_exists,
    part_number,
    parts_dir,
    read_journal,
    read_output_schema,
    read_output_table,
    segment_number,
    shard_dirs,
)

_COUNTED = ("status", "error_class", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class JobStatus:
    """What is done for one output."""

    output: Path
    #: where the counts come from: "checkpoint" (a run in progress or stopped) or "output"
    source: str
    #: input rows the last run covered, when known
    rows_total: int | None
    #: the last run's --limit, if any
    limit: int | None
    rows_done: int
    rows_ok: int
    errors_by_class: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    #: pid of a live run holding the lock
    active_pid: int | None
    #: whether the output file is there (a checkpoint may be complete before it is written)
    output_written: bool = True
    #: ok rows whose answer came without usage (a proxy that strips it): their tokens are unknown
    rows_without_usage: int = 0

    @property
    def rows_error(self) -> int:
        return self.rows_done - self.rows_ok

    @property
    def rows_remaining(self) -> int | None:
        return None if self.rows_total is None else max(self.rows_total - self.rows_done, 0)


def read_status(output: Path) -> JobStatus:
    """The status of `output`, from its checkpoint if there is one, else from the file.

    Raises:
        ConfigError: there is neither a checkpoint nor an output file.
    """
    checkpoint = Checkpoint(output)
    directory = checkpoint.directory
    if directory.is_dir() and (
        checkpoint.exists() or list_parts(directory) or list_journals(directory)
    ):
        try:
            return _from_checkpoint(checkpoint)
        except (OSError, ConfigError):
            if directory.exists():
                raise
            # the run finished and removed its checkpoint while we read it
    if output_exists(output):
        return _from_output(output)
    raise ConfigError("nothing here: no checkpoint and no output file", path=output)


def _from_checkpoint(checkpoint: Checkpoint) -> JobStatus:
    import polars as pl

    active_pid = checkpoint.lock_holder()
    if checkpoint.exists():
        manifest = checkpoint.read_manifest()
    elif active_pid is None:  # a run writes its manifest before any result
        raise damaged(checkpoint.manifest_path, "missing, yet results are there")
    else:
        manifest = {}
    rows = manifest.get("rows")
    rows = rows if isinstance(rows, int) else None
    limit = manifest.get("limit")
    schema = {
        INDEX_COLUMN: pl.Int64,
        "status": pl.String,
        "error_class": pl.String,
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
        "_segment": pl.Int64,
    }
    frames = []
    # journals first: a segment that vanishes meanwhile has become a part, listed after
    folders = [checkpoint.directory, *shard_dirs(checkpoint.directory)]
    for journal in [j for folder in folders for j in list_journals(folder)]:
        try:
            journalled = read_journal(journal)
        except FileNotFoundError:
            continue
        number = segment_number(journal)
        records = [{**{k: r.get(k) for k in schema}, "_segment": number} for r in journalled]
        frames.append(pl.DataFrame(records, schema=schema))
    parts = list_parts(checkpoint.directory)
    if parts:
        scanned = pl.scan_parquet(parts, include_file_paths="_part").select(
            INDEX_COLUMN, *_COUNTED, part_number().alias("_segment")
        )
        try:
            frames.append(scanned.collect())
        except Exception:  # polars raises several types for a bad file: name it
            check_parts(parts)
            raise
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
    if rows is not None:
        frame = frame.filter(pl.col(INDEX_COLUMN) < rows)
    latest = keep_latest(frame.lazy()).collect()
    return _summarise(
        latest,
        output=checkpoint.output,
        source="checkpoint",
        rows=rows,
        limit=limit if isinstance(limit, int) else None,
        active_pid=active_pid,
        output_written=output_exists(checkpoint.output),
    )


def _from_output(output: Path) -> JobStatus:
    import polars as pl

    try:
        schema = read_output_schema(output)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"not a Parquet file ({exc})", path=output) from None
    missing = [name for name in _COUNTED if name not in schema.names]
    if missing:
        raise ConfigError(f"not a batchrun output (no {missing[0]!r} column)", path=output)
    frame = pl.from_arrow(read_output_table(output, columns=list(_COUNTED)))
    assert isinstance(frame, pl.DataFrame)  # a table gives a frame, not a series
    rows: int | None = frame.height
    try:
        written = orjson.loads((schema.metadata or {})[METADATA_KEY])
        rows = int(written["rows"])
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        pass
    return _summarise(frame, output=output, source="output", rows=rows, limit=None, active_pid=None)


def _summarise(
    frame: Any,
    *,
    output: Path,
    source: str,
    rows: int | None,
    limit: int | None,
    active_pid: int | None,
    output_written: bool = True,
) -> JobStatus:
    import polars as pl

    errors = frame.filter(pl.col("status") != "ok")
    by_class = errors.group_by(pl.col("error_class").fill_null("unknown")).len()
    return JobStatus(
        output=output,
        source=source,
        rows_total=rows,
        limit=limit,
        rows_done=frame.height,
        rows_ok=frame.height - errors.height,
        errors_by_class={str(k): int(v) for k, v in sorted(by_class.iter_rows())},
        prompt_tokens=int(frame["prompt_tokens"].sum() or 0),
        rows_without_usage=frame.filter(
            (pl.col("status") == "ok") & pl.col("prompt_tokens").is_null()
        ).height,
        completion_tokens=int(frame["completion_tokens"].sum() or 0),
        active_pid=active_pid,
        output_written=output_written,
    )


def describe(status: JobStatus) -> list[str]:
    """The report, one line per fact."""
    where = str(status.output)
    if status.source == "checkpoint":
        where += f" (checkpoint in {parts_dir(status.output).name}/)"
    remaining = status.rows_remaining
    if status.active_pid is not None:
        state = f"running (pid {status.active_pid})"
    elif status.source == "output":
        state = "complete"
    elif remaining == 0 and not status.output_written:
        # a run stopped or killed while compacting: every row has a result, the file does not
        state = "checkpoint complete, output not yet written: run again to compact"
        if status.rows_error:
            state += " (error rows are retried first)"
    elif remaining == 0 and status.rows_error:
        state = "finished with error rows: run the same command again to retry them"
    elif remaining == 0:
        state = "complete" + (f" up to --limit {status.limit}" if status.limit else "")
    else:
        state = "stopped, no run active: run the same command again to resume"
    total = "?" if status.rows_total is None else str(status.rows_total)
    rows = (
        f"{status.rows_done} done of {total}: {status.rows_ok} ok, {status.rows_error} errors; "
        f"{'?' if remaining is None else remaining} remaining"
    )
    if status.limit is not None and status.source == "checkpoint":
        rows += f" (the last run had --limit {status.limit})"
    errors = ", ".join(f"{name} {n}" for name, n in status.errors_by_class.items()) or "none"
    tokens = f"{status.prompt_tokens} prompt, {status.completion_tokens} completion"
    if status.rows_without_usage and status.rows_without_usage == status.rows_ok:
        tokens = "not reported (the server sent no usage)"
    elif status.rows_without_usage:
        tokens += f" (not reported for {status.rows_without_usage} ok rows)"
    return [
        f"output:  {where}",
        f"state:   {state}",
        f"rows:    {rows}",
        f"errors:  {errors}",
        f"tokens:  {tokens}",
    ]
