"""PyFarm job types stored on the real PyFarm 0.8.6 master run on farmnode unchanged.

The master (tools/pyfarm_master.py: PyFarm master, its celery scheduler and redis, from PyPI)
gets the job types and jobs through its own REST API, exactly as a PyFarm user would create
them; its scheduler assigns the tasks to the agent in the container, which downloads the job
type from the master (on by default), runs it in the task's scope, and reports back. What
counts is what the master's own task rows say: state, progress and last_error.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from container import Container

from tests.system.pyfarm_sources import PYFARM_PY2, PYFARM_RAISES, PYFARM_RENDER

DROPIN = "/etc/farmnode/conf.d/50-real-master.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_master(ct: Container) -> Iterator[Any]:
    from pyfarm_master import running_master

    with running_master() as m:
        port = _free_port()
        ct.run(["tee", DROPIN], input=(
            f"master: 127.0.0.1:{m.port}\n"
            f"agent_api_port: {port}\n"
            "task_default_user: jobuser\n"
            "agent_http_retry_delay: 0.1\n"
        ))
        ct.sh("systemctl daemon-reload; systemctl restart farmnode.service; "
              "systemctl restart farmnode-api.socket")
        try:
            def online() -> bool:
                # the list holds a summary of each agent; its own record has the state
                return any(m.get(f"/agents/{a['id']}").get("state") in ("online", "running")
                           for a in m.get("/agents/"))

            _await(online, 60, "the agent online", m)
            yield m
        finally:
            ct.run(["rm", "-f", DROPIN])
            ct.sh("systemctl stop farmnode-api.socket farmnode-api.service; "
                  "systemctl daemon-reload; systemctl restart farmnode.service", check=False)


def _await(ready: Any, timeout: float, what: str, m: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{m.logs_tail()}")
        time.sleep(0.2)


def _job(m: Any, name: str, classname: str, code: str, frames: int,
         data: dict[str, Any]) -> list[dict[str, Any]]:
    """Create the job type and a job of it (no retries); the job's tasks once all ended."""
    m.post("/jobtypes/", {"name": name, "classname": classname, "code": code,
                          "description": "a PyFarm job type, unchanged", "max_batch": 1})
    job = m.post("/jobs/", {"title": f"{name} job", "jobtype": name, "start": 1,
                            "end": frames, "by": 1, "data": data, "requeue": 0})

    def ended() -> list[dict[str, Any]] | None:
        tasks: list[dict[str, Any]] = m.get(f"/jobs/{job['id']}/tasks/")
        return tasks if tasks and all(t["state"] in ("done", "failed") for t in tasks) \
            else None

    tasks: list[dict[str, Any]] = _await(ended, 120, f"the tasks of {name}", m)
    return tasks


def test_pyfarm_jobtypes_on_the_real_master(ct: Container, real_master: Any) -> None:
    m = real_master
    tasks = _job(m, "ShellRender", "ShellRender", PYFARM_RENDER, 2, {})
    assert [t["state"] for t in tasks] == ["done", "done"], tasks
    # the job type's set_task_progress reached the master's task rows
    assert [t["progress"] for t in tasks] == [1.0, 1.0], tasks

    tasks = _job(m, "Legacy", "Legacy", PYFARM_PY2, 1, {})
    digest = hashlib.sha256(PYFARM_PY2.encode()).hexdigest()
    want = (f"job type 'Legacy' v1 is not valid Python 3: "
            f"/var/cache/farmnode/jobtypes/Legacy/1/{digest}.py, line 6: Missing parentheses "
            "in call to 'print'")
    assert [t["state"] for t in tasks] == ["failed"], tasks
    assert (tasks[0].get("last_error") or "").startswith(want), tasks

    tasks = _job(m, "Strict", "Strict", PYFARM_RAISES, 1, {"file": "x"})
    digest = hashlib.sha256(PYFARM_RAISES.encode()).hexdigest()
    want = ("job type 'Strict' v1: ValueError: job data needs 'scene', got ['file'] (in "
            f"get_command_data, /var/cache/farmnode/jobtypes/Strict/1/{digest}.py, line 6)")
    assert [(t["state"], t.get("last_error")) for t in tasks] == [("failed", want)], tasks
