"""Jobs through PyFarm's own scheduler: every task done, none failed spuriously, failures
reported with farmnode's reason and counted as PyFarm's agent counts them."""

from __future__ import annotations

import os
import re
import time

from tests.interop.conftest import Farm

# At least 200 (the requirement); FARMNODE_INTEROP_FRAMES raises it for a longer soak.
FRAMES = max(200, int(os.environ.get("FARMNODE_INTEROP_FRAMES", "200")))


def test_many_one_second_tasks_no_spurious_failure(farm: Farm) -> None:
    """One node, one task at a time (the scheduler's way): every task end is a chance for
    the master's next assign to cross the agent's reannounce."""
    t0 = time.monotonic()
    job_id = farm.submit("command", FRAMES, {"command": ["/bin/sleep", "1"]}, requeue=0)
    job = farm.wait_job(job_id, timeout=FRAMES * 4)
    wall = time.monotonic() - t0
    print(f"\n{FRAMES} one-second tasks in {wall:.0f} s ({wall / FRAMES - 1:.2f} s per task "
          "beyond its run time)")
    tasks = farm.tasks(job_id)
    assert len(tasks) == FRAMES
    bad = [t for t in tasks if (t["state"], t["attempts"], t["failures"]) != ("done", 1, 0)]
    assert not bad, bad[:5]
    assert job["state"] == "done"
    log = farm.master_log()
    assert "was not in the current assignments" not in log
    assert not re.search(r"Unexpected return code on sending batch", log)


def test_failing_job_reports_our_reason(farm: Farm) -> None:
    job_id = farm.submit("command", 2, {"command": ["/bin/sh", "-c", "echo bad >&2; exit 3"]},
                         requeue=0)
    job = farm.wait_job(job_id)
    assert job["state"] == "failed"
    for t in farm.tasks(job_id):
        assert (t["state"], t["attempts"], t["failures"]) == ("failed", 1, 1), t
        assert "exit" in t["last_error"] and "3" in t["last_error"], t
    assert "was not in the current assignments" not in farm.master_log()


def test_requeued_failures_are_counted(farm: Farm) -> None:
    """requeue: 2 — the master retries a failed task twice more; each attempt counts once,
    as with PyFarm's agent."""
    job_id = farm.submit("command", 1, {"command": ["/bin/false"]}, requeue=2)
    job = farm.wait_job(job_id)
    assert job["state"] == "failed"
    (t,) = farm.tasks(job_id)
    assert (t["state"], t["attempts"], t["failures"]) == ("failed", 3, 3), t
    assert "was not in the current assignments" not in farm.master_log()
