"""The retry policy: tenacity takes over after a first failed attempt, built only then."""

from __future__ import annotations

import pytest

from batchrun.errors import RateLimited, RetryableError
from batchrun.job import Limits
from batchrun.retry import RetryPolicy
from tests.conftest import run_python


class _Sleeps:
    """An injected sleep that records each wait instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_a_retry_waits_what_retry_after_asks_then_succeeds() -> None:
    """After a first 429 the policy waits its Retry-After, and the next attempt's answer is
    the result; a later failure without one backs off, and attempts end at max_attempts."""
    sleeps = _Sleeps()
    policy = RetryPolicy(Limits(max_attempts=3, initial_backoff=0.5), sleep=sleeps)
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        return "answer"

    first = RateLimited("slow down", retry_after=2.5)
    assert await policy.retry(first, attempt) == "answer"
    assert sleeps.waits == [2.5] and len(calls) == 1

    async def failing() -> str:
        raise RetryableError("boom", error_class="server")

    with pytest.raises(RetryableError, match="boom"):
        await policy.retry(RetryableError("first", error_class="server"), failing)
    assert len(sleeps.waits) == 3  # two more waits: attempts 2 and 3 of this row
    # backed off from initial_backoff (0.5 s, then doubled), not Retry-After's 2.5 again
    assert 0.5 <= sleeps.waits[1] <= 1.0 and 1.0 <= sleeps.waits[2] <= 1.5


async def test_one_attempt_means_no_retry() -> None:
    """With max_attempts = 1 the first failure is the result."""
    policy = RetryPolicy(Limits(max_attempts=1), sleep=_Sleeps())
    first = RetryableError("first", error_class="server")

    async def attempt() -> str:
        raise AssertionError("not attempted again")

    with pytest.raises(RetryableError) as raised:
        await policy.retry(first, attempt)
    assert raised.value is first


def test_tenacity_loads_with_the_first_retry() -> None:
    """Making a policy imports no tenacity (a run whose first sends all succeed never needs
    it); the first retry does."""
    code = (
        "import sys, anyio\n"
        "from batchrun.errors import RetryableError\n"
        "from batchrun.job import Limits\n"
        "from batchrun.retry import RetryPolicy\n"
        "async def nap(seconds): pass\n"
        "policy = RetryPolicy(Limits(), sleep=nap)\n"
        "print('tenacity' in sys.modules)\n"
        "async def attempt(): return 'ok'\n"
        "first = RetryableError('x', error_class='server')\n"
        "print(anyio.run(policy.retry, first, attempt), 'tenacity' in sys.modules)\n"
    )
    done = run_python(code)
    assert done.stdout.splitlines() == ["False", "ok True"]
