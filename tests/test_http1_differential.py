"""cache_router.proxy.http1 against a reference: h11 reads the same engine answers.

Hypothesis generates answers, valid and broken (status lines, header bytes, framing,
chunk sizes, 1xx, HEAD/204/304 bodies, early close), as the bytes an engine writes. The
bytes go to :class:`Http1Client` through a scripted engine on 127.0.0.1 (in one write or
split at generated points, then closed or kept open) and, in memory, to
``h11.Connection(our_role=h11.CLIENT)``. Both verdicts -- accepted, rejected or still
waiting for bytes; status, headers and body; whether the connection may carry another
request -- must agree, except where :data:`DIFFERENCES` says why ours differs on purpose.

No timing decides a verdict: "still waiting" is seen as every written byte received and
the exchange parked on its connection, not as a read timeout. CI runs 250 examples from a
fixed seed; ``HTTP1_DIFF_EXAMPLES=5000`` runs that many from a random one (a deeper search).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("httptools")
h11 = pytest.importorskip("h11")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cache_router.proxy import http1  # noqa: E402
from cache_router.proxy.clients import UpstreamError  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# -- the generated answers ---------------------------------------------------------------


@dataclass
class Case:
    """One engine answer: its bytes, how they are written, and tags naming its oddities."""

    method: str
    data: bytes
    splits: list[int]
    close: bool  # the engine closes after writing; otherwise it keeps the connection open
    tags: frozenset[str] = frozenset()

    def pieces(self) -> list[bytes]:
        cuts = [0, *sorted({cut for cut in self.splits if cut < len(self.data)}), len(self.data)]
        return [self.data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


Part = tuple[bytes, frozenset[str]]


def part(data: bytes, *tags: str) -> Part:
    return data, frozenset(tags)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789 /;=,.", max_size=12)

VERSIONS = st.sampled_from(
    [part(b"HTTP/1.1")] * 20
    + [part(b"HTTP/1.0", "http10"), part(b"HTTP/2.0", "bad-version")]
    + [part(b"http/1.1", "bad-version"), part(b"HTTP/1.1x", "bad-version")]
)
FINAL_STATUSES = st.sampled_from(
    [part(b"%d" % code) for code in (200, 200, 200, 201, 204, 304, 400, 404, 500, 503) * 3]
    + [part(code, "bad-status") for code in (b"099", b"600", b"999", b"2x0", b"20", b"2000")]
)
REASONS = st.sampled_from(
    [
        part(b" OK"),
        part(b" "),
        part(b" Some Reason"),
        part(b""),
        part(b" caf\xe9", "obs-text"),
        part(b" O\x01K", "ctl-reason"),
    ]
)


@st.composite
def header_lines(draw: st.DrawFn) -> Part:
    """A header line that says nothing about framing, ordinary or odd."""
    name = draw(TOKEN).encode()
    value = draw(VALUE).encode()
    kind = draw(st.sampled_from(["plain"] * 40 + ["fold", "ctl", "obs", "space", "colonless"]))
    if kind == "fold":
        return part(b"%s: %s\r\n  more\r\n" % (name, value), "obs-fold")
    if kind == "ctl":
        byte = draw(st.sampled_from([b"\x00", b"\x01", b"\x1f", b"\x7f", b"\r"]))
        return part(b"%s: a%sb\r\n" % (name, byte), "ctl-value")
    if kind == "obs":
        return part(b"%s: a\xe9\xff\r\n" % name, "obs-text")
    if kind == "space":
        return part(b"%s : %s\r\n" % (name, value), "space-before-colon")
    if kind == "colonless":
        return part(b"%s %s\r\n" % (name, value), "colonless")
    return part(b"%s: %s\r\n" % (name, value))


CONNECTION = st.sampled_from(
    [part(b"")] * 3
    + [part(b"connection: close\r\n"), part(b"Connection: Close\r\n")]
    + [part(b"connection: keep-alive\r\n"), part(b"connection: keep-alive, x-y\r\n")]
)


@st.composite
def chunk_sizes(draw: st.DrawFn, size: int) -> Part:
    odd = ["upper", "zeros", "ext", "ext", "bad", "space", "huge"]
    form = draw(st.sampled_from(["hex"] * 20 + odd))
    if form == "upper":
        return part(b"%X" % size)
    if form == "zeros":
        return part(b"000%x" % size)
    if form == "ext":
        return part(b'%x;name=value;q="a b"' % size)
    if form == "bad":
        return part(draw(st.sampled_from([b"zz", b"-1", b"", b"0x5", b"5z"])), "bad-chunk-size")
    if form == "space":
        return part(b"%x " % size, "chunk-size-space")
    if form == "huge":
        return part(b"f" * 17, "bad-chunk-size")
    return part(b"%x" % size)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> Part:
    out: list[bytes] = []
    tags: set[str] = set()
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=12))
        size, size_tags = draw(chunk_sizes(len(data)))
        tags |= size_tags
        ending = draw(st.sampled_from([b"\r\n"] * 30 + [b"", b"\n", b"xx"]))
        if ending != b"\r\n":
            tags.add("bad-chunk-end")
        out += [size, b"\r\n", data, ending]
    end = draw(st.sampled_from(["last"] * 5 + ["trailers"] * 2 + ["missing", "cut"]))
    if end == "last":
        out.append(b"0\r\n\r\n")
    elif end == "trailers":
        out.append(b"0\r\nx-trailer: t\r\nx-other: u\r\n\r\n")
    elif end == "cut":
        out.append(b"0\r\n")
    return b"".join(out), frozenset(tags)


TRANSFER_CODINGS = st.sampled_from(
    [part(b"chunked")] * 12
    + [part(b"Chunked"), part(b" chunked ")]
    + [part(b"gzip, chunked", "te-coding"), part(b"chunked, gzip", "te-other")]
    + [part(b"gzip", "te-other"), part(b"identity", "te-other")]
)


@st.composite
def framed(draw: st.DrawFn) -> tuple[bytes, bytes, frozenset[str]]:
    """Framing header lines and a body (which may be short, long or broken)."""
    kind = draw(st.sampled_from(["length"] * 4 + ["chunked"] * 4 + ["none", "both"]))
    if kind == "none":
        return b"", draw(st.binary(max_size=16)), frozenset()
    if kind in ("chunked", "both"):
        coding, tags = draw(TRANSFER_CODINGS)
        body, body_tags = draw(chunked_bodies())
        lines = b"transfer-encoding: %s\r\n" % coding
        if draw(st.integers(0, 9)) == 0:
            lines += b"transfer-encoding: chunked\r\n"
            tags |= {"te-twice"}
        if kind == "both":
            lines += b"content-length: %d\r\n" % len(body)
            tags |= {"length-and-chunked"}
        if "te-other" in tags:
            body_tags = frozenset()  # not chunked, so nothing in it is a bad chunk
        return lines, body, tags | body_tags
    body = draw(st.binary(max_size=16))
    length = len(body) + draw(st.sampled_from([0, 0, 0, 0, -1, 3]))
    length = max(length, 0)
    form = draw(st.sampled_from(["plain"] * 20 + ["same-twice", "differ", "list", "odd", "odd"]))
    if form == "same-twice":
        return (
            b"content-length: %d\r\ncontent-length: %d\r\n" % (length, length),
            body,
            frozenset({"length-twice"}),
        )
    if form == "differ":
        lines = b"content-length: %d\r\ncontent-length: %d\r\n" % (length, length + 1)
        return lines, body, frozenset({"length-differ"})
    if form == "list":
        return b"content-length: %d, %d\r\n" % (length, length), body, frozenset({"length-twice"})
    if form == "odd":
        forms = [b"+%d", b"-%d", b"0x%d", b"%d.0", b"%d a", b"9" * 30 + b"%d"]
        value = draw(st.sampled_from(forms))
        return b"content-length: " + value % length + b"\r\n", body, frozenset({"bad-length"})
    return b"content-length: %d\r\n" % length, body, frozenset()


@st.composite
def interim_answers(draw: st.DrawFn) -> Part:
    code = draw(st.sampled_from([b"100", b"102", b"103", b"101"]))
    line = b"HTTP/1.1 %s Interim\r\n" % code
    tags = {"switch"} if code == b"101" else set()
    if draw(st.booleans()):
        line += b"link: </style.css>; rel=preload\r\n"
    return line + b"\r\n", frozenset(tags)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    tags: set[str] = set()
    chunks: list[bytes] = []
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        data, more = draw(interim_answers())
        chunks.append(data)
        tags |= more
    for drawn, ending in ((VERSIONS, b" "), (FINAL_STATUSES, b""), (REASONS, b"\r\n")):
        data, more = draw(drawn)
        chunks.append(data + ending)
        tags |= more
    lines = draw(st.lists(header_lines(), max_size=3))
    framing, body, more = draw(framed())
    tags |= more
    connection, _ = draw(CONNECTION)
    header_block = [line for line, _ in lines] + [framing, connection]
    for _, more in lines:
        tags |= more
    chunks += draw(st.permutations(header_block))
    chunks += [b"\r\n", body]
    if draw(st.integers(0, 9)) == 0:
        chunks.append(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # an unasked answer
    data = b"".join(chunks)
    if draw(st.integers(0, 15)) == 0:  # cut short anywhere
        data = data[: draw(st.integers(0, len(data)))]
    splits = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3))
    method = draw(st.sampled_from(["GET"] * 4 + ["HEAD"]))
    if method == "HEAD":
        tags.add("head")
    return Case(method, data, splits, draw(st.booleans()), frozenset(tags))


# -- verdicts ----------------------------------------------------------------------------


@dataclass
class Verdict:
    outcome: str  # "accept", "reject" or "waiting" (every byte read, the answer unfinished)
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reusable: bool = False
    detail: str = ""
    surplus: bytes = b""  # bytes after the answer (h11's view)

    def same_answer(self, other: Verdict) -> bool:
        return (self.status, self.headers, self.body) == (other.status, other.headers, other.body)


def normal(headers: Any) -> list[tuple[bytes, bytes]]:
    """Names in lower case, and Transfer-Encoding's value too (h11 lowers it)."""
    out = []
    for name, value in headers:
        lowered = name.lower()
        out.append((lowered, value.lower() if lowered == b"transfer-encoding" else value))
    return out


