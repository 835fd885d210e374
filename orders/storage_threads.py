"""The storage threads: every database call runs on one of them, never on the event loop.

:class:`Storage` is what the service uses: writes go to the group-commit writer thread, reads to a
reader thread (SQLite's WAL mode lets them run side by side; PostgreSQL reads never wait for writes).
Each thread takes whatever jobs have queued up as one batch and answers the batch's callers with a
single wake-up of their event loop, instead of one thread-pool future and one wake-up per call. Jobs of
a batch that are parts of the same call of several requests (see :class:`Together`) run as one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import peewee

from orders.errors import DataLoss, OrderError, Unavailable
from orders.storage import (
    DatabaseUnusable,
    Repository,
    is_postgresql,
    listen_for_commits,
    open_database,
    single,
)

P = ParamSpec("P")
A = TypeVar("A")
R = TypeVar("R")

log = logging.getLogger(__name__)

MAX_BATCH = 256  # jobs per batch: per transaction on the writer
# Seconds a batch may run before the database counts as not answering (a database server that stopped, or
# a network that holds its packets without losing the connection). Longer than any wait the database
# itself bounds: SQLite's busy timeout and PostgreSQL's lock timeout (10 s), libpq's TCP user timeout
# (15 s); the schema upgrade at start-up is not watched.
STALL_TIMEOUT = 20.0
STALL_CHECK_INTERVAL = 1.0  # seconds between checks for a stalled batch
# Seconds without a failed batch before a thread that logged an outage logs that its calls work again: some
# calls may fail while others work (the event log's reads notice a swapped SQLite file, lookups do not), and
# the log should say "fail" once and "work again" once, not once each per batch.
RECOVERY_QUIET = 2.0


@dataclass(frozen=True, slots=True)
class Together:
    """A job's part in a call of several requests at once (see :meth:`Storage.write_together`,
    :meth:`Storage.read_together`)."""

    many: Callable[[list[Any]], list[Any]]
    argument: Any


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    transactional: bool = True  # writer only: False runs it outside the batch's transaction
    together: Together | None = None  # run with the batch's adjacent jobs of the same ``many`` at once


Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class DatabaseThread:
    """One thread with its own connection, running queued jobs in batches."""

    stall_note = ""  # what a caller failed by a stalled batch should know besides "retry later"

    def __init__(self, database: peewee.Database, name: str) -> None:
        self.database = database
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._handing_over: list[_Job] = []  # queued by the event loop during its current iteration
        self._waiting: set[asyncio.Future[Any]] = set()  # the callers' futures, until each is answered
        self._busy_since: float | None = None  # time.monotonic() when the running batch started
        self.stalled = False  # set by fail_if_stalled, cleared as the stalled batch ends
        self._failing = False  # whether an outage was logged and its end not yet (see _log_outage)
        self._failed_at = 0.0  # time.monotonic() of the last batch that failed with Unavailable
        self._worked_since_failure = False  # whether a batch has not failed since then
        self.log_outages = False  # whether to log them: not while starting (that error is the message) or closing
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[], R], *, transactional: bool = True, together: Together | None = None) -> R:
        """Queue ``fn`` and wait for its result. A caller that gives up before it starts (cancelled, a
        deadline) keeps it from running; once started it runs to the end.

        The jobs an event-loop iteration queues reach the thread together, right after the iteration:
        one wake-up of the thread, instead of one per job, each taking the GIL from the loop mid-work.

        While the running batch has stalled (see :meth:`fail_if_stalled`), Unavailable at once.
        """
        if self.stalled:
            raise Unavailable(f"the database has not answered for over {STALL_TIMEOUT:g} s; retry later")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._handing_over:
            loop.call_soon(self._hand_over)
        self._handing_over.append(_Job(fn, future, transactional, together))
        self._waiting.add(future)
        try:
            return await future
        finally:
            self._waiting.discard(future)

    def _stalled_for(self) -> float:
        """Seconds the running batch has run if that is over STALL_TIMEOUT, else 0."""
        busy_since = self._busy_since
        running_for = 0.0 if busy_since is None else time.monotonic() - busy_since
        return running_for if running_for > STALL_TIMEOUT else 0.0

    def fail_if_stalled(self) -> None:
        """If the running batch has stalled, mark this thread stalled and fail every caller of this loop still
        waiting with Unavailable: those whose jobs have not started never run them, and the stalled batch's
        may still take effect (its outcome is then dropped)."""
        stalled_for = self._stalled_for()
        self.stalled = bool(stalled_for)
        if not stalled_for:
            return
        loop = asyncio.get_running_loop()
        for future in [f for f in self._waiting if f.get_loop() is loop and not f.done()]:
            future.set_exception(
                Unavailable(f"the database has not answered for {stalled_for:.0f} s; retry later{self.stall_note}")
            )

    def _hand_over(self) -> None:
        jobs, self._handing_over = self._handing_over, []
        self._jobs.put(jobs)

    def stop(self) -> None:
        """Let the thread finish the queued jobs and end."""
        self._jobs.put(None)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            jobs = self._jobs.get()
            if jobs is None:
                return
            batch = list(jobs)
            while len(batch) < MAX_BATCH:
                try:
                    queued = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True
                    break
                batch += queued
            live = [job for job in batch if not job.future.done()]  # not given up (cancelled, or stalled)
            if live:
                self._busy_since = time.monotonic()
                try:
                    outcomes = self._run_batch(live)
                finally:
                    self._busy_since = None
                    self.stalled = False
                self._log_outage(outcomes)
                _answer(outcomes)

    def _log_outage(self, outcomes: list[Outcome]) -> None:
        """Log the first batch that fails with Unavailable (the database's failure, not a call's), and the
        first that does not once none has for RECOVERY_QUIET seconds: once per outage, not once per call.
        Log every corrupt part of the database met, once per batch."""
        errors = [error for _, _, error in outcomes if error is not None]  # seldom any
        if self.log_outages:
            for corruption in {id(error): error for error in errors if isinstance(error, DataLoss)}.values():
                log.error("%s", corruption.message)
        failure = next((error for error in errors if isinstance(error, Unavailable)), None)
        now = time.monotonic()
        quiet = now - self._failed_at >= RECOVERY_QUIET
        if failure is not None:
            if self._failing and self._worked_since_failure and quiet:  # the last outage ended, unlogged
                self._end_outage()
            if self.log_outages and not self._failing:
                log.warning("database calls on %s fail: %s", self._thread.name, failure.message)
            self._failing, self._failed_at, self._worked_since_failure = True, now, False
        elif self._failing:
            self._worked_since_failure = True
            if quiet:
                self._end_outage()

    def _end_outage(self) -> None:
        if self.log_outages:
            log.info("database calls on %s work again", self._thread.name)
        self._failing = False

    def _run_batch(self, batch: list[_Job]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for group in _together(batch):
            try:
                results = call_translating_errors(self.database, _run_group, group)
            except Exception as exc:
                results = [(None, exc)] * len(group)
            outcomes += [(job.future, result, error) for job, (result, error) in zip(group, results, strict=True)]
        return outcomes


class _RunWithSavepoints(Exception):
    """A job of a batch run without savepoints failed: roll the batch back and run it again with them."""


class GroupCommitWriter(DatabaseThread):
    """The one writer thread. Jobs queued while a transaction commits are run together in the next one,
    all made durable by a single commit (one fsync), and only then is any caller answered.

    Consecutive jobs of a batch that are parts of the same write of several requests (see
    :meth:`Storage.write_together`) run as one call of it, with all their arguments.

    A batch first runs its jobs straight in the transaction. Should one fail (not a request that a write of
    several refuses: that wrote nothing, and gets its error), the transaction is rolled back (the failed job
    may have written part of its work) and the batch runs again with each job in
    its own savepoint (a job is a repository write, whose ``write_transaction()`` then nests as one), so
    the failing job rolls back only itself and gets its own error while the others commit. A job alone
    needs neither: its own ``write_transaction()`` is the transaction. A failure of the database itself
    (unreachable, locked, a lock wait timed out) fails the whole batch at once with UNAVAILABLE, rather
    than being met again by each job in turn.
    """

    stall_note = (
        " (the writes it was running when it stopped answering may still take effect once it does: retry "
        "with the same request_id or expected_version)"
    )

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        super().__init__(repository.database, "orders-db-writer")

    def _run_batch(self, batch: list[_Job]) -> list[Outcome]:
        outcomes = [self._run_one(job) for job in batch if not job.transactional]  # e.g. closing
        jobs = [job for job in batch if job.transactional]
        if len(jobs) <= 1:
            return outcomes + [self._run_one(job) for job in jobs]
        return outcomes + (self._run_together(jobs, savepoints=False) or self._run_together(jobs, savepoints=True))

    def _run_one(self, job: _Job) -> Outcome:
        try:
            return job.future, call_translating_errors(self.database, job.fn), None
        except Exception as exc:
            return job.future, None, exc

    def _run_together(self, jobs: list[_Job], *, savepoints: bool) -> list[Outcome] | None:
        """The jobs' outcomes, run in one transaction; None if, without savepoints, one of them failed."""
        results: list[tuple[Any, BaseException | None]] = []

        def run_all() -> None:
            with self._repository.write_batch(savepoints=savepoints):
                for group in [[job] for job in jobs] if savepoints else _together(jobs):
                    try:
                        results.extend(_run_group(group))
                    except Exception as exc:
                        error = translated(exc)
                        if isinstance(error, Unavailable):  # the database's failure, not the job's: all fail now
                            raise
                        if not savepoints:
                            raise _RunWithSavepoints from exc
                        results.append((None, error))

        try:
            call_translating_errors(self.database, run_all)
        except _RunWithSavepoints:
            return None
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is durable
            return [(job.future, None, exc) for job in jobs]
        return [(job.future, result, error) for job, (result, error) in zip(jobs, results, strict=True)]


