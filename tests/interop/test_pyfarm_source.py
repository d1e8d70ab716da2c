"""Job types stored on the real master as PyFarm source, created through its REST API as an
admin would: a PyFarm job type runs its tasks on farmnode to `done`; Python 2 only source
fails each task with the file and line as the master's `last_error`."""

from __future__ import annotations

import time

from tests.interop.conftest import Farm

HELLO = (
    "from pyfarm.jobtypes.core.jobtype import JobType\n\n"
    "class {cls}(JobType):\n"
    "    def get_command_data(self):\n"
    "        frame = int(self.assignment['tasks'][0]['frame'])\n"
    "        return self.COMMAND_DATA('/bin/sh', '-c', 'echo frame %d' % frame)\n"
)

PY2 = (
    "from pyfarm.jobtypes.core.jobtype import JobType\n\n"
    "class {cls}(JobType):\n"
    "    def get_command_data(self):\n"
    "        print \"x\"\n"
)


def _store(farm: Farm, code: str) -> str:
    # A fresh name each run: the master keeps job types, and farmnode caches by name+version.
    name = f"Src{int(time.time() * 1000)}"
    farm.master.post("/jobtypes/", {"name": name, "classname": name, "max_batch": 1,
                                    "description": "farmnode interop",
                                    "code": code.format(cls=name)})
    return name


def test_pyfarm_jobtype_from_the_master_runs_to_done(farm: Farm) -> None:
    name = _store(farm, HELLO)
    job_id = farm.submit(name, 3, {}, requeue=0)
    job = farm.wait_job(job_id)
    tasks = farm.tasks(job_id)
    assert job["state"] == "done", (tasks, farm.detail())
    assert [t["state"] for t in tasks] == ["done"] * 3, tasks


def test_python2_jobtype_fails_with_file_and_line(farm: Farm) -> None:
    name = _store(farm, PY2)
    job_id = farm.submit(name, 1, {}, requeue=0)
    job = farm.wait_job(job_id)
    assert job["state"] == "failed"
    (t,) = farm.tasks(job_id)
    assert t["state"] == "failed", t
    err = t["last_error"]
    assert err and "line 5" in err and ".py" in err and "print" in err and "Python 3" in err, t
