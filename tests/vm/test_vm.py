"""VM tier: limits enforced by a real kernel with every cgroup v2 controller ([2]).

One boot runs every scenario of tests/vm/inside.py; these tests judge what it reported."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import vm

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.fail("the VM tier needs root and qemu-system-x86_64 (make setup installs it)")
    res, console = vm.run()
    for name, rec in res.items():
        print(f"{name}: {rec.get('duration_s')} s")
        if "error" in rec:
            print(rec["error"])
    assert res, console[-4000:]
    return res


def scenario(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    rec = results[name]
    assert "error" not in rec, rec["error"]
    return rec


def test_oom_kill_is_named_and_the_neighbour_finishes(results: dict[str, Any]) -> None:
    rec = scenario(results, "oom_kill")
    assert rec["hog"]["state"] == "failed" and rec["hog"]["reason"] == "oom-kill", rec["hog"]
    assert rec["hog"]["accounting"]["oom_kills"] >= 1
    assert rec["hog"]["accounting"]["memory_peak"] <= 100 * 1024 * 1024
    assert rec["calm"]["state"] == "done", rec["calm"]
    assert rec["agent_active"] == "active"
    print(f"OOM detection latency: {rec['detect_latency_s']} s")


def test_half_a_cpu_is_half_a_cpu(results: dict[str, Any]) -> None:
    rec = scenario(results, "cpu_half")
    assert rec["cpu_max"].startswith("50000 100000"), rec["cpu_max"]
    assert rec["task"]["state"] == "done"
    # The kernel's quota, measured: CPU time over wall time of an 8 s busy loop.
    assert 0.35 <= rec["ratio"] <= 0.6, rec


def test_fork_bomb_is_stopped_by_tasks_max(results: dict[str, Any]) -> None:
    rec = scenario(results, "fork_bomb")
    assert rec["refused_forks"] > 0, rec
    assert int(rec["pids_current_seen"]) <= 40, rec
    assert rec["agent_answered_during"] is True
    assert rec["task"]["state"] == "cancelled", rec["task"]
    assert rec["scope_after"] != "active"


def test_slice_reserve_holds(results: dict[str, Any]) -> None:
    rec = scenario(results, "slice_reserve")
    total = rec["mem_total_kb"] * 1024
    slice_max = int(rec["slice_memory_max"])
    assert int(rec["kernel_memory_max"]) == slice_max  # systemd wrote it to the cgroup
    assert abs((total - slice_max) - 1024 * 1024 * 1024) < 2 * 1024 * 1024
    # Together the two 600 MB tasks exceed the slice: the kernel killed at least one of them.
    states = [(t["state"], t["reason"]) for t in rec["tasks"]]
    assert ("failed", "oom-kill") in states, states
    assert rec["agent_active"] == "active"


def test_gpus_bound_per_task_by_the_kernel(results: dict[str, Any]) -> None:
    rec = scenario(results, "gpu_devices")
    journal = rec.pop("journal")  # the agent's and the first scope's lines, for a failure
    # detected from the (fake) PCI tree, no UUID without a driver: named by PCI address
    assert [(g["id"], g["devices"], g["assignment"]) for g in rec["status_gpus"]] == [
        ("0000:01:00.0", ["/dev/nvidia0"], None), ("0000:02:00.0", ["/dev/nvidia1"], None)]
    # without a scope's device policy both nodes open as far as the missing driver
    assert rec["unconfined"] == {"/dev/nvidia0": "ENXIO", "/dev/nvidia1": "ENXIO",
                                 "/dev/nvidiactl": "ENXIO"}
    assert rec["device_policy"] == "closed", journal
    assert "/dev/nvidia0 rw" in rec["device_allow"] and "/dev/nvidia1" not in rec["device_allow"]
    held = {g["id"]: g["assignment"] for g in rec["busy_gpus"]}
    assert held == {"0000:01:00.0": rec["first_id"], "0000:02:00.0": rec["second_id"]}
    first, second, none = rec["first"], rec["second"], rec["none"]
    # each task opens its own GPU and the driver's control node; the kernel refuses the other
    assert first["open"] == {"/dev/nvidia0": "ENXIO", "/dev/nvidia1": "EPERM",
                             "/dev/nvidiactl": "ENXIO", "/dev/null": "ok"}, first
    assert second["open"] == {"/dev/nvidia0": "EPERM", "/dev/nvidia1": "ENXIO",
                              "/dev/nvidiactl": "ENXIO", "/dev/null": "ok"}, second
    assert first["env"] == {"CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "0",
                            "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    # a task that asked for none opens none
    assert none["open"] == {"/dev/nvidia0": "EPERM", "/dev/nvidia1": "EPERM",
                            "/dev/nvidiactl": "EPERM", "/dev/null": "ok"}, none
    assert none["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert [r["state"] for r in rec["records"]] == ["done", "done", "done"], rec["records"]
    assert rec["first_task"]["gpus"] == ["0000:01:00.0"]
    # both GPUs taken: PyFarm's "try later" answer; more than the node has: invalid
    code, text = rec["busy_refusal"]
    assert code != 0 and "Not enough gpus: agent_gpus=0 requires_gpus=1" in text, text
    code, text = rec["never_refusal"]
    assert code != 0 and "job.data.gpus: asks for 3 GPUs; this node has 2" in text, text


def test_a_user_at_the_node_freezes_tasks_with_systemds_freezer(results: dict[str, Any]) -> None:
    rec = scenario(results, "workstation")
    # pure cgroup v2: systemd's own freezer did it, and its unit state says so
    assert rec["frozen_state"] == "frozen" and rec["thawed_state"] == "running", rec
    assert rec["status_state"] == "disabled", rec
    assert rec["state_reason"].startswith("a user is at the node: artist's session"), rec
    before, after, resumed = (int(n) for n in rec["counts"])
    assert before == after < resumed, rec["counts"]  # no progress while frozen
    assert rec["task"]["state"] == "done" and rec["task"]["exit_code"] == 0, rec["task"]
    assert rec["idle_to_thawed_s"] >= rec["idle_time"]
    print(f"workstation latencies (VM, TCG, systemd's FreezeUnit): login to frozen "
          f"{rec['login_to_frozen_s']:.3f} s, SetIdleHint(false) to frozen "
          f"{rec['active_to_frozen_s']:.3f} s, SetIdleHint(true) to thawed "
          f"{rec['idle_to_thawed_s']:.3f} s (idle time {rec['idle_time']:g} s), logout to "
          f"thawed {rec['logout_to_thawed_s']:.3f} s")
