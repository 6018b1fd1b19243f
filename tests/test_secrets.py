"""The API key never appears in anything a run produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import cli
from batchrun.fake import FakeServer
from tests.conftest import fast_job_data, write_jsonl
from tests.test_cli_errors import to_toml

SENTINEL = "sk-SENTINEL-7f3a9c1e5b2d4086"


def _run(tmp_path: Path, fake: FakeServer, *extra: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "batchrun", "run", "--input", str(tmp_path / "in.jsonl")]
    command += ["--output", str(tmp_path / "out.parquet"), "--base-url", fake.base_url]
    command += ["--api-key-env", "SENTINEL_KEY", "--max-attempts", "3", "-v", *extra]
    env = {**os.environ, "SENTINEL_KEY": SENTINEL}
    return subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)


#: files the tests write themselves (a job file may quote the key on purpose)
_INPUTS = ("in.jsonl", "job.toml")


def _everything_written(tmp_path: Path, result: subprocess.CompletedProcess[bytes]) -> bytes:
    blobs = [result.stdout, result.stderr]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in _INPUTS]
    blobs += [p.read_bytes() for p in written]
    return b"\n".join(blobs)


def test_sentinel_key_is_nowhere_after_a_run_with_retries(tmp_path: Path, fake: FakeServer) -> None:
    """A run with retries and error rows leaves the key in no stream, log, checkpoint or output."""
    fake.update(api_key=SENTINEL)
    rows = [{"prompt": "a [[fault:500]]"}, {"prompt": "b [[fault:400*always]]"}, {"prompt": "c"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = _run(tmp_path, fake, "--log-file", str(tmp_path / "run.log"), "--limit", "3")
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "run.log").stat().st_size > 0
    assert SENTINEL.encode() not in _everything_written(tmp_path, result)


def test_key_echoed_by_the_server_is_redacted(tmp_path: Path, fake: FakeServer) -> None:
    """A server that echoes a rejected key in its error does not get it into our output."""
    fake.update(api_key="some-other-key-123456")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = _run(tmp_path, fake)
    assert result.returncode == 3
    assert b"rejected the API key" in result.stderr and b"[redacted]" in result.stderr
    assert SENTINEL.encode() not in _everything_written(tmp_path, result)


def test_a_short_dummy_key_does_not_cut_words_out_of_errors(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local server's dummy key ("x") is too short to redact: a server's error keeps its
    words ("Model Not Exist", not "Model Not E[redacted]ist"), as the logs do."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q"}])
    monkeypatch.setenv("DUMMY_KEY", "x")
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.parquet")]
    args += ["--base-url", fake.base_url, "--api-key-env", "DUMMY_KEY", "--model", "no-such-model"]
    result = CliRunner().invoke(cli, [*args, "-q"])
    assert result.exit_code == 1, result.output
    (error,) = pq.read_table(tmp_path / "out.parquet", columns=["error"])["error"].to_pylist()
    assert error == "HTTP 400: Model Not Exist"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_key_echoed_inside_a_200_answer_never_reaches_a_file(
    tmp_path: Path, fake: FakeServer, stream: bool
) -> None:
    """A server that repeats the key in the answer's id, content and reasoning: the rows are
    kept, the key is redacted in the checkpoint, the output and the cache."""
    fake.update(api_key=SENTINEL, echo_auth=True)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    extra = ["--model", "deepseek-reasoner", "--cache", str(tmp_path / "cache")]
    extra += ["--stream"] if stream else []
    # --limit keeps the checkpoint's part files beside the output, so they are looked at too
    result = _run(tmp_path, fake, "--limit", "2", *extra)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "out.parquet.parts").glob("part-*.parquet"))
    assert list((tmp_path / "cache").rglob("*.json"))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert all("(you sent Bearer [redacted])" in r["content"] for r in rows)
    assert all("[redacted]" in r["reasoning_content"] for r in rows)
    assert all(r["response_id"].endswith("Bearer [redacted]") for r in rows)
    assert SENTINEL.encode() not in _everything_written(tmp_path, result)


KEY_SHAPED = "sk-" + "a1B2" * 8


@pytest.mark.parametrize(
    ("table", "place"),
    [
        pytest.param(
            f'[params]\nextra_body = {{ auth = "{KEY_SHAPED}" }}',
            "params.extra_body.auth",
            id="extra_body",
        ),
        pytest.param(
            f'[params.extra_body.headers]\nx = ["Bearer {KEY_SHAPED}"]',
            "params.extra_body.headers.x[0]",
            id="nested-list",
        ),
        pytest.param(f'[params]\nstop = ["end", "{KEY_SHAPED}"]', "params.stop[1]", id="stop"),
        pytest.param(f'[prompt]\nsystem = "use {KEY_SHAPED}"', "prompt.system", id="system"),
        pytest.param(
            '[params.extra_body]\napi_key = "anything-at-all"',
            "params.extra_body.api_key",
            id="credential-name",
        ),
    ],
)
def test_key_shaped_value_anywhere_in_the_job_is_refused(
    tmp_path: Path, fake: FakeServer, table: str, place: str
) -> None:
    """A key-shaped value (or a nested api_key) anywhere in the job: exit 2 naming where,
    without repeating the value, and nothing sent."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    job = tmp_path / "job.toml"
    base = to_toml(fast_job_data(tmp_path, fake.base_url))
    job.write_text(f"{base}\n{table}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 2, result.output
    assert f"{place!r} holds what looks like an API key" in result.output
    assert KEY_SHAPED not in result.output and "anything-at-all" not in result.output
    assert fake.stats()["requests"] == 0


def test_job_values_reach_no_metadata_unredacted(tmp_path: Path, fake: FakeServer) -> None:
    """A key that is not sk-shaped, quoted in a job value: the checkpoint manifest and the
    output's metadata hold it redacted, and a second run still knows the job as its own."""
    key = "proxy-token-5d1e2f3a4b"
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    job = tmp_path / "job.toml"
    data = fast_job_data(tmp_path, fake.base_url, api_key_env="SENTINEL_KEY")
    data["prompt"] = {"system": f"the proxy token is {key}"}
    job.write_text(to_toml(data), encoding="utf-8")
    env = {**os.environ, "SENTINEL_KEY": key}
    command = [sys.executable, "-m", "batchrun", "run", str(job), "-q"]
    first = subprocess.run([*command, "--limit", "1"], capture_output=True, env=env, check=False)
    assert first.returncode == 0, first.stderr
    manifest = (tmp_path / "out.parquet.parts" / "manifest.json").read_bytes()
    assert b"[redacted]" in manifest and key.encode() not in manifest
    second = subprocess.run(command, capture_output=True, env=env, check=False)
    assert second.returncode == 0, second.stderr  # the redacted fingerprint still matches
    metadata = b"".join(pq.read_schema(tmp_path / "out.parquet").metadata.values())
    assert key.encode() not in metadata
    assert b"the proxy token is" not in metadata  # a digest of the job, not its values
    assert key.encode() not in _everything_written(tmp_path, second)
