"""The master sync loop against a real HTTP test master, with a real state store.

Time is compressed through the config (reannounce every second, retries from 50 ms); tests
wait for the test master to have seen the requests, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import itertools
import logging
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmnode.config import Config
from farmnode.master import protocol
from farmnode.master.link import MasterLink
from farmnode.tasks import tasklog
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState
from farmnode.tasks.store import Store
from tests.master_stub import MasterStub, Request, TaskLog
from tests.master_stub import Task as MasterTask


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
        # its task logs' calls are its reports too
        await until(lambda: store.pending_count() == 0, "every report answered")
        # its leaving the list is no reason to reannounce; the next reannounce (here: a state
        # change) no longer lists it, its tasks' reports having been answered
        agent.set_state("disabled")
        await wait(master, lambda rs: any(r.kind == "reannounce"
                                          and r.body["state"] == "disabled" for r in rs),
                   "the state change")
        dis = master.of("reannounce")[-1]
        assert dis.body["current_assignments"] == {}
        assert len(master.of("reannounce")) == 2
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
        # two log registrations, 81's running and its log's state
        assert store.pending_count() == 4
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
        # per task: its log's registration, running and the log's running, the last
        # progress; done and the log's done for two of them
        assert link.status()["master_link"]["queued_reports"] == 16
        await link.stop()
        store.close()
        # restart
        store = Store(db, outbox=True)
        assert store.pending_count() == 16
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


class Scheduler:
    """Plays PyFarm's scheduler and the agent's assign endpoint: an assign the agent accepts
    (202) makes the task the agent's and `sent_to_agent` on the master, so from then on the
    master fails it when a (re)announce does not list it."""

    def __init__(self, master: MasterStub, store: Store, agent: FakeAgent,
                 link: MasterLink) -> None:
        self.master, self.store, self.agent, self.link = master, store, agent, link
        self.answers: list[tuple[int, int]] = []  # (task id, status)

    def assign(self, a: Assignment) -> int:
        """On the event loop, as the agent core's assign is."""
        status = 503 if self.link.assign_refusal() else 202
        self.answers.append((a.tasks[0].id, status))
        if status == 202:
            self.store.add_assignment(a, f"farmnode-task-{a.tasks[0].id}.scope")
            self.agent.changed(TaskState.QUEUED)
            with self.master._cond:
                for t in a.tasks:
                    self.master.tasks[t.id] = MasterTask(t.id, a.job.id, self.agent.agent_id)
        return status


def finish(store: Store, agent: FakeAgent, a: Assignment, state: TaskState) -> None:
    """What the core does as the last task of an assignment ends, in its order and with no
    await between: the task's final state (queued for the master), then the node's state."""
    for t in a.tasks:
        store.set_task_state(a.id, t.id, state)
    agent.changed(state)
    agent.set_state("online")
    store.finish_assignment(a.id)


