"""Labelling and sweeps: parsed fields, sweep matrices and the request cache, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import RunSummary, run_job
from tests.conftest import fast_job_data, write_jsonl

REVIEWS = [
    {"rid": "a", "text": "great phone", "truth": "positive"},
    {"rid": "b", "text": "bad battery", "truth": "negative"},
    {"rid": "c", "text": "not what I wanted", "truth": "negative"},
]
LABELS = {"label": "str", "confidence": "float"}


def run(tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **extra: Any) -> RunSummary:
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = build_job(fast_job_data(tmp_path, fake.base_url, **extra))
    return run_job(job, settings=PoolSettings(flush_rows=2, flush_seconds=0.05))


def output(tmp_path: Path) -> pa.Table:
    return pq.read_table(tmp_path / "out.parquet")


def labelling(**parse: Any) -> dict[str, Any]:
    return {
        "prompt": {"id_column": "rid", "template": "Review: {text}", "carry": ["text", "truth"]},
        "params": {"response_format": {"type": "json_object"}},
        "parse": {"fields": LABELS, **parse},
    }


def test_parsed_fields_become_typed_columns(tmp_path: Path, fake: FakeServer) -> None:
    """Each declared field is an output column of its declared type, from the JSON answer."""
    summary = run(tmp_path, fake, REVIEWS, **labelling())
    table = output(tmp_path)
    assert summary.rows_ok == 3
    assert table.schema.field("label").type == pa.string()
    assert table.schema.field("confidence").type == pa.float64()
    assert table.column("label").to_pylist() == ["positive", "negative", "negative"]
    assert table.column("confidence").to_pylist() == [0.9, 0.9, 0.9]
    assert table.schema.names[:6] == ["id", "text", "truth", "label", "confidence", "status"]


def test_unparseable_answer_is_re_asked_then_a_parse_error(
    tmp_path: Path, fake: FakeServer
) -> None:
    """An answer that is not JSON is re-asked parse_attempts times, each paid and counted."""
    rows = [{"rid": "x", "text": "plain"}]
    extra = labelling(parse_attempts=2)
    extra["params"] = {}  # no JSON mode: the fake answers plain text, which cannot parse
    extra["prompt"]["carry"] = ["text"]
    summary = run(tmp_path, fake, rows, **extra)
    row = output(tmp_path).to_pylist()[0]
    assert summary.exit_code == 1
    assert row["status"] == "error" and row["error_class"] == "parse"
    assert "not valid JSON" in row["error"]
    assert row["attempts"] == 3 and fake.stats()["requests"] == 3
    assert row["content"] == "echo: Review: plain" and row["label"] is None
    one_answer = row["completion_tokens"] / 3
    assert row["completion_tokens"] == 3 * one_answer and row["cost_usd"] > 0


def test_sweep_sends_every_combination(tmp_path: Path, fake: FakeServer) -> None:
    """A 2x2 sweep gives 4 rows per input, each sent with its own parameters."""
    rows = [{"id": "q1", "prompt": "one"}, {"id": "q2", "prompt": "two"}]
    sweep = {"model": ["deepseek-chat", "deepseek-reasoner"], "temperature": [0.0, 0.7]}
    summary = run(tmp_path, fake, rows, prompt={"id_column": "id"}, sweep=sweep)
    table = output(tmp_path).to_pylist()
    assert summary.rows_total == 8 and summary.rows_ok == 8
    assert [(r["id"], r["variant"]) for r in table] == [
        (q, v) for q in ("q1", "q2") for v in ("v1", "v2", "v3", "v4")
    ]
    sent = {(b["messages"][-1]["content"], b["model"], b["temperature"]) for b in fake.requests()}
    assert sent == {
        (p, m, t) for p in ("one", "two") for m in sweep["model"] for t in sweep["temperature"]
    }
    by_variant = {r["variant"]: (r["sweep_model"], r["sweep_temperature"]) for r in table}
    assert by_variant["v2"] == ("deepseek-chat", 0.7)
    assert by_variant["v3"] == ("deepseek-reasoner", 0.0)
    assert all(r["reasoning_content"] for r in table if r["sweep_model"] == "deepseek-reasoner")


def test_sweep_templates_and_repeats(tmp_path: Path, fake: FakeServer) -> None:
    """Templates can be swept and each combination repeated; repeats are separate rows."""
    sweep = {"template": ["A: {text}", "B: {text}"], "repeat": 2}
    run(tmp_path, fake, [{"text": "t"}], sweep=sweep)
    table = output(tmp_path).to_pylist()
    assert [(r["sweep_template"], r["sweep_repeat"], r["content"]) for r in table] == [
        ("A: {text}", 1, "echo: A: t"),
        ("A: {text}", 2, "echo: A: t"),
        ("B: {text}", 1, "echo: B: t"),
        ("B: {text}", 2, "echo: B: t"),
    ]


def test_cache_serves_answers_without_sending_or_paying(tmp_path: Path, fake: FakeServer) -> None:
    """A second run with the same cache sends nothing, costs nothing and marks rows cached."""
    rows = [{"prompt": f"p{i}"} for i in range(4)] + [{"prompt": "p0"}]  # one duplicate
    cache = str(tmp_path / "cache")
    run(tmp_path, fake, rows, cache=cache)
    first = output(tmp_path).to_pylist()
    assert fake.stats()["requests"] == 4  # the duplicate in the run was sent once
    assert [r["cached"] for r in first] == [False, False, False, False, True]
    (tmp_path / "out.parquet").unlink()
    summary = run(tmp_path, fake, rows, cache=cache)
    second = output(tmp_path).to_pylist()
    assert summary.rows_ok == 5 and fake.stats()["requests"] == 4
    assert all(r["cached"] and r["cost_usd"] == 0.0 for r in second)
    assert [r["content"] for r in second] == [r["content"] for r in first]


def test_cache_keeps_only_ok_answers(tmp_path: Path, fake: FakeServer) -> None:
    """An error answer is not cached: the next run sends that request again."""
    cache = str(tmp_path / "cache")
    rows = [{"prompt": "[[fault:400*1]]"}]
    run(tmp_path, fake, rows, cache=cache)
    assert output(tmp_path).to_pylist()[0]["status"] == "error"
    summary = run(tmp_path, fake, rows, cache=cache)
    assert summary.rows_ok == 1 and fake.stats()["requests"] == 2


def test_sweep_killed_half_way_resumes(tmp_path: Path, fake: FakeServer) -> None:
    """A sweep killed with SIGKILL mid-run resumes: every (id, variant) once, none lost."""
    fake.update(latency=0.03)
    rows = [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(15)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "in.jsonl"\noutput = "out.parquet"\nbase_url = "{fake.base_url}"\n'
        '[prompt]\nid_column = "id"\n[limits]\nconcurrency = 2\nadaptive = false\n'
        "[sweep]\ntemperature = [0.0, 1.0]\nrepeat = 2\n"
    )
    command = [sys.executable, "-m", "batchrun", "run", str(job), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and fake.stats()["requests"] < 24:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert not (tmp_path / "out.parquet").exists()
    sent_before = fake.stats()["requests"]
    assert 0 < sent_before < 60
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    table = output(tmp_path).to_pylist()
    keys = [(r["id"], r["variant"]) for r in table]
    assert len(keys) == len(set(keys)) == 60
    assert all(r["content"] == f"echo: question {r['id'][1:]}" for r in table)
    assert fake.stats()["requests"] - sent_before < 60  # the done rows were not sent again


def test_cache_flag_on_the_command_line(tmp_path: Path, fake: FakeServer) -> None:
    """`run --cache DIR` twice on two outputs: the second run sends nothing."""
    from click.testing import CliRunner

    from batchrun.cli import cli

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    base = ["run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url]
    base += ["--cache", str(tmp_path / "cache")]
    runner = CliRunner()
    first = runner.invoke(cli, [*base, "--output", str(tmp_path / "a.parquet")])
    second = runner.invoke(cli, [*base, "--output", str(tmp_path / "b.parquet")])
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert fake.stats()["requests"] == 3
    assert all(pq.read_table(tmp_path / "b.parquet").column("cached").to_pylist())


def test_a_cache_folder_that_cannot_be_made_is_exit_2_before_the_checkpoint(
    tmp_path: Path, fake: FakeServer
) -> None:
    """`--cache` under a file (so the folder cannot be made): exit 2 naming the folder, not a
    traceback from inside the run; no request, no checkpoint left behind."""
    from click.testing import CliRunner

    from batchrun.cli import cli

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    args = ["run", "--input", str(tmp_path / "in.jsonl"), "--base-url", fake.base_url]
    args += ["--output", str(tmp_path / "out.parquet"), "--cache", str(cache)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"error: {cache}: the cache folder cannot be written" in result.output
    assert "Traceback" not in result.output
    assert fake.stats()["requests"] == 0
    assert not (tmp_path / "out.parquet.parts").exists()


def test_sweep_value_wins_over_a_row_column(tmp_path: Path, fake: FakeServer) -> None:
    """A row's own temperature gives way to the swept one, so sweep columns tell the truth."""
    run(tmp_path, fake, [{"prompt": "x", "temperature": 1.9}], sweep={"temperature": [0.0, 0.5]})
    assert sorted(b["temperature"] for b in fake.requests()) == [0.0, 0.5]


