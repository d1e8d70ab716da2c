"""Workstation mode on the host: the render schedule, the verdict on logind's sessions, and
what the core does with it (no new work, disabled to the master, the reason in status).

Real logind sessions and the real freezer: tests/system/test_workstation.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent.core import Agent, AgentState, NotAccepting
from farmnode.agent.gpus import GpuPool
from farmnode.agent.workstation import HOLD, Workstation, counted, decide
from farmnode.config import Config, ConfigError, load_config
from farmnode.config.schedule import Schedule
from farmnode.systemd.logind import Session
from farmnode.tasks.model import Assignment
from farmnode.tasks.store import Store

NOW = 1_800_000_000.0


def minute(hhmm: str) -> float:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


# ---- the schedule -------------------------------------------------------------------------


def test_a_night_window_runs_past_midnight() -> None:
    s = Schedule.parse("19:00-07:00")
    assert [s.renders_at(minute(t)) for t in ("18:59", "19:00", "23:59", "00:00", "06:59",
                                              "07:00", "12:00")] == [
        False, True, True, True, True, False, False]
    assert s.minutes_to_change(minute("18:00")) == 60
    assert s.minutes_to_change(minute("19:00")) == 12 * 60
    assert s.minutes_to_change(minute("06:30")) == 30


def test_several_windows_and_their_canonical_text() -> None:
    s = Schedule.parse(" 12:00-13:00,19:00-24:00 ,00:00-7:30")
    assert str(s) == "12:00-13:00, 19:00-00:00, 00:00-07:30"
    # 19:00-24:00 and 00:00-07:30 touch: no change at midnight
    assert s.minutes_to_change(minute("20:00")) == minute("07:30") + 4 * 60
    assert s.renders_at(minute("12:30")) and not s.renders_at(minute("13:00"))


def write_config(etc: Path, text: str) -> Path:
    (etc / "conf.d").mkdir(exist_ok=True)
    path = etc / "farmnode.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("value", "expected"), [
    ("19:00-7", "'7' in '19:00-7' is not a time of day (HH:MM)"),
    ("25:00-07:00", "'25:00' in '25:00-07:00' is not a time of day (HH:MM)"),
    ("24:30-07:00", "'24:30' in '24:30-07:00' is past 24:00"),
    ("19:00", "each window must be HH:MM-HH:MM, got '19:00'"),
    ("19:00-19:00", "window '19:00-19:00' is empty or the whole day"),
    ("night", "each window must be HH:MM-HH:MM, got 'night'"),
    (",", "names no window (HH:MM-HH:MM), got ','"),
])
def test_a_schedule_that_does_not_parse_names_the_key_and_the_value(
        tmp_path: Path, value: str, expected: str) -> None:
    path = write_config(tmp_path, f"farm_name: f\nrender_schedule: '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:2: render_schedule: {expected}"), info.value


def test_a_schedule_loads_in_its_canonical_form(tmp_path: Path) -> None:
    path = write_config(tmp_path, "render_schedule: '19:00-7:00'\nworkstation_mode: true\n")
    config = load_config(path, environ={})
    assert config.render_schedule == "19:00-07:00" and config.workstation_mode


# ---- the verdict on logind's sessions -------------------------------------------------------


def session(sid: str = "3", **props: Any) -> Session:
    """A session as logind's GetAll of org.freedesktop.login1.Session gives it (values
    unwrapped, IdleSinceHint in µs)."""
    base: dict[str, Any] = {
        "Id": sid, "Name": "artist", "User": (1001, "/org/freedesktop/login1/user/_1001"),
        "Seat": ("seat0", "/org/freedesktop/login1/seat/seat0"), "TTY": "", "Type": "wayland",
        "Class": "user", "Remote": False, "RemoteHost": "", "Active": True, "State": "active",
        "IdleHint": False, "IdleSinceHint": 0}
    base.update(props)
    return Session.of(sid, base)


def cfg(**kw: Any) -> Config:
    return Config(**{"workstation_mode": True, "workstation_idle_time": 600.0, **kw})


def test_an_active_desktop_user_stops_rendering() -> None:
    v = decide([session()], cfg(), NOW, 0)
    assert not v.render
    assert v.reason == "a user is at the node: artist's session 3 (wayland, seat0) is active"
    assert v.recheck is None  # only logind's signals can change it


def test_resumes_only_after_the_idle_time_from_the_hint() -> None:
    idle = session(IdleHint=True, IdleSinceHint=int((NOW - 100) * 1e6))
    v = decide([idle], cfg(), NOW, 0)
    assert not v.render and "idle 100 s of 600 s" in (v.reason or "")
    assert v.recheck == pytest.approx(500)  # the idle timeout: no signal comes for it
    assert decide([idle], cfg(), NOW + 500, 0).render


def test_text_sessions_count_by_their_ttys_last_input() -> None:
    # logind reports a text session's tty atime as IdleSinceHint; no signal when it changes
    tty = session(Type="tty", TTY="tty2", IdleSinceHint=int((NOW - 30) * 1e6))
    v = decide([tty], cfg(workstation_tty_check_interval=5.0), NOW, 0)
    assert not v.render and v.recheck == 5.0
    v = decide([tty], cfg(workstation_tty_check_interval=5.0), NOW + 600, 0)
    assert v.render and v.recheck == 5.0  # looked at again: the user may come back


def test_remote_background_greeter_and_inactive_sessions_do_not_count() -> None:
    ssh = session("5", Seat=("", "/"), Type="tty", TTY="pts/0", Remote=True,
                  RemoteHost="10.0.0.9")
    others = [ssh, session("6", Class="greeter"), session("7", Active=False),
              session("8", Class="background"), session("9", State="closing")]
    assert decide(others, cfg(), NOW, 0).render
    assert not counted(ssh, remote=False) and counted(ssh, remote=True)
    v = decide(others, cfg(workstation_remote_sessions=True), NOW, 0)
    assert not v.render and "session 5 (tty, pts/0, from 10.0.0.9) is active" in (v.reason or "")


def test_the_schedule_applies_without_workstation_mode() -> None:
    night = Config(render_schedule="19:00-07:00")
    v = decide([session()], night, NOW, minute("12:00"))
    assert not v.render and v.reason == "outside render_schedule (19:00-07:00)"
    assert v.recheck == 300  # at least every 5 min: the clock may be set meanwhile
    v = decide([session()], night, NOW, minute("20:00"))
    assert v.render and v.recheck == 300
    assert decide([], night, NOW, minute("18:58")).recheck == pytest.approx(120)
    assert decide([], Config(), NOW, 0) == decide([session()], Config(), NOW, 0)


def test_when_logind_cannot_be_read_the_user_is_given_the_benefit(tmp_path: Path) -> None:
    from sdbus.dbus_exceptions import DbusFailedError

    agent = agent_on(tmp_path)

    async def broken() -> list[Session]:
        raise DbusFailedError("org.freedesktop.DBus.Error.ServiceUnknown: no logind")

    async def scenario() -> None:
        ws = Workstation(cfg(), agent, Recorder(), broken)  # type: ignore[arg-type]
        await ws.start()
        assert not ws.verdict.render and ws.verdict.recheck == 5.0
        assert "logind's sessions cannot be read" in agent.status()["state_reason"]
        await ws.stop()

    asyncio.run(scenario())


# ---- the core: no new work, disabled to the master, the reason in status --------------------


def agent_on(tmp_path: Path, **config: Any) -> Agent:
    agent = Agent(Config(**config), Store(tmp_path / "db"), scopes=None,  # type: ignore[arg-type]
                  gpu_pool=GpuPool.of([]))

    def start(a: Assignment, gpu_ids: Any = ()) -> None:
        # held as running, not run (the system tier runs them), counted as _launch does
        agent.runs[a.id] = agent._new_run(a, gpu_ids)
        agent._open[a.id] = agent.store.unfinished(a.id)

    agent._start = start  # type: ignore[method-assign]
    return agent


def job(n: int) -> dict[str, Any]:
    return {"job": {"id": n, "by": 1, "data": {"command": ["/bin/true"]}},
            "jobtype": {"name": "command", "version": 1}, "tasks": [{"id": n, "frame": 1}]}


class Recorder:
    """Stands in for systemd's freezer on the host (the system tier uses the real one)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def pause(self, unit: str, how: str) -> bool:
        self.calls.append(("pause", unit))
        return True

    async def resume(self, unit: str, how: str) -> bool:
        self.calls.append(("resume", unit))
        return True

    async def release(self, unit: str) -> None:
        self.calls.append(("release", unit))


