"""The measuring half of the benchmarks: runs *inside* the booted container.

    /opt/farmnode/bin/python /src/bench/inside.py STEP [options]

Each step prints one JSON object of raw samples on stdout; bench/run.py (on the host) turns
them into statistics and REPORT.md. Only the standard library, sdbus and farmnode (the
container's venv) are used here, and the job is always /usr/local/bin/fn-probe (probe.c), the
same program for farmnode and for the systemd floor it is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROBE = "/usr/local/bin/fn-probe"
STAMPS = Path("/tmp/fnbench")
IDS = Path("/var/tmp/fnbench-next-id")
BUS = ["org.farmnode.Agent1", "/org/farmnode/Agent1", "org.farmnode.Agent1"]
API_USER, API_PASSWORD = "bench", "bench-secret"


# ---- small helpers ---------------------------------------------------------------------
def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def next_ids(n: int) -> list[int]:
    """Fresh task ids across every step of a run (the agent refuses a repeated task id)."""
    with open(IDS, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        first = int(f.read().strip() or "500000")
        f.seek(0)
        f.truncate()
        f.write(str(first + n))
    return list(range(first, first + n))


def assignment(argv: list[str], jobtype: str = "command", *, frames: int = 1,
               data: dict[str, Any] | None = None) -> dict[str, Any]:
    ids = next_ids(frames)
    return {
        "job": {"id": ids[0], "by": 1, "data": data if data is not None else {"command": argv}},
        "jobtype": {"name": jobtype, "version": 1},
        "tasks": [{"id": i, "frame": k + 1} for k, i in enumerate(ids)],
    }


def unit_cgroup(unit: str) -> Path:
    cg = sh("systemctl", "show", "-P", "ControlGroup", unit).strip()
    return Path(f"/sys/fs/cgroup/unified{cg}")


def cpu_usec(unit: str) -> int:
    """CPU time of everything that ever ran in the unit's cgroup (cgroup v2 cpu.stat)."""
    for line in (unit_cgroup(unit) / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"no usage_usec for {unit}")


def unit_pids(unit: str) -> list[int]:
    procs = unit_cgroup(unit) / "cgroup.procs"
    return [int(p) for p in procs.read_text().split()] if procs.exists() else []


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def journal_sync() -> None:
    sh("journalctl", "--sync")


def journal_reset() -> None:
    """Archive and delete the journal so far: 10 M lines take GBs."""
    sh("journalctl", "--rotate")
    sh("journalctl", "--vacuum-size=1", check=False)


def stream_digest(argv: list[str]) -> tuple[int, str]:
    """(lines, sha256) of a command's stdout, read as it comes."""
    h = hashlib.sha256()
    lines = 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
            lines += chunk.count(b"\n")
    return lines, h.hexdigest()


def wait_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.endswith("\n") and "\n" in text[:-1]:
                return text
        time.sleep(0.002)
    raise TimeoutError(f"{path} never appeared")


def stamp_of(path: Path) -> tuple[float, str]:
    """(CLOCK_REALTIME at the probe's exec, the name of the unit it ran in)."""
    first, *cgroup = wait_file(path).splitlines()
    unit = next((line.rsplit("/", 1)[-1] for line in cgroup if line.startswith("0::")), "")
    if not unit.endswith(".scope"):  # hybrid hierarchy: the name=systemd line has it too
        unit = next((line.rsplit("/", 1)[-1] for line in cgroup if "name=systemd" in line), "")
    return float(first), unit


def new_stamp() -> Path:
    STAMPS.mkdir(mode=0o1777, exist_ok=True)
    os.chmod(STAMPS, 0o1777)
    path = STAMPS / f"stamp-{time.monotonic_ns()}"
    path.unlink(missing_ok=True)
    return path


def farmnode_wait(aid: str) -> None:
    sh("farmnode", "wait", aid, check=False)


# ---- D-Bus (in process) and HTTP clients ---------------------------------------------------
class Bus:
    """An in-process sdbus client of org.farmnode.Agent1 with its own loop."""

    def __init__(self) -> None:
        from sdbus import sd_bus_open_system

        from farmnode.bus.interface import Agent1Interface

        self.loop = asyncio.new_event_loop()
        self.bus = sd_bus_open_system()
        self.proxy = Agent1Interface.new_proxy(BUS[0], BUS[1], self.bus)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def assign(self, a: dict[str, Any]) -> str:
        return str(self.run(self.proxy.assign(json.dumps(a))))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.run(self.proxy.get_status()))
        return out

    def cancel(self, task_id: int) -> None:
        self.run(self.proxy.cancel_task(task_id))

    def active_tasks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(self.run(self.proxy.list_tasks(True)))
        return out

    def wait_tasks(self, done: Callable[[list[dict[str, Any]]], bool],
                   timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.active_tasks()):
            if time.monotonic() > deadline:
                raise TimeoutError("tasks did not get there")
            time.sleep(0.1)


