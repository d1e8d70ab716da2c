"""A private dbus-daemon for host tests: the real daemon, busctl and gdbus, no system bus.

The daemon listens on a socket under the test's directory and lets every connection do
everything (the system tier tests the real policy); the agent's service is exported on it
exactly as farmnode.agent.main exports it on the system bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdbus import sd_bus_open_user

from farmnode.agent.core import Agent
from farmnode.agent.runsetup import scope_unit_name
from farmnode.bus.interface import BUS_NAME, OBJECT_PATH
from farmnode.bus.service import Agent1Service
from farmnode.config import Config
from farmnode.systemd.scope import ScopeManager
from farmnode.tasks.model import Assignment
from farmnode.tasks.schema import parse_assignment
from farmnode.tasks.store import Store

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""


@contextmanager
def private_bus(directory: Path) -> Iterator[str]:
    """The address of a fresh dbus-daemon; DBUS_SESSION_BUS_ADDRESS points to it meanwhile
    (sd_bus_open_user reads it)."""
    socket = directory / "bus"
    config = directory / "bus.conf"
    config.write_text(CONFIG.format(socket=socket))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                               "--print-address"], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    address = daemon.stdout.readline().strip()  # printed once it listens
    old = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
    try:
        yield address
    finally:
        if old is None:
            os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = old
        daemon.terminate()
        daemon.wait(10)


async def run(*argv: str) -> str:
    """A command's stdout (off the loop, so the agent on it keeps answering)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def busctl(address: str, *args: str) -> str:
    return await run("busctl", f"--address={address}", *args)


class Monitor:
    """`busctl monitor` of the agent's name, its messages as JSON, awaited one by one."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Monitor:
        self.proc = await asyncio.create_subprocess_exec(
            "busctl", f"--address={self.address}", "monitor", "--json=short",
            "org.farmnode.Agent1", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        # busctl says so once the daemon made it a monitor: it sees everything after this.
        async with asyncio.timeout(10):
            while b"Monitoring bus message stream" not in await self.proc.stderr.readline():
                pass
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        await self.proc.wait()

    async def signal(self, member: str, path: str | None = None,
                     timeout: float = 10.0) -> dict[str, Any]:
        """The next signal `member` (of `path`), as busctl prints it."""
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                assert line, "busctl monitor ended"
                message = json.loads(line)
                if message.get("type") == "signal" and message.get("member") == member \
                        and (path is None or message.get("path") == path):
                    return message


@contextlib.asynccontextmanager
async def serve(state: Path, **config: Any) -> AsyncIterator[Agent]:
    """The agent's service exported as farmnode.agent.main exports it (no systemd: no run
    starts, the core's reporting paths stand in for the runs); it leaves the bus after."""
    bus = sd_bus_open_user()
    store = Store(state)
    agent = Agent(Config(**config), store, ScopeManager.__new__(ScopeManager))
    # The FQDN first: its change would otherwise come in with whatever a test awaits.
    await asyncio.get_running_loop().run_in_executor(None, agent.hostname_resolved.wait)
    service = Agent1Service(agent)
    service.export_to_dbus(OBJECT_PATH, bus)
    await bus.request_name_async(BUS_NAME, 0)
    try:
        yield agent
    finally:
        service.props.stop()
        await asyncio.sleep(0)  # what the agent scheduled on the bus goes out first
        bus.close()
        store.close()


def payload(ids: list[int], **job: Any) -> dict[str, Any]:
    return {"job": {"id": 7, "by": 1, **job}, "jobtype": {"name": "command", "version": 1},
            "tasks": [{"id": i, "frame": n} for n, i in enumerate(ids, 1)]}


def stored(agent: Agent, ids: list[int]) -> Assignment:
    """An accepted assignment as the core stores and announces it (Agent._start, without
    the run)."""
    a = parse_assignment(payload(ids))
    agent.store.add_assignment(a, scope_unit_name(a))
    for rec in agent.store.tasks(a.id):
        agent._emit(a.id, rec.id, rec)
    return a
