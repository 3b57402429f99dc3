"""The access line's direct path under ``cache-router serve``: formatted without a LogRecord
into :class:`BatchingHandler` batches, it writes what the record path writes, in order,
and nothing is lost at shutdown; any filter, foreign handler or record factory sends the
line back through the record path."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_cli import serve_process

from cache_router.core.events import RequestSummary
from cache_router.core.request import RoutingRequest
from cache_router.ops import access_log
from cache_router.ops.access_log import (
    ACCESS_LOGGER,
    FLUSH_SECONDS,
    AccessLog,
    BatchingFileHandler,
    BatchingHandler,
    FlushAtShutdown,
    flush_batches,
    formatter,
)
from cache_router.testing import SimulatedEngine, serve_app

pytestmark = pytest.mark.timeout(60)

#: A time whose milliseconds a float holds exactly (LogRecord works from ``time.time()``).
NOW_NS = 1_800_000_000_250_000_000
_names = itertools.count()


def _routing(key: str, model: str | None, outcome: str | None, matched: int) -> RoutingRequest:
    routing = RoutingRequest(key, model)
    routing.outcome, routing.matched = outcome, matched
    return routing


SUMMARIES = [
    RequestSummary(
        "f48580bb25034bd398da07e6",
        "POST",
        "/v1/chat/completions",
        _routing("abcdefg", "sim-model", "cache_hit", 5),
        "http://10.0.0.2:30000",
        1,
        200,
        0.236645,
        0.2137981,
    ),
    # Refused before routing: no routing, worker, attempts or first byte.
    RequestSummary("bad", "GET", "/v1/completions", None, None, 0, 405, 0.0004, None),
    # Strings JSON must escape, a policy that records no outcome, a client that left.
    RequestSummary(
        'q"uo\\te\t',
        "POST",
        "/v1/caf\u00e9/\u2603",
        _routing("k", None, None, 0),
        "http://w:2",
        2,
        0,
        12.5,
        0.1,
    ),
    RequestSummary(
        "x", "POST", "/generate", _routing("", "m", "cache_miss", 0), "http://w", 3, 502, 100, 0
    ),
]


def _logger() -> logging.Logger:
    logger = logging.getLogger(f"test_access_log_batching.{next(_names)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: NOW_NS)
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)


def _written(handler: logging.Handler, name: str, *, direct: bool) -> str:
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.addHandler(handler)
    if direct:

        def no_record(*args: object) -> logging.LogRecord:
            raise AssertionError("the direct path made a record")

        logger.makeRecord = no_record  # type: ignore[assignment,method-assign]
    log = AccessLog(logger)
    try:
        for summary in SUMMARIES:
            log.request_summary(summary)
    finally:
        vars(logger).pop("makeRecord", None)
        logger.removeHandler(handler)
    handler.flush()
    return stream.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_direct_line_is_the_line_the_record_path_writes(frozen: None, log_format: str) -> None:
    batching = BatchingHandler()
    batching.setFormatter(formatter(log_format))
    plain = logging.StreamHandler()
    plain.setFormatter(formatter(log_format))
    name = _logger().name
    direct = _written(batching, name, direct=True)
    assert direct == _written(plain, name, direct=False)
    assert direct.count("\n") == len(SUMMARIES)
    if log_format == "text":
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW_NS // 10**9))
        first = direct.splitlines()[0]
        assert first.startswith(f"{stamp},250 INFO test_access_log_batching.")
        assert first.split(": ", 1)[1].startswith(
            "POST /v1/chat/completions 200 id=f48580bb25034bd398da07e6 model=sim-model "
            "worker=http://10.0.0.2:30000 outcome=cache_hit matched=0.714 "
        )


def test_three_decimals_are_spelled_as_round_then_str() -> None:
    rng = random.Random(8)
    values = [0.0, 0.0005, 0.0015, 1.0005, 2.675, 0.1235, 100.0, 1e-7, 999.9995, 4.5e9]
    values += [n / 1000 + 0.0005 for n in range(2000)]
    values += [rng.random() * 10 ** rng.randint(-6, 9) for _ in range(100_000)]
    for value in values:
        assert access_log._decimal3(value) == str(round(value, 3)), value


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _reject_bad(record: logging.LogRecord) -> bool:
    return getattr(record, "request_id", None) != "bad"


@pytest.mark.parametrize("setup", ["logger filter", "handler filter", "foreign handler"])
def test_filters_and_foreign_handlers_get_records(setup: str) -> None:
    logger = _logger()
    batching = BatchingHandler(io.StringIO())
    batching.setFormatter(formatter("text"))
    logger.addHandler(batching)
    keep = _Keep()
    if setup == "logger filter":
        logger.addFilter(_reject_bad)
    elif setup == "handler filter":
        batching.addFilter(_reject_bad)
    else:
        logger.addHandler(keep)
    log = AccessLog(logger)
    for summary in SUMMARIES:
        log.request_summary(summary)
    batching.flush()
    lines = batching.stream.getvalue().splitlines()
    if setup == "foreign handler":
        assert len(lines) == len(keep.records) == len(SUMMARIES)
        assert keep.records[1].request_id == "bad"  # type: ignore[attr-defined]
    else:
        assert len(lines) == len(SUMMARIES) - 1
        assert not any("id=bad " in line for line in lines)


def test_a_record_factory_gets_every_access_record() -> None:
    made: list[str] = []
    factory = logging.getLogRecordFactory()

    def tagging(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record.name)
        return record

    logger = _logger()
    batching = BatchingHandler(io.StringIO())
    batching.setFormatter(formatter("json"))
    logger.addHandler(batching)
    logging.setLogRecordFactory(tagging)
    try:
        AccessLog(logger).request_summary(SUMMARIES[0])
    finally:
        logging.setLogRecordFactory(factory)
    assert made == [logger.name]


def test_below_info_nothing_is_written() -> None:
    logger = _logger()
    batching = BatchingHandler(io.StringIO())
    batching.setFormatter(formatter("text"))
    logger.addHandler(batching)
    log = AccessLog(logger)
    log.request_summary(SUMMARIES[0])
    logger.setLevel(logging.WARNING)  # a level change counts at once
    log.request_summary(SUMMARIES[1])
    batching.flush()
    assert batching.stream.getvalue().count("\n") == 1


class _Writes(io.StringIO):
    """A stream without a descriptor that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _batching(stream: io.StringIO) -> tuple[logging.Logger, BatchingHandler]:
    logger = _logger()
    handler = BatchingHandler(stream)
    handler.setFormatter(formatter("text"))
    logger.addHandler(handler)
    return logger, handler


