"""`--engine ray`: the driver that cuts a job into shards and runs them on Ray worker actors.

The driver (this process) has already scanned the input, taken the run lock and opened the
checkpoint (`runner.run_job`). Here it cuts the input positions into contiguous shards, kept in
`OUTPUT.parts/shards.json` so that a resumed run cuts them the same way, and hands them to
worker actors. Each actor runs batchrun's own pool (`runner.run_pool`) on one shard at a time,
journalling into `OUTPUT.parts/shard-NNNN/`. An actor that dies costs only its requests in
flight: the driver starts another and re-submits the shard, which resumes from its journal.
The driver then compacts every shard into the one output, as the local engine does.

Ray is an optional extra, imported only here, and only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from batchrun.checkpoint import DONE_ERROR, Checkpoint, error_mask, ok_mask
from batchrun.errors import ConfigError, Interrupted, RunStopped
from batchrun.job import Job, Limits
from batchrun.logs import register_secret
from batchrun.progress import RunStatistics, Tally, combine, live_snapshots, progress_fields
from batchrun.sinks import own_parts, part_schema, recover_journals, segment_number, shard_path
from batchrun.sources import InputSummary, RowStart, locate_rows, row_group_starts

if TYPE_CHECKING:
    from batchrun.checkpoint import ResumeState
    from batchrun.ratelimit import RateLimiter

log = structlog.get_logger("batchrun.ray")

SHARDS_FILE = "shards.json"
#: a shard is at most this many input rows: a lost worker re-reads at most this much
MAX_SHARD_ROWS = 50_000
#: shards per worker when the input is small enough: the last shards finish close together
SHARDS_PER_WORKER = 4
#: a shard whose worker died this many times stops the run (something kills every worker)
MAX_SHARD_ATTEMPTS = 4

INSTALL_HINT = "--engine ray needs Ray: pip install 'batchrun[ray]'"


def import_ray() -> ModuleType:
    """The `ray` module.

    Raises:
        ConfigError: Ray is not installed (exit 2, saying how to install it).
    """
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


# -- shards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Input positions [start, end), checkpointed in `OUTPUT.parts/shard-NNNN/`."""

    number: int
    start: int
    end: int
    #: where its first input row is in the file, so that a worker reads from there
    begins: RowStart | None = None


def _cuts(path: Path, rows: int, per_shard: int, first: int) -> list[int]:
    """Input rows where shards begin after `first`: every `per_shard` rows, moved to the
    next Parquet row group boundary where that keeps a shard under twice its size."""
    groups = row_group_starts(path)
    cuts: list[int] = []
    at = first
    while True:
        target = at + per_shard
        if target >= rows:
            return cuts
        if groups:  # the end of the input is a boundary too
            fits = [g for g in [*groups, rows] if target <= g <= at + 2 * per_shard]
            target = fits[0] if fits else target
            if target >= rows:
                return cuts
        cuts.append(target)
        at = target


def plan_shards(
    directory: Path, *, path: Path, positions: int, variants: int, workers: int
) -> list[Shard]:
    """The shards covering positions [0, positions), as the checkpoint fixed them.

    The first run of a job writes the plan (`shards.json`); later runs read it, so that every
    position stays in the shard folder that holds its results. A run covering more positions
    than the plan (after a `--limit` run) adds shards for the rest. The plan also says where
    each shard's first row is in the input (byte offset or row group): the fingerprint fixes
    the input, so those stay true.

    Args:
        path: the input file.
        variants: positions per input row (a sweep's combinations): a row's variants stay in
            one shard.
    """
    plan = directory / SHARDS_FILE
    shards: list[Shard] = []
    if plan.exists():
        try:
            for number, item in enumerate(orjson.loads(plan.read_bytes())["shards"], start=1):
                begins = RowStart(**item["begins"]) if item.get("begins") else None
                shards.append(Shard(number, int(item["start"]), int(item["end"]), begins))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(
                "the shard plan is damaged: run with --restart to discard the checkpoint",
                path=plan,
            ) from None
    covered = shards[-1].end if shards else 0
    if covered < positions:
        first, rows = covered // variants, positions // variants
        per_shard = min(
            MAX_SHARD_ROWS, max(1, math.ceil((rows - first) / (workers * SHARDS_PER_WORKER)))
        )
        starts = [first, *_cuts(path, rows, per_shard, first)]
        ends = [*starts[1:], rows]
        located = locate_rows(path, starts)
        for start, end, begins in zip(starts, ends, located, strict=True):
            shards.append(Shard(len(shards) + 1, start * variants, end * variants, begins))
        items = [
            {"start": s.start, "end": s.end, "begins": asdict(s.begins) if s.begins else None}
            for s in shards
        ]
        tmp = plan.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"shards": items}))
        os.replace(tmp, plan)
    return [
        Shard(s.number, s.start, min(s.end, positions), s.begins)
        for s in shards
        if s.start < positions
    ]


