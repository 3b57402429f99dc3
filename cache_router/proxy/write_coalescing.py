"""One system call for a response head and what follows it in the same event-loop step.

uvicorn writes a response head when the app sends ``http.response.start`` and the body when
it sends ``http.response.body``: two ``send()`` calls, and over loopback two trips through
the kernel's TCP stack, for an answer the relay hands over in one go. A router's CPU per
request is largely such system calls, so :class:`CoalescingTransport` holds the first write
of a step and sends it with the next one, at once, as one buffer: the head with its body,
the head of a stream with its first event, two stream events that arrived in one read. A
write with nothing after it in its step goes out at the end of the step (``call_soon``),
so nothing waits longer than the loop takes to come round; closing the connection sends
what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CoalescingTransport"]

#: A held write and the next one up to this many bytes in all leave as one joined buffer,
#: above it as a vectored write: copying a small answer costs less than the vector.
_JOIN_LIMIT = 64 * 1024


class CoalescingTransport:
    """``transport`` with the first write of a step held for the next one.

    Everything but writing and closing is ``transport``'s own, by explicit delegation (no
    ``__getattr__``: its failed lookup first costs more than the write saves);
    ``is_closing``, asked on every response, is ``transport``'s bound method itself. Data
    is copied to bytes when it is not bytes already: an app may reuse its buffer once
    ``send`` has returned.
    """

    __slots__ = ("_held", "_loop", "_transport", "is_closing")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self.is_closing = transport.is_closing  # asked on every response

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._held = None
        if len(held) + len(data) <= _JOIN_LIMIT:
            self._transport.write(held + data)
        else:
            self._transport.writelines((held, data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Sends what is held now (dropped if the connection is closing)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

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
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    # The rest of the transport's interface, used once per connection at most.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()
