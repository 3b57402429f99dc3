"""Which hosts the admin API may add as workers: host patterns and CIDRs.

The admin API makes the router connect to the URLs it is given (health probes, then
traffic carrying the engine API key), so a URL added at run time is checked against a list
of allowed hosts. The check is made on the host as the connecting code will see it, not on
the text: ``127.1``, ``0x7f.1``, ``0177.0.0.1``, ``2130706433`` and ``[::ffff:127.0.0.1]``
all reach 127.0.0.1 (the resolver reads IPv4 in ``inet_aton``'s forms, and a dual-stack
socket connects an IPv4-mapped IPv6 address over IPv4), so each becomes that address before
it is matched. Names are lower-cased and lose one trailing dot; they are never resolved
(the answer could change between the check and the connect), so a CIDR matches hosts
written as addresses and a name pattern matches names. A host that is neither a valid
address nor a plain ASCII name (a last label that looks numeric but is no IPv4 address,
percent-escapes, non-ASCII, a zone id) is refused rather than guessed at.

Patterns: ``*`` alone allows every host; ``10.0.0.0/8`` or ``fd00::/8`` a network;
``10.0.0.5`` or ``::1`` one address (any spelling); ``engine-1.internal`` one name; and
``engine-*.internal`` names where each ``*`` stands for any run of characters within one
label (it never matches a dot, as in TLS certificates).

A pattern may end in ``:PORT`` or ``:LOW-HIGH`` to admit only those ports
(``10.0.0.0/8:30000-30099``, ``engine-*.internal:8000``, ``*:8000``; IPv6 in brackets:
``[fd00::/8]:8000``). Without one, every port of a matching host is admitted, so a host
that also runs other services (Redis, a metrics endpoint) is reachable through the admin
API unless its pattern names the engines' ports. A URL without a port is matched on its
scheme's (80 or 443).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import TypeAlias
from urllib.parse import urlsplit

__all__ = ["Host", "HostAllowList", "parse_host", "url_host", "url_port"]

#: A canonical host: an address, or a lower-case name.
Host: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address | str"

_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_NAME_PATTERN = re.compile(r"[a-z0-9_*-]+(?:\.[a-z0-9_*-]+)*")
# inet_aton's number forms: hex (0x...), octal (leading 0) or decimal.
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _aton_part(text: str) -> int | None:
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16) if len(text) > 2 else None
    if len(text) > 1 and text[0] == "0":
        return int(text, 8) if text.isdigit() and "8" not in text and "9" not in text else None
    return int(text)


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """``text`` read as the C resolver reads a numeric host (1 to 4 parts), else None."""
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values = [_aton_part(part) for part in parts]
    if any(value is None for value in values):
        return None
    *head, last = values
    assert last is not None
    if any(value is None or value > 0xFF for value in head) or last >= 1 << 8 * (5 - len(parts)):
        return None
    number = last
    for index, value in enumerate(head):
        number |= (value or 0) << 8 * (3 - index)
    return ipaddress.IPv4Address(number)


def parse_host(text: str) -> Host:
    """The canonical form of a URL host (brackets optional around IPv6): an address, or a
    lower-case name without its trailing dot. Raises ``ValueError`` for anything else."""
    bracketed = text.startswith("[") and text.endswith("]")
    host = text[1:-1] if bracketed else text
    if bracketed or ":" in host:
        if "%" in host:
            raise ValueError(f"host {text!r} carries a zone id or percent-escape")
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"host {text!r} is not a valid IPv6 address") from None
        return address.ipv4_mapped or address
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not _NAME.fullmatch(host):
        raise ValueError(f"host {text!r} is not an IP address or an ASCII host name")
    last = host.rpartition(".")[2]
    if _NUMBER.fullmatch(last):  # looks numeric: an IPv4 address or nothing
        address4 = _inet_aton(host)
        if address4 is None:
            raise ValueError(f"host {text!r} is not a valid IPv4 address")
        return address4
    return host


def url_host(url: str) -> Host:
    """The canonical host of ``url`` (see :func:`parse_host`); URLs with user info are
    refused, as ``user@`` changes which host some clients connect to."""
    netloc = urlsplit(url).netloc
    if "@" in netloc:
        raise ValueError("worker URLs must not carry credentials")
    host = netloc if netloc.startswith("[") else netloc.rpartition(":")[0] or netloc
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    return parse_host(host)


def url_port(url: str) -> int:
    """The port ``url`` connects to: the one written, else its scheme's default."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