def _together(jobs: list[_Job]) -> Iterator[list[_Job]]:
    """The jobs in order, in groups to run as one call: a run of parts of the same write (see
    :class:`Together`), or a job alone."""
    for _, group in itertools.groupby(jobs, key=lambda job: job if job.together is None else job.together.many):
        yield list(group)


def _run_group(jobs: list[_Job]) -> list[tuple[Any, BaseException | None]]:
    """Each job's result or error; a group of parts of one call (even a group of one) returns the errors of
    the requests it refused, which wrote nothing, so the batch's transaction goes on without them; it raises
    for anything else."""
    together = jobs[0].together
    if together is None:  # a job alone
        return [(jobs[0].fn(), None)]
    outcomes = together.many([job.together.argument for job in jobs])  # type: ignore[union-attr]  # all parts
    return [(None, outcome) if isinstance(outcome, OrderError) else (outcome, None) for outcome in outcomes]


def _answer(outcomes: list[Outcome]) -> None:
    """Hand the outcomes to their event loop(s), one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: its callers are gone
            loop.call_soon_threadsafe(_settle, settled)


def _settle(outcomes: list[Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # its caller gave up, or was told the database stalled
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def call_translating_errors(database: peewee.Database, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``fn``, reporting a database that cannot be reached or is locked as Unavailable.

    A connection the database server dropped (a restart, a terminated backend) is closed here, so this
    thread's next call opens a new one instead of failing on the dead one forever.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        error = translated(exc)
        if error is exc:
            raise
        _forget_lost_connection(database)
        raise error from exc


def translated(error: Exception) -> Exception:
    """``error``; or DataLoss for a corrupt database, Unavailable for one that cannot be reached or is locked,
    whose tables are gone, or that refuses the server's role."""
    cause = _behind_the_rollback(error)
    driver_error = _driver_error(cause)
    reason = _message(cause, driver_error)
    if _corrupt(driver_error):
        return DataLoss(
            f"the database is corrupt ({reason}); retrying will not help: the server's operator must restore it "
            "from a backup"
        )
    if _schema_missing(driver_error):
        return Unavailable(
            f"the database has lost the server's tables ({reason}): it was dropped or replaced while the server "
            "ran; the server's operator must restore it, or restart the server to start on an empty one"
        )
    if _permission_denied(driver_error):
        return Unavailable(
            f"the database refuses the server's role ({reason}); the server's operator must grant it back its "
            "privileges on the server's tables and sequences"
        )
    if isinstance(error, UNAVAILABLE_DATABASE):
        return Unavailable(f"the database is unavailable ({reason}); retry later")
    return error


