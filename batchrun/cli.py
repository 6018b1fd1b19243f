"""The `batchrun` command: parses flags, lays them over the job file, maps errors to exit codes.

Only click and the standard library are imported at the top: the rest loads when a command
runs, so `batchrun --help` stays instant.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from batchrun import __version__, collector
from batchrun.errors import EXIT_USAGE, BatchrunError, ConfigError, Interrupted, RunStopped


def _absolute(value: Path | None) -> Path | None:
    # flags name paths from where the command runs; job files from their own folder
    return value.absolute() if value is not None else None


def _figure(value: int | None) -> str:
    """A figure the server may never have sent: "not reported" is not zero."""
    return "not reported" if value is None else str(value)


def _output_of(path: Path) -> Path:
    """The output a status, report or export command is about: a job file names its own."""
    if path.suffix == ".toml" and path.is_file():
        from batchrun.job import load_job

        return load_job(path).output.absolute()
    return path


def _results_of(path: Path) -> Any:
    """The rows of `_output_of(path)`, finished or partial; a partial one says so on stderr
    (stdout is the data), as `status` says it."""
    from batchrun.results import open_results

    results = open_results(_output_of(path))
    if results.partial is not None:
        click.echo(results.partial.describe(), file=sys.stderr)
    return results


def _finished_meanwhile(results: Any, exc: OSError) -> BatchrunError:
    """What to say when a checkpoint's file went while it was read: the run finished and
    compacted it (else the error itself, as a damaged checkpoint)."""
    from batchrun.sinks import parts_dir

    if results.partial is not None and not parts_dir(results.output).exists():
        return ConfigError(
            "the run finished while this read its checkpoint: run this again to read the output",
            path=results.output,
        )
    return ConfigError(f"cannot read the checkpoint: {exc}", path=results.output)


def _cost_line(stats: Any) -> str:
    line = f"cost: ${stats.cost_usd:.6f}"
    notes = []
    if stats.rows_worst_case:
        line = f"cost: at most ${stats.cost_usd:.6f}"
        notes.append(
            f"{stats.rows_worst_case} rows had answers without usage, counted at their worst case"
        )
    if stats.rows_unpriced:
        if stats.cost_usd == 0:
            line = "cost: not known"
        notes.append(f"{stats.rows_unpriced} rows have no price for their model (see --prices)")
    return f"{line} ({'; '.join(notes)})" if notes else line


def _echo_summary(summary: Any, limit: int | None = None) -> None:
    stats = summary.statistics
    err = sys.stderr
    state = "complete" if summary.complete else "incomplete"
    if limit is not None and summary.rows_total == limit:
        # the rows after the limit are not done: "complete" alone reads as the whole job
        state += f" up to --limit {limit}"
    click.echo(
        f"{state}: {summary.rows_ok} ok, {summary.rows_error} errors "
        f"of {summary.rows_total} rows -> {summary.output}",
        file=err,
    )
    if stats is None:
        click.echo("nothing to do: every row already has a result", file=err)
        return
    tokens = (
        f"tokens: prompt {_figure(stats.prompt_tokens)} "
        f"(cache hit {_figure(stats.cache_hit_tokens)}, "
        f"cache miss {_figure(stats.cache_miss_tokens)}), "
        f"completion {_figure(stats.completion_tokens)} "
        f"(reasoning {_figure(stats.reasoning_tokens)})"
    )
    if stats.rows_done == 0:  # no figure to report, rather than figures the server kept back
        tokens = "tokens: none (no row finished in this run)"
    lines = [
        f"this run: {stats.rows_done} rows ({stats.rows_ok} ok, {stats.rows_error} errors), "
        f"{stats.requests} requests sent in {stats.elapsed_s:.1f} s "
        f"({stats.requests_per_s:.1f}/s)",
        tokens,
        _cost_line(stats),
    ]
    if stats.rows_skipped:
        lines.append(f"resumed: {stats.rows_skipped} rows were already done")
    if stats.errors_by_class:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(stats.errors_by_class.items()))
        lines.append(f"errors by class: {parts}")
    if stats.retries_by_class:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(stats.retries_by_class.items()))
        lines.append(f"retries by class: {parts}")
    for line in lines:
        click.echo(line, file=err)


class _Commands(click.Group):
    """The command group, with `fake-server` (a tool for tests and benchmarks) loaded only
    when it is named or listed: its module, its options and the fake's config are no part of
    a run (issue 12)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "fake-server"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "fake-server":
            from batchrun.fake.command import fake_server_command

            return fake_server_command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrun")
def cli() -> None:
    """Run large batches of chat-completion requests against OpenAI-compatible APIs."""


