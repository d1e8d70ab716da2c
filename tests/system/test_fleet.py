"""A fleet: FLEET_SIZE agents, each a booted systemd container in its own network namespace
with its own address, against one test master on the host.

Each node is what a render node is: systemd, D-Bus, journald and farmnode.service, reached
over a veth pair on a host bridge (10.77.0.0/24; the master at 10.77.0.1). Each gets its own
/etc/machine-id — nodes cloned from one image with one machine-id would be one node to the
master, by design (farmnode's UUID is derived from it).

Heavy (FLEET_SIZE containers on the CI machine's two cores, about a minute): it runs when
FARMNODE_FLEET=1 (FARMNODE_FLEET=N for N nodes), and prints the idle request rate per node.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import (
    CACHE_ROOT,
    Container,
    build_farmnode_wheel,
    ensure_tree,
    install_farmnode,
    using_tree,
)

from tests.master_stub import MasterStub
from tests.system.conftest import assign_taken, assignment

FLEET = os.environ.get("FARMNODE_FLEET", "")
FLEET_SIZE = max(20, int(FLEET)) if FLEET.isdigit() and int(FLEET) > 1 else 20
BRIDGE, SUBNET, MASTER_IP = "fnfleet0", "10.77.0", "10.77.0.1"
REANNOUNCE = 2.0  # PyFarm's 120 s compressed 60x
COMPRESSION = 120.0 / REANNOUNCE
IDLE_WINDOW = 20.0

pytestmark = pytest.mark.skipif(not FLEET, reason="fleet test: set FARMNODE_FLEET=1 to run")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def inotify_instances(wanted: int) -> Iterator[None]:
    """Every systemd holds inotify instances, and all containers count against root's
    fs.inotify.max_user_instances (128 on Debian): 20 systemds exhaust it and boots hang."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    old = int(path.read_text())
    if old < wanted:
        path.write_text(str(wanted))
    try:
        yield
    finally:
        if old < wanted:
            path.write_text(str(old))


@contextlib.contextmanager
def network(n: int, bridge: str = BRIDGE, subnet: str = SUBNET,
            host_ip: str = MASTER_IP) -> Iterator[list[str]]:
    """A bridge with the master's address and n namespaces, each on a veth with its own IP
    (subnet.10, .11, …); another test's fleet takes its own bridge and subnet."""
    sh("ip", "link", "add", bridge, "type", "bridge")
    names = [f"{bridge.removesuffix('0')}{i}" for i in range(n)]
    try:
        sh("ip", "addr", "add", f"{host_ip}/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for i, ns in enumerate(names):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "link", "set", f"{ns}h", "master", bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{subnet}.{10 + i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def boot_in_netns(name: str, ns: str, tree: Path, wheels: Path, machine_id: Path,
                  booted: list[Container]) -> Container:
    """Container.boot, started inside a network namespace (nspawn without
    --private-network keeps its caller's), with its own machine-id."""
    ct = Container(name=name, tree=tree,
                   binds=[(Path(__file__).resolve().parents[2], "/src"), (wheels, "/wheels"),
                          (machine_id, "/etc/machine-id")])
    booted.append(ct)  # shut down at the end even if its boot fails
    ct.log_path = CACHE_ROOT / f"{name}.console.log"
    # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree
    argv = ["nsenter", f"--net=/run/netns/{ns}", "systemd-nspawn", "-q", "--register=no",
            "--keep-unit", "-D", str(tree), "--volatile=overlay", "-M", name,
            "--console=passive", "--boot"]
    argv += [f"--bind-ro={src}:{dst}" for src, dst in ct.binds]
    with open(ct.log_path, "wb") as log:
        ct.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True)
    deadline = time.monotonic() + 180
    while not ct.leader:
        assert ct.process.poll() is None, ct.log_path.read_text()[-2000:]
        # nsenter execs nspawn in place: nspawn's child is the container's init
        with contextlib.suppress(FileNotFoundError):
            kids = Path(f"/proc/{ct.process.pid}/task/{ct.process.pid}/children").read_text()
            if kids.split():
                ct.leader = int(kids.split()[0])
        assert time.monotonic() < deadline, "container did not start"
        time.sleep(0.1)
    while ct.run(["systemctl", "is-system-running", "--wait"], check=False,
                 timeout=180).stdout.strip() not in ("running", "degraded"):
        assert time.monotonic() < deadline, "boot stuck"
        time.sleep(0.5)
        # under load the first child seen can be one of nspawn's short-lived helpers
        kids = Path(f"/proc/{ct.process.pid}/task/{ct.process.pid}/children").read_text()
        ct.leader = int(kids.split()[0]) if kids.split() else ct.leader
    install_farmnode(ct)
    ct.run(["tee", "/etc/farmnode/conf.d/50-fleet.yaml"], input=(
        f"master: {MASTER_IP}:{{port}}\nagent_master_reannounce: {REANNOUNCE}\n"
        "agent_http_retry_delay: 0.1\nagent_http_retry_max: 1\nagent_time_offset: 0\n"
        "agent_ram_check_interval: 0.5\nagent_ram_max_report_frequency: 0.2\n"))
    return ct


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[MasterStub, list[Container]]]:
    if os.geteuid() != 0:
        pytest.fail("the fleet test needs root")
    tree = ensure_tree()
    wheels = CACHE_ROOT / f"wheels-fleet-{os.getpid()}"
    build_farmnode_wheel(wheels)
    mids = CACHE_ROOT / f"fleet-ids-{os.getpid()}"
    mids.mkdir(exist_ok=True)
    cts: list[Container] = []
    with using_tree(tree), inotify_instances(8192), network(FLEET_SIZE) as names, \
            MasterStub(MASTER_IP, allow_loopback=False) as master:
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futs = []
                for i, ns in enumerate(names):
                    mid = mids / f"{i}"
                    mid.write_text(uuid.uuid4().hex + "\n")
                    futs.append(pool.submit(boot_in_netns, f"fnfleet-{os.getpid()}-{i}", ns,
                                            tree, wheels, mid, cts))
                for f in futs:
                    f.result()
            for ct in cts:
                ct.sh(f"sed -i 's/{{port}}/{master.port}/' /etc/farmnode/conf.d/50-fleet.yaml"
                      " && systemctl start farmnode.service")
            yield master, cts
        finally:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda c: c.shutdown(), cts))
            for ct in cts:
                ct.log_path.unlink(missing_ok=True)
            shutil.rmtree(wheels, ignore_errors=True)
            shutil.rmtree(mids, ignore_errors=True)