def _why_unusable(error: BaseException) -> str:
    """Why the server cannot start on its database, given the error that made a start-up call Unavailable."""
    driver_error = _driver_error(error)
    reason = _message(error, driver_error)
    if _lock_wait_ended(error):
        return f"another process held its lock too long: {reason}"
    if _permission_denied(driver_error):
        return (
            f"its role lacks a privilege: {reason} (on an empty database it must be able to create tables; "
            "on one with the schema, to read and write its tables and sequences)"
        )
    if _connection_failed(driver_error):
        return f"cannot reach it: {reason}"
    return f"cannot use it: {reason}"


def _message(error: BaseException, driver_error: BaseException | None) -> str:
    """``error``'s message on one line: PostgreSQL's primary message alone, without the statement's text and
    the caret under it that its errors add on further lines."""
    primary = getattr(getattr(driver_error, "diag", None), "message_primary", None)
    return primary or " ".join(str(error).split())


SQLITE_CORRUPTION = {11, 26}  # SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB
POSTGRESQL_CORRUPTION = {"XX001", "XX002"}  # data_corrupted, index_corrupted
POSTGRESQL_UNDEFINED = {"42P01", "42703"}  # undefined_table, undefined_column
POSTGRESQL_INSUFFICIENT_PRIVILEGE = "42501"
# connection_exception, invalid_authorization_specification (no such role, a wrong password), invalid_catalog_name
# (no such database); and cannot_connect_now (57P03: starting up, shutting down)
POSTGRESQL_REFUSED_CONNECTION = {"08", "28", "3D"}


