"""The watch scenario: W watchers, and a writer making U status changes per second.

* Watchers open ``OrderStatusStream`` with no order filter (each gets every event: W × U messages per
  second), or each with its own ``watch_orders`` orders (the way a shop's clients watch their own
  orders: each event reaches one watcher), ``after_sequence`` = the log's head
  before the writer starts (so a watcher that connects late still owes every event: nothing can be
  excused as "not yet watching"), and ``heartbeat_seconds=1`` (its first heartbeat shows it is
  connected). They are spread over connections of at most ``streams_per_connection`` streams each
  (the server's h2 stack allows 100 concurrent streams per connection, and so does its
  ``--max-streams-per-connection`` default), and optionally over several processes. Messages are
  decoded with the protobuf runtime (upb), so a watcher costs the client as little as possible.
* The writer runs in its own process, so the watchers' receiving never slows its pace: open loop,
  one UpdateOrderStatus every 1/U s (at most ``writer_inflight`` outstanding), walking the preloaded
  PENDING orders through CONFIRMED → SHIPPED → DELIVERED.
* Delivery latency = receipt time (wall clock) − the StatusUpdate's ``timestamp`` (the event's time
  on the server's clock, same machine), for every event *committed* in the measurement window, however
  late it arrives. The event time is taken inside the write transaction, before its commit, so the
  latency includes the commit itself.
* Streams promise strictly increasing sequences, so a step back or repeat is a duplicate. Each
  watcher counts the events it received; the orchestrator counts, in the database, the events it
  should have had (every event after the start head, or those of its orders), and the difference is
  missed. A watcher has caught up once an event or a heartbeat (which carries the log's head, and is
  sent only to an idle stream that has been sent everything up to it) reaches the log's final head.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpclib.exceptions import GRPCError, StreamTerminatedError

from bench.api import UpbApi, close_channels, open_channels, watch_method
from bench.hist import Histogram
from bench.scenarios import DELIVERED, NEXT_STATUS, PENDING


@dataclass(frozen=True)
class WatcherSpec:
    """One process's share of the watchers (picklable)."""

    host: str
    port: int
    watchers: int
    streams_per_connection: int
    after_sequence: int  # the log's head before the writer starts
    write_from: float  # monotonic: when the writer starts
    measure_from: float  # monotonic: the window's start (the writer's warm-up is over)
    measure_to: float  # monotonic; the writer stops here too
    final_head_file: str  # the orchestrator writes the log's final head here once the writer is done
    drain_timeout: float  # how long after that watchers may take to reach it (the rest counts as missed)
    order_ids: tuple[tuple[str, ...], ...] = ()  # each watcher's filter; empty: every watcher sees every order


@dataclass
class WatcherResult:
    """What one or more watcher processes saw."""

    watchers: int = 0
    connections: int = 0
    ready: int = 0  # watchers that had received their first message (a heartbeat) when writing began
    duplicates: int = 0  # repeated or out-of-order sequences, over all watchers
    received_each: list[int] = field(default_factory=list)  # per watcher: distinct events received
    reached_each: list[int] = field(default_factory=list)  # per watcher: the log head it has been sent
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # how streams ended early
    latency: Histogram = field(default_factory=Histogram)
    generator_cpu: float = 0.0  # CPU seconds of the watcher process(es) during the window

    def merge(self, other: WatcherResult) -> None:
        """Add another process's share."""
        self.watchers += other.watchers
        self.connections += other.connections
        self.ready += other.ready
        self.duplicates += other.duplicates
        self.received_each.extend(other.received_each)
        self.reached_each.extend(other.reached_each)
        self.errors.update(other.errors)
        self.latency.merge(other.latency)
        self.generator_cpu += other.generator_cpu

    @property
    def received(self) -> int:
        """Distinct events delivered, over all watchers."""
        return sum(self.received_each)


@dataclass
class _Watcher:
    last: int  # the last event's sequence
    reached: int  # the log head it has been sent: its last event's, or a heartbeat's
    ready: bool = False
    received: int = 0
    duplicates: int = 0


