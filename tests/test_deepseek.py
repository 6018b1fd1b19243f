"""DeepSeek today: thinking mode, reasoning effort, user_id, retired names, default ceilings.

Runs go through the real HTTP path to the session's fake; what DeepSeek's own URL changes
(warnings, ceilings) is read from `job.for_server`, as no test may reach api.deepseek.com.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from batchrun import tokens
from batchrun.cli import cli
from batchrun.errors import ConfigError, CostCapReached
from batchrun.fake import FakeServer
from batchrun.job import build_job, for_server
from batchrun.pool import PoolSettings
from batchrun.runner import RunSummary, run_job
from tests.conftest import fast_job_data, write_jsonl

DEEPSEEK = "https://api.deepseek.com"
RESELLER = "https://api.deepseekapi.dev/v1"


def run(tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **extra: Any) -> RunSummary:
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = fast_job_data(tmp_path, fake.base_url, **{"model": "deepseek-flash", **extra})
    return run_job(build_job(data), settings=PoolSettings(flush_rows=2, flush_seconds=0.05))


def output(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def prompts(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(n)]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def job_at(base_url: str, **extra: Any) -> Any:
    return build_job({"input": "in.jsonl", "output": "out.parquet", "base_url": base_url, **extra})


# --- thinking and reasoning_effort -----------------------------------------------------------


def test_unset_thinking_is_not_sent_and_the_model_thinks(tmp_path: Path, fake: FakeServer) -> None:
    """With no thinking setting nothing is sent, and deepseek-flash's reasoning fills the
    reasoning columns."""
    run(tmp_path, fake, prompts(2))
    assert all("thinking" not in b and "reasoning_effort" not in b for b in fake.requests())
    rows = output(tmp_path)
    assert [r["reasoning_content"] for r in rows] == [
        "thinking about: question 0",
        "thinking about: question 1",
    ]
    assert all(r["reasoning_tokens"] and r["reasoning_tokens"] > 0 for r in rows)


def test_thinking_and_effort_are_sent_as_deepseek_expects(tmp_path: Path, fake: FakeServer) -> None:
    """[params] thinking = false and reasoning_effort = "low" reach the server in its shape,
    and the answer has no reasoning."""
    run(tmp_path, fake, prompts(2), params={"thinking": False, "reasoning_effort": "low"})
    for sent in fake.requests():
        assert sent["thinking"] == {"type": "disabled"}
        assert sent["reasoning_effort"] == "low"
    rows = output(tmp_path)
    assert all(r["reasoning_content"] is None and r["reasoning_tokens"] == 0 for r in rows)


def test_flags_set_thinking_and_effort(tmp_path: Path, fake: FakeServer) -> None:
    """--thinking and --reasoning-effort max are sent with every request."""
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    result = invoke(
        "run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url, "-q",
        "--thinking", "--reasoning-effort", "max",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [(b["thinking"], b["reasoning_effort"]) for b in fake.requests()] == [
        ({"type": "enabled"}, "max")
    ] * 2


def test_sweep_over_thinking_and_effort(tmp_path: Path, fake: FakeServer) -> None:
    """A sweep sends every combination of thinking and effort, each a column of its rows."""
    run(
        tmp_path,
        fake,
        prompts(1),
        sweep={"thinking": [True, False], "reasoning_effort": ["low", "max"]},
    )
    sent = {(b["thinking"]["type"], b["reasoning_effort"]) for b in fake.requests()}
    assert sent == {
        ("enabled", "low"),
        ("enabled", "max"),
        ("disabled", "low"),
        ("disabled", "max"),
    }
    rows = {(r["sweep_thinking"], r["sweep_reasoning_effort"]): r for r in output(tmp_path)}
    assert set(rows) == {(True, "low"), (True, "max"), (False, "low"), (False, "max")}
    assert rows[(False, "max")]["reasoning_content"] is None
    assert rows[(True, "max")]["reasoning_content"] == "thinking long and hard about: question 0"
    assert rows[(True, "low")]["reasoning_content"] == "briefly: question 0"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"reasoning_effort": "medium"}, "'high'", id="medium"),
        pytest.param({"reasoning_effort": "xhigh"}, "'high'", id="xhigh"),
        pytest.param({"reasoning_effort": "huge"}, "reasoning_effort", id="unknown-effort"),
        pytest.param({"thinking": "yes"}, "thinking", id="thinking-text"),
    ],
)
def test_bad_thinking_settings_are_refused(params: dict[str, Any], message: str) -> None:
    """An effort DeepSeek would only take as another, or a non-boolean thinking, is a
    ConfigError naming it."""
    with pytest.raises(ConfigError, match=message):
        job_at(DEEPSEEK, params=params)


@pytest.mark.parametrize(
    "sweep",
    [
        pytest.param({"thinking": [True, "yes"]}, id="thinking-text"),
        pytest.param({"reasoning_effort": ["high", "medium"]}, id="effort-alias"),
    ],
)
def test_a_sweep_value_is_checked_like_the_param(sweep: dict[str, Any]) -> None:
    """A sweep value [params] would refuse is refused when the job loads, naming its key."""
    with pytest.raises(ConfigError, match=next(iter(sweep))):
        job_at(DEEPSEEK, sweep=sweep)


def test_a_rows_own_effort_is_sent_as_written(tmp_path: Path, fake: FakeServer) -> None:
    """A row's reasoning_effort (row_params) is data for its server: "medium" is sent as it
    is (DeepSeek takes it as high; OpenAI has its own medium)."""
    rows = [{"id": "a", "prompt": "p", "reasoning_effort": "medium"}]
    run(tmp_path, fake, rows, prompt={"id_column": "id", "row_params": ["reasoning_effort"]})
    assert [b["reasoning_effort"] for b in fake.requests()] == ["medium"]


def test_fingerprint_changes_with_thinking_and_effort() -> None:
    """Unset, on, off, and each effort are four different fingerprints."""
    digests = {
        job_at(DEEPSEEK, params=params).fingerprint_digest()
        for params in (
            {},
            {"thinking": True},
            {"thinking": False},
            {"thinking": True, "reasoning_effort": "low"},
            {"thinking": True, "reasoning_effort": "max"},
        )
    }
    assert len(digests) == 5


def test_resume_refuses_a_changed_thinking_setting(tmp_path: Path, fake: FakeServer) -> None:
    """A checkpoint made thinking is refused by a run with --no-thinking (exit 2, naming the
    change) until --restart."""
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url, "-q"]
    assert invoke(*args, "--thinking", "--limit", "2").exit_code == 0
    changed = invoke(*args, "--no-thinking")
    assert changed.exit_code == 2
    assert "thinking" in changed.output and "--restart" in changed.output
    restarted = invoke(*args, "--no-thinking", "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert fake.requests()[-1]["thinking"] == {"type": "disabled"}


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        pytest.param(["--no-thinking"], "thinking", id="thinking"),
        pytest.param(["--reasoning-effort", "low"], "reasoning_effort", id="effort"),
        pytest.param(["--temperature", "0.5"], "temperature", id="temperature"),
    ],
)
def test_a_flag_for_a_swept_key_is_refused(tmp_path: Path, flags: list[str], key: str) -> None:
    """`--no-thinking` on a job sweeping thinking exits 2 naming both, rather than letting the
    sweep's `true` variants think (and bill) against the flag."""
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    sweep = {"thinking": [False, True], "reasoning_effort": ["low", "max"], "temperature": [0.0]}
    job = tmp_path / "job.toml"
    lines = [f'input = "{tmp_path / "in.jsonl"}"', f'output = "{tmp_path / "out.parquet"}"']
    lines += ["[sweep]", f"{key} = {str(sweep[key]).lower()}".replace("'", '"')]
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = invoke("estimate", str(job), *flags)
    assert result.exit_code == 2, result.output
    assert f"{flags[0]} sets {key}, which the job's [sweep] lists" in result.output
    assert invoke("estimate", str(job)).exit_code == 0  # the job alone is fine


