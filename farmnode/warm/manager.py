"""The agent's side of warm processes: start a job's host in a scope of its own, or reuse the
one that runs; stop it after the job's last frame or a cancel.

The agent keeps no state of its own about them: a host is found by its socket
(<agent_runtime_dir>/warm/job-<id>/socket) and its unit (farmnode-warm-job<id>.scope), both
of which outlive an agent restart, and it leaves by itself when idle. A task reaches it
through its client, inside the task's scope, so a running task needs nothing of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farmnode.agent.accounts import Account
from farmnode.config import Config
from farmnode.systemd.journal import TaskLogFields, export_unit_settings, remove_unit_settings
from farmnode.systemd.pidwait import wait_pid
from farmnode.systemd.scope import ScopeError, ScopeLimits, ScopeManager, scope_properties
from farmnode.tasks.model import Assignment
from farmnode.warm import wire
from farmnode.warm.jobtype import WarmJobType, WarmProcess

log = logging.getLogger(__name__)

HOST_MODULE = "farmnode.warm.host"
REQUEST_TIMEOUT = 10.0  # seconds for a host to answer hold or stop
READY_TIMEOUT = 60.0  # seconds for a new host to say it listens
JOURNAL_SOCKET = "/run/systemd/journal/stdout"

_locks: dict[int, asyncio.Lock] = {}
_reapers: set[asyncio.Task[None]] = set()


class WarmError(Exception):
    """The job's warm process cannot serve the task: the task fails with this reason."""


@dataclass(frozen=True)
class WarmLogFields(TaskLogFields):
    """The warm scope's own lines (teardown, output while no task is served): the job's."""

    def fields(self) -> list[str]:
        out = [f"FARMNODE_JOB={self.job_id}"]
        if self.jobtype:
            out.append(f"FARMNODE_JOBTYPE={self.jobtype}")
        return out


def unit_name(job_id: int) -> str:
    return f"farmnode-warm-job{job_id}.scope"


def socket_path(config: Config, job_id: int) -> Path:
    return Path(config.agent_runtime_dir) / "warm" / f"job-{job_id}" / "socket"


async def request(path: Path, req: dict[str, Any],
                  timeout: float = REQUEST_TIMEOUT) -> tuple[int, str] | None:
    """A hold or stop to the host: its DONE's (status, reason), or None when none answers."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, str(path))
            await loop.sock_sendall(sock, json.dumps(req).encode())
            while packet := await loop.sock_recv(sock, 65536):
                if packet[:1] == wire.DONE:
                    return wire.parse_done(packet[1:])
        return None
    except (OSError, TimeoutError):
        return None
    finally:
        sock.close()


def _lock(job_id: int) -> asyncio.Lock:
    return _locks.setdefault(job_id, asyncio.Lock())


async def ensure(scopes: ScopeManager, config: Config, assignment: Assignment,
                 warm: WarmProcess, ident: Account, env: dict[str, str],
                 limits: ScopeLimits) -> Path:
    """The socket of the job's host: the running one, held for this task, or a new one."""
    job = assignment.job.id
    path = socket_path(config, job)
    async with _lock(job):
        answer = await request(path, {"op": "hold"})
        if answer is not None and answer[0] == wire.DONE_OK:
            return path
        unit = unit_name(job)
        # A host that is leaving (or what is left of one): the new one takes its name.
        await scopes.stop_scope_wait(unit, config.task_stop_grace + REQUEST_TIMEOUT)
        remove_unit_settings(unit)
        folder = path.parent
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        # Only the job's user (and root) can reach its interpreter.
        os.chown(folder, ident.uid, ident.gid)
        await _start(scopes, config, assignment, warm, ident, env, limits, unit, path)
        return path


