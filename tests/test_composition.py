"""The router as small pure-ASGI layers: ``BackgroundTasks`` (lifespan tasks),
``RoutingMiddleware`` (routing only) and ``PrefixMount`` (the admin API), composed by
``RouterApp`` / ``Router.middleware``."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from cache_router.builder import RouterApp
from cache_router.core.registry import WorkerRegistry
from cache_router.proxy.asgi import Message, Receive, Scope, Send
from cache_router.proxy.lifespan import BackgroundTasks
from cache_router.proxy.middleware import RoutingMiddleware
from cache_router.proxy.mount import PrefixMount

pytestmark = pytest.mark.anyio


class Recorder:
    """An ASGI app that answers 200 with its name and remembers the scopes it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].split(".")[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.name.encode()})


async def get(app: Any, path: str, method: str = "GET") -> tuple[int, bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    scope["raw_path"], scope["query_string"] = path.encode(), b""
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_routing_middleware_takes_no_background_or_admin() -> None:
    registry = WorkerRegistry(["http://a:1"])
    for option in ("background", "admin", "admin_prefix"):
        with pytest.raises(TypeError):
            RoutingMiddleware(Recorder("app"), registry, **{option: ()})


async def test_prefix_mount_sends_its_prefix_to_the_mounted_app() -> None:
    app, admin = Recorder("app"), Recorder("admin")
    mount = PrefixMount(app, "/router/", admin)
    assert await get(mount, "/router/workers") == (200, b"admin")
    assert await get(mount, "/router") == (200, b"admin")
    assert await get(mount, "/routerx") == (200, b"app")  # whole segments only
    assert admin.scopes[0]["root_path"] == "/router"
    assert admin.scopes[0]["path"] == "/router/workers"  # left whole, as under Mount
    with pytest.raises(ValueError):
        PrefixMount(app, "router", admin)


async def test_router_app_order_is_models_routes_admin_app() -> None:
    registry = WorkerRegistry(["http://a:1"])
    app, admin = Recorder("app"), Recorder("admin")
    router = RouterApp(app, registry, transport="httpx", admin=admin, admin_prefix="/v1")
    status, body = await get(router, "/v1/models")
    assert status == 200 and b'"object": "list"' in body  # the middleware's own
    assert (await get(router, "/v1/completions"))[0] == 405  # a routed path wins
    assert await get(router, "/v1/other") == (200, b"admin")
    assert await get(router, "/elsewhere") == (200, b"app")
    assert router.routing.registry is registry and router.admin is admin
    await router.aclose()


class Task:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.stopped = False

    async def run(self) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.stopped = True


async def run_lifespan(app: Any, task: Task, send: Send) -> None:
    """Startup, then shutdown once ``task`` has started."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        if len(incoming) == 1:
            await task.started.wait()
        return incoming.pop(0)

    with anyio.fail_after(5):
        await app({"type": "lifespan"}, receive, send)


async def test_background_tasks_stop_before_the_app_acknowledges_shutdown() -> None:
    task = Task()
    seen_at_ack: list[bool] = []

    async def send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            seen_at_ack.append(task.stopped)

    await run_lifespan(BackgroundTasks(Recorder("app"), [task]), task, send)
    assert seen_at_ack == [True]


async def test_router_app_closes_the_upstream_pool_on_shutdown() -> None:
    registry = WorkerRegistry(["http://a:1"])
    task = Task()
    router = RouterApp(Recorder("app"), registry, transport="httpx", background=[task])
    client = router.routing.upstream.client()

    async def send(message: Message) -> None:
        pass

    await run_lifespan(router, task, send)
    assert task.stopped and client.is_closed
    assert router.background == (task,)