# A database that cannot be reached, is locked, or failed to read or write its files. peewee translates what
# the driver raises in its calls; a cursor's rows fetched later raise the driver's own errors (SQLite's).
UNAVAILABLE_DATABASE = (
    peewee.OperationalError,
    peewee.InterfaceError,
    sqlite3.OperationalError,
    sqlite3.InterfaceError,
)


def _driver_error(error: BaseException) -> BaseException | None:
    """The database driver's error behind ``error``: peewee's wraps it (raised while handling it), at times
    twice (a failed connect inside a transaction)."""
    found: BaseException | None = error
    while isinstance(found, peewee.PeeweeException):
        found = found.__context__
    return found


def _corrupt(driver_error: BaseException | None) -> bool:
    """Whether the driver's error says the database is corrupt."""
    sqlite_code = getattr(driver_error, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & 0xFF in SQLITE_CORRUPTION  # the primary code of an extended one
    return getattr(driver_error, "sqlstate", None) in POSTGRESQL_CORRUPTION


def _schema_missing(driver_error: BaseException | None) -> bool:
    """Whether the driver's error says a table or column the server made is not there."""
    if isinstance(driver_error, sqlite3.OperationalError):
        return str(driver_error).startswith(("no such table", "no such column"))
    return getattr(driver_error, "sqlstate", None) in POSTGRESQL_UNDEFINED


def _connection_failed(driver_error: BaseException | None) -> bool:
    """Whether the driver's error says PostgreSQL could not be connected to, or refused the connection."""
    if not hasattr(driver_error, "sqlstate"):  # not psycopg's
        return False
    sqlstate = driver_error.sqlstate
    return sqlstate is None or sqlstate[:2] in POSTGRESQL_REFUSED_CONNECTION or sqlstate == "57P03"


def _permission_denied(driver_error: BaseException | None) -> bool:
    """Whether the driver's error says the database refuses the server's role (a privilege revoked)."""
    return getattr(driver_error, "sqlstate", None) == POSTGRESQL_INSUFFICIENT_PRIVILEGE


def _behind_the_rollback(error: BaseException) -> BaseException:
    """The failure a failed rollback hides: when its COMMIT fails (disk full, an I/O error) SQLite rolls
    the transaction back itself, and peewee's own rollback then fails with "no transaction is active"."""
    while "no transaction is active" in str(error) and error.__context__ is not None:
        error = error.__context__
    return error


def _lock_wait_ended(error: BaseException | None) -> bool:
    """Whether ``error`` (peewee's, raised while handling the driver's) ended a wait for another session's
    lock: SQLite's busy timeout, PostgreSQL's lock timeout."""
    driver_error = error.__context__ if error is not None else None
    return "database is locked" in str(error) or getattr(driver_error, "sqlstate", None) == "55P03"


def _forget_lost_connection(database: peewee.Database) -> None:
    if database.is_closed():
        return
    connection = database.connection()
    if getattr(connection, "closed", False) or getattr(connection, "broken", False):  # psycopg's flags
        with contextlib.suppress(peewee.PeeweeException, OSError):
            database.close()


class Storage:
    """Runs repository calls off the event loop: writes on the group-commit writer thread, reads on a
    reader thread."""

    def __init__(self, url: str, *, retention_events: int = 0) -> None:
        self.url = url
        self.repository = Repository(open_database(url), retention_events)
        self._writer = GroupCommitWriter(self.repository)
        self._reader = DatabaseThread(self.repository.database, "orders-db-reader")
        self._stall_watch: asyncio.Task[None] | None = None
        self.stalled = False  # whether a storage thread's running batch has stalled (see DatabaseThread)
        self.on_stall_change: Callable[[bool], None] = lambda stalled: None  # called when that changes

    async def write(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn``, a repository write, on the writer thread, in a transaction shared with other queued writes."""
        return await self._writer.run(functools.partial(fn, *args, **kwargs))

    async def write_together(self, many: Callable[[list[A]], list[R | OrderError]], argument: A) -> R:
        """``single(many, argument)`` (see :func:`orders.storage.single`) on the writer thread; the calls of
        ``many`` queued together run as one, with all their arguments: a write that takes several requests
        at once (like ``Repository.create_orders``, one statement per table for them all)."""
        return await self._writer.run(functools.partial(single, many, argument), together=Together(many, argument))

    async def read(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` on the reader thread."""
        return await self._reader.run(functools.partial(fn, *args, **kwargs))

    async def read_together(self, many: Callable[[list[A]], list[R | OrderError]], argument: A) -> R:
        """``single(many, argument)`` on the reader thread; the calls of ``many`` queued together run as one,
        with all their arguments (like ``Repository.get_orders``: one statement for many GetOrders)."""
        return await self._reader.run(functools.partial(single, many, argument), together=Together(many, argument))

    async def open(self) -> None:
        """Connect, create or check the schema, and read the event log's bounds; DatabaseUnusable if that
        cannot be done. From then on, callers waiting on a batch that has run for over STALL_TIMEOUT get
        Unavailable, and so do new ones until it ends."""
        try:
            await self.write(self.repository.migrate)
            await self.read(self.repository.log_bounds)  # what the feed reads first: a corrupt log fails here
        except DataLoss as exc:  # a corrupt schema or event log
            raise DatabaseUnusable(str(exc.__cause__)) from exc
        except Unavailable as exc:
            raise DatabaseUnusable(_why_unusable(exc.__cause__ or exc)) from exc
        except peewee.DatabaseError as exc:  # e.g. a file that is not a SQLite database
            raise DatabaseUnusable(str(exc)) from exc
        self._stall_watch = asyncio.create_task(self._watch_for_stalls(), name="orders-db-stall-watch")
        self._writer.log_outages = self._reader.log_outages = True

    async def _watch_for_stalls(self) -> None:
        while True:
            await asyncio.sleep(STALL_CHECK_INTERVAL)
            for thread in (self._writer, self._reader):
                thread.fail_if_stalled()
            stalled = self._writer.stalled or self._reader.stalled
            if stalled != self.stalled:
                if stalled:
                    log.warning("the database has not answered for %g s; calls fail with UNAVAILABLE", STALL_TIMEOUT)
                else:
                    log.info("the database answers again")
                self.stalled = stalled
                self.on_stall_change(stalled)

    @property
    def is_postgresql(self) -> bool:
        """True on PostgreSQL, which announces other processes' commits (see :meth:`listen_for_commits`)."""
        return is_postgresql(self.repository.database)

    def listen_for_commits(self, on_commit: Callable[[], None]) -> asyncio.Task[None] | None:
        """PostgreSQL: a task calling ``on_commit`` whenever any process commits status events, until
        cancelled. None on SQLite, whose other writers are only seen by polling the log."""
        if not self.is_postgresql:
            return None
        return asyncio.create_task(listen_for_commits(self.repository.database, on_commit), name="orders-listener")

    async def close(self, timeout: float | None = None) -> bool:
        """Close each thread's connection and stop the threads; False if that took over ``timeout`` s, or a
        thread has stalled.

        Work still running on a thread (a write waiting for another process's lock, say) is waited for
        at most ``timeout`` s (None: as long as it takes). On False the threads are left to the end of the
        process, where SQLite discards any transaction they had not committed, as after a crash.
        """
        self._writer.log_outages = self._reader.log_outages = False
        if self._stall_watch is not None:
            self._stall_watch.cancel()
        try:
            await asyncio.wait_for(self._close_threads(), timeout)
        except (TimeoutError, Unavailable):
            return False
        return True

    async def _close_threads(self) -> None:
        close = self.repository.database.close
        await self._writer.run(close, transactional=False)
        self._writer.stop()
        await self._reader.run(close)
        self._reader.stop()
