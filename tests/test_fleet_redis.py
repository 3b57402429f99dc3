"""Router replicas sharing state through a real Redis.

Each test starts its own ``redis-server`` on a free loopback port (no persistence) and
stops it at the end; the module is skipped when ``redis-server`` or the ``redis`` package
is missing. Replicas are either in-process routers (each with its own registry, policy and
:class:`RedisFleetState`, served by uvicorn threads with their lifespan on) or real
``cache-router serve`` subprocesses; the engines are SimulatedEngines on 127.0.0.1.
Every wait is bounded; no assertion is about timing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from cache_router import CacheAwarePolicy, RoutingRequest, WorkerRegistry
from cache_router.builder import RouterApp
from cache_router.core.registry import Worker
from cache_router.ops.fleet import FleetState, RedisFleetState, redact_url
from cache_router.testing import SimulatedEngine, serve_apps

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("redis") is None,
        reason="the redis package is not installed (pip install 'cache_router[redis]')",
    ),
    pytest.mark.anyio,
    pytest.mark.timeout(60),
]

HOST = "127.0.0.1"
#: Fast fleet settings for tests: the same code paths as production, shorter clocks.
FAST = {
    "heartbeat": 0.1,
    "ttl": 1.0,
    "flush_interval": 0.02,
    "timeout": 0.5,
    "max_backoff": 0.2,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed: no certificates for the TLS test")
        files = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        ca_key, request, extensions = (directory / n for n in ("ca.key", "server.csr", "san"))
        extensions.write_text(f"subjectAltName=IP:{HOST}\n")
        for argv in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
             "-out", files.ca, "-days", "1", "-subj", "/CN=cache_router test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key,
             "-out", request, "-subj", f"/CN={HOST}"],
            ["x509", "-req", "-in", request, "-CA", files.ca, "-CAkey", ca_key,
             "-CAcreateserial", "-out", files.cert, "-days", "1", "-extfile", extensions],
        ):  # fmt: skip
            subprocess.run([openssl, *map(str, argv)], check=True, capture_output=True)
        return files


class RedisServer:
    """A throwaway ``redis-server`` process on a loopback port; restartable on that port.
    With ``tls`` it listens for TLS only and its URL names the CA to trust."""

    def __init__(self, password: str | None = None, tls: TlsFiles | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        secret = "" if password is None else f":{password}@"
        scheme, trust = ("redis", "") if tls is None else ("rediss", f"?ssl_ca_certs={tls.ca}")
        self.url = f"{scheme}://{secret}{HOST}:{self.port}/0{trust}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        auth = [] if self.password is None else ["--requirepass", self.password]
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                      "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                      "--tls-ca-cert-file", str(self.tls.ca)]  # fmt: skip
        self.process = subprocess.Popen(
            [REDIS_SERVER, *listen, "--bind", HOST, "--save", "", "--appendonly", "no", *auth],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        client = self.client(timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def client(self, timeout: float = 2) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def engines(count: int, **knobs: Any) -> list[SimulatedEngine]:
    return [SimulatedEngine(name=f"engine-{i}", **knobs) for i in range(count)]


@dataclass
class Replica:
    registry: WorkerRegistry
    policy: CacheAwarePolicy
    fleet: RedisFleetState | None
    app: RouterApp


def replica(urls: Sequence[str], redis_url: str | None, fleet: str, **policy: Any) -> Replica:
    registry = WorkerRegistry(urls)
    chosen = CacheAwarePolicy(seed=len(urls), **policy)
    state = (
        None
        if redis_url is None
        else RedisFleetState(registry, chosen, redis_url, fleet=fleet, **FAST)
    )  # type: ignore[arg-type]
    tasks = [] if state is None else [state]
    app = RouterApp(SimulatedEngine(), registry, chosen, events=tasks, background=tasks)
    return Replica(registry, chosen, state, app)


def routed(state: RedisFleetState, worker: Worker, request: RoutingRequest) -> None:
    """What a news-making selection does: the policy shares it, the middleware reports it."""
    state.share(request, worker.url)
    state.request_routed(worker, request)


def all_learned(states: Sequence[RedisFleetState]) -> bool:
    """Every decision published, and learned by every other replica."""
    published = sum(state.published for state in states)
    return all(
        state.pending == 0 and state.applied == published - state.published for state in states
    )


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


def completion(prompt: str, max_tokens: int = 2, stream: bool = False) -> dict[str, Any]:
    return {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


@asynccontextmanager
async def held_streams(
    client: httpx.AsyncClient, url: str, prompts: Sequence[str]
) -> AsyncIterator[list[str]]:
    """One long streamed completion per prompt, open until the block ends; yields the
    engines that serve them. Streams broken by a dying router end quietly."""
    release = anyio.Event()
    served: list[str] = []

    async def hold(prompt: str) -> None:
        body = completion(prompt, max_tokens=4000, stream=True)
        with contextlib.suppress(httpx.HTTPError):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                chunks = response.aiter_raw()  # referenced: its finalizer closes the stream
                await chunks.__anext__()
                served.append(response.headers["x-engine"])
                await release.wait()
                await chunks.aclose()

    async with anyio.create_task_group() as group:
        for prompt in prompts:
            group.start_soon(hold, prompt)
        await wait_until(lambda: len(served) == len(prompts))
        yield served
        release.set()


# -- sharing decisions -----------------------------------------------------------------------


async def test_decisions_reach_the_other_replicas_and_late_starters_catch_up(
    redis_server: RedisServer, fleet_name: str
) -> None:
    urls = ["http://10.0.0.1:1", "http://10.0.0.2:1"]
    a, b = (replica(urls, redis_server.url, fleet_name) for _ in range(2))
    assert a.fleet is not None and b.fleet is not None
    long_key = "system prompt " * 1000  # 14,000 characters: published truncated
    async with anyio.create_task_group() as group:
        group.start_soon(a.fleet.run)
        group.start_soon(b.fleet.run)
        worker = a.registry.workers[1]
        a.fleet.share(RoutingRequest(long_key, "m"), worker.url)
        a.fleet.share(RoutingRequest("ünïcödé \ud800 prompt", None), worker.url)
        a.fleet.share(RoutingRequest("tokens", "m", tokens=True), a.registry.workers[0].url)
        a.fleet.share(RoutingRequest("", "m"), worker.url)  # nothing to learn: skipped
        a.fleet.share(RoutingRequest("x", "m"), worker.url)
        # A worker B does not know: not learned.
        a.fleet.share(RoutingRequest("elsewhere", "m"), "http://10.9.9.9:1")
        await wait_until(lambda: a.fleet.published == 5 and b.fleet.applied == 4)
        tree = b.policy.tree("m")
        match = tree.prefix_match(long_key + " and a question")
        assert match.length == 8192 and match.tenants == {urls[1]}
        assert b.policy.tree(None).prefix_match("ünïcödé \ud800 prompt!").tenants == {urls[1]}
        assert b.policy.tree("m", tokens=True).prefix_match("tokens").tenants == {urls[0]}
        assert b.policy.tree("m").prefix_match("elsewhere").length == 0
        # A never learns its own decisions back.
        assert a.fleet.applied == 0 and a.policy.tree_size == 0
        # A replica started later reads the stream from its start.
        c = replica(urls, redis_server.url, fleet_name)
        assert c.fleet is not None
        group.start_soon(c.fleet.run)
        await wait_until(lambda: c.fleet.applied == 4)
        assert c.policy.tree("m").prefix_match("x").tenants == {urls[1]}
        group.cancel_scope.cancel()


async def test_the_policy_reports_its_news_to_a_running_fleet_only(
    redis_server: RedisServer, fleet_name: str
) -> None:
    registry = WorkerRegistry(["http://10.0.0.1:1", "http://10.0.0.2:1"])
    policy = CacheAwarePolicy(seed=1)
    state = RedisFleetState(registry, policy, redis_server.url, fleet=fleet_name, **FAST)  # type: ignore[arg-type]
    workers = list(registry)
    policy.select(RoutingRequest("not running yet", None), workers)
    assert state.pending == 0
    async with anyio.create_task_group() as group:
        await group.start(state.run)
        policy.select(RoutingRequest("a first prompt", None), workers)  # a miss: news
        await wait_until(lambda: state.published == 1)
        ticks = state.ticks
        # A hit on the prompt's only holder: not news.
        policy.select(RoutingRequest("a first prompt, continued", None), workers)
        await wait_until(lambda: state.ticks > ticks + 1)
        assert (state.published, state.pending) == (1, 0)
        group.cancel_scope.cancel()
    policy.select(RoutingRequest("stopped", None), workers)  # nothing left subscribed
    assert state.pending == 0


async def test_a_prefix_move_reaches_the_other_replicas_once(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """The precise policy's prefix move is a hit on its new worker alone, which the news
    rule would share 1 time in 64: it is shared at once, so the other replicas' trees
    (their guess for workers whose event stream is stale) know where the prefix went,
    and the hits that follow it are not shared."""
    from test_precise_routing import _pinned_fleet, ids

    from cache_router import encode_tokens

    policy, workers, prefixes = _pinned_fleet([3, 2, 2, 1], move_window=16)
    urls = [worker.url for worker in workers]
    a = RedisFleetState(WorkerRegistry(urls), policy, redis_server.url, fleet=fleet_name, **FAST)  # type: ignore[arg-type]
    b = replica(urls, redis_server.url, fleet_name)
    assert b.fleet is not None
    key = encode_tokens(ids(prefixes[0] + "question A"))
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        group.start_soon(b.fleet.run)
        request = RoutingRequest(key, tokens=True)
        assert policy.select(request, workers).url == urls[3] and request.outcome == "moved"
        for letter in "BCDEFG":  # its later hits follow it, unannounced
            text = prefixes[0] + "question " + letter
            assert policy.select(RoutingRequest(encode_tokens(ids(text)), tokens=True), workers)
        await wait_until(lambda: b.fleet is not None and b.fleet.applied == 1)
        ticks = a.ticks
        await wait_until(lambda: a.ticks > ticks + 1)
        group.cancel_scope.cancel()
    assert (a.published, b.fleet.applied) == (1, 1)
    assert b.policy.tree(None, tokens=True).prefix_match(key).tenants == {urls[3]}


async def test_a_policy_with_only_learn_is_taught_one_decision_at_a_time(
    redis_server: RedisServer, fleet_name: str
) -> None:
    class LearnsOneByOne:
        def __init__(self) -> None:
            self.learned: list[tuple[RoutingRequest, str]] = []

        def learn(self, request: RoutingRequest, worker_url: str) -> None:
            self.learned.append((request, worker_url))

    urls = ["http://10.0.0.1:1", "http://10.0.0.2:1"]
    registries = [WorkerRegistry(urls) for _ in range(2)]
    policies = [LearnsOneByOne() for _ in range(2)]
    a, b = (
        RedisFleetState(registry, policy, redis_server.url, fleet=fleet_name, **FAST)  # type: ignore[arg-type]
        for registry, policy in zip(registries, policies, strict=True)
    )
    async with anyio.create_task_group() as group:
        group.start_soon(a.run)
        group.start_soon(b.run)
        a.request_routed(registries[0].workers[1], RoutingRequest("a prompt", "m"))
        a.request_routed(registries[0].workers[0], RoutingRequest("ids", "m", tokens=True))
        await wait_until(lambda: b.applied == 2)
        group.cancel_scope.cancel()
    assert [(r.key, r.model, r.tokens, url) for r, url in policies[1].learned] == [
        ("a prompt", "m", False, urls[1]),
        ("ids", "m", True, urls[0]),
    ]
    assert policies[0].learned == []


async def test_a_password_protected_redis_is_used_and_a_wrong_password_never_logged(
    fleet_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(password="s3cret-pw")
    server.start()
    try:
        urls = ["http://10.0.0.1:1"]
        a, b = (replica(urls, server.url, fleet_name) for _ in range(2))
        wrong = replica(urls, server.url.replace("s3cret-pw", "wrong-pw"), fleet_name)
        assert a.fleet is not None and b.fleet is not None and wrong.fleet is not None
        with caplog.at_level(logging.WARNING, logger="cache_router.ops.fleet"):
            async with anyio.create_task_group() as group:
                for state in (a.fleet, b.fleet, wrong.fleet):
                    group.start_soon(state.run)
                a.fleet.share(RoutingRequest("a prompt", "m"), urls[0])
                # ``applied`` counts inside an exchange, ``connected`` once it has ended:
                # both are waited for, not read in between.
                await wait_until(
                    lambda: (
                        b.fleet.applied == 1
                        and a.fleet.connected
                        and b.fleet.connected
                        and wrong.fleet.outages >= 1
                    )
                )
                assert not wrong.fleet.connected
                assert wrong.fleet.applied == 0
                group.cancel_scope.cancel()
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert "is unreachable" in logged
        assert "wrong-pw" not in logged and "s3cret-pw" not in logged
    finally:
        server.stop()


async def test_a_tls_redis_is_used_and_an_untrusted_certificate_is_an_outage(
    fleet_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``rediss://`` with the CA in the URL; without it (only the system's trust store), or
    speaking plain text to the TLS port, the replica routes alone and says why."""
    server = RedisServer(tls=TlsFiles.create(tmp_path))
    server.start()
    try:
        urls = ["http://10.0.0.1:1"]
        no_ca = server.url.split("?")[0]
        connecting = [server.url, server.url, no_ca, no_ca.replace("rediss:", "redis:")]
        states = [RedisFleetState(WorkerRegistry(urls), CacheAwarePolicy(), url,
                                  fleet=fleet_name, **FAST) for url in connecting]  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="cache_router.ops.fleet"):
            async with anyio.create_task_group() as group:
                for state in states:
                    group.start_soon(state.run)
                states[0].share(RoutingRequest("a prompt", "m"), urls[0])
                await wait_until(
                    lambda: (
                        states[1].applied == 1
                        and all(s.connected for s in states[:2])
                        and all(s.outages >= 1 for s in states[2:])
                    )
                )
                assert [s.connected for s in states[2:]] == [False, False]
                assert [s.applied for s in states[2:]] == [0, 0]
                assert server.client().scard(states[0].replicas_key) == 2
                group.cancel_scope.cancel()
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert "CERTIFICATE_VERIFY_FAILED" in logged
        assert logged.count("is unreachable") == 2
    finally:
        server.stop()


