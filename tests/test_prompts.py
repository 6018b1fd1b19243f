"""Rows become request bodies: prompt, messages, template, system, overrides, batch lines."""

from __future__ import annotations

from typing import Any

import pytest

from batchrun.job import build_job
from batchrun.prompts import (
    RequestShape,
    RowProblem,
    build_request,
    is_batch_line,
    template_fields,
)


def shape(**extra: Any) -> RequestShape:
    """The request shape of a job built from `extra` over a minimal job."""
    data: dict[str, Any] = {"input": "in.jsonl", "output": "out.parquet", **extra}
    return RequestShape.from_job(build_job(data))


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


# --- prompt and messages ---------------------------------------------------------------------


def test_prompt_column_becomes_one_user_message() -> None:
    """A `prompt` string becomes a single user message."""
    body = build_request({"prompt": "hi"}, shape())
    assert body["messages"] == [user("hi")]


def test_body_uses_job_model() -> None:
    """The body names the job's model."""
    body = build_request({"prompt": "hi"}, shape(model="deepseek-reasoner"))
    assert body["model"] == "deepseek-reasoner"


def test_prompt_column_name_comes_from_job() -> None:
    """A job may name another prompt column."""
    body = build_request({"question": "why?"}, shape(prompt={"prompt_column": "question"}))
    assert body["messages"] == [user("why?")]


def test_prompt_that_is_not_a_string_is_a_row_problem() -> None:
    """A non-string prompt is refused, naming the prompt column."""
    with pytest.raises(RowProblem) as caught:
        build_request({"prompt": 42}, shape())
    assert caught.value.column == "prompt"


def test_messages_column_passed_through() -> None:
    """A valid messages list is sent as given."""
    messages = [user("a"), {"role": "assistant", "content": "b"}, user("c")]
    body = build_request({"messages": messages}, shape())
    assert body["messages"] == messages


def test_messages_column_wins_over_prompt() -> None:
    """When a row has both, the messages column is used."""
    body = build_request({"messages": [user("m")], "prompt": "p"}, shape())
    assert body["messages"] == [user("m")]


def test_assistant_message_may_have_null_content() -> None:
    """An assistant turn with null content (a tool call) is accepted."""
    messages = [user("a"), {"role": "assistant", "content": None}, user("b")]
    body = build_request({"messages": messages}, shape())
    assert body["messages"] == messages


def test_system_is_not_added_to_the_row_itself() -> None:
    """Adding a system message leaves the row's own list untouched."""
    messages = [user("a")]
    build_request({"messages": messages}, shape(prompt={"system": "S"}))
    assert messages == [user("a")]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("hello", id="string"),
        pytest.param({"role": "user", "content": "x"}, id="object"),
        pytest.param([], id="empty-list"),
        pytest.param(["hello"], id="list-of-strings"),
        pytest.param([{"role": "robot", "content": "x"}], id="bad-role"),
        pytest.param([{"content": "x"}], id="no-role"),
        pytest.param([{"role": "user"}], id="no-content"),
        pytest.param([{"role": "user", "content": 5}], id="number-content"),
    ],
)
def test_bad_messages_are_a_row_problem_naming_the_column(value: Any) -> None:
    """Invalid messages raise RowProblem naming the messages column."""
    with pytest.raises(RowProblem) as caught:
        build_request({"messages": value}, shape())
    assert caught.value.column == "messages"


def test_bad_messages_name_the_jobs_messages_column() -> None:
    """The RowProblem names the column the job configured, not a default."""
    with pytest.raises(RowProblem) as caught:
        build_request({"chat": []}, shape(prompt={"messages_column": "chat"}))
    assert caught.value.column == "chat"


def test_bad_role_message_says_which_message() -> None:
    """The problem says which message has the bad role and what it was."""
    with pytest.raises(RowProblem, match=r"message 1 has role 'robot'"):
        build_request({"messages": [user("a"), {"role": "robot", "content": "b"}]}, shape())


