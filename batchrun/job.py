"""The job model: what to read, where to send it, how to shape requests, and the limits.

A job comes from a TOML file (`load_job`), from flags alone, or from both: flags win, and that
precedence lives in one function, `apply_flags`. Relative paths resolve against the job file's
folder. Validation happens here, once, so the rest of the code can trust a `Job`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchrun import deepseek
from batchrun.errors import ConfigError

DEFAULT_BASE_URL = deepseek.BASE_URL
DEFAULT_API_KEY_ENV = "DEEPSEEK_API_KEY"
DEFAULT_MODEL = deepseek.CURRENT_MODEL

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: DeepSeek's `user_id`: letters, digits, `_` and `-`, at most 512 of them
_USER_ID = re.compile(r"^[a-zA-Z0-9_-]{1,512}$")
#: efforts DeepSeek takes but sends as "high"
_EFFORT_ALIASES = ("medium", "xhigh")


def body_values(values: dict[str, Any]) -> dict[str, Any]:
    """Request parameters as a server takes them: `thinking = true` / `false` is sent as
    `{"type": "enabled"}` / `{"type": "disabled"}` (DeepSeek's shape); the rest as given."""
    thinking = values.get("thinking")
    if isinstance(thinking, bool):
        return {**values, "thinking": {"type": "enabled" if thinking else "disabled"}}
    return values


# Defaults are made by plain functions, never by a class (`dict`, `list`, a model): pydantic
# reads each factory's signature, and a builtin's is parsed from text by `tokenize`, whose
# regular expressions then compile (~2 ms and ~10M instructions of every run, issue 12).


def _new_dict() -> dict[str, Any]:
    return {}


def _new_list() -> list[str]:
    return []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Params(_Strict):
    """Request parameters sent with every row (and, opted into with `row_params`, per row)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    #: DeepSeek's thinking mode (its current models think unless told false); None: not sent
    thinking: bool | None = Field(default=None, strict=True)
    #: how hard a thinking model thinks; None: not sent (DeepSeek's default is "high")
    reasoning_effort: Literal["low", "high", "max"] | None = None
    #: the end user the requests are for (DeepSeek's isolation field); per row: `row_params`
    user_id: str | None = None
    #: anything else the server accepts, sent as given
    extra_body: dict[str, Any] = Field(default_factory=_new_dict)

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort(cls, value: Any) -> Any:
        if value in _EFFORT_ALIASES:
            # one setting, one name: a sweep over "medium" and "high" would pay twice for
            # the same answers, and label them as two
            raise ValueError(
                f"DeepSeek sends {value!r} as 'high': write 'high' (one of low, high, max; "
                "another server's efforts go in extra_body)"
            )
        return value

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, value: str | None) -> str | None:
        if value is not None and not _USER_ID.match(value):
            raise ValueError("must be 1 to 512 letters, digits, '_' or '-'")
        return value

    def to_body(self) -> dict[str, Any]:
        """The parameters as request-body fields, leaving out the unset ones."""
        body = self.model_dump(exclude_none=True, exclude={"extra_body"})
        body.update(self.extra_body)
        return body_values(body)


#: request fields a row may set for itself (only those the job names in `row_params`)
ROW_OVERRIDABLE = ("model", *(name for name in Params.model_fields if name != "extra_body"))


class _RequestFields(Params):
    """The request fields batchrun knows, with the types a server expects: a row's values
    (`row_params`) and an OpenAI batch line's body are checked against it before anything is
    sent. Strict: "5" is not a max_tokens, nor "True" a stream."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, min_length=1)
    stream: bool | None = None
    #: a batch line's body holds the wire shape, {"type": "enabled" | "disabled"}; widening
    #: the parent's type is the point, so mypy's override check is silenced
    thinking: bool | dict[str, Any] | None = None  # type: ignore[assignment]
    #: a row's or batch line's effort is sent as written, for whatever server it is meant for
    #: (OpenAI's "medium", DeepSeek's "xhigh"); only the job's own settings keep to one name
    reasoning_effort: str | None = None  # type: ignore[assignment]

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort(cls, value: Any) -> Any:
        return value

    @field_validator("thinking")
    @classmethod
    def _thinking(cls, value: bool | dict[str, Any] | None) -> bool | dict[str, Any] | None:
        if isinstance(value, dict) and value.get("type") not in ("enabled", "disabled"):
            raise ValueError('must be true, false, or {"type": "enabled" | "disabled"}')
        return value


class BadRequestField(ValueError):
    """Raised when a request field of a row or batch line has a value a server would refuse."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def check_request_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The known request fields among `values`, checked (unknown ones are not looked at).

    Raises:
        BadRequestField: naming the first field with a bad value.
    """
    try:
        _RequestFields.model_validate(values)
    except ValidationError as exc:
        item = exc.errors()[0]
        name = str(item["loc"][0]) if item["loc"] else "?"
        raise BadRequestField(name, f"{item['msg']} (got {item['input']!r})") from None
    return values


class PromptMapping(_Strict):
    """How a row becomes messages, and which columns say what."""

    #: the column holding each row's id; None: `id`, else `custom_id`, else the position;
    #: False (or "" from the flag): the position, whatever the columns
    id_column: str | Literal[False] | None = None
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    #: a column holding each row's system prompt (over `system`); none unless named
    system_column: str | None = None
    system: str | None = None
    template: str | None = None
    #: input columns copied into the output beside the results
    carry: list[str] = Field(default_factory=_new_list)
    #: request parameters each row may set from its column of the same name (opt-in: a
    #: column that merely shares a parameter's name never changes the request)
    row_params: list[str] = Field(default_factory=_new_list)

    @field_validator("id_column", mode="before")
    @classmethod
    def _id_column(cls, value: Any) -> Any:
        if value == "":
            return False
        if value is True:
            raise ValueError("must be a column name, or false to use row positions")
        return value

    @field_validator("row_params")
    @classmethod
    def _row_params(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ROW_OVERRIDABLE:
                raise ValueError(
                    f"{name!r} is not a request parameter a row can set; "
                    f"one of: {', '.join(ROW_OVERRIDABLE)}"
                )
        return value


class Limits(_Strict):
    """How hard to push the endpoint."""

    concurrency: int = Field(default=32, ge=1, le=4096)
    max_attempts: int = Field(default=6, ge=1, le=100)
    #: total seconds one attempt may take, keep-alive blank lines included
    timeout: float = Field(default=600.0, gt=0)
    #: seconds with no byte at all before an attempt is given up
    read_timeout: float = Field(default=120.0, gt=0)
    #: upper bound of one backoff sleep, seconds
    max_backoff: float = Field(default=60.0, gt=0)
    initial_backoff: float = Field(default=1.0, gt=0)
    #: requests per minute (per `window`); None: no ceiling
    rpm: float | None = Field(default=None, gt=0)
    #: tokens per minute (per `window`); None: no ceiling
    tpm: float | None = Field(default=None, gt=0)
    #: how the server counts tokens against tpm: real usage, or prompt + max_tokens (OpenAI)
    tpm_counts: Literal["usage", "max_tokens"] = "usage"
    #: the budgets' period in seconds (a minute; tests scale it down)
    window: float = Field(default=60.0, gt=0)
    #: learn the server's concurrency limit, up to `concurrency`
    adaptive: bool = True
    #: where adaptive concurrency starts (see `first_concurrency`)
    start_concurrency: int = Field(default=8, ge=1)
    #: seconds the endpoint may stay unreachable mid-run (every worker waiting, one probing)
    #: before the run stops, resumable
    outage_timeout: float = Field(default=900.0, gt=0)
    #: the same for an endpoint that has not answered once in this run: a wrong URL is told
    #: within this
    start_timeout: float = Field(default=30.0, gt=0)

    @property
    def first_concurrency(self) -> int:
        """Where adaptive concurrency starts: `start_concurrency` when given; else an explicit
        `concurrency` (the user knows what the endpoint takes); else the default start."""
        if "start_concurrency" not in self.model_fields_set and "concurrency" in (
            self.model_fields_set
        ):
            return self.concurrency
        return min(self.start_concurrency, self.concurrency)


class FakeEndpoint(_Strict):
    """Run against the built-in fake server, started in-process on 127.0.0.1."""

    latency: float = 0.0
    latency_jitter: float = 0.0
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    faults: list[str] | None = None
    seed: int = 0
    retry_after: float = 1.0
    token_budget: int | None = None
    #: usage in answers: all fields, without the cache split, or none (as some proxies do)
    usage: Literal["full", "no_cache", "omit"] = "full"


class RaySettings(_Strict):
    """Where and how wide `engine = "ray"` runs (the `[ray]` table)."""

    #: a Ray cluster to join as a driver ("auto", "ray://host:10001", "host:6379"); none
    #: starts a local Ray instance on 127.0.0.1 for the run
    address: str | None = None
    #: worker actors, each running the pool on one shard at a time (default: the CPUs)
    workers: int | None = Field(default=None, ge=1, le=4096)


FieldType = Literal["str", "float", "int", "bool", "list", "dict"]


class ParseSpec(_Strict):
    """Structured answers: the JSON fields each answer must hold, each an output column."""

    fields: dict[str, FieldType]
    #: re-asks after an answer that does not parse (each one paid and counted)
    parse_attempts: int = Field(default=1, ge=0, le=10)
    #: parsed field -> input column holding its true value, for `batchrun report`
    reference: dict[str, str] = Field(default_factory=_new_dict)


#: what a [sweep] table may vary besides request parameters
SWEEP_KEYS = ("template", "system", *ROW_OVERRIDABLE)


class Job(_Strict):
    """A validated job."""

    input: Path
    output: Path
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_API_KEY_ENV
    model: str = DEFAULT_MODEL
    stream: bool = False
    #: only the first N rows: try a job before paying for all of it
    limit: int | None = Field(default=None, ge=1)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    params: Params = Field(default_factory=lambda: Params())
    prompt: PromptMapping = Field(default_factory=lambda: PromptMapping())
    limits: Limits = Field(default_factory=lambda: Limits())
    fake: FakeEndpoint | None = None
    #: a price file adding or overriding models in the shipped price table
    prices: Path | None = None
    #: a hard cap on spend in USD: no request is sent that could take the run past it
    max_cost: float | None = Field(default=None, gt=0)
    #: past this many rows the output is a directory of Parquet files of at most this many
    #: rows each (`part-00000.parquet`, ...), read as one table; None: always one file
    output_file_rows: int | None = Field(default=None, ge=1)
    parse: ParseSpec | None = None
    #: lists of values per key (and `repeat`): every row is sent once per combination
    sweep: dict[str, Any] | None = None
    #: a folder of answers keyed by the exact request body: a request answered before is
    #: not sent again
    cache: Path | None = None
    #: "local" runs in this process; "ray" cuts the input into shards run by Ray actors
    engine: Literal["local", "ray"] = "local"
    #: "off-peak": a request is sent only while its model is off-peak (`schedule.py`)
    schedule: Literal["anytime", "off-peak"] = "anytime"
    ray: RaySettings = Field(default_factory=lambda: RaySettings())
    #: the file the job came from, if any (for messages)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError(
                "must be the NAME of an environment variable holding the key, not the key itself"
            )
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        for key, values in value.items():
            if key == "repeat":
                if not isinstance(values, int) or isinstance(values, bool) or values < 1:
                    raise ValueError("repeat must be a whole number of at least 1")
            elif key not in SWEEP_KEYS:
                raise ValueError(f"cannot sweep {key!r}; sweepable: {', '.join(SWEEP_KEYS)}")
            elif not isinstance(values, list) or not values:
                raise ValueError(f"{key!r} must be a non-empty list of values")
            else:
                for item in values:  # by the rules of [params], types strict as a server's
                    try:
                        if key in Params.model_fields:
                            Params.model_validate({key: item}, strict=True)
                        else:
                            _RequestFields.model_validate({key: item})
                    except ValidationError as exc:
                        problem = exc.errors()[0]
                        raise ValueError(
                            f"{key}: {problem['msg']} (got {problem['input']!r})"
                        ) from None
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        from urllib.parse import urlsplit

        if "@" in urlsplit(value).netloc:  # it would reach logs, checkpoints and outputs
            raise ValueError(
                "must not hold a user name or password: the key comes from the environment "
                "variable api_key_env names"
            )
        return value

    def fingerprint(self) -> dict[str, Any]:
        """Everything that shapes a request: a resumed run must match it."""
        return {
            "model": self.model,
            "stream": self.stream,
            "params": self.params.to_body(),
            "prompt": self.prompt.model_dump(exclude={"carry"}),
            "carry": self.prompt.carry,
            "parse": self.parse.model_dump() if self.parse else None,
            "sweep": self.sweep,
        }

    def fingerprint_digest(self) -> str:
        """A short hash of `fingerprint()`."""
        raw = orjson.dumps(self.fingerprint(), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(raw).hexdigest()[:16]


#: file descriptors left for everything but sockets (journal, part files, logs, the fake)
_FILES_HELD_BACK = 128


def _sockets_allowed() -> int | None:
    """How many connections the process's open-file limit leaves room for (None: no limit
    known): a ceiling past it would end in "too many open files" rather than in more speed."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - _FILES_HELD_BACK)


def for_server(job: Job, models: Iterable[str]) -> Job:
    """The job as it runs against its server.

    Against DeepSeek's own URL, a job that sets no concurrency of its own and learns it
    (`adaptive`) may grow up to DeepSeek's documented per-account limit for its models (for
    several models, the smallest: the run keeps one limit for all), within what the open-file
    limit allows; where it starts is unchanged. Elsewhere (a reseller, the fake) the job is
    returned as it is.

    A retired model name (`deepseek-chat`, `deepseek-reasoner`) against DeepSeek's own URL
    is logged as a warning naming the current model; resellers keep serving the old names.
    On any URL, a spend cap over today's models without max_tokens is warned of: each request
    is held at their 384K-token most, which lets few go at once.
    """
    import structlog  # lazy: job.py loads with the CLI, structlog only when a run starts

    log = structlog.get_logger("batchrun.job")
    models = set(models)
    unbounded = sorted(models & deepseek.THINKING_MODELS)
    if job.max_cost is not None and job.params.max_tokens is None and unbounded:
        log.warning(
            "spend_cap_without_max_tokens",
            models=", ".join(unbounded),
            note=f"max_cost holds each request at {deepseek.MAX_OUTPUT_TOKENS} output tokens, "
            "the most these models may answer: set max_tokens to let more go at once",
        )
    limits = job.limits
    if job.fake is not None or not deepseek.is_deepseek(job.base_url):
        return job
    if found := deepseek.retired(models):
        for model, current in found.items():
            log.warning(
                "model_retired",
                model=model,
                use=current,
                note="DeepSeek's own endpoint retired it on 2026-07-24 (resellers may not)",
            )
    if "concurrency" in limits.model_fields_set or not limits.adaptive:
        return job
    ceiling = deepseek.concurrency_ceiling(models)
    if ceiling is None:
        return job
    allowed = _sockets_allowed()
    if allowed is not None:
        ceiling = max(limits.concurrency, min(ceiling, allowed))
    update = {"concurrency": ceiling, "start_concurrency": limits.first_concurrency}
    return job.model_copy(update={"limits": limits.model_copy(update=update)})


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden" and key in Params.model_fields:
            # `thinking = false` beside `model`: a request parameter one table too high
            parts.append(f"unknown key {key!r} (a request parameter: put it under [params])")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif item["type"] == "missing":
            parts.append(f"missing key {key!r}")
        else:
            parts.append(f"key {key!r}: {item['msg']}")
    return "; ".join(parts)


#: what an API key looks like: "sk-" then a long run of key characters (OpenAI, DeepSeek,
#: Anthropic, OpenRouter keys all do), long enough that "sk-learn" is not one
_KEY_SHAPED = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{16,}")
#: names under which a nested table would hold a credential
_CREDENTIAL_NAMES = frozenset({"api_key", "apikey", "authorization", "access_token"})


def _find_key_shaped(value: Any, where: str) -> str | None:
    """The dotted place of the first key-shaped string in a job's data, if any."""
    if isinstance(value, str):
        return where if _KEY_SHAPED.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            if str(key).lower() in _CREDENTIAL_NAMES and item:
                return place
            found = _find_key_shaped(item, place)
            if found is not None:
                return found
    if isinstance(value, list):
        for number, item in enumerate(value):
            found = _find_key_shaped(item, f"{where}[{number}]")
            if found is not None:
                return found
    return None


def _refuse_literal_keys(data: dict[str, Any], path: Path | str) -> None:
    """Refuse a job that holds a key itself: it would sit in a file, and be sent or copied
    wherever job values go. The message names where, never the value."""
    for key in ("api_key", "key", "token"):
        if key in data:
            raise ConfigError(
                f"a literal API key ({key!r}) is not allowed in a job file: put the key in an "
                "environment variable and name it with api_key_env",
                path=path,
            )
    found = _find_key_shaped(data, "")
    if found is not None:
        raise ConfigError(
            f"{found!r} holds what looks like an API key: keys are not allowed in a job; put "
            "the key in an environment variable and name it with api_key_env",
            path=path,
        )


def build_job(data: dict[str, Any], *, source: Path | None = None) -> Job:
    """Validate a job's data; relative paths resolve against the job file's folder."""
    where = source or "job"
    _refuse_literal_keys(data, where)
    try:
        job = Job.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_describe(exc), path=where) from None
    if source is not None:
        base = source.parent
        if not job.input.is_absolute():
            job.input = Path(os.path.normpath(base.absolute() / job.input))
        if not job.output.is_absolute():
            job.output = Path(os.path.normpath(base.absolute() / job.output))
        if job.prices is not None and not job.prices.is_absolute():
            job.prices = Path(os.path.normpath(base.absolute() / job.prices))
        if job.cache is not None and not job.cache.is_absolute():
            job.cache = Path(os.path.normpath(base.absolute() / job.cache))
    return job


