"""Scale: a 1,000,000-row prompt set, with memory that stays flat.

Generates the prompt set (Parquet and JSONL) in a temporary folder, starts the zero-latency
fake in its own process, and measures, each in a fresh process so that its peak RSS is its own:

1. a run with `--limit N` on each format (`run_job`, as `batchrun run` calls it): wall time
   (interpreter start-up, scan and compaction included), rows/s while sending, peak RSS;
2. the resume skip-set (`Checkpoint.resume_state`) over a checkpoint holding every row done,
   in part files of 5,000 rows as a run writes them (`pool.FLUSH_ROWS`; built directly with
   pyarrow);
3. with --full: a resume of the whole set with all but the last N rows done, run to the end,
   and its phases alone: the scan pass over every row, and compaction of every row.

    python benchmarks/scale.py [--rows 1000000] [--limit 20000] [--concurrency 64] [--full]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchrun.checkpoint import Checkpoint
from batchrun.job import build_job

# Everything else is imported where it is used: a measured step carries only the imports a
# `batchrun` command doing that step carries (polars and pyarrow build the data, in the
# parent, and the sibling `throughput` benchmark, which starts the fake, imports the pool).

LIMIT_RSS_MB = 300


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ru_maxrss over exec, so
    a child started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB, not Linux


# -- what runs in a measured child process ---------------------------------------------------


def child(mode: str, args: list[str]) -> None:
    """Run one measured step and print {"seconds", "peak_rss_mb", ...} as the last line."""
    result: dict[str, Any] = {}
    start = time.perf_counter()
    if mode == "run":  # prompts output base_url limit|all concurrency
        from batchrun import logs
        from batchrun.pool import PoolSettings
        from batchrun.runner import run_job

        logs.configure(verbosity=-1)
        prompts, output, base_url, limit, concurrency = args
        data = job_data(Path(prompts), Path(output), base_url)
        data["limits"] = {"concurrency": int(concurrency)}
        if limit != "all":
            data["limit"] = int(limit)
        summary = run_job(build_job(data), settings=PoolSettings())
        stats = summary.statistics
        result |= {"complete": summary.complete, "rows_ok": summary.rows_ok}
        if stats is not None:
            result |= {"rows_done": stats.rows_done, "run_s": stats.elapsed_s}
    elif mode == "imports":  # the floor under every figure: this script's imports
        import batchrun.pool  # noqa: F401
    elif mode == "scan":
        from batchrun.sources import scan_input

        start = time.perf_counter()
        result["rows"] = scan_input(build_job(job_data(Path(args[0]), Path(args[1])))).rows
    elif mode == "skipset":
        checkpoint = Checkpoint(Path(args[0]))
        start = time.perf_counter()
        state = checkpoint.resume_state(rows=int(args[1]))
        result["rows_ok"] = state.rows_ok
    elif mode == "compact":
        from batchrun.sinks import compact, output_schema

        output = Path(args[0])
        start = time.perf_counter()
        schema = output_schema({})
        result["rows"] = compact(Path(args[1]), output, schema=schema, rows=int(args[2]))
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    print(orjson.dumps(result).decode(), flush=True)


def measure(mode: str, *args: str) -> dict[str, Any]:
    """Run `child(mode, args)` in a fresh interpreter; its stderr is kept in "stderr"."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = orjson.loads(lines[-1])
    result["wall"] = time.perf_counter() - started
    result["stderr"] = done.stderr
    return result


# -- building the data -----------------------------------------------------------------------


