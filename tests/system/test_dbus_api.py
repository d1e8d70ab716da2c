"""The typed D-Bus API on the system bus of a real systemd: a real task's object, its
PropertiesChanged as busctl monitor shows them, the bus policy for org.farmnode.Task1, and
the interface files against live introspection."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from container import Container

from tests.system.conftest import assignment, farmnode

REPO = Path(__file__).resolve().parents[2]
BUS = "org.farmnode.Agent1"
TASK1 = "org.farmnode.Task1"
AGENT = "/org/farmnode/Agent1"
UNSET = 2**64 - 1  # a figure nobody measured (systemd's "[not set]")


def interface_block(xml: str, name: str) -> str:
    m = re.search(rf'<interface name="{re.escape(name)}">.*?</interface>', xml, re.S)
    assert m, xml
    return re.sub(r"\s+", " ", m.group(0)).strip()


class Monitor:
    """`busctl monitor --json=short` of the agent, read by a thread as it goes."""

    def __init__(self, ct: Container) -> None:
        self.proc: subprocess.Popen[str] = ct.popen(["busctl", "monitor", "--json=short", BUS])
        assert self.proc.stderr is not None and self.proc.stdout is not None
        # said once dbus-daemon made it a monitor: everything after this reaches it
        while "Monitoring bus message stream" not in self.proc.stderr.readline():
            assert self.proc.poll() is None, "busctl monitor ended"
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.messages: list[dict[str, Any]] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def until(self, path: str, done: Callable[[dict[str, Any]], bool],
              timeout: float = 60) -> list[dict[str, Any]]:
        """The PropertiesChanged of `path` since the monitor started, up to the first whose
        changed properties satisfy `done` (read from the monitor as far as needed)."""
        seen = []
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            if i == len(self.messages):
                try:
                    line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"no such PropertiesChanged on {path}; saw {seen}")\
                        from None
                self.messages.append(json.loads(line))
            m = self.messages[i]
            i += 1
            if m.get("member") != "PropertiesChanged" or m.get("path") != path:
                continue
            changed = {k: v["data"] for k, v in m["payload"]["data"][1].items()}
            seen.append(changed)
            if done(changed):
                return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_a_real_task_object_its_signals_and_its_policy(ct: Container) -> None:
    mon = Monitor(ct)
    try:
        a = assignment("command", {"command": ["sleep", "300"]}, [1])
        tid = a["tasks"][0]["id"]
        path = f"/org/farmnode/Agent1/task/{tid}"
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        mon.until(path, lambda c: c.get("State") == "running")
        mon.until(AGENT, lambda c: aid in c.get("Assignments", []))
        running = ct.run(["busctl", "get-property", BUS, AGENT, BUS, "RunningTasks",
                          "Assignments"], user="guest").stdout.splitlines()
        assert re.fullmatch(r"u [1-9][0-9]*", running[0]) and f'"{aid}"' in running[1]
        # anyone may read the object, typed, and list the objects
        r = ct.run(["busctl", "get-property", BUS, path, TASK1, "State", "Unit",
                    "AssignmentId", "ExitCode"], user="guest")
        assert r.stdout.splitlines() == ['s "running"', f's "farmnode-task-{tid}.scope"',
                                         f's "{aid}"', "i -1"]
        managed = json.loads(ct.run(["busctl", "--json=short", "call", BUS,
                                     AGENT, "org.freedesktop.DBus.ObjectManager",
                                     "GetManagedObjects"], user="guest").stdout)
        assert managed["data"][0][path][TASK1]["State"]["data"] == "running"
        # but not stop it; root (and group farmnode) may
        r = ct.run(["busctl", "call", BUS, path, TASK1, "Cancel"], user="guest", check=False)
        assert r.returncode != 0 and "Access denied" in r.stderr
        r = ct.run(["busctl", "call", BUS, path, TASK1, "Signal", "i", "0"], user="guest",
                   check=False)
        assert r.returncode != 0 and "Access denied" in r.stderr
        r = ct.run(["busctl", "call", BUS, AGENT, BUS, "TryAssign", "s", json.dumps(a)],
                   user="guest", check=False)
        assert r.returncode != 0 and "Access denied" in r.stderr
        assert ct.run(["busctl", "call", BUS, path, TASK1, "Cancel"],
                      user="artist").stdout.strip() == "b true"
        changes = mon.until(path, lambda c: c.get("State") == "cancelled")
        assert changes[-1]["FinishedUSec"] > 0
        mon.until(AGENT, lambda c: "Assignments" in c and aid not in c["Assignments"])
        # the scope's cgroup figures reached the object (cpu.stat: the container has it)
        mon.until(path, lambda c: c.get("CPUUsageUSec", UNSET) != UNSET)
        r = ct.run(["busctl", "get-property", BUS, path, TASK1, "State", "Reason"])
        assert r.stdout.splitlines()[0] == 's "cancelled"'
        # the interface file is what the agent serves
        xml = ct.run(["busctl", "introspect", "--xml-interface", BUS, path]).stdout
        assert interface_block(xml, TASK1) == interface_block(
            (REPO / "dbus/org.farmnode.Task1.xml").read_text(), TASK1)
        print(ct.run(["busctl", "introspect", BUS, AGENT]).stdout)
        print(ct.run(["busctl", "introspect", BUS, path]).stdout)
    finally:
        mon.close()
