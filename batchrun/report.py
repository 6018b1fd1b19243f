"""`batchrun report`: per-variant figures of an output file (rows, ok, tokens, cost, accuracy).

polars aggregates a lazy scan of only the columns counted, so the answers are never loaded.
The output's `batchrun.report` metadata names the swept keys, the parsed fields and the input
column holding each field's true value; every part of it is optional.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import orjson

from batchrun.errors import ConfigError
from batchrun.results import Results, open_results
from batchrun.sinks import REPORT_KEY

if TYPE_CHECKING:
    import polars as pl

SWEEP_PREFIX: Final = "sweep_"
#: the `variant` of the one line of an output that was not a sweep
ALL: Final = "all"
#: longest sweep value shown in the table (templates can be paragraphs); JSON has them whole
_SHOWN_CHARS: Final = 32
#: the columns the figures come from, besides `status`; an output without one reports "-"
_FIGURE_COLUMNS: Final = ("prompt_tokens", "completion_tokens", "cost_usd", "latency_s")


@dataclass(frozen=True)
class ReportSpec:
    """What the output's metadata says about its columns."""

    sweep_keys: tuple[str, ...] = ()
    #: parsed field -> its declared type ("str", "float", ...)
    fields: dict[str, str] = field(default_factory=dict)
    #: parsed field -> the input column holding its true value
    reference: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantFigures:
    """One line of the report."""

    variant: str
    #: swept key -> this variant's value (empty when the job was not a sweep)
    sweep: dict[str, Any]
    rows: int
    ok: int
    errors: int
    #: rows served from the request cache; None when the output has no `cached` column
    cached: int | None
    #: 429 answers the rows met (`rate_limited_count`); None when the output has no
    #: `rate_limited` column (written before it existed)
    rate_limited: int | None
    #: means over the rows that report usage (error rows usually do not)
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    #: sum over priced rows; None when no row has a cost
    cost_usd: float | None
    mean_latency_s: float | None
    #: field -> share of ok rows whose field equals its reference (None when no ok row)
    accuracy: dict[str, float | None]


def read_spec(metadata: dict[bytes, bytes] | None) -> ReportSpec:
    """The report metadata of an output schema; whatever is absent or malformed is empty."""
    try:
        data = orjson.loads((metadata or {})[REPORT_KEY])
    except (KeyError, orjson.JSONDecodeError):
        return ReportSpec()
    if not isinstance(data, dict):
        return ReportSpec()
    keys = data.get("sweep_keys")
    fields = data.get("fields")
    reference = data.get("reference")
    return ReportSpec(
        sweep_keys=tuple(str(k) for k in keys) if isinstance(keys, list) else (),
        fields={str(k): str(v) for k, v in fields.items()} if isinstance(fields, dict) else {},
        reference=(
            {str(k): str(v) for k, v in reference.items()} if isinstance(reference, dict) else {}
        ),
    )


def rate_limited_count(names: Collection[str]) -> pl.Expr:
    """Each row's 429 answers: its `rate_limited`, or, where that is null or absent (a row
    written before the column), 1 if the row ended on a 429, else 0.

    Args:
        names: the columns the rows have.
    """
    import polars as pl

    ended = pl.lit(False)
    if "error_class" in names:
        ended = ended | (pl.col("error_class") == "rate_limit").fill_null(False)
    if "http_status" in names:
        ended = ended | (pl.col("http_status") == 429).fill_null(False)
    known = pl.col("rate_limited") if "rate_limited" in names else pl.lit(None)
    return known.cast(pl.Int64).fill_null(ended.cast(pl.Int64))


def read_report(output: Path | Results) -> list[VariantFigures]:
    """The figures of `output`, one per variant in the order variants first appear.

    Args:
        output: an output path (finished, or its checkpoint when the job is not), or what
            `results.open_results` gave for it.

    Raises:
        ConfigError: `output` is missing, is not Parquet, or has no `status` column.
    """
    import polars as pl

    results = output if isinstance(output, Results) else open_results(output)
    output, schema = results.output, results.schema
    names = set(schema.names)
    if "status" not in names:
        raise ConfigError("not a batchrun output (no 'status' column)", path=output)
    spec = read_spec(schema.metadata)
    sweep_keys = _sweep_keys(spec, schema.names)

    frame = results.scan()
    types = frame.collect_schema()
    absent = [name for name in _FIGURE_COLUMNS if name not in names]  # an older output
    if absent:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(name) for name in absent)
    ok = pl.col("status") == "ok"
    aggregations = [
        pl.len().alias("_rows"),
        ok.sum().alias("_ok"),
        pl.col("prompt_tokens").mean().alias("_prompt"),
        pl.col("completion_tokens").mean().alias("_completion"),
        pl.col("cost_usd").sum().alias("_cost"),
        pl.col("cost_usd").count().alias("_priced"),
        pl.col("latency_s").mean().alias("_latency"),
    ]
    if "cached" in names:
        aggregations.append(pl.col("cached").fill_null(False).sum().alias("_cached"))
    if "rate_limited" in names:
        aggregations.append(rate_limited_count(names).sum().alias("_rate_limited"))
    aggregations += [
        pl.col(SWEEP_PREFIX + key).first().alias(f"_sweep{i}") for i, key in enumerate(sweep_keys)
    ]
    scored = [(f, ref) for f, ref in spec.reference.items() if f in names and ref in names]
    for i, (name, ref) in enumerate(scored):
        equal = _equal(pl.col(name), pl.col(ref), types[name], types[ref]).fill_null(False)
        aggregations.append((equal & ok).sum().alias(f"_hits{i}"))

    if "variant" in names:
        query = frame.group_by("variant", maintain_order=True).agg(aggregations)
    else:
        query = frame.select(pl.lit(ALL).alias("variant"), *aggregations)
    try:
        result = query.collect()
    except pl.exceptions.PolarsError as exc:
        raise ConfigError(f"cannot read the file ({exc})", path=output) from None

    figures = []
    for row in result.iter_rows(named=True):
        ok_rows = int(row["_ok"])
        figures.append(
            VariantFigures(
                variant="-" if row["variant"] is None else str(row["variant"]),
                sweep={key: row[f"_sweep{i}"] for i, key in enumerate(sweep_keys)},
                rows=int(row["_rows"]),
                ok=ok_rows,
                errors=int(row["_rows"]) - ok_rows,
                cached=int(row["_cached"]) if "_cached" in row else None,
                rate_limited=int(row["_rate_limited"]) if "_rate_limited" in row else None,
                mean_prompt_tokens=row["_prompt"],
                mean_completion_tokens=row["_completion"],
                cost_usd=float(row["_cost"]) if row["_priced"] else None,
                mean_latency_s=row["_latency"],
                accuracy={
                    name: row[f"_hits{i}"] / ok_rows if ok_rows else None
                    for i, (name, _) in enumerate(scored)
                },
            )
        )
    return figures


