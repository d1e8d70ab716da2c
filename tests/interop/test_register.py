"""Registration and the master's polls, against PyFarm's own master."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from tests.interop.conftest import Farm, wait_for


def test_registers_within_a_second_with_host_facts(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(start=False)
    t0 = farm.start_agent()
    wait_for("the master lists the agent", farm.agents, timeout=10, interval=0.01,
             detail=farm.detail)
    took = time.monotonic() - t0
    print(f"\nregistered {took * 1000:.0f} ms after `systemctl start farmnode` was issued")
    # The requirement itself (a node is usable at once), not a speed figure.
    assert took <= 1.0, farm.detail()
    a = farm.agent()
    ct = farm.node
    assert a["hostname"] == ct.run(["hostname"]).stdout.strip()
    assert a["cpus"] == int(ct.run(["nproc", "--all"]).stdout)
    meminfo = ct.run(["cat", "/proc/meminfo"]).stdout
    total_kb = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M).group(1))  # type: ignore[union-attr]
    assert abs(a["ram"] - total_kb // 1024) <= 1
    assert 0 < a["free_ram"] <= a["ram"]
    assert a["os_class"] == "linux"
    assert "Debian GNU/Linux 12" in a["os_fullname"]
    assert a["port"] == farm.agent_port
    assert a["remote_ip"] == "127.0.0.1"
    assert a["version"] == ct.run(["dpkg-query", "-W", "-f", "${Version}", "farmnode"]
                                  ).stdout.split("-")[0]
    assert a["state"] == "online"
    assert a["id"] == farm.status()["master_link"]["agent_id"]


@pytest.mark.parametrize(("master_farm", "agent_farm"), [
    (None, None), ("interop-farm", "interop-farm"), ("interop-farm", None),
], ids=["unset-both", "set-matching", "set-on-master-only"])
def test_master_polls_succeed(farm_factory: Callable[..., Farm], master_farm: str | None,
                              agent_farm: str | None) -> None:
    """The scheduler polls an agent it has not heard from for a second (the tier's
    cadence): GET /status, then GET /tasks/, then it refreshes last_heard_from. The agent
    reannounces only every 120 s, so last_heard_from moving on is the polls succeeding."""
    farm = farm_factory(master_farm_name=master_farm, agent_farm_name=agent_farm)
    first = farm.agent()["last_heard_from"]
    seen = {first}

    def polled_twice() -> bool:
        seen.add(farm.agent()["last_heard_from"])
        return len(seen) >= 3

    wait_for("two successful polls", polled_twice, timeout=30, interval=0.2,
             detail=farm.detail)
    sched = farm.master.log("scheduler")
    assert sched.count(f"Polling agent {farm.agent()['hostname']}") >= 2
    assert "Wrong farm_name" not in sched
    assert not re.search(r"poll_agent\[[^]]*\] raised", sched), sched[-3000:]
    assert farm.agent()["state"] == "online"
    assert farm.status()["master_link"]["last_error"] is None


def test_farm_name_mismatch_is_refused(farm_factory: Callable[..., Farm]) -> None:
    farm = farm_factory(master_farm_name="farm-a", agent_farm_name="farm-b")
    wait_for("the refusal reaches the agent",
             lambda: "Wrong farm name" in (farm.status()["master_link"]["last_error"] or ""),
             timeout=15, interval=0.1, detail=farm.detail)
    assert farm.agents() == []
    assert farm.node.run(["systemctl", "is-active", "farmnode.service"]).stdout.strip() \
        == "active"