# --- user_id ---------------------------------------------------------------------------------


def test_user_id_per_job_reaches_the_server(tmp_path: Path, fake: FakeServer) -> None:
    """[params] user_id goes with every request."""
    run(tmp_path, fake, prompts(2), params={"user_id": "team-a_01"})
    assert [b["user_id"] for b in fake.requests()] == ["team-a_01", "team-a_01"]


def test_user_id_per_row_when_opted_in(tmp_path: Path, fake: FakeServer) -> None:
    """With row_params = ["user_id"], each row's user_id column is its request's user_id; a
    row without one falls back to the job's."""
    rows = [
        {"id": "a", "prompt": "p", "user_id": "alice"},
        {"id": "b", "prompt": "p", "user_id": "bob"},
        {"id": "c", "prompt": "p"},
    ]
    run(
        tmp_path,
        fake,
        rows,
        params={"user_id": "default"},
        prompt={"id_column": "id", "row_params": ["user_id"]},
        limits={"concurrency": 1},
    )
    assert [b["user_id"] for b in fake.requests()] == ["alice", "bob", "default"]


def test_bad_user_id_in_a_row_is_exit_2_naming_line_and_column(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A row's user_id with a space stops the run before anything is sent, naming where."""
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "p", "user_id": "ok"}, {"prompt": "p", "user_id": "not ok"}],
    )
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "in.jsonl"\noutput = "out.parquet"\nbase_url = "{fake.base_url}"\n'
        '[prompt]\nrow_params = ["user_id"]\n'
    )
    result = invoke("run", str(job), "-q")
    assert result.exit_code == 2
    assert "in.jsonl" in result.output and "line 2" in result.output
    assert "user_id" in result.output
    assert fake.requests() == []