def test_next_assign_right_after_done_is_never_failed_as_missing(master: MasterStub,
                                                                tmp_path: Path) -> None:
    """The scheduler sends the next task while the master answers our `done`: the node says
    online with the finished assignment still listed before `done`, and no reannounce races
    that assign, so the master never finds its new task missing."""
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)
    sched = Scheduler(master, store, agent, link)
    jobs = [make_assignment(5, [500 + i]) for i in range(4)]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        def on_done(req: Request) -> tuple[int, Any] | None:
            # In the master's thread, before it answers `done`: the scheduler's next assign
            # reaches the agent (and is answered) first.
            if req.kind == "task" and (req.body or {}).get("state") == "done":
                nxt = next((a for a in jobs if a.tasks[0].id == req.task_id + 1), None)
                if nxt is not None:
                    async def send() -> int:
                        return sched.assign(nxt)
                    asyncio.run_coroutine_threadsafe(send(), loop).result(10)
            return None

        master.override = on_done
        link.start()
        await wait_count(master, "announce", 1)
        # the announce counts as a reannounce: refused until its answer is read
        await until(lambda: link.assign_refusal() is None, "the announce answered")
        assert sched.assign(jobs[0]) == 202
        for a in jobs:
            tid = a.tasks[0].id
            await wait(master, lambda rs, a=a: any(
                r.kind == "reannounce" and a.id in r.body["current_assignments"] for r in rs),
                f"assignment {tid} announced")
            agent.set_state("running")
            store.set_task_state(a.id, tid, TaskState.RUNNING)
            agent.changed()
            await wait(master, lambda rs, tid=tid: any(
                r.task_id == tid and (r.body or {}).get("state") == "running" for r in rs),
                f"task {tid} running")
            finish(store, agent, a, TaskState.DONE)
            await wait(master, lambda rs, tid=tid: any(
                r.task_id == tid and (r.body or {}).get("state") == "done" for r in rs),
                f"task {tid} done")
        await link.stop()

    run(scenario)
    assert sched.answers == [(500, 202), (501, 202), (502, 202), (503, 202)]
    assert not any("missing" in h for t in master.tasks.values() for h in t.history), \
        {t.id: t.history for t in master.tasks.values()}
    assert [master.tasks[500 + i].state for i in range(4)] == ["done"] * 4
    reqs = master.requests
    for a in jobs:
        tid = a.tasks[0].id
        done_at = next(i for i, r in enumerate(reqs)
                       if r.task_id == tid and r.body.get("state") == "done")
        # PyFarm's order: online, with the finished assignment listed (its task done),
        # before `done`
        online = [r for r in reqs[:done_at] if r.kind == "reannounce"
                  and r.body["state"] == "online" and a.id in r.body["current_assignments"]]
        assert online, f"no online reannounce listing {tid} before its done"
        assert online[-1].body["current_assignments"][a.id]["tasks"][0]["local_state"] == \
            "done"


def test_assign_while_a_reannounce_is_out_is_refused(master: MasterStub,
                                                     tmp_path: Path) -> None:
    """The body in flight cannot list an assignment accepted after it was built: 503 until
    the master has answered it; then the assign is accepted and the next reannounce lists
    it."""
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)
    sched = Scheduler(master, store, agent, link)
    a = make_assignment(6, [600])
    entered, release = threading.Event(), threading.Event()

    def hold(req: Request) -> tuple[int, Any] | None:
        if req.kind == "reannounce" and req.body["state"] == "disabled":
            entered.set()
            release.wait(10)
        return None

    async def scenario() -> None:
        master.override = hold
        link.start()
        await wait_count(master, "announce", 1)
        await until(lambda: link.assign_refusal() is None, "the announce answered")
        agent.set_state("disabled")
        assert await asyncio.to_thread(entered.wait, 10)
        assert sched.assign(a) == 503
        release.set()
        await wait_count(master, "reannounce", 1)
        await until(lambda: link.assign_refusal() is None, "the answer read")
        agent.state = "online"
        assert sched.assign(a) == 202
        await wait(master, lambda rs: any(r.kind == "reannounce"
                                          and a.id in r.body["current_assignments"]
                                          for r in rs), "the assignment listed")
        await link.stop()

    run(scenario)
    assert not any("missing" in h for t in master.tasks.values() for h in t.history)


def test_unanswered_reannounce_keeps_refusing_until_one_is_answered(master: MasterStub,
                                                                    tmp_path: Path) -> None:
    """A reannounce lost on the way back (reset, timeout) may still be read by the master
    later: assigns stay refused until a reannounce is answered."""
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        await until(lambda: link.assign_refusal() is None, "the announce answered")
        master.vanish()
        agent.set_state("online")
        await until(lambda: link.last_error is not None and "POST" in link.last_error
                    and link.counters.reannounces >= 2, "a reannounce without answer")
        assert link.assign_refusal() is not None
        master.reappear()
        await wait(master, lambda rs: any(r.kind == "reannounce" and r.status == 200
                                          and r.body["state"] == "online" for r in rs),
                   "an answered reannounce")
        await until(lambda: link.assign_refusal() is None, "the answer read")
        await link.stop()

    run(scenario)


