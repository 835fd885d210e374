"""The databases the benchmark runs on: SQLite files, or fresh databases on a PostgreSQL server.

The preload and the watch scenario reach them through plain DB-API connections (:func:`connect`:
``sqlite3``, or psycopg 3 from the ``postgres`` extra); only the schema comes from the server's own
code (:func:`migrate`). :class:`Connection` holds the few things that differ between the backends:
transactions, the fast bulk insert, the offline-load settings and the clean-up after a load.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import importlib.util
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from orders.config import redacted
from orders.storage import Repository, open_database

# The BIGSERIAL columns (PostgreSQL) whose values the preload writes itself: their sequences must then
# be moved past the rows, or the server's first inserts would collide with them.
SERIAL_COLUMNS = (("order", "key"), ("order_item", "key"), ("status_event", "sequence"))
HEAD_SQL = "SELECT COALESCE(MAX(sequence), 0) FROM status_event"
Row = Sequence[Any]


def is_postgresql(url: str) -> bool:
    """True for a ``postgres(ql)://`` URL."""
    return urllib.parse.urlsplit(url).scheme.startswith("postgres")


def sqlite_url(path: Path) -> str:
    """The ``--db`` URL of the SQLite file ``path``."""
    return f"sqlite:///{path}"


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///path`` URL (playhouse's reading: everything after the third slash)."""
    return Path(urllib.parse.urlsplit(url).path[1:])


def libpq_url(url: str) -> str:
    """A playhouse PostgreSQL URL as libpq reads it (it knows only the ``postgresql`` scheme)."""
    return urllib.parse.urlsplit(url)._replace(scheme="postgresql").geturl()


