"""``RouterConfig``: its sources, their precedence, the checks, and its sync with the CLI.

Run as a script (``PYTHONPATH=. python tests/test_config.py``) it rewrites the option
table of docs/configuration.md from the fields' metadata; a test below fails when the
table is out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import certifi
import pytest

from cache_router.config import OPTIONS, ConfigError, Option, RouterConfig
from cache_router.ops.load_source import LOAD_FORMATS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
URL = "http://127.0.0.1:8001"

#: ``serve`` arguments that are not options of the router: help, and the config file.
NOT_OPTIONS = {"help", "config", "refused"}  # refused: the SGLang flags serve refuses

#: A value other than the default for each string option, as it is typed on a command line.
SAMPLES: dict[str, list[str]] = {
    "worker_urls": ["http://127.0.0.1:9/", "http://127.0.0.1:10"],
    "host": ["0.0.0.0"],
    "transparent_prefixes": ["/inference", "/raw"],
    "api_key": ["engine-key"],
    "router_api_key": ["client-key"],
    "worker_allow": ["10.0.0.0/8", "engine-*.internal"],
    "health_check_endpoint": ["/ready"],
    "admin_prefix": ["/router"],
    "admin_api_key": ["admin-key"],
    "redis_url": ["redis://127.0.0.1:6379/0"],
    "fleet_name": ["blue"],
    "selector": ["app=sglang", "tier=gpu"],
    "prefill_selector": ["role=prefill"],
    "decode_selector": ["role=decode"],
    "service_discovery_namespace": ["inference"],
    "bootstrap_port_annotation": ["example.com/bootstrap-port"],
    "discover_dns": ["engines.svc:8000"],
    "discover_dns_nameserver": ["127.0.0.1:8600"],
    "log_dir": ["/var/log/router"],
    "request_id_headers": ["x-my-id", "x-trace-id"],
    "forward_headers": ["x-tenant", "authorization"],
    "drop_headers": ["x-debug"],
    "cors_allowed_origins": ["http://localhost:3000"],
    "prometheus_host": ["0.0.0.0"],
    "otlp_endpoint": ["http://127.0.0.1:4318"],
    "session_key_header": ["x-conversation"],
    "ca_cert_paths": [certifi.where()],
    "tokenizer_path": ["llama=/models/llama", "/models/qwen/tokenizer.json"],
    "model_path": ["/models/qwen"],
    "prefill_urls": ["http://127.0.0.1:11", "9001"],
    "decode_urls": ["http://127.0.0.1:12", "http://127.0.0.1:13"],
    "kv_events": ["http://127.0.0.1:14=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558"],
    "kv_events_topic": ["kv"],
}
#: Options that only go with a disaggregated fleet (no worker_urls): given on top of
#: ``--pd-disaggregation`` instead.
PD_OPTIONS = {"prefill_urls", "decode_urls", "prefill_policy", "decode_policy"}
#: Options that only go with ``--policy precise_cache_aware``.
KV_OPTIONS = {"kv_events", "kv_events_port", "kv_events_replay_port", "kv_block_size"}
#: What a flag's text becomes, where that is not the text itself.
PARSED = {"prefill_urls": ("http://127.0.0.1:11 9001",)}
#: Options whose value must be a file that pairs with another's: tests/test_tls.py gives
#: them their flags (through the real CLI), with a throwaway CA's files.
PAIRED_FILES = {"client_cert_path", "client_key_path"}
#: Options that are refused alone (tested with what they need in test_discovery_*.py).
NEEDS_ANOTHER = {"service_discovery"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> tuple[str, ...]:
    return excinfo.value.problems


# -- sources and precedence -----------------------------------------------------------------


def test_defaults_apply_when_no_source_sets_a_field() -> None:
    config = RouterConfig.load(cli={"worker_urls": [URL]}, env={})
    assert config == RouterConfig(worker_urls=(URL,))
    for name, option in OPTIONS.items():
        if name != "worker_urls":
            assert getattr(config, name) == option.default, name


def test_each_source_alone(tmp_path: Path) -> None:
    file = write(tmp_path / "router.toml", f'worker_urls = ["{URL}"]\nqueue_size = 7\n')
    assert RouterConfig.load(env={}, file=file).queue_size == 7
    env = {"CACHE_ROUTER_WORKER_URLS": URL, "CACHE_ROUTER_QUEUE_SIZE": "8"}
    assert RouterConfig.load(env=env).queue_size == 8
    assert RouterConfig.load(cli={"worker_urls": [URL], "queue_size": 9}, env={}).queue_size == 9


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"cli", "env", "file"}, 3333),
        ({"env", "file"}, 2222),
        ({"cli", "file"}, 3333),
        ({"cli", "env"}, 3333),
        ({"file"}, 1111),
        (set(), 30000),
    ],
)
def test_precedence_cli_over_env_over_file_over_default(
    tmp_path: Path, sources: set[str], expected: int
) -> None:
    file = write(tmp_path / "router.toml", "port = 1111\n")
    config = RouterConfig.load(
        cli={"worker_urls": [URL], **({"port": 3333} if "cli" in sources else {})},
        env={"CACHE_ROUTER_PORT": "2222"} if "env" in sources else {},
        file=file if "file" in sources else None,
    )
    assert config.port == expected


def test_the_file_may_be_named_by_the_environment(tmp_path: Path) -> None:
    named = write(tmp_path / "a.toml", f'worker_urls = ["{URL}"]\nport = 1\n')
    given = write(tmp_path / "b.toml", f'worker_urls = ["{URL}"]\nport = 2\n')
    assert RouterConfig.load(env={"CACHE_ROUTER_CONFIG": str(named)}).port == 1
    assert RouterConfig.load(env={"CACHE_ROUTER_CONFIG": str(named)}, file=given).port == 2


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_ROUTER_WORKER_URLS", URL)
    monkeypatch.setenv("CACHE_ROUTER_POLICY", "round_robin")
    assert RouterConfig.load().policy == "round_robin"


# -- the environment ------------------------------------------------------------------------


def env_load(**variables: str) -> RouterConfig:
    env = {"CACHE_ROUTER_WORKER_URLS": URL}
    env.update({f"CACHE_ROUTER_{name.upper()}": text for name, text in variables.items()})
    return RouterConfig.load(env=env)


def test_env_parses_ints_floats_and_strings() -> None:
    config = env_load(port=" 8080 ", cache_threshold="0.5", eviction_interval_secs="1e2")
    assert (config.port, config.cache_threshold, config.eviction_interval_secs) == (
        8080,
        0.5,
        100.0,
    )
    assert type(config.eviction_interval_secs) is float
    assert env_load(host="0.0.0.0", policy="random").host == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(word, True) for word in ("1", "true", "TRUE", "yes", "on")]
    + [(word, False) for word in ("0", "false", "No", "off")],
)
def test_env_parses_booleans(text: str, expected: bool) -> None:
    assert env_load(no_spill=text).no_spill is expected


@pytest.mark.parametrize(
    "text", ["http://a:1,http://b:2", "http://a:1 http://b:2", " http://a:1 ,  http://b:2\n"]
)
def test_env_parses_lists_separated_by_commas_or_spaces(text: str) -> None:
    config = RouterConfig.load(env={"CACHE_ROUTER_WORKER_URLS": text})
    assert config.worker_urls == ("http://a:1", "http://b:2")


@pytest.mark.parametrize("text", ["none", "None", "", "  "])
def test_env_none_or_empty_unsets_an_optional_field(text: str) -> None:
    assert env_load(limit_concurrency=text).limit_concurrency is None
    assert env_load(fleet_max_flush_secs=text).fleet_max_flush_secs is None
    assert env_load(limit_concurrency="12").limit_concurrency == 12


@pytest.mark.parametrize(
    ("variable", "field", "value"),
    [
        ("CACHE_ROUTER_WORKER_API_KEY", "api_key", "engine-key"),
        ("CACHE_ROUTER_API_KEY", "router_api_key", "client-key"),
        ("CACHE_ROUTER_ADMIN_API_KEY", "admin_api_key", "admin-key"),
        ("CACHE_ROUTER_REDIS_URL", "redis_url", "redis://:pw@127.0.0.1:6379/0"),
        ("CACHE_ROUTER_UPSTREAM_TRANSPORT", "upstream_transport", "httpx"),
    ],
)
def test_the_historical_variable_names_keep_working(variable: str, field: str, value: str) -> None:
    config = RouterConfig.load(env={"CACHE_ROUTER_WORKER_URLS": URL, variable: value})
    assert getattr(config, field) == value
    assert OPTIONS[field].env == variable


def test_the_engine_key_is_not_read_from_the_client_key_variable() -> None:
    config = RouterConfig.load(env={"CACHE_ROUTER_WORKER_URLS": URL, "CACHE_ROUTER_API_KEY": "k"})
    assert (config.api_key, config.router_api_key) == (None, "k")


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("CACHE_ROUTER_HEALTH_CHECK_INTERVAL", "CACHE_ROUTER_HEALTH_CHECK_INTERVAL_SECS"),
        ("CACHE_ROUTER_ROUTER_API_KEY", "CACHE_ROUTER_API_KEY"),
        ("CACHE_ROUTER_POLCY", "CACHE_ROUTER_POLICY"),
    ],
)
def test_unknown_variables_are_errors_with_a_suggestion(variable: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(env={"CACHE_ROUTER_WORKER_URLS": URL, variable: "1"})
    (problem,) = problems_of(excinfo)
    assert variable in problem and f"did you mean {suggestion}?" in problem


def test_variables_that_are_not_options_are_left_alone() -> None:
    from cache_router.ops.process_sync import PROCESS_DIRECTORY_ENV
    from cache_router.serve_workers import SERVE_CONFIG_ENV

    env = {
        "CACHE_ROUTER_WORKER_URLS": URL,
        SERVE_CONFIG_ENV: "{}",
        PROCESS_DIRECTORY_ENV: "/tmp/cache-router-x",  # what --workers processes inherit
        "CACHE_ROUTER_LAUNCHER": "module",
        "OTHER_THING": "x",
    }
    assert RouterConfig.load(env=env).worker_urls == (URL,)


# -- files ----------------------------------------------------------------------------------


def test_toml_flat_keys_tables_and_dashes(tmp_path: Path) -> None:
    file = write(
        tmp_path / "router.toml",
        f"""
        worker_urls = ["{URL}", "http://127.0.0.1:8002/"]
        max-payload-size = 1024
        transparent_prefixes = ["/inference"]

        [health]
        check_interval_secs = 5
        failure_threshold = 2

        [retry]
        max_retries = 4

        [fleet]
        name = "prod"
        """,
    )
    config = RouterConfig.load(env={}, file=file)
    assert config.worker_urls == (URL, "http://127.0.0.1:8002")
    assert config.max_payload_size == 1024
    assert config.transparent_prefixes == ("/inference",)
    assert config.health_check_interval_secs == 5.0
    assert type(config.health_check_interval_secs) is float  # a TOML integer for a float
    assert (config.health_failure_threshold, config.retry_max_retries) == (2, 4)
    assert config.fleet_name == "prod"


def test_a_field_given_twice_in_a_file_is_an_error(tmp_path: Path) -> None:
    file = write(
        tmp_path / "r.toml", f'worker_urls = ["{URL}"]\nfleet_name = "a"\n[fleet]\nname = "b"\n'
    )
    with pytest.raises(
        ConfigError, match=r"fleet_name is given twice, as fleet_name and as fleet.name"
    ):
        RouterConfig.load(env={}, file=file)


def test_unknown_file_keys_are_errors_with_a_suggestion(tmp_path: Path) -> None:
    file = write(
        tmp_path / "r.toml",
        f'worker_urls = ["{URL}"]\nquee_size = 3\n[health]\ncheck_interval = 5\n',
    )
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(env={}, file=file)
    assert problems_of(excinfo) == (
        f"unknown option 'quee_size' (from {file}); did you mean 'queue_size'?",
        f"unknown option 'health.check_interval' (from {file}); "
        "did you mean 'health_check_interval_secs'?",
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.toml", None, "cannot read it"),
        ("bad.toml", "port = \n", "not valid TOML"),
        ("bad.json", "{", "not valid JSON"),
        ("list.json", "[1]", "expected a table of options at the top level"),
        ("router.ini", "port = 1", "unknown file type: use .toml, .yaml, .yml or .json"),
    ],
)
def test_unreadable_files_are_errors_naming_the_file(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    path = tmp_path / name
    if text is not None:
        write(path, text)
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(cli={"worker_urls": [URL]}, env={}, file=path)
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"config file {path}: {message}")


def test_json_files(tmp_path: Path) -> None:
    file = write(tmp_path / "r.json", json.dumps({"worker_urls": [URL], "limit_concurrency": None}))
    assert RouterConfig.load(env={}, file=file).limit_concurrency is None


@pytest.mark.skipif(
    importlib.util.find_spec("yaml") is None, reason="PyYAML is not installed (optional)"
)
def test_yaml_files(tmp_path: Path) -> None:
    file = write(
        tmp_path / "router.yaml",
        f"worker_urls:\n  - {URL}\npolicy: power_of_two\nhealth:\n  check_endpoint: /ready\n"
        "admin_prefix: null\n",
    )
    config = RouterConfig.load(env={}, file=file)
    assert (config.policy, config.health_check_endpoint) == ("power_of_two", "/ready")
    sample = re.search(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert sample is not None
    docs = RouterConfig.load(env={}, file=write(tmp_path / "docs.yml", sample.group(1)))
    assert docs.health_check_interval_secs == 10 and docs.admin_prefix == "/router"


@pytest.mark.skipif(
    importlib.util.find_spec("yaml") is None, reason="PyYAML is not installed (optional)"
)
def test_an_empty_yaml_file_sets_nothing(tmp_path: Path) -> None:
    file = write(tmp_path / "empty.yml", "")
    assert RouterConfig.load(cli={"worker_urls": [URL]}, env={}, file=file).port == 30000


def test_yaml_without_pyyaml_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    file = write(tmp_path / "router.yaml", "port: 1\n")
    with pytest.raises(ConfigError, match=r"reading YAML needs PyYAML: pip install pyyaml"):
        RouterConfig.load(cli={"worker_urls": [URL]}, env={}, file=file)


# -- checks ---------------------------------------------------------------------------------

#: (field, a bad value as text, a bad typed value, what the message says)
BAD_VALUES: list[tuple[str, str, Any, str]] = [
    ("port", "70000", 70000, "must be between 0 and 65535"),
    ("health_check_interval_secs", "-1", -1.0, "must be >= 0.001"),
    ("cache_threshold", "1.5", 1.5, "must be between 0 and 1"),
    ("max_concurrent_requests", "-2", -2, "must be >= -1"),
    ("workers", "0", 0, "must be between 1 and 512"),
    ("limit_concurrency", "-1", -1, "must be >= 0"),
    ("request_timeout_secs", "nan", float("nan"), "must be a finite number"),
    ("policy", "fastest", "fastest", "must be one of cache_aware, round_robin"),
    ("upstream_transport", "h2", "h2", "must be one of auto, http1, aiohttp, httpx"),
    ("log_level", "verbose", "verbose", "must be one of debug, info"),
    ("engine_load_format", "tgi", "tgi", "must be one of sglang, vllm"),
    ("worker_urls", "ftp://x", ("ftp://x",), "worker URL 'ftp://x' must start with http://"),
    ("transparent_prefixes", "inference", ("inference",), "not a path prefix"),
    ("health_check_endpoint", "health", "health", "not a path prefix"),
    ("admin_prefix", "/", "/", "not a path prefix"),
    ("fleet_name", "a b", "a b", "may only use letters, digits"),
    ("redis_url", "http://h", "http://h", "must start with redis://, rediss:// or unix://"),
    ("host", " ", " ", "must not be empty"),
]


def source_cases(
    tmp_path: Path, field: str, text: str, value: Any
) -> list[tuple[str, dict[str, Any]]]:
    """(expected source label, ``RouterConfig.load`` arguments) giving ``field`` a bad value
    from the environment, a file and the command line."""
    base = {"worker_urls": [URL]} if field != "worker_urls" else {}
    variable = OPTIONS[field].env
    env = (
        {variable: text}
        if field == "worker_urls"
        else {variable: text, "CACHE_ROUTER_WORKER_URLS": URL}
    )
    file = write(tmp_path / "bad.json", json.dumps({**base, field: value}))
    return [
        (variable, {"env": env}),
        (str(file), {"env": {}, "file": file}),
        (OPTIONS[field].flag, {"cli": {**base, field: value}, "env": {}}),
    ]


@pytest.mark.parametrize(("field", "text", "value", "message"), BAD_VALUES)
def test_every_rejected_value_names_the_option_and_the_source(
    tmp_path: Path, field: str, text: str, value: Any, message: str
) -> None:
    for source, arguments in source_cases(tmp_path, field, text, value):
        with pytest.raises(ConfigError) as excinfo:
            RouterConfig.load(**arguments)
        (problem,) = problems_of(excinfo)
        assert problem.startswith(f"{field} (from {source}): {message}"), problem
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig(**{"worker_urls": (URL,), field: value})
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{field} (from RouterConfig(...)): {message}"), problem


def test_the_message_shows_the_value_as_given() -> None:
    with pytest.raises(ConfigError) as excinfo:
        env_load(health_check_interval_secs="-1")
    assert str(excinfo.value) == (
        "health_check_interval_secs (from CACHE_ROUTER_HEALTH_CHECK_INTERVAL_SECS): "
        "must be >= 0.001, got '-1'"
    )


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        ("port", "80.5", "expected int"),
        ("cache_threshold", "half", "expected float"),
        ("no_spill", "maybe", "expected one of 1/0, true/false, yes/no, on/off"),
    ],
)
def test_unparseable_variables_name_the_option_and_variable(
    field: str, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        env_load(**{field: text})
    assert str(excinfo.value) == (
        f"{field} (from CACHE_ROUTER_{field.upper()}): {message}, got {text!r}"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", "80", "expected an integer"),
        ("port", True, "expected an integer"),
        ("cache_threshold", "0.5", "expected a number"),
        ("no_spill", 1, "expected true or false"),
        ("worker_urls", URL, "expected a list of strings"),
        ("host", 1, "expected a string"),
        ("policy", None, "expected a string"),
    ],
)
def test_file_values_of_the_wrong_type_are_errors(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    data = {"worker_urls": [URL], field: value}
    file = write(tmp_path / "r.json", json.dumps(data))
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(env={}, file=file)
    assert str(excinfo.value) == f"{field} (from {file}): {message}, got {value!r}"


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    file = write(tmp_path / "r.toml", 'policy = "fastest"\nbogus = 1\n')
    env = {"CACHE_ROUTER_PORT": "x", "CACHE_ROUTER_QUEUE_SIZE": "-5"}
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(cli={"cb_failure_threshold": 0}, env=env, file=file)
    problems = problems_of(excinfo)
    assert len(problems) == 5, problems
    for expected in (
        "unknown option 'bogus'",
        "port (from CACHE_ROUTER_PORT): expected int",
        f"policy (from {file}): must be one of",
        "queue_size (from CACHE_ROUTER_QUEUE_SIZE): must be >= 0",
        "cb_failure_threshold (from --cb-failure-threshold): must be >= 1",
    ):
        assert any(problem.startswith(expected) for problem in problems), expected
    assert str(excinfo.value).startswith("5 configuration errors:\n  ")


def test_unknown_command_line_keys_are_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown option 'prot' \(from the command line\); did you mean 'port'\?"
    ):
        RouterConfig.load(cli={"worker_urls": [URL], "prot": 1}, env={})


def test_worker_urls_are_normalized_and_deduplicated() -> None:
    config = RouterConfig(worker_urls=["HTTP://Engine-A:8000/", "http://engine-a:8000", URL])  # type: ignore[arg-type]
    assert config.worker_urls == ("http://engine-a:8000", URL)
    assert RouterConfig().worker_urls == ()  # a library user brings a WorkerRegistry


def test_fleet_timings_are_checked_against_each_other_when_redis_is_used() -> None:
    # Without Redis they configure nothing, as on the command line today.
    assert RouterConfig(worker_urls=(URL,), fleet_ttl_secs=0.1).fleet_ttl_secs == 0.1
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.load(
            cli={"worker_urls": [URL], "fleet_max_flush_secs": 1.0},
            env={"CACHE_ROUTER_REDIS_URL": "redis://h", "CACHE_ROUTER_FLEET_TTL_SECS": "0.4"},
        )
    assert problems_of(excinfo) == (
        "fleet_ttl_secs (from CACHE_ROUTER_FLEET_TTL_SECS): must be longer than "
        "fleet_heartbeat_secs (0.5, from default), got 0.4",
        "fleet_max_flush_secs (from --fleet-max-flush-secs): must be between 0.05 and "
        "fleet_heartbeat_secs (0.5, from default), got 1.0",
    )


# -- the value ------------------------------------------------------------------------------


def full_config() -> RouterConfig:
    return RouterConfig(
        worker_urls=(URL, "https://engine-b:8443/v"),
        transparent_prefixes=("/inference",),
        worker_allow=("10.0.0.*",),
        api_key="engine-secret",
        router_api_key="client-secret",
        admin_api_key="admin-secret",
        admin_prefix="/router",
        redis_url="redis://user:redis-secret@127.0.0.1:6379/0?ssl_password=tls-secret",
        limit_concurrency=100,
        fleet_max_flush_secs=0.1,
    )


def test_to_dict_is_json_safe_and_from_dict_round_trips() -> None:
    config = full_config()
    data = json.loads(json.dumps(config.to_dict()))
    assert RouterConfig.from_dict(data) == config
    assert hash(RouterConfig.from_dict(data)) == hash(config)
    assert data["worker_urls"] == [URL, "https://engine-b:8443/v"]


def test_from_dict_checks_like_every_source() -> None:
    with pytest.raises(ConfigError) as excinfo:
        RouterConfig.from_dict({"worker_urls": [URL], "port": -1, "portt": 1})
    assert problems_of(excinfo) == (
        "unknown option 'portt' (from from_dict); did you mean 'port'?",
        "port (from from_dict): must be between 0 and 65535, got -1",
    )


def test_it_is_frozen_and_slotted() -> None:
    config = full_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert not hasattr(config, "__dict__")


def test_replace_returns_a_checked_copy() -> None:
    config = full_config()
    changed = config.replace(port=1234, worker_urls=["http://Other:1/"])
    assert (changed.port, changed.worker_urls, config.port) == (1234, ("http://other:1",), 30000)
    with pytest.raises(ConfigError, match=r"port \(from replace\(\)\): must be between"):
        config.replace(port=-1)
    with pytest.raises(ConfigError, match=r"unknown option 'prot' \(from replace\(\)\)"):
        config.replace(prot=1)


def test_repr_and_error_messages_hide_secrets() -> None:
    config = full_config()
    shown = repr(config)
    for secret in ("engine-secret", "client-secret", "admin-secret", "redis-secret", "tls-secret"):
        assert secret not in shown
    assert "api_key='***'" in shown and "redis://user:***@127.0.0.1:6379/0" in shown
    assert "worker_urls=('http://127.0.0.1:8001'" in shown  # the rest is shown
    with pytest.raises(ConfigError) as excinfo:
        env_load(worker_api_key="bad secret", redis_url="http://:pw-secret@h")
    message = str(excinfo.value)
    assert "bad secret" not in message and "pw-secret" not in message
    assert "api_key (from CACHE_ROUTER_WORKER_API_KEY): must be non-empty, without" in message


# -- in step with the CLI and the docs ------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    from cache_router.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = commands.choices["serve"]
    return serve


def non_default(option: Option) -> list[str]:
    """Command-line text for a value of ``option`` other than its default."""
    if option.kind is bool:
        return []
    if option.choices is not None:
        return [next(choice for choice in option.choices if choice != option.default)]
    if option.kind in (int, float):
        assert option.low is not None, option.name
        if option.high is not None:
            value = option.high if option.default != option.high else option.low
        else:
            value = abs(option.default or option.low or 0) * 2 + 1
        return [str(value)]
    return SAMPLES[option.name]


def test_every_option_has_a_flag_generated_from_it() -> None:
    """Each option's flag parses into the value the configuration then holds, and only a
    flag given reaches ``RouterConfig.load`` (argparse's defaults never mask the
    environment or the file)."""
    from cache_router.cli import build_parser, serve_config

    actions = {a.dest: a for a in serve_parser()._actions if a.dest not in NOT_OPTIONS}
    assert set(actions) == set(OPTIONS)
    base = ["serve", "--worker-urls", URL]
    untouched = serve_config(build_parser().parse_args(base), env={})
    assert untouched == RouterConfig(worker_urls=(URL,))
    for name, option in OPTIONS.items():
        action = actions[name]
        assert action.option_strings == [option.flag], name
        assert action.default is argparse.SUPPRESS, name
        assert option.flag in action.help or option.help in action.help, name  # type: ignore[operator]
        if action.choices is not None:
            assert tuple(action.choices) == option.choices, name
        if name in PAIRED_FILES or name in NEEDS_ANOTHER:
            continue
        text = non_default(option)
        context: dict[str, Any] = {"worker_urls": (URL,)}
        given = base
        if name in PD_OPTIONS:
            given, context = ["serve", "--pd-disaggregation"], {"pd_disaggregation": True}
        elif name in KV_OPTIONS:
            given = [*base, "--policy", "precise_cache_aware"]
            context = {**context, "policy": "precise_cache_aware"}
        elif name in ("worker_urls", "pd_disaggregation", "vllm_pd_disaggregation"):
            given, context = ["serve"], {}
        args = build_parser().parse_args([*given, option.flag, *text])
        config = serve_config(args, env={})
        if option.kind is bool:
            expected: Any = True
        elif option.is_list:
            expected = PARSED.get(name, tuple(text))
        else:
            expected = option.kind(text[0])
        direct = RouterConfig(**{**context, name: expected})
        assert getattr(config, name) == getattr(direct, name) != option.default, name
        assert config == direct, name  # and nothing else changed


def test_building_the_parser_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The configuration reads the environment, once, beneath the flags given."""
    monkeypatch.setenv("CACHE_ROUTER_UPSTREAM_TRANSPORT", "httpx")
    monkeypatch.setenv("CACHE_ROUTER_ADMIN_API_KEY", "from-the-environment")
    assert all(action.default in (argparse.SUPPRESS, None) for action in serve_parser()._actions)


