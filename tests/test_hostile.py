"""Hostile input (issue 4, guarantee 3): whatever a client sends, the server answers with a proper status,
never UNKNOWN or INTERNAL, keeps serving everyone else, and a rejected call changes nothing.

* A hypothesis campaign builds every request type field by field at the protobuf wire level (so it can
  send what no generated client would): huge and odd strings, invalid UTF-8, every double bit pattern,
  integer extremes and over-long varints, unknown enum numbers, duplicated and unknown fields, and
  mutations of all of it; plus repeated fields with 100,000 entries and raw garbage.
* Raw HTTP/2 straight to the port on a plain socket (``h2`` only frames what we ask for): broken
  prefaces, truncated frames, dropped connections, an announced 2 GiB message, and more.

After every case the database (ListOrders snapshot + event-log head) is compared, and health and GetOrder
are asked over a connection that predates the case and over a fresh one. ``ORDERS_CAMPAIGN=1`` runs a
heavier campaign (more examples); the counts of cases run and codes seen are printed (``pytest -s``).

Known exceptions, all grpclib's, answered before any of our code runs (``test_requests_that_are_not_grpc``,
``test_unknown_frame_types_are_ignored``): a request that is not gRPC (wrong method, content-type, no
``te: trailers``) gets an HTTP error status (405, 415, 400); an unparsable ``grpc-timeout`` header gets
grpc-status UNKNOWN; a header list over 64 KiB, or an HTTP/2 frame of a type grpclib does not know, ends
the connection (the latter with an error in the log). None of them harms another client or the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import logging
import math
import os
import random
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import pytest_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orders._proto.orders.v1 import (
    CreateOrderRequest,
    GetOrderRequest,
    ListOrdersRequest,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    UpdateOrderStatusRequest,
)
from orders.config import MIB
from orders.server import OrderServer
from orders.testing import running_server

CAMPAIGN = os.environ.get("ORDERS_CAMPAIGN") == "1"
LIMIT = 4 * MIB  # the default --max-message-bytes
SERVICE = "/orders.v1.OrderService/"
METHODS = ["CreateOrder", "GetOrder", "UpdateOrderStatus", "CancelOrder", "ListOrders", "OrderStatusStream"]
DOMAIN_CODES = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ABORTED",
    "ALREADY_EXISTS",
    "OUT_OF_RANGE",
}
CALL_TIMEOUT = 20.0


# --- protobuf wire encoding, by hand ---------------------------------------------------------------------------

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = range(6)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 travel as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def f_varint(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def f_double(number: int, value: float | bytes) -> bytes:
    return tag(number, FIXED64) + (value if isinstance(value, bytes) else struct.pack("<d", value))


def f_bytes(number: int, value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return tag(number, LENGTH) + varint(len(data)) + data


def padded(message: bytes, size: int, number: int = 1000) -> bytes:
    """``message`` plus an unknown length-delimited field making it exactly ``size`` bytes."""
    for width in range(1, 6):
        filler = size - len(message) - len(tag(number, LENGTH)) - width
        if filler >= 0 and len(varint(filler)) == width:
            return message + f_bytes(number, b"p" * filler)
    raise ValueError(f"cannot pad {len(message)} bytes to {size}")


# --- hostile values ---------------------------------------------------------------------------------------------

UUIDS = st.uuids().map(str)
SPECIAL_STRINGS = [
    "",
    " ",
    "\t\n",
    "\x00",
    "a\x00b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u202e",
    "\ufeff",
    "\ufffe\uffff",
    "\U0010ffff",
    "\U000e0001",
    "\U000f0000",
    "a\u0301",
    "\u200d",
    "🧨" * 50,
    "ǅ",
    "USD",
    "usd",
    "ＵＳＤ",
    "0" * 36,
    "00000000-0000-0000-0000-000000000000",
    "{00000000-0000-0000-0000-000000000000}",
    "urn:uuid:" + "1" * 32,
    "' OR 1=1 --",
    "%s%s%n",
    "../../etc/passwd",
    "null",
    "-1",
    "1e308",
    "NaN",
]
# any code point but surrogates (UTF-8 cannot carry them): every plane, private use, unassigned, noncharacters
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
CONTROL_TEXT = st.text(st.characters(categories=("Cc", "Cf", "Zl", "Zp")), min_size=1, max_size=10)
HUGE_TEXT = st.builds(
    lambda unit, count: unit * count,
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=3),
    st.integers(1_000, 100_000),  # up to 1.2 MB of UTF-8
)
NOT_UTF8 = st.binary(min_size=1, max_size=20).filter(lambda b: not _is_utf8(b))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


HOSTILE_STRINGS: st.SearchStrategy[str | bytes] = st.one_of(
    st.sampled_from(SPECIAL_STRINGS), ANY_TEXT, CONTROL_TEXT, HUGE_TEXT, NOT_UTF8, UUIDS
)


SPECIAL_DOUBLES = [
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1e308,
    -1e308,
    1.7976931348623157e308,
    0.01,
    0.005,
    1e12,
    1e12 + 0.01,
    1e13,
    9007199254740993.0,
    1.0,
    19.99,
]
DOUBLES: st.SearchStrategy[float | bytes] = st.one_of(
    st.sampled_from(SPECIAL_DOUBLES),
    st.floats(),
    st.integers(0, 10**6).map(lambda cents: cents / 100),
    st.binary(min_size=8, max_size=8),  # any bit pattern: signalling NaNs with payloads, denormals, ...
)
INT32_EXTREMES = [0, 1, -1, 2**31 - 1, -(2**31), 1_000_000, 1_000_001, 1000, 1001, 50]
INT64_EXTREMES = [0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1, 2**31, -(2**31) - 1]


def int32s() -> st.SearchStrategy[int]:
    # beyond int32 too: protobuf truncates an over-long varint into an int32 field; does every parser agree?
    return st.one_of(
        st.sampled_from(INT32_EXTREMES), st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**64 - 1)
    )


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(INT64_EXTREMES), st.integers(-(2**63), 2**64 - 1), st.integers(0, 20))


def enums() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-1, 7), st.sampled_from([-(2**31), 2**31 - 1, 99]), int32s())


def unknown_fields(known: Iterable[int]) -> st.SearchStrategy[bytes]:
    known = frozenset(known)
    number = st.one_of(st.integers(1, 40), st.integers(1, 2**29 - 1)).filter(lambda n: n not in known)
    value = st.one_of(
        st.builds(f_varint, number, st.integers(0, 2**64 - 1)),
        st.builds(f_double, number, st.binary(min_size=8, max_size=8)),
        st.builds(f_bytes, number, st.binary(max_size=64)),
        st.builds(lambda n, v: tag(n, FIXED32) + v, number, st.binary(min_size=4, max_size=4)),
        st.builds(
            lambda n, body: tag(n, START_GROUP) + f_varint(1, body) + tag(n, END_GROUP), number, st.integers(0, 99)
        ),
    )
    return st.lists(value, max_size=3).map(b"".join)


@dataclass(frozen=True)
class Field:
    """One field of a request: how a well-behaved client fills it, and how a hostile one does."""

    valid: st.SearchStrategy[bytes]
    hostile: st.SearchStrategy[bytes]


def scalar(
    number: int, encode: Callable[[int, Any], bytes], valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> Field:
    """A singular field: absent or valid, or hostile (sometimes sent several times: the last one counts)."""
    one = st.builds(encode, st.just(number), hostile)
    return Field(
        st.one_of(st.just(b""), st.builds(encode, st.just(number), valid)),
        st.one_of(one, st.lists(one, min_size=2, max_size=3).map(b"".join)),
    )


@st.composite
def message(draw: st.DrawFn, fields: dict[int, Field]) -> bytes:
    """A request: every field valid, or one of them hostile, or any of them; plus unknown fields; shuffled."""
    mode = draw(st.sampled_from(["valid", "valid", "one", "one", "one", "any"]))
    chosen = draw(st.sampled_from(sorted(fields)))
    parts = []
    for number, spec in fields.items():
        hostile = {"valid": False, "one": number == chosen}.get(mode) if mode != "any" else draw(st.booleans())
        parts.append(draw(spec.hostile if hostile else spec.valid))
    parts.append(draw(unknown_fields(fields)))
    return b"".join(draw(st.permutations(parts)))


# The requests, field by field (field number -> Field), as order.proto declares them.

VALID_NAMES = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(str.strip)
ORDER_ITEM = message(
    {
        1: scalar(1, f_bytes, st.text(max_size=5), HOSTILE_STRINGS),  # output only: ignored
        2: Field(st.builds(f_bytes, st.just(2), VALID_NAMES), scalar(2, f_bytes, VALID_NAMES, HOSTILE_STRINGS).hostile),
        3: Field(st.builds(f_varint, st.just(3), st.integers(1, 5)), scalar(3, f_varint, st.just(1), int32s()).hostile),
        4: scalar(4, f_double, st.integers(0, 10**5).map(lambda cents: cents / 100), DOUBLES),
    }
)


def create_order(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    return message(
        {
            1: Field(
                st.lists(ORDER_ITEM, min_size=1, max_size=3).map(lambda items: b"".join(f_bytes(1, i) for i in items)),
                st.lists(ORDER_ITEM, max_size=5).map(lambda items: b"".join(f_bytes(1, i) for i in items)),
            ),
            2: scalar(2, f_double, st.just(0.0), DOUBLES),
            3: scalar(3, f_bytes, st.sampled_from(["", "key-1", "key-2"]), HOSTILE_STRINGS),
            4: scalar(4, f_bytes, st.sampled_from(["USD", "EUR", "JPY"]), HOSTILE_STRINGS),
        }
    )


def order_id(order_ids: list[str]) -> Field:
    known = st.sampled_from(order_ids)
    return Field(
        st.builds(f_bytes, st.just(1), st.one_of(known, known.map(str.upper))),
        scalar(1, f_bytes, known, HOSTILE_STRINGS).hostile,
    )


def get_order(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    return message({1: order_id(order_ids)})


def update_order_status(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    return message(
        {
            1: order_id(order_ids),
            2: Field(
                st.builds(f_varint, st.just(2), st.integers(1, 5)), scalar(2, f_varint, st.just(1), enums()).hostile
            ),
            3: scalar(3, f_varint, st.sampled_from([0, 0, 0, 0, 1]), int64s()),
        }
    )


def cancel_order(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    return message({1: order_id(order_ids), 2: scalar(2, f_varint, st.sampled_from([0, 0, 0, 0, 1]), int64s())})


def _statuses(values: st.SearchStrategy[int], max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(values, max_size=max_size).flatmap(
        lambda statuses: st.sampled_from(
            [
                b"".join(f_varint(3, v) for v in statuses),  # unpacked
                f_bytes(3, b"".join(varint(v) for v in statuses)) if statuses else b"",  # packed
            ]
        )
    )


def list_orders(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    return message(
        {
            1: scalar(1, f_varint, st.integers(0, 2000), int32s()),
            2: scalar(2, f_bytes, st.just(""), HOSTILE_STRINGS),
            3: Field(_statuses(st.integers(1, 5), 5), _statuses(enums(), 8)),
        }
    )


def order_status_stream(order_ids: list[str]) -> st.SearchStrategy[bytes]:
    known = st.sampled_from(order_ids)
    return message(
        {
            1: Field(
                st.lists(st.builds(f_bytes, st.just(1), st.one_of(known, UUIDS)), max_size=3).map(b"".join),
                st.lists(st.builds(f_bytes, st.just(1), st.one_of(known, HOSTILE_STRINGS)), min_size=1, max_size=4).map(
                    b"".join
                ),
            ),
            2: scalar(2, f_varint, st.integers(0, 3), st.one_of(st.integers(-3, 3), int64s())),
            3: scalar(3, f_varint, st.integers(0, 5), int32s()),
        }
    )


REQUESTS: dict[str, Callable[[list[str]], st.SearchStrategy[bytes]]] = {
    "CreateOrder": create_order,
    "GetOrder": get_order,
    "UpdateOrderStatus": update_order_status,
    "CancelOrder": cancel_order,
    "ListOrders": list_orders,
    "OrderStatusStream": order_status_stream,
}


@st.composite
def mutated(draw: st.DrawFn, payload: st.SearchStrategy[bytes]) -> bytes:
    """A request damaged the ways a broken or malicious encoder damages them."""
    data = bytearray(draw(payload))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(data)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "overwrite" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0x07, 0x08, 0x0F, 0x7F, 0x80, 0xFF]))
    return bytes(data)


# --- calls and checks -------------------------------------------------------------------------------------------


class RawCodec(ProtoCodec):
    """Sends bytes as they are and returns reply bytes undecoded."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message  # type: ignore[no-any-return]

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


