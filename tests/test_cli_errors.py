"""`batchrun run` on bad jobs and bad input: exit 2, one clear line, no request sent.

Also the cheap start-up (`--help`, lazy imports) and the pinned public surface.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result

import batchrun
from batchrun.cli import cli
from batchrun.collector import RUN_GC_THRESHOLD
from batchrun.fake import FakeServer
from tests.conftest import fast_job_data, run_python, write_jsonl

UNSET_KEY_VAR = "BATCHRUN_TEST_UNSET_KEY"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """`run` points structlog at the runner's stderr; undo that for later tests."""
    yield
    structlog.reset_defaults()


def to_toml(data: dict[str, Any]) -> str:
    """A job's data as TOML (JSON scalars and arrays are valid TOML values)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
        for name, table in data.items()
        if isinstance(table, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def write_job(tmp_path: Path, base_url: str, **extra: Any) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(to_toml(fast_job_data(tmp_path, base_url, **extra)), encoding="utf-8")
    return path


def invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, ["run", *args], env=env)


def assert_refused(result: Result, fake: FakeServer, *fragments: str) -> None:
    """Exit 2, one `error:` line holding every fragment, no traceback, no request sent."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert fake.stats()["requests"] == 0


# --- bad input -------------------------------------------------------------------------------

Writer = Callable[[Path], None]


def text(content: str) -> Writer:
    def write(path: Path) -> None:
        path.write_text(content, encoding="utf-8")

    return write


def rows(*data: dict[str, Any]) -> Writer:
    def write(path: Path) -> None:
        write_jsonl(path, list(data))

    return write


