"""The server's grpc.health.v1 service: grpclib's, reporting NOT_SERVING while the server cannot read its
database, and ending its Watch calls when the server drains, as the order streams end.

A load balancer or a grpcio client with health checking then stops sending calls to a replica whose
database is out of reach (each would fail with UNAVAILABLE), and a Watch no longer holds up a graceful
shutdown for the whole grace period.
"""

from __future__ import annotations

import asyncio

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.server import Stream


class ServerHealth(Health):
    """Health for ``service`` (and the server as a whole, ""): SERVING until told otherwise."""

    def __init__(self, service: object) -> None:
        self._status = ServiceStatus()
        self._status.set(True)
        super().__init__({service: [self._status]})
        self._draining = asyncio.Event()

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING from now on; Watch calls are told at once."""
        self._status.set(serving)

    def drain(self) -> None:
        """End every Watch call with UNAVAILABLE, now and from now on."""
        self._draining.set()

    async def Watch(self, stream: Stream) -> None:  # noqa: N802  # the gRPC method's name
        watching = asyncio.ensure_future(super().Watch(stream))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({watching, draining}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            draining.cancel()
            await asyncio.wait({watching, draining})  # the watch unsubscribes from its check
        if watching.done() and not watching.cancelled():
            watching.result()  # the watch's own end or error
        raise GRPCError(Status.UNAVAILABLE, "the server is shutting down; watch the health of another server")
