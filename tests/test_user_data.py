"""End to end: the user's data comes back as they gave it (ids, columns, types, the input).

Through the real HTTP path to the fake on 127.0.0.1, as a user would see it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.errors import ConfigError
from batchrun.export import export_output
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.runner import RunSummary, run_job
from tests.conftest import fast_job_data, write_jsonl


def run(tmp_path: Path, fake: FakeServer, rows: list[dict[str, Any]], **extra: Any) -> RunSummary:
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = build_job(fast_job_data(tmp_path, fake.base_url, **extra))
    return run_job(job, settings=PoolSettings(flush_rows=2, flush_seconds=0.05))


def output(tmp_path: Path) -> pa.Table:
    return pq.read_table(tmp_path / "out.parquet")


def cli_run(tmp_path: Path, fake: FakeServer, *args: str) -> Result:
    common = ["run", "--input", str(tmp_path / "in.jsonl"), "--output"]
    common += [str(tmp_path / "out.parquet"), "--base-url", fake.base_url, "--max-attempts", "2"]
    return CliRunner().invoke(cli, [*common, *args])


# --- ids -------------------------------------------------------------------------------------


def test_int_id_column_comes_back_as_int64(tmp_path: Path, fake: FakeServer) -> None:
    """An `id` column of whole numbers is the row identity by default, kept as int64."""
    run(tmp_path, fake, [{"id": 70 + i, "prompt": f"q{i}"} for i in range(3)])
    table = output(tmp_path)
    assert table.schema.field("id").type == pa.int64()
    assert table.column("id").to_pylist() == [70, 71, 72]


def test_string_id_column_comes_back_as_given(tmp_path: Path, fake: FakeServer) -> None:
    """An `id` column of strings is the row identity by default."""
    run(tmp_path, fake, [{"id": f"doc-{i}", "prompt": f"q{i}"} for i in range(3)])
    assert output(tmp_path).column("id").to_pylist() == ["doc-0", "doc-1", "doc-2"]


def test_custom_id_column_is_the_id_when_there_is_no_id(tmp_path: Path, fake: FakeServer) -> None:
    """A plain row's `custom_id` column is its id when there is no `id` column."""
    run(tmp_path, fake, [{"custom_id": f"c{i}", "prompt": f"q{i}"} for i in range(2)])
    assert output(tmp_path).column("id").to_pylist() == ["c0", "c1"]


def test_id_column_wins_over_id(tmp_path: Path, fake: FakeServer) -> None:
    """A named id_column wins over a column named `id`."""
    rows = [{"id": i, "doc": f"d{i}", "prompt": f"q{i}"} for i in range(2)]
    run(tmp_path, fake, rows, prompt={"id_column": "doc"})
    assert output(tmp_path).column("id").to_pylist() == ["d0", "d1"]


def test_id_column_false_forces_positions(tmp_path: Path, fake: FakeServer) -> None:
    """`id_column = false` numbers the rows by position even with an `id` column."""
    rows = [{"id": 5, "prompt": "a"}, {"id": 5, "prompt": "b"}]  # duplicates do not matter
    run(tmp_path, fake, rows, prompt={"id_column": False})
    assert output(tmp_path).column("id").to_pylist() == ["0", "1"]


def test_empty_id_column_flag_forces_positions(tmp_path: Path, fake: FakeServer) -> None:
    """`--id-column ''` is the flag form of `id_column = false`."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": 9, "prompt": "a"}, {"id": 9, "prompt": "b"}])
    result = cli_run(tmp_path, fake, "--id-column", "")
    assert result.exit_code == 0, result.output
    assert output(tmp_path).column("id").to_pylist() == ["0", "1"]


def test_mixed_id_types_come_back_as_strings(tmp_path: Path, fake: FakeServer) -> None:
    """Ids of more than one type are all written as strings."""
    run(tmp_path, fake, [{"id": 1, "prompt": "a"}, {"id": "x", "prompt": "b"}])
    table = output(tmp_path)
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == ["1", "x"]


def test_duplicate_ids_in_an_id_column_are_refused(tmp_path: Path, fake: FakeServer) -> None:
    """Two rows with the same `id` stop the run before anything is sent, exit 2."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": 3, "prompt": "a"}, {"id": 3, "prompt": "b"}])
    result = cli_run(tmp_path, fake)
    assert result.exit_code == 2
    assert "duplicate id '3' in lines 1 and 2" in result.output
    assert fake.requests() == []


