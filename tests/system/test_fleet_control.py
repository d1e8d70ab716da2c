"""Fleet control against real nodes: `farmnode -H` from the host over sd-bus's SSH
transport to three booted nodes (systemd, sshd, farmnode.service, each in its own network
namespace), plus an address where a node is down and a name that does not resolve; `-M`
through systemd-machined inside a node.

The host's ssh is the real one; its options come from a config file of this test, given by
a `ssh` first in PATH that adds `-F` and logs the argv sd-bus built (the proof that the
transport is sd-bus's own `ssh -xT host systemd-stdio-bridge`). Nothing of ours runs on a
node but the agent.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from container import CACHE_ROOT, Container, build_farmnode_wheel, ensure_tree, using_tree

from tests.system.conftest import assignment
from tests.system.test_fleet import boot_in_netns, inotify_instances, network

NODES = 3
BRIDGE, SUBNET, HOST_IP = "fnctl0", "10.78.0", "10.78.0.1"
DOWN = f"{SUBNET}.{10 + NODES}"  # on the nodes' subnet, held by nobody: a powered-off node
UNRESOLVABLE = "node-gone.invalid"  # RFC 6761: never resolves
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Fleet:
    nodes: list[Container]
    ips: list[str]
    env: dict[str, str]
    argv_log: Path

    def farmnode(self, *args: str, check_rc: int | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "farmnode.cli.main", *args], env=self.env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        if check_rc is not None:
            assert r.returncode == check_rc, (r.stdout, r.stderr)
        return r

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "farmnode.cli.main", *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ssh_setup(work: Path, tree: Path) -> tuple[dict[str, str], Path, str]:
    """A key, a known_hosts that pins the nodes' host key, and an ssh config for them."""
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test",
                    "-f", str(key)], check=True)
    host_key = (tree / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
    (work / "known_hosts").write_text(f"{SUBNET}.* {' '.join(host_key)}\n")
    (work / "ssh_config").write_text(
        f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        f"  StrictHostKeyChecking yes\n  UserKnownHostsFile {work / 'known_hosts'}\n"
        # INFO: ssh says why it ends a connection early ("Connection closed by …" is an
        # INFO line), which a failure then names
        "  GlobalKnownHostsFile /dev/null\n  ConnectTimeout 10\n  LogLevel INFO\n")
    bindir = work / "bin"
    bindir.mkdir()
    argv_log = work / "ssh-argv.log"
    ssh = shutil.which("ssh")
    assert ssh, "the host needs ssh (openssh-client)"
    (bindir / "ssh").write_text(
        f'#!/bin/sh\necho "$*" >> {argv_log}\nexec {ssh} -F {work / "ssh_config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return env, argv_log, (key.with_suffix(".pub")).read_text()


@contextlib.contextmanager
def fleet_of(n: int) -> Iterator[Fleet]:
    """n booted standalone nodes with sshd and the caller's key for root and guest (also
    bench/fleet.py's)."""
    tree = ensure_tree()
    work = CACHE_ROOT / f"fleetctl-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wheels = work / "wheels"
    build_farmnode_wheel(wheels)
    env, argv_log, pub = ssh_setup(work, tree)
    cts: list[Container] = []
    with using_tree(tree), inotify_instances(max(1024, 64 * n)), \
            network(n, BRIDGE, SUBNET, HOST_IP) as names:
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futs = []
                for i, ns in enumerate(names):
                    mid = work / f"machine-id-{i}"
                    mid.write_text(uuid.uuid4().hex + "\n")
                    futs.append(pool.submit(boot_in_netns, f"fnctl-{os.getpid()}-{i}", ns,
                                            tree, wheels, mid, cts))
                for f in futs:
                    f.result()
            # booted in any order: node i is the one in namespace i, at address .10 + i
            cts.sort(key=lambda ct: int(ct.name.rsplit("-", 1)[1]))
            for ct in cts:
                # standalone nodes (no master); sshd, with the test's key for root and guest
                ct.sh("rm /etc/farmnode/conf.d/50-fleet.yaml\n"
                      "for u in root guest; do h=$(getent passwd $u | cut -d: -f6)\n"
                      "  install -d -m 700 -o $u -g $u $h/.ssh\n"
                      "  install -m 600 -o $u -g $u /dev/stdin $h/.ssh/authorized_keys"
                      " <<EOF\n" + pub + "EOF\ndone\n"
                      "systemctl start ssh.service farmnode.service")
            yield Fleet(cts, [f"{SUBNET}.{10 + i}" for i in range(n)], env, argv_log)
        finally:
            def down(ct: Container) -> None:
                # a poweroff with the agent running outlasted shutdown()'s 20 s here (then
                # SIGKILL); stopping the agent first takes a fraction of a second
                if ct.leader:
                    ct.run(["systemctl", "stop", "farmnode.service"], check=False, timeout=60)
                ct.shutdown()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(down, cts))
            for ct in cts:
                ct.log_path.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.fail("the fleet control test needs root")
    with fleet_of(NODES) as f:
        yield f


def hosts(*names: str) -> str:
    return ",".join(names)


def test_status_fans_out_and_names_the_down_and_the_unresolvable_node(fleet: Fleet) -> None:
    t0 = time.monotonic()
    r = fleet.farmnode("--json", "-H", hosts(*fleet.ips, DOWN, UNRESOLVABLE), "status")
    wall = time.monotonic() - t0
    assert r.returncode == 1, (r.stdout, r.stderr)
    events = json_lines(r.stdout)
    answers = {e["node"]: e["data"] for e in events if e.get("event") == "answer"}
    failed = {e["node"]: e["error"] for e in events if e.get("event") == "failed"}
    # three different agents answered (each node has its own machine-id, so its own id)
    assert set(answers) == set(fleet.ips)
    assert len({a["agent_id"] for a in answers.values()}) == NODES
    assert all(a["state"] == "online" for a in answers.values())
    assert set(failed) == {DOWN, UNRESOLVABLE}
    assert f"Could not resolve hostname {UNRESOLVABLE}" in failed[UNRESOLVABLE]
    assert "No route to host" in failed[DOWN] or "timed out" in failed[DOWN], failed[DOWN]
    # as they arrive: the live nodes' answers are out before the down node's ARP gives up
    order = [e["node"] for e in events if "node" in e]
    assert order.index(DOWN) > max(order.index(ip) for ip in fleet.ips), order
    summary = events[-1]["summary"]
    assert not summary["ok"] and summary["text"].startswith(f"{NODES} of {NODES + 2} node(s)")
    # the transport is sd-bus's own: ssh -xT -- HOST systemd-stdio-bridge, nothing of ours
    argv = fleet.argv_log.read_text().splitlines()
    assert f"-xT -- {fleet.ips[0]} systemd-stdio-bridge" in argv, argv
    # human output: one prefixed line per node, failures on stderr by name, then the summary
    r = fleet.farmnode("-H", hosts(*fleet.ips), "status", check_rc=0)
    lines = r.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines[:-1]) == sorted(fleet.ips)
    assert lines[-1].startswith(f"fleet: {NODES} of {NODES} node(s) succeeded")
    print(f"\nfleet status over ssh, {NODES} nodes + down + unresolvable: {wall:.2f} s "
          "(bench/fleet.py measures fan-out)")


