"""Runs one assignment: job type → shim → scope → output into journald → final task states."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farmnode.config import Config
from farmnode.jobtypes.base import CommandData, ExitStatus, JobType, Stream
from farmnode.jobtypes.registry import load_jobtype
from farmnode.systemd.journal import TaskLogFields, write_line
from farmnode.systemd.scope import ScopeError, ScopeLimits, ScopeManager, scope_properties
from farmnode.tasks.model import Assignment, TaskState

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024  # longer lines are split; journald's own LineMax is 48K
MB = 1024 * 1024


def scope_unit_name(assignment: Assignment) -> str:
    # Named after the first task so `journalctl -u farmnode-task-<id>.scope` works for the
    # common batch-of-one; every line also carries FARMNODE_TASK for each task of a batch.
    return f"farmnode-task-{assignment.tasks[0].id}.scope"


def limits_for(assignment: Assignment, config: Config) -> ScopeLimits:
    job = assignment.job
    memory_max_mb: int | None
    if job.ram_max is not None:
        memory_max_mb = job.ram_max
    elif job.ram is not None:
        memory_max_mb = job.ram + config.task_ram_headroom
    else:
        memory_max_mb = config.task_default_ram_max
    memory_max = memory_max_mb * MB if memory_max_mb is not None else None
    return ScopeLimits(
        memory_max=memory_max,
        memory_high=int(memory_max * config.task_memory_high_ratio) if memory_max else None,
        memory_swap_max=config.task_swap_max * MB,
        cpu_quota_per_sec_usec=int(job.cpus * 1_000_000) if job.cpus else None,
        allowed_cpus=config.task_allowed_cpus,
        tasks_max=config.task_tasks_max,
        io_weight=config.task_io_weight,
    )


class TaskSetupError(Exception):
    """The task cannot start (bad user, job type error): fail its tasks with this reason."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    groups: list[int]
    home: str


def resolve_identity(command: CommandData, config: Config) -> Identity:
    name = command.user or config.task_default_user
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise TaskSetupError(f"user {name!r} does not exist on this node") from None
    gid = pw.pw_gid
    if command.group:
        import grp

        try:
            gid = grp.getgrnam(command.group).gr_gid
        except KeyError:
            raise TaskSetupError(f"group {command.group!r} does not exist on this node") from None
    if (pw.pw_uid == 0 or gid == 0) and not config.task_allow_root:
        raise TaskSetupError(f"refusing to run as {name!r}: root tasks are off (task_allow_root)")
    return Identity(name, pw.pw_uid, gid, os.getgrouplist(name, gid), pw.pw_dir)


