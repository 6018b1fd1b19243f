"""The journal and part files: what a row looks like on disk, and folding leftovers back."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import logs, sinks
from batchrun.sinks import (
    PartWriter,
    compact,
    journal_table,
    list_journals,
    list_parts,
    output_schema,
    read_journal,
    recover_journals,
)

CARRIED = {
    "day": pa.date32(),
    "at": pa.timestamp("ns", tz="Europe/Paris"),
    "local": pa.timestamp("us"),
    "clock": pa.time64("us"),
    "wait": pa.duration("ms"),
    "price": pa.decimal128(10, 2),
    "blob": pa.binary(),
    "tags": pa.list_(pa.string()),
    "meta": pa.large_string(),
}


@pytest.fixture(params=["python", "kernels"])
def compaction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each compaction test both ways: a small output's rows gathered in Python, and with
    Arrow's kernels (what an output past `SMALL_COMPACT_ROWS` takes)."""
    if request.param == "kernels":
        monkeypatch.setattr(sinks, "SMALL_COMPACT_ROWS", 0)
    return str(request.param)


def result(index: int, **fields: Any) -> dict[str, Any]:
    """A result row as the pool hands it to the writer."""
    started = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    return {
        "id": f"r{index}",
        "_index": index,
        "status": "ok",
        "content": f"echo: {index}",
        "prompt_tokens": 3,
        "attempts": 1,
        "latency_s": 0.25,
        "http_status": 200,
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=1500, microseconds=999),
        **fields,
    }


def carried_values(index: int) -> dict[str, Any]:
    return {
        "day": date(2024, 2, 29),
        "at": datetime(2024, 6, 1, 8, 30, 1, 5, tzinfo=timezone(timedelta(hours=2))),
        "local": datetime(1969, 12, 31, 23, 59, 59, 999999),
        "clock": time(23, 59, 59, 250000),
        "wait": timedelta(seconds=90, milliseconds=5),
        "price": Decimal("12.50"),
        "blob": bytes([0, 255, index]),
        "tags": ["a", "b"],
        "meta": {"nested": [1, 2]},
    }


def test_journal_rows_round_trip_to_the_part_schema(tmp_path: Path) -> None:
    """A journalled row, read back, gives the very table `write_part` writes from it:
    timestamps, dates, times, durations, decimals, bytes and nested values included."""
    writer = PartWriter(tmp_path, carried=CARRIED)
    rows = [result(0, **carried_values(0)), result(1, status="error", content=None)]
    for row in rows:
        writer.add(row)
    writer.close()
    (journal,) = list_journals(tmp_path)
    from_journal = journal_table(read_journal(journal), writer.schema)
    assert from_journal.equals(pa.Table.from_pylist(rows, schema=writer.schema))


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_journalled_times_before_1970_come_back_as_written(unit: str) -> None:
    """Epoch microseconds read from a journal become the timestamps writing the `datetime`
    makes, in every unit, before 1970 too (a cast truncated those toward zero)."""
    kind = pa.timestamp(unit, tz="UTC")
    times = [datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC), None]
    schema = pa.schema([("t", kind)])
    rows = [{"t": None if t is None else sinks.epoch_us(t)} for t in times]
    assert journal_table(rows, schema).equals(pa.table({"t": pa.array(times, kind)}))


@pytest.mark.parametrize("times", ["epoch_us", "datetime"])
def test_a_part_holds_the_same_timestamps_from_epoch_microseconds_or_datetimes(
    tmp_path: Path, times: str
) -> None:
    """Rows of `rows.RowMaker` hold started_at/finished_at as epoch microseconds, which the
    part writer converts a column at once (its fast path); rows holding `datetime`s there
    take the general conversion. Journal and part come out the same either way, carried
    timestamp columns untouched."""
    rows = [result(0, **carried_values(0)), result(1, **carried_values(1))]
    scratch = PartWriter(tmp_path / "scratch", carried=CARRIED)
    lines = [scratch._encode(row) for row in rows]  # carried JSON made text, as a write does
    reference = pa.Table.from_pylist(rows, schema=scratch.schema)
    if times == "epoch_us":
        for row in rows:
            for name in sinks.EPOCH_US_COLUMNS:
                row[name] = sinks.epoch_us(row[name])
    writer = PartWriter(tmp_path, carried=CARRIED)
    for row in rows:
        writer.add(row)
    [journal] = list_journals(tmp_path)
    assert journal.read_bytes() == b"".join(lines)
    taken = writer.take()
    assert taken is not None
    writer.write_part(*taken)
    assert pq.read_table(taken[0]).equals(reference)
    assert pq.read_table(taken[0])["started_at"][0].as_py() == datetime(
        2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC
    )