def test_stop_says_offline_before_the_stopped_tasks_are_reported(
        master: MasterStub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real stop: offline first (the master releases the tasks and assigns nothing more),
    then the tasks' reports; a report the master refuses is logged with its answer and
    dropped, and the link goes on."""
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent)
    a = make_assignment(7, [700])

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        store.add_assignment(a, "u")
        store.set_task_state(a.id, 700, TaskState.RUNNING)
        agent.set_state("running")
        agent.changed()
        await wait(master, lambda rs: any(r.task_id == 700 for r in rs), "running reported")
        assert await link.go_offline()
        store.set_task_state(a.id, 700, TaskState.CANCELLED, "agent stopped")
        await link.stop()

    run(scenario)
    reqs = master.requests
    offline = [i for i, r in enumerate(reqs) if r.kind == "offline"]
    cancel = [i for i, r in enumerate(reqs) if r.task_id == 700 and r.body.get("state")
              == "queued"]
    assert len(offline) == 1 and len(cancel) == 1 and offline[0] < cancel[0]
    assert reqs[offline[0]].body["current_assignments"]  # what we still held
    # the master had released the task at offline and refuses the late report: logged
    # with its body, dropped
    assert reqs[cancel[0]].status == 400
    assert "can only be changed by the agent owning this task" in caplog.text
    assert store.pending_count() == 0


# ---- task logs ------------------------------------------------------------------------------

def fake_output(lines: dict[str, list[tuple[int, str]]]) -> tasklog.OutputSource:
    """The job's output per assignment, as journald would give it back."""
    def source(assignment_id: str) -> Iterator[tasklog.OutputLine]:
        for i, (stream, text) in enumerate(lines.get(assignment_id, [])):
            yield tasklog.OutputLine(1_700_000_000.0 + i, 0 if stream == 0 else 1, text)
    return source


def log_calls(master: MasterStub) -> list[tuple[str, int | None, int]]:
    return [(r.kind, r.log[1] if r.log else None, r.status) for r in master.requests
            if r.kind.startswith("log_")]


def run_task(store: Store, a: Assignment, final: TaskState = TaskState.DONE,
             reason: str | None = None, exit_code: int | None = 0) -> None:
    """A task's life as the agent core records it."""
    store.add_log_lines(a.id, tasklog.start_lines(
        1_700_000_000.0, a.job.title, len(a.tasks), "/bin/sh", ("-c", "echo hi"), "/tmp",
        "nobody", None, {"FRAME": "1"}))
    store.add_log_lines(a.id, [tasklog.started_line(1_700_000_000.5, "u", 4242)], 4242)
    for t in a.tasks:
        store.set_task_state(a.id, t.id, TaskState.RUNNING)
    for t in a.tasks:
        store.set_task_state(a.id, t.id, final, reason, exit_code=exit_code)
    store.finish_assignment(a.id)


def test_task_log_registered_uploaded_and_marked_in_pyfarm_order(master: MasterStub,
                                                                 tmp_path: Path) -> None:
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    a = dataclasses.replace(make_assignment(3, [30, 31]),
                            tasks=(Task(30, 1.0, attempt=2), Task(31, 2.0, attempt=1)))
    out = fake_output({a.id: [(0, "rendering frame 1"), (1, "warning: a, \"quoted\""),
                              (0, "done")]})
    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent,
                      log_output=out)

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        store.add_assignment(a, "farmnode-task-30.scope")
        run_task(store, a)
        agent.changed(TaskState.DONE)
        await wait(master, lambda rs: len([r for r in rs if r.kind == "log_state"]) >= 4,
                   "the log's states")
        await link.stop()

    run(scenario)
    (log_id,) = master.task_logs
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_3_[0-9a-f]{32}\.csv", log_id)
    assert tasklog.assignment_of(log_id) == a.id
    # PyFarm's order: register each task's attempt before its first state; upload (to the
    # first task) before the last final state; the log's state after each task's
    kinds = [(r.kind, r.task_id or (r.log[1] if r.log else None)) for r in master.requests
             if r.kind in ("task",) or r.kind.startswith("log_")]
    assert kinds == [("log_register", 30), ("log_register", 31),
                     ("task", 30), ("log_state", 30), ("task", 31), ("log_state", 31),
                     ("task", 30), ("log_state", 30),
                     ("log_upload", 30), ("task", 31), ("log_state", 31)]
    assert all(status in (200, 201) for _, _, status in log_calls(master))
    register = master.of("log_register")[0]
    assert register.path == "/api/v1/jobs/3/tasks/30/attempts/2/logs/"
    assert register.body == {"identifier": log_id, "agent_id": agent.agent_id}
    upload = master.of("log_upload")[0]
    assert upload.method == "PUT" and upload.content_type == "text/csv"
    assert upload.path == f"/api/v1/jobs/3/tasks/30/attempts/2/logs/{log_id}/logfile"
    assert [r.body for r in master.of("log_state") if r.log and r.log[1] == 31] == [
        {"state": "running"}, {"state": "done"}]
    # the master has the log for both attempts, done, and the CSV as PyFarm wrote it
    assert master.task_logs[log_id].associations == {(30, 2): "done", (31, 1): "done"}
    content = master.task_logs[log_id].content
    assert content is not None
    rows = list(csv.reader(io.StringIO(content)))
    assert [r[3] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert [(r[1], r[2], r[4]) for r in rows] == [
        ("None", "internal", "Starting work on job None, assignment of 2 tasks."),
        ("None", "internal", "Spawning process. Command: /bin/sh"),
        ("None", "internal", "Arguments: ('-c', 'echo hi')"),
        ("None", "internal", "Work Dir: /tmp"),
        ("None", "internal", "User/Group: nobody None"),
        ("None", "internal", "Environment:"),
        ("None", "internal", "{'FRAME': '1'}"),
        ("4242", "internal", "Started process 4242 in u"),
        ("4242", "0", "rendering frame 1"),
        ("4242", "1", 'warning: a, "quoted"'),
        ("4242", "0", "done"),
        ("4242", "internal", "Process has terminated successfully, code 0"),
    ]
    assert rows[8][0] == "2023-11-14T22:13:20.000000"  # naive UTC, microseconds
    assert store.pending_count() == 0 and link.counters.reports_dropped == 0


def test_task_log_4xx_dropped_409_accepted(master: MasterStub, tmp_path: Path) -> None:
    """A registration the master already has (409: its reply was lost, say) counts as
    delivered; a log call the master refuses (the task is gone: 404) is logged and dropped,
    never retried."""
    agent = FakeAgent()
    store = Store(tmp_path / "db", outbox=True)
    a, b = make_assignment(4, [40]), make_assignment(5, [50])

    def override(req: Request) -> tuple[int, Any] | None:
        if req.log and req.log[1] == 50:
            return 404, {"error": "Specified task not found"}
        return None

    link = MasterLink(config(master, agent_master_reannounce=3600), store, agent,
                      log_output=fake_output({}))

    async def scenario() -> None:
        link.start()
        await wait_count(master, "announce", 1)
        master.override = override
        for x in (a, b):
            store.add_assignment(x, "u")
        record = store.task_log(a.id)
        assert record is not None
        master.task_logs[record.identifier] = TaskLog(record.identifier, agent.agent_id,
                                                      0.0, {(40, 0): None})
        for x in (a, b):
            run_task(store, x, TaskState.FAILED, "exit code 3", exit_code=3)
        agent.changed(TaskState.FAILED)
        await wait(master, lambda rs: len([r for r in rs if r.kind == "log_state"]) >= 4,
                   "every log call")
        await link.stop()

    run(scenario)
    calls = log_calls(master)
    assert [c for c in calls if c[1] == 50] == [("log_register", 50, 404),
                                                ("log_state", 50, 404),
                                                ("log_upload", 50, 404),
                                                ("log_state", 50, 404)]
    assert [c for c in calls if c[1] == 40] == [("log_register", 40, 409),
                                                ("log_state", 40, 200),
                                                ("log_upload", 40, 201),
                                                ("log_state", 40, 200)]
    (tlog,) = [t for t in master.task_logs.values() if (40, 0) in t.associations]
    assert tlog.associations[(40, 0)] == "failed"
    assert tlog.content is not None and "Task 40 failed: exit code 3" in tlog.content
    assert "Process has not terminated successfully, code 3" in tlog.content
    assert link.counters.reports_dropped == 4
    assert store.pending_count() == 0


def test_master_outage_during_a_task_delays_its_log_across_a_restart(master: MasterStub,
                                                                      tmp_path: Path) -> None:
    """The master vanishes while the task runs; the agent restarts; the log arrives once,
    complete, when the master is back — after the registration, before `done`."""
    agent = FakeAgent()
    db = tmp_path / "db"
    cfg = config(master, agent_master_reannounce=3600, agent_shutdown_timeout=0.5)
    a = make_assignment(6, [60])
    out = fake_output({a.id: [(0, f"line {i}") for i in range(1, 1001)]})

    async def scenario() -> None:
        store = Store(db, outbox=True)
        link = MasterLink(cfg, store, agent, log_output=out)
        link.start()
        await wait_count(master, "announce", 1)
        master.vanish()
        store.add_assignment(a, "u")
        store.set_task_state(a.id, 60, TaskState.RUNNING)
        agent.changed()
        await link.stop()
        store.close()
        store = Store(db, outbox=True)  # restart
        link = MasterLink(cfg, store, agent, log_output=out)
        link.start()
        store.set_task_state(a.id, 60, TaskState.DONE, exit_code=0)
        agent.changed(TaskState.DONE)
        master.reappear()
        await wait(master, lambda rs: any(r.kind == "log_state" and r.body == {"state": "done"}
                                          for r in rs), "the log marked done")
        await link.stop()
        assert store.pending_count() == 0

    run(scenario)
    assert [(k, s) for k, _, s in log_calls(master)] == [
        ("log_register", 201), ("log_state", 200), ("log_upload", 201), ("log_state", 200)]
    (tlog,) = master.task_logs.values()
    assert tlog.associations == {(60, 0): "done"}
    assert tlog.content is not None
    messages = [r[4] for r in csv.reader(io.StringIO(tlog.content))]
    assert messages == [f"line {i}" for i in range(1, 1001)] + [
        "Process has terminated successfully, code 0"]


def test_stub_refuses_log_calls_as_pyfarms_master_does(master: MasterStub) -> None:
    """The test master's log endpoints hold us to what PyFarm 0.8.6 checks."""
    import http.client

    def call(method: str, path: str, body: bytes | None, ctype: str | None) -> int:
        conn = http.client.HTTPConnection(master.host, master.port, timeout=5)
        headers = {"User-Agent": "PyFarm/1.0 (agent)"}
        if ctype:
            headers["Content-Type"] = ctype
        conn.request(method, "/api/v1" + path, body=body, headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    agent = str(uuid.uuid4())
    base = "/jobs/1/tasks/10/attempts/1/logs/"
    ident = "2026-01-01_00-00-00_1_" + "0" * 32 + ".csv"
    good = f'{{"identifier": "{ident}", "agent_id": "{agent}"}}'.encode()
    j = "application/json"
    # not registered yet: no upload, no state
    assert call("PUT", base + ident + "/logfile", b"x", "text/csv") == 404
    assert call("POST", base + ident, b'{"state": "done"}', j) == 404
    assert call("POST", base, good, "text/plain") == 415
    assert call("POST", base, b'{"identifier": "x", "agent_id": "y"}', j) == 400
    assert call("POST", base, b'{"identifier": "x", "agent_id": "' + agent.encode()
                + b'", "state": "running"}', j) == 400
    assert call("POST", base, b'{"agent_id": "' + agent.encode() + b'"}', j) == 400
    assert call("POST", base, good, j) == 201
    assert call("POST", base, good, j) == 409
    assert call("POST", "/jobs/2/tasks/10/attempts/1/logs/", good, j) == 404  # other job
    assert call("POST", base + ident, b'{"identifier": "other"}', j) == 400
    assert call("POST", base + ident, b'{"state": "finished"}', j) == 500
    assert call("PUT", base + ident + "/logfile", b"a,b", "text/csv") == 201
    assert call("POST", base + ident, b'{"state": "done"}', j) == 200
    # another attempt of the same task is another association
    assert call("PUT", "/jobs/1/tasks/10/attempts/2/logs/" + ident + "/logfile", b"x",
                "text/csv") == 404
    assert master.task_logs[ident].content == "a,b"
    assert master.task_logs[ident].associations == {(10, 1): "done"}
