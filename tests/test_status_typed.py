"""`farmnode status` and fleet control read the agent object's typed properties.

The agent's service runs on a private dbus-daemon; the CLI runs as a process of its own
whose system bus is that daemon, fleet control's NodeAgent calls it in process. What they
print must be GetStatus's record, key for key, although the record is no longer asked for:
the core's `status()` (all GetStatus answers from) fails once the expected record is taken.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdbus import sd_bus_open_user

from farmnode.agent.core import Agent
from farmnode.agent.gpus import GpuPool
from farmnode.agent.workstation import Figures, Workstation
from farmnode.bus.interface import BUS_NAME, OBJECT_PATH
from farmnode.bus.views import AGENT_PROPERTIES
from farmnode.cli.main import status_text
from farmnode.config import Config
from farmnode.fleet.calls import NodeAgent, Refused
from farmnode.health.watch import HealthWatch, Verdict
from farmnode.master.link import MasterLink
from farmnode.sysinfo.gpu import Gpu
from farmnode.systemd.logind import Session
from farmnode.tasks.model import StateChange, TaskState
from tests.private_bus import Monitor, busctl, private_bus, serve, stored

# Figures that move between two reads whoever reads them: compared loosely.
MOVING = ("uptime", "agent_process_ram", "free_ram", "disks")


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    with private_bus(tmp_path) as addr:
        yield addr


async def cli(address: str, *args: str) -> str:
    """`farmnode ARGS` with the private daemon as its system bus (sd-bus reads
    DBUS_SYSTEM_BUS_ADDRESS), off the loop so the agent on it keeps answering."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "farmnode.cli.main", *args,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def session(sid: str, **props: Any) -> Session:
    """A session as logind's GetAll of org.freedesktop.login1.Session gives it."""
    return Session.of(sid, {
        "Id": sid, "Name": "artist", "User": (1001, "/u"), "Seat": ("seat0", "/s"),
        "TTY": "", "Type": "wayland", "Class": "user", "Remote": False, "RemoteHost": "",
        "Active": True, "State": "active", "IdleHint": False,
        "IdleSinceHint": int(1.8e9 * 1e6), **props})


def same_record(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)  # the same keys, in the same order (the human lines)
    for key in want:
        if key not in MOVING:
            assert got[key] == want[key], key
    assert 0 <= got["uptime"] - want["uptime"] < 60
    assert [d["mountpoint"] for d in got["disks"]] == [d["mountpoint"] for d in want["disks"]]
    assert isinstance(got["agent_process_ram"], int) and got["agent_process_ram"] > 0


def refuse_get_status(agent: Agent) -> dict[str, Any]:
    """The record GetStatus would answer now; from here on GetStatus fails."""
    want = agent.status()

    def gone() -> dict[str, Any]:
        raise AssertionError("GetStatus was called")

    agent.status = gone  # type: ignore[method-assign]
    return want


def changed(signal: dict[str, Any]) -> dict[str, Any]:
    _interface, props, _invalidated = signal["payload"]["data"]
    return {k: v["data"] for k, v in props.items()}


async def next_change(mon: Monitor, name: str) -> dict[str, Any]:
    """The agent object's next PropertiesChanged that names `name`."""
    while True:
        props = changed(await mon.signal("PropertiesChanged", OBJECT_PATH))
        if name in props:
            return props