#: An inclusive port range; ``None`` admits every port.
Ports: TypeAlias = "tuple[int, int] | None"


class HostAllowList:
    """A set of host patterns, each optionally limited to ports (see the module
    docstring); ``allows(host, port)`` is true when one pattern admits both."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        grouped: dict[Ports, list[str]] = {}
        for pattern in self.patterns:
            host_pattern, ports = _split_ports(pattern)
            grouped.setdefault(ports, []).append(host_pattern)
        self._groups = [(ports, _HostSet(hosts)) for ports, hosts in grouped.items()]

    def allows(self, host: Host, port: int | None = None) -> bool:
        """Whether a pattern admits ``host`` on ``port``; a pattern with ports never
        admits an unknown (``None``) port."""
        return any(
            (ports is None or (port is not None and ports[0] <= port <= ports[1]))
            and hosts.allows(host)
            for ports, hosts in self._groups
        )


def _split_ports(pattern: str) -> tuple[str, Ports]:
    """``pattern`` without its ``:PORT``/``:LOW-HIGH`` suffix, and the range it names.
    A bare IPv6 pattern (more than one colon, no brackets) has no port."""
    if pattern.startswith("["):
        host, bracket, rest = pattern[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{pattern!r}: write a bracketed IPv6 pattern as [ADDRESS]:PORT")
        return host, _port_range(pattern, rest[1:]) if rest else None
    if pattern.count(":") != 1 or "://" in pattern:
        return pattern, None
    host, _, ports = pattern.partition(":")
    return host, _port_range(pattern, ports)


def _port_range(pattern: str, text: str) -> tuple[int, int]:
    low_text, dash, high_text = text.partition("-")
    if not low_text.isdigit() or (dash and not high_text.isdigit()):
        raise ValueError(f"{pattern!r}: a port is a number or a range LOW-HIGH")
    low = int(low_text)
    high = int(high_text) if dash else low
    if not 0 < low <= high < 65536:
        raise ValueError(f"{pattern!r}: ports are 1-65535, low before high")
    return low, high


class _HostSet:
    """Host patterns without ports, matched by kind: addresses by network, names by set
    or one compiled expression for the wildcards."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._any = False
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._names: set[str] = set()
        wildcards: list[str] = []
        for pattern in self.patterns:
            kind, value = _parse_pattern(pattern)
            if kind == "any":
                self._any = True
            elif kind == "network":
                assert not isinstance(value, str)
                self._networks.append(value)
            elif kind == "name":
                assert isinstance(value, str)
                self._names.add(value)
            else:
                assert isinstance(value, str)
                wildcards.append("(?:" + "[a-z0-9_-]*".join(map(re.escape, value.split("*"))) + ")")
        self._wildcards = re.compile("|".join(wildcards)) if wildcards else None

    def allows(self, host: Host) -> bool:
        if self._any:
            return True
        if isinstance(host, str):
            return host in self._names or (
                self._wildcards is not None and self._wildcards.fullmatch(host) is not None
            )
        return any(host in network for network in self._networks)


def _parse_pattern(
    pattern: str,
) -> tuple[str, str | ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``(kind, value)``: ``any``, ``network`` (CIDRs and single addresses), ``name`` or
    ``wildcard``. Raises ``ValueError`` with the reason for a malformed pattern."""
    if pattern == "*":
        return "any", pattern
    if "://" in pattern:
        raise ValueError(f"{pattern!r}: give a host, not a URL")
    if "/" in pattern:
        try:
            network = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            hint = " or [fd00::/8]:PORT" if ":" in pattern else ""
            raise ValueError(f"{pattern!r} is not a CIDR network (e.g. 10.0.0.0/8{hint})") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            raise ValueError(f"{pattern!r}: write IPv4-mapped ranges as IPv4 networks")
        return "network", network
    if "*" not in pattern:
        host = parse_host(pattern)
        if isinstance(host, str):
            return "name", host
        return "network", ipaddress.ip_network(host)
    name = pattern.lower().removesuffix(".")
    numeric = re.fullmatch(r"[0-9*.]+", name) and any(char.isdigit() for char in name)
    if not _NAME_PATTERN.fullmatch(name) or numeric:
        raise ValueError(
            f"{pattern!r} is not a host name pattern (e.g. engine-*.internal); "
            "match addresses with a CIDR (e.g. 10.0.0.0/24)"
        )
    return "wildcard", name
