"""PyFarm's job-level hooks in the job's warm process: prepare_for_job, cleanup_after_job and
spawn_persistent_process, which PyFarm documented and never implemented.

A PyFarm job type whose source names one of them runs in the job's warm interpreter
(farmnode.warm; farmnode.jobtypes.remote decides): each of the job's assignments on this node
is run there by farmnode.jobtypes.remote_host, so class-level state lives from the job's first
assignment to its last. prepare_for_job runs before the first, its result is each instance's
``persistent_job_data``; spawn_persistent_process starts one process per job (in the warm
scope, as the job's user; its output is the task's being served); cleanup() at the warm
process's teardown calls cleanup_after_job and stops those processes.
"""

from __future__ import annotations

import subprocess
from typing import Any

active = False  # this interpreter is a job's warm process
loaded: dict[tuple[str, str], type] = {}  # (source path, class name): the class, loaded once
_prepared: dict[int, Any] = {}  # job id: the class whose prepare_for_job ran for it
_processes: dict[int, subprocess.Popen[bytes]] = {}
STOP_GRACE = 10.0


def prepare(cls: Any, assignment: dict[str, Any], label: str, path: str) -> None:
    from farmnode.jobtypes.remote_host import Failure, where

    job = int(assignment["job"]["id"])
    if job in cls.PERSISTENT_JOB_DATA:
        return
    try:
        cls.PERSISTENT_JOB_DATA[job] = cls.prepare_for_job(job)
    except Exception as exc:
        raise Failure(f"{label}: prepare_for_job({job}) raised {where(exc, path)}",
                      exc) from None
    _prepared[job] = cls


def spawn(job: int, argv: list[str], env: dict[str, str] | None,
          cwd: str | None) -> subprocess.Popen[bytes]:
    """The job's persistent process: the running one, or a new one (stdin a pipe for the job
    type's commands; stdout and stderr the warm process's own)."""
    if not active:
        raise NotImplementedError(
            "spawn_persistent_process runs only in the job's warm process (farmnode starts "
            "one for a job type whose source names it)")
    proc = _processes.get(job)
    if proc is not None and proc.poll() is None:
        return proc
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE)
    _processes[job] = proc
    return proc


def cleanup() -> None:
    """The warm process's teardown: cleanup_after_job for each job, then its processes."""
    for job, cls in list(_prepared.items()):
        try:
            cls.cleanup_after_job(cls.PERSISTENT_JOB_DATA.pop(job, None))
        finally:
            _prepared.pop(job, None)
    for job, proc in list(_processes.items()):
        if proc.poll() is None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _processes.pop(job, None)
