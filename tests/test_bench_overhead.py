"""The per-task overhead figure of `make bench` (bench/master_overhead.py, bench/report.py):
pure arithmetic on a master's timestamps, no master here."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report
from bench.master_overhead import master_time, overhead


def test_overhead_splits_the_wall_time_beyond_the_run_time_per_task() -> None:
    # submitted at 100; task A runs 100.5-101.6, task B 101.9-103.0 (listed out of order)
    got = overhead(100.0, [101.9, 100.5], [103.0, 101.6])
    assert got["tasks"] == 2
    assert got["wall_s"] == pytest.approx(3.0)
    assert got["per_task_s"] == pytest.approx([0.6, 0.4])
    assert got["dispatch_s"] == pytest.approx([0.5, 0.3])
    assert got["run_extra_s"] == pytest.approx([0.1, 0.1])
    # the samples add up to the job's wall time minus its run time
    assert got["mean_s"] == pytest.approx((3.0 - 2 * 1.0) / 2)
    assert got["p50_s"] == pytest.approx(0.5)


def test_overhead_refuses_timestamps_that_cannot_be_one_task_at_a_time() -> None:
    with pytest.raises(ValueError):
        overhead(100.0, [99.0], [101.0])  # started before the submission
    with pytest.raises(ValueError):
        overhead(100.0, [100.1, 100.5], [101.2, 101.4])  # B started while A ran
    with pytest.raises(ValueError):
        overhead(100.0, [100.1], [101.2, 102.0])


def test_master_time_reads_pyfarm_naive_utc() -> None:
    assert master_time("1970-01-01T00:00:01.500000") == 1.5
    assert master_time("2026-11-22T10:54:50.214561") - master_time(
        "2026-11-22T10:54:49.214561") == pytest.approx(1.0)


def _run(per_task: list[float]) -> dict[str, Any]:
    submitted, t = 0.0, 0.0
    started, finished = [], []
    for extra in per_task:
        started.append(t + extra / 2)
        t += 1.0 + extra
        finished.append(t)
    got = overhead(submitted, started, finished)
    got["host_wall_s"] = t + 0.05
    return got


def test_report_row_pools_rounds_and_gives_the_ratio_to_the_stub() -> None:
    results = {"overhead": {
        "frames": 3, "reps": 2, "command": ["/bin/sleep", "1"], "master_start_s": 9.0,
        "clock": "theirs",
        "runs": {"real": [_run([0.4, 0.4, 0.4]), _run([0.2, 0.2, 1.1])],
                 "stub": [_run([0.1, 0.1, 0.1]), _run([0.1, 0.1, 0.1])]}}}
    (row,) = report._overhead_rows(results)
    assert "mean 450 ms" in row[1] and "p50 400" in row[1] and "(2 jobs)" in row[1]
    assert "mean 100 ms" in row[2] and f"**4.5{report.TIMES}**" in row[2]
    details = "\n".join(report._overhead_details(results["overhead"]))
    assert "| PyFarm 0.8.6 | 6 | 450 | 400 |" in details
    assert "| stub | 6 | 100 | 100 |" in details


def test_a_step_absent_from_the_results_is_not_reported_as_failed() -> None:
    got = {r[0]: r for r in report.rows({"plan": {}})}
    assert got["overhead"][1:] == ("not measured in this run", "", "", "—")
    failed = report.rows({"overhead": {"error": "boom"}})
    assert [r[4] for r in failed if r[0] == "overhead"] == ["**error**"]
