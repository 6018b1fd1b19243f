"""estimate: the cost at peak, off-peak and as scheduled, and how long the schedule takes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchrun.cli import cli
from batchrun.estimate import describe, estimate_job
from batchrun.job import build_job
from tests.conftest import ManualClock, fast_job_data, write_jsonl

# deepseek-flash, USD per 1M tokens: (cache miss, output) at peak and off-peak
PEAK_MISS, PEAK_OUTPUT = 0.30, 1.20
OFF_MISS, OFF_OUTPUT = 0.15, 0.60
TUESDAY = datetime(2026, 12, 1, tzinfo=UTC)


def _costs(line: str) -> tuple[float, float, float]:
    found = re.search(r"low ([\d.]+), expected ([\d.]+), high ([\d.]+)", line)
    assert found is not None, line
    low, expected, high = (float(v) for v in found.groups())
    return low, expected, high


def _by_hand(prompt: int, cap: int, miss: float, output: float) -> tuple[float, ...]:
    """Prompts at the miss price; answers using 10%, 30% and all of max_tokens."""
    return tuple((prompt * miss + cap * share * output) / 1e6 for share in (0.1, 0.3, 1.0))


def _write_rows(tmp_path: Path, count: int) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": f"r{i}", "prompt": f"Sort review {i} into praise or complaint."}
            for i in range(count)
        ],
    )


def test_estimate_of_1000_flash_rows_prints_peak_off_peak_and_scheduled_costs(
    tmp_path: Path,
) -> None:
    """`batchrun estimate --off-peak` of 1,000 deepseek-flash rows: the three costs match the
    table worked by hand from the token counts it prints; scheduled off-peak is the off-peak
    cost."""
    _write_rows(tmp_path, 1000)
    args = ["estimate", "--input", str(tmp_path / "in.jsonl"), "--model", "deepseek-flash"]
    result = CliRunner().invoke(cli, [*args, "--max-tokens", "500", "--rpm", "500", "--off-peak"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "requests: 1000 (deepseek-flash 1000)" in lines
    prompt = int(next(ln for ln in lines if ln.startswith("prompt tokens")).split(": ")[1])
    assert "completion tokens: at most 500000 (max_tokens)" in lines
    cap = 500_000
    peak = _by_hand(prompt, cap, PEAK_MISS, PEAK_OUTPUT)
    off = _by_hand(prompt, cap, OFF_MISS, OFF_OUTPUT)
    line = {ln.split(":")[0].strip(): ln for ln in lines if ln.startswith("  ")}
    assert _costs(line["at peak prices"]) == pytest.approx(peak, abs=5e-5)
    assert _costs(line["at off-peak prices"]) == pytest.approx(off, abs=5e-5)
    assert _costs(line["as scheduled"]) == pytest.approx(off, abs=5e-5)
    assert "--off-peak: every request off-peak" in line["as scheduled"]
    assert peak[2] == pytest.approx(0.6 + prompt * 0.30 / 1e6)  # the output alone: 500k x 1.20


def test_estimate_without_max_tokens_says_why_the_range_is_high(tmp_path: Path) -> None:
    """Without max_tokens each deepseek-flash answer counts at 384K tokens: the estimate says
    so and how to narrow it; with --max-tokens it says nothing of the kind."""
    _write_rows(tmp_path, 3)
    args = ["estimate", "--input", str(tmp_path / "in.jsonl"), "--model", "deepseek-flash"]
    lines = CliRunner().invoke(cli, args).output.splitlines()
    assert "completion tokens: at most 1179648 (max_tokens)" in lines  # 3 x 384K
    (note,) = [ln for ln in lines if ln.startswith("note: ")]
    assert "3 requests set no max_tokens" in note and "393216 for deepseek-flash" in note
    capped = CliRunner().invoke(cli, [*args, "--max-tokens", "64"]).output
    assert "no max_tokens" not in capped


def test_off_peak_estimate_names_models_it_does_not_hold_back(tmp_path: Path) -> None:
    """`estimate --off-peak` of deepseek-chat (no peak hours) says its requests go at any
    hour; of deepseek-flash it says no such thing."""
    _write_rows(tmp_path, 2)
    args = ["estimate", "--input", str(tmp_path / "in.jsonl"), "--max-tokens", "9", "--off-peak"]
    chat = CliRunner().invoke(cli, [*args, "--model", "deepseek-chat"]).output.splitlines()
    assert "off-peak: deepseek-chat: no off-peak price, so sent at any hour" in "\n".join(chat)
    flash = CliRunner().invoke(cli, [*args, "--model", "deepseek-flash"]).output
    assert "sent at any hour" not in flash and "off-peak" in flash


def test_a_run_sent_now_is_priced_by_the_hours_it_crosses(tmp_path: Path) -> None:
    """Without --off-peak, a run from 00:30 Tuesday that takes an hour (by its rpm) is half
    in the 01:00 peak: its scheduled cost is half at peak, half off-peak."""
    _write_rows(tmp_path, 600)
    job = build_job(
        fast_job_data(tmp_path, "http://127.0.0.1:1", model="deepseek-flash", limits={"rpm": 10})
    )
    estimate = estimate_job(job, clock=ManualClock(TUESDAY.replace(hour=0, minute=30)))
    assert estimate.sending_minutes == pytest.approx(60)
    assert estimate.peak_share == pytest.approx(0.5)
    assert estimate.scheduled.expected == pytest.approx(
        (estimate.at_peak.expected + estimate.at_off_peak.expected) / 2
    )
    assert "50% of the time at peak" in "\n".join(describe(estimate))


def test_without_a_rate_budget_the_run_is_priced_at_the_price_now(tmp_path: Path) -> None:
    """No rpm/tpm to time the run by: at 03:00 on a weekday the whole run is priced at peak."""
    _write_rows(tmp_path, 10)
    job = build_job(fast_job_data(tmp_path, "http://127.0.0.1:1", model="deepseek-flash"))
    estimate = estimate_job(job, clock=ManualClock(TUESDAY.replace(hour=3)))
    assert estimate.scheduled.high == pytest.approx(estimate.at_peak.high)
    assert estimate.scheduled.high > estimate.at_off_peak.high


@pytest.mark.parametrize(
    ("start", "waits", "done"),
    [
        pytest.param(TUESDAY.replace(hour=3), "until Tue 04:00 UTC", "Tue 01 Dec 05:00", id="peak"),
        # 30 minutes before the 06:00 peak, 30 after it ends at 10:00
        pytest.param(TUESDAY.replace(hour=5, minute=30), None, "Tue 01 Dec 10:30", id="across"),
        pytest.param(TUESDAY.replace(hour=4), None, "Tue 01 Dec 05:00", id="off-peak"),
    ],
)
def test_off_peak_estimate_says_how_long_the_run_takes_waits_included(
    tmp_path: Path, start: datetime, waits: str | None, done: str
) -> None:
    """An hour of sending (600 rows at 10 rpm) on the off-peak schedule: when the first
    request goes and when the run ends, the peak hours waited out."""
    _write_rows(tmp_path, 600)
    data = fast_job_data(
        tmp_path, "http://127.0.0.1:1", model="deepseek-flash", schedule="off-peak"
    )
    data["limits"]["rpm"] = 10
    text = "\n".join(describe(estimate_job(build_job(data), clock=ManualClock(start))))
    assert f"done at the earliest {done} UTC" in text
    if waits is None:
        assert "the first request waits" not in text
    else:
        assert f"the first request waits {waits}" in text


def test_a_model_without_peak_prices_keeps_the_single_cost_line(tmp_path: Path) -> None:
    """deepseek-chat has one price at every hour: one cost line, no peak/off-peak split."""
    _write_rows(tmp_path, 10)
    job = build_job(fast_job_data(tmp_path, "http://127.0.0.1:1", schedule="off-peak"))
    text = "\n".join(describe(estimate_job(job, clock=ManualClock(TUESDAY.replace(hour=3)))))
    assert "cost (USD, priced models): low" in text
    assert "at peak prices" not in text and "waits until" not in text  # nothing held back
