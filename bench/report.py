"""Turning measurements into the JSON report, the targets' verdicts and the human table."""

from __future__ import annotations

import collections
import importlib.metadata
import json
import math
import os
import platform
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadResult

MIB = 1024 * 1024

# The issue's targets (issue 5, "Targets"): minimum share of the baseline's RPS per scenario.
RATIO_TARGETS = {"create": 0.50, "get": 0.70, "list": 0.25}
TAIL_FACTOR = 10.0  # p99 ≤ 10 × p50 in every scenario
WATCH_P99_MS = 50.0
WATCH_RSS_MB = 200.0
WATCH_MIN_RATE_SHARE = 0.95  # the writer must reach 95 % of the asked rate for the watch target to mean anything
REFERENCE_FACTOR = 3.0  # DESIGN.md: ≥ 3× the throughput of a straightforward grpcio + sqlite3 implementation
SCALE_TOLERANCE = 0.20  # "costs the same": the large database's RPS within 20 % of the small one's


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Cores, Python, library and SQLite versions, load average: what the numbers depend on."""
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": {p: _version(p) for p in ("grpclib", "betterproto2", "peewee", "protobuf", "h2")},
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class ServerUsage:
    """What the server process used during a scenario."""

    peak_rss: int  # bytes, whole process tree
    cpu_seconds: float  # in the measurement window
    window: float
    processes: int
    exit_status: int | None
    written_bytes: int = 0  # to storage (WAL, checkpoints, logs), in the measurement window
    loop_cpu_seconds: float = 0.0  # of the main threads, where the event loops run, in the measurement window
    cpu_wait_seconds: float = 0.0  # its threads spent ready to run but waiting for a CPU, in the window
    exited_by_itself: bool = False  # before the bench stopped it (it crashed, or exited mid-run)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "peak_rss_mb": round(self.peak_rss / MIB, 1),
            "cpu_percent": round(100 * self.cpu_seconds / self.window, 1) if self.window else None,
            "loop_cpu_percent": round(100 * self.loop_cpu_seconds / self.window, 1) if self.window else None,
            "cpu_wait_percent": round(100 * self.cpu_wait_seconds / self.window, 1) if self.window else None,
            "processes": self.processes,
            "exit_status": self.exit_status,
            "exited_by_itself": self.exited_by_itself,
            "written_mb": round(self.written_bytes / MIB, 2),
        }


def _ms(value: float | int | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 3)


def rounded(summary: Mapping[str, float | int]) -> dict[str, float | int | None]:
    """A latency summary with its milliseconds rounded to microseconds."""
    return {k: v if k == "count" else _ms(v) for k, v in summary.items()}


def unary_report(result: LoadResult, usage: ServerUsage | None) -> dict[str, Any]:
    """The JSON form of one unary scenario's (or the baseline's) measurements; see :func:`add_ratios`.

    Besides RPS, it gives the server's CPU time and the bytes it wrote to storage per (timed) call.
    """
    total = result.total
    rps = total.count / result.window if result.window else 0.0
    summary = total.summary_ms()
    p50, p99 = summary.get("p50_ms"), summary.get("p99_ms")
    fairness = result.fairness()  # NaN when no caller completed a call
    report: dict[str, Any] = {
        "rps": round(rps, 1),
        "calls": total.count,
        "latency_ms": {k: _ms(v) for k, v in summary.items() if k != "count"},
        "p99_over_p50": round(p99 / p50, 2) if p50 and p99 else None,
        "errors": sum(result.errors.values()),
        "error_codes": dict(sorted(result.errors.items())),
        "untimed_calls": dict(result.untimed),
        "callers": len(result.per_caller),
        "fairness": None if math.isnan(fairness) else round(fairness, 4),
        "generator_cpu_percent": round(100 * result.generator_cpu / result.window, 1) if result.window else None,
    }
    if len(result.histograms) > 1:
        report["by_call"] = {
            kind: {
                "rps": round(h.count / result.window, 1),
                **{k: _ms(v) for k, v in h.summary_ms().items() if k != "count"},
            }
            for kind, h in sorted(result.histograms.items())
        }
    if usage is not None:
        report["server"] = usage.as_dict()
        report["server"]["cpu_ms_per_call"] = round(1000 * usage.cpu_seconds / total.count, 4) if total.count else None
        report["server"]["written_kb_per_call"] = (
            round(usage.written_bytes / 1024 / total.count, 3) if total.count else None
        )
    return report


def server_note(scenario: str, server: Mapping[str, Any]) -> str | None:
    """A note for the report when a scenario's server did not end as asked (status 0 after the bench's
    SIGTERM), or None."""
    status = server["exit_status"]
    if server.get("exited_by_itself"):
        return f"{scenario}: the server exited by itself with status {status} before the bench stopped it"
    if status != 0:
        killed = " (killed: it had not stopped within 20 s)" if status == -9 else ""
        return f"{scenario}: the server exited with status {status} after SIGTERM{killed}"
    return None


def add_ratios(scenario: dict[str, Any], baselines: Sequence[Mapping[str, Any]]) -> None:
    """Add a unary scenario's ratios to the baseline: to the mean of ``baselines`` (those measured just
    before and just after it) that did not fail.

    ``ratio_to_baseline`` is RPS over the baseline's. On a machine shared with other work RPS swings
    with everyone else's load, while CPU per call moves much less, so ``cpu_ratio_to_baseline``
    (baseline CPU per call / this scenario's) is a steadier cross-check: the share of the ceiling the
    server would reach if both were bound by the same single core.
    """
    measured = [b for b in baselines if b.get("rps")]
    if not measured:
        return
    scenario["baseline_rps"] = round(sum(b["rps"] for b in measured) / len(measured), 1)
    scenario["ratio_to_baseline"] = round(scenario["rps"] / scenario["baseline_rps"], 3)
    base_cpus = [b["server"]["cpu_ms_per_call"] for b in measured if (b.get("server") or {}).get("cpu_ms_per_call")]
    own_cpu = (scenario.get("server") or {}).get("cpu_ms_per_call")
    if base_cpus and own_cpu:
        scenario["cpu_ratio_to_baseline"] = round(sum(base_cpus) / len(base_cpus) / own_cpu, 3)


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A scenario measured in one or more rounds, as one report: the round with the median ratio to the
    baseline (the lower median of an even count; the median RPS if a round has no ratio), with every
    round in brief under ``rounds``. Its errors are those of all rounds and its p99/p50 the worst round's,
    so that neither target passes on a lucky round."""
    if len(rounds) == 1:
        return rounds[0]
    key = "ratio_to_baseline" if all("ratio_to_baseline" in r for r in rounds) else "rps"
    report = dict(sorted(rounds, key=lambda r: r[key])[(len(rounds) - 1) // 2])
    report["rounds"] = [
        {
            "rps": r["rps"],
            "ratio_to_baseline": r.get("ratio_to_baseline"),
            "cpu_ratio_to_baseline": r.get("cpu_ratio_to_baseline"),
            "p50_ms": r["latency_ms"].get("p50_ms"),
            "p99_ms": r["latency_ms"].get("p99_ms"),
            "errors": r["errors"],
        }
        for r in rounds
    ]
    report["errors"] = sum(r["errors"] for r in rounds)
    codes: collections.Counter[str] = collections.Counter()
    for r in rounds:
        codes.update(r["error_codes"])
    report["error_codes"] = dict(sorted(codes.items()))
    tails = [r["p99_over_p50"] for r in rounds if r.get("p99_over_p50") is not None]
    report["p99_over_p50"] = max(tails) if tails else None
    return report


def add_reference(scenario: dict[str, Any], reference_rounds: Sequence[dict[str, Any]]) -> None:
    """Attach the same scenario's rounds on :mod:`bench.reference` to ``scenario``: their median round in
    brief under ``reference``, and ``x_reference``, the orders server's ratio to the baseline over the
    reference's. Each ratio is to the baseline runs around its own round, so the drift of the machine's
    speed between the two cancels out."""
    failed = [r["error"] for r in reference_rounds if "error" in r]
    if failed:
        scenario["reference"] = {"error": failed[0]}
        return
    median = median_round(reference_rounds)
    scenario["reference"] = {
        "rps": median["rps"],
        "ratio_to_baseline": median.get("ratio_to_baseline"),
        "p50_ms": median["latency_ms"].get("p50_ms"),
        "p99_ms": median["latency_ms"].get("p99_ms"),
        "errors": median["errors"],
        "error_codes": median["error_codes"],
        "cpu_ms_per_call": (median.get("server") or {}).get("cpu_ms_per_call"),
        "written_kb_per_call": (median.get("server") or {}).get("written_kb_per_call"),
        "rounds": [r.get("ratio_to_baseline") for r in reference_rounds],
    }
    ours, theirs = scenario.get("ratio_to_baseline"), median.get("ratio_to_baseline")
    if ours and theirs:
        scenario["x_reference"] = round(ours / theirs, 2)


def baseline_summary(baseline: Mapping[str, Any]) -> dict[str, Any]:
    """One baseline measurement in brief: RPS, p50 and server CPU per call (or its error)."""
    if "error" in baseline:
        return {"error": baseline["error"]}
    server = baseline.get("server") or {}
    return {
        "rps": baseline["rps"],
        "p50_ms": baseline["latency_ms"].get("p50_ms"),
        "cpu_ms_per_call": server.get("cpu_ms_per_call"),
    }


@dataclass
class Target:
    """One of the issue's targets, with the measured value and a verdict."""

    name: str
    measured: Any
    limit: str
    passed: bool | None  # None: could not be judged (e.g. the scenario failed)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"target": self.name, "measured": self.measured, "limit": self.limit, "pass": self.passed}


def judge(report: Mapping[str, Any]) -> list[Target]:
    """Every target that applies to what was run, with PASS/FAIL."""
    targets: list[Target] = []
    scenarios: Mapping[str, Any] = report.get("scenarios", {})
    every = {"baseline": report.get("baseline") or {}, **scenarios}
    for name, limit in RATIO_TARGETS.items():
        if name in scenarios:
            ratio = scenarios[name].get("ratio_to_baseline")
            targets.append(
                Target(f"{name} RPS / baseline", ratio, f">= {limit:.2f}", None if ratio is None else ratio >= limit)
            )
    for name, scenario in every.items():
        if name == "watch" or not scenario:
            continue
        if "error" in scenario:
            targets.append(Target(f"{name} ran", scenario["error"], "no failure", False))
            continue
        tail = scenario.get("p99_over_p50")
        targets.append(
            Target(f"{name} p99 / p50", tail, f"<= {TAIL_FACTOR:g}", None if tail is None else tail <= TAIL_FACTOR)
        )
        targets.append(Target(f"{name} errors", scenario.get("errors"), "== 0", scenario.get("errors") == 0))
    for name, scenario in scenarios.items():
        if "reference" in scenario:
            times = scenario.get("x_reference")
            targets.append(
                Target(
                    f"{name} RPS / straightforward grpcio + sqlite3",
                    times if times is not None else scenario["reference"].get("error"),
                    f">= {REFERENCE_FACTOR:g}",
                    None if times is None else times >= REFERENCE_FACTOR,
                )
            )
    watch = scenarios.get("watch")
    if watch:
        if "error" in watch:
            targets.append(Target("watch ran", watch["error"], "no failure", False))
        else:
            p99 = watch["delivery_ms"].get("p99_ms")
            targets += [
                Target("watch missed updates", watch["missed"], "== 0", watch["missed"] == 0),
                Target("watch duplicates", watch["duplicates"], "== 0", watch["duplicates"] == 0),
                Target(
                    "watch delivery p99 (ms)",
                    p99,
                    f"< {WATCH_P99_MS:g}",
                    None if p99 is None else p99 < WATCH_P99_MS,
                ),
                Target(
                    "watch server peak RSS (MB)",
                    watch["server"]["peak_rss_mb"],
                    f"< {WATCH_RSS_MB:g}",
                    watch["server"]["peak_rss_mb"] < WATCH_RSS_MB,
                ),
                Target(
                    "watch writer rate (updates/s)",
                    watch["writer"]["rate"],
                    f">= {WATCH_MIN_RATE_SHARE:.0%} of {watch['updates_per_second']:g}",
                    watch["writer"]["rate"] >= WATCH_MIN_RATE_SHARE * watch["updates_per_second"],
                ),
                Target("watch errors", watch["errors"], "== 0", watch["errors"] == 0),
            ]
    scale = report.get("scale")
    if scale and "error" not in scale:
        for call in ("get", "list"):
            ratio = scale["ratios"].get(f"{call}_rps_large_over_small")
            targets.append(
                Target(
                    f"scale {call} RPS {scale['large_orders']:,} / {scale['small_orders']:,} orders",
                    ratio,
                    f">= {1 - SCALE_TOLERANCE:.2f}",
                    None if ratio is None else ratio >= 1 - SCALE_TOLERANCE,
                )
            )
    elif scale:
        targets.append(Target("scale ran", scale["error"], "no failure", False))
    return targets


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _database(report: Mapping[str, Any]) -> str:
    """``PostgreSQL 15.4, 2 workers``: the backend the orders servers ran on (SQLite for older reports)."""
    database = report.get("database") or {"name": "SQLite", "version": report["machine"]["sqlite"]}
    workers = report.get("workers", 1)
    return f"{database['name']} {database['version'].split()[0]}, {workers} worker{'s' if workers != 1 else ''}"


def _baselines_line(baselines: Sequence[Mapping[str, Any]]) -> str:
    """How often the baseline was measured, and its RPS range (the row above is its first run)."""
    rps = [b["rps"] for b in baselines if b.get("rps")]
    if len(baselines) < 2 or not rps:
        return f"{'':<10} measured once, before the scenarios: every ratio is to it"
    failed = len(baselines) - len(rps)
    return (
        f"{'':<10} measured {len(baselines)} times, before the first scenario and after each unary round "
        f"({min(rps):,.0f}-{max(rps):,.0f} RPS{f', {failed} failed' if failed else ''}); "
        "each ratio is to the mean of the two around it"
    )


def _rounds_line(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Every round of a scenario in brief (the row above is its median round)."""
    ratios = ", ".join(_fmt(r.get("ratio_to_baseline"), ".2f") for r in rounds)
    rps = [r["rps"] for r in rounds]
    return (
        f"{'':<10} {len(rounds)} rounds, x base {ratios}, {min(rps):,.0f}-{max(rps):,.0f} RPS; the row is the "
        "median round, with the errors of all rounds and the worst round's p99/p50"
    )


def _reference_line(scenario: Mapping[str, Any]) -> str:
    """The scenario on :mod:`bench.reference`, and how many times its throughput the orders server has."""
    reference = scenario["reference"]
    if "error" in reference:
        return f"{'':<10} on bench.reference (grpcio + sqlite3): FAILED: {reference['error'].splitlines()[0]}"
    errors = f", {reference['errors']} errors" if reference["errors"] else ""
    return (
        f"{'':<10} on bench.reference (grpcio + sqlite3): {_fmt(reference['rps'])} RPS, x base "
        f"{_fmt(reference['ratio_to_baseline'], '.2f')}, p50 {_fmt(reference['p50_ms'], '.2f')} ms, "
        f"{_fmt(reference.get('written_kb_per_call'), '.2f')} KB written per call{errors}; "
        f"the orders server does {_fmt(scenario.get('x_reference'), '.2f')}x its throughput"
    )


def table(report: Mapping[str, Any]) -> str:
    """The short human summary: one line per scenario, then the targets."""
    lines = []
    machine = report["machine"]
    config = report["config"]
    lines.append(
        f"orders bench: {machine['cores']} cores, Python {machine['python']}, "
        f"grpclib {machine['versions']['grpclib']}; server on {_database(report)}; "
        f"{config['concurrency']} callers over {config['channels']} channel(s), "
        f"{config['procs']} generator process(es), client {config['client']}, "
        f"{config['duration']:g}s (+{config['warmup']:g}s warm-up)"
    )
    header = (
        f"{'scenario':<10} {'RPS':>9} {'x base':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9':>8} {'p99/p50':>7} "
        f"{'errors':>6} {'srv CPU':>7} {'loop CPU':>8} {'srv wait':>8} {'gen CPU':>7} {'RSS MB':>7} "
        f"{'cpu ms/call':>11} {'x base':>6} {'disk KB/call':>12}"
    )
    lines += [header, "-" * len(header)]
    rows = {"baseline": report.get("baseline") or {}, **report.get("scenarios", {})}
    for name, s in rows.items():
        if not s:
            continue
        if "error" in s:
            lines.append(f"{name:<10} FAILED: {s['error'].splitlines()[0]}")
            continue
        if name == "watch":
            d = s["delivery_ms"]
            lines.append(
                f"{'watch':<10} {_fmt(s['writer']['rate']):>9} {'':>7} {_fmt(d.get('p50_ms'), '.2f'):>8} "
                f"{_fmt(d.get('p99_ms'), '.2f'):>8} {_fmt(d.get('p99_9_ms'), '.2f'):>8} {'':>7} {s['errors']:>6} "
                f"{_fmt(s['server']['cpu_percent']):>6}% {_fmt(s['server']['loop_cpu_percent']):>7}% "
                f"{_fmt(s['server']['cpu_wait_percent']):>7}% {_fmt(s['generator_cpu_percent']):>6}% "
                f"{_fmt(s['server']['peak_rss_mb']):>7}"
            )
            watching = "every order" if s["orders_per_watcher"] == "all" else f"{s['orders_per_watcher']} orders each"
            lines.append(
                f"{'':<10} {s['watchers']} watchers ({watching}) on {s['connections']} connection(s), "
                f"{s['updates_per_second']:g} updates/s asked; delivered {s['delivered']:,} of {s['expected']:,}, "
                f"missed {s['missed']:,} ({s['not_caught_up']:,} watchers not caught up after the drain), "
                f"duplicates {s['duplicates']:,}; latency commit->receipt"
            )
            continue
        lat = s["latency_ms"]
        server = s.get("server") or {}
        lines.append(
            f"{name:<10} {_fmt(s['rps']):>9} {_fmt(s.get('ratio_to_baseline'), '.2f'):>7} "
            f"{_fmt(lat.get('p50_ms'), '.2f'):>8} {_fmt(lat.get('p99_ms'), '.2f'):>8} "
            f"{_fmt(lat.get('p99_9_ms'), '.2f'):>8} "
            f"{_fmt(s.get('p99_over_p50')):>7} {s['errors']:>6} {_fmt(server.get('cpu_percent')):>6}% "
            f"{_fmt(server.get('loop_cpu_percent')):>7}% {_fmt(server.get('cpu_wait_percent')):>7}% "
            f"{_fmt(s.get('generator_cpu_percent')):>6}% "
            f"{_fmt(server.get('peak_rss_mb')):>7} "
            f"{_fmt(server.get('cpu_ms_per_call'), '.3f'):>11} {_fmt(s.get('cpu_ratio_to_baseline'), '.2f'):>6} "
            f"{_fmt(server.get('written_kb_per_call'), '.2f'):>12}"
        )
        if s["errors"]:
            lines.append(f"{'':<10} errors: {', '.join(f'{k} x{v}' for k, v in s['error_codes'].items())}")
        if name == "baseline":
            lines.append(_baselines_line(report.get("baselines") or []))
        if s.get("rounds"):
            lines.append(_rounds_line(s["rounds"]))
        if s.get("reference"):
            lines.append(_reference_line(s))
    scale = report.get("scale")
    if scale:
        if "error" in scale:
            lines.append(f"scale: FAILED: {scale['error'].splitlines()[0]}")
        else:
            lines.append(
                f"scale: preloaded {scale['large_orders']:,} orders in {scale['preload_seconds']:.1f}s "
                f"({scale['large_db_mb']:.0f} MB)"
            )
            for call in ("get", "list"):
                small, large = scale["small"][call], scale["large"][call]
                lines.append(
                    f"  {call:<5} {scale['small_orders']:>9,} orders: {_fmt(small['rps']):>8} RPS p50 "
                    f"{_fmt(small['latency_ms'].get('p50_ms'), '.2f')} ms | {scale['large_orders']:,} orders: "
                    f"{_fmt(large['rps']):>8} RPS p50 {_fmt(large['latency_ms'].get('p50_ms'), '.2f')} ms | "
                    f"RPS ratio {_fmt(scale['ratios'][f'{call}_rps_large_over_small'], '.2f')}, "
                    f"server CPU/call ratio {_fmt(scale['ratios'][f'{call}_cpu_per_call_large_over_small'], '.2f')}"
                )
    lines.append("")
    lines.append("targets (issue 5):")
    for target in report.get("targets", []):
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[target["pass"]]
        lines.append(f"  {verdict}  {target['target']}: {_fmt(target['measured'], '.3g')} ({target['limit']})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write the report as indented, strict JSON (a NaN, which JSON has no word for, is a ValueError: a value
    that can be undefined must be None)."""
    path.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