def test_sweep_over_batch_lines_is_refused(tmp_path: Path, fake: FakeServer) -> None:
    """Batch lines are sent as they are, so a sweep over them is a config error."""
    import pytest

    from batchrun.errors import ConfigError

    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}]},
    }
    with pytest.raises(ConfigError, match="sweep cannot vary OpenAI batch lines"):
        run(tmp_path, fake, [line], sweep={"temperature": [0.0, 1.0]})
    assert fake.stats()["requests"] == 0


def test_estimate_counts_every_sweep_combination(tmp_path: Path, fake: FakeServer) -> None:
    """estimate sends nothing and counts one request per row and combination, per model."""
    from batchrun.estimate import estimate_job

    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    sweep = {"model": ["deepseek-chat", "deepseek-reasoner"], "repeat": 2}
    estimate = estimate_job(build_job(fast_job_data(tmp_path, fake.base_url, sweep=sweep)))
    assert estimate.requests == 8
    assert dict(estimate.models) == {"deepseek-chat": 4, "deepseek-reasoner": 4}
    assert fake.stats()["requests"] == 0


def test_reference_must_name_a_carried_column(tmp_path: Path, fake: FakeServer) -> None:
    """A reference to a column that is not carried cannot be scored: refused before sending."""
    import pytest

    from batchrun.errors import ConfigError

    extra = labelling(reference={"label": "truth"})
    extra["prompt"]["carry"] = ["text"]
    with pytest.raises(ConfigError, match="parse.reference maps 'label' to 'truth'"):
        run(tmp_path, fake, REVIEWS, **extra)
    assert fake.stats()["requests"] == 0
