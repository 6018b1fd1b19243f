"""The life of one run: check the input, open the checkpoint, run the pool, compact, summarise.

`run_job` is the library entry point and what `batchrun run` calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchrun.checkpoint import Checkpoint
from batchrun.collector import collector_set_for_the_run
from batchrun.errors import (
    EXIT_OK,
    EXIT_ROW_ERRORS,
    AuthError,
    BatchrunError,
    ConfigError,
    DiskFull,
    InputError,
    KeyWanted,
    RunStopped,
    is_disk_full,
)
from batchrun.job import Job, Limits, for_server, resolve_api_key
from batchrun.logs import register_secret, scrub
from batchrun.progress import RunStatistics, Tally
from batchrun.sinks import (
    METADATA_KEY,
    REPORT_KEY,
    compact,
    output_exists,
    output_files,
    output_schema,
    read_output_schema,
    read_output_table,
    remove_output,
)
from batchrun.sources import InputSummary, RowStart, scan_input

if TYPE_CHECKING:
    from batchrun.limits import SpendBudget
    from batchrun.prices import PriceTable
    from batchrun.ratelimit import RateLimiter


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


def _digest(value: Any) -> str:
    raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


def _fingerprint_digest(manifest: dict[str, Any]) -> str:
    return _digest(manifest["fingerprint"])


def _output_metadata(rows: int, manifest: dict[str, Any]) -> bytes:
    """Stored in the output file, so a re-run can tell the job is already done: a digest of
    the job's fingerprint, not its values, which may quote prompts or extra_body and would
    travel with the file wherever it is shared."""
    return orjson.dumps(
        {
            "fingerprint_sha256": _fingerprint_digest(manifest),
            # the job's part alone, to tell "the input changed" from "another job"
            "job_sha256": _digest(manifest["fingerprint"]["job"]),
            "rows": rows,
        }
    )


def _report_spec(job: Job) -> dict[str, Any]:
    """What `batchrun report` reads about the job: the output's `batchrun.report` metadata,
    and the checkpoint manifest's `report` (for a report of a job not finished)."""
    spec: dict[str, Any] = scrub(
        {
            "sweep_keys": [k for k in (job.sweep or {}) if k != "repeat"],
            "fields": job.parse.fields if job.parse else {},
            "reference": job.parse.reference if job.parse else {},
        }
    )
    return spec


def _finished_output(job: Job, manifest: dict[str, Any], rows: int) -> dict[str, Any] | None:
    """The metadata of an existing output (a file or a directory of files) written by this
    same job, if it covers `rows`.

    Raises:
        ConfigError: the file exists but another job (or no batchrun run) wrote it.
    """
    try:
        metadata = read_output_schema(job.output).metadata or {}
        found = orjson.loads(metadata[METADATA_KEY])
    except Exception:
        found = None
    if isinstance(found, dict) and (
        found.get("fingerprint_sha256") == _fingerprint_digest(manifest)
        # files written before the digest hold the fingerprint itself
        or found.get("fingerprint") == manifest["fingerprint"]
    ):
        if int(found.get("rows", 0)) >= rows:
            return found
    if isinstance(found, dict) and found.get("job_sha256") == _digest(
        manifest["fingerprint"]["job"]
    ):
        raise InputError(
            f"the input changed since {job.output.name} was written from it: run with "
            "--restart to answer it again (the old output is replaced)",
            path=job.input,
        )
    raise ConfigError(
        "the output file exists and was not written by this job: choose another output, "
        "or run with --restart to overwrite it",
        path=job.output,
    )


def _counts(output: Path) -> tuple[int, int]:
    import pyarrow.compute as pc

    status = read_output_table(output, columns=["status"])["status"]
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return ok, len(status) - ok


def run_job(
    job: Job,
    *,
    restart: bool = False,
    settings: Any = None,
    rate_limiter: Callable[[Limits], RateLimiter] | None = None,
    spend_cap: SpendBudget | None = None,
) -> RunSummary:
    """Run a job to completion, or until it must stop; resumes from its checkpoint.

    Args:
        restart: discard the checkpoint and any earlier output, and start over.
        settings: `PoolSettings` overriding flush and stop timings.
        rate_limiter: makes the run's `RateLimiter` from the job's limits, inside the run's
            event loop (default: `LocalRateLimiter.for_limits`). Not used with
            `engine = "ray"`, whose workers lease from the run-wide budget
            (`ray_engine.WorkerBudget`).
        spend_cap: the run's spend cap, when it is shared with other runs (a cluster-wide
            one from `ray_budget.worker_spend_cap`); by default `job.max_cost` less what the
            checkpoint says was spent.

    Raises:
        ConfigError, InputError: before any request is sent.
        RunStopped: the run stopped early (bad key, no balance, interrupted); its
            `summary` attribute says what is done. Running again resumes.
    """
    with collector_set_for_the_run():  # the scan, the pool and compaction
        return _run_job(
            job, restart=restart, settings=settings, rate_limiter=rate_limiter, spend_cap=spend_cap
        )


