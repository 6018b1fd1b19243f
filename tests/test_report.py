"""`batchrun report`: per-variant figures, checked against sums taken straight from the file."""

from __future__ import annotations

import io
from pathlib import Path
from statistics import fmean
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import cli
from batchrun.fake import FakeServer
from batchrun.job import build_job
from batchrun.pool import PoolSettings
from batchrun.report import ReportSpec, read_report, read_spec, write_report
from batchrun.runner import run_job
from batchrun.sinks import REPORT_KEY
from tests.conftest import fast_job_data, write_jsonl

SPEC = {
    "sweep_keys": ["model", "temperature"],
    "fields": {"label": "str", "confidence": "float"},
    "reference": {"label": "sentiment"},
}
SWEEP_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("sentiment", pa.string()),
    ("variant", pa.string()),
    ("sweep_model", pa.string()),
    ("sweep_temperature", pa.float64()),
    ("status", pa.string()),
    ("content", pa.large_string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_s", pa.float64()),
    ("error_class", pa.string()),
    ("cost_usd", pa.float64()),
    ("label", pa.string()),
    ("confidence", pa.float64()),
    ("cached", pa.bool_()),
]
VARIANTS = {"v1": ("deepseek-chat", 0.0), "v2": ("deepseek-reasoner", 0.7)}


def row(row_id: str, variant: str, truth: str, label: str | None, **values: Any) -> dict[str, Any]:
    model, temperature = VARIANTS[variant]
    data = {
        "id": row_id,
        "sentiment": truth,
        "variant": variant,
        "sweep_model": model,
        "sweep_temperature": temperature,
        "status": "ok",
        "content": orjson.dumps({"label": label}).decode(),
        "prompt_tokens": 20,
        "completion_tokens": 4,
        "latency_s": 0.5,
        "error_class": None,
        "cost_usd": 0.0001,
        "label": label,
        "confidence": 0.9,
        "cached": False,
    }
    return {**data, **values}


FAILED = {
    "status": "error",
    "content": None,
    "prompt_tokens": None,
    "completion_tokens": None,
    "cost_usd": None,
    "confidence": None,
    "error_class": "server",
    "latency_s": 2.0,
}

SWEEP_ROWS = [
    row("r1", "v1", "pos", "pos", prompt_tokens=18, latency_s=0.4),
    row("r1", "v2", "pos", "pos", completion_tokens=40, cost_usd=0.0007, latency_s=3.1),
    row("r2", "v1", "neg", "pos", cached=True, cost_usd=0.0, latency_s=0.0),
    row("r2", "v2", "neg", "neg", completion_tokens=55, cost_usd=0.0009),
    row("r3", "v1", "neu", None, **FAILED),
    row("r3", "v2", "neu", None, prompt_tokens=22, completion_tokens=61, cost_usd=0.001),
]


def write_output(
    path: Path,
    rows: list[dict[str, Any]],
    *,
    fields: list[tuple[str, pa.DataType]] = SWEEP_FIELDS,
    spec: Any = SPEC,
) -> Path:
    schema = pa.schema(fields)
    if spec is not None:
        schema = schema.with_metadata({REPORT_KEY: orjson.dumps(spec)})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["report", *args])


def report_json(path: Path) -> list[dict[str, Any]]:
    result = invoke(str(path), "--json")
    assert result.exit_code == 0, result.output
    figures = orjson.loads(result.output)
    assert isinstance(figures, list)
    return figures


def expected_figures(path: Path, group: str | None) -> dict[str, dict[str, Any]]:
    """The report's figures computed in plain Python from the file's rows."""
    rows = pq.read_table(path).to_pylist()
    names = dict.fromkeys(r[group] for r in rows) if group else {"all": None}
    expected = {}
    for name in names:
        mine = [r for r in rows if group is None or r[group] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        figures: dict[str, Any] = {
            "rows": len(mine),
            "ok": len(ok),
            "errors": len(mine) - len(ok),
            "mean_prompt_tokens": fmean(
                r["prompt_tokens"] for r in mine if r["prompt_tokens"] is not None
            ),
            "mean_completion_tokens": fmean(
                r["completion_tokens"] for r in mine if r["completion_tokens"] is not None
            ),
            "cost_usd": sum(r["cost_usd"] for r in mine if r["cost_usd"] is not None),
            "mean_latency_s": fmean(r["latency_s"] for r in mine),
        }
        if "label" in mine[0]:
            figures["accuracy"] = {"label": sum(r["label"] == r["sentiment"] for r in ok) / len(ok)}
            figures["cached"] = sum(bool(r["cached"]) for r in mine)
        expected[name] = figures
    return expected


def test_sweep_figures_match_the_file(tmp_path: Path) -> None:
    """--json gives one object per variant whose figures equal sums taken from the file."""
    path = write_output(tmp_path / "sweep.parquet", SWEEP_ROWS)
    figures = report_json(path)
    assert [f["variant"] for f in figures] == ["v1", "v2"]
    expected = expected_figures(path, "variant")
    for f in figures:
        want = expected[f["variant"]]
        assert f == {**f, **want} | {k: pytest.approx(v) for k, v in want.items()}
        model, temperature = VARIANTS[f["variant"]]
        assert f["sweep"] == {"model": model, "temperature": temperature}
    assert figures[0]["accuracy"] == {"label": 0.5}  # r1 right, r2 wrong, r3 failed
    assert figures[1]["accuracy"] == {"label": pytest.approx(2 / 3)}


def test_run_without_sweep_is_one_all_line(tmp_path: Path, fake: FakeServer) -> None:
    """A plain job's output (real run, one error row) reports one `all` line matching it."""
    prompts = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(4)]
    prompts.append({"id": "q-bad", "prompt": "refused [[fault:400]]"})
    write_jsonl(tmp_path / "in.jsonl", prompts)
    job = build_job(fast_job_data(tmp_path, fake.base_url))
    run_job(job, settings=PoolSettings(flush_rows=2, flush_seconds=0.05))
    path = tmp_path / "out.parquet"

    (figures,) = report_json(path)
    want = expected_figures(path, None)["all"]
    assert figures["variant"] == "all"
    assert (figures["rows"], figures["ok"], figures["errors"]) == (5, 4, 1)
    for key, value in want.items():
        assert figures[key] == pytest.approx(value), key
    assert figures["sweep"] == {} and figures["accuracy"] == {}


