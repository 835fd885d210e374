"""A work-around for a grpclib 0.4.9 bug, applied once on import (server and client).

grpclib's HTTP/2 event processor has no handler for h2's ``UnknownFrameReceived`` and raises
``NotImplementedError`` from ``data_received``, so asyncio drops the whole connection when a peer
sends a frame type grpclib does not know (e.g. PRIORITY_UPDATE, RFC 9218). HTTP/2 says such frames
must be ignored (RFC 9113 sections 4.1 and 5.5); this teaches the processor to do so.
"""

from __future__ import annotations

from typing import Any

from grpclib.protocol import EventsProcessor
from h2.events import UnknownFrameReceived

_original_init = EventsProcessor.__init__


def _init_ignoring_unknown_frames(self: EventsProcessor, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self.processors.setdefault(UnknownFrameReceived, lambda event: None)


if not getattr(EventsProcessor.__init__, "_orders_patched", False):
    _init_ignoring_unknown_frames._orders_patched = True  # type: ignore[attr-defined]
    EventsProcessor.__init__ = _init_ignoring_unknown_frames  # type: ignore[method-assign]