# -- the run-wide budget --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerBudget:
    """What a worker needs to reach the run-wide budget (`ray_budget`): its actor's handle."""

    handle: Any

    def rate_limiter(self) -> Callable[[Limits], RateLimiter]:
        """Called in a worker actor: its slots are known by the actor's name, so that the
        driver can hand them back the moment the actor dies (`forget`)."""
        import ray

        from batchrun import ray_budget

        name = ray.get_runtime_context().get_actor_name() or ""
        factory: Callable[[Limits], RateLimiter] = ray_budget.worker_limiter(
            self.handle, worker=name
        )
        return factory

    def forget(self, actor_name: str) -> None:
        """Give a dead worker actor's concurrency slots back to the run at once."""
        self.handle.forget.remote(f"{actor_name}/")

    def spend_cap(self) -> Any:
        from batchrun import ray_budget

        return ray_budget.worker_spend_cap(self.handle)


# -- the worker actor -----------------------------------------------------------------------


@dataclass(frozen=True)
class StopReason:
    """A worker's `RunStopped`, carried back to the driver as plain data (some of these
    exceptions take keyword arguments, which pickling an exception loses)."""

    kind: type[RunStopped]
    args: tuple[Any, ...]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, stop: RunStopped) -> StopReason:
        attributes = {k: v for k, v in vars(stop).items() if k != "summary"}
        return cls(type(stop), stop.args, attributes)

    def rebuild(self) -> RunStopped:
        stop = self.kind.__new__(self.kind)
        stop.args = self.args
        vars(stop).update(self.attributes)
        return stop


@dataclass(frozen=True)
class ShardResult:
    """What a worker did with one shard."""

    shard: Shard
    stop: StopReason | None
    statistics: RunStatistics


@dataclass
class WorkerSetup:
    """Everything a worker actor holds for the run (sent once, when it starts)."""

    job: Job
    scan: InputSummary
    #: the run's checkpoint folder, OUTPUT.parts/
    directory: Path
    api_key: str | None
    settings: Any
    budget: WorkerBudget
    #: a shard's parts are numbered above the parts the local engine left in OUTPUT.parts/
    first_segment: int


class ShardWorker:
    """A Ray actor running the pool on one shard at a time (`ray.remote` wraps it)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.tally: Tally | None = None
        if setup.api_key:
            register_secret(setup.api_key)
        # a worker logs warnings only, as JSON lines (Ray forwards them to the driver with -v);
        # progress is the driver's to show
        from batchrun import logs

        logs.configure(verbosity=-1, json=True)

    def statistics(self) -> RunStatistics | None:
        """The running shard's counters (called while `run` goes on: a threaded actor)."""
        return self.tally.statistics() if self.tally is not None else None

    def run(self, shard: Shard, done_before: bytes) -> ShardResult:
        """Answer the rows of `shard` not yet ok, in its checkpoint folder or before.

        Args:
            done_before: a byte per position of the shard: the checkpoint's latest result
                when the run began (`ResumeState.latest`: a local run's parts, say, outside
                any shard, count too).
        """
        from batchrun.runner import run_pool

        setup = self.setup
        job, scan = setup.job, setup.scan
        checkpoint = Checkpoint(job.output, directory=shard_path(setup.directory, shard.number))
        checkpoint.directory.mkdir(parents=True, exist_ok=True)
        # whatever a dead worker journalled for this shard becomes part files first
        recover_journals(checkpoint.directory, schema=part_schema(scan.carried_types))
        state = checkpoint.resume_state(rows=scan.rows)
        skip = bytearray(b"\x01") * scan.rows
        own = state.ok_mask()[shard.start : shard.end]
        ok_before = ok_mask(done_before)
        skip[shard.start : shard.end] = bytes(a | b for a, b in zip(own, ok_before, strict=True))
        size = shard.end - shard.start
        # the errors the run began with, which this shard asks again (for the display's counts)
        prior_errors = bytearray(scan.rows)
        prior_errors[shard.start : shard.end] = error_mask(done_before)
        self.tally = tally = Tally(
            rows_total=size, rows_skipped=size - skip.count(0), prior_errors=prior_errors
        )
        # the worker reads from the shard's first row to its last, not the whole input
        end_row = shard.end // scan.variants
        stop = run_pool(
            job.model_copy(update={"limit": end_row}),
            scan,
            start=shard.begins,
            directory=checkpoint.directory,
            tally=tally,
            skip=skip,
            spend=setup.budget.spend_cap(),
            api_key=setup.api_key,
            settings=setup.settings,
            rate_limiter=setup.budget.rate_limiter(),
            first_segment=setup.first_segment,
        )
        return ShardResult(shard, StopReason.of(stop) if stop else None, tally.statistics())


