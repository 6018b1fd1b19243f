"""End to end: jobs through the real HTTP path to the fake server on 127.0.0.1."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import cli
from batchrun.collector import RUN_GC_THRESHOLD
from batchrun.errors import AuthError, BalanceError, ConfigError
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import Pool, PoolSettings
from batchrun.runner import RunSummary, run_job
from batchrun.sinks import list_parts, parts_dir
from tests.conftest import fast_job_data, write_jsonl

EXPECTED_COLUMNS = [
    "id",
    "status",
    "content",
    "reasoning_content",
    "finish_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "reasoning_tokens",
    "attempts",
    "rate_limited",
    "latency_s",
    "queued_s",
    "http_status",
    "error",
    "response_id",
    "started_at",
    "finished_at",
    "error_class",
    "cost_usd",
    "cost_worst_case",
    "cached",
]

SETTINGS = PoolSettings(flush_rows=2, flush_seconds=0.05, stop_grace=2.0)


def run(tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **extra: Any) -> RunSummary:
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = build_job(fast_job_data(tmp_path, fake.base_url, **extra))
    return run_job(job, settings=PoolSettings(flush_rows=2, flush_seconds=0.05))


def read_output(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def prompts(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"{prefix} {i}"} for i in range(n)]


def test_the_collector_is_set_for_the_run_while_it_runs_only(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the pool runs, the objects loaded before it (modules, the job, the client) are
    frozen out of the collector's passes and the young generation is collected less often
    (the scan and compaction too, with what they load); once run_job returns both are as
    they were, for a program that calls it."""
    seen: list[tuple[int, int]] = []
    pool_run = Pool.run

    async def run_watched(self: Pool) -> None:
        seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))
        await pool_run(self)

    monkeypatch.setattr(Pool, "run", run_watched)
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    summary = run(tmp_path, fake, prompts(3))
    assert summary.rows_ok == 3
    (frozen, threshold) = seen[0]
    assert frozen > 10_000  # pyarrow, httpx, aiohttp, pydantic and the rest
    assert threshold == max(RUN_GC_THRESHOLD, before[0])
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def test_jsonl_prompts_give_one_ok_row_each_in_input_order(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Each JSONL prompt comes back as one ok row answering its own prompt, in input order."""
    summary = run(tmp_path, fake, prompts(12), prompt={"id_column": "id"})
    rows = read_output(tmp_path)
    assert summary.complete and summary.rows_ok == 12 and summary.exit_code == 0
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    assert all(r["content"] == f"echo: question {i}" for i, r in enumerate(rows))
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)
    assert not parts_dir(tmp_path / "out.parquet").exists()


def test_output_schema_is_exact(tmp_path: Path, fake: FakeServer) -> None:
    """The output columns, their order and their Arrow types are the documented ones."""
    run(tmp_path, fake, prompts(2), prompt={"id_column": "id", "carry": ["prompt"]})
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.names == ["id", "prompt", *EXPECTED_COLUMNS[1:]]
    types = {field.name: field.type for field in schema}
    assert types["id"] == pa.string() and types["prompt"] == pa.string()
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens"):
        assert types[name] == pa.int64()
    assert types["attempts"] == pa.int32() and types["http_status"] == pa.int32()
    assert types["latency_s"] == pa.float64()
    assert types["started_at"] == pa.timestamp("ms", tz="UTC")
    assert types["cost_usd"] == pa.float64()


def test_usage_columns_come_from_the_server(tmp_path: Path, fake: FakeServer) -> None:
    """Token columns hold the server's usage, cache hits included."""
    system = "You are a careful assistant. " * 40  # long enough for 64-token cache units
    run(tmp_path, fake, prompts(3), prompt={"system": system})
    rows = read_output(tmp_path)
    for row in rows:
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        hit, miss = row["prompt_cache_hit_tokens"], row["prompt_cache_miss_tokens"]
        assert hit + miss == row["prompt_tokens"]
    assert sum(r["prompt_cache_hit_tokens"] for r in rows) > 0


def test_reasoner_rows_carry_reasoning(tmp_path: Path, fake: FakeServer) -> None:
    """deepseek-reasoner answers fill reasoning_content and reasoning_tokens."""
    run(tmp_path, fake, prompts(2), model="deepseek-reasoner")
    row = read_output(tmp_path)[0]
    assert row["reasoning_content"] == "thinking about: question 0"
    assert row["reasoning_tokens"] and row["reasoning_tokens"] > 0


def test_parquet_input_with_a_template(tmp_path: Path, fake: FakeServer) -> None:
    """A Parquet prompt set with a template over its columns; carried columns keep their types."""
    pq.write_table(
        pa.table({"doc": [10, 11, 12], "topic": ["tides", "ice", "rain"]}), tmp_path / "in.parquet"
    )
    data = fast_job_data(
        tmp_path,
        fake.base_url,
        input=str(tmp_path / "in.parquet"),
        prompt={"id_column": "doc", "template": "Explain {topic}.", "carry": ["doc", "topic"]},
    )
    run_job(build_job(data), settings=SETTINGS)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("doc").type == pa.int64()
    assert table.column("id").to_pylist() == [10, 11, 12]  # int ids stay ints
    assert table.column("content").to_pylist() == [
        "echo: Explain tides.",
        "echo: Explain ice.",
        "echo: Explain rain.",
    ]


def test_messages_rows_mixed_with_prompt_rows_and_row_overrides(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Messages and prompt rows mix in one set; a row_params temperature wins over the job's."""
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "b", "prompt": "plain", "temperature": 0.0},
    ]
    prompt = {"id_column": "id", "row_params": ["temperature"]}
    run(tmp_path, fake, rows, prompt=prompt, params={"temperature": 1.5})
    sent = {body["messages"][-1]["content"]: body for body in fake.requests()}
    assert sent["hi"]["temperature"] == 1.5
    assert sent["plain"]["temperature"] == 0.0
    assert [r["content"] for r in read_output(tmp_path)] == ["echo: hi", "echo: plain"]


