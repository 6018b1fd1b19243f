"""Structured answers: pull the declared JSON fields out of an answer. Pure.

A labelling job declares fields and their types (`[parse] fields = {label = "str"}`); each
becomes an output column. An answer that is not a JSON object, or lacks a field, or holds one
of the wrong type, does not parse: the row is re-asked or recorded as an error of class
`parse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import pyarrow as pa


class ParseFailed(ValueError):
    """Raised when an answer does not hold the declared fields."""


def arrow_type(kind: str) -> pa.DataType:
    import pyarrow as pa

    return {
        "str": pa.string(),
        "float": pa.float64(),
        "int": pa.int64(),
        "bool": pa.bool_(),
    }.get(kind, pa.large_string())  # lists and objects travel as JSON text


def _strip_fence(text: str) -> str:
    """Models sometimes wrap JSON in a ```json fence even when asked not to."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
    return body


def _convert(name: str, value: Any, kind: str) -> Any:
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "int" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "list" and isinstance(value, list):
        return orjson.dumps(value).decode()
    if kind == "dict" and isinstance(value, dict):
        return orjson.dumps(value).decode()
    raise ParseFailed(f"field {name!r} should be {kind}, got {type(value).__name__}")


def parse_fields(content: str | None, fields: Mapping[str, str]) -> dict[str, Any]:
    """The declared fields of an answer, converted to their types.

    Raises:
        ParseFailed: the answer is not a JSON object with every field of the right type.
    """
    if not content:
        raise ParseFailed("the answer is empty")
    try:
        data = orjson.loads(_strip_fence(content))
    except orjson.JSONDecodeError:
        raise ParseFailed("the answer is not valid JSON") from None
    if not isinstance(data, dict):
        raise ParseFailed("the answer is not a JSON object")
    missing = [name for name in fields if name not in data]
    if missing:
        raise ParseFailed(f"the answer lacks field {missing[0]!r}")
    return {name: _convert(name, data[name], kind) for name, kind in fields.items()}