def scan_rows(output: Path | Results) -> pl.LazyFrame:
    """The rows of `output` as a polars LazyFrame, for what needs more than per-variant sums
    (the charts of `report --html`): the output file's, or the checkpoint's latest row per
    position when the job is not finished (`results.open_results`)."""
    results = output if isinstance(output, Results) else open_results(output)
    return results.scan()


def _sweep_keys(spec: ReportSpec, names: Sequence[str]) -> list[str]:
    """The metadata's swept keys that have a column, else every `sweep_*` column's key."""
    if spec.sweep_keys:
        return [key for key in spec.sweep_keys if SWEEP_PREFIX + key in names]
    return [name.removeprefix(SWEEP_PREFIX) for name in names if name.startswith(SWEEP_PREFIX)]


def _equal(left: Any, right: Any, left_type: Any, right_type: Any) -> Any:
    """left == right, compared as text when the two types cannot be compared directly."""
    if left_type == right_type or (left_type.is_numeric() and right_type.is_numeric()):
        return left == right
    import polars as pl

    return left.cast(pl.String) == right.cast(pl.String)


def to_json(figures: Sequence[VariantFigures]) -> bytes:
    """The figures as a JSON list of objects, one per variant."""
    return orjson.dumps([asdict(f) for f in figures], option=orjson.OPT_INDENT_2)


def table_rows(figures: Sequence[VariantFigures]) -> tuple[list[str], list[list[str]]]:
    """The report as a header and rows of text cells, shared by the plain and rich tables."""
    sweep_keys = list(figures[0].sweep) if figures else []
    fields = list(figures[0].accuracy) if figures else []
    with_cached = any(f.cached is not None for f in figures)
    with_429s = any(f.rate_limited is not None for f in figures)
    header = ["variant", *sweep_keys, "rows", "ok", "errors"]
    header += ["cached"] if with_cached else []
    header += ["429s"] if with_429s else []
    header += ["prompt tok", "compl tok", "cost $", "latency s"]
    header += [f"{name} acc" for name in fields]
    body = []
    for f in figures:
        cells = [f.variant, *(_shown(f.sweep[key]) for key in sweep_keys)]
        cells += [str(f.rows), str(f.ok), str(f.errors)]
        cells += [_number(f.cached, "{:d}")] if with_cached else []
        cells += [_number(f.rate_limited, "{:d}")] if with_429s else []
        cells += [
            _number(f.mean_prompt_tokens, "{:.1f}"),
            _number(f.mean_completion_tokens, "{:.1f}"),
            _number(f.cost_usd, "{:.6f}"),
            _number(f.mean_latency_s, "{:.2f}"),
        ]
        cells += [_number(f.accuracy[name], "{:.1%}") for name in fields]
        body.append(cells)
    return header, body


def describe(figures: Sequence[VariantFigures]) -> list[str]:
    """The report as a plain text table: a header line, then one line per variant."""
    header, body = table_rows(figures)
    if not body:
        return ["no rows"]
    texts = _text_columns(figures)
    widths = _widths(header, body)

    def line(cells: list[str]) -> str:
        out = [
            cell.ljust(w) if i < texts else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(header), *(line(cells) for cells in body)]


def write_report(figures: Sequence[VariantFigures], *, as_json: bool, file: IO[str]) -> None:
    """Write the report to `file`: JSON, a rich table on a terminal, or a plain table."""
    if as_json:
        file.write(to_json(figures).decode() + "\n")
    elif not (file.isatty() and figures and _write_rich(figures, file)):
        file.write("".join(line + "\n" for line in describe(figures)))


def _write_rich(figures: Sequence[VariantFigures], file: IO[str]) -> bool:
    """Print the table with rich; False when rich is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional here: the plain table says the same
        return False
    header, body = table_rows(figures)
    texts = _text_columns(figures)
    table = Table(box=None, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < texts else "right", no_wrap=True)
    for cells in body:
        table.add_row(*cells)
    console = Console(file=file)
    # rich squeezes, cuts or drops columns to fit the terminal; a report must show every
    # figure whole, so it may run wider and let the terminal wrap its lines
    console.width = max(console.width, sum(w + 2 for w in _widths(header, body)))
    console.print(table)
    return True


def _text_columns(figures: Sequence[VariantFigures]) -> int:
    """How many leading columns hold text (the variant and swept values), not figures."""
    return 1 + (len(figures[0].sweep) if figures else 0)


def _widths(header: list[str], body: list[list[str]]) -> list[int]:
    return [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]


def _number(value: float | int | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _shown(value: Any) -> str:
    text = "-" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"
