"""TLS to engines: ``--ca-cert-paths``, ``--client-cert-path``, ``--client-key-path``.

Real uvicorn engines on 127.0.0.1 serve TLS with certificates from a throwaway CA
(``trustme``); the router reaches them through each transport, with and without mutual
TLS, and through the real CLI. A certificate the router cannot verify, or a client
certificate it does not present, fails the request (502) and the health checks (the
worker turns unhealthy, readiness 503); the router itself keeps serving.
"""

from __future__ import annotations

import functools
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from test_cli import ROOT, serve_process

from cache_router.builder import RouterApp, build_router
from cache_router.config import ConfigError, RouterConfig
from cache_router.core.errors import RouterError
from cache_router.ops.load_source import EngineLoadPoller
from cache_router.proxy.tls import TLSSettingError, client_ssl_context
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(90)

BODY = {"model": "sim", "prompt": "Hello over TLS", "max_tokens": 2}
#: auto is the HTTP/1.1 client on asyncio, for https:// engines too.
each_transport = pytest.mark.parametrize("transport", ["auto", "aiohttp", "httpx"])


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA that signed the engines' and the router's certificates
    other_ca: str  # a CA that signed nothing here
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    client_combined: str  # certificate and key in one file
    foreign_key: str  # a key that belongs to no certificate here
    foreign_server_cert: str  # a server certificate for 127.0.0.1 from the other CA
    foreign_server_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("router@example.test")
    stranger = other.issue_cert("stranger@example.test")
    foreign = other.issue_cert("127.0.0.1")
    foreign_key = foreign.private_key_pem

    def write(name: str, *blobs: trustme.Blob) -> str:
        path = folder / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return str(path)

    return Pki(
        ca=write("ca.pem", ca.cert_pem),
        other_ca=write("other-ca.pem", other.cert_pem),
        server_cert=write("server.pem", *server.cert_chain_pems),
        server_key=write("server.key", server.private_key_pem),
        client_cert=write("client.pem", *client.cert_chain_pems),
        client_key=write("client.key", client.private_key_pem),
        client_combined=write("client-both.pem", client.private_key_pem, *client.cert_chain_pems),
        foreign_key=write("stranger.key", stranger.private_key_pem),
        foreign_server_cert=write("foreign.pem", *foreign.cert_chain_pems),
        foreign_server_key=write("foreign.key", foreign_key),
    )