@dataclass
class Tally:
    """Cases run and status codes seen, per campaign (printed at the end of each test)."""

    name: str
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_method: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    def add(self, method: str, code: str) -> None:
        self.codes[code] += 1
        self.by_method[method][code] += 1

    def report(self) -> str:
        lines = [f"{self.name}: {sum(self.codes.values())} cases, codes {dict(sorted(self.codes.items()))}"]
        lines += [f"  {method}: {dict(sorted(codes.items()))}" for method, codes in sorted(self.by_method.items())]
        print("\n" + "\n".join(lines))
        return lines[0]


class Harness:
    """A raw-bytes channel to the server plus the checks every hostile case ends with."""

    def __init__(self, server: OrderServer) -> None:
        self.server = server
        self.raw = Channel("127.0.0.1", server.port, codec=RawCodec())
        self.typed = Channel("127.0.0.1", server.port)  # "another client": opened before the abuse, kept after
        self.stub = OrderServiceStub(self.typed)
        self.order_ids: list[str] = []
        self.cases = 0

    def close(self) -> None:
        self.raw.close()
        self.typed.close()

    async def call(self, method: str, payload: bytes) -> tuple[str, str]:
        """Send ``payload`` as the request of ``method``; return (status name, message)."""
        try:
            if method == "OrderStatusStream":
                await asyncio.wait_for(self._stream(payload), CALL_TIMEOUT)
            else:
                async with self.raw.request(
                    SERVICE + method, Cardinality.UNARY_UNARY, bytes, bytes, timeout=CALL_TIMEOUT
                ) as stream:
                    await stream.send_message(payload, end=True)
                    assert await stream.recv_message() is not None
        except GRPCError as error:
            assert "Traceback" not in (error.message or ""), error.message
            return error.status.name, error.message or ""
        return "OK", ""

    async def _stream(self, payload: bytes) -> None:
        """A stream is OK once it sends an update or the server registers it as a watcher; else its error."""
        watchers = self.server.feed.watcher_count
        async with self.raw.request(SERVICE + "OrderStatusStream", Cardinality.UNARY_STREAM, bytes, bytes) as stream:
            await stream.send_message(payload, end=True)
            first = asyncio.ensure_future(stream.recv_message())
            try:
                for _ in range(int(CALL_TIMEOUT / 0.005)):
                    if first.done():
                        first.result()
                        return
                    if self.server.feed.watcher_count > watchers:
                        # registered: it is past validation; give a bounds check (OUT_OF_RANGE) a moment
                        await asyncio.wait({first}, timeout=0.02)
                        if first.done():
                            first.result()
                        return
                    await asyncio.sleep(0.005)
                raise AssertionError("the stream neither answered nor registered")
            finally:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                with contextlib.suppress(h2.exceptions.StreamClosedError):  # already ended by the server
                    await stream.cancel()  # or leaving the block waits for headers a live stream never sends
        await self.no_open_streams()

    async def no_open_streams(self, timeout: float = 5.0, *, besides: int = 0) -> None:
        """Wait until the server has let go of every stream (its watcher and its stream-limit slot) but
        ``besides`` of them."""
        for _ in range(int(timeout / 0.005)):
            if self.server.feed.watcher_count <= besides and self.server.stream_limits.open <= besides:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(
            f"streams still held {timeout}s after they ended: {self.server.feed.watcher_count} "
            f"watchers, {self.server.stream_limits.open} stream-limit slots"
        )

    async def snapshot(self) -> tuple[list[Order], int]:
        """Every order (ListOrders, all pages) and the event log's head."""
        orders: list[Order] = []
        token = ""
        while True:
            page = await asyncio.wait_for(
                self.stub.list_orders(ListOrdersRequest(page_size=1000, page_token=token)), CALL_TIMEOUT
            )
            orders += page.orders
            token = page.next_page_token
            if not token:
                break
        _, head = await self.server.storage.read(self.server.storage.repository.log_bounds)
        return orders, head

    async def healthy(self, *, fresh_connection: bool = True) -> None:
        """Health and GetOrder answer on the long-lived connection and (if asked) on a fresh one."""
        fresh = Channel("127.0.0.1", self.server.port)
        try:
            for channel in (self.typed, fresh) if fresh_connection else (self.typed,):
                reply = await asyncio.wait_for(HealthStub(channel).Check(HealthCheckRequest()), CALL_TIMEOUT)
                assert reply.status == HealthCheckResponse.SERVING
                if self.order_ids:
                    got = await asyncio.wait_for(
                        OrderServiceStub(channel).get_order(GetOrderRequest(id=self.order_ids[0])), CALL_TIMEOUT
                    )
                    assert got.order is not None and got.order.id == self.order_ids[0]
        finally:
            fresh.close()

    async def seed(self) -> None:
        """A few orders in different statuses, so that valid ids and transitions occur."""
        for target in [OrderStatus.PENDING] * 6 + [OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.CANCELLED]:
            created = await self.stub.create_order(
                CreateOrderRequest(
                    items=[OrderItem(product_name="Seed", quantity=1, price=1.5)],
                    request_id="key-1" if not self.order_ids else "",
                )
            )
            assert created.order is not None
            self.order_ids.append(created.order.id)
            path = {
                OrderStatus.CONFIRMED: [OrderStatus.CONFIRMED],
                OrderStatus.SHIPPED: [OrderStatus.CONFIRMED, OrderStatus.SHIPPED],
                OrderStatus.CANCELLED: [OrderStatus.CANCELLED],
            }.get(target, [])
            for status in path:
                await self.stub.update_order_status(UpdateOrderStatusRequest(id=created.order.id, status=status))

    async def check(self, tally: Tally, method: str, payload: bytes, *, codes: set[str] = DOMAIN_CODES) -> str:
        """Send one hostile request and check everything a hostile request must not do."""
        before = await self.snapshot()
        try:
            code, message = await self.call(method, payload)
        except TimeoutError:
            raise AssertionError(f"{method} got no answer within {CALL_TIMEOUT}s: {payload[:200]!r}") from None
        tally.add(method, code)
        if len(payload) > LIMIT:
            assert code == "RESOURCE_EXHAUSTED", (code, message)
        else:
            assert code in codes, (method, code, message, payload[:200])
        if code == "INVALID_ARGUMENT":
            assert message, "an INVALID_ARGUMENT must say what is wrong"
        assert len(message) <= 1000, f"a {len(message):,}-character status message (quoting the request?)"
        if code != "OK" or method in ("GetOrder", "ListOrders", "OrderStatusStream"):
            assert await self.snapshot() == before, f"{method} {code} changed the database"
        self.cases += 1
        await self.healthy(fresh_connection=self.cases % 10 == 0)
        return code