def job_data(prompts: Path, output: Path, base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    """The job the CLI builds from `--input --output --base-url --id-column id`."""
    return {
        "input": str(prompts),
        "output": str(output),
        "base_url": base_url,
        "prompt": {"id_column": "id"},
    }


def write_prompts(folder: Path, rows: int) -> tuple[Path, Path]:
    """The prompt set as Parquet (pyarrow's default row groups) and as JSONL."""
    import polars as pl
    import pyarrow.parquet as pq

    frame = pl.DataFrame({"id": pl.int_range(rows, eager=True)}).select(
        pl.format("r{}", "id").alias("id"),
        pl.format("Say something about {}.", "id").alias("prompt"),
    )
    parquet, jsonl = folder / "prompts.parquet", folder / "prompts.jsonl"
    pq.write_table(frame.to_arrow(), parquet)
    frame.write_ndjson(jsonl)
    return parquet, jsonl


def write_done_parts(directory: Path, rows: int) -> None:
    """Part files for input rows [0, rows), all ok, as a run would have written them."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrun.pool import FLUSH_ROWS  # rows a part file holds, as a run writes them
    from batchrun.sinks import part_path, part_schema

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the parts hold ms
    index = pl.int_range(rows, eager=True, dtype=pl.Int64)
    frame = pl.DataFrame({"_index": index}).select(
        pl.format("r{}", "_index").alias("id"),
        pl.lit("ok").alias("status"),
        pl.format("echo: Say something about {}.", "_index").alias("content"),
        pl.lit("stop").alias("finish_reason"),
        pl.lit("deepseek-chat").alias("model"),
        pl.lit(9, pl.Int64).alias("prompt_tokens"),
        pl.lit(11, pl.Int64).alias("completion_tokens"),
        pl.lit(20, pl.Int64).alias("total_tokens"),
        pl.lit(1, pl.Int32).alias("attempts"),
        pl.lit(0.002).alias("latency_s"),
        pl.lit(200, pl.Int32).alias("http_status"),
        pl.format("resp-{}", "_index").alias("response_id"),
        pl.lit(now).alias("started_at"),
        pl.lit(now).alias("finished_at"),
        pl.col("_index"),
    )
    schema = part_schema({})
    table = frame.to_arrow()
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(rows, f.type)
        for f in schema
    ]
    table = pa.Table.from_arrays(columns, schema=schema)
    for number, start in enumerate(range(0, rows, FLUSH_ROWS), start=1):
        pq.write_table(
            table.slice(start, FLUSH_ROWS), part_path(directory, number), compression="zstd"
        )


def make_checkpoint(prompts: Path, output: Path, done: int) -> None:
    """A checkpoint for `batchrun run --input prompts --output output --id-column id`."""
    job = build_job(job_data(prompts, output))
    Checkpoint(output).open(job, restart=False)
    write_done_parts(Checkpoint(output).directory, done)


# -- the report ------------------------------------------------------------------------------


def rss(result: dict[str, Any]) -> str:
    flag = "" if result["peak_rss_mb"] < LIMIT_RSS_MB else f"  OVER {LIMIT_RSS_MB} MB"
    return f"peak RSS {result['peak_rss_mb']:.0f} MB{flag}"


def describe_run(run: dict[str, Any]) -> str:
    """Wall time (interpreter start-up, scan, resume, compaction included) and the pool's
    own rows/s."""
    pool = run["rows_done"] / run["run_s"] if run.get("run_s") else 0.0
    return (
        f"{'complete' if run['complete'] else 'incomplete'}, {run['rows_done']:,} rows sent, "
        f"{run['wall']:.1f} s wall, {run['rows_done'] / run['wall']:.0f} rows/s all in, "
        f"{pool:.0f} rows/s while sending, {rss(run)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--limit", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="also resume the whole set")
    if sys.argv[1:2] == ["--child"]:  # a measured step, started by measure()
        child(sys.argv[2], sys.argv[3:])
        return
    args = parser.parse_args()
    from throughput import free_port, start_fake  # the sibling benchmark

    from batchrun.pool import FLUSH_ROWS

    port = free_port()
    fake = start_fake(port, None)  # not pinned: the steps run one at a time
    base_url = f"http://127.0.0.1:{port}"
    rows, limit = args.rows, args.limit
    print(
        f"{rows:,} rows, --limit {limit:,}, concurrency {args.concurrency}, {os.cpu_count()} cores"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            start = time.perf_counter()
            inputs = write_prompts(folder, rows)
            sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in inputs)
            print(f"generated in {time.perf_counter() - start:.1f} s: {sizes}")

            floor = measure("imports")
            print(f"a measured process that only imports the stack: {rss(floor)}")
            concurrency = str(args.concurrency)
            for prompts in inputs:
                output = folder / f"{prompts.stem}-{prompts.suffix[1:]}.parquet"
                run = measure("run", str(prompts), str(output), base_url, str(limit), concurrency)
                print(f"run --limit {limit:,} on {prompts.name}: {describe_run(run)}")

            skip_output = folder / "skipset.parquet"
            start = time.perf_counter()
            write_done_parts(Checkpoint(skip_output).directory, rows)
            parts = -(-rows // FLUSH_ROWS)
            print(
                f"built {rows:,} done rows in {parts:,} part files in "
                f"{time.perf_counter() - start:.1f} s"
            )
            state = measure("skipset", str(skip_output), str(rows))
            print(
                f"resume skip-set over {state['rows_ok']:,} done rows: "
                f"{state['seconds']:.2f} s, {rss(state)}"
            )
            if args.full:
                full(folder, inputs, rows, limit, base_url, concurrency)
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def full(
    folder: Path, inputs: tuple[Path, Path], rows: int, limit: int, base_url: str, concurrency: str
) -> None:
    """Every row of the set: scan, compaction, and a resume that finishes the job."""
    for prompts in inputs:
        scan = measure("scan", str(prompts), str(folder / "unused.parquet"))
        print(f"scan pass over {prompts.name}: {scan['seconds']:.1f} s, {rss(scan)}")
    done_output = folder / "compact.parquet"
    write_done_parts(Checkpoint(done_output).directory, rows)
    compacted = measure(
        "compact", str(done_output), str(Checkpoint(done_output).directory), str(rows)
    )
    print(
        f"compaction of {compacted['rows']:,} rows: {compacted['seconds']:.1f} s, {rss(compacted)}"
    )
    shutil.rmtree(Checkpoint(done_output).directory)
    for prompts in inputs:
        output = folder / f"full-{prompts.suffix[1:]}.parquet"
        make_checkpoint(prompts, output, rows - limit)
        run = measure("run", str(prompts), str(output), base_url, "all", concurrency)
        print(
            f"resume of {prompts.name} with {rows - limit:,} done, to the end: {describe_run(run)}"
        )
        shutil.rmtree(Checkpoint(output).directory, ignore_errors=True)
        output.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
