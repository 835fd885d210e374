"""A straightforward grpcio + sqlite3 implementation of OrderService, to measure ours against.

DESIGN.md asks for "≥ 3× the throughput of a straightforward grpcio + sqlite3 implementation of the
same contract". This is that implementation, written the way a careful team would write it without
trying to be fast:

* grpcio's synchronous server with a thread pool (``--threads``), the protobuf runtime's messages;
* one ``sqlite3`` connection per thread, WAL with ``synchronous=FULL`` (the orders server's
  durability), a busy timeout, and each call one transaction (``BEGIN IMMEDIATE`` for writes);
* the orders package's business rules (:mod:`orders.domain`: validation, transitions, page tokens),
  so both servers answer alike and the comparison is about everything else;
* the orders server's tables, so the bench's preloaded databases serve both. It never reads the
  ``encoded`` column and writes it empty.

It serves the unary calls; ``OrderStatusStream`` is UNIMPLEMENTED (the bench compares unary
throughput). ``python -m bench.reference --db FILE --port 0`` prints ``Server started on port N``.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench.api import upb
from orders import domain
from orders._proto.orders.v1 import (
    CancelOrderRequest,
    CancelOrderResponse,
    CreateOrderRequest,
    CreateOrderResponse,
    GetOrderRequest,
    GetOrderResponse,
    ListOrdersRequest,
    ListOrdersResponse,
    Order,
    UpdateOrderStatusRequest,
    UpdateOrderStatusResponse,
)
from orders.errors import Aborted, AlreadyExists, NotFound, OrderError

SERVICE = "orders.v1.OrderService"
BUSY_TIMEOUT_MS = 5_000
# The pool size that served it best here, of 1, 2, 4, 10 and 32 threads (list pages: 98 RPS with 32, 350 with
# 4; gets peaked at 4; creates and updates were level). More threads mostly fight over the GIL.
DEFAULT_THREADS = 4

SELECT_ORDERS = (
    'SELECT "key", id, status, total_cents, currency_code, version, create_time_us, update_time_us FROM "order"'
)
SELECT_ITEMS = "SELECT order_key, id, product_name, quantity, price_cents FROM order_item"
INSERT_IDEMPOTENCY_KEY = (
    "INSERT OR REPLACE INTO idempotency_key (key, fingerprint, order_id, created_us) VALUES (?, ?, ?, ?)"
)


OrderMessage = upb(Order)
CreateReply, GetReply, UpdateReply, CancelReply, ListReply = map(
    upb,
    (CreateOrderResponse, GetOrderResponse, UpdateOrderStatusResponse, CancelOrderResponse, ListOrdersResponse),
)


class ReferenceService:
    """The RPC handlers; each runs on a pool thread with that thread's own connection."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def create_order(self, request: Any) -> Any:
        new = domain.validate_new_order(
            [(item.product_name, item.quantity, item.price) for item in request.items],
            request.total_amount,
            request.currency_code,
        )
        request_id = domain.parse_request_id(request.request_id)

        def create(db: sqlite3.Connection) -> int:
            now = time.time_ns() // 1000
            if request_id is not None:
                row = db.execute(
                    "SELECT fingerprint, order_id, created_us FROM idempotency_key WHERE key = ?", (request_id,)
                ).fetchone()
                if row is not None and now - row[2] < domain.IDEMPOTENCY_WINDOW_US:
                    if row[0] != new.fingerprint():
                        raise AlreadyExists(f"request_id {request_id!r} was used for a different order")
                    return int(db.execute('SELECT "key" FROM "order" WHERE id = ?', (row[1],)).fetchone()[0])
            order_id = domain.new_id()
            key = db.execute(
                'INSERT INTO "order" (id, status, total_cents, currency_code, version, create_time_us, '
                "update_time_us, encoded) VALUES (?, ?, ?, ?, 1, ?, ?, x'')",
                (order_id, domain.Status.PENDING, new.total_cents, new.currency_code, now, now),
            ).lastrowid
            db.executemany(
                "INSERT INTO order_item (order_key, position, id, product_name, quantity, price_cents) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (key, n, domain.new_id(), item.product_name, item.quantity, item.price_cents)
                    for n, item in enumerate(new.items)
                ],
            )
            db.execute(
                "INSERT INTO status_event (order_id, previous, status, time_us) VALUES (?, NULL, ?, ?)",
                (order_id, domain.Status.PENDING, now),
            )
            if request_id is not None:
                db.execute(INSERT_IDEMPOTENCY_KEY, (request_id, new.fingerprint(), order_id, now))
            assert key is not None
            return key

        key = self._write(create)
        return CreateReply(order=self._orders('WHERE "key" = ?', (key,))[0][1])

    def get_order(self, request: Any) -> Any:
        order_id = domain.parse_order_id(request.id)
        return GetReply(order=self._order(order_id))

    def update_order_status(self, request: Any) -> Any:
        target = domain.parse_status(request.status)
        return UpdateReply(order=self._change_status(request.id, target, request.expected_version))

    def cancel_order(self, request: Any) -> Any:
        return CancelReply(order=self._change_status(request.id, domain.Status.CANCELLED, request.expected_version))

    def list_orders(self, request: Any) -> Any:
        query = domain.parse_list_query(request.page_size, request.page_token, request.statuses)
        where, params = 'WHERE "key" > ?', [query.after_key]
        if query.statuses:
            where += f" AND status IN ({', '.join('?' * len(query.statuses))})"
            params += sorted(query.statuses)
        rows = self._orders(f'{where} ORDER BY "key" LIMIT ?', (*params, query.page_size + 1))
        page = rows[: query.page_size]
        token = domain.encode_page_token(query.statuses, page[-1][0]) if len(rows) > len(page) else ""
        return ListReply(orders=[order for _, order in page], next_page_token=token)

    def _change_status(self, raw_id: str, target: domain.Status, expected_version: int) -> Any:
        order_id = domain.parse_order_id(raw_id)
        expected = domain.parse_expected_version(expected_version)

        def change(db: sqlite3.Connection) -> None:
            row = db.execute('SELECT status, version FROM "order" WHERE id = ?', (order_id,)).fetchone()
            if row is None:
                raise NotFound(f"no order with id {order_id}")
            status, version = domain.Status(row[0]), row[1]
            if expected is not None and expected != version:
                raise Aborted(f"order {order_id} is at version {version}, not {expected}; re-read it and retry")
            if not domain.is_change(status, target):
                return
            now = time.time_ns() // 1000
            db.execute(
                'UPDATE "order" SET status = ?, version = version + 1, update_time_us = ? WHERE id = ?',
                (target, now, order_id),
            )
            db.execute(
                "INSERT INTO status_event (order_id, previous, status, time_us) VALUES (?, ?, ?, ?)",
                (order_id, status, target, now),
            )

        self._write(change)
        return self._order(order_id)

    def _order(self, order_id: str) -> Any:
        orders = self._orders("WHERE id = ?", (order_id,))
        if not orders:
            raise NotFound(f"no order with id {order_id}")
        return orders[0][1]

    def _orders(self, where: str, params: Sequence[Any]) -> list[tuple[int, Any]]:
        """(key, message) of the orders ``where`` selects; their items come in one more query."""
        db = self._db()
        rows = db.execute(f"{SELECT_ORDERS} {where}", params).fetchall()
        items: dict[int, list[Sequence[Any]]] = {row[0]: [] for row in rows}
        if rows:
            marks = ", ".join("?" * len(rows))
            query = f"{SELECT_ITEMS} WHERE order_key IN ({marks}) ORDER BY order_key, position"
            for order_key, *item in db.execute(query, list(items)):
                items[order_key].append(item)
        return [(row[0], _order_message(row, items[row[0]])) for row in rows]


