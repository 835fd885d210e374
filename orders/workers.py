"""``--workers N``: N server processes on one port (``SO_REUSEPORT``) and one database.

The supervisor (the process ``orders serve --workers N`` starts as) runs no server itself. It creates
or upgrades the database's schema once (:func:`orders.server.prepare_database`), then starts N
worker processes, each a complete server exactly like ``--workers 1`` but bound with ``SO_REUSEPORT``,
so the kernel spreads new connections over them and a 2-core machine uses both cores. Workers share
nothing but the database: a change made through any of them reaches watchers on all of them through
the event log (PostgreSQL: LISTEN/NOTIFY wakes them at once; SQLite: each polls the log's head), which
is also how separate replicas on several machines work.

It prints ``Server started on port N`` once every worker accepts connections; SIGTERM or SIGINT is
passed on to every worker, each drains as a single server does, and the supervisor exits 0 once all
have. A worker that dies on its own is replaced; a supervisor killed outright (``kill -9``, the OOM
killer) takes its workers with it (on Linux), so that none is left holding the port.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from types import FrameType

from orders.config import ServerConfig

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds a worker gets to open the database and start listening
RESTART_DELAY = 1.0  # seconds before a worker that died is replaced, so a crash loop does not spin
PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal this process gets when its parent dies


def supervise(config: ServerConfig) -> int:
    """Run ``config.workers`` worker processes until SIGTERM/SIGINT; the exit code for the supervisor."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop or threads
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    with contextlib.ExitStack() as reserved:
        try:
            port = reserved.enter_context(_reserved_port(config))
        except OSError as exc:  # the port is taken, or the host is not an address of this machine
            raise SystemExit(f"orders serve: cannot listen: {exc}") from None
        config = dataclasses.replace(config, port=port)
        workers = [_start(context, config, index) for index in range(config.workers)]
        if not all(_ready(worker, ready) for worker, ready in workers):
            _stop_all([worker for worker, _ in workers])
            return 1
    print(f"Server started on port {port}", flush=True)
    processes = [worker for worker, _ in workers]
    while not stopping:
        multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.2)
        for index, process in enumerate(processes):
            if process.exitcode is not None and not stopping:
                log.error("worker %d (pid %s) exited with %s; starting a new one", index, process.pid, process.exitcode)
                time.sleep(RESTART_DELAY)
                replacement, ready = _start(context, config, index)
                processes[index] = replacement if _ready(replacement, ready) else process
    return _stop_all(processes)


def _start(
    context: multiprocessing.context.SpawnContext, config: ServerConfig, index: int
) -> tuple[BaseProcess, multiprocessing.connection.Connection]:
    receive, send = context.Pipe(duplex=False)
    metrics_port = config.metrics_port and config.metrics_port + index  # None: off; 0: each picks a free one
    worker_config = dataclasses.replace(config, metrics_port=metrics_port)
    process = context.Process(target=_worker, args=(worker_config, send, os.getpid()), name=f"orders-worker-{index}")
    process.start()
    send.close()
    return process, receive


def _ready(process: BaseProcess, ready: multiprocessing.connection.Connection) -> bool:
    """Wait for the worker to report that it listens; False if it exited or timed out first."""
    with ready:
        if not ready.poll(START_TIMEOUT):  # still starting: give up on it
            process.terminate()
        else:
            try:
                ready.recv()
                return True
            except EOFError:  # it is exiting before it was ready; its own error goes to stderr
                pass
    process.join()
    log.error("worker %s did not start (exit code %s)", process.name, process.exitcode)
    return False


def _stop_all(processes: list[BaseProcess]) -> int:
    """SIGTERM every worker still running and wait for all; 0 if every one exited cleanly."""
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            process.terminate()
    for process in processes:
        process.join()
    return 0 if all(process.exitcode == 0 for process in processes) else 1


def _worker(config: ServerConfig, ready: multiprocessing.connection.Connection, supervisor: int) -> None:
    """A worker process: one complete server on the shared port, until it or its supervisor stops."""
    import asyncio

    from orders.server import configure_logging, serve

    _end_with(supervisor)
    configure_logging(config.log_level, config.log_format)
    with ready:
        asyncio.run(serve(config, on_started=ready.send))
    sys.exit(0)


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