def test_a_part_of_complete_rows_is_the_part_of_rows_lacking_columns(tmp_path: Path) -> None:
    """Rows holding every column (the pool's) are gathered a row at a time (`itemgetter`);
    a row lacking a column sends the whole part the general way, with nulls there: the
    table is the one `from_pylist` makes either way."""
    writer = PartWriter(tmp_path, carried=CARRIED)
    complete = [
        {**dict.fromkeys(writer.schema.names), **result(i, **{**carried_values(i), "meta": "{}"})}
        for i in range(3)
    ]
    lacking = [*complete[:2], result(2, **{**carried_values(2), "meta": "{}"})]
    assert set(complete[2]) == set(writer.schema.names) and set(lacking[2]) != set(complete[2])
    for rows in (complete, lacking):
        table = sinks.part_table(rows, writer.schema)
        assert table.equals(pa.Table.from_pylist(complete, schema=writer.schema))
    assert sinks.part_table([], writer.schema).num_rows == 0


def test_queued_rows_are_journalled_together_in_one_write(tmp_path: Path) -> None:
    """Rows queued together reach the journal in one write call, a line each, and only then
    are they buffered for the part."""
    writer = PartWriter(tmp_path, carried={})
    for index in range(3):
        writer.queue(result(index))
    assert (len(writer), writer.writes, list_journals(tmp_path)) == (0, 0, [])
    written = writer.write_queued()
    writer.close()
    assert [row["_index"] for row in written] == [0, 1, 2]
    assert (len(writer), writer.writes) == (3, 1)
    [journal] = list_journals(tmp_path)
    assert [row["_index"] for row in read_journal(journal)] == [0, 1, 2]
    assert writer.write_queued() == [] and writer.writes == 1  # nothing queued: no write


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("sk-journal-5e4d3c2b1a", id="plain"),
        pytest.param('tok"en\\ключ-42', id="json-escaped"),
    ],
)
def test_a_secret_echoed_in_a_row_is_redacted_in_the_journal_and_the_part(
    tmp_path: Path, secret: str
) -> None:
    """A registered secret inside a row's text (quoted and escaped in JSON, or not) reaches
    neither the journal line nor the row kept for the part."""
    logs.register_secret(secret)
    writer = PartWriter(tmp_path, carried={"meta": pa.large_string()})
    writer.add(result(0, content=f"the key is {secret}", meta={"echo": [secret]}))
    writer.add(result(1, content="nothing to hide"))
    writer.close()
    [journal] = list_journals(tmp_path)
    text = journal.read_bytes()
    assert secret.encode() not in text and b"[redacted]" in text
    rows = read_journal(journal)
    assert rows[0]["content"] == "the key is [redacted]" and secret not in rows[0]["meta"]
    assert rows[1]["content"] == "nothing to hide"
    assert secret not in str(writer.take())


@pytest.mark.parametrize("secret", ["sk-nested-5e4d3c2b1a", 'tok"en\\key-42'])
def test_a_secret_only_in_a_nested_carried_column_is_redacted(tmp_path: Path, secret: str) -> None:
    """A secret only inside a carried object (JSON text within the JSON line, so escaped
    twice when it holds quotes or backslashes) reaches neither the journal nor the part."""
    logs.register_secret(secret)
    writer = PartWriter(tmp_path, carried={"meta": pa.large_string()})
    writer.add(result(0, content="nothing here", meta={"echo": [secret]}))
    writer.close()
    [journal] = list_journals(tmp_path)
    [row] = read_journal(journal)
    assert secret not in row["meta"] and "[redacted]" in row["meta"]
    assert secret not in str(writer.take())


