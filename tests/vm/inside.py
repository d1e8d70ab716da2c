"""Runs inside the VM (tools/vm.py): kernel-enforced limits, scenario by scenario.

Each scenario prints one line `FARMNODE-VM-RESULT {json}` with what it observed; the
assertions are made on the host (tests/vm/test_vm.py), so a failing scenario still reports.
Standard library only, driving the agent through the `farmnode` CLI like an admin would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

MARK = "FARMNODE-VM-RESULT "
_next_id = 5000


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def job(jobtype: str, data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    global _next_id
    _next_id += 1
    return {"job": {"id": _next_id, "by": 1, "data": data, **fields},
            "jobtype": {"name": jobtype, "version": 1},
            "tasks": [{"id": _next_id, "frame": 1}]}


def assign(a: dict[str, Any]) -> str:
    return sh("farmnode", "assign", "-", input=json.dumps(a)).strip()


def wait(aid: str) -> dict[str, Any]:
    out = sh("farmnode", "--json", "wait", aid, check=False)
    rec: dict[str, Any] = json.loads(out)["tasks"][0]
    return rec


def cgroup(unit: str, name: str) -> str:
    try:
        with open(f"/sys/fs/cgroup/farmnode.slice/{unit}/{name}") as f:
            return f.read().strip()
    except OSError:
        return ""


def agent_config(text: str) -> None:
    with open("/etc/farmnode/conf.d/50-vm.yaml", "w") as f:
        f.write(text)
    sh("systemctl", "restart", "farmnode.service")


def oom_kill() -> dict[str, Any]:
    hog = job("fakerender", {"ram": 400, "duration": 3}, ram_max=100)
    calm = job("fakerender", {"ram": 20, "duration": 3})
    t0 = time.time()
    hog_id, calm_id = assign(hog), assign(calm)
    hog_rec, calm_rec = wait(hog_id), wait(calm_id)
    kernel = json.loads("[" + ",".join(
        sh("journalctl", "-k", "-o", "json", "--since", f"@{int(t0)}").splitlines()) + "]")
    kills = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in kernel
             if "Killed process" in str(e.get("MESSAGE", ""))]
    latency = (hog_rec["finished"] - kills[0]) if kills else None
    return {"hog": hog_rec, "calm": calm_rec, "detect_latency_s": latency,
            "agent_active": sh("systemctl", "is-active", "farmnode.service").strip()}


def cpu_half() -> dict[str, Any]:
    # The loop measures itself: its CPU time over its own 8 s of wall time. The task's
    # started/finished stamps would add the agent's own latency, which a loaded host stretches.
    burn = ("import time\nt = time.monotonic()\nwhile time.monotonic() - t < 8: pass\n"
            "print('burn', time.process_time(), time.monotonic() - t)\n")
    a = job("command", {"command": ["/usr/bin/python3", "-c", burn]}, cpus=0.5)
    aid = assign(a)
    sh("farmnode", "wait", aid, "--until", "running")
    task_id = a["tasks"][0]["id"]
    unit = f"farmnode-task-{task_id}.scope"
    cpu_max = cgroup(unit, "cpu.max")
    rec = wait(aid)
    sh("journalctl", "--sync")
    line = [ln for ln in sh("journalctl", "-o", "cat", f"FARMNODE_TASK={task_id}").splitlines()
            if ln.startswith("burn ")]
    used, wall = (float(x) for x in line[-1].split()[1:]) if line else (0.0, 0.0)
    return {"task": rec, "cpu_max": cpu_max, "wall_s": wall, "cpu_s": used,
            "scope_cpu_s": rec["accounting"].get("cpu_usage_usec", 0) / 1e6,
            "ratio": used / wall if wall else None}


def fork_bomb() -> dict[str, Any]:
    agent_config("task_tasks_max: 40\n")
    # Every process forks for ever and none gives up when the kernel says no.
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        time.sleep(0.05)\n")
    a = job("command", {"command": ["/usr/bin/python3", "-c", bomb]})
    aid = assign(a)
    sh("farmnode", "wait", aid, "--until", "running")
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    refused = 0
    deadline = time.time() + 120
    # The kernel refusing forks is the event awaited (pids.events has no wait of its own
    # that the standard library can use).
    while time.time() < deadline:
        events = dict(ln.split() for ln in cgroup(unit, "pids.events").splitlines() if ln)
        refused = int(events.get("max", 0))
        if refused:
            break
        time.sleep(0.2)
    peak = cgroup(unit, "pids.peak") or cgroup(unit, "pids.current")
    status_ok = subprocess.run(["farmnode", "status"], capture_output=True).returncode == 0
    sh("farmnode", "cancel", str(a["tasks"][0]["id"]))
    rec = wait(aid)
    agent_config("")
    return {"task": rec, "pids_max": cgroup(unit, "pids.max") or "gone", "refused_forks": refused,
            "pids_current_seen": peak, "agent_answered_during": status_ok,
            "scope_after": sh("systemctl", "is-active", unit, check=False).strip()}


def slice_reserve() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        total = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    slice_max = sh("systemctl", "show", "-P", "MemoryMax", "farmnode.slice").strip()
    with open("/sys/fs/cgroup/farmnode.slice/memory.max") as f:
        kernel_max = f.read().strip()
    # Two tasks without their own limits that together want more than the slice allows.
    big = [job("fakerender", {"ram": 600, "duration": 6}) for _ in range(2)]
    ids = [assign(a) for a in big]
    recs = [wait(i) for i in ids]
    return {"mem_total_kb": total, "slice_memory_max": slice_max, "kernel_memory_max": kernel_max,
            "tasks": recs, "agent_active": sh("systemctl", "is-active", "farmnode.service").strip()}


SCENARIOS: list[Callable[[], dict[str, Any]]] = [slice_reserve, oom_kill, cpu_half, fork_bomb]


def main() -> int:
    sh("farmnode", "status")
    for scenario in SCENARIOS:
        t0 = time.monotonic()
        try:
            rec = scenario()
        except Exception:
            rec = {"error": traceback.format_exc()}
        rec["scenario"] = scenario.__name__
        rec["duration_s"] = round(time.monotonic() - t0, 1)
        print(MARK + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
