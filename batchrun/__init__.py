"""batchrun: run large batches of chat-completion requests, within budget and resumably.

The public surface is kept cheap to import: `run_job`, `load_job` and `Job` load their
modules (pydantic, httpx, pyarrow) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrun.errors import (
    AuthError,
    BalanceError,
    BatchrunError,
    ConfigError,
    InputError,
    Interrupted,
    PermanentError,
    RateLimited,
    RequestError,
    RetryableError,
    RunStopped,
)

if TYPE_CHECKING:
    from batchrun.job import Job, load_job
    from batchrun.runner import RunSummary, run_job

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BalanceError",
    "BatchrunError",
    "ConfigError",
    "InputError",
    "Interrupted",
    "Job",
    "PermanentError",
    "RateLimited",
    "RequestError",
    "RetryableError",
    "RunStopped",
    "RunSummary",
    "__version__",
    "load_job",
    "run_job",
]

_LAZY = {
    "Job": "batchrun.job",
    "load_job": "batchrun.job",
    "run_job": "batchrun.runner",
    "RunSummary": "batchrun.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
