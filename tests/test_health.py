"""Health checks: each built-in check against the real thing it reads where this host has it
(statvfs and writes on real filesystems, rtnetlink in a network namespace, sysfs trees of real
machines), the runner, the watch's verdicts and gating, and the core's state rules.

What needs systemd (units, timeouts, JobRemoved, journald) is in tests/system/test_health.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent.core import Agent, AgentState, NotAccepting
from farmnode.config import Config
from farmnode.health import checks, run, watch
from farmnode.health.watch import HealthWatch, Verdict
from farmnode.tasks.store import Store
from tests.test_gpus import NO_GPU, NVIDIA_SERVER, WORKSTATION, Pci, build

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, namespaces)")


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory: Path) -> None:
    with contextlib.suppress(OSError), open(directory / "fill", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


# ---- scratch -------------------------------------------------------------------------------


def test_scratch_passes_above_and_fails_below_the_threshold(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize // checks.MB
    ok = checks.scratch(str(tmp_path), 0)
    assert ok.ok and str(tmp_path) in ok.message
    bad = checks.scratch(str(tmp_path), free + 10_000)
    assert not bad.ok
    assert "below health_scratch_min_free" in bad.message and f"{free + 10_000} MB" in bad.message


@root_only
def test_scratch_on_a_filesystem_that_fills_up(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "scratch", "size=8m") as scratch:
        assert checks.scratch(str(scratch), 4).ok
        fill(scratch)
        result = checks.scratch(str(scratch), 4)
        assert not result.ok and result.message.startswith(f"{scratch}: 0 MB free")


def test_scratch_path_missing(tmp_path: Path) -> None:
    result = checks.scratch(str(tmp_path / "gone"), 1)
    assert not result.ok and "ENOENT" in result.message and "gone" in result.message


# ---- state directory -----------------------------------------------------------------------


def test_state_dir_writable_and_left_clean(tmp_path: Path) -> None:
    result = checks.state_dir(str(tmp_path))
    assert result.ok
    assert list(tmp_path.iterdir()) == []  # the probe file is gone again


def test_state_dir_missing(tmp_path: Path) -> None:
    result = checks.state_dir(str(tmp_path / "gone"))
    assert not result.ok and "ENOENT" in result.message


@root_only
def test_state_dir_read_only_and_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = checks.state_dir(str(ro))
        assert not result.ok and "EROFS" in result.message
    with tmpfs(tmp_path / "full", "size=1m") as full:
        fill(full)
        result = checks.state_dir(str(full))
        assert not result.ok and "ENOSPC" in result.message, result


# ---- journald (a peer speaking its varlink protocol; the real one: the system tier) ---------


def varlink_peer(path: Path, answer: bytes | None) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            request = b""
            while not request.endswith(b"\0"):
                request += conn.recv(4096)
            assert json.loads(request[:-1])["method"] == "io.systemd.Journal.Synchronize"
            if answer is None:
                conn.recv(1)  # holds the call until the client gives up
            else:
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_journald_answers(tmp_path: Path) -> None:
    varlink_peer(tmp_path / "s", b'{"parameters":{}}\0')
    result = checks.journald(str(tmp_path / "s"))
    assert result.ok and result.message.startswith("journald answered in")


def test_journald_refuses_or_hangs_or_is_gone(tmp_path: Path) -> None:
    varlink_peer(tmp_path / "e", b'{"error":"io.systemd.Journal.Busy"}\0')
    refused = checks.journald(str(tmp_path / "e"))
    assert not refused.ok and "io.systemd.Journal.Busy" in refused.message
    varlink_peer(tmp_path / "h", None)
    hung = checks.journald(str(tmp_path / "h"), timeout=0.3)
    assert not hung.ok and "did not answer" in hung.message and "0.3 s" in hung.message
    gone = checks.journald(str(tmp_path / "nothing"))
    assert not gone.ok and "ENOENT" in gone.message


# ---- GPUs (sysfs trees of real machines, as tests/test_gpus.py builds them) ----------------


def gpu_check(tmp_path: Path, machine: list[Pci], nodes: list[str]) -> checks.CheckResult:
    sys_root, proc = build(tmp_path, machine)
    dev = tmp_path / "devroot"
    for node in nodes:
        (dev / node.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (dev / node.lstrip("/")).touch()
    return checks.gpus(sys_root, proc, dev, use_nvml=False)


SERVER_NODES = ["/dev/nvidiactl", *(f"/dev/nvidia{i}" for i in range(4)),
                *(f"/dev/dri/card{i}" for i in range(5)),
                *(f"/dev/dri/renderD{128 + i}" for i in range(4))]


def test_gpu_check_passes_with_drivers_and_nodes(tmp_path: Path) -> None:
    result = gpu_check(tmp_path, NVIDIA_SERVER, SERVER_NODES)
    assert result.ok, result
    # the BMC's display is no task's GPU, so it is not checked
    assert result.message.count("nvidia") == 4 and "ast" not in result.message


def test_gpu_check_fails_when_a_node_is_missing(tmp_path: Path) -> None:
    result = gpu_check(tmp_path, NVIDIA_SERVER,
                       [n for n in SERVER_NODES if n not in ("/dev/nvidia3", "/dev/nvidiactl")])
    assert not result.ok
    # minor 3 is the GPU at ba:00.0 (the driver's numbering, not PCI order)
    assert "0000:ba:00.0 (NVIDIA H100 80GB HBM3): driver nvidia but no /dev/nvidia3" \
        in result.message
    assert result.message.count("/dev/nvidiactl") == 4


def test_gpu_check_fails_without_a_driver(tmp_path: Path) -> None:
    machine = [*WORKSTATION[:1], Pci("0000:03:00.0", 0x030000, 0x1002, 0x744C, None)]
    result = gpu_check(tmp_path, machine, ["/dev/dri/card0", "/dev/dri/renderD128"])
    assert not result.ok
    assert result.message.startswith("0000:03:00.0 (AMD ")
    assert result.message.endswith("): no driver bound")
    assert "00:02.0" not in result.message  # the iGPU is fine


def test_gpu_check_on_a_node_without_gpus(tmp_path: Path) -> None:
    assert gpu_check(tmp_path, NO_GPU, []) == checks.CheckResult(
        True, "no GPUs for tasks on this node")


# ---- network (rtnetlink in a namespace of its own) -----------------------------------------


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    ns = f"fntest-health-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        _ip(ns, "link", "add", "up0", "type", "veth", "peer", "name", "peer0")
        for args in (["link", "set", "lo", "up"], ["link", "set", "up0", "up"],
                     ["link", "set", "peer0", "up"], ["addr", "add", "10.9.9.1/24", "dev", "up0"]):
            _ip(ns, *args)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def network_check(ns: str, master: str | None) -> tuple[bool, str]:
    code = ("import sys, json; from farmnode.health import network\n"
            "r = network.check(sys.argv[1] or None); print(json.dumps([r.ok, r.message]))")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, master or ""],
                         check=True, capture_output=True, text=True).stdout
    ok, message = json.loads(out)
    return ok, message


def test_network_route_carrier_address(netns: str) -> None:
    ok, message = network_check(netns, "10.9.9.2:5000")
    assert ok, message
    assert message == ("route to the master 10.9.9.2 (10.9.9.2) on up0 (carrier, "
                       "10.9.9.1/24)")
    # no route to a master elsewhere (and no default route)
    ok, message = network_check(netns, "10.77.0.1")
    assert not ok and message.startswith("no route to the master 10.77.0.1 (10.77.0.1)")
    # standalone on a LAN without a gateway: a link with carrier and an address will do
    ok, message = network_check(netns, None)
    assert ok and message.startswith("no master configured and no default route: "), message
    assert "has carrier and" in message, message
    _ip(netns, "link", "set", "peer0", "down")  # no link has carrier now
    ok, message = network_check(netns, None)
    assert not ok and message == ("no master configured, no default route, and no link "
                                  "with carrier and an address"), message
    _ip(netns, "link", "set", "peer0", "up")
    # standalone with a gateway: the default route is what must work
    _ip(netns, "route", "add", "default", "via", "10.9.9.2")
    ok, message = network_check(netns, None)
    assert ok and message.startswith("the default route via 10.9.9.2 on up0"), message
    ok, message = network_check(netns, "10.77.0.1")
    assert ok and "via 10.9.9.2 on up0" in message


def test_network_without_carrier_or_address(netns: str) -> None:
    _ip(netns, "link", "set", "peer0", "down")  # the cable pulled, as up0 sees it
    ok, message = network_check(netns, "10.9.9.2")
    assert not ok and "on up0, which has no carrier" in message, message
    _ip(netns, "link", "set", "peer0", "up")
    _ip(netns, "addr", "flush", "dev", "up0")
    _ip(netns, "route", "add", "10.9.9.0/24", "dev", "up0")
    ok, message = network_check(netns, "10.9.9.2")
    assert not ok and message.endswith("on up0, which has no address"), message


def test_master_host_forms() -> None:
    from farmnode.health import network

    assert network.master_host("m.farm:5000") == "m.farm"
    assert network.master_host("m.farm") == "m.farm"
    assert network.master_host("[fd00::5]:5000") == "fd00::5"
    assert network.master_host("fd00::5") == "fd00::5"
    assert network.master_host(None) is None


def test_the_agent_never_loads_pyroute2() -> None:
    # The check's own process reads netlink; the agent's footprint must not grow by it.
    code = ("import sys, farmnode.agent.main, farmnode.bus.service, farmnode.health.watch, "
            "farmnode.health.run; print('pyroute2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "False"


# ---- the runner ----------------------------------------------------------------------------


def test_dropins_follow_run_parts_names(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    for name, mode in (("mounts", 0o755), ("gpu-fans", 0o700), ("notes", 0o644),
                       ("old.dpkg-old", 0o755), ("backup~", 0o755), ("zz_last", 0o755)):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(mode)
    (tmp_path / "subdir").mkdir()
    assert watch.dropin_units(tmp_path, set()) == [
        "farmnode-health@gpu-fans.service", "farmnode-health@mounts.service",
        "farmnode-health@zz_last.service"]
    ignored = {r.getMessage().split()[2] for r in caplog.records}
    assert ignored == {str(tmp_path / n) for n in ("notes", "old.dpkg-old", "backup~", "subdir")}
    assert run.dropin("mounts", tmp_path) == tmp_path / "mounts"
    assert run.dropin("notes", tmp_path) is None
    assert run.dropin("../mounts", tmp_path) is None
    assert watch.dropin_units(tmp_path / "none", set()) == []


def test_runner_unknown_check_and_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert run.main(["no-such-check"]) == run.EXIT_USAGE
    assert "no health check 'no-such-check'" in capsys.readouterr().out
    assert run.main([]) == run.EXIT_USAGE
    # built in, with the configuration of this host (defaults where it has none)
    assert run.main(["state"]) in (0, run.EXIT_FAILED)
    assert capsys.readouterr().out.startswith("state directory /var/lib/farmnode")


def test_runner_execs_the_dropin(tmp_path: Path) -> None:
    script = tmp_path / "mounts"
    script.write_text("#!/bin/sh\necho \"/shots is not mounted ($0)\"\nexit 3\n")
    script.chmod(0o755)
    code = ("import sys; from pathlib import Path; from farmnode.health import run\n"
            f"run.HEALTH_D = Path({str(tmp_path)!r}); sys.exit(run.main(['mounts']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (3, f"/shots is not mounted ({script})\n")


# ---- verdicts and gating (the watch's rules; systemd's side: the system tier) ---------------


def test_describe_systemd_results() -> None:
    assert watch.describe("success", 1, 0, 0) == "passed"
    assert watch.describe("exit-code", 1, 3, 0) == "exited with status 3"
    assert watch.describe("timeout", 2, 15, 2_000_000) == \
        "did not finish within its timeout 2 s (TimeoutStartSec=) and was killed"
    assert watch.describe("signal", 2, 9, 0) == "was killed by SIGKILL"
    assert watch.describe("core-dump", 3, 11, 0) == "was killed by SIGSEGV and dumped core"
    assert watch.describe("start-limit-hit", 0, 0, 0) == \
        "failed (systemd's result: start-limit-hit)"


def gate(units: list[str]) -> tuple[HealthWatch, list[str | None]]:
    seen: list[str | None] = []
    w = HealthWatch(None, 60, seen.append)  # type: ignore[arg-type]
    assert w.status() is None  # until start() finds farmnode-health.target
    w.enabled = True
    w.units = units
    return w, seen


def test_gate_opens_once_all_passed_and_closes_on_a_failure() -> None:
    a, b = "farmnode-health@scratch.service", "site-mounts.service"
    w, seen = gate([a, b])
    w._publish()
    assert seen == ["health checks have not passed yet (waiting for scratch, "
                    "site-mounts.service)"]
    w.verdicts[a] = Verdict(a, True, "passed", ("/var/tmp: 9000 MB free",), 1.0)
    w._publish()
    assert seen[-1] == "health checks have not passed yet (waiting for site-mounts.service)"
    assert not w.passed_once
    w.verdicts[b] = Verdict(b, True, "passed", (), 2.0)
    w._publish()
    assert seen[-1] is None and w.passed_once
    w.verdicts[b] = Verdict(b, False, "exited with status 1", ("/shots gone", "try later"), 3.0)
    w._publish()
    assert seen[-1] == ("health check site-mounts.service exited with status 1: /shots gone | "
                        "try later")
    n = len(seen)
    w._publish()  # the same verdict again: no news
    assert len(seen) == n
    w.verdicts[b] = Verdict(b, True, "passed", (), 4.0)
    w._publish()
    assert seen[-1] is None
    status = w.status()
    assert status["passed_once"] and [c["ok"] for c in status["checks"]] == [True, True]


def test_a_check_failing_at_start_keeps_the_gate_shut() -> None:
    a, b = "farmnode-health@scratch.service", "farmnode-health@network.service"
    w, seen = gate([a, b])
    w.verdicts[a] = Verdict(a, True, "passed", (), 1.0)
    w.verdicts[b] = Verdict(b, False, "exited with status 1", ("no route",), 1.0)
    w._publish()
    assert seen == ["health check network exited with status 1: no route"]
    assert not w.passed_once
    # a check removed (its drop-in deleted) no longer counts
    w.units = [a]
    w._publish()
    assert seen[-1] is None and w.passed_once


def test_passing_once_is_noted_for_the_next_agent(tmp_path: Path) -> None:
    a = "farmnode-health@scratch.service"
    marker = tmp_path / "run" / "health-passed"
    marker.parent.mkdir()
    w = HealthWatch(None, 60, lambda reason: None,  # type: ignore[arg-type]
                    passed_marker=marker)
    w.enabled = True
    w.units = [a]
    w.verdicts[a] = Verdict(a, False, "exited with status 1", (), 1.0)
    w._publish()
    assert not marker.exists()
    w.verdicts[a] = Verdict(a, True, "passed", (), 2.0)
    w._publish()
    assert marker.exists()


def test_a_restart_waits_only_for_checks_that_failed_before() -> None:
    a, b = "farmnode-health@scratch.service", "farmnode-health@mounts.service"
    w, seen = gate([a, b])
    w.passed_once = True  # the note in /run: they passed since boot
    w.verdicts[b] = Verdict(b, False, "exited with status 1", ("gone",), 1.0)  # from systemd
    w._publish()
    assert seen == ["health check mounts exited with status 1: gone"]
    assert not w._settled.is_set()  # READY waits for mounts' next run
    w._fresh.add(b)
    w.verdicts[b] = Verdict(b, True, "passed", (), 2.0)
    w._publish()
    assert seen[-1] is None and w._settled.is_set()  # scratch has not run yet: no matter


# ---- the core: a failing check is a hold; never re-enabling an admin's disable ------------


def agent(tmp_path: Path) -> Agent:
    return Agent(Config(), Store(tmp_path / "db"), scopes=None)  # type: ignore[arg-type]


def test_failing_check_disables_and_passing_brings_back(tmp_path: Path) -> None:
    a = agent(tmp_path)
    states: list[AgentState] = []
    a.state_listeners.append(states.append)
    a.set_hold("health", "health check mounts exited with status 1: /shots gone")
    assert a.state is AgentState.DISABLED
    assert a.status()["state_reason"] == "health check mounts exited with status 1: /shots gone"
    with pytest.raises(NotAccepting, match="/shots gone"):
        a.assign({"job": {"id": 1, "by": 1}, "jobtype": {"name": "command", "version": 1},
                  "tasks": [{"id": 1, "frame": 1}]})
    a.set_hold("health", None)
    assert a.state is AgentState.ONLINE and a.status()["state_reason"] is None
    assert states == [AgentState.DISABLED, AgentState.ONLINE]


def test_admin_disable_is_never_undone_by_a_check(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a.set_state("disabled")
    a.set_hold("health", "health check gpu exited with status 1: no driver")
    a.set_hold("health", None)
    assert a.state is AgentState.DISABLED
    a.set_state("online")
    assert a.state is AgentState.ONLINE


def test_admin_online_while_a_check_fails_stays_disabled_until_it_passes(tmp_path: Path
                                                                         ) -> None:
    a = agent(tmp_path)
    a.set_hold("health", "health check scratch exited with status 1: 3 MB free")
    a.set_state("online")
    assert a.state is AgentState.DISABLED
    assert a.status()["state_reason"] == "health check scratch exited with status 1: 3 MB free"
    a.set_hold("health", None)
    assert a.state is AgentState.ONLINE


def test_status_shape_without_checks(tmp_path: Path) -> None:
    status: dict[str, Any] = agent(tmp_path).status()
    assert status["health"] is None and status["state_reason"] is None
