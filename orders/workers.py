"""``--workers N``: N server processes on one port (``SO_REUSEPORT``) and one database.

The supervisor (the process ``orders serve --workers N`` starts as) runs no server itself. It creates
or upgrades the database's schema once (:func:`orders.server.prepare_database`), then starts N
worker processes, each a complete server exactly like ``--workers 1`` but bound with ``SO_REUSEPORT``,
so the kernel spreads new connections over them and a 2-core machine uses both cores. Workers share
nothing but the database: a change made through any of them reaches watchers on all of them through
the event log (PostgreSQL: LISTEN/NOTIFY wakes them at once; SQLite: each polls the log's head), which
is also how separate replicas on several machines work.

It prints ``Server started on port N`` once every worker accepts connections; SIGTERM, SIGINT or SIGHUP
is passed on to every worker (as SIGTERM: a worker ignores the SIGINT a Ctrl-C, or the SIGHUP a closed
terminal, sends the whole process group), each drains as a single server does, and the supervisor exits 0
once all have; a second signal is passed on too, and ends the workers' grace period at once. One that
arrives before every worker listens (as the database is prepared, or the workers wait for it) is not
waited out: the workers are stopped at once, and the supervisor ends as a single server told to stop
while starting does, with one line, killed by that signal. A worker that dies on its own is replaced, and
so is one that hangs: each worker's event loop sends the supervisor a beat every second, and a worker
silent for ``SILENCE_LIMIT`` seconds (a blocked loop, a stopped process) is killed and replaced, since it
would otherwise keep taking its share of new connections and answer none. A supervisor killed outright
(``kill -9``, the OOM killer) takes its workers with it (on Linux), so that none is left holding the
port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from types import FrameType

from orders.config import ServerConfig

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds a worker gets to open the database and start listening
CHECK_INTERVAL = 0.2  # seconds between the supervisor's looks at whether it was told to stop
RESTART_DELAY = 1.0  # seconds before a worker that died is replaced, so a crash loop does not spin
BEAT_INTERVAL = 1.0  # seconds between a worker's beats to the supervisor
# Seconds without a beat after which a worker is taken as hung: half a client's default deadline (10 s), so
# that writes through the other workers, waiting for the write lock a hung worker may hold, finish in theirs.
SILENCE_LIMIT = 5.0
STOP_MARGIN = 5.0  # seconds a worker gets to exit after SIGTERM beyond --grace, before SIGKILL
LONGEST_JOIN = 3600.0  # seconds of one wait for a process to end (poll(2) takes at most 24 days; --grace more)
# What a terminal sends its whole process group (Ctrl-C, hang-up): the supervisor relays it to the workers.
GROUP_SIGNALS = (signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal this process gets when its parent dies


def supervise(config: ServerConfig, on_started: Callable[[int], None]) -> int:
    """Prepare the database, then run ``config.workers`` worker processes until SIGTERM, SIGINT or SIGHUP,
    calling ``on_started`` with the port once they all accept connections; the exit code for the supervisor.
    Should anything fail (``on_started`` included), the workers are stopped before the error goes on. A
    signal before every worker listens stops them, and raises StoppedWhileStarting."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop or threads
    stopping: signal.Signals | None = None  # the first signal, once told to stop
    workers: list[_Worker] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping is not None:  # told again (a second Ctrl-C): so is each worker, which then ends its grace period
            for worker in workers:
                if worker.process.exitcode is None:
                    worker.process.terminate()
            return
        stopping = signal.Signals(signum)

    def told_to_stop() -> bool:
        return stopping is not None

    from orders.server import StoppedWhileStarting, graceful_stop_signals, prepare_database

    for signum in graceful_stop_signals():
        signal.signal(signum, stop)
    asyncio.run(prepare_database(config))
    with contextlib.ExitStack() as reserved:
        try:
            port = reserved.enter_context(_reserved_port(config))
        except OSError as exc:  # the port is taken, or the host is not an address of this machine
            raise SystemExit(f"orders serve: cannot listen: {exc}") from None
        config = dataclasses.replace(config, port=port)
        workers += [_start(context, config, index) for index in range(config.workers)]
        failures = [failure for worker in workers if (failure := _ready(worker, told_to_stop)) is not None]
        if failures:  # the same reason, most likely, for every worker: said once
            _stop_all([worker.process for worker in workers], STOP_MARGIN)
            raise StoppedWhileStarting(stopping) if stopping is not None else SystemExit(failures[0])
    try:
        if stopping is None:  # told to stop just as the last worker started: none has served, so say nothing
            on_started(port)
        _look_after(workers, context, config, told_to_stop)
    finally:
        exit_code = _stop_all([worker.process for worker in workers], config.grace + STOP_MARGIN)
    return exit_code


