"""The benchmark's ratios (each unary scenario is compared with the baseline runs measured around it)
and the server's resources it reports per call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.hist import Histogram
from bench.load import LoadResult
from bench.procs import Used, cpu_seconds, cpu_wait_seconds, main_thread_cpu_seconds, written_bytes

pytestmark = pytest.mark.database_free


def _run(rps: float, cpu_ms_per_call: float | None = None) -> dict[str, Any]:
    return {"rps": rps, "latency_ms": {"p50_ms": 9.0}, "server": {"cpu_ms_per_call": cpu_ms_per_call}}


def test_a_ratio_is_to_the_mean_of_the_baseline_runs_before_and_after_the_scenario() -> None:
    scenario = _run(1500.0, cpu_ms_per_call=0.6)
    report.add_ratios(scenario, [_run(2800.0, cpu_ms_per_call=0.32), _run(3200.0, cpu_ms_per_call=0.28)])
    assert scenario["baseline_rps"] == 3000.0
    assert scenario["ratio_to_baseline"] == 0.5
    assert scenario["cpu_ratio_to_baseline"] == 0.5  # mean baseline CPU per call 0.30 ms / 0.60 ms


def test_a_failed_baseline_run_is_left_out_and_with_none_there_is_no_ratio() -> None:
    scenario = _run(1000.0)
    report.add_ratios(scenario, [{"error": "the baseline server did not start"}, _run(4000.0)])
    assert (scenario["baseline_rps"], scenario["ratio_to_baseline"]) == (4000.0, 0.25)
    assert "cpu_ratio_to_baseline" not in scenario  # no CPU figures to compare

    alone = _run(1000.0)
    report.add_ratios(alone, [{"error": "the baseline server did not start"}])
    assert "ratio_to_baseline" not in alone and "baseline_rps" not in alone


@pytest.mark.parametrize(
    ("baselines", "expected"),
    [
        ([_run(3000.0)], "measured once, before the scenarios"),
        (
            [_run(2800.0), _run(4759.6), {"error": "x"}],
            "measured 3 times, before the first scenario and after each unary round (2,800-4,760 RPS, 1 failed)",
        ),
    ],
)
def test_the_table_says_how_often_the_baseline_ran_and_its_range(
    baselines: list[dict[str, Any]], expected: str
) -> None:
    summaries = [report.baseline_summary(b) for b in baselines]
    assert expected in report._baselines_line(summaries)


def _round(rps: float, ratio: float, tail: float, errors: dict[str, int]) -> dict[str, Any]:
    return {
        "rps": rps,
        "ratio_to_baseline": ratio,
        "latency_ms": {"p50_ms": 10.0, "p99_ms": 10.0 * tail},
        "p99_over_p50": tail,
        "errors": sum(errors.values()),
        "error_codes": errors,
    }


def test_a_scenario_of_several_rounds_is_its_median_round_with_every_error_and_the_worst_tail() -> None:
    rounds = [
        _round(1400.0, 0.46, 2.5, {}),
        _round(2100.0, 0.66, 9.5, {"create: UNAVAILABLE": 1}),
        _round(1700.0, 0.52, 3.0, {"create: DEADLINE_EXCEEDED": 2}),
    ]
    combined = report.median_round(rounds)
    assert (combined["rps"], combined["ratio_to_baseline"]) == (1700.0, 0.52)  # by ratio, not by order
    assert combined["errors"] == 3
    assert combined["error_codes"] == {"create: DEADLINE_EXCEEDED": 2, "create: UNAVAILABLE": 1}
    assert combined["p99_over_p50"] == 9.5
    assert [r["ratio_to_baseline"] for r in combined["rounds"]] == [0.46, 0.66, 0.52]
    assert report.median_round(rounds[:2])["ratio_to_baseline"] == 0.46  # the lower median of two
    assert report.median_round(rounds[:1]) is rounds[0]


def _judged(scenario: dict[str, Any]) -> list[report.Target]:
    return [t for t in report.judge({"scenarios": {"create": scenario}}) if "grpcio" in t.name]


def test_the_reference_comparison_takes_each_side_to_its_own_baselines() -> None:
    ours = _round(1500.0, 0.50, 2.0, {})
    report.add_reference(
        ours, [_round(700.0, 0.20, 3.0, {}), _round(500.0, 0.10, 2.0, {}), _round(900.0, 0.16, 2.0, {})]
    )
    # Ours: 0.50 of the baseline; the reference's median round: 0.16. Not 1500 / 900 RPS.
    assert ours["x_reference"] == 3.12
    assert ours["reference"]["rps"] == 900.0 and ours["reference"]["rounds"] == [0.20, 0.10, 0.16]
    [target] = _judged(ours)
    assert (target.measured, target.passed) == (3.12, True)
    assert "3.12x its throughput" in report._reference_line(ours)

    behind = _round(1500.0, 0.50, 2.0, {})
    report.add_reference(behind, [_round(1400.0, 0.25, 2.0, {})])
    assert [t.passed for t in _judged(behind)] == [False]  # 2x


def test_a_failed_reference_run_fails_its_target_and_says_why() -> None:
    ours = _round(1500.0, 0.50, 2.0, {})
    report.add_reference(ours, [{"error": "bench.reference exited with status 1"}])
    assert "x_reference" not in ours
    [target] = _judged(ours)
    assert target.passed is None and target.measured == "bench.reference exited with status 1"
    assert "FAILED: bench.reference exited" in report._reference_line(ours)


_MACHINE = {"cores": 2, "python": "3.11.7", "versions": {"grpclib": "0.4.9"}, "sqlite": "3.40.1"}
_CONFIG = {"concurrency": 32, "channels": 1, "procs": 1, "client": "upb", "duration": 2.0, "warmup": 1.0}


def test_the_bytes_a_process_writes_to_storage_are_read_from_proc(tmp_path: Path) -> None:
    before = written_bytes(os.getpid())
    (tmp_path / "megabyte").write_bytes(os.urandom(1 << 20))
    assert written_bytes(os.getpid()) - before >= 1 << 20
    assert written_bytes(2**22 + 1) == 0  # no such process: nothing to report, not an error


def test_a_scenario_reports_the_server_s_disk_writes_per_call_in_the_json_and_the_table() -> None:
    histogram = Histogram()
    for _ in range(400):
        histogram.record(0.010)
    load = LoadResult(window=2.0, histograms={"create": histogram})
    usage = report.ServerUsage(50 << 20, 1.0, 2.0, 1, 0, written_bytes=4096 * 1000)
    scenario = report.unary_report(load, usage)
    assert scenario["server"]["written_kb_per_call"] == 10.0  # 4,000 KB over 400 calls
    assert scenario["server"]["written_mb"] == 3.91
    table = report.table({"machine": _MACHINE, "config": _CONFIG, "scenarios": {"create": scenario}, "targets": []})
    header, _, row = table.splitlines()[1:4]
    assert header.split()[-2:] == ["disk", "KB/call"]
    assert row.split()[0] == "create" and row.split()[-1] == "10.00"


def _burn(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_the_cpu_of_a_process_s_main_thread_is_read_apart_from_its_other_threads() -> None:
    process, main = cpu_seconds(os.getpid()), main_thread_cpu_seconds(os.getpid())
    worker = threading.Thread(target=_burn, args=(0.3,))
    worker.start()
    worker.join()
    _burn(0.1)
    process_used, main_used = cpu_seconds(os.getpid()) - process, main_thread_cpu_seconds(os.getpid()) - main
    assert process_used >= 0.35  # both threads' work, at clock-tick resolution
    assert 0.05 <= main_used <= 0.25  # only the main thread's
    assert main_thread_cpu_seconds(2**22 + 1) == 0.0  # no such process: nothing to report, not an error


_BURN_ON_ONE_CPU = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
until = time.thread_time() + 0.4
while time.thread_time() < until:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""


def _waited_for_a_cpu(burners: int) -> float:
    """Seconds that ``burners`` processes, each burning 0.4 s of CPU on the same core, waited for it in all."""
    cpu = min(os.sched_getaffinity(0))
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _BURN_ON_ONE_CPU, str(cpu)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(burners)
    ]
    try:
        for burner in started:
            assert burner.stdout is not None and burner.stdout.readline() == "burnt\n"
        return sum(cpu_wait_seconds(burner.pid) for burner in started)
    finally:
        for burner in started:
            burner.communicate("\n", timeout=10)


def test_the_time_a_process_s_threads_waited_for_a_cpu_is_read_from_the_scheduler() -> None:
    # alone on its core, it ran whenever it wanted to (in one of three tries: something else of the
    # machine's may want that core for a moment)
    assert any(_waited_for_a_cpu(1) < 0.2 for _ in range(3))
    assert _waited_for_a_cpu(2) >= 0.25  # two on one core: whichever ran, the other waited, about 0.4 s in all
    assert cpu_wait_seconds(2**22 + 1) == 0.0  # no such process: nothing to report, not an error


def test_what_a_process_tree_used_adds_up_and_subtracts_field_by_field() -> None:
    assert Used(2.0, 300, 1.5, 0.75) - Used(0.5, 100, 0.5, 0.25) == Used(1.5, 200, 1.0, 0.5)
    assert Used(1.5, 200, 1.0, 0.5) + Used(0.5, 100, 0.5, 0.25) == Used(2.0, 300, 1.5, 0.75)


def test_a_scenario_reports_the_cpu_of_the_server_s_event_loop_thread_and_its_wait_for_a_cpu() -> None:
    histogram = Histogram()
    histogram.record(0.010)
    load = LoadResult(window=2.0, histograms={"create": histogram})
    usage = report.ServerUsage(50 << 20, 1.8, 2.0, 1, 0, loop_cpu_seconds=1.3, cpu_wait_seconds=0.4)
    scenario = report.unary_report(load, usage)
    server = scenario["server"]
    assert (server["cpu_percent"], server["loop_cpu_percent"], server["cpu_wait_percent"]) == (90.0, 65.0, 20.0)
    table = report.table({"machine": _MACHINE, "config": _CONFIG, "scenarios": {"create": scenario}, "targets": []})
    header, _, row = table.splitlines()[1:4]
    assert header.split()[11:17] == ["srv", "CPU", "loop", "CPU", "srv", "wait"]
    assert row.split()[8:11] == ["90.0%", "65.0%", "20.0%"]
