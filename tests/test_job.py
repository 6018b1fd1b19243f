"""The job model: loading TOML, validation, paths, flags, the API key and the fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchrun.errors import ConfigError
from batchrun.job import apply_flags, build_job, load_job, resolve_api_key

JOBS = Path(__file__).resolve().parent.parent / "jobs"
MINIMAL = 'input = "in.jsonl"\noutput = "out.parquet"\n'


def write_job(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def job_of(**extra: Any) -> Any:
    return build_job({"input": "/data/in.jsonl", "output": "/data/out.parquet", **extra})


# --- loading and validation ------------------------------------------------------------------


def test_minimal_job_loads_with_defaults(tmp_path: Path) -> None:
    """A job with only input and output gets the DeepSeek defaults."""
    job = load_job(write_job(tmp_path, MINIMAL))
    assert job.base_url == "https://api.deepseek.com"
    assert job.api_key_env == "DEEPSEEK_API_KEY"
    assert job.model == "deepseek-flash"
    assert job.limits.concurrency == 32


def test_two_jobs_share_no_default_object(tmp_path: Path) -> None:
    """Each job gets defaults of its own (the factories make new ones): one job's changed
    lists, dicts and sections leave another's as they were."""
    first, second = (load_job(write_job(tmp_path, MINIMAL)) for _ in range(2))
    for get in (
        lambda job: job.params,
        lambda job: job.params.extra_body,
        lambda job: job.prompt,
        lambda job: job.prompt.carry,
        lambda job: job.prompt.row_params,
        lambda job: job.limits,
        lambda job: job.ray,
    ):
        assert get(first) is not get(second)
    first.prompt.carry.append("topic")
    first.params.extra_body["seed"] = 1
    assert second.prompt.carry == [] and second.params.extra_body == {}


def test_ray_engine_keys_load(tmp_path: Path) -> None:
    """`engine` and the `[ray]` table set the engine, the cluster and the workers."""
    text = MINIMAL + 'engine = "ray"\n[ray]\naddress = "auto"\nworkers = 3\n'
    job = load_job(write_job(tmp_path, text))
    assert (job.engine, job.ray.address, job.ray.workers) == ("ray", "auto", 3)


def test_engine_flags_win_over_the_file() -> None:
    """--engine, --ray-address and --workers lay over the job file's values."""
    data = {"engine": "local", "ray": {"address": "auto", "workers": 2}}
    merged = apply_flags(data, {"engine": "ray", "ray_address": "h:6379", "workers": 5})
    assert merged["engine"] == "ray" and merged["ray"] == {"address": "h:6379", "workers": 5}


def test_load_job_accepts_a_string_path(tmp_path: Path) -> None:
    """load_job takes a str as well as a Path."""
    job = load_job(str(write_job(tmp_path, MINIMAL)))
    assert job.output == tmp_path / "out.parquet"


