"""bench.reference, the straightforward grpcio + sqlite3 server the benchmark compares with, over a real socket:
it must keep the contract, or the comparison would flatter one side."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from bench.api import UpbApi
from bench.db import sqlite_url
from bench.preload import preload
from bench.procs import ServerProcess

pytestmark = pytest.mark.database_free  # it serves a SQLite file whichever backend the suite runs on

PENDING, CONFIRMED, SHIPPED, DELIVERED = 1, 2, 3, 4


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[ServerProcess]:
    """bench.reference on a database holding 120 preloaded orders."""
    preload(sqlite_url(tmp_path / "reference.db"), 120, seed=3)
    with ServerProcess(
        "bench.reference", ["--db", str(tmp_path / "reference.db"), "--port", "0"], tmp_path / "reference.log"
    ) as server:
        yield server


@pytest.fixture
async def api(reference: ServerProcess) -> AsyncIterator[UpbApi]:
    channel = Channel("127.0.0.1", reference.port)
    try:
        yield UpbApi(channel, timeout=10)
    finally:
        channel.close()


async def test_it_creates_reads_and_walks_an_order_like_the_contract_says(api: UpbApi) -> None:
    order_id, version = await api.create(0, "retry-me")
    assert version == 1
    assert await api.create(0, "retry-me") == (order_id, 1)  # an idempotent retry: the same order
    with pytest.raises(GRPCError) as reused:
        await api.create(1, "retry-me")  # the key with another request
    assert reused.value.status == Status.ALREADY_EXISTS

    await api.get(order_id)
    assert await api.update(order_id, CONFIRMED, 1) == 2
    with pytest.raises(GRPCError) as stale:
        await api.update(order_id, SHIPPED, 1)
    assert stale.value.status == Status.ABORTED
    with pytest.raises(GRPCError) as skipped:
        await api.update(order_id, DELIVERED, 2)
    assert skipped.value.status == Status.FAILED_PRECONDITION
    assert await api.update(order_id, SHIPPED, 2) == 3


async def test_it_rejects_bad_ids_with_the_contracts_codes(api: UpbApi) -> None:
    with pytest.raises(GRPCError) as malformed:
        await api.get("not-a-uuid")
    assert malformed.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as unknown:
        await api.get("00000000-0000-7000-8000-000000000000")
    assert unknown.value.status == Status.NOT_FOUND


async def test_it_pages_through_every_order_with_tokens(api: UpbApi) -> None:
    tokens = [await api.list("", 50)]
    while tokens[-1]:
        tokens.append(await api.list(tokens[-1], 50))
    assert len(tokens) == 3  # 120 orders: pages of 50, 50 and 20, the last without a token
