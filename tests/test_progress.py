"""Progress throttling in the agent core: a renderer that prints a progress line per sample
must not cost a durable SQLite commit and a D-Bus signal per line, yet the latest value is
never lost and a state change never overtakes the progress before it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from farmnode.agent import progress as throttle
from farmnode.agent.core import Agent, TaskChange
from farmnode.config import Config
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store


def setup(tmp_path: Path) -> tuple[Agent, Store, Assignment, list[TaskChange]]:
    store = Store(tmp_path / "db")
    agent = Agent(Config(), store, scopes=None)  # type: ignore[arg-type]  # no task runs here
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("fakerender", 1),
                   (Task(10, 1.0),))
    store.add_assignment(a, "farmnode-task-10.scope")
    changes: list[TaskChange] = []
    agent.task_listeners.append(changes.append)
    return agent, store, a, changes


def progress_of(store: Store, a: Assignment) -> float:
    return store.tasks(a.id)[0].progress


def test_bursts_are_stored_first_and_latest(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(throttle, "PROGRESS_INTERVAL", 0.05)
    agent, store, a, changes = setup(tmp_path)

    async def scenario() -> None:
        agent._report_state(a.id, 10, TaskState.RUNNING, None, None, None)
        for k in range(1, 1001):
            agent._report_progress(a.id, 10, k / 1000)
        # the first of the burst went out at once, the rest waits for the interval
        assert progress_of(store, a) == 0.001
        await asyncio.sleep(0.2)
        assert progress_of(store, a) == 1.0

    asyncio.run(scenario())
    progress = [c.progress for c in changes if c.state is TaskState.RUNNING]
    assert progress[-1] == 1.0 and len(progress) <= 3, progress  # not 1000 signals


def test_state_change_stores_pending_progress_first(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(throttle, "PROGRESS_INTERVAL", 60)
    agent, _store, a, changes = setup(tmp_path)

    async def scenario() -> None:
        agent._report_state(a.id, 10, TaskState.RUNNING, None, None, None)
        agent._report_progress(a.id, 10, 0.1)
        agent._report_progress(a.id, 10, 0.7)  # held back by the throttle
        agent._report_state(a.id, 10, TaskState.FAILED, "exit code 1", 1, None)

    asyncio.run(scenario())
    assert [(c.state, c.progress) for c in changes][-2:] == [
        (TaskState.RUNNING, 0.7), (TaskState.FAILED, 0.7)]


def test_flush_before_the_agent_goes(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(throttle, "PROGRESS_INTERVAL", 60)
    agent, store, a, _ = setup(tmp_path)

    async def scenario() -> None:
        agent._report_state(a.id, 10, TaskState.RUNNING, None, None, None)
        agent._report_progress(a.id, 10, 0.1)
        agent._report_progress(a.id, 10, 0.4)
        await agent.detach()

    asyncio.run(scenario())
    assert progress_of(store, a) == 0.4
