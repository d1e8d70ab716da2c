"""Job types stored on PyFarm's own master as PyFarm source, created through its REST API:
the node downloads them and runs them unchanged; source that is not Python 3 fails the
task with the file and line of the error as the master's last_error."""

from __future__ import annotations

import re

from tests.interop.conftest import Farm
from tests.interop.test_logs import attempt_logs, served

# Written the way PyFarm's documentation tells job type authors to write them.
HELLO = '''
from pyfarm.jobtypes.core.jobtype import JobType


class InteropHello(JobType):
    def get_command_data(self):
        data = self.assignment["job"]["data"]
        return self.COMMAND_DATA(
            "/bin/sh", "-c", 'echo "$GREETING from frame $FRAME"',
            env=dict(self.get_environment(), GREETING=data["greeting"],
                     FRAME=str(int(self.assignment["tasks"][0]["frame"]))))
'''

# Python 2 only, as PyFarm's own job types were.
PY2_LINE = '        print "building the command"'
PY2 = f'''
from pyfarm.jobtypes.core.jobtype import JobType


class InteropOld(JobType):
    def get_command_data(self):
{PY2_LINE}
        return self.COMMAND_DATA("/bin/true")
'''


def store_jobtype(farm: Farm, name: str, classname: str, code: str) -> None:
    """POST /api/v1/jobtypes/ as an admin's script would; the master keeps it as version 1."""
    created = farm.master.post("/jobtypes/", {
        "name": name, "classname": classname, "max_batch": 1,
        "description": "stored on the master by the interop tier", "code": code})
    assert created["name"] == name and created["version"] == 1, created
    stored = farm.master.get(f"/jobtypes/{name}/versions/1")
    assert stored["code"] == code, stored


def submit(farm: Farm, jobtype: str, frames: int, data: dict[str, str]) -> int:
    created = farm.master.post("/jobs/", {
        "title": f"interop {jobtype}", "jobtype": jobtype, "start": 1, "end": frames,
        "by": 1, "data": data, "requeue": 0})
    return int(created["id"])


def test_a_job_type_stored_on_the_master_runs(farm: Farm) -> None:
    store_jobtype(farm, "interophello", "InteropHello", HELLO)
    job_id = submit(farm, "interophello", 2, {"greeting": "hello from the master's job type"})
    job = farm.wait_job(job_id)
    tasks = farm.tasks(job_id)
    assert job["state"] == "done", (tasks, farm.detail())
    assert len(tasks) == 2
    for t in tasks:
        assert (t["state"], t["attempts"], t["failures"]) == ("done", 1, 0), t
        # The command the job type built ran, with the environment it set.
        (entry,) = attempt_logs(farm, job_id, t["id"], 1)
        raw = served(farm, job_id, t["id"], 1, entry["identifier"]).decode()
        assert f"hello from the master's job type from frame {int(t['frame'])}" in raw, raw
    # The node ran the master's source, not something of its own of the same name.
    assert "GET /api/v1/jobtypes/interophello/versions/1" in farm.master.log("master")


def test_python2_source_fails_with_file_and_line(farm: Farm) -> None:
    store_jobtype(farm, "interopold", "InteropOld", PY2)
    job_id = submit(farm, "interopold", 1, {})
    job = farm.wait_job(job_id)
    assert job["state"] == "failed", farm.detail()
    (t,) = farm.tasks(job_id)
    assert (t["state"], t["attempts"], t["failures"]) == ("failed", 1, 1), t
    error = t["last_error"]
    found = re.search(r"not valid Python 3: (/\S+\.py), line (\d+): ", error)
    assert found, error
    assert "interopold" in error and "Missing parentheses in call to 'print'" in error, error
    # The file named is the node's copy of the master's source, and the line named is the
    # Python 2 statement in it.
    path, line = found.group(1), int(found.group(2))
    assert line == PY2.split("\n").index(PY2_LINE) + 1, error
    shown = farm.node.run(["sed", "-n", f"{line}p", path]).stdout
    assert shown.rstrip("\n") == PY2_LINE, (path, shown)
