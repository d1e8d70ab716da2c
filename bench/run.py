"""`make bench`: boot the container tier, measure farmnode against systemd, write REPORT.md.

    python3 bench/run.py                 # the full run (10 M-line throughput, ~21 min)
    BENCH_QUICK=1 python3 bench/run.py   # a short run (~3 min): fewer repeats, 200 k lines
    BENCH_ONLY=overhead python3 bench/run.py   # only the named step(s), comma-separated:
        # their figures replace those in bench/results.json, the others are kept

The measuring happens inside the container (bench/inside.py); this side builds the probe
(probe.c), boots the container with farmnode installed from the checkout, puts its journal
on disk, runs the steps, plays the master for the traffic step (tests/master_stub.py behind a
byte-counting proxy), runs PyFarm's own master against the stub for the per-task overhead
step (bench/master_overhead.py) and writes bench/results.json and bench/REPORT.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]

from container import CACHE_ROOT, Container, booted  # noqa: E402

from bench import master_overhead, report  # noqa: E402

PROBE_BIN = HERE / "build" / "fn-probe"
INSIDE = ["/opt/farmnode/bin/python", "/src/bench/inside.py"]


@dataclass(frozen=True)
class Plan:
    name: str
    latency_reps: int
    cold_reps: int
    big_lines: int  # one run per mode at this size
    small_lines: int  # repeated runs per mode at this size
    small_reps: int
    footprint_s: float
    quiet_tasks: int
    scale_tasks: int
    queries: int
    restart_reps: int
    master_compression: float  # 60: an hour in a minute
    master_hours: float
    big_tasks: int = 5000
    warm_reps: int = 10
    overhead_frames: int = 20
    overhead_reps: int = 3

    @classmethod
    def full(cls) -> Plan:
        return cls("full", 20, 5, 10_000_000, 500_000, 3, 60, 50, 200, 1000, 10, 60, 1.0)

    @classmethod
    def quick(cls) -> Plan:
        return cls("quick", 6, 2, 0, 200_000, 2, 15, 50, 200, 300, 3, 120, 0.25, warm_reps=4,
                   overhead_reps=1)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_probe() -> None:
    PROBE_BIN.parent.mkdir(exist_ok=True)
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(PROBE_BIN),
                    str(HERE / "probe.c")], check=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def inside(ct: Container, step: str, *args: object, timeout: float = 1800) -> Any:
    r = ct.run([*INSIDE, step, *map(str, args)], timeout=timeout)
    return json.loads(r.stdout)


# ---- the master-traffic step (host side) ---------------------------------------------------
class CountingProxy:
    """TCP proxy in front of the test master that counts the bytes both ways."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent = 0  # agent → master
        self.received = 0  # master → agent
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = self.connections = 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    if outbound:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()


def master_traffic(ct: Container, plan: Plan) -> dict[str, Any]:
    from tests.master_stub import MasterStub

    c = plan.master_compression
    dropin = "/etc/farmnode/conf.d/60-bench-master.yaml"
    with MasterStub() as master:
        proxy = CountingProxy(("127.0.0.1", master.port))
        try:
            ct.run(["tee", dropin], input=(
                f"master: 127.0.0.1:{proxy.port}\n"
                f"agent_master_reannounce: {120 / c}\n"
                f"agent_ram_check_interval: {30 / c}\n"
                f"agent_ram_max_report_frequency: {10 / c}\n"
                f"agent_http_retry_delay: {5 / c}\n"
                f"agent_http_retry_max: {300 / c}\n"
                "agent_time_offset: 0\n"))
            ct.run(["systemctl", "restart", "farmnode.service"])
            master.wait_count("announce", 1, timeout=30)
            n0 = len(master.requests)
            proxy.reset()
            seconds = plan.master_hours * 3600 / c
            time.sleep(seconds)
            reqs = master.requests[n0:]
            sent, received, conns = proxy.sent, proxy.received, proxy.connections
        finally:
            proxy.close()
            ct.run(["rm", "-f", dropin])
            ct.run(["systemctl", "restart", "farmnode.service"])
    kinds: dict[str, int] = {}
    for r in reqs:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {"compression": c, "hours": plan.master_hours, "seconds": seconds,
            "requests": len(reqs), "kinds": kinds, "bytes_sent": sent,
            "bytes_received": received, "connections": conns}


# ---- the run ---------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_container() -> Iterator[Container]:
    journal_dir = CACHE_ROOT / f"bench-journal-{os.getpid()}"
    journal_dir.mkdir(parents=True, exist_ok=True)
    try:
        with booted(f"fnbench-{os.getpid()}") as ct:
            ct.run(["install", "-m755", "/src/bench/build/fn-probe", "/usr/local/bin/fn-probe"])
            # journald keeps its files in /var/log/journal: put that on the host's disk
            subprocess.run([sys.executable, str(HERE / "mount_into.py"), str(ct.leader),
                            str(journal_dir), "/var/log/journal"], check=True)
            yield ct
    finally:
        shutil.rmtree(journal_dir, ignore_errors=True)


