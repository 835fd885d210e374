"""The benchmark's ratios: each unary scenario is compared with the baseline runs measured around it."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report

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
            "measured 3 times, before the first scenario and after each unary one (2,800-4,760 RPS, 1 failed)",
        ),
    ],
)
def test_the_table_says_how_often_the_baseline_ran_and_its_range(
    baselines: list[dict[str, Any]], expected: str
) -> None:
    summaries = [report.baseline_summary(b) for b in baselines]
    assert expected in report._baselines_line(summaries)
