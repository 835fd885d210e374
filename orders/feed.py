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
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Generic, TypeVar

from orders.domain import EventPage, StatusEvent, WatchQuery
from orders.errors import OutOfRange, Unavailable

T = TypeVar("T")
HEARTBEAT_TICK = 0.1  # seconds between checks for due heartbeats: how late one may be
YIELD_EVERY_OFFERS = 10_000  # the tailer lets the loop run other work after about this many offers
# Streams reading the log at once (catching up, or after falling behind): each read holds a page of
# events and their payloads, so under overload (a thousand lagging streams) this bounds the memory.
MAX_CATCHING_UP = 16
RECENT_PAYLOADS = 65_536  # payloads of the newest events kept for streams catching up over them
ReadEvents = Callable[[int, Collection[str], int], Awaitable[EventPage]]
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


class _Wakeup:
    """What a stream waits on: an ``asyncio.Event`` without its cost per wait (thousands of streams wait
    at once, and each wakes for every batch). Cancelling the waiting stream just cancels its future."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class _Watcher(Generic[T]):
    """One stream's mailbox: a bounded queue of (sequence, payload) plus a lag flag."""

    __slots__ = (
        "order_ids",
        "pending",
        "capacity",
        "lagged",
        "closed",
        "wakeup",
        "wake_due",
        "woken_at",
        "live",
        "resume_after",
        "heartbeat_due",
    )

    def __init__(self, order_ids: frozenset[str], capacity: int) -> None:
        self.order_ids = order_ids
        self.pending: collections.deque[tuple[int, T]] = collections.deque()
        self.capacity = capacity
        self.lagged = False
        self.closed = False
        self.wakeup = _Wakeup()
        self.wake_due = False  # queued for the feed's next batched wake-up
        self.woken_at = -math.inf  # loop time the feed last woke it for events
        self.heartbeat_due = math.inf  # loop time of the next heartbeat (inf: none asked)
        # Set by the stream: True while it is served from ``pending`` (not catching up). Then every
        # matching event older than the oldest queued one has been sent, so when it lags its catch-up
        # may start at ``resume_after`` rather than at its last sent event, which for a filtered stream
        # can be far older and already pruned by retention although nothing it wants was lost.
        self.live = False
        self.resume_after: int | None = None

    def offer(self, entry: tuple[int, T]) -> bool:
        """Queue (sequence, payload); True if the stream now needs waking (the feed wakes it, batched).

        Every watcher gets the same tuple, so an event costs one allocation however many watchers it
        reaches (a million live tuples also made each garbage collection slow).
        """
        if self.lagged:
            return False
        if len(self.pending) >= self.capacity:
            self.fall_behind(entry[0] - 1)
            return False
        self.pending.append(entry)
        if self.wake_due or self.wakeup.is_set():
            return False
        self.wake_due = True
        return True

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

    ``batch_window``: a live stream woken for events is not woken again until this long after, so that
    a busy feed sends each stream one batch per window instead of one write per event, while a quiet
    stream's event goes out at once.
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
        self._to_wake: list[_Watcher[T]] = []  # offered something since the last batched wake-up
        self._wake_timer: asyncio.TimerHandle | None = None
        self._beating: set[_Watcher[T]] = set()  # streams that asked for heartbeats
        self._tailer: asyncio.Task[None] | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._closed = False
        self._reading_the_log = asyncio.Semaphore(MAX_CATCHING_UP)
        self._recent: dict[int, T] = {}  # sequence -> payload, of the newest published events, oldest first
        self.head = 0
        self.log_readable = True  # whether the tailer's last read of the log succeeded
        self.on_readable_change: Callable[[bool], None] = lambda readable: None  # called when that changes

    @property
    def watcher_count(self) -> int:
        """How many streams are open."""
        return len(self._watchers)

    async def start(self) -> None:
        """Start tailing the log from its current head."""
        _, self.head = await self._read_bounds()
        self._tailer = asyncio.create_task(self._tail(), name="orders-feed-tailer")
        self._heartbeats = asyncio.create_task(self._beat(), name="orders-feed-heartbeats")

    def notify(self, sequence: int | None = None) -> None:
        """Tell the tailer that new events were committed, up to ``sequence`` if known.

        With no stream open there is nothing to publish, so a known ``sequence`` just becomes the head,
        without a read of the log (a stream opened later reads the log's bounds itself and catches up
        from there): a server nobody watches spends nothing on its writes' events.
        """
        if sequence is not None and not self._watchers:
            self.head = max(self.head, sequence)
            return
        self._new_events.set()

    async def close(self) -> None:
        """End every stream (they raise Unavailable) and stop tailing."""
        self._closed = True
        for watcher in self._watchers:
            watcher.close()
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        for task in (self._tailer, self._heartbeats):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _beat(self) -> None:
        """Wake each stream whose heartbeat is due: one timer for all of them, not one per wait."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_TICK)
            now = loop.time()
            for watcher in self._beating:
                if now >= watcher.heartbeat_due:
                    watcher.wakeup.set()

    def _wake(self, watcher: _Watcher[T]) -> None:
        """Wake ``watcher``, which was just offered events: at once if it was not woken within the batch
        window (a quiet stream's event goes out without waiting), else with everyone at the end of the
        window (a busy stream gets one write per window, not one per event)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - watcher.woken_at >= self._batch_window:
            watcher.woken_at = now
            watcher.wake_due = False
            watcher.wakeup.set()
            return
        self._to_wake.append(watcher)
        if self._wake_timer is None:
            self._wake_timer = loop.call_later(self._batch_window, self._wake_batch)

    def _wake_batch(self) -> None:
        self._wake_timer = None
        now = asyncio.get_running_loop().time()
        woken, self._to_wake = self._to_wake, []
        for watcher in woken:
            watcher.woken_at = now
            watcher.wake_due = False
            watcher.wakeup.set()

    async def _tail(self) -> None:
        while not self._closed:
            await _wait(self._new_events, self._poll_interval)
            self._new_events.clear()
            try:
                while await self._publish_next_page():
                    pass
            except Unavailable as exc:  # the database is the truth: read it again on the next wake-up
                if self.log_readable:  # once per outage, not at every retry
                    log.warning("reading the event log failed (%s); retrying until it works", exc.message)
                self._set_readable(False)
            except Exception:
                if self.log_readable:  # once per outage, as above
                    log.exception("reading the event log failed; retrying until it works")
                self._set_readable(False)
            else:
                self._set_readable(True)

    def _set_readable(self, readable: bool) -> None:
        if readable != self.log_readable:
            self.log_readable = readable
            if readable:
                log.info("reading the event log works again")
            self.on_readable_change(readable)

    async def _publish_next_page(self) -> bool:
        events, pruned_through = await self._read_events(self.head, (), self._page_size)
        if self.head < pruned_through:
            self._retention_passed_the_tailer(pruned_through)
        offered = 0
        for event in events:
            order_watchers = self._by_order.get(event.order_id, ())
            if self._all_orders or order_watchers:  # rendered only for someone: most writes have no watcher
                entry = (event.sequence, self._render(event))
                self._remember(entry)
                for watcher in self._all_orders:
                    if watcher.offer(entry):
                        self._wake(watcher)
                for watcher in order_watchers:
                    if watcher.offer(entry):
                        self._wake(watcher)
            self.head = event.sequence
            offered += len(self._all_orders)
            if offered >= YIELD_EVERY_OFFERS:  # thousands of watchers: let calls run within a page
                offered = 0
                await asyncio.sleep(0)
        return len(events) == self._page_size

    def _remember(self, entry: tuple[int, T]) -> None:
        sequence, payload = entry
        self._recent[sequence] = payload
        if len(self._recent) > RECENT_PAYLOADS:
            del self._recent[next(iter(self._recent))]

    async def _read_page(self, after: int, order_ids: Collection[str]) -> tuple[list[T], int | None, int]:
        """A catching-up stream's next page from the log: (payloads, last sequence or None, first retained),
        with at most MAX_CATCHING_UP streams reading at once. An event the tailer published recently is
        not rendered again: a thousand streams that fell behind together catch up over the same events.
        """
        async with self._reading_the_log:
            events, pruned_through = await self._read_events(after, order_ids, self._page_size)
            recent = self._recent
            payloads = [recent[e.sequence] if e.sequence in recent else self._render(e) for e in events]
            return payloads, (events[-1].sequence if events else None), pruned_through + 1

    def _retention_passed_the_tailer(self, pruned_through: int) -> None:
        """Retention pruned events after the tailer's head before it read them, so no watcher got them
        live: every watcher goes to the database, where the catch-up in :meth:`watch` ends each one that
        needed them with OUT_OF_RANGE (one that did not, e.g. a live-only stream opened past them, carries
        on). A gap the log never held (a rolled-back sequence on PostgreSQL) is no such thing.
        """
        log.warning(
            "event-log retention pruned sequences up to %d before this server published those after %d; "
            "every stream that needed them ends with OUT_OF_RANGE (raise --retention-events)",
            pruned_through,
            self.head,
        )
        for watcher in self._watchers:
            watcher.fall_behind(self.head)

    def _register(self, watcher: _Watcher[T]) -> None:
        self._watchers.add(watcher)
        if watcher.heartbeat_due != math.inf:
            self._beating.add(watcher)
        if not watcher.order_ids:
            self._all_orders.add(watcher)
        for order_id in watcher.order_ids:
            self._by_order[order_id].add(watcher)

    def _unregister(self, watcher: _Watcher[T]) -> None:
        self._watchers.discard(watcher)
        self._beating.discard(watcher)
        self._all_orders.discard(watcher)
        for order_id in watcher.order_ids:
            watchers = self._by_order.get(order_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._by_order[order_id]

    async def watch(self, query: WatchQuery, *, announce: bool = False) -> AsyncIterator[list[T]]:
        """Yield rendered updates for ``query``: replay from the log if asked, then live, forever.

        Updates come in batches: everything this watcher has pending when it gets to run (a page, when
        catching up), so a busy server sends each stream fewer, larger writes instead of falling behind.
        With ``announce``, the first batch is empty and comes as soon as the watcher is registered (every
        change committed from then on will come), so that a quiet stream can tell its client it runs.
        """
        watcher: _Watcher[T] = _Watcher(query.order_ids, self._queue_capacity)
        loop = asyncio.get_running_loop()
        beat = query.heartbeat_seconds or math.inf
        watcher.heartbeat_due = loop.time() + beat
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
            elif announce:
                yield []
            catching_up = True
            while True:
                if watcher.closed:
                    # Sent everything up to the head, a stream may resume from there, as from a heartbeat.
                    up_to_date = not (catching_up or watcher.lagged or watcher.pending)
                    resume = max(self.head, cursor) if up_to_date else cursor
                    raise Unavailable(f"the server is shutting down; reconnect with after_sequence={resume}")
                if catching_up:
                    payloads, last, first = await self._read_page(cursor, query.order_ids)
                    # Retention may have pruned events this stream still needs: it ends rather than skip them.
                    if cursor < first - 1:
                        raise OutOfRange(
                            f"this watcher fell behind the retained event log (it needs sequence {cursor + 1}, "
                            f"the log now starts at {first}); resume with after_sequence >= {first - 1} "
                            "or re-read state with ListOrders"
                        )
                    if last is not None:
                        cursor = last
                        yield payloads
                    catching_up = len(payloads) == self._page_size
                    watcher.live = not catching_up
                    watcher.heartbeat_due = loop.time() + beat
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
                        watcher.heartbeat_due = loop.time() + beat
                elif loop.time() >= watcher.heartbeat_due:  # idle and up to date
                    # ... as far as anyone knows: while the log cannot be read, no heartbeat claims so, and a
                    # client that hears none for a while moves on to another server
                    if self.log_readable:
                        yield [self._render_heartbeat(max(self.head, cursor))]
                    watcher.heartbeat_due = loop.time() + beat
                else:
                    watcher.wakeup.clear()
                    await watcher.wakeup.wait()
        finally:
            self._unregister(watcher)