# One server for the whole module: every case checks the database around itself, and a case that broke
# the server would fail every later one.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(backend: str) -> AsyncIterator[Harness]:
    async with running_server() as server:
        running = Harness(server)
        await running.seed()
        try:
            yield running
        finally:
            running.close()


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No case may make the server log an error (an INTERNAL, a grpclib "Server error", ...)."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "the server logged errors: " + "; ".join(r.getMessage() for r in errors[:5])


CAMPAIGN_SETTINGS = settings(
    max_examples=2000 if CAMPAIGN else 150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    database=None,
    derandomize=not CAMPAIGN,  # CI runs the same cases every time; the campaign explores
)


# --- the field-by-field campaign --------------------------------------------------------------------------------

Draw = Callable[[st.DataObject, str], bytes]


async def run_campaign(harness: Harness, tally: Tally, draw_payload: Draw) -> None:
    """For every hypothesis example: draw a payload, and check the call on this event loop. Each method
    gets its own run with an equal share of the examples (a method drawn per example favours the first
    ones, and the rarest may then get too few cases to reach its valid path).

    Hypothesis drives the examples from a worker thread (it draws there) while this loop serves the calls.
    """
    loop = asyncio.get_running_loop()

    def campaign(method: str) -> None:
        @settings(CAMPAIGN_SETTINGS, max_examples=math.ceil(CAMPAIGN_SETTINGS.max_examples / len(METHODS)))
        @given(data=st.data())
        def cases(data: st.DataObject) -> None:
            payload = draw_payload(data, method)
            asyncio.run_coroutine_threadsafe(harness.check(tally, method, payload), loop).result(timeout=300)

        cases()

    for method in METHODS:
        await asyncio.to_thread(campaign, method)
    tally.report()
    assert sum(tally.codes.values()) >= CAMPAIGN_SETTINGS.max_examples