def _order_message(row: Sequence[Any], items: Iterable[Sequence[Any]]) -> Any:
    _, order_id, status, total_cents, currency, version, created_us, updated_us = row
    message = OrderMessage(
        id=order_id,
        total_amount=domain.to_units(total_cents),
        status=status,
        version=version,
        currency_code=currency,
    )
    for item_id, name, quantity, price_cents in items:
        message.items.add(id=item_id, product_name=name, quantity=quantity, price=domain.to_units(price_cents))
    message.create_time.FromMicroseconds(created_us)
    message.update_time.FromMicroseconds(updated_us)
    return message


def _handler(method: Callable[[Any], Any], request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(request)
        except OrderError as exc:
            context.abort(grpc.StatusCode[exc.code], exc.message)

    return grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=upb(request_type).FromString,
        response_serializer=upb(response_type).SerializeToString,
    )


def serve(path: str, host: str, port: int, threads: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    service = ReferenceService(path)
    handlers = {
        "CreateOrder": _handler(service.create_order, CreateOrderRequest, CreateOrderResponse),
        "GetOrder": _handler(service.get_order, GetOrderRequest, GetOrderResponse),
        "UpdateOrderStatus": _handler(service.update_order_status, UpdateOrderStatusRequest, UpdateOrderStatusResponse),
        "CancelOrder": _handler(service.cancel_order, CancelOrderRequest, CancelOrderResponse),
        "ListOrders": _handler(service.list_orders, ListOrdersRequest, ListOrdersResponse),
    }
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"Server started on port {bound}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(grace=5).wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m bench.reference``."""
    parser = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__)
    parser.add_argument("--db", required=True, help="the SQLite file (with the orders server's tables)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="the server's thread pool (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    serve(args.db, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
