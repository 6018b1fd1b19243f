"""Times as whole microseconds since the Unix epoch: how the journal holds a timestamp and how
the meter stamps a request (an int: no `datetime` made a request, issue 12). Pure `datetime`
arithmetic, exact, and light to import (the result readers use it too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def epoch_us(value: datetime) -> int:
    """A timestamp as microseconds since the epoch, exactly (naive: taken as UTC): how the
    journal holds times, and how the meter stamps a request."""
    if value.tzinfo is None:  # a naive timestamp column: wall time, stored as if UTC
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // MICROSECOND


def from_epoch_us(value: int) -> datetime:
    """`epoch_us` back to a timezone-aware UTC `datetime`, exactly."""
    return EPOCH + timedelta(microseconds=value)
