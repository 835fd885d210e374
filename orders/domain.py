"""Pure business rules: statuses and transitions, money in minor units, and input validation.

Nothing here does I/O or knows about protobuf or SQL. Every check raises a member of
:mod:`orders.errors` with a message that tells the caller what to fix.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import math
import os
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from orders.errors import FailedPrecondition, InvalidArgument

MAX_ITEMS = 1_000
MAX_QUANTITY = 1_000_000
MAX_NAME_LENGTH = 200
MAX_PRICE_UNITS = 10**12
MAX_TOTAL_UNITS = 10**13
CENTS_PER_UNIT = 100
DEFAULT_CURRENCY = "USD"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1_000

_CURRENCY = re.compile(r"[A-Z]{3}")


class Status(enum.IntEnum):
    """An order's status; the numbers are the wire enum's."""

    PENDING = 1
    CONFIRMED = 2
    SHIPPED = 3
    DELIVERED = 4
    CANCELLED = 5


ALLOWED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.CONFIRMED, Status.CANCELLED}),
    Status.CONFIRMED: frozenset({Status.SHIPPED, Status.CANCELLED}),
    Status.SHIPPED: frozenset({Status.DELIVERED, Status.CANCELLED}),
    Status.DELIVERED: frozenset(),
    Status.CANCELLED: frozenset(),
}


def is_change(current: Status, target: Status) -> bool:
    """True if moving ``current`` to ``target`` is a real change; False for the same-status no-op.

    Raises FailedPrecondition when the state machine does not allow the change.
    """
    if current == target:
        return False
    if target not in ALLOWED_TRANSITIONS[current]:
        allowed = ", ".join(s.name for s in sorted(ALLOWED_TRANSITIONS[current])) or "none (terminal)"
        raise FailedPrecondition(
            f"cannot change an order from {current.name} to {target.name}; allowed from {current.name}: {allowed}"
        )
    return True


@dataclass(frozen=True, slots=True)
class NewItem:
    """A validated item of a create request."""

    product_name: str
    quantity: int
    price_cents: int


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A validated create request: what storage needs to write an order."""

    items: tuple[NewItem, ...]
    total_cents: int
    currency_code: str

    def fingerprint(self) -> str:
        """A stable hash of the normalised request, to tell idempotent retries from key reuse."""
        canonical = json.dumps(
            [[[i.product_name, i.quantity, i.price_cents] for i in self.items], self.total_cents, self.currency_code],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


# Stored records are named tuples: immutable like frozen dataclasses, but built five times faster (0.4 µs
# against 1.9 µs for an Order here), and a ListOrders page builds about 150 of them.


class Item(NamedTuple):
    """A stored order item."""

    id: str
    product_name: str
    quantity: int
    price_cents: int


class Order(NamedTuple):
    """A stored order. Times are microseconds since the Unix epoch (exact round trips)."""

    id: str
    items: tuple[Item, ...]
    total_cents: int
    currency_code: str
    status: Status
    version: int
    create_time_us: int
    update_time_us: int


class StatusEvent(NamedTuple):
    """One entry of the status event log. ``previous`` is None for a creation."""

    sequence: int
    order_id: str
    previous: Status | None
    status: Status
    time_us: int


class EventPage(NamedTuple):
    """Events read from the log, and the newest sequence that retention had deleted when they were read: if
    that is above the sequence they were read after, events after it were pruned before they could be read."""

    events: list[StatusEvent]
    # 0 when no events were read from the whole log: then none after the sequence had been deleted either,
    # since retention never deletes the newest event
    pruned_through: int


# --- money -------------------------------------------------------------------------------------


# What a whole number of cents may be off by on the wire: float noise, as a client's arithmetic leaves it
# (a sum of a thousand items' prices is off by ~1e-13 relative at worst), but never a real fraction of a
# cent: 1e-9 relative, as first agreed, took 500000.0004 for 500000.00. Two ULPs cover the rounding of
# `* 100` where a double cannot hold a hundredth of a cent (above 10^11 units).
FLOAT_NOISE = 1e-12  # relative
MAX_NOISE_CENTS = 0.01


def to_cents(amount: float, what: str) -> int:
    """Convert a wire amount in currency units to exact integer cents, or raise InvalidArgument."""
    if not math.isfinite(amount):
        raise InvalidArgument(f"{what} must be a finite number, got {amount!r}")
    if amount < 0:
        raise InvalidArgument(f"{what} must not be negative, got {amount!r}")
    scaled = amount * CENTS_PER_UNIT
    cents = round(scaled)
    tolerance = max(min(FLOAT_NOISE * max(1.0, scaled), MAX_NOISE_CENTS), 2 * math.ulp(scaled))
    if abs(scaled - cents) > tolerance:
        raise InvalidArgument(f"{what} must be a whole number of cents, got {amount!r}")
    return int(cents)


def to_units(cents: int) -> float:
    """Convert integer cents to the wire's currency units (exact for every allowed amount)."""
    return cents / CENTS_PER_UNIT


# --- validation of requests --------------------------------------------------------------------


_CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f"  # Unicode category Cc, exactly
_CONTROL_CHARACTER = re.compile(f"[{_CONTROL_CHARACTERS}]")
# Not in a name either: line and paragraph separators (categories Zl, Zp), which break the line a name is
# printed on, and the noncharacters, which Unicode reserves for a program's internal use.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_FORBIDDEN_IN_NAME = re.compile(f"[{_CONTROL_CHARACTERS}\u2028\u2029{_NONCHARACTERS}]")
_INVISIBLE = {"Cf", "Mn", "Me"}  # format characters and combining marks: nothing to see on their own


def validate_product_name(name: str, where: str) -> str:
    """Check a product name: 1-200 characters, something visible (not only whitespace, format characters
    or combining marks), no control characters, line breaks or noncharacters."""
    if not name or not name.strip():
        raise InvalidArgument(f"{where}.product_name must not be empty or only whitespace")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{where}.product_name is {len(name)} characters; at most {MAX_NAME_LENGTH} are allowed")
    if _FORBIDDEN_IN_NAME.search(name):
        raise InvalidArgument(
            f"{where}.product_name must not contain control characters, line or paragraph separators "
            "(U+2028, U+2029) or Unicode noncharacters"
        )
    if all(char.isspace() or unicodedata.category(char) in _INVISIBLE for char in name):
        raise InvalidArgument(
            f"{where}.product_name has nothing visible: only whitespace, format characters (such as U+200B) "
            "or combining marks"
        )
    return name


def validate_item(product_name: str, quantity: int, price: float, index: int) -> NewItem:
    """Validate one requested item; ``index`` names it in error messages."""
    where = f"items[{index}]"
    validate_product_name(product_name, where)
    if not 1 <= quantity <= MAX_QUANTITY:
        raise InvalidArgument(f"{where}.quantity must be between 1 and {MAX_QUANTITY:,}, got {quantity}")
    price_cents = to_cents(price, f"{where}.price")
    if price_cents > MAX_PRICE_UNITS * CENTS_PER_UNIT:
        raise InvalidArgument(f"{where}.price must be at most {MAX_PRICE_UNITS:,}, got {price!r}")
    return NewItem(product_name, quantity, price_cents)


def validate_currency(code: str) -> str:
    """Return the currency code (empty means USD) or raise InvalidArgument."""
    if not code:
        return DEFAULT_CURRENCY
    if not _CURRENCY.fullmatch(code):
        raise InvalidArgument(f"currency_code must be 3 uppercase letters (ISO 4217, e.g. USD), got {code!r}")
    return code


def validate_new_order(items: Sequence[tuple[str, int, float]], total_amount: float, currency_code: str) -> NewOrder:
    """Validate a create request given as (product_name, quantity, price) triples."""
    if not items:
        raise InvalidArgument("an order needs at least one item")
    if len(items) > MAX_ITEMS:
        raise InvalidArgument(f"an order may have at most {MAX_ITEMS:,} items, got {len(items):,}")
    new_items = tuple(validate_item(name, qty, price, i) for i, (name, qty, price) in enumerate(items))
    computed = sum(item.quantity * item.price_cents for item in new_items)
    if computed > MAX_TOTAL_UNITS * CENTS_PER_UNIT:
        raise InvalidArgument(f"the order total {to_units(computed):,.2f} exceeds the maximum of {MAX_TOTAL_UNITS:,}")
    if total_amount != 0 and to_cents(total_amount, "total_amount") != computed:
        raise InvalidArgument(
            f"total_amount {total_amount!r} does not match the sum of the items, {to_units(computed):.2f}; "
            "send 0 to let the server compute it"
        )
    return NewOrder(new_items, computed, validate_currency(currency_code))


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_order_id(value: str, what: str = "id") -> str:
    """Return the canonical form of a UUID order id or raise InvalidArgument."""
    if _CANONICAL_UUID.fullmatch(value):  # as the server hands ids out: already canonical
        return value
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what} must be a UUID, got {value[:64]!r}") from None


