"""The per-request path does no work it can skip: checked by what runs, never by timing."""

from __future__ import annotations

import pytest

from cache_router.proxy.admission import Admission

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_a_free_admission_slot_is_taken_without_yielding_to_the_loop() -> None:
    """A coroutine that never suspends ends on its first step: no loop iteration spent."""
    admission = Admission(2)
    step = admission.enter()
    with pytest.raises(StopIteration) as ended:
        step.send(None)
    assert ended.value.value is True
    assert admission.in_flight == 1
    admission.leave()
    assert admission.in_flight == 0


async def test_a_full_admission_still_queues_and_hands_the_slot_on() -> None:
    import anyio

    admission = Admission(1, queue_size=1, queue_timeout=5.0)
    assert await admission.enter()
    got: list[bool] = []
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: _enter(admission, got))
        with anyio.fail_after(5):
            while admission.waiting != 1:
                await anyio.sleep(0.001)
        admission.leave()
    assert got == [True]
    assert admission.in_flight == 1
    admission.leave()


async def _enter(admission: Admission, got: list[bool]) -> None:
    got.append(await admission.enter())


def test_the_fanout_calls_a_listener_only_on_the_hooks_it_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cache_router.core.events import EventFanout, RequestSummary, RouterEvents
    from cache_router.core.registry import Worker
    from cache_router.core.request import RoutingRequest

    base_calls: list[str] = []

    def no_op(self: RouterEvents, *args: object, **kwargs: object) -> None:
        base_calls.append("base")

    for hook in ("request_routed", "upstream_answered", "upstream_completed", "request_finished"):
        monkeypatch.setattr(RouterEvents, hook, no_op)

    heard: list[object] = []

    class Summaries(RouterEvents):
        def request_summary(self, summary: RequestSummary) -> None:
            heard.append(summary)

    class Completions(RouterEvents):
        def upstream_completed(self, worker: Worker, status: int, seconds: float) -> None:
            heard.append(status)

    fanout = EventFanout([Summaries(), Completions()])
    worker = Worker("http://127.0.0.1:1")
    fanout.request_routed(worker, RoutingRequest("key", None))
    fanout.upstream_answered(worker, 200, 0.1)
    fanout.upstream_completed(worker, 200, 0.2)
    fanout.request_finished("/generate", 200, 0.3, None)
    summary = RequestSummary("id", "POST", "/generate", None, None, 1, 200, 0.3, None)
    fanout.request_summary(summary)
    assert heard == [200, summary]
    assert base_calls == []
    assert fanout and fanout.summarized
    assert not EventFanout([Completions()]).summarized


def test_the_log_formatters_convert_each_second_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import time

    from cache_router.ops.access_log import TEXT_FORMAT, formatter

    records = [
        logging.LogRecord("x", logging.INFO, "f", 1, "line %d", (n,), None) for n in range(3)
    ]
    for n, record in enumerate(records):
        record.created, record.msecs = 1_800_000_000.25 + n * 0.3, 250.0 + n * 300 % 1000
    records[2].created = 1_800_000_001.0  # the next second
    expected = [logging.Formatter(TEXT_FORMAT).format(record) for record in records]
    calls: list[object] = []
    strftime = time.strftime

    def counting(*args: object) -> str:
        calls.append(args)
        return strftime(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(time, "strftime", counting)
    for name in ("text", "json"):
        shape = formatter(name)
        lines = [shape.format(record) for record in records]
        if name == "text":
            assert lines == expected
        assert len(calls) == 2, name  # two seconds, three records
        calls.clear()


def test_an_access_line_carries_its_fields_as_record_attributes() -> None:
    import logging

    from cache_router.core.events import RequestSummary
    from cache_router.core.request import RoutingRequest
    from cache_router.ops.access_log import _STANDARD, AccessLog

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    logger = logging.getLogger("test_hot_path.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    keep = Keep()
    logger.addHandler(keep)
    routing = RoutingRequest("abcd", "m")
    routing.outcome, routing.matched = "cache_hit", 2
    AccessLog(logger).request_summary(
        RequestSummary("rid", "POST", "/generate", routing, "http://w", 1, 200, 0.25, 0.125)
    )
    (record,) = keep.records
    fields = {"request_id", "method", "path", "model", "worker", "outcome", "matched"}
    fields |= {"status", "ttft_ms", "duration_ms", "attempts"}
    assert not fields & _STANDARD  # never a clash with what a LogRecord has of its own
    assert {name: getattr(record, name) for name in ("request_id", "matched", "ttft_ms")} == {
        "request_id": "rid",
        "matched": 0.5,
        "ttft_ms": 125.0,
    }
    assert record.getMessage().startswith("POST /generate 200 id=rid model=m worker=http://w")