def _ids(text: str) -> list[str]:
    return [
        line.split(" id=", 1)[1].split(" ", 1)[0] for line in text.splitlines() if " id=" in line
    ]


def test_a_batch_waits_for_its_timer_and_a_record_keeps_the_order() -> None:
    stream = _Writes()
    logger, _ = _batching(stream)
    log = AccessLog(logger)

    async def scenario() -> None:
        log.request_summary(SUMMARIES[0])
        log.request_summary(SUMMARIES[1])
        assert stream.writes == []  # batched
        logger.warning("between")  # written at once, after the lines before it
        assert len(stream.writes) == 1
        log.request_summary(SUMMARIES[3])
        assert len(stream.writes) == 1
        deadline = time.monotonic() + 5
        while len(stream.writes) == 1:
            assert time.monotonic() < deadline, "the batch's timer did not write it"
            await asyncio.sleep(FLUSH_SECONDS / 5)

    asyncio.run(scenario())
    first, second = stream.writes
    assert _ids(first) == ["f48580bb25034bd398da07e6", "bad"]
    assert first.endswith(" between\n")
    assert _ids(second) == ["x"]


def test_off_an_event_loop_a_line_is_written_at_once() -> None:
    stream = _Writes()
    logger, _ = _batching(stream)
    AccessLog(logger).request_summary(SUMMARIES[0])
    assert len(stream.writes) == 1