def test_row_without_prompt_or_messages_is_a_row_problem() -> None:
    """A row with neither column names both and lists the row's columns."""
    with pytest.raises(RowProblem) as caught:
        build_request({"text": "x", "lang": "en"}, shape())
    message = str(caught.value)
    assert "'messages'" in message
    assert "'prompt'" in message
    assert "'text', 'lang'" in message
    assert caught.value.column == "prompt"


def test_null_prompt_counts_as_missing() -> None:
    """A null prompt is treated as absent."""
    with pytest.raises(RowProblem, match="neither"):
        build_request({"prompt": None}, shape())


# --- system ----------------------------------------------------------------------------------


def test_job_system_prepended() -> None:
    """The job's system prompt comes first."""
    body = build_request({"prompt": "hi"}, shape(prompt={"system": "Be brief."}))
    assert body["messages"] == [system("Be brief."), user("hi")]


def test_system_column_used() -> None:
    """A row's system column, once named by the job, becomes the system message."""
    body = build_request(
        {"prompt": "hi", "system": "Row S"}, shape(prompt={"system_column": "system"})
    )
    assert body["messages"] == [system("Row S"), user("hi")]


def test_system_column_wins_over_job_system() -> None:
    """A row's system column wins over the job's system prompt."""
    job = shape(prompt={"system": "Job S", "system_column": "system"})
    body = build_request({"prompt": "hi", "system": "Row S"}, job)
    assert body["messages"] == [system("Row S"), user("hi")]


def test_column_named_system_is_not_a_system_prompt_by_default() -> None:
    """A column that is merely named `system` leaves the messages alone."""
    body = build_request({"prompt": "hi", "system": "Linux"}, shape())
    assert body["messages"] == [user("hi")]


def test_sweep_system_wins_over_system_column() -> None:
    """A swept system prompt wins over the row's system column."""
    job = build_job(
        {
            "input": "in.jsonl",
            "output": "out.parquet",
            "prompt": {"system_column": "system"},
            "sweep": {"system": ["Swept"]},
        }
    )
    swept = RequestShape.from_job(job, {"system": "Swept"})
    body = build_request({"prompt": "hi", "system": "Row S"}, swept)
    assert body["messages"] == [system("Swept"), user("hi")]


def test_null_system_column_falls_back_to_job_system() -> None:
    """A null system column leaves the job's system prompt in place."""
    job = shape(prompt={"system": "Job S", "system_column": "system"})
    body = build_request({"prompt": "hi", "system": None}, job)
    assert body["messages"] == [system("Job S"), user("hi")]


def test_system_not_added_twice_when_messages_start_with_system() -> None:
    """Messages that already open with a system message get no second one."""
    messages = [system("Own"), user("hi")]
    body = build_request({"messages": messages}, shape(prompt={"system": "Job S"}))
    assert body["messages"] == messages


def test_system_added_before_messages_without_one() -> None:
    """Messages without a system message get the job's system first."""
    body = build_request({"messages": [user("hi")]}, shape(prompt={"system": "Job S"}))
    assert body["messages"] == [system("Job S"), user("hi")]


def test_system_column_that_is_not_a_string_is_a_row_problem() -> None:
    """A non-string system column is refused, naming the column."""
    with pytest.raises(RowProblem) as caught:
        build_request({"prompt": "hi", "system": ["x"]}, shape(prompt={"system_column": "system"}))
    assert caught.value.column == "system"


# --- templates -------------------------------------------------------------------------------


def test_template_fills_columns() -> None:
    """A template is filled from the row's columns."""
    job_shape = shape(prompt={"template": "Translate {text} into {lang}."})
    body = build_request({"text": "hello", "lang": "French"}, job_shape)
    assert body["messages"] == [user("Translate hello into French.")]


def test_template_wins_over_prompt_column() -> None:
    """With a template, the prompt column is not used."""
    body = build_request({"prompt": "p", "text": "t"}, shape(prompt={"template": "T: {text}"}))
    assert body["messages"] == [user("T: t")]


