"""``cache-router serve`` with the production options: keys, admin API, metrics."""

from __future__ import annotations

import httpx
import pytest
from test_cli import serve_process

from cache_router.cli import build_parser
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)


def test_operations_flags_default_to_sglangs_and_stay_off() -> None:
    args = build_parser().parse_args(["serve", "--worker-urls", "http://127.0.0.1:1"])
    assert args.retry_max_retries == 3
    assert (args.cb_failure_threshold, args.cb_success_threshold) == (10, 3)
    assert args.cb_timeout_duration_secs == 60
    assert args.max_concurrent_requests == -1  # no admission limit unless asked
    assert (args.queue_size, args.queue_timeout_secs) == (100, 60)
    assert args.admin_prefix is None  # the admin API is opt-in
    assert not args.disable_retries and not args.disable_circuit_breaker


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
    monkeypatch: pytest.MonkeyPatch, flag: str, variable: str, attribute: str
) -> None:
    """Out of the process list when they come from the environment; the flag still wins."""
    argv = ["serve", "--worker-urls", "http://127.0.0.1:1"]
    monkeypatch.delenv(variable, raising=False)
    assert getattr(build_parser().parse_args(argv), attribute) is None
    monkeypatch.setenv(variable, "from-the-environment")
    assert getattr(build_parser().parse_args(argv), attribute) == "from-the-environment"
    given = build_parser().parse_args([*argv, flag, "from-the-flag"])
    assert getattr(given, attribute) == "from-the-flag"


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
    from cache_router import CacheAwarePolicy, WorkerRegistry
    from cache_router.cli import _router_app

    for flags, expected in (([], True), (["--no-spill"], False)):
        args = build_parser().parse_args(["serve", "--worker-urls", "http://127.0.0.1:1", *flags])
        app = _router_app(args, WorkerRegistry(args.worker_urls))
        assert isinstance(app.policy, CacheAwarePolicy)
        assert app.policy.spill is expected
