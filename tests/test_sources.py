"""Reading prompt sets: JSONL and Parquet in batches, the pre-run scan, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import sources
from batchrun.errors import InputError
from batchrun.job import Job, build_job
from batchrun.sources import (
    InputRow,
    InputSummary,
    RowIds,
    detect_format,
    input_identity,
    iter_batches,
    locate_rows,
    scan_input,
)
from tests.conftest import write_jsonl


def job_for(path: Path, **extra: Any) -> Job:
    return build_job({"input": str(path), "output": str(path.with_name("out.parquet")), **extra})


def prompts(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(n)]


def write_parquet(path: Path, columns: dict[str, list[Any]], **options: Any) -> Path:
    pq.write_table(pa.table(columns), path, **options)
    return path


def scan_error(path: Path, **extra: Any) -> InputError:
    with pytest.raises(InputError) as caught:
        scan_input(job_for(path, **extra))
    return caught.value


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("in.jsonl", "jsonl", id="jsonl"),
        pytest.param("in.ndjson", "jsonl", id="ndjson"),
        pytest.param("in.json", "jsonl", id="json"),
        pytest.param("in.JSONL", "jsonl", id="upper-case"),
        pytest.param("in.parquet", "parquet", id="parquet"),
        pytest.param("in.pq", "parquet", id="pq"),
        pytest.param("in.v2.parquet", "parquet", id="dotted-stem"),
    ],
)
def test_detect_format(name: str, expected: str) -> None:
    """The format comes from the last suffix."""
    assert detect_format(Path(name)) == expected


@pytest.mark.parametrize("name", ["in.csv", "in", "in.jsonl.gz", "in.parquet.bak"])
def test_unknown_extension_names_file(name: str) -> None:
    """An unknown suffix raises InputError naming the file."""
    with pytest.raises(InputError, match="unknown input format") as caught:
        detect_format(Path(name))
    assert caught.value.path == name


# --- streaming JSONL -------------------------------------------------------------------------


def test_jsonl_streams_in_batches_of_requested_size(tmp_path: Path) -> None:
    """Rows come out in batches of batch_size, the last one shorter."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(7))
    sizes = [len(batch) for batch in iter_batches(path, batch_size=3)]
    assert sizes == [3, 3, 1]


def test_jsonl_rows_keep_order_and_data(tmp_path: Path) -> None:
    """Rows keep their order and content, with 0-based index and 1-based line."""
    rows = prompts(3)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    flat = [row for batch in iter_batches(path, batch_size=2) for row in batch]
    assert [r.data for r in flat] == rows
    assert [(r.index, r.line) for r in flat] == [(0, 1), (1, 2), (2, 3)]


def test_jsonl_blank_lines_skipped(tmp_path: Path) -> None:
    """Blank and whitespace-only lines are skipped, line numbers still count them."""
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"prompt": "a"}\n   \n\n{"prompt": "b"}\n\n', encoding="utf-8")
    flat = [row for batch in iter_batches(path) for row in batch]
    assert [(r.index, r.line, r.data["prompt"]) for r in flat] == [(0, 2, "a"), (1, 5, "b")]


def test_jsonl_blank_lines_across_batches_keep_numbers(tmp_path: Path) -> None:
    """Batches read a few lines at a time: a blank line in a later one is left out, the rows
    after it keep their positions and line numbers, and a batch without one is whole."""
    path = tmp_path / "in.jsonl"
    lines = [f'{{"prompt": "p{i}"}}' for i in range(7)]
    lines.insert(4, "  ")  # line 5, in the second batch of three lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    batches = list(iter_batches(path, batch_size=3))
    assert [len(batch) for batch in batches] == [3, 2, 2]
    flat = [(r.index, r.line, r.data["prompt"]) for batch in batches for r in batch]
    assert flat == [(i, i + 1 if i < 4 else i + 2, f"p{i}") for i in range(7)]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [("[1, 2]", "must be a JSON object"), ("{oops}", "not valid JSON")],
    ids=["not-an-object", "malformed"],
)
def test_a_bad_line_in_the_middle_of_a_batch_names_its_line(
    tmp_path: Path, bad: str, problem: str
) -> None:
    """A bad line among good ones in the same batch is the one named, by its own number
    (the batch is parsed at once first, then line by line to find it)."""
    path = tmp_path / "in.jsonl"
    good = '{"prompt": "a"}\n'
    path.write_text(good * 3 + bad + "\n" + good + "{oops}\n", encoding="utf-8")
    with pytest.raises(InputError, match=problem) as raised:
        list(iter_batches(path, batch_size=100))
    assert raised.value.line == 4