async def test_every_field_of_every_request(harness: Harness) -> None:
    tally = Tally("fields")
    await run_campaign(harness, tally, lambda data, method: data.draw(REQUESTS[method](harness.order_ids)))
    assert {"OK", "INVALID_ARGUMENT"} <= set(tally.codes), tally.codes
    assert all("OK" in tally.by_method[m] for m in METHODS), tally.by_method  # valid paths were reached too


async def test_malformed_and_mutated_requests(harness: Harness) -> None:
    """Structure-aware damage to requests (truncation, bit flips, inserted and deleted bytes), and garbage."""
    tally = Tally("malformed")

    def damaged(data: st.DataObject, method: str) -> bytes:
        return data.draw(st.one_of(mutated(REQUESTS[method](harness.order_ids)), st.binary(max_size=64)))

    await run_campaign(harness, tally, damaged)
    assert tally.codes["INVALID_ARGUMENT"] > tally.codes["OK"], tally.codes


HEALTH_CHECKS = {
    "zeros": (b"\x00" * 64, "INVALID_ARGUMENT"),
    "ones": (b"\xff" * 64, "INVALID_ARGUMENT"),
    "unbalanced groups": (b"\x0b" * 5, "INVALID_ARGUMENT"),
    "length past the end": (b"\x0a\xff\xff\xff\xff\x0f", "INVALID_ARGUMENT"),
    "endless varint": (b"\x08" + b"\x80" * 11, "INVALID_ARGUMENT"),
    # grpc.health.v1 messages are the protobuf runtime's own: it keeps these as unknown fields, harmlessly
    "service sent as a number": (f_varint(1, 1), "OK"),
    "a group": (tag(2, START_GROUP) + tag(2, END_GROUP), "OK"),
}