def reference(case: Case) -> Verdict:
    """What h11 makes of the bytes, fed in the same pieces, then the close if any."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=http1.MAX_HEADER_BYTES)
    connection.send(h11.Request(method=case.method, target="/", headers=[("host", "engine")]))
    connection.send(h11.EndOfMessage())
    verdict = Verdict("waiting")
    body: list[bytes] = []
    try:
        for piece in [*case.pieces(), *([b""] if case.close else [])]:
            connection.receive_data(piece)
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Response):
                    verdict.status = event.status_code
                    verdict.headers = normal(event.headers.raw_items())
                elif isinstance(event, h11.Data):
                    body.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    verdict.outcome = "accept"
                elif isinstance(event, h11.ConnectionClosed):
                    break
    except h11.RemoteProtocolError as exc:
        if verdict.outcome != "accept":
            return Verdict("reject", detail=str(exc))
        verdict.detail = str(exc)  # bytes after a whole answer: it stands, the connection not
    verdict.body = b"".join(body)
    verdict.surplus = connection.trailing_data[0]
    verdict.reusable = (
        verdict.outcome == "accept"
        and not verdict.detail
        and not case.close
        and connection.their_state is h11.DONE
        and connection.trailing_data == (b"", False)
    )
    return verdict


class Engine:
    """One scripted engine for every example: writes the current case's bytes, as split."""

    def __init__(self) -> None:
        self.case: Case | None = None
        self.url = ""
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            case = self.case
            assert case is not None
            for piece in case.pieces():
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)  # one loop turn: the pieces tend to arrive apart
            if not case.close:
                await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class Watch:
    """Counts the bytes http1's connections receive; wakes the driver on each read."""

    def __init__(self) -> None:
        self.received = 0
        self.connection: Any = None
        self.tick = asyncio.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = http1._Connection.data_received
        lost = http1._Connection.connection_lost
        made = http1._Connection.connection_made
        watch = self

        def data_received(connection: Any, data: bytes) -> None:
            watch.received += len(data)
            original(connection, data)
            watch.tick.set()

        def connection_made(connection: Any, transport: Any) -> None:
            made(connection, transport)
            watch.connection = connection
            watch.tick.set()

        def connection_lost(connection: Any, exc: Exception | None) -> None:
            lost(connection, exc)
            watch.tick.set()

        monkeypatch.setattr(http1._Connection, "data_received", data_received)
        monkeypatch.setattr(http1._Connection, "connection_lost", connection_lost)
        monkeypatch.setattr(http1._Connection, "connection_made", connection_made)

    async def until(self, done: Any) -> None:
        """Until ``done()``, woken by reads and closes (bounded: a hang fails the example)."""
        for _ in range(10_000):
            if done():
                return
            self.tick.clear()
            try:
                await asyncio.wait_for(self.tick.wait(), 5)
            except asyncio.TimeoutError:
                return

    async def settle(self, task: asyncio.Future[Any] | None = None) -> None:
        """A few loop turns, so what the last read woke has run (or ``task`` has ended)."""
        for _ in range(20):
            if task is not None and task.done():
                return
            await asyncio.sleep(0)