def test_tasks_and_cancel_reach_the_node_that_holds_the_task(fleet: Fleet) -> None:
    a = assignment("fakerender", {"duration": 120, "lines": 1}, [1])
    task = a["tasks"][0]["id"]
    holder = fleet.nodes[1]
    aid = holder.run(["farmnode", "assign", "-"], input=json.dumps(a)).stdout.strip()
    holder.run(["farmnode", "wait", "--until", "running", aid])
    r = fleet.farmnode("--json", "-H", hosts(*fleet.ips), "tasks", "--active", check_rc=0)
    per_node = {e["node"]: e["data"] for e in json_lines(r.stdout) if e.get("event") == "answer"}
    assert [t["id"] for t in per_node[fleet.ips[1]]] == [task]
    assert per_node[fleet.ips[0]] == per_node[fleet.ips[2]] == []
    r = fleet.farmnode("-H", hosts(*fleet.ips), "cancel", str(task), check_rc=0)
    assert f"{fleet.ips[1]}: task {task}: stopping" in r.stdout
    assert f"{fleet.ips[0]}: no task {task} here" in r.stdout
    holder.run(["farmnode", "wait", "--until", "finished", aid], check=False)
    got = json.loads(holder.run(["farmnode", "--json", "tasks"]).stdout)
    assert [t["state"] for t in got if t["id"] == task] == ["cancelled"]
    # a task no node has: every node answers, and the command says it failed
    r = fleet.farmnode("-H", hosts(*fleet.ips), "cancel", "999999", check_rc=1)
    assert "no node has task 999999" in r.stdout


def test_a_refused_call_is_reported_for_its_node_and_the_rest_go_on(fleet: Fleet) -> None:
    # guest is not in group farmnode: the bus policy refuses it SetState
    r = fleet.farmnode("-H", hosts(f"guest@{fleet.ips[0]}", fleet.ips[1]), "state", "disabled",
                       check_rc=1)
    if f"guest@{fleet.ips[0]}: failed: cannot reach the node" in r.stderr:
        # Seen once in CI (of some 45 tries here, none): guest's connection ended within
        # 0.24 s, before any answer, ssh saying nothing at LogLevel ERROR. A transport
        # failure is not what this test is about: it is named, and the call made again.
        print(f"\nfleet: guest's first connection failed: {r.stderr.strip()}")
        r = fleet.farmnode("-H", hosts(f"guest@{fleet.ips[0]}", fleet.ips[1]), "state",
                           "disabled", check_rc=1)
    assert f"guest@{fleet.ips[0]}: failed: refused: permission denied" in r.stderr, r.stderr
    assert f"{fleet.ips[1]}: agent disabled" in r.stdout
    status = json.loads(fleet.nodes[1].run(["farmnode", "--json", "status"]).stdout)
    assert status["state"] == "disabled"
    fleet.farmnode("-H", hosts(*fleet.ips), "state", "online", check_rc=0)
    status = json.loads(fleet.nodes[0].run(["farmnode", "--json", "status"]).stdout)
    assert status["state"] == "online"


