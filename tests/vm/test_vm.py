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
