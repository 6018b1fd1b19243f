"""Before spending: how many requests, how many tokens, what it may cost, how long it takes.

Reads the input (the same checks as a run) and sends nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from batchrun import tokens
from batchrun.job import Job
from batchrun.prices import PriceTable
from batchrun.prompts import RequestShape, build_request, expand_sweep
from batchrun.sources import iter_batches, scan_input

#: the share of max_tokens an answer typically uses, for the expected and low estimates
TYPICAL_SHARE = 0.3
LOW_SHARE = 0.1


@dataclass
class Estimate:
    """What a job would send and cost."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_cap_tokens: int = 0
    cost_low: float = 0.0
    cost_expected: float = 0.0
    cost_high: float = 0.0
    minutes_by_rpm: float | None = None
    minutes_by_tpm: float | None = None
    models: Counter[str] = field(default_factory=Counter)
    unpriced_models: set[str] = field(default_factory=set)


def estimate_job(job: Job, prices: PriceTable | None = None) -> Estimate:
    """Read the job's input and estimate it; sends no request."""
    scan_input(job)  # the same checks a run makes, so a bad row is reported here too
    table = prices or PriceTable.load(job.prices)
    shapes = [RequestShape.from_job(job, v.settings) for v in expand_sweep(job.sweep)]
    now = datetime.now(UTC)
    result = Estimate()
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
            price = table.price_for(model, now)
            if price is None:
                result.unpriced_models.add(model)
                continue
            prompt_cost = prompt * price.cache_miss / 1e6
            answer_cost = cap * price.output / 1e6
            result.cost_low += prompt_cost + answer_cost * LOW_SHARE
            result.cost_expected += prompt_cost + answer_cost * TYPICAL_SHARE
            result.cost_high += prompt_cost + answer_cost
    limits = job.limits
    scale = limits.window / 60.0  # budgets are per window; a window is a minute unless scaled
    if limits.rpm:
        result.minutes_by_rpm = result.requests / limits.rpm * scale
    if limits.tpm:
        expected_tokens = result.prompt_tokens + result.completion_cap_tokens * (
            1.0 if limits.tpm_counts == "max_tokens" else TYPICAL_SHARE
        )
        result.minutes_by_tpm = expected_tokens / limits.tpm * scale
    return result


def describe(estimate: Estimate) -> list[str]:
    """The estimate as lines for a person."""
    models = ", ".join(f"{model} {count}" for model, count in estimate.models.most_common())
    lines = [
        f"requests: {estimate.requests} ({models})",
        f"prompt tokens (estimated): {estimate.prompt_tokens}",
        f"completion tokens: at most {estimate.completion_cap_tokens} (max_tokens)",
    ]
    if estimate.unpriced_models:
        lines.append(
            "cost: unknown for "
            + ", ".join(sorted(estimate.unpriced_models))
            + " (no price: add one with --prices FILE)"
        )
    if len(estimate.unpriced_models) < len(estimate.models):
        lines.append(
            f"cost (USD, priced models): low {estimate.cost_low:.4f}, "
            f"expected {estimate.cost_expected:.4f}, high {estimate.cost_high:.4f} "
            f"(answers using {LOW_SHARE:.0%}, {TYPICAL_SHARE:.0%} and "
            "all of max_tokens; prompts at the cache-miss price)"
        )
    limits = [m for m in (estimate.minutes_by_rpm, estimate.minutes_by_tpm) if m is not None]
    if limits:
        lines.append(f"time the rate limits allow: at least {max(limits):.1f} minutes")
    else:
        lines.append("time: no rpm/tpm budget set; bounded by concurrency and server latency")
    return lines