def test_batch_format_input_uses_custom_id_and_body(tmp_path: Path, fake: FakeServer) -> None:
    """OpenAI Batch API lines are recognised: custom_id is the id and body the request."""
    rows = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "deepseek-chat",
                "messages": [{"role": "user", "content": f"b{i}"}],
                "max_tokens": 77,
            },
        }
        for i in range(3)
    ]
    run(tmp_path, fake, rows)
    assert [r["id"] for r in read_output(tmp_path)] == ["req-0", "req-1", "req-2"]
    assert {body["max_tokens"] for body in fake.requests()} == {77}


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        pytest.param("429*2@0.01", "rate_limit", id="429-retry-after"),
        pytest.param("500", "server", id="500"),
        pytest.param("502", "server", id="502"),
        pytest.param("503", "server", id="503-html"),
        pytest.param("504", "server", id="504"),
        pytest.param("drop", "network", id="dropped-connection"),
        pytest.param("blank", "bad_response", id="whitespace-200"),
        pytest.param("truncated", "bad_response", id="truncated-json-200"),
        pytest.param("isr", "server_busy", id="insufficient-system-resource"),
    ],
)
def test_retried_classes_recover(
    tmp_path: Path, fake: FakeServer, fault: str, error_class: str
) -> None:
    """Each retryable failure is retried and the row ends ok, with its attempts counted."""
    times = int(fault.split("*")[1].split("@")[0]) if "*" in fault else 1
    summary = run(tmp_path, fake, [{"prompt": f"x [[fault:{fault}]]"}, {"prompt": "clean"}])
    rows = read_output(tmp_path)
    assert summary.exit_code == 0
    assert rows[0]["status"] == "ok" and rows[0]["attempts"] == times + 1
    assert rows[1]["attempts"] == 1
    assert summary.statistics is not None
    assert summary.statistics.retries_by_class == {error_class: times}


