"""Workstation mode against the container's real logind and kernel freezer.

A user session opened through PAM (pam_systemd, as a display manager's login does) stops
the node's work: the task's scope is frozen (the cgroup's own cgroup.events says so, and
the task makes no progress), the node is disabled with the reason, new work is refused.
The session's own SetIdleHint (as its user) lets it resume after workstation_idle_time; the
task is never killed and finishes done. The latencies are printed (pytest -s).

The container's host has a hybrid cgroup layout, where systemd 252 offers no freezer: the
agent freezes the scope's v2 cgroup itself here. The VM tier (pure v2) has systemd's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from container import Container

from tests.system.conftest import agent_config, agent_pid, agent_ready, assignment, farmnode

PY = "/opt/farmnode/bin/python"
IDLE_TIME = 2.0
DROPIN = "/etc/farmnode/conf.d/60-workstation.yaml"
SESSION_UNIT = "farmnode-test-artist.service"
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")

# Runs a command, then waits (poll() on cgroup.events, which kernfs wakes at each change)
# until the cgroup's frozen state is the one asked for; prints the seconds it took.
UNTIL = """
import os, select, subprocess, sys, time
events, want, cmd = sys.argv[1], sys.argv[2] == "frozen", sys.argv[3:]
def frozen():
    with open(events) as f:
        return "frozen 1" in f.read().split("\\n")
fd = os.open(events, os.O_RDONLY)
poller = select.poll()
poller.register(fd, select.POLLPRI | select.POLLERR)
os.read(fd, 4096)
t0 = time.monotonic()
if cmd:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
while frozen() != want:
    if time.monotonic() - t0 > 60:
        sys.exit("cgroup.events never said frozen=%s" % want)
    poller.poll(1000)
    os.lseek(fd, 0, 0)
    os.read(fd, 4096)
print(time.monotonic() - t0)
"""

# Counts, and writes the count where the test reads it: progress that a freeze must stop;
# ends (exit 0) once told to. (No braces: the command job type would take them for
# placeholders.)
COUNTER = """
import os, sys, time
n = 0
while not os.path.exists(sys.argv[2]):
    n += 1
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(n))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def workstation(ct: Container) -> Iterator[None]:
    t0 = time.monotonic()
    ct.run(["sh", "-c", f"printf 'workstation_mode: true\\nworkstation_idle_time: {IDLE_TIME}\\n"
                        f"workstation_tty_check_interval: 1\\n' > {DROPIN}"])
    old = agent_pid(ct)
    ct.run(["systemctl", "restart", "farmnode.service"])
    agent_ready(ct, not_pid=old)
    print(f"\nworkstation mode on (an agent restart): {time.monotonic() - t0:.1f} s")
    try:
        yield
    finally:
        t0 = time.monotonic()
        ct.run(["systemctl", "stop", SESSION_UNIT], check=False)
        ct.run(["rm", "-f", DROPIN])
        old = agent_pid(ct)
        ct.run(["systemctl", "restart", "farmnode.service"])
        agent_ready(ct, not_pid=old)
        print(f"workstation mode off again: {time.monotonic() - t0:.1f} s")


def until(ct: Container, events: str, state: str, *cmd: str, user: str | None = None) -> float:
    argv = [PY, "-c", UNTIL, events, state]
    if user is not None:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    r = ct.run([*argv, *cmd], timeout=90)
    return float(r.stdout.strip())


def status(ct: Container) -> dict[str, object]:
    out: dict[str, object] = json.loads(farmnode(ct, "--json", "status").stdout)
    return out


# Waits for the agent's journal to carry a message with the text (since a wall-clock time),
# by the journal's own wakeups; prints the message.
WAIT_LOG = """
import sys, time
from systemd import journal
since, text = float(sys.argv[1]), sys.argv[2]
r = journal.Reader()
r.add_match(_SYSTEMD_UNIT="farmnode.service")
r.seek_realtime(since)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for e in r:
        if text in e.get("MESSAGE", ""):
            print(e["MESSAGE"])
            sys.exit(0)
    r.wait(1)
sys.exit("the agent never logged: " + text)
"""


def counter(ct: Container, path: str) -> int:
    return int(ct.run(["cat", path]).stdout.strip() or 0)


