"""Work-arounds for two grpclib 0.4.9 bugs, applied once on import (server and client).

- grpclib's HTTP/2 event processor has no handler for h2's ``UnknownFrameReceived`` and raises
  ``NotImplementedError`` from ``data_received``, so asyncio drops the whole connection when a peer
  sends a frame type grpclib does not know (e.g. PRIORITY_UPDATE, RFC 9218). HTTP/2 says such frames
  must be ignored (RFC 9113 sections 4.1 and 5.5); this teaches the processor to do so.
- A call whose deadline has already passed when the server starts it (a ``grpc-timeout`` of ``0n``,
  or a client that sent its last microseconds) makes ``DeadlineWrapper.start`` raise ``TimeoutError``
  before the handler runs, which grpclib answers as UNKNOWN "Internal Server Error". Here the deadline
  fires at once instead, through the same path as a deadline that passes mid-call: DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from grpclib.metadata import Deadline
from grpclib.protocol import EventsProcessor
from grpclib.utils import DeadlineWrapper
from h2.events import UnknownFrameReceived

_original_init = EventsProcessor.__init__


def _init_ignoring_unknown_frames(self: EventsProcessor, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self.processors.setdefault(UnknownFrameReceived, lambda event: None)


@contextlib.contextmanager
def _start_even_if_expired(self: DeadlineWrapper, deadline: Deadline) -> Iterator[None]:
    timer = asyncio.get_running_loop().call_later(
        deadline.time_remaining(), self.cancel, TimeoutError("Deadline exceeded")
    )
    try:
        yield
    finally:
        timer.cancel()


if not getattr(EventsProcessor.__init__, "_orders_patched", False):
    _init_ignoring_unknown_frames._orders_patched = True  # type: ignore[attr-defined]
    EventsProcessor.__init__ = _init_ignoring_unknown_frames  # type: ignore[method-assign]
    DeadlineWrapper.start = _start_even_if_expired  # type: ignore[method-assign,assignment]