def test_a_failed_journal_write_drops_the_queued_rows(tmp_path: Path) -> None:
    """When the journal cannot be written, the queued rows are neither buffered nor queued
    again: the caller never counts them."""
    writer = PartWriter(tmp_path / "gone", carried={})
    writer.queue(result(0))
    with pytest.raises(OSError):
        writer.write_queued()
    assert (len(writer), writer.write_queued()) == (0, [])


def test_a_written_part_replaces_its_journal_segment(tmp_path: Path) -> None:
    """take() ends a segment and the next add starts another; writing the part drops it."""
    writer = PartWriter(tmp_path, carried={})
    writer.add(result(0))
    taken = writer.take()
    writer.add(result(1))
    assert taken is not None and taken[0].name == "part-000001.parquet"
    names = [p.name for p in list_journals(tmp_path)]
    assert names == ["journal-000001.jsonl", "journal-000002.jsonl"]
    writer.write_part(*taken)
    assert [p.name for p in list_journals(tmp_path)] == ["journal-000002.jsonl"]
    assert [p.name for p in list_parts(tmp_path)] == ["part-000001.parquet"]
    writer.close()


def test_recovery_folds_leftover_segments_once(tmp_path: Path) -> None:
    """A segment whose part exists (killed between rename and delete) is dropped, one
    without is written as its part, a torn tail and temporary files are ignored."""
    writer = PartWriter(tmp_path, carried={})
    writer.add(result(0))
    taken = writer.take()
    assert taken is not None
    pq.write_table(pa.Table.from_pylist(taken[1], schema=writer.schema), taken[0])
    writer.add(result(1))
    writer.add(result(2))
    writer.close()
    segment = list_journals(tmp_path)[-1]
    segment.write_bytes(segment.read_bytes()[:-15])  # row 2 torn
    (tmp_path / ".part-000003.parquet.tmp-77").write_bytes(b"PAR1")

    assert recover_journals(tmp_path, schema=writer.schema) == 1
    assert list_journals(tmp_path) == [] and list(tmp_path.glob(".*")) == []
    table = pq.read_table(list_parts(tmp_path))
    assert table["_index"].to_pylist() == [0, 1]
    after = PartWriter(tmp_path, carried={})  # numbering goes on after the recovered part
    after.add(result(3))
    assert (after.take() or (None,))[0] == tmp_path / "part-000003.parquet"
    after.close()


@pytest.mark.parametrize(
    ("chunk_rows", "row_groups"),
    [pytest.param(3, 2, id="in-chunks"), pytest.param(100, 1, id="at-once")],
)
def test_compaction_in_chunks_keeps_the_latest_result_in_input_order(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk_rows: int,
    row_groups: int,
    compaction: str,
) -> None:
    """Out-of-order parts give each position once, its latest result winning, in input
    order, compacted a few positions at a time (a row group each) or all at once."""
    monkeypatch.setattr(sinks, "COMPACT_CHUNK_ROWS", chunk_rows)
    writer = PartWriter(tmp_path, carried={})
    batches = [
        [result(4), result(0, status="error"), result(2)],
        [result(1), result(3, status="error"), result(0, status="error")],
        [result(6), result(5)],
        [result(3), result(0)],  # the retries of a later run
    ]
    for batch in batches:
        for row in batch:
            writer.add(row)
        taken = writer.take()
        assert taken is not None
        writer.write_part(*taken)
    output = tmp_path / "out.parquet"
    schema = output_schema({})
    assert compact(tmp_path, output, schema=schema, rows=6) == 6
    table = pq.read_table(output)
    assert table.schema == schema and pq.read_metadata(output).num_row_groups == row_groups
    assert table["id"].to_pylist() == [f"r{i}" for i in range(6)]
    assert set(table["status"].to_pylist()) == {"ok"}