class SystemdBus:
    """The floor for a status call: reading one property of systemd's Manager."""

    def __init__(self) -> None:
        from sdbus import DbusInterfaceCommonAsync, dbus_property_async, sd_bus_open_system

        class Manager(DbusInterfaceCommonAsync,
                      interface_name="org.freedesktop.systemd1.Manager"):
            @dbus_property_async("s")
            def version(self) -> str:
                raise NotImplementedError

        self.loop = asyncio.new_event_loop()
        self.proxy = Manager.new_proxy("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                       sd_bus_open_system())

    def version(self) -> str:
        return str(self.loop.run_until_complete(self.proxy.version.get_async()))


class Http:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        raw = f"{API_USER}:{API_PASSWORD}".encode()
        self.headers = {"Authorization": "Basic " + base64.b64encode(raw).decode(),
                        "User-Agent": "fnbench", "Accept": "application/json"}

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            # gunicorn closed the idle keep-alive connection: a new one, as any client would
            self.conn.close()
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        raw = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status, json.loads(raw) if raw else None

    def close(self) -> None:
        self.conn.close()


# ---- steps -------------------------------------------------------------------------------
def step_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Journal on the bench disk with no size cap; the API on args.port with Basic auth."""
    Path("/etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    Path("/etc/systemd/journald.conf.d/fnbench.conf").write_text(
        "[Journal]\nStorage=persistent\nSystemMaxUse=200G\nSystemKeepFree=4G\n"
        "SystemMaxFileSize=1G\n")
    sh("chgrp", "systemd-journal", "/var/log/journal")
    os.chmod("/var/log/journal", 0o2755)
    sh("systemctl", "restart", "systemd-journald.service")
    sh("journalctl", "--flush")
    Path("/etc/farmnode/conf.d").mkdir(parents=True, exist_ok=True)
    Path("/etc/farmnode/conf.d/50-bench.yaml").write_text(
        f"agent_api_port: {args.port}\nagent_api_username: {API_USER}\nagent_time_offset: 0\n")
    # The password as a credential of the API: the agent refuses a readable file holding it.
    secret = Path("/etc/farmnode/api-password")
    secret.touch(mode=0o600)
    secret.chmod(0o600)
    secret.write_text(f"{API_PASSWORD}\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", "farmnode.service")
    sh("systemctl", "restart", "farmnode-api.socket")
    versions = {
        "systemd": sh("systemctl", "--version").splitlines()[0],
        "python": sh("/opt/farmnode/bin/python", "-V").strip(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "os": next((line.split("=", 1)[1].strip('"') for line in
                    Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), "?"),
        "farmnode": sh("farmnode", "--version", check=False).strip(),
    }
    return versions


def step_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Exec-in-scope latency: from before the request to the probe's first instruction."""
    bus = Bus()
    api = Http(args.port)
    api.request("GET", "/api/v1/status")  # warm: gunicorn started, worker connected
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("floor", "dbus_busctl", "dbus_inproc", "http_warm",
                                        "http_first", "http_after_start")}
    units: dict[str, set[str]] = {k: set() for k in samples}

    def farmnode_job(start: Callable[[dict[str, Any]], str], key: str) -> None:
        stamp = new_stamp()
        a = assignment([PROBE, "stamp", str(stamp)])
        t0 = time.time()
        aid = start(a)
        at, unit = stamp_of(stamp)
        samples[key].append(at - t0)
        units[key].add("farmnode" if unit == f"farmnode-task-{a['tasks'][0]['id']}.scope"
                       else f"WRONG:{unit}")
        farmnode_wait(aid)

    def busctl(a: dict[str, Any]) -> str:
        out = sh("busctl", "call", *BUS, "Assign", "s", json.dumps(a))
        return out.split('"')[1]

    def http_assign(a: dict[str, Any]) -> str:
        status, body = api.request("POST", "/api/v1/assign", a)
        if status != 202:
            raise RuntimeError(f"assign over HTTP: {status} {body}")
        return str(body["id"])

    for _ in range(args.reps):
        stamp = new_stamp()
        t0 = time.time()
        sh("systemd-run", "--scope", "-q", "--slice=farmnode.slice", "--", PROBE, "stamp",
           str(stamp))
        at, unit = stamp_of(stamp)
        samples["floor"].append(at - t0)
        units["floor"].add("systemd-run" if unit.startswith("run-") else f"WRONG:{unit}")
        farmnode_job(busctl, "dbus_busctl")
        farmnode_job(bus.assign, "dbus_inproc")
        farmnode_job(http_assign, "http_warm")
    for _ in range(args.cold_reps):
        # The socket stays; the service goes: the next connection starts gunicorn again.
        sh("systemctl", "stop", "farmnode-api.service")
        # systemd's default start limit (5 starts in 10 s) would refuse the later rounds
        sh("systemctl", "reset-failed", "farmnode-api.service", check=False)
        api.close()
        api = Http(args.port)
        farmnode_job(http_assign, "http_first")
    # What the master sees after `systemctl start farmnode`: the agent says READY=1 only
    # once the API runs, so the first request should cost what a warm one does. Each round
    # stops the node (the port closes), starts it, then times, on fresh connections (connect
    # included, as the master's each poll), the first GET /api/v1/status and then warm ones;
    # the assign that follows is the launch-latency row.
    first: list[float] = []
    warm: list[float] = []
    start: list[float] = []  # `systemctl start farmnode` until it returns (the agent's READY=1)
    for _ in range(args.cold_reps):
        api.close()
        sh("systemctl", "stop", "farmnode.service")
        sh("systemctl", "reset-failed", "farmnode.service", "farmnode-api.service",
           check=False)
        t0 = time.perf_counter()
        sh("systemctl", "start", "farmnode.service")
        start.append(time.perf_counter() - t0)
        for i in range(4):
            t0 = time.perf_counter()
            probe = Http(args.port)
            status, _ = probe.request("GET", "/api/v1/status")
            (first if i == 0 else warm).append(time.perf_counter() - t0)
            probe.close()
            if status != 200:
                raise RuntimeError(f"GET /api/v1/status after start: {status}")
        api = Http(args.port)
        farmnode_job(http_assign, "http_after_start")
    api.close()
    return {"samples": samples, "units": {k: sorted(v) for k, v in units.items()},
            "after_start": {"first": first, "warm": warm, "start": start}}


