"""The master sync loop against a real HTTP test master, with a real state store.

Time is compressed through the config (reannounce every second, retries from 50 ms); tests
wait for the test master to have seen the requests, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmnode.config import Config
from farmnode.master import protocol
from farmnode.master.link import MasterLink
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store
from tests.master_stub import MasterStub, Request


class FakeAgent:
    """What the link reads from the agent core; state and free RAM set by the test."""

    def __init__(self) -> None:
        self.agent_id = str(uuid.uuid4())
        self.state = "online"
        self.free_ram = 4000
        self.task_listeners: list[Callable[[Any], None]] = []
        self.state_listeners: list[Callable[[Any], None]] = []

    def free_ram_mb(self) -> int:
        return self.free_ram

    def total_ram_mb(self) -> int:
        return 8000

    def total_cpus(self) -> float:
        return 4.0

    def set_state(self, state: str) -> None:
        self.state = state
        for cb in self.state_listeners:
            cb(state)

    def changed(self, task_state: TaskState = TaskState.RUNNING) -> None:
        change = type("Change", (), {"state": task_state})()
        for cb in self.task_listeners:
            cb(change)


@pytest.fixture
def master() -> Iterator[MasterStub]:
    with MasterStub() as m:
        yield m


def config(master: MasterStub, **kw: Any) -> Config:
    base = dict(master=master.address, master_api=f"http://{master.address}/api/v1",
                agent_master_reannounce=1.0, agent_http_retry_delay=0.05,
                agent_http_retry_max=0.2, agent_shutdown_timeout=3.0, agent_time_offset=0,
                agent_ram_check_interval=0.05, agent_ram_report_delta=100,
                agent_ram_max_report_frequency=0.5, agent_api_port=50000)
    base.update(kw)
    return dataclasses.replace(Config(), **base)


def make_assignment(job: int, task_ids: list[int]) -> Assignment:
    return Assignment(str(uuid.uuid4()), Job(id=job, by=1), JobTypeRef("fakerender", 1),
                      tuple(Task(t, float(i + 1)) for i, t in enumerate(task_ids)))


async def wait(master: MasterStub, pred: Callable[[list[Request]], bool],
               what: str, timeout: float = 20) -> list[Request]:
    return await asyncio.to_thread(master.wait_for, pred, timeout, what)


async def wait_count(master: MasterStub, kind: str, n: int, timeout: float = 20,
                     status: int | None = 200) -> list[Request]:
    return await asyncio.to_thread(master.wait_count, kind, n, timeout, status)


async def until(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait for the link's own view (it lags the master's by one response)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def task_bodies(master: MasterStub, task_id: int) -> list[dict[str, Any]]:
    return [r.body for r in master.of("task", 200) if r.task_id == task_id]


def test_announce_then_periodic_reannounce(master: MasterStub, tmp_path: Path) -> None:
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, farm_name=None), store, agent)

    async def scenario() -> None:
        link.start()
        (announce,) = await wait_count(master, "announce", 1)
        assert announce.status == 201 and announce.user_agent == "PyFarm/1.0 (agent)"
        body = announce.body
        assert body["id"] == agent.agent_id and body["state"] == "online"
        assert body["ram"] == 8000 and body["cpus"] == 4 and body["free_ram"] == 4000
        assert body["port"] == 50000 and body["os_class"] == "linux"
        assert body["current_assignments"] == {} and body["time_offset"] == 0
        assert isinstance(body["gpus"], list) and "disks" not in body
        # the master filled in remote_ip from the peer, as PyFarm's does for our User-Agent
        assert master.agents[agent.agent_id]["remote_ip"] == "127.0.0.1"
        # nothing else happens until the master has not heard from us for 1 s
        re1, re2 = await wait_count(master, "reannounce", 2)
        assert set(re1.body) == {"state", "free_ram", "current_assignments"}
        assert re2.at - re1.at >= 0.9 and re1.at - announce.at >= 0.9
        status = link.status()
        assert status["master_link"]["announced"] is True
        assert status["last_master_contact"] is not None
        assert status["master_link"]["queued_reports"] == 0
        await link.stop()
        (off,) = await wait_count(master, "offline", 1)
        assert off.body["state"] == "offline" and "free_ram" in off.body

    run(scenario)
    assert master.agents[agent.agent_id]["state"] == "offline"


def test_task_reports_in_order_and_state_change_reannounces(master: MasterStub,
                                                            tmp_path: Path) -> None:
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)
    a = make_assignment(7, [70, 71])

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        store.add_assignment(a, "farmnode-task-70.scope")
        agent.changed(TaskState.QUEUED)
        # a new assignment is reannounced at once, with the assignment in it
        (re,) = await wait_count(master, "reannounce", 1)
        assert list(re.body["current_assignments"]) == [a.id]
        assert [t["id"] for t in re.body["current_assignments"][a.id]["tasks"]] == [70, 71]
        for tid in (70, 71):
            store.set_task_state(a.id, tid, TaskState.RUNNING)
            store.set_task_progress(a.id, tid, 0.5)
        store.set_task_state(a.id, 70, TaskState.DONE)
        store.set_task_state(a.id, 71, TaskState.FAILED, "exit status 3")
        store.finish_assignment(a.id)
        agent.changed(TaskState.DONE)
        await wait(master, lambda rs: len([r for r in rs if r.kind == "task"]) >= 6, "reports")
        # the assignment has gone from what the master is told once its tasks are reported
        await wait(master, lambda rs: any(r.kind == "reannounce"
                                          and not r.body["current_assignments"] for r in rs),
                   "a reannounce without the assignment")
        agent.set_state("disabled")
        await wait(master, lambda rs: any(r.kind == "reannounce"
                                          and r.body["state"] == "disabled" for r in rs),
                   "the state change")
        await link.stop()

    run(scenario)
    assert task_bodies(master, 70) == [{"state": "running", "time_started": "now"},
                                       {"progress": 0.5}, {"state": "done"}]
    assert task_bodies(master, 71) == [{"state": "running", "time_started": "now"},
                                       {"progress": 0.5},
                                       {"state": "failed", "last_error": "exit status 3"}]
    assert master.tasks[70].state == "done" and master.tasks[70].progress == 1.0
    assert master.tasks[71].last_error == "exit status 3"
    # reports were sent before the reannounce that dropped the assignment: nothing was
    # failed by the master for being missing
    assert not any("missing" in h for t in master.tasks.values() for h in t.history)
    assert store.pending_count() == 0


def test_5xx_retried_with_backoff_4xx_dropped(master: MasterStub, tmp_path: Path) -> None:
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)
    a = make_assignment(8, [80, 81])
    refuse_80 = {"on": True}

    def override(req: Request) -> tuple[int, Any] | None:
        if req.task_id == 80 and refuse_80["on"]:
            return 400, {"error": "Cannot set progress: task is already in state `done`"}
        return None

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        master.mode = "fail"
        store.add_assignment(a, "u")
        store.set_task_state(a.id, 81, TaskState.RUNNING)
        agent.changed()
        await wait(master, lambda rs: len([r for r in rs if r.status == 503]) >= 4, "4 503s")
        failed = [r for r in master.requests if r.status == 503]
        gaps = [b.at - a.at for a, b in itertools.pairwise(failed)]
        assert all(g >= 0.02 for g in gaps), gaps  # backed off, not hammering
        await until(lambda: link.last_error is not None, "the error")
        assert link.status()["master_link"]["last_error"].endswith("failing on command")
        assert store.pending_count() == 1
        master.override = override
        store.set_task_state(a.id, 80, TaskState.RUNNING)
        master.mode = "ok"
        await wait(master, lambda rs: any(r.task_id == 81 and r.status == 200 for r in rs)
                   and any(r.task_id == 80 for r in rs), "both reports")
        await wait_count(master, "reannounce", 1)
        await link.stop()

    run(scenario)
    refused = [r for r in master.requests if r.task_id == 80]
    assert len(refused) == 1 and refused[0].status == 400  # 4xx: sent once, never again
    assert [r.status for r in master.requests if r.task_id == 81][-1] == 200
    assert len([r for r in master.requests if r.task_id == 81 and r.status == 200]) == 1
    assert store.pending_count() == 0
    assert link.counters.reports_dropped == 1


def test_reannounce_404_announces_again(master: MasterStub, tmp_path: Path) -> None:
    agent = FakeAgent()
    link = MasterLink(config(master), Store(tmp_path / "db", outbox=True), agent)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        master.agents.clear()  # the master lost its database
        await wait(master, lambda rs: any(r.kind == "reannounce" and r.status == 404
                                          for r in rs), "a 404")
        await wait_count(master, "announce", 2)
        await link.stop()

    run(scenario)
    assert agent.agent_id in master.agents


@pytest.mark.parametrize("bad_id", ["../../jobs/1", "not-a-uuid", 42, None, "a" * 500])
def test_announce_reply_with_a_malformed_id(master: MasterStub, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture,
                                           bad_id: object) -> None:
    """A malformed id must not reach a URL nor wedge the loop: it is logged with the body,
    the announce is retried, and a good reply later lets the link go on."""
    agent = FakeAgent()
    link = MasterLink(config(master), Store(tmp_path / "db", outbox=True), agent)
    master.override = (lambda req: (201, {"id": bad_id, "hostname": "x"})
                       if req.kind == "announce" else None)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 2, status=201)
        assert not link.announced and "without a valid agent id" in (link.last_error or "")
        master.override = None
        await wait_count(master, "reannounce", 1)
        await link.stop()

    with caplog.at_level(logging.ERROR, logger="farmnode.master.link"):
        run(scenario)
    assert any("no valid agent id" in r.getMessage() and repr(bad_id)[:40] in r.getMessage()
               for r in caplog.records)
    # every request after the good announce went to the agent's own, well-formed path
    for r in master.requests:
        assert r.path in ("/api/v1/agents/", f"/api/v1/agents/{agent.agent_id}"), r.path


def test_refused_announce_is_not_retried_in_a_loop(master: MasterStub, tmp_path: Path) -> None:
    agent = FakeAgent()
    link = MasterLink(config(master, farm_name="elsewhere", agent_master_reannounce=3600),
                      Store(tmp_path / "db", outbox=True), agent)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1, status=400)
        await until(lambda: link.last_error is not None, "the error")
        assert link.status()["master_link"]["last_error"].endswith("Wrong farm name")
        await asyncio.sleep(0.5)  # give a wrong implementation the chance to retry
        await link.stop(timeout=0.5)

    run(scenario)
    assert len(master.of("announce", None)) == 1


def test_ram_delta_reports_are_rate_limited(master: MasterStub, tmp_path: Path) -> None:
    agent = FakeAgent()
    cfg = config(master, agent_master_reannounce=3600, agent_ram_max_report_frequency=0.5)
    link = MasterLink(cfg, Store(tmp_path / "db", outbox=True), agent)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        agent.free_ram = 4050  # within the delta: nothing to say
        agent.free_ram = 3000
        (first,) = await wait_count(master, "reannounce", 1)
        assert first.body["free_ram"] == 3000
        # RAM keeps moving by more than the delta every few ms
        for i in range(40):
            agent.free_ram = 3000 - 200 * ((i % 2) + 1)
            await asyncio.sleep(0.02)
        agent.free_ram = 1000
        await wait(master, lambda rs: any(r.kind == "reannounce" and r.body["free_ram"] == 1000
                                          for r in rs), "the last value")
        await link.stop()

    run(scenario)
    reports = master.of("reannounce")
    assert all(r.body["free_ram"] != 4050 for r in reports)
    gaps = [b.at - a.at for a, b in itertools.pairwise(reports)]
    assert all(g >= 0.45 for g in gaps), gaps  # never more often than once per 0.5 s


def test_outage_with_restart_delivers_everything_once_in_order(master: MasterStub,
                                                               tmp_path: Path) -> None:
    """The master vanishes; reports pile up; the agent restarts inside the outage (a new
    link and store on the same database); the master comes back: each report arrives once,
    in order."""
    agent = FakeAgent()
    db = tmp_path / "db"
    cfg = config(master, agent_master_reannounce=3600, agent_shutdown_timeout=0.5)
    a = make_assignment(9, [90, 91, 92])

    async def scenario() -> None:
        store = Store(db, outbox=True)
        link = MasterLink(cfg, store, agent)
        link.start()
        await wait_count(master, "announce", 1)
        master.vanish()
        store.add_assignment(a, "u")
        for tid in a.task_ids:
            store.set_task_state(a.id, tid, TaskState.RUNNING)
            agent.changed()
            for p in (0.25, 0.5, 0.75):
                store.set_task_progress(a.id, tid, p)
            if tid != 92:
                store.set_task_state(a.id, tid, TaskState.DONE)
        await asyncio.sleep(0.3)  # the link is retrying against a closed port
        assert link.status()["master_link"]["queued_reports"] == 8
        await link.stop()
        store.close()
        # restart
        store = Store(db, outbox=True)
        assert store.pending_count() == 8
        link = MasterLink(cfg, store, agent)
        link.start()
        store.set_task_state(a.id, 92, TaskState.FAILED, "agent restarted")
        await asyncio.sleep(0.3)
        master.reappear()
        await wait(master, lambda rs: any(r.task_id == 92 and r.body.get("state") == "failed"
                                          for r in rs), "the last report")
        await link.stop()
        assert store.pending_count() == 0

    run(scenario)
    for tid in (90, 91):
        assert task_bodies(master, tid) == [{"state": "running", "time_started": "now"},
                                            {"progress": 0.75}, {"state": "done"}]
    assert task_bodies(master, 92) == [{"state": "running", "time_started": "now"},
                                       {"progress": 0.75},
                                       {"state": "failed", "last_error": "agent restarted"}]
    # announced again after the restart, offline at each stop that could reach the master
    assert len(master.of("announce")) == 2
    assert master.agents[agent.agent_id]["state"] == "offline"


def test_stop_with_master_gone_ends_within_the_timeout(master: MasterStub,
                                                      tmp_path: Path) -> None:
    agent = FakeAgent()
    link = MasterLink(config(master, agent_shutdown_timeout=0.5),
                      Store(tmp_path / "db", outbox=True), agent)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        master.stall()
        await asyncio.wait_for(link.stop(), 5)  # a bound for the test, not a speed claim

    run(scenario)
    master.release()


def test_report_mapping() -> None:
    from farmnode.tasks.store import Report

    def rep(kind: str, **payload: Any) -> Report:
        return Report(1, kind, 5, 50, payload, 0.0)

    def body(r: Report) -> Any:
        req = protocol.report_request(r, "x")
        return None if req is None else (req.path, req.body)

    assert body(rep("task_state", state="running")) == (
        "/jobs/5/tasks/50", {"state": "running", "time_started": "now"})
    assert body(rep("task_state", state="cancelled", reason="x"))[1] == {
        "state": "queued", "agent_id": None}
    assert body(rep("task_progress", progress=1.7))[1] == {"progress": 1.0}
    assert body(rep("agent_state", state="online")) is None
    assert protocol.backoff(1, 5, 300) <= 5 and protocol.backoff(20, 5, 300) <= 300
    assert protocol.backoff(20, 5, 300) >= 150