def test_jsonl_crlf_line_endings(tmp_path: Path) -> None:
    """Windows line endings are read like any other."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [r.data["prompt"] for batch in iter_batches(path) for r in batch] == ["a", "b"]


def test_jsonl_last_line_without_newline(tmp_path: Path) -> None:
    """A last line without a newline is still read."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}')
    assert sum(len(batch) for batch in iter_batches(path)) == 2


@pytest.mark.parametrize(
    ("rows", "batch_size", "limit", "sizes"),
    [
        pytest.param(10, 4, 6, [4, 2], id="mid-batch"),
        pytest.param(10, 4, 4, [4], id="on-boundary"),
        pytest.param(10, 4, 1, [1], id="one"),
        pytest.param(3, 4, 100, [3], id="beyond-end"),
    ],
)
def test_limit_stops_after_n_rows(
    tmp_path: Path, rows: int, batch_size: int, limit: int, sizes: list[int]
) -> None:
    """limit stops the stream after that many rows."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    assert [len(b) for b in iter_batches(path, batch_size=batch_size, limit=limit)] == sizes


def test_limit_does_not_read_bad_rows_past_it(tmp_path: Path) -> None:
    """Rows after the limit are not parsed, so a bad line there does no harm."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\nnot json\n', encoding="utf-8")
    assert sum(len(b) for b in iter_batches(path, batch_size=1, limit=2)) == 2


# --- streaming Parquet -----------------------------------------------------------------------


def test_parquet_streams_in_batches_of_requested_size(tmp_path: Path) -> None:
    """Parquet rows come out in batches of batch_size, across row groups."""
    path = write_parquet(
        tmp_path / "in.parquet",
        {"prompt": [f"q{i}" for i in range(10)]},
        row_group_size=4,
    )
    sizes = [len(batch) for batch in iter_batches(path, batch_size=3)]
    assert sum(sizes) == 10
    assert max(sizes) <= 3


def test_parquet_rows_have_index_and_no_line(tmp_path: Path) -> None:
    """Parquet rows carry their position and no line number."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", "b", "c"], "n": [1, 2, 3]})
    flat = [row for batch in iter_batches(path, batch_size=2) for row in batch]
    assert [(r.index, r.line, r.data) for r in flat] == [
        (0, None, {"prompt": "a", "n": 1}),
        (1, None, {"prompt": "b", "n": 2}),
        (2, None, {"prompt": "c", "n": 3}),
    ]


def test_parquet_limit(tmp_path: Path) -> None:
    """limit applies to Parquet too."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": [f"q{i}" for i in range(10)]})
    assert sum(len(b) for b in iter_batches(path, batch_size=4, limit=5)) == 5


def test_parquet_messages_column_read_as_list_of_dicts(tmp_path: Path) -> None:
    """A Parquet list-of-struct messages column comes out as a list of dicts."""
    messages = [[{"role": "user", "content": "hi"}]]
    path = write_parquet(tmp_path / "in.parquet", {"messages": messages})
    [[row]] = list(iter_batches(path))
    assert row.data["messages"] == messages[0]


# --- row ids ---------------------------------------------------------------------------------


def test_row_id_from_id_column() -> None:
    """The id column's value, in its own type."""
    row = InputRow(0, 1, {"id": 7, "prompt": "x"})
    assert RowIds.choose(None, row.data).value(row, Path("in.jsonl")) == 7


@pytest.mark.parametrize(
    "value", [pytest.param([1, 2], id="list"), pytest.param({"a": 1}, id="object")]
)
def test_row_id_must_be_a_single_value(value: Any) -> None:
    """A list or an object is no id: refused naming the line and the id column."""
    row = InputRow(2, 3, {"id": value, "prompt": "x"})
    with pytest.raises(InputError, match="an id must be a single value") as raised:
        RowIds("id").value(row, Path("in.jsonl"))
    assert (raised.value.line, raised.value.column) == (3, "id")


