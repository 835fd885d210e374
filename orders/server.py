"""The server process: configuration, health, reflection, signals, and the startup line.

``python -m orders.server`` and ``orders serve`` both land in :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server

from orders import _grpclib_fixes  # noqa: F401  (ignore unknown HTTP/2 frame types)
from orders._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from orders.auth import SecurityConfigError, TokenGuard, is_loopback, keep_headers_out_of_logs, server_ssl_context
from orders.calls import CallGuard, CallMiddleware, CallObserver, StrictProtoCodec, log_access
from orders.config import ServerConfig, add_server_arguments, config_from_args, redacted
from orders.connections import Connections
from orders.health import ServerHealth
from orders.limits import MessageSizeLimit, StreamLimits
from orders.observability import Metrics, log_access_json, use_json_logging
from orders.service import OrderService, new_feed
from orders.storage import DatabaseUnusable
from orders.storage_threads import Storage
from orders.workers import supervise

log = logging.getLogger("orders.server")  # not __name__: also under `python -m orders.server`, where that is __main__

AFTER_GRACE = 0.5  # seconds each step of a shutdown still gets once the grace period is used up
LINGER = 0.2  # seconds a drained server keeps refusing calls before it closes the connections
STREAM_END_WAIT = 1.0  # seconds the streams get to end as told, before those stuck (a client not reading) are ended
# How often the feed reads the event log for commits made by other processes. PostgreSQL announces them
# (LISTEN/NOTIFY), so the poll is only a safety net; SQLite has no such signal, so sibling workers poll
# often: one indexed read of the log's tail.
POLL_INTERVAL = 0.25
SQLITE_SIBLING_POLL_INTERVAL = 0.02
LISTEN_BACKLOG = 100  # connections waiting to be accepted (grpclib's default)
GC_YOUNG_THRESHOLD = 7_000  # allocations between collections of the youngest generation (Python's default: 700)

# Reflection serves our own descriptors plus grpc.health.v1 and itself, so grpcurl needs no proto files.
_DESCRIPTORS = default_google_proto_descriptor_pool
for _module in (health_pb2, reflection_v1_pb2, reflection_v1alpha_pb2):
    _DESCRIPTORS.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
_REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


def _dual_stack_socket(host: str, port: int, reuse_port: bool) -> socket.socket | None:
    """For ``::``, a listening socket that takes IPv4 clients too, as gRPC's ``[::]`` does (asyncio would
    make it IPv6-only); None for any other host, or where the system has no dual-stack sockets."""
    if host != "::" or not socket.has_dualstack_ipv6():
        return None
    return socket.create_server(
        (host, port), family=socket.AF_INET6, backlog=LISTEN_BACKLOG, reuse_port=reuse_port, dualstack_ipv6=True
    )


class OrderServer:
    """One running orders server: storage, event feed, grpclib server with health and reflection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # First what can refuse the configuration (SecurityConfigError): nothing has started yet.
        token_guard = TokenGuard(config.token) if config.token is not None else None
        # Built now, so unreadable or mismatched files fail before anything starts.
        self._ssl = server_ssl_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        self.storage = Storage(config.db, retention_events=config.retention_events)  # starts its threads
        siblings_unannounced = config.workers > 1 and not self.storage.is_postgresql
        self.feed = new_feed(self.storage, SQLITE_SIBLING_POLL_INTERVAL if siblings_unannounced else POLL_INTERVAL)
        self.service = OrderService(self.storage, self.feed)
        self.health = ServerHealth(self.service)  # for "" and for orders.v1.OrderService
        # NOT_SERVING while the log cannot be read, or the database does not answer
        self.feed.on_readable_change = self.storage.on_stall_change = self._update_health
        services = [self.service, self.health]
        handlers = ServerReflection.extend(services, pool=_DESCRIPTORS)
        for reflection in handlers[len(services) :]:  # list the reflection services too, as grpcio servers do
            reflection._service_names = [*reflection._service_names, *_REFLECTION_SERVICES]
        guards: list[CallGuard] = []  # admission: auth, limits
        if token_guard is not None:  # first, so no other guard spends anything on an unauthenticated call
            guards.append(token_guard)
        keep_headers_out_of_logs()  # clients may send tokens even when this server wants none
        self.stream_limits = StreamLimits(config.max_watchers, config.max_streams_per_connection)
        guards += [self.stream_limits, MessageSizeLimit(config.max_message_bytes)]
        observers: list[CallObserver] = [log_access_json if config.log_format == "json" else log_access]
        self.metrics: Metrics | None = None  # Prometheus, with --metrics-port
        if config.metrics_port is not None:
            self.metrics = Metrics(self.feed, (path for handler in handlers for path in handler.__mapping__()))
            observers.append(self.metrics.observe)
        self.metrics_port: int | None = None
        self._calls = CallMiddleware(guards, observers)
        self._server = Server(handlers, codec=StrictProtoCodec())
        # gRPC metadata values are ASCII, and grpclib has h2 decode headers as such: one byte outside it (a
        # raw client's "café") raised UnicodeDecodeError inside grpclib, which dropped the whole connection
        # and every call on it. Latin-1 decodes any byte, so such a value just reaches no header we read.
        self._server._h2_config.header_encoding = "latin-1"
        self._calls.install(self._server)
        # the open ones, to close them on stop()
        self._connections = Connections(self._server, config.max_streams_per_connection)
        self._commit_listener: asyncio.Task[None] | None = None  # PostgreSQL LISTEN: other replicas' commits
        self.port = 0
        self.abandoned_database_work = False  # set by stop() when a storage thread would not finish
        self._hurry = asyncio.Event()  # set by hurry(): the grace period is over

    def _update_health(self, _: bool) -> None:
        self.health.set_serving(self.feed.log_readable and not self.storage.stalled)

    async def start(self) -> int:
        """Open the database, start serving, and return the port actually bound.

        Raises DatabaseUnusable, or OSError when a port cannot be listened on; either way, and when
        cancelled, what had started is stopped again (the storage threads too, given AFTER_GRACE to
        finish: a connect or lock wait still running is left to the end of the process).
        """
        try:
            await self.storage.open()
        except (DatabaseUnusable, asyncio.CancelledError):
            await self.storage.close(timeout=AFTER_GRACE)
            raise
        try:
            await self.feed.start()
            self._commit_listener = self.storage.listen_for_commits(self.feed.notify)
            if self.metrics is not None and self.config.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.start(self.config.host, self.config.metrics_port)
                except OSError as exc:  # say which port: --port is the one anybody would suspect
                    raise OSError(exc.errno, f"--metrics-port {self.config.metrics_port}: {exc.strerror}") from exc
            # With --workers, every worker listens on the same port and the kernel spreads connections.
            reuse_port = self.config.workers > 1
            sock = _dual_stack_socket(self.config.host, self.config.port, reuse_port)
            if sock is not None:
                await self._server.start(sock=sock, ssl=self._ssl)
            else:
                host, port = self.config.host, self.config.port
                await self._server.start(host, port, ssl=self._ssl, reuse_port=reuse_port or None)
        except (OSError, asyncio.CancelledError):
            await self.feed.close()
            if self._commit_listener is not None:
                self._commit_listener.cancel()
            if self.metrics is not None:
                await self.metrics.stop()
            await self.storage.close(timeout=AFTER_GRACE)
            raise
        sockets = self._server._server.sockets if self._server._server else ()
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        return self.port

    def hurry(self) -> None:
        """End the grace period of the stop under way now: the calls still running are cancelled at once."""
        if not self._hurry.is_set():
            log.warning("told again to stop: cancelling the calls still running")
            self._hurry.set()

    async def stop(self) -> None:
        """Drain: refuse new calls, end streams with UNAVAILABLE, let unary calls finish (for up to --grace
        seconds, or until :meth:`hurry`), close the database."""
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + self.config.grace

        def grace_left() -> float:
            return 0.0 if self._hurry.is_set() else max(grace_ends - loop.time(), 0.0)

        self._server._server.close()  # stop accepting connections
        self._calls.refuse_new_calls()  # before the streams end: a client told to reconnect must not get in
        self.health.drain()
        await self.feed.close()  # the order streams end (with UNAVAILABLE and where to resume)...
        await self._calls.end_streams(min(STREAM_END_WAIT, self.config.grace))  # ... or are ended
        if self._commit_listener is not None:
            self._commit_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._commit_listener
        if not await self._calls.drain(grace_left(), cut_short=self._hurry) and not self._hurry.is_set():
            log.warning("calls still running after %.1fs grace; cancelling them", self.config.grace)
        self._server.close()  # cancels the calls still running: each ends with UNAVAILABLE
        await self._calls.drain(AFTER_GRACE)
        # Linger a moment first, so that a call sent just as the last one was answered is refused with
        # UNAVAILABLE (clearly not done, safe to retry) instead of being cut off with its connection.
        if self._connections:
            await asyncio.sleep(min(LINGER, grace_left()))
        # Then close the clients' connections, which a client may keep open forever: since Python 3.12.1
        # asyncio's Server.wait_closed (under grpclib's) waits until every connection has ended.
        self._connections.close_all()
        try:
            await asyncio.wait_for(self._server.wait_closed(), max(grace_left(), AFTER_GRACE))
        except TimeoutError:
            log.warning("connections still open after the grace period; leaving them to the process exit")
        # A cancelled call's database work may still hold a storage thread (a write waiting for another
        # process's lock waits out SQLite's busy timeout): give it what is left of the grace period only.
        if not await self.storage.close(timeout=max(grace_left(), AFTER_GRACE)):
            log.warning("database work of cancelled calls still running; abandoning it")
            self.abandoned_database_work = True
        if self.metrics is not None:
            await self.metrics.stop()

    async def __aenter__(self) -> OrderServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def tune_garbage_collection() -> None:
    """Make the collector cheaper for a long-running server: what start-up made (modules, message
    descriptors, the schema) is frozen out of its sight, so a full collection scans only what calls
    created since, and the youngest generation is collected every GC_YOUNG_THRESHOLD allocations
    instead of 700, most of its objects (a call's) having died by then.

    Measured under CreateOrder load: garbage collection took 380 ms of a 7 s run before (three full
    collections of 40-46 ms) and 210 ms after (one of 34 ms).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def announce(port: int) -> None:
    """The startup line: printed (and flushed) once the server accepts connections. A server that cannot
    say so (standard output closed, a full disk) exits with one line saying why."""
    try:
        print(f"Server started on port {port}", flush=True)
    except OSError as exc:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nor at exit, where Python flushes it again)
        raise SystemExit(f"orders serve: cannot write the startup line to standard output: {exc}") from None


class StoppedWhileStarting(Exception):
    """A stop signal arrived while the server was still starting (waiting for its database, say): it was
    stopped without having served."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"orders serve: stopped by {signum.name} while starting, before serving")
        self.signum = signum