# A writer in a unit of its own whose journald rate limit is lifted as farmnode.service's is
# (journald would keep 10000 lines per 30 s, scaled by free disk, of a scope's output).
UNLIMITED = ["systemd-run", "--wait", "-q", "--slice=farmnode.slice",
             "-p", "LogRateLimitIntervalSec=1s", "-p", "LogRateLimitBurst=1000000000"]


def step_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """One run of args.lines lines: systemd-cat (floor) or a farmnode task; counted exactly."""
    journal_reset()
    mode = args.mode
    gen = [PROBE, "-b" if mode in ("blender", "floor_blender") else "seq", str(args.lines)]
    agent0, journald0 = cpu_usec("farmnode.service"), cpu_usec("systemd-journald.service")
    pid0 = sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip()
    t0 = time.time()
    if mode in ("floor", "floor_blender"):
        ident = f"fnbench-{time.monotonic_ns()}"
        sh(*UNLIMITED, "--", "systemd-cat", "-t", ident, *gen)
        match = [f"SYSLOG_IDENTIFIER={ident}"]
    else:
        if mode == "blender":
            # the blender job type runs "<blender> -b <file> -s 1 -e 1 -j 1 -a"
            a = assignment([], "blender", data={"file": f"/bench/{args.lines}",
                                                "blender": PROBE})
        else:
            a = assignment(gen)
        aid = sh("farmnode", "assign", "-", input=json.dumps(a)).strip().split()[-1]
        farmnode_wait(aid)
        match = [f"FARMNODE_ASSIGNMENT={aid}", "SYSLOG_IDENTIFIER=farmnode-stdout"]
    journal_sync()
    t1 = time.time()
    agent1, journald1 = cpu_usec("farmnode.service"), cpu_usec("systemd-journald.service")
    got = stream_digest(["journalctl", "-o", "cat", "--no-pager", *match])
    want = stream_digest(gen)
    result: dict[str, Any] = {
        "mode": mode, "lines": args.lines, "seconds": t1 - t0,
        "lines_per_s": args.lines / (t1 - t0),
        "agent_cpu_s": (agent1 - agent0) / 1e6, "journald_cpu_s": (journald1 - journald0) / 1e6,
        "journal_lines": got[0], "identical": got == want,
        "journal_bytes": int(sh("du", "-sb", "/var/log/journal").split()[0]),
    }
    # the agent must have lived through it (a starved event loop once got it killed by the
    # watchdog) and stayed answering
    result["agent_restarted"] = (
        sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip() != pid0)
    if mode not in ("floor", "floor_blender"):
        tasks = sh("farmnode", "--json", "tasks", check=False)
        result["task_states"] = [t["state"] for t in json.loads(tasks or "[]")
                                 if t["assignment_id"] == aid]
    return result


