"""DNS discovery: the A and AAAA records of a name are the workers (``--discover-dns``).

A headless Kubernetes Service, Consul's DNS interface and docker compose's service names
all answer a name with one address per ready instance. :class:`DnsDiscovery` resolves the
name every ``interval`` seconds and makes the workers ``http://{address}:{port}`` match the
answer: new addresses are added (readiness wait, model discovery), vanished ones drained.

An answer is the truth, an outage is not: a name that does not exist (NXDOMAIN) or has no
addresses means no workers, but a resolution that fails (timeout, SERVFAIL, refused,
unreachable nameserver, or one of the two record types failing) keeps the workers as they
are, so a DNS hiccup never drains the fleet.

Resolution uses dnspython (the ``dns`` extra): it tells an empty answer from a failure,
which ``getaddrinfo`` does not reliably, and it can ask a given nameserver (Consul's agent
on ``127.0.0.1:8600``, or a test's) instead of the system's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

import anyio

from cache_router.ops.discovery.common import REGULAR, Reconciler, WorkerSink, worker_url
from cache_router.ops.periodic import every

__all__ = ["DnsDiscovery", "parse_dns_target", "parse_nameserver"]

logger = logging.getLogger("cache_router.ops.discovery.dns")

_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: the port must be a number from 1 to 65535")
    return int(text)


def parse_dns_target(text: str) -> tuple[str, int]:
    """``NAME:PORT`` as ``(name, port)``; ``ValueError`` saying what is wrong."""
    name, sep, port = text.rpartition(":")
    if not sep or not _NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not NAME:PORT (e.g. engines.default.svc:8000)")
    return name, _port(port, text)


def parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` as ``(address, port)`` (port 53 by default)."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not a nameserver address (IP or IP:PORT)") from None
    return host, _port(port, text)


class DnsDiscovery:
    """Workers from the addresses of ``name``; a background task (``run``).

    ``nameserver`` is ``(address, port)`` to ask instead of the system's resolvers;
    ``timeout`` bounds one resolution (both record types).
    """

    def __init__(
        self,
        sink: WorkerSink,
        name: str,
        port: int,
        *,
        interval: float = 5.0,
        nameserver: tuple[str, int] | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        try:
            import dns.asyncresolver
        except ImportError:
            raise ValueError(
                "--discover-dns needs dnspython: pip install 'cache_router[dns]'"
            ) from None
        self.sink = sink
        self.name = name
        self.port = port
        self.interval = interval
        self._resolver: Any = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver is not None:
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.lifetime = timeout
        self.reconciler: Reconciler | None = None

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            self.reconciler = Reconciler(self.sink, group)
            await every(self.interval, self.resolve_once)

    async def resolve_once(self) -> None:
        """One resolution, reconciled; a failure keeps the workers as they are."""
        assert self.reconciler is not None
        addresses = await self.addresses()
        if addresses is not None:
            self.reconciler.replace({worker_url(a, self.port): REGULAR for a in addresses})

    async def addresses(self) -> set[str] | None:
        """The name's addresses now, or None if the resolution failed (logged)."""
        import dns.exception
        import dns.resolver

        found: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(
                    self.name, rdtype, search=True, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                continue
            except (dns.exception.DNSException, OSError) as exc:
                logger.warning(
                    "resolving %s (%s) failed, keeping its %d workers: %s",
                    self.name,
                    rdtype,
                    0 if self.reconciler is None else len(self.reconciler.desired),
                    exc,
                )
                return None
            found.update(record.address for record in answer)
        return found