def _look_after(
    workers: list[_Worker],
    context: multiprocessing.context.SpawnContext,
    config: ServerConfig,
    stopping: Callable[[], bool],
) -> None:
    """Until ``stopping()``: replace each worker that exits, and kill (then replace) each that falls silent."""
    while not stopping():
        multiprocessing.connection.wait(
            [w.process.sentinel for w in workers] + _open_pipes(workers), timeout=CHECK_INTERVAL
        )
        for index, worker in enumerate(workers):
            if stopping():
                break
            silent_for = worker.listen()
            if worker.process.exitcode is None and silent_for > SILENCE_LIMIT:
                log.error("%s silent for %.0f s (hung or stopped); killing it", worker, silent_for)
                worker.process.kill()
                worker.process.join()
            if worker.process.exitcode is not None:
                log.error("%s exited with %s; starting a new one", worker, worker.process.exitcode)
                worker.beats.close()
                time.sleep(RESTART_DELAY)
                replacement = _start(context, config, index)
                failure = _ready(replacement, stopping)
                if failure is None or stopping():  # when stopping, stopped with the others
                    workers[index] = replacement
                else:
                    log.error("%s", failure)


@dataclasses.dataclass
class _Worker:
    """A worker process, the pipe it reports on (first its port once it listens, then a beat a second), and
    when the supervisor last heard from it."""

    process: BaseProcess
    beats: multiprocessing.connection.Connection
    heard: float = 0.0

    def __str__(self) -> str:
        return f"{self.process.name} (pid {self.process.pid})"

    def listen(self) -> float:
        """Take the beats that have arrived, and return the seconds since the last one. A pipe at its end
        means the worker is exiting (its sentinel tells the rest)."""
        now = time.monotonic()
        try:
            while not self.beats.closed and self.beats.poll():
                self.beats.recv_bytes()
                self.heard = now
        except (EOFError, OSError):
            self.beats.close()
        return now - self.heard


def _open_pipes(workers: list[_Worker]) -> list[multiprocessing.connection.Connection]:
    return [worker.beats for worker in workers if not worker.beats.closed]


def _start(context: multiprocessing.context.SpawnContext, config: ServerConfig, index: int) -> _Worker:
    receive, send = context.Pipe(duplex=False)
    metrics_port = config.metrics_port and config.metrics_port + index  # None: off; 0: each picks a free one
    worker_config = dataclasses.replace(config, metrics_port=metrics_port)
    process = context.Process(target=_worker, args=(worker_config, send, os.getpid()), name=f"orders-worker-{index}")
    with _blocked_in_children(GROUP_SIGNALS):
        process.start()
    send.close()
    return _Worker(process, receive)