def _no_fallback() -> Any:
    raise AssertionError("no fallback client expected")


async def ours(engine: Engine, watch: Watch, case: Case) -> Verdict:
    """What http1 makes of the bytes, read through the public client API."""
    engine.case = case
    watch.received = 0
    watch.connection = None
    made = http1.Http1Client(
        connect_timeout=5,
        read_timeout=30,  # never reached: a parked exchange is seen, not timed out
        pool_timeout=5,
        max_connections=4,
        max_idle_connections=4,
        keepalive_expiry=60,
        fallback=_no_fallback,
    )
    verdict = Verdict("accept")
    body: list[bytes] = []

    async def exchange() -> None:
        response = await made.send(case.method, engine.url, [], b"")
        verdict.status = response.status
        verdict.headers = normal(response.headers)
        try:
            async for chunk in response.chunks():
                body.append(chunk)
        finally:
            await response.aclose()

    total = len(case.data)
    task = asyncio.ensure_future(exchange())
    try:
        if case.close:
            await watch.until(task.done)
        else:
            await watch.until(
                lambda: task.done() or (watch.connection is not None and watch.received >= total)
            )
            await watch.settle(task)
        if not task.done():
            connection = watch.connection
            parked = connection is not None and connection.waiter is not None
            assert parked and not connection.waiter.done(), "the exchange neither ended nor waits"
            task.cancel()
            verdict.outcome = "waiting"
        try:
            await task
        except UpstreamError as exc:
            return Verdict("reject", detail=str(exc))
        except asyncio.CancelledError:
            pass
        verdict.body = b"".join(body)
        if verdict.outcome == "accept" and not case.close:
            # Reusable: back in the pool once every byte the engine wrote has come in.
            connection = watch.connection
            await watch.until(lambda: watch.received >= total or connection.closed)
            await watch.settle()
            idle = made._pool.idle.get(connection.address, [])
            verdict.reusable = connection in idle and not connection.closed
        return verdict
    finally:
        await made.aclose()