def test_template_with_system() -> None:
    """A templated prompt still gets the job's system message."""
    job_shape = shape(prompt={"template": "{q}", "system": "S"})
    assert build_request({"q": "x"}, job_shape)["messages"] == [system("S"), user("x")]


def test_template_column_missing_is_a_row_problem() -> None:
    """A missing template column names the column and lists the row's columns."""
    with pytest.raises(RowProblem) as caught:
        build_request({"text": "x", "id": 1}, shape(prompt={"template": "{text} in {lang}"}))
    assert caught.value.column == "lang"
    assert "'lang'" in str(caught.value)
    assert "'text', 'id'" in str(caught.value)


def test_template_column_null_is_a_row_problem() -> None:
    """A null template column counts as missing."""
    with pytest.raises(RowProblem) as caught:
        build_request({"text": None}, shape(prompt={"template": "{text}"}))
    assert caught.value.column == "text"


@pytest.mark.parametrize(
    ("template", "fields"),
    [
        pytest.param("plain text", (), id="no-fields"),
        pytest.param("{a} and {b}", ("a", "b"), id="two"),
        pytest.param("{a} {a} {b}", ("a", "b"), id="repeated-once"),
        pytest.param("{a.x} {b[0]}", ("a", "b"), id="attribute-and-index"),
        pytest.param("{a:>10}", ("a",), id="format-spec"),
        pytest.param("{{literal}} {a}", ("a",), id="escaped-braces"),
    ],
)
def test_template_fields(template: str, fields: tuple[str, ...]) -> None:
    """template_fields lists the column names a template uses, once each, in order."""
    assert template_fields(template) == fields


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{}", id="positional"),
        pytest.param("{0}", id="numbered"),
        pytest.param("{a", id="unclosed"),
    ],
)
def test_bad_template_is_a_row_problem(template: str) -> None:
    """A template without named fields, or malformed, is refused."""
    with pytest.raises(RowProblem, match="bad template"):
        template_fields(template)


# --- parameters and overrides ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({"temperature": 0.2}, {"temperature": 0.2}, id="temperature"),
        pytest.param({"max_tokens": 64}, {"max_tokens": 64}, id="max_tokens"),
        pytest.param(
            {"response_format": {"type": "json_object"}},
            {"response_format": {"type": "json_object"}},
            id="response_format",
        ),
        pytest.param(
            {"extra_body": {"thinking": {"type": "enabled"}}},
            {"thinking": {"type": "enabled"}},
            id="extra_body-flattened",
        ),
    ],
)
def test_job_params_in_body(params: dict[str, Any], expected: dict[str, Any]) -> None:
    """Job params appear as body fields."""
    body = build_request({"prompt": "hi"}, shape(params=params))
    assert {k: body[k] for k in expected} == expected


def test_unset_params_left_out() -> None:
    """A job without params sends only model and messages."""
    assert set(build_request({"prompt": "hi"}, shape())) == {"model", "messages"}


def test_extra_body_key_not_sent_as_is() -> None:
    """`extra_body` itself never appears in the request body."""
    body = build_request({"prompt": "hi"}, shape(params={"extra_body": {"x": 1}}))
    assert "extra_body" not in body


