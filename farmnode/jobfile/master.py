"""Submitting a job file to a PyFarm master: one `POST /jobs/` per job, dependencies as
`parents`, so the master stores the graph and its scheduler spreads the frames over the farm.

Owns the job body PyFarm's 0.8.6 master accepts (it refuses unknown fields) and the order
of the calls: a job is created after the jobs it depends on, whose master ids become its
`parents`. Every job type is asked for first, so a file naming one the master lacks is
refused with its line before anything is created.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from farmnode.jobfile.model import JobFile, JobSpec
from farmnode.jobfile.parse import JobFileError
from farmnode.master.http import Response

log = logging.getLogger(__name__)

Request = Callable[[str, str, Any], Awaitable[Response]]


class MasterRefused(Exception):
    """The master refused or could not be reached; `created` says what it holds already."""

    def __init__(self, message: str, created: dict[str, int]) -> None:
        super().__init__(message)
        self.created = created


@dataclass(frozen=True)
class Submitted:
    created: dict[str, int]  # the file's job id -> the master's job id


def job_body(spec: JobSpec, parents: list[int]) -> dict[str, Any]:
    """The master's job from a job file's job (PyFarm's names: environ, parents as ids)."""
    body: dict[str, Any] = {
        "title": spec.title or spec.id, "jobtype": spec.jobtype,
        "jobtype_version": spec.jobtype_version, "start": spec.frames.start,
        "end": spec.frames.end, "by": spec.frames.by, "batch": spec.frames.batch,
        "data": spec.data,
    }
    for key, value in (("ram", spec.ram), ("ram_max", spec.ram_max), ("user", spec.user)):
        if value is not None:
            body[key] = value
    if spec.cpus is not None:
        # The master's column is an integer; a fraction of a CPU is a node-side limit only.
        body["cpus"] = max(1, round(spec.cpus))
    if spec.environment:
        body["environ"] = spec.environment
    if parents:
        body["parents"] = [{"id": p} for p in parents]
    return body


async def submit(jobfile: JobFile, request: Request) -> Submitted:
    """Create the file's jobs on the master; raises JobFileError for a job type it lacks and
    MasterRefused (with what was created) when it refuses a job or cannot be reached."""
    for spec in jobfile.jobs:
        path = f"/jobtypes/{urllib.parse.quote(spec.jobtype, safe='')}/versions/" \
               f"{spec.jobtype_version}"
        r = await _call(request, "GET", path, None, {})
        if r.status == 404:
            raise JobFileError(jobfile.name, spec.line, f"job {spec.id!r}: jobtype",
                               f"the master has no job type {spec.jobtype!r} version "
                               f"{spec.jobtype_version}")
        if not r.ok:
            raise MasterRefused(f"the master did not answer for job type {spec.jobtype!r}: "
                                f"{r.error_text()}", {})
    created: dict[str, int] = {}
    for spec in jobfile.jobs:
        body = job_body(spec, [created[d] for d in spec.dependencies])
        r = await _call(request, "POST", "/jobs/", body, created)
        if not r.ok or not isinstance(r.body, dict) or not isinstance(r.body.get("id"), int):
            raise MasterRefused(f"{jobfile.name}:{spec.line}: the master refused job "
                                f"{spec.id!r}: {r.error_text()}", created)
        created[spec.id] = r.body["id"]
        log.info("job file %s: job %r is the master's job %d%s", jobfile.name, spec.id,
                 created[spec.id], f" (parents {body['parents']})" if "parents" in body
                 else "")
    return Submitted(created)


async def _call(request: Request, method: str, path: str, body: Any,
                created: dict[str, int]) -> Response:
    from farmnode.master.http import TransportError

    try:
        return await request(method, path, body)
    except TransportError as exc:
        raise MasterRefused(f"the master is not reachable ({exc})", created) from None