@contextlib.contextmanager
def running_tasks(bus: Bus, n: int, seconds: int) -> Iterator[list[dict[str, Any]]]:
    """n quiet tasks (a short line a second), all running on entry, cancelled on exit."""
    started = []
    t0 = time.monotonic()
    for _ in range(n):
        a = assignment([PROBE, "tick", str(seconds)])
        started.append({"aid": bus.assign(a), "task": a["tasks"][0]["id"]})
    assigned = time.monotonic() - t0
    ids = {s["task"] for s in started}
    bus.wait_tasks(lambda ts: sum(1 for t in ts if t["id"] in ids and t["state"] == "running")
                   == n)
    started.insert(0, {"assigned_s": assigned, "running_s": time.monotonic() - t0})
    try:
        yield started
    finally:
        for s in started[1:]:
            with contextlib.suppress(Exception):
                bus.cancel(s["task"])
        bus.wait_tasks(lambda ts: not any(t["id"] in ids for t in ts))


def sample_footprint(seconds: float) -> dict[str, Any]:
    units = ("farmnode.service", "farmnode-api.service")
    cpu0 = {u: cpu_usec(u) for u in units}
    t0 = time.monotonic()
    rss: dict[str, list[int]] = {u: [] for u in units}
    while True:
        for u in units:
            rss[u].append(rss_kb(unit_pids(u)))
        left = t0 + seconds - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(2.0, left))
    wall = time.monotonic() - t0
    return {u: {"cpu_percent": 100 * (cpu_usec(u) - cpu0[u]) / 1e6 / wall,
                "rss_kb": rss[u], "pids": len(unit_pids(u))} for u in units}


def step_footprint(args: argparse.Namespace) -> dict[str, Any]:
    api = Http(args.port)
    api.request("GET", "/api/v1/status")  # the API is started (socket activation)
    api.close()
    time.sleep(2)
    idle = sample_footprint(args.seconds)
    bus = Bus()
    with running_tasks(bus, args.tasks, int(args.seconds) + 120) as started:
        busy = sample_footprint(args.seconds)
    return {"idle": idle, "tasks": args.tasks, "busy": busy, "start": started[0]}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def step_scale(args: argparse.Namespace) -> dict[str, Any]:
    bus = Bus()
    systemd = SystemdBus()
    api = Http(args.port)

    def http_status() -> None:
        status, _ = api.request("GET", "/api/v1/status")
        assert status == 200, status

    result: dict[str, Any] = {"tasks": args.tasks}
    http_status()
    result["floor_idle"] = timed(systemd.version, args.queries)
    result["dbus_idle"] = timed(bus.status, args.queries)
    result["http_idle"] = timed(http_status, args.queries)
    with running_tasks(bus, args.tasks, 600) as started:
        result["start"] = started[0]
        result["running"] = bus.status()["running_tasks"]
        agent0 = cpu_usec("farmnode.service")
        w0 = time.monotonic()
        time.sleep(args.window)
        result["agent_cpu_percent_quiet"] = (100 * (cpu_usec("farmnode.service") - agent0)
                                             / 1e6 / (time.monotonic() - w0))
        result["agent_rss_kb"] = rss_kb(unit_pids("farmnode.service"))
        http_status()
        agent0 = cpu_usec("farmnode.service")
        w0 = time.monotonic()
        result["floor_busy"] = timed(systemd.version, args.queries)
        result["dbus_busy"] = timed(bus.status, args.queries)
        result["http_busy"] = timed(http_status, args.queries)
        result["agent_cpu_percent_queried"] = (100 * (cpu_usec("farmnode.service") - agent0)
                                               / 1e6 / (time.monotonic() - w0))
        t0 = time.monotonic()
    result["stop_all_s"] = time.monotonic() - t0
    api.close()
    return result