def test_plain_table(tmp_path: Path) -> None:
    """Off a terminal: a header, then one aligned line per variant with its swept values."""
    result = invoke(str(write_output(tmp_path / "sweep.parquet", SWEEP_ROWS)))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "variant  model              temperature  rows  ok  errors  cached  prompt tok  "
        "compl tok    cost $  latency s  label acc",
        "v1       deepseek-chat      0.0             3   2       1       1        19.0  "
        "      4.0  0.000100       0.80      50.0%",
        "v2       deepseek-reasoner  0.7             3   3       0       0        20.7  "
        "     52.0  0.002600       1.37      66.7%",
    ]


def test_rich_table_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the same cells come out as a rich table; figures are never cut short."""
    monkeypatch.setenv("COLUMNS", "60")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    write_report(
        read_report(write_output(tmp_path / "s.parquet", SWEEP_ROWS)), as_json=False, file=screen
    )
    text = screen.getvalue()
    for cell in ("variant", "label acc", "deepseek-reasoner", "0.002600", "66.7%"):
        assert cell in text


def test_sweep_columns_without_metadata(tmp_path: Path) -> None:
    """With no metadata, swept keys come from the `sweep_*` columns and nothing is scored."""
    path = write_output(tmp_path / "s.parquet", SWEEP_ROWS, spec=None)
    figures = report_json(path)
    assert figures[1]["sweep"] == {"model": "deepseek-reasoner", "temperature": 0.7}
    assert figures[1]["accuracy"] == {}


@pytest.mark.parametrize(
    ("field_type", "label", "reference_type", "truth", "accuracy"),
    [
        pytest.param(pa.int64(), 1, pa.string(), "1", 1.0, id="int-vs-text"),
        pytest.param(pa.int64(), 1, pa.float64(), 1.0, 1.0, id="int-vs-float"),
        pytest.param(pa.string(), "Pos", pa.string(), "pos", 0.0, id="case-matters"),
    ],
)
def test_accuracy_across_types(
    tmp_path: Path,
    field_type: pa.DataType,
    label: Any,
    reference_type: pa.DataType,
    truth: Any,
    accuracy: float,
) -> None:
    """A field and its reference of different types are still compared, as text if need be."""
    fields = [("id", pa.string()), ("status", pa.string()), ("y", reference_type)]
    fields.append(("label", field_type))
    rows = [{"id": "r1", "status": "ok", "y": truth, "label": label}]
    path = write_output(
        tmp_path / "a.parquet", rows, fields=fields, spec={"reference": {"label": "y"}}
    )
    (figures,) = read_report(path)
    assert figures.accuracy == {"label": accuracy}
    assert figures.cost_usd is None and figures.mean_latency_s is None  # columns absent


def test_no_ok_rows_has_no_accuracy(tmp_path: Path) -> None:
    """A variant whose every row failed has no accuracy (not 0%)."""
    rows = [row("r1", "v1", "pos", None, **FAILED)]
    (figures,) = read_report(write_output(tmp_path / "s.parquet", rows))
    assert figures.accuracy == {"label": None}
    assert figures.cost_usd is None


def test_empty_output(tmp_path: Path) -> None:
    """An output with no rows: an empty JSON list, and `no rows` as the table."""
    path = write_output(tmp_path / "e.parquet", [])
    assert report_json(path) == []
    assert invoke(str(path)).output == "no rows\n"


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(None, id="no-metadata"),
        pytest.param({b"other": b"{}"}, id="no-key"),
        pytest.param({REPORT_KEY: b"not json"}, id="not-json"),
        pytest.param({REPORT_KEY: b"[1, 2]"}, id="not-an-object"),
        pytest.param({REPORT_KEY: b'{"sweep_keys": "model", "reference": []}'}, id="bad-parts"),
    ],
)
def test_read_spec_tolerates_missing_or_odd_metadata(metadata: dict[bytes, bytes] | None) -> None:
    """Every part of the report metadata is optional; what cannot be used is ignored."""
    assert read_spec(metadata) == ReportSpec()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        pytest.param("missing.parquet", None, "no such file", id="missing"),
        pytest.param(
            "notes.parquet", b"PAR1 but not really", "not a Parquet file", id="not-parquet"
        ),
        pytest.param("other.parquet", "table", "no 'status' column", id="not-an-output"),
    ],
)
def test_bad_output_exits_2(tmp_path: Path, name: str, content: Any, fragment: str) -> None:
    """A missing, non-Parquet or non-batchrun OUTPUT: exit 2 with one line naming the file."""
    path = tmp_path / name
    if content == "table":
        pq.write_table(pa.table({"x": [1]}), path)
    elif content is not None:
        path.write_bytes(content)
    result = invoke(str(path))
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert str(path) in result.output and fragment in result.output