def test_drain_lets_running_tasks_finish_and_reports_each_node_idle(fleet: Fleet) -> None:
    busy = fleet.nodes[0]
    # the task runs until the test lets it end: blocked reading a FIFO
    gate = "/run/fleet-drain-gate"
    busy.run(["mkfifo", "-m", "666", gate])
    a = assignment("command", {"command": ["cat", gate]}, [1])
    aid = busy.run(["farmnode", "assign", "-"], input=json.dumps(a)).stdout.strip()
    busy.run(["farmnode", "wait", "--until", "running", aid])
    p = fleet.popen("--json", "-H", hosts(*fleet.ips), "drain")
    events = []
    assert p.stdout is not None
    for line in p.stdout:
        events.append(json.loads(line))
        if events[-1].get("event") == "draining":
            # disabled at once: new work is refused while the running task goes on
            r = busy.run(["farmnode", "assign", "-"], check=False, input=json.dumps(
                assignment("fakerender", {"duration": 1}, [1])))
            assert r.returncode != 0 and "disabled" in r.stderr, r.stderr
            # an agent restarted meanwhile starts online: the drain disables it again, and
            # the task it adopts still ends the drain
            busy.run(["systemctl", "restart", "farmnode.service"])
            busy.sh(f"echo done > {gate}")
    assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    kinds = [(e.get("node"), e.get("event")) for e in events]
    assert (fleet.ips[0], "draining") in kinds
    assert {n for n, k in kinds if k == "idle"} == set(fleet.ips)
    # the idle nodes report at once; the busy one only after its task has run to its end
    assert kinds.index((fleet.ips[0], "idle")) > max(
        kinds.index((ip, "idle")) for ip in fleet.ips[1:])
    tasks = json.loads(busy.run(["farmnode", "--json", "tasks"]).stdout)
    assert [t["state"] for t in tasks if t["assignment_id"] == aid] == ["done"]
    assert events[-1]["summary"]["ok"]
    assert json.loads(busy.run(["farmnode", "--json", "status"]).stdout)["state"] == "disabled"
    fleet.farmnode("-H", hosts(*fleet.ips), "state", "online", check_rc=0)


def test_machine_transport_through_machined(fleet: Fleet) -> None:
    """-M on a node, where systemd is PID 1: a machine registered with systemd-machined
    (its leader a process of the node, so its bus is the node's) is reached through sd-bus's
    machine transport; an unknown machine is named in its own failure."""
    node = fleet.nodes[2]
    node.run(["systemd-run", "--unit=fleet-machine-leader", "sleep", "infinity"])
    leader = node.run(["systemctl", "show", "-P", "MainPID", "fleet-machine-leader"]
                      ).stdout.strip()
    node.run(["busctl", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
              "org.freedesktop.machine1.Manager", "RegisterMachine", "sayssus",
              "fleet-node", "0", "farmnode-test", "container", leader, "/"])
    try:
        r = node.run(["farmnode", "--json", "-M", "fleet-node,no-such-machine", "status"],
                     check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        events = json_lines(r.stdout)
        answer = [e for e in events if e.get("event") == "answer"]
        assert [e["node"] for e in answer] == ["fleet-node"]
        assert answer[0]["data"]["agent_id"] == json.loads(
            node.run(["farmnode", "--json", "status"]).stdout)["agent_id"]
        (failed,) = [e for e in events if e.get("event") == "failed"]
        assert failed["node"] == "no-such-machine" and "no-such-machine" in failed["error"]
        # host:machine, from the host: ssh to the node, whose systemd-stdio-bridge enters the
        # machine (sd-bus adds --machine=)
        r = fleet.farmnode("--json", "-H", f"{fleet.ips[2]}:fleet-node", "status", check_rc=0)
        (remote,) = [e for e in json_lines(r.stdout) if e.get("event") == "answer"]
        assert remote["data"]["agent_id"] == answer[0]["data"]["agent_id"]
        assert any(line.endswith("systemd-stdio-bridge --machine=fleet-node")
                   for line in fleet.argv_log.read_text().splitlines())
    finally:
        node.run(["systemctl", "stop", "fleet-machine-leader"], check=False)
