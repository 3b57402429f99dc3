"""How one configuration value is read and checked, whatever source it came from.

:class:`Option` is what the configuration knows about a field; :func:`from_text` reads an
environment variable's text as its type, and :func:`checked_value` coerces a value from
Python, a file or the command line, checks its bounds and choices and applies the field's
own check (URLs normalized, header names lower-cased, patterns and selectors parsed). A
problem is an :class:`Invalid` carrying the reason only: ``cache_router.config`` adds the
option's name and the source, and reports every problem of a load together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache_router.core.registry import normalize_url
from cache_router.ops.discovery.dns import parse_dns_target, parse_nameserver
from cache_router.ops.discovery.k8s import parse_selector

__all__ = ["Invalid", "Option", "checked_value", "from_text", "kv_events_entry", "prefill_entry"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_FLEET_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SPACED_ITEMS = frozenset({"prefill_urls"})


@dataclass(frozen=True, slots=True)
class Option:
    """What the configuration knows about one field (for the loaders, the docs, a CLI)."""

    name: str
    flag: str
    env: str
    kind: type  # int, float, bool or str; of the items for a list
    is_list: bool
    optional: bool
    default: Any  # dataclasses.MISSING when required
    help: str
    low: float | None
    high: float | None
    choices: tuple[str, ...] | None
    secret: bool

    @property
    def type_name(self) -> str:
        name = f"list[{self.kind.__name__}]" if self.is_list else self.kind.__name__
        return f"{name} | None" if self.optional else name


class Invalid(Exception):
    """One value's problem, before it is given the option's name and source."""


def from_text(option: Option, text: str) -> Any:
    """Parse an environment variable's value as ``option``'s type."""
    stripped = text.strip()
    if option.optional and stripped.lower() in ("", "none"):
        return None
    if option.is_list:
        # Items that hold a space ("URL BOOTSTRAP_PORT") are separated by commas alone.
        separator = r"\s*,\s*" if option.name in _SPACED_ITEMS else r"[,\s]+"
        return tuple(item for item in re.split(separator, stripped) if item)
    if option.kind is bool:
        word = stripped.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise Invalid("expected one of 1/0, true/false, yes/no, on/off")
    if option.kind in (int, float):
        try:
            return option.kind(stripped)
        except ValueError:
            raise Invalid(f"expected {option.kind.__name__}") from None
    return text


def _coerce(option: Option, value: Any) -> Any:
    """``value`` (from Python, a file or JSON) as ``option``'s type, or ``Invalid``."""
    if value is None and option.optional:
        return None
    if option.is_list:
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise Invalid("expected a list of strings")
    if option.kind is bool:
        if isinstance(value, bool):
            return value
        raise Invalid("expected true or false")
    if option.kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Invalid("expected an integer")
    if option.kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Invalid("expected a number")
    if isinstance(value, str):
        return value
    raise Invalid("expected a string")


def _path_prefix(text: str) -> str:
    if not text.startswith("/") or not text.strip("/"):
        raise Invalid("not a path prefix (expected e.g. /inference)")
    return text


def checked_value(option: Option, value: Any) -> Any:
    """``value`` coerced, range- and choice-checked and normalized for ``option``."""
    value = _coerce(option, value)
    if value is None:
        return None
    if option.kind is float and not math.isfinite(value):
        raise Invalid("must be a finite number")
    if option.low is not None and (
        value < option.low or (option.high is not None and value > option.high)
    ):
        if option.high is None:
            raise Invalid(f"must be >= {option.low:g}")
        raise Invalid(f"must be between {option.low:g} and {option.high:g}")
    if option.choices is not None and value not in option.choices:
        raise Invalid(f"must be one of {', '.join(option.choices)}")
    check = _CHECKS.get(option.name)
    return value if check is None else check(value)


def _worker_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(dict.fromkeys(normalize_url(url) for url in urls))
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def prefill_entry(text: str) -> tuple[str, int | None]:
    """A prefill worker given as ``URL`` or ``URL BOOTSTRAP_PORT`` (``none``: no port)."""
    url, _, port = text.strip().partition(" ")
    port = port.strip()
    try:
        normalized = normalize_url(url)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    if not port or port.lower() == "none":
        return normalized, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid(f"bootstrap port {port!r} is not a port number (or none)")
    return normalized, int(port)