def _run_job(
    job: Job,
    *,
    restart: bool,
    settings: Any,
    rate_limiter: Callable[[Limits], RateLimiter] | None,
    spend_cap: SpendBudget | None,
) -> RunSummary:
    from batchrun.pool import PoolSettings

    if job.engine == "ray":  # before anything is read: a missing extra is exit 2 at once
        from batchrun.ray_engine import import_ray

        import_ray()
    # the key first: a missing key is found before anything is read or sent
    api_key = resolve_api_key(job)
    register_secret(api_key)
    # a folder that is not an output batchrun wrote as a directory (`output_file_rows`):
    # never "the output file exists", as --restart would then remove the user's folder
    if job.output.is_dir() and not output_files(job.output):
        raise ConfigError(
            f"is a folder: the output is a Parquet file, such as {job.output / 'results.parquet'}",
            path=job.output,
        )
    checkpoint = Checkpoint(job.output)
    if restart or checkpoint.exists() or not output_exists(job.output):
        checkpoint.check_writable()  # before the scan, which may take minutes on a big input
    scan = scan_input(job)
    prices = _checked_prices(job, scan)
    job = for_server(job, scan.models)  # DeepSeek's own URL: its limits, its retired names
    if job.cache is not None:
        from batchrun.cache import RequestCache

        RequestCache(job.cache)  # a cache folder that cannot be written, before the checkpoint
    manifest = checkpoint.manifest_for(job, identity=scan.identity)
    schema = output_schema(scan.carried_types)
    schema = schema.with_metadata(
        {
            METADATA_KEY: _output_metadata(scan.rows, manifest),
            REPORT_KEY: orjson.dumps(_report_spec(job)),
        }
    )
    # the lock comes first: whatever is read or written in the checkpoint after this, no
    # other run can change or remove meanwhile
    checkpoint.acquire_lock()
    try:
        if restart:
            checkpoint.clear()
            remove_output(job.output)
        if not checkpoint.exists() and output_exists(job.output):
            try:
                _finished_output(job, manifest, scan.rows)
                ok, errors = _counts(job.output)
            finally:
                checkpoint.discard_if_empty()  # the folder made for the lock just taken
            # the whole output, which a --limit run finds done: its rows, not the limit's
            return RunSummary(job.output, True, ok + errors, ok, errors, None)
        checkpoint.open(job, restart=False, manifest=manifest)
        checkpoint.record_rows(scan.rows, limit=job.limit, report=_report_spec(job))
        checkpoint.recover(carried=scan.carried_types)
        return _run_with_checkpoint(
            job,
            scan,
            checkpoint,
            schema,
            api_key,
            settings or PoolSettings(),
            rate_limiter=rate_limiter,
            spend_cap=spend_cap,
            prices=prices,
        )
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(exc.filename or checkpoint.directory) from None
        raise
    finally:
        checkpoint.release_lock()


def _checked_prices(job: Job, scan: InputSummary) -> PriceTable:
    """The run's price table, the one the pool uses (loaded once: parsing the shipped table
    is ~1-2 ms). A price file or a spend cap that cannot be kept is refused before the
    checkpoint is made: a refused run leaves no checkpoint behind to call the corrected job
    "changed".

    Raises:
        ConfigError: the price file does not load (another currency), or `max_cost` is set and
            a model the requests name has no price.
    """
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
    return prices