def test_a_user_at_the_node_freezes_its_task_until_idle(ct: Container, workstation: None) -> None:
    counter_file, release = "/tmp/farmnode-ws-counter", "/tmp/farmnode-ws-release"
    ct.run(["rm", "-f", counter_file, release])
    a = assignment("command", {"command": ["/usr/bin/python3", "-c", COUNTER, counter_file,
                                           release]}, [1], user="jobuser")
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    events = f"/sys/fs/cgroup/unified/farmnode.slice/{unit}/cgroup.events"
    assert status(ct)["state"] == "running"

    # A desktop login: pam_systemd registers a wayland session (on no seat: in front).
    frozen_s = until(ct, events, "frozen", "systemd-run", f"--unit={SESSION_UNIT}",
                     "-p", "PAMName=login", "-p", "User=artist",
                     "-E", "XDG_SESSION_TYPE=wayland", "sleep", "600")
    listed = json.loads(ct.run(["busctl", "--json=short", "call", *LOGIND, "ListSessions"]
                               ).stdout)["data"][0]
    ((sid, session),) = [(s[0], s[4]) for s in listed if s[2] == "artist"]
    st = status(ct)
    assert st["state"] == "disabled", st
    reason = str(st["state_reason"])
    assert reason.startswith("a user is at the node: artist's session") and "wayland" in reason
    assert st["workstation"]["paused_units"] == [unit]  # type: ignore[index]
    refused = farmnode(ct, "assign", "-", check=False,
                       input=json.dumps(assignment("command", {"command": ["/bin/true"]}, [1])))
    assert refused.returncode != 0 and "takes no new work: a user is at the node" in \
        refused.stderr, refused.stderr
    # Frozen: no progress, and the task is still running to everyone.
    before = counter(ct, counter_file)
    ct.run(["sleep", "0.5"])
    assert counter(ct, counter_file) == before
    task = json.loads(farmnode(ct, "--json", "tasks", "--active").stdout)
    assert [t["state"] for t in task if t["id"] == a["tasks"][0]["id"]] == ["running"]

    # The user goes idle (the desktop's SetIdleHint, called as the session's user).
    hint = ["busctl", "call", "org.freedesktop.login1", session,
            "org.freedesktop.login1.Session", "SetIdleHint", "b"]
    resumed_s = until(ct, events, "thawed", *hint, "true", user="artist")
    assert resumed_s >= IDLE_TIME
    st = status(ct)
    assert st["state"] == "running" and st["state_reason"] is None, st
    # ... and comes back: frozen again at once, not after a poll.
    refrozen_s = until(ct, events, "frozen", *hint, "false", user="artist")
    again_s = until(ct, events, "thawed", *hint, "true", user="artist")
    # The session ends (logout): the task runs on, and to its end.
    ct.run(["busctl", "call", *LOGIND, "TerminateSession", "s", sid])
    resumed = counter(ct, counter_file)
    assert resumed > before
    ct.run(["touch", release])
    rec = json.loads(farmnode(ct, "--json", "wait", aid).stdout)["tasks"][0]
    assert rec["state"] == "done" and rec["exit_code"] == 0, rec
    print(f"\nworkstation latencies (container, kernel freezer through cgroup.freeze): "
          f"login to frozen {frozen_s:.3f} s; SetIdleHint(false) to frozen {refrozen_s:.3f} s; "
          f"SetIdleHint(true) to thawed {resumed_s:.3f} s and {again_s:.3f} s "
          f"(workstation_idle_time {IDLE_TIME:g} s)")


# The milder pause, straight through farmnode's Freezer against PID 1: the values it sends
# over D-Bus are the ones systemd takes for "idle" and for "unset" (a service stands in for a
# task's scope: CPUWeight= is the same cgroup property of both).
CPU_IDLE = """
import asyncio, subprocess, sys
from sdbus import sd_bus_open_system
from farmnode.systemd.freezer import Freezer
def weight():
    return subprocess.run(["systemctl", "show", "-P", "CPUWeight", sys.argv[1]],
                          capture_output=True, text=True, check=True).stdout.strip()
async def main():
    f = Freezer(sd_bus_open_system(), "system.slice")
    out = [await f.pause(sys.argv[1], "cpu-idle"), weight()]
    out += [await f.resume(sys.argv[1], "cpu-idle"), weight()]
    out += [await f.pause("farmnode-no-such.scope", "cpu-idle")]
    print(out)
asyncio.run(main())
"""


def test_cpu_idle_pauses_a_unit_by_its_cpu_weight(ct: Container) -> None:
    unit = "farmnode-test-cpu-idle.service"
    ct.run(["systemd-run", f"--unit={unit}", "sleep", "60"])
    try:
        out = ct.run([PY, "-c", CPU_IDLE, unit]).stdout.strip()
    finally:
        ct.run(["systemctl", "stop", unit], check=False)
    # idle while paused; unset (systemd's default weight) again after; a gone unit: False
    assert out == "[True, 'idle', True, '[not set]', False]", out


# A pseudo terminal held open for a text login; prints its name, then marks input on it
# (the times the kernel's tty layer sets when it is read) every 50 ms until told to be
# quiet, by a file.
PTY = """
import os, pty, sys, time
master, slave = pty.openpty()
name = os.ttyname(slave)
print(name, flush=True)
while not os.path.exists(sys.argv[1] + ".end"):
    if not os.path.exists(sys.argv[1]):
        os.utime(name)
    time.sleep(0.05)
"""


