"""batchrun's own cost per request, beside a bare aiohttp loop, on the zero-latency fake.

One run prints, for each request count, a real `batchrun run` of a job (JSONL in, checkpoint,
Parquet out, as a user gets them) and `benchmarks/bare_aiohttp.py` (JSONL in, JSONL out), each
in its own process: requests/s over the process's whole life (start-up included) and its CPU
seconds per request (user + system, from the child's rusage, not wall time). With two cores
or more the fake is pinned to one core and the client to another; the fake's own CPU share of
the wall time says whether the fake, not the client, was the ceiling.

With `--repeat N` each pair runs N times, batchrun and the bare loop in turn (the order
swapped each round, so neither always runs first), and a last table gives each client's medians
and the median of the N paired ratios: on a shared machine one run's rate moves by +-20%.

    python benchmarks/throughput.py [--requests 10000 100000] [--concurrency 64]
                                    [--httpx-requests 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import compileall
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Figures:
    name: str
    requests: int
    wall: float
    cpu: float
    fake_cpu: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cores() -> tuple[set[int] | None, set[int] | None]:
    """The cores for the fake and for the client: two different ones where there are two."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[1]}


def pinned(core: set[int] | None) -> object:
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, core)


def start_fake(port: int, core: set[int] | None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "fake-server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pinned(core),  # type: ignore[arg-type]
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/models", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the fake server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_prompts(path: Path, n: int) -> None:
    with path.open("wb") as file:
        for i in range(n):
            file.write(orjson.dumps({"id": f"r{i}", "prompt": f"Say something about {i}."}))
            file.write(b"\n")


def write_job(
    path: Path, *, prompts: Path, base_url: str, concurrency: int, transport: str
) -> None:
    path.write_text(
        f'input = "{prompts}"\n'
        f'output = "{path.with_suffix(".parquet")}"\n'
        f'base_url = "{base_url}"\n'
        f'transport = "{transport}"\n'
        'model = "deepseek-chat"\n'
        "[prompt]\n"
        'id_column = "id"\n'
        "[limits]\n"
        f"concurrency = {concurrency}\n"
    )


def measure(
    name: str, argv: list[str], *, requests: int, core: set[int] | None, fake_pid: int
) -> Figures:
    fake_before = cpu_seconds(fake_pid)
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pinned(core)
    )  # type: ignore[arg-type]
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        assert process.stderr is not None
        raise SystemExit(f"{name} failed:\n{process.stderr.read().decode()}")
    cpu = usage.ru_utime + usage.ru_stime
    return Figures(name, requests, wall, cpu, cpu_seconds(fake_pid) - fake_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--httpx-requests",
        type=int,
        default=10_000,
        help="requests for transport = 'httpx' (0: leave it out)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of each pair; medians when more than one"
    )
    args = parser.parse_args()

    # batchrun's bytecode cached, as a wheel install leaves it: otherwise, under
    # PYTHONDONTWRITEBYTECODE or a read-only checkout, every run compiles its ~12k lines
    # from source (~0.1 s a run) while the bare loop's dependencies have theirs
    compileall.compile_dir(HERE.parent / "batchrun", quiet=1)
    fake_core, client_core = cores()
    port = free_port()
    fake = start_fake(port, fake_core)
    base_url = f"http://127.0.0.1:{port}"
    load = os.getloadavg()[0]
    rows: list[Figures] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            cases = [(n, "aiohttp", round_) for round_ in range(args.repeat) for n in args.requests]
            if args.httpx_requests:
                cases.append((args.httpx_requests, "httpx", 0))
            for n, transport, round_ in cases:
                prompts = tmp / f"prompts-{n}.jsonl"
                if not prompts.exists():
                    write_prompts(prompts, n)
                # a job (and so an output and a checkpoint) of its own each round: the same
                # job again would find its rows done and send nothing
                job = tmp / f"job-{n}-{transport}-{round_}.toml"
                write_job(
                    job,
                    prompts=prompts,
                    base_url=base_url,
                    concurrency=args.concurrency,
                    transport=transport,
                )
                batchrun = [sys.executable, "-m", "batchrun", "run", str(job), "-q"]
                label = "batchrun" if transport == "aiohttp" else "batchrun, transport=httpx"
                if transport != "aiohttp":
                    rows.append(
                        measure(label, batchrun, requests=n, core=client_core, fake_pid=fake.pid)
                    )
                    continue
                bare = [
                    sys.executable,
                    str(HERE / "bare_aiohttp.py"),
                    base_url,
                    str(prompts),
                    str(tmp / "bare.jsonl"),
                    "--concurrency",
                    str(args.concurrency),
                ]
                pair = [(label, batchrun), ("bare aiohttp", bare)]
                for name, argv in pair if round_ % 2 == 0 else pair[::-1]:
                    rows.append(
                        measure(name, argv, requests=n, core=client_core, fake_pid=fake.pid)
                    )
    finally:
        fake.terminate()
        fake.wait(timeout=10)

    pinning = "fake and client pinned to separate cores" if fake_core else "no pinning"
    print(
        f"zero-latency fake, concurrency {args.concurrency}, {os.cpu_count()} cores, {pinning}, "
        f"load average {load:.2f} at start"
    )
    print_runs(rows)
    if args.repeat > 1:
        print_medians(rows, args.repeat)


