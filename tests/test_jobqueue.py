"""The node's own job queue against the real agent core and its store: jobs start in
dependency order through Agent.assign, failures reach dependents with their reason, and the
queue survives being reopened (a restart) at any point, a crash between marking a batch and
assigning it included.

The core's runs are held instead of run (no systemd here); their task states arrive through
the core's own reporting path (`_report_states`), as a run reports them. The system tier
runs the same queue under a real systemd.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent.core import Agent
from farmnode.config import Config
from farmnode.jobfile.parse import load
from farmnode.jobfile.queue import TASK_ID_BASE, JobQueue, JobStore, listing
from farmnode.tasks.model import Assignment, StateChange, TaskState
from farmnode.tasks.store import Store

# One CPU each on a two-CPU node: two batches may run at once, so only the dependencies
# keep render and comp waiting.
FILE = textwrap.dedent("""\
    jobs:
      - {id: render, jobtype: command, start: 1, end: 2, batch: 1, cpus: 1,
         data: {command: [/bin/true]}, dependencies: [sim]}
      - {id: comp, jobtype: command, start: 1, end: 1, data: {command: [/bin/true]},
         cpus: 1, dependencies: [render]}
      - {id: sim, jobtype: command, start: 1, end: 1, data: {command: [/bin/true]},
         ram: 16, cpus: 1}
    """)


def held_agent(tmp_path: Path) -> Agent:
    agent = Agent(Config(agent_cpus=2), Store(tmp_path / "farmnode.db"),
                  scopes=None)  # type: ignore[arg-type]

    def start(a: Assignment, gpu_ids: Any = ()) -> None:
        agent.runs[a.id] = agent._new_run(a, gpu_ids)

    agent._start = start  # type: ignore[method-assign]
    return agent


def finish(agent: Agent, aid: str, state: TaskState = TaskState.DONE,
           reason: str | None = None) -> None:
    """The run's end as the core hears it: every task's final state, then the run goes."""
    run = agent.runs.pop(aid)
    agent._report_states(aid, [StateChange(t.id, state, reason) for t in run.assignment.tasks])


def running(agent: Agent) -> dict[str, str]:
    """{assignment id: job name (its title)} of what the agent holds now."""
    return {aid: run.assignment.job.title or "" for aid, run in agent.runs.items()}


def jobs(store: JobStore) -> dict[str, tuple[str, str | None]]:
    return {j["name"]: (j["state"], j["reason"]) for j in listing(store)}


async def settle() -> None:
    for _ in range(3):  # the queue acts on the loop's next turn after a change
        await asyncio.sleep(0)


def test_jobs_run_in_dependency_order_through_assign(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent = held_agent(tmp_path)
        store = JobStore(tmp_path / "jobs.db")
        queue = JobQueue(agent, store)
        queue.start()
        queue.submit(load(FILE, "f.yaml", jobtypes=["command"]))
        # Only sim may start; no cpus given means the whole node, so one batch at a time.
        (aid,) = agent.runs
        a = agent.runs[aid].assignment
        assert (a.job.title, a.job.ram, [t.id for t in a.tasks]) == ("sim", 16,
                                                                     [TASK_ID_BASE + 1])
        assert agent.store.task(TASK_ID_BASE + 1) is not None  # in the agent's own store
        assert jobs(store)["render"] == ("queued", None)
        finish(agent, aid)
        await settle()
        # render's two batches at once (a CPU each); comp waits for both.
        assert sorted(running(agent).values()) == ["render", "render"]
        assert sorted(t.frame for r in agent.runs.values() for t in r.assignment.tasks) == [
            1.0, 2.0]
        assert jobs(store)["render"] == ("running", None)
        first, second = list(agent.runs)
        finish(agent, first)
        await settle()
        assert list(running(agent).values()) == ["render"]
        finish(agent, second)
        await settle()
        assert list(running(agent).values()) == ["comp"]
        finish(agent, next(iter(agent.runs)))
        await settle()
        assert jobs(store) == {"sim": ("done", None), "render": ("done", None),
                               "comp": ("done", None)}
        queue.stop()

    asyncio.run(scenario())


def test_a_failed_job_fails_its_dependents_with_its_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent = held_agent(tmp_path)
        store = JobStore(tmp_path / "jobs.db")
        queue = JobQueue(agent, store)
        queue.start()
        queue.submit(load(FILE, "f.yaml", jobtypes=["command"]))
        finish(agent, next(iter(agent.runs)), TaskState.FAILED, "exit status 3")
        await settle()
        assert agent.runs == {}
        assert jobs(store) == {
            "sim": ("failed", "frame 1: exit status 3"),
            "render": ("failed", "dependency 'sim' failed: frame 1: exit status 3"),
            "comp": ("failed", "dependency 'render' failed: dependency 'sim' failed: "
                               "frame 1: exit status 3")}
        queue.stop()

    asyncio.run(scenario())


def test_the_queue_survives_a_restart_and_a_crash_between_marking_and_assigning(
        tmp_path: Path) -> None:
    async def first_agent() -> None:
        agent = held_agent(tmp_path)
        store = JobStore(tmp_path / "jobs.db")
        queue = JobQueue(agent, store)
        queue.start()
        queue.submit(load(FILE, "f.yaml", jobtypes=["command"]))
        finish(agent, next(iter(agent.runs)))
        await settle()
        # render's two batches were assigned; the agent dies having marked the second one
        # `starting`, before Assign stored it: the agent's store forgets it.
        queue.stop()
        _b1, b2 = store.batches(states=("running",))
        store.set_batch(b2, "starting")
        agent.store.db.execute("DELETE FROM tasks WHERE assignment_id=?",
                               (b2.assignment_id,))
        agent.store.db.commit()
        store.close()
        agent.store.close()

    async def second_agent() -> None:
        agent = held_agent(tmp_path)  # the same state directory
        store = JobStore(tmp_path / "jobs.db")
        b1 = store.batches(states=("running",))[0]
        a1 = agent.store.assignment(b1.assignment_id or "")
        assert a1 is not None
        agent.runs[a1.id] = agent._new_run(a1)  # re-adopted by the core
        queue = JobQueue(agent, store)
        queue.start()
        # The marked batch never reached the agent: offered again, not lost.
        assert store.batches(states=("starting",)) == []
        (a2,) = set(agent.runs) - {a1.id}
        assert [t.frame for t in agent.runs[a2].assignment.tasks] == [2.0]
        finish(agent, a1.id)
        await settle()
        # Now a crash right after Assign took a batch, before the queue wrote that down,
        # and the batch ends while no agent runs.
        queue.stop()
        (b2,) = store.batches(states=("running",))
        store.set_batch(b2, "starting")
        finish(agent, a2)
        queue = JobQueue(agent, store)
        queue.start()
        # Concluded from the agent's store: done, not run a second time; comp starts.
        assert [b.state for b in store.batches(b2.job_id)] == ["done", "done"]
        assert list(running(agent).values()) == ["comp"]
        queue.stop()

    asyncio.run(first_agent())
    asyncio.run(second_agent())


def test_tasks_stopped_with_the_agent_run_again_under_new_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent = held_agent(tmp_path)
        store = JobStore(tmp_path / "jobs.db")
        queue = JobQueue(agent, store)
        queue.start()
        queue.submit(load(FILE, "f.yaml", jobtypes=["command"]))
        (aid,) = agent.runs
        old = agent.runs[aid].assignment.tasks[0].id
        finish(agent, aid, TaskState.CANCELLED, "agent stopped")
        await settle()
        (aid2,) = agent.runs
        new = agent.runs[aid2].assignment.tasks[0].id
        assert aid2 != aid and new != old and new > old
        assert jobs(store)["sim"] == ("running", None)
        queue.stop()

    asyncio.run(scenario())


def test_a_file_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    jf = load(FILE, "f.yaml", jobtypes=["command"])
    store.db.execute("CREATE TRIGGER boom BEFORE INSERT ON batches WHEN "
                     "(SELECT count(*) FROM batches) >= 2 BEGIN SELECT RAISE(ABORT, 'disk "
                     "full'); END")
    with pytest.raises(Exception, match="disk full"):
        store.add_file(jf)
    assert listing(store) == [] and store.batches() == []
    store.db.execute("DROP TRIGGER boom")
    store.add_file(jf)
    assert [j["name"] for j in listing(store)] == ["sim", "render", "comp"]


def test_a_submission_stored_once_is_not_stored_again_by_its_retry(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    jf = load(FILE, "f.yaml", jobtypes=["command"])
    first = store.add_file(jf, submission="token-1")
    assert store.add_file(jf, submission="token-1") == first  # the retry after a lost reply
    assert store.submitted("token-1") == first and store.submitted("token-2") is None
    assert [j["name"] for j in listing(store)] == ["sim", "render", "comp"]
    # no token, or another one: a new submission of the same file, as asked
    store.add_file(jf)
    store.add_file(jf, submission="token-2")
    assert len(listing(store)) == 9
    # a restart keeps the tokens
    store.close()
    assert JobStore(tmp_path / "jobs.db").submitted("token-1") == first


def test_a_jobs_db_of_an_older_farmnode_gains_the_submission_column(tmp_path: Path) -> None:
    import sqlite3

    from farmnode.jobfile import queue

    older = queue.SCHEMA.replace(
        "    submitted REAL NOT NULL,\n"
        "    submission TEXT  -- the caller's token: a retry of the same submission stores "
        "nothing\n", "    submitted REAL NOT NULL\n")
    assert "submission" not in older
    con = sqlite3.connect(tmp_path / "jobs.db")
    con.executescript(older)
    con.close()
    store = JobStore(tmp_path / "jobs.db")
    ids = store.add_file(load(FILE, "f.yaml", jobtypes=["command"]), submission="t")
    assert store.submitted("t") == ids
