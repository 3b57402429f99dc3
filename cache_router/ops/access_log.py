"""The access log: one line per routed request, and the formats the router logs in.

:class:`AccessLog` is a :class:`~cache_router.core.events.RouterEvents` listener, so the
middleware only hands it a :class:`~cache_router.core.events.RequestSummary` and knows
nothing of log formats; the policy's outcome comes from what the policy recorded on the
request, so the log knows nothing of policy internals either. Each line is logged at
``info`` on the ``cache_router.access`` logger with its fields also as record attributes,
which :class:`JsonFormatter` writes as one JSON object per line for log pipelines.

:func:`ensure_handler` covers the router mounted under a server that configures only its
own loggers (plain ``uvicorn app:app`` leaves the root logger bare): the router's records
then still carry time and level, instead of reaching Python's last-resort handler (bare
messages, warnings only) or nowhere.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from cache_router.core.events import RequestSummary, RouterEvents

__all__ = [
    "ACCESS_LOGGER",
    "TEXT_FORMAT",
    "AccessLog",
    "JsonFormatter",
    "TextFormatter",
    "ensure_handler",
    "formatter",
]

ACCESS_LOGGER = "cache_router.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_LINE = (
    "%(method)s %(path)s %(status)d id=%(request_id)s model=%(model)s worker=%(worker)s "
    "outcome=%(outcome)s matched=%(matched)s ttft_ms=%(ttft_ms)s duration_ms=%(duration_ms)s "
    "attempts=%(attempts)d"
)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class AccessLog(RouterEvents):
    """Logs each routed request at ``info``: request id, method, path, model, worker, the
    policy's outcome and matched share of the key, status, TTFT, duration and attempts.

    Nothing is formatted when the logger would drop the line (one cached level test). The
    line goes through the logger's filters and handlers like any other record."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def request_summary(self, summary: RequestSummary) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        routing = summary.routing
        model = outcome = matched = None
        if routing is not None:
            model = routing.model
            outcome = routing.outcome
            if outcome is not None and routing.key:
                matched = round(routing.matched / len(routing.key), 3)
        fields = {
            "request_id": summary.request_id,
            "method": summary.method,
            "path": summary.path,
            "model": model,
            "worker": summary.worker,
            "outcome": outcome,
            "matched": matched,
            "status": summary.status,
            "ttft_ms": _ms(summary.first_byte),
            "duration_ms": _ms(summary.seconds),
            "attempts": summary.attempts,
        }
        # Made and handled directly: ``logger.info`` would also walk the stack for the
        # caller's file and line, meaningless for an access line and a third of its cost.
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, _LINE, (fields,), None)
        # The fields become attributes in one update: ``extra=`` would check each name
        # against the record's own, and these never clash (a test holds them to that).
        record.__dict__.update(fields)
        logger.handle(record)


#: Attributes every LogRecord has; the others came in ``extra`` and are the record's fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class _SecondStamp:
    """``strftime`` of a second, redone only when the second changes: an access line a
    request would otherwise convert and format the same second over and over."""

    __slots__ = ("_converter", "_format", "_last")

    def __init__(self, format: str, converter: Callable[[float | None], time.struct_time]):
        self._format = format
        self._converter = converter
        self._last = (-1, "")  # one attribute, so a reader never sees half an update

    def __call__(self, created: float) -> str:
        second = int(created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, time.strftime(self._format, self._converter(second)))
        return last[1]


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`'s formatter, its default timestamp made once per second."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._stamp = _SecondStamp(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"  # as logging's default


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, every field given in ``extra``, and ``exc`` with a traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{self._stamp(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``--log-format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be text or json, not {log_format!r}")


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to standard error only while the root logger has no handler: once the
    application configures logging, its handlers take over and this one stays quiet."""

    def handle(self, record: logging.LogRecord) -> bool:
        if logging.root.handlers:
            return False
        return super().handle(record)


def ensure_handler(level: str, log_format: str = "text") -> None:
    """Give the ``cache_router`` logger a handler with time and level, and ``level``, when
    nothing else would show its records (no handler on it or on the root, level unset).

    A no-op under ``cache-router serve`` and in any application that configured logging
    (and in pytest, whose capture handler sits on the root logger)."""
    package = logging.getLogger("cache_router")
    if package.handlers or logging.root.handlers:
        return
    handler = _FallbackHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(level.upper())