def kv_events_entry(text: str) -> tuple[str, str, str | None]:
    """A ``--kv-events`` item, ``WORKER_URL=tcp://HOST:PORT[,tcp://HOST:REPLAY_PORT]``:
    (worker URL, event endpoint, replay endpoint or None)."""
    url, sep, endpoints = text.strip().rpartition("=")
    if not sep:
        raise Invalid(f"{text!r} is not WORKER_URL=tcp://HOST:PORT")
    try:
        normalized = normalize_url(url)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    endpoint, _, replay = endpoints.partition(",")
    for item in (endpoint, replay) if replay else (endpoint,):
        host, _, port = item.removeprefix("tcp://").rpartition(":")
        if not item.startswith("tcp://") or not host or not port.isdigit():
            raise Invalid(f"event endpoint {item!r} is not tcp://HOST:PORT")
        if not 0 < int(port) < 65536:
            raise Invalid(f"event endpoint {item!r}: {port} is not a port number")
    return normalized, endpoint, replay or None


def _kv_events(entries: tuple[str, ...]) -> tuple[str, ...]:
    parsed = {url: rest for url, *rest in map(kv_events_entry, entries)}
    return tuple(
        f"{url}={endpoint}" + (f",{replay}" if replay else "")
        for url, (endpoint, replay) in parsed.items()
    )


def _prefill_urls(entries: tuple[str, ...]) -> tuple[str, ...]:
    parsed = dict(prefill_entry(entry) for entry in entries)
    return tuple(url if port is None else f"{url} {port}" for url, port in parsed.items())


def _prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_path_prefix(prefix) for prefix in prefixes)


def _patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    if any(not item.strip() or any(char.isspace() for char in item) for item in patterns):
        raise Invalid("patterns must be non-empty and contain no whitespace")
    return patterns


def _non_empty(text: str) -> str:
    if not text.strip():
        raise Invalid("must not be empty")
    return text


def _header_name(text: str) -> str:
    name = text.strip().lower()
    if not _HEADER_NAME.fullmatch(name):
        raise Invalid("must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
    return name


def _secret(text: str) -> str:
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        raise Invalid("must be non-empty, without whitespace or control characters")
    return text


def _header_names(names: tuple[str, ...]) -> tuple[str, ...]:
    lowered = tuple(dict.fromkeys(name.lower() for name in names))
    if not all(_HEADER_NAME.fullmatch(name) for name in lowered):
        raise Invalid("not a header name")
    return lowered


def _origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise Invalid(f"{origin!r} is not an origin (scheme://host[:port], or *)")
    return tuple(dict.fromkeys(origins))


def _fleet_name(name: str) -> str:
    if not _FLEET_NAME.fullmatch(name):
        raise Invalid("may only use letters, digits and _ . : -")
    return name


def _otlp_endpoint(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise Invalid("must be an http:// or https:// URL with a host")
    return url


def _redis_url(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _REDIS_SCHEMES:
        raise Invalid("must start with redis://, rediss:// or unix://")
    return url


def _selector(items: tuple[str, ...]) -> tuple[str, ...]:
    try:
        parse_selector(items)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return items


def _dns_targets(items: tuple[str, ...]) -> tuple[str, ...]:
    try:
        for item in items:
            parse_dns_target(item)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return tuple(dict.fromkeys(items))


def _nameserver(text: str) -> str:
    try:
        parse_nameserver(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return text


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "worker_urls": _worker_urls,
    "prefill_urls": _prefill_urls,
    "kv_events": _kv_events,
    "decode_urls": _worker_urls,
    "host": _non_empty,
    "session_key_header": _header_name,
    "transparent_prefixes": _prefixes,
    "health_check_endpoint": _path_prefix,
    "admin_prefix": _path_prefix,
    "worker_allow": _patterns,
    "api_key": _secret,
    "router_api_key": _secret,
    "admin_api_key": _secret,
    "redis_url": _redis_url,
    "otlp_endpoint": _otlp_endpoint,
    "fleet_name": _fleet_name,
    "request_id_headers": _header_names,
    "forward_headers": _header_names,
    "drop_headers": _header_names,
    "cors_allowed_origins": _origins,
    "log_dir": _non_empty,
    "prometheus_host": _non_empty,
    "selector": _selector,
    "prefill_selector": _selector,
    "decode_selector": _selector,
    "service_discovery_namespace": _non_empty,
    "bootstrap_port_annotation": _non_empty,
    "discover_dns": _dns_targets,
    "discover_dns_nameserver": _nameserver,
}