def load_job(path: Path | str) -> Job:
    """Load and validate a job file."""
    path = Path(path)
    return build_job(read_job_data(path), source=path)


#: flag name -> where it lands in the job's data
FLAG_TARGETS: dict[str, tuple[str, ...]] = {
    "input": ("input",),
    "output": ("output",),
    "model": ("model",),
    "base_url": ("base_url",),
    "api_key_env": ("api_key_env",),
    "stream": ("stream",),
    "limit": ("limit",),
    "prices": ("prices",),
    "cache": ("cache",),
    "max_cost": ("max_cost",),
    "output_file_rows": ("output_file_rows",),
    "transport": ("transport",),
    "engine": ("engine",),
    "schedule": ("schedule",),
    "ray_address": ("ray", "address"),
    "workers": ("ray", "workers"),
    "concurrency": ("limits", "concurrency"),
    "max_attempts": ("limits", "max_attempts"),
    "timeout": ("limits", "timeout"),
    "rpm": ("limits", "rpm"),
    "tpm": ("limits", "tpm"),
    "adaptive": ("limits", "adaptive"),
    "max_tokens": ("params", "max_tokens"),
    "temperature": ("params", "temperature"),
    "thinking": ("params", "thinking"),
    "reasoning_effort": ("params", "reasoning_effort"),
    "id_column": ("prompt", "id_column"),
    "prompt_column": ("prompt", "prompt_column"),
    "messages_column": ("prompt", "messages_column"),
    "system": ("prompt", "system"),
    "template": ("prompt", "template"),
}