def test_journal_of_a_narrower_run_folds_into_the_wider_schema(tmp_path: Path) -> None:
    """Rows journalled by a --limit run (int ids, int scores) recover into the full run's
    wider types (text ids, JSON-text scores) instead of failing every later run."""
    narrow = PartWriter(tmp_path, carried={"id": pa.int64(), "score": pa.int64()})
    narrow.add(result(0, id=7, score=3))
    narrow.close()
    wide = {"id": pa.string(), "score": pa.large_string()}
    assert recover_journals(tmp_path, schema=PartWriter(tmp_path, carried=wide).schema) == 1
    (part,) = list_parts(tmp_path)
    row = pq.read_table(part).to_pylist()[0]
    assert (row["id"], row["score"]) == ("7", "3")


def test_compaction_reads_positions_of_parts_written_without_statistics(
    tmp_path: Path, compaction: str
) -> None:
    """A part whose footer has no statistics is read to find its positions, not skipped."""
    writer = PartWriter(tmp_path, carried={})
    for index in (2, 0):
        writer.add(result(index))
    path, rows = writer.take()  # type: ignore[misc]
    table = pa.Table.from_pylist(rows, schema=writer.schema)
    pq.write_table(table, path, write_statistics=False)
    writer.add(result(1))
    writer.write_part(*writer.take())  # type: ignore[misc]
    assert pq.read_metadata(path).row_group(0).column(0).statistics is None
    out = tmp_path / "out.parquet"
    assert compact(tmp_path, out, schema=output_schema({}), rows=3) == 3
    assert pq.read_table(out)["id"].to_pylist() == ["r0", "r1", "r2"]


def test_compaction_casts_parts_to_the_output_types(tmp_path: Path, compaction: str) -> None:
    """Parts of a narrower run are cast to the output's types when compacted."""
    narrow = PartWriter(tmp_path, carried={"id": pa.int64(), "score": pa.string()})
    narrow.add(result(0, id=1, score=None))
    narrow.write_part(*narrow.take())  # type: ignore[misc]
    wide = {"id": pa.string(), "score": pa.float64()}
    writer = PartWriter(tmp_path, carried=wide)
    writer.add(result(1, id="b", score=2.5))
    writer.write_part(*writer.take())  # type: ignore[misc]
    out = tmp_path / "out.parquet"
    assert compact(tmp_path, out, schema=output_schema(wide), rows=2) == 2
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["1", "b"]
    assert table.column("score").to_pylist() == [None, 2.5]


def write_parts(directory: Path, batches: list[list[dict[str, Any]]], carried: Any) -> None:
    directory.mkdir(exist_ok=True)
    for batch in batches:
        writer = PartWriter(
            directory, carried=carried, first_segment=len(list_parts(directory)) + 1
        )
        for row in batch:
            writer.add(row)
        writer.write_part(*writer.take())  # type: ignore[misc]
        writer.close()


