"""``cache-router serve`` with the production options: keys, admin API, metrics."""

from __future__ import annotations

import httpx
import pytest
from test_cli import serve_config, serve_process

from cache_router.builder import build_router
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)


def test_operations_flags_default_to_sglangs_and_stay_off() -> None:
    config = serve_config("--worker-urls", "http://127.0.0.1:1")
    assert config.retry_max_retries == 5
    backoff = (config.retry_initial_backoff_ms, config.retry_max_backoff_ms)
    assert backoff == (50, 30000)
    assert (config.retry_backoff_multiplier, config.retry_jitter_factor) == (1.5, 0.2)
    assert (config.cb_failure_threshold, config.cb_success_threshold) == (10, 3)
    assert config.cb_timeout_duration_secs == 60
    assert config.max_concurrent_requests == 256  # SGLang's router's (smg's is -1: off)
    assert config.cb_window_duration_secs is None  # consecutive failures, as SGLang in effect
    assert (config.queue_size, config.queue_timeout_secs) == (100, 60)
    assert config.admin_prefix is None  # the admin API is opt-in
    assert not config.disable_retries and not config.disable_circuit_breaker


@pytest.mark.parametrize(
    ("flag", "variable", "attribute"),
    [
        ("--api-key", "CACHE_ROUTER_WORKER_API_KEY", "api_key"),
        ("--router-api-key", "CACHE_ROUTER_API_KEY", "router_api_key"),
        ("--admin-api-key", "CACHE_ROUTER_ADMIN_API_KEY", "admin_api_key"),
        ("--redis-url", "CACHE_ROUTER_REDIS_URL", "redis_url"),
    ],
)
def test_secrets_come_from_the_environment_unless_a_flag_is_given(
    flag: str, variable: str, attribute: str
) -> None:
    """Out of the process list when they come from the environment; the flag still wins."""
    argv = ["--worker-urls", "http://127.0.0.1:1"]
    value = "redis://127.0.0.1:6379/0" if attribute == "redis_url" else "from-the-environment"
    assert getattr(serve_config(*argv), attribute) is None
    assert getattr(serve_config(*argv, env={variable: value}), attribute) == value
    flag_value = value.replace("6379", "6380").replace("environment", "flag")
    given = serve_config(*argv, flag, flag_value, env={variable: value})
    assert getattr(given, attribute) == flag_value


def test_keys_admin_api_and_metrics_through_a_real_server() -> None:
    engine = SimulatedEngine(name="engine-a", decode_seconds_per_token=0)
    with (
        serve_app(engine) as engine_url,
        serve_process(
            "--worker-urls",
            engine_url,
            "--router-api-key",
            "client-key",
            "--admin-prefix",
            "/router",
            "--admin-api-key",
            "admin-key",
            "--api-key",
            "engine-key",
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        body = {"prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 401
        client_auth = {"authorization": "Bearer client-key"}
        assert client.post("/v1/completions", json=body, headers=client_auth).status_code == 200

        assert client.get("/router/workers", headers=client_auth).status_code == 401
        admin = {"authorization": "Bearer admin-key"}
        workers = client.get("/router/workers", headers=admin).json()
        assert [(w["url"], w["load"], w["processed"], w["circuit"]) for w in workers] == [
            (engine_url, 0, 1, "closed")
        ]
        metrics = client.get("/router/metrics", headers=admin).text
        assert 'cache_router_requests_total{route="/v1/completions",status="200"} 1.0' in metrics
        assert 'cache_router_requests_total{route="/v1/completions",status="401"} 1.0' in metrics
    assert engine.stats().completed == 1


def test_no_spill_gives_sglangs_exact_rules() -> None:
    from cache_router import CacheAwarePolicy

    for flags, expected in (([], True), (["--no-spill"], False)):
        policy = build_router(serve_config("--worker-urls", "http://127.0.0.1:1", *flags)).policy
        assert isinstance(policy, CacheAwarePolicy)
        assert policy.spill is expected
