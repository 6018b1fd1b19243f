"""`batchrun report --html`: a real sweep's page rendered in headless Chromium, and its charts'
figures checked against the file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from statistics import fmean, median, quantiles

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import cli
from batchrun.fake import FakeConfig, FakeServer
from batchrun.job import build_job, read_job_data
from batchrun.report import read_report, scan_rows
from batchrun.report_html import error_classes, latencies, render_html, throughput
from batchrun.runner import run_job
from scripts.report_screenshot import CHROMIUM_FLAGS
from tests.test_report import SWEEP_ROWS, write_output

EVAL_SWEEP = Path(__file__).parent.parent / "jobs" / "eval_sweep.toml"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the browser tests need Debian's `chromium` (.ci/run installs it)",
)


@dataclass(frozen=True)
class SweepPage:
    """A sweep's output, its report page, and its variants' names."""

    output: Path
    page: Path
    variants: list[str]


@pytest.fixture(scope="module")
def sweep(fake_session: FakeServer, tmp_path_factory: pytest.TempPathFactory) -> SweepPage:
    """jobs/eval_sweep.toml on its first 3 questions against the fake, which answers some
    requests with 429, 500 or 400; then `report --html` of its output."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = read_job_data(EVAL_SWEEP)
    del data["fake"]  # the session's fake, not one started for the job
    limits = {"initial_backoff": 0.01, "max_backoff": 0.02, "max_attempts": 2, "timeout": 10}
    data |= {"output": str(tmp / "sweep.parquet"), "base_url": fake_session.base_url, "limit": 3}
    data["limits"] = {**data.get("limits", {}), **limits}
    # the k-th request to arrive meets the k-th throw of the dice: seeded afresh (a change of
    # seed re-seeds them), the first 24 throws hold 400s and 429s, whatever the order
    fake_session.reset(FakeConfig(seed=0))
    fake_session.reset(
        FakeConfig(fail_rate=0.3, faults=("429", "500", "400"), retry_after=0.01, seed=7)
    )
    try:
        summary = run_job(build_job(data, source=EVAL_SWEEP))
    finally:
        fake_session.reset(FakeConfig())
    assert summary.complete and summary.rows_error > 0  # the charts have errors to show
    page = tmp / "report.html"
    result = CliRunner().invoke(cli, ["report", data["output"], "--html", str(page)])
    assert result.exit_code == 0, result.output
    variants = [f.variant for f in read_report(Path(data["output"]))]
    assert len(variants) == 8  # 2 models x 2 temperatures x 2 repeats
    return SweepPage(Path(data["output"]), page, variants)


def chromium(page: Path, tmp_path: Path, *flags: str) -> str:
    """Open `page` in headless Chromium (a new profile) and return its DOM after scripts ran."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            *flags,
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


#: the request the net-log test makes on purpose: .invalid never resolves, here or anywhere
CONTROL = "https://control.invalid/pixel.png"
#: CSS that loads something from elsewhere
EXTERNAL_CSS = re.compile(r"@import|url\(\s*['\"]?\s*(?!#)[a-z]*:?//", re.IGNORECASE)
#: HTML elements that have no end tag
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})


class Dom(HTMLParser):
    """What the tests look for in a page: charts and their drawn elements, table cells, links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        #: chart div id -> how many svg and canvas elements are inside it
        self.drawn: dict[str, int] = {}
        #: chart div id -> the text drawn in its SVG (axis ticks, legends)
        self.chart_text: dict[str, list[str]] = {}
        self.cells: list[str] = []
        #: (tag, attribute, value) of every attribute that could load something
        self.links: list[tuple[str, str, str]] = []
        self.styles: list[str] = []
        self._stack: list[tuple[str, str | None]] = []  # (tag, the chart it is in)
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        chart = self._stack[-1][1] if self._stack else None
        if tag == "div" and (values.get("id") or "").startswith("chart-"):
            chart = values["id"]
            self.drawn.setdefault(chart, 0)
        if chart is not None and tag in ("svg", "canvas"):
            self.drawn[chart] += 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data"):
                self.links.append((tag, name, value or ""))
            if name == "style" and value:
                self.styles.append(value)
        if tag not in VOID:
            self._stack.append((tag, chart))
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if any(open_tag == tag for open_tag, _ in self._stack):
            while self._stack.pop()[0] != tag:
                pass
        self._in = None

    def handle_data(self, data: str) -> None:
        chart = self._stack[-1][1] if self._stack else None
        if self._in == "td" or (self._stack and self._stack[-1][0] == "td"):
            self.cells.append(data.strip())
        elif chart is not None and self._stack[-1][0] in ("text", "tspan") and data.strip():
            self.chart_text.setdefault(chart, []).append(data.strip())
        elif self._stack and self._stack[-1][0] == "style":
            self.styles.append(data)


@needs_chromium
def test_charts_render_in_chromium(sweep: SweepPage, tmp_path: Path) -> None:
    """In headless Chromium every chart is drawn as SVG and every variant is named in the table
    and on the charts."""
    before = Dom(sweep.page.read_text())
    assert sorted(before.drawn) == ["chart-0", "chart-1", "chart-2", "chart-3"]
    assert not any(before.drawn.values())  # nothing is drawn until plotly.js runs

    after = Dom(chromium(sweep.page, tmp_path))
    assert after.drawn.keys() == before.drawn.keys()
    assert all(count >= 1 for count in after.drawn.values()), after.drawn
    drawn_text = " ".join(text for texts in after.chart_text.values() for text in texts)
    for variant in sweep.variants:
        assert variant in after.cells
        assert re.search(rf"\b{variant} thinking=(False|True) ", drawn_text), variant
    assert "bad_request" in after.chart_text["chart-3"]  # the error classes' chart


