"""Unit tests of the pure domain rules (orders.domain): no I/O, no server."""

from __future__ import annotations

import base64
import json
import math
import time
import uuid

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from orders import domain
from orders._proto.orders.v1 import OrderStatus
from orders.domain import Status
from orders.errors import FailedPrecondition, InvalidArgument
from orders.testing import product_names

P, C, S, D, X = Status.PENDING, Status.CONFIRMED, Status.SHIPPED, Status.DELIVERED, Status.CANCELLED

# The state machine exactly as DESIGN.md writes it, independent of domain.ALLOWED_TRANSITIONS.
DESIGN_ALLOWED = {(P, C), (P, X), (C, S), (C, X), (S, D), (S, X)}
ALL_PAIRS = [(a, b) for a in Status for b in Status]

pytestmark = pytest.mark.database_free


def token(payload: object) -> str:
    """A page token built by hand, the way a tampering client would."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- statuses and transitions ------------------------------------------------------------------


def test_domain_statuses_are_the_wire_enum_numbers() -> None:
    assert {s.name: int(s) for s in Status} == {
        s.name: int(s) for s in OrderStatus if s is not OrderStatus.UNSPECIFIED
    }


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=lambda s: s.name)
def test_transition_table(current: Status, target: Status) -> None:
    if current == target:
        assert domain.is_change(current, target) is False
    elif (current, target) in DESIGN_ALLOWED:
        assert domain.is_change(current, target) is True
    else:
        with pytest.raises(FailedPrecondition) as info:
            domain.is_change(current, target)
        message = info.value.message
        assert f"from {current.name} to {target.name}" in message
        assert info.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("terminal", [D, X], ids=lambda s: s.name)
def test_terminal_states_allow_nothing_but_the_no_op(terminal: Status) -> None:
    assert domain.ALLOWED_TRANSITIONS[terminal] == frozenset()
    assert domain.is_change(terminal, terminal) is False
    for target in Status:
        if target != terminal:
            with pytest.raises(FailedPrecondition, match="terminal"):
                domain.is_change(terminal, target)


def test_allowed_transitions_match_the_design() -> None:
    table = {(a, b) for a, targets in domain.ALLOWED_TRANSITIONS.items() for b in targets}
    assert table == DESIGN_ALLOWED


def test_cancel_is_reachable_from_every_non_terminal_state() -> None:
    for s in (P, C, S):
        assert domain.is_change(s, X) is True


# --- money -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "cents"),
    [
        (19.99, 1999),
        (0.1 + 0.2, 30),  # 0.30000000000000004: float noise, still a whole number of cents
        (0.0, 0),
        (-0.0, 0),
        (0.01, 1),
        (1.1 * 3, 330),  # 3.3000000000000003
        (1e12, 10**14),
        (999_999_999_999.99, 99_999_999_999_999),
    ],
)
def test_to_cents_accepts_whole_cents(amount: float, cents: int) -> None:
    result = domain.to_cents(amount, "price")
    assert result == cents
    assert type(result) is int


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [
        (0.001, "whole number of cents"),
        (19.999, "whole number of cents"),
        (0.005, "whole number of cents"),
        (123456789.123, "whole number of cents"),  # a third of a cent is not float noise, however large
        (500_000.0004, "whole number of cents"),  # nor 0.04 cent, 8e-10 of the amount
        (1_000_000.0004, "whole number of cents"),
        (100_000_000_000.0004, "whole number of cents"),
        (1e-11, "whole number of cents"),
        (999999999999.997, "whole number of cents"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-math.inf, "finite"),
        (-1.0, "negative"),
        (-0.01, "negative"),
        (-1e-300, "negative"),
    ],
)
def test_to_cents_rejects(amount: float, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.to_cents(amount, "items[2].price")
    assert fragment in info.value.message
    assert "items[2].price" in info.value.message
    assert repr(amount) in info.value.message


@given(st.integers(min_value=0, max_value=domain.MAX_TOTAL_UNITS * domain.CENTS_PER_UNIT))
def test_whole_cents_round_trip_exactly(cents: int) -> None:
    units = domain.to_units(cents)
    # the wire value is the double nearest to the decimal amount...
    assert units == float(f"{cents // 100}.{cents % 100:02d}")
    # ...and converts back to exactly the same cents
    assert domain.to_cents(units, "price") == cents


@given(
    st.lists(
        st.tuples(st.integers(1, 1000), st.integers(0, 10**6)),  # quantity, price in cents: totals to $10^10
        min_size=1,
        max_size=domain.MAX_ITEMS,
    )
)
def test_a_total_summed_in_floats_by_a_client_is_whole_cents(items: list[tuple[int, int]]) -> None:
    """The float noise a client's own arithmetic leaves in a total is not taken for a fraction of a cent."""
    total = 0.0
    for quantity, cents in items:
        total += quantity * domain.to_units(cents)
    assert domain.to_cents(total, "total_amount") == sum(quantity * cents for quantity, cents in items)


