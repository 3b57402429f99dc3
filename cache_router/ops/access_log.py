"""The access log: one line per routed request, and the formats the router logs in.

:class:`AccessLog` is a :class:`~cache_router.core.events.RouterEvents` listener, so the
middleware only hands it a :class:`~cache_router.core.events.RequestSummary` and knows
nothing of log formats; the policy's outcome comes from what the policy recorded on the
request, so the log knows nothing of policy internals either. Each line is logged at
``info`` on the ``cache_router.access`` logger with its fields also as record attributes,
which :class:`JsonFormatter` writes as one JSON object per line for log pipelines.

Under ``cache-router serve`` the handlers are :class:`BatchingHandler`: there the line
skips the LogRecord (formatted directly, as the formatter would) and is written in
batches, within :data:`FLUSH_SECONDS`, instead of one write per line. Whether a line may
go that way is worked out once a second (a filter or handler added meanwhile counts from
the next second; a level change at once); docs/operations.md has what a user sees.

:func:`ensure_handler` covers the router mounted under a server that configures only its
own loggers (plain ``uvicorn app:app`` leaves the root logger bare): the router's records
then still carry time and level, instead of reaching Python's last-resort handler (bare
messages, warnings only) or nowhere.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Callable
from typing import Any, TextIO

import anyio

from cache_router.core.events import RequestSummary, RouterEvents
from cache_router.core.request import RoutingRequest

__all__ = [
    "ACCESS_LOGGER",
    "FLUSH_SECONDS",
    "TEXT_FORMAT",
    "AccessLog",
    "BatchingFileHandler",
    "BatchingHandler",
    "FlushAtShutdown",
    "JsonFormatter",
    "TextFormatter",
    "ensure_handler",
    "flush_batches",
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
    line goes through the logger's filters and handlers like any other record, except
    where every handler it would reach is a :class:`BatchingHandler` with this module's
    formatter and nothing could tell the difference (no filter on the logger or those
    handlers, the standard record factory): then the line is formatted directly, without a
    LogRecord, into those handlers' batches (what ``cache-router serve`` sets up)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        # Where lines go directly (see _route), worked out again each second.
        self._second = -1
        self._routes: list[_Direct] | None = None

    def request_summary(self, summary: RequestSummary) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        now = time.time_ns()
        second = now // 1_000_000_000
        if second != self._second:
            self._route(second)
        routes = self._routes
        if routes is None:
            self._handle(logger, summary)
            return
        # The numbers as ``str(round(x, 3))`` spells them (see _decimal3), once for both
        # formats: a float conversion is the dearest step of the line.
        model, outcome, share = _policy(summary.routing)
        matched = None if share is None else _decimal3(share)
        first_byte = summary.first_byte
        ttft_ms = None if first_byte is None else _decimal3(first_byte * 1000.0)
        duration_ms = _decimal3(summary.seconds * 1000.0)
        worker = summary.worker
        message = (
            f"{summary.method} {summary.path} {summary.status} id={summary.request_id} "
            f"model={model} worker={worker} outcome={outcome} matched={matched} "
            f"ttft_ms={ttft_ms} duration_ms={duration_ms} attempts={summary.attempts}"
        )
        msecs = _MSECS[now // 1_000_000 % 1000]
        for as_json, head, middle, sinks in routes:
            if as_json:
                line = (
                    f"{head}{msecs}{middle}{_encode_str(message)}, "
                    f'"request_id": {_encode_str(summary.request_id)}, '
                    f'"method": {_encode_str(summary.method)}, '
                    f'"path": {_encode_str(summary.path)}, '
                    f'"model": {"null" if model is None else _json(model)}, '
                    f'"worker": {"null" if worker is None else _json(worker)}, '
                    f'"outcome": {"null" if outcome is None else _json(outcome)}, '
                    f'"matched": {"null" if matched is None else matched}, '
                    f'"status": {summary.status}, '
                    f'"ttft_ms": {"null" if ttft_ms is None else ttft_ms}, '
                    f'"duration_ms": {duration_ms}, "attempts": {summary.attempts}}}'
                )
            else:
                line = f"{head}{msecs}{middle}{message}"
            for sink in sinks:
                sink.add_line(line, second)

    def _route(self, second: int) -> None:
        """Work out where the lines of ``second`` go: directly to the handlers an info
        record would reach, when all of them are :class:`BatchingHandler` with this
        module's formatters and nothing could tell the difference (no filter on the logger
        or those handlers, the standard record factory); else through a LogRecord."""
        self._second = second
        self._routes = None
        logger = self.logger
        if logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
            return
        by_shape: dict[logging.Formatter, list[BatchingHandler]] = {}
        current: logging.Logger | None = logger
        while current is not None:
            for handler in current.handlers:
                shape = handler.formatter
                if (
                    type(handler) not in _BATCHING
                    or handler.filters
                    or type(shape) not in _DIRECT
                    or not shape.direct  # type: ignore[union-attr]
                ):
                    return
                if handler.level <= logging.INFO:
                    by_shape.setdefault(shape, []).append(handler)  # type: ignore[arg-type]
            current = current.parent if current.propagate else None
        if not by_shape:
            return  # logging's last resort: only the record path knows
        level = logging.getLevelName(logging.INFO)
        self._routes = [
            (type(shape) is JsonFormatter, *shape.parts(second, level, logger.name), sinks)  # type: ignore[attr-defined]
            for shape, sinks in by_shape.items()
        ]

    @staticmethod
    def _handle(logger: logging.Logger, summary: RequestSummary) -> None:
        """The line as a LogRecord through ``logger``'s filters and handlers."""
        model, outcome, share = _policy(summary.routing)
        fields = {
            "request_id": summary.request_id,
            "method": summary.method,
            "path": summary.path,
            "model": model,
            "worker": summary.worker,
            "outcome": outcome,
            "matched": None if share is None else round(share, 3),
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


#: A direct route: JSON or not, the line's text before and after its milliseconds (for
#: the second it was worked out for), and the handlers that take it.
_Direct = tuple[bool, str, str, list["BatchingHandler"]]


def _policy(routing: RoutingRequest | None) -> tuple[str | None, str | None, float | None]:
    """The request's model, the policy's outcome and (with an outcome) the share of the
    routing key it found cached."""
    if routing is None:
        return None, None, None
    outcome = routing.outcome
    if outcome is None or not routing.key:
        return routing.model, outcome, None
    return routing.model, outcome, routing.matched / len(routing.key)


#: Milliseconds as ``03d`` writes them: a lookup costs a tenth of the formatting.
_MSECS = tuple(f"{n:03d}" for n in range(1000))


def _decimal3(value: float) -> str:
    """``str(round(value, 3))`` in one conversion instead of two: both round the exact
    binary value to three decimals, and below 2**52 / 1000 no shorter decimal names the
    same float, so ``repr`` gives those digits back without trailing zeros."""
    text = f"{value:.3f}"
    if text[-1] != "0":
        return text
    text = text.rstrip("0")
    return text + "0" if text[-1] == "." else text


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps writes a str with
#: ``json.dumps(value, default=str)`` without a new encoder per call.
_encode_any = json.JSONEncoder(default=str).encode


def _json(value: object) -> str:
    """``value`` as ``json.dumps(value, default=str)`` writes it."""
    if type(value) is str:
        return _encode_str(value)
    return "null" if value is None else _encode_any(value)


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

    @property
    def direct(self) -> bool:
        """Whether :meth:`parts` spells what :meth:`format` writes: the default format
        and date."""
        return self._style._fmt == TEXT_FORMAT and self.datefmt is None

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"  # as logging's default

    def parts(self, second: int, level: str, name: str) -> tuple[str, str]:
        """:meth:`format` of a record of ``level`` and logger ``name`` made in ``second``,
        without exception or stack, is the first part, the milliseconds as ``03d``, the
        second part, and the message."""
        return f"{self._stamp(second)},", f" {level} {name}: "


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, every field given in ``extra``, and ``exc`` with a traceback."""

    direct = True

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
        return _encode_any(entry)

    def parts(self, second: int, level: str, name: str) -> tuple[str, str]:
        """:meth:`format` of a record of ``level`` and logger ``name`` made in ``second``,
        without exception, is the first part, the milliseconds as ``03d``, the second
        part, the message as JSON, and then ``, `` and its extra attributes as JSON keys
        and values and the closing ``}``."""
        return (
            f'{{"time": "{self._stamp(second)}.',
            f'Z", "level": {_json(level.lower())}, "logger": {_json(name)}, "message": ',
        )


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``--log-format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be text or json, not {log_format!r}")


#: The longest a directly formatted access line waits in a batch before it is written.
FLUSH_SECONDS = 0.05
#: A batch larger than this (in characters) is written at once: within ``PIPE_BUF`` for a
#: pipe or socket (``--workers`` processes share standard error; a write that size is
#: never interleaved with another), 64 KiB for a file or terminal.
_PIPE_BATCH = 4096
_FILE_BATCH = 65536

_batchers: weakref.WeakSet[BatchingHandler] = weakref.WeakSet()


def _batch_limit(stream: Any) -> int:
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no descriptor (io.UnsupportedOperation)
        return _PIPE_BATCH
    return _PIPE_BATCH if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else _FILE_BATCH


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that also takes access lines formatted without a record
    (:meth:`add_line`, from :class:`AccessLog`) and writes them in batches: at most
    :data:`FLUSH_SECONDS` after the first of a batch (a timer on the running event loop),
    when a batch reaches a few KiB, before any record it handles (which it writes at once,
    so the stream keeps its order), on :meth:`flush` and :meth:`close` (``logging.shutdown``
    at exit does both) and on :func:`flush_batches`. Off an event loop a line is written at
    once. Records are handled as by ``StreamHandler``, one write each."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._start_batches()

    def _start_batches(self) -> None:
        self._pending: list[str] = []
        self._size = 0
        # The second after which an armed timer is overdue (its loop has ended), or -1.
        self._armed_until = -1
        self._limit = _batch_limit(self.stream)
        _batchers.add(self)

    def _open_stream(self) -> TextIO | None:
        return self.stream  # type: ignore[no-any-return]

    def add_line(self, line: str, second: int) -> None:
        """Append ``line`` (no terminator) to the batch; ``second`` is the current one.

        Without the lock: only the event loop's thread adds lines, and a writer in another
        thread takes what it writes off the front of the same list (``del`` of a slice,
        atomic under the GIL), so a line added meanwhile stays for the next write."""
        pending = self._pending
        size = self._size + len(line) + 1
        if size > self._limit and pending:
            self.flush()
            size = len(line) + 1
        pending.append(line)
        self._size = size
        if second > self._armed_until:
            loop = _get_running_loop()
            if loop is None:
                self.flush()
                return
            self._armed_until = second + 1
            loop.call_later(FLUSH_SECONDS, self._timer)

    def _timer(self) -> None:
        self._armed_until = -1
        self.flush()

    def _write_pending(self, text: str) -> None:
        """Write the batch, then ``text``, in one write; the caller holds the lock."""
        pending = self._pending
        taken = len(pending)
        if taken:
            terminator = self.terminator
            text = terminator.join(pending[:taken]) + terminator + text
            del pending[:taken]
            self._size = 0
        stream = self._open_stream()
        if stream is None or not text:
            return
        try:
            stream.write(text)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "a batch of access lines"}))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._write_pending(text)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                self._write_pending("")
            else:
                super().flush()

    def close(self) -> None:
        self.flush()
        _batchers.discard(self)
        super().close()

    def setStream(self, stream: TextIO) -> TextIO | None:
        old = super().setStream(stream)  # flushes the batch to the old stream first
        self._limit = _batch_limit(stream)
        return old


class BatchingFileHandler(BatchingHandler, logging.FileHandler):
    """:class:`BatchingHandler` on a file opened as ``FileHandler`` opens it."""

    def __init__(self, filename: str, encoding: str | None = None) -> None:
        logging.FileHandler.__init__(self, filename, encoding=encoding)
        self._start_batches()

    def _open_stream(self) -> TextIO | None:
        # As FileHandler.emit: reopened after close(), unless that would truncate it.
        if self.stream is None and (self.mode != "w" or not self._closed):  # type: ignore[attr-defined]
            self.stream = self._open()
        return self.stream


_BATCHING = frozenset({BatchingHandler, BatchingFileHandler})
_DIRECT = frozenset({TextFormatter, JsonFormatter})


def flush_batches() -> None:
    """Write every batched access line now (each :class:`BatchingHandler`)."""
    for handler in list(_batchers):
        handler.flush()


class FlushAtShutdown:
    """A background task (``Router.background``) that writes the batched access lines when
    the app's lifespan ends: a process that then ends by the signal it got (uvicorn
    re-raises SIGTERM) runs no ``atexit`` hook."""

    async def run(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            flush_batches()


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