@cli.command()
@click.argument("job_file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--input", "input_", type=click.Path(path_type=Path), help="Prompt set (.jsonl or .parquet)."
)
@click.option("--output", type=click.Path(path_type=Path), help="Result Parquet file.")
@click.option("--model", help="Model name (default: deepseek-flash).")
@click.option("--base-url", help="API base URL, e.g. https://api.deepseek.com.")
@click.option("--api-key-env", help="Name of the variable holding the API key.")
@click.option("--concurrency", type=click.IntRange(1, 4096), help="Requests in flight at most.")
@click.option("--max-attempts", type=click.IntRange(1, 100), help="Attempts per row.")
@click.option("--timeout", type=click.FloatRange(min=0.001), help="Seconds per attempt, all in.")
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="Requests per minute.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), help="Tokens per minute.")
@click.option(
    "--adaptive/--no-adaptive", default=None, help="Learn the server's concurrency limit."
)
@click.option("--max-tokens", type=click.IntRange(min=1), help="max_tokens for every request.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature.")
@click.option(
    "--thinking/--no-thinking",
    default=None,
    help="DeepSeek's thinking mode on or off (default: the server's, on).",
)
@click.option(
    "--reasoning-effort",
    type=click.Choice(["low", "high", "max"]),
    help="How hard a thinking model thinks (default: the server's, high).",
)
@click.option(
    "--id-column",
    help="Column holding each row's id (default: 'id', else 'custom_id'); '' for row positions.",
)
@click.option("--prompt-column", help="Column holding a prompt string.")
@click.option("--messages-column", help="Column holding a list of messages.")
@click.option("--system", help="System prompt for every row.")
@click.option("--template", help="Prompt template over columns, e.g. 'Classify: {text}'.")
@click.option("--stream/--no-stream", default=None, help="Stream answers as SSE.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows.")
@click.option("--transport", type=click.Choice(["aiohttp", "httpx"]), help="HTTP transport.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    help="Run here (local), or in shards on Ray actors (needs batchrun[ray]).",
)
@click.option(
    "--off-peak",
    "schedule",
    flag_value="off-peak",
    default=None,
    help="Send only while the model is at its off-peak price; wait out peak hours.",
)
@click.option("--ray-address", help="Ray cluster to join (default: a local Ray instance).")
@click.option("--workers", type=click.IntRange(1, 4096), help="Ray worker actors (--engine ray).")
@click.option("--prices", type=click.Path(path_type=Path, dir_okay=False), help="Price file.")
@click.option(
    "--cache", type=click.Path(path_type=Path, file_okay=False), help="Request cache folder."
)
@click.option("--max-cost", type=click.FloatRange(min=0, min_open=True), help="Spend cap, USD.")
@click.option(
    "--output-file-rows",
    type=click.IntRange(min=1),
    help="Past N rows, write OUTPUT as a directory of Parquet files of at most N rows each.",
)
@click.option(
    "--dry-run", is_flag=True, help="Estimate requests, tokens, cost and time; send nothing."
)
@click.option("--restart", is_flag=True, help="Discard the checkpoint and start over.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live display on a terminal (default), or a progress log line every few seconds.",
)
@click.option("--log-format", type=click.Choice(["console", "json"]), help="Log format.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Write JSON log lines here.")
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def run(
    job_file: Path | None,
    input_: Path | None,
    output: Path | None,
    dry_run: bool,
    restart: bool,
    progress: bool | None,
    log_format: str | None,
    log_file: str | None,
    verbose: int,
    quiet: bool,
    **flags: Any,
) -> None:
    """Run a job: a JOB_FILE, flags, or both (flags win)."""
    from batchrun import logs

    try:
        logs.configure(
            verbosity=-1 if quiet else min(verbose, 1),
            json=None if log_format is None else log_format == "json",
            log_file=log_file,
        )
    except OSError as exc:
        click.echo(f"error: cannot open the log file {log_file}: {exc.strerror}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    limit: int | None = None
    try:
        job = _job_from(job_file, input_, output, flags)
        limit = job.limit
        if dry_run:
            from batchrun.estimate import describe, estimate_job

            for line in describe(estimate_job(job)):
                click.echo(line)
            return
        with logs.without_rich():  # httpx's command line would import rich and pygments
            from batchrun.pool import PoolSettings
            from batchrun.runner import run_job

        live = progress is not False and sys.stderr.isatty()
        display = "live" if live else "lines"
        with _sigterm_as_interrupt():
            settings = PoolSettings(display=display, verbose=verbose > 0)
            summary = run_job(job, restart=restart, settings=settings)
    except KeyboardInterrupt as exc:  # outside the pool (scan, compaction): all done is on disk
        _exit_stopped(Interrupted("SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"))
    except RunStopped as stop:
        if stop.summary is not None:
            _echo_summary(stop.summary, limit)
        _exit_stopped(stop)
    except BatchrunError as exc:
        _exit_error(exc)
    _echo_summary(summary, limit)
    sys.exit(summary.exit_code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the pool's own handler: raised wherever the program is, as Ctrl-C is,
    so that the run winds down the same way (a BaseException, so no `except Exception`
    swallows it)."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run like Ctrl-C (exit 3, resumable) instead of killing it silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_stopped(stop: RunStopped) -> NoReturn:
    click.echo(f"stopped: {_redacted(str(stop))}", file=sys.stderr)
    sys.exit(stop.exit_code)


def _exit_error(exc: BatchrunError) -> NoReturn:
    click.echo(f"error: {_redacted(str(exc))}", file=sys.stderr)
    sys.exit(exc.exit_code)


def _redacted(text: str) -> str:
    # a message may quote a job value or a server's words; the key is in neither on a file
    from batchrun.logs import redact

    return redact(text)


def _job_from(
    job_file: Path | None, input_: Path | None, output: Path | None, flags: dict[str, Any]
) -> Any:
    from batchrun.errors import ConfigError
    from batchrun.job import apply_flags, build_job, read_job_data

    data = read_job_data(job_file) if job_file is not None else {}
    flags = {**flags, "input": _absolute(input_), "output": _absolute(output)}
    flags["prices"] = _absolute(flags.get("prices"))
    flags["cache"] = _absolute(flags.get("cache"))
    if job_file is None:
        if input_ is None:
            raise ConfigError("give a job file or --input (see batchrun run --help)")
        if output is None:
            flags["output"] = input_.absolute().with_name(input_.stem + ".results.parquet")
    return build_job(apply_flags(data, flags), source=job_file)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
def status(output: Path) -> None:
    """Show what is done for OUTPUT (a checkpoint or a finished file; or the job file that
    writes it), and if a run is on it."""
    from batchrun.status import describe, read_status

    try:
        output = _output_of(output).absolute()
    except BatchrunError as exc:
        _exit_error(exc)
    if output.name.endswith(".parts") and output.is_dir():  # the checkpoint folder itself
        output = output.with_name(output.name.removesuffix(".parts"))
    try:
        report = read_status(output)
    except BatchrunError as exc:
        _exit_error(exc)
    for line in describe(report):
        click.echo(line)


@cli.command(name="export")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["openai-batch", "jsonl", "csv"]),
    required=True,
    help="OpenAI Batch API output lines, flat JSON lines, or CSV.",
)
@click.option(
    "-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="Write here, not stdout."
)
def export_command(output: Path, fmt: str, out: Path | None) -> None:
    """Write the rows of OUTPUT (or the job file's output) as OpenAI batch lines, JSONL or CSV.

    A job not finished gives the rows done so far, from its checkpoint."""
    from batchrun.export import export_output, export_to_file

    try:
        results = _results_of(output)
        try:
            if out is None:
                export_output(results, sys.stdout.buffer, fmt=fmt)
            else:
                export_to_file(results, out, fmt=fmt)
        except FileNotFoundError as exc:
            raise _finished_meanwhile(results, exc) from None
    except BatchrunError as exc:
        _exit_error(exc)


