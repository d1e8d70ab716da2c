"""The typed D-Bus API on a real dbus-daemon: task objects under the ObjectManager, their
PropertiesChanged, retention, the agent's properties, TryAssign's typed refusals; read with
the real busctl and gdbus. Task records come from the store through the core's own
reporting paths (the ones a run calls), so the objects see what a real task leaves."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdbus import sd_bus_open_user

from farmnode.agent.core import Agent
from farmnode.bus.interface import BUS_NAME, OBJECT_PATH, Agent1Interface
from farmnode.bus.task1 import TASK_INTERFACE, task_path
from farmnode.bus.views import ACCOUNTING_FIELDS, UNSET, TaskView
from farmnode.systemd.cgroup import read_accounting
from farmnode.tasks.model import StateChange, TaskState
from tests.private_bus import Monitor, busctl, payload, private_bus, run, serve, stored


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    with private_bus(tmp_path) as addr:
        yield addr


# A scope's cgroup files in the kernel's format, every figure the agent reads.
CGROUP_FILES = {
    "memory.current": "1024\n", "memory.peak": "4096\n", "pids.current": "3\n",
    "pids.peak": "5\n", "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
}


def props(signal: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """PropertiesChanged as busctl prints it: interface, {name: value}."""
    interface, changed, invalidated = signal["payload"]["data"]
    assert invalidated == []
    return interface, {k: v["data"] for k, v in changed.items()}


def test_task_objects_follow_their_task_and_go_after_the_retention(address: str,
                                                                   tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve(tmp_path / "state.db", agent_task_object_retention=0.5) as agent, \
                Monitor(address) as mon:
            a = stored(agent, [101, 102])
            for tid in (101, 102):
                added = await mon.signal("InterfacesAdded")
                path, interfaces = added["payload"]["data"]
                assert path == task_path(tid)
                # what GetManagedObjects says of it, and in the same form
                assert added["payload"]["type"] == "oa{sa{sv}}"
                assert set(interfaces) == {"org.freedesktop.DBus.Peer", TASK_INTERFACE,
                                           "org.freedesktop.DBus.Introspectable",
                                           "org.freedesktop.DBus.Properties"}
                task = {k: v["data"] for k, v in interfaces[TASK_INTERFACE].items()}
                assert (task["Id"], task["State"], task["Unit"], task["AssignmentId"]) == (
                    tid, "queued", "farmnode-task-101.scope", a.id)
                assert task["MemoryPeak"] == UNSET and task["ExitCode"] == -1

            agent._report_states(a.id, [StateChange(101, TaskState.RUNNING, None, None, None)])
            interface, changed = props(await mon.signal("PropertiesChanged", task_path(101)))
            # one signal, naming only what changed
            assert interface == TASK_INTERFACE and set(changed) == {"State", "StartedUSec"}
            assert changed["State"] == "running" and changed["StartedUSec"] > 0

            agent._report_accounting(a.id, {"memory_current": 5 << 20, "memory_peak": 7 << 20,
                                            "cpu_usage_usec": 1500, "tasks_current": 2})
            _, changed = props(await mon.signal("PropertiesChanged", task_path(101)))
            assert changed == {"MemoryCurrent": 5 << 20, "MemoryPeak": 7 << 20,
                               "CPUUsageUSec": 1500, "TasksCurrent": 2}
            out = await busctl(address, "get-property", BUS_NAME, task_path(101),
                               TASK_INTERFACE, "State", "MemoryPeak", "CPUUsageUSec")
            assert out.split("\n")[:3] == ['s "running"', f"t {7 << 20}", "t 1500"]
            # the queued task's scope figures are not its own: none yet
            out = await busctl(address, "get-property", BUS_NAME, task_path(102),
                               TASK_INTERFACE, "MemoryPeak")
            assert out.strip() == f"t {UNSET}"

            agent._report_states(a.id, [StateChange(101, TaskState.DONE, None, 0, None)])
            _, changed = props(await mon.signal("PropertiesChanged", task_path(101)))
            assert changed["State"] == "done" and changed["Progress"] == 1.0
            assert changed["ExitCode"] == 0 and changed["FinishedUSec"] > 0
            loop = asyncio.get_running_loop()
            finished = loop.time()
            removed = await mon.signal("InterfacesRemoved")
            assert removed["payload"]["data"] == [task_path(101), [
                "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable",
                "org.freedesktop.DBus.Properties", TASK_INTERFACE]]
            assert loop.time() - finished >= 0.4
            tree = await busctl(address, "tree", "--list", BUS_NAME)
            assert task_path(102) in tree.split() and task_path(101) not in tree.split()

    asyncio.run(scenario())


def test_managed_objects_survive_a_restart_within_the_retention_and_a_retry_reuses_one(
        address: str, tmp_path: Path) -> None:
    state = tmp_path / "state.db"

    async def first() -> str:
        async with serve(state, agent_task_object_retention=3600) as agent:
            a = stored(agent, [201, 202, 203])
            agent._report_states(a.id, [StateChange(201, TaskState.RUNNING, None, None, None)])
            # the scope's figures as the agent reads them: the kernel's files, read_accounting
            cgroup = tmp_path / "farmnode-task-201.scope"
            cgroup.mkdir()
            for name, text in CGROUP_FILES.items():
                (cgroup / name).write_text(text)
            agent._report_accounting(a.id, read_accounting(str(cgroup)))
            agent._report_states(a.id, [
                StateChange(201, TaskState.FAILED, "exit 3", 3, None),
                StateChange(202, TaskState.CANCELLED, "cancelled", None, 15)])
            return a.id

    first_id = asyncio.run(first())

    async def second() -> None:
        # a new agent process: the objects of finished tasks within the retention come back
        async with serve(state, agent_task_object_retention=3600) as agent:
            client_bus = sd_bus_open_user()
            client = Agent1Interface.new_proxy(BUS_NAME, OBJECT_PATH, client_bus)
            managed = await client.get_managed_objects()
            client_bus.close()
            found = [TaskView.from_properties({k: v for k, (_sig, v) in
                                               ifaces[TASK_INTERFACE].items()})
                     for ifaces in managed.values()]
            views = {v.id: v for v in found}
            assert sorted(views) == [201, 202, 203]
            assert (views[201].state, views[201].reason, views[201].exit_code) == (
                "failed", "exit 3", 3)
            assert (views[202].state, views[202].exit_signal) == ("cancelled", 15)
            # the typed view is the record the listings always showed (times to the usec),
            # every cgroup figure included
            record = agent.get_task(201).to_dict()
            assert set(record["accounting"]) == set(ACCOUNTING_FIELDS)
            assert views[201].to_record_dict() == {
                **record, **{k: pytest.approx(record[k], abs=1e-6)
                             for k in ("created", "started", "finished")}}
            # a retry of 201 in a new assignment: the same object, the newer attempt
            retry = stored(agent, [201])
            out = await busctl(address, "get-property", BUS_NAME, task_path(201),
                               TASK_INTERFACE, "AssignmentId", "State", "ExitCode")
            assert out.split("\n")[:3] == [f's "{retry.id}"', 's "queued"', "i -1"]
            assert retry.id != first_id

    asyncio.run(second())

    async def much_later() -> None:
        # retention 0: finished tasks have no object when the agent starts
        async with serve(state, agent_task_object_retention=0):
            tree = (await busctl(address, "tree", "--list", BUS_NAME)).split()
            assert task_path(201) in tree and task_path(202) not in tree

    asyncio.run(much_later())


def test_agent_properties_are_typed_and_signal_their_changes(address: str,
                                                              tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve(tmp_path / "state.db") as agent, Monitor(address) as mon:
            agent.set_state("disabled")
            interface, changed = props(await mon.signal("PropertiesChanged", OBJECT_PATH))
            assert interface == "org.farmnode.Agent1" and changed == {"State": "disabled"}
            a = stored(agent, [301])
            # the core's own bookkeeping of a run, with a body that ends when told to
            ends = asyncio.Event()
            agent._launch(agent._new_run(a), ends.wait())
            _, changed = props(await mon.signal("PropertiesChanged", OBJECT_PATH))
            assert changed == {"RunningTasks": 1, "Assignments": [a.id], "Jobs": [7]}
            agent._report_states(a.id, [StateChange(301, TaskState.RUNNING, None, None, None)])
            text = await run("gdbus", "introspect", "--address", address, "--dest", BUS_NAME,
                             "--object-path", OBJECT_PATH, "--only-properties")
            values = dict(re.findall(r"readonly \S+ (\w+) = (.*);", text))
            assert values["State"] == "'disabled'" and values["RunningTasks"] == "1"
            assert values["MasterLink"] == "'standalone'" and values["GPUsTotal"] == "0"
            assert int(values["TotalRAM"]) == agent.total_ram_mb()
            assert float(values["CPUs"]) == agent.total_cpus()
            text = await run("gdbus", "introspect", "--address", address, "--dest", BUS_NAME,
                             "--object-path", task_path(301), "--only-properties")
            assert "readonly s State = 'running';" in text
            # the run ends: the agent says so even though its state stays the same
            agent._report_states(a.id, [StateChange(301, TaskState.DONE, None, 0, None)])
            ends.set()
            while True:
                _, changed = props(await mon.signal("PropertiesChanged", OBJECT_PATH))
                if "Assignments" in changed:
                    break
            assert changed == {"RunningTasks": 0, "Assignments": [], "Jobs": []}

    asyncio.run(scenario())


def test_try_assign_returns_refusals_typed_and_task_methods_answer(address: str,
                                                                   tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve(tmp_path / "state.db") as agent:
            await refusals(agent)

    async def refusals(agent: Agent) -> None:
        async def try_assign(body: dict[str, Any]) -> str:
            return await busctl(address, "--json=short", "call", BUS_NAME, OBJECT_PATH,
                                "org.farmnode.Agent1", "TryAssign", "s", json.dumps(body))

        def answer(out: str) -> list[Any]:
            data: list[Any] = json.loads(out)["data"]
            data[4] = {k: v["data"] for k, v in data[4].items()}
            return data

        a = stored(agent, [401, 402])
        agent.runs[a.id] = agent._new_run(a)
        got = answer(await try_assign(payload([402, 403])))
        assert got[:3] == ["", False, "org.farmnode.Agent1.Error.PartialOverlap"]
        assert got[4] == {"rejected_task_ids": [402]}
        got = answer(await try_assign(payload([404], cpus=10_000)))
        assert got[2] == "org.farmnode.Agent1.Error.NotEnoughResources"
        assert got[4] == {"resource": "cpus", "available": agent.total_cpus(),
                          "required": 10_000.0}
        got = answer(await try_assign(payload([405], id="x")))
        assert got[2] == "org.farmnode.Agent1.Error.InvalidAssignment"
        assert got[4] == {"field": "job.id"} and got[3].startswith("job.id:")
        got = answer(await busctl(address, "--json=short", "call", BUS_NAME, OBJECT_PATH,
                                  "org.farmnode.Agent1", "TryAssign", "s", "{"))
        assert got[2] == "org.farmnode.Agent1.Error.InvalidAssignment"
        assert "not valid JSON" in got[3]
        # a task that is not running: Cancel says so; a bad signal is named
        del agent.runs[a.id]
        out = await busctl(address, "call", BUS_NAME, task_path(401), TASK_INTERFACE,
                           "Cancel")
        assert out.strip() == "b false"
        proc = await asyncio.create_subprocess_exec(
            "busctl", f"--address={address}", "call", BUS_NAME, task_path(401),
            TASK_INTERFACE, "Signal", "i", "999", stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode != 0 and b"999" in err

    asyncio.run(scenario())