@pytest.mark.parametrize(("payload", "expected"), list(HEALTH_CHECKS.values()), ids=list(HEALTH_CHECKS))
async def test_malformed_health_check(harness: Harness, payload: bytes, expected: str) -> None:
    """grpc.health.v1 goes through the same codec: garbage there is INVALID_ARGUMENT too."""
    code = "OK"
    try:
        async with harness.raw.request(
            "/grpc.health.v1.Health/Check", Cardinality.UNARY_UNARY, bytes, bytes, timeout=CALL_TIMEOUT
        ) as stream:
            await stream.send_message(payload, end=True)
            await stream.recv_message()
    except GRPCError as error:
        code = error.status.name
    assert code == expected
    await harness.healthy()


# --- repeated fields with 100,000 entries and other size extremes ----------------------------------------------

ITEM = f_bytes(2, "Widget") + f_varint(3, 1) + f_double(4, 2.5)
UUID_TEXT = "7f1e1b7c-8b1a-4d57-9b6e-2b6a4f2e0c11"


def _ids(count: int) -> bytes:
    return b"".join(f_bytes(1, str(uuid.UUID(int=i))) for i in range(count))


# (method, what, payload, expected code); every payload within the 4 MiB limit
BIG = [
    ("CreateOrder", "100k items", f_bytes(1, ITEM) * 100_000, "INVALID_ARGUMENT"),
    ("CreateOrder", "2M empty items (4 MB)", f_bytes(1, b"") * 2_000_000, "INVALID_ARGUMENT"),
    ("CreateOrder", "1,001 items", f_bytes(1, ITEM) * 1001, "INVALID_ARGUMENT"),
    ("CreateOrder", "1,000 items", f_bytes(1, ITEM) * 1000, "OK"),
    ("CreateOrder", "1 MB name", f_bytes(1, f_bytes(2, "n" * 1_000_000) + f_varint(3, 1)), "INVALID_ARGUMENT"),
    ("CreateOrder", "1 MB request_id", f_bytes(1, ITEM) + f_bytes(3, "k" * 1_000_000), "INVALID_ARGUMENT"),
    ("CreateOrder", "1 MB currency", f_bytes(1, ITEM) + f_bytes(4, "€" * 333_333), "INVALID_ARGUMENT"),
    ("CreateOrder", "20k unknown fields", f_varint(999, 1) * 20_000 + f_bytes(1, ITEM), "OK"),
    ("CreateOrder", "100k unknown fields", f_varint(999, 1) * 100_000 + f_bytes(1, ITEM), "INVALID_ARGUMENT"),
    ("CreateOrder", "1.4M unknown fields (4 MB)", f_varint(999, 1) * 1_398_000, "INVALID_ARGUMENT"),
    ("CreateOrder", "10k nested groups", tag(9, START_GROUP) * 10_000 + tag(9, END_GROUP) * 10_000, "INVALID_ARGUMENT"),
    ("GetOrder", "1 MB id", f_bytes(1, "1" * 1_000_000), "INVALID_ARGUMENT"),
    ("GetOrder", "100k repeated ids (the last wins)", f_bytes(1, UUID_TEXT) * 100_000, "NOT_FOUND"),
    ("GetOrder", "2M repeated empty ids (4 MB)", f_bytes(1, b"") * 2_000_000, "INVALID_ARGUMENT"),
    ("UpdateOrderStatus", "100k status fields", f_bytes(1, UUID_TEXT) + f_varint(2, 99) * 100_000, "INVALID_ARGUMENT"),
    ("ListOrders", "1,000 statuses", f_bytes(3, bytes(1 + i % 5 for i in range(1000))), "OK"),
    ("ListOrders", "100k statuses", b"".join(f_varint(3, 1 + i % 5) for i in range(100_000)), "INVALID_ARGUMENT"),
    ("ListOrders", "100k packed statuses", f_bytes(3, bytes(1 + i % 5 for i in range(100_000))), "INVALID_ARGUMENT"),
    ("ListOrders", "4M packed statuses (4 MB)", f_bytes(3, b"\x01" * 4_000_000), "INVALID_ARGUMENT"),
    ("ListOrders", "1 MB page token", f_bytes(2, "A" * 1_000_000), "INVALID_ARGUMENT"),
    ("OrderStatusStream", "10k order ids", _ids(10_000), "OK"),
    (
        "OrderStatusStream",
        "10k order ids, one bad",
        f_bytes(1, UUID_TEXT) * 9_999 + f_bytes(1, "x"),
        "INVALID_ARGUMENT",
    ),
    ("OrderStatusStream", "10k order ids, replay", f_bytes(1, UUID_TEXT) * 10_000 + f_varint(2, 0), "OK"),
    ("OrderStatusStream", "100k order ids", _ids(100_000), "INVALID_ARGUMENT"),
    ("OrderStatusStream", "2M empty order ids (4 MB)", f_bytes(1, b"") * 2_000_000, "INVALID_ARGUMENT"),
]


@pytest.mark.parametrize(
    ("method", "payload", "expected"), [(m, p, e) for m, _, p, e in BIG], ids=[what for _, what, _, _ in BIG]
)
async def test_huge_and_repeated_fields(harness: Harness, method: str, payload: bytes, expected: str) -> None:
    assert len(payload) <= LIMIT
    tally = Tally(f"{method} {len(payload):,} bytes")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await harness.check(tally, method, payload, codes={expected}) == expected
    elapsed = loop.time() - started
    print(f"{tally.name} -> {expected} in {elapsed:.2f}s")
    # The server decodes on its event loop: a slow decode stalls every client (betterproto2 took 13 s for
    # 2M empty items, 25 s for 4M packed statuses and 4 minutes for 4 MiB of unknown fields).
    assert elapsed < 5, f"{elapsed:.1f}s for one request (with the checks around it)"