@contextmanager
def tls_engine(
    pki: Pki, *, mutual: bool = False, foreign: bool = False
) -> Iterator[tuple[str, SimulatedEngine]]:
    """A simulated engine behind uvicorn's TLS; ``mutual``: it requires a client
    certificate signed by the CA; ``foreign``: its certificate is from the other CA."""
    engine = SimulatedEngine(name="tls", model="sim", decode_seconds_per_token=0)
    options: dict[str, Any] = {
        "ssl_certfile": pki.foreign_server_cert if foreign else pki.server_cert,
        "ssl_keyfile": pki.foreign_server_key if foreign else pki.server_key,
    }
    if mutual:
        options.update(ssl_ca_certs=pki.ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    with serve_app(engine, **options) as url:
        yield url.replace("http://", "https://"), engine


@contextmanager
def routed(config: RouterConfig) -> Iterator[tuple[httpx.Client, RouterApp]]:
    """The production router for ``config`` served on loopback (plain HTTP to clients)."""
    app = build_router(config).app()
    with (
        serve_app(app, lifespan="on") as url,
        httpx.Client(base_url=url, trust_env=False, timeout=20) as client,
    ):
        yield client, app


def tls_config(url: str, **options: Any) -> RouterConfig:
    options.setdefault("health_check_interval_secs", 0.1)
    options.setdefault("health_failure_threshold", 1)
    options.setdefault("health_success_threshold", 1)
    options.setdefault("retry_max_retries", 1)
    return RouterConfig(worker_urls=[url], **options)


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    from mock_engine import wait_until

    wait_until(predicate, timeout=timeout, interval=0.05)


def assert_refused_and_still_up(client: httpx.Client, app: RouterApp, engine: Any) -> None:
    """A request fails with an OpenAI-shaped error, the engine's application never saw it,
    the health checks (same context) take the worker out, and the router keeps answering."""
    failed = client.post("/v1/completions", json=BODY)
    assert failed.status_code in (502, 503), failed.text
    assert failed.json()["error"]["code"]
    assert engine.stats().requests == 0
    wait_for(lambda: client.get("/readiness").status_code == 503)
    assert client.get("/liveness").status_code == 200
    again = client.post("/v1/completions", json=BODY)
    assert again.status_code == 503  # no healthy worker left: answered, not crashed
    assert app.registry.total_load() == 0


# -- the settings ---------------------------------------------------------------------------


def test_tls_files_are_checked_once_and_named_when_bad(pki: Pki, tmp_path: Path) -> None:
    good = RouterConfig(
        ca_cert_paths=[pki.ca, pki.other_ca],
        client_cert_path=pki.client_cert,
        client_key_path=pki.client_key,
    )
    assert good.ca_cert_paths == (pki.ca, pki.other_ca)
    assert RouterConfig(client_cert_path=pki.client_combined).client_key_path is None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    cases = {
        "ca_cert_paths": [
            {"ca_cert_paths": [pki.ca, missing]},
            {"ca_cert_paths": [str(garbage)]},
        ],
        "client_cert_path": [
            {"client_cert_path": missing, "client_key_path": pki.client_key},
            {"client_cert_path": str(garbage)},
            {"client_cert_path": pki.client_cert},  # no key in it, none given
            {"client_cert_path": pki.client_cert, "client_key_path": pki.foreign_key},
        ],
        "client_key_path": [
            {"client_key_path": pki.client_key},  # a key without its certificate
            {"client_cert_path": pki.client_cert, "client_key_path": missing},
        ],
    }
    for option, settings in cases.items():
        for setting in settings:
            with pytest.raises(ConfigError) as excinfo:
                RouterConfig(**setting)
            (problem,) = excinfo.value.problems
            assert problem.startswith(f"{option} (from RouterConfig(...)): "), (setting, problem)
    # The files are named, the library function says which option.
    with pytest.raises(TLSSettingError) as raised:
        client_ssl_context([missing])
    assert raised.value.option == "ca_cert_paths" and missing in str(raised.value)


# -- the relay, each transport ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["auto", "http1", "aiohttp", "httpx"])
def test_server_authenticated_engine_is_routed_on_every_transport(pki: Pki, transport: str) -> None:
    config = tls_config("https://127.0.0.1:1", ca_cert_paths=[pki.ca], upstream_transport=transport)
    with (
        tls_engine(pki) as (url, engine),
        routed(config.replace(worker_urls=[url])) as (
            client,
            app,
        ),
    ):
        answers = [client.post("/v1/completions", json=BODY) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [200] * 3, answers[0].text
        assert engine.stats().requests >= 3
        # auto: the HTTP/1.1 client speaks TLS itself (half aiohttp's CPU per request).
        upstream = app.routing.upstream
        assert upstream.transport_name == ("http1" if transport == "auto" else transport)
        if upstream.transport_name == "http1":  # TLS in the client itself, no fallback made
            assert upstream.client()._fallback is None  # type: ignore[attr-defined]
        assert client.get("/readiness").status_code == 200


@each_transport
def test_an_engine_signed_by_another_ca_is_refused_and_the_router_stays_up(
    pki: Pki, transport: str
) -> None:
    config = tls_config(
        "https://127.0.0.1:1", ca_cert_paths=[pki.other_ca], upstream_transport=transport
    )
    with (
        tls_engine(pki) as (url, engine),
        routed(config.replace(worker_urls=[url])) as (
            client,
            app,
        ),
    ):
        assert_refused_and_still_up(client, app, engine)


@each_transport
def test_a_refused_engine_certificate_is_retried_on_another_worker(
    pki: Pki, transport: str
) -> None:
    """The handshake fails before any byte of the request is sent: another worker takes it."""
    with (
        tls_engine(pki, foreign=True) as (bad_url, bad),
        tls_engine(pki) as (good_url, good),
        routed(
            RouterConfig(
                worker_urls=[bad_url, good_url],
                ca_cert_paths=[pki.ca],
                policy="round_robin",
                disable_health_check=True,
                disable_circuit_breaker=True,
                upstream_transport=transport,
            )
        ) as (client, app),
    ):
        answers = [client.post("/v1/completions", json=BODY) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [200] * 4
        assert bad.stats().requests == 0 and good.stats().requests == 4
        assert app.registry.total_load() == 0


# -- mutual TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("combined", [False, True], ids=["cert+key", "one-file"])
def test_mutual_tls_with_the_client_certificate_routes(pki: Pki, combined: bool) -> None:
    files: dict[str, Any] = (
        {"client_cert_path": pki.client_combined}
        if combined
        else {"client_cert_path": pki.client_cert, "client_key_path": pki.client_key}
    )
    with (
        tls_engine(pki, mutual=True) as (url, _),
        routed(tls_config(url, ca_cert_paths=[pki.ca], **files)) as (client, app),
    ):
        answer = client.post("/v1/completions", json=BODY)
        assert answer.status_code == 200, answer.text
        streamed = client.post("/v1/completions", json={**BODY, "stream": True})
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert app.routing.upstream.transport_name == "http1"
        # The health checks present the certificate as well: still ready after rounds.
        health = app.background[0]
        rounds = health.rounds  # type: ignore[attr-defined]
        wait_for(lambda: health.rounds >= rounds + 2)  # type: ignore[attr-defined]
        assert client.get("/readiness").status_code == 200


@each_transport
def test_mutual_tls_without_a_client_certificate_fails_and_the_router_stays_up(
    pki: Pki, transport: str
) -> None:
    with (
        tls_engine(pki, mutual=True) as (url, engine),
        routed(tls_config(url, ca_cert_paths=[pki.ca], upstream_transport=transport)) as (
            client,
            app,
        ),
    ):
        assert_refused_and_still_up(client, app, engine)


# -- the operations clients ------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_wait_model_discovery_and_load_poller_use_the_context(pki: Pki) -> None:
    with tls_engine(pki, mutual=True) as (url, _):
        base = RouterConfig(
            admin_prefix="/router",
            admin_allow_unauthenticated=True,
            worker_allow=["127.0.0.1"],
        )
        good = build_router(
            base.replace(
                ca_cert_paths=[pki.ca],
                client_cert_path=pki.client_cert,
                client_key_path=pki.client_key,
            )
        )
        assert good.admin is not None
        (worker,) = await good.admin.add(url, wait_healthy_secs=10)
        assert worker.discovered_models == ("sim",)  # discovery went over mutual TLS
        poller = EngineLoadPoller(good.registry, interval=0.5, ssl_context=good.ssl_context)
        try:
            await poller.poll_once()
        finally:
            await poller.aclose()
        assert poller.failures == 0 and poller.reported == {url: 0}
        bad = build_router(base.replace(ca_cert_paths=[pki.ca]))  # no client certificate
        assert bad.admin is not None
        with pytest.raises(RouterError) as refused:
            await bad.admin.add(url, wait_healthy_secs=0.5)
        assert refused.value.status == 503


def test_serve_probe_verifies_with_the_context(pki: Pki) -> None:
    """serve's start-up probe: the right CA reaches the engine, another does not."""
    from cache_router.serve import _probe_all

    with tls_engine(pki) as (url, _):
        for ca, reachable in ((pki.ca, True), (pki.other_ca, False)):
            probe = functools.partial(_probe_all, ssl_context=client_ssl_context([ca]))
            failing = anyio.run(probe, [url], "/health", 0.0)
            assert (url not in failing) is reachable, failing


# -- the real CLI ----------------------------------------------------------------------------


def test_serve_over_mutual_tls_through_the_cli(pki: Pki) -> None:
    with tls_engine(pki, mutual=True) as (url, _):
        with (
            serve_process(
                "--worker-urls",
                url,
                "--ca-cert-paths",
                pki.other_ca,
                pki.ca,
                "--client-cert-path",
                pki.client_cert,
                "--client-key-path",
                pki.client_key,
                "--health-check-interval-secs",
                "0.2",
            ) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=20) as client,
        ):
            assert client.get("/readiness").status_code == 200
            answer = client.post("/v1/completions", json=BODY)
            assert answer.status_code == 200, answer.text
            assert client.get("/v1/models").json()["data"][0]["id"] == "sim"
        assert "Traceback" not in served.stderr
        # The same engine without the client certificate: up, unready, never crashed.
        with (
            serve_process(
                "--worker-urls",
                url,
                "--ca-cert-paths",
                pki.ca,
                "--health-check-interval-secs",
                "0.2",
            ) as served,
            httpx.Client(base_url=served.url, trust_env=False, timeout=20) as client,
        ):
            assert client.get("/readiness").status_code == 503
            assert client.post("/v1/completions", json=BODY).status_code in (502, 503)
            assert client.get("/liveness").status_code == 200
        assert "Traceback" not in served.stderr
        assert "not reachable" in served.stderr


def test_serve_refuses_a_bad_certificate_file_naming_the_flag(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    argv = ["serve", "--worker-urls", "https://127.0.0.1:1", "--ca-cert-paths", missing]
    done = subprocess.run(
        [sys.executable, "-m", "cache_router", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "ca_cert_paths" in done.stderr and missing in done.stderr
    assert "Traceback" not in done.stderr