def test_bad_user_id_in_the_job_is_exit_2(tmp_path: Path, fake: FakeServer) -> None:
    """[params] user_id over 512 characters is refused naming the key."""
    write_jsonl(tmp_path / "in.jsonl", prompts(1))
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "in.jsonl"\noutput = "out.parquet"\nbase_url = "{fake.base_url}"\n'
        f'[params]\nuser_id = "{"u" * 513}"\n'
    )
    result = invoke("run", str(job), "-q")
    assert result.exit_code == 2
    assert "job.toml" in result.output and "params.user_id" in result.output
    assert fake.requests() == []


# --- the spend cap's worst case --------------------------------------------------------------


def test_without_max_tokens_a_current_model_may_answer_384k() -> None:
    """The completion bound of deepseek-flash and -pro is 384K without max_tokens, thinking or
    not; max_tokens bounds it; the 2025 chat model keeps its 4K default."""
    message = [{"role": "user", "content": "hi"}]
    for model in ("deepseek-flash", "deepseek-v4-pro"):
        for extra in ({}, {"thinking": {"type": "disabled"}}):
            assert tokens.completion_cap({"model": model, "messages": message, **extra}) == 393216
    assert tokens.completion_cap({"model": "deepseek-flash", "max_tokens": 300}) == 300
    assert tokens.completion_cap({"model": "deepseek-chat"}) == 4096


def test_spend_cap_holds_a_thinking_answer_at_its_384k_worst(
    tmp_path: Path, fake: FakeServer
) -> None:
    """max_cost $0.10 without max_tokens: one deepseek-flash answer could cost more (384K
    output tokens), so nothing is sent; with max_tokens = 1000 the run completes."""
    with pytest.raises(CostCapReached):
        run(tmp_path, fake, prompts(2), max_cost=0.1)
    assert fake.requests() == []
    summary = run(
        tmp_path,
        fake,
        prompts(2),
        max_cost=0.1,
        params={"max_tokens": 1000},
        output=str(tmp_path / "b.parquet"),
    )
    assert summary.complete and summary.rows_ok == 2


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        pytest.param({"max_cost": 5.0}, True, id="cap-without-max-tokens"),
        pytest.param({"max_cost": 5.0, "params": {"max_tokens": 500}}, False, id="max-tokens"),
        pytest.param({}, False, id="no-cap"),
        pytest.param({"max_cost": 5.0, "model": "deepseek-chat"}, False, id="2025-model"),
    ],
)
def test_spend_cap_without_max_tokens_is_warned_of(extra: dict[str, Any], warned: bool) -> None:
    """max_cost with no max_tokens over today's models (any URL) logs that each request is
    held at 384K tokens."""
    job = job_at(RESELLER, **extra)
    with capture_logs() as logs:
        for_server(job, {job.model})
    found = [e for e in logs if e["event"] == "spend_cap_without_max_tokens"]
    assert bool(found) is warned


# --- DeepSeek's own URL: retired names and default ceilings ----------------------------------