# --- raw HTTP/2 on a plain socket ------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes, *, length: int | None = None) -> bytes:
    """An HTTP/2 frame; ``length`` may lie about the payload."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">?I", compressed, len(payload)) + payload


class RawH2:
    """A hand-driven HTTP/2 client on a plain socket: ``h2`` frames what we ask for, and raw bytes go as they are."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.events: list[h2.events.Event] = []
        self.eof = False

    @classmethod
    async def open(cls, port: int, *, handshake: bool = True) -> RawH2:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CALL_TIMEOUT)
        raw = cls(reader, writer)
        if handshake:
            raw.conn.initiate_connection()
            await raw.flush()
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.drain(), CALL_TIMEOUT)

    async def flush(self) -> None:
        await self.send(self.conn.data_to_send())

    def start(
        self,
        method: str,
        *,
        path: str | None = None,
        headers: Iterable[tuple[str, str]] | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
        end: bool = False,
    ) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            list(headers)
            if headers is not None
            else [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path or SERVICE + method),
                (":authority", "orders"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra_headers,
            ],
            end_stream=end,
        )
        return stream_id

    async def _read(self, timeout: float) -> bool:
        """Read once; False at EOF, reset or timeout."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return False
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):  # open the window again, or big answers stall
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.events += events
        await self.flush()  # settings and ping acks, window updates
        return True

    async def response(self, stream_id: int, timeout: float = 5.0) -> dict[str, str]:
        """Headers and trailers of ``stream_id`` once it ends (or is reset: then also ``reset``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found: dict[str, str] = {}
            for event in self.events:
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    found.update(dict(event.headers))
                if isinstance(event, h2.events.StreamReset):
                    found["reset"] = str(event.error_code)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return found
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await self._read(left):
                raise AssertionError(f"stream {stream_id} got no complete answer (got {found}, eof={self.eof})")

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server ends the connection within ``timeout`` (reading, and discarding, what it sends)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.eof:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return False
            except ConnectionError:
                data = b""
            self.eof = not data
        return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def other_clients(harness: Harness) -> AsyncIterator[None]:
    """Around an abuse: a watcher and the long-lived client connected before it must be served normally after."""
    updates: list[Any] = []

    async def watch() -> None:
        async for update in harness.stub.order_status_stream(OrderStatusStreamRequest()):
            updates.append(update)

    watcher = asyncio.create_task(watch())
    for _ in range(1000):
        if harness.server.feed.watcher_count:
            break
        await asyncio.sleep(0.005)
    assert harness.server.feed.watcher_count == 1
    before = await harness.snapshot()
    try:
        yield
        await asyncio.sleep(0.05)  # let the server notice whatever the abuse left behind
        assert await harness.snapshot() == before, "the abuse changed the database"
        await harness.healthy()
        created = await asyncio.wait_for(
            harness.stub.create_order(
                CreateOrderRequest(items=[OrderItem(product_name="After", quantity=1, price=1.0)])
            ),
            CALL_TIMEOUT,
        )
        assert created.order is not None
        for _ in range(1000):
            if any(u.order_id == created.order.id for u in updates):
                break
            assert not watcher.done(), watcher
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the watcher opened before the abuse did not see a change made after it")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    await harness.no_open_streams()


async def test_a_metadata_value_that_is_not_ascii_fails_no_connection(harness: Harness) -> None:
    """gRPC metadata values are ASCII; one that is not (UTF-8 "café" from a raw client) made h2 raise
    UnicodeDecodeError inside grpclib, which dropped the connection with every call on it."""
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port)
        try:
            request = grpc_message(f_bytes(1, str(uuid.uuid4())))  # a GetOrder for an order that does not exist
            for extra in ([("x-note", "café")], []):  # ... then a plain call on the same connection
                headers = [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", SERVICE + "GetOrder"),
                    (":authority", "orders"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    *extra,
                ]
                stream_id = raw.start("GetOrder", headers=headers)
                raw.conn.send_data(stream_id, request, end_stream=True)
                await raw.flush()
                assert (await raw.response(stream_id)).get("grpc-status") == "5", extra  # NOT_FOUND: it was served
        finally:
            raw.close()


GARBAGE = [
    b"",
    b"\x00" * 24,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    PREFACE[:10],
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
]  # ... and a TLS ClientHello


# Random bytes from a fixed seed: the same cases on every run, and in every pytest-xdist worker (which must
# collect identical parameters).
RANDOM_GARBAGE = [random.Random(n).randbytes(n) for n in (1, 23, 24, 100, 65536)]


@pytest.mark.parametrize("garbage", GARBAGE + RANDOM_GARBAGE)
async def test_garbage_instead_of_a_preface(harness: Harness, garbage: bytes) -> None:
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port, handshake=False)
        try:
            await raw.send(garbage)
            if garbage and not PREFACE.startswith(garbage):
                assert await raw.closed_by_server(), "the server kept a connection that did not speak HTTP/2"
        finally:
            raw.close()


TRUNCATED = {
    "frame header cut short": PREFACE + frame(SETTINGS, 0, 0, b"")[:4],
    "settings payload cut short": PREFACE + frame(SETTINGS, 0, 0, b"\x00\x03\x00", length=18),
    "headers payload cut short": PREFACE
    + frame(SETTINGS, 0, 0, b"")
    + frame(HEADERS, END_HEADERS, 1, b"\x83\x86", length=200),
    "oversized frame": PREFACE + frame(SETTINGS, 0, 0, b"") + frame(DATA, 0, 1, b"x" * 100, length=16 * MIB),
    "data on stream 0": PREFACE + frame(SETTINGS, 0, 0, b"") + frame(DATA, 0, 0, b"xyz"),
    "bad hpack": PREFACE + frame(SETTINGS, 0, 0, b"") + frame(HEADERS, END_HEADERS, 1, b"\xff" * 20),
    "settings of odd size": PREFACE + frame(SETTINGS, 0, 0, b"\x00\x04\x00"),
    "window size overflow": PREFACE + frame(SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"),
    "zero window update": PREFACE + frame(SETTINGS, 0, 0, b"") + frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),
    "goaway": PREFACE + frame(SETTINGS, 0, 0, b"") + frame(GOAWAY, 0, 0, b"\x00" * 8),
}


