"""PyFarm's agent → master bodies, built from host facts, agent state and outbox rows.

Pure functions: the sync loop decides when; this module decides what the wire says. A PyFarm
master refuses unknown keys in an agent body (it validates against its Agent model), so
everything sent here is one of the 0.8.6 model's columns or relationships (`gpus` and
`mac_addresses` are relationships it fills itself), or `id`, `current_assignments`,
`farm_name`. Facts it has no place for (disks) stay in our own status (GetStatus).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from farmnode.sysinfo import HostFacts
from farmnode.tasks.model import Assignment
from farmnode.tasks.schema import assignment_to_json
from farmnode.tasks.store import Report

# The master's Agent model: cpus 1..256, ram 16..262144 MB, port 1024..65535.
MAX_CPUS = 256
MIN_RAM, MAX_RAM = 16, 262144


def announce_body(*, agent_id: str, facts: HostFacts, version: str, port: int, state: str,
                  ram: int, cpus: float, free_ram: int, time_offset: int,
                  current_assignments: dict[str, Any], remote_ip: str | None,
                  farm_name: str | None, hostname: str | None = None) -> dict[str, Any]:
    """`POST /agents/`: everything the master keeps about the node."""
    body: dict[str, Any] = {
        "id": agent_id,
        "hostname": hostname or facts.hostname,
        "version": version,
        "os_class": facts.os_class,
        "os_fullname": facts.os_fullname,
        # Out-of-range values make the master answer 400 and the node would never register:
        # clamp (a 512 GB node is announced as 256 GB) rather than be invisible.
        "ram": max(MIN_RAM, min(MAX_RAM, int(ram))),
        "cpus": max(1, min(MAX_CPUS, round(cpus))),
        "cpu_name": facts.cpu_name,
        "port": port,
        "free_ram": max(0, min(MAX_RAM, int(free_ram))),
        "time_offset": int(time_offset),
        "state": state,
        "mac_addresses": list(facts.mac_addresses),
        "current_assignments": current_assignments,
        "gpus": [g.fullname for g in facts.gpus],
    }
    if remote_ip:
        body["remote_ip"] = remote_ip
    if farm_name:
        body["farm_name"] = farm_name
    return body


def reannounce_body(*, state: str, free_ram: int, current_assignments: dict[str, Any],
                    ) -> dict[str, Any]:
    """`POST /agents/<id>`: what changes. (PyFarm 0.8.7's agent added disks here; the 0.8.6
    master refuses the whole body for that field.)"""
    return {"state": state, "free_ram": max(0, min(MAX_RAM, int(free_ram))),
            "current_assignments": current_assignments}


def offline_body(*, free_ram: int, current_assignments: dict[str, Any]) -> dict[str, Any]:
    return {"state": "offline", "free_ram": max(0, min(MAX_RAM, int(free_ram))),
            "current_assignments": current_assignments}


def assignment_json(a: Assignment, local_states: dict[int, str]) -> dict[str, Any]:
    """One `current_assignments` entry as PyFarm's agent kept it: the assignment plus its id
    and each task's local state. The master reads `tasks[].id` and fails every task it
    thinks is ours that is missing here."""
    body = assignment_to_json(a)
    body["id"] = a.id
    for task in body["tasks"]:
        if task["id"] in local_states:
            task["local_state"] = local_states[task["id"]]
    return body


@dataclass(frozen=True)
class Request:
    path: str
    body: dict[str, Any]
    # Answers other than 2xx that mean the master has what the request says (a log that is
    # already registered: 409).
    also_ok: frozenset[int] = frozenset()


@dataclass(frozen=True)
class LogUpload:
    """`PUT …/logs/<identifier>/logfile`: the CSV is read from the record when it is sent."""

    path: str
    assignment_id: str
    identifier: str


_LOG_ID = re.compile(r"[A-Za-z0-9._-]{1,255}")


def log_path(job_id: int, task_id: int, attempt: int, identifier: str | None = None) -> str:
    """PyFarm's per-attempt log URL (its collection when `identifier` is None)."""
    base = f"/jobs/{int(job_id)}/tasks/{int(task_id)}/attempts/{int(attempt)}/logs/"
    if identifier is None:
        return base
    if not _LOG_ID.fullmatch(identifier) or identifier in (".", ".."):
        raise ValueError(f"not a log identifier: {identifier[:80]!r}")
    return base + identifier


def log_request(report: Report, agent_id: str) -> Request | LogUpload | None:
    """The master request for a log row of the outbox (register, upload, state)."""
    if report.task_id is None or report.job_id is None:
        return None
    p = report.payload
    identifier, attempt = str(p["identifier"]), int(p["attempt"])
    if report.kind == "log_register":
        log_path(report.job_id, report.task_id, attempt, identifier)  # checks the identifier
        return Request(log_path(report.job_id, report.task_id, attempt),
                       {"identifier": identifier, "agent_id": agent_id},
                       also_ok=frozenset({409}))
    path = log_path(report.job_id, report.task_id, attempt, identifier)
    if report.kind == "log_upload":
        return LogUpload(path + "/logfile", str(p["assignment_id"]), identifier)
    if report.kind == "log_state":
        # The master's log association knows PyFarm's work states only; a task we stopped
        # goes back to the queue (as its task state says), which the master records as null.
        state = str(p["state"])
        return Request(path, {"state": "queued" if state == "cancelled" else state})
    return None


def report_request(report: Report, agent_id: str) -> Request | LogUpload | None:
    """The master request for an outbox row; None for a row the master has no call for.

    Task states map onto PyFarm's: running also sets the start time ("now" is all the master
    accepts), failed carries `last_error`, and a task we stopped without it failing
    (cancelled) goes back to the queue released from this agent, as PyFarm's stop() did.
    """
    if report.kind.startswith("log_"):
        return log_request(report, agent_id)
    if report.task_id is None or report.job_id is None:
        return None
    path = f"/jobs/{report.job_id}/tasks/{report.task_id}"
    p = report.payload
    if report.kind == "task_progress":
        return Request(path, {"progress": max(0.0, min(1.0, float(p["progress"])))})
    if report.kind != "task_state":
        return None
    state = p.get("state")
    if state == "running":
        return Request(path, {"state": "running", "time_started": "now"})
    if state == "done":
        return Request(path, {"state": "done"})
    if state == "failed":
        body: dict[str, Any] = {"state": "failed"}
        if p.get("reason"):
            body["last_error"] = str(p["reason"])
        return Request(path, body)
    if state in ("cancelled", "queued"):
        return Request(path, {"state": "queued", "agent_id": None})
    return None


def backoff(attempt: int, base: float, cap: float, rand: random.Random | None = None) -> float:
    """Delay before retry `attempt` (1, 2, ...): exponential from `base` (PyFarm's
    http_retry_delay), capped, with "equal jitter" — half fixed, half random — so a farm of
    nodes that lost the master together does not come back in lockstep."""
    r = rand or random
    ceiling = min(cap, base * (2 ** min(attempt - 1, 30)))
    return float(ceiling / 2 + r.random() * ceiling / 2)