HEADER = (
    f"{'client':<27}{'requests':>9}{'wall s':>8}{'req/s':>8}{'CPU ms/req':>12}"
    f"{'fake busy':>11}{'vs bare':>9}"
)


def paired(rows: list[Figures]) -> list[tuple[Figures, Figures]]:
    """Each batchrun run with the bare loop's run of the same round and request count."""
    bare_runs: dict[int, list[Figures]] = {}
    for row in rows:
        if row.name == "bare aiohttp":
            bare_runs.setdefault(row.requests, []).append(row)
    ours: dict[int, list[Figures]] = {}
    for row in rows:
        if row.name == "batchrun":
            ours.setdefault(row.requests, []).append(row)
    return [
        pair for n, runs in ours.items() for pair in zip(runs, bare_runs.get(n, []), strict=True)
    ]


def print_runs(rows: list[Figures]) -> None:
    print(HEADER)
    ratios = {id(ours): ours.rate / bare.rate for ours, bare in paired(rows)}
    for row in rows:
        ratio = ratios.get(id(row), 1.0 if row.name == "bare aiohttp" else None)
        print(
            f"{row.name:<27}{row.requests:>9,}{row.wall:>8.2f}{row.rate:>8,.0f}"
            f"{row.cpu / row.requests * 1e3:>12.3f}{row.fake_cpu / row.wall:>10.0%}"
            f"{'' if ratio is None else f'{ratio:.2f}':>9}"
        )


def print_medians(rows: list[Figures], rounds: int) -> None:
    """Each client's median figures over the rounds; "vs bare" is the median of the rounds'
    paired ratios (each batchrun run against the bare run beside it), with their range."""
    print(f"\nmedians of {rounds} rounds")
    print(HEADER + "  (range)")
    pairs = paired(rows)
    for name in ("batchrun", "bare aiohttp"):
        for n in sorted({row.requests for row in rows if row.name == name}):
            runs = [row for row in rows if row.name == name and row.requests == n]
            wall = statistics.median(row.wall for row in runs)
            cpu = statistics.median(row.cpu for row in runs)
            busy = statistics.median(row.fake_cpu / row.wall for row in runs)
            vs = ""
            if name == "batchrun":
                ratios = [ours.rate / bare.rate for ours, bare in pairs if ours.requests == n]
                if ratios:
                    vs = f"{statistics.median(ratios):>9.2f}  ({min(ratios):.2f}-{max(ratios):.2f})"
            else:
                vs = f"{1:>9.2f}"
            print(
                f"{name:<27}{n:>9,}{wall:>8.2f}{n / wall:>8,.0f}{cpu / n * 1e3:>12.3f}"
                f"{busy:>10.0%}{vs}"
            )


if __name__ == "__main__":
    main()
