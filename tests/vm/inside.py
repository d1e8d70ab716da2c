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


# A GPU that needs no driver: a PCI display device of NVIDIA's in a sysfs tree laid over the
# VM's, and its /dev/nvidiaN made with mknod under NVIDIA's major (195). With no driver bound
# to the major, opening a node the device cgroup allows fails with ENXIO, one it refuses with
# EPERM: the difference is the kernel's verdict.
FAKE_GPUS = ("0000:01:00.0", "0000:02:00.0")
NVIDIA_MAJOR = 195
# No braces: the command job type's argument expansion would take them for placeholders.
PROBE = """
import errno, json, os, sys, time
names = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
out = dict(env=dict((k, os.environ.get(k)) for k in names), open=dict())
for node in ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/null"):
    try:
        os.close(os.open(node, os.O_RDWR))
        out["open"][node] = "ok"
    except OSError as exc:
        out["open"][node] = errno.errorcode[exc.errno]
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(out, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
# Holds its GPU until told to go (a file), so that the next job finds it taken.
deadline = time.time() + 300
while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.1)
"""


def open_errno(node: str) -> str:
    import errno
    import os
    try:
        os.close(os.open(node, os.O_RDWR))
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def try_assign(a: dict[str, Any]) -> tuple[int, str]:
    r = subprocess.run(["farmnode", "assign", "-"], input=json.dumps(a), capture_output=True,
                       text=True, timeout=600)
    return r.returncode, (r.stdout + r.stderr).strip()


def gpu_devices() -> dict[str, Any]:
    import os
    import pathlib
    devices = pathlib.Path("/sys/bus/pci/devices")
    sh("mount", "-t", "tmpfs", "fake-pci", str(devices))
    for slot in FAKE_GPUS:
        d = devices / slot
        d.mkdir()
        for name, value in (("class", "0x030200"), ("vendor", "0x10de"), ("device", "0x2330")):
            (d / name).write_text(value + "\n")
    nodes = {"/dev/nvidia0": 0, "/dev/nvidia1": 1, "/dev/nvidiactl": 255}
    for node, minor in nodes.items():
        os.mknod(node, 0o20666, os.makedev(NVIDIA_MAJOR, minor))
        os.chmod(node, 0o666)
    results = pathlib.Path("/tmp/farmnode-vm-gpu")
    results.mkdir(mode=0o1777, exist_ok=True)
    results.chmod(0o1777)
    release = results / "release"
    try:
        agent_config("")  # a restart: the agent detects GPUs at start
        status_gpus = json.loads(sh("farmnode", "--json", "status"))["gpus"]
        # Outside any task scope (this runner's own cgroup has no device policy): ENXIO.
        unconfined = {n: open_errno(n) for n in nodes}

        def probe(gpus: int | None, hold: bool) -> tuple[dict[str, Any], str]:
            a = job("command", {"command": ["/usr/bin/python3", "-c", PROBE]})
            out = results / f"{a['job']['id']}.json"
            a["job"]["data"]["command"] += [str(out)] + ([str(release)] if hold else [])
            if gpus is not None:
                a["job"]["data"]["gpus"] = gpus
            return a, str(out)

        first, first_out = probe(1, hold=True)
        first_id = assign(first)
        second, second_out = probe(1, hold=True)
        sh("farmnode", "wait", first_id, "--until", "running")
        second_id = assign(second)
        sh("farmnode", "wait", second_id, "--until", "running")
        unit = f"farmnode-task-{first['tasks'][0]['id']}.scope"
        policy = sh("systemctl", "show", "-P", "DevicePolicy", unit).strip()
        allow = sh("systemctl", "show", "-P", "DeviceAllow", unit).strip()
        busy_gpus = json.loads(sh("farmnode", "--json", "status"))["gpus"]
        third, _ = probe(1, hold=False)
        busy = try_assign(third)
        too_many, _ = probe(3, hold=False)
        never = try_assign(too_many)
        # both probes have reported (or ended without) before they are let go
        for path, a in ((first_out, first), (second_out, second)):
            deadline = time.time() + 300
            while not os.path.exists(path) and time.time() < deadline:
                rec = json.loads(sh("farmnode", "--json", "tasks", "--active"))
                if a["tasks"][0]["id"] not in {t["id"] for t in rec}:
                    break  # its assignment ended: it will write nothing more
                time.sleep(0.2)
        release.write_text("")
        first_rec, second_rec = wait(first_id), wait(second_id)
        none, none_out = probe(None, hold=False)
        none_rec = wait(assign(none))
        tasks = {t["id"]: t for t in json.loads(sh("farmnode", "--json", "tasks"))}

        def read(path: str) -> Any:
            try:
                with open(path) as f:
                    return json.load(f)
            except OSError as exc:
                return {"missing": str(exc)}

        return {"status_gpus": status_gpus, "busy_gpus": busy_gpus, "unconfined": unconfined,
                "device_policy": policy, "device_allow": allow,
                "first": read(first_out), "second": read(second_out), "none": read(none_out),
                "first_id": first_id, "second_id": second_id,
                "first_task": tasks.get(first["tasks"][0]["id"]),
                "records": [first_rec, second_rec, none_rec],
                "busy_refusal": busy, "never_refusal": never,
                "journal": sh("journalctl", "-b", "-u", "farmnode.service", "-u", unit, "-n",
                              "40", "--no-pager", check=False)[-6000:]}
    finally:
        sh("umount", str(devices), check=False)
        for node in nodes:
            pathlib.Path(node).unlink(missing_ok=True)
        agent_config("")