def test_export_custom_id_is_the_users_id(tmp_path: Path, fake: FakeServer) -> None:
    """The OpenAI batch export's custom_id is the user's id, as text."""
    run(tmp_path, fake, [{"id": 41, "prompt": "a"}, {"id": 42, "prompt": "b"}])
    sink = io.BytesIO()
    export_output(tmp_path / "out.parquet", sink, fmt="openai-batch")
    lines = [orjson.loads(line) for line in sink.getvalue().splitlines()]
    assert [line["custom_id"] for line in lines] == ["41", "42"]


def test_carrying_the_id_column_named_id_is_allowed(tmp_path: Path, fake: FakeServer) -> None:
    """Carrying `id` when the ids come from `id` writes one id column, the user's."""
    run(tmp_path, fake, [{"id": 8, "prompt": "a"}], prompt={"carry": ["id", "prompt"]})
    table = output(tmp_path)
    assert table.column_names.count("id") == 1
    assert table.column("id").to_pylist() == [8]


def test_carrying_id_while_ids_come_from_elsewhere_is_refused(
    tmp_path: Path, fake: FakeServer
) -> None:
    """Carrying `id` when the ids are positions would clash: refused, naming both."""
    with pytest.raises(ConfigError, match="carried column 'id' would clash"):
        run(
            tmp_path, fake, [{"id": 8, "prompt": "a"}], prompt={"carry": ["id"], "id_column": False}
        )


# --- columns named like request parameters ---------------------------------------------------

LOOKALIKES = {
    "model": "Corolla",
    "system": "Linux",
    "temperature": "hot",
    "stop": ["never"],
    "max_tokens": -5,
}


def test_columns_named_like_parameters_never_change_the_request(
    tmp_path: Path, fake: FakeServer
) -> None:
    """model/system/temperature/stop/max_tokens columns leave the request as the job says."""
    rows = [{"id": i, "prompt": f"q{i}", **LOOKALIKES} for i in range(2)]
    summary = run(tmp_path, fake, rows, model="deepseek-chat", params={"temperature": 0.3})
    assert summary.rows_ok == 2
    for body in fake.requests():
        assert body["model"] == "deepseek-chat"
        assert body["temperature"] == 0.3
        assert "stop" not in body and "max_tokens" not in body
        assert [m["role"] for m in body["messages"]] == ["user"]


def test_columns_named_like_parameters_can_be_carried(tmp_path: Path, fake: FakeServer) -> None:
    """Such columns are carried into the output like any other."""
    carry = ["system", "temperature", "stop", "max_tokens"]
    run(tmp_path, fake, [{"prompt": "q", **LOOKALIKES}], prompt={"carry": carry})
    row = output(tmp_path).to_pylist()[0]
    assert row["status"] == "ok"
    assert row["system"] == "Linux" and row["temperature"] == "hot"
    assert row["stop"] == '["never"]' and row["max_tokens"] == -5


def test_row_params_take_values_from_columns(tmp_path: Path, fake: FakeServer) -> None:
    """Columns named in row_params, and the system_column, set each row's request."""
    rows = [
        {"prompt": "a", "temperature": 0.1, "sys": "Be brief."},
        {"prompt": "b", "temperature": None, "sys": None},
    ]
    prompt = {"row_params": ["temperature"], "system_column": "sys", "system": "Job."}
    run(tmp_path, fake, rows, prompt=prompt, params={"temperature": 1.0})
    sent = {body["messages"][-1]["content"]: body for body in fake.requests()}
    assert sent["a"]["temperature"] == 0.1
    assert sent["a"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["b"]["temperature"] == 1.0
    assert sent["b"]["messages"][0] == {"role": "system", "content": "Job."}


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        pytest.param("temperature", "hot", "line 2, column 'temperature'", id="temperature-hot"),
        pytest.param("max_tokens", -1, "line 2, column 'max_tokens'", id="negative-max_tokens"),
    ],
)
def test_bad_row_param_is_exit_2_before_any_request(
    tmp_path: Path, fake: FakeServer, column: str, value: Any, message: str
) -> None:
    """A bad row_params value is an input error naming line and column; nothing is sent."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b", column: value}])
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\n[prompt]\nrow_params = ["{column}"]\n')
    result = cli_run(tmp_path, fake, str(job))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert fake.requests() == []


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        pytest.param(
            'system_column = "sytem"', "system_column names column 'sytem'", id="system_column"
        ),
        pytest.param(
            'row_params = ["temperature"]', "row_params names column 'temperature'", id="row_params"
        ),
    ],
)
def test_a_request_column_no_row_has_is_exit_2_before_any_request(
    tmp_path: Path, fake: FakeServer, prompt: str, message: str
) -> None:
    """A system_column or row_params column that no row has (a typo) would send every row
    without the system prompt or parameter asked for: exit 2 naming it, nothing sent."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "system": "S"}, {"prompt": "b"}])
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\n[prompt]\n{prompt}\n')
    result = cli_run(tmp_path, fake, str(job))
    assert result.exit_code == 2, result.output
    assert (
        message in result.output and "which no row has (columns: prompt, system)" in result.output
    )
    assert fake.requests() == []
    assert not (tmp_path / "out.parquet.parts").exists()