def test_a_hold_disables_the_node_and_says_why(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    states: list[AgentState] = []
    agent.state_listeners.append(states.append)
    agent.assign(job(1))
    agent.set_hold(HOLD, "a user is at the node")
    assert agent.state is AgentState.DISABLED
    with pytest.raises(NotAccepting, match="agent is disabled and takes no new work: a user"):
        agent.assign(job(2))
    assert agent.status()["state_reason"] == "a user is at the node"
    agent.set_state("online")  # the admin cannot wish the user away
    assert agent.state is AgentState.DISABLED
    agent.set_hold(HOLD, None)
    # back to what it was: the held assignment's task is unfinished
    assert agent.state is AgentState.RUNNING and agent.status()["state_reason"] is None
    assert states == [AgentState.DISABLED, AgentState.RUNNING]


def test_the_admins_disabled_outlasts_a_hold(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    agent.set_state("disabled")
    agent.set_hold(HOLD, "outside render_schedule (19:00-07:00)")
    agent.set_hold(HOLD, None)
    assert agent.state is AgentState.DISABLED
    agent.set_state("online")
    assert agent.state is AgentState.ONLINE


def test_the_watcher_pauses_running_scopes_and_resumes_them(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    aid, _ = agent.assign(job(10))
    unit = agent.runs[aid].unit
    now = [NOW]
    current = [[session()]]

    async def sessions() -> list[Session]:
        return current[0]

    async def scenario() -> None:
        freezer = Recorder()
        ws = Workstation(cfg(), agent, freezer, sessions, clock=lambda: now[0])  # type: ignore[arg-type]
        await ws.start()
        assert agent.state is AgentState.DISABLED and freezer.calls == [("pause", unit)]
        assert ws.status()["paused_units"] == [unit]
        current[0] = [session(IdleHint=True, IdleSinceHint=int(NOW * 1e6))]
        await ws.evaluate()  # idle, but not for long enough
        assert freezer.calls == [("pause", unit)] and agent.state is AgentState.DISABLED
        now[0] += 600
        await ws.evaluate()
        assert freezer.calls[-1] == ("resume", unit) and agent.state is AgentState.RUNNING
        await ws.stop()

    asyncio.run(scenario())


def test_the_master_sees_the_node_disabled_with_its_frozen_tasks_running(
        tmp_path: Path) -> None:
    from farmnode.master.link import MasterLink
    from farmnode.tasks.model import TaskState
    from tests.master_stub import MasterStub
    from tests.test_master import config as master_config
    from tests.test_master import until

    with MasterStub() as master:
        cfg_ = master_config(master, agent_master_reannounce=3600, workstation_mode=True)
        agent = Agent(cfg_, Store(tmp_path / "db", outbox=True),
                      scopes=None, gpu_pool=GpuPool.of([]))  # type: ignore[arg-type]
        link = MasterLink(cfg_, agent.store, agent)
        agent.master_link = link

        def start(a: Assignment, gpu_ids: Any = ()) -> None:
            agent.runs[a.id] = agent._new_run(a, gpu_ids)
            agent._open[a.id] = agent.store.unfinished(a.id)
            agent._report_state(a.id, a.tasks[0].id, TaskState.RUNNING, None, None, None)

        agent._start = start  # type: ignore[method-assign]

        async def scenario() -> None:
            link.start()
            await asyncio.to_thread(master.wait_count, "announce", 1, 20, 200)
            await until(lambda: link.assign_refusal() is None, "the announce answered")
            aid, _ = agent.assign(job(30))
            agent.set_hold(HOLD, "a user is at the node: artist's session 3 (wayland)")
            # PyFarm's agent state for "takes no work"; the task stays the master's running
            re = await asyncio.to_thread(master.wait_for, lambda rs: any(
                r.kind == "reannounce" and r.body["state"] == "disabled" for r in rs), 20,
                "the disabled reannounce")
            body = [r for r in re if r.kind == "reannounce"][-1].body
            assert body["current_assignments"][aid]["tasks"][0]["local_state"] == "running"
            await asyncio.to_thread(master.wait_for, lambda rs: master.tasks.get(30) is not None
                                    and master.tasks[30].state == "running", 20, "task 30")
            agent.set_hold(HOLD, None)
            await asyncio.to_thread(master.wait_for, lambda rs: any(
                r.kind == "reannounce" and r.body["state"] == "running" for r in rs), 20,
                "the running reannounce")
            assert master.tasks[30].state == "running"
            await link.stop()

        asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_paused_runs_clock_stops_and_the_store_keeps_it_for_a_restart(
        tmp_path: Path) -> None:
    agent = agent_on(tmp_path, task_max_runtime=3600.0)
    aid, _ = agent.assign(job(11))
    run = agent.runs[aid]
    run.started_at = NOW - 100
    now = [NOW]
    current = [[session()]]

    async def sessions() -> list[Session]:
        return current[0]

    async def scenario() -> None:
        ws = Workstation(cfg(), agent, Recorder(), sessions, clock=lambda: now[0])  # type: ignore[arg-type]
        await ws.start()
        assert run.paused_since is not None
        assert agent.store.paused_of(aid) == (0.0, run.paused_since)
        current[0] = [session(IdleHint=True, IdleSinceHint=int((NOW - 3600) * 1e6))]
        await ws.evaluate()
        assert run.paused_since is None and run.paused_for > 0
        assert agent.store.paused_of(aid) == (run.paused_for, None)
        await ws.stop()

    asyncio.run(scenario())
    # the clock counts from the start, less the pause
    assert run.ran_for(NOW + 50) == pytest.approx(150 - run.paused_for)


def test_a_store_of_an_older_farmnode_gains_the_pause_columns(tmp_path: Path) -> None:
    import sqlite3

    from farmnode.tasks import store as store_module
    from farmnode.tasks.schema import parse_assignment

    gpus = "    gpus TEXT,  -- JSON: the GPUs (UUID, else PCI address) the assignment holds\n"
    older = store_module.SCHEMA.replace(gpus, "gpus TEXT\n")
    older = "\n".join(line for line in older.splitlines() if "paused_" not in line)
    assert "paused" not in older and "gpus TEXT\n);" in older
    db = tmp_path / "db"
    con = sqlite3.connect(db)
    con.executescript(older)
    con.close()
    store = Store(db)
    a = parse_assignment(job(12))
    store.add_assignment(a, "farmnode-task-12.scope")
    assert store.paused_of(a.id) == (0.0, None)
    store.set_paused(a.id, 5.0, NOW)
    assert store.paused_of(a.id) == (5.0, NOW)
