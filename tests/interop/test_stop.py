"""`systemctl stop farmnode` with a task running: the master hears `offline` first and
never hands the task back to the stopping node."""

from __future__ import annotations

import re

from tests.interop.conftest import Farm, wait_for
from tests.interop.test_control import long_job, running_task


def test_stop_says_offline_before_the_task_state(farm: Farm) -> None:
    job_id = long_job(farm)
    task = running_task(farm, job_id)
    agent_id = farm.agent()["id"]
    mark = len(farm.master.log("master"))
    farm.node.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    log = farm.master.log("master")[mark:]
    offline = re.search(rf"Updated agent UUID\('{agent_id}'\): \{{[^}}]*u'state': "
                        r"u'offline'", log)
    assert offline, log[-3000:]
    task_post = log.find(f"POST /api/v1/jobs/{job_id}/tasks/{task['id']} ")
    assert task_post == -1 or task_post > offline.start(), log[-3000:]
    assert farm.agent()["state"] == "offline"
    # Nothing was sent to the stopping node after the first assignment.
    sched = farm.master.log("scheduler")
    assert len(re.findall(rf"Assigned agent \S+ \(id {agent_id}\) to task {task['id']} ",
                          sched)) == 1, sched[-3000:]
    wait_for("the master no longer counts the task running on us",
             lambda: farm.tasks(job_id)[0]["state"] != "running", detail=farm.detail)
    (t,) = farm.tasks(job_id)
    assert t["agent_id"] is None or t["state"] != "running", t
    assert farm.node.run(["systemctl", "show", "-P", "ActiveState",
                          f"farmnode-task-{task['id']}.scope"]).stdout.strip() in ("inactive",
                                                                                   "")