def check_server_url(url: str) -> str | None:
    """Why ``url`` cannot be a ``--db-server``, or None if it can."""
    if not is_postgresql(url):
        return f"--db-server must be a postgresql:// URL, not {redacted(url)!r}"
    missing = [m for m in ("psycopg", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:  # psycopg: the ``postgres`` extra; hypothesis: ``orders.testing`` (``test``) imports it
        return f"--db-server needs {' and '.join(missing)}: pip install -e '.[postgres,test]'"
    return None


def migrate(url: str) -> None:
    """Create the schema in ``url`` with the server's own code, so it is exactly the server's."""
    database = open_database(url)
    try:
        Repository(database).migrate()
    finally:
        database.close()


def _quoted(name: str) -> str:
    """``name`` as a quoted SQL identifier (``order`` is a keyword); the same on both backends."""
    return '"' + name.replace('"', '""') + '"'


class Connection(abc.ABC):
    """An autocommit DB-API connection to one database, and what differs between the backends."""

    placeholder = "?"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.raw.close()

    def scalar(self, sql: str) -> Any:
        """The first column of the first row ``sql`` returns."""
        return self.raw.execute(sql).fetchone()[0]

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        """Insert ``rows`` (values of ``columns``, in order) into ``table``."""
        values = ", ".join([self.placeholder] * len(columns))
        self.raw.cursor().executemany(
            f"INSERT INTO {_quoted(table)} ({', '.join(map(_quoted, columns))}) VALUES ({values})", rows
        )

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A transaction: committed when the block ends, rolled back if it raises."""

    @abc.abstractmethod
    def begin_bulk_load(self) -> None:
        """Settings for an offline bulk load (nothing else uses the database yet)."""

    @abc.abstractmethod
    def end_bulk_load(self) -> None:
        """Leave the database as the server expects it after a bulk load with explicit keys."""

    @abc.abstractmethod
    def size(self) -> int:
        """The database's size on disk, in bytes."""


class SqliteConnection(Connection):
    """A SQLite file through ``sqlite3`` (``isolation_level=None``: autocommit, explicit BEGIN)."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        super().__init__(sqlite3.connect(str(self.path), isolation_level=None))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK on an exception."""
        self.raw.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    def begin_bulk_load(self) -> None:
        """No fsync and an in-memory rollback journal: a crash just means loading again."""
        self.raw.execute("PRAGMA journal_mode=MEMORY")
        self.raw.execute("PRAGMA synchronous=OFF")  # offline load only; the server always runs with FULL
        self.raw.execute("PRAGMA cache_size=-262144")  # 256 MiB: keeps the id indexes' pages in memory
        self.raw.execute("PRAGMA temp_store=MEMORY")

    def end_bulk_load(self) -> None:
        """Back to WAL, checkpointed, with fresh statistics."""
        self.raw.execute("PRAGMA journal_mode=WAL")
        self.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.raw.execute("ANALYZE")

    def size(self) -> int:
        """The file's size (the WAL is empty after :meth:`end_bulk_load`)."""
        return self.path.stat().st_size


class PostgresqlConnection(Connection):
    """A PostgreSQL database through psycopg 3, in autocommit mode."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        import psycopg  # the ``postgres`` extra

        super().__init__(psycopg.connect(libpq_url(url), autocommit=True))

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """psycopg's own transaction block."""
        return self.raw.transaction()

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        """``COPY ... FROM STDIN``: several times faster than even a pipelined ``executemany``."""
        sql = f"COPY {_quoted(table)} ({', '.join(map(_quoted, columns))}) FROM STDIN"
        with self.raw.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def begin_bulk_load(self) -> None:
        """Commits that do not wait for the WAL flush (this session only; never risks corruption)."""
        self.raw.execute("SET synchronous_commit = off")

    def end_bulk_load(self) -> None:
        """Move every BIGSERIAL sequence past the explicit keys written, then refresh the statistics."""
        for table, column in SERIAL_COLUMNS:
            self.raw.execute(
                f"SELECT setval(pg_get_serial_sequence(%s, %s), "
                f"(SELECT COALESCE(MAX({_quoted(column)}), 0) + 1 FROM {_quoted(table)}), false)",
                (_quoted(table), column),
            )
        self.raw.execute("ANALYZE")

    def size(self) -> int:
        """``pg_database_size`` of this database."""
        return int(self.scalar("SELECT pg_database_size(current_database())"))


def connect(url: str) -> Connection:
    """A :class:`Connection` to the database of a server ``--db`` URL."""
    return PostgresqlConnection(url) if is_postgresql(url) else SqliteConnection(url)


def event_log_head(url: str) -> int:
    """The event log's head (its highest sequence, 0 if empty); safe while the server runs."""
    with connect(url) as conn:
        return int(conn.scalar(HEAD_SQL))


def events_per_order(url: str, after: int) -> collections.Counter[str]:
    """How many events each order has in the log after sequence ``after``; safe while the server runs."""
    with connect(url) as conn:
        rows = conn.raw.execute(
            f"SELECT order_id, COUNT(*) FROM status_event WHERE sequence > {conn.placeholder} GROUP BY order_id",
            (after,),
        )
        return collections.Counter({order_id: int(count) for order_id, count in rows.fetchall()})


def backend_info(server: str | None) -> dict[str, Any]:
    """The backend's name and version, and for PostgreSQL the ``server`` URL (password redacted)."""
    if server is None:
        return {"name": "SQLite", "version": sqlite3.sqlite_version, "server": None}
    with PostgresqlConnection(server) as conn:
        version = str(conn.scalar("SHOW server_version"))
    return {"name": "PostgreSQL", "version": version, "server": redacted(server)}


@dataclass(frozen=True)
class Databases:
    """Where each scenario's fresh database lives: a SQLite file in ``tmp``, or a new database on the
    PostgreSQL ``server`` (created by :func:`orders.testing.temporary_database`, dropped afterwards)."""

    tmp: Path
    server: str | None = None

    @contextlib.contextmanager
    def fresh(self, name: str) -> Iterator[str]:
        """The ``--db`` URL of a new, empty database for ``name`` (SQLite: ``<tmp>/<name>.db``, kept)."""
        if self.server is not None:
            from orders.testing import temporary_database  # imports hypothesis: only when needed

            with temporary_database(self.server) as url:
                yield url
            return
        path = self.tmp / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        yield sqlite_url(path)