def test_row_id_from_position() -> None:
    """Without an id column, the row's position, as text."""
    row = InputRow(4, 5, {"prompt": "x"})
    assert RowIds.choose(None, row.data).value(row, Path("in.jsonl")) == "4"


def test_row_id_from_custom_id() -> None:
    """A batch line's custom_id wins over the id column."""
    row = InputRow(0, 1, {"custom_id": "req-1", "id": "other", "body": {"messages": []}})
    assert RowIds.choose("id", row.data).value(row, Path("in.jsonl")) == "req-1"


def test_row_id_missing_names_line_and_column() -> None:
    """A missing id raises InputError naming the line and the id column."""
    with pytest.raises(InputError) as caught:
        RowIds("id").value(InputRow(2, 3, {"prompt": "x"}), Path("in.jsonl"))
    assert (caught.value.line, caught.value.column) == (3, "id")


# --- scan ------------------------------------------------------------------------------------


def test_scan_counts_rows(tmp_path: Path) -> None:
    """The scan counts every row."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    summary = scan_input(job_for(path))
    assert isinstance(summary, InputSummary)
    assert summary.rows == 5
    assert summary.batch_format is False


def test_scan_counts_parquet_rows(tmp_path: Path) -> None:
    """The scan counts Parquet rows."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", "b", "c"]})
    assert scan_input(job_for(path)).rows == 3


def test_scan_respects_job_limit(tmp_path: Path) -> None:
    """The job's limit caps the row count."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    assert scan_input(job_for(path, limit=2)).rows == 2


def test_scan_detects_batch_format(tmp_path: Path) -> None:
    """OpenAI batch lines are recognised."""
    rows = [
        {"custom_id": f"req-{i}", "body": {"messages": [{"role": "user", "content": "hi"}]}}
        for i in range(2)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert scan_input(job_for(path)).batch_format is True


def test_scan_shipped_batch_sample() -> None:
    """The shipped batch sample scans as batch format."""
    path = Path(__file__).resolve().parent.parent / "sample_data" / "batch_requests.jsonl"
    summary = scan_input(job_for(path))
    assert summary.batch_format is True
    assert summary.rows > 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([1, 2, None], pa.int64(), id="int"),
        pytest.param([1.5, 2, None], pa.float64(), id="float"),
        pytest.param(["a", None, "b"], pa.string(), id="str"),
        pytest.param([True, False], pa.bool_(), id="bool"),
        pytest.param([None, None], pa.string(), id="all-null"),
        pytest.param([1, "a"], pa.large_string(), id="mixed"),
        pytest.param([{"a": 1}, [1]], pa.large_string(), id="nested"),
    ],
)
def test_carried_column_types_from_jsonl(
    tmp_path: Path, values: list[Any], expected: pa.DataType
) -> None:
    """A carried JSONL column's type is settled from all its values."""
    rows = [{"prompt": "q", "extra": value} for value in values]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    summary = scan_input(job_for(path, prompt={"carry": ["extra"]}))
    assert summary.carried_types == {"id": pa.string(), "extra": expected}


def test_carried_types_keep_job_order(tmp_path: Path) -> None:
    """Carried columns are listed in the job's order, after the id."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "a": 1, "b": "x"}])
    summary = scan_input(job_for(path, prompt={"carry": ["b", "a"]}))
    assert list(summary.carried_types) == ["id", "b", "a"]


def test_carried_column_types_from_parquet_schema(tmp_path: Path) -> None:
    """A carried Parquet column keeps its schema type."""
    table = pa.table(
        {
            "prompt": ["a", "b"],
            "n": pa.array([1, 2], pa.int32()),
            "when": pa.array([1, 2], pa.timestamp("ms")),
        }
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    summary = scan_input(job_for(path, prompt={"carry": ["when", "n"]}))
    assert summary.carried_types == {
        "id": pa.string(),
        "when": pa.timestamp("ms"),
        "n": pa.int32(),
    }


def test_no_carry_no_types(tmp_path: Path) -> None:
    """A job that carries nothing has only the id's type."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    assert scan_input(job_for(path)).carried_types == {"id": pa.string()}


# --- bad input -------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    """A malformed JSON line names the file and its line number."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    error = scan_error(path)
    assert (error.path, error.line) == (str(path), 2)
    assert f"{path}, line 2" in str(error)
    assert "not valid JSON" in str(error)