async def run_watchers(spec: WatcherSpec) -> WatcherResult:
    """Open ``spec.watchers`` streams, follow them until they reach the final head, and tally."""
    connections = max(1, math.ceil(spec.watchers / spec.streams_per_connection))
    channels = open_channels(spec.host, spec.port, connections)
    methods = [watch_method(channel) for channel in channels]
    latency = Histogram()
    errors: collections.Counter[str] = collections.Counter()
    states = [_Watcher(spec.after_sequence, spec.after_sequence) for _ in range(spec.watchers)]
    # Latency is recorded for events *committed* in the window (however late they arrive), so the
    # window is turned into wall-clock time, the clock of the events' timestamps.
    wall = time.time() - time.monotonic()
    commit_from, commit_to = spec.measure_from + wall, spec.measure_to + wall

    async def watch(index: int) -> None:
        state = states[index]
        method, request_type = methods[index % connections]
        order_ids = spec.order_ids[index] if spec.order_ids else ()
        request = request_type(after_sequence=spec.after_sequence, heartbeat_seconds=1, order_ids=order_ids)
        try:
            async with method.open() as stream:
                await stream.send_message(request, end=True)
                async for update in stream:
                    received_at = time.time()
                    state.ready = True
                    sequence = update.sequence
                    state.reached = max(state.reached, sequence)
                    if not update.order_id:  # a heartbeat
                        continue
                    if sequence <= state.last:
                        state.duplicates += 1
                        continue
                    state.last = sequence
                    state.received += 1
                    stamp = update.timestamp
                    committed = stamp.seconds + stamp.nanos * 1e-9
                    if commit_from <= committed <= commit_to:
                        latency.record(received_at - committed)
        except GRPCError as exc:
            errors[f"watch: {exc.status.name}"] += 1
        except (StreamTerminatedError, ConnectionError, OSError) as exc:
            errors[f"watch: {type(exc).__name__}"] += 1

    tasks = [asyncio.create_task(watch(i)) for i in range(spec.watchers)]
    cpu = [0.0, 0.0]
    ready_when_writing = 0
    try:
        await _sleep_until(spec.write_from)
        ready_when_writing = sum(s.ready for s in states)
        await _sleep_until(spec.measure_from)
        cpu[0] = time.process_time()
        await _sleep_until(spec.measure_to)
        cpu[1] = time.process_time()
        # The writer's last calls may take up to their deadline, so this wait is not bounded here:
        # the orchestrator always publishes the head, or -1 if the run failed.
        final_head = await _read_final_head(Path(spec.final_head_file))
        deadline = time.monotonic() + spec.drain_timeout
        while time.monotonic() < deadline and any(
            s.reached < final_head and not t.done() for s, t in zip(states, tasks, strict=True)
        ):
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close_channels(channels)
    return WatcherResult(
        watchers=spec.watchers,
        connections=connections,
        ready=ready_when_writing,
        duplicates=sum(s.duplicates for s in states),
        received_each=[s.received for s in states],
        reached_each=[s.reached for s in states],
        errors=errors,
        latency=latency,
        generator_cpu=cpu[1] - cpu[0],
    )


def watch_filters(order_ids: Sequence[str], watchers: int, per_watcher: int) -> list[tuple[str, ...]]:
    """Each watcher's own ``per_watcher`` orders (none: every watcher watches every order), dealt out in
    turn, so a writer walking the orders in sequence changes each watcher's orders far apart in time,
    not in a burst."""
    if not per_watcher:
        return []
    if watchers * per_watcher > len(order_ids):
        raise ValueError(f"{watchers} watchers × {per_watcher} orders need that many preloaded orders")
    return [tuple(order_ids[i : watchers * per_watcher : watchers]) for i in range(watchers)]


def owed_events(counts: Mapping[str, int], filters: Sequence[Sequence[str]], watchers: int) -> list[int]:
    """Per watcher, the events it should have received: those of its orders (``filters``, one tuple per
    watcher), or every event in ``counts`` (events per order) when there are no filters."""
    if not filters:
        return [sum(counts.values())] * watchers
    return [sum(counts.get(order_id, 0) for order_id in watched) for watched in filters]


def missed_events(owed: Sequence[int], received: Sequence[int]) -> int:
    """Events some watcher was owed and did not receive, summed over watchers."""
    return sum(max(0, expected - got) for expected, got in zip(owed, received, strict=True))


