"""Work-arounds for four grpclib 0.4.9 bugs, applied once on import (server and client).

- grpclib's HTTP/2 event processor has no handler for h2's ``UnknownFrameReceived`` and raises
  ``NotImplementedError`` from ``data_received``, so asyncio drops the whole connection when a peer
  sends a frame type grpclib does not know (e.g. PRIORITY_UPDATE, RFC 9218). HTTP/2 says such frames
  must be ignored (RFC 9113 sections 4.1 and 5.5); this teaches the processor to do so.
- A call whose deadline has already passed when the server starts it (a ``grpc-timeout`` of ``0n``,
  or a client that sent its last microseconds) makes ``DeadlineWrapper.start`` raise ``TimeoutError``
  before the handler runs, which grpclib answers as UNKNOWN "Internal Server Error". Here the deadline
  fires at once instead, through the same path as a deadline that passes mid-call: DEADLINE_EXCEEDED.
- A connection whose keepalive ping goes unanswered is closed with ``transport.close()``, which waits
  for unsent data to drain and, with TLS, for the peer's close_notify (30 s): a hung peer gives neither,
  so the connection is never reported lost. Its calls wait out their deadlines, and new calls fail with
  ``AttributeError`` on the half-closed connection grpclib still hands out. Here the connection is
  aborted instead, and its streams end with a reason that says what happened. And a ping is taken as
  unanswered only once nothing at all has arrived for the keepalive timeout, as in gRPC's own
  libraries: on a slow link the answer to a ping waits behind the data sent before it, while that data
  arriving shows that the peer is alive.
- A call ended by its deadline or by a lost connection is ended by cancelling the task that waits on it
  (``Wrapper.cancel``); grpclib turns the ``CancelledError`` into its own error but never withdraws the
  cancellation (``Task.uncancel``), so the task stays marked as being cancelled: asyncio's ``timeout``
  and ``TaskGroup`` then misjudge later cancellations, and ``asyncio.run`` turns the next Ctrl-C into a
  ``CancelledError`` traceback instead of ``KeyboardInterrupt``. Here it is withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from grpclib.metadata import Deadline
from grpclib.protocol import Connection, EventsProcessor
from grpclib.utils import DeadlineWrapper, Wrapper
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


_original_feed = Connection.feed
_original_ping = Connection._ping


def _feed_noting_when(self: Connection, data: bytes) -> Any:
    self._orders_last_received = time.monotonic()  # type: ignore[attr-defined]
    return _original_feed(self, data)


def _ping_then_wait_for_any_answer(self: Connection) -> None:
    outstanding = self._close_by_ping_handler
    _original_ping(self)
    closing = self._close_by_ping_handler
    if closing is not None and closing is not outstanding:  # a ping went out now, and grpclib's close timer
        closing.cancel()
        self._orders_ping_sent = time.monotonic()  # type: ignore[attr-defined]  # the first one unanswered
        self._close_by_ping_handler = asyncio.get_running_loop().call_later(
            self._config._keepalive_timeout, _abort_if_silent, self
        )


def _abort_if_silent(connection: Connection) -> None:
    """The keepalive timeout has passed since a ping: abort the connection if nothing arrived meanwhile, else
    wait until the timeout has passed since the last bytes did (the ping's answer cancels this)."""
    timeout = connection._config._keepalive_timeout
    last_heard = max(getattr(connection, "_orders_last_received", 0.0), connection._orders_ping_sent)  # type: ignore[attr-defined]
    silent_for = time.monotonic() - last_heard
    if silent_for < timeout:
        connection._close_by_ping_handler = asyncio.get_running_loop().call_later(
            timeout - silent_for, _abort_if_silent, connection
        )
        return
    transport = getattr(connection, "_transport", None)
    if transport is None:  # closed meanwhile
        return
    processor = getattr(transport.get_protocol(), "processor", None)
    reason = f"nothing arrived for {timeout} s after a keepalive ping (a hung peer, or a network that drops packets)"
    for stream in list(getattr(processor, "streams", {}).values()):  # before the abort's "Connection lost"
        stream.__terminated__(reason)
    transport.abort()


_original_exit = Wrapper.__exit__


def _exit_withdrawing_the_cancellation(self: Wrapper, exc_type: Any, exc_value: Any, traceback: Any) -> None:
    if self._error is not None and exc_type is asyncio.CancelledError:  # this wrapper's own cancellation
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    _original_exit(self, exc_type, exc_value, traceback)


if not getattr(EventsProcessor.__init__, "_orders_patched", False):
    _init_ignoring_unknown_frames._orders_patched = True  # type: ignore[attr-defined]
    EventsProcessor.__init__ = _init_ignoring_unknown_frames  # type: ignore[method-assign]
    DeadlineWrapper.start = _start_even_if_expired  # type: ignore[method-assign,assignment]
    Connection.feed = _feed_noting_when  # type: ignore[method-assign]
    Connection._ping = _ping_then_wait_for_any_answer  # type: ignore[method-assign]
    Wrapper.__exit__ = _exit_withdrawing_the_cancellation  # type: ignore[method-assign,assignment]
