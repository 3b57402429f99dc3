"""DNS discovery against a real DNS server: dnslib's, on a free loopback UDP port.

The router (``build_router`` with ``discover_dns``) asks that server for the A and AAAA
records of a name every 0.05 s; the test changes the records and checks that workers are
added and drained as addresses come and go, and that a failing server drains nothing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import httpx
import pytest
from mock_engine import wait_until

from cache_router.builder import Router, build_router
from cache_router.config import ConfigError, RouterConfig
from cache_router.ops.discovery.dns import DnsDiscovery, parse_dns_target, parse_nameserver
from cache_router.testing import SimulatedEngine
from cache_router.testing.server import BackgroundServer

dnslib = pytest.importorskip("dnslib")
pytest.importorskip("dns.asyncresolver")
from dnslib.server import BaseResolver, DNSServer  # noqa: E402

pytestmark = pytest.mark.timeout(60)

NAME = "engines.test."


class Zone(BaseResolver):  # type: ignore[misc]
    """Answers from ``records`` (name -> addresses); SERVFAIL for everything when ``fail``."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.fail = False
        self.queries = 0
        self._lock = threading.Lock()

    def set(self, name: str, *addresses: str) -> None:
        with self._lock:
            self.records[name] = list(addresses)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname)
        qtype = dnslib.QTYPE[request.q.qtype]
        with self._lock:
            self.queries += 1
            if self.fail:
                reply.header.rcode = dnslib.RCODE.SERVFAIL
                return reply
            addresses = self.records.get(qname)
        if addresses is None:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        for address in addresses:
            if qtype == "A" and ":" not in address:
                reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=0))
            elif qtype == "AAAA" and ":" in address:
                rdata = dnslib.AAAA(address)
                reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.AAAA, rdata=rdata, ttl=0))
        return reply


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    resolver = Zone()
    server = DNSServer(resolver, address="127.0.0.1", port=0)
    server.start_thread()
    try:
        yield resolver, server.server.server_address[1]
    finally:
        server.stop()
        server.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_targets_and_nameservers_parse() -> None:
    assert parse_dns_target("engines.default.svc:8000") == ("engines.default.svc", 8000)
    assert parse_dns_target("engine:80") == ("engine", 80)
    for bad in ("engines", "engines:", "engines:0", "engines:99999", ":80", "a b:80"):
        with pytest.raises(ValueError):
            parse_dns_target(bad)
    assert parse_nameserver("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_nameserver("127.0.0.1:8600") == ("127.0.0.1", 8600)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    with pytest.raises(ValueError):
        parse_nameserver("dns.example:53")


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="discover_dns"):
        RouterConfig(discover_dns=("no-port",))
    with pytest.raises(ConfigError, match="discover_dns_nameserver"):
        RouterConfig(discover_dns=("a:80",), discover_dns_nameserver="name:53")
    with pytest.raises(ConfigError, match="needs --selector"):
        RouterConfig(service_discovery=True)


class NullSink:
    async def add(self, url: str, *, role: Any, bootstrap_port: int | None) -> bool:
        return True

    async def remove(self, url: str) -> None:
        return None


@pytest.mark.anyio
async def test_a_and_aaaa_records_both_count_and_nxdomain_is_empty(
    zone: tuple[Zone, int],
) -> None:
    resolver, port = zone
    resolver.set(NAME, "127.0.0.1", "::1")
    discovery = DnsDiscovery(NullSink(), NAME, 80, nameserver=("127.0.0.1", port))
    assert await discovery.addresses() == {"127.0.0.1", "::1"}
    resolver.set(NAME)
    assert await discovery.addresses() == set()
    assert (
        await DnsDiscovery(
            NullSink(), "missing.test.", 80, nameserver=("127.0.0.1", port)
        ).addresses()
        == set()
    )
    resolver.fail = True
    assert await discovery.addresses() is None
    # No server at all: a failure too, never an empty fleet.
    silent = DnsDiscovery(NullSink(), NAME, 80, nameserver=("127.0.0.1", free_port()), timeout=0.3)
    assert await silent.addresses() is None
    await anyio.sleep(0)


def test_workers_follow_the_records_and_survive_a_dns_outage(zone: tuple[Zone, int]) -> None:
    resolver, dns_port = zone
    port = free_port()  # one engine port, on one loopback address per instance
    engines = [SimulatedEngine(name=f"e{index}") for index in (1, 2)]
    first, second = f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"
    with ExitStack() as stack:
        for index, engine in enumerate(engines, start=1):
            stack.enter_context(BackgroundServer(engine, host=f"127.0.0.{index}", port=port))
        config = RouterConfig(
            discover_dns=(f"{NAME}:{port}",),
            discover_dns_interval=0.05,
            discover_dns_nameserver=f"127.0.0.1:{dns_port}",
            worker_startup_timeout_secs=10,
        )
        router: Router = build_router(config)
        url = stack.enter_context(BackgroundServer(router.app(), lifespan="on"))
        client = stack.enter_context(httpx.Client(base_url=url, trust_env=False, timeout=20))

        def urls() -> set[str]:
            return {worker.url for worker in router.registry}

        resolver.set(NAME, "127.0.0.1")
        wait_until(lambda: urls() == {first}, timeout=10)
        resolver.set(NAME, "127.0.0.1", "127.0.0.2")
        wait_until(lambda: urls() == {first, second}, timeout=10)
        answer = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200

        resolver.fail = True  # an outage: the fleet stays as it is
        asked = resolver.queries
        wait_until(lambda: resolver.queries >= asked + 6, timeout=10)
        assert urls() == {first, second}
        assert not any(worker.draining for worker in router.registry)

        resolver.fail = False
        resolver.set(NAME, "127.0.0.2")  # an answer: the first address is gone
        wait_until(lambda: urls() == {second}, timeout=10)
        assert router.registry.total_load() == 0
