"""Task logs: each attempt's CSV registered, uploaded, marked done and served by PyFarm's
own master; an outage of the master delays the upload and loses nothing."""

from __future__ import annotations

import csv
import io
import sqlite3
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.interop.conftest import Farm, wait_for

# How the master's database stores WorkState.DONE (pyfarm.core.enums: DONE=Values(106, ...)).
DB_DONE = 106
SCRIPT = "echo out-one; echo err-one >&2; sleep {sleep}; echo out-two; echo err-two >&2"


def attempt_logs(farm: Farm, job_id: int, task_id: int, attempt: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = farm.master.get(
        f"/jobs/{job_id}/tasks/{task_id}/attempts/{attempt}/logs/")
    return got


def log_states(farm: Farm, task_id: int) -> dict[str, Any]:
    """identifier -> the association's state as the master stored it (PyFarm's REST API
    does not show it; its database does)."""
    db = sqlite3.connect(f"file:{farm.master.state / 'pyfarm.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT l.identifier, a.state FROM task_log_associations a "
            "JOIN task_logs l ON l.id = a.task_log_id WHERE a.task_id = ?", (task_id,)).fetchall()
    finally:
        db.close()
    return dict(rows)


def served(farm: Farm, job_id: int, task_id: int, attempt: int, identifier: str) -> bytes:
    url = (f"{farm.master.api}/jobs/{job_id}/tasks/{task_id}/attempts/{attempt}/logs/"
           f"{identifier}/logfile")
    with urllib.request.urlopen(url, timeout=30) as resp:
        body: bytes = resp.read()
    return body


def check_csv(raw: bytes, stdout: list[str], stderr: list[str]) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(raw.decode())))
    assert rows, "empty log"
    for n, row in enumerate(rows, 1):
        assert len(row) == 5, row
        ts, pid, stream, lineno, _message = row
        datetime.fromisoformat(ts)
        assert pid == "None" or pid.isdigit(), row
        assert stream in ("internal", "0", "1"), row
        assert int(lineno) == n, row
    assert [r[4] for r in rows if r[2] == "0"] == stdout
    assert [r[4] for r in rows if r[2] == "1"] == stderr
    internal = " | ".join(r[4] for r in rows if r[2] == "internal")
    for said in ("Command:", "Work Dir:", "Environment:", "terminated successfully, code 0"):
        assert said in internal, internal
    return rows


def the_log(farm: Farm, job_id: int, task_id: int) -> str:
    (entry,) = wait_for("the attempt's log is registered",
                        lambda: attempt_logs(farm, job_id, task_id, 1), detail=farm.detail)
    assert entry["agent_id"] == farm.agent()["id"]
    identifier: str = entry["identifier"]
    return identifier


def test_attempt_log_uploaded_marked_done_and_served(farm: Farm) -> None:
    job_id = farm.submit("command", 1, {"command": ["/bin/sh", "-c", SCRIPT.format(sleep=0)]},
                         requeue=0)
    assert farm.wait_job(job_id)["state"] == "done"
    (task,) = farm.tasks(job_id)
    identifier = the_log(farm, job_id, task["id"])
    stored = Path(farm.master.state / "task_logs" / identifier)
    wait_for("the log is marked done",
             lambda: stored.exists() and log_states(farm, task["id"]).get(identifier) == DB_DONE,
             detail=farm.detail)
    raw = served(farm, job_id, task["id"], 1, identifier)
    assert raw == stored.read_bytes()
    check_csv(raw, ["out-one", "out-two"], ["err-one", "err-two"])


def test_master_outage_delays_the_upload_and_loses_nothing(farm: Farm) -> None:
    job_id = farm.submit("command", 1, {"command": ["/bin/sh", "-c", SCRIPT.format(sleep=10)]},
                         requeue=0)
    wait_for("the task runs", lambda: farm.tasks(job_id)[0]["state"] == "running",
             interval=0.1, detail=farm.detail)
    (task,) = farm.tasks(job_id)
    identifier = the_log(farm, job_id, task["id"])
    farm.master.stop()
    # The task ends while the master is away: its reports and its log wait in the outbox.
    wait_for("the task ends on the node",
             lambda: any(t["id"] == task["id"] and t["state"] == "done"
                         for t in farm.node_tasks()),
             timeout=60, interval=0.2, detail=farm.detail)
    assert farm.status()["master_link"]["queued_reports"] > 0
    stored = Path(farm.master.state / "task_logs" / identifier)
    assert not stored.exists()
    # The master first, its scheduler only once the agent has caught up: a scheduler poll
    # in between would find the task gone from the node and send it again (PyFarm's own
    # recovery), which says nothing about the outbox.
    farm.master.start_master()
    wait_for("the outbox is delivered",
             lambda: farm.status()["master_link"]["queued_reports"] == 0,
             timeout=60, interval=0.2, detail=farm.detail)
    farm.master.start_scheduler()
    assert farm.wait_job(job_id)["state"] == "done"
    (task,) = farm.tasks(job_id)
    assert (task["state"], task["attempts"], task["failures"]) == ("done", 1, 0)
    raw = served(farm, job_id, task["id"], 1, identifier)
    assert raw == stored.read_bytes()
    check_csv(raw, ["out-one", "out-two"], ["err-one", "err-two"])
    assert log_states(farm, task["id"])[identifier] == DB_DONE