def test_job_records_its_source(tmp_path: Path) -> None:
    """The loaded job remembers the file it came from."""
    path = write_job(tmp_path, MINIMAL)
    assert load_job(path).source == path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param(MINIMAL + "modle = 'x'\n", "modle", id="top-level"),
        pytest.param(MINIMAL + "[limits]\nconcurency = 3\n", "limits.concurency", id="limits"),
        pytest.param(MINIMAL + "[params]\ntemprature = 1\n", "params.temprature", id="params"),
        pytest.param(MINIMAL + "[prompt]\nsytem = 'S'\n", "prompt.sytem", id="prompt"),
        pytest.param(MINIMAL + "[ray]\nadress = 'auto'\n", "ray.adress", id="ray"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    """An unknown key raises ConfigError naming the key (with its table) and the file."""
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    message = str(caught.value)
    assert f"unknown key {key!r}" in message
    assert str(path) in message
    assert caught.value.path == str(path)


@pytest.mark.parametrize("key", ["thinking", "reasoning_effort", "temperature"])
def test_a_request_parameter_at_the_top_level_points_to_params(tmp_path: Path, key: str) -> None:
    """`thinking = false` beside `model` (not under [params]) is refused saying where it goes."""
    path = write_job(tmp_path, f"{key} = 'x'\n" + MINIMAL)
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' \(.*put it under \[params\]\)"):
        load_job(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param(MINIMAL + "[limits]\nconcurrency = 'many'\n", "limits.concurrency", id="int"),
        pytest.param(MINIMAL + "stream = 'yes please'\n", "stream", id="bool"),
        pytest.param(MINIMAL + "[params]\ntemperature = 'hot'\n", "params.temperature", id="float"),
        pytest.param(MINIMAL + "[prompt]\ncarry = 'text'\n", "prompt.carry", id="list"),
        pytest.param(MINIMAL + "limits = 3\n", "limits", id="table"),
    ],
)
def test_wrong_type_names_key(tmp_path: Path, text: str, key: str) -> None:
    """A value of the wrong type raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_job(write_job(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param(MINIMAL + "[limits]\nconcurrency = 0\n", "limits.concurrency", id="below"),
        pytest.param(MINIMAL + "[params]\ntemperature = 3.0\n", "params.temperature", id="above"),
        pytest.param(MINIMAL + "transport = 'curl'\n", "transport", id="choice"),
        pytest.param(MINIMAL + "base_url = 'api.deepseek.com'\n", "base_url", id="no-scheme"),
    ],
)
def test_out_of_range_value_names_key(tmp_path: Path, text: str, key: str) -> None:
    """A value outside its allowed range or choices names the key."""
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_job(write_job(tmp_path, text))


def test_a_base_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    """A user name or password in base_url is refused, naming the key, without repeating it."""
    text = MINIMAL + "base_url = 'http://user:pa55word@127.0.0.1:8000/v1'\n"
    with pytest.raises(ConfigError, match="key 'base_url'.*user name or password") as caught:
        load_job(write_job(tmp_path, text))
    assert "pa55word" not in str(caught.value)


def test_missing_input_names_key(tmp_path: Path) -> None:
    """A job without input says the key is missing."""
    with pytest.raises(ConfigError, match="missing key 'input'"):
        load_job(write_job(tmp_path, 'output = "out.parquet"\n'))


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError naming the file."""
    path = write_job(tmp_path, "input = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_job(path)
    assert str(path) in str(caught.value)


def test_missing_job_file_names_file(tmp_path: Path) -> None:
    """A job file that does not exist raises ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read the job file") as caught:
        load_job(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("key", ["api_key", "key", "token"])
def test_literal_api_key_refused(tmp_path: Path, key: str) -> None:
    """A literal key in a job file is refused, naming the key and the file."""
    path = write_job(tmp_path, MINIMAL + f'{key} = "sk-0123456789abcdef"\n')
    with pytest.raises(ConfigError, match="literal API key") as caught:
        load_job(path)
    assert repr(key) in str(caught.value)
    assert str(path) in str(caught.value)


def test_literal_key_not_echoed_in_error(tmp_path: Path) -> None:
    """The refusal does not repeat the key itself."""
    path = write_job(tmp_path, MINIMAL + 'api_key = "sk-0123456789abcdef"\n')
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert "sk-0123456789abcdef" not in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("sk-abc123", id="deepseek-key"),
        pytest.param("MY KEY", id="space"),
        pytest.param("1KEY", id="leading-digit"),
        pytest.param("", id="empty"),
    ],
)
def test_api_key_env_must_be_a_variable_name(tmp_path: Path, value: str) -> None:
    """api_key_env that is not a variable name (a key, say) is refused."""
    path = write_job(tmp_path, MINIMAL + f'api_key_env = "{value}"\n')
    with pytest.raises(ConfigError, match="api_key_env.*NAME of an environment variable"):
        load_job(path)


def test_api_key_env_accepts_a_variable_name(tmp_path: Path) -> None:
    """A plain variable name is accepted."""
    job = load_job(write_job(tmp_path, MINIMAL + 'api_key_env = "DEEPSEEK_RESELLER_KEY"\n'))
    assert job.api_key_env == "DEEPSEEK_RESELLER_KEY"


# --- paths -----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_job_folder(tmp_path: Path) -> None:
    """Relative input and output resolve against the job file's folder, not the cwd."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    text = 'input = "../data/in.jsonl"\noutput = "results/out.parquet"\n'
    job = load_job(write_job(folder, text))
    assert job.input == tmp_path / "data" / "in.jsonl"
    assert job.output == folder / "results" / "out.parquet"


def test_relative_job_path_still_resolves_absolutely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job file named relative to the cwd still yields absolute input and output."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    write_job(folder, MINIMAL)
    monkeypatch.chdir(tmp_path)
    job = load_job(Path("jobs/job.toml"))
    assert job.input == folder / "in.jsonl"
    assert job.input.is_absolute()


def test_absolute_paths_kept(tmp_path: Path) -> None:
    """Absolute input and output are used as given."""
    inp, out = tmp_path / "a" / "in.jsonl", tmp_path / "b" / "out.parquet"
    job = load_job(write_job(tmp_path, f'input = "{inp}"\noutput = "{out}"\n'))
    assert (job.input, job.output) == (inp, out)


def test_build_job_without_source_keeps_relative_paths() -> None:
    """Without a job file there is no folder to resolve against."""
    job = build_job({"input": "in.jsonl", "output": "out.parquet"})
    assert job.input == Path("in.jsonl")


# --- flags -----------------------------------------------------------------------------------


def test_given_flag_wins_over_file() -> None:
    """A flag that was given replaces the file's value."""
    merged = apply_flags({"model": "deepseek-chat"}, {"model": "deepseek-reasoner"})
    assert merged["model"] == "deepseek-reasoner"


def test_none_flag_does_not_override() -> None:
    """A flag left at None keeps the file's value."""
    data = {"model": "deepseek-chat", "limits": {"concurrency": 8}}
    merged = apply_flags(data, {"model": None, "concurrency": None})
    assert merged == data


def test_false_flag_overrides() -> None:
    """A flag given as False (e.g. --no-stream) still wins; only None means not given."""
    assert apply_flags({"stream": True}, {"stream": False})["stream"] is False


@pytest.mark.parametrize(
    ("flag", "value", "table"),
    [
        pytest.param("concurrency", 4, "limits", id="concurrency"),
        pytest.param("max_attempts", 2, "limits", id="max_attempts"),
        pytest.param("timeout", 30.0, "limits", id="timeout"),
        pytest.param("max_tokens", 64, "params", id="max_tokens"),
        pytest.param("temperature", 0.0, "params", id="temperature"),
        pytest.param("template", "{q}", "prompt", id="template"),
        pytest.param("system", "S", "prompt", id="system"),
    ],
)
def test_nested_flags_land_in_their_table(flag: str, value: Any, table: str) -> None:
    """Flags for nested settings land in their table, keeping its other keys."""
    merged = apply_flags({table: {"other": 1}}, {flag: value})
    assert merged[table] == {"other": 1, flag: value}


def test_nested_flag_creates_missing_table() -> None:
    """A nested flag creates its table when the file has none."""
    assert apply_flags({}, {"concurrency": 4}) == {"limits": {"concurrency": 4}}


def test_apply_flags_does_not_mutate_job_data() -> None:
    """The job's data is left as it was."""
    data = {"model": "m", "limits": {"concurrency": 8}}
    apply_flags(data, {"model": "n", "concurrency": 2})
    assert data == {"model": "m", "limits": {"concurrency": 8}}


def test_flags_then_build_job() -> None:
    """Merged flags validate into the job."""
    data = {"input": "/in.jsonl", "output": "/out.parquet", "limits": {"concurrency": 8}}
    job = build_job(apply_flags(data, {"concurrency": 3, "temperature": 0.5}))
    assert job.limits.concurrency == 3
    assert job.params.temperature == 0.5


# --- API key ---------------------------------------------------------------------------------


def test_api_key_read_from_named_variable() -> None:
    """The key comes from the variable the job names."""
    job = job_of(api_key_env="MY_KEY")
    assert resolve_api_key(job, {"MY_KEY": "sk-xyz", "DEEPSEEK_API_KEY": "sk-other"}) == "sk-xyz"


def test_api_key_whitespace_stripped() -> None:
    """A key pasted with a trailing newline is stripped."""
    assert resolve_api_key(job_of(), {"DEEPSEEK_API_KEY": " sk-xyz\n"}) == "sk-xyz"


@pytest.mark.parametrize(
    "environ",
    [pytest.param({}, id="unset"), pytest.param({"MY_KEY": "  "}, id="blank")],
)
def test_missing_api_key_names_variable(environ: dict[str, str]) -> None:
    """An unset or blank key variable for a remote URL raises ConfigError naming it."""
    job = job_of(api_key_env="MY_KEY", base_url="https://api.deepseek.com")
    with pytest.raises(ConfigError, match="MY_KEY"):
        resolve_api_key(job, environ)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8000", id="ipv4"),
        pytest.param("http://127.1.2.3:8000/v1", id="ipv4-range"),
        pytest.param("http://localhost:8000", id="localhost"),
        pytest.param("http://[::1]:8000", id="ipv6"),
    ],
)
def test_loopback_url_needs_no_key(url: str) -> None:
    """A loopback base_url runs without a key."""
    assert resolve_api_key(job_of(base_url=url), {}) is None