# --- --limit, then the full run --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([None, None, 1.5, 2.5], [None, None, 1.5, 2.5], id="null-then-float"),
        pytest.param([1, 2, 2.5, 3], [1.0, 2.0, 2.5, 3.0], id="int-widens-to-float"),
        pytest.param([1, 2, "x", None], ["1", "2", "x", None], id="int-then-text"),
    ],
)
def test_limit_run_then_full_run_completes(
    tmp_path: Path, fake: FakeServer, values: list[Any], expected: list[Any]
) -> None:
    """A carried column whose type widens after the first rows survives --limit, then all."""
    rows = [{"prompt": f"q{i}", "score": v} for i, v in enumerate(values)]
    first = run(tmp_path, fake, rows, limit=2, prompt={"carry": ["score"]})
    assert first.complete and first.rows_ok == 2
    full = run(tmp_path, fake, rows, prompt={"carry": ["score"]})
    assert full.complete and full.rows_ok == 4
    assert output(tmp_path).column("score").to_pylist() == expected
    assert len(fake.requests()) == 4  # the first two were not asked again


def test_limit_run_then_full_run_with_ids_turning_mixed(tmp_path: Path, fake: FakeServer) -> None:
    """Int ids in the first rows and text ids later come back as text after both runs."""
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, {"id": "c", "prompt": "c"}]
    run(tmp_path, fake, rows, limit=2)
    assert run(tmp_path, fake, rows).complete
    assert output(tmp_path).column("id").to_pylist() == ["1", "2", "c"]


# --- an input edited between runs ------------------------------------------------------------


def test_a_limit_run_says_it_is_complete_up_to_its_limit(tmp_path: Path, fake: FakeServer) -> None:
    """`--limit 2` of 4 rows ends "complete up to --limit 2", not "complete" as if the whole
    job were done; the full run after it, and a --limit run after that, say "complete"."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(4)])
    first = cli_run(tmp_path, fake, "--limit", "2")
    assert first.exit_code == 0, first.output
    assert "complete up to --limit 2: 2 ok, 0 errors of 2 rows" in first.output
    rest = cli_run(tmp_path, fake)
    assert rest.exit_code == 0, rest.output
    assert "complete: 4 ok, 0 errors of 4 rows" in rest.output
    assert len(fake.requests()) == 4
    # --limit on a finished output: the whole output is done, not "4 ok of 2 rows"
    again = cli_run(tmp_path, fake, "--limit", "2")
    assert again.exit_code == 0, again.output
    assert "complete: 4 ok, 0 errors of 4 rows" in again.output
    assert "nothing to do" in again.output
    assert len(fake.requests()) == 4


def test_same_size_edit_in_the_middle_is_refused(tmp_path: Path, fake: FakeServer) -> None:
    """An input edited in its middle (same size, > 2 MiB) is not resumed: exit 2 naming it."""
    pad = "x" * 1000
    rows = [{"id": i, "prompt": f"q{i:05d} {pad}"} for i in range(3000)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert path.stat().st_size > 2 * 1024 * 1024
    assert cli_run(tmp_path, fake, "--limit", "2").exit_code == 0
    data = bytearray(path.read_bytes())
    middle = data.index(b"q01500")
    data[middle : middle + 6] = b"q99999"
    path.write_bytes(bytes(data))
    result = cli_run(tmp_path, fake)
    assert result.exit_code == 2, result.output
    assert str(path) in result.output
    assert "input changed since the checkpoint was made" in result.output
    assert len(fake.requests()) == 2


def test_input_edited_after_the_output_was_written_is_refused(
    tmp_path: Path, fake: FakeServer
) -> None:
    """An input edited after its job finished is not taken as done: exit 2 naming it."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert cli_run(tmp_path, fake).exit_code == 0
    path.write_bytes(path.read_bytes().replace(b'"b"', b'"c"'))
    result = cli_run(tmp_path, fake)
    assert result.exit_code == 2, result.output
    assert f"{path}: the input changed since out.parquet was written" in result.output
    assert len(fake.requests()) == 2


def test_ids_past_int64_come_back_as_strings(tmp_path: Path, fake: FakeServer) -> None:
    """Whole-number ids too big for int64 are written as text rather than failing the write."""
    run(tmp_path, fake, [{"id": 2**63, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    assert output(tmp_path).column("id").to_pylist() == [str(2**63), "1"]