# -- the driver -----------------------------------------------------------------------------


@contextlib.contextmanager
def connected(ray: ModuleType, job: Job, *, workers: int, verbose: bool) -> Iterator[None]:
    """Ray, for the run: joined at `[ray] address`, or a local instance on 127.0.0.1 started
    now and stopped at the end. A process that has already called `ray.init` keeps its own."""
    if ray.is_initialized():
        yield
        return
    quiet: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    # Ray's core worker installs its own SIGTERM handler, which kills the process with a
    # stack dump: the CLI's (stop, exit 3, resumable) goes back once Ray is up
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if job.ray.address:
        ray.init(address=job.ray.address, **quiet)
    else:
        start_local(ray, num_cpus=workers + 1, **quiet)  # the workers and the budget's actor
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        ray.shutdown()


def start_local(ray: ModuleType, *, num_cpus: int, **options: Any) -> None:
    """A new Ray instance on this machine that listens on 127.0.0.1 only.

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's reachable address unless told
    it is no cluster (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, its switch for laptops); the
    variable is set for this process and so for every Ray process it starts. No usage report
    to Ray's servers either."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray read the variable when it was imported: the same answer for this process
    constants = importlib.import_module("ray._private.ray_constants")
    setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 (Ray's module has no stubs)
    ray.init(
        address="local",  # a new instance, even where `ray start` left one running
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=False,
        **options,
    )


class _StopSignals:
    """While the driver waits on its workers, Ctrl-C and SIGTERM stop the run: each is
    noted by name and raised as KeyboardInterrupt (which Ray's waits let through, whatever
    the handler raised), and the previous handlers come back at the end."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def default_workers(ray: ModuleType) -> int:
    """One worker per CPU Ray has (less one for the budget's actor), at least one."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 0
    return max(1, (cpus or os.cpu_count() or 2) - 1)


@dataclass
class _Driver:
    """The shards still to run, the actors running them, and what they reported."""

    ray: ModuleType
    actor_class: Any
    setup: WorkerSetup
    queue: deque[Shard]
    workers: int
    #: a byte per position: the checkpoint's latest result when the run began
    #: (`ResumeState.latest`)
    done: bytearray
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    #: actors lost so far (dead, so no longer in `actors`)
    lost: int = 0
    running: dict[Any, tuple[Any, Shard]] = field(default_factory=dict)
    idle: list[Any] = field(default_factory=list)
    finished: list[RunStatistics] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)
    stop: RunStopped | None = None
    actors: list[Any] = field(default_factory=list)
    #: each actor's name, by `id()` of its handle
    names: dict[int, str] = field(default_factory=dict)

    def _new_actor(self) -> Any:
        # named, so that an operator (or a test) can find a run's workers in `ray list actors`
        name = f"batchrun-worker-{self.run_id}-{len(self.actors) + self.lost + 1}"
        actor = self.actor_class.options(name=name).remote(self.setup)
        self.actors.append(actor)
        self.names[id(actor)] = name
        return actor

    def _assign(self) -> None:
        while self.queue and self.stop is None:
            if not self.idle:
                if len(self.running) >= self.workers:
                    return
                self.idle.append(self._new_actor())
            actor = self.idle.pop()
            shard = self.queue.popleft()
            self.attempts[shard.number] = self.attempts.get(shard.number, 0) + 1
            done = bytes(self.done[shard.start : shard.end])
            self.running[actor.run.remote(shard, done)] = (actor, shard)

    def run(self, *, progress_every: float, rows_total: int, rows_skipped: int, live: bool) -> None:
        """Run every queued shard; show progress as a live display or a log line now and then.

        Args:
            live: a rich display on the terminal, redrawn four times a second.
        """
        started = time.monotonic()
        every = 0.25 if live else progress_every
        with contextlib.ExitStack() as stack:
            show: Callable[[RunStatistics], None] | None = None
            if live:
                first = self.statistics(rows_total, rows_skipped, 0.0)
                show = stack.enter_context(live_snapshots(first))
            last = started
            self._assign()
            while self.running:
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=min(every, 1.0))
                for ref in ready:
                    actor, shard = self.running.pop(ref)
                    self._collect(ref, actor, shard)
                self._assign()
                now = time.monotonic()
                if now - last >= every and self.running:
                    last = now
                    stats = self.statistics(rows_total, rows_skipped, now - started, live=True)
                    if show is not None:
                        show(stats)
                    else:
                        log.info("progress", workers=len(self.running), **progress_fields(stats))
            if show is not None:  # the display ends on the run's last figures
                show(self.statistics(rows_total, rows_skipped, time.monotonic() - started))

    def _collect(self, ref: Any, actor: Any, shard: Shard) -> None:
        ray = self.ray
        try:
            result: ShardResult = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # the actor lives on after its shard's code raised: left in `actors`, so that
            # `kill_all` ends it rather than leaving it holding a CPU
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            with contextlib.suppress(ValueError):
                self.actors.remove(actor)
                self.lost += 1
            name = self.names.pop(id(actor), None)
            if name is not None:  # its slots go back now, not after the lease runs out
                self.setup.budget.forget(name)
            tries = self.attempts.get(shard.number, 0)
            log.warning(
                "shard_resubmitted", shard=shard.number, attempt=tries + 1, error=type(exc).__name__
            )
            if tries >= MAX_SHARD_ATTEMPTS:
                raise ConfigError(
                    f"the workers running shard {shard.number} died {tries} times: see Ray's "
                    "logs (run with -v)",
                    path=shard_path(self.setup.directory, shard.number),
                ) from None
            self.queue.appendleft(shard)
            return
        self.idle.append(actor)
        self.finished.append(result.statistics)
        if result.stop is not None and self.stop is None:
            self.stop = result.stop.rebuild()
            log.warning("run_stopping", reason=str(self.stop), shard=shard.number)

    def statistics(
        self, rows_total: int, rows_skipped: int, elapsed_s: float, *, live: bool = False
    ) -> RunStatistics:
        parts = list(self.finished)
        if live:
            asked = [actor.statistics.remote() for actor, _ in self.running.values()]
            ready, _ = self.ray.wait(asked, num_returns=len(asked), timeout=2.0)
            for ref in ready:
                with contextlib.suppress(Exception):  # a worker dying meanwhile
                    stats = self.ray.get(ref)
                    if stats is not None:
                        parts.append(stats)
        # each part counts its own shard's skipped rows; the run's come from the checkpoint
        return combine(
            parts,
            rows_total=rows_total,
            rows_skipped=rows_skipped,
            elapsed_s=elapsed_s,
            rows_prior_error=self.done.count(DONE_ERROR),
        )

    def kill_all(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors.clear()


def run_shards(
    job: Job,
    scan: InputSummary,
    checkpoint: Checkpoint,
    *,
    state: ResumeState,
    api_key: str | None,
    settings: Any,
) -> tuple[RunStopped | None, RunStatistics]:
    """Run the rows not yet ok on Ray worker actors, one shard at a time each; the caller
    holds the run lock and compacts. Returns why the run stopped early, and what it did.

    Raises:
        ConfigError: Ray is not installed, or a shard's workers keep dying.
    """
    ray = import_ray()
    with connected(
        ray, job, workers=job.ray.workers or (os.cpu_count() or 2), verbose=settings.verbose
    ):
        # the run's clock starts once Ray is up: its start-up is not the rows' rate
        started = time.monotonic()
        workers = job.ray.workers or default_workers(ray)
        directory = checkpoint.directory
        shards = plan_shards(
            directory,
            path=job.input,
            positions=scan.rows,
            variants=scan.variants,
            workers=workers,
        )
        pending = deque(
            s for s in shards if state.latest[s.start : s.end].count(1) < s.end - s.start
        )
        from batchrun import ray_budget

        handle = ray_budget.start_budget(
            job.limits,
            max_cost=job.max_cost,
            spent_usd=state.spent_usd,
            name=f"batchrun-budget-{uuid.uuid4().hex[:12]}",
        )
        own = own_parts(directory)
        setup = WorkerSetup(
            job=job,
            scan=scan,
            directory=directory,
            api_key=api_key,
            settings=_worker_settings(settings),
            budget=WorkerBudget(handle),
            first_segment=max((segment_number(p) for p in own), default=0) + 1,
        )
        actor_class = ray.remote(num_cpus=1, max_concurrency=2, max_restarts=0)(ShardWorker)
        driver = _Driver(
            ray, actor_class, setup, pending, min(workers, len(pending)) or 1, state.latest
        )
        log.info(
            "ray_run_started", workers=driver.workers, shards=len(shards), pending=len(pending)
        )
        signals = _StopSignals()
        try:
            with signals:
                driver.run(
                    progress_every=settings.progress_every,
                    rows_total=scan.rows,
                    rows_skipped=state.rows_ok,
                    live=settings.display == "live",
                )
        except KeyboardInterrupt:
            if signals.received is None:
                raise
            # the workers are killed below: what they journalled is kept, and resumed
            driver.stop = Interrupted(signals.received)
        finally:
            driver.kill_all()
            ray_budget.stop_budget(handle)
        stats = driver.statistics(scan.rows, state.rows_ok, time.monotonic() - started)
        return driver.stop, stats


def _worker_settings(settings: Any) -> Any:
    """The pool settings for a worker: no display and no signal handling (the driver's)."""
    import dataclasses

    return dataclasses.replace(settings, display=None, handle_signals=False)
