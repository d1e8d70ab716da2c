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


def test_follow_prints_each_change_once_in_a_pipe_and_ends_with_the_jobs(
        capsys: Any) -> None:
    """`submit --wait` in a pipe: one line per job or task state, until every job ended.
    The agent is a stand-in here; tests/system/test_jobfiles.py follows a real one."""
    import argparse
    import asyncio
    import json

    from farmnode.cli.jobs import follow

    jobs = [{"id": 1, "name": "sim", "title": None, "state": "running", "reason": None,
             "tasks": [10]},
            {"id": 2, "name": "comp", "title": None, "state": "queued", "reason": None,
             "tasks": [11]}]
    tasks = [task(10, 1, 1, "running", 0.0)]

    class Agent:
        async def list_jobs(self) -> str:
            return json.dumps(jobs)

        async def list_tasks(self, active: bool) -> str:
            return json.dumps(tasks)

    async def scenario() -> list[dict[str, Any]]:
        changes: asyncio.Queue[Any] = asyncio.Queue()
        following = asyncio.create_task(follow(argparse.Namespace(json=False), Agent(),
                                               changes, {1, 2}))
        await asyncio.sleep(0.05)
        tasks[0].update(state="done", progress=1.0)
        jobs[0]["state"] = "done"
        jobs[1]["state"] = "running"
        tasks.append(task(11, 2, 1, "running", 0.5))
        changes.put_nowait(("", 10, "done", "", 1.0))
        await asyncio.sleep(0.3)
        tasks[1].update(state="failed", progress=0.5, reason="exit status 3")
        jobs[1].update(state="failed", reason="frame 1: exit status 3")
        changes.put_nowait(("", 11, "failed", "", 0.5))
        return await asyncio.wait_for(following, 5)

    final = asyncio.run(scenario())
    assert [j["state"] for j in final] == ["done", "failed"]
    assert capsys.readouterr().out.splitlines() == [
        "sim: running 0/1 tasks 0%",
        "sim: task 10 frame 1: running 0%",
        "comp: queued 0/0 tasks 0%",
        "sim: done 1/1 tasks 100%",
        "sim: task 10 frame 1: done 100%",
        "comp: running 0/1 tasks 50%",
        "comp: task 11 frame 1: running 50%",
        "comp: failed 0/1 tasks 50% (frame 1: exit status 3)",
        "comp: task 11 frame 1: failed 50% (exit status 3)",
    ]


def test_follow_in_a_terminal_redraws_the_tree_in_place(
        capsys: Any, monkeypatch: Any) -> None:
    import argparse
    import asyncio
    import json
    import sys

    from farmnode.cli.jobs import follow

    jobs = [{"id": 1, "name": "sim", "title": None, "state": "running", "reason": None,
             "tasks": [10]}]
    tasks = [task(10, 1, 1, "running", 0.25)]

    class Agent:
        async def list_jobs(self) -> str:
            return json.dumps(jobs)

        async def list_tasks(self, active: bool) -> str:
            return json.dumps(tasks)

    async def scenario() -> None:
        changes: asyncio.Queue[Any] = asyncio.Queue()
        following = asyncio.create_task(follow(argparse.Namespace(json=False), Agent(),
                                               changes, {1}))
        await asyncio.sleep(0.05)
        tasks[0].update(state="done", progress=1.0)
        jobs[0]["state"] = "done"
        changes.put_nowait(("", 10, "done", "", 1.0))
        await asyncio.wait_for(following, 5)

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    asyncio.run(scenario())
    first, second = capsys.readouterr().out.split("\x1b[2F\x1b[J")  # up 2 lines, clear
    assert first.splitlines() == progress.draw(progress.build(
        [task(10, 1, 1, "running", 0.25)], [{**jobs[0], "state": "running"}]))
    assert "[####################] 100.0%     1/1  sim: done" in second
