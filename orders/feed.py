"""The status event feed: replay from the event log, then live fan-out to every watcher.

The database's event log is the truth. One tailer task per process reads new events from the log
(woken by local writes, and by a short poll for writes made by other processes), renders each event
once, and offers it to every matching watcher's bounded queue. A watcher whose queue overflows is not
dropped and never slows the tailer: it drops its queue, catches up from the database, and rejoins the
live queue; sequence numbers make the seams free of gaps and duplicates. When the log keeps only its
newest events (retention), a stream that needs events already pruned ends with OUT_OF_RANGE instead
of skipping them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Generic, TypeVar

from orders.domain import StatusEvent, WatchQuery
from orders.errors import OutOfRange, Unavailable

T = TypeVar("T")
YIELD_EVERY_OFFERS = 10_000  # the tailer lets the loop run other work after about this many offers
ReadEvents = Callable[[int, Collection[str], int], Awaitable[list[StatusEvent]]]
ReadBounds = Callable[[], Awaitable[tuple[int, int]]]

log = logging.getLogger(__name__)


async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait up to ``timeout`` s (None: forever) for ``event``; True if it is set.

    Unlike ``asyncio.wait_for`` on Python < 3.12, this never swallows a cancellation that arrives just
    as the event is set, so a cancelled stream or tailer really stops.
    """
    if event.is_set():
        return True
    if timeout is None:
        return await event.wait()
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