def test_malformed_json_line_number_counts_blank_lines(tmp_path: Path) -> None:
    """The line number of a bad line counts the blank lines before it."""
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n\n{oops}\n', encoding="utf-8")
    assert scan_error(path).line == 5


@pytest.mark.parametrize(
    "line",
    [
        pytest.param('["prompt", "a"]', id="array"),
        pytest.param('"just a string"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
    ],
)
def test_line_that_is_not_an_object(tmp_path: Path, line: str) -> None:
    """A line that is valid JSON but not an object names its line."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n' + line + "\n", encoding="utf-8")
    error = scan_error(path)
    assert error.line == 2
    assert "must be a JSON object" in str(error)


def test_missing_prompt_names_column_and_lists_columns(tmp_path: Path) -> None:
    """A row with neither prompt nor messages names the line, the column and its columns."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"id": 2, "text": "b"}])
    error = scan_error(path)
    assert (error.path, error.line, error.column) == (str(path), 2, "prompt")
    assert f"{path}, line 2, column 'prompt'" in str(error)
    assert "'id', 'text'" in str(error)


def test_missing_prompt_in_parquet_names_row(tmp_path: Path) -> None:
    """In Parquet, a row without a prompt is named by its 1-based row number."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", None, "c"]})
    error = scan_error(path)
    assert (error.row, error.line, error.column) == (2, None, "prompt")
    assert f"{path}, row 2, column 'prompt'" in str(error)


def test_template_column_missing_names_line_and_column(tmp_path: Path) -> None:
    """A row lacking a template column names the line and that column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"txt": "b"}])
    error = scan_error(path, prompt={"template": "Say {text}"})
    assert (error.line, error.column) == (2, "text")
    assert "'txt'" in str(error)


def test_bad_template_names_the_input(tmp_path: Path) -> None:
    """A malformed template is reported against the input file."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    error = scan_error(path, prompt={"template": "{0}"})
    assert error.path == str(path)
    assert "bad template" in str(error)


def test_bad_messages_name_line_and_column(tmp_path: Path) -> None:
    """Invalid messages name the line and the messages column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    error = scan_error(path)
    assert (error.line, error.column) == (1, "messages")


