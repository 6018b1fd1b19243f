"""What a checkpoint or a finished output holds: the report of `batchrun status OUTPUT`.

It reads only the columns it counts (never the answers) and changes nothing, since a run may
be writing to the checkpoint at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchrun.errors import ConfigError
from batchrun.results import CheckpointRows, Partial, has_checkpoint, read_checkpoint
from batchrun.sinks import (
    METADATA_KEY,
    output_exists,
    parts_dir,
    read_output_schema,
    read_output_table,
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
    if has_checkpoint(output):
        try:
            return _from_checkpoint(read_checkpoint(output, columns=_COUNTED))
        except (OSError, ConfigError):
            if parts_dir(output).exists():
                raise
            # the run finished and removed its checkpoint while we read it
    if output_exists(output):
        return _from_output(output)
    raise ConfigError("nothing here: no checkpoint and no output file", path=output)


def _from_checkpoint(rows: CheckpointRows) -> JobStatus:
    return _summarise(
        rows.latest().collect(),
        output=rows.checkpoint.output,
        source="checkpoint",
        rows=rows.rows_total,
        limit=rows.limit,
        active_pid=rows.active_pid,
        output_written=output_exists(rows.checkpoint.output),
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
    # counts with thousands separators, as the run's summary and the `partial:` line print them
    total = "?" if status.rows_total is None else f"{status.rows_total:,}"
    rows = (
        f"{status.rows_done:,} done of {total}: {status.rows_ok:,} ok, "
        f"{status.rows_error:,} errors; {'?' if remaining is None else f'{remaining:,}'} remaining"
    )
    if status.limit is not None and status.source == "checkpoint":
        rows += f" (the last run had --limit {status.limit})"
    errors = ", ".join(f"{name} {n:,}" for name, n in status.errors_by_class.items()) or "none"
    tokens = f"{status.prompt_tokens:,} prompt, {status.completion_tokens:,} completion"
    if status.rows_without_usage and status.rows_without_usage == status.rows_ok:
        tokens = "not reported (the server sent no usage)"
    elif status.rows_without_usage:
        tokens += f" (not reported for {status.rows_without_usage:,} ok rows)"
    lines = [
        f"output:  {where}",
        f"state:   {state}",
        f"rows:    {rows}",
        f"errors:  {errors}",
        f"tokens:  {tokens}",
    ]
    partial = Partial(status.rows_done, status.rows_total, status.active_pid)
    if status.source == "checkpoint" and (not status.output_written or partial.unfinished):
        lines.insert(3, partial.describe())  # as `report` and `export` say it
    return lines