def test_batches_stay_within_a_pipe_write() -> None:
    stream = _Writes()  # no descriptor: treated as a pipe
    logger, _ = _batching(stream)
    log = AccessLog(logger)
    summaries = [
        RequestSummary(f"r{n}", "POST", "/generate", None, None, 0, 200, 0.5, None)
        for n in range(200)
    ]

    async def scenario() -> None:
        for summary in summaries:
            log.request_summary(summary)
        flush_batches()

    asyncio.run(scenario())
    assert len(stream.writes) > 1
    assert all(len(text) <= access_log._PIPE_BATCH for text in stream.writes)
    assert all(text.endswith("\n") for text in stream.writes)
    assert _ids(stream.getvalue()) == [f"r{n}" for n in range(200)]


def test_a_line_added_while_another_thread_writes_is_kept() -> None:
    stream = _Writes()
    logger, handler = _batching(stream)
    log = AccessLog(logger)
    other = logging.getLogger(logger.name + ".thread")
    summaries = [
        RequestSummary(f"r{n}", "POST", "/generate", None, None, 0, 200, 0.5, None)
        for n in range(2000)
    ]

    def warn() -> None:
        for n in range(200):
            other.warning("from a thread %d", n)

    async def scenario() -> None:
        thread = threading.Thread(target=warn)
        thread.start()
        for n, summary in enumerate(summaries):
            log.request_summary(summary)
            if n % 50 == 0:
                await asyncio.sleep(0)
        thread.join()
        handler.flush()

    asyncio.run(scenario())
    text = stream.getvalue()
    assert _ids(text) == [f"r{n}" for n in range(2000)]
    assert text.count("from a thread") == 200


def test_close_and_the_shutdown_task_write_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    handler = BatchingFileHandler(str(path), encoding="utf-8")
    handler.setFormatter(formatter("text"))
    logger = _logger()
    logger.addHandler(handler)
    log = AccessLog(logger)

    async def scenario() -> None:
        task = asyncio.ensure_future(FlushAtShutdown().run())
        await asyncio.sleep(0)
        log.request_summary(SUMMARIES[0])
        assert path.read_text() == ""
        task.cancel()  # the lifespan ends
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _ids(path.read_text()) == ["f48580bb25034bd398da07e6"]
        log.request_summary(SUMMARIES[1])
        handler.close()  # as logging.shutdown does at exit
        assert _ids(path.read_text()) == ["f48580bb25034bd398da07e6", "bad"]

    asyncio.run(scenario())
    logger.removeHandler(handler)


@pytest.fixture
def engine_url() -> Iterator[str]:
    with serve_app(SimulatedEngine(decode_seconds_per_token=0)) as url:
        yield url


def _post(client: httpx.Client, rid: str) -> None:
    answer = client.post(
        "/v1/completions",
        json={"prompt": "hello", "max_tokens": 1},
        headers={"x-request-id": rid},
    )
    assert answer.status_code == 200


def test_serve_writes_each_line_soon_and_every_line_on_sigterm(
    engine_url: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "cache-router.log"
    with (
        serve_process("--worker-urls", engine_url, "--log-dir", str(tmp_path)) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client,
    ):
        _post(client, "soon")
        deadline = time.monotonic() + 10
        while "id=soon " not in log_file.read_text():  # a tail -f sees it while serving
            assert time.monotonic() < deadline, "the access line was not written"
            time.sleep(0.02)
        for n in range(20):
            _post(client, f"last-{n}")
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=15)
    expected = ["soon", *(f"last-{n}" for n in range(20))]
    assert _ids(log_file.read_text()) == expected
    assert [rid for rid in _ids(served.stderr or "")] == expected
    assert ACCESS_LOGGER in (served.stderr or "")


def test_a_formatter_given_a_date_format_formats_the_record(frozen: None) -> None:
    logger = _logger()
    batching = BatchingHandler(io.StringIO())
    shape = formatter("text")
    shape.datefmt = "%H:%M"
    batching.setFormatter(shape)
    logger.addHandler(batching)
    AccessLog(logger).request_summary(SUMMARIES[0])
    batching.flush()
    stamp = time.strftime("%H:%M", time.localtime(NOW_NS // 10**9))
    assert batching.stream.getvalue().startswith(f"{stamp} INFO ")
