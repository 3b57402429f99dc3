"""The admin API: worker listing, adding (with health waits), draining removal, aliases, auth.

Request handling is tested in-process through ``httpx.ASGITransport``; a drain's wait is
driven by holding and releasing a lease by hand, so no test depends on timing. The drain of a
real stream, and health waits, run against MockEngines on real uvicorn servers.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from mock_engine import Behaviour, MockEngine, wait_until
from starlette.applications import Starlette
from starlette.routing import Mount

from cache_router.core.events import RouterEvents
from cache_router.core.policies import CacheAwarePolicy, RoutingRequest
from cache_router.core.registry import Worker, WorkerRegistry
from cache_router.ops.admin import AdminApp
from cache_router.ops.load_source import external_load_board
from cache_router.proxy.auth import bearer_matches, presented_keys
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.testing import serve_app, serve_apps

pytestmark = pytest.mark.timeout(60)

A = "http://engine-a.test:8000"
B = "http://engine-b.test:8001"
KEY = "s3cret-admin-key"
LOOPBACK = ["127.0.0.1"]


def enc(url: str) -> str:
    """A worker URL as one path segment."""
    return quote(url, safe="")


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    assert error["message"]


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeBreaker:
    def __init__(self, state: str) -> None:
        self.state = state

    def allows_request(self) -> bool:
        return self.state != "open"


@dataclass
class Admin:
    registry: WorkerRegistry
    policy: CacheAwarePolicy
    app: AdminApp
    client: httpx.AsyncClient


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    registry = WorkerRegistry()
    registry.add(A)
    registry.add(B, model="m-b")
    policy = CacheAwarePolicy(seed=0)
    policy.bind(registry)
    app = AdminApp(registry, worker_allow=["*.test"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        yield Admin(registry, policy, app, client)
    assert registry.total_load() == 0


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (bounded)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


# -- reading ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lists_and_shows_workers(admin: Admin) -> None:
    worker_b = admin.registry.get(B)
    assert worker_b is not None
    worker_b.breaker = FakeBreaker("half_open")
    worker_b.healthy = False
    with admin.registry.acquire(worker_b):
        listed = (await admin.client.get("/workers")).json()
    assert listed == [
        {
            "url": A,
            "role": "regular",
            "bootstrap_port": None,
            "model": None,
            "models": None,
            "healthy": True,
            "draining": False,
            "circuit": None,
            "load": 0,
            "external_load": 0,
            "load_source": "local",
            "processed": 0,
        },
        {
            "url": B,
            "role": "regular",
            "bootstrap_port": None,
            "model": "m-b",
            "models": ["m-b"],
            "healthy": False,
            "draining": False,
            "circuit": "half_open",
            "load": 1,
            "external_load": 0,
            "load_source": "local",
            "processed": 1,
        },
    ]
    one = await admin.client.get(f"/workers/{enc(B)}")
    assert one.status_code == 200
    assert one.json() == {**listed[1], "load": 0}
    # An unencoded URL, and one whose "//" a proxy merged, name the same worker.
    assert (await admin.client.get(f"/workers/{A}")).json()["url"] == A
    assert (await admin.client.get("/workers/http:/engine-a.test:8000")).json()["url"] == A
    assert (await admin.client.get("/list_workers")).json() == {"urls": [A, B]}


@pytest.mark.anyio
async def test_workers_show_the_load_other_routers_put_on_them_and_its_source(
    admin: Admin,
) -> None:
    worker_a = admin.registry.get(A)
    assert worker_a is not None
    board = external_load_board(admin.registry)
    board.set("engine", worker_a, 3)
    board.set("fleet", worker_a, 5)  # the larger estimate applies
    with admin.registry.acquire(worker_a):
        shown = (await admin.client.get(f"/workers/{enc(A)}")).json()
    assert (shown["load"], shown["external_load"], shown["load_source"]) == (1, 5, "fleet")
    board.clear("fleet", worker_a)
    shown = (await admin.client.get("/workers")).json()[0]
    assert (shown["load"], shown["external_load"], shown["load_source"]) == (0, 3, "engine")
    board.clear_source("engine")
    shown = (await admin.client.get("/workers")).json()[0]
    assert (shown["external_load"], shown["load_source"]) == (0, "local")


@pytest.mark.anyio
async def test_unknown_workers_routes_and_methods_get_json_errors(admin: Admin) -> None:
    missing = enc("http://nowhere.test:1")
    assert_error(await admin.client.get(f"/workers/{missing}"), 404, "worker_not_found")
    assert_error(await admin.client.delete(f"/workers/{missing}"), 404, "worker_not_found")
    assert_error(await admin.client.get(f"/workers/{enc('not a url')}"), 404, "worker_not_found")
    response = await admin.client.post("/remove_worker", params={"url": "http://nowhere.test:1"})
    assert_error(response, 404, "worker_not_found")
    assert_error(await admin.client.post("/remove_worker"), 400, "missing_url")
    assert_error(await admin.client.get("/nothing-here"), 404, "not_found")
    # /metrics exists only when a metrics object is given.
    assert_error(await admin.client.get("/metrics"), 404, "not_found")
    wrong = await admin.client.put("/workers")
    assert_error(wrong, 405, "method_not_allowed")
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert [worker.url for worker in admin.registry] == [A, B]
    assert not any(worker.draining for worker in admin.registry)


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["mount", "full_path", "stripped_path"])
async def test_works_under_a_prefix(style: str) -> None:
    registry = WorkerRegistry([A])
    admin = AdminApp(registry, worker_allow=["engine-b.test"])
    if style == "mount":
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/router", app=admin)]))
        path = "/router/workers"
    else:
        # What a middleware dispatching by hand passes: root_path extended by the prefix,
        # path either left whole or already stripped.
        transport = httpx.ASGITransport(app=admin, root_path="/router")
        path = "/router/workers" if style == "full_path" else "/workers"
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        assert [entry["url"] for entry in (await client.get(path)).json()] == [A]
        added = await client.post(path, json={"url": B})
        assert added.status_code == 201
        removed = await client.delete(f"{path}/{enc(A)}")
        assert removed.status_code == 200
    assert [worker.url for worker in registry] == [B]


# -- adding -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_post_adds_a_worker(admin: Admin) -> None:
    response = await admin.client.post("/workers", json={"url": "http://new.test:9/", "model": "m"})
    assert response.status_code == 201
    assert response.json() == {
        "url": "http://new.test:9",
        "role": "regular",
        "bootstrap_port": None,
        "model": "m",
        "models": ["m"],
        "healthy": True,
        "draining": False,
        "circuit": None,
        "load": 0,
        "external_load": 0,
        "load_source": "local",
        "processed": 0,
    }
    worker = admin.registry.get("http://new.test:9")
    assert worker is not None and worker.model == "m"
    assert worker in admin.registry.candidates("m")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": A}, 409, "worker_exists"),
        ({"url": A + "/"}, 409, "worker_exists"),
        ({"url": "ftp://x.test"}, 400, "invalid_url"),
        ({"url": "http://"}, 400, "invalid_url"),
        ({"url": "http://x.test:1?q=1"}, 400, "invalid_url"),
        ({"url": "http://user@x.test:1"}, 400, "invalid_url"),
        ({"url": "not a url"}, 400, "invalid_url"),
        ({"url": 12}, 400, "invalid_url"),
        ({}, 400, "invalid_url"),
        ({"url": "http://x.test:1", "model": 3}, 400, "invalid_model"),
        ({"url": "http://x.test:1", "model": ""}, 400, "invalid_model"),
        ({"url": "http://x.test:1", "wait_healthy_secs": -1}, 400, "invalid_seconds"),
        ({"url": "http://x.test:1", "wait_healthy_secs": "soon"}, 400, "invalid_seconds"),
        ({"url": "http://x.test:1", "wait_healthy_secs": True}, 400, "invalid_seconds"),
        ({"url": "http://x.test:1", "wait_healthy_sec": 1}, 400, "unknown_field"),
        ([A], 400, "invalid_json"),
    ],
)
async def test_post_refuses_bad_or_duplicate_workers(
    admin: Admin, body: Any, status: int, code: str
) -> None:
    assert_error(await admin.client.post("/workers", json=body), status, code)
    assert [worker.url for worker in admin.registry] == [A, B]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"url": "http://x.test:1", "wait_healthy_secs": NaN}', 400, "invalid_seconds"),
        (b'{"url": "http://x.test:1", "wait_healthy_secs": Infinity}', 400, "invalid_seconds"),
        (b'{"url": "' + b"x" * 70_000 + b'"}', 413, "request_too_large"),
    ],
)
async def test_post_refuses_bad_bodies(
    admin: Admin, content: bytes, status: int, code: str
) -> None:
    response = await admin.client.post("/workers", content=content)
    assert_error(response, status, code)
    assert len(admin.registry) == 2


@pytest.mark.anyio
async def test_add_and_remove_worker_aliases(admin: Admin) -> None:
    url = "http://alias.test:7"
    added = await admin.client.post("/add_worker", params={"url": url, "model": "m"})
    assert added.status_code == 200
    assert added.json()["url"] == url
    assert (await admin.client.get("/list_workers")).json() == {"urls": [A, B, url]}
    assert_error(await admin.client.post("/add_worker", params={"url": url}), 409, "worker_exists")
    assert_error(await admin.client.post("/add_worker"), 400, "invalid_url")
    bad_wait = await admin.client.post(
        "/add_worker", params={"url": "http://x.test:1", "wait_healthy_secs": "nan"}
    )
    assert_error(bad_wait, 400, "invalid_seconds")
    removed = await admin.client.post("/remove_worker", params={"url": url})
    assert removed.status_code == 200
    assert removed.json()["url"] == url and removed.json()["drained"] is True
    assert admin.registry.get(url) is None


# -- removing -----------------------------------------------------------------------------


def routed(policy: CacheAwarePolicy, registry: WorkerRegistry, prompt: str) -> Worker:
    """Let the policy route ``prompt`` over the whole fleet (recording it in the tree)."""
    return policy.select(RoutingRequest(prompt), registry.candidates())


@pytest.mark.anyio
async def test_delete_waits_for_in_flight_requests(admin: Admin) -> None:
    worker = admin.registry.get(A)
    assert worker is not None
    admin.policy.select(RoutingRequest("a shared prefix"), [worker])
    assert A in admin.policy.tree().tenants()
    lease = admin.registry.acquire(worker)
    answers: list[httpx.Response] = []

    async def delete() -> None:
        answers.append(await admin.client.delete(f"/workers/{enc(A)}"))

    async with anyio.create_task_group() as group:
        group.start_soon(delete)
        await wait_for(lambda: worker.draining)
        # Draining: no new requests, still registered, in-flight request untouched.
        assert worker not in admin.registry.candidates()
        assert admin.registry.get(A) is worker
        assert not lease.released
        shown = (await admin.client.get(f"/workers/{enc(A)}")).json()
        assert shown["draining"] is True and shown["load"] == 1
        for _ in range(20):
            await anyio.sleep(0)
        assert answers == []  # still waiting: the load is 1 and only a release ends it
        lease.release()
    [answer] = answers
    assert answer.status_code == 200
    assert answer.json()["url"] == A
    assert answer.json()["drained"] is True and answer.json()["load"] == 0
    assert admin.registry.get(A) is None
    assert A not in admin.policy.tree().tenants()


@pytest.mark.anyio
async def test_delete_of_an_idle_worker_removes_it_at_once(admin: Admin) -> None:
    routed(admin.policy, admin.registry, "prompt for everyone")
    answer = await admin.client.delete(f"/workers/{enc(B)}")
    assert answer.status_code == 200
    assert answer.json()["drained"] is True
    assert [worker.url for worker in admin.registry] == [A]
    assert B not in admin.policy.tree().tenants()


@pytest.mark.anyio
async def test_drain_timeout_removes_the_worker_with_requests_left(admin: Admin) -> None:
    worker = admin.registry.get(A)
    assert worker is not None
    lease = admin.registry.acquire(worker)
    answer = await admin.client.delete(f"/workers/{enc(A)}", params={"timeout": "0.05"})
    assert answer.status_code == 200
    assert answer.json()["drained"] is False and answer.json()["load"] == 1
    assert admin.registry.get(A) is None
    lease.release()  # the request still finishes normally after the removal
    assert worker.load == 0


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", ["-1", "soon", "inf", "nan"])
async def test_delete_refuses_a_bad_timeout_before_draining(admin: Admin, timeout: str) -> None:
    answer = await admin.client.delete(f"/workers/{enc(A)}", params={"timeout": timeout})
    assert_error(answer, 400, "invalid_seconds")
    worker = admin.registry.get(A)
    assert worker is not None and not worker.draining


@pytest.mark.anyio
async def test_concurrent_deletes_share_one_drain(admin: Admin) -> None:
    worker = admin.registry.get(A)
    assert worker is not None
    lease = admin.registry.acquire(worker)
    answers: list[httpx.Response] = []

    async def delete(path: str) -> None:
        if path.startswith("/remove_worker"):
            answers.append(await admin.client.post(path))
        else:
            answers.append(await admin.client.delete(path))

    async with anyio.create_task_group() as group:
        group.start_soon(delete, f"/workers/{enc(A)}")
        group.start_soon(delete, f"/remove_worker?url={enc(A)}")
        await wait_for(lambda: admin.app._drains.get(worker) is not None)
        await wait_for(lambda: admin.app._drains[worker].waiters == 2)
        lease.release()
    assert [answer.status_code for answer in answers] == [200, 200]
    assert admin.registry.get(A) is None
    assert admin.app._drains == {}


@pytest.mark.anyio
async def test_a_cancelled_drain_puts_the_worker_back(admin: Admin) -> None:
    worker = admin.registry.get(A)
    assert worker is not None
    lease = admin.registry.acquire(worker)
    with anyio.move_on_after(0.05):
        await admin.app.drain(worker, timeout=60)
    assert not worker.draining
    assert admin.registry.get(A) is worker
    assert worker in admin.registry.candidates()
    lease.release()


# -- authentication -----------------------------------------------------------------------


def test_bearer_matches() -> None:
    assert bearer_matches([(b"authorization", b"Bearer k1")], "k1")
    assert bearer_matches([(b"authorization", b"bearer   k1 ")], b"k1")
    assert bearer_matches([(b"x-api-key", b"k1")], "k1")
    assert bearer_matches([(b"authorization", b"Bearer nope"), (b"x-api-key", b"k1")], "k1")
    assert bearer_matches([(b"authorization", "Bearer ключ".encode())], "ключ")
    assert not bearer_matches([], "k1")
    assert not bearer_matches([(b"authorization", b"Bearer k1x")], "k1")
    assert not bearer_matches([(b"authorization", b"Basic k1")], "k1")
    assert not bearer_matches([(b"authorization", b"k1")], "k1")
    assert not bearer_matches([(b"x-other", b"k1")], "k1")
    # Only the first Authorization header counts.
    assert not bearer_matches(
        [(b"authorization", b"Bearer nope"), (b"authorization", b"Bearer k1")], "k1"
    )
    # An empty configured key never matches, not even an empty header.
    assert not bearer_matches([(b"authorization", b"Bearer "), (b"x-api-key", b"")], "")
    assert presented_keys([(b"x-api-key", b" a "), (b"authorization", b"Bearer b")]) == (b"b", b"a")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": f"Basic {KEY}"}, 401),
        ({"x-api-key": "wrong"}, 401),
        ({"authorization": f"Bearer {KEY}"}, 200),
        ({"authorization": f"bearer {KEY}"}, 200),
        ({"x-api-key": KEY}, 200),
    ],
)
async def test_api_key_guards_every_route(headers: dict[str, str], status: int) -> None:
    registry = WorkerRegistry([A])
    app = AdminApp(registry, api_key=KEY, worker_allow=["engine-*.test"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://router", headers=headers
    ) as client:
        listed = await client.get("/workers")
        added = await client.post("/workers", json={"url": B})
        removed = await client.delete(f"/workers/{enc(A)}")
        unknown = await client.get("/no-such-route")
    if status == 401:
        for response in (listed, added, removed, unknown):
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert [worker.url for worker in registry] == [A]
    else:
        assert (listed.status_code, added.status_code, removed.status_code) == (200, 201, 200)
        assert unknown.status_code == 404
        assert [worker.url for worker in registry] == [B]


def test_constructor_refuses_bad_settings() -> None:
    registry = WorkerRegistry()
    with pytest.raises(ValueError, match="api_key"):
        AdminApp(registry, api_key="")
    with pytest.raises(ValueError, match="drain_timeout"):
        AdminApp(registry, drain_timeout=-1)
    with pytest.raises(ValueError, match="startup_health_path"):
        AdminApp(registry, startup_health_path="health")


# -- against real servers -----------------------------------------------------------------


@pytest.mark.anyio
async def test_add_waits_for_a_real_engine_to_be_healthy() -> None:
    engine = MockEngine(name="e1")
    registry = WorkerRegistry()
    app = AdminApp(registry, startup_health_path="/ready", worker_allow=LOOPBACK)
    transport = httpx.ASGITransport(app=app)
    with serve_app(engine) as url:
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            answer = await client.post("/workers", json={"url": url, "wait_healthy_secs": 5})
    assert answer.status_code == 201
    assert engine.paths() == ["/ready"]
    assert [worker.url for worker in registry] == [url]


@pytest.mark.anyio
async def test_a_failed_readiness_wait_answers_the_same_whatever_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused, 404 or 503: one answer, so the API is no port scanner; the log says why."""
    registry = WorkerRegistry()
    app = AdminApp(registry, worker_allow=LOOPBACK)
    transport = httpx.ASGITransport(app=app)
    missing = MockEngine(name="missing", behaviour=Behaviour(status=404))
    sick = MockEngine(name="sick", behaviour=Behaviour(status=503))
    closed = closed_port_url()
    caplog.set_level("WARNING", logger="cache_router.ops.admin")
    with serve_apps([missing, sick]) as (missing_url, sick_url):
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            refused = await client.post("/workers", json={"url": closed, "wait_healthy_secs": 0.3})
            not_found = await client.post(
                "/workers", json={"url": missing_url, "wait_healthy_secs": 0.3}
            )
            unhealthy = await client.post(
                "/add_worker", params={"url": sick_url, "wait_healthy_secs": "0.3"}
            )
    for answer in (refused, not_found, unhealthy):
        assert_error(answer, 503, "worker_unhealthy")
    assert refused.content == not_found.content == unhealthy.content
    assert "not ready" in refused.json()["error"]["message"]
    logged = {record.getMessage() for record in caplog.records}
    assert any(closed in line and "ConnectError" in line for line in logged), logged
    assert any(missing_url in line and "status 404" in line for line in logged), logged
    assert any(sick_url in line and "status 503" in line for line in logged), logged
    assert missing.requests and sick.requests
    assert all(path == "/health" for path in missing.paths() + sick.paths())
    assert len(registry) == 0