def test_retired_model_on_deepseeks_url_is_warned_naming_the_current_one() -> None:
    """deepseek-chat against https://api.deepseek.com logs a warning naming deepseek-flash."""
    with capture_logs() as logs:
        for_server(job_at(DEEPSEEK, model="deepseek-chat"), {"deepseek-chat"})
    warnings = [e for e in logs if e["event"] == "model_retired"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["model"] == "deepseek-chat"
    assert "deepseek-flash" in warnings[0]["use"]


def test_estimate_of_a_retired_model_on_deepseeks_url_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`estimate` of deepseek-chat at DeepSeek's URL warns as the run would, naming
    deepseek-flash, before any key is needed or anything sent."""
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    args = ["estimate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")]
    result = invoke(*args, "--model", "deepseek-chat", "--base-url", DEEPSEEK)
    assert result.exit_code == 0, result.output
    (line,) = [text for text in result.stderr.splitlines() if "model_retired" in text]
    assert "deepseek-chat" in line and "deepseek-flash" in line


@pytest.mark.parametrize("base_url", [RESELLER, "http://127.0.0.1:9/v1"])
def test_retired_model_elsewhere_is_not_warned(base_url: str) -> None:
    """A reseller (or any other URL) may serve deepseek-reasoner: no warning."""
    with capture_logs() as logs:
        for_server(job_at(base_url, model="deepseek-reasoner"), {"deepseek-reasoner"})
    assert [e for e in logs if e["event"] == "model_retired"] == []


def test_a_run_against_another_url_logs_no_retired_warning(
    tmp_path: Path, fake: FakeServer
) -> None:
    """A real run of deepseek-chat against the fake's URL finishes without the warning."""
    with capture_logs() as logs:
        assert run(tmp_path, fake, prompts(1), model="deepseek-chat").rows_ok == 1
    assert [e for e in logs if e["event"] == "model_retired"] == []


@pytest.mark.parametrize(
    ("models", "ceiling"),
    [
        pytest.param({"deepseek-flash"}, 2500, id="flash"),
        pytest.param({"deepseek-v4-flash"}, 2500, id="legacy-flash-name"),
        pytest.param({"deepseek-v4-pro"}, 500, id="pro"),
        pytest.param({"deepseek-flash", "deepseek-v4-pro"}, 500, id="sweep-takes-the-least"),
        pytest.param({"deepseek-chat"}, 32, id="no-documented-limit"),
    ],
)
def test_deepseeks_url_gets_its_documented_ceiling(models: set[str], ceiling: int) -> None:
    """With no concurrency set, adaptive concurrency may grow to DeepSeek's limit for the
    job's models, starting where it always does."""
    job = for_server(job_at(DEEPSEEK), models)
    assert job.limits.concurrency == ceiling
    assert job.limits.first_concurrency == 8


@pytest.mark.parametrize(
    ("base_url", "limits", "extra"),
    [
        pytest.param(RESELLER, {}, {}, id="reseller"),
        pytest.param(DEEPSEEK, {"concurrency": 64}, {}, id="set-by-the-job"),
        pytest.param(DEEPSEEK, {"adaptive": False}, {}, id="not-adaptive"),
        pytest.param(DEEPSEEK, {}, {"fake": {}}, id="built-in-fake"),
    ],
)
def test_no_default_ceiling_elsewhere_or_when_set(
    base_url: str, limits: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Another URL, a job's own concurrency, fixed concurrency or the fake keep the job's."""
    job = job_at(base_url, limits=limits, **extra)
    assert for_server(job, {"deepseek-flash"}).limits == job.limits


def test_default_ceiling_stays_within_the_open_file_limit() -> None:
    """With a soft open-file limit of 1,000, the 2,500 ceiling becomes what sockets it leaves
    room for (1,000 less 128 held back for files)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))
    try:
        job = for_server(job_at(DEEPSEEK), {"deepseek-flash"})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert job.limits.concurrency == 872


def test_batch_lines_keep_their_own_thinking_shape(tmp_path: Path, fake: FakeServer) -> None:
    """An OpenAI batch line's body, in DeepSeek's wire shape, is sent as written."""
    thinking = {"type": "disabled"}
    body = {"messages": [{"role": "user", "content": "p"}], "thinking": thinking}
    rows = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}]
    run(tmp_path, fake, [{**rows[0], "body": {**body, "reasoning_effort": "xhigh"}}])
    sent = fake.requests()
    assert [(b["thinking"], b["reasoning_effort"]) for b in sent] == [(thinking, "xhigh")]
    assert output(tmp_path)[0]["reasoning_content"] is None


def test_the_price_table_bills_every_flash_name_as_flash() -> None:
    """The price table's aliases and `deepseek.FLASH_NAMES` name the same models."""
    from datetime import UTC, datetime

    from batchrun.deepseek import FLASH_NAMES
    from batchrun.prices import PriceTable

    table, at = PriceTable.load(), datetime(2026, 12, 5, tzinfo=UTC)
    flash = table.price_for("deepseek-flash", at)
    assert flash is not None
    assert all(table.price_for(name, at) == flash for name in FLASH_NAMES)