def graceful_stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a server gracefully: SIGINT (Ctrl-C), SIGTERM, and SIGHUP (its terminal
    closed), unless SIGHUP is ignored, as under ``nohup``."""
    hang_up = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hang_up)


async def serve(
    config: ServerConfig,
    on_started: Callable[[int], None] = announce,
    stop_signals: Sequence[signal.Signals] | None = None,
) -> None:
    """Run a server until one of ``stop_signals`` (by default :func:`graceful_stop_signals`), then shut it
    down gracefully; a second one ends the grace period at once. One that arrives while the server is still
    starting cancels the start-up (a database that does not answer is not waited for): StoppedWhileStarting."""
    stop = asyncio.Event()
    told: list[signal.Signals] = []  # the stop signals received, in order
    serving: OrderServer | None = None  # once started

    def stop_or_hurry(signum: signal.Signals) -> None:
        """The first signal stops the server gracefully; another (a second Ctrl-C) ends the grace period."""
        told.append(signum)
        if stop.is_set() and serving is not None:
            serving.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in graceful_stop_signals() if stop_signals is None else stop_signals:
        loop.add_signal_handler(signum, stop_or_hurry, signum)
    try:
        order_server = OrderServer(config)
    except SecurityConfigError as exc:  # a bad token, certificate or key: one clear line, no traceback
        raise SystemExit(f"orders serve: {exc}") from None
    except DatabaseUnusable as exc:  # no driver for it
        raise _unusable(config, exc) from None
    try:
        started = await _unless_stopped(order_server.start(), stop)
    except DatabaseUnusable as exc:
        raise _unusable(config, exc) from None
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        raise SystemExit(f"orders serve: cannot listen: {exc}") from None
    if not started:
        raise StoppedWhileStarting(told[0])
    serving = order_server
    tune_garbage_collection()
    try:
        on_started(order_server.port)
        await stop.wait()
        log.info("shutting down")
    finally:
        await order_server.stop()
    log.info("stopped")
    if order_server.abandoned_database_work:
        # The interpreter would join the stuck storage thread at exit (up to the busy timeout, or forever
        # on a hung connection). Nothing acknowledged depends on it: end the process now, still exit 0.
        logging.shutdown()
        os._exit(0)


async def _unless_stopped(work: Coroutine[Any, Any, object], stop: asyncio.Event) -> bool:
    """Run ``work`` to its end (raising what it raises) and return True; unless ``stop`` is set first: then
    cancel ``work``, wait for it to clean up, and return False."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return False
    task.result()
    return True


