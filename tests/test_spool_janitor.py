"""Spools left by runs an earlier agent process concluded are found at startup."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from farmnode.agent.core import Agent
from farmnode.config import Config
from farmnode.systemd import spool
from farmnode.systemd.journal import TaskLogFields
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store


def _assignment(aid: str, task_id: int) -> Assignment:
    return Assignment(id=aid, job=Job(id=7, by=1.0, data={}, environ={}),
                      jobtype=JobTypeRef(name="command", version=1),
                      tasks=(Task(id=task_id, frame=1.0),))


def _leave_spool(tasks: Path, aid: str, ident: str = "farmnode-stdout",
                 record: bool = True) -> None:
    data = tasks / f"{aid}.json.{ident}.spool"
    data.write_bytes(b"<6>one\n")
    if record:
        Path(f"{data}.json").write_text(json.dumps({"identifier": ident}))


def _agent_with_spools(tmp_path: Path, *assignments: tuple[str, int]) -> tuple[Agent, Path]:
    """An agent whose store holds these assignments (id, task), each with a spool left in
    the runtime directory; returns it and that tasks directory."""
    runtime = tmp_path / "run"
    tasks = runtime / "tasks"
    tasks.mkdir(parents=True)
    store = Store(tmp_path / "db")
    agent = Agent(Config(agent_runtime_dir=str(runtime)), store,
                  scopes=None)  # type: ignore[arg-type]
    for aid, task_id in assignments:
        a = _assignment(aid, task_id)
        store.add_assignment(a, f"farmnode-task-{task_id}.scope")
        _leave_spool(tasks, aid)
    return agent, tasks


def test_waiting_lists_each_status_record_with_a_spool_once(tmp_path: Path) -> None:
    _leave_spool(tmp_path, "a1")
    _leave_spool(tmp_path, "a1", "farmnode-stderr")
    _leave_spool(tmp_path, "a2.x")  # an id with a dot in it
    _leave_spool(tmp_path, "a3", record=False)  # nothing placeable in it
    (tmp_path / "a4.json").write_text("{}")  # a status record without a spool
    assert spool.waiting(str(tmp_path)) == {str(tmp_path / "a1.json"): "a1",
                                            str(tmp_path / "a2.x.json"): "a2.x"}
    assert spool.waiting(str(tmp_path / "none")) == {}


def test_orphans_are_spools_of_concluded_runs_whose_shim_is_gone(tmp_path: Path) -> None:
    agent, tasks = _agent_with_spools(tmp_path, ("a-done", 41), ("a-run", 42))
    running = _assignment("a-run", 42)
    _leave_spool(tasks, "a-unknown")
    agent.runs[running.id] = agent._new_run(running)
    assert agent.orphan_spools() == {
        str(tasks / "a-done.json"): TaskLogFields("farmnode-task-41.scope", 7, "a-done", (41,),
                                                  "command")}


def test_one_janitor_probes_once_per_round_and_waits_out_a_live_shim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from farmnode.agent import recovery
    from farmnode.agent.janitor import SpoolJanitor

    agent, tasks = _agent_with_spools(tmp_path, ("a-gone", 51), ("a-live", 52))
    store = agent.store
    # the run that concluded a-gone said its output waited
    waiting = spool.pending_note(str(tasks / "a-gone.json"))
    store.set_task_state("a-gone", 51, TaskState.DONE, f"exit code 0; {waiting}")
    # the shim of a-live outlived its run: it holds its spool for the first rounds
    shim_left_after = 3
    monkeypatch.setattr(recovery, "cgroup_path_dir", lambda path: path)
    monkeypatch.setattr(recovery, "shim_pid", lambda d: 1234 if "task-52" in d and
                        janitor.rounds < shim_left_after else None)
    away = [2]  # journald answers from the third probe on
    tries: list[tuple[int, str]] = []

    def replay(path: str, f: TaskLogFields) -> spool.Replayed:
        tries.append((janitor.rounds, f.assignment_id))
        if away[0] > 0:
            away[0] -= 1
            raise OSError("journalctl --sync: journald is away")
        spool._remove(f"{path}.farmnode-stdout.spool")
        return spool.Replayed(lines=1, bytes=4)

    janitor = SpoolJanitor(agent.spools_left, replay, max_delay=0.01,
                           journaled=agent._journaled_late)
    shown: list[str | None] = []  # what the task objects are given
    agent.record_listeners.append(lambda rec: shown.append(rec.reason))
    agent.spool_janitor = janitor

    async def scenario() -> None:
        janitor.start()
        await asyncio.wait_for(janitor.wait(), 30)

    asyncio.run(scenario())
    # one probe per round while journald was away, then a-gone; a-live once its shim left
    assert tries[:3] == [(1, "a-gone"), (2, "a-gone"), (3, "a-gone")], tries
    assert [aid for _, aid in tries].count("a-live") == 1, tries
    assert next(r for r, aid in tries if aid == "a-live") >= shim_left_after
    assert spool.waiting(str(tasks)) == {}
    # what the reason said was waiting is now what came of it
    rec = store.task(51)
    assert rec is not None and rec.reason == (
        "exit code 0; 1 output lines (4 bytes) were held while journald was away and "
        "journaled late from the shim's spool"), rec.reason
    assert shown == [rec.reason]  # a-live's reason never said its output waited: untouched
