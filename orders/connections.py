"""The server's HTTP/2 connections: tracked, so a drained server can close them, with their writes
coalesced, so that what one event-loop iteration writes to a connection leaves in one ``send``, and with
room for more concurrent streams than h2's default of 100.

grpclib writes a unary reply's headers, message and trailers with three ``transport.write`` calls, each
a system call, and a status update to each of a connection's watchers with one call per watcher. Here
each connection's transport collects the writes of an iteration and sends them together at its end,
which costs one loop callback instead of system calls and changes nothing in what is sent or when
within a millisecond.

A client may open no more streams on a connection than the server's MAX_CONCURRENT_STREAMS setting says,
and queues the rest itself. With h2's 100, the watch limit per connection (also 100 by default) could never
be reached: a client with 100 open watches had its next watch, and every unary call on that connection,
wait in its own queue until their deadlines, instead of the server answering RESOURCE_EXHAUSTED for the
watch. The setting is therefore the watch limit plus h2's 100 for the other calls.

grpclib hands a call's request headers to its own request handler only, and leaves the ``grpc-*`` ones
out of the metadata; each call's headers are kept on its HTTP/2 stream here, for :mod:`orders.compression`
to read ``grpc-encoding``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpclib.protocol import EventsProcessor, H2Protocol
from grpclib.server import Server
from h2.events import RequestReceived
from h2.settings import SettingCodes

OTHER_CALLS_PER_CONNECTION = 100  # concurrent streams a connection gets beyond its watches (h2's default)
MAX_SETTING = 2**31 - 1  # the largest MAX_CONCURRENT_STREAMS that HTTP/2 allows


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
    """Installs itself as ``server``'s protocol factory; knows every open connection, and lets each carry
    ``watches_per_connection`` watches and OTHER_CALLS_PER_CONNECTION other calls at once."""

    def __init__(self, server: Server, watches_per_connection: int) -> None:
        self._max_concurrent_streams = min(watches_per_connection + OTHER_CALLS_PER_CONNECTION, MAX_SETTING)
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
            processor = protocol.processor
            processor.processors[RequestReceived] = lambda event: _accept_keeping_headers(processor, event)
            connection = protocol.connection
            connection._connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self._max_concurrent_streams})
            connection.flush()

        def connection_lost(exc: BaseException | None) -> None:
            self._open.discard(protocol)
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol


def _accept_keeping_headers(processor: EventsProcessor, event: RequestReceived) -> None:
    """grpclib's handling of a new call, and then its request headers kept as its stream's ``headers``."""
    processor.process_request_received(event)
    stream = processor.streams.get(event.stream_id)
    if stream is not None:
        stream.headers = event.headers  # type: ignore[assignment]