def test_to_units() -> None:
    assert domain.to_units(5997) == 59.97
    assert domain.to_units(0) == 0.0
    assert domain.to_units(10**15) == 1e13


# --- items and orders --------------------------------------------------------------------------


def test_max_price_accepted_and_above_rejected() -> None:
    assert domain.validate_item("x", 1, 1e12, 0).price_cents == 10**14
    with pytest.raises(InvalidArgument, match=r"items\[4\]\.price must be at most 1,000,000,000,000"):
        domain.validate_item("x", 1, 1e12 + 0.01, 4)
    with pytest.raises(InvalidArgument, match=r"items\[0\]\.price"):
        domain.validate_item("x", 1, 2e12, 0)


@pytest.mark.parametrize("quantity", [1, 2, 999_999, 1_000_000])
def test_quantity_in_bounds(quantity: int) -> None:
    assert domain.validate_item("x", quantity, 1.0, 0).quantity == quantity


@pytest.mark.parametrize("quantity", [0, -1, 1_000_001, -(2**31), 2**31 - 1])
def test_quantity_out_of_bounds(quantity: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.validate_item("x", quantity, 1.0, 7)
    assert "items[7].quantity" in info.value.message
    assert f"got {quantity}" in info.value.message
    assert "1,000,000" in info.value.message


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        (" ", "whitespace"),
        ("\t\n  ", "whitespace"),
        ("\u00a0\u2003", "whitespace"),  # non-breaking and em space
        ("a" * 201, "201 characters"),
        ("é" * 201, "201 characters"),
        ("nul\x00byte", "control characters"),
        ("two\nlines", "control characters"),
        ("tab\there", "control characters"),
        ("bell\x07", "control characters"),
        ("del\x7f", "control characters"),
        ("c1\x85", "control characters"),
        ("two\u2028lines", "line or paragraph separators"),
        ("paragraph\u2029", "line or paragraph separators"),
        ("non\ufffecharacter", "noncharacters"),
        ("plane 16 \U0010ffff", "noncharacters"),
        ("\u200b", "nothing visible"),  # zero-width space
        ("\u0301", "nothing visible"),  # a combining accent on nothing
        ("\u200b \u2060\u00ad", "nothing visible"),
    ],
)
def test_invalid_product_names(name: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.validate_item(name, 1, 1.0, 3)
    assert "items[3].product_name" in info.value.message
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "name",
    [
        "Café ☕",
        "日本語の本",
        "🍕 pizza",
        "a" * 200,
        "é" * 200,
        "Big  Mac",
        " padded ",
        "👨\u200d👩\u200d👧 family",  # joiners inside an emoji sequence
        "می\u200cخواهم",  # a zero-width non-joiner, as Persian spelling needs
    ],
)
def test_valid_product_names_kept_verbatim(name: str) -> None:
    assert domain.validate_item(name, 1, 1.0, 0).product_name == name


def test_item_count_bounds() -> None:
    with pytest.raises(InvalidArgument, match="at least one item"):
        domain.validate_new_order([], 0, "")
    with pytest.raises(InvalidArgument, match="at most 1,000 items, got 1,001"):
        domain.validate_new_order([("x", 1, 1.0)] * 1001, 0, "")
    assert len(domain.validate_new_order([("x", 1, 1.0)] * 1000, 0, "").items) == 1000


def test_first_invalid_item_is_named_by_index() -> None:
    items = [("ok", 1, 1.0), ("ok", 1, 1.0), ("bad", 0, 1.0)]
    with pytest.raises(InvalidArgument, match=r"items\[2\]\.quantity"):
        domain.validate_new_order(items, 0, "")


def test_exact_total() -> None:
    order = domain.validate_new_order([("pen", 3, 19.99)], 0, "")
    assert order.total_cents == 5997
    assert domain.to_units(order.total_cents) == 59.97
    assert domain.validate_new_order([("pen", 3, 19.99)], 59.97, "").total_cents == 5997
    mixed = domain.validate_new_order([("a", 1, 0.1), ("b", 1, 0.2)], 0.3, "")
    assert mixed.total_cents == 30