# -- where ours differs on purpose -------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    tag: str
    ours: tuple[str, ...]  # what http1 does with such an answer where h11 does otherwise
    reason: str


DIFFERENCES = [
    Difference(
        "http10",
        ("reusable",),
        "an HTTP/1.0 answer with 'connection: keep-alive': RFC 9112 9.3 lets the connection "
        "persist, and llhttp does; h11 never keeps an HTTP/1.0 connection",
    ),
    Difference(
        "chunk-size-space",
        ("reject",),
        "whitespace after a chunk size with no extension: RFC 9112 7.1 allows it only "
        "before a ';'; h11 reads it, llhttp refuses it (a known smuggling vector in proxies)",
    ),
    Difference(
        "head",
        ("not reusable",),
        "after HEAD: llhttp cannot be told the request was HEAD, so http1 ends the exchange "
        "at the head and closes the connection (which is always safe)",
    ),
    Difference(
        "bad-version",
        ("not reusable",),
        "an answer claiming a version other than HTTP/1.x: llhttp keeps no connection alive "
        "past it; h11 treats any version from 1.1 up as 1.1",
    ),
    Difference(
        "ctl-value",
        ("reject",),
        "a control byte in a header value (RFC 9110 5.5 forbids them): h11 reads them; we "
        "refuse the answer rather than pass a byte some server would choke on to the client",
    ),
    Difference(
        "obs-fold",
        ("reject",),
        "a folded header line: RFC 9112 5.2 lets a gateway answer 502 instead of unfolding; "
        "h11 unfolds it, as a user agent must",
    ),
    Difference(
        "length-and-chunked",
        ("reject",),
        "Content-Length beside Transfer-Encoding: RFC 9112 6.1 says it 'ought to be handled "
        "as an error' (a response-splitting sign); h11 lets chunked win",
    ),
    Difference(
        "length-twice",
        ("reject",),
        "the same Content-Length twice (or as a list): RFC 9112 6.3 lets a recipient take the "
        "one value or reject the answer; llhttp rejects, which an engine never needs",
    ),
    Difference(
        "te-other",
        ("accept", "waiting"),
        "a transfer coding other than a final chunked: RFC 9112 6.3 reads such a body until "
        "the close, as we do; h11 refuses every coding but chunked for simplicity",
    ),
    Difference(
        "te-coding",
        ("accept", "waiting"),
        "gzip, chunked is valid framing (RFC 9112 6.1); h11 supports only chunked alone",
    ),
]


