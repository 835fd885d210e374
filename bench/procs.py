"""Server subprocesses: start one, learn its port, sample its memory, CPU, CPU waits and disk writes, stop it.

Memory is read from ``/proc/<pid>/status`` (VmRSS), CPU time from ``/proc/<pid>/stat``, the time its
threads waited for a CPU from ``/proc/<pid>/task/<tid>/schedstat`` and bytes written to storage from
``/proc/<pid>/io``, summed over the process and its descendants (so a ``--workers N``
server is measured whole); no psutil needed. On a system without ``/proc`` the samples are simply missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

_STARTED = re.compile(rb"Server started on port (\d+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ServerFailed(RuntimeError):
    """The server process exited or never said it had started; the message carries its stderr."""


@dataclass
class ServerProcess:
    """A server started as ``python -m <module> <args>``, waiting for ``Server started on port N``."""

    module: str
    args: Sequence[str]
    log_path: Path
    startup_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    stopped: bool = False  # stop() sent it SIGTERM: it had not exited on its own

    def start(self) -> int:
        """Start the process and return its port; ServerFailed with its log if it does not come up.

        It runs in a process group of its own: a Ctrl-C in the bench's terminal reaches only the bench, which
        stops it (one still importing would die of the SIGINT with a traceback)."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        port: list[int] = []

        def read_port() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                match = _STARTED.search(line)
                if match:
                    port.append(int(match.group(1)))
                    break
            # keep draining stdout so the server never blocks on a full pipe
            for _ in self.process.stdout:
                pass

        threading.Thread(target=read_port, name=f"{self.module}-stdout", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not port:
            if self.process.poll() is not None:
                raise self._failed(f"exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise self._failed(f"did not start within {self.startup_timeout:.0f}s")
            time.sleep(0.02)
        self.port = port[0]
        return self.port

    @property
    def pid(self) -> int:
        """The process id (the server's top process)."""
        assert self.process is not None
        return self.process.pid

    def _failed(self, what: str) -> ServerFailed:
        """ServerFailed saying ``what`` happened, with the last line of the process's stderr (for argparse its
        ``error: ...``, for a traceback the exception) on the first line and the log's tail below."""
        tail = self.log_tail()
        last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "nothing on stderr")
        return ServerFailed(f"{self.module} {what}: {last}\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote to stderr."""
        with contextlib.suppress(OSError):
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.stopped = True
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/<pid>/task/<tid>/children); just ``[pid]`` if unreadable."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    found.extend(int(child) for child in children.read().split())
            except OSError:
                continue
    return found


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process in seconds (0 if it is gone)."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process's main thread, where an asyncio server runs its event loop,
    in seconds (0 if it is gone)."""
    return _stat_cpu_seconds(f"/proc/{pid}/task/{pid}/stat")


def _stat_cpu_seconds(path: str) -> float:
    try:
        with open(path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the ")" closing the command name: state is field 3, utime 14, stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_wait_seconds(pid: int) -> float:
    """Time the threads of one process spent ready to run but waiting for a CPU, in seconds, summed over
    the threads alive now (0 if it is gone, or the kernel keeps no scheduler statistics)."""
    waited_ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                waited_ns += int(schedstat.read().split()[1])  # on the CPU, waiting for it, time slices
        except (OSError, IndexError, ValueError):
            continue
    return waited_ns / 1e9


def written_bytes(pid: int) -> int:
    """Bytes one process caused to be written to storage, ``write_bytes`` of /proc (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/io") as io:
            for line in io:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Used:
    """What a process tree used over a stretch of time: CPU seconds (in all, and in its processes' main
    threads), bytes written to storage, and seconds its threads waited for a CPU."""

    cpu_seconds: float = 0.0
    written_bytes: int = 0
    main_thread_cpu_seconds: float = 0.0
    cpu_wait_seconds: float = 0.0

    def __add__(self, other: Used) -> Used:
        return Used(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: Used) -> Used:
        return Used(*(mine - theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))


@dataclass
class ResourceSampler:
    """Samples a process tree's RSS every ``interval`` s on a thread, and its CPU time and disk writes on
    demand."""

    pid: int
    interval: float = 0.1
    peak_rss: int = 0
    last_rss: int = 0
    processes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one RSS sample now."""
        pids = process_tree(self.pid)
        self.processes = max(self.processes, len(pids))
        self.last_rss = sum(rss_bytes(p) for p in pids)
        self.peak_rss = max(self.peak_rss, self.last_rss)

    def used(self) -> Used:
        """CPU seconds (in all and in main threads), bytes written and seconds waited for a CPU so far by the
        process tree."""
        pids = process_tree(self.pid)
        return Used(
            sum(cpu_seconds(p) for p in pids),
            sum(written_bytes(p) for p in pids),
            sum(main_thread_cpu_seconds(p) for p in pids),
            sum(cpu_wait_seconds(p) for p in pids),
        )

    def start(self) -> None:
        """Start sampling in the background."""
        self.sample()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