def test_cli_and_fleet_status_follow_the_properties_after_a_change(address: str,
                                                                    tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve(tmp_path / "state.db") as agent, Monitor(address) as mon:
            a = stored(agent, [301, 302])
            ends = asyncio.Event()
            agent._launch(agent._new_run(a), ends.wait())
            agent._report_states(a.id, [StateChange(301, TaskState.RUNNING, None, None, None)])
            agent.set_hold("health", "health check scratch failed")
            props = await next_change(mon, "StateReason")
            assert props["StateReason"] == "health check scratch failed"
            assert props["State"] == "disabled"
            text = await busctl(address, "get-property", BUS_NAME, OBJECT_PATH,
                                "org.farmnode.Agent1", "State", "StateReason", "Jobs",
                                "RunningTasks", "MainPID")
            assert text.splitlines() == ['s "disabled"', 's "health check scratch failed"',
                                         "ax 1 7", "u 2", f"u {os.getpid()}"]
            want = refuse_get_status(agent)
            assert want["state_reason"] == "health check scratch failed"
            assert (want["jobs"], want["assignments"], want["running_tasks"]) == (
                [7], [a.id], 2)

            got = json.loads(await cli(address, "--json", "status"))
            same_record(got, want)
            moving = re.compile(rf"^({'|'.join(MOVING)}): .*")
            human = [moving.sub(r"\1: -", line)
                     for line in (await cli(address, "status")).splitlines()]
            assert human == [moving.sub(r"\1: -", line) for line in status_text(want).splitlines()]
            assert "state_reason: health check scratch failed" in human
            # the admin's online does not lift the hold: the answer says why
            out = json.loads(await cli(address, "--json", "state", "online"))
            assert out == {"state": "disabled", "state_reason": "health check scratch failed"}
            assert (await cli(address, "state", "online")).strip() == (
                "agent disabled (health check scratch failed)")

            # a second hold on a node already disabled: the reason alone changes
            agent.set_hold("workstation", "a user is at the node")
            props = await next_change(mon, "StateReason")
            assert props == {"StateReason": "health check scratch failed; a user is at the node"}
            assert json.loads(await cli(address, "--json", "status"))["state_reason"] == (
                "health check scratch failed; a user is at the node")
            agent.set_hold("workstation", None)
            assert (await next_change(mon, "StateReason")) == {
                "StateReason": "health check scratch failed"}

            bus = sd_bus_open_user()
            node = NodeAgent(bus)
            st = await node.status()
            assert (st.state, st.assignments, st.running_tasks) == ("disabled", (a.id,), 2)
            same_record(st.raw, want)
            tasks = await node.tasks(active_only=True)
            assert [(t["id"], t["state"]) for t in tasks] == [(301, "running"), (302, "queued")]
            assert tasks == json.loads(await cli(address, "--json", "tasks", "--active"))

            # the hold lifts: the next read says so, with no GetStatus anywhere
            agent.set_hold("health", None)
            props = await next_change(mon, "StateReason")
            assert props["StateReason"] == "" and props["State"] == "running"
            st = await node.status()
            assert st.state == "running" and st.raw["state_reason"] is None
            assert json.loads(await cli(address, "--json", "status"))["state_reason"] is None
            bus.close()
            ends.set()

    asyncio.run(scenario())


def test_master_health_workstation_and_gpus_come_typed_as_getstatus_shows_them(
        address: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve(tmp_path / "state.db", farm_name="north") as agent, \
                Monitor(address) as mon:
            link = MasterLink(Config(master_api="http://master.example:5000/api/v1"),
                              agent.store, agent)
            link.announced, link.last_contact, link.last_announce = True, 1.8e9 + 0.1234, 1.8e9
            link.last_error, link.last_error_at = "POST /agents: 503", 1.7e9 + 0.5
            link.time_offset, link.counters.requests, link.counters.reports_sent = -2, 9, 4
            agent.master_link = link
            health = HealthWatch(None, 30.0, lambda _reason: None)  # type: ignore[arg-type]
            health.enabled, health.passed_once = True, True
            health.units = ["farmnode-health@scratch.service", "site-mounts.service"]
            health.verdicts["farmnode-health@scratch.service"] = Verdict(
                "farmnode-health@scratch.service", False, "exited with status 1",
                ("/var/tmp: 3 MB free", "want 9000"), 1.8e9 + 0.25)
            agent.health = health
            logind = [session("3")]

            async def sessions() -> list[Session]:
                return logind

            ws = Workstation(Config(workstation_mode=True), agent, None,  # type: ignore[arg-type]
                             sessions, clock=lambda: 1.8e9 + 60)
            await ws.evaluate()  # a user at the node: a hold, told on the next turn
            ws.figures = Figures(paused_since=1.8e9 + 1.5, last_pause_s=0.125,
                                 paused_units={"farmnode-task-9.scope"},
                                 errors={"farmnode-task-8.scope": "Unit not loaded"})
            agent.workstation = ws
            agent.gpu_pool = GpuPool((Gpu("0000:01:00.0", "nvidia", "RTX 4090", "nvidia",
                                          24564, uuid="GPU-1234",
                                          devices=("/dev/nvidia0",)),
                                      Gpu("0000:02:00.0", "amd", "W7900", "amdgpu", None)))
            props = await next_change(mon, "StateReason")
            assert props["StateReason"] == (
                "a user is at the node: artist's session 3 (wayland, seat0) is active")
            # each typed, in the same PropertiesChanged
            assert props["HealthChecks"] == [
                ["scratch", "farmnode-health@scratch.service", True, False,
                 "exited with status 1", ["/var/tmp: 3 MB free", "want 9000"], 1.8e9 + 0.25],
                ["site-mounts.service", "site-mounts.service", False, False, "not run yet",
                 [], 0.0]]
            assert props["Master"] == "http://master.example:5000/api/v1"
            assert props["MasterTimeOffset"] == -2 and props["MasterLink"] == "announced"
            assert props["GPUs"][0] == ["GPU-1234", "0000:01:00.0", agent.gpu_status()[0]["name"],
                                        "GPU-1234", ["/dev/nvidia0"], ""]
            assert props["Sessions"][0][:2] == ["3", "artist"]
            assert props["PauseErrors"] == {"farmnode-task-8.scope": "Unit not loaded"}
            assert "FarmName" not in props  # set from the start: unchanged
            want = refuse_get_status(agent)
            assert want["health"] and want["workstation"] and want["master_link"]
            assert want["farm_name"] == "north" and want["gpus"][1]["uuid"] is None
            got = json.loads(await cli(address, "--json", "status"))
            same_record(got, want)
            bus = sd_bus_open_user()
            st = await NodeAgent(bus).status()
            same_record(st.raw, want)

            # what changes with no hold changing is signalled too: a passing check's output
            # (the agent's entry point makes the same connection), another user's session
            health.verdict_listeners.append(agent.status_changed)
            health.verdicts["site-mounts.service"] = Verdict(
                "site-mounts.service", True, "passed", ("/shots mounted",), 1.8e9 + 2)
            health._publish()
            props = await next_change(mon, "HealthChecks")
            assert props["HealthChecks"][1] == ["site-mounts.service", "site-mounts.service",
                                                True, True, "passed", ["/shots mounted"],
                                                1.8e9 + 2]
            assert "StateReason" not in props  # the scratch check still holds the node
            logind.append(session("4", Name="lighter", Remote=True))
            await ws.evaluate()  # the same verdict: no hold changes
            props = await next_change(mon, "Sessions")
            assert "StateReason" not in props
            assert [(s[0], s[1], s[6]) for s in props["Sessions"]] == [
                ("3", "artist", False), ("4", "lighter", True)]
            got = json.loads(await cli(address, "--json", "status"))
            assert got["health"]["checks"][1]["output"] == ["/shots mounted"]
            assert [s["user"] for s in got["workstation"]["sessions"]] == ["artist", "lighter"]
            # the ones that move all the time are read, not signalled (systemd's style)
            xml = await busctl(address, "introspect", "--xml-interface", BUS_NAME, OBJECT_PATH)
            for name in ("AgentProcessRAM", "ConsumedRAM", "Disks", "MasterRequests"):
                assert re.search(rf'<property name="{name}" type="[^"]+" access="read">\s*'
                                 r'<annotation name="org.freedesktop.DBus.Property.'
                                 r'EmitsChangedSignal" value="false"/>', xml), name
            for name, _sig in AGENT_PROPERTIES.values():
                assert re.search(rf'<property name="{name}" type="{re.escape(_sig)}" '
                                 r'access="read">\s*</property>', xml), name
            bus.close()

    asyncio.run(scenario())


def test_the_interface_file_lists_every_property_live_introspection_shows(
        address: str, tmp_path: Path) -> None:
    """What the system tier compares in full, here for the properties on every host run."""
    async def scenario() -> str:
        async with serve(tmp_path / "state.db"):
            return await busctl(address, "introspect", "--xml-interface", BUS_NAME,
                                OBJECT_PATH)

    live = asyncio.run(scenario())
    xml = (Path(__file__).resolve().parents[1] / "dbus/org.farmnode.Agent1.xml").read_text()

    def interface(text: str) -> str:
        got = re.search(r'<interface name="org\.farmnode\.Agent1">.*?</interface>', text, re.S)
        assert got
        return re.sub(r"\s+", " ", got.group(0)).strip()

    assert interface(live) == interface(xml)



# An agent from before the status was typed (its ObjectManager and State alone), in a
# process of its own: sdbus declares an interface name once per process.
OLDER_AGENT = """
import asyncio, sys
from sdbus import DbusObjectManagerInterfaceAsync, dbus_property_async, sd_bus_open_user

class OlderAgent(DbusObjectManagerInterfaceAsync, interface_name="org.farmnode.Agent1"):
    @dbus_property_async("s")
    def state(self) -> str:
        return "online"

async def main() -> None:
    bus = sd_bus_open_user()
    agent = OlderAgent()
    agent.export_to_dbus("/org/farmnode/Agent1", bus)
    await bus.request_name_async("org.farmnode.Agent1", 0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def test_an_older_agent_is_named_as_such_not_a_crash(address: str) -> None:
    async def scenario() -> str:
        older = await asyncio.create_subprocess_exec(
            sys.executable, "-c", OLDER_AGENT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert older.stdin is not None and older.stdout is not None
        try:
            assert await asyncio.wait_for(older.stdout.readline(), 30) == b"ready\n"
            client = sd_bus_open_user()
            with pytest.raises(Refused) as exc:
                await NodeAgent(client).status()
            client.close()
        finally:
            older.stdin.close()
            await older.wait()
        return str(exc.value)

    why = asyncio.run(scenario())
    assert why.startswith("the agent has no property "), why
    assert why.endswith(" (it is older than this client): upgrade farmnode on the node")


def test_the_resolved_hostname_is_told_on_the_loop(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The FQDN comes from a thread (DNS may take seconds): the loop hears of it, so the
    AgentHostname property signals it rather than waiting for the next periodic look."""
    import socket

    from farmnode.systemd.scope import ScopeManager
    from farmnode.tasks.store import Store

    monkeypatch.setattr(socket, "getfqdn", lambda _name: "node7.farm.example")

    async def scenario() -> tuple[str, bool]:
        told = asyncio.Event()
        store = Store(tmp_path / "state.db")
        agent = Agent(Config(), store, ScopeManager.__new__(ScopeManager))
        agent.status_listeners.append(told.set)
        await asyncio.wait_for(told.wait(), 10)
        store.close()
        return agent.hostname, agent.hostname_resolved.is_set()

    assert asyncio.run(scenario()) == ("node7.farm.example", True)