def test_a_small_output_is_gathered_in_python_as_the_kernels_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small output whose parts hold its types is compacted without Arrow's kernels (the
    kernel path is never called), into the very table the kernels make: latest result per
    position, input order, a column an older part lacks as null, timestamps exact."""
    carried = {"id": pa.string(), "n": pa.int64(), "day": pa.date32(), "local": pa.timestamp("us")}
    rows = [
        {
            **result(i, rate_limited=0),
            "n": i * 10,
            "day": date(2024, 2, 29),
            "local": datetime(2024, 1, 1, 0, 0, i),
        }
        for i in range(6)
    ]
    batches = [
        [rows[4], {**rows[0], "status": "error"}, rows[2]],
        [rows[1], {**rows[3], "status": "error", "n": None}, rows[5]],
        [rows[3], {**rows[0], "content": "again"}],
    ]
    schema = output_schema(carried)
    kernels, python = tmp_path / "kernels", tmp_path / "python"
    for folder in (kernels, python):
        write_parts(folder, batches, carried)
    # the first part as written before `rate_limited` existed
    for folder in (kernels, python):
        first = list_parts(folder)[0]
        pq.write_table(pq.read_table(first).drop_columns(["rate_limited"]), first)

    monkeypatch.setattr(sinks, "SMALL_COMPACT_ROWS", 0)
    assert compact(kernels, tmp_path / "kernels.parquet", schema=schema, rows=6) == 6
    monkeypatch.undo()

    def no_kernels(*args: Any) -> pa.Table:
        raise AssertionError("the kernel path was taken")

    monkeypatch.setattr(sinks, "_latest_rows", no_kernels)
    assert compact(python, tmp_path / "python.parquet", schema=schema, rows=6) == 6
    made = pq.read_table(tmp_path / "python.parquet")
    assert made.equals(pq.read_table(tmp_path / "kernels.parquet"), check_metadata=True)
    assert made["content"].to_pylist()[0] == "again" and made["n"].to_pylist()[3] == 30
    assert made["status"].to_pylist() == ["ok"] * 6
    assert made["rate_limited"].to_pylist() == [0, 0, None, 0, None, 0]  # 2, 4: first part
    assert made["local"].to_pylist()[5] == datetime(2024, 1, 1, 0, 0, 5)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("cast", id="a-part-needs-a-cast"),
        pytest.param("nanoseconds", id="a-type-python-cannot-hold"),
        pytest.param("large", id="past-the-small-size"),
    ],
)
def test_the_kernels_compact_what_python_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Arrow's kernels still compact an output whose part needs a cast (a narrower run's),
    one with a type Python values would change (nanoseconds), or one past the small size."""
    carried: dict[str, pa.DataType] = {"id": pa.string()}
    first: dict[str, pa.DataType] = carried
    if case == "cast":
        first = {"id": pa.int64()}
    elif case == "nanoseconds":
        carried = first = {"id": pa.string(), "at": pa.timestamp("ns")}
    elif case == "large":
        monkeypatch.setattr(sinks, "SMALL_COMPACT_ROWS", 1)
    at = {"at": datetime(2024, 1, 1)} if case == "nanoseconds" else {}
    write_parts(tmp_path, [[result(1, id=1 if case == "cast" else "r1", **at)]], first)
    write_parts(tmp_path, [[result(0, **at)]], carried)
    taken: list[int] = []
    kernels = sinks._latest_rows

    def spy(holding: Any, schema: pa.Schema, low: int, high: int) -> pa.Table:
        taken.append(low)
        return kernels(holding, schema, low, high)

    monkeypatch.setattr(sinks, "_latest_rows", spy)
    out = tmp_path / "out.parquet"
    assert compact(tmp_path, out, schema=output_schema(carried), rows=2) == 2
    assert taken == [0]
    assert pq.read_table(out)["id"].to_pylist() == ["r0", "1" if case == "cast" else "r1"]


KERNELS_WITHOUT_PYARROW_COMPUTE = """
import sys
from pathlib import Path
import pyarrow as pa
from batchrun import sinks
from batchrun.sinks import compact, output_schema
sinks.SMALL_COMPACT_ROWS = 1
folder = Path(sys.argv[1])
compact(folder, folder / "out.parquet", schema=output_schema({"id": pa.string()}), rows=3)
print("pyarrow.compute" in sys.modules)
"""


def test_the_kernels_compact_without_importing_pyarrow_compute(tmp_path: Path) -> None:
    """Past the small size compaction calls Arrow's kernels by name (issue 12): a run does
    not pay pyarrow.compute's ~45 ms import, and a part needing a cast still gets it."""
    import subprocess
    import sys

    write_parts(tmp_path, [[result(2, id=2), result(0, id=0)]], {"id": pa.int64()})
    write_parts(tmp_path, [[result(1), result(0, content="again")]], {"id": pa.string()})
    found = subprocess.run(
        [sys.executable, "-c", KERNELS_WITHOUT_PYARROW_COMPUTE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "False"
    made = pq.read_table(tmp_path / "out.parquet")
    assert made["id"].to_pylist() == ["r0", "r1", "2"]  # "2": the int part, cast
    assert made["content"].to_pylist() == ["again", "echo: 1", "echo: 2"]
