"""A real ``python -m orders.server`` subprocess for tests that stop, kill or restart the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


# Ports for servers the tests start on a fixed port (so that a restart finds them again): below Linux's
# ephemeral range (32768-60999), which every outgoing connection of the suite (to PostgreSQL, to other
# servers) draws from, so that none of them can take a chosen port before its server binds it.
FIXED_PORTS = range(20_000, 32_768)


_HANDED_OUT: set[int] = set()  # a port is free until its server binds it: never hand it out twice


def free_port() -> int:
    """A port nobody listens on now, outside the ephemeral range, and not given out before in this run."""
    while True:
        port = random.choice(FIXED_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


class ServerProcess:
    """``python -m orders.server`` on a fixed port and database (the ``database_url`` fixture); stderr
    goes to a log file.

    ``args`` are extra server flags (e.g. ``["--grace", "1"]``), ``env`` extra environment variables,
    ``ignored_signals`` signals the server starts with ignored (SIGHUP, as under ``nohup``); all apply to
    every (re)start. The server runs in a process group of its own, as in a terminal of its
    own (see :meth:`ctrl_c`).
    """

    def __init__(
        self,
        tmp_path: Path,
        db: str,
        port: int | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ignored_signals: Sequence[int] = (),
    ) -> None:
        self.port = port or free_port()
        self.db = db
        self.log = tmp_path / "server.log"
        self.args = list(args)
        self.env = dict(env or {})
        self.ignored_signals = tuple(ignored_signals)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the server and wait for its startup line."""
        await self.launch()
        assert self.process is not None and self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"the server did not start; log:\n{self.log.read_text()}") from None
        assert line.decode().strip() == f"Server started on port {self.port}", (line, self.log.read_text())

    async def launch(self) -> None:
        """Start the server process, without waiting for it to say that it has started."""
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orders.server",
                "--port",
                str(self.port),
                "--db",
                self.db,
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
                preexec_fn=self._ignore_signals if self.ignored_signals else None,
            )

    def _ignore_signals(self) -> None:
        """In the child before it runs the server: what ``nohup`` does for SIGHUP."""
        for signum in self.ignored_signals:
            signal.signal(signum, signal.SIG_IGN)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the server process without waiting."""
        assert self.process is not None
        self.process.send_signal(signum)

    def ctrl_c(self) -> None:
        """What a Ctrl-C in the server's terminal does: SIGINT to every process of its group (with
        ``--workers``, the supervisor and its workers)."""
        self.signal_group(signal.SIGINT)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of the server's group, as its terminal does (SIGINT for a
        Ctrl-C, SIGHUP when it closes)."""
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    async def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait up to ``timeout`` s for the process to exit and return its exit code; on timeout kill it
        and fail."""
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"the server did not exit within {timeout}s; log:\n{self.log.read_text()}") from None

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (or ``signum``), and the exit code."""
        self.send_signal(signum)
        return await self.wait(timeout)

    async def kill(self) -> None:
        """SIGKILL (``kill -9``): no shutdown code runs, like a crash or power cut of the process."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def kill_group(self) -> None:
        """SIGKILL every process of the server's group (with ``--workers``, its workers too), and reap the server."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # none left
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()


def child_pids(pid: int) -> list[int]:
    """The processes that process ``pid`` started and that are still running (Linux)."""
    with contextlib.suppress(FileNotFoundError):  # it has exited
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    return []


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has the file ``path`` open (Linux)."""
    with contextlib.suppress(FileNotFoundError):  # it has exited
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                if fd.readlink() == path:
                    return True
    return False
