"""The life of one run: check the input, open the checkpoint, run the pool, compact, summarise.

`run_job` is the library entry point and what `batchrun run` calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchrun.checkpoint import Checkpoint
from batchrun.errors import (
    EXIT_OK,
    EXIT_ROW_ERRORS,
    AuthError,
    ConfigError,
    KeyWanted,
    RunStopped,
)
from batchrun.job import Job, resolve_api_key
from batchrun.logs import register_secret
from batchrun.progress import RunStatistics, Tally
from batchrun.sinks import compact, output_schema
from batchrun.sources import InputSummary, scan_input

METADATA_KEY = b"batchrun"
#: what `batchrun report` needs to know about the job that wrote a file
REPORT_KEY = b"batchrun.report"


@dataclass(frozen=True)
class RunSummary:
    """What a run did, and what the job as a whole has now."""

    output: Path
    #: every row has a result and the output file is written
    complete: bool
    rows_total: int
    rows_ok: int
    rows_error: int
    #: this run's own counters (rows skipped on resume are not in them)
    statistics: RunStatistics | None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.complete and self.rows_error == 0 else EXIT_ROW_ERRORS


@contextlib.contextmanager
def _endpoint(job: Job) -> Iterator[Job]:
    """The job as it will run: pointed at the built-in fake when it asks for one."""
    if job.fake is None:
        yield job
        return
    from batchrun.fake import FakeConfig, FakeServer

    options: dict[str, Any] = job.fake.model_dump(exclude_none=True)
    if "faults" in options:
        options["faults"] = tuple(options["faults"])
    with FakeServer(FakeConfig(**options)) as fake:
        yield job.model_copy(update={"base_url": fake.base_url})


def _output_metadata(rows: int, manifest: dict[str, Any]) -> bytes:
    """Stored in the output file, so a re-run can tell the job is already done."""
    return orjson.dumps({"fingerprint": manifest["fingerprint"], "rows": rows})


def _report_metadata(job: Job) -> bytes:
    return orjson.dumps(
        {
            "sweep_keys": [k for k in (job.sweep or {}) if k != "repeat"],
            "fields": job.parse.fields if job.parse else {},
            "reference": job.parse.reference if job.parse else {},
        }
    )


def _finished_output(job: Job, manifest: dict[str, Any], rows: int) -> dict[str, Any] | None:
    """The metadata of an existing output file written by this same job, if it covers `rows`.

    Raises:
        ConfigError: the file exists but another job (or no batchrun run) wrote it.
    """
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(job.output).metadata or {}
        found = orjson.loads(metadata[METADATA_KEY])
    except Exception:
        found = None
    if isinstance(found, dict) and found.get("fingerprint") == manifest["fingerprint"]:
        if int(found.get("rows", 0)) >= rows:
            return found
    raise ConfigError(
        "the output file exists and was not written by this job: choose another output, "
        "or run with --restart to overwrite it",
        path=job.output,
    )


def _counts(output: Path) -> tuple[int, int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(output, columns=["status"])["status"]
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return ok, len(status) - ok


def run_job(job: Job, *, restart: bool = False, settings: Any = None) -> RunSummary:
    """Run a job to completion, or until it must stop; resumes from its checkpoint.

    Args:
        restart: discard the checkpoint and any earlier output, and start over.
        settings: `PoolSettings` overriding flush and stop timings.

    Raises:
        ConfigError, InputError: before any request is sent.
        RunStopped: the run stopped early (bad key, no balance, interrupted); its
            `summary` attribute says what is done. Running again resumes.
    """
    from batchrun.pool import Pool, PoolSettings

    # the key first: a missing key is found before anything is read or sent
    api_key = resolve_api_key(job)
    register_secret(api_key)
    scan = scan_input(job)
    checkpoint = Checkpoint(job.output)
    manifest = checkpoint.manifest_for(job)
    schema = output_schema(scan.carried_types)
    schema = schema.with_metadata(
        {
            METADATA_KEY: _output_metadata(scan.rows, manifest),
            REPORT_KEY: _report_metadata(job),
        }
    )
    if restart:
        # holding the lock, so a run that is starting cannot lose its checkpoint to us; one
        # that starts after we let go finds no checkpoint, makes its own, and ours is refused
        checkpoint.acquire_lock()
        try:
            checkpoint.discard()
            job.output.unlink(missing_ok=True)
        finally:
            checkpoint.release_lock()
    if not checkpoint.exists() and job.output.exists():
        _finished_output(job, manifest, scan.rows)
        ok, errors = _counts(job.output)
        return RunSummary(job.output, True, scan.rows, ok, errors, None)

    job.output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.open(job, restart=False)
    checkpoint.acquire_lock()
    try:
        checkpoint.record_rows(scan.rows, limit=job.limit)
        checkpoint.recover(carried=scan.carried_types)
        return _run_with_checkpoint(
            job, scan, checkpoint, schema, api_key, settings or PoolSettings(), Pool
        )
    finally:
        checkpoint.release_lock()


def _run_with_checkpoint(
    job: Job,
    scan: InputSummary,
    checkpoint: Checkpoint,
    schema: Any,
    api_key: str | None,
    settings: Any,
    pool_class: Any,
) -> RunSummary:
    import anyio

    from batchrun.cache import RequestCache
    from batchrun.client import Client
    from batchrun.limits import Limiter, SpendCap
    from batchrun.prices import PriceTable

    prices = PriceTable.load(job.prices)
    if job.max_cost is not None:
        unpriced = sorted(m for m in scan.models if not prices.knows(m))
        if unpriced:
            raise ConfigError(
                f"max_cost cannot be kept for a model without a price ({', '.join(unpriced)}): "
                "add its price with --prices FILE",
                path=job.source,
            )
    from batchrun.sinks import PartWriter

    state = checkpoint.resume_state(rows=scan.rows)
    tally = Tally(rows_total=scan.rows, rows_skipped=state.rows_ok)
    stop: RunStopped | None = None
    if state.rows_ok < scan.rows:
        writer = PartWriter(checkpoint.directory, carried=scan.carried_types)
        settings.handle_signals = threading.current_thread() is threading.main_thread()

        async def main(live: Job) -> Any:
            async with Client(
                live.base_url,
                api_key=api_key,
                max_connections=live.limits.concurrency,
                timeout=live.limits.timeout,
                read_timeout=live.limits.read_timeout,
                transport=live.transport,
            ) as client:
                limits = live.limits
                limiter = Limiter(
                    concurrency=limits.concurrency,
                    rpm=limits.rpm,
                    tpm=limits.tpm,
                    window=limits.window,
                    adaptive=limits.adaptive,
                    tpm_counts=limits.tpm_counts,
                    start_concurrency=limits.start_concurrency,
                    fallback_pause=limits.initial_backoff,
                )
                pool = pool_class(
                    job=live,
                    scan=scan,
                    client=client,
                    limiter=limiter,
                    prices=prices,
                    spend=SpendCap(job.max_cost, spent=state.spent_usd),
                    cache=RequestCache(live.cache) if live.cache is not None else None,
                    writer=writer,
                    tally=tally,
                    skip=state.ok_mask() if state.rows_ok else None,
                    settings=settings,
                )
                await pool.run()
                return pool.stop_reason

        with _endpoint(job) as live:
            try:
                stop = anyio.run(main, live)
            finally:
                writer.close()
        state = checkpoint.resume_state(rows=scan.rows)

    complete = state.rows_done >= scan.rows
    if complete:
        compact(checkpoint.directory, job.output, schema=schema, rows=scan.rows)
        # kept with --limit, so the full run resumes, and while error rows remain, so that
        # running again retries them
        if job.limit is None and state.rows_ok == scan.rows:
            checkpoint.discard()
    summary = RunSummary(
        job.output,
        complete,
        scan.rows,
        state.rows_ok,
        state.rows_done - state.rows_ok,
        tally.statistics(),
    )
    if isinstance(stop, AuthError) and api_key is None:
        # no key was sent (a loopback URL may go without): the server wants one
        stop = KeyWanted(job.api_key_env)
    if stop is not None:
        stop.summary = summary
        raise stop
    return summary
