"""Progress of a fakerender job reaches the master's task rows."""

from __future__ import annotations

from tests.interop.conftest import Farm, wait_for


def test_fakerender_progress_reaches_the_master(farm: Farm) -> None:
    job_id = farm.submit("fakerender", 1, {"duration": 6}, requeue=0)
    seen: set[float] = set()

    def finished() -> bool:
        (t,) = farm.tasks(job_id)
        seen.add(float(t["progress"]))
        return bool(t["state"] == "done")

    wait_for("the task ends", finished, timeout=60, interval=0.1, detail=farm.detail)
    between = sorted(p for p in seen if 0 < p < 1)
    assert between, seen
    (t,) = farm.tasks(job_id)
    assert float(t["progress"]) == 1.0
    print(f"\nprogress seen on the master: {sorted(seen)}")
