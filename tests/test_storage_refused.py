"""A state directory that refuses writes (full disk, read-only, I/O errors) loses no outcome:
the agent core holds each state change and the end of each assignment in memory, in order,
writes them again until the store takes them, refuses new work meanwhile and says why."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent import heldwrites
from farmnode.agent.core import Agent, StorageFailed, TaskChange
from farmnode.config import Config
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store


def make(tmp_path: Path) -> tuple[Agent, Store, Assignment, list[TaskChange]]:
    store = Store(tmp_path / "db", outbox=True)
    agent = Agent(Config(), store, scopes=None)  # type: ignore[arg-type]  # no task runs here
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("command", 1),
                   (Task(10, 1.0), Task(11, 2.0)))
    store.add_assignment(a, "farmnode-task-10.scope")
    changes: list[TaskChange] = []
    agent.task_listeners.append(changes.append)
    return agent, store, a, changes


def refuse_writes(store: Store, refuse: bool) -> None:
    # SQLite's own refusal (SQLITE_READONLY), raised as a full disk's SQLITE_FULL is: an
    # OperationalError from the write's transaction.
    store.db.execute(f"PRAGMA query_only={'ON' if refuse else 'OFF'}")


def test_outcomes_held_in_order_until_the_store_takes_them(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    monkeypatch.setattr(heldwrites, "STORAGE_RETRY", 0.02)
    agent, store, a, changes = make(tmp_path)
    other = Assignment(str(uuid.uuid4()), Job(id=2, by=1), JobTypeRef("command", 1),
                       (Task(20, 1.0),))

    async def scenario() -> None:
        agent._report_state(a.id, 10, TaskState.RUNNING, None, None, None)
        refuse_writes(store, True)
        agent._report_state(a.id, 11, TaskState.RUNNING, None, None, None)
        agent._report_state(a.id, 10, TaskState.DONE, None, 0, None)
        agent._report_state(a.id, 11, TaskState.FAILED, "exit code 3", 3, None)
        assert agent.storage_error is not None and "readonly" in agent.storage_error
        assert agent.status()["storage_error"] == agent.storage_error
        with pytest.raises(StorageFailed, match="state directory refuses writes"):
            agent.assign({"job": {"id": 2, "by": 1}, "jobtype": {"name": "command",
                          "version": 1}, "tasks": [{"id": 20, "frame": 1}]})
        await asyncio.sleep(0.1)  # retries that fail again keep everything held
        assert [r.state for r in store.tasks(a.id)] == [TaskState.RUNNING, TaskState.QUEUED]
        refuse_writes(store, False)
        for _ in range(200):
            if agent.storage_error is None:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert agent.storage_error is None
    recs = {r.id: r for r in store.tasks(a.id)}
    assert (recs[10].state, recs[10].exit_code) == (TaskState.DONE, 0)
    assert (recs[11].state, recs[11].exit_code, recs[11].reason) == (TaskState.FAILED, 3,
                                                                     "exit code 3")
    # each change signalled once, in the order it happened
    assert [(c.task_id, c.state) for c in changes] == [
        (10, TaskState.RUNNING), (11, TaskState.RUNNING), (10, TaskState.DONE),
        (11, TaskState.FAILED)]
    # and queued for the master once each, in that order
    states = [(r.task_id, r.payload["state"]) for r in store.pending_reports(100)
              if r.kind == "task_state"]
    assert states == [(10, "running"), (11, "running"), (10, "done"), (11, "failed")]
    assert store.task_in(other.id, 20) is None


def test_a_refused_assignment_is_not_accepted_and_says_why(tmp_path: Path) -> None:
    agent, store, _a, _ = make(tmp_path)
    refuse_writes(store, True)
    with pytest.raises(StorageFailed, match="could not be stored"):
        agent.assign({"job": {"id": 3, "by": 1}, "jobtype": {"name": "command", "version": 1},
                      "tasks": [{"id": 30, "frame": 1}]})
    assert agent.storage_error is not None
    assert agent.runs == {}