@pytest.mark.parametrize(
    ("column", "job", "row_value"),
    [
        pytest.param("model", {"model": "deepseek-chat"}, "deepseek-reasoner", id="model"),
        pytest.param("temperature", {"params": {"temperature": 1.0}}, 0.0, id="temperature"),
        pytest.param("max_tokens", {"params": {"max_tokens": 100}}, 5, id="max_tokens"),
    ],
)
def test_row_param_wins(column: str, job: dict[str, Any], row_value: Any) -> None:
    """A column the job names in row_params wins over the job's value."""
    job = {**job, "prompt": {"row_params": [column]}}
    body = build_request({"prompt": "hi", column: row_value}, shape(**job))
    assert body[column] == row_value


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("model", "Corolla", id="model"),
        pytest.param("temperature", "hot", id="temperature"),
        pytest.param("max_tokens", -3, id="max_tokens"),
        pytest.param("stop", ["Linux"], id="stop"),
    ],
)
def test_column_named_like_a_param_is_not_sent(column: str, value: Any) -> None:
    """A column merely named like a request parameter never changes the request."""
    body = build_request({"prompt": "hi", column: value}, shape(params={"max_tokens": 9}))
    assert body == {"model": "deepseek-flash", "messages": [user("hi")], "max_tokens": 9}


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("temperature", "hot", id="temperature-text"),
        pytest.param("temperature", 7.0, id="temperature-too-high"),
        pytest.param("max_tokens", -1, id="max_tokens-negative"),
        pytest.param("max_tokens", "5", id="max_tokens-text"),
        pytest.param("model", 3, id="model-number"),
        pytest.param("stop", 1, id="stop-number"),
    ],
)
def test_bad_row_param_is_a_row_problem(column: str, value: Any) -> None:
    """A row_params value a server would refuse is a row problem naming the column."""
    with pytest.raises(RowProblem) as caught:
        build_request({"prompt": "hi", column: value}, shape(prompt={"row_params": [column]}))
    assert caught.value.column == column


def test_sweep_wins_over_row_param() -> None:
    """A swept parameter wins over the row's row_params value."""
    job = build_job(
        {
            "input": "in.jsonl",
            "output": "out.parquet",
            "prompt": {"row_params": ["temperature"]},
            "sweep": {"temperature": [0.2]},
        }
    )
    body = build_request(
        {"prompt": "hi", "temperature": 1.9}, RequestShape.from_job(job, {"temperature": 0.2})
    )
    assert body["temperature"] == 0.2


@pytest.mark.parametrize(
    ("column", "job", "job_value"),
    [
        pytest.param("model", {"model": "deepseek-reasoner"}, "deepseek-reasoner", id="model"),
        pytest.param("temperature", {"params": {"temperature": 0.5}}, 0.5, id="temperature"),
        pytest.param("max_tokens", {"params": {"max_tokens": 100}}, 100, id="max_tokens"),
    ],
)
def test_row_override_none_keeps_job_value(
    column: str, job: dict[str, Any], job_value: Any
) -> None:
    """A null row_params column does not override the job's value."""
    job = {**job, "prompt": {"row_params": [column]}}
    body = build_request({"prompt": "hi", column: None}, shape(**job))
    assert body[column] == job_value


def test_unrelated_columns_not_in_body() -> None:
    """Columns that are not request parameters stay out of the body."""
    body = build_request({"prompt": "hi", "id": 7, "label": "x"}, shape())
    assert "id" not in body
    assert "label" not in body


# --- batch lines -----------------------------------------------------------------------------


def batch_line(**body: Any) -> dict[str, Any]:
    return {
        "custom_id": "r-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [user("hi")], **body},
    }


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        pytest.param(batch_line(), True, id="batch-line"),
        pytest.param({"custom_id": "x", "body": "text"}, False, id="body-not-object"),
        pytest.param({"body": {"messages": []}}, False, id="no-custom-id"),
        pytest.param({"prompt": "hi"}, False, id="plain-row"),
    ],
)
def test_is_batch_line(row: dict[str, Any], expected: bool) -> None:
    """A batch line has a custom_id and an object body."""
    assert is_batch_line(row) is expected


def test_batch_line_body_used_as_is() -> None:
    """A batch line's body is the request; job params and system are not added."""
    row = batch_line(model="deepseek-chat", max_tokens=200)
    job_shape = shape(
        model="deepseek-reasoner", params={"temperature": 0.1}, prompt={"system": "S"}
    )
    assert build_request(row, job_shape) == row["body"]


def test_batch_line_gets_job_model_when_body_has_none() -> None:
    """The job's model fills in a body without one."""
    body = build_request(batch_line(), shape(model="deepseek-reasoner"))
    assert body["model"] == "deepseek-reasoner"