@pytest.mark.parametrize("small", [pytest.param(100, id="set"), pytest.param(0, id="sorted")])
def test_duplicate_id_found_by_set_and_by_sort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: int
) -> None:
    """A small input's ids are checked with a set and a large one's by sorting: both name
    the repeated id and its lines."""
    monkeypatch.setattr(sources, "SMALL_ID_CHECK_ROWS", small)
    rows = [{"id": f"r{3 if i == 9 else i}", "prompt": "p"} for i in range(12)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert "duplicate id 'r3' in lines 4 and 10" in str(
        scan_error(path, prompt={"id_column": "id"})
    )
    write_jsonl(path, [{"id": f"r{i}", "prompt": "p"} for i in range(12)])
    assert scan_input(job_for(path, prompt={"id_column": "id"})).rows == 12


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    """A repeated id names the first two lines that carry it."""
    rows = [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    error = scan_error(path, prompt={"id_column": "id"})
    assert "duplicate id 'a' in lines 1 and 3" in str(error)
    assert str(path) in str(error)


def test_duplicate_id_lines_count_blank_lines(tmp_path: Path) -> None:
    """Duplicate-id line numbers are file lines, blank lines included."""
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\n', encoding="utf-8")
    assert "in lines 2 and 4" in str(scan_error(path, prompt={"id_column": "id"}))


def test_duplicate_id_in_parquet_names_both_rows(tmp_path: Path) -> None:
    """In Parquet, a repeated id names both rows."""
    path = write_parquet(tmp_path / "in.parquet", {"id": [1, 2, 1], "prompt": ["a", "b", "c"]})
    assert "duplicate id '1' in rows 1 and 3" in str(scan_error(path, prompt={"id_column": "id"}))


def test_duplicate_custom_id_in_batch_lines(tmp_path: Path) -> None:
    """Batch lines with the same custom_id are refused."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    rows = [{"custom_id": "x", "body": body}, {"custom_id": "x", "body": body}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert "duplicate id 'x' in lines 1 and 2" in str(scan_error(path))


def test_duplicate_ids_past_limit_ignored(tmp_path: Path) -> None:
    """Only the rows within the job's limit are checked for duplicates."""
    rows = [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    assert scan_input(job_for(path, limit=2, prompt={"id_column": "id"})).rows == 2


def test_missing_id_names_line_and_id_column(tmp_path: Path) -> None:
    """A row without its id names the line and the id column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "1"}, {"prompt": "2"}])
    error = scan_error(path, prompt={"id_column": "id"})
    assert (error.line, error.column) == (2, "id")


@pytest.mark.parametrize(
    "content",
    [pytest.param("", id="empty"), pytest.param("\n\n  \n", id="blank-lines")],
)
def test_empty_jsonl_has_no_rows(tmp_path: Path, content: str) -> None:
    """A file with no rows is refused, naming the file."""
    path = tmp_path / "in.jsonl"
    path.write_text(content, encoding="utf-8")
    error = scan_error(path)
    assert error.path == str(path)
    assert "no rows" in str(error)


def test_empty_parquet_has_no_rows(tmp_path: Path) -> None:
    """A Parquet file with a schema and no rows is refused."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": pa.array([], pa.string())})
    assert "no rows" in str(scan_error(path))


def test_not_parquet_named_parquet(tmp_path: Path) -> None:
    """A file named .parquet that is not Parquet names the file."""
    path = tmp_path / "in.parquet"
    path.write_text('{"prompt": "a"}\n', encoding="utf-8")
    error = scan_error(path)
    assert error.path == str(path)
    assert "not a readable Parquet file" in str(error)


def test_unknown_extension_in_scan(tmp_path: Path) -> None:
    """A scan of a file with an unknown suffix names the file."""
    path = tmp_path / "in.csv"
    path.write_text("prompt\na\n", encoding="utf-8")
    error = scan_error(path)
    assert error.path == str(path)
    assert "unknown input format" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    """A file that does not exist names the file."""
    path = tmp_path / "nope.jsonl"
    error = scan_error(path)
    assert error.path == str(path)
    assert "no such file" in str(error)


def test_directory_named_jsonl(tmp_path: Path) -> None:
    """An input path that is a directory gives InputError naming it."""
    path = tmp_path / "in.jsonl"
    path.mkdir()
    assert scan_error(path).path == str(path)


def test_carried_column_absent(tmp_path: Path) -> None:
    """A carried column no row has names the column and lists the input's columns."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    error = scan_error(path, prompt={"carry": ["id", "label"]})
    assert error.column == "label"
    assert error.path == str(path)
    assert "'label'" in str(error)
    assert "id, prompt" in str(error)


def test_carried_column_absent_from_parquet(tmp_path: Path) -> None:
    """A carried column missing from a Parquet file is named."""
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a"]})
    assert scan_error(path, prompt={"carry": ["label"]}).column == "label"


def test_carried_column_present_in_some_rows(tmp_path: Path) -> None:
    """A carried column that only some rows have is accepted."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b", "label": "x"}])
    summary = scan_input(job_for(path, prompt={"carry": ["label"]}))
    assert summary.carried_types == {"id": pa.string(), "label": pa.string()}


# --- ids chosen from the columns ---------------------------------------------------------------


def test_id_column_named_id_is_found_without_being_named(tmp_path: Path) -> None:
    """A column named `id` is the id without id_column: its duplicates are found."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 4, "prompt": "a"}, {"id": 4, "prompt": "b"}])
    assert "duplicate id '4' in lines 1 and 2" in str(scan_error(path))


def test_parquet_int_id_column_keeps_its_type(tmp_path: Path) -> None:
    """A Parquet int id column makes an int64 id column."""
    path = write_parquet(
        tmp_path / "in.parquet", {"id": pa.array([3, 1], pa.int32()), "prompt": ["a", "b"]}
    )
    summary = scan_input(job_for(path))
    assert summary.ids.column == "id" and summary.ids.as_text is False
    assert summary.carried_types["id"] == pa.int64()


def test_a_nested_id_is_refused(tmp_path: Path) -> None:
    """An id that is a list or object is refused, naming line and column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": [1], "prompt": "a"}])
    error = scan_error(path)
    assert (error.line, error.column) == (1, "id")


