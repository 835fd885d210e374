"""A real ``python -m orders.server`` subprocess for tests that stop, kill or restart the server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m orders.server`` on a fixed port and SQLite file; stderr goes to a log file."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.db = f"sqlite:///{tmp_path / 'o.db'}"
        self.log = tmp_path / "server.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orders.server",
                "--port",
                str(self.port),
                "--db",
                self.db,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise AssertionError(f"the server did not start; log:\n{self.log.read_text()}") from None
        assert line.decode().strip() == f"Server started on port {self.port}", (line, self.log.read_text())

    async def stop(self) -> int:
        """SIGTERM, and the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 15)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"the server did not stop on SIGTERM; log:\n{self.log.read_text()}") from None

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