async def test_shared_prefixes_keep_the_hit_rate_of_a_single_replica(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """Conversations whose turns go to replicas round robin: with shared state the engines'
    prefix-cache hit rate stays within 5 points of one replica.

    Requests go one at a time, and the replicas wait for each other's decisions after each,
    so the comparison is deterministic: it measures what is shared, not how fast
    (benchmarks/scale_out.py measures the propagation lag too). One at a time, replicas
    sharing nothing match one replica too: every load is 0, and a miss's tie on load goes
    by the key's head, alike in every replica (docs/policies.md). What sharing adds under
    concurrent load, where the replicas' own loads differ, is for benchmarks/scale_out.py.
    """
    users, rounds = 12, 4
    systems = [f"group {g} system prompt: " + "lorem ipsum dolor " * 40 for g in range(4)]

    async def hit_rate(replica_count: int, redis_url: str | None, name: str) -> float:
        fleet_engines = engines(4, prefill_seconds_per_char=1e-6, decode_seconds_per_token=0)
        with serve_apps(fleet_engines) as urls:
            replicas = [replica(urls, redis_url, name) for _ in range(replica_count)]
            states = [r.fleet for r in replicas if r.fleet is not None]
            with serve_apps([r.app for r in replicas], lifespan="on") as router_urls:
                async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                    histories = [systems[u % 4] for u in range(users)]
                    for round_number in range(rounds):
                        for user in range(users):
                            question = f"\nuser {user} asks question {round_number} " * 4
                            router = router_urls[(user + round_number) % replica_count]
                            prompt = histories[user] + question
                            answer = await client.post(
                                f"{router}/v1/completions", json=completion(prompt, 8)
                            )
                            assert answer.status_code == 200
                            histories[user] = prompt + answer.json()["choices"][0]["text"]
                            await wait_until(partial(all_learned, states))
            stats = [engine.stats() for engine in fleet_engines]
        return sum(s.cached_chars for s in stats) / sum(s.prompt_chars for s in stats)

    single = await hit_rate(1, None, fleet_name)
    shared = await hit_rate(3, redis_server.url, fleet_name)
    isolated = await hit_rate(3, None, fleet_name)
    assert abs(shared - single) <= 0.05, (single, shared)
    assert abs(isolated - single) <= 0.05, (single, isolated)  # the tie-break, alone


# -- sharing load --------------------------------------------------------------------------


async def test_the_imbalance_gate_fires_at_the_global_load(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """Requests held on an engine through replica A make replica B avoid it, although B
    itself has nothing in flight there and B's tree says the prefix is cached there."""
    knobs = {"balance_abs_threshold": 4, "balance_rel_threshold": 1.5}
    fleet_engines = engines(2, decode_seconds_per_token=0.01, max_tokens_limit=4000)
    prefix = "a long shared system prompt, " * 20
    with serve_apps(fleet_engines) as urls:
        a, b = (replica(urls, redis_server.url, fleet_name, **knobs) for _ in range(2))
        assert a.fleet is not None and b.fleet is not None
        with serve_apps([a.app, b.app], lifespan="on") as (url_a, url_b):
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                first = await client.post(f"{url_a}/v1/completions", json=completion(prefix))
                home = first.headers["x-engine"]
                await wait_until(lambda: b.fleet.applied >= 1)
                # Balanced fleet: B follows the prefix A cached.
                again = await client.post(
                    f"{url_b}/v1/completions", json=completion(prefix + "question 0")
                )
                assert again.headers["x-engine"] == home
                # Five long requests through A, all on the prefix's engine (A's own gate
                # allows 4 + 1 there: 4 - 0 is not above the threshold of 4).
                # (Once A no longer counts B's finished request as external load.)
                await wait_until(lambda: not any(w.external_load for w in a.registry))
                prompts = [prefix + f"held {i}" for i in range(5)]
                async with held_streams(client, url_a, prompts) as served:
                    assert served == [home] * 5
                    hot = next(w for w in b.registry if w.url == urls[int(home[-1])])
                    await wait_until(lambda: hot.external_load == 5)
                    assert hot.load == 0
                    balanced = b.policy.decisions["balanced"]
                    moved = await client.post(
                        f"{url_b}/v1/completions", json=completion(prefix + "question 1")
                    )
                    assert moved.status_code == 200
                    assert moved.headers["x-engine"] != home
                    assert b.policy.decisions["balanced"] == balanced + 1
                await wait_until(lambda: hot.external_load == 0)


def serve_command(redis_url: str, fleet: str, urls: Sequence[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cache_router", "serve", "--host", HOST,
        "--worker-urls", *urls, "--redis-url", redis_url, "--fleet-name", fleet,
        "--fleet-heartbeat-secs", "0.1", "--fleet-ttl-secs", "1.0", "--log-level", "warning",
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def router_process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        assert process.stderr is not None
        process.stderr.close()


async def wait_ready(client: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(20):
        while True:
            assert process.poll() is None, "the router exited at startup"
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readiness")).status_code == 200:
                    return
            await anyio.sleep(0.05)


async def test_a_killed_replica_leaves_no_load_behind(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """A real router process is SIGKILLed with requests in flight: once its heartbeat
    expires, the surviving replica counts none of its load."""
    fleet_engines = engines(2, decode_seconds_per_token=0.01, max_tokens_limit=4000)
    with serve_apps(fleet_engines) as urls:
        survivor = replica(urls, redis_server.url, fleet_name)
        assert survivor.fleet is not None
        port = free_port()
        argv = serve_command(redis_server.url, fleet_name, urls, "--port", str(port))
        async with (
            httpx.AsyncClient(trust_env=False, timeout=30) as client,
            anyio.create_task_group() as group,
        ):
            group.start_soon(survivor.fleet.run)
            with router_process(argv) as process:
                victim = f"http://{HOST}:{port}"
                await wait_ready(client, victim, process)
                prompts = [f"burst request {i} " * 10 for i in range(6)]
                async with held_streams(client, victim, prompts):
                    await wait_until(lambda: sum(w.external_load for w in survivor.registry) == 6)
                    assert len(survivor.fleet.replicas) == 1
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(5)
            await wait_until(lambda: sum(w.external_load for w in survivor.registry) == 0)
            await wait_until(lambda: not survivor.fleet.replicas)
            # The survivor also deletes the dead replica from the replica list.
            store, me = redis_server.client(), survivor.fleet.replica_id.encode()
            await wait_until(lambda: store.smembers(survivor.fleet.replicas_key) == {me})
            group.cancel_scope.cancel()


async def test_worker_processes_each_join_the_fleet_and_leave_on_shutdown(
    redis_server: RedisServer, fleet_name: str
) -> None:
    with serve_apps(engines(1)) as urls:
        port = free_port()
        argv = serve_command(redis_server.url, fleet_name, urls, "--port", str(port))
        key = f"cache_router:{{{fleet_name}}}:replicas"
        store = redis_server.client()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            with router_process([*argv, "--workers", "2"]) as process:
                await wait_ready(client, f"http://{HOST}:{port}", process)
                await wait_until(lambda: store.scard(key) == 2, seconds=20)
                for i in range(4):
                    answer = await client.post(
                        f"http://{HOST}:{port}/v1/completions", json=completion(f"p{i}")
                    )
                    assert answer.status_code == 200
                os.killpg(process.pid, signal.SIGTERM)  # graceful: replicas leave at once
                process.wait(15)
                assert process.returncode == -signal.SIGTERM  # as one process (143)
            assert store.scard(key) == 0
            assert store.keys(f"cache_router:{{{fleet_name}}}:load:*") == []


# -- failures ------------------------------------------------------------------------------


async def test_redis_down_or_stalled_changes_nothing_clients_see(
    redis_server: RedisServer, fleet_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cache_router.ops.fleet")
    fleet_engines = engines(2, decode_seconds_per_token=0.0005)
    with serve_apps(fleet_engines) as urls:
        replicas = [replica(urls, redis_server.url, fleet_name) for _ in range(2)]
        states = [r.fleet for r in replicas if r.fleet is not None]
        with serve_apps([r.app for r in replicas], lifespan="on") as router_urls:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                sent = 0

                async def burst(count: int, news: bool = False) -> None:
                    """Shared prefixes; with `news`, prefixes only the receiving router has
                    seen, so each replica has placements to share (hits on a sole holder are
                    not shared)."""
                    nonlocal sent
                    statuses: list[int] = []

                    async def one(i: int) -> None:
                        router = router_urls[i % 2]
                        topic = f"new to router {i % 2} at {sent}" if news else "shared prefix"
                        body = completion(f"{topic} {i % 3} " * 20 + str(i))
                        statuses.append(
                            (await client.post(f"{router}/v1/completions", json=body)).status_code
                        )

                    async with anyio.create_task_group() as group:
                        for i in range(count):
                            group.start_soon(one, sent + i)
                    sent += count
                    assert statuses == [200] * count

                await wait_until(lambda: all(state.connected for state in states))
                await burst(20)
                redis_server.stop()
                await burst(20)  # whether or not the replicas noticed yet
                await wait_until(lambda: not any(state.connected for state in states))
                assert all(w.external_load == 0 for r in replicas for w in r.registry)
                await burst(20)
                redis_server.start()  # same port: the replicas reconnect by themselves
                await wait_until(lambda: all(state.connected for state in states))
                applied = [state.applied for state in states]
                await burst(20, news=True)
                await wait_until(
                    lambda: all(s.applied > n for s, n in zip(states, applied, strict=True))
                )
                # A stalled Redis (every client paused) is an outage too, and invisible.
                redis_server.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
                await burst(20)
                await wait_until(lambda: all(state.outages == 2 for state in states))
                await wait_until(lambda: all(state.connected for state in states))
                await burst(10)
    outage_warnings = [
        record for record in caplog.records if "is unreachable" in record.getMessage()
    ]
    assert len(outage_warnings) == 2 * len(states)  # once per replica per outage
    assert all("routing on this replica's own state" in r.getMessage() for r in outage_warnings)


def test_redis_is_never_awaited_on_the_request_path() -> None:
    """Decisions are buffered, bounded, without a Redis connection; the oldest go first."""
    registry = WorkerRegistry(["http://10.0.0.1:1"])
    state = RedisFleetState(registry, CacheAwarePolicy(), "redis://127.0.0.1:1/0", max_pending=3)
    worker = registry.workers[0]
    for i in range(5):
        routed(state, worker, RoutingRequest(f"key {i}", None))
    assert (state.pending, state.dropped) == (3, 2)
    assert [decision[3] for decision in state._pending] == ["key 2", "key 3", "key 4"]


def test_settings_and_the_in_process_default() -> None:
    registry = WorkerRegistry(["http://10.0.0.1:1"])
    policy = CacheAwarePolicy()
    for options in (
        {"fleet": "has space"},
        {"fleet": "{tag}"},
        {"replica_id": ""},
        {"heartbeat": 1.0, "ttl": 1.0},
        {"heartbeat": 0},
        {"stream_maxlen": 0},
        {"max_key_chars": 0},
    ):
        with pytest.raises(ValueError):
            RedisFleetState(registry, policy, "redis://h:1", **options)  # type: ignore[arg-type]
    assert FleetState().connected
    assert redact_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert (
        redact_url("rediss://:pw@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=k&password=p")
        == "rediss://:***@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=***&password=***"
    )


def test_serve_workers_hands_its_configuration_to_each_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``--workers N`` runs uvicorn's multiprocess mode on a factory that rebuilds the
    app from the configuration; without --redis-url it warns that nothing is shared."""
    from cache_router import serve_workers
    from cache_router.builder import build_router
    from cache_router.config import RouterConfig

    calls: list[dict[str, Any]] = []

    class FakeUvicorn:
        @staticmethod
        def run(app: str, **options: Any) -> None:
            calls.append({"app": app, **options})

    monkeypatch.setenv(serve_workers.SERVE_CONFIG_ENV, "restored by monkeypatch at teardown")
    config = RouterConfig(worker_urls=("http://10.0.0.1:1", "http://10.0.0.2:1"), workers=3)
    caplog.set_level(logging.WARNING, logger="cache_router.serve")
    assert (
        serve_workers.uvicorn_workers(build_router(config), FakeUvicorn, ["http://10.0.0.2:1"]) == 0
    )
    (call,) = calls
    assert (call["app"], call["factory"], call["workers"]) == (
        "cache_router.serve_workers:app_from_env", True, 3,
    )  # fmt: skip
    assert "will not share" in caplog.text
    app = serve_workers.app_from_env()
    assert [worker.healthy for worker in app.registry] == [True, False]
    assert not [task for task in app.background if isinstance(task, RedisFleetState)]
    config = config.replace(redis_url="redis://127.0.0.1:1/0")
    caplog.clear()
    serve_workers.uvicorn_workers(build_router(config), FakeUvicorn, [])
    assert "will not share" not in caplog.text
    app = serve_workers.app_from_env()
    (state,) = [task for task in app.background if isinstance(task, RedisFleetState)]
    assert state in app.routing._events.listeners
    assert (state.max_flush_interval, state.flush_batch) == (0.2, 1)  # the defaults
    os.environ.pop(serve_workers.SERVE_CONFIG_ENV)
    with pytest.raises(RuntimeError):
        serve_workers.app_from_env()


def test_serve_passes_the_longest_exchange_wait_and_refuses_one_beyond_the_heartbeat() -> None:
    from cache_router.builder import build_router
    from cache_router.config import ConfigError, RouterConfig

    def fleet_of(**options: Any) -> RedisFleetState:
        config = RouterConfig(
            worker_urls=("http://10.0.0.1:1",), redis_url="redis://127.0.0.1:1/0", **options
        )
        (state,) = [
            task for task in build_router(config).background if isinstance(task, RedisFleetState)
        ]
        return state

    assert fleet_of(fleet_max_flush_secs=0.05).max_flush_interval == 0.05
    # Without the option, a short heartbeat caps the default.
    assert fleet_of(fleet_heartbeat_secs=0.1).max_flush_interval == 0.1
    with pytest.raises(ConfigError, match="fleet_max_flush_secs"):
        fleet_of(fleet_max_flush_secs=0.9)  # beyond the 0.5 s heartbeat


async def test_an_idle_replica_slows_down_and_its_next_request_wakes_it(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """Idle, a replica exchanges state once per heartbeat; the request it routes next is
    published at once. (The heartbeat here is longer than the test's bounded wait, so
    without the wake-up the decision could not arrive.)"""
    registry = WorkerRegistry(["http://10.0.0.1:1"])
    options = {**FAST, "heartbeat": 30.0, "ttl": 60.0}
    state = RedisFleetState(
        registry, CacheAwarePolicy(), redis_server.url, fleet=fleet_name, **options
    )  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(state.run)
        await wait_until(lambda: state.idle)
        ticks = state.ticks
        routed(state, registry.workers[0], RoutingRequest("wake up", None))
        await wait_until(lambda: state.published == 1, seconds=10)
        assert state.ticks == ticks + 1
        await wait_until(lambda: state.idle)  # and back to sleep when quiet again
        group.cancel_scope.cancel()


async def test_a_replica_exchanges_once_a_batch_waits_and_at_the_latest_after_the_max(
    redis_server: RedisServer, fleet_name: str
) -> None:
    """Between ``flush_interval`` and ``max_flush_interval``, an exchange starts as soon as
    ``flush_batch`` decisions wait; fewer wait for ``max_flush_interval``."""
    registry = WorkerRegistry(["http://10.0.0.1:1"])
    options = {**FAST, "heartbeat": 10.0, "ttl": 20.0, "max_flush_interval": 1.5}
    state = RedisFleetState(
        registry, CacheAwarePolicy(), redis_server.url, fleet=fleet_name, flush_batch=4,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip
    worker = registry.workers[0]
    async with anyio.create_task_group() as group:
        group.start_soon(state.run)
        ticks = state.ticks
        await wait_until(lambda: state.ticks > ticks)  # an exchange just ended
        started = time.monotonic()
        for i in range(3):
            routed(state, worker, RoutingRequest(f"prompt {i}", None))
        await anyio.sleep(0.3)
        assert state.published == 0  # three of four: still waiting
        routed(state, worker, RoutingRequest("prompt 3", None))
        await wait_until(lambda: state.published == 4, seconds=5)
        assert time.monotonic() - started < 1.2  # the batch, not the deadline, sent them
        ticks = state.ticks
        await wait_until(lambda: state.ticks > ticks)
        started = time.monotonic()
        routed(state, worker, RoutingRequest("a lone prompt", None))
        await wait_until(lambda: state.published == 5, seconds=10)
        assert time.monotonic() - started > 0.5  # it waited for more to come
        group.cancel_scope.cancel()


@pytest.mark.timeout(120)
def test_the_scale_out_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/scale_out.py at smoke size, so it never rots (numbers are not asserted)."""
    pytest.importorskip("aiohttp")
    from benchmarks import scale_out

    out = tmp_path / "rows.jsonl"
    rows = scale_out.main(
        ["--size", "smoke", "--replicas", "2", "--modes", "local,redis", "--engines", "2",
         "--json", str(out)]
    )  # fmt: skip
    assert [(row["mode"], row["replicas"]) for row in rows] == [("local", 2), ("redis", 2)]
    for row in rows:
        assert row["requests"] == scale_out.SIZES["smoke"].requests
        assert row["errors"] == 0 and row["cpu_errors"] == 0
        assert 0 <= row["hit_rate"] <= 1 and 0 < row["busiest_share"] <= 1
        assert row["saturated_cpu_us_per_req"] >= 0  # 10 ms resolution: may read 0
    assert len(out.read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "| redis | 2 |" in printed
    # At smoke size the CPU figures are a tick or two (10 ms) and often read 0: the note
    # compares only figures both modes have, so it may be left out (see the next test).
    assert all(note in printed for note in scale_out.overhead(rows))


def test_the_scale_out_overhead_note_compares_only_measured_figures() -> None:
    from benchmarks import scale_out

    def row(mode: str, routing: float, saturated: float) -> dict[str, Any]:
        return {
            "mode": mode,
            "replicas": 2,
            "workers": 1,
            "router_cpu_us_per_req": routing,
            "saturated_cpu_us_per_req": saturated,
        }

    assert scale_out.overhead([row("local", 1000, 0), row("redis", 1500, 500)]) == [
        "redis x2 router CPU/request vs local: routing phases +50.0%"
    ]
    assert scale_out.overhead([row("local", 0, 500), row("redis", 1500, 0)]) == []