def test_fake_table_needs_no_key() -> None:
    """A job with a [fake] table runs without a key, whatever its base_url."""
    job = job_of(base_url="https://api.deepseek.com", fake={})
    assert resolve_api_key(job, {}) is None


def test_fake_table_can_strip_usage(tmp_path: Path) -> None:
    """`[fake] usage = "omit"` runs the job against a fake that sends no usage: every row's
    cost is its worst case, marked as such."""
    import pyarrow.parquet as pq

    from batchrun.runner import run_job

    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    job = job_of(
        input=str(tmp_path / "in.jsonl"),
        output=str(tmp_path / "out.parquet"),
        fake={"usage": "omit"},
        params={"max_tokens": 50},
    )
    assert run_job(job).rows_ok == 2
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["cost_worst_case"] == [True, True]
    assert table["prompt_tokens"] == [None, None]


def test_loopback_url_still_uses_a_key_when_set() -> None:
    """A key that is set is returned even for a loopback URL."""
    job = job_of(base_url="http://127.0.0.1:9")
    assert resolve_api_key(job, {"DEEPSEEK_API_KEY": "sk-1"}) == "sk-1"


def test_hostname_starting_with_127_is_not_loopback() -> None:
    """A DNS name that merely begins with '127.' is remote and needs a key."""
    job = job_of(base_url="https://127.example.com/v1")
    with pytest.raises(ConfigError, match="DEEPSEEK_API_KEY"):
        resolve_api_key(job, {})


