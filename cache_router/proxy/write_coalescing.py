"""One system call for the writes a connection makes in one event-loop step.

uvicorn writes a response head when the app sends ``http.response.start`` and the body when
it sends ``http.response.body``: two ``send()`` calls, and over loopback two trips through
the kernel's TCP stack, for an answer the relay hands over in one go. A router's CPU per
request is mostly such system calls, so :class:`CoalescingTransport` holds the writes made
in one step of the event loop and hands them to the socket together at the end of it
(``call_soon``): the head with its body, the last chunk of a stream with the chunked
terminator, several stream events that arrived in one read. Nothing waits longer than the
loop takes to come round again; the server protocol flushes as soon as a response is
complete (the work that follows it in the same step, releasing the lease, logging, need not
delay the answer), and closing the connection sends what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CoalescingTransport"]


class CoalescingTransport:
    """``transport`` with the writes of one event-loop step sent as one.

    Everything but writing and closing is ``transport``'s own. Data is copied to bytes when
    it is not bytes already: an app may reuse its buffer once ``send`` has returned.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        held = self._held
        if held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            held.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Sends what is held now (dropped if the connection is closing)."""
        held, self._held = self._held, None
        if not held or self._transport.is_closing():
            return
        if len(held) == 1:
            self._transport.write(held[0])
        else:
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = self._held
        pending = sum(map(len, held)) if held else 0
        return self._transport.get_write_buffer_size() + pending

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