@pytest.mark.parametrize("data", list(TRUNCATED.values()), ids=list(TRUNCATED))
async def test_preface_then_a_broken_frame_then_gone(harness: Harness, data: bytes) -> None:
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port, handshake=False)
        await raw.send(data)
        await raw.closed_by_server(timeout=0.2)  # some of these the server answers with GOAWAY; all: then we leave
        raw.close()


def _create_request() -> bytes:
    return bytes(CreateOrderRequest(items=[OrderItem(product_name="Raw", quantity=1, price=1.0)]))


async def test_headers_then_the_connection_drops_mid_data(harness: Harness) -> None:
    async with other_clients(harness):
        for cut in (0, 3, 5, 9, len(grpc_message(_create_request())) - 1):
            raw = await RawH2.open(harness.server.port)
            stream_id = raw.start("CreateOrder")
            await raw.flush()
            body = grpc_message(_create_request())
            # a DATA frame announcing the whole message, but only ``cut`` bytes of it, then the socket closes
            await raw.send(frame(DATA, END_STREAM, stream_id, body[:cut], length=len(body)))
            raw.close()
        # and a stream that is open when its connection goes, on a method that streams
        raw = await RawH2.open(harness.server.port)
        raw.start("OrderStatusStream")
        raw.conn.send_data(1, grpc_message(b""), end_stream=True)
        await raw.flush()
        for _ in range(1000):
            if harness.server.stream_limits.open:
                break
            await asyncio.sleep(0.005)
        raw.close()


async def test_a_2_gib_message_announced_then_the_connection_closes(harness: Harness) -> None:
    async with other_clients(harness):
        for method in ("CreateOrder", "OrderStatusStream"):
            raw = await RawH2.open(harness.server.port)
            stream_id = raw.start(method)
            raw.conn.send_data(stream_id, struct.pack(">?I", False, 2**31))
            await raw.flush()
            raw.close()
        # the same, staying to hear the answer
        raw = await RawH2.open(harness.server.port)
        stream_id = raw.start("CreateOrder")
        raw.conn.send_data(stream_id, struct.pack(">?I", False, 2**31) + b"x" * 1000)
        await raw.flush()
        answer = await raw.response(stream_id)
        raw.close()
        assert answer.get("grpc-status") == str(Status.RESOURCE_EXHAUSTED.value), answer
        assert "2,147,483,648 bytes" in answer.get("grpc-message", ""), answer


STREAM_BODIES = {
    "no message": ([], "INVALID_ARGUMENT"),
    "prefix cut short": ([b"\x00\x00"], "INVALID_ARGUMENT"),
    "message cut short": ([grpc_message(b"\x0a\x03abc")[:-2]], "INVALID_ARGUMENT"),
    "compressed flag, no grpc-encoding": ([grpc_message(b"", compressed=True)], "INVALID_ARGUMENT"),
    "compressed flag 2, no grpc-encoding": ([b"\x02" + struct.pack(">I", 0)], "INVALID_ARGUMENT"),
    "prefix in 1-byte frames": ([bytes([b]) for b in grpc_message(b"")], "OK"),
    "message in 1-byte frames": ([bytes([b]) for b in grpc_message(b"\x18\x01\x08\x05")], "OK"),
    "two messages to a unary method": ([grpc_message(b""), grpc_message(b"\x08\x05")], "INVALID_ARGUMENT"),
    "a message and a stray byte": ([grpc_message(b"\x08\x05"), b"\x00"], "INVALID_ARGUMENT"),
    "two messages in one frame": ([grpc_message(b"") + grpc_message(b"")], "INVALID_ARGUMENT"),
    "empty data frames": ([b"", b"", grpc_message(b""), b""], "OK"),
    "empty data frames inside a message": ([b"\x00\x00", b"", b"\x00\x00\x02", b"", b"\x08\x05", b""], "OK"),
    "only empty data frames": ([b"", b"", b""], "INVALID_ARGUMENT"),
    "message then empty data frames": ([grpc_message(b"\x08\x05"), b"", b""], "OK"),
}
CODES_BY_NUMBER = {str(s.value): s.name for s in Status}


@pytest.mark.parametrize(("chunks", "expected"), list(STREAM_BODIES.values()), ids=list(STREAM_BODIES))
async def test_odd_request_streams(harness: Harness, chunks: list[bytes], expected: str) -> None:
    """Framing grpclib itself turned into INTERNAL (an AssertionError, a NotImplementedError) or passed on as None."""
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port)
        try:
            stream_id = raw.start("ListOrders", end=not chunks)
            for i, chunk in enumerate(chunks):
                raw.conn.send_data(stream_id, chunk, end_stream=i == len(chunks) - 1)
                await raw.flush()
            answer = await raw.response(stream_id)
        finally:
            raw.close()
        assert CODES_BY_NUMBER.get(answer.get("grpc-status", "")) == expected, answer


PAGE_OF_5 = b"\x08\x05"  # ListOrdersRequest(page_size=5)
NEGATIVE_PAGE = b"\x08" + b"\xff" * 9 + b"\x01"  # ListOrdersRequest(page_size=-1)
COMPRESSED_BODIES = {  # grpc-encoding, the message (flagged compressed), the status and what its message says
    "gzip": ("gzip", gzip.compress(PAGE_OF_5), "OK", ""),
    "deflate": ("deflate", zlib.compress(PAGE_OF_5), "OK", ""),
    "gzip of nothing": ("gzip", gzip.compress(b""), "OK", ""),
    "gzip of an invalid request": ("gzip", gzip.compress(NEGATIVE_PAGE), "INVALID_ARGUMENT", "page_size"),
    "deflate of an invalid request": ("deflate", zlib.compress(NEGATIVE_PAGE), "INVALID_ARGUMENT", "page_size"),
    "identity": ("identity", PAGE_OF_5, "INVALID_ARGUMENT", "grpc-encoding is identity"),
    "snappy": ("snappy", PAGE_OF_5, "UNIMPLEMENTED", "'snappy' are not supported; use one of: identity, gzip"),
    "not gzip": ("gzip", PAGE_OF_5, "INVALID_ARGUMENT", "not valid gzip data"),
    "gzip cut short": ("gzip", gzip.compress(PAGE_OF_5)[:-3], "INVALID_ARGUMENT", "not valid gzip data"),
    "bytes after the gzip": ("gzip", gzip.compress(PAGE_OF_5) + PAGE_OF_5, "INVALID_ARGUMENT", "not valid gzip"),
    "gzip inflating past 4 MiB": (
        "gzip",
        gzip.compress(b"\x00" * (5 << 20)),
        "RESOURCE_EXHAUSTED",
        "inflates to more than 4,194,304 bytes",
    ),
}