def die_of(signum: signal.Signals) -> NoReturn:
    """End the process as ``signum`` ends one that does not handle it: its parent sees it killed by that
    signal (a shell's ``$?`` is 128 + its number), as before the server's handlers are installed."""
    logging.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the signal ends the process first


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``: text lines, or (``json``) one JSON object per line. Below ``debug``,
    grpclib's own notes on calls cancelled or out of time are left out (its warnings and errors are not):
    the access log already has a line for every call, with its code."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if level != "debug":
        logging.getLogger("grpclib.server").setLevel(max(logging.WARNING, logging.getLogger().level))
    if log_format == "json":
        use_json_logging()


def _unusable(config: ServerConfig, exc: DatabaseUnusable) -> SystemExit:
    reason = " ".join(line.strip() for line in str(exc).splitlines())  # one line, though drivers' may be several
    return SystemExit(f"orders serve: the database {redacted(config.db)} is unusable: {reason}")


async def prepare_database(config: ServerConfig) -> None:
    """Create, upgrade or check the schema of ``config.db``, or exit with one line saying why not. A stop
    signal (:func:`graceful_stop_signals`) meanwhile cancels it: StoppedWhileStarting. The signals' handlers
    from before are in place again afterwards.

    ``--workers N`` does this once before starting the workers: a schema upgrade that outlasted the
    database's busy timeout would otherwise leave every worker but the upgrading one unable to start.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    told: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        told.append(signum)
        stop.set()

    handlers = {signum: signal.getsignal(signum) for signum in graceful_stop_signals()}
    for signum in handlers:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        storage = Storage(config.db, retention_events=config.retention_events)
        try:
            opened = await _unless_stopped(storage.open(), stop)
        finally:
            await storage.close(timeout=AFTER_GRACE)
        if not opened:
            raise StoppedWhileStarting(told[0])
    except DatabaseUnusable as exc:
        raise _unusable(config, exc) from None
    finally:
        _restore(loop, handlers)


def _restore(loop: asyncio.AbstractEventLoop, handlers: dict[signal.Signals, Any]) -> None:
    """Put ``handlers`` back in place of the loop's, with their signals held back meanwhile: one arriving
    in between would otherwise meet the default action, the end of the process."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, handlers)
    try:
        for signum, handler in handlers.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run(config: ServerConfig) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP: in this process, or with ``--workers N`` in N worker processes.

    A start-up error is one line on stderr and exit 1; with ``--log-format json``, one JSON log record. A stop
    signal during start-up is one such line too, and the process then ends killed by that signal.
    """
    configure_logging(config.log_level, config.log_format)
    if config.token is not None and config.tls_cert is None and not is_loopback(config.host):
        log.warning(
            "serving %s with a bearer token but without TLS: the clients' token crosses the network in clear "
            "text; give --tls-cert and --tls-key",
            config.host,
        )
    try:
        if config.workers > 1:
            sys.exit(supervise(config, announce))
        asyncio.run(serve(config))
    except StoppedWhileStarting as stopped:
        if config.log_format == "json":
            log.warning("%s", stopped)
        else:
            with contextlib.suppress(OSError):  # stderr gone: the exit status still says it
                print(stopped, file=sys.stderr, flush=True)
        die_of(stopped.signum)
    except SystemExit as refusal:
        if config.log_format != "json" or not isinstance(refusal.code, str):
            raise
        log.error("%s", refusal.code)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m orders.server``."""
    parser = argparse.ArgumentParser(prog="orders serve", description="Run the orders gRPC server.")
    add_server_arguments(parser)
    run(config_from_args(parser.parse_args(argv), parser))


if __name__ == "__main__":
    # As the module orders.server, which the supervisor of --workers imports too: the StoppedWhileStarting it
    # raises is then the one run() catches.
    import orders.server

    orders.server.main()
