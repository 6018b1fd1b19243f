"""The cyclic garbage collector, set for a batch run (issue 12).

A run imports a few hundred thousand long-lived objects (aiohttp, pyarrow, pydantic, httpx)
and then allocates millions of short-lived ones that their reference counts free. Python's
default collector settings suit neither: its youngest generation is passed over every 700
allocations, and every full pass walks all the modules' objects again.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: allocations between the collector's youngest-generation passes while a run works
#: (Python's default: 700)
RUN_GC_THRESHOLD = 10_000

_collector_lock = threading.Lock()
#: `collector_set_for_the_run` blocks open (a run's, and its pool's inside it)
_collector_holds = 0


@contextlib.contextmanager
def collector_set_for_the_run() -> Iterator[None]:
    """While the block runs, leave the objects alive now out of the cyclic garbage
    collector's passes (`gc.freeze`), and pass over the young objects every
    `RUN_GC_THRESHOLD` allocations rather than every 700; both are undone when the
    outermost block ends. A block inside another freezes what was loaded meanwhile (the
    pool's, once the client has imported aiohttp).

    Once a run's modules are imported (aiohttp, pyarrow, pydantic, httpx: a few hundred
    thousand objects), every full collection walks them all, and a run's allocations set off
    several: on a 10k-request run the full collections took ~0.3 s of CPU, ~0.04 s with the
    modules frozen. A row's own objects (dicts, bytes, result rows) are freed by their
    reference counts, so the ~900 passes the default sets off on a 10k run find little; ten
    as many allocations between passes cut them to ~10 (about 0.85 of the run's CPU with
    both, paired, issue 12), and cycles are still collected, a little later. Nothing frozen
    is lost: these objects live as long as the modules do, and any that turn to garbage
    meanwhile are collected after the block.
    """
    global _collector_holds
    thresholds = gc.get_threshold()
    with _collector_lock:
        gc.freeze()
        gc.set_threshold(max(thresholds[0], RUN_GC_THRESHOLD), *thresholds[1:])
        _collector_holds += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_holds -= 1
            gc.set_threshold(*thresholds)
            if _collector_holds == 0:
                gc.unfreeze()


def collect_less_often() -> None:
    """For a process that is a batchrun command: pass over the young objects every
    `RUN_GC_THRESHOLD` allocations from the start, imports included (~0.03 s of a run's
    start-up on this machine: importing the stack sets off hundreds of passes)."""
    first, *older = gc.get_threshold()
    gc.set_threshold(max(first, RUN_GC_THRESHOLD), *older)


def spare_at_exit() -> None:
    """For a process about to end: leave every object out of the collector's last passes,
    which would walk all of them to find cycles nobody will use (~0.05-0.1 s of a run's CPU).
    Files and sockets are closed already, and module teardown still frees the rest."""
    gc.freeze()
