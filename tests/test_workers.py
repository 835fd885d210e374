"""``orders serve --workers N``: N processes on one port and one database, behaving as one server.

Each worker serves Prometheus metrics on its own port (``--metrics-port`` + i), which is how these tests
see that connections really were spread over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from server_process import ServerProcess, free_port
from test_observability import calls_by_method_and_code, scrape
from test_shutdown import write_lock

from orders import workers
from orders._proto.orders.v1 import OrderStatus
from orders.client import Item, OrderClient, RetryPolicy
from orders.errors import Unavailable

WORKERS = 2
CONNECTIONS = 16  # each its own TCP connection: all on one worker by chance has probability 2**-15
TIMEOUT = 30.0
CREATE = "/orders.v1.OrderService/CreateOrder"


def free_port_pair() -> int:
    """A port p with p + 1 free as well (the workers' metrics ports)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def worker_pids(supervisor_pid: int) -> set[int]:
    """The supervisor's worker processes (its children running multiprocessing's spawn entry point)."""
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    return {int(pid) for pid in children if b"spawn_main" in command_line(int(pid))}  # not the resource tracker


def command_line(pid: int) -> bytes:
    """Process ``pid``'s command line; empty if it has gone (it can go between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, the file was read
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def collect(client: OrderClient, count: int) -> list[tuple[int, str, int]]:
    seen = []
    async for update in client.watch(after_sequence=0):
        seen.append((update.sequence, update.order_id, int(update.status)))
        if len(seen) == count:
            return seen
    raise AssertionError("the watch ended")


async def test_workers_share_the_port_and_every_watcher_sees_every_change(tmp_path: Path, database_url: str) -> None:
    metrics = free_port_pair()
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS), "--metrics-port", str(metrics)])
    await server.start()
    try:
        assert len(worker_pids(server.process.pid)) == WORKERS
        clients = [OrderClient(server.target) for _ in range(CONNECTIONS)]
        try:
            live = [asyncio.create_task(collect(client, 3 * CONNECTIONS)) for client in clients]
            for client in clients:  # one order per connection, each confirmed and shipped
                order = await client.create([Item("Widget", 1, 2.5)])
                await client.update_status(order.id, OrderStatus.CONFIRMED)
                await client.update_status(order.id, OrderStatus.SHIPPED)
            seen = await asyncio.wait_for(asyncio.gather(*live), TIMEOUT)
        finally:
            for client in clients:
                client.close()
        # Every watcher, whichever worker it is on, saw every change once, in one sequence order.
        assert all(s == seen[0] for s in seen)
        sequences = [sequence for sequence, _, _ in seen[0]]
        assert sequences == sorted(set(sequences)) and len(sequences) == 3 * CONNECTIONS
        # ... and the connections really were served by different workers.
        creates = [calls_by_method_and_code(await scrape(metrics + i)).get((CREATE, "OK"), 0) for i in range(WORKERS)]
        assert sum(creates) == CONNECTIONS and all(creates), creates
    finally:
        assert await server.stop() == 0
    with socket.socket() as probe:  # every worker has let go of the port
        probe.bind(("127.0.0.1", server.port))


async def replaced(server: ServerProcess, victim: int) -> set[int]:
    """The supervisor's workers, once worker ``victim`` is gone and a new one has taken its place."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while running(victim) or len(current := worker_pids(server.process.pid) - {victim}) < WORKERS:
        assert asyncio.get_running_loop().time() < deadline, f"worker {victim} not replaced: {current}"
        await asyncio.sleep(0.1)
    return current


async def test_a_worker_that_dies_is_replaced(tmp_path: Path, database_url: str) -> None:
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)])
    await server.start()
    try:
        victim = min(worker_pids(server.process.pid))
        os.kill(victim, signal.SIGKILL)
        await replaced(server, victim)
        async with OrderClient(server.target) as client:  # the service carries on
            order = await client.create([Item("Widget", 1, 2.5)])
            assert (await client.get(order.id)).id == order.id
    finally:
        assert await server.stop() == 0