def host_facts() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "farmnode",
                            "units", "dbus", "pyproject.toml"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {"host_cpu": cpu, "host_cpus": os.cpu_count(), "host_mem_mb": mem,
            "host_kernel": platform.release(), "commit": rev, "dirty": dirty,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


STEPS = ("latency", "throughput", "footprint", "scale", "restart", "master", "big", "warm",
         "overhead")


def run(plan: Plan, save: Path, only: frozenset[str] | None = None) -> dict[str, Any]:
    """Every step (or those in `only`, their results merged into what `save` holds); one
    that fails is recorded as {"error": ...} and the run goes on. The results are saved after
    each step."""
    build_probe()
    results: dict[str, Any] = {"plan": asdict(plan), "host": host_facts()}
    if only is not None:
        results = json.loads(save.read_text())
        results["plan"] = {**results.get("plan", {}), **{
            k: v for k, v in asdict(plan).items() if k.startswith("overhead_")}}
    t_start = time.monotonic()

    def step(name: str, fn: Callable[[], Any], label: str = "") -> None:
        if only is not None and name not in only and name != "container":
            return
        if label:
            log(label)
        t0 = time.monotonic()
        try:
            got = fn()
        except Exception as exc:  # a broken step must not cost the others
            log(f"{name} failed: {exc}")
            got = {"error": str(exc)[-2000:]}
        if only is None:
            results[name] = got
            results["wall_s"] = time.monotonic() - t_start
        elif name != "container":
            # measured apart from the run the rest of the file (and its wall_s) comes from
            if isinstance(got, dict):
                got["measured_alone"] = {**host_facts(), "wall_s": time.monotonic() - t0}
            results[name] = got
        save.write_text(json.dumps(results, indent=1) + "\n")

    with bench_container() as ct:
        port = free_port()
        log(f"container up; plan {plan.name}")
        step("container", lambda: inside(ct, "setup", "--port", port))
        step("latency", lambda: inside(ct, "latency", "--port", port, "--reps",
                                       plan.latency_reps, "--cold-reps", plan.cold_reps),
             label="1/9 launch latency")
        step("throughput", lambda: throughput(ct, plan),
             label="2/9 output throughput")
        step("footprint", lambda: inside(ct, "footprint", "--port", port, "--seconds",
                                         plan.footprint_s, "--tasks", plan.quiet_tasks),
             label="3/9 footprint")
        step("scale", lambda: inside(ct, "scale", "--port", port, "--tasks", plan.scale_tasks,
                                     "--queries", plan.queries),
             label="4/9 scale")
        step("restart", lambda: inside(ct, "restart", "--reps", plan.restart_reps,
                                       "--tasks", 8),
             label="5/9 restart")
        step("master", lambda: master_traffic(ct, plan),
             label="6/9 master traffic")
        step("big", lambda: inside(ct, "big", "--tasks", plan.big_tasks),
             label="7/9 one big assignment")
        step("warm", lambda: json.loads(ct.run(
            ["/opt/farmnode/bin/python", "/src/bench/warm.py", "--reps", str(plan.warm_reps)],
            timeout=600).stdout),
             label="8/9 warm per-job process against a process per task")
        step("overhead", lambda: master_overhead.measure(
            ct, port, frames=plan.overhead_frames, reps=plan.overhead_reps, log=log),
             label="9/9 per-task overhead: PyFarm's master against the stub")
    return results


def throughput(ct: Container, plan: Plan) -> list[dict[str, Any]]:
    runs = []
    if plan.big_lines:
        for mode in ("floor", "command", "floor_blender", "blender"):
            log(f"    {mode}: {plan.big_lines} lines")
            runs.append(inside(ct, "throughput", "--mode", mode, "--lines", plan.big_lines,
                               timeout=3600))
    for rep in range(plan.small_reps):
        for mode in ("floor", "command", "floor_blender", "blender"):
            # interleaved: noise hits every mode alike
            log(f"    {mode}: {plan.small_lines} lines, round {rep + 1}")
            runs.append(inside(ct, "throughput", "--mode", mode, "--lines", plan.small_lines))
    return runs


def main() -> int:
    if os.geteuid() != 0:
        print("make bench needs root (systemd-nspawn)", file=sys.stderr)
        return 1
    plan = Plan.quick() if os.environ.get("BENCH_QUICK") == "1" else Plan.full()
    only = None
    if os.environ.get("BENCH_ONLY"):
        only = frozenset(os.environ["BENCH_ONLY"].split(","))
        if unknown := only - set(STEPS):
            print(f"BENCH_ONLY: no step {', '.join(sorted(unknown))} (steps: "
                  f"{', '.join(STEPS)})", file=sys.stderr)
            return 2
        if not (HERE / "results.json").exists():
            print("BENCH_ONLY needs a bench/results.json of a whole run to merge into",
                  file=sys.stderr)
            return 2
    t0 = time.monotonic()
    results = run(plan, HERE / "results.json", only)
    (HERE / "REPORT.md").write_text(report.render(results))
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min: bench/REPORT.md")
    print(report.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