# --- the whole input's identity ----------------------------------------------------------------


def test_input_identity_sees_a_same_size_edit_in_the_middle(tmp_path: Path) -> None:
    """A one-byte edit in the middle of a 3 MiB file changes its identity."""
    path = tmp_path / "in.jsonl"
    data = bytearray(b"a" * (3 << 20))
    path.write_bytes(bytes(data))
    before = input_identity(path)
    data[len(data) // 2] = ord("b")
    path.write_bytes(bytes(data))
    after = input_identity(path)
    assert before["size"] == after["size"] and before != after


def test_scan_reports_the_input_identity(tmp_path: Path) -> None:
    """The scan hashes the whole input beside its own pass."""
    path = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    assert scan_input(job_for(path, limit=1)).identity == input_identity(path)


# --- what spreadsheets and other tools write ---------------------------------------------------


def test_jsonl_with_a_byte_order_mark_reads_its_first_line(tmp_path: Path) -> None:
    """A UTF-8 BOM before the first line is skipped, not a JSON error."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    rows = [row.data for batch in iter_batches(path) for row in batch]
    assert rows == [{"prompt": "a"}, {"prompt": "b"}]


def test_null_template_column_says_it_is_null(tmp_path: Path) -> None:
    """A template column present but null says so, naming line and column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": None}])
    error = scan_error(path, prompt={"template": "Say {text}"})
    assert (error.line, error.column) == (2, "text")
    assert "column 'text' is null" in str(error)


# --- OpenAI batch lines as written -------------------------------------------------------------


def batch_line(custom_id: str = "r1", **fields: Any) -> dict[str, Any]:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return {**line, "body": body, **fields}


@pytest.mark.parametrize("url", ["/bad_url", "/v1/embeddings"])
def test_batch_line_for_another_endpoint_names_line_and_url(tmp_path: Path, url: str) -> None:
    """A batch line for another endpoint is an input error naming its line and URL."""
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line("a"), batch_line("b", url=url)])
    error = scan_error(path)
    assert (error.line, error.column) == (2, "url")
    assert url in str(error)


def test_batch_line_with_get_is_refused(tmp_path: Path) -> None:
    """A batch line whose method is not POST is an input error naming the line."""
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line(method="GET")])
    error = scan_error(path)
    assert (error.line, error.column) == (1, "method")


def test_batch_line_without_custom_id_says_so(tmp_path: Path) -> None:
    """A batch line missing custom_id says so, not that it lacks a prompt column."""
    line = batch_line()
    del line["custom_id"]
    path = write_jsonl(tmp_path / "in.jsonl", [line])
    error = scan_error(path)
    assert "line 1" in str(error)
    assert "OpenAI batch line without custom_id" in str(error)


def test_batch_line_stream_as_text_is_refused(tmp_path: Path) -> None:
    """A body field of the wrong type ("stream": "True") is an input error."""
    line = batch_line()
    line["body"]["stream"] = "True"
    path = write_jsonl(tmp_path / "in.jsonl", [line])
    assert scan_error(path).column == "body.stream"


def test_reading_from_any_located_row_gives_the_rest_of_a_full_read(tmp_path: Path) -> None:
    """`locate_rows` (Ray's shard starts) and the batch reader agree on which lines are rows:
    from each located row on, a read yields exactly the full read's rows from there, with
    the same positions and line numbers (a BOM, blank and whitespace-only lines, CRLF)."""
    path = tmp_path / "in.jsonl"
    lines = ['{"prompt": "p0"}', "", '{"prompt": "p1"}', "   ", "\t", '{"prompt": "p2"}']
    lines += [f'{{"prompt": "p{i}"}}' for i in range(3, 9)] + [" ", '{"prompt": "p9"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    full = [(r.index, r.line, r.data) for b in iter_batches(path, batch_size=3) for r in b]
    assert [data["prompt"] for _, _, data in full] == [f"p{i}" for i in range(10)]
    starts = locate_rows(path, list(range(10)))
    assert [start.row for start in starts] == list(range(10))
    for start in starts:
        rest = [
            (r.index, r.line, r.data)
            for b in iter_batches(path, batch_size=3, start=start)
            for r in b
        ]
        assert rest == full[start.row :]
