"""``serve`` with no start-up workers, and SGLang's worker API at the router's root.

Real ``serve`` subprocesses on 127.0.0.1 started with no ``--worker-urls``, in front of
real mock engines added at run time through ``POST /workers`` and the legacy
``/add_worker`` (the discovery / autoscaler use case). Every ``serve`` is stopped by
``serve_process``, every engine by its ``serve_app`` context, every thread joined.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import httpx
import pytest
from mock_engine import MockEngine, wait_until
from test_cli import closed_port, run_cli, serve_process

from cache_router.config import RouterConfig
from cache_router.testing import serve_app

pytestmark = pytest.mark.timeout(90)

KEY = {"authorization": "Bearer admin-key"}
BODY = {"prompt": "Hello", "max_tokens": 2}
EMPTY_SERVE = (
    "--admin-prefix",
    "/router",
    "--admin-api-key",
    "admin-key",
    "--worker-allow",
    "127.0.0.0/8",
    "--health-check-interval-secs",
    "0.2",
)


@contextmanager
def empty_router(*extra: str) -> Iterator[tuple[httpx.Client, list[str]]]:
    """``serve`` with no workers; yields a client and, once stopped, its log lines."""
    log: list[str] = []
    with (
        serve_process(*EMPTY_SERVE, *extra) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        yield client, log
    log.extend(served.stderr.splitlines())


def listed(client: httpx.Client) -> dict[str, dict[str, object]]:
    answer = client.get("/workers", headers=KEY)
    assert answer.status_code == 200
    return {worker["url"]: worker for worker in answer.json()["workers"]}


def test_config_without_workers_is_valid() -> None:
    assert RouterConfig.load(cli={}, env={}).worker_urls == ()


def test_serve_without_workers_or_admin_api_exits_2() -> None:
    result = run_cli("serve", "--port", "0")
    assert result.returncode == 2
    assert "no workers: give --worker-urls, --service-discovery or --discover-dns" in result.stderr
    assert "--admin-prefix" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_starts_empty_and_routes_once_a_worker_is_added() -> None:
    engine = MockEngine(name="a")
    with serve_app(engine) as url, empty_router() as (client, log):
        assert client.get("/liveness").status_code == 200
        ready = client.get("/readiness")
        assert ready.status_code == 503
        assert ready.json()["total_workers"] == 0
        assert client.post("/v1/completions", json=BODY).status_code == 503
        empty = client.get("/workers", headers=KEY).json()
        assert (empty["workers"], empty["total"]) == ([], 0)
        # The root API takes the admin key; without it nothing is added.
        assert client.post("/workers", json={"url": url}).status_code == 401
        assert client.get("/workers").status_code == 401
        assert client.get(f"/workers/{url}").status_code == 401
        assert client.get("/list_workers").status_code == 401
        assert listed(client) == {}
        added = client.post("/workers", json={"url": url + "/"}, headers=KEY)
        assert added.status_code == 202
        assert added.json()["worker_id"] == url
        assert added.json()["status"] == "accepted"
        wait_until(lambda: url in listed(client), timeout=10, interval=0.05)
        answer = client.post("/v1/completions", json=BODY)
        assert answer.status_code == 200
        assert answer.headers["x-mock-engine"] == "a"
        assert client.get("/readiness").status_code == 200
        body = client.get("/workers", headers=KEY).json()
        assert body["total"] == 1
        assert body["stats"]["total_workers"] == body["stats"]["healthy_workers"] == 1
        worker = body["workers"][0]
        assert worker["id"] == url
        assert worker["is_healthy"] is True
        assert worker["load"] == 0
        assert worker["worker_type"] == "regular"
        assert isinstance(worker["model_id"], str)
        one = client.get(f"/workers/{quote(url, safe='')}", headers=KEY)
        assert one.status_code == 200 and one.json() == worker
        assert client.get(f"/workers/{url}", headers=KEY).json() == worker
        # Ours is still there under the prefix, on the same fleet.
        assert [w["url"] for w in client.get("/router/workers", headers=KEY).json()] == [url]
    assert any("no --worker-urls" in line and "admin API" in line for line in log)


def test_post_workers_checks_before_it_accepts() -> None:
    engine = MockEngine(name="a")
    with serve_app(engine) as url, empty_router() as (client, _):
        refused = client.post("/workers", json={"url": url, "api_key": "k k"}, headers=KEY)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_worker_api_key"
        outside = client.post("/workers", json={"url": "http://10.1.2.3:8000"}, headers=KEY)
        assert outside.status_code == 403
        assert outside.json()["error"]["code"] == "worker_not_allowed"
        assert client.post("/workers", json={"url": "ftp://x"}, headers=KEY).status_code == 400
        unknown = client.post("/workers", json={"url": url, "bogus": 1}, headers=KEY)
        assert unknown.status_code == 400
        assert (
            client.post("/workers", json={"url": url, "priority": 50}, headers=KEY).status_code
            == 202
        )
        wait_until(lambda: url in listed(client), timeout=10, interval=0.05)
        assert client.post("/workers", json={"url": url}, headers=KEY).status_code == 409
        missing = client.get("/workers/http://127.0.0.1:1", headers=KEY)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "worker_not_found"
        assert listed(client).keys() == {url}


def test_a_worker_that_never_comes_up_is_not_added() -> None:
    with closed_port() as port, empty_router("--worker-startup-timeout-secs", "1") as (client, log):
        dead = f"http://127.0.0.1:{port}"
        assert client.post("/workers", json={"url": dead}, headers=KEY).status_code == 202
        # Held while it is being waited for: a second add is a conflict.
        assert client.post("/workers", json={"url": dead}, headers=KEY).status_code == 409
        wait_until(
            lambda: client.post("/workers", json={"url": dead}, headers=KEY).status_code == 202,
            timeout=10,
            interval=0.1,
        )
        assert listed(client) == {}
    assert any(f"worker {dead} was not added" in line for line in log)


def test_delete_drains_then_removes() -> None:
    engine = MockEngine(name="a")
    with serve_app(engine) as url, empty_router() as (client, _):
        assert client.post("/workers", json={"url": url}, headers=KEY).status_code == 202
        wait_until(lambda: url in listed(client), timeout=10, interval=0.05)
        answers: list[int] = []

        def hanging() -> None:
            with httpx.Client(base_url=str(client.base_url), trust_env=False, timeout=30) as c:
                answers.append(
                    c.post("/v1/completions", json=BODY, headers={"x-mock-hang": "1"}).status_code
                )

        thread = threading.Thread(target=hanging)
        thread.start()
        try:
            wait_until(lambda: listed(client)[url]["load"] == 1, timeout=10, interval=0.05)
            deleted = client.delete(f"/workers/{url}", headers=KEY)
            assert deleted.status_code == 202
            assert deleted.json()["worker_id"] == url
            # Draining: out of service at once, listed until its request finishes.
            assert listed(client)[url]["draining"] is True
            assert client.post("/v1/completions", json=BODY).status_code == 503
        finally:
            engine.release()
            thread.join(timeout=30)
        assert answers == [200]
        wait_until(lambda: listed(client) == {}, timeout=10, interval=0.05)
        assert client.get("/readiness").status_code == 503


def test_legacy_endpoints_at_the_root() -> None:
    a, b = MockEngine(name="a"), MockEngine(name="b")
    with serve_app(a) as url_a, serve_app(b) as url_b, empty_router() as (client, _):
        assert client.post("/add_worker", params={"url": url_a}).status_code == 401
        assert client.post("/add_worker", params={"url": url_a}, headers=KEY).status_code == 200
        assert client.post("/add_worker", params={"url": url_b}, headers=KEY).status_code == 200
        assert client.get("/list_workers", headers=KEY).json() == {"urls": [url_a, url_b]}
        removed = client.post("/remove_worker", params={"url": url_a}, headers=KEY)
        assert removed.status_code == 200
        assert client.get("/list_workers", headers=KEY).json() == {"urls": [url_b]}
        assert client.post("/v1/completions", json=BODY).headers["x-mock-engine"] == "b"


def test_no_root_worker_api_without_an_admin_prefix() -> None:
    engine = MockEngine(name="a")
    with (
        serve_app(engine) as url,
        serve_process("--worker-urls", url) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        for method, path in (
            ("GET", "/workers"),
            ("POST", "/workers"),
            ("GET", "/list_workers"),
        ):
            assert client.request(method, path, headers=KEY).status_code == 404