def test_a_text_login_counts_by_its_ttys_last_input(ct: Container, workstation: None) -> None:
    """A session that never sets an idle hint (a console login): logind reports the tty's
    last input as IdleSinceHint, and the agent looks at it every tty check interval."""
    quiet, release = "/tmp/farmnode-ws-quiet", "/tmp/farmnode-ws-release2"
    ct.run(["rm", "-f", quiet, quiet + ".end", release])
    a = assignment("command", {"command": ["/usr/bin/python3", "-c", COUNTER,
                                           "/tmp/farmnode-ws-counter2", release]}, [1],
                   user="jobuser")
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    events = f"/sys/fs/cgroup/unified/farmnode.slice/{unit}/cgroup.events"
    holder = ct.popen([PY, "-c", PTY, quiet])
    try:
        assert holder.stdout is not None
        tty = holder.stdout.readline().strip()
        assert tty.startswith("/dev/pts/"), tty
        frozen_s = until(ct, events, "frozen", "systemd-run", "--unit=farmnode-test-tty.service",
                         "-p", "PAMName=login", "-p", "User=artist", "-p", f"TTYPath={tty}",
                         "sleep", "600")
        st = status(ct)
        (s,) = [x for x in st["workstation"]["sessions"]  # type: ignore[index]
                if x["user"] == "artist"]
        assert (s["type"], s["idle_hint"], s["counted"]) == ("tty", False, True), s
        assert s["tty"] in (tty, tty.removeprefix("/dev/")), s
        # no input for workstation_idle_time: resumed by the periodic look (no signal)
        idle_s = until(ct, events, "thawed", "touch", quiet)
        # input again: frozen within one tty check interval
        active_s = until(ct, events, "frozen", "rm", quiet)
    finally:
        ct.run(["touch", quiet + ".end", release])
        holder.wait(timeout=30)
        ct.run(["systemctl", "stop", "farmnode-test-tty.service"], check=False)
    rec = json.loads(farmnode(ct, "--json", "wait", aid).stdout)["tasks"][0]
    assert rec["state"] == "done" and rec["exit_code"] == 0, rec
    assert idle_s >= IDLE_TIME - 0.1  # the last input came at most 50 ms before "quiet"
    print(f"\ntext login (tty atime, looked at every 1 s): login to frozen {frozen_s:.3f} s, "
          f"quiet to resumed {idle_s:.3f} s, input to frozen {active_s:.3f} s")


def test_a_frozen_task_that_is_cancelled_gets_its_sigterm(ct: Container,
                                                          workstation: None) -> None:
    """A stop of a frozen scope: the agent thaws it first (systemd would, for a scope it
    froze itself), so the task ends by the TERM of a cancel, not by the KILL after
    task_stop_grace."""
    a = assignment("command", {"command": ["/usr/bin/python3", "-c", COUNTER,
                                           "/tmp/farmnode-ws-counter3", "/nonexistent"]}, [1],
                   user="jobuser")
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    farmnode(ct, "wait", aid, "--until", "running")
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    events = f"/sys/fs/cgroup/unified/farmnode.slice/{unit}/cgroup.events"
    try:
        until(ct, events, "frozen", "systemd-run", f"--unit={SESSION_UNIT}",
              "-p", "PAMName=login", "-p", "User=artist",
              "-E", "XDG_SESSION_TYPE=wayland", "sleep", "600")
        farmnode(ct, "cancel", str(a["tasks"][0]["id"]))
        farmnode(ct, "wait", aid, check=False)
    finally:
        ct.run(["systemctl", "stop", SESSION_UNIT], check=False)
    (t,) = [x for x in json.loads(farmnode(ct, "--json", "tasks").stdout)
            if x["id"] == a["tasks"][0]["id"]]
    assert t["state"] == "cancelled" and t["signal"] == 15, t


def test_the_time_a_task_is_frozen_does_not_count_to_task_max_runtime(
        ct: Container, workstation: None) -> None:
    """Frozen past its limit, the task is not killed; once thawed it runs on until it has run
    for the limit, and then it is (the pause gave the limit nothing, and took nothing)."""
    limit, counter_file = 8, "/tmp/farmnode-ws-counter4"
    with agent_config(ct, f"task_max_runtime: {limit}"):
        a = assignment("command", {"command": ["/usr/bin/python3", "-c", COUNTER, counter_file,
                                               "/nonexistent"]}, [1], user="jobuser")
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
        events = f"/sys/fs/cgroup/unified/farmnode.slice/{unit}/cgroup.events"
        since = ct.run(["date", "+%s.%N"]).stdout.strip()
        try:
            until(ct, events, "frozen", "systemd-run", f"--unit={SESSION_UNIT}",
                  "-p", "PAMName=login", "-p", "User=artist",
                  "-E", "XDG_SESSION_TYPE=wayland", "sleep", "600")
            said = ct.run([PY, "-c", WAIT_LOG, since,
                           f"assignment {aid}: its task_max_runtime"], timeout=90).stdout
            assert "the pause does not count" in said, said
            tasks = json.loads(farmnode(ct, "--json", "tasks", "--active").stdout)
            assert [t["state"] for t in tasks if t["id"] == a["tasks"][0]["id"]] == ["running"]
            frozen_at = counter(ct, counter_file)
        finally:
            ct.run(["systemctl", "stop", SESSION_UNIT], check=False)
        until(ct, events, "thawed")
        rec = json.loads(farmnode(ct, "--json", "wait", aid, check=False).stdout)["tasks"][0]
        assert rec["state"] == "failed", rec
        assert rec["reason"] == f"timeout: ran longer than task_max_runtime ({limit} s)", rec
        assert counter(ct, counter_file) > frozen_at  # it ran again before the limit ended it
