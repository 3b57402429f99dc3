"""Host canonicalization and matching for the admin API's worker allow-list.

The IPv4 reading is checked against the C library's ``inet_aton``, which is what the
resolver (and so every HTTP client here) applies to a numeric host.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cache_router.ops.allowlist import HostAllowList, parse_host, url_host, url_port

LOCALHOST4 = ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", LOCALHOST4),
        ("127.1", LOCALHOST4),
        ("0x7f.1", LOCALHOST4),
        ("0X7F.0.0.1", LOCALHOST4),
        ("0177.0.0.1", LOCALHOST4),
        ("127.000.000.001", LOCALHOST4),
        ("2130706433", LOCALHOST4),
        ("0x7f000001", LOCALHOST4),
        ("127.0.0.1.", LOCALHOST4),
        ("010.0.0.1", ipaddress.IPv4Address("8.0.0.1")),  # octal, as the resolver reads it
        ("[::ffff:127.0.0.1]", LOCALHOST4),
        ("::ffff:7f00:1", LOCALHOST4),
        ("[::1]", ipaddress.IPv6Address("::1")),
        ("[0:0::1]", ipaddress.IPv6Address("::1")),
        ("LOCALHOST.", "localhost"),
        ("Engine-1.Internal", "engine-1.internal"),
        ("under_score.test", "under_score.test"),
    ],
)
def test_hosts_are_canonical(text: str, expected: object) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "a..b",
        "1.2.3.4.5",  # numeric last label, no IPv4 address: never guessed at
        "256.1.1.1",
        "1.16777216",
        "08.1",
        "0x",
        "127%2e0%2e0%2e1",
        "ünïcode.test",
        "[fe80::1%eth0]",
        "[fe80::1%25eth0]",
        "[engine.test]",
        "[::ffff:0127.0.0.1]",
        "host name",
        "a*b.test",
    ],
)
def test_ambiguous_or_malformed_hosts_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text)


def test_url_host_reads_the_authority_and_refuses_user_info() -> None:
    assert url_host("http://127.1:8000/base") == LOCALHOST4
    assert url_host("https://[::ffff:127.0.0.1]:443") == LOCALHOST4
    assert url_host("http://Engine.TEST") == "engine.test"
    for url in ("http://engine.test@127.0.0.1:80", "http://u:p@engine.test"):
        with pytest.raises(ValueError, match="credentials"):
            url_host(url)


def test_patterns_match_addresses_networks_and_names() -> None:
    allow = HostAllowList(
        ["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1", "engine-*.internal", "api.test."]
    )
    allowed = ["10.1.2.3", "012.1", "192.168.1.7", "0xc0.0xa8.1.7", "fd00::5", "[::1]"]
    allowed += ["engine-1.internal", "ENGINE-.internal", "api.test", "API.TEST."]
    refused = ["11.0.0.1", "192.168.1.8", "fe00::1", "127.0.0.1", "localhost"]
    refused += ["engine-1.evil.internal", "xengine-1.internal", "a.api.test", "engine-1.internals"]
    assert [host for host in allowed if not allow.allows(parse_host(host))] == []
    assert [host for host in refused if allow.allows(parse_host(host))] == []
    # Names are not resolved: a CIDR never admits a name, a name never an address.
    assert not HostAllowList(["127.0.0.0/8"]).allows("localhost")
    assert not HostAllowList(["localhost"]).allows(LOCALHOST4)
    assert HostAllowList(["*"]).allows("anything.test")
    assert not HostAllowList([]).allows("anything.test")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("10.0.0.*", "CIDR"),
        ("*.1", "CIDR"),
        ("http://engine.test", "not a URL"),
        ("10.0.0.0/33", "CIDR"),
        ("::ffff:0:0/104", "IPv4-mapped"),
        ("engine.test:0", "ports"),
        ("engine.test:70000", "ports"),
        ("engine.test:9000-8000", "low before high"),
        ("engine.test:80,81", "number or a range"),
        ("engine.test:", "number or a range"),
        ("[::1", "bracketed"),
        ("[::1]8000", "bracketed"),
        ("fd00::/8:8000", r"\[fd00::/8\]:PORT"),
        ("", "host"),
    ],
)
def test_bad_patterns_are_refused_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        HostAllowList([pattern])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's inet_aton")
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24))
@example("0x7f.1")
@example("0177.0.0.1")
@example("4294967295")
@example("4294967296")
@example("1.2.65536")
def test_numeric_hosts_are_read_as_the_resolver_reads_them(text: str) -> None:
    try:
        reference: ipaddress.IPv4Address | None = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        reference = None
    try:
        ours = parse_host(text)
    except ValueError:
        ours = None
    if isinstance(ours, ipaddress.IPv4Address) or reference is not None:
        if text.endswith(".") and reference is None:
            return  # we drop one trailing dot, which the resolver looks up as a name
        assert ours == reference, text


def test_a_port_suffix_limits_a_pattern_to_those_ports() -> None:
    allow = HostAllowList(
        ["10.0.0.0/8:30000-30099", "engine-*.internal:8000", "[fd00::/8]:9000", "api.test"]
    )
    ten = parse_host("10.1.2.3")
    assert [port for port in (29999, 30000, 30099, 30100, 6379) if allow.allows(ten, port)] == [
        30000,
        30099,
    ]
    assert allow.allows("engine-1.internal", 8000)
    assert not allow.allows("engine-1.internal", 8001)
    assert allow.allows(parse_host("fd00::5"), 9000)
    assert not allow.allows(parse_host("[fd00::5]"), 9001)
    # A pattern without ports admits any; one with ports never admits an unknown port.
    assert allow.allows("api.test", 6379) and allow.allows("api.test")
    assert not allow.allows(ten)
    # The same host under two patterns: either may admit it.
    both = HostAllowList(["10.0.0.5:8000", "10.0.0.0/8:9000"])
    five = parse_host("10.0.0.5")
    assert both.allows(five, 8000) and both.allows(five, 9000) and not both.allows(five, 7000)
    assert HostAllowList(["*:8000"]).allows("anything.test", 8000)
    assert not HostAllowList(["*:8000"]).allows("anything.test", 80)


def test_url_port_is_the_written_port_or_the_schemes() -> None:
    assert url_port("http://engine.test:8000/base") == 8000
    assert url_port("http://engine.test") == 80
    assert url_port("https://[::1]") == 443
