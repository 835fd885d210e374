"""The server's HTTP/2 connections: tracked, so a drained server can close them, and with their writes
coalesced, so that what one event-loop iteration writes to a connection leaves in one ``send``.

grpclib writes a unary reply's headers, message and trailers with three ``transport.write`` calls, each
a system call, and a status update to each of a connection's watchers with one call per watcher. Here
each connection's transport collects the writes of an iteration and sends them together at its end,
which costs one loop callback instead of system calls and changes nothing in what is sent or when
within a millisecond.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpclib.protocol import H2Protocol
from grpclib.server import Server


class CoalescingTransport:
    """An asyncio transport whose ``write`` calls in one loop iteration are sent as one."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class Connections:
    """Installs itself as ``server``'s protocol factory; knows every open connection."""

    def __init__(self, server: Server) -> None:
        self._open: set[H2Protocol] = set()
        self._make_protocol = server._protocol_factory
        server._protocol_factory = self._protocol  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self._open)

    def close_all(self) -> None:
        """Close every open connection (what was written so far is sent first)."""
        for protocol in list(self._open):
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()

    def _protocol(self) -> H2Protocol:
        protocol = self._make_protocol()
        self._open.add(protocol)
        made, lost = protocol.connection_made, protocol.connection_lost

        def connection_made(transport: asyncio.BaseTransport) -> None:
            made(CoalescingTransport(transport))  # type: ignore[arg-type]

        def connection_lost(exc: BaseException | None) -> None:
            self._open.discard(protocol)
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol
