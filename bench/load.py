"""The closed-loop load generator.

``concurrency`` callers each make one call, wait for its answer, and make the next, for ``warmup``
seconds (not measured) and then ``duration`` seconds (measured). Callers are spread round-robin over
``channels`` grpclib channels (one HTTP/2 connection each) and, optionally, over several generator
processes. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the machine),
so the measurement window is the same absolute interval in every process.

A call counts in the window when it *completes* inside it; RPS = those calls / window length. Any
non-OK outcome (a gRPC status other than OK, a broken connection, a deadline) is an error, counted by
kind and status code whenever it happens (warm-up included).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from grpclib.exceptions import GRPCError, StreamTerminatedError

from bench.api import CLIENTS, Api, close_channels, open_channels
from bench.hist import Histogram
from bench.scenarios import ScenarioData, make_caller

T = TypeVar("T")


@dataclass(frozen=True)
class LoadSpec:
    """One generator process's share of a run (picklable)."""

    scenario: str
    host: str
    port: int
    callers: int  # callers in this process
    first_caller: int  # global index of its first caller
    total_callers: int  # callers in all processes
    channels: int  # channels in this process
    client: str  # "stub" or "upb" (see bench.api)
    start: float  # monotonic time at which the warm-up starts
    measure_from: float  # ... the window starts
    measure_to: float  # ... the window ends
    data: ScenarioData
    seed: int = 1


@dataclass
class LoadResult:
    """What one or more generator processes measured in the window."""

    window: float
    histograms: dict[str, Histogram] = field(default_factory=dict)  # kind -> latencies of OK calls in the window
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # "kind: CODE" -> count
    untimed: collections.Counter[str] = field(default_factory=collections.Counter)  # kind -> OK untimed calls
    per_caller: list[int] = field(default_factory=list)  # OK calls in the window, per caller
    generator_cpu: float = 0.0  # CPU seconds the generator process(es) used in the window

    def merge(self, other: LoadResult) -> None:
        """Add another process's share."""
        for kind, histogram in other.histograms.items():
            self.histograms.setdefault(kind, Histogram()).merge(histogram)
        self.errors.update(other.errors)
        self.untimed.update(other.untimed)
        self.per_caller.extend(other.per_caller)
        self.generator_cpu += other.generator_cpu

    @property
    def total(self) -> Histogram:
        """Every timed call's latency."""
        return Histogram.merged(self.histograms.values())

    def fairness(self) -> float:
        """Jain's fairness index of the callers' call counts: 1 = perfectly even, 1/n = one caller got all."""
        counts = self.per_caller
        squares = sum(c * c for c in counts)
        return (sum(counts) ** 2) / (len(counts) * squares) if squares else math.nan