def until_frozen(unit: str, want: bool, *cmd: str) -> float:
    """Run `cmd`, then wait (poll() on cgroup.events, woken by the kernel at each change)
    until the scope's frozen state is `want`; the seconds from before `cmd`."""
    import os
    import select
    events = f"/sys/fs/cgroup/farmnode.slice/{unit}/cgroup.events"
    fd = os.open(events, os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        os.read(fd, 4096)
        t0 = time.monotonic()
        if cmd:
            sh(*cmd)
        while ("frozen 1" in cgroup(unit, "cgroup.events").splitlines()) != want:
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"{unit} never frozen={want}")
            poller.poll(1000)
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, 4096)
        return time.monotonic() - t0
    finally:
        os.close(fd)


# Counts until told to stop: progress a freeze must stop. No braces (job type placeholders).
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


def workstation() -> dict[str, Any]:
    """systemd's own freezer (pure cgroup v2) under a real PAM session's idle hint."""
    import os
    idle_time = 2.0
    agent_config(f"workstation_mode: true\nworkstation_idle_time: {idle_time}\n")
    count, release = "/tmp/farmnode-vm-count", "/tmp/farmnode-vm-release"
    a = job("command", {"command": ["/usr/bin/python3", "-c", COUNTER, count, release]})
    aid = assign(a)
    sh("farmnode", "wait", aid, "--until", "running")
    unit = f"farmnode-task-{a['tasks'][0]['id']}.scope"
    logind = ("org.freedesktop.login1", "/org/freedesktop/login1",
              "org.freedesktop.login1.Manager")
    try:
        login_s = until_frozen(unit, True, "systemd-run", "--unit=farmnode-vm-artist",
                               "-p", "PAMName=login", "-p", "User=artist",
                               "-E", "XDG_SESSION_TYPE=wayland", "sleep", "600")
        frozen_state = sh("systemctl", "show", "-P", "FreezerState", unit).strip()
        status = json.loads(sh("farmnode", "--json", "status"))
        with open(count) as f:
            before = f.read()
        time.sleep(1)  # long enough for 20 counts, were it running
        with open(count) as f:
            after = f.read()
        listed = json.loads(sh("busctl", "--json=short", "call", *logind, "ListSessions"))
        ((sid, path),) = [(x[0], x[4]) for x in listed["data"][0] if x[2] == "artist"]
        hint = ("setpriv", "--reuid=artist", "--regid=artist", "--init-groups", "busctl",
                "call", "org.freedesktop.login1", path, "org.freedesktop.login1.Session",
                "SetIdleHint", "b")
        resume_s = until_frozen(unit, False, *hint, "true")
        thawed_state = sh("systemctl", "show", "-P", "FreezerState", unit).strip()
        refreeze_s = until_frozen(unit, True, *hint, "false")
        logout_s = until_frozen(unit, False, "busctl", "call", *logind, "TerminateSession", "s",
                                sid)
        with open(count) as f:
            resumed = f.read()
        with open(release, "w"):
            pass
        return {"frozen_state": frozen_state, "thawed_state": thawed_state,
                "status_state": status["state"], "state_reason": status["state_reason"],
                "counts": [before, after, resumed], "task": wait(aid),
                "login_to_frozen_s": login_s, "idle_to_thawed_s": resume_s,
                "idle_time": idle_time, "active_to_frozen_s": refreeze_s,
                "logout_to_thawed_s": logout_s}
    finally:
        sh("systemctl", "stop", "farmnode-vm-artist.service", check=False)
        if not os.path.exists(release):
            with open(release, "w"):
                pass
        agent_config("")


SCENARIOS: list[Callable[[], dict[str, Any]]] = [gpu_devices, slice_reserve, oom_kill, cpu_half,
                                                 fork_bomb, workstation]


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