@needs_chromium
def test_page_fetches_nothing(sweep: SweepPage, tmp_path: Path) -> None:
    """The page names no external URL and, opened in Chromium, requests nothing but itself."""
    text = sweep.page.read_text()
    dom = Dom(text)
    assert dom.links == []  # scripts and styles are inline; no link, image or frame
    assert dom.styles and not any(EXTERNAL_CSS.search(style) for style in dom.styles)

    # the page in a frame beside one request made on purpose (to a name that resolves
    # nowhere), which shows that the net log sees what a page requests
    frame = tmp_path / "frame.html"
    frame.write_text(f'<iframe src="{sweep.page.as_uri()}"></iframe><img src="{CONTROL}">')
    net_log = tmp_path / "net.json"
    chromium(frame, tmp_path, f"--log-net-log={net_log}")
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requested = [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start_job
        and "url" in event.get("params", {})
        # a page's requests have its origin (opaque for a file:) as initiator; Chromium's
        # own background ones have none
        and event["params"].get("initiator") != "not an origin"
    ]
    assert requested == [CONTROL]


def test_throughput_counts_every_row_once(sweep: SweepPage) -> None:
    """The throughput intervals add up to the file's rows, errors, requests sent again and
    429s met."""
    rows = pq.read_table(sweep.output).to_pylist()
    data = throughput(scan_rows(sweep.output))
    assert sum(data.ok) == sum(r["status"] == "ok" for r in rows)
    assert sum(data.errors) == sum(r["status"] != "ok" for r in rows) > 0
    assert sum(data.retries) == sum(r["attempts"] - 1 for r in rows) > 0
    assert sum(data.rate_limited) == sum(r["rate_limited"] for r in rows) > 0
    first = min(r["finished_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    assert data.starts[0] == first
    assert 0 <= (last - data.starts[-1]).total_seconds() < data.interval_s


def test_latency_quartiles_match_the_file(sweep: SweepPage) -> None:
    """Each variant's box is the quartiles, mean and extremes of its rows' latencies."""
    rows = pq.read_table(sweep.output).to_pylist()
    boxes = latencies(scan_rows(sweep.output))
    assert [box.variant for box in boxes] == sweep.variants
    for box in boxes:
        mine = [r["latency_s"] for r in rows if r["variant"] == box.variant]
        q1, _, q3 = quantiles(mine, n=4, method="inclusive")
        assert (box.rows, box.low, box.high) == (len(mine), min(mine), max(mine))
        assert (box.q1, box.median, box.q3, box.mean) == pytest.approx(
            (q1, median(mine), q3, fmean(mine))
        )


def test_error_classes_match_the_file(sweep: SweepPage) -> None:
    """The error chart counts the failed rows by class and variant, as the file has them."""
    rows = pq.read_table(sweep.output).to_pylist()
    want = Counter((r["error_class"], r["variant"]) for r in rows if r["status"] != "ok")
    got = error_classes(scan_rows(sweep.output))
    assert {(c, v): n for c, counts in got.items() for v, n in counts.items()} == want


def test_accuracy_chart_only_with_a_reference(tmp_path: Path) -> None:
    """A labelling sweep with a reference gets an accuracy-against-cost chart (its output need
    not have the timing columns); one without a reference does not."""
    labelled = write_output(tmp_path / "labelled.parquet", SWEEP_ROWS)
    page = render_html(read_report(labelled), scan_rows(labelled), title="t")
    assert "Accuracy against cost" in page and 'id="chart-3"' in page

    spec = {"sweep_keys": ["model", "temperature"]}
    plain = write_output(tmp_path / "plain.parquet", SWEEP_ROWS, spec=spec)
    page = render_html(read_report(plain), scan_rows(plain), title="t")
    assert "Accuracy against cost" not in page and 'id="chart-3"' in page  # errors instead


def test_html_without_plotly_says_how_to_install(
    sweep: SweepPage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without plotly, --html exits 2 naming the extra to install, and writes nothing."""
    monkeypatch.setitem(sys.modules, "plotly", None)  # what `import plotly` meets when absent
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(sweep.output), "--html", str(page)])
    assert result.exit_code == 2
    assert "pip install 'batchrun[report]'" in result.output
    assert not page.exists()


def test_html_to_a_missing_folder_is_a_clear_error(sweep: SweepPage, tmp_path: Path) -> None:
    """--html into a folder that does not exist exits 2 naming the file."""
    page = tmp_path / "nowhere" / "report.html"
    result = CliRunner().invoke(cli, ["report", str(sweep.output), "--html", str(page)])
    assert result.exit_code == 2
    assert str(page) in result.output and "cannot write" in result.output


def test_markup_in_a_swept_value_stays_text(tmp_path: Path) -> None:
    """A swept value holding markup is shown as text: escaped in the table, and unable to end
    the page's scripts early."""
    value = "<b>m</b></script><script>x"  # short enough for the table to show whole
    path = write_output(tmp_path / "odd.parquet", [{**r, "sweep_model": value} for r in SWEEP_ROWS])
    page = render_html(read_report(path), scan_rows(path), title="<i>t</i>")
    assert "<td>&lt;b&gt;m&lt;/b&gt;&lt;/script&gt;&lt;script&gt;x</td>" in page
    assert "<title>&lt;i&gt;t&lt;/i&gt;</title>" in page
    assert value not in page and "<b>m" not in page
    assert page.count("<script") == page.count("</script>")
