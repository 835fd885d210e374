"""Persistence: peewee models and the repository. The only module that knows SQL.

The repository's methods are synchronous and run on the storage threads (:mod:`orders.storage_threads`),
never on the event loop.

Write transactions are serialised across every process sharing the database: ``BEGIN IMMEDIATE`` on
SQLite, a transaction-level advisory lock on PostgreSQL. That is what makes the event log's sequence
order equal its commit order (a PostgreSQL sequence hands out numbers at insert time, so two unserialised
transactions could commit 6 before 5, and a tailer that had read 6 would never see 5), and since a writer
takes that lock before any row lock, replicas racing on one order cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import peewee
from playhouse import db_url
from playhouse import migrate as playhouse_migrate

from orders import domain, wire
from orders.config import check_database_url
from orders.domain import EventPage, Item, ListQuery, NewOrder, Order, Status, StatusEvent
from orders.errors import Aborted, AlreadyExists, NotFound, OrderError

SCHEMA_VERSION = 4  # 2: order.encoded; 3: no index on idempotency_key.created_us; 4: schema_version.pruned_through
KEY_TIME_INDEX = "idempotency_key_created_us"  # schema 1 and 2 had it; see Repository._drop_key_time_index
DROP_KEY_TIME_INDEX_SQL = 'DROP INDEX IF EXISTS "idempotency_key_created_us"'
# PostgreSQL: the advisory lock every write transaction holds ("orders.w" as a bigint), and the channel
# (orders_events) a commit that appended events notifies, so every replica's feed reads the log at once
# instead of at its next poll.
WRITE_LOCK_KEY = int.from_bytes(b"orders.w", "big")
NOTIFY_EVENTS_SQL = "SELECT pg_notify('orders_events', '')"
LISTEN_EVENTS_SQL = "LISTEN orders_events"
LISTEN_RETRY_MAX = 5.0  # seconds between attempts to re-establish a lost LISTEN connection, at most
POSTGRES_CONNECT_TIMEOUT = 5  # seconds; a URL may set its own ``connect_timeout``
# A replica that stops in the middle of a write (paused, frozen, cut off from the network) would hold the
# write lock, and so stop every replica's writes, until the database noticed; after this long idle inside
# a transaction the database ends its session instead (no write of ours pauses for more than milliseconds).
# Half a client's default deadline (10 s): the writes waiting behind it still finish within theirs.
POSTGRES_IDLE_IN_TRANSACTION_MS = 5_000
# A statement waiting for a lock that another session holds (a migration, VACUUM FULL, an operator's LOCK
# TABLE) gives up after this long, as SQLite's busy timeout does, and its call fails with UNAVAILABLE
# instead of waiting as long as the lock is held.
POSTGRES_LOCK_TIMEOUT_MS = 10_000
# TCP keepalives and a user timeout (libpq's, so a URL may set its own): a database server that vanished
# without closing the connection (a crash of its machine, a network cut) is noticed within about half a
# minute while the connection is idle, and within 15 s of a statement sent and not acknowledged, instead of
# the kernel retransmitting it for a quarter of an hour; the replica then says NOT_SERVING and fails fast.
POSTGRES_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms
}
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 10_000,
}

# Event-log retention (``retention_events = N > 0``) prunes in batches: the log holds from N up to
# N + slack - 1 events, and the oldest ``slack`` are deleted together once that many are surplus. A
# DELETE of a run of adjacent sequences touches a handful of table pages, where deleting one row per
# append would dirty the oldest page (and an index page) in every commit and pay a statement each time;
# the slack is 1/16 of N (so at most ~6 % more rows than asked), at least 1 (small logs stay exact) and
# at most PRUNE_SLACK_MAX. One append deletes at most PRUNE_BATCH_MAX rows, so a restart with a much
# smaller N trims the old surplus over the following writes instead of stalling one of them.
PRUNE_SLACK_MAX = 1024
PRUNE_BATCH_MAX = 4096
# Rows per multi-row INSERT, at most: 2,048 parameters for an order's eight columns, well under SQLite's
# 32,766 and PostgreSQL's 65,535.
ROWS_PER_STATEMENT = 256


log = logging.getLogger(__name__)

_STATUSES = {int(status): status for status in Status}  # stored number -> Status, without Status()'s cost

A = TypeVar("A")
R = TypeVar("R")
Written = tuple[bytes, StatusEvent | None]  # an order as written, encoded, and its event (None: no change)


def single(many: Callable[[list[A]], list[R | OrderError]], argument: A) -> R:
    """What ``many``, a write of several requests at once (like :meth:`Repository.create_orders`), gives for
    ``argument`` alone: its result, or its OrderError raised."""
    (outcome,) = many([argument])
    if isinstance(outcome, OrderError):
        raise outcome
    return outcome


class DatabaseUnusable(Exception):
    """The database cannot be opened or used by this server (unreachable, no driver, newer schema)."""


class _Model(peewee.Model):
    class Meta:
        legacy_table_names = False


class OrderRow(_Model):
    key = peewee.BigAutoField()  # creation order: the keyset for paging
    id = peewee.CharField(max_length=36, unique=True)
    status = peewee.SmallIntegerField()
    total_cents = peewee.BigIntegerField()
    currency_code = peewee.CharField(max_length=3)
    version = peewee.IntegerField()
    create_time_us = peewee.BigIntegerField()
    update_time_us = peewee.BigIntegerField()
    # The whole order as an encoded orders.v1.Order message (orders.wire.encode_order), kept in step with
    # the columns by every write: what replies carry, so reads neither load items nor encode anything.
    encoded = peewee.BlobField()

    class Meta:
        table_name = "order"
        indexes = ((("status", "key"), False),)


class ItemRow(_Model):
    key = peewee.BigAutoField()
    order = peewee.ForeignKeyField(OrderRow, field="key", column_name="order_key", on_delete="CASCADE", index=False)
    position = peewee.IntegerField()
    id = peewee.CharField(max_length=36)
    product_name = peewee.TextField()
    quantity = peewee.IntegerField()
    price_cents = peewee.BigIntegerField()

    class Meta:
        table_name = "order_item"
        indexes = ((("order", "position"), True),)


class EventRow(_Model):
    sequence = peewee.BigAutoField()  # INTEGER PRIMARY KEY on SQLite, BIGSERIAL on PostgreSQL
    order_id = peewee.CharField(max_length=36)
    previous = peewee.SmallIntegerField(null=True)
    status = peewee.SmallIntegerField()
    time_us = peewee.BigIntegerField()

    class Meta:
        table_name = "status_event"
        indexes = ((("order_id", "sequence"), False),)


class IdempotencyRow(_Model):
    key = peewee.CharField(max_length=domain.MAX_REQUEST_ID_LENGTH, primary_key=True)
    fingerprint = peewee.CharField(max_length=64)
    order_id = peewee.CharField(max_length=36)
    created_us = peewee.BigIntegerField()  # read only with its key: a key past the window is taken over

    class Meta:
        table_name = "idempotency_key"


class SchemaRow(_Model):
    version = peewee.IntegerField()
    # The newest sequence retention has deleted (0: none): the event log starts right after it. Not the
    # oldest event's, which on PostgreSQL may be past sequence numbers that transactions took and rolled back.
    pruned_through = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "schema_version"


MODELS: tuple[type[_Model], ...] = (OrderRow, ItemRow, EventRow, IdempotencyRow, SchemaRow)


def open_database(url: str) -> peewee.Database:
    """Open a database from a ``playhouse.db_url`` URL: SQLite with its durability settings, or PostgreSQL
    (``postgresql://user@host:port/dbname``, needs the ``postgres`` extra) with a connect timeout, TCP
    keepalives, and limits on a session's idle time inside a transaction and on its waits for locks.
    ValueError for any other URL (see :func:`check_database_url`); DatabaseUnusable for PostgreSQL without
    psycopg 3."""
    check_database_url(url)
    if url.startswith("sqlite"):
        return db_url.connect(url, pragmas=SQLITE_PRAGMAS, timeout=10)
    try:
        import psycopg  # noqa: F401  (psycopg2 alone would do for peewee, not for LISTEN)
    except ImportError:
        raise DatabaseUnusable("PostgreSQL needs psycopg 3: pip install 'orders[postgres]'") from None
    # A user, password or database name with characters that are not allowed there (/, ?, #, @, %) is
    # percent-encoded, as libpq reads it; psycopg 3 (the ``postgres`` extra), even where peewee would pick
    # psycopg2 if installed.
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path[1:])
    database = db_url.connect(url, unquote_user=True, unquote_password=True, prefer_psycopg3=True, database=name)
    if isinstance(database, peewee.PostgresqlDatabase):
        params = database.connect_params
        params.setdefault("connect_timeout", POSTGRES_CONNECT_TIMEOUT)
        for name, value in POSTGRES_KEEPALIVES.items():
            params.setdefault(name, value)
        # first, so that a URL's own ?options=-c lock_timeout=... (or idle_in_transaction_...) wins; and no
        # idle_session_timeout a role or database may set: the server's connections are idle between calls
        timeouts = (
            f"-c idle_in_transaction_session_timeout={POSTGRES_IDLE_IN_TRANSACTION_MS} "
            f"-c lock_timeout={POSTGRES_LOCK_TIMEOUT_MS} -c idle_session_timeout=0"
        )
        params["options"] = f"{timeouts} {params.get('options', '')}".strip()
    return database


def is_postgresql(database: peewee.Database) -> bool:
    """True for PostgreSQL, the scale-out backend."""
    return isinstance(database, peewee.PostgresqlDatabase)


def _in_memory(path: str) -> bool:
    return not path or path == ":memory:" or path.startswith("file::memory:")


class SqliteFiles:
    """Notices a SQLite database file, or its write-ahead log, deleted or replaced under the running server
    (an ``rm``, a backup copied or moved over it). SQLite would go on using the files it has open, which no
    longer have those names, and every write acknowledged from then on would be gone at the next start."""

    def __init__(self, path: str) -> None:
        self._paths = (path, f"{path}-wal")
        self._seen: dict[str, tuple[int, int]] = {}  # (device, inode) of each, when first checked

    @classmethod
    def of(cls, database: peewee.Database) -> SqliteFiles | None:
        """The files of ``database``; None for PostgreSQL or an in-memory SQLite database."""
        return None if is_postgresql(database) or _in_memory(database.database) else cls(database.database)

    def check(self) -> None:
        """OperationalError if a file is gone, or not the one first seen under its name; call it with the
        database open (the write-ahead log exists from then on)."""
        for path in self._paths:
            try:
                found = os.stat(path)
            except FileNotFoundError:
                raise peewee.OperationalError(_swapped(path, "deleted")) from None
            if self._seen.setdefault(path, (found.st_dev, found.st_ino)) != (found.st_dev, found.st_ino):
                raise peewee.OperationalError(_swapped(path, "replaced"))


def _swapped(path: str, how: str) -> str:
    return (
        f"{os.path.basename(path)} was {how} while the server ran, so nothing written now would be kept: "
        "restart the server"
    )


class SiblingWriteLock:
    """Hands SQLite's write lock from one server process to the next without SQLite's busy wait.

    Processes sharing a database file (``--workers``, replicas) take this lock (``flock`` on a file beside
    the database) before ``BEGIN IMMEDIATE``. A process that finds SQLite's write lock taken sleeps in
    SQLite's busy handler for 1, 2, 5, 10, ... ms between attempts, and misses a release right after it
    went to sleep; here it polls every POLL_S instead, so the lock changes hands within a fraction of a
    millisecond. Any other process (the ``sqlite3`` shell, a backup) is still waited for by SQLite's busy
    timeout; so is this lock, which gives up as the busy timeout would ("database is locked").
    """

    POLL_S = 0.0002

    def __init__(self, path: str, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._fd = -1

    @classmethod
    def beside(cls, database_path: str) -> contextlib.AbstractContextManager[None]:
        """The lock for the SQLite file at ``database_path``; a no-op for an in-memory database."""
        if _in_memory(database_path):
            return contextlib.nullcontext()
        return cls(f"{database_path}-writer.lock", SQLITE_PRAGMAS["busy_timeout"] / 1000)

    def __enter__(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)  # held only while locked: nothing to leak
        except FileNotFoundError as exc:
            raise peewee.OperationalError("the database's directory does not exist") from exc
        except OSError as exc:  # no permission, say: the database is unusable
            # say which file by its name only: the message reaches clients too, and the server's paths are not theirs
            raise peewee.OperationalError(f"cannot open {os.path.basename(self._path)}: {exc.strerror}") from exc
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise peewee.OperationalError("database is locked (by another orders server process)") from None
                time.sleep(self.POLL_S)

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)  # releases the lock


OrderState = tuple[int, int, int, bytes]  # an order's stored status, version, update_time_us and encoded form


def _changed(
    order_id: str, state: OrderState | None, target: Status, expected_version: int | None, now: int
) -> tuple[tuple[str, Status, Status, int] | None, OrderState]:
    """The (order id, previous, status, time) event a status change appends (None for the same-status
    no-op) and the order's state after it; or the OrderError refusing the change."""
    if state is None:
        raise NotFound(f"no order with id {order_id}")
    stored_status, version, update_time_us, encoded = state
    status = _STATUSES[stored_status]
    if expected_version is not None and expected_version != version:
        raise Aborted(
            f"order {order_id} is at version {version}, not the expected {expected_version}; read it again and retry"
        )
    if not domain.is_change(status, target):
        return None, state
    version, time_us = version + 1, max(now, update_time_us + 1)  # update_time strictly increases
    changed = (target, version, time_us, wire.with_status(encoded, target, version, time_us))
    return (order_id, status, target, time_us), changed


class _Draft(NamedTuple):
    """An order a create request would make, before it is written."""

    order: Order  # with fresh ids
    encoded: bytes
    request_id: str | None
    fingerprint: str  # of the request, when it has a request id

    @classmethod
    def of(cls, new: NewOrder, request_id: str | None, now: int) -> _Draft:
        """The draft of ``new`` created at ``now``."""
        items = tuple(Item(domain.new_id(), i.product_name, i.quantity, i.price_cents) for i in new.items)
        order = Order(domain.new_id(), items, new.total_cents, new.currency_code, Status.PENDING, 1, now, now)
        return cls(order, wire.encode_order(order), request_id, new.fingerprint() if request_id is not None else "")


def now_us() -> int:
    """Wall-clock time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


class Repository:
    """Reads and writes orders, items, status events and idempotency keys in one database."""

    def __init__(self, database: peewee.Database, retention_events: int = 0) -> None:
        if retention_events < 0:
            raise ValueError(f"retention_events must be 0 (keep every event) or more, not {retention_events}")
        self.database = database
        self._postgresql = is_postgresql(database)
        self.retention_events = retention_events
        self.prune_slack = max(1, min(retention_events // 16, PRUNE_SLACK_MAX))
        self._pruned_through: int | None = None  # writer thread only; None: not known yet
        self._batch_without_savepoints = False  # writer thread only; see write_batch
        self._events_appended = False  # writer thread only: in the current write transaction
        self._sibling_lock: contextlib.AbstractContextManager[None] = (
            contextlib.nullcontext() if self._postgresql else SiblingWriteLock.beside(database.database)
        )
        self._files = SqliteFiles.of(database)
        self._models = {model: _bind(model, database) for model in MODELS}
        self._orders = self._models[OrderRow]
        self._items = self._models[ItemRow]
        self._events = self._models[EventRow]
        self._keys = self._models[IdempotencyRow]
        self._schema = self._models[SchemaRow]
        # The statements of every GetOrder, CreateOrder, status change and feed tailer read skip peewee's
        # query building, which costs more than the database running them: their SQL is generated by
        # peewee once, here (dialect, quoting, PostgreSQL's RETURNING), and run with parameters.
        o, i, e, k = self._orders, self._items, self._events, self._keys
        self._insert_item_sql = (
            i.insert(order=0, position=0, id="", product_name="", quantity=0, price_cents=0).returning().sql()[0]
        )
        self._reclaim_key_sql = k.update(fingerprint="", order_id="", created_us=0).where(k.key == "").sql()[0]
        self._key_sql = k.select(k.fingerprint, k.order_id, k.created_us).where(k.key == "").sql()[0]
        self._page_sqls: dict[int, str] = {}  # see _page_sql
        self._events_after_sql = self._event_columns().where(e.sequence > 0).order_by(e.sequence).limit(1).sql()[0]
        self._change_status_sql = (
            o.update(status=0, version=0, update_time_us=0, encoded=b"").where((o.id == "") & (o.version == 0)).sql()[0]
        )
        # Statements for many rows (see _run_for_rows): a batch of creates or status changes reads and writes
        # each table in one statement, which on PostgreSQL is one round trip instead of one per order.
        # Their SQL is generated once per row count.
        order = {"id": "", "status": 0, "total_cents": 0, "currency_code": "", "version": 0, "create_time_us": 0}
        order |= {"update_time_us": 0, "encoded": b""}
        event = {"order_id": "", "previous": None, "status": 0, "time_us": 0}
        claim = {"key": "", "fingerprint": "", "order_id": "", "created_us": 0}
        self._statements_for_rows: dict[str, Callable[[int], peewee.Query]] = {
            "insert order": lambda rows: o.insert_many([order] * rows).returning(o.id, o.key),
            "insert status_event": lambda rows: e.insert_many([event] * rows).returning(
                e.order_id, e.status, e.sequence
            ),
            "claim idempotency_key": lambda rows: (
                k.insert_many([claim] * rows).on_conflict_ignore().returning(k.order_id)
            ),
            "select order": lambda rows: o.select(o.id, o.status, o.version, o.update_time_us, o.encoded).where(
                o.id.in_([""] * rows)
            ),
        }
        self._rows_sqls: dict[tuple[str, int], str] = {}

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[None]:
        """A write transaction holding the database-wide write lock (a savepoint when one is already open,
        nothing at all inside ``write_batch(savepoints=False)``).

        SQLite: ``BEGIN IMMEDIATE``. PostgreSQL: ``pg_advisory_xact_lock``, taken first thing and held to
        the commit or rollback; and, if the transaction appended events, one NOTIFY just before it commits.
        """
        if self._batch_without_savepoints:
            yield
            return
        if not self._postgresql:
            if self.database.in_transaction():
                with self.database.atomic():
                    yield
                return
            with self._sibling_lock, self.database.atomic("IMMEDIATE"):
                if self._files is not None:
                    self._files.check()
                yield
            return
        outermost = not self.database.in_transaction()
        with self.database.atomic():
            if outermost:
                self.database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                self._events_appended = False
            yield
            if outermost and self._events_appended:  # one wake-up per commit, delivered only if it commits
                self.database.execute_sql(NOTIFY_EVENTS_SQL)

    @contextlib.contextmanager
    def write_batch(self, *, savepoints: bool) -> Iterator[None]:
        """One write transaction for several writes (see :class:`orders.storage_threads.GroupCommitWriter`).

        With ``savepoints`` each write's own ``write_transaction()`` is a savepoint, so one that fails rolls
        back only itself. Without, the writes run straight in the transaction, two statements and a
        savepoint object cheaper each; a write that fails may then have left part of its work behind, so
        the caller must let its exception end (and roll back) the whole batch.
        """
        with self.write_transaction():
            self._batch_without_savepoints = not savepoints
            try:
                yield
            finally:
                self._batch_without_savepoints = False

    # --- schema ------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Create the schema if missing, or upgrade an older one; refuse a database written by a newer one.
        A current schema is only checked, with no DDL, so a role that may read and write the tables but does
        not own them can serve. It always writes, so a database that cannot be written (a read-only file, a
        read-only role) fails here, at start-up."""
        with self.write_transaction():
            found = self._schema_version()
            if found is not None and found > SCHEMA_VERSION:
                raise DatabaseUnusable(
                    f"database schema version {found} is newer than this server's {SCHEMA_VERSION}; upgrade orders"
                )
            if found != SCHEMA_VERSION:
                for model in self._models.values():  # in MODELS order: referenced tables first
                    model.create_table(safe=True)
            if found is None:
                self._schema.insert(version=SCHEMA_VERSION).execute()
            else:
                if found < 2:
                    self._add_encoded_orders()
                if found < 3:
                    self._drop_key_time_index()
                if found < 4:
                    self._record_pruned_through()
                self._schema.update(version=SCHEMA_VERSION).execute()  # also when current: the write that checks

    def _schema_version(self) -> int | None:
        """The version of the schema the database holds; None for a database without one."""
        if not self._schema.table_exists():
            return None
        return self._schema.select(peewee.fn.MAX(self._schema.version)).scalar()

    def _add_encoded_orders(self) -> None:
        """Schema 1 → 2: add ``order.encoded`` and encode every existing order into it."""
        log.info("upgrading the database to schema version %d: encoding every stored order", SCHEMA_VERSION)
        o, i = self._orders, self._items
        column = peewee.BlobField(constraints=[peewee.SQL("DEFAULT ''")])  # NOT NULL: a default for the old rows
        playhouse_migrate.migrate(
            playhouse_migrate.SchemaMigrator.from_database(self.database).add_column(
                o._meta.table_name, "encoded", column, allow_not_null=True
            )
        )
        set_encoded_sql = o.update(encoded=b"").where(o.key == 0).sql()[0]
        columns = (o.key, o.id, o.status, o.total_cents, o.currency_code, o.version, o.create_time_us, o.update_time_us)
        after, encoded = 0, 0
        while rows := list(o.select(*columns).where(o.key > after).order_by(o.key).limit(1000).tuples()):
            after = rows[-1][0]
            items: dict[int, list[Item]] = {row[0]: [] for row in rows}
            in_chunk = i.select(i.order, i.id, i.product_name, i.quantity, i.price_cents).where(
                i.order.between(rows[0][0], after)
            )
            for order_key, *item in in_chunk.order_by(i.order, i.position).tuples():
                items[order_key].append(Item(*item))
            self._execute_many(
                set_encoded_sql,
                [
                    (wire.encode_order(Order(oid, tuple(items[key]), total, currency, Status(status), *rest)), key)
                    for key, oid, status, total, currency, *rest in rows
                ],
            )
            encoded += len(rows)
        log.info("schema upgrade done: %d orders encoded", encoded)

    def _drop_key_time_index(self) -> None:
        """Schema 2 → 3: drop the index on ``idempotency_key.created_us``, which no query reads and every
        create paid for (about 9 % of the pages a commit of creates writes)."""
        self.database.execute_sql(DROP_KEY_TIME_INDEX_SQL)

    def _record_pruned_through(self) -> None:
        """Schema 3 → 4: add ``schema_version.pruned_through``, taken to be just before the oldest event, as
        schema 3 took the log to start (it may have pruned up to there)."""
        s, e = self._schema, self._events
        column = peewee.BigIntegerField(constraints=[peewee.SQL("DEFAULT 0")])  # NOT NULL: a default for the old row
        playhouse_migrate.migrate(
            playhouse_migrate.SchemaMigrator.from_database(self.database).add_column(
                s._meta.table_name, "pruned_through", column, allow_not_null=True
            )
        )
        oldest = e.select(peewee.fn.MIN(e.sequence)).scalar()
        s.update(pruned_through=oldest - 1 if oldest is not None else 0).execute()

    # --- writes ------------------------------------------------------------------------------

    def create_order(self, new: NewOrder, request_id: str | None) -> Written:
        """Insert an order with its creation event: the order (encoded, see :attr:`OrderRow.encoded`) and
        the event; an idempotent retry returns the original order and no event."""
        return single(self.create_orders, (new, request_id))

    def create_orders(self, requests: Sequence[tuple[NewOrder, str | None]]) -> list[Written | OrderError]:
        """Create orders as :meth:`create_order` does, all in one transaction and one statement per table:
        for each (new order, request id), in order, what :meth:`create_order` returns or the OrderError
        it raises. A refused request writes nothing."""
        with self.write_transaction():
            now = now_us()
            drafts = [_Draft.of(new, request_id, now) for new, request_id in requests]
            # The claims come first, so a new request id (the usual case) costs its row and no lookup.
            claims = [(d.request_id, d.fingerprint, d.order.id, now) for d in drafts if d.request_id is not None]
            claimed = {order_id for (order_id,) in self._run_for_rows("claim idempotency_key", claims)}
            fresh = [d for d in drafts if d.request_id is None or d.order.id in claimed]
            created = dict(zip((d.order.id for d in fresh), self._insert_orders(fresh), strict=True))
            outcomes: list[Written | OrderError] = []
            for draft in drafts:
                if draft.order.id in created:
                    outcomes.append(created[draft.order.id])
                    continue
                try:
                    outcomes.append(self._create_under_used_request_id(draft))
                except OrderError as exc:
                    outcomes.append(exc)
            return outcomes

    def _insert_orders(self, drafts: list[_Draft]) -> list[Written]:
        """Insert drafted orders with their items and creation events."""
        if not drafts:
            return []
        orders = [(d.order, d.encoded) for d in drafts]
        keys = dict(
            self._run_for_rows(
                "insert order",
                [
                    (o.id, o.status, o.total_cents, o.currency_code, o.version, o.create_time_us, o.update_time_us, e)
                    for o, e in orders
                ],
            )
        )
        self._execute_many(
            self._insert_item_sql,
            [
                (keys[order.id], position, i.id, i.product_name, i.quantity, i.price_cents)
                for order, _ in orders
                for position, i in enumerate(order.items)
            ],
        )
        events = self._append_events([(o.id, None, o.status, o.create_time_us) for o, _ in orders])
        return [(encoded, event) for (_, encoded), event in zip(orders, events, strict=True)]

    def _create_under_used_request_id(self, draft: _Draft) -> Written:
        """Create for a request whose request id is taken (by an earlier order, or an earlier request of the
        same batch): a retry of that request gets its order and no event, an expired key is taken over by
        the draft, and another request gets AlreadyExists."""
        stored_fingerprint, stored_order_id, created = self.database.execute_sql(
            self._key_sql, (draft.request_id,)
        ).fetchone()
        now = draft.order.create_time_us
        if now - created > domain.IDEMPOTENCY_WINDOW_US:  # expired: the key is free for a new order
            self.database.execute_sql(self._reclaim_key_sql, (draft.fingerprint, draft.order.id, now, draft.request_id))
            return self._insert_orders([draft])[0]
        if stored_fingerprint != draft.fingerprint:
            raise AlreadyExists(
                f"request_id {draft.request_id!r} was already used for a different request (order {stored_order_id}); "
                "use a new request_id for a new order"
            )
        return self.get_order(stored_order_id), None

    def change_status(self, order_id: str, target: Status, expected_version: int | None) -> Written:
        """Apply a status change with its event in one transaction: the order (encoded) and the event; the
        same status is a no-op (the order as it is, no event)."""
        return single(self.change_statuses, (order_id, target, expected_version))

    def change_statuses(self, requests: Sequence[tuple[str, Status, int | None]]) -> list[Written | OrderError]:
        """Apply status changes as :meth:`change_status` does, all in one transaction and one statement per
        table: for each (order id, target, expected version), in order, what :meth:`change_status` returns
        or the OrderError it raises. A refused change writes nothing; changes of one order apply in turn."""
        with self.write_transaction():
            now = now_us()
            rows = self._order_rows(list({order_id: None for order_id, _, _ in requests}))
            stored_versions = {order_id: row[1] for order_id, row in rows.items()}
            decided: list[tuple[bytes, bool] | OrderError] = []  # the order as changed, and whether it has an event
            events: list[tuple[str, Status | None, Status, int]] = []  # (order id, previous, status, time)
            for order_id, target, expected_version in requests:
                try:
                    event, rows[order_id] = _changed(order_id, rows.get(order_id), target, expected_version, now)
                except OrderError as exc:
                    decided.append(exc)
                    continue
                decided.append((rows[order_id][3], event is not None))
                if event is not None:
                    events.append(event)
            if events:
                changed = [
                    (*row, order_id, stored_versions[order_id])
                    for order_id, row in rows.items()
                    if row[1] != stored_versions[order_id]
                ]
                if self._execute_many(self._change_status_sql, changed) != len(changed):
                    raise Aborted("an order changed concurrently; read it again and retry")
            appended = iter(self._append_events(events) if events else ())
            return [d if isinstance(d, OrderError) else (d[0], next(appended) if d[1] else None) for d in decided]

    def _append_events(self, events: list[tuple[str, Status | None, Status, int]]) -> list[StatusEvent]:
        """Append (order id, previous status, status, time) events; what was appended, in the same order.

        An order reaches each status at most once (the state machine has no cycles), so the returned rows
        are matched to the events by (order id, status)."""
        sequences = {
            (order_id, status): sequence
            for order_id, status, sequence in self._run_for_rows("insert status_event", events)
        }
        self._events_appended = True  # PostgreSQL: the transaction notifies before it commits
        if self.retention_events:
            self._prune(max(sequences.values()))
        return [
            StatusEvent(sequences[order_id, status], order_id, previous, status, time_us)
            for order_id, previous, status, time_us in events
        ]

    def _run_for_rows(self, statement: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Run a statement of ``_statements_for_rows`` for ``rows`` (each row's parameters), on at most
        ROWS_PER_STATEMENT rows at a time: the rows it gives, in no particular order."""
        returned: list[tuple[Any, ...]] = []
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            key = (statement, len(chunk))
            if key not in self._rows_sqls:
                self._rows_sqls[key] = self._statements_for_rows[statement](len(chunk)).sql()[0]
            cursor = self.database.execute_sql(self._rows_sqls[key], [value for row in chunk for value in row])
            returned += cursor.fetchall()
        return returned

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        """Run ``sql`` once per row of parameters; the number of rows changed in all."""
        with peewee.__exception_wrapper__:  # peewee's exception types, as execute_sql raises them
            cursor = self.database.cursor()
            cursor.executemany(sql, rows)
            return cursor.rowcount

    def _prune(self, head: int) -> None:
        """Delete events older than the newest ``retention_events``, in the appending transaction.

        Invariant: the head (the event just appended, in this same transaction) is never deleted, since
        everything deleted is at most ``head - retention_events`` and ``retention_events >= 1``. So once
        an event exists the log is never empty again, and sequence numbers are never reused: SQLite's
        ``INTEGER PRIMARY KEY`` (peewee's BigAutoField, no AUTOINCREMENT) hands out MAX(sequence) + 1, which
        would restart from a lower number if the newest events could be deleted.
        """
        e, s = self._events, self._schema
        if self._pruned_through is None:  # the first append since this process started
            self._pruned_through = self._newest_pruned().scalar()
        surplus_through = head - self.retention_events
        if surplus_through - self._pruned_through < self.prune_slack:
            return
        through = min(surplus_through, self._pruned_through + PRUNE_BATCH_MAX)
        # Recorded is the newest event deleted, not ``through``: on PostgreSQL that may be a sequence number a
        # transaction took and rolled back, and a stream that read up to just before it has missed nothing.
        deleted_through = e.select(peewee.fn.MAX(e.sequence)).where(e.sequence <= through).scalar()
        if deleted_through is not None:
            e.delete().where(e.sequence <= deleted_through).execute()
            s.update(pruned_through=deleted_through).where(s.pruned_through < deleted_through).execute()
        # If this transaction rolls back, the rows stay and the next prune (``<= through``) takes them.
        self._pruned_through = through

    # --- reads -------------------------------------------------------------------------------

    def get_order(self, order_id: str) -> bytes:
        """The order with this id, encoded (see :attr:`OrderRow.encoded`), or NotFound."""
        return single(self.get_orders, order_id)

    def get_orders(self, order_ids: Sequence[str]) -> list[bytes | OrderError]:
        """For each id, in order, the order encoded or a NotFound: one statement for them all, which on
        PostgreSQL is one round trip instead of one per order."""
        found = self._order_rows(list(dict.fromkeys(order_ids)))
        return [found[i][3] if i in found else NotFound(f"no order with id {i}") for i in order_ids]

    def _order_rows(self, order_ids: list[str]) -> dict[str, OrderState]:
        """The stored state of each of these orders that exists, by id."""
        return {order_id: state for order_id, *state in self._run_for_rows("select order", [(i,) for i in order_ids])}

    def list_orders(self, query: ListQuery) -> tuple[list[bytes], int | None]:
        """One page of orders oldest first, encoded, and the key to continue after (None on the last page).
        A page holds fewer than ``page_size`` orders, and a key to continue, where more would not fit one
        reply (see :func:`orders.wire.orders_that_fit`)."""
        params = (query.after_key, *sorted(query.statuses), query.page_size + 1)
        rows = self.database.execute_sql(self._page_sql(len(query.statuses)), params).fetchall()
        more = len(rows) > query.page_size
        orders = [encoded for _, encoded in rows[: query.page_size]]
        if sum(map(len, orders)) + wire.ORDER_FIELD_HEADER_BYTES * len(orders) > wire.MAX_PAGE_BYTES:
            orders, more = orders[: wire.orders_that_fit(orders)], True
        return orders, (rows[len(orders) - 1][0] if more else None)

    def _page_sql(self, status_count: int) -> str:
        """The SQL of a ListOrders page filtered by ``status_count`` statuses (0: all): it takes
        (after_key, *statuses, limit). Generated once per filter size (there are five statuses)."""
        if status_count not in self._page_sqls:
            o = self._orders
            select = o.select(o.key, o.encoded).where(o.key > 0)
            if status_count:
                select = select.where(o.status.in_([0] * status_count))
            self._page_sqls[status_count] = select.order_by(o.key).limit(1).sql()[0]
        return self._page_sqls[status_count]

    def events_after(self, sequence: int, order_ids: Iterable[str] = (), limit: int = 500) -> EventPage:
        """Events with a sequence above ``sequence``, oldest first, optionally for some orders only; with the
        newest sequence retention had deleted as they were read (one statement, one snapshot)."""
        e = self._events
        ids = list(order_ids)
        if ids:  # a filtered stream catching up: any number of ids, so peewee builds the query
            select = self._event_columns().where((e.sequence > sequence) & e.order_id.in_(ids))
            rows = select.order_by(e.sequence).limit(limit).tuples()
        else:  # the tailer, after every commit and every poll: so health says NOT_SERVING once a file is swapped
            if self._files is not None:
                self._files.check()
            rows = self.database.execute_sql(self._events_after_sql, (sequence, limit))
        rows = list(rows)
        events = [
            StatusEvent(seq, oid, _STATUSES.get(previous), _STATUSES[status], at)
            for seq, oid, previous, status, at, _ in rows
        ]
        if rows:
            return EventPage(events, rows[0][-1])
        if ids:  # no row to carry it: read after the events, it can only have moved forward (safe)
            return EventPage(events, self._newest_pruned().scalar())
        return EventPage(events, 0)

    def _event_columns(self) -> peewee.ModelSelect:
        e = self._events
        return e.select(e.sequence, e.order_id, e.previous, e.status, e.time_us, self._newest_pruned())

    def _newest_pruned(self) -> peewee.ModelSelect:
        """The newest sequence retention has deleted (see :attr:`SchemaRow.pruned_through`), as a query."""
        return self._schema.select(peewee.fn.MAX(self._schema.pruned_through))

    def log_bounds(self) -> tuple[int, int]:
        """(first retained sequence, head sequence) of the event log; (1, 0) when it is empty. The first is the
        one after the newest pruned: the oldest event's may be later (see :attr:`SchemaRow.pruned_through`)."""
        # Two scalar subqueries in one statement: one snapshot, and each is a single index lookup.
        e = self._events
        bounds = peewee.Select(columns=[self._newest_pruned(), e.select(peewee.fn.MAX(e.sequence))])
        pruned_through, head = bounds.bind(self.database).tuples().get()
        return (pruned_through + 1, head or 0)


async def listen_for_commits(database: peewee.PostgresqlDatabase, on_commit: Callable[[], None]) -> None:
    """Call ``on_commit`` whenever any process commits status events, until cancelled: LISTEN on a
    connection of its own, reconnecting with backoff. Notifications are only a wake-up (the log is the
    truth), so ``on_commit`` also runs after every (re)connect: for anything sent while it was down."""
    import psycopg  # the ``postgres`` extra; only PostgreSQL URLs get here

    connect_params = {"dbname": database.database, **database.connect_params}
    delay = 0.1
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(autocommit=True, **connect_params) as connection:
                await connection.execute(LISTEN_EVENTS_SQL)
                delay = 0.1
                on_commit()
                async for _ in connection.notifies():
                    on_commit()
        except psycopg.Error as exc:
            log.warning("listening for commits failed (%s); retrying in %.1fs, polling the log meanwhile", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, LISTEN_RETRY_MAX)


def _bind(model: type[_Model], database: peewee.Database) -> type[_Model]:
    """A subclass of ``model`` bound to ``database``, so several databases can live in one process."""
    meta = type("Meta", (), {"database": database, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})
