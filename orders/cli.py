"""The ``orders`` command line: run the server, try every RPC, or call one.

    orders serve --port 50051
    orders demo
    orders create --item "Laptop:1:1000.00" --item "Mouse:2:25.00"
    orders get ID
    orders list --status pending --limit 10
    orders update ID confirmed --expected-version 1
    orders cancel ID
    orders watch [ID ...] --after-sequence 0

Client commands talk to ``--target`` (default ``$ORDERS_TARGET``, else ``localhost:50051``; a comma-separated
list of replicas fails over from one to the next), with
``--token`` (``$ORDERS_TOKEN``) as bearer token and over TLS with ``--ca-file`` (``$ORDERS_CA_FILE``) or
``--tls`` (system trust store), and print a readable rendering, or with ``--json`` one JSON object per
line (the protobuf JSON mapping). Errors from the server print ``error: CODE: message`` on stderr and exit 1;
usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress

import betterproto2

from orders._proto.orders.v1 import Order, OrderStatus, StatusUpdate
from orders.auth import SecurityConfigError, check_token, client_ssl_context
from orders.client import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_TARGET, Item, OrderClient, parse_targets
from orders.config import ServerConfig, add_server_arguments, config_from_args
from orders.errors import OrderError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STATUS_PREFIX = "ORDER_STATUS_"
STATUS_CHOICES = [s.name.lower() for s in OrderStatus if s is not OrderStatus.UNSPECIFIED]

Handler = Callable[[OrderClient, argparse.Namespace, "Output"], Awaitable[None]]


# --- argument types ---------------------------------------------------------------------------------


def item_arg(text: str) -> Item:
    """Parse ``NAME:QUANTITY:PRICE`` (the name may itself contain colons) into an :class:`Item`."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"item must look like NAME:QUANTITY:PRICE (e.g. Laptop:1:1000.00), got {text!r}"
        )
    name, quantity, price = parts
    try:
        item = Item(name, int(quantity), float(price))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"item {text!r} must be NAME:QUANTITY:PRICE with a whole-number QUANTITY and a numeric PRICE"
            " (e.g. Laptop:1:1000.00)"
        ) from None
    if abs(item.quantity) > INT32_MAX:
        raise argparse.ArgumentTypeError(f"item {text!r}: QUANTITY must be at most {INT32_MAX:,}")
    return item


def status_arg(text: str) -> OrderStatus:
    """Parse a status name, case-insensitive, with or without the ``ORDER_STATUS_`` prefix."""
    name = text.strip().upper().removeprefix(STATUS_PREFIX)
    if name.lower() not in STATUS_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown status {text!r}; choose from {', '.join(STATUS_CHOICES)}")
    return OrderStatus[name]