# -- the worker allow-list ------------------------------------------------------------------

#: Ways of writing 127.0.0.1 (or a name for it) that the HTTP clients connect with.
LOOPBACK_SPELLINGS = (
    "127.0.0.1",
    "127.1",
    "0x7f.1",
    "0X7F.0.0.1",
    "0177.0.0.1",
    "127.000.000.001",
    "2130706433",
    "0x7f000001",
    "127.0.0.1.",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:FFFF:7F00:1]",
    "localhost",
    "LOCALHOST",
    "localhost.",
)


@pytest.mark.anyio
async def test_hosts_off_the_allow_list_are_refused_before_any_request() -> None:
    engine = MockEngine(name="target")
    registry = WorkerRegistry([A])
    app = AdminApp(registry, worker_allow=["10.0.0.0/8", "engine-*.internal", "fd00::/8"])
    transport = httpx.ASGITransport(app=app)
    with serve_app(engine) as url:
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            for host in LOOPBACK_SPELLINGS:
                target = f"http://{host}:{port}"
                answers = (
                    await client.post("/workers", json={"url": target, "wait_healthy_secs": 1}),
                    await client.post("/add_worker", params={"url": target}),
                )
                for answer in answers:
                    assert_error(answer, 403, "worker_not_allowed")
                    message = answer.json()["error"]["message"]
                    assert host.lower().strip("[]") in message
                    # Nothing about the network or the list itself.
                    for leak in ("10.0.0.0", "engine-*", "loopback", "private", "127.0.0.1/"):
                        assert leak not in message
            # Credentials in the URL are refused outright, whatever the host.
            sneaky = await client.post(
                "/workers", json={"url": f"http://engine-1.internal@127.0.0.1:{port}"}
            )
            assert_error(sneaky, 400, "invalid_url")
    assert engine.requests == []
    assert [worker.url for worker in registry] == [A]


