"""orders.testing, the public harness, as its users meet it: the README's example, the strategies against a
real server, serve()'s token, the arguments it refuses, and the state machine's clean-up when a check fails."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orders import InvalidArgument, Item, OrderClient, Unauthenticated, domain, wire
from orders._proto.orders.v1 import CreateOrderRequest
from orders.auth import SecurityConfigError
from orders.client import parse_target
from orders.domain import Status
from orders.storage import DatabaseUnusable, open_database
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
STRATEGY_SETTINGS = settings(  # derandomized: the same examples in every run, so a rule left out is always seen
    max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
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

        refusals: set[str] = set()

        async def refused(request: CreateOrderRequest) -> None:
            with pytest.raises(InvalidArgument) as refusal:
                await client.create(
                    items_of(request),
                    total_amount=request.total_amount,
                    currency_code=request.currency_code,
                    request_id=request.request_id or None,
                )
            refusals.add(next((rule for rule in RULES if rule in refusal.value.message), refusal.value.message))

        await for_each_example(create_requests(), accepted)
        await for_each_example(invalid_create_requests(), refused)
        assert refusals == set(RULES), set(RULES) ^ refusals  # every rule broken, and none other


# What the server's refusal says, for each validation rule of a create (see the README's error table).
RULES = (
    "needs at least one item",
    "at most 1,000 items",
    "product_name must not be empty",
    "product_name is",  # ... characters; at most 200
    "has nothing visible",
    "product_name must not contain",
    "quantity must be between",
    "price must be a finite number",
    "must not be negative",
    "must be a whole number of cents",
    "price must be at most",
    "exceeds the maximum",
    "currency_code must be",
    "does not match the sum",
    "request_id may have at most",
    "request_id must not contain",
)


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


def shipped_as_if_from_pending(event: domain.StatusEvent) -> wire.Reply:
    """A broken server's update: SHIPPED said to come from PENDING (only the model can tell)."""
    return ORIGINAL_STATUS_UPDATE(event._replace(previous=Status.PENDING) if event.status == Status.SHIPPED else event)


def items_without_prices(order: domain.Order) -> bytes:
    """A broken server's stored order: every item at price 0 (the total kept)."""
    return ORIGINAL_ENCODE_ORDER(order._replace(items=tuple(i._replace(price_cents=0) for i in order.items)))


ORIGINAL_STATUS_UPDATE, ORIGINAL_ENCODE_ORDER = wire.status_update, wire.encode_order


@pytest.mark.database_free  # a SQLite file per example: about the model only
@pytest.mark.parametrize(
    ("name", "broken", "says"),
    [
        ("status_update", shipped_as_if_from_pending, "the events the watch received"),
        ("encode_order", items_without_prices, "(id, status, version, items"),
    ],
)
def test_the_state_machine_finds_a_server_that_breaks_the_model(
    monkeypatch: pytest.MonkeyPatch, name: str, broken: Callable[..., object], says: str
) -> None:
    """It takes orders all the way along the state machine and checks every field of every reply, so even a
    server wrong only about shipped orders, or about item prices, fails it, with what it expected."""
    monkeypatch.setattr(wire, name, broken)
    machine = OrderStateMachine.TestCase
    machine.settings = settings(  # found, not shrunk: the message is what is under test
        OrderStateMachine.TestCase.settings, max_examples=100, database=None, derandomize=True, phases=[Phase.generate]
    )
    with pytest.raises(AssertionError, match=re.escape(says)):
        machine().runTest()


@pytest.mark.database_free
@pytest.mark.parametrize("option", ["workers", "log_level", "log_format"])
async def test_running_server_refuses_what_only_orders_serve_does(option: str) -> None:
    with pytest.raises(TypeError, match=f"one server in this process; it takes no {option}"):
        async with running_server(**{option: 2 if option == "workers" else "info"}):
            pass


@pytest.mark.database_free
@pytest.mark.parametrize("start", ["a bad token", "a file that is no database"])
async def test_a_server_that_fails_to_start_leaves_no_thread_behind(tmp_path: Path, start: str) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    before = set(threading.enumerate())
    with pytest.raises((SecurityConfigError, DatabaseUnusable)):
        if start == "a bad token":
            async with serve(token="has space"):
                pass
        else:
            async with running_server(f"sqlite:///{garbage}"):
                pass
    for _ in range(200):  # told to stop, the storage threads end within moments
        if set(threading.enumerate()) == before:
            return
        await asyncio.sleep(0.01)
    assert set(threading.enumerate()) == before


@pytest.mark.postgresql_only
def test_temporary_database_on_a_server_reached_by_its_socket(database_url: str) -> None:
    """``postgresql:///test``: no host, so the local socket; a URL round trip would make it postgresql:/test."""
    socket_url = f"postgresql:///{urllib.parse.urlsplit(database_url).path.lstrip('/')}?user=postgres"
    with temporary_database(socket_url) as url:
        assert re.fullmatch(r"postgresql:///orders_test_\w+\?user=postgres", url), url
        database = open_database(url)
        try:
            name = urllib.parse.urlsplit(url).path.lstrip("/")
            assert database.execute_sql("SELECT current_database()").fetchone()[0] == name
        finally:
            database.close()


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