class Recorder:
    """Times calls and counts errors for the callers of one process."""

    def __init__(self, measure_from: float, measure_to: float) -> None:
        self.measure_from = measure_from
        self.measure_to = measure_to
        self.histograms: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.errors: collections.Counter[str] = collections.Counter()
        self.untimed_calls: collections.Counter[str] = collections.Counter()
        self.caller_calls: list[int] = []

    def for_caller(self, index: int) -> CallerRecorder:
        """The recorder caller number ``index`` (in this process) reports to."""
        while len(self.caller_calls) <= index:
            self.caller_calls.append(0)
        return CallerRecorder(self, index)

    async def guard(self, kind: str, call: Awaitable[T]) -> T | None:
        try:
            result = await call
        except GRPCError as exc:
            self.errors[f"{kind}: {exc.status.name}"] += 1
            return None
        except TimeoutError:
            self.errors[f"{kind}: DEADLINE_EXCEEDED (client)"] += 1
            return None
        except (StreamTerminatedError, ConnectionError, OSError) as exc:
            self.errors[f"{kind}: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.01)  # a dead server: do not spin
            return None
        return True if result is None else result  # type: ignore[return-value]  # None means "failed"


class CallerRecorder:
    """One caller's handle on the :class:`Recorder` (so its calls count towards its own tally)."""

    __slots__ = ("rec", "index")

    def __init__(self, rec: Recorder, index: int) -> None:
        self.rec = rec
        self.index = index

    async def timed(self, kind: str, call: Awaitable[T]) -> T | None:
        """Await ``call``; record its latency under ``kind`` if it completes OK inside the window.

        Returns the call's result (True for a call without one), or None if it failed.
        """
        rec = self.rec
        began = time.monotonic()
        result = await rec.guard(kind, call)
        ended = time.monotonic()
        if result is not None and rec.measure_from <= ended <= rec.measure_to:
            rec.histograms[kind].record(ended - began)
            rec.caller_calls[self.index] += 1
        return result

    async def untimed(self, kind: str, call: Awaitable[T]) -> T | None:
        """Await ``call`` without timing it (errors still count); None if it failed."""
        rec = self.rec
        result = await rec.guard(kind, call)
        if result is not None and rec.measure_from <= time.monotonic() <= rec.measure_to:
            rec.untimed_calls[kind] += 1
        return result


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run this process's callers for the whole spec; return what they measured."""
    rec = Recorder(spec.measure_from, spec.measure_to)
    channels = open_channels(spec.host, spec.port, spec.channels)
    apis: list[Api] = [CLIENTS[spec.client](channel) for channel in channels]
    steps = [
        make_caller(
            spec.scenario,
            apis[i % len(apis)],
            rec.for_caller(i),
            spec.data,
            spec.first_caller + i,
            spec.total_callers,
            spec.seed,
        )
        for i in range(spec.callers)
    ]
    cpu = [0.0, 0.0]

    async def caller(index: int) -> None:
        step = steps[index]
        while time.monotonic() < spec.measure_to:
            await step()

    async def cpu_meter() -> None:
        await _sleep_until(spec.measure_from)
        cpu[0] = time.process_time()
        await _sleep_until(spec.measure_to)
        cpu[1] = time.process_time()

    try:
        await _sleep_until(spec.start)
        await asyncio.gather(cpu_meter(), *(caller(i) for i in range(spec.callers)))
    finally:
        close_channels(channels)
    return LoadResult(
        window=spec.measure_to - spec.measure_from,
        histograms=dict(rec.histograms),
        errors=rec.errors,
        untimed=rec.untimed_calls,
        per_caller=rec.caller_calls,
        generator_cpu=cpu[1] - cpu[0],
    )


def run_load_blocking(spec: LoadSpec) -> LoadResult:
    """:func:`run_load` in a fresh event loop (the entry point of a generator process)."""
    return asyncio.run(run_load(spec))


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal non-negative integers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def drive(
    scenario: str,
    host: str,
    port: int,
    data: ScenarioData,
    *,
    concurrency: int,
    channels: int,
    client: str,
    start: float,
    warmup: float,
    duration: float,
    pool: Executor | None = None,
    processes: int = 1,
    seed: int = 1,
) -> LoadResult:
    """Run ``scenario`` against ``host:port`` with ``concurrency`` callers over ``channels`` channels.

    The warm-up starts at ``start`` (monotonic; leave worker processes time to receive their share),
    the window ``warmup`` s later. With ``processes`` > 1 the callers (and channels) are split over
    that many processes of ``pool``; otherwise they run on this event loop.
    """
    processes = max(1, min(processes, concurrency)) if pool is not None else 1
    callers = split(concurrency, processes)
    channel_counts = [max(1, c) for c in split(max(channels, processes), processes)]
    specs = []
    first = 0
    for share, share_channels in zip(callers, channel_counts, strict=True):
        specs.append(
            LoadSpec(
                scenario=scenario,
                host=host,
                port=port,
                callers=share,
                first_caller=first,
                total_callers=concurrency,
                channels=min(share_channels, share),
                client=client,
                start=start,
                measure_from=start + warmup,
                measure_to=start + warmup + duration,
                data=data,
                seed=seed,
            )
        )
        first += share
    if processes == 1:
        return await run_load(specs[0])
    assert pool is not None
    loop = asyncio.get_running_loop()
    results: Sequence[LoadResult] = await asyncio.gather(
        *(loop.run_in_executor(pool, run_load_blocking, spec) for spec in specs)
    )
    total = LoadResult(window=duration)
    for result in results:
        total.merge(result)
    return total