@cli.command(name="report")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the report with charts as one self-contained HTML page (batchrun[report]).",
)
def report_command(output: Path, as_json: bool, html_file: Path | None) -> None:
    """Per-variant figures of OUTPUT (or of the job file's output): rows, ok, errors, tokens, cost,
    latency, accuracy. A job not finished is reported from its checkpoint, as partial."""
    from batchrun.report import read_report, write_report

    try:
        if html_file is not None:
            from batchrun.report_html import require_plotly

            require_plotly()  # before the file is read: say what to install at once
        results = _results_of(output)
        try:
            figures = read_report(results)
            if html_file is not None:
                from batchrun.report import scan_rows
                from batchrun.report_html import write_html

                title = f"batchrun report: {results.output.name}"
                partial = None if results.partial is None else results.partial.describe()
                write_html(figures, scan_rows(results), html_file, title=title, partial=partial)
        except FileNotFoundError as exc:
            raise _finished_meanwhile(results, exc) from None
    except BatchrunError as exc:
        _exit_error(exc)
    write_report(figures, as_json=as_json, file=sys.stdout)
    if html_file is not None:
        click.echo(f"wrote {html_file}", err=True)


@cli.command(params=[p for p in run.params if p.name != "dry_run"])
@click.pass_context
def estimate(ctx: click.Context, /, **options: Any) -> None:
    """Estimate a job (requests, tokens, cost range, time) without sending anything."""
    ctx.invoke(run, dry_run=True, **options)


def main() -> None:
    """Console-script entry point.

    Not click's standalone mode: that turns Ctrl-C into "Aborted!" and exit 1, where a run
    stopped by Ctrl-C at any moment exits 3 saying how to resume.
    """
    collector.collect_less_often()
    _without_pydantic_plugins()
    try:
        _main()
    finally:
        collector.spare_at_exit()


def _without_pydantic_plugins() -> None:
    """The command runs with pydantic's plugins off unless `PYDANTIC_DISABLE_PLUGINS` is
    set (issue 12): looking for them scans every installed package's entry points, ~10-20 ms
    of each run, and batchrun's models use none. Library users' processes are untouched."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort as abort:
        if isinstance(abort.__context__, KeyboardInterrupt):
            _exit_stopped(Interrupted("SIGINT"))
        click.echo("Aborted!", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _exit_stopped(Interrupted("SIGINT"))
    except BrokenPipeError:  # `batchrun export ... | head`: quiet, as click's standalone mode
        # the flush at exit would fail again: point stdout at /dev/null (Python's own advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