def test_keepalive_blank_lines_before_the_body_are_not_an_error(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Blank keep-alive lines before a JSON body parse as one good answer, first time."""
    fake.update(keepalive_lines=5, keepalive_interval=0.01)
    run(tmp_path, fake, [{"prompt": "wait [[fault:keepalive]]"}])
    row = read_output(tmp_path)[0]
    assert row["status"] == "ok" and row["attempts"] == 1
    assert row["content"] == "echo: wait [[fault:keepalive]]"


def test_attempt_deadline_covers_keepalive_lines(tmp_path: Path, fake: FakeServer) -> None:
    """Keep-alive lines that outlast the per-attempt deadline end the attempt as a timeout."""
    fake.update(keepalive_lines=50, keepalive_interval=0.02)
    summary = run(
        tmp_path,
        fake,
        [{"prompt": "slow [[fault:keepalive*always]]"}],
        limits={"timeout": 0.2, "max_attempts": 2},
    )
    row = read_output(tmp_path)[0]
    assert row["status"] == "error" and row["error_class"] == "timeout"
    assert row["attempts"] == 2 and summary.exit_code == 1


@pytest.mark.parametrize(
    ("fault", "status", "error_class"),
    [
        pytest.param("400", 400, "bad_request", id="400"),
        pytest.param("404", 404, "not_found", id="404"),
        pytest.param("422", 422, "invalid_params", id="422"),
    ],
)
def test_permanent_errors_are_recorded_not_retried(
    tmp_path: Path, fake: FakeServer, fault: str, status: int, error_class: str
) -> None:
    """400, 404 and 422 become error rows with the server's message after one attempt."""
    summary = run(tmp_path, fake, [{"prompt": f"[[fault:{fault}*always]]"}, {"prompt": "fine"}])
    bad, good = read_output(tmp_path)
    assert bad["status"] == "error" and bad["attempts"] == 1
    assert bad["http_status"] == status and bad["error_class"] == error_class
    assert bad["error"].startswith(f"HTTP {status}: ")
    assert good["status"] == "ok"
    assert summary.complete and summary.exit_code == 1
    assert fake.stats()["requests"] == 2


def test_server_validation_error_is_a_row_error(tmp_path: Path, fake: FakeServer) -> None:
    """A model the server does not know gives an error row carrying its message."""
    rows = [{"prompt": "hi", "model": "no-such-model"}, {"prompt": "ok"}]
    run(tmp_path, fake, rows, prompt={"row_params": ["model"]})
    bad, good = read_output(tmp_path)
    assert bad["status"] == "error" and bad["http_status"] == 400
    assert "Model Not Exist" in bad["error"] and good["status"] == "ok"


def test_exhausted_attempts_give_an_error_row_and_the_run_goes_on(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A row failing every attempt is recorded as an error; the other rows still finish."""
    rows = [{"prompt": "[[fault:500*always]]"}, *prompts(5)]
    summary = run(tmp_path, fake, rows, limits={"max_attempts": 3})
    out = read_output(tmp_path)
    assert out[0]["status"] == "error" and out[0]["attempts"] == 3
    assert out[0]["error_class"] == "server" and out[0]["http_status"] == 500
    assert all(r["status"] == "ok" for r in out[1:])
    assert summary.rows_error == 1 and summary.exit_code == 1


@pytest.mark.parametrize("usage_chunk", ["final", "separate"])
def test_streaming_collects_content_and_usage(
    tmp_path: Path, fake: FakeServer, usage_chunk: str
) -> None:
    """Streamed answers are assembled, with usage from the final or a separate chunk."""
    fake.update(usage_chunk=usage_chunk)
    run(tmp_path, fake, prompts(3), stream=True, model="deepseek-reasoner")
    rows = read_output(tmp_path)
    assert [r["content"] for r in rows] == [f"echo: question {i}" for i in range(3)]
    assert rows[0]["reasoning_content"] == "thinking about: question 0"
    assert all(r["prompt_tokens"] and r["completion_tokens"] for r in rows)
    assert all(body["stream"] is True for body in fake.requests())


def test_streaming_keepalive_comments_are_ignored(tmp_path: Path, fake: FakeServer) -> None:
    """`: keep-alive` comments before the first chunk do not disturb a streamed answer."""
    run(tmp_path, fake, [{"prompt": "s [[fault:keepalive]]"}], stream=True)
    row = read_output(tmp_path)[0]
    assert row["status"] == "ok" and row["content"] == "echo: s [[fault:keepalive]]"


def test_unauthorized_stops_the_run(tmp_path: Path, fake: FakeServer, monkeypatch: Any) -> None:
    """A 401 stops the whole run as AuthError, without error rows for the untried rest."""
    fake.update(api_key="right-key-123456")
    monkeypatch.setenv("TEST_KEY", "wrong-key-654321")
    with pytest.raises(AuthError) as caught:
        run(tmp_path, fake, prompts(20), api_key_env="TEST_KEY")
    assert caught.value.summary is not None and not caught.value.summary.complete
    assert not (tmp_path / "out.parquet").exists()
    assert fake.stats()["requests"] <= 4 * 2  # at most the workers' first requests


def test_right_key_is_sent_as_bearer(tmp_path: Path, fake: FakeServer, monkeypatch: Any) -> None:
    """The key from the named variable authorises the requests."""
    fake.update(api_key="right-key-123456")
    monkeypatch.setenv("TEST_KEY", "right-key-123456")
    summary = run(tmp_path, fake, prompts(3), api_key_env="TEST_KEY")
    assert summary.rows_ok == 3


def test_insufficient_balance_keeps_what_is_done_and_resumes(
    tmp_path: Path, fake: FakeServer
) -> None:
    """402 stops the run with finished rows on disk; after a top-up the same job resumes."""
    fake.update(token_budget=400)
    with pytest.raises(BalanceError) as caught:
        run(tmp_path, fake, prompts(40), limits={"concurrency": 2})
    assert "top up and run the same command again" in str(caught.value)
    done = pq.read_table(list_parts(parts_dir(tmp_path / "out.parquet")))
    ok_ids = set(done.filter(pa.compute.equal(done["status"], "ok"))["id"].to_pylist())
    assert 0 < len(ok_ids) < 40
    before = len(fake.requests())
    fake.update(token_budget=None)
    summary = run(tmp_path, fake, prompts(40), limits={"concurrency": 2})
    assert summary.complete and summary.rows_ok == 40
    resent = [b["messages"][-1]["content"] for b in fake.requests()[before:]]
    assert not {f"question {i}" for i in range(40) if f"r{i}" in ok_ids} & set(resent)
    assert [r["id"] for r in read_output(tmp_path)] == [f"r{i}" for i in range(40)]


def test_limit_sends_only_the_first_rows(tmp_path: Path, fake: FakeServer) -> None:
    """--limit N sends N requests and writes N rows."""
    summary = run(tmp_path, fake, prompts(10), limit=3)
    assert summary.rows_total == 3 and fake.stats()["requests"] == 3
    assert len(read_output(tmp_path)) == 3


def test_finished_job_run_again_sends_nothing(tmp_path: Path, fake: FakeServer) -> None:
    """Running a complete job again sends no request and reports it complete."""
    run(tmp_path, fake, prompts(4))
    sent = fake.stats()["requests"]
    summary = run(tmp_path, fake, prompts(4))
    assert summary.complete and summary.statistics is None
    assert fake.stats()["requests"] == sent


def test_cli_exit_codes(tmp_path: Path, fake: FakeServer) -> None:
    """Exit 0 when every row is ok, 1 with error rows, 3 when stopped."""
    write_jsonl(tmp_path / "ok.jsonl", prompts(2))
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "[[fault:400*always]]"}])
    runner = CliRunner()
    common = ["--base-url", fake.base_url, "--max-attempts", "2"]
    ok = runner.invoke(cli, ["run", "--input", str(tmp_path / "ok.jsonl"), *common])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ok.results.parquet").exists()
    bad = runner.invoke(cli, ["run", "--input", str(tmp_path / "bad.jsonl"), *common])
    assert bad.exit_code == 1, bad.output
    fake.update(token_budget=0)
    write_jsonl(tmp_path / "more.jsonl", prompts(2, "more"))
    stopped = runner.invoke(cli, ["run", "--input", str(tmp_path / "more.jsonl"), *common])
    assert stopped.exit_code == 3
    assert "insufficient balance" in stopped.output


def test_flags_override_the_job_file(tmp_path: Path, fake: FakeServer) -> None:
    """A flag wins over the same key in the job file."""
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    (tmp_path / "job.toml").write_text(
        f'input = "in.jsonl"\noutput = "out.parquet"\nbase_url = "{fake.base_url}"\n'
        'model = "deepseek-chat"\n[params]\nmax_tokens = 100\n'
    )
    result = CliRunner().invoke(
        cli, ["run", str(tmp_path / "job.toml"), "--max-tokens", "55", "--model", "fake-small"]
    )
    assert result.exit_code == 0, result.output
    bodies = fake.requests()
    assert {b["max_tokens"] for b in bodies} == {55}
    assert {b["model"] for b in bodies} == {"fake-small"}


def test_unauthorized_mid_job_exits_3_with_done_rows_kept(
    tmp_path: Path, fake: FakeServer, monkeypatch: Any
) -> None:
    """A key rejected after some rows are done exits 3 and keeps those rows on disk."""
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    monkeypatch.setenv("TEST_KEY", "first-key-123456")
    fake.update(api_key="first-key-123456")
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet")]
    args += ["--base-url", fake.base_url, "--api-key-env", "TEST_KEY"]
    runner = CliRunner()
    assert runner.invoke(cli, [*args, "--limit", "2"]).exit_code == 0
    fake.update(api_key="rotated-key-654321")
    result = runner.invoke(cli, args)
    assert result.exit_code == 3
    assert "rejected the API key" in result.output
    assert "first-key-123456" not in result.output
    kept = pq.read_table(list_parts(parts_dir(tmp_path / "o.parquet")))
    assert sorted(kept["id"].to_pylist()) == ["r0", "r1"]


def test_library_runs_the_demo_job(tmp_path: Path) -> None:
    """load_job + run_job run the shipped demo job (its own fake, faults retried) to the end."""
    import batchrun

    job = batchrun.load_job(Path(__file__).parent.parent / "jobs" / "demo.toml")
    job.output = tmp_path / "demo.parquet"
    assert job.fake is not None
    job.fake.latency = job.fake.latency_jitter = 0.0
    job.fake.retry_after = 0.01
    job.limits.initial_backoff = job.limits.max_backoff = 0.01
    summary = batchrun.run_job(job)
    assert summary.complete and summary.exit_code == 0
    assert summary.rows_ok == 40 == pq.read_metadata(job.output).num_rows
    assert summary.statistics is not None and summary.statistics.retries_by_class


def test_stream_ending_without_done_is_retried(tmp_path: Path, fake: FakeServer) -> None:
    """A stream cut before [DONE] is a failed attempt; the retry completes the row."""
    run(tmp_path, fake, [{"prompt": "cut [[fault:truncated]]"}], stream=True)
    row = read_output(tmp_path)[0]
    assert row["status"] == "ok" and row["attempts"] == 2
    assert row["content"] == "echo: cut [[fault:truncated]]"


def test_stream_of_only_keepalives_past_the_idle_limit_fails(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A stream that sends keep-alive comments and nothing else stalls out as a timeout."""
    fake.update(keepalive_lines=40, keepalive_interval=0.01)
    run(
        tmp_path,
        fake,
        [{"prompt": "stall [[fault:keepalive*always]]"}],
        stream=True,
        limits={"read_timeout": 0.1, "max_attempts": 2},
    )
    row = read_output(tmp_path)[0]
    assert row["status"] == "error" and row["error_class"] == "timeout"
    assert "keep-alive" in row["error"] and row["attempts"] == 2


def test_estimate_sends_nothing(tmp_path: Path, fake: FakeServer) -> None:
    """`estimate` reads the input and prints counts and a cost range; the fake sees nothing."""
    write_jsonl(tmp_path / "in.jsonl", prompts(25))
    args = ["--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url]
    args += ["--model", "deepseek-chat", "--max-tokens", "100", "--rpm", "50"]
    runner = CliRunner()
    for command in (["estimate", *args], ["run", *args, "--dry-run"]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert "requests: 25 (deepseek-chat 25)" in result.output
        assert "low" in result.output and "high" in result.output
        assert "at least 0.5 minutes" in result.output
    assert fake.stats()["requests"] == 0


def test_cost_per_row_for_chat_and_reasoner_with_cache_hits(
    tmp_path: Path, fake: FakeServer
) -> None:
    """cost_usd comes from each row's own usage at the current price, cache hits included."""
    from datetime import UTC, datetime

    from batchrun.prices import PriceTable

    system = "You are a careful assistant. " * 40
    rows = [
        {"prompt": f"q{i}", "model": m}
        for i, m in enumerate(["deepseek-chat"] * 2 + ["deepseek-reasoner"] * 2)
    ]
    run(tmp_path, fake, rows, prompt={"system": system, "row_params": ["model"]})
    out = read_output(tmp_path)
    table = PriceTable.load()
    for row in out:
        price = table.price_for(row["model"], datetime.now(UTC))
        assert price is not None and price.off_peak is None
        expected = (
            row["prompt_cache_hit_tokens"] * price.cache_hit
            + row["prompt_cache_miss_tokens"] * price.cache_miss
            + row["completion_tokens"] * price.output
        ) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)
    assert sum(r["prompt_cache_hit_tokens"] for r in out) > 0
    assert out[2]["reasoning_tokens"] > 0


def test_unknown_model_gives_null_cost(tmp_path: Path, fake: FakeServer) -> None:
    """A model without a price gets a null cost_usd, never a made-up number."""
    run(tmp_path, fake, [{"prompt": "hi"}], model="fake-model")
    row = read_output(tmp_path)[0]
    assert row["status"] == "ok" and row["cost_usd"] is None


def test_max_cost_stops_before_overspending_and_resumes_with_a_higher_cap(
    tmp_path: Path, fake: FakeServer
) -> None:
    """--max-cost stops cleanly (exit 3, spend reported) within the cap; a higher cap resumes."""
    from batchrun.errors import CostCapReached

    rows = prompts(30)
    cap = 0.00012  # under three rows' worst case (all of max_tokens 100 at the output price)
    with pytest.raises(CostCapReached) as caught:
        run(tmp_path, fake, rows, max_cost=cap, params={"max_tokens": 100})
    assert caught.value.spent <= cap
    assert caught.value.next_worst is not None
    assert caught.value.spent + caught.value.next_worst > cap  # it really would not fit
    assert "the next request could cost up to $" in str(caught.value)
    assert "run again with a higher --max-cost" in str(caught.value)
    done = pq.read_table(list_parts(parts_dir(tmp_path / "out.parquet")))
    assert 0 < done.num_rows < 30
    assert sum(done["cost_usd"].to_pylist()) <= cap
    summary = run(tmp_path, fake, rows, max_cost=1.0, params={"max_tokens": 100})
    assert summary.complete and summary.rows_ok == 30, repr(summary)


def test_carried_column_named_like_an_output_column_is_refused(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Carrying a column called like one batchrun writes is a config error before sending."""
    from batchrun.errors import ConfigError

    with pytest.raises(ConfigError, match="carried column 'model'"):
        run(
            tmp_path, fake, [{"prompt": "x", "model": "deepseek-chat"}], prompt={"carry": ["model"]}
        )
    assert fake.stats()["requests"] == 0


def test_template_that_cannot_format_a_row_names_it(tmp_path: Path, fake: FakeServer) -> None:
    """A format spec that does not fit a row's value is an input error naming line and column."""
    from batchrun.errors import InputError

    with pytest.raises(InputError, match=r"line 2, column 'score'.*cannot format"):
        run(
            tmp_path,
            fake,
            [{"score": 1.5}, {"score": "high"}],
            prompt={"template": "Score {score:.1f}"},
        )
    assert fake.stats()["requests"] == 0


def test_max_cost_needs_a_price_for_the_model(tmp_path: Path, fake: FakeServer) -> None:
    """A spend cap cannot be kept for a model without a price: refused, nothing sent."""
    from batchrun.errors import ConfigError

    with pytest.raises(ConfigError, match="without a price \\(fake-model\\)"):
        run(tmp_path, fake, prompts(2), model="fake-model", max_cost=1.0)
    assert fake.stats()["requests"] == 0


def test_max_cost_checks_models_named_by_rows_too(tmp_path: Path, fake: FakeServer) -> None:
    """A row that names an unpriced model would slip past the cap: refused, nothing sent."""
    from batchrun.errors import ConfigError

    rows = [{"prompt": "a"}, {"prompt": "b", "model": "fake-row-model"}]
    with pytest.raises(ConfigError, match="without a price \\(fake-row-model\\)"):
        run(tmp_path, fake, rows, max_cost=1.0, prompt={"row_params": ["model"]})
    assert fake.stats()["requests"] == 0


def test_output_file_rows_writes_a_directory_polars_reads_as_the_one_file_run(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Past `output_file_rows`, OUTPUT is a directory of files of at most N rows that polars
    reads back as the same rows, in order, as a one-file run."""
    import polars as pl

    one = tmp_path / "one"
    one.mkdir()
    run(one, fake, prompts(7), prompt={"id_column": "id"})
    run(tmp_path, fake, prompts(7), prompt={"id_column": "id"}, output_file_rows=3)
    output = tmp_path / "out.parquet"
    files = sorted(output.iterdir())
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]
    assert len({pq.read_schema(f) for f in files}) == 1
    assert pq.read_schema(files[0]).metadata == pq.read_schema(one / "out.parquet").metadata
    together = pl.scan_parquet(output / "*.parquet").collect()
    alone = pl.read_parquet(one / "out.parquet")
    kept = ["id", "status", "content"]
    assert together.select(kept).equals(alone.select(kept))
    assert [r["id"] for r in together.iter_rows(named=True)] == [f"r{i}" for i in range(7)]
    assert pq.read_table(output)["id"].to_pylist() == [f"r{i}" for i in range(7)]  # pyarrow too
    assert not parts_dir(output).exists()
    assert not list(tmp_path.glob(".out.parquet.tmp-*"))


def test_a_directory_output_run_again_sends_nothing(tmp_path: Path, fake: FakeServer) -> None:
    """A finished job whose output is a directory is found done: nothing is sent again."""
    run(tmp_path, fake, prompts(5), output_file_rows=2)
    sent = fake.stats()["requests"]
    summary = run(tmp_path, fake, prompts(5), output_file_rows=2)
    assert summary.complete and summary.statistics is None and summary.rows_ok == 5
    assert fake.stats()["requests"] == sent


def test_status_report_and_export_read_a_directory_output(tmp_path: Path, fake: FakeServer) -> None:
    """`run --output-file-rows` writes a directory; `status`, `report` and `export` take it
    as the whole table."""
    write_jsonl(tmp_path / "in.jsonl", prompts(5))
    output = str(tmp_path / "out.parquet")
    ran = CliRunner().invoke(
        cli,
        ["run", "--input", str(tmp_path / "in.jsonl"), "--output", output]
        + ["--base-url", fake.base_url, "--id-column", "id", "--output-file-rows", "2"],
    )
    assert ran.exit_code == 0, ran.output
    assert len(list((tmp_path / "out.parquet").iterdir())) == 3
    status = CliRunner().invoke(cli, ["status", output])
    assert status.exit_code == 0, status.output
    assert "complete" in status.output and "5 done of 5: 5 ok" in status.output
    report = CliRunner().invoke(cli, ["report", output, "--json"])
    assert report.exit_code == 0, report.output
    assert [(v["rows"], v["ok"]) for v in orjson.loads(report.output)] == [(5, 5)]
    exported = tmp_path / "out.jsonl"
    export = CliRunner().invoke(cli, ["export", output, "--format", "jsonl", "-o", str(exported)])
    assert export.exit_code == 0, export.output
    lines = [orjson.loads(line) for line in exported.read_bytes().splitlines()]
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(5)]


def test_restart_replaces_a_directory_output(tmp_path: Path, fake: FakeServer) -> None:
    """--restart removes a directory output and answers again; fewer rows than N is one file."""
    run(tmp_path, fake, prompts(5), output_file_rows=2)
    sent = fake.stats()["requests"]
    write_jsonl(tmp_path / "in.jsonl", prompts(5))
    job = build_job(fast_job_data(tmp_path, fake.base_url, output_file_rows=10))
    summary = run_job(job, restart=True, settings=SETTINGS)
    assert summary.complete and fake.stats()["requests"] == sent + 5
    assert (tmp_path / "out.parquet").is_file()
    assert [r["id"] for r in read_output(tmp_path)] == [f"r{i}" for i in range(5)]


def test_a_folder_that_is_not_an_output_is_still_refused(tmp_path: Path, fake: FakeServer) -> None:
    """A user's folder named as the output is an error, never removed by --restart."""
    (tmp_path / "out.parquet").mkdir()
    (tmp_path / "out.parquet" / "notes.txt").write_text("mine")
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    job = build_job(fast_job_data(tmp_path, fake.base_url, output_file_rows=1))
    with pytest.raises(ConfigError, match="is a folder"):
        run_job(job, restart=True, settings=SETTINGS)
    assert (tmp_path / "out.parquet" / "notes.txt").exists()


def test_a_directory_left_by_a_killed_compaction_is_cleared_and_redone(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A `.OUTPUT.tmp-PID` directory (and the old output set aside) left by a kill during
    compaction is removed, and the next run writes the whole output."""
    run(tmp_path, fake, prompts(5), limit=2, output_file_rows=2)  # keeps its checkpoint
    for name in (".out.parquet.tmp-99999", ".out.parquet.tmp-99999.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part-00000.parquet").write_bytes(b"cut short")
    summary = run(tmp_path, fake, prompts(5), output_file_rows=2)
    assert summary.complete and summary.rows_ok == 5
    assert not list(tmp_path.glob(".out.parquet.tmp-*"))
    assert len(list((tmp_path / "out.parquet").iterdir())) == 3


def test_the_price_table_checked_before_the_run_is_the_one_rows_are_priced_with(
    tmp_path: Path, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run loads its price table (the shipped one with a user's file laid over it) once,
    before the checkpoint, and the pool prices every row with that same table. (`run_pool`
    called without one, as Ray's workers call it, loads its own: test_ray_engine.py's
    test_output_equals_the_local_engine.)"""
    from batchrun.prices import PriceTable

    loads: list[Path | None] = []
    load = PriceTable.load.__func__  # type: ignore[attr-defined]

    def counted(cls: type[PriceTable], extra: Path | None = None) -> PriceTable:
        loads.append(extra)
        return load(cls, extra)  # type: ignore[no-any-return]

    monkeypatch.setattr(PriceTable, "load", classmethod(counted))
    extra = tmp_path / "prices.toml"
    extra.write_text(  # deepseek-chat at $1 a million tokens in and out
        '[[price]]\nmodel = "deepseek-chat"\nfrom = "2025-09-29"\ncache_hit = 1\n'
        "cache_miss = 1\noutput = 1\n"
    )
    summary = run(tmp_path, fake, prompts(3), model="deepseek-chat", prices=str(extra))
    assert summary.rows_ok == 3 and loads == [extra]
    for row in read_output(tmp_path):
        assert row["cost_usd"] == pytest.approx(row["total_tokens"] / 1e6)
