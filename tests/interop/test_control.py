"""What an admin does from PyFarm's master: pause or delete a running job, restart the agent."""

from __future__ import annotations

from typing import Any

from tests.interop.conftest import Farm, wait_for


def scope_state(farm: Farm, task_id: int) -> str:
    r = farm.node.run(["systemctl", "show", "-P", "ActiveState",
                       f"farmnode-task-{task_id}.scope"], check=False)
    return r.stdout.strip()


def running_task(farm: Farm, job_id: int) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        (t,) = farm.tasks(job_id)
        return t if t["state"] == "running" else None
    task: dict[str, Any] = wait_for("the task runs", running, interval=0.1, detail=farm.detail)
    wait_for("its scope is active", lambda: scope_state(farm, task["id"]) == "active",
             detail=farm.detail)
    return task


def long_job(farm: Farm) -> int:
    return farm.submit("command", 1, {"command": ["/bin/sleep", "600"]}, requeue=0)


def test_pause_stops_the_scope(farm: Farm) -> None:
    job_id = long_job(farm)
    task = running_task(farm, job_id)
    # The UI's "pause" button (PyFarm's REST API has none): the scheduler then calls the
    # agent's DELETE /api/v1/tasks/<id>.
    farm.master.ui_post(f"/jobs/{job_id}/pause")
    wait_for("the scope is gone", lambda: scope_state(farm, task["id"]) in ("inactive", ""),
             interval=0.1, detail=farm.detail)
    assert farm.job(job_id)["state"] == "paused"
    sched = farm.master.log("scheduler")
    assert "stop_task" in sched and "Unexpected return code" not in sched
    wait_for("the master no longer counts it running",
             lambda: farm.tasks(job_id)[0]["state"] != "running", detail=farm.detail)
    # The node is free again and stays registered.
    wait_for("the agent is online", lambda: farm.agent()["state"] == "online",
             detail=farm.detail)


def test_delete_stops_the_scope(farm: Farm) -> None:
    job_id = long_job(farm)
    task = running_task(farm, job_id)
    status, _ = farm.master.request("DELETE", f"/jobs/{job_id}")
    assert status == 204
    wait_for("the scope is gone", lambda: scope_state(farm, task["id"]) in ("inactive", ""),
             interval=0.1, detail=farm.detail)
    wait_for("the master deleted the job",
             lambda: farm.master.request("GET", f"/jobs/{job_id}")[0] == 404,
             detail=farm.detail)
    assert "Unexpected return code" not in farm.master.log("scheduler")
    wait_for("the agent is online", lambda: farm.agent()["state"] == "online",
             detail=farm.detail)


def agent_pid(farm: Farm) -> int:
    return int(farm.node.run(["systemctl", "show", "-P", "MainPID", "farmnode.service"]
                             ).stdout)


def test_restart_agent_from_the_master(farm: Farm) -> None:
    agent = farm.agent()
    before = agent_pid(farm)
    farm.master.ui_post(f"/agents/{agent['id']}/restart")
    wait_for("a new agent process", lambda: agent_pid(farm) not in (0, before),
             detail=farm.detail)
    wait_for("the master's restart request is cleared",
             lambda: farm.agent()["restart_requested"] is False, detail=farm.detail)
    assert "Unexpected return code" not in farm.master.log("scheduler")
    assert "not restarting" not in farm.master.log("scheduler")
    assert farm.agent()["state"] == "online"
    # And it still works.
    job_id = farm.submit("command", 1, {"command": ["/bin/true"]}, requeue=0)
    assert farm.wait_job(job_id)["state"] == "done"
