"""The progress tree of `farmnode tasks`: job-file jobs with their tasks, other jobs by id,
bars in a terminal and one plain line per job and task in a pipe."""

from __future__ import annotations

from typing import Any

from farmnode.cli import progress


def task(i: int, job: int, frame: float, state: str, p: float, reason: str = "") -> dict[str, Any]:
    return {"id": i, "job_id": job, "frame": frame, "state": state, "progress": p,
            "reason": reason or None}


def test_tree_groups_tasks_under_their_jobs() -> None:
    tasks = [task(11, 1, 1, "done", 1.0), task(12, 1, 2, "running", 0.5),
             task(900, 77, 3, "failed", 0.2, "exit status 3")]
    jobs = [{"id": 1, "name": "render", "title": "beauty", "state": "running",
             "reason": None, "tasks": [11, 12]},
            {"id": 2, "name": "comp", "title": None, "state": "queued", "reason": None,
             "tasks": [13]}]
    nodes = progress.build(tasks, jobs)
    assert [(n.label, n.state, n.done, len(n.tasks)) for n in nodes] == [
        ("render (beauty)", "running", 1, 2), ("comp", "queued", 0, 0),
        ("job 77", "failed", 0, 1)]
    lines = progress.draw(nodes, width=10)
    assert lines[0] == "[########..]  75.0%     1/2  render (beauty): running"
    assert lines[1].startswith("  |-- [#####]") and lines[2].startswith("  `-- [##...]")
    assert lines[2].endswith("task 12 frame 2: running")
    assert lines[3] == "[..........]   0.0%       -  comp: queued"
    assert lines[-1].endswith("task 900 frame 3: failed  exit status 3")
    plain = progress.plain(nodes)
    assert plain[(1, None)] == "render (beauty): running 1/2 tasks 75%"
    assert plain[(77, 900)] == "job 77: task 900 frame 3: failed 20% (exit status 3)"
    assert not progress.finished(nodes)
    assert progress.finished(progress.build([task(1, 5, 1, "done", 1.0)]))