async def _start(scopes: ScopeManager, config: Config, assignment: Assignment,
                 warm: WarmProcess, ident: Account, env: dict[str, str], limits: ScopeLimits,
                 unit: str, path: Path) -> None:
    job = assignment.job
    gate_r, gate_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-m", HOST_MODULE], stdin=gate_r,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(ready_w,), start_new_session=True)
    finally:
        os.close(gate_r)
        os.close(ready_w)
    _reap_later(proc, unit)
    description = f"farmnode warm process of job {job.id}"
    if job.title:
        description += f" ({job.title})"
    props = scope_properties([proc.pid], config.task_slice, description, limits,
                             int(config.task_stop_grace * 1_000_000))
    try:
        await scopes.start_scope(unit, props)
        export_unit_settings(WarmLogFields(unit, job.id, "", (), assignment.jobtype.name))
    except (ScopeError, OSError) as exc:
        os.close(gate_w)
        os.close(ready_r)
        with contextlib.suppress(ScopeError):
            await scopes.stop_scope(unit)
        why = str(exc) or f"{type(exc).__name__} (systemd did not answer in time)"
        raise WarmError(f"cannot start the job's warm process ({unit}): {why}") from None
    spec = {
        "argv": list(warm.argv), "env": {**env, **warm.env}, "cwd": warm.cwd,
        "uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups),
        "socket": str(path), "setup": list(warm.setup), "teardown": list(warm.teardown),
        "idle_timeout": warm.idle_timeout, "ready_fd": ready_w,
        "journal_socket": JOURNAL_SOCKET,
    }
    with os.fdopen(gate_w, "wb") as gate:
        gate.write(json.dumps(spec).encode())
    line = await _read_ready(ready_r)
    if not line.startswith("ok"):
        await scopes.stop_scope(unit)
        remove_unit_settings(unit)
        why = line.removeprefix("error: ") or "its host ended before it listened"
        raise WarmError(f"the job's warm process did not start ({' '.join(warm.argv)}): {why}")
    log.info("job %d: warm process started in %s (%s)", job.id, unit, line)


async def _read_ready(fd: int) -> str:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    data = b""
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        nonlocal data
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        data += chunk
        if (not chunk or b"\n" in data) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await done
    except TimeoutError:
        return "error: it did not say it listens within " f"{READY_TIMEOUT:g} s"
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return data.decode(errors="replace").strip()


def _reap_later(proc: subprocess.Popen[bytes], unit: str) -> None:
    """The host is our child until it ends (or we do): no zombie, and its journald settings
    go with it."""
    loop = asyncio.get_running_loop()

    async def reap() -> None:
        await wait_pid(proc.pid)
        proc.wait()
        remove_unit_settings(unit)

    task = loop.create_task(reap())
    _reapers.add(task)
    task.add_done_callback(_reapers.discard)


async def after_run(scopes: ScopeManager, config: Config, assignment: Assignment,
                    jobtype: WarmJobType, cancelled: bool) -> None:
    """An assignment of a warm job ended: stop the host on a cancel (its interpreter was
    interrupted mid-command) and after the job's last frame (with the teardown)."""
    job = assignment.job.id
    warm: WarmProcess | None = None
    with contextlib.suppress(ValueError):
        warm = jobtype.warm_process()
    if cancelled:
        async with _lock(job):
            await scopes.stop_scope(unit_name(job))
            remove_unit_settings(unit_name(job))
        return
    if warm is not None and warm.holds_last_frame([t.frame for t in assignment.tasks]):
        await request(socket_path(config, job), {"op": "stop", "teardown": True})


async def stop_all(scopes: ScopeManager, config: Config) -> None:
    """The agent is stopped (not restarted): every job's host goes with it, with no teardown
    (the tasks it served were cancelled)."""
    folder = socket_path(config, 0).parent.parent
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            job = entry.name.removeprefix("job-")
            if entry.name.startswith("job-") and job.isdigit():
                # One host systemd cannot stop now must not keep the agent from stopping.
                with contextlib.suppress(Exception):
                    await scopes.stop_scope(unit_name(int(job)))
                remove_unit_settings(unit_name(int(job)))