class LineSplitter(asyncio.Protocol):
    """Splits one output pipe into lines and hands each to `emit` as it arrives."""

    def __init__(self, stream: Stream, emit: Callable[[Stream, int, int, bytes], None]) -> None:
        self.stream = stream
        self.emit = emit
        self.buf = b""
        self.offset = 0  # bytes of the stream consumed before buf
        self.line_no = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _line(self, raw: bytes, consumed: int) -> None:
        self.line_no += 1
        self.emit(self.stream, self.line_no, self.offset, raw)
        self.offset += consumed

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while (nl := buf.find(b"\n", start)) != -1:
            while nl - start > MAX_LINE:
                self._line(buf[start:start + MAX_LINE], MAX_LINE)
                start += MAX_LINE
            self._line(buf[start:nl], nl - start + 1)
            start = nl + 1
        while len(buf) - start > MAX_LINE:
            self._line(buf[start:start + MAX_LINE], MAX_LINE)
            start += MAX_LINE
        self.buf = buf[start:]

    def eof_received(self) -> bool | None:
        if self.buf:
            self._line(self.buf, len(self.buf))
            self.buf = b""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class AssignmentRun:
    """One assignment's life. `report` is the agent core's single entry for state changes."""

    assignment: Assignment
    config: Config
    scopes: ScopeManager
    report_state: Callable[[str, int, TaskState, str | None, int | None, int | None], None]
    report_progress: Callable[[str, int, float], None]
    unit: str = ""
    cancelled_reason: str | None = None
    jobtype: JobType | None = None
    _finished: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.unit = scope_unit_name(self.assignment)

    # TaskReporter for the job type
    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        if state.finished:
            self._finished.add(task_id)
        self.report_state(self.assignment.id, task_id, state, reason, None, None)

    def set_task_progress(self, task_id: int, progress: float) -> None:
        self.report_progress(self.assignment.id, task_id, progress)

    def _finish_all(self, state: TaskState, reason: str | None, status: ExitStatus | None) -> None:
        for task in self.assignment.tasks:
            if task.id not in self._finished:
                self._finished.add(task.id)
                self.report_state(self.assignment.id, task.id, state, reason,
                                  status.code if status else None,
                                  status.signal if status else None)

    def status_path(self) -> Path:
        return Path(self.config.agent_runtime_dir) / "tasks" / f"{self.assignment.id}.json"

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug here must fail the tasks, never the agent
            log.exception("assignment %s crashed", self.assignment.id)
            self._finish_all(TaskState.FAILED, f"agent error: {exc}", None)

    async def _run(self) -> None:
        a = self.assignment
        try:
            cls = load_jobtype(a.jobtype.name, a.jobtype.version)
            self.jobtype = cls(a, self, expandvars=self.config.jobtype_expandvars,
                               default_user=self.config.task_default_user)
            command = self.jobtype.get_command_data()
            ident = resolve_identity(command, self.config)
        except Exception as exc:
            self._finish_all(TaskState.FAILED, f"job type {a.jobtype.name!r}: {exc}"
                             if not isinstance(exc, TaskSetupError) else str(exc), None)
            return
        if self.cancelled_reason:
            self._finish_all(TaskState.CANCELLED, self.cancelled_reason, None)
            return
        env = dict(command.env)
        env.setdefault("HOME", ident.home)
        env.setdefault("USER", ident.user)
        env.setdefault("LOGNAME", ident.user)
        self.status_path().parent.mkdir(parents=True, exist_ok=True)
        self.status_path().unlink(missing_ok=True)
        spec = {
            "argv": [command.command, *command.arguments], "env": env, "cwd": command.cwd,
            "uid": ident.uid, "gid": ident.gid, "groups": ident.groups,
            "status_path": str(self.status_path()),
        }
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        gate_r, gate_w = os.pipe()
        try:
            proc = _spawn_shim(gate_r, out_w, err_w)
        finally:
            for fd in (gate_r, out_w, err_w):
                os.close(fd)
        fields = TaskLogFields(self.unit, a.job.id, a.id, a.task_ids).static_fields()
        jt = self.jobtype

        def emit(stream: Stream, line_no: int, offset: int, raw: bytes) -> None:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            try:
                out = jt.handle_line(stream, text)
                priority = jt.line_priority(stream, text) if out is not None else 6
            except Exception as exc:
                log.warning("job type %s line hook failed: %s", a.jobtype.name, exc)
                out, priority = text, 6
            if out is not None:
                write_line(fields, int(stream), line_no, offset, priority, out)

        readers = []
        for fd, stream in ((out_r, Stream.STDOUT), (err_r, Stream.STDERR)):
            splitter = LineSplitter(stream, emit)
            await loop.connect_read_pipe(lambda s=splitter: s, os.fdopen(fd, "rb", buffering=0))  # type: ignore[misc]
            readers.append(splitter)

        description = f"farmnode job {a.job.id} tasks {','.join(map(str, a.task_ids))}"
        if a.job.title:
            description += f" ({a.job.title})"
        props = scope_properties([proc.pid], self.config.task_slice, description,
                                 limits_for(a, self.config),
                                 int(self.config.task_stop_grace * 1_000_000))
        try:
            await self.scopes.start_scope(self.unit, props)
        except ScopeError as exc:
            os.close(gate_w)  # the shim exits 125 without running anything
            await asyncio.gather(*(r.closed for r in readers))
            await loop.run_in_executor(None, proc.wait)
            self._finish_all(TaskState.FAILED, str(exc), None)
            return
        with os.fdopen(gate_w, "wb") as gate:
            gate.write(json.dumps(spec).encode())
        for task in a.tasks:
            self.report_state(a.id, task.id, TaskState.RUNNING, None, None, None)
        await asyncio.gather(*(r.closed for r in readers))
        await _wait_process(proc)
        self._conclude(proc.returncode)

    def _conclude(self, shim_returncode: int | None) -> None:
        record: dict[str, object] = {}
        try:
            record = json.loads(self.status_path().read_text())
            self.status_path().unlink()
        except (OSError, ValueError):
            pass
        if "error" in record:
            self._finish_all(TaskState.FAILED, str(record["error"]), None)
            return
        if "exit_code" in record or "signal" in record:
            status = ExitStatus(code=_int_or_none(record.get("exit_code")),
                                signal=_int_or_none(record.get("signal")))
        elif shim_returncode is not None and shim_returncode < 0:
            # The shim itself was killed (SIGKILL at the end of a stop): no record.
            status = ExitStatus(code=None, signal=-shim_returncode)
        else:
            status = ExitStatus(code=shim_returncode, signal=None)
        if self.cancelled_reason:
            self._finish_all(TaskState.CANCELLED, self.cancelled_reason, status)
            return
        assert self.jobtype is not None
        try:
            ok = self.jobtype.is_successful(status)
        except Exception as exc:
            self._finish_all(TaskState.FAILED, f"job type is_successful failed: {exc}", status)
            return
        if ok:
            self._finish_all(TaskState.DONE, None, status)
        else:
            self._finish_all(TaskState.FAILED, status.describe(), status)


def _int_or_none(v: object) -> int | None:
    return v if isinstance(v, int) else None


def _spawn_shim(gate_r: int, out_w: int, err_w: int) -> subprocess.Popen[bytes]:
    # The gate is the shim's stdin: it reads the spec to EOF, then swaps in /dev/null.
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "farmnode.systemd.shim"],
        stdin=gate_r, stdout=out_w, stderr=err_w, start_new_session=True, close_fds=True,
    )


async def _wait_process(proc: subprocess.Popen[bytes]) -> None:
    # pidfd: the event loop is told when the shim exits, with no thread per task.
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, exited)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()
