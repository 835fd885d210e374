"""The ``python -m bench`` command: start servers, drive every scenario, write the report.

Each round of a scenario gets a fresh orders server (``python -m orders.server``) on a fresh database
with the same preload (a SQLite file, or with ``--db-server`` a new database on that PostgreSQL server,
dropped afterwards), so no round inherits another's rows, caches or memory. The baseline server
(``python -m bench.baseline``) is driven by the same load generator with the same concurrency first, and
again after each round of a unary scenario, whose ratios are to the mean of the two baseline runs
around it: the machine's speed drifts over minutes, so a baseline measured once at the start would be
compared with windows measured under other conditions. A unary scenario runs ``--rounds`` times, and
the round with the median ratio stands for it. Server memory and CPU are sampled from /proc while each
round runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.db import Databases, backend_info, check_server_url, event_log_head, events_per_order, sqlite_path
from bench.load import LoadResult, drive, split
from bench.preload import PreloadResult, preload
from bench.procs import ResourceSampler, ServerFailed, ServerProcess, Used
from bench.scenarios import UNARY_SCENARIOS, ScenarioData
from bench.watch import (
    WatcherResult,
    WatcherSpec,
    WriterSpec,
    missed_events,
    owed_events,
    publish_final_head,
    run_watchers,
    run_watchers_blocking,
    run_writer_blocking,
    watch_filters,
)
from orders.config import redacted

ALL_SCENARIOS = (*UNARY_SCENARIOS, "watch")
HOST = "127.0.0.1"
H2_MAX_STREAMS = 100  # concurrent streams an h2 (grpclib) server allows per connection


def parse_args(argv: Sequence[str] | None, prog: str = "python -m bench") -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the orders server against a trivial grpclib service measured in the same run.",
    )
    add = parser.add_argument
    add("--scenarios", default=",".join(ALL_SCENARIOS), help="comma-separated, from: " + ", ".join(ALL_SCENARIOS))
    add("--concurrency", type=int, default=32, help="closed-loop callers (default: %(default)s)")
    add("--duration", type=finite, default=10.0, help="measured seconds per scenario (default: %(default)s)")
    add("--warmup", type=finite, default=2.0, help="unmeasured seconds before each window (default: %(default)s)")
    add("--channels", type=int, default=1, help="HTTP/2 connections the callers share (default: %(default)s)")
    add("--procs", type=int, default=1, help="load-generator processes the callers are split over (default: 1)")
    add(
        "--client",
        choices=["upb", "stub"],
        default="upb",
        help="upb: protobuf-runtime messages, cheap for the generator; stub: the generated betterproto2 "
        "OrderServiceStub (default: %(default)s)",
    )
    add("--orders", type=int, default=10_000, help="orders preloaded for get/list/update/mixed/watch (default: 10000)")
    add("--list-mode", choices=["random", "first"], default="random", help="list: a random page or the first page")
    add("--no-request-ids", action="store_true", help="create without a request_id (OrderClient always sends one)")
    add("--watchers", type=int, default=1000, help="watch: concurrent watchers (default: %(default)s)")
    add("--updates-per-second", type=finite, default=1000.0, help="watch: status changes per second (default: 1000)")
    add(
        "--watch-orders",
        type=int,
        default=0,
        help="watch: each watcher watches this many orders of its own, which the writer changes (default: 0, "
        "every watcher watches every order)",
    )
    add("--watch-procs", type=int, default=1, help="watch: processes the watchers are split over (default: 1)")
    add(
        "--watch-streams-per-connection",
        type=int,
        default=H2_MAX_STREAMS,
        help=f"watch: watchers per HTTP/2 connection, at most {H2_MAX_STREAMS} (default: %(default)s)",
    )
    add("--watch-drain", type=finite, default=10.0, help="watch: seconds watchers may take to catch up at the end")
    add(
        "--reference",
        action="store_true",
        help="also run each unary scenario against bench.reference, a straightforward grpcio + sqlite3 server "
        "of the same contract, in as many rounds, and report the orders server's throughput over the reference's",
    )
    add("--scale", action="store_true", help="also run the scale scenario (get and list, small vs large database)")
    add("--scale-orders", type=int, default=1_000_000, help="scale: orders in the large database (default: 1000000)")
    add("--scale-small", type=int, default=1_000, help="scale: orders in the small database (default: 1000)")
    add("--scale-repeats", type=int, default=2, help="scale: runs per size and call, alternating (default: 2)")
    add("--workers", type=int, default=None, help="pass --workers N to the orders server")
    add(
        "--db-server",
        metavar="URL",
        default=None,
        help="run every scenario on a fresh database on this PostgreSQL server, e.g. "
        "postgresql://postgres@127.0.0.1:5432/test (default: SQLite files in the temp dir)",
    )
    add(
        "--server-args",
        default="",
        help="extra arguments for the orders server, split like a shell does, e.g. --server-args='--log-level info' "
        "(with the =, since the value begins with a dash)",
    )
    add("--json", type=Path, default=Path("bench-report.json"), help="report path (default: %(default)s)")
    add("--tmp-dir", type=Path, default=None, help="where databases and logs go (default: a fresh temp dir)")
    add("--keep", action="store_true", help="keep the temp dir (databases, server logs) afterwards")
    add("--seed", type=int, default=1, help="random seed of the callers")
    add(
        "--rounds",
        type=int,
        default=3,
        help="measure each unary scenario this many times, alternating with the baseline, and report the round "
        "with the median ratio (default: %(default)s)",
    )
    add(
        "--baseline-once",
        action="store_true",
        help="measure the baseline only before the first scenario, not again after each unary round (faster; "
        "ratios then compare windows minutes apart on a machine whose speed drifts)",
    )
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_list if s not in ALL_SCENARIOS]
    if unknown or not args.scenario_list:
        named = f"unknown scenario(s) {', '.join(unknown)}" if unknown else "--scenarios names no scenario"
        parser.error(f"{named}; choose from {', '.join(ALL_SCENARIOS)}")
    if min(args.concurrency, args.channels, args.procs, args.rounds) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--concurrency, --channels, --procs and --rounds must be >= 1, --duration > 0 and --warmup >= 0")
    if min(args.watchers, args.watch_procs) < 1 or args.updates_per_second <= 0 or args.watch_drain < 0:
        parser.error("--watchers and --watch-procs must be >= 1, --updates-per-second > 0 and --watch-drain >= 0")
    if not 1 <= args.watch_streams_per_connection <= H2_MAX_STREAMS:
        parser.error(f"--watch-streams-per-connection must be 1..{H2_MAX_STREAMS} (the server's HTTP/2 limit)")
    if args.scale and not 100 <= args.scale_small <= args.scale_orders or args.scale_repeats < 1:
        parser.error("--scale-small must be at least 100 and at most --scale-orders; --scale-repeats at least 1")
    if args.orders < max(args.concurrency, 100):
        parser.error("--orders must be at least 100 and at least --concurrency")
    if args.watch_orders < 0 or args.watchers * args.watch_orders > args.orders:
        parser.error("--watch-orders must be >= 0, and --watchers × --watch-orders at most --orders")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.reference and args.db_server:
        parser.error("--reference compares with a sqlite3 server: leave out --db-server")
    if args.reference and importlib.util.find_spec("grpc") is None:
        parser.error("--reference needs grpcio: pip install -e '.[test]'")
    try:
        args.server_arg_list = shlex.split(args.server_args)
    except ValueError as exc:  # e.g. "No closing quotation"
        parser.error(f"--server-args {args.server_args!r}: {exc}; quote it as a shell would")
    problem = (
        (args.db_server and check_server_url(args.db_server))
        or json_path_problem(args.json)
        or (args.tmp_dir and tmp_dir_problem(args.tmp_dir))
    )
    if problem:
        parser.error(problem)
    return args


def finite(text: str) -> float:
    """An argparse type: a float that is a number (not nan) and finite (not inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def json_path_problem(path: Path) -> str | None:
    """Why the report cannot be written to ``path`` (found before the run, not after it), or None."""
    if path.is_dir():
        return f"--json {path} is a directory: name a file, e.g. --json {path / 'bench-report.json'}"
    if not path.parent.is_dir():
        return f"--json {path}: there is no directory {path.parent}: create it, or name a file in an existing one"
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        return f"--json {path}: {target} is not writable: name a file in a writable directory"
    return None


def tmp_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the ``--tmp-dir``, or None."""
    if path.exists() and not path.is_dir():
        return f"--tmp-dir {path} is a file, not a directory: name a directory (it is created if missing)"
    return None


@dataclass
class Context:
    """Everything a scenario run needs."""

    args: argparse.Namespace
    tmp: Path
    pool: Executor | None
    log: Callable[[str], None]
    databases: Databases

    @contextlib.contextmanager
    def preloaded(
        self, name: str, orders: int, progress: Callable[[int, int], None] | None = None
    ) -> Iterator[PreloadResult]:
        """A fresh database for ``name`` holding ``orders`` preloaded orders (the same ids every time)."""
        with self.databases.fresh(name) as url:
            yield preload(url, orders, seed=self.args.seed, progress=progress)

    def server_args(self, db: str) -> list[str]:
        """The orders server's command-line arguments for the database URL ``db``."""
        extra = ["--workers", str(self.args.workers)] if self.args.workers is not None else []
        return [
            "--host",
            HOST,
            "--port",
            "0",
            "--db",
            db,
            "--log-level",
            "warning",
            *extra,
            *self.args.server_arg_list,
        ]


@contextlib.contextmanager
def running(module: str, args: Sequence[str], log_path: Path) -> Iterator[tuple[ServerProcess, ResourceSampler]]:
    """A started server process and a sampler of its memory; both stopped on exit."""
    server = ServerProcess(module, args, log_path)
    server.start()
    sampler = ResourceSampler(server.pid)
    sampler.start()
    try:
        yield server, sampler
    finally:
        sampler.stop()
        server.stop()


class _UsageWindow:
    """Reads a process tree's CPU time and disk writes at the start and end of the measurement window."""

    def __init__(self, sampler: ResourceSampler, measure_from: float, measure_to: float) -> None:
        self.used = Used()
        self._task = asyncio.ensure_future(self._measure(sampler, measure_from, measure_to))

    async def _measure(self, sampler: ResourceSampler, measure_from: float, measure_to: float) -> None:
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        began = sampler.used()
        await asyncio.sleep(max(0.0, measure_to - time.monotonic()))
        self.used = sampler.used() - began

    async def result(self) -> Used:
        await self._task
        return self.used


def _usage(sampler: ResourceSampler, used: Used, window: float, server: ServerProcess | None) -> report.ServerUsage:
    """What the server used; ``server``: stopped (None while it still runs)."""
    return report.ServerUsage(
        sampler.peak_rss,
        used.cpu_seconds,
        window,
        sampler.processes,
        server.process.returncode if server and server.process else None,
        used.written_bytes,
        used.main_thread_cpu_seconds,
        used.cpu_wait_seconds,
        exited_by_itself=server is not None and not server.stopped,
    )


async def drive_measured(
    ctx: Context, scenario: str, port: int, sampler: ResourceSampler, data: ScenarioData
) -> tuple[LoadResult, Used]:
    """Drive ``scenario`` against the server on ``port``; return the load and what the server used in the window."""
    args = ctx.args
    lead_in = 0.5 if ctx.pool is not None and args.procs > 1 else 0.0
    start = time.monotonic() + lead_in
    usage = _UsageWindow(sampler, start + args.warmup, start + args.warmup + args.duration)
    result = await drive(
        scenario,
        HOST,
        port,
        data,
        concurrency=args.concurrency,
        channels=args.channels,
        client=args.client,
        start=start,
        warmup=args.warmup,
        duration=args.duration,
        pool=ctx.pool,
        processes=args.procs,
        seed=args.seed,
    )
    return result, await usage.result()


async def measure_unary(
    ctx: Context, scenario: str, module: str, server_args: Sequence[str], data: ScenarioData, log_name: str
) -> tuple[LoadResult, report.ServerUsage]:
    """Start a server, drive ``scenario`` against it, stop it; return the load and server measurements."""
    with running(module, server_args, ctx.tmp / f"{log_name}.log") as (server, sampler):
        result, used = await drive_measured(ctx, scenario, server.port, sampler, data)
    return result, _usage(sampler, used, ctx.args.duration, server)


def data_for(preloaded: PreloadResult, args: argparse.Namespace) -> ScenarioData:
    """What the callers know about a preloaded database."""
    return ScenarioData(
        order_ids=preloaded.sample_ids,
        max_key=preloaded.last_key,
        list_mode=args.list_mode,
        request_ids=not args.no_request_ids,
    )


async def measure_watch(ctx: Context, preloaded: PreloadResult) -> dict[str, Any]:
    """The watch scenario (see :mod:`bench.watch`) on a server over the preloaded database."""
    args = ctx.args
    assert ctx.pool is not None
    watchers = args.watchers
    server_args = ctx.server_args(preloaded.url)
    if watchers > 10_000:  # the server's default --max-watchers
        server_args += ["--max-watchers", str(watchers)]
    final_file = ctx.tmp / "watch-final-head"
    final_file.unlink(missing_ok=True)
    with running("orders.server", server_args, ctx.tmp / "watch.log") as (server, sampler):
        connect_allowance = 2.0 + watchers / 500
        write_from = time.monotonic() + connect_allowance
        measure_from = write_from + args.warmup
        measure_to = measure_from + args.duration
        usage_window = _UsageWindow(sampler, measure_from, measure_to)
        procs = max(1, min(args.watch_procs, watchers))
        shares = split(watchers, procs)
        filters = watch_filters(preloaded.sample_ids, watchers, args.watch_orders)
        watched = watchers * args.watch_orders or len(preloaded.sample_ids)  # the writer changes only these
        starts = [sum(shares[:i]) for i in range(procs)]
        specs = [
            WatcherSpec(
                host=HOST,
                port=server.port,
                watchers=share,
                streams_per_connection=args.watch_streams_per_connection,
                after_sequence=preloaded.head_sequence,
                write_from=write_from,
                measure_from=measure_from,
                measure_to=measure_to,
                final_head_file=str(final_file),
                drain_timeout=args.watch_drain,
                order_ids=tuple(filters[start : start + share]),
            )
            for start, share in zip(starts, shares, strict=True)
        ]
        loop = asyncio.get_running_loop()
        watching: list[asyncio.Future[WatcherResult]]
        if procs == 1:
            watching = [asyncio.ensure_future(run_watchers(specs[0]))]
        else:
            watching = [loop.run_in_executor(ctx.pool, run_watchers_blocking, spec) for spec in specs]
        writer_spec = WriterSpec(
            host=HOST,
            port=server.port,
            rate=args.updates_per_second,
            order_ids=list(preloaded.sample_ids[:watched]),
            start=write_from,
            stop=measure_to,
            measure_from=measure_from,
        )
        head = -1
        try:
            writer = await loop.run_in_executor(ctx.pool, run_writer_blocking, writer_spec)
            head = await loop.run_in_executor(None, event_log_head, preloaded.url)
            counts = await loop.run_in_executor(None, events_per_order, preloaded.url, preloaded.head_sequence)
        finally:
            publish_final_head(final_file, head)  # on failure (-1) too: it ends the watchers
        ctx.log(f"watch: writer done, log head {head:,}; waiting for the watchers to catch up ...")
        seen = WatcherResult()
        for part in await asyncio.gather(*watching):
            seen.merge(part)
        used = await usage_window.result()
    usage = _usage(sampler, used, args.duration, server)
    events = sum(counts.values())
    owed = owed_events(counts, filters, seen.watchers)
    missed = missed_events(owed, seen.received_each)
    errors = sum(seen.errors.values()) + sum(writer.errors.values())
    return {
        "watchers": seen.watchers,
        "connections": seen.connections,
        "processes": procs,
        "ready_when_writing_began": seen.ready,
        "updates_per_second": args.updates_per_second,
        "events": events,
        "orders_per_watcher": args.watch_orders or "all",
        "expected": sum(owed),
        "delivered": seen.received,
        "missed": missed,  # owed and not received by the end of the drain: skipped, or too slow
        "not_caught_up": sum(reached < head for reached in seen.reached_each),  # watchers, after the drain
        "duplicates": seen.duplicates,
        "delivery_ms": report.rounded(seen.latency.summary_ms()),
        "errors": errors,
        "error_codes": dict(sorted((seen.errors + writer.errors).items())),
        "writer": {
            "rate": round(writer.rate, 1),
            "issued": writer.issued,
            "updates": writer.updates,
            "creates": writer.creates,
            "fell_behind": writer.behind,
            "update_latency_ms": report.rounded(writer.latency.summary_ms()),
        },
        "generator_cpu_percent": round(100 * seen.generator_cpu / args.duration, 1),
        "server": usage.as_dict(),
    }


def _progress_logger(log: Callable[[str], None], every: float = 10.0) -> Callable[[int, int], None]:
    """A preload progress callback that logs at most every ``every`` seconds."""
    last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        if time.monotonic() - last > every:
            last = time.monotonic()
            log(f"scale: {done:,} / {total:,} orders")

    return progress


async def measure_scale(ctx: Context) -> dict[str, Any]:
    """GetOrder and ListOrders on a small and a large database: the page cost should not grow.

    Both servers run side by side and the runs alternate small, large, large, small, ... so that a
    drift in the machine's load (this is usually a shared machine) hits both sizes alike.
    """
    args = ctx.args
    sizes = {"small": args.scale_small, "large": args.scale_orders}
    result: dict[str, Any] = {"small_orders": args.scale_small, "large_orders": args.scale_orders}
    order: list[str] = []
    for repeat in range(args.scale_repeats):
        order += ["small", "large"] if repeat % 2 == 0 else ["large", "small"]
    with contextlib.ExitStack() as stack:  # LIFO: the servers stop before their databases go
        data: dict[str, ScenarioData] = {}
        urls: dict[str, str] = {}
        for size_name, orders in sizes.items():
            ctx.log(f"scale: preloading {orders:,} orders ...")
            preloaded = stack.enter_context(ctx.preloaded(f"scale-{size_name}", orders, _progress_logger(ctx.log)))
            ctx.log(
                f"scale: {orders:,} orders preloaded in {preloaded.seconds:.1f}s ({preloaded.bytes / 2**20:.0f} MB)"
            )
            if size_name == "large":
                result["preload_seconds"] = round(preloaded.seconds, 2)
                result["preload_orders_per_second"] = round(orders / preloaded.seconds)
                result["large_db_mb"] = round(preloaded.bytes / 2**20, 1)
            data[size_name] = data_for(preloaded, args)
            urls[size_name] = preloaded.url
        servers = {
            size_name: stack.enter_context(
                running("orders.server", ctx.server_args(urls[size_name]), ctx.tmp / f"scale-{size_name}.log")
            )
            for size_name in sizes
        }
        for size_name in sizes:
            result[size_name] = {}
        for call in ("get", "list"):
            loads = {size_name: LoadResult(window=0.0) for size_name in sizes}
            used = dict.fromkeys(sizes, Used())
            for size_name in order:
                ctx.log(f"scale: {call} on {sizes[size_name]:,} orders ...")
                server, sampler = servers[size_name]
                load, used_once = await drive_measured(ctx, call, server.port, sampler, data[size_name])
                loads[size_name].merge(load)
                loads[size_name].window += load.window
                used[size_name] += used_once
            for size_name in sizes:
                server, sampler = servers[size_name]
                usage = _usage(sampler, used[size_name], loads[size_name].window, None)
                result[size_name][call] = report.unary_report(loads[size_name], usage)
    result["ratios"] = {}
    for call in ("get", "list"):
        small, large = result["small"][call], result["large"][call]
        result["ratios"][f"{call}_rps_large_over_small"] = (
            round(large["rps"] / small["rps"], 3) if small["rps"] else None
        )
        p50_small, p50_large = small["latency_ms"].get("p50_ms"), large["latency_ms"].get("p50_ms")
        result["ratios"][f"{call}_p50_large_over_small"] = (
            round(p50_large / p50_small, 3) if p50_small and p50_large else None
        )
        cpu_small, cpu_large = small["server"]["cpu_ms_per_call"], large["server"]["cpu_ms_per_call"]
        result["ratios"][f"{call}_cpu_per_call_large_over_small"] = (
            round(cpu_large / cpu_small, 3) if cpu_small and cpu_large else None
        )
    return result


def _failure(exc: BaseException, args: argparse.Namespace) -> str:
    """One message for a failed scenario; the traceback goes to stderr unless the server failed."""
    if not isinstance(exc, ServerFailed):
        traceback.print_exception(exc, file=sys.stderr)
        return f"{type(exc).__name__}: {exc}"
    message = str(exc)
    if args.workers is not None and "--workers" in message and "unrecognized arguments" in message:
        return f"the orders server does not support --workers yet (it rejected '--workers {args.workers}')"
    return message or type(exc).__name__


def _warm(_: int) -> int:
    """Run in each pool process once, so imports happen before anything is timed."""
    import bench.load  # noqa: F401
    import bench.watch  # noqa: F401

    time.sleep(0.2)  # long enough that each warm-up call lands on a different process
    return 0


def _ignore_ctrl_c() -> None:
    """Run in each pool process at its start: a Ctrl-C reaches the whole process group, and the bench
    stops its workers itself (without a traceback from each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers() -> None:
    """End the pool's processes (the bench starts no other multiprocessing children) at once: a load
    generator or the watch writer would otherwise go on to the end of its window before the pool shuts down."""
    for worker in multiprocessing.active_children():
        worker.terminate()


async def measure_scenario(ctx: Context, scenario: str, reference: bool = False) -> dict[str, Any]:
    """One scenario on a fresh preloaded database, served by the orders server or (``reference``) by
    :mod:`bench.reference`; its report (without baseline ratios)."""
    with ctx.preloaded(scenario, ctx.args.orders) as preloaded:
        if scenario == "watch":
            measured = await measure_watch(ctx, preloaded)
        else:
            data = data_for(preloaded, ctx.args)
            if reference:
                module, name = "bench.reference", f"{scenario}-reference"
                server_args = ["--db", str(sqlite_path(preloaded.url)), "--host", HOST, "--port", "0"]
            else:
                module, name, server_args = "orders.server", scenario, ctx.server_args(preloaded.url)
            load, usage = await measure_unary(ctx, scenario, module, server_args, data, name)
            measured = report.unary_report(load, usage)
    return {**measured, "preload_seconds": round(preloaded.seconds, 2)}


async def measure_rounds(
    ctx: Context, scenario: str, baselines: list[dict[str, Any]], reference: bool = False
) -> list[dict[str, Any]]:
    """A scenario's rounds (``--rounds`` of a unary one, one of watch), each with its own fresh server and
    database; after each unary round the baseline is measured again (appended to ``baselines``) and the
    round's ratios are taken to the baseline runs just before and after it."""
    rounds: list[dict[str, Any]] = []
    count = 1 if scenario == "watch" else ctx.args.rounds
    label = f"{scenario} on bench.reference" if reference else scenario
    for number in range(count):
        ctx.log(f"{label} ..." if count == 1 else f"{label}, round {number + 1} of {count} ...")
        measured = await measure_scenario(ctx, scenario, reference)
        if scenario != "watch":
            if not ctx.args.baseline_once:
                ctx.log("baseline ...")
                baselines.append(await measure_baseline(ctx, len(baselines)))
            report.add_ratios(measured, baselines[-2:])  # the runs just before and after it (or the only one)
        rounds.append(measured)
    return rounds


async def measure_baseline(ctx: Context, number: int) -> dict[str, Any]:
    """The baseline service driven like a unary scenario: its report, or ``{"error": ...}``."""
    empty = ScenarioData(order_ids=(), max_key=0)
    try:
        load, usage = await measure_unary(
            ctx, "baseline", "bench.baseline", ["--host", HOST, "--port", "0"], empty, f"baseline-{number}"
        )
    except Exception as exc:  # report it and go on: the other scenarios may still tell something
        error = _failure(exc, ctx.args)
        ctx.log(f"baseline failed: {error}")
        return {"error": error}
    return report.unary_report(load, usage)


def report_config(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as the report gives it, with any password in ``--db-server`` redacted."""
    config = {
        k: v for k, v in vars(args).items() if k not in ("scenario_list", "server_arg_list", "json", "tmp_dir", "keep")
    }
    config["scenarios"] = args.scenario_list
    if args.db_server:
        config["db_server"] = redacted(args.db_server)
    return config


async def run(args: argparse.Namespace, database: dict[str, Any]) -> dict[str, Any]:
    """Run everything the arguments ask for and return the report; ``database``: :func:`bench.db.backend_info`."""
    tmp = args.tmp_dir or Path(tempfile.mkdtemp(prefix="orders-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    pool_size = max(args.procs if args.procs > 1 else 0, args.watch_procs if args.watch_procs > 1 else 0)
    pool_size += 1 if "watch" in args.scenario_list else 0
    pool: ProcessPoolExecutor | None = None
    if pool_size:
        pool = ProcessPoolExecutor(
            pool_size, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_ctrl_c
        )
    ctx = Context(args, tmp, pool, log, Databases(tmp, args.db_server))
    result: dict[str, Any] = {
        "machine": report.machine_info(),
        "config": report_config(args),
        "database": database,
        "workers": args.workers if args.workers is not None else 1,  # the server's default
        "notes": [],
    }
    try:
        if pool is not None:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(pool, _warm, i) for i in range(pool_size)))
        log("baseline ...")
        baselines = [await measure_baseline(ctx, 0)]
        result["baseline"] = baselines[0]
        result["scenarios"] = {}
        preload_seconds: list[float] = []
        for scenario in args.scenario_list:
            try:
                rounds = await measure_rounds(ctx, scenario, baselines)
            except Exception as exc:
                result["scenarios"][scenario] = {"error": _failure(exc, args)}
                log(f"{scenario} failed: {result['scenarios'][scenario]['error']}")
                continue
            result["scenarios"][scenario] = report.median_round(rounds)
            if args.reference and scenario != "watch":
                try:
                    reference = await measure_rounds(ctx, scenario, baselines, reference=True)
                except Exception as exc:
                    reference = [{"error": _failure(exc, args)}]
                    log(f"{scenario} on bench.reference failed: {reference[0]['error']}")
                report.add_reference(result["scenarios"][scenario], reference)
            for measured in rounds:
                preload_seconds.append(measured["preload_seconds"])
                note = report.server_note(scenario, measured["server"])
                if note:
                    result["notes"].append(note)
        result["baselines"] = [report.baseline_summary(baseline) for baseline in baselines]
        if preload_seconds:
            mean = sum(preload_seconds) / len(preload_seconds)
            result["preload"] = {"orders": args.orders, "databases": len(preload_seconds), "seconds": round(mean, 2)}
        if args.scale:
            try:
                result["scale"] = await measure_scale(ctx)
            except Exception as exc:
                result["scale"] = {"error": _failure(exc, args)}
                log(f"scale failed: {result['scale']['error']}")
    except BaseException:  # cancelled (Ctrl-C, SIGTERM) or failed: what the workers are doing is not wanted
        if pool is not None:
            _stop_workers()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if args.keep:
            log(f"kept {tmp}")
        elif args.tmp_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_average_at_end"] = report._loadavg()
    return result


class Terminated(Exception):
    """SIGTERM stopped the run (after its clean-up)."""


async def run_until_sigterm(args: argparse.Namespace, database: dict[str, Any]) -> dict[str, Any]:
    """:func:`run`, cancelled by SIGTERM the way :func:`asyncio.run` cancels it on Ctrl-C, so that every
    clean-up runs (servers, pool processes, temporary databases, the temp dir); then :class:`Terminated`."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await run(args, database)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """Entry point of ``python -m bench``: 0 when every target passed, 1 otherwise (or when the report could not
    be written), 2 on a usage error or when ``--db-server`` cannot be used (unreachable, or psycopg missing),
    130 after Ctrl-C and 143 after SIGTERM (servers, processes and temporary files cleaned up, no report)."""
    args = parse_args(argv, prog)
    try:
        database = backend_info(args.db_server)
    except Exception as exc:  # e.g. the PostgreSQL server is down: nothing could run
        print(f"{prog}: cannot use --db-server {redacted(args.db_server)}: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_until_sigterm(args, database))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); no report written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: stopped by SIGTERM; no report written", file=sys.stderr)
        return 143
    targets = report.judge(result)
    result["targets"] = [t.as_dict() for t in targets]
    print(report.table(result), flush=True)
    try:
        report.write_json(args.json, result)
    except OSError as exc:
        print(
            f"{prog}: cannot write the report to {args.json} ({exc}); the table above has the results", file=sys.stderr
        )
        return 1
    print(f"report: {args.json}")
    return 0 if all(t.passed for t in targets) else 1
