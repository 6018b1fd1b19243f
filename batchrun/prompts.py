"""Turn one input row into one request body. Pure: no I/O, so it is tested exhaustively.

A row holds `messages` (a list of {role, content}), a `prompt` string, or the columns a
template names; or it is an OpenAI Batch API line whose `body` is the request, as written.
A column that merely shares a request parameter's name (`model`, `temperature`, ...) never
changes the request: a row sets a parameter only when the job names it in `row_params`, and a
system prompt only from the `system_column` the job names.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from typing import Any

from batchrun.job import BadRequestField, Job, body_values, check_request_fields

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
#: the endpoints an OpenAI batch line may name: batchrun sends chat completions only
CHAT_URLS = frozenset({"/v1/chat/completions", "/chat/completions"})


class RowProblem(ValueError):
    """Raised when a row cannot become a request; the caller adds file and line."""

    def __init__(self, message: str, *, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


def is_batch_line(row: dict[str, Any]) -> bool:
    """Whether a row is an OpenAI Batch API input line."""
    return "custom_id" in row and isinstance(row.get("body"), dict)


def looks_like_batch_line(row: dict[str, Any]) -> bool:
    """Whether a row has the shape of an OpenAI Batch API line, custom_id or not."""
    return isinstance(row.get("body"), dict) and ("url" in row or "method" in row)


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What every request of a job shares, computed once from the job."""

    model: str
    params: dict[str, Any]
    stream: bool
    prompt_column: str
    messages_column: str
    system_column: str | None
    system: str | None
    template: str | None
    template_fields: tuple[str, ...]
    #: keys a sweep variant sets: they win over a row's own columns of the same name
    swept: frozenset[str] = frozenset()
    #: request parameters taken from the row's column of the same name (`row_params`),
    #: less those a sweep variant sets
    row_params: tuple[str, ...] = ()

    @classmethod
    def from_job(cls, job: Job, settings: dict[str, Any] | None = None) -> RequestShape:
        """The shape of a job's requests, with one sweep variant's `settings` laid over it."""
        settings = settings or {}
        template = settings.get("template", job.prompt.template)
        fields: tuple[str, ...] = ()
        if template is not None:
            fields = template_fields(template)
        params = job.params.to_body()
        params.update(
            body_values(
                {k: v for k, v in settings.items() if k not in ("model", "template", "system")}
            )
        )
        return cls(
            model=settings.get("model", job.model),
            params=params,
            stream=job.stream,
            prompt_column=job.prompt.prompt_column,
            messages_column=job.prompt.messages_column,
            system_column=job.prompt.system_column,
            system=settings.get("system", job.prompt.system),
            template=template,
            template_fields=fields,
            swept=frozenset(settings),
            row_params=tuple(name for name in job.prompt.row_params if name not in settings),
        )


@dataclass(frozen=True, slots=True)
class Variant:
    """One combination of a sweep: the settings it lays over the job, and its repeat."""

    number: int
    settings: dict[str, Any]
    repeat: int
    repeats: int

    @property
    def name(self) -> str:
        return f"v{self.number}"

    def columns(self) -> dict[str, Any]:
        """The output columns that say which combination a row belongs to."""
        values: dict[str, Any] = {"variant": self.name}
        values.update({f"sweep_{key}": value for key, value in self.settings.items()})
        if self.repeats > 1:
            values["sweep_repeat"] = self.repeat
        return values