# --- fingerprint -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"model": "deepseek-reasoner"}, id="model"),
        pytest.param({"params": {"temperature": 0.3}}, id="param"),
        pytest.param({"params": {"extra_body": {"x": 1}}}, id="extra_body"),
        pytest.param({"stream": True}, id="stream"),
        pytest.param({"prompt": {"system": "S"}}, id="system"),
        pytest.param({"prompt": {"carry": ["text"]}}, id="carry"),
    ],
)
def test_fingerprint_changes_with_request_shape(change: dict[str, Any]) -> None:
    """Anything that shapes a request changes the fingerprint digest."""
    assert job_of(**change).fingerprint_digest() != job_of().fingerprint_digest()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"limits": {"concurrency": 2, "max_attempts": 3}}, id="limits"),
        pytest.param({"base_url": "http://127.0.0.1:9"}, id="base_url"),
        pytest.param({"api_key_env": "OTHER_KEY"}, id="api_key_env"),
        pytest.param({"transport": "httpx"}, id="transport"),
    ],
)
def test_fingerprint_ignores_how_requests_are_sent(change: dict[str, Any]) -> None:
    """Limits, endpoint and transport leave the fingerprint digest unchanged."""
    assert job_of(**change).fingerprint_digest() == job_of().fingerprint_digest()


def test_fingerprint_digest_is_stable() -> None:
    """The same job gives the same short digest."""
    digest = job_of(params={"temperature": 0.1, "max_tokens": 9}).fingerprint_digest()
    assert digest == job_of(params={"max_tokens": 9, "temperature": 0.1}).fingerprint_digest()
    assert len(digest) == 16


# --- shipped job files -----------------------------------------------------------------------

SHIPPED = sorted(JOBS.glob("*.toml"))


def test_jobs_folder_has_job_files() -> None:
    """The repository ships example jobs."""
    assert SHIPPED


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in SHIPPED])
def test_shipped_job_loads(path: Path) -> None:
    """Every shipped job file is valid."""
    load_job(path)


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in SHIPPED])
def test_shipped_job_input_exists(path: Path) -> None:
    """Every shipped job's input file is in the repository."""
    assert load_job(path).input.is_file()


def test_row_params_must_name_request_parameters() -> None:
    """row_params names request parameters (or model), nothing else."""
    with pytest.raises(ConfigError, match="'colour' is not a request parameter"):
        build_job(
            {"input": "in.jsonl", "output": "o.parquet", "prompt": {"row_params": ["colour"]}}
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(False, False, id="false"),
        pytest.param("", False, id="empty-flag"),
        pytest.param("doc", "doc", id="name"),
        pytest.param(None, None, id="unset"),
    ],
)
def test_id_column_setting(value: Any, expected: Any) -> None:
    """id_column is a name, unset (chosen from the columns), or false/'' for positions."""
    data = {"input": "in.jsonl", "output": "o.parquet", "prompt": {"id_column": value}}
    assert build_job(data).prompt.id_column == expected