EARLY = Difference(
    "(early)",
    ("reject",),
    "llhttp judges each byte as it comes, h11 whole lines: bytes no valid answer starts "
    "with are refused at once, where h11 waits for the line to end (and then refuses too)",
)


EMPTY_LINES = Difference(
    "(empty lines)",
    ("reusable",),
    "only CR/LF after the answer, in the read that ended it: llhttp skips empty lines "
    "before a message (RFC 9112 2.2), so the connection stays in step; h11 keeps nothing "
    "with surplus bytes (later bytes on an idle connection close it in http1 too)",
)


def known(case: Case, mine: Verdict, theirs: Verdict) -> Difference | None:
    outcome = mine.outcome
    if outcome == theirs.outcome == "accept" and mine.same_answer(theirs) and theirs.reusable:
        outcome = "not reusable"  # the answer agrees; ours will not use the connection again
    if outcome == theirs.outcome == "accept" and mine.same_answer(theirs) and mine.reusable:
        outcome = "reusable"  # the answer agrees; ours uses the connection again, h11 not
    if outcome == "reusable" and theirs.surplus and not theirs.surplus.strip(b"\r\n"):
        return EMPTY_LINES
    if outcome == "reject" and theirs.outcome == "waiting":
        ended = Case(case.method, case.data + b"\r\n\r\n", [], close=True)
        if reference(ended).outcome == "reject":
            return EARLY
    for difference in DIFFERENCES:
        if difference.tag in case.tags and outcome in difference.ours:
            return difference
    return None


# -- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness() -> Iterator[tuple[asyncio.AbstractEventLoop, Engine, Watch]]:
    loop = asyncio.new_event_loop()
    engine = Engine()
    with pytest.MonkeyPatch.context() as monkeypatch:
        asyncio.set_event_loop(loop)
        watch = Watch()
        watch.install(monkeypatch)
        loop.run_until_complete(engine.start())
        try:
            yield loop, engine, watch
        finally:
            assert engine.server is not None
            engine.server.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            asyncio.set_event_loop(None)


@settings(
    max_examples=int(os.environ.get("HTTP1_DIFF_EXAMPLES", "250")),
    deadline=None,
    derandomize="HTTP1_DIFF_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_http1_reads_answers_as_h11_does(
    harness: tuple[asyncio.AbstractEventLoop, Engine, Watch], case: Case
) -> None:
    loop, engine, watch = harness
    theirs = reference(case)
    mine = loop.run_until_complete(ours(engine, watch, case))
    if mine.outcome == theirs.outcome and (
        mine.outcome != "accept" or (mine.same_answer(theirs) and mine.reusable == theirs.reusable)
    ):
        event(f"agree: {mine.outcome}" + (", reusable" if mine.reusable else ""))
        return
    difference = known(case, mine, theirs)
    assert difference is not None, f"\n{case}\nours:   {mine}\nh11:    {theirs}"
    event(f"differ on purpose: {difference.tag}")
