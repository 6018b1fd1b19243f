"""`batchrun export`: OpenAI Batch API output lines, flat JSONL and CSV, streamed by batch."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.export import export_output
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import run_job
from tests.conftest import fast_job_data, write_jsonl

STARTED = datetime(2025, 10, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = datetime(2025, 10, 1, 12, 0, 2, 500_000, tzinfo=UTC)


def result_row(row_id: str, **values: Any) -> dict[str, Any]:
    """An output row as a run writes it for an ok answer, with `values` laid over it."""
    row: dict[str, Any] = {
        "id": row_id,
        "status": "ok",
        "content": f"answer {row_id}",
        "reasoning_content": None,
        "finish_reason": "stop",
        "model": "deepseek-chat",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 10,
        "reasoning_tokens": None,
        "attempts": 1,
        "latency_s": 0.25,
        "http_status": 200,
        "error": None,
        "response_id": f"resp-{row_id}",
        "started_at": STARTED,
        "finished_at": FINISHED,
        "error_class": None,
        "cost_usd": 0.00001,
    }
    return {**row, **values}


#: the output's documented columns, by hand: the tests do not follow sinks.py's schema as it grows
OUTPUT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("status", pa.string()),
    ("content", pa.large_string()),
    ("reasoning_content", pa.large_string()),
    ("finish_reason", pa.string()),
    ("model", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("prompt_cache_hit_tokens", pa.int64()),
    ("prompt_cache_miss_tokens", pa.int64()),
    ("reasoning_tokens", pa.int64()),
    ("attempts", pa.int32()),
    ("latency_s", pa.float64()),
    ("http_status", pa.int32()),
    ("error", pa.string()),
    ("response_id", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("error_class", pa.string()),
    ("cost_usd", pa.float64()),
]


def write_output(
    path: Path, rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None
) -> Path:
    schema = pa.schema(OUTPUT_FIELDS + list((extra or {}).items()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def export(path: Path, fmt: str, **options: Any) -> list[dict[str, Any]]:
    sink = io.BytesIO()
    export_output(path, sink, fmt=fmt, **options)
    return [orjson.loads(line) for line in sink.getvalue().splitlines()]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["export", *args])


def batch_line(custom_id: str, content: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "deepseek-chat", "messages": [{"role": "user", "content": content}]},
    }


def test_batch_input_round_trips(tmp_path: Path, fake: FakeServer) -> None:
    """A batch-format input run and exported as openai-batch gives back its custom_ids."""
    lines = [
        batch_line("req-1", "What is 2+2?"),
        batch_line("req-2", "Name a colour."),
        batch_line("req-bad", "refused [[fault:400]]"),
        batch_line("req-net", "unreachable [[fault:drop*always]]"),
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    job = build_job(fast_job_data(tmp_path, fake.base_url, limits={"max_attempts": 2}))
    run_job(job, settings=PoolSettings(flush_rows=2, flush_seconds=0.05))
    output = pq.read_table(tmp_path / "out.parquet").to_pylist()

    exported_path = tmp_path / "batch-output.jsonl"
    result = invoke(
        str(tmp_path / "out.parquet"), "--format", "openai-batch", "-o", str(exported_path)
    )
    assert result.exit_code == 0, result.output
    exported = [orjson.loads(line) for line in exported_path.read_bytes().splitlines()]

    assert [e["custom_id"] for e in exported] == ["req-1", "req-2", "req-bad", "req-net"]
    assert [e["id"] for e in exported] == [f"batch_req_{n}" for n in range(1, 5)]
    ok1, ok2, bad, net = exported
    for line, row in [(ok1, output[0]), (ok2, output[1])]:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"] == row["response_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == row["content"]
        assert body["usage"]["total_tokens"] == row["total_tokens"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["type"] == "bad_request"
    assert bad["error"] is None
    assert net["response"] is None
    assert net["error"]["code"] == output[3]["error_class"]
    assert net["error"]["message"]


def test_ok_line_rebuilds_the_completion(tmp_path: Path) -> None:
    """An ok row becomes a chat.completion; usage fields that are null are left out."""
    row = result_row(
        "r1",
        reasoning_content="thinking",
        reasoning_tokens=3,
        prompt_cache_hit_tokens=None,
        prompt_cache_miss_tokens=None,
    )
    (line,) = export(write_output(tmp_path / "o.parquet", [row]), "openai-batch")
    assert line == {
        "id": "batch_req_1",
        "custom_id": "r1",
        "response": {
            "status_code": 200,
            "request_id": "resp-r1",
            "body": {
                "id": "resp-r1",
                "object": "chat.completion",
                "created": int(FINISHED.timestamp()),
                "model": "deepseek-chat",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "answer r1",
                            "reasoning_content": "thinking",
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "total_tokens": 15,
                    "completion_tokens_details": {"reasoning_tokens": 3},
                },
            },
        },
        "error": None,
    }


ERROR = {"status": "error", "content": None, "prompt_tokens": None, "response_id": None}


@pytest.mark.parametrize(
    ("values", "response", "error"),
    [
        pytest.param(
            {"http_status": 422, "error": "bad param", "error_class": "invalid_params"},
            {
                "status_code": 422,
                "request_id": None,
                "body": {"error": {"message": "bad param", "type": "invalid_params"}},
            },
            None,
            id="http-error",
        ),
        pytest.param(
            {"http_status": None, "error": "connection reset", "error_class": "network"},
            None,
            {"code": "network", "message": "connection reset"},
            id="no-http-answer",
        ),
        pytest.param(
            {"http_status": 200, "error": "blank body", "error_class": "bad_response"},
            None,
            {"code": "bad_response", "message": "blank body"},
            id="failure-inside-a-200",
        ),
    ],
)
def test_error_lines(tmp_path: Path, values: dict[str, Any], response: Any, error: Any) -> None:
    """Error rows: a response with the server's status, or an error when there is none."""
    row = result_row("r1", **ERROR, **values)
    (line,) = export(write_output(tmp_path / "o.parquet", [row]), "openai-batch")
    assert line["custom_id"] == "r1"
    assert line["response"] == response
    assert line["error"] == error