def test_batch_line_row_not_mutated() -> None:
    """Filling in the model leaves the input row's body untouched."""
    row = batch_line()
    build_request(row, shape())
    assert "model" not in row["body"]


def test_batch_line_without_messages_is_a_row_problem() -> None:
    """A body without messages names the body column."""
    row = {"custom_id": "r-1", "body": {"model": "deepseek-chat"}}
    with pytest.raises(RowProblem) as caught:
        build_request(row, shape())
    assert caught.value.column == "body"


def test_batch_line_bad_messages_is_a_row_problem() -> None:
    """Invalid body messages name body.messages."""
    row = {"custom_id": "r-1", "body": {"messages": [{"role": "bot", "content": "x"}]}}
    with pytest.raises(RowProblem) as caught:
        build_request(row, shape())
    assert caught.value.column == "body.messages"


def test_batch_line_stream_flag_dropped_when_job_does_not_stream() -> None:
    """The job decides streaming: a body's own stream fields are removed."""
    row = batch_line(stream=True, stream_options={"include_usage": True})
    body = build_request(row, shape(stream=False))
    assert "stream" not in body
    assert "stream_options" not in body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("url", "/bad_url", id="bad-url"),
        pytest.param("url", "/v1/embeddings", id="embeddings"),
        pytest.param("method", "GET", id="get"),
    ],
)
def test_batch_line_for_another_endpoint_is_a_row_problem(field: str, value: str) -> None:
    """A batch line for any endpoint but chat completions, or not a POST, is refused."""
    with pytest.raises(RowProblem) as caught:
        build_request({**batch_line(), field: value}, shape())
    assert caught.value.column == field
    assert "/v1/embeddings" in str(caught.value) or value in str(caught.value)


def test_batch_line_for_chat_completions_without_v1_is_accepted() -> None:
    """`/chat/completions` names the same endpoint as `/v1/chat/completions`."""
    assert build_request({**batch_line(), "url": "/chat/completions"}, shape())["messages"]


def test_batch_line_without_custom_id_says_so() -> None:
    """A line shaped like a batch line but without custom_id says that, not 'no prompt'."""
    row = batch_line()
    del row["custom_id"]
    with pytest.raises(RowProblem, match="OpenAI batch line without custom_id"):
        build_request(row, shape())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("stream", "True", id="stream-text"),
        pytest.param("temperature", "x", id="temperature-text"),
        pytest.param("max_tokens", "5", id="max_tokens-text"),
        pytest.param("model", 5, id="model-number"),
    ],
)
def test_batch_line_body_field_of_wrong_type_is_a_row_problem(field: str, value: Any) -> None:
    """A body field of the wrong type is refused, naming it."""
    with pytest.raises(RowProblem) as caught:
        build_request(batch_line(**{field: value}), shape())
    assert caught.value.column == f"body.{field}"


# --- streaming -------------------------------------------------------------------------------


def test_stream_adds_stream_and_usage_option() -> None:
    """A streaming job asks for a stream with usage on the last chunk."""
    body = build_request({"prompt": "hi"}, shape(stream=True))
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_stream_applies_to_batch_lines() -> None:
    """A streaming job streams batch lines too."""
    body = build_request(batch_line(), shape(stream=True))
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_no_stream_fields_without_streaming() -> None:
    """A non-streaming job sends no stream fields."""
    body = build_request({"prompt": "hi"}, shape())
    assert "stream" not in body
    assert "stream_options" not in body


def test_shape_from_job_carries_template_fields() -> None:
    """RequestShape.from_job computes the template's fields once."""
    job_shape = shape(prompt={"template": "{a} {b}"})
    assert job_shape.template_fields == ("a", "b")


def test_plain_row_with_url_and_body_columns_is_not_a_batch_line() -> None:
    """A row that has a prompt is a plain row, whatever other columns it holds."""
    row = {"prompt": "hi", "url": "https://example.com", "body": {"html": "x"}}
    assert build_request(row, shape())["messages"] == [user("hi")]