async def test_a_worker_that_hangs_is_killed_and_replaced(tmp_path: Path, database_url: str) -> None:
    """A stopped worker (as a blocked event loop would) keeps its listening socket, so the kernel would go
    on handing it a share of new connections that nobody answers; the supervisor notices its silence."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)])
    await server.start()
    try:
        victim = min(worker_pids(server.process.pid))
        os.kill(victim, signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()
        await replaced(server, victim)
        assert asyncio.get_running_loop().time() - stopped_at > workers.SILENCE_LIMIT - 1  # not killed at once
        assert f"(pid {victim}) silent for" in server.log.read_text()
        clients = [OrderClient(server.target, keepalive=None, timeout=5) for _ in range(CONNECTIONS)]
        try:  # every new connection is answered, whichever worker the kernel gives it to
            orders = await asyncio.gather(*(client.create([Item("Widget", 1, 2.5)]) for client in clients))
        finally:
            for client in clients:
                client.close()
        assert len({order.id for order in orders}) == CONNECTIONS
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
        assert await server.stop() == 0


async def test_a_supervisor_told_to_stop_kills_a_hung_worker_after_the_grace_period(
    tmp_path: Path, database_url: str
) -> None:
    """SIGTERM cannot stop a stopped (or hung) worker; the supervisor must not wait for it for ever."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS), "--grace", "1"])
    await server.start()
    victim = min(worker_pids(server.process.pid))
    os.kill(victim, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    # Should the supervisor wait for ever, the test ends the wait itself (and fails on the time taken):
    # stop() cannot return while the stopped worker holds the supervisor's output pipes open.
    rescue = loop.call_later(TIMEOUT, lambda: os.kill(victim, signal.SIGKILL))
    try:
        started = loop.time()
        assert await server.stop(timeout=2 * TIMEOUT) == 1  # not every worker stopped cleanly
        assert loop.time() - started < 1 + workers.STOP_MARGIN + 5  # --grace 1, the margin, then the exits
        assert not running(victim)
        assert f"(pid {victim}) still running" in server.log.read_text()
    finally:
        rescue.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


async def test_a_ctrl_c_drains_the_workers_and_a_second_one_ends_their_grace_period(
    tmp_path: Path, database_url: str
) -> None:
    """The workers get the terminal's SIGINT too: they wait for the supervisor's word, so that one Ctrl-C
    is one graceful stop, and a second one cancels the calls still running at once."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS), "--grace", "60"])
    await server.start()
    try:
        async with OrderClient(server.target, retry=RetryPolicy(attempts=1)) as client:
            await client.create([Item("Before", 1, 1.0)])
            with write_lock(database_url):  # held until the end of the test
                held = asyncio.create_task(client.create([Item("Held", 1, 1.0)], timeout=TIMEOUT))
                await asyncio.sleep(0.5)
                server.ctrl_c()
                await asyncio.sleep(1.5)
                assert not held.done(), "one Ctrl-C is a graceful stop: the call has its grace period"
                server.ctrl_c()
                with pytest.raises(Unavailable, match="shut down before this call finished"):
                    await asyncio.wait_for(held, TIMEOUT)
                assert await server.wait(TIMEOUT) == 0
    finally:
        await server.kill()


async def test_a_closed_terminal_drains_the_workers_once(tmp_path: Path, database_url: str) -> None:
    """The terminal's SIGHUP reaches the supervisor and every worker: the workers wait for the
    supervisor's word and drain, so that the server exits 0, not killed by the signal."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)])
    await server.start()
    try:
        server.signal_group(signal.SIGHUP)
        assert await server.wait(TIMEOUT) == 0
        log = server.log.read_text()
        assert log.count("shutting down") == WORKERS, log
        assert "Traceback" not in log
    finally:
        await server.kill()


async def test_a_grace_period_longer_than_any_wait_still_lets_the_supervisor_stop(tmp_path: Path, database_url: str):
    """A wait in the kernel cannot last 10**20 s; the workers, idle, stop at once anyway."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS), "--grace", "1e20"])
    await server.start()
    assert await server.stop() == 0
    assert "Traceback" not in server.log.read_text()


async def test_a_second_workers_server_on_a_taken_port_fails_instead_of_sharing_it(
    tmp_path: Path, database_url: str
) -> None:
    """SO_REUSEPORT would let the second server's workers join the first's port, each then taking a share
    of the connections into a different database."""
    first = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)])
    await first.start()
    try:
        other_database = f"sqlite:///{tmp_path / 'other.db'}"
        code, out, err = await run_supervisor("--db", other_database, port=first.port)
        assert code == 1
        assert b"Server started" not in out
        assert err.strip().endswith(b"Address already in use"), err.decode()[-2000:]
        assert b"cannot listen" in err
    finally:
        assert await first.stop() == 0


async def run_supervisor(*args: str, port: int = 0) -> tuple[int | None, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "orders.server", "--workers", "2", "--port", str(port), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        if process.returncode is None:  # still serving: the test failed, leave nothing running
            process.kill()
            await process.wait()
    return process.returncode, out, err


@pytest.mark.database_free  # a SQLite file of its own: the workers fail before they use it
async def test_workers_that_cannot_start_fail_the_supervisor_with_their_reason_said_once(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    database = f"sqlite:///{tmp_path / 'orders.db'}"
    code, out, err = await run_supervisor("--db", database, "--tls-cert", missing, "--tls-key", missing)
    assert code == 1
    assert b"Server started" not in out
    refusal = f"orders serve: cannot read the TLS certificate (--tls-cert) {missing!r}: No such file or directory\n"
    assert err.decode() == refusal  # as one server says it: once, and nothing else


@pytest.mark.database_free  # the database is unreachable on purpose
async def test_an_unusable_database_fails_the_supervisor_before_any_worker_starts() -> None:
    """The supervisor creates or upgrades the schema itself, once, before it starts the workers."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    code, out, err = await run_supervisor("--db", unreachable)
    assert code == 1
    assert b"Server started" not in out
    assert err.count(b"is unusable") == 1 and b"Connection refused" in err, err.decode()[-2000:]
    assert b"did not start" not in err


async def test_workers_stop_with_a_supervisor_killed_outright(tmp_path: Path, database_url: str) -> None:
    """A supervisor killed by the OOM killer or ``kill -9`` must not leave workers holding the port, or its
    restart fails with "address already in use"."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)])
    await server.start()
    workers = worker_pids(server.process.pid)
    assert len(workers) == WORKERS
    server.process.kill()  # not waited for: asyncio's wait() also waits for its pipes, which workers share
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    try:
        while alive := {pid for pid in workers if running(pid)}:
            assert asyncio.get_running_loop().time() < deadline, f"workers {alive} outlived their supervisor"
            await asyncio.sleep(0.1)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await server.process.wait()
    restarted = ServerProcess(tmp_path, database_url, args=["--workers", str(WORKERS)], port=server.port)
    await restarted.start()
    assert await restarted.stop() == 0