@contextlib.contextmanager
def _blocked_in_children(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """``signals`` blocked in the processes started meanwhile, which keep their signal mask across exec: a
    worker does not take a Ctrl-C to the group while it imports the server, before it can ignore it (a
    traceback, or a fatal error, before). Here they are held back meanwhile, and reach the handlers after."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    # multiprocessing starts its resource tracker with the first process, and unblocks SIGINT once it has:
    # started here, it takes the mask too (a SIGHUP to the group would end it, as it ignores only SIGINT and
    # SIGTERM), and the mask is set again after.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _ready(worker: _Worker, stopping: Callable[[], bool]) -> str | None:
    """Wait for the worker to report that it listens: None once it has; else why it did not start (its own
    one-line start-up error, or that it exited or timed out first), or that the supervisor was told to stop
    first (then the worker is left running, to be stopped with the others)."""
    process, ready = worker.process, worker.beats
    reason = None
    give_up = time.monotonic() + START_TIMEOUT
    while not (reported := ready.poll(CHECK_INTERVAL)) and time.monotonic() < give_up:
        if stopping():
            return f"orders serve: {worker} had not started when told to stop"
    if not reported:  # still starting: give up on it
        _stop_all([process], STOP_MARGIN)
    else:
        try:
            report = ready.recv()
        except EOFError:  # it is exiting before it was ready, without a word
            pass
        else:
            if isinstance(report, int):  # its port: it listens
                worker.heard = time.monotonic()
                return None
            reason = report
    ready.close()
    process.join()
    return reason or f"orders serve: worker {process.name} did not start (exit code {process.exitcode})"


def _stop_all(processes: list[BaseProcess], patience: float) -> int:
    """SIGTERM every worker still running, SIGKILL those still running ``patience`` seconds later (a hung or
    stopped one never ends otherwise), and wait for all; 0 if every one exited cleanly: with 0 (it drained),
    or killed by the SIGTERM (it was still starting, and never served)."""
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            process.terminate()
    deadline = time.monotonic() + patience
    for process in processes:
        while process.exitcode is None and (left := deadline - time.monotonic()) > 0:
            process.join(min(left, LONGEST_JOIN))
        if process.exitcode is None:
            log.error("%s (pid %s) still running %.0f s after SIGTERM; killing it", process.name, process.pid, patience)
            process.kill()
            process.join()
    return 0 if all(process.exitcode in (0, -signal.SIGTERM) for process in processes) else 1


def _worker(config: ServerConfig, ready: multiprocessing.connection.Connection, supervisor: int) -> None:
    """A worker process: one complete server on the shared port, until it or its supervisor stops."""
    from orders.server import StoppedWhileStarting, configure_logging, die_of, serve

    _end_with(supervisor)
    # A Ctrl-C, or the terminal's hang-up, reaches every process of the terminal's group: a worker stops
    # when its supervisor relays it. Started with them blocked (see _blocked_in_children), it drops any that
    # came meanwhile.
    for signum in GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    configure_logging(config.log_level, config.log_format)

    def started(port: int) -> None:
        ready.send(port)
        os.set_blocking(ready.fileno(), False)  # a beat the supervisor does not take is dropped, never waited on
        _beat(ready, asyncio.get_running_loop())

    with ready:
        try:
            asyncio.run(serve(config, on_started=started, stop_signals=(signal.SIGTERM,)))
        except SystemExit as refusal:  # a one-line start-up error: the supervisor says it, once for all workers
            if not isinstance(refusal.code, str):
                raise
            ready.send(refusal.code)
            sys.exit(1)
        except StoppedWhileStarting as stopped:  # by the supervisor, which speaks for the workers
            die_of(stopped.signum)
    sys.exit(0)


def _beat(pipe: multiprocessing.connection.Connection, loop: asyncio.AbstractEventLoop) -> None:
    """Tell the supervisor that this worker's event loop runs, and again every BEAT_INTERVAL seconds."""
    with contextlib.suppress(OSError):  # the pipe is full (the supervisor is paused) or gone (being stopped)
        pipe.send_bytes(b"")
    loop.call_later(BEAT_INTERVAL, _beat, pipe, loop)


def _end_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when ``supervisor`` dies, however it dies;
    a no-op where ``prctl`` is missing (not Linux)."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _reserved_port(config: ServerConfig) -> Iterator[int]:
    """The port the workers share: ``config.port``, or for port 0 a free one, held (bound with
    SO_REUSEPORT but not listening, so it takes no connections) until the workers listen on it.

    A given port is first bound without SO_REUSEPORT, and let go: that fails (``OSError``) if anything
    listens on it, such as another ``--workers`` server, whose SO_REUSEPORT sockets the workers'
    would otherwise join, splitting the connections between two servers without a word.
    """
    family, kind, protocol, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, protocol) as reserved:
        if config.port:
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers: TIME_WAIT is no owner
            reserved.bind(address)
            reserved.close()
            yield config.port
            return
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
        yield reserved.getsockname()[1]
