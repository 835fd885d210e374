"""orders.testing, the public harness, as its users meet it: the README's example, the strategies against a
real server, serve()'s token, the arguments it refuses, and the state machine's clean-up when a check fails."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orders import InvalidArgument, Item, OrderClient, Unauthenticated
from orders._proto.orders.v1 import CreateOrderRequest
from orders.client import parse_target
from orders.testing import (
    OrderStateMachine,
    create_requests,
    invalid_create_requests,
    items,
    prices,
    running_server,
    serve,
    temporary_database,
)

README = Path(__file__).resolve().parent.parent / "README.md"
STRATEGY_SETTINGS = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


async def test_the_readme_example_runs_as_written() -> None:
    section = README.read_text().split("## Testing your code against a real server", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    test = namespace["test_my_checkout"]
    assert test.pytestmark[0].name == "asyncio"  # runs without asyncio_mode = auto in the user's project
    await test()


async def for_each_example(strategy: st.SearchStrategy[CreateOrderRequest], check: Callable) -> None:
    """Run ``check(request)`` (a coroutine) on this loop for every example hypothesis draws in a worker thread."""
    loop = asyncio.get_running_loop()

    @STRATEGY_SETTINGS
    @given(request=strategy)
    def examples(request: CreateOrderRequest) -> None:
        asyncio.run_coroutine_threadsafe(check(request), loop).result(timeout=60)

    await asyncio.to_thread(examples)


def items_of(request: CreateOrderRequest) -> list[Item]:
    return [Item(i.product_name, i.quantity, i.price) for i in request.items]


async def test_the_request_strategies_keep_their_promises_on_a_real_server() -> None:
    async with serve() as client:

        async def accepted(request: CreateOrderRequest) -> None:
            await client.create(items_of(request), currency_code=request.currency_code)

        async def refused(request: CreateOrderRequest) -> None:
            with pytest.raises(InvalidArgument):
                await client.create(
                    items_of(request), total_amount=request.total_amount, currency_code=request.currency_code
                )

        await for_each_example(create_requests(), accepted)
        await for_each_example(invalid_create_requests(), refused)


@pytest.mark.database_free
def test_strategy_bounds_beyond_what_is_valid_are_refused() -> None:
    with pytest.raises(ValueError, match="max_cents"):
        prices(10**14 + 1)
    with pytest.raises(ValueError, match="max_quantity"):
        items(max_quantity=1_000_001)


@pytest.mark.database_free
@pytest.mark.parametrize("server", ["sqlite:///orders.db", "SQLite", "mysql://root@localhost/test"])
def test_temporary_database_names_what_it_can_make_a_database_on(server: str) -> None:
    with pytest.raises(ValueError, match="'sqlite'.*postgresql://"), temporary_database(server):
        pass


@pytest.mark.database_free
async def test_running_server_picks_its_own_port() -> None:
    with pytest.raises(TypeError, match="free port"):
        async with running_server(port=50051):
            pass


async def test_serve_with_a_token_makes_the_server_require_it() -> None:
    async with serve(token="a-test-token") as client:
        await client.create([Item("Pen", 1, 1.0)])
        async with OrderClient(client.target) as without_token:
            with pytest.raises(Unauthenticated):
                await without_token.create([Item("Pen", 1, 1.0)])


def refuses_connections(target: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(parse_target(target)) != 0


async def broken_watch() -> None:
    raise RuntimeError("the stream broke")


def test_the_state_machine_reports_a_broken_watch_and_still_cleans_up() -> None:
    machine = OrderStateMachine()
    target = machine.client.target
    machine.watcher.cancel()
    machine.watcher = machine.loop.create_task(broken_watch())
    machine.expected_events.append(("an order", None, None))  # the invariant waits for it
    with pytest.raises(RuntimeError, match="the stream broke"):  # not a timeout after 5 s
        machine.stream_matches_the_model()
    with pytest.raises(RuntimeError, match="the stream broke"):
        machine.teardown()
    assert machine.loop.is_closed()
    assert refuses_connections(target)  # the server stopped