def apply_flags(job_data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Lay flags that were given (not None) over a job's data: flags win over the file.

    A flag for a key the job's [sweep] lists is refused: each variant's swept value would
    override it, and a `--no-thinking` that half the requests ignore is paid for in full.
    """
    merged: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in job_data.items()
    }
    sweep = job_data.get("sweep")
    swept = set(sweep) if isinstance(sweep, dict) else set()
    for name, value in flags.items():
        if value is None:
            continue
        target = FLAG_TARGETS[name]
        if target[-1] in swept and target[0] in ("model", "params", "prompt"):
            flag = f"--{'no-' if value is False else ''}{name.replace('_', '-')}"
            raise ConfigError(
                f"{flag} sets {target[-1]}, which the job's [sweep] lists: "
                "each variant would send its swept value instead; drop the flag or the sweep key"
            )
        node = merged
        for part in target[:-1]:
            node = node.setdefault(part, {})
        node[target[-1]] = value
    return merged


def read_job_data(path: Path) -> dict[str, Any]:
    """The raw TOML data of a job file, before validation (for merging flags over it)."""
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the job file: {exc.strerror}", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(job: Job, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key from the variable the job names: the one place the key is read.

    A run against the built-in fake or a loopback server may go without one.
    """
    env = os.environ if environ is None else environ
    key = env.get(job.api_key_env, "").strip()
    if key:
        return key
    if job.fake is not None or _is_loopback(job.base_url):
        return None
    raise ConfigError(
        f"the API key variable {job.api_key_env} is not set: export it "
        f"({job.api_key_env}=sk-...) or name another with api_key_env / --api-key-env"
    )
