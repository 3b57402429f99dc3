"""A disaggregated fleet of :class:`~cache_router.testing.SimulatedEngine` on loopback.

:func:`serve_pd_fleet` starts prefill and decode engines (HTTP servers, and the prefills'
bootstrap or side-channel servers) for tests, demos and benchmarks, and yields a
:class:`PDFleet` that says how to point a router at them. How the engines check the
pairing (SGLang's bootstrap rooms, vLLM's ``kv_transfer_params``) is
:mod:`cache_router.testing.pd_state`; its names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import ASGIApp

from cache_router.testing.engine import SimulatedEngine
from cache_router.testing.pd_state import (
    NO_ROOM_MESSAGE,
    PDProtocol,
    PDRole,
    PDState,
    PDTicket,
    sglang_logprobs,
)

__all__ = [
    "NO_ROOM_MESSAGE",
    "PDFleet",
    "PDProtocol",
    "PDRole",
    "PDState",
    "PDTicket",
    "serve_pd_fleet",
    "sglang_logprobs",
]


@dataclass(frozen=True)
class PDFleet:
    """A running PD fleet: engines, their URLs and, for SGLang, the bootstrap ports.

    ``bootstrap_ports`` is what a router is told with ``--prefill URL PORT`` (SGLang); for
    vLLM it holds ``None`` per prefill (the side channel travels in ``kv_transfer_params``).
    ``side_urls`` are the prefills' bootstrap/side-channel servers.
    """

    protocol: PDProtocol
    prefill_engines: list[SimulatedEngine]
    decode_engines: list[SimulatedEngine]
    prefill_urls: list[str]
    decode_urls: list[str]
    bootstrap_ports: list[int | None]
    side_urls: list[str]

    @property
    def prefill(self) -> list[tuple[str, int | None]]:
        """``(url, bootstrap_port)`` per prefill engine."""
        return list(zip(self.prefill_urls, self.bootstrap_ports, strict=True))

    def router_args(self) -> list[str]:
        """``--prefill URL [PORT] ... --decode URL ...`` as SGLang's router takes them."""
        args: list[str] = []
        for url, port in self.prefill:
            args += ["--prefill", url] + ([str(port)] if port is not None else [])
        for url in self.decode_urls:
            args += ["--decode", url]
        return args


def _engines(
    given: int | Sequence[SimulatedEngine],
    role: PDRole,
    protocol: PDProtocol,
    options: Mapping[str, Any],
) -> list[SimulatedEngine]:
    if isinstance(given, int):
        return [
            SimulatedEngine(**{"name": f"{role}-{i}", **options}, role=role, pd_protocol=protocol)
            for i in range(given)
        ]
    engines = list(given)
    for engine in engines:
        if engine.pd is None or engine.pd.role != role or engine.pd.protocol != protocol:
            raise ValueError(f"{engine.name} is not a {protocol} {role} engine")
    return engines


@contextmanager
def serve_pd_fleet(
    prefill: int | Sequence[SimulatedEngine] = 2,
    decode: int | Sequence[SimulatedEngine] = 2,
    protocol: PDProtocol = "sglang",
    *,
    prefill_options: Mapping[str, Any] | None = None,
    decode_options: Mapping[str, Any] | None = None,
    startup_timeout: float = 10.0,
    **server_options: Any,
) -> Iterator[PDFleet]:
    """Serve a PD fleet on 127.0.0.1 and yield it; every server stops when the block ends.

    ``prefill``/``decode`` are engine counts (engines named ``prefill-0``, ``decode-0``...,
    built with ``prefill_options``/``decode_options`` as :class:`SimulatedEngine` keywords)
    or ready-made engines of the right role and protocol, e.g. a slower decode engine.
    Each prefill engine gets a second server for its bootstrap (SGLang) or side-channel
    (vLLM) app. ``server_options`` go to :class:`~cache_router.testing.BackgroundServer`.
    """
    from cache_router.testing.server import serve_apps

    prefills = _engines(prefill, "prefill", protocol, prefill_options or {})
    decodes = _engines(decode, "decode", protocol, decode_options or {})
    sides: list[ASGIApp] = []
    for engine in prefills:
        assert engine.pd is not None and engine.pd.app is not None
        sides.append(engine.pd.app)
    apps: list[ASGIApp] = [*prefills, *decodes, *sides]
    with serve_apps(apps, startup_timeout=startup_timeout, **server_options) as urls:
        prefill_urls = urls[: len(prefills)]
        decode_urls = urls[len(prefills) : len(prefills) + len(decodes)]
        side_urls = urls[len(prefills) + len(decodes) :]
        for engine, side in zip(prefills, side_urls, strict=True):
            assert engine.pd is not None
            engine.pd.advertise(side)
        ports: list[int | None] = [
            httpx.URL(side).port if protocol == "sglang" else None for side in side_urls
        ]
        yield PDFleet(protocol, prefills, decodes, prefill_urls, decode_urls, ports, side_urls)
