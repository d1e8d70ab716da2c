"""Limits, reasons, accounting and the watchdog under a real systemd ([2]).

The container records cgroup limits but does not enforce memory/CPU ones (the host has
cgroup v1 controllers); enforcement is tested in the VM tier (tests/vm).
"""

from __future__ import annotations

import json

from container import Container

from tests.system.conftest import (
    agent_config,
    agent_pid,
    agent_ready,
    assign_wait,
    assignment,
    farmnode,
    journal,
)

BUSCTL = ["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1", "org.farmnode.Agent1"]


def test_slice_caps_all_tasks_with_a_reserve(ct: Container) -> None:
    total = int(ct.sh("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout) * 1024
    got = int(ct.run(["systemctl", "show", "-P", "MemoryMax", "farmnode.slice"]).stdout)
    # default node_reserve_ram is 1024 MB (rounding: MemTotal is in kB, the agent uses MB)
    assert abs((total - got) - 1024 * 1024 * 1024) < 2 * 1024 * 1024, (total, got)


def test_limits_above_the_node_are_refused_with_the_field(ct: Container) -> None:
    a = assignment("command", {"command": ["true"]}, [1], ram_max=10**8)
    r = ct.run([*BUSCTL, "Assign", "s", json.dumps(a)], check=False)
    assert r.returncode != 0 and "job.ram_max" in r.stderr, r.stderr
    a = assignment("command", {"command": ["true"]}, [1], ram=10**8)
    r = ct.run([*BUSCTL, "Assign", "s", json.dumps(a)], check=False)
    assert r.returncode != 0 and "Not enough ram" in r.stderr and "job.ram" in r.stderr
    a = assignment("command", {"command": ["true"]}, [1], cpus=-1)
    r = ct.run([*BUSCTL, "Assign", "s", json.dumps(a)], check=False)
    assert r.returncode != 0 and "job.cpus" in r.stderr, r.stderr


def test_pinned_cpus(ct: Container) -> None:
    with agent_config(ct, "task_allowed_cpus: '0'"):
        a = assignment("command", {"command": ["sleep", "600"]}, [1])
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
        assert ct.run(["systemctl", "show", "-P", "AllowedCPUs", unit]).stdout.strip() == "0"
        farmnode(ct, "cancel", str(a["tasks"][0]["id"]))
        farmnode(ct, "wait", aid, check=False)


def test_reasons_for_each_kind_of_death(ct: Container) -> None:
    cases = {
        "exit code 4": ["/bin/sh", "-c", "exit 4"],
        "killed by signal SIGSEGV": ["/bin/sh", "-c", "kill -SEGV $$"],
        "killed by signal SIGUSR1": ["/bin/sh", "-c", "kill -USR1 $$"],
    }
    for reason, argv in cases.items():
        rec = assign_wait(ct, assignment("command", {"command": argv}, [1]))["tasks"][0]
        assert (rec["state"], rec["reason"]) == ("failed", reason), rec
    with agent_config(ct, "task_max_runtime: 1"):
        rec = assign_wait(ct, assignment("command", {"command": ["sleep", "600"]}, [1]))
        t = rec["tasks"][0]
        assert t["state"] == "failed" and t["reason"].startswith("timeout"), t


def test_accounting_is_kept_after_the_scope_is_gone(ct: Container) -> None:
    burn = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo burnt"
    a = assignment("command", {"command": ["/bin/sh", "-c", burn]}, [1])
    rec = assign_wait(ct, a)["tasks"][0]
    assert rec["state"] == "done"
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    assert ct.run(["systemctl", "is-active", unit], check=False).stdout.strip() != "active"
    # cpu.stat is there even without controllers; the CPU the loop burnt is recorded
    assert rec["accounting"]["cpu_usage_usec"] > 10_000, rec
    shown = json.loads(farmnode(ct, "--json", "tasks").stdout)
    (same,) = [t for t in shown if t["id"] == rec["id"]]
    assert same["accounting"] == rec["accounting"]


def test_cancel_uses_the_job_types_signal_then_kills(ct: Container) -> None:
    # The shell ignores TERM: only the SIGKILL after the grace period ends it.
    script = "trap '' TERM; echo up; while :; do sleep 0.2; done"
    with agent_config(ct, "task_stop_grace: 1"):
        a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
        props = ct.run(["systemctl", "show", unit, "-p", "KillSignal,TimeoutStopUSec"]).stdout
        assert "KillSignal=15" in props and "TimeoutStopUSec=1s" in props, props
        farmnode(ct, "cancel", str(a["tasks"][0]["id"]))
        farmnode(ct, "wait", aid, check=False)
        (t,) = [x for x in json.loads(farmnode(ct, "--json", "tasks").stdout)
                if x["id"] == a["tasks"][0]["id"]]
        assert t["state"] == "cancelled" and t["signal"] == 9, t


def test_watchdog_restarts_a_hung_agent_and_tasks_survive(ct: Container) -> None:
    dropin = "/run/systemd/system/farmnode.service.d/50-watchdog.conf"
    ct.sh(f"mkdir -p {dropin.rsplit('/', 1)[0]}; printf '[Service]\\nWatchdogSec=2s\\n' > "
          f"{dropin}; systemctl daemon-reload; systemctl restart farmnode.service")
    try:
        script = "i=1; while [ $i -le 60 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"
        a = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
        aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
        farmnode(ct, "wait", aid, "--until", "running")
        hung = agent_pid(ct)
        # Wait for systemd's own word that the watchdog fired (an event, not a guess).
        watcher = ct.popen(["sh", "-c", "journalctl -u farmnode.service -f -n0 -o cat | "
                                        "grep -m1 'Watchdog timeout'"])
        ct.run(["kill", "-STOP", str(hung)])
        assert watcher.wait(timeout=60) == 0
        agent_ready(ct, not_pid=hung)
        assert farmnode(ct, "wait", aid).returncode == 0
        msgs = [e["MESSAGE"] for e in journal(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}")]
        assert msgs == [f"tick {i}" for i in range(1, 61)]
    finally:
        ct.sh(f"rm -f {dropin}; systemctl daemon-reload; systemctl restart farmnode.service")