def _unwrapped(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error worth reporting from a task group's ExceptionGroup.

    anyio wraps whatever a task raised; the CLI maps exit codes from our own classes, so the
    first of ours wins, then a full disk, then a lone error of another kind.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending[:0] = item.exceptions
        else:
            leaves.append(item)
    for leaf in leaves:
        if isinstance(leaf, BatchrunError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt) or is_disk_full(leaf):
            return leaf
    return leaves[0] if len(leaves) == 1 else group


def _run_with_checkpoint(
    job: Job,
    scan: InputSummary,
    checkpoint: Checkpoint,
    schema: Any,
    api_key: str | None,
    settings: Any,
    *,
    rate_limiter: Callable[[Limits], RateLimiter] | None,
    spend_cap: SpendBudget | None = None,
    prices: PriceTable,
) -> RunSummary:
    from batchrun.limits import SpendCap

    state = checkpoint.resume_state(rows=scan.rows)
    prior_errors = state.rows_done - state.rows_ok
    tally = Tally(
        rows_total=scan.rows,
        rows_skipped=state.rows_ok,
        # so that the display counts the whole job's rows, as status and the summary do
        prior_errors=state.error_mask() if prior_errors else None,
    )
    statistics = tally.statistics()
    stop: RunStopped | None = None
    if state.rows_ok < scan.rows:
        with _endpoint(job) as live:
            if job.engine == "ray":
                from batchrun.ray_engine import run_shards

                stop, statistics = run_shards(
                    live.model_copy(update={"fake": None}),  # the driver serves the fake
                    scan,
                    checkpoint,
                    state=state,
                    api_key=api_key,
                    settings=settings,
                )
            else:
                settings.handle_signals = threading.current_thread() is threading.main_thread()
                stop = run_pool(
                    live,
                    scan,
                    directory=checkpoint.directory,
                    tally=tally,
                    skip=state.ok_mask() if state.rows_ok else None,
                    spend=(
                        SpendCap(job.max_cost, spent=state.spent_usd)
                        if spend_cap is None
                        else spend_cap
                    ),
                    api_key=api_key,
                    settings=settings,
                    rate_limiter=rate_limiter,
                    prices=prices,
                )
                statistics = tally.statistics()
        state = checkpoint.resume_state(rows=scan.rows)

    complete = state.rows_done >= scan.rows
    if complete:
        try:
            compact(
                checkpoint.directory,
                job.output,
                schema=schema,
                rows=scan.rows,
                file_rows=job.output_file_rows,
            )
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(job.output) from None
            raise
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
        statistics,
    )
    if isinstance(stop, AuthError) and not isinstance(stop, KeyWanted) and api_key is None:
        # no key was sent (a loopback URL may go without): the server wants one
        stop = KeyWanted(job.api_key_env)
    if stop is not None:
        stop.summary = summary
        raise stop
    return summary


def run_pool(
    job: Job,
    scan: InputSummary,
    *,
    directory: Path,
    tally: Tally,
    skip: bytearray | None,
    spend: SpendBudget,
    api_key: str | None,
    settings: Any,
    rate_limiter: Callable[[Limits], RateLimiter] | None,
    first_segment: int = 1,
    start: RowStart | None = None,
    prices: PriceTable | None = None,
) -> RunStopped | None:
    """One pass of the pool over the rows not in `skip`, journalled and written as part files
    in `directory`; the caller holds the run lock and compacts. Returns why it stopped early.

    Args:
        spend: the spend cap (`limits.SpendCap`, or a run-wide one under `--engine ray`).
        first_segment: the lowest part number to write (`PartWriter`).
        start: where to begin reading the input (`sources.locate_rows`).
        prices: the run's price table, if the caller loaded it (else from `job.prices`).
    """
    import anyio

    from batchrun.cache import RequestCache
    from batchrun.client import Client
    from batchrun.pool import Pool, backend_options
    from batchrun.prices import PriceTable
    from batchrun.ratelimit import LocalRateLimiter, key_digest
    from batchrun.sinks import PartWriter

    if prices is None:
        prices = PriceTable.load(job.prices)
    writer = PartWriter(directory, carried=scan.carried_types, first_segment=first_segment)

    async def main() -> RunStopped | None:
        async with Client(
            job.base_url,
            api_key=api_key,
            key_variable=job.api_key_env,
            max_connections=job.limits.concurrency,
            timeout=job.limits.timeout,
            read_timeout=job.limits.read_timeout,
            transport=job.transport,
        ) as client:
            pool = Pool(
                job=job,
                scan=scan,
                client=client,
                limiter=(rate_limiter or LocalRateLimiter.for_limits)(job.limits),
                key_digest=key_digest(api_key),
                prices=prices,
                spend=spend,
                cache=RequestCache(job.cache) if job.cache is not None else None,
                writer=writer,
                tally=tally,
                skip=skip,
                settings=settings,
                start=start,
            )
            with collector_set_for_the_run():  # the client has imported aiohttp: freeze it too
                await pool.run()
            return pool.stop_reason

    # asyncio resets SIGTERM to the default (kill) when the pool lets go of it; what the
    # caller had set keeps counting for compaction
    sigterm = signal.getsignal(signal.SIGTERM) if settings.handle_signals else None
    try:
        return anyio.run(main, backend_options=backend_options())
    except BaseExceptionGroup as group:
        raise _unwrapped(group) from None
    finally:
        writer.close()
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