def parse_status(value: int, what: str = "status") -> Status:
    """Return the Status for a wire enum number; UNSPECIFIED (0) and unknown numbers are invalid."""
    try:
        return Status(value)
    except ValueError:
        allowed = ", ".join(s.name for s in Status)
        raise InvalidArgument(f"{what} must be one of {allowed}; got {int(value)}") from None


def parse_expected_version(value: int) -> int | None:
    """0 means "no check"; a negative version can never match."""
    if value < 0:
        raise InvalidArgument(f"expected_version must be 0 (no check) or a positive version, got {value}")
    return value or None


def new_id() -> str:
    """A fresh id: a version-7 UUID (RFC 9562) in canonical form, the current Unix time in milliseconds
    followed by 74 random bits. The server's order and item ids, and OrderClient's default request ids.

    Time-ordered ids keep the database's indexes on them (order ids in the order table and the event
    log, request ids in the idempotency keys) appending at their right edge, where random ids would dirty
    one more index page per order in every commit: a commit of eight creates wrote 41 pages to SQLite's
    WAL with version-4 order ids, 26 with these, and 19 once the request ids were time-ordered too. The
    random bits keep ids unguessable; the time they reveal is the order's create_time anyway.
    """
    return uuid7(time.time_ns() // 1_000_000, os.urandom(10))


def uuid7(unix_ms: int, random_bytes: bytes) -> str:
    """The version-7 UUID, in canonical form, of a Unix time in milliseconds and 10 random bytes."""
    raw = bytearray(unix_ms.to_bytes(6, "big") + random_bytes)
    raw[6] = raw[6] & 0x0F | 0x70  # version 7
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 9562 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- listing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ListOrders request: keyset position, page size and status filter."""

    statuses: frozenset[Status]
    page_size: int
    after_key: int


def _filter_tag(statuses: Iterable[Status]) -> list[int]:
    return sorted({int(s) for s in statuses})


def encode_page_token(statuses: frozenset[Status], last_key: int) -> str:
    """An opaque token naming the last key seen and the filter it belongs to."""
    raw = json.dumps({"k": last_key, "f": _filter_tag(statuses)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_list_query(page_size: int, page_token: str, statuses: Iterable[int]) -> ListQuery:
    """Validate ListOrders parameters; 0 means the default page size, too large is capped."""
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, got {page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    wanted = frozenset(parse_status(s, f"statuses[{i}]") for i, s in enumerate(statuses))
    after_key = 0
    if page_token:
        try:
            padded = page_token + "=" * (-len(page_token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
            after_key, tag = data["k"], data["f"]
            if type(after_key) is not int or not 0 <= after_key < 2**63 or not isinstance(tag, list):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error, RecursionError):
            raise InvalidArgument("page_token is malformed; pass the next_page_token of a previous page") from None
        if tag != _filter_tag(wanted):
            raise InvalidArgument("page_token belongs to a query with other statuses; keep the filter while paging")
    return ListQuery(wanted, size, after_key)


# --- watching ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchQuery:
    """A validated OrderStatusStream request."""

    order_ids: frozenset[str]
    after_sequence: int | None
    heartbeat_seconds: int


def parse_watch_query(order_ids: Iterable[str], after_sequence: int | None, heartbeat_seconds: int) -> WatchQuery:
    """Validate a stream request; the log bounds are checked later against the database."""
    ids = frozenset(parse_order_id(value, f"order_ids[{i}]") for i, value in enumerate(order_ids))
    if after_sequence is not None and after_sequence < 0:
        raise InvalidArgument(f"after_sequence must be 0 or more (or unset for live only), got {after_sequence}")
    if heartbeat_seconds < 0:
        raise InvalidArgument(f"heartbeat_seconds must be 0 (none) or positive, got {heartbeat_seconds}")
    return WatchQuery(ids, after_sequence, heartbeat_seconds)


MAX_REQUEST_ID_LENGTH = 128
IDEMPOTENCY_WINDOW_US = 24 * 3600 * 1_000_000


def parse_request_id(value: str) -> str | None:
    """An idempotency key: empty means none; at most 128 characters, none of them a control character
    (PostgreSQL's text cannot hold NUL)."""
    if len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"request_id may have at most {MAX_REQUEST_ID_LENGTH} characters, got {len(value)}")
    if _CONTROL_CHARACTER.search(value):
        raise InvalidArgument("request_id must not contain control characters (NUL, newlines, ...)")
    return value or None