def edge_values(option: Option) -> list[float]:
    """Values at and just beyond ``option``'s bounds."""
    assert option.low is not None
    step = 1 if option.kind is int else option.low / 2 if option.low > 0 else 0.5
    values = [option.low, option.low - step]
    if option.high is not None:
        values += [option.high, option.high + step]
    return values


def test_the_cli_and_the_config_accept_the_same_ranges() -> None:
    checked = 0
    for action in serve_parser()._actions:
        option = OPTIONS.get(action.dest)
        if option is None or option.low is None or action.type is None:
            continue
        for value in edge_values(option):
            try:
                action.type(str(value))  # type: ignore[operator]
                cli_accepts = True
            except argparse.ArgumentTypeError:
                cli_accepts = False
            context: dict[str, Any] = {"worker_urls": (URL,)}
            if option.name in KV_OPTIONS:
                context["policy"] = "precise_cache_aware"
            try:
                RouterConfig(**{**context, option.name: option.kind(value)})
                config_accepts = True
            except ConfigError:
                config_accepts = False
            assert cli_accepts == config_accepts, (option.name, value)
        checked += 1
    assert checked >= 20


def _default_text(option: Option) -> str:
    if option.default is dataclasses.MISSING:
        return "required"
    if option.default is None:
        return "none"
    if option.is_list:
        return "`[]`"
    return f"`{json.dumps(option.default)}`"


