"""Warm per-job processes under a real systemd: one interpreter per job in its own scope,
reused by the job's assignments, its lines journaled as the tasks'; death, cancel, restart."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from container import Container

from tests.system.conftest import agent_pid, agent_ready, assign_wait, assignment, farmnode, journal

_jobs = itertools.count(970001)

SHOW = "import os; print('pid', os.getpid(), 'n', n, 'frame', int(frame))"


def _python(job: int, frames: list[int], commands: list[str], **data: Any) -> dict[str, Any]:
    return assignment("python", {"commands": commands, **data}, frames, id=job, user="jobuser")


def _messages(ct: Container, *match: str) -> list[str]:
    return [str(e["MESSAGE"]) for e in journal(ct, *match)]


def _pids_of(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("pid ")]


def _until(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def _gone(ct: Container, unit: str) -> bool:
    r = ct.run(["systemctl", "is-active", unit], check=False)
    return r.stdout.strip() in ("inactive", "failed", "")


def test_one_process_serves_the_jobs_assignments_and_its_lines_are_each_tasks(
        ct: Container) -> None:
    job = next(_jobs)
    unit = f"farmnode-warm-job{job}.scope"
    data = {"setup": ["import os\nn = 0\nprint('setup in', os.getpid())"],
            "teardown": ["print('teardown after', n, 'frames')"], "last_frame": 3}
    first = _python(job, [1], ["n += 1", SHOW], **data)
    rec = assign_wait(ct, first)["tasks"][0]
    assert rec["state"] == "done", rec
    (pid,) = _pids_of(_messages(ct, f"FARMNODE_TASK={first['tasks'][0]['id']}"))
    # Its own scope in farmnode.slice, named for the job, as the job's user.
    cgroup = ct.run(["cat", f"/proc/{pid}/cgroup"]).stdout
    assert f"/farmnode.slice/{unit}" in cgroup
    assert ct.run(["systemctl", "show", "-P", "Slice", unit]).stdout.strip() == "farmnode.slice"
    assert job and str(job) in ct.run(["systemctl", "show", "-P", "Description", unit]).stdout
    assert ct.run(["ps", "-o", "user=", "-p", str(pid)]).stdout.strip() == "jobuser"

    second = _python(job, [2], ["n += 1", SHOW, "1 / 0"], **data)
    rec = assign_wait(ct, second)["tasks"][0]
    task = second["tasks"][0]["id"]
    assert rec["state"] == "failed"
    assert rec["reason"] == "command 3 of frame 2 raised ZeroDivisionError: division by zero"
    entries = journal(ct, f"FARMNODE_TASK={task}")
    # The same process (n went on), and its lines are the task's: its scope, its fields.
    assert _pids_of([str(e["MESSAGE"]) for e in entries]) == [pid]
    assert f"pid {pid} n 2 frame 2" in [e["MESSAGE"] for e in entries]
    assert {e["_SYSTEMD_UNIT"] for e in entries} == {f"farmnode-task-{task}.scope"}
    assert {e["FARMNODE_JOB"] for e in entries} == {str(job)}
    stderr = [e["MESSAGE"] for e in entries if e["SYSLOG_IDENTIFIER"] == "farmnode-stderr"]
    assert stderr[0] == "Traceback (most recent call last):"
    assert "ZeroDivisionError: division by zero" in stderr
    logs = farmnode(ct, "logs", str(task)).stdout
    assert f"pid {pid} n 2 frame 2" in logs and "ZeroDivisionError" in logs
    assert "setup in" not in logs  # the setup ran once, for the first task
    assert _messages(ct, f"FARMNODE_TASK={first['tasks'][0]['id']}")[0] == f"setup in {pid}"

    # The job's last frame: the process leaves after it, with its teardown.
    last = _python(job, [3], ["n += 1", SHOW], **data)
    assert assign_wait(ct, last)["tasks"][0]["state"] == "done"
    _until("the warm scope to end", lambda: _gone(ct, unit))
    own = journal(ct, f"_SYSTEMD_UNIT={unit}")
    assert [e["MESSAGE"] for e in own] == ["teardown after 3 frames"]
    assert own[0]["FARMNODE_JOB"] == str(job) and own[0]["SYSLOG_IDENTIFIER"] == "farmnode-warm"


def test_death_mid_task_fails_it_with_the_reason_and_the_next_starts_fresh(
        ct: Container) -> None:
    job = next(_jobs)
    data = {"setup": ["n = 0"]}
    first = _python(job, [1], ["n += 1", SHOW], **data)
    assert assign_wait(ct, first)["tasks"][0]["state"] == "done"
    (pid,) = _pids_of(_messages(ct, f"FARMNODE_TASK={first['tasks'][0]['id']}"))
    dying = _python(job, [2], ["print('about to die', flush=True)",
                               "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    rec = assign_wait(ct, dying)["tasks"][0]
    assert rec["state"] == "failed"
    assert rec["reason"] == (f"the job's warm process (pid {pid}) died while running command 2 "
                             "of frame 2: killed by SIGKILL")
    assert "about to die" in _messages(ct, f"FARMNODE_TASK={dying['tasks'][0]['id']}")
    again = _python(job, [3], ["n += 1", SHOW], **data)
    assert assign_wait(ct, again)["tasks"][0]["state"] == "done"
    (fresh,) = _pids_of(_messages(ct, f"FARMNODE_TASK={again['tasks'][0]['id']}"))
    assert fresh != pid
    assert f"pid {fresh} n 1 frame 3" in _messages(ct, f"FARMNODE_TASK={again['tasks'][0]['id']}")


def test_cancel_stops_the_warm_process(ct: Container) -> None:
    job = next(_jobs)
    unit = f"farmnode-warm-job{job}.scope"
    a = _python(job, [1], ["import os; print('pid', os.getpid(), flush=True)",
                           "import time; time.sleep(300)"])
    task = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    (pid,) = _until("the task's first line",
                    lambda: _pids_of(_messages(ct, f"FARMNODE_TASK={task}")))
    assert farmnode(ct, "cancel", str(task)).returncode == 0
    farmnode(ct, "wait", aid, check=False)
    (rec,) = [t for t in json.loads(farmnode(ct, "--json", "tasks").stdout) if t["id"] == task]
    assert rec["state"] == "cancelled"
    # The agent stops the warm scope once the cancelled run has concluded.
    _until("the warm scope to end", lambda: _gone(ct, unit))
    assert ct.run(["test", "-e", f"/proc/{pid}"], check=False).returncode != 0


def test_agent_restart_mid_task_loses_no_line_and_the_process_serves_on(
        ct: Container) -> None:
    job = next(_jobs)
    flag = f"/tmp/warm-go-{job}"
    wait_for_flag = (f"import os, time\nwhile not os.path.exists({flag!r}): time.sleep(0.05)")
    a = _python(job, [1], ["n = 1", SHOW.replace("'frame'", "'before restart, frame'"),
                           wait_for_flag, "print('after restart')"])
    task = a["tasks"][0]["id"]
    aid = farmnode(ct, "assign", "-", input=json.dumps(a)).stdout.strip()
    (pid,) = _until("the task's first line",
                    lambda: _pids_of(_messages(ct, f"FARMNODE_TASK={task}")))
    before = agent_pid(ct)
    ct.run(["systemctl", "restart", "farmnode.service"], timeout=60)
    agent_ready(ct, not_pid=before)
    ct.run(["touch", flag])
    farmnode(ct, "wait", aid, check=False)
    (rec,) = [t for t in json.loads(farmnode(ct, "--json", "tasks").stdout) if t["id"] == task]
    assert rec["state"] == "done", rec
    assert _messages(ct, f"FARMNODE_TASK={task}") == [
        f"pid {pid} n 1 before restart, frame 1", "after restart"]
    # The new agent finds the same process for the job's next assignment.
    b = _python(job, [2], ["n += 1", SHOW])
    assert assign_wait(ct, b)["tasks"][0]["state"] == "done"
    assert _messages(ct, f"FARMNODE_TASK={b['tasks'][0]['id']}") == [f"pid {pid} n 2 frame 2"]


def test_pyfarm_job_level_hooks_run_once_per_job_through_the_agent(ct: Container) -> None:
    from tests.test_warm import PYFARM_PERSISTENT

    job = next(_jobs)
    # Stored as a download from the master would be (no master here: the cache serves it).
    ct.run(["/opt/farmnode/bin/python", "-c",
            "import sys; from farmnode.jobtypes.remote import cache_store; cache_store("
            "'/var/cache/farmnode/jobtypes', 'persistent', 1, 'Persistent', sys.stdin.read())"],
           input=PYFARM_PERSISTENT)
    lines = []
    for frame in (1, 2):
        a = assignment("persistent", {}, [frame], id=job, user="jobuser")
        rec = assign_wait(ct, a)["tasks"][0]
        assert rec["state"] == "done", rec
        lines.append(_messages(ct, f"FARMNODE_TASK={a['tasks'][0]['id']}"))
    # prepare_for_job ran once, in the warm process, for the first assignment; both saw its
    # data and the same persistent process, which runs in the warm scope as the job's user.
    assert lines[0][0].startswith(f"prepare_for_job {job} ")
    assert not any(line.startswith("prepare_for_job") for line in lines[1])
    data = [line for task in lines for line in task if line.startswith("data ")]
    assert len(data) == 2 and data[0] == data[1] and data[0].startswith("data loaded once")
    server = data[0].split()[-1]
    assert f"farmnode-warm-job{job}.scope" in ct.run(["cat", f"/proc/{server}/cgroup"]).stdout
    assert ct.run(["ps", "-o", "user=", "-p", server]).stdout.strip() == "jobuser"