def test_sweep_lines_name_their_variant(tmp_path: Path) -> None:
    """A sweep repeats each custom_id per variant, so each line says which variant it is."""
    rows = [result_row("r1", variant="v1"), result_row("r1", variant="v2")]
    path = write_output(tmp_path / "o.parquet", rows, {"variant": pa.string()})
    lines = export(path, "openai-batch")
    assert [(line["custom_id"], line["variant"]) for line in lines] == [("r1", "v1"), ("r1", "v2")]


def test_lines_are_numbered_across_batches(tmp_path: Path) -> None:
    """Reading in small batches changes nothing: every row once, numbered in order."""
    rows = [result_row(f"r{i}") for i in range(5)]
    lines = export(write_output(tmp_path / "o.parquet", rows), "openai-batch", batch_rows=2)
    assert [line["id"] for line in lines] == [f"batch_req_{n}" for n in range(1, 6)]
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(5)]


def test_jsonl_rows_are_flat(tmp_path: Path) -> None:
    """jsonl: every column of every row, timestamps as ISO strings, extra columns kept."""
    rows = [result_row("r1", label="pos", cached=True), result_row("r2", label=None, cached=False)]
    extra = {"label": pa.string(), "cached": pa.bool_()}
    path = write_output(tmp_path / "o.parquet", rows, extra)
    lines = export(path, "jsonl")
    assert [line["id"] for line in lines] == ["r1", "r2"]
    assert list(lines[0]) == pq.read_schema(path).names
    assert lines[0]["started_at"] == "2025-10-01T12:00:00.000Z"
    assert lines[0]["finished_at"] == "2025-10-01T12:00:02.500Z"
    assert (lines[0]["label"], lines[0]["cached"]) == ("pos", True)
    assert (lines[1]["label"], lines[1]["cached"]) == (None, False)