def step_restart(args: argparse.Namespace) -> dict[str, Any]:
    bus = Bus()
    # floor: the same round trip for a Type=notify service that is ready at once
    sh("systemd-run", "--unit=fnbench-notify", "-p", "Type=notify", "-p", "NotifyAccess=all",
       "-p", "StartLimitIntervalSec=0", "--", "/bin/sh", "-c",
       "systemd-notify --ready; exec sleep infinity")
    floor = timed(lambda: sh("systemctl", "restart", "fnbench-notify.service"), args.reps)
    sh("systemctl", "stop", "fnbench-notify.service")
    samples: list[float] = []
    checks: list[dict[str, Any]] = []
    with running_tasks(bus, args.tasks, 600) as started:
        ids = {s["aid"] for s in started[1:]}
        for _ in range(args.reps):
            pid0 = sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip()
            t0 = time.perf_counter()
            sh("systemctl", "restart", "farmnode.service")  # Type=notify: returns at READY
            samples.append(time.perf_counter() - t0)
            bus = Bus()
            st = bus.status()
            tasks = json.loads(sh("farmnode", "--json", "tasks"))
            checks.append({
                "new_pid": sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip()
                != pid0,
                "adopted": ids <= set(st["assignments"]),
                "running": sum(1 for t in tasks
                               if t["assignment_id"] in ids and t["state"] == "running"),
            })
            time.sleep(0.5)
    return {"floor": floor, "farmnode": samples, "checks": checks, "tasks": args.tasks}


class Pinger:
    """Peer.Ping to the agent, back to back, from a thread with its own bus connection: sd-bus
    answers Ping when the agent's event loop reads its bus, so the worst round trip is the
    worst stall of that loop (plus one round trip). Failures (the agent is away) are counted,
    not timed."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, float]] = []  # (when, round trip)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sdbus import DbusInterfaceCommonAsync, sd_bus_open_system

        loop = asyncio.new_event_loop()
        proxy = DbusInterfaceCommonAsync.new_proxy(BUS[0], BUS[1], sd_bus_open_system())
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                loop.run_until_complete(asyncio.wait_for(proxy.dbus_ping(), 60))
            except Exception:
                self.failures += 1
                time.sleep(0.05)
                proxy = DbusInterfaceCommonAsync.new_proxy(BUS[0], BUS[1],
                                                           sd_bus_open_system())
                continue
            self.samples.append((time.monotonic(), time.perf_counter() - t0))
            time.sleep(0.005)

    def worst(self, since: float, until: float) -> float:
        return max((rt for t, rt in self.samples if since <= t <= until), default=0.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)


def step_big(args: argparse.Namespace) -> dict[str, Any]:
    """One assignment of args.tasks tasks (one process, a 3 s job) against one of a single
    task: the agent's worst loop stall while each is accepted, started and concluded, the
    assign call's time, and recovery of a big one after kill -9."""
    bus = Bus()
    pinger = Pinger()
    out: dict[str, Any] = {"tasks": args.tasks}
    try:
        time.sleep(1)
        t0 = time.monotonic()
        time.sleep(2)
        out["idle_worst_s"] = pinger.worst(t0, time.monotonic())
        for label, frames in (("one", 1), ("big", args.tasks)):
            a = assignment([PROBE, "tick", "3"], frames=frames)
            t0 = time.monotonic()
            aid = bus.assign(a)
            out[f"{label}_assign_s"] = time.monotonic() - t0
            farmnode_wait(aid)
            out[f"{label}_total_s"] = time.monotonic() - t0
            out[f"{label}_worst_s"] = pinger.worst(t0, time.monotonic())
            ids = {t["id"] for t in a["tasks"]}
            states = [t["state"] for t in json.loads(sh("farmnode", "--json", "tasks"))
                      if t["id"] in ids]
            out[f"{label}_done"] = states.count("done")
        # kill -9 while a big assignment runs: back to READY, then concluded
        a = assignment([PROBE, "tick", "3"], frames=args.tasks)
        aid = bus.assign(a)
        sh("farmnode", "wait", aid, "--until", "running")
        pid = sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip()
        t0 = time.monotonic()
        sh("kill", "-9", pid)
        for _ in range(100):
            if sh("systemctl", "start", "farmnode.service", check=False) is not None and \
                    sh("systemctl", "show", "-P", "MainPID", "farmnode.service").strip() \
                    not in ("0", pid):
                break
            time.sleep(0.05)
        out["kill_ready_s"] = time.monotonic() - t0
        farmnode_wait(aid)
        out["kill_concluded_s"] = time.monotonic() - t0
        out["kill_worst_s"] = pinger.worst(t0 + out["kill_ready_s"], time.monotonic())
    finally:
        pinger.stop()
    out["ping_failures"] = pinger.failures
    out["pings"] = len(pinger.samples)
    return out


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "big": step_big,
    "setup": step_setup, "latency": step_latency, "throughput": step_throughput,
"footprint": step_footprint, "scale": step_scale,
    "restart": step_restart,
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--port", type=int, default=50000)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cold-reps", type=int, default=3)
    p.add_argument("--lines", type=int, default=100000)
    p.add_argument("--mode", default="command")
    p.add_argument("--ident", default="")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--window", type=float, default=10)
    args = p.parse_args(argv)
    print(json.dumps(STEPS[args.step](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
