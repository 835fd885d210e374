"""The watch scenario: W watchers of every order, and a writer making U status changes per second.

* Watchers open ``OrderStatusStream`` with no order filter, ``after_sequence`` = the log's head
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
* Streams promise strictly increasing sequences, so each watcher tracks only its last sequence:
  a jump forward is missed events, a step back or repeat is a duplicate, and whatever it had not
  reached when the run ended (the log's final head, read from the database) is missed too.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
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


@dataclass
class WatcherResult:
    """What one or more watcher processes saw."""

    watchers: int = 0
    connections: int = 0
    ready: int = 0  # watchers that had received their first message (a heartbeat) when writing began
    received: int = 0  # distinct events delivered, over all watchers
    gaps: int = 0  # events skipped (a sequence jumped forward), over all watchers
    duplicates: int = 0  # repeated or out-of-order sequences, over all watchers
    last_sequences: list[int] = field(default_factory=list)  # per watcher: the last sequence received
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # how streams ended early
    latency: Histogram = field(default_factory=Histogram)
    generator_cpu: float = 0.0  # CPU seconds of the watcher process(es) during the window

    def merge(self, other: WatcherResult) -> None:
        """Add another process's share."""
        self.watchers += other.watchers
        self.connections += other.connections
        self.ready += other.ready
        self.received += other.received
        self.gaps += other.gaps
        self.duplicates += other.duplicates
        self.last_sequences.extend(other.last_sequences)
        self.errors.update(other.errors)
        self.latency.merge(other.latency)
        self.generator_cpu += other.generator_cpu


@dataclass
class _Watcher:
    last: int
    ready: bool = False
    received: int = 0
    gaps: int = 0
    duplicates: int = 0


async def run_watchers(spec: WatcherSpec) -> WatcherResult:
    """Open ``spec.watchers`` streams, follow them until they reach the final head, and tally."""
    connections = max(1, math.ceil(spec.watchers / spec.streams_per_connection))
    channels = open_channels(spec.host, spec.port, connections)
    methods = [watch_method(channel) for channel in channels]
    latency = Histogram()
    errors: collections.Counter[str] = collections.Counter()
    states = [_Watcher(spec.after_sequence) for _ in range(spec.watchers)]
    # Latency is recorded for events *committed* in the window (however late they arrive), so the
    # window is turned into wall-clock time, the clock of the events' timestamps.
    wall = time.time() - time.monotonic()
    commit_from, commit_to = spec.measure_from + wall, spec.measure_to + wall

    async def watch(index: int) -> None:
        state = states[index]
        method, request_type = methods[index % connections]
        request = request_type(after_sequence=spec.after_sequence, heartbeat_seconds=1)
        try:
            async with method.open() as stream:
                await stream.send_message(request, end=True)
                async for update in stream:
                    received_at = time.time()
                    if not update.order_id:  # a heartbeat
                        state.ready = True
                        continue
                    state.ready = True
                    sequence = update.sequence
                    if sequence <= state.last:
                        state.duplicates += 1
                        continue
                    state.gaps += sequence - state.last - 1
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
            s.last < final_head and not t.done() for s, t in zip(states, tasks, strict=True)
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
        received=sum(s.received for s in states),
        gaps=sum(s.gaps for s in states),
        duplicates=sum(s.duplicates for s in states),
        last_sequences=[s.last for s in states],
        errors=errors,
        latency=latency,
        generator_cpu=cpu[1] - cpu[0],
    )


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