@pytest.mark.parametrize(
    ("encoding", "body", "expected", "says"), list(COMPRESSED_BODIES.values()), ids=list(COMPRESSED_BODIES)
)
async def test_compressed_request_messages(
    harness: Harness, encoding: str, body: bytes, expected: str, says: str
) -> None:
    """gzip and deflate (what gRPC clients send when told to compress) are inflated, within the size limit."""
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port)
        try:
            stream_id = raw.start("ListOrders", extra_headers=[("grpc-encoding", encoding)])
            raw.conn.send_data(stream_id, grpc_message(body, compressed=True), end_stream=True)
            await raw.flush()
            answer = await raw.response(stream_id)
        finally:
            raw.close()
        assert CODES_BY_NUMBER.get(answer.get("grpc-status", "")) == expected, answer
        assert says in answer.get("grpc-message", ""), answer


NOT_GRPC = {  # what grpclib answers before any of our code runs: HTTP errors, or UNIMPLEMENTED for a wrong path
    "GET": ([(":method", "GET")], "405"),
    "no content-type": ([("content-type", None)], "415"),
    "json content-type": ([("content-type", "application/json")], "415"),
    "no te": ([("te", None)], "400"),
    "unknown method": ([(":path", "/orders.v1.OrderService/DropTables")], "UNIMPLEMENTED"),
    "unknown service": ([(":path", "/x/y")], "UNIMPLEMENTED"),
    "huge metadata": ([("x-pad", "v" * 8000)] * 6, "OK"),
    "bad timeout": ([("grpc-timeout", "soon")], "UNKNOWN"),  # grpclib's answer: see the module docstring
    "expired timeout": ([("grpc-timeout", "0n")], "DEADLINE_EXCEEDED"),  # grpclib: UNKNOWN, see _grpclib_fixes
}


@pytest.mark.parametrize(("changes", "expected"), list(NOT_GRPC.values()), ids=list(NOT_GRPC))
async def test_requests_that_are_not_grpc(
    harness: Harness, changes: list[tuple[str, str | None]], expected: str
) -> None:
    headers = {
        ":method": "POST",
        ":scheme": "http",
        ":path": SERVICE + "ListOrders",
        ":authority": "orders",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    extra = []
    for name, value in changes:
        if value is None:
            del headers[name]
        elif name in headers:
            headers[name] = value
        else:
            extra.append((name, value))
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port)
        try:
            stream_id = raw.start("", headers=[*headers.items(), *extra])
            raw.conn.send_data(stream_id, grpc_message(b""), end_stream=True)
            await raw.flush()
            answer = await raw.response(stream_id)
        finally:
            raw.close()
        status = answer.get(":status")
        assert (status if status != "200" else CODES_BY_NUMBER.get(answer.get("grpc-status", ""))) == expected, answer


async def test_floods(harness: Harness) -> None:
    """Rapid reset (CVE-2023-44487), a CONTINUATION flood, a PING flood, and a SETTINGS flood."""
    from hpack import Encoder

    async with other_clients(harness):
        # rapid reset: 1,000 streams opened and reset at once, half of them watchers
        raw = await RawH2.open(harness.server.port)
        for i in range(1000):
            stream_id = raw.start("OrderStatusStream" if i % 2 else "ListOrders")
            raw.conn.reset_stream(stream_id)
        await raw.flush()
        await raw.closed_by_server(timeout=0.5)
        raw.close()
        await harness.no_open_streams(besides=1)  # the watcher of other_clients
        # CONTINUATION flood: a header block that never ends (h2 allows 64 frames, then ends the connection)
        raw = await RawH2.open(harness.server.port)
        encoder = Encoder()
        block = encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + "GetOrder"), (":authority", "x")]
        )
        await raw.send(frame(HEADERS, 0, 1, block))
        for i in range(200):
            await raw.send(frame(CONTINUATION, 0, 1, encoder.encode([(f"x-{i}", "v" * 16000)])))
            if raw.writer.is_closing():
                break
        assert await raw.closed_by_server(), "the server kept reading an endless header block"
        raw.close()
        # PING and SETTINGS floods
        raw = await RawH2.open(harness.server.port)
        for i in range(2000):
            raw.conn.ping(struct.pack(">Q", i))
            raw.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100 + i % 7})
        await raw.flush()
        await raw.closed_by_server(timeout=0.5)
        raw.close()


async def test_unknown_frame_types_are_ignored(harness: Harness) -> None:
    async with other_clients(harness):
        raw = await RawH2.open(harness.server.port)
        try:
            await raw.send(frame(0x10, 0, 0, b"\x00\x00\x00\x01u=1"))  # PRIORITY_UPDATE
            await raw.send(frame(0xEE, 0xFF, 7, b"?" * 50))
            stream_id = raw.start("ListOrders")
            raw.conn.send_data(stream_id, grpc_message(b"\x08\x01"), end_stream=True)
            await raw.flush()
            answer = await raw.response(stream_id)
        finally:
            raw.close()
        assert answer.get("grpc-status") == "0", answer