def run_watchers_blocking(spec: WatcherSpec) -> WatcherResult:
    """:func:`run_watchers` in a fresh event loop (the entry point of a watcher process)."""
    return asyncio.run(run_watchers(spec))


async def _read_final_head(path: Path) -> int:
    """Wait for the orchestrator to publish the log's final head (-1: the run failed, stop now)."""
    while True:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            await asyncio.sleep(0.05)


def publish_final_head(path: Path, head: int) -> None:
    """Tell every watcher process the log's final head (-1: the run failed); atomic."""
    partial = path.with_suffix(".partial")
    partial.write_text(str(head))
    partial.replace(path)


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


@dataclass(frozen=True)
class WriterSpec:
    """The writer's job (picklable)."""

    host: str
    port: int
    rate: float  # status changes per second
    order_ids: list[str]  # PENDING orders to walk
    start: float  # monotonic: first write
    stop: float  # monotonic: no write starts after this
    measure_from: float
    inflight: int = 256  # at most this many outstanding calls; beyond that the writer falls behind
    channels: int = 2


@dataclass
class WriterResult:
    """What the writer did."""

    issued: int = 0  # status changes started
    updates: int = 0  # status changes that succeeded
    creates: int = 0  # orders created because the preloaded ones ran out
    seconds: float = 0.0  # the schedule's length
    behind: int = 0  # writes that started late because ``inflight`` calls were outstanding
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latency: Histogram = field(default_factory=Histogram)  # UpdateOrderStatus latency in the window

    @property
    def rate(self) -> float:
        """The pace kept: status changes started per second (below the asked rate if the server lagged,
        since at most ``inflight`` calls are outstanding and nothing starts after the schedule's end)."""
        return self.issued / self.seconds if self.seconds else 0.0


async def run_writer(spec: WriterSpec) -> WriterResult:
    """Make ``spec.rate`` status changes per second from ``spec.start`` to ``spec.stop`` (open loop)."""
    result = WriterResult()
    channels = open_channels(spec.host, spec.port, spec.channels)
    apis = [UpbApi(channel) for channel in channels]
    ready: collections.deque[tuple[str, int]] = collections.deque((order_id, PENDING) for order_id in spec.order_ids)
    slots = asyncio.Semaphore(spec.inflight)
    running: set[asyncio.Task[None]] = set()

    async def change(api: UpbApi, order_id: str, status: int) -> None:
        try:
            if order_id == "":  # ran out of orders: create one
                order_id, _ = await api.create(0, "")
                result.creates += 1
                status = PENDING
            target = NEXT_STATUS[status]
            began = time.monotonic()
            await api.update(order_id, target, 0)
            ended = time.monotonic()
            result.updates += 1
            if ended >= spec.measure_from:
                result.latency.record(ended - began)
            if target != DELIVERED:
                ready.append((order_id, target))
        except GRPCError as exc:
            result.errors[f"update: {exc.status.name}"] += 1
        except (StreamTerminatedError, ConnectionError, OSError) as exc:
            result.errors[f"update: {type(exc).__name__}"] += 1
        finally:
            slots.release()

    try:
        await _sleep_until(spec.start)
        interval = 1.0 / spec.rate
        tick = 0
        while True:
            due = spec.start + tick * interval
            if due >= spec.stop:
                break
            await _sleep_until(due)
            if slots.locked():
                result.behind += 1
            await slots.acquire()
            if time.monotonic() >= spec.stop:  # waited for a free slot past the end: the server lagged
                slots.release()
                break
            order_id, status = ready.popleft() if ready else ("", PENDING)
            task = asyncio.create_task(change(apis[tick % len(apis)], order_id, status))
            running.add(task)
            task.add_done_callback(running.discard)
            tick += 1
        result.issued = tick
        result.seconds = spec.stop - spec.start
        if running:
            await asyncio.gather(*running)
    finally:
        close_channels(channels)
    return result


def run_writer_blocking(spec: WriterSpec) -> WriterResult:
    """:func:`run_writer` in a fresh event loop (the entry point of the writer process)."""
    return asyncio.run(run_writer(spec))
