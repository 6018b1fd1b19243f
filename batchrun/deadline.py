"""Per-attempt deadlines for many tasks of one asyncio loop, kept with one timer between them.

`Client.send` gives each attempt a total deadline (DeepSeek's keep-alive lines restart the read
timer, so a read timeout alone never ends a stalled answer). An anyio cancel scope a request
costs ~10 us (a task lookup, a scope stack, a timer handle, ~1 us more to read the clock); this
costs ~0.5 us: every deadline of a client has the same length, so they fall due in the order
they were set, and a dict in insertion order is the queue. One timer waits for the oldest;
when it fires it cancels the tasks whose deadline passed and waits for the next oldest.

The cancellation is asyncio's own, as `asyncio.timeout` delivers it: `task.cancel()`, taken
back with `task.uncancel()` by the task when it sees its deadline passed, so that a
cancellation from elsewhere (an anyio scope, Ctrl-C) arriving at the same time still wins.
"""

from __future__ import annotations

import asyncio


class Deadlines:
    """Deadlines of `seconds` for tasks that `start` one and `stop` it when done.

    Use as:

    ```python
    cancelling = deadlines.start(task)
    try:
        ...  # awaits inside
    except asyncio.CancelledError:
        if deadlines.expired(task, cancelling):
            ...  # the deadline passed: report a timeout
        raise
    finally:
        deadlines.stop(task)
    ```
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        #: each waiting task's deadline on the loop's clock, oldest first
        self._due: dict[asyncio.Task[object], float] = {}
        #: tasks cancelled by a passed deadline that have not yet seen it
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        #: the loop the timer is on: a client used again from a new loop starts a new one
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[object]) -> int:
        """Give `task` a deadline `seconds` from now; returns its count of cancellations
        already requested (for `expired`). A task has one deadline at a time."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.seconds
        if self._loop is not loop:
            self._meet(loop)
        self._due[task] = due
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire)
        return task.cancelling()

    def _meet(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start over on a new loop (a client used again after `asyncio.run` ended): a timer
        or a task left on the old loop is dead, and cancelling such a task would raise."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._expired.clear()
        self._loop = loop

    @property
    def pending(self) -> int:
        """How many tasks hold a deadline: started and not yet stopped."""
        return len(self._due) + len(self._expired)

    @property
    def armed(self) -> bool:
        """Whether a timer waits for a deadline (none once `close`d)."""
        return self._timer is not None

    def stop(self, task: asyncio.Task[object]) -> None:
        """Take `task`'s deadline away (whether it passed or not)."""
        self._due.pop(task, None)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[object], cancelling: int) -> bool:
        """Whether the CancelledError `task` is handling came from its passed deadline alone.

        Takes that cancellation back (`uncancel`); False means the task was (also) cancelled
        from elsewhere, and the CancelledError must go on.
        """
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= cancelling

    def close(self) -> None:
        """Cancel the timer (the client is closing; no task waits any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        due = self._due
        loop = asyncio.get_running_loop()
        now = loop.time()
        while due:
            task = next(iter(due))
            if due[task] > now:
                self._timer = loop.call_at(due[task], self._fire)
                return
            del due[task]
            if not task.done():
                self._expired.add(task)
                task.cancel()