def test_csv_has_a_header_and_a_line_per_row(tmp_path: Path) -> None:
    """csv: the output's columns, one line per row; a nested carried column as JSON text."""
    rows = [result_row(f"r{i}", tags=["a", str(i)], content=f'x, "y"\n{i}') for i in range(3)]
    path = write_output(tmp_path / "o.parquet", rows, {"tags": pa.list_(pa.string())})
    sink = io.BytesIO()
    assert export_output(path, sink, fmt="csv", batch_rows=2) == 3
    table = pcsv.read_csv(io.BytesIO(sink.getvalue()))
    assert table.column_names == pq.read_schema(path).names
    assert table["id"].to_pylist() == ["r0", "r1", "r2"]
    assert table["content"].to_pylist() == [r["content"] for r in rows]
    assert table["tags"].to_pylist() == ['["a","0"]', '["a","1"]', '["a","2"]']


def test_csv_and_jsonl_write_timestamps_the_same_iso_way(tmp_path: Path) -> None:
    """CSV and JSONL write each timestamp as the same ISO 8601 text with T, in the column's
    unit and zone: UTC as Z, a naive carried column without a zone."""
    naive = datetime(2025, 9, 30, 8, 15, 1, 250_000)
    path = write_output(
        tmp_path / "o.parquet", [result_row("r1", seen=naive)], {"seen": pa.timestamp("us")}
    )
    (line,) = export(path, "jsonl")
    sink = io.BytesIO()
    export_output(path, sink, fmt="csv")
    (row,) = csv.DictReader(io.StringIO(sink.getvalue().decode()))
    expected = {
        "started_at": "2025-10-01T12:00:00.000Z",
        "finished_at": "2025-10-01T12:00:02.500Z",
        "seen": "2025-09-30T08:15:01.250000",
    }
    assert {name: line[name] for name in expected} == expected
    assert {name: row[name] for name in expected} == expected


def test_csv_of_an_empty_output_is_its_header(tmp_path: Path) -> None:
    """An output with no rows exports as the header line alone."""
    sink = io.BytesIO()
    export_output(write_output(tmp_path / "o.parquet", []), sink, fmt="csv")
    (header,) = sink.getvalue().splitlines()
    assert header.startswith(b'"id","status","content"')


def test_writes_to_stdout_without_o(tmp_path: Path) -> None:
    """With no -o the lines go to standard output."""
    path = write_output(tmp_path / "o.parquet", [result_row("r1"), result_row("r2")])
    result = invoke(str(path), "--format", "jsonl")
    assert result.exit_code == 0, result.output
    assert [orjson.loads(line)["id"] for line in result.output.splitlines()] == ["r1", "r2"]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        pytest.param("missing.parquet", None, "no such file", id="missing"),
        pytest.param(
            "notes.parquet", b"not parquet at all", "not a Parquet file", id="not-parquet"
        ),
    ],
)
def test_bad_output_exits_2(
    tmp_path: Path, name: str, content: bytes | None, fragment: str
) -> None:
    """A missing or non-Parquet OUTPUT: exit 2 with one line naming the file."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = invoke(str(path), "--format", "openai-batch")
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert str(path) in result.output and fragment in result.output
    assert "Traceback" not in result.output


def test_export_onto_itself_is_refused(tmp_path: Path) -> None:
    """-o naming OUTPUT itself would destroy it: exit 2, the file untouched."""
    path = write_output(tmp_path / "o.parquet", [result_row("r1")])
    result = invoke(str(path), "--format", "csv", "-o", str(path))
    assert result.exit_code == 2
    assert "onto itself" in result.output
    assert pq.read_table(path).num_rows == 1