def test_total_may_reach_but_not_exceed_10_to_the_13() -> None:
    at_max = domain.validate_new_order([("gold", 10, 1e12)], 0, "")
    assert at_max.total_cents == 10**15
    with pytest.raises(InvalidArgument, match="exceeds the maximum of 10,000,000,000,000"):
        domain.validate_new_order([("gold", 10, 1e12), ("penny", 1, 0.01)], 0, "")
    with pytest.raises(InvalidArgument, match="exceeds the maximum"):
        domain.validate_new_order([("gold", 1_000_000, 1e12)], 0, "")


@pytest.mark.parametrize("total", [59.96, 59.98, 60.0, 5997.0, 0.01])
def test_total_mismatch(total: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.validate_new_order([("pen", 3, 19.99)], total, "")
    assert "total_amount" in info.value.message
    assert repr(total) in info.value.message
    assert "59.97" in info.value.message


@pytest.mark.parametrize(
    ("total", "fragment"), [(math.nan, "finite"), (math.inf, "finite"), (-59.97, "negative"), (59.971, "whole number")]
)
def test_total_must_itself_be_valid_money(total: float, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as info:
        domain.validate_new_order([("pen", 3, 19.99)], total, "")
    assert "total_amount" in info.value.message


def test_negative_zero_total_means_compute() -> None:
    assert domain.validate_new_order([("pen", 3, 19.99)], -0.0, "").total_cents == 5997


@pytest.mark.parametrize(("code", "expected"), [("", "USD"), ("USD", "USD"), ("EUR", "EUR"), ("JPY", "JPY")])
def test_valid_currencies(code: str, expected: str) -> None:
    assert domain.validate_currency(code) == expected
    assert domain.validate_new_order([("x", 1, 1.0)], 0, code).currency_code == expected


@pytest.mark.parametrize("code", ["usd", "Usd", "US", "USDX", "U5D", "ÜSD", " USD", "USD\n", "U", "ＵＳＤ"])
def test_invalid_currencies(code: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.validate_new_order([("x", 1, 1.0)], 0, code)
    assert "currency_code" in info.value.message
    assert repr(code) in info.value.message


# hypothesis: valid items, and the exact integer sum of their totals
valid_items = st.lists(
    st.tuples(
        product_names(),
        st.integers(min_value=1, max_value=domain.MAX_QUANTITY),
        st.integers(min_value=0, max_value=domain.MAX_PRICE_UNITS * domain.CENTS_PER_UNIT),
    ),
    min_size=1,
    max_size=20,
)


@given(valid_items)
def test_computed_total_is_the_exact_integer_sum(items: list[tuple[str, int, int]]) -> None:
    exact = sum(quantity * cents for _, quantity, cents in items)
    assume(exact <= domain.MAX_TOTAL_UNITS * domain.CENTS_PER_UNIT)
    wire = [(name, quantity, domain.to_units(cents)) for name, quantity, cents in items]
    order = domain.validate_new_order(wire, 0, "")
    assert order.total_cents == exact
    assert [(i.product_name, i.quantity, i.price_cents) for i in order.items] == items
    # the total as the server reports it is accepted back as an explicit total
    assert domain.validate_new_order(wire, domain.to_units(exact), "").total_cents == exact


# --- fingerprints (idempotency) ----------------------------------------------------------------


BASE = [("Laptop", 1, 1000.0), ("Mouse", 2, 25.5)]


def fp(items: list[tuple[str, int, float]] = BASE, total: float = 0, currency: str = "") -> str:
    return domain.validate_new_order(items, total, currency).fingerprint()


def test_fingerprint_equal_for_the_same_normalised_request() -> None:
    assert fp() == fp()
    assert fp(total=1051.0) == fp(total=0)  # explicit correct total == computed
    assert fp(currency="USD") == fp(currency="")  # default currency
    assert fp([("Laptop", 1, 1000.0), ("Mouse", 2, 25.50000000000001)]) == fp()  # float noise, same cents


@pytest.mark.parametrize(
    ("items", "currency"),
    [
        ([("Laptop ", 1, 1000.0), ("Mouse", 2, 25.5)], ""),  # name (whitespace is significant)
        ([("laptop", 1, 1000.0), ("Mouse", 2, 25.5)], ""),  # name case
        ([("Laptop", 2, 1000.0), ("Mouse", 2, 25.5)], ""),  # quantity
        ([("Laptop", 1, 1000.01), ("Mouse", 2, 25.5)], ""),  # price
        ([("Mouse", 2, 25.5), ("Laptop", 1, 1000.0)], ""),  # item order
        ([("Laptop", 1, 1000.0)], ""),  # fewer items
        ([("Laptop", 1, 1000.0), ("Mouse", 2, 25.5), ("Mouse", 2, 25.5)], ""),  # more items
        (BASE, "EUR"),  # currency
    ],
)
def test_fingerprint_differs_for_any_other_request(items: list[tuple[str, int, float]], currency: str) -> None:
    assert fp(items, 0, currency) != fp()


def test_fingerprint_covers_the_total_and_is_unambiguous() -> None:
    order = domain.validate_new_order(BASE, 0, "")
    other_total = domain.NewOrder(order.items, order.total_cents + 1, order.currency_code)
    assert other_total.fingerprint() != order.fingerprint()
    # names that could collide under naive concatenation stay distinct
    assert fp([("a,b", 1, 1.0)]) != fp([("a", 1, 1.0), ("b", 1, 1.0)])
    assert fp([('a"],["b', 1, 1.0)]) != fp([("a", 1, 1.0), ("b", 1, 1.0)])


@given(valid_items, valid_items)
def test_fingerprints_equal_exactly_when_normalised_requests_are(
    first: list[tuple[str, int, int]], second: list[tuple[str, int, int]]
) -> None:
    for items in (first, second):
        assume(sum(q * c for _, q, c in items) <= domain.MAX_TOTAL_UNITS * domain.CENTS_PER_UNIT)
    a = domain.validate_new_order([(n, q, domain.to_units(c)) for n, q, c in first], 0, "")
    b = domain.validate_new_order([(n, q, domain.to_units(c)) for n, q, c in second], 0, "")
    assert (a.fingerprint() == b.fingerprint()) == (first == second)


# --- ids, statuses, versions, request ids ------------------------------------------------------


@pytest.mark.parametrize("value", ["nope", "1234", "7f1e1b7c-8b1a-4d57-9b6e-2b6a4f2e0c1", "g" * 32, "\x00"])
def test_parse_order_id_rejects_non_uuids(value: str) -> None:
    with pytest.raises(InvalidArgument, match="must be a UUID") as info:
        domain.parse_order_id(value, "order_ids[]")
    assert info.value.message.startswith("order_ids[]")


def test_parse_order_id() -> None:
    with pytest.raises(InvalidArgument, match="id must not be empty"):
        domain.parse_order_id("")
    value = str(uuid.uuid4())
    assert domain.parse_order_id(value) == value
    assert domain.parse_order_id(value.upper()) == value  # canonical lower-case form
    long_garbage = "x" * 10_000
    with pytest.raises(InvalidArgument) as info:
        domain.parse_order_id(long_garbage)
    assert len(info.value.message) < 200  # echoes a bounded prefix only


def test_new_ids_are_distinct_canonical_uuid7s_of_the_current_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [domain.new_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    for value in ids:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, value)
        assert before <= parsed.int >> 80 <= after  # the Unix time in milliseconds comes first
    assert ids == sorted(ids, key=lambda value: value[:13])  # so ids sort by creation time, to the millisecond


def test_uuid7_lays_out_time_version_and_random_bits() -> None:
    value = domain.uuid7(0x0123456789AB, bytes(range(0xF0, 0xFA)))
    assert value == "01234567-89ab-70f1-b2f3-f4f5f6f7f8f9"  # version nibble 7, variant bits 10


@pytest.mark.parametrize("value", [0, 6, 99, -1])
def test_parse_status_rejects_unspecified_and_unknown(value: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.parse_status(value)
    assert f"got {value}" in info.value.message
    assert "PENDING, CONFIRMED, SHIPPED, DELIVERED, CANCELLED" in info.value.message


@pytest.mark.parametrize("status", list(Status))
def test_parse_status(status: Status) -> None:
    assert domain.parse_status(int(status)) is status


def test_parse_expected_version() -> None:
    assert domain.parse_expected_version(0) is None
    assert domain.parse_expected_version(3) == 3
    with pytest.raises(InvalidArgument, match="expected_version .* got -1"):
        domain.parse_expected_version(-1)


def test_parse_request_id() -> None:
    assert domain.parse_request_id("") is None
    assert domain.parse_request_id("k" * 128) == "k" * 128
    with pytest.raises(InvalidArgument, match="at most 128 characters, got 129"):
        domain.parse_request_id("k" * 129)
    assert domain.parse_request_id("order 42 / café") == "order 42 / café"
    with pytest.raises(InvalidArgument, match="request_id must not contain control characters"):
        domain.parse_request_id("a\x00b")


# --- list queries and page tokens --------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "effective"), [(0, 50), (1, 1), (50, 50), (1000, 1000), (1001, 1000), (2**31 - 1, 1000)]
)
def test_page_size(requested: int, effective: int) -> None:
    assert domain.parse_list_query(requested, "", []).page_size == effective


def test_negative_page_size() -> None:
    with pytest.raises(InvalidArgument, match="page_size must not be negative, got -1"):
        domain.parse_list_query(-1, "", [])


@pytest.mark.parametrize(("statuses", "bad"), [([0], 0), ([99], 0), ([1, 0], 1), ([6], 0)])
def test_list_status_filter_rejects_unknown(statuses: list[int], bad: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"statuses\[{bad}\]"):
        domain.parse_list_query(0, "", statuses)


@given(
    st.frozensets(st.sampled_from(list(Status))),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_page_token_round_trip(statuses: frozenset[Status], key: int) -> None:
    encoded = domain.encode_page_token(statuses, key)
    assert encoded and set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # the filter may be sent in any order and with repeats: it is a set
    wire = [int(s) for s in sorted(statuses, reverse=True)] * 2
    query = domain.parse_list_query(10, encoded, wire)
    assert query == domain.ListQuery(statuses, 10, key)


def test_page_token_bound_to_its_filter() -> None:
    encoded = domain.encode_page_token(frozenset({P}), 7)
    for other in ([], [2], [1, 2]):
        with pytest.raises(InvalidArgument, match="other statuses"):
            domain.parse_list_query(10, encoded, other)
    unfiltered = domain.encode_page_token(frozenset(), 7)
    with pytest.raises(InvalidArgument, match="other statuses"):
        domain.parse_list_query(10, unfiltered, [1])


def _valid_token() -> str:
    return domain.encode_page_token(frozenset(), 12345)


@pytest.mark.parametrize(
    "bad",
    [
        "not a token",
        "!!!!",
        "é",
        "=",
        _valid_token()[:-3],  # truncated
        _valid_token()[1:],  # shifted
        token(b"\xff\xfe\x00"),  # not UTF-8
        token(b"{"),  # not JSON
        token([1, 2]),
        token("k"),
        token(12),
        token(None),
        token({}),
        token({"k": 1}),
        token({"f": []}),
        token({"k": -1, "f": []}),
        token({"k": 1.0, "f": []}),
        token({"k": "1", "f": []}),
        token({"k": True, "f": []}),
        token({"k": None, "f": []}),
        token({"k": 1, "f": "1"}),
        token({"k": 1, "f": None}),
        token({"k": 2**63, "f": []}),  # beyond any database integer key
        token({"k": 10**40, "f": []}),
        token(b"[" * 100_000),  # nesting deep enough to exhaust the JSON decoder's recursion
        token(b'{"k":' * 50_000),
    ],
)
def test_tampered_page_tokens_are_malformed(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token is malformed"):
        domain.parse_list_query(10, bad, [])


@given(st.text(max_size=200))
def test_any_page_token_parses_or_is_invalid_argument(text: str) -> None:
    for candidate in (text, token(text.encode()), token(text.encode("utf-8", "surrogatepass")[:50])):
        try:
            query = domain.parse_list_query(10, candidate, [])
        except InvalidArgument:
            continue
        assert 0 <= query.after_key < 2**63


@given(st.integers(min_value=0, max_value=2**63 - 1), st.integers(min_value=0, max_value=200), st.integers(0, 255))
def test_flipping_a_token_character_never_crashes(key: int, position: int, replacement: int) -> None:
    encoded = domain.encode_page_token(frozenset({P, X}), key)
    i = position % len(encoded)
    tampered = encoded[:i] + chr(replacement) + encoded[i + 1 :]
    try:
        query = domain.parse_list_query(10, tampered, [1, 5])
    except InvalidArgument:
        return
    assert 0 <= query.after_key < 2**63


# --- watch queries (parsing only; the stream itself is tested over the wire elsewhere) ----------


def test_parse_watch_query() -> None:
    value = str(uuid.uuid4())
    query = domain.parse_watch_query([value.upper(), value], 0, 5)
    assert query == domain.WatchQuery(frozenset({value}), 0, 5)
    assert domain.parse_watch_query([], None, 0).after_sequence is None
    with pytest.raises(InvalidArgument, match=r"order_ids\[1\] must be a UUID"):
        domain.parse_watch_query([value, "nope"], None, 0)
    with pytest.raises(InvalidArgument, match="after_sequence .* got -1"):
        domain.parse_watch_query([], -1, 0)
    with pytest.raises(InvalidArgument, match="heartbeat_seconds .* got -1"):
        domain.parse_watch_query([], None, -1)