def _meaning(option: Option) -> str:
    text = option.help
    if option.choices:
        text += f"; one of {', '.join(f'`{c}`' for c in option.choices)}"
    if option.low is not None:
        text += (
            f" (>= {option.low:g})"
            if option.high is None
            else f" ({option.low:g} to {option.high:g})"
        )
    return text.replace("|", "\\|")


def render_table() -> str:
    rows = [
        "| Field | Flag | Environment variable | Type | Default | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for option in OPTIONS.values():
        rows.append(
            f"| `{option.name}` | `{option.flag}` | `{option.env}` | "
            f"{option.type_name.replace('|', 'or')} | {_default_text(option)} | "
            f"{_meaning(option)} |"
        )
    return "\n".join(rows) + "\n"


_TABLE = re.compile(r"(<!-- options:begin -->\n)(.*?)(<!-- options:end -->)", re.S)


def test_the_docs_table_is_generated_from_the_metadata() -> None:
    match = _TABLE.search(DOC.read_text(encoding="utf-8"))
    assert match is not None, "docs/configuration.md lost its option table markers"
    assert match.group(2) == render_table(), (
        "docs/configuration.md is out of date: run PYTHONPATH=. python tests/test_config.py"
    )


def test_the_sample_file_in_the_docs_loads(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    sample = re.search(r"```toml\n(.*?)```", text, re.S)
    assert sample is not None
    file = write(tmp_path / "router.toml", sample.group(1))
    config = RouterConfig.load(env={}, file=file)
    assert config.admin_prefix == "/router" and config.health_check_interval_secs == 10


def test_load_formats_and_choices_come_from_their_modules() -> None:
    assert OPTIONS["engine_load_format"].choices == tuple(LOAD_FORMATS)


if __name__ == "__main__":
    page = DOC.read_text(encoding="utf-8")
    DOC.write_text(_TABLE.sub(lambda m: m.group(1) + render_table() + m.group(3), page))
    print(f"rewrote the option table of {DOC}")


def test_the_precise_policy_takes_its_move_window_from_the_config() -> None:
    from cache_router.builder import build_router
    from cache_router.core.policies import PreciseCacheAwarePolicy

    for window in (0, 64):
        config = RouterConfig(
            worker_urls=("http://127.0.0.1:9",),
            policy="precise_cache_aware",
            kv_events_port=5557,
            kv_move_window=window,
        )
        policy = build_router(config).policy
        assert isinstance(policy, PreciseCacheAwarePolicy) and policy.move_window == window
    with pytest.raises(ConfigError, match="kv_move_window"):
        RouterConfig.load(env={"CACHE_ROUTER_KV_MOVE_WINDOW": "-1"})
