"""`batchrun report --html`: the report as one self-contained page of a table and charts.

The charts are drawn by plotly (the `batchrun[report]` extra), with plotly.js inlined once, so
the page fetches nothing: it opens offline and can be mailed. polars reduces the rows to what
each chart shows (intervals, quantiles, counts) before plotly sees them, so a page of a
million-row output is as small as one of forty rows.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from batchrun.errors import ConfigError
from batchrun.report import ALL, VariantFigures, rate_limited_count, table_rows

if TYPE_CHECKING:
    import polars as pl

INSTALL_HINT: Final = "pip install 'batchrun[report]'"
#: about this many intervals on the throughput chart
INTERVALS: Final = 60
#: interval lengths the throughput chart picks from, in milliseconds
_STEPS_MS: Final = tuple(
    s * 1000 for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800)
) + tuple(h * 3_600_000 for h in (1, 2, 3, 6, 12, 24))
#: plotly's options for every chart: resize with the window; no link to plotly's site and
#: no button that uploads the chart (the page sends nothing anywhere)
_CONFIG: Final = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["sendChartToCloud", "select2d", "lasso2d"],
}
_HEIGHT: Final = 380
#: d3 format of amounts in USD: "$0.00037", "$12.5"
_DOLLARS: Final = "$.3~g"
_OK_COLOUR: Final = "#4c9a5b"
_ERROR_COLOUR: Final = "#d1495b"
_RETRY_COLOUR: Final = "#edae49"
_LIMIT_COLOUR: Final = "#6a4c93"


@dataclass(frozen=True)
class Throughput:
    """Rows finished per interval of the run, from the first row finished to the last."""

    interval_s: float
    starts: list[datetime]
    ok: list[int]
    errors: list[int]
    #: requests sent again (a row's attempts less one), by the interval its row finished in
    retries: list[int]
    #: 429 answers met (`report.rate_limited_count`), by the interval their row finished in
    rate_limited: list[int]


@dataclass(frozen=True)
class Latency:
    """One variant's latency distribution, in seconds (rows from the cache left out)."""

    variant: str
    rows: int
    low: float
    q1: float
    median: float
    q3: float
    high: float
    mean: float


def require_plotly() -> None:
    """Raises ConfigError, saying how to install it, when plotly is not installed."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ConfigError(f"--html needs plotly, which is not installed: {INSTALL_HINT}") from None


def write_html(
    figures: Sequence[VariantFigures],
    rows: pl.LazyFrame,
    path: Path,
    *,
    title: str,
    partial: str | None = None,
) -> None:
    """Write the page of `figures` and the charts of `rows` (the output's rows) to `path`;
    `partial` is the line saying the job is not finished, shown under the title."""
    page = render_html(figures, rows, title=title, partial=partial)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the page ({exc.strerror})", path=path) from None


def render_html(
    figures: Sequence[VariantFigures],
    rows: pl.LazyFrame,
    *,
    title: str,
    partial: str | None = None,
) -> str:
    """The page: the report's table, then a chart per question, plotly.js inlined once. A
    stopped job's page says so under its title (`partial`): the page is mailed on its own."""
    require_plotly()
    from plotly.offline import get_plotlyjs

    rows = _with_columns(rows)
    colours = _colours([f.variant for f in figures])
    names = {f.variant: _label(f) for f in figures}
    sections = [
        (
            "Throughput",
            "Rows finished per interval, ok and failed; requests sent again and 429 answers "
            "met marked, each at the interval its row finished in.",
            _throughput_chart(throughput(rows)),
        ),
        (
            "Latency",
            "Seconds each row waited on the server (all its requests), per variant: median, "
            "quartiles, mean (dashed), fastest and slowest. Answers from the cache left out.",
            _latency_chart(latencies(rows), colours, names),
        ),
        (
            "Tokens and cost",
            "Mean tokens per row, and the cost of each variant.",
            _tokens_chart(figures, colours, names),
        ),
    ]
    if any(value is not None for f in figures for value in f.accuracy.values()):
        sections.append(
            (
                "Accuracy against cost",
                "Share of ok rows whose parsed field equals the "
                "reference, against the variant's cost.",
                _accuracy_chart(figures, colours, names),
            )
        )
    errors = error_classes(rows)
    sections.append(
        (
            "Error classes",
            "Rows that ended in an error, by class and variant.",
            _errors_chart(errors, colours, names) if errors else None,
        )
    )
    total = sum(f.rows for f in figures)
    meta = f"{total:,} rows in {len(figures)} variant{'s' * (len(figures) != 1)}"
    first, last = _span(rows)
    if first is not None and last is not None:
        meta += f", finished {first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S} UTC"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        *([f'<p class="partial">{html.escape(partial)}</p>'] if partial else []),
        _table(figures),
    ]
    for i, (heading, caption, chart) in enumerate(sections):
        body.append(f'<section id="section-{i}"><h2>{html.escape(heading)}</h2>')
        body.append(f"<p>{html.escape(caption)}</p>")
        body.append(_chart_html(chart, f"chart-{i}") if chart is not None else _NONE)
        body.append("</section>")
    return _PAGE.format(
        title=html.escape(title), style=_STYLE, plotlyjs=get_plotlyjs(), body="\n".join(body)
    )