@pytest.mark.anyio
async def test_listed_networks_names_and_patterns_are_accepted() -> None:
    engine = MockEngine(name="target")
    registry = WorkerRegistry(["http://127.0.0.1:1"])
    app = AdminApp(registry, worker_allow=["engine-*.internal", "fd00::/8", "localhost"])
    transport = httpx.ASGITransport(app=app)
    with serve_app(engine) as url:
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            # The startup worker's host is allowed on any port, however it is spelled.
            for host in ("127.1", "[::ffff:127.0.0.1]"):
                target = f"http://{host}:{port}"
                added = await client.post("/workers", json={"url": target, "wait_healthy_secs": 5})
                assert added.status_code == 201, added.text
                assert (await client.delete(f"/workers/{enc(target)}")).status_code == 200
            for target in (
                "http://ENGINE-7.internal.:9",
                "http://engine-.internal:9",
                "http://[fd00::1]:9",
                f"http://localhost:{port}",
            ):
                added = await client.post("/add_worker", params={"url": target})
                assert added.status_code == 200, (target, added.text)
            for target in ("http://engine-7.evil.internal:9", "http://xengine-7.internal:9"):
                assert_error(
                    await client.post("/workers", json={"url": target}), 403, "worker_not_allowed"
                )
    assert engine.paths() == ["/health", "/health"]


