"""A stopped node, as PyFarm's master sees it: nothing listens on its port, so the master's
poll takes its "cannot contact the agent" path (no error, no traceback) and the scheduler
hands it nothing."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.interop.conftest import Farm, wait_for

# The scheduler's own pass and its celery bookkeeping line for each one that ran.
ASSIGN_PASS = re.compile(r"Task pyfarm\.scheduler\.tasks\.assign_tasks\[[^]]+\] succeeded")
# Where one record of the celery log begins (colour codes and all); a traceback belongs to
# the record above it.
RECORD = re.compile(r"\n(?=(?:\x1b\[[0-9;]*m)?\[\d{4}-\d\d-\d\d )")
# The master's agents API queues assign_tasks_to_agent after every agent update, the
# `offline` PyFarm's own agent sends when it stops included, and that task raises for an
# offline agent: the master's own traceback, not the poll's.
MASTERS_OWN = re.compile(r"Task pyfarm\.scheduler\.tasks\.assign_tasks_to_agent\[[^]]+\] "
                         r"raised unexpected: ValueError\(u'Agent \S+ \(id [-0-9a-f]+\) is "
                         r"offline'")


def tracebacks(log: str) -> list[str]:
    """The scheduler's records with a traceback, but for the master's own one above."""
    return [r for r in RECORD.split(log) if "Traceback" in r and not MASTERS_OWN.search(r)]


def test_a_stopped_node_is_unreachable_and_gets_no_task(
        farm_factory: Callable[..., Farm]) -> None:
    # The master polls offline agents every 2 h by default; a test cannot wait that long.
    farm = farm_factory(master_env={"PYFARM_POLL_OFFLINE_AGENTS_INTERVAL": "1"})
    wait_for("the agent is online", lambda: farm.agent()["state"] == "online",
             detail=farm.detail)
    agent_id = farm.agent()["id"]
    mark = len(farm.master.log("scheduler"))
    farm.node.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    # The port closes with the agent: the socket unit does not outlive it.
    assert farm.node.run(["systemctl", "is-active", "farmnode-api.socket"],
                         check=False).stdout.strip() != "active"

    def sched() -> str:
        return farm.master.log("scheduler")[mark:]

    cannot_contact = re.compile(r"Caught ConnectionError trying to contact agent \S+ "
                                rf"\(id {agent_id}\)")
    wait_for("the master's poll cannot contact the agent",
             lambda: cannot_contact.search(sched()), timeout=60, detail=farm.detail)
    log = sched()
    assert not tracebacks(log), tracebacks(log)
    assert not re.search(r"poll_agent\[[^]]+\] raised", log), log[-4000:]
    assert "Unexpected return code on checking" not in log, log[-4000:]
    assert farm.agent()["state"] == "offline"

    # A job submitted now is not given to the stopped node, over several scheduler passes.
    job_id = farm.submit("command", 1, {"command": ["/bin/true"]}, requeue=0)
    (task,) = farm.tasks(job_id)
    after = len(farm.master.log("scheduler"))
    wait_for("three scheduler passes", lambda: len(ASSIGN_PASS.findall(
        farm.master.log("scheduler")[after:])) >= 3, timeout=60, detail=farm.detail)
    (t,) = farm.tasks(job_id)
    assert t["state"] == "queued" and t["agent_id"] is None, t
    assigned = re.compile(rf"Assigned agent \S+ \(id {agent_id}\) to task {task['id']} ")
    assert not assigned.search(farm.master.log("scheduler")), sched()[-4000:]
    assert not tracebacks(sched()), tracebacks(sched())

    # The same job goes to the node as soon as it runs again: only its being stopped kept
    # the task from it.
    farm.start_agent()
    job = farm.wait_job(job_id)
    assert job["state"] == "done", farm.detail()
    (t,) = farm.tasks(job_id)
    assert t["agent_id"] == agent_id, t