_NONE: Final = '<p class="none">No row ended in an error.</p>'


def throughput(rows: pl.LazyFrame, *, intervals: int = INTERVALS) -> Throughput:
    """Rows finished per interval; the interval is a round length giving about `intervals`."""
    import polars as pl

    finished = rows.filter(pl.col("finished_at").is_not_null())
    first, last = _span(finished)
    if first is None or last is None:
        return Throughput(1.0, [], [], [], [], [])
    span_ms = (last - first) / timedelta(milliseconds=1)
    step = next((s for s in _STEPS_MS if s * intervals >= span_ms), _STEPS_MS[-1])
    offset = (pl.col("finished_at") - pl.lit(first)).dt.total_milliseconds()
    names = rows.collect_schema().names()
    counts = (
        finished.group_by((offset // step).cast(pl.Int64).alias("bin"))
        .agg(
            (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") != "ok").sum().alias("errors"),
            (pl.col("attempts").fill_null(1) - 1).clip(lower_bound=0).sum().alias("retries"),
            rate_limited_count(names).sum().alias("rate_limited"),
        )
        .collect()
    )
    size = int(counts["bin"].max() or 0) + 1  # type: ignore[arg-type]
    columns: dict[str, list[int]] = {name: [0] * size for name in counts.columns[1:]}
    for row in counts.iter_rows(named=True):
        for name, values in columns.items():
            values[row["bin"]] = int(row[name])
    return Throughput(
        interval_s=step / 1000,
        starts=[first + timedelta(milliseconds=step * i) for i in range(size)],
        ok=columns["ok"],
        errors=columns["errors"],
        retries=columns["retries"],
        rate_limited=columns["rate_limited"],
    )


def latencies(rows: pl.LazyFrame) -> list[Latency]:
    """Each variant's latency distribution, in the order variants first appear."""
    import polars as pl

    served = rows.filter(pl.col("latency_s").is_not_null() & ~pl.col("cached").fill_null(False))
    latency = pl.col("latency_s")
    stats = (
        served.group_by("variant", maintain_order=True)
        .agg(
            pl.len().alias("rows"),
            latency.min().alias("low"),
            latency.quantile(0.25, "linear").alias("q1"),
            latency.median().alias("median"),
            latency.quantile(0.75, "linear").alias("q3"),
            latency.max().alias("high"),
            latency.mean().alias("mean"),
        )
        .collect()
    )
    return [Latency(**row) for row in stats.iter_rows(named=True)]


def error_classes(rows: pl.LazyFrame) -> dict[str, dict[str, int]]:
    """error class -> variant -> rows that ended in that error; most common class first."""
    import polars as pl

    counts = (
        rows.filter(pl.col("status") != "ok")
        .group_by(pl.col("error_class").fill_null("unclassified"), "variant")
        .len()
        .sort(["len", "error_class", "variant"], descending=[True, False, False])
        .collect()
    )
    out: dict[str, dict[str, int]] = {}
    for row in counts.iter_rows(named=True):
        out.setdefault(row["error_class"], {})[row["variant"]] = int(row["len"])
    return out


def _with_columns(rows: pl.LazyFrame) -> pl.LazyFrame:
    """`rows` with every column the charts read; one an output lacks is null (or `all`)."""
    import polars as pl

    wanted: dict[str, Any] = {
        "variant": pl.String,
        "status": pl.String,
        "finished_at": pl.Datetime("ms", "UTC"),
        "attempts": pl.Int64,
        "rate_limited": pl.Int64,
        "http_status": pl.Int64,
        "error_class": pl.String,
        "latency_s": pl.Float64,
        "cached": pl.Boolean,
    }
    names = rows.collect_schema().names()
    absent = [
        (pl.lit(ALL) if name == "variant" else pl.lit(None, dtype=kind)).alias(name)
        for name, kind in wanted.items()
        if name not in names
    ]
    rows = rows.with_columns(absent) if absent else rows
    return rows.select(
        pl.col("variant").cast(pl.String).fill_null("-"),
        *(name for name in wanted if name != "variant"),
    )


def _span(rows: pl.LazyFrame) -> tuple[datetime | None, datetime | None]:
    import polars as pl

    first, last = (
        rows.select(
            pl.col("finished_at").min().alias("first"), pl.col("finished_at").max().alias("last")
        )
        .collect()
        .row(0)
    )
    return _utc(first), _utc(last)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _label(figures: VariantFigures) -> str:
    """A variant's name on the charts: its name and swept values, each with its key
    ("v3 thinking=True temperature=0.7")."""
    values = [f"{k}={v}" for k, v in figures.sweep.items() if v is not None]
    text = " ".join([figures.variant, *values])
    return text if len(text) <= 40 else text[:39] + "…"


def _colours(variants: Sequence[str]) -> dict[str, str]:
    from plotly.colors import qualitative

    palette = qualitative.Plotly + qualitative.D3 + qualitative.Set2
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def _figure(**layout: Any) -> Any:
    import plotly.graph_objects as go

    defaults: dict[str, Any] = {
        "template": "plotly_white",
        "height": _HEIGHT,
        "margin": {"l": 60, "r": 20, "t": 30, "b": 60},
        "legend": {"orientation": "h", "y": -0.2},
    }
    return go.Figure(layout={**defaults, **layout})


def _throughput_chart(data: Throughput) -> Any:
    import plotly.graph_objects as go

    seconds = f"{data.interval_s:g} s"
    figure = _figure(
        barmode="stack", xaxis_title=f"finished (UTC), per {seconds}", yaxis_title="rows"
    )
    # each interval's bar spans it: centred on its middle, as wide as it (ms on a date axis)
    half = timedelta(seconds=data.interval_s / 2)
    middles = [start + half for start in data.starts]
    width = data.interval_s * 1000 * 0.92
    figure.add_trace(go.Bar(x=middles, y=data.ok, width=width, name="ok", marker_color=_OK_COLOUR))
    figure.add_trace(
        go.Bar(x=middles, y=data.errors, width=width, name="error", marker_color=_ERROR_COLOUR)
    )
    figure.add_trace(
        go.Scatter(
            x=middles,
            y=data.retries,
            name="requests sent again",
            mode="lines+markers",
            line={"color": _RETRY_COLOUR},
        )
    )
    figure.add_trace(
        go.Scatter(
            x=middles,
            y=[n or None for n in data.rate_limited],  # a mark where there were some
            name="429 answers met",
            mode="markers",
            marker={"color": _LIMIT_COLOUR, "symbol": "x", "size": 9},
        )
    )
    return figure


def _latency_chart(data: list[Latency], colours: dict[str, str], names: dict[str, str]) -> Any:
    import plotly.graph_objects as go

    figure = _figure(yaxis_title="seconds", showlegend=False)
    for item in data:
        name = names.get(item.variant, item.variant)
        figure.add_trace(
            go.Box(
                x=[name],
                name=name,
                q1=[item.q1],
                median=[item.median],
                q3=[item.q3],
                lowerfence=[item.low],
                upperfence=[item.high],
                mean=[item.mean],
                marker_color=colours.get(item.variant),
                boxmean=True,
            )
        )
    return figure


def _tokens_chart(
    figures: Sequence[VariantFigures], colours: dict[str, str], names: dict[str, str]
) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    # bars across, the variants' labels down the left of both panels, so that long labels fit
    labels = [names[f.variant] for f in figures]
    figure = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.03,
        subplot_titles=("mean tokens per row", "cost (USD)"),
    )
    figure.update_layout(
        template="plotly_white",
        height=max(_HEIGHT, 140 + 30 * len(figures)),
        barmode="stack",
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.12, "traceorder": "normal"},
        yaxis={"autorange": "reversed"},
        xaxis2={"tickformat": _DOLLARS},
    )
    for name, colour, values in (
        ("prompt", "#8fa8c8", [f.mean_prompt_tokens for f in figures]),
        ("completion", "#30638e", [f.mean_completion_tokens for f in figures]),
    ):
        figure.add_trace(
            go.Bar(y=labels, x=values, orientation="h", name=name, marker_color=colour),
            row=1,
            col=1,
        )
    figure.add_trace(
        go.Bar(
            y=labels,
            x=[f.cost_usd for f in figures],
            orientation="h",
            name="cost",
            marker_color=[colours[f.variant] for f in figures],
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    return figure


def _accuracy_chart(
    figures: Sequence[VariantFigures], colours: dict[str, str], names: dict[str, str]
) -> Any:
    import plotly.graph_objects as go

    symbols = ("circle", "diamond", "square", "triangle-up", "cross")
    fields = list(figures[0].accuracy) if figures else []
    figure = _figure(
        xaxis_title="cost (USD)",
        xaxis_tickformat=_DOLLARS,
        yaxis_title="accuracy",
        yaxis_tickformat=".0%",
    )
    for i, name in enumerate(fields):
        shown = [f for f in figures if f.accuracy.get(name) is not None]
        figure.add_trace(
            go.Scatter(
                x=[f.cost_usd for f in shown],
                y=[f.accuracy[name] for f in shown],
                text=[names[f.variant] for f in shown],
                name=name,
                mode="markers+text",
                textposition="top center",
                marker={
                    "size": 12,
                    "symbol": symbols[i % len(symbols)],
                    "color": [colours[f.variant] for f in shown],
                },
            )
        )
    return figure


def _errors_chart(
    data: dict[str, dict[str, int]], colours: dict[str, str], names: dict[str, str]
) -> Any:
    import plotly.graph_objects as go

    classes = list(data)
    present = {variant for counts in data.values() for variant in counts}
    variants = [v for v in names if v in present] + sorted(present - names.keys())
    figure = _figure(
        barmode="stack",
        xaxis_title="rows",
        height=160 + 36 * len(classes),
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h", "traceorder": "normal", "y": 1.02, "yanchor": "bottom"},
        margin={"l": 60, "r": 20, "t": 40, "b": 50},
    )
    for variant in variants:
        figure.add_trace(
            go.Bar(
                y=classes,
                x=[data[c].get(variant, 0) for c in classes],
                orientation="h",
                name=names.get(variant, variant),
                marker_color=colours.get(variant),
            )
        )
    return figure


def _chart_html(figure: Any, div_id: str) -> str:
    import plotly.io as pio

    text: str = pio.to_html(
        figure,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config=_CONFIG,
        default_height=f"{_HEIGHT}px",
    )
    return f'<div class="chart">{text}</div>'


def _table(figures: Sequence[VariantFigures]) -> str:
    header, body = table_rows(figures)
    texts = 1 + (len(figures[0].sweep) if figures else 0)

    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f"<{tag}{'' if i < texts else ' class=num'}>{html.escape(v)}</{tag}>"
            for i, v in enumerate(values)
        )

    lines = [f"<thead><tr>{cells('th', header)}</tr></thead><tbody>"]
    lines += [f"<tr>{cells('td', row)}</tr>" for row in body]
    return f'<table class="figures">{"".join(lines)}</tbody></table>'


_STYLE: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1140px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 17px; margin: 0 0 2px; }
p { margin: 0 0 8px; color: #555; }
.meta { margin-bottom: 14px; }
.partial { margin-bottom: 14px; padding: 6px 10px; color: #7a4b00; background: #fff4d6;
           border: 1px solid #f0d58c; border-radius: 4px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 14px;
          margin-top: 16px; }
table.figures { border-collapse: collapse; background: #fff; border: 1px solid #e3e3e3;
                width: 100%; font-variant-numeric: tabular-nums; }
table.figures th, table.figures td { padding: 4px 10px; border-bottom: 1px solid #eee;
                                     text-align: left; white-space: nowrap; }
table.figures th { background: #f1f3f5; font-weight: 600; }
table.figures .num { text-align: right; }
.none { font-style: italic; }
"""

_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="batchrun report --html">
<title>{title}</title>
<style>{style}</style>
<script>{plotlyjs}</script>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""