def target_arg(text: str) -> str:
    """Check that a target looks like ``host:port``, or is a comma-separated list of them (replicas)."""
    try:
        parse_targets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def ca_file_arg(text: str) -> str:
    """A PEM file of CA certificates that TLS can trust."""
    try:
        client_ssl_context(text)
    except SecurityConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def token_arg(text: str) -> str:
    """A bearer token that can be sent as metadata (the message never repeats it)."""
    try:
        return check_token(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1  # the largest values the wire's int32 and int64 fields carry


def non_negative_int(maximum: int) -> Callable[[str], int]:
    """A parser of whole numbers from 0 to ``maximum`` (the most its field on the wire can carry)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, got {text!r}") from None
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from 0 to {maximum:,}, got {value:,}")
        return value

    return parse


int32_arg, int64_arg = non_negative_int(INT32_MAX), non_negative_int(INT64_MAX)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number more than 0, got {text}")
    return value


# --- output -------------------------------------------------------------------------------------------


def short_id(order_id: str) -> str:
    """The last 8 hex digits of a UUID, enough to tell orders apart on screen. (Not the first: a server id
    starts with its creation time, which orders created within a minute share.)"""
    return order_id[-8:]


def format_time(moment: datetime.datetime | None) -> str:
    """A timestamp as ISO 8601 UTC to the millisecond, or ``-`` when unset."""
    if moment is None:
        return "-"
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_money(amount: float, currency: str) -> str:
    """An amount with two decimals and its currency code."""
    return f"{amount:.2f} {currency or 'USD'}"


def format_order_summary(order: Order) -> str:
    """One line: id, status, version, total, item count, creation time."""
    count = sum(item.quantity for item in order.items)
    return (
        f"{order.id}  {order.status.name:<9}  v{order.version}  {format_money(order.total_amount, order.currency_code)}"
        f"  {count} item{'s' if count != 1 else ''}  created {format_time(order.create_time)}"
    )


def format_order(order: Order) -> str:
    """Several lines: the summary, one line per item, and the last update time."""
    lines = [f"order {format_order_summary(order)}"]
    lines += [
        f"  {item.quantity} x {item.product_name} @ {format_money(item.price, order.currency_code)}"
        for item in order.items
    ]
    lines.append(f"  updated {format_time(order.update_time)}")
    return "\n".join(lines)


def format_update(update: StatusUpdate, *, short: bool = False) -> str:
    """One status change: ``seq=N ID PREVIOUS -> STATUS at TIME``; a creation shows ``(new)`` as previous."""
    previous = "(new)" if update.previous_status is OrderStatus.UNSPECIFIED else update.previous_status.name
    order_id = short_id(update.order_id) if short else update.order_id
    return f"seq={update.sequence} {order_id} {previous} -> {update.status.name} at {format_time(update.timestamp)}"


class OutputFailed(Exception):
    """The results could not be written to standard output."""


class Output:
    """Prints results for people or, with ``json=True``, one protobuf-JSON object per line."""

    def __init__(self, *, as_json: bool = False) -> None:
        self.as_json = as_json

    def _emit(self, message: betterproto2.Message, text: str) -> None:
        say(json.dumps(message.to_dict(include_default_values=True)) if self.as_json else text)

    def order(self, order: Order) -> None:
        """Print an order in full."""
        self._emit(order, format_order(order))

    def order_line(self, order: Order) -> None:
        """Print an order as one line (used by ``list``)."""
        self._emit(order, format_order_summary(order))

    def update(self, update: StatusUpdate) -> None:
        """Print one status update, or a heartbeat (no order id)."""
        self._emit(update, format_update(update) if update.order_id else f"seq={update.sequence} heartbeat")


def say(line: str) -> None:
    """Print a line of a command's output at once; OutputFailed if it cannot be written (a full disk). A
    reader gone away (``| head -1``) is BrokenPipeError, which ends the command quietly."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputFailed(str(exc)) from exc


def print_error(error: OrderError) -> None:
    """Report a server or connection error the way every command does."""
    print(f"error: {error.code}: {error.message}", file=sys.stderr, flush=True)


# --- client commands -----------------------------------------------------------------------------------


async def cmd_create(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """Create an order from ``--item`` flags."""
    order = await client.create(
        args.items, total_amount=args.total, currency_code=args.currency, request_id=args.request_id
    )
    out.order(order)


async def cmd_get(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """Show one order."""
    out.order(await client.get(args.id))


async def cmd_update(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """Change an order's status."""
    out.order(await client.update_status(args.id, args.status, expected_version=args.expected_version))


async def cmd_cancel(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """Cancel an order."""
    out.order(await client.cancel(args.id, expected_version=args.expected_version))


async def cmd_list(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """List orders oldest first, fetching pages lazily, up to ``--limit``."""
    if args.limit == 0:
        return
    shown = 0
    async with contextlib.aclosing(client.list(statuses=args.status or (), page_size=args.page_size)) as orders:
        async for order in orders:
            out.order_line(order)
            shown += 1
            if shown == args.limit:  # before fetching another page
                return


async def cmd_watch(client: OrderClient, args: argparse.Namespace, out: Output) -> None:
    """Print status updates as they arrive, until ``--count`` of them or Ctrl-C."""
    if args.count == 0:
        return
    seen = 0
    updates = client.watch(
        args.ids,
        after_sequence=args.after_sequence,
        heartbeat_seconds=args.heartbeat,
        heartbeats=args.heartbeats,
        reconnect=args.reconnect,
        give_up_after=args.timeout,
    )
    async for update in updates:
        out.update(update)
        if not update.order_id:  # a heartbeat
            continue
        seen += 1
        if seen == args.count:
            break


async def run_client_command(handler: Handler, args: argparse.Namespace) -> None:
    """Connect to ``--target`` and run one command's handler."""
    async with connect(args.target, args) as client:
        await handler(client, args, Output(as_json=args.json))


def connect(target: str, args: argparse.Namespace) -> OrderClient:
    """An OrderClient for ``target`` with the command's ``--timeout`` and security options."""
    return OrderClient(target, timeout=args.timeout, token=args.token, ca_file=args.ca_file, tls=args.tls)


# --- demo ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def demo_target(target: str | None, token: str | None = None) -> AsyncIterator[str]:
    """Yield ``target``, or start an embedded server on a temporary database and yield its address.

    The embedded server serves plaintext; it requires ``token`` when one is given.
    """
    if target is not None:
        yield target
        return
    from orders.server import OrderServer  # imported on use: the client commands start faster without it

    with tempfile.TemporaryDirectory(prefix="orders-demo-") as tmpdir:
        config = ServerConfig(port=0, db=f"sqlite:///{tmpdir}/orders.db", grace=1.0, token=token)
        async with OrderServer(config) as embedded:
            say(f"Started an embedded server on port {embedded.port} (database {config.db})")
            yield f"127.0.0.1:{embedded.port}"


class DemoFailed(Exception):
    """The server did not behave as the demo expects."""


class DemoWatch:
    """A background live watch that prints each update as it arrives and lets the demo wait for it."""

    def __init__(self, client: OrderClient, order_ids: list[str]) -> None:
        self.seen = 0
        self.live_from: int | None = None  # the sequence of the first heartbeat
        self._changes = 0  # made by the demo so far, each to be echoed by one update
        self._progress = asyncio.Event()
        self._task = asyncio.create_task(self._run(client, order_ids))

    async def _run(self, client: OrderClient, order_ids: list[str]) -> None:
        # Live only, with a heartbeat after each quiet second: the first one says that the server has
        # registered the watch, and the demo changes the orders only then, so no change can slip past.
        # (A replay from sequence 0 would fail on a server whose log retention has pruned it.)
        async for update in client.watch(order_ids, heartbeat_seconds=1, heartbeats=True):
            if not update.order_id:
                if self.live_from is None:
                    self.live_from = update.sequence
                    say(f"  [watch] live: the server's event log is at sequence {update.sequence}")
            else:
                say(f"  [watch] {format_update(update, short=True)}")
                self.seen += 1
            self._progress.set()

    async def wait_until_live(self, timeout: float = 5.0) -> None:
        """Wait for the first heartbeat; raise if the watch fails or stalls."""
        await self._wait(lambda: self.live_from is not None, timeout, "the watch did not start")

    async def wait_for_echo(self, timeout: float = 5.0) -> None:
        """Wait for the update of the change the demo just made (it may have come before the change's reply);
        raise if the watch fails or stalls."""
        self._changes += 1
        count = self._changes
        await self._wait(lambda: self.seen >= count, timeout, f"the watch did not print {count} updates")

    async def _wait(self, done: Callable[[], bool], timeout: float, failure: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if self._task.done():
                self._task.result()  # raises the watch's own error, if it had one
                raise DemoFailed("the watch ended unexpectedly")
            self._progress.clear()
            progress = asyncio.ensure_future(self._progress.wait())
            finished, _ = await asyncio.wait(
                {progress, self._task}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            progress.cancel()
            if not finished:
                raise DemoFailed(f"{failure} within {timeout:g}s")

    async def stop(self) -> None:
        """Cancel the watch task and wait for it to finish."""
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


def step(title: str) -> None:
    """Narrate the next demo step."""
    say(f"\n== {title}")


async def expect_error(call: Awaitable[object]) -> None:
    """Run a call that the server must refuse, and show the refusal."""
    try:
        await call
    except OrderError as error:
        say(f"  refused as expected: {error.code}: {error.message}")
    else:
        raise DemoFailed("the server accepted a request it should have refused")


async def run_demo(client: OrderClient) -> None:
    """Exercise every RPC with narration: create, get, list, update, cancel, idempotency and a live watch."""
    out = Output()
    step("CreateOrder: three orders")
    laptop_key = str(uuid.uuid4())
    laptop_items = [Item("Laptop", 1, 1000.00), Item("Mouse", 2, 25.00)]
    laptop = await client.create(laptop_items, request_id=laptop_key)
    keyboard = await client.create([Item("Keyboard", 1, 79.90)], currency_code="EUR")
    monitor = await client.create([Item("Monitor: 27-inch", 2, 249.50)], total_amount=499.00)
    for order in (laptop, keyboard, monitor):
        out.order(order)
    ids = [laptop.id, keyboard.id, monitor.id]

    step("GetOrder")
    out.order(await client.get(laptop.id))

    step("ListOrders: pages of 2, oldest first")
    token = ""
    for number in (1, 2):  # two pages at most, so a busy --target server does not flood the screen
        page = await client.list_page(page_size=2, page_token=token)
        count = f"{len(page.orders)} order{'' if len(page.orders) == 1 else 's'}"
        say(f"  page {number}: {count}, more pages: {'yes' if page.next_page_token else 'no'}")
        for order in page.orders:
            say(f"    {format_order_summary(order)}")
        token = page.next_page_token
        if not token:
            break

    step("OrderStatusStream: watching the three orders live")
    watch = DemoWatch(client, ids)
    try:
        await watch.wait_until_live()
        await run_status_changes(client, watch, laptop, keyboard, monitor)

        step("CreateOrder again with the same request_id: the original order, not a new one")
        retried = await client.create(laptop_items, request_id=laptop_key)
        same = retried.id == laptop.id
        say(f"  returned order {retried.id} (same as the first: {same}), status {retried.status.name}")
        say("  the same request_id with different items:")
        await expect_error(client.create([Item("Laptop", 2, 1000.00)], request_id=laptop_key))

        step("ListOrders with a status filter (auto-paging)")
        async for order in client.list(statuses=[OrderStatus.DELIVERED, OrderStatus.CANCELLED], page_size=2):
            if order.id in ids:
                say(f"    {format_order_summary(order)}")
    finally:
        await watch.stop()
    say(f"\nDemo finished: the watch printed {watch.seen} status updates as they happened.")


async def run_status_changes(
    client: OrderClient, watch: DemoWatch, laptop: Order, keyboard: Order, monitor: Order
) -> None:
    """The UpdateOrderStatus / CancelOrder part of the demo, each change echoed by the watch."""
    step("UpdateOrderStatus: the laptop order goes CONFIRMED -> SHIPPED -> DELIVERED")
    for status in (OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED):
        order = await client.update_status(laptop.id, status, expected_version=laptop.version)
        laptop = order
        say(f"  {short_id(order.id)} is now {order.status.name} (version {order.version})")
        await watch.wait_for_echo()

    step("UpdateOrderStatus: an illegal transition (PENDING -> DELIVERED)")
    await expect_error(client.update_status(keyboard.id, OrderStatus.DELIVERED))

    step("UpdateOrderStatus: a stale expected_version")
    await expect_error(client.update_status(monitor.id, OrderStatus.CONFIRMED, expected_version=monitor.version + 1))

    step("CancelOrder: the keyboard order")
    cancelled = await client.cancel(keyboard.id)
    say(f"  {short_id(cancelled.id)} is now {cancelled.status.name} (version {cancelled.version})")
    await watch.wait_for_echo()


async def demo(args: argparse.Namespace) -> None:
    """``orders demo``: run the demo against ``--target`` or an embedded server."""
    async with demo_target(args.target, args.token) as target, connect(target, args) as client:
        await run_demo(client)


def embedded_plaintext(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``args`` for the demo: without ``--target`` its embedded server serves plaintext, so ``--ca-file`` and
    ``--tls`` are usage errors, and ``ORDERS_CA_FILE`` (meant for remote servers) is left aside unread; with
    ``--target``, ``ORDERS_CA_FILE`` counts as for every client command."""
    if args.target is None:
        if args.tls or args.ca_file:
            parser.error("--ca-file and --tls need --target: the embedded server serves plaintext")
    elif args.ca_file is None and (from_environment := os.environ.get("ORDERS_CA_FILE")):
        try:
            args.ca_file = ca_file_arg(from_environment)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --ca-file: {exc}")
    return args


# --- serve ---------------------------------------------------------------------------------------------


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``orders serve``: exactly ``python -m orders.server``."""
    from orders.server import run  # imported on use, as in demo

    run(config_from_args(args, parser))


# --- parser and entry point ------------------------------------------------------------------------


def client_options() -> argparse.ArgumentParser:
    """The flags every client command shares."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--target",
        type=target_arg,
        default=os.environ.get("ORDERS_TARGET") or DEFAULT_TARGET,  # empty is unset, as for ORDERS_TOKEN
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server address, or comma-separated replicas to fail over between (ORDERS_TARGET; default %(default)s)",
    )
    parent.add_argument("--json", action="store_true", help="print one JSON object per line")
    parent.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds per call; watch gives up after reconnecting fails for this long (default %(default)s)",
    )
    add_security_options(parent)
    return parent


def add_security_options(parser: argparse.ArgumentParser, *, ca_file_from_environment: bool = True) -> None:
    """``--token``, ``--ca-file`` and ``--tls``, with their environment twins (``ORDERS_CA_FILE`` only if
    ``ca_file_from_environment``)."""
    # argparse runs ``type`` on a string default too, so a bad ORDERS_* value is a usage error like a bad flag.
    parser.add_argument(
        "--token",
        type=token_arg,
        default=os.environ.get("ORDERS_TOKEN") or None,
        help="bearer token sent with every call (ORDERS_TOKEN; prefer the variable: flags show up in ps)",
    )
    parser.add_argument(
        "--ca-file",
        type=ca_file_arg,
        default=(os.environ.get("ORDERS_CA_FILE") or None) if ca_file_from_environment else None,
        metavar="PEM",
        help="use TLS and trust the server's certificate if this CA signed it (ORDERS_CA_FILE)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, verifying the server against the system trust store"
    )


EXPECTED_VERSION_HELP = "apply only if the order is at this version (default 0: any version)"


def build_parser() -> argparse.ArgumentParser:
    """The whole ``orders`` command line."""
    parser = argparse.ArgumentParser(prog="orders", description="The orders gRPC service: server, demo and client.")
    parser.add_argument("--version", action="version", version=f"orders {importlib.metadata.version('orders')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = client_options()

    def client_command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    commands.add_parser("bench", help="run the benchmark (see python -m bench --help)", add_help=False)
    serve_parser = commands.add_parser("serve", help="run the server", description="Run the orders gRPC server.")
    add_server_arguments(serve_parser)
    serve_parser.set_defaults(run=lambda args: serve(args, serve_parser))

    demo_parser = commands.add_parser(
        "demo",
        help="exercise every RPC with narration",
        description="Exercise every RPC, including a live watch, against --target or an embedded server.",
    )
    demo_parser.add_argument(
        "--target",
        type=target_arg,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server address, or comma-separated replicas (default: start an embedded server)",
    )
    demo_parser.add_argument(
        "--timeout", type=positive_float, default=10.0, help="seconds per call (default %(default)s)"
    )
    add_security_options(demo_parser, ca_file_from_environment=False)  # see embedded_plaintext
    demo_parser.set_defaults(run=lambda args: asyncio.run(demo(embedded_plaintext(args, demo_parser))))

    create = client_command("create", cmd_create, "create an order")
    create.add_argument(
        "--item",
        dest="items",
        type=item_arg,
        action="append",
        required=True,
        metavar="NAME:QUANTITY:PRICE",
        help="an item, e.g. Laptop:1:1000.00 (repeat for more items)",
    )
    create.add_argument("--currency", default="", help="ISO 4217 code (default USD)")
    create.add_argument(
        "--total", type=float, default=0.0, help="expected total; the server checks it (default: computed)"
    )
    create.add_argument("--request-id", help="idempotency key: retrying with it returns the same order")

    client_command("get", cmd_get, "show an order").add_argument("id", help="order id")

    update = client_command("update", cmd_update, "change an order's status")
    update.add_argument("id", help="order id")
    update.add_argument("status", type=status_arg, metavar="STATUS", help=f"one of {', '.join(STATUS_CHOICES)}")
    update.add_argument("--expected-version", type=int64_arg, default=0, help=EXPECTED_VERSION_HELP)

    cancel = client_command("cancel", cmd_cancel, "cancel an order")
    cancel.add_argument("id", help="order id")
    cancel.add_argument("--expected-version", type=int64_arg, default=0, help=EXPECTED_VERSION_HELP)

    listing = client_command("list", cmd_list, "list orders, oldest first")
    listing.add_argument(
        "--status", type=status_arg, nargs="+", action="extend", metavar="STATUS", help="only these statuses"
    )
    listing.add_argument(
        "--page-size", type=int32_arg, default=0, help="orders per request (default: server's 50)"
    )
    listing.add_argument("--limit", type=int64_arg, help="stop after this many orders")

    watch = client_command("watch", cmd_watch, "print status updates as they happen")
    watch.add_argument("ids", nargs="*", metavar="ID", help="order ids to watch (default: all orders)")
    watch.add_argument("--after-sequence", type=int64_arg, help="first replay every update after this sequence")
    watch.add_argument(
        "--heartbeat",
        type=int32_arg,
        default=DEFAULT_HEARTBEAT_SECONDS,
        help="ask for a heartbeat every N idle seconds; none for 3 N s means the connection is lost (0: none;"
        " default %(default)s)",
    )
    watch.add_argument(
        "--show-heartbeats",
        dest="heartbeats",
        action="store_true",
        help="print heartbeats too (seq = how far the log has been read: a cursor to save for --after-sequence)",
    )
    watch.add_argument("--count", type=int64_arg, help="exit after this many updates (heartbeats not counted)")
    watch.add_argument(
        "--no-reconnect", dest="reconnect", action="store_false", help="exit with an error when the stream drops"
    )
    for command_parser in commands.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments and turn every expected failure into an exit code."""
    try:
        if hasattr(args, "handler"):
            asyncio.run(run_client_command(args.handler, args))
        else:
            args.run(args)
    except OrderError as error:
        print_error(error)
        return EXIT_ERROR
    except DemoFailed as failure:
        print(f"error: demo: {failure}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except OutputFailed as failure:
        print(f"error: cannot write the output: {failure}", file=sys.stderr, flush=True)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nor at exit, where Python flushes it again)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `orders watch | head -1`); silence the final flush at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``orders`` console script and ``python -m orders``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # the benchmark has its own command line (python -m bench)
        from bench import main as bench_main

        sys.exit(bench_main(args[1:], prog="orders bench"))
    parsed, unknown = build_parser().parse_known_args(args)
    if unknown:
        # Positionals after an option (``watch ID --count 1 ID``), which the command's own parser takes
        # intermixed; or a mistake, then reported with the command's usage, not the top level's.
        command_args = args[args.index(parsed.command) + 1 :]
        parsed = parsed.command_parser.parse_intermixed_args(command_args, argparse.Namespace(command=parsed.command))
    sys.exit(run(parsed))


if __name__ == "__main__":
    main()