def test_every_node_registers_reports_and_idles_quietly(
        fleet: tuple[MasterStub, list[Container]]) -> None:
    master, cts = fleet
    master.wait_for(lambda rs: len({r.body["id"] for r in rs if r.kind == "announce"
                                    and r.status == 201}) >= len(cts), 120, "every announce")
    assert len(master.agents) == len(cts)
    ips = {a["remote_ip"] for a in master.agents.values()}
    assert ips == {f"{SUBNET}.{10 + i}" for i in range(len(cts))}
    # every node runs a frame and reports it (the master checks each report's source address)
    jobs = []
    for ct in cts:
        a = assignment("fakerender", {"duration": 0.2, "lines": 2}, [1])
        assign_taken(ct, a)  # a node whose health checks just passed may be reannouncing
        jobs.append(a["tasks"][0]["id"])
    master.wait_for(lambda rs: all(any(r.task_id == t and r.status == 200
                                       and r.body.get("state") == "done" for r in rs)
                                   for t in jobs), 120, "every node's done report")
    assert all(master.tasks[t].state == "done" for t in jobs)
    # idle: count what each node sends over a window, scale to an hour of real time
    time.sleep(3 * REANNOUNCE)  # let the post-job reannounces pass
    start, t0 = len(master.requests), time.monotonic()
    time.sleep(IDLE_WINDOW)
    window = master.requests[start:]
    elapsed = time.monotonic() - t0
    per_node = {}
    for r in window:
        per_node[r.peer] = per_node.get(r.peer, 0) + 1
    assert len(per_node) == len(cts)  # every node is alive and talking
    rate = {ip: n / elapsed * 3600 / COMPRESSION for ip, n in per_node.items()}
    kinds = {r.kind for r in window}
    print(f"\nfleet of {len(cts)}: idle requests per node per hour (real time, "
          f"reannounce {REANNOUNCE * COMPRESSION:.0f}s): min {min(rate.values()):.1f} "
          f"max {max(rate.values()):.1f} mean {sum(rate.values()) / len(rate):.1f}; "
          f"kinds {sorted(kinds)}")
    assert kinds == {"reannounce"}
    # PyFarm's schedule: one reannounce per period without contact, nothing more
    assert max(rate.values()) <= 3600 / (REANNOUNCE * COMPRESSION) * 1.5