def expand_sweep(sweep: dict[str, Any] | None) -> list[Variant]:
    """Every combination of a [sweep] table, in a stable order (v1, v2, ...)."""
    if not sweep:
        return [Variant(1, {}, 1, 1)]
    keys = [key for key in sweep if key != "repeat"]
    repeats = int(sweep.get("repeat", 1))
    combos = list(itertools.product(*(sweep[key] for key in keys)))
    variants: list[Variant] = []
    for values in combos:
        for repeat in range(1, repeats + 1):
            settings = dict(zip(keys, values, strict=True))
            variants.append(Variant(len(variants) + 1, settings, repeat, repeats))
    return variants


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a `str.format` template refers to."""
    names = []
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            name = field.split(".", 1)[0].split("[", 1)[0]
            if not name or name.isdigit():
                raise ValueError("templates refer to columns by name, e.g. {text}")
            names.append(name)
    except ValueError as exc:
        raise RowProblem(f"bad template {template!r}: {exc}") from None
    return tuple(dict.fromkeys(names))


def _columns(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in row) or "(none)"


def _check_messages(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowProblem("must be a non-empty list of {role, content} objects", column=column)
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowProblem(f"message {i} is not an object", column=column)
        role = message.get("role")
        if role not in ROLES:
            raise RowProblem(f"message {i} has role {role!r}", column=column)
        content = message.get("content")
        if not isinstance(content, str | list) and not (content is None and role == "assistant"):
            raise RowProblem(f"message {i} has no string content", column=column)
    return value


def _messages(row: dict[str, Any], shape: RequestShape) -> list[dict[str, Any]]:
    if shape.template is not None:
        for name in shape.template_fields:
            if row.get(name) is None:
                if name in row:
                    raise RowProblem(f"column {name!r} is null", column=name)
                raise RowProblem(
                    f"the template needs column {name!r}; this row has {_columns(row)}",
                    column=name,
                )
        try:
            text = shape.template.format_map(row)
        except (ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
            raise RowProblem(
                f"the template cannot format this row ({type(exc).__name__}: {exc})",
                column=shape.template_fields[0] if shape.template_fields else None,
            ) from None
        messages = [{"role": "user", "content": text}]
    elif (value := row.get(shape.messages_column)) is not None:
        messages = list(_check_messages(value, shape.messages_column))
    elif (value := row.get(shape.prompt_column)) is not None:
        if not isinstance(value, str):
            raise RowProblem("must be a string", column=shape.prompt_column)
        messages = [{"role": "user", "content": value}]
    else:
        raise RowProblem(
            f"the row has neither {shape.messages_column!r} nor {shape.prompt_column!r} "
            f"(columns: {_columns(row)})",
            column=shape.prompt_column,
        )
    system = shape.system
    if shape.system_column is not None and "system" not in shape.swept:
        value = row.get(shape.system_column)
        if value is not None and not isinstance(value, str):
            raise RowProblem("must be a string", column=shape.system_column)
        system = value if value is not None else system
    if system is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _batch_body(row: dict[str, Any], shape: RequestShape) -> dict[str, Any]:
    """The body of an OpenAI batch line, checked as a server would check it."""
    method, url = row.get("method", "POST"), row.get("url", "/v1/chat/completions")
    if method != "POST":
        raise RowProblem(f"method {method!r} for {url!r}: only POST is sent", column="method")
    if url not in CHAT_URLS:
        raise RowProblem(
            f"url {url!r} is not chat completions (/v1/chat/completions): batchrun sends "
            "chat completions only",
            column="url",
        )
    body = dict(row["body"])
    try:
        check_request_fields(body)
    except BadRequestField as exc:
        raise RowProblem(exc.message, column=f"body.{exc.name}") from None
    body.setdefault("model", shape.model)
    if "messages" not in body:
        raise RowProblem("the batch line's body has no 'messages'", column="body")
    _check_messages(body["messages"], "body.messages")
    return body


def build_request(row: dict[str, Any], shape: RequestShape) -> dict[str, Any]:
    """The request body for one row.

    Raises:
        RowProblem: the row lacks what the job needs; names the column.
    """
    if is_batch_line(row):
        body = _batch_body(row, shape)
    else:
        try:
            messages = _messages(row, shape)
        except RowProblem:
            if looks_like_batch_line(row):  # say what is wrong, not that it has no prompt
                raise RowProblem(
                    "this is an OpenAI batch line without custom_id", column="custom_id"
                ) from None
            raise
        body = {"model": shape.model, "messages": messages, **shape.params}
        if shape.row_params:
            own = {n: row[n] for n in shape.row_params if row.get(n) is not None}
            try:
                body.update(body_values(check_request_fields(own)))
            except BadRequestField as exc:
                raise RowProblem(exc.message, column=exc.name) from None
    if shape.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body
