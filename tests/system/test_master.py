"""The agent under a real systemd talking to a test master on the host.

The container shares the host's network namespace, so the agent reaches the test master at
127.0.0.1 (the test master allows loopback agents; PyFarm's does when configured to). The
master is configured through a conf.d drop-in and `systemctl restart farmnode`; time is
compressed through the config (reannounce every 2 s instead of 120 s, retries from 0.1 s).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from container import Container

from tests.master_stub import MasterStub, Request
from tests.system.conftest import assign_wait, assignment, farmnode

DROPIN = "/etc/farmnode/conf.d/50-test-master.yaml"
REANNOUNCE = 2.0
OUTAGE = 10.0  # ten minutes at 60x


def _configure(ct: Container, master: MasterStub | None) -> None:
    if master is None:
        ct.run(["rm", "-f", DROPIN])
    else:
        ct.run(["tee", DROPIN], input=(
            f"master: {master.address}\n"
            f"agent_master_reannounce: {REANNOUNCE}\n"
            "agent_http_retry_delay: 0.1\n"
            "agent_http_retry_max: 1\n"
            "agent_shutdown_timeout: 3\n"
            "agent_ram_check_interval: 0.5\n"
            "agent_time_offset: auto\n"
        ))
    ct.run(["systemctl", "restart", "farmnode.service"])


@pytest.fixture(scope="module")
def master(ct: Container) -> Iterator[MasterStub]:
    with MasterStub() as m:
        _configure(ct, m)
        yield m
        _configure(ct, None)


def status(ct: Container) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(farmnode(ct, "--json", "status").stdout)
    return out


def per_task(master: MasterStub, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    return {t: [r.body for r in master.requests if r.task_id == t and r.status == 200]
            for t in task_ids}


def states(bodies: list[dict[str, Any]]) -> list[str]:
    return [b["state"] for b in bodies if "state" in b]


def test_announce_and_periodic_reannounce(ct: Container, master: MasterStub) -> None:
    (announce,) = master.wait_count("announce", 1)
    st = status(ct)
    body = announce.body
    assert body["id"] == st["agent_id"]
    assert body["hostname"].startswith("farmnode-test")
    assert body["os_class"] == "linux" and "Debian GNU/Linux 12" in body["os_fullname"]
    assert body["cpus"] >= 1 and body["ram"] >= 16 and 0 <= body["free_ram"] <= body["ram"]
    assert body["port"] == 50000 and isinstance(body["time_offset"], int)
    assert body["disks"] and all(d["size"] >= d["free"] for d in body["disks"])
    assert announce.user_agent == "PyFarm/1.0 (agent)"
    assert master.agents[body["id"]]["remote_ip"] == "127.0.0.1"
    # the id is the machine-id derived one (systemd's app-specific derivation)
    derived = ct.run(["systemd-id128", "machine-id", "-u",
                      "--app-specific=585c1b918cfc4fe2829a54f1b81f1728"]).stdout.strip()
    assert body["id"] == derived
    # then a reannounce each time the master has not heard from us for REANNOUNCE seconds
    first, second = master.wait_count("reannounce", 2, timeout=20)
    assert second.at - first.at >= REANNOUNCE * 0.9
    assert set(first.body) == {"state", "free_ram", "current_assignments", "disks"}
    link = status(ct)["master_link"]
    assert link["announced"] and link["last_contact"] and link["queued_reports"] == 0
    assert link["master"] == f"http://{master.address}/api/v1"


def test_job_reports_reach_the_master_once_in_order(ct: Container, master: MasterStub) -> None:
    a = assignment("fakerender", {"duration": 0.3, "lines": 4}, [1, 2, 3])
    ids = [t["id"] for t in a["tasks"]]
    result = assign_wait(ct, a)
    assert [t["state"] for t in result["tasks"]] == ["done"] * 3
    master.wait_for(lambda rs: all(any(r.task_id == t and r.body.get("state") == "done"
                                       for r in rs) for t in ids), 20, "every done")
    for tid, bodies in per_task(master, ids).items():
        assert states(bodies) == ["running", "done"], (tid, bodies)
        assert bodies[0] == {"state": "running", "time_started": "now"}
        progress = [b["progress"] for b in bodies if "progress" in b]
        assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
        assert master.tasks[tid].state == "done"
    # the assignment was announced while it ran (forced reannounce on start)
    assert any(r.kind == "reannounce" and result["id"] in r.body["current_assignments"]
               for r in master.requests)
    assert status(ct)["master_link"]["queued_reports"] == 0


def test_4xx_is_not_retried(ct: Container, master: MasterStub) -> None:
    a = assignment("fakerender", {"duration": 0.1, "lines": 1}, [1])
    (tid,) = [t["id"] for t in a["tasks"]]

    def refuse(req: Request) -> tuple[int, Any] | None:
        return (404, {"error": "Task not found"}) if req.task_id == tid else None

    master.override = refuse
    try:
        assign_wait(ct, a)
        master.wait_for(lambda rs: any(r.task_id == tid and r.body.get("state") == "done"
                                       for r in rs), 20, "the done report")
        # a reannounce after it shows the agent has moved on without retrying
        n = len(master.requests)
        master.wait_for(lambda rs: any(r.kind == "reannounce" for r in rs[n:]), 20,
                        "a later reannounce")
    finally:
        master.override = None
    sent = [r for r in master.requests if r.task_id == tid]
    assert [r.body.get("state") for r in sent if "state" in r.body] == ["running", "done"]
    assert all(r.status == 404 for r in sent)
    link = status(ct)["master_link"]
    assert link["queued_reports"] == 0 and "Task not found" in link["last_error"]


def test_outage_with_agent_restart_loses_nothing(ct: Container, master: MasterStub) -> None:
    """The master vanishes for ten minutes, compressed 60x like every interval here (the
    reannounce period is 2 s for PyFarm's 120 s): 10 s. A job runs and the agent restarts
    inside the outage; when the master is back every report arrives once, in order.
    """
    master.vanish()
    gone = time.monotonic()
    a = assignment("fakerender", {"duration": 0.3, "lines": 3}, [1, 2, 3, 4])
    ids = [t["id"] for t in a["tasks"]]
    result = assign_wait(ct, a)
    assert [t["state"] for t in result["tasks"]] == ["done"] * 4
    link = status(ct)["master_link"]
    queued = link["queued_reports"]
    assert queued >= 8 and "Connection refused" in (link["last_error"] or ""), link
    ct.run(["systemctl", "restart", "farmnode.service"])
    after = status(ct)["master_link"]
    assert after["queued_reports"] == queued and not after["announced"]
    # the rest of the ten (compressed) minutes: the agent keeps retrying meanwhile
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - gone)))
    retries = status(ct)["master_link"]["requests"]
    n = len(master.requests)
    master.reappear()
    master.wait_for(lambda rs: all(any(r.task_id == t and r.body.get("state") == "done"
                                       for r in rs[n:]) for t in ids), 30, "every report")
    for tid, bodies in per_task(master, ids).items():
        assert states(bodies) == ["running", "done"], (tid, bodies)
        assert len([b for b in bodies if "progress" in b]) <= 1  # only the latest survives
    # the restarted agent announced before reporting
    kinds = [r.kind for r in master.requests[n:]]
    assert kinds[0] == "announce" and kinds.index("announce") < kinds.index("task")
    master.wait_for(lambda rs: status(ct)["master_link"]["queued_reports"] == 0, 10,
                    "an empty outbox")
    print(f"\noutage: {queued} reports queued across the restart; {retries} attempts by the "
          f"restarted agent in the rest of the outage; after it: "
          f"{len([r for r in master.requests[n:] if r.kind == 'task'])} task requests for "
          f"{queued} reports, {len(master.requests[n:])} requests in all")


def test_offline_at_stop(ct: Container, master: MasterStub) -> None:
    master.wait_count("announce", 1)
    n = len(master.requests)
    ct.run(["systemctl", "stop", "farmnode.service"])
    offline = [r for r in master.requests[n:] if r.kind == "offline"]
    assert len(offline) == 1 and offline[0].status == 200
    assert offline[0].body["state"] == "offline"
    assert master.agents[offline[0].agent_id or ""]["state"] == "offline"
    # a restart (tasks keep running) is not a stop: no offline
    ct.run(["systemctl", "start", "farmnode.service"])
    master.wait_for(lambda rs: any(r.kind == "announce" for r in rs[n:]), 20, "the announce")
    m = len(master.requests)
    ct.run(["systemctl", "restart", "farmnode.service"])
    master.wait_for(lambda rs: any(r.kind == "announce" for r in rs[m:]), 20, "the announce")
    assert not [r for r in master.requests[m:] if r.kind == "offline"]


def test_master_polling_our_api_counts_as_contact(ct: Container, master: MasterStub) -> None:
    # PyFarm counts "last master contact" from requests carrying the master's User-Agent.
    master.vanish()  # our own requests to the master can no longer count as contact
    try:
        ct.sh("systemctl daemon-reload; systemctl start farmnode-api.socket")
        listen = ct.run(["systemctl", "show", "-P", "Listen", "farmnode-api.socket"]).stdout
        port = int(listen.split()[0].rsplit(":", 1)[1])
        before = status(ct)["master_link"]["last_contact"]
        ct.run(["python3", "-c",
                "import urllib.request as u; u.urlopen(u.Request("
                f"'http://127.0.0.1:{port}/api/v1/status', "
                "headers={'User-Agent': 'PyFarm/1.0 (master)'}), timeout=30).read()"])
        after = status(ct)["master_link"]["last_contact"]
        assert after is not None and after != before
    finally:
        ct.run(["systemctl", "stop", "farmnode-api.socket", "farmnode-api.service"], check=False)
        master.reappear()