BAD_INPUTS = [
    pytest.param(
        "in.jsonl",
        text('{"prompt": "a"}\n\n{"prompt": \n'),
        {},
        ["line 3", "not valid JSON"],
        id="malformed-json",
    ),
    pytest.param(
        "in.jsonl",
        text('{"prompt": "a"}\n["prompt", "b"]\n'),
        {},
        ["line 2", "JSON object"],
        id="json-array-line",
    ),
    pytest.param(
        "in.jsonl",
        rows({"prompt": "a"}, {"text": "b"}),
        {},
        ["line 2", "column 'prompt'", "'text'"],
        id="missing-prompt",
    ),
    pytest.param(
        "in.jsonl",
        rows({"text": "a"}, {"body": "b"}),
        {"prompt": {"template": "Say {text}"}},
        ["line 2", "column 'text'", "'body'"],
        id="template-column-missing",
    ),
    pytest.param(
        "in.jsonl",
        rows({"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, {"id": 1, "prompt": "c"}),
        {"prompt": {"id_column": "id"}},
        ["duplicate id '1'", "lines 1 and 3"],
        id="duplicate-id",
    ),
    pytest.param("in.jsonl", text(""), {}, ["no rows"], id="empty-file"),
    pytest.param(
        "in.parquet",
        text('{"prompt": "a"}\n'),
        {},
        ["not a readable Parquet file"],
        id="not-parquet",
    ),
    pytest.param(
        "in.csv",
        text("prompt\na\n"),
        {},
        ["unknown input format"],
        id="unknown-extension",
    ),
    pytest.param("in.jsonl", None, {}, ["no such file"], id="missing-file"),
    pytest.param(
        "in.jsonl",
        rows({"prompt": "a"}),
        {"prompt": {"carry": ["label"]}},
        ["column 'label'", "carried column"],
        id="carried-column-absent",
    ),
]


@pytest.mark.parametrize(("name", "writer", "extra", "fragments"), BAD_INPUTS)
def test_bad_input_refused_before_any_request(
    tmp_path: Path,
    fake: FakeServer,
    name: str,
    writer: Writer | None,
    extra: dict[str, Any],
    fragments: list[str],
) -> None:
    """Bad input exits 2 with one line naming file, line and column; nothing is sent."""
    path = tmp_path / name
    if writer is not None:
        writer(path)
    job = write_job(tmp_path, fake.base_url, input=str(path), **extra)
    assert_refused(invoke([str(job)]), fake, str(path), *fragments)


def test_bad_input_via_flags_refused(tmp_path: Path, fake: FakeServer) -> None:
    """Bad input named by --input, without a job file, is refused the same way."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"text": "b"}])
    result = invoke(["--input", str(path), "--base-url", fake.base_url])
    assert_refused(result, fake, str(path), "line 2", "column 'prompt'")


def test_directory_as_input_refused(tmp_path: Path, fake: FakeServer) -> None:
    """An input path that is a directory exits 2 with one line naming it."""
    path = tmp_path / "in.jsonl"
    path.mkdir()
    job = write_job(tmp_path, fake.base_url, input=str(path))
    assert_refused(invoke([str(job)]), fake, str(path))


# --- bad jobs --------------------------------------------------------------------------------


def test_unknown_key_in_job_file_refused(tmp_path: Path, fake: FakeServer) -> None:
    """A job file with an unknown key exits 2 naming the key and the file."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    job = write_job(tmp_path, fake.base_url, limits={"concurency": 3})
    assert_refused(invoke([str(job)]), fake, str(job), "unknown key 'limits.concurency'")


def test_missing_job_file_refused(tmp_path: Path, fake: FakeServer) -> None:
    """A job file that does not exist exits 2 naming it."""
    path = tmp_path / "nope.toml"
    assert_refused(invoke([str(path)]), fake, str(path), "cannot read the job file")


def test_neither_job_file_nor_input_refused(fake: FakeServer) -> None:
    """`run` with nothing to run exits 2 with a hint."""
    assert_refused(invoke([]), fake, "--input")


def remote_url_to_fake(fake: FakeServer) -> str:
    # 0.0.0.0 is not a loopback name to batchrun, yet on Linux a connection to it reaches
    # 127.0.0.1: if the key check were skipped, the request would show in the fake's stats.
    return fake.base_url.replace("127.0.0.1", "0.0.0.0")


def test_missing_api_key_variable_refused(tmp_path: Path, fake: FakeServer) -> None:
    """An unset key variable for a remote base_url exits 2 naming the variable."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    job = write_job(tmp_path, remote_url_to_fake(fake), api_key_env=UNSET_KEY_VAR)
    result = invoke([str(job)], env={UNSET_KEY_VAR: None})
    assert_refused(result, fake, UNSET_KEY_VAR)


def test_same_job_with_key_set_reaches_fake(tmp_path: Path, fake: FakeServer) -> None:
    """Control for the test above: with the variable set, the job does reach the fake."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    job = write_job(tmp_path, remote_url_to_fake(fake), api_key_env=UNSET_KEY_VAR)
    result = invoke([str(job), "-q"], env={UNSET_KEY_VAR: "sk-test-0123456789"})
    assert result.exit_code == 0, result.output
    assert fake.stats()["requests"] == 1


# --- start-up and public surface -------------------------------------------------------------


def test_python_m_batchrun_help() -> None:
    """`python -m batchrun --help` exits 0 and lists the run command."""
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout
    assert "fake-server" in done.stdout  # listed, though its module loads only when asked


def test_fake_server_command_through_the_group() -> None:
    """`batchrun fake-server` is found through the command group, which loads it on demand."""
    from batchrun.cli import cli

    result = CliRunner().invoke(cli, ["fake-server", "--help"])
    assert result.exit_code == 0, result.output
    assert "--latency" in result.output
    assert CliRunner().invoke(cli, ["fake-servers"]).exit_code == 2  # others: click's answer


HEAVY = ("polars", "pyarrow", "httpx", "structlog", "aiohttp", "pydantic", "ray", "plotly")


def test_cli_import_leaves_heavy_modules_out() -> None:
    """`import batchrun.cli` loads none of the heavy dependencies."""
    code = f"import sys, batchrun.cli\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    done = run_python(code)
    assert done.stdout.strip() == ""


#: what a small run leaves out: polars; rich and pygments (which structlog and httpx would
#: pull in); pyarrow's kernels and datasets (resume and compaction read parts without them);
#: the fake server's command and config; tenacity (no row was retried)
SMALL_RUN_LEAVES_OUT = (
    "polars",
    "rich",
    "pygments",
    "pyarrow.compute",
    "pyarrow.dataset",
    "batchrun.fake",
    "tenacity",
)


def test_small_run_imports_only_what_it_uses(tmp_path: Path, fake: FakeServer) -> None:
    """A 20-row `batchrun run` imports none of `SMALL_RUN_LEAVES_OUT`, yet rich still
    imports afterwards; aiohttp's default TLS contexts have loaded no CA roots (the run's
    own context is handed to aiohttp), and do when one is used; and main() leaves the
    loaded objects out of the collector's passes at exit, having set it to collect less
    often from the start."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(20)])
    argv = ["batchrun", "run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url]
    code = (
        f"import sys\nsys.argv = {argv!r} + ['-q', '--no-progress']\n"
        "from batchrun.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "import gc\n"
        # main() collects less often, and spares the collector's passes at exit
        "print(gc.get_freeze_count() > 10_000, gc.get_threshold()[0])\n"
        f"print(','.join(m for m in {SMALL_RUN_LEAVES_OUT!r} if m in sys.modules))\n"
        "import rich.console\n"
        "import aiohttp.connector as connector\n"
        "context = connector._SSL_CONTEXT_VERIFIED\n"
        "deferred = '_deferred' in context.__dict__\n"
        "context.cert_store_stats()\n"
        "print(deferred, '_deferred' in context.__dict__)\n"
        # pydantic's plugins were never looked for (the command turns them off)
        "import pydantic.plugin._loader as loader\n"
        "print(loader._plugins is None)\n"
    )
    done = run_python(code)
    assert "complete: 20 ok" in done.stderr
    assert done.stdout.splitlines() == [f"True {RUN_GC_THRESHOLD}", "", "True False", "True"]


def test_the_command_keeps_a_pydantic_plugins_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command turns pydantic's plugins off only when the environment says nothing;
    importing batchrun as a library leaves them alone."""
    import os

    from batchrun import cli

    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "some_plugin")
    cli._without_pydantic_plugins()
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "some_plugin"
    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS")
    import batchrun.job  # noqa: F401

    assert "PYDANTIC_DISABLE_PLUGINS" not in os.environ
    cli._without_pydantic_plugins()
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"


PUBLIC = [
    "AuthError",
    "BalanceError",
    "BatchrunError",
    "ConfigError",
    "InputError",
    "Interrupted",
    "Job",
    "PermanentError",
    "RateLimited",
    "RequestError",
    "RetryableError",
    "RunStopped",
    "RunSummary",
    "__version__",
    "load_job",
    "run_job",
]


def test_public_surface_pinned() -> None:
    """`batchrun.__all__` is exactly the pinned list, sorted."""
    assert batchrun.__all__ == PUBLIC
    assert sorted(batchrun.__all__) == batchrun.__all__


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_resolves(name: str) -> None:
    """Every public name resolves on the package."""
    assert getattr(batchrun, name) is not None
