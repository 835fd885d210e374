"""The baseline: a trivial grpclib unary service (Empty in, Empty out), the ceiling to compare with.

``python -m bench.baseline --port 0`` serves it on 127.0.0.1 and prints ``Server started on port N``,
like the orders server. It uses grpclib's own :class:`~grpclib.encoding.proto.ProtoCodec` with
``google.protobuf.Empty`` and no middleware: what grpclib itself costs per call on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

METHOD = "/bench.Baseline/Call"


class BaselineService:
    """One unary method, ``/bench.Baseline/Call``, that answers every Empty with an Empty."""

    async def call(self, stream: Stream[Empty, Empty]) -> None:
        """Read the request and send an empty reply."""
        await stream.recv_message()
        await stream.send_message(Empty())

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self.call, Cardinality.UNARY_UNARY, Empty, Empty)}


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = Server([BaselineService()])
    await server.start(host, port)
    sockets: Any = getattr(server._server, "sockets", None) or ()
    print(f"Server started on port {sockets[0].getsockname()[1] if sockets else port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m bench.baseline``."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