@pytest.mark.anyio
async def test_the_default_allow_list_is_the_startup_workers_hosts() -> None:
    registry = WorkerRegistry(["http://localhost:1", "http://10.0.0.7:30000"])
    app = AdminApp(registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        for target in ("http://localhost:2", "http://012.0.0.7:1", "http://[::ffff:a00:7]:3"):
            assert (await client.post("/workers", json={"url": target})).status_code == 201
        # Names are never resolved: 127.0.0.1 is not "localhost", nor 10.0.0.8 its neighbour.
        for target in ("http://127.0.0.1:2", "http://10.0.0.8:1"):
            assert_error(
                await client.post("/workers", json={"url": target}), 403, "worker_not_allowed"
            )
    with pytest.raises(ValueError, match="CIDR"):
        AdminApp(WorkerRegistry(), worker_allow=["10.0.0.*"])


@pytest.mark.anyio
async def test_a_port_range_keeps_other_services_on_an_allowed_host_out() -> None:
    engine = MockEngine(name="target")
    registry = WorkerRegistry()
    with serve_app(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        app = AdminApp(registry, worker_allow=[f"127.0.0.0/8:{port}"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            for target in (
                "http://127.0.0.1:6379",
                "http://127.0.0.1",
                f"https://127.0.0.1:{port + 1}",
            ):
                refused = await client.post("/workers", json={"url": target})
                assert_error(refused, 403, "worker_not_allowed")
                assert "port" in refused.json()["error"]["message"]
            added = await client.post("/workers", json={"url": url, "wait_healthy_secs": 5})
            assert added.status_code == 201, added.text
    assert engine.paths() == ["/health"]
    assert [worker.url for worker in registry] == [url]


@pytest.mark.anyio
async def test_a_worker_being_added_is_not_added_twice() -> None:
    engine = MockEngine(name="slow", behaviour=Behaviour(hang=True))
    registry = WorkerRegistry()
    app = AdminApp(registry, worker_allow=LOOPBACK)
    transport = httpx.ASGITransport(app=app)
    answers: list[httpx.Response] = []
    try:
        with serve_app(engine) as url:
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:

                async def add() -> None:
                    answers.append(
                        await client.post("/workers", json={"url": url, "wait_healthy_secs": 10})
                    )

                async with anyio.create_task_group() as group:
                    group.start_soon(add)
                    await wait_for(lambda: url in app._adding)
                    duplicate = await client.post("/workers", json={"url": url})
                    assert_error(duplicate, 409, "worker_exists")
                    assert len(registry) == 0
                    engine.release()
    finally:
        engine.release()
    [answer] = answers
    assert answer.status_code == 201
    assert [worker.url for worker in registry] == [url]
    assert app._adding == set()


@dataclass
class LiveRouter:
    """A RoutingMiddleware with the admin API mounted at /router, on a real server."""

    url: str
    registry: WorkerRegistry
    policy: CacheAwarePolicy
    admin: AdminApp
    client: httpx.Client


@contextmanager
def live_router(
    worker_urls: Sequence[str],
    *,
    events: Sequence[RouterEvents] = (),
    metrics: Any = None,
    registry: WorkerRegistry | None = None,
    policy: Any = None,
) -> Iterator[LiveRouter]:
    """The router on uvicorn, the admin API mounted under ``/router`` with Starlette."""
    registry = registry if registry is not None else WorkerRegistry(worker_urls)
    policy = policy if policy is not None else CacheAwarePolicy(seed=0)
    admin = AdminApp(registry, metrics=metrics)
    app = RoutingMiddleware(
        Starlette(routes=[Mount("/router", app=admin)]), registry, policy, events=events
    )
    # lifespan "on": the router's shutdown closes its upstream pool, as in production.
    with (
        serve_app(app, lifespan="on") as url,
        httpx.Client(base_url=url, trust_env=False, timeout=20) as client,
    ):
        yield LiveRouter(url, registry, policy, admin, client)


def chat(prompt: str, *, stream: bool = False) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "stream": stream}


def read_stream(client: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> list[str]:
    """Stream a chat completion through the router; the SSE data payloads in order."""
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_drain_lets_an_in_flight_stream_finish_before_removal() -> None:
    first, second = MockEngine(name="e1"), MockEngine(name="e2")
    try:
        # The pool is left last: should an assertion fail, the servers stop (cutting the
        # held stream) before the pool waits for its threads.
        with (
            ThreadPoolExecutor(max_workers=2) as pool,
            serve_apps([first, second]) as (url1, url2),
            live_router([url1]) as router,
        ):
            # Held by the engine until released: in flight, lease taken, nothing sent.
            stream = pool.submit(
                read_stream,
                router.client,
                chat("a long shared system prompt", stream=True),
                {"x-mock-hang": "1", "x-mock-chunks": "4", "x-mock-chunk-delay": "0.05"},
            )
            wait_until(lambda: first.in_flight == 1)
            worker = router.registry.get(url1)
            assert worker is not None and worker.load == 1
            assert url1 in router.policy.tree().tenants()
            added = router.client.post("/router/workers", json={"url": url2})
            assert added.status_code == 201

            removal = pool.submit(router.client.delete, f"/router/workers/{enc(url1)}")
            wait_until(lambda: worker.draining)
            shown = router.client.get(f"/router/workers/{enc(url1)}").json()
            assert shown["draining"] is True and shown["load"] == 1
            # New requests go elsewhere while the drain waits.
            other = router.client.post("/v1/chat/completions", json=chat("new request"))
            assert other.status_code == 200
            assert other.headers["x-mock-engine"] == "e2"
            assert not removal.done() and not stream.done()

            first.release()
            answer = removal.result(timeout=20)
            payloads = stream.result(timeout=20)
        assert answer.status_code == 200
        assert answer.json()["url"] == url1 and answer.json()["drained"] is True
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks] == [
            "c0",
            "c1",
            "c2",
            "c3",
        ]
        assert payloads[-1] == "[DONE]"
        assert (first.completed, first.cancelled, first.died) == (1, 0, 0)
        assert [worker.url for worker in router.registry] == [url2]
        tenants = router.policy.tree().tenants()
        assert url1 not in tenants and url2 in tenants
        assert router.registry.total_load() == 0 and worker.load == 0
    finally:
        first.release()
        second.release()
