"""The unary workloads: what one caller does per step, for each scenario.

A *caller* is one closed-loop client: it makes one call, waits for the answer, and makes the next.
Each step is one RPC; calls a scenario needs but does not measure (the creates that feed ``update``)
go through :meth:`Recorder.untimed` and are reported separately.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from bench.api import ITEM_SETS, Api
from orders.domain import encode_page_token, new_id

T = TypeVar("T")

PENDING, CONFIRMED, SHIPPED, DELIVERED = 1, 2, 3, 4
NEXT_STATUS = {PENDING: CONFIRMED, CONFIRMED: SHIPPED, SHIPPED: DELIVERED}

UNARY_SCENARIOS = ("create", "get", "list", "update", "mixed")


class Recorder(Protocol):
    """Where callers report their calls (see :class:`bench.load.Recorder`)."""

    async def timed(self, kind: str, call: Awaitable[T]) -> T | None:
        """Await ``call``, record its latency under ``kind``; None if it failed (the error is counted)."""
        ...

    async def untimed(self, kind: str, call: Awaitable[T]) -> T | None:
        """Await ``call`` without recording its latency; None if it failed (the error is counted)."""
        ...


@dataclass(frozen=True)
class ScenarioData:
    """What the callers know about the database before the run (picklable, for worker processes)."""

    order_ids: Sequence[str]  # preloaded orders, all PENDING at the start, ids in creation order
    max_key: int  # the preloaded orders have keys 1..max_key
    page_size: int = 50
    list_mode: str = "random"  # "random": a random page via a page token; "first": always the first page
    request_ids: bool = True  # send a fresh request_id with every create, as OrderClient does
    expected_version: bool = True  # send expected_version with every status change


Step = Callable[[], Awaitable[None]]


def _request_id(data: ScenarioData) -> str:
    return new_id() if data.request_ids else ""


class _Walker:
    """Walks one order at a time through PENDING → CONFIRMED → SHIPPED → DELIVERED."""

    def __init__(self, api: Api, rec: Recorder, data: ScenarioData, rng: random.Random, fresh: Sequence[str]) -> None:
        self.api, self.rec, self.data, self.rng = api, rec, data, rng
        self.fresh: collections.deque[tuple[str, int]] = collections.deque((i, 1) for i in fresh)
        self.order: tuple[str, int, int] | None = None  # id, status, version

    async def next_order(self) -> bool:
        """Take a PENDING order to walk: a known fresh one, else create one (untimed). False on failure."""
        if self.fresh:
            order_id, version = self.fresh.popleft()
            self.order = (order_id, PENDING, version)
            return True
        created = await self.rec.untimed(
            "create", self.api.create(self.rng.randrange(len(ITEM_SETS)), _request_id(self.data))
        )
        if created is None:
            return False
        self.order = (created[0], PENDING, created[1])
        return True

    async def step(self) -> None:
        """One timed status change (after taking or creating an order if none is in progress)."""
        if self.order is None and not await self.next_order():
            return
        assert self.order is not None
        order_id, status, version = self.order
        target = NEXT_STATUS[status]
        expected = version if self.data.expected_version else 0
        new_version = await self.rec.timed("update", self.api.update(order_id, target, expected))
        if new_version is None or target == DELIVERED:  # failed or done: the next step takes another order
            self.order = None
        else:
            self.order = (order_id, target, new_version)


def make_caller(
    scenario: str, api: Api, rec: Recorder, data: ScenarioData, index: int, callers: int, seed: int
) -> Step:
    """The step function of caller ``index`` (of ``callers`` in all processes) in ``scenario``."""
    rng = random.Random(seed * 1_000_003 + index)
    ids = data.order_ids

    if scenario == "baseline":

        async def baseline() -> None:
            await rec.timed("baseline", api.empty())

        return baseline

    if scenario == "create":

        async def create() -> None:
            await rec.timed("create", api.create(rng.randrange(len(ITEM_SETS)), _request_id(data)))

        return create

    if scenario == "get":

        async def get() -> None:
            await rec.timed("get", api.get(ids[rng.randrange(len(ids))]))

        return get

    if scenario == "list":
        last_start = max(0, data.max_key - data.page_size)

        async def list_page() -> None:
            key = rng.randint(0, last_start) if data.list_mode == "random" else 0
            token = encode_page_token(frozenset(), key) if key else ""
            await rec.timed("list", api.list(token, data.page_size))

        return list_page

    if scenario == "update":
        return _Walker(api, rec, data, rng, ()).step

    if scenario == "mixed":
        # Updates walk this caller's own share of the preloaded orders, then the orders it created.
        walker = _Walker(api, rec, data, rng, ids[index::callers])

        async def mixed() -> None:
            draw = rng.random()
            if draw < 0.7:
                await rec.timed("get", api.get(ids[rng.randrange(len(ids))]))
            elif draw < 0.9:
                created = await rec.timed("create", api.create(rng.randrange(len(ITEM_SETS)), _request_id(data)))
                if created is not None:
                    walker.fresh.append(created)
            else:
                await walker.step()

        return mixed

    raise ValueError(f"unknown scenario {scenario!r}; choose from baseline, {', '.join(UNARY_SCENARIOS)}")
