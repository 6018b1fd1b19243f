"""Before spending: how many requests, how many tokens, what it may cost, how long it takes.

Reads the input (the same checks as a run) and sends nothing. Where a model has peak and
off-peak prices, the cost is given at each, and as the job's schedule would pay it: with
`schedule = "off-peak"` every request at the off-peak price; otherwise sent from now on, over
the time the rate budgets allow, at the price of the hours that time crosses (with no budget
to time the run by, all at the price in force now).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from batchrun import tokens
from batchrun.clock import SYSTEM_CLOCK, Clock
from batchrun.job import Job, for_server
from batchrun.prices import PER_TOKENS, PriceTable, Rates
from batchrun.prompts import RequestShape, build_request, expand_sweep
from batchrun.schedule import OFF_PEAK, first_off_peak, off_peak_finish, peak_calendars
from batchrun.sources import iter_batches, scan_input

#: the share of max_tokens an answer typically uses, for the expected and low estimates
TYPICAL_SHARE = 0.3
LOW_SHARE = 0.1


@dataclass
class Costs:
    """USD of the priced requests, with answers using 10%, 30% and all of max_tokens."""

    low: float = 0.0
    expected: float = 0.0
    high: float = 0.0

    def add(self, rates: Rates, prompt: int, cap: int, share: float = 1.0) -> None:
        """Add a request at `rates` (prompt tokens at the cache-miss price), times `share`."""
        prompt_cost = prompt * rates.cache_miss / PER_TOKENS * share
        answer_cost = cap * rates.output / PER_TOKENS * share
        self.low += prompt_cost + answer_cost * LOW_SHARE
        self.expected += prompt_cost + answer_cost * TYPICAL_SHARE
        self.high += prompt_cost + answer_cost

    def __str__(self) -> str:
        return f"low {self.low:.4f}, expected {self.expected:.4f}, high {self.high:.4f}"


@dataclass
class Estimate:
    """What a job would send and cost."""

    #: when the estimate was made (the run is taken to start then)
    now: datetime
    schedule: str = "anytime"
    requests: int = 0
    prompt_tokens: int = 0
    completion_cap_tokens: int = 0
    #: every priced request at its peak price, at its off-peak price, and as scheduled
    at_peak: Costs = field(default_factory=Costs)
    at_off_peak: Costs = field(default_factory=Costs)
    scheduled: Costs = field(default_factory=Costs)
    minutes_by_rpm: float | None = None
    minutes_by_tpm: float | None = None
    models: Counter[str] = field(default_factory=Counter)
    #: requests per model that set no max_tokens, so count at the most the model may answer
    uncapped: Counter[str] = field(default_factory=Counter)
    unpriced_models: set[str] = field(default_factory=set)
    #: models whose price has peak hours
    peak_priced: set[str] = field(default_factory=set)
    #: the share of the run's sending time at peak, for a run sent from now (not off-peak)
    peak_share: float = 0.0
    #: with the off-peak schedule: when the first request may go, and when the run ends
    #: (None: no rate budget to time the run by)
    first_send: datetime | None = None
    finish: datetime | None = None
    #: the peak hours of the job's models, as text ("01:00-04:00, 06:00-10:00 UTC Mon-Fri")
    peak_hours: list[str] = field(default_factory=list)

    @property
    def cost_low(self) -> float:
        return self.scheduled.low

    @property
    def cost_expected(self) -> float:
        return self.scheduled.expected

    @property
    def cost_high(self) -> float:
        return self.scheduled.high

    @property
    def sending_minutes(self) -> float | None:
        """The least time the rate budgets allow for sending every request."""
        limits = [m for m in (self.minutes_by_rpm, self.minutes_by_tpm) if m is not None]
        return max(limits) if limits else None


def estimate_job(
    job: Job, prices: PriceTable | None = None, *, clock: Clock = SYSTEM_CLOCK
) -> Estimate:
    """Read the job's input and estimate it; sends no request.

    Args:
        clock: says when the run is taken to start (the prices then, the hours it crosses).
    """
    scan_input(job)  # the same checks a run makes, so a bad row is reported here too
    table = prices or PriceTable.load(job.prices)
    shapes = [RequestShape.from_job(job, v.settings) for v in expand_sweep(job.sweep)]
    result = Estimate(now=clock.now(), schedule=job.schedule)
    # per model: tokens summed, priced once at the end
    prompt_by_model: Counter[str] = Counter()
    cap_by_model: Counter[str] = Counter()
    for batch in iter_batches(job.input, limit=job.limit):
        for row, shape in ((row, shape) for row in batch for shape in shapes):
            body = build_request(row.data, shape)
            prompt = tokens.prompt_tokens(body)
            cap = tokens.completion_cap(body)
            model = str(body.get("model"))
            result.requests += 1
            result.prompt_tokens += prompt
            result.completion_cap_tokens += cap
            result.models[model] += 1
            if not (body.get("max_tokens") or body.get("max_completion_tokens")):
                result.uncapped[model] += 1
            prompt_by_model[model] += prompt
            cap_by_model[model] += cap
    for_server(job, result.models)  # the warnings a run would log: a retired name, say
    _time(result, job)
    _price(result, table, prompt_by_model, cap_by_model)
    return result


def _time(result: Estimate, job: Job) -> None:
    limits = job.limits
    scale = limits.window / 60.0  # budgets are per window; a window is a minute unless scaled
    if limits.rpm:
        result.minutes_by_rpm = result.requests / limits.rpm * scale
    if limits.tpm:
        expected_tokens = result.prompt_tokens + result.completion_cap_tokens * (
            1.0 if limits.tpm_counts == "max_tokens" else TYPICAL_SHARE
        )
        result.minutes_by_tpm = expected_tokens / limits.tpm * scale


def _price(result: Estimate, table: PriceTable, prompts: Counter[str], caps: Counter[str]) -> None:
    now, sending = result.now, result.sending_minutes
    off_peak = result.schedule == OFF_PEAK
    end = now + timedelta(minutes=sending) if sending is not None else None
    for model in result.models:
        price = table.price_for(model, now)
        if price is None:
            result.unpriced_models.add(model)
            continue
        prompt, cap = prompts[model], caps[model]
        result.at_peak.add(price.peak_rates, prompt, cap)
        result.at_off_peak.add(price.off_peak_rates, prompt, cap)
        if price.peak_hours is None:
            result.scheduled.add(price.peak_rates, prompt, cap)
            continue
        result.peak_priced.add(model)
        if off_peak:
            share = 0.0
        elif end is None or end <= now:
            share = 1.0 if price.is_peak(now) else 0.0
        else:
            share = price.peak_hours.peak_seconds(now, end) / (end - now).total_seconds()
        result.scheduled.add(price.peak_rates, prompt, cap, share)
        result.scheduled.add(price.off_peak_rates, prompt, cap, 1.0 - share)
        result.peak_share = max(result.peak_share, share)
    if off_peak and result.peak_priced:
        calendars = peak_calendars(table, result.peak_priced, now)
        result.peak_hours = [str(c) for c in calendars]
        result.first_send = first_off_peak(calendars, now)
        if sending is not None:
            result.finish = off_peak_finish(calendars, now, timedelta(minutes=sending))


def _hours(start: datetime, end: datetime) -> str:
    minutes = (end - start).total_seconds() / 60
    return f"{minutes:.1f} minutes" if minutes < 120 else f"{minutes / 60:.1f} hours"


def describe(estimate: Estimate) -> list[str]:
    """The estimate as lines for a person."""
    models = ", ".join(f"{model} {count}" for model, count in estimate.models.most_common())
    lines = [
        f"requests: {estimate.requests} ({models})",
        f"prompt tokens (estimated): {estimate.prompt_tokens}",
        f"completion tokens: at most {estimate.completion_cap_tokens} (max_tokens)",
    ]
    if estimate.uncapped:
        # a thinking model's most is 384K tokens: the range would be thousands of times what
        # short answers cost, with nothing saying why
        most = ", ".join(
            f"{tokens.completion_cap({'model': model})} for {model}"
            for model in sorted(estimate.uncapped)
        )
        lines.append(
            f"note: {estimate.uncapped.total()} requests set no max_tokens and count at the most "
            f"their model may answer ({most}): set max_tokens (--max-tokens) for a closer range"
        )
    if estimate.unpriced_models:
        lines.append(
            "cost: unknown for "
            + ", ".join(sorted(estimate.unpriced_models))
            + " (no price: add one with --prices FILE)"
        )
    shares = (
        f"answers using {LOW_SHARE:.0%}, {TYPICAL_SHARE:.0%} and all of max_tokens; "
        "prompts at the cache-miss price"
    )
    priced = len(estimate.unpriced_models) < len(estimate.models)
    if priced and not estimate.peak_priced:
        lines.append(f"cost (USD, priced models): {estimate.scheduled} ({shares})")
    elif priced:
        lines += [
            f"cost (USD, priced models; {shares}):",
            f"  at peak prices:     {estimate.at_peak}",
            f"  at off-peak prices: {estimate.at_off_peak}",
            f"  as scheduled:       {estimate.scheduled} ({_how_scheduled(estimate)})",
        ]
    sending = estimate.sending_minutes
    if sending is not None:
        lines.append(f"time the rate limits allow: at least {sending:.1f} minutes")
    else:
        lines.append("time: no rpm/tpm budget set; bounded by concurrency and server latency")
    lines += _off_peak_time(estimate)
    return lines


def _how_scheduled(estimate: Estimate) -> str:
    if estimate.schedule == OFF_PEAK:
        return "--off-peak: every request off-peak"
    now = f"{estimate.now:%a %H:%M} UTC"
    if estimate.sending_minutes is None:
        state = "peak" if estimate.peak_share else "off-peak"
        return f"all at the price now, {now}: {state}; --off-peak sends off-peak only"
    return (
        f"sent from now, {now}, {estimate.peak_share:.0%} of the time at peak; "
        "--off-peak sends off-peak only"
    )


def _off_peak_time(estimate: Estimate) -> list[str]:
    """How long the off-peak schedule makes the run take, waits included."""
    first, finish, now = estimate.first_send, estimate.finish, estimate.now
    if estimate.schedule != OFF_PEAK:
        return []
    lines = []
    if anytime := sorted(set(estimate.models) - estimate.peak_priced):
        # --off-peak holds back only models with peak hours: say so rather than let the
        # user believe a nightly job of deepseek-chat waits for cheaper hours
        lines.append(
            f"off-peak: {', '.join(anytime)}: no off-peak price, so sent at any hour "
            "(--off-peak holds back only models with peak hours)"
        )
    if first is None:
        return lines
    if first > now:
        lines.append(
            f"off-peak: the first request waits until {first:%a %H:%M} UTC ({_hours(now, first)})"
        )
    if finish is not None:
        lines.append(
            f"off-peak: done at the earliest {finish:%a %d %b %H:%M} UTC, "
            f"{_hours(now, finish)} from now, waits for off-peak included"
        )
    else:
        lines.append(
            f"off-peak: sends outside peak hours ({'; '.join(estimate.peak_hours)}); "
            "with no rpm/tpm budget, how long that takes is not known"
        )
    return lines