class _Watcher(Generic[T]):
    """One stream's mailbox: a bounded queue of (sequence, payload) plus a lag flag."""

    __slots__ = ("order_ids", "pending", "capacity", "lagged", "closed", "wakeup", "live", "resume_after")

    def __init__(self, order_ids: frozenset[str], capacity: int) -> None:
        self.order_ids = order_ids
        self.pending: collections.deque[tuple[int, T]] = collections.deque()
        self.capacity = capacity
        self.lagged = False
        self.closed = False
        self.wakeup = asyncio.Event()
        # Set by the stream: True while it is served from ``pending`` (not catching up). Then every
        # matching event older than the oldest queued one has been sent, so when it lags its catch-up
        # may start at ``resume_after`` rather than at its last sent event, which for a filtered stream
        # can be far older and already pruned by retention although nothing it wants was lost.
        self.live = False
        self.resume_after: int | None = None

    def offer(self, entry: tuple[int, T]) -> None:
        """Queue (sequence, payload); every watcher gets the same tuple, so an event costs one allocation
        however many watchers it reaches (a million live tuples also made each garbage collection slow)."""
        if self.lagged:
            return
        if len(self.pending) >= self.capacity:
            self.fall_behind(entry[0] - 1)
            return
        self.pending.append(entry)
        self.wakeup.set()

    def fall_behind(self, sent_through: int) -> None:
        """Send this watcher to the database; if it is live and its queue is empty, it has been sent
        every matching event up to ``sent_through``."""
        if self.lagged:
            return
        if self.live:
            self.resume_after = self.pending[0][0] - 1 if self.pending else sent_through
        self.lagged = True
        self.pending.clear()
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class Feed(Generic[T]):
    """Fans committed status events out to watchers; ``render`` turns an event into what is sent.

    ``batch_window``: after a wake-up, a live stream waits this long for more events before it sends, so
    that a busy feed sends each stream one batch per window instead of one write per event.
    """

    def __init__(
        self,
        read_events: ReadEvents,
        read_bounds: ReadBounds,
        render: Callable[[StatusEvent], T],
        render_heartbeat: Callable[[int], T],
        *,
        queue_capacity: int = 1024,
        page_size: int = 500,
        poll_interval: float = 0.25,
        batch_window: float = 0.0,
    ) -> None:
        self._read_events = read_events
        self._read_bounds = read_bounds
        self._render = render
        self._render_heartbeat = render_heartbeat
        self._queue_capacity = queue_capacity
        self._page_size = page_size
        self._poll_interval = poll_interval
        self._batch_window = batch_window
        self._watchers: set[_Watcher[T]] = set()
        self._all_orders: set[_Watcher[T]] = set()
        self._by_order: dict[str, set[_Watcher[T]]] = collections.defaultdict(set)
        self._new_events = asyncio.Event()
        self._tailer: asyncio.Task[None] | None = None
        self._closed = False
        self.head = 0

    @property
    def watcher_count(self) -> int:
        """How many streams are open."""
        return len(self._watchers)

    async def start(self) -> None:
        """Start tailing the log from its current head."""
        _, self.head = await self._read_bounds()
        self._tailer = asyncio.create_task(self._tail(), name="orders-feed-tailer")

    def notify(self) -> None:
        """Tell the tailer that new events were committed."""
        self._new_events.set()

    async def close(self) -> None:
        """End every stream (they raise Unavailable) and stop tailing."""
        self._closed = True
        for watcher in self._watchers:
            watcher.close()
        if self._tailer is not None:
            self._tailer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tailer

    async def _tail(self) -> None:
        while not self._closed:
            await _wait(self._new_events, self._poll_interval)
            self._new_events.clear()
            try:
                while await self._publish_next_page():
                    pass
            except Unavailable as exc:  # the database is the truth: read it again on the next wake-up
                log.warning("reading the event log failed (%s); retrying", exc.message)
            except Exception:
                log.exception("reading the event log failed; retrying")

    async def _publish_next_page(self) -> bool:
        events = await self._read_events(self.head, (), self._page_size)
        if events and events[0].sequence > self.head + 1:
            await self._check_retention_passed_the_tailer()
        offered = 0
        for event in events:
            entry = (event.sequence, self._render(event))
            for watcher in self._all_orders:
                watcher.offer(entry)
            for watcher in self._by_order.get(event.order_id, ()):
                watcher.offer(entry)
            self.head = event.sequence
            offered += len(self._all_orders)
            if offered >= YIELD_EVERY_OFFERS:  # thousands of watchers: let calls run within a page
                offered = 0
                await asyncio.sleep(0)
        return len(events) == self._page_size

    async def _check_retention_passed_the_tailer(self) -> None:
        """The tailer's read skipped sequences: if retention pruned them before it read them, no watcher
        got them live, so every watcher goes to the database, where the bounds check in :meth:`watch`
        ends each one that needed them with OUT_OF_RANGE (one that did not, e.g. a live-only stream
        opened past them, carries on). A gap the log never held (a rolled-back sequence on PostgreSQL)
        passes the check: the log still reaches back to the tailer's head.
        """
        first, _ = await self._read_bounds()  # after the read: pruning only moves ``first`` forward
        if self.head < first - 1:
            log.warning(
                "event-log retention pruned sequences %d to %d before this server published them; "
                "every stream that needed them ends with OUT_OF_RANGE (raise --retention-events)",
                self.head + 1,
                first - 1,
            )
            for watcher in self._watchers:
                watcher.fall_behind(self.head)

    def _register(self, watcher: _Watcher[T]) -> None:
        self._watchers.add(watcher)
        if not watcher.order_ids:
            self._all_orders.add(watcher)
        for order_id in watcher.order_ids:
            self._by_order[order_id].add(watcher)

    def _unregister(self, watcher: _Watcher[T]) -> None:
        self._watchers.discard(watcher)
        self._all_orders.discard(watcher)
        for order_id in watcher.order_ids:
            watchers = self._by_order.get(order_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._by_order[order_id]

    async def watch(self, query: WatchQuery) -> AsyncIterator[list[T]]:
        """Yield rendered updates for ``query``: replay from the log if asked, then live, forever.

        Updates come in batches: everything this watcher has pending when it gets to run (a page, when
        catching up), so a busy server sends each stream fewer, larger writes instead of falling behind.
        """
        watcher: _Watcher[T] = _Watcher(query.order_ids, self._queue_capacity)
        try:
            first, head = await self._read_bounds()
            if query.after_sequence is None:
                # Live only: skip everything already committed, even what the tailer has not published yet.
                cursor = max(self.head, head)
            else:
                if not first - 1 <= query.after_sequence <= head:
                    raise OutOfRange(
                        f"after_sequence {query.after_sequence} is outside the retained event log, "
                        f"which holds sequences {first} to {head}; use a value from {first - 1} to {head}"
                    )
                cursor = query.after_sequence
            # Registered only once the head is read, so a stream that counts as a watcher has been accepted
            # and gets every change committed from then on. What the tailer published before this
            # registration (but after ``cursor``) comes from the database: every stream starts catching up.
            self._register(watcher)
            if self._closed:  # a call that slipped in while the server is shutting down
                watcher.close()
            catching_up = True
            loop = asyncio.get_running_loop()
            last_sent = loop.time()
            while True:
                if watcher.closed:
                    raise Unavailable(f"the server is shutting down; reconnect with after_sequence={cursor}")
                if catching_up:
                    events = await self._read_events(cursor, query.order_ids, self._page_size)
                    # Retention may have pruned events this stream still needs: it ends rather than skip
                    # them. The bounds are read after the events: pruning only moves ``first`` forward,
                    # so if the read missed anything (cursor < first - 1 as it ran), this sees it too.
                    first, _ = await self._read_bounds()
                    if cursor < first - 1:
                        raise OutOfRange(
                            f"this watcher fell behind the retained event log (it needs sequence {cursor + 1}, "
                            f"the log now starts at {first}); resume with after_sequence >= {first - 1} "
                            "or re-read state with ListOrders"
                        )
                    if events:
                        cursor = events[-1].sequence
                        yield [self._render(event) for event in events]
                    catching_up = len(events) == self._page_size
                    watcher.live = not catching_up
                    last_sent = loop.time()
                elif watcher.lagged:
                    if watcher.resume_after is not None:
                        cursor = max(cursor, watcher.resume_after)
                    watcher.lagged, watcher.live, watcher.resume_after, catching_up = False, False, None, True
                elif watcher.pending:
                    batch = []
                    while watcher.pending and len(batch) < self._page_size:
                        sequence, payload = watcher.pending.popleft()
                        if sequence > cursor:
                            cursor = sequence
                            batch.append(payload)
                    if batch:
                        yield batch
                        last_sent = loop.time()
                else:
                    watcher.wakeup.clear()
                    timeout = None
                    if query.heartbeat_seconds:
                        timeout = max(0.0, last_sent + query.heartbeat_seconds - loop.time())
                    if not await _wait(watcher.wakeup, timeout):
                        yield [self._render_heartbeat(max(self.head, cursor))]
                        last_sent = loop.time()
                    elif self._batch_window:  # let the events committed with this one join its write
                        await asyncio.sleep(self._batch_window)
        finally:
            self._unregister(watcher)
