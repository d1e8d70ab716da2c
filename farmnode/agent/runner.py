"""Runs one assignment: job type → shim → scope → output into journald → final task states.

A run is either started here (spawn the shim, store its link in systemd's fd store, create
the scope, open the gate) or adopted after an agent restart (the link comes back from the fd
store); from then on both are the same: read the link, run each line through the job type's
hooks, tell the shim what to journal (link.py), conclude on EXIT.

Each packet kind of the link has its handler (`handle_<kind>`). What the run is set up with
(scope name and limits, the task's account) is runsetup.py; splitting the output into lines
and batching them for the shim is linebatch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmnode.agent import accounts
from farmnode.agent.gpus import device_allow, split_listed
from farmnode.agent.gpus import environment as gpu_environment
from farmnode.agent.linebatch import LineSplitter, StreamState
from farmnode.agent.runsetup import TaskSetupError, limits_for, resolve_identity, scope_unit_name
from farmnode.config import Config
from farmnode.jobtypes.base import CommandData, ExitStatus, JobType
from farmnode.jobtypes.registry import UnknownJobType, available_jobtypes, load_jobtype
from farmnode.jobtypes.remote import RemoteJobType, cache_latest, remote_jobtype_class
from farmnode.pathmap import parse_rules
from farmnode.sysinfo.gpu import Gpu
from farmnode.systemd import fdstore, link, spool
from farmnode.systemd.cgroup import cgroup_path_dir, shim_pid, unit_cgroup_path
from farmnode.systemd.journal import (
    DEFAULT_PRIORITIES,
    IDENTIFIERS,
    TaskLogFields,
    export_unit_settings,
    legacy_resume_point,
    remove_unit_settings,
)
from farmnode.systemd.pidwait import wait_pid
from farmnode.systemd.scope import ScopeError, ScopeManager, scope_properties
from farmnode.tasks import tasklog
from farmnode.tasks.model import Assignment, StateChange, TaskState
from farmnode.tasks.tasklog import InternalLine
from farmnode.warm import manager as warm_manager
from farmnode.warm import wire as warm_wire
from farmnode.warm.jobtype import WarmJobType

log = logging.getLogger(__name__)



@dataclass
class LinkSession:
    """One reading of a run's link: the socket, each stream's state, the nonce our RESUME
    carried (protocol 2), and the shim's status record once its EXIT has come."""

    sock: socket.socket
    loop: asyncio.AbstractEventLoop
    streams: list[StreamState]
    nonce: int
    lines: LineSplitter
    record: dict[str, Any] | None = None


# Handles one packet of the link: (session, stream, offset, payload).
PacketHandler = Callable[[LinkSession, int, int, bytes], Awaitable[None]]


@dataclass
class AssignmentRun:
    """One assignment's life. `report_*` are the agent core's entries for state changes."""

    assignment: Assignment
    config: Config
    scopes: ScopeManager
    report_states: Callable[[str, Sequence[StateChange]], None]
    report_progress: Callable[[str, int, float], None]
    report_accounting: Callable[[str, dict[str, Any]], None]
    unit: str = ""
    cancelled_reason: str | None = None
    timed_out: str | None = None
    jobtype: JobType | None = None
    started: bool = False
    started_at: float | None = None  # wall clock, for task_max_runtime across restarts
    # Time workstation mode held the run paused, which task_max_runtime does not count: the
    # seconds of pauses that ended, and when the current one began (wall clock; None: none).
    paused_for: float = 0.0
    paused_since: float | None = None
    adopting: bool = False  # taken over from a previous agent process
    link_version: int = link.VERSION  # of the shim's protocol (an adopted one may be older)
    # Refreshes the on-disk cache of a job type the master serves; None: standalone.
    # Returns why nothing was cached (None: cached).
    fetch_jobtype: Callable[[str, int], Awaitable[str | None]] | None = None
    # What a downloaded job type is told of this node; None: nothing.
    node_facts: Callable[[], dict[str, Any]] | None = None
    _fetch_error: str | None = None
    # The agent's own lines for the assignment's task log (and the job's pid), kept by the
    # store; None: no log is kept.
    report_log: Callable[[str, list[InternalLine], int | None], None] | None = None
    _finished: set[int] = field(default_factory=set)
    _log_fields: TaskLogFields | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _stopping: asyncio.Task[bool] | None = None
    _timer: asyncio.TimerHandle | None = None
    _timing: bool = False  # task_max_runtime is watched (the timer may wait for a resume)
    # What became of output journald could not take in time (added to the outcome's reason).
    _output_note: str | None = None
    spool_waits: bool = False  # concluded with output still in the shim's spool
    # Set once the run reads its link (an adopted one: after RESUME went out), so that the
    # agent says READY only when every task it inherited is attached again.
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    # The GPUs the agent gave the assignment (UUID, else PCI address).
    gpu_ids: tuple[str, ...] = ()
    # Their devices; None: the node has no GPUs and its tasks keep systemd's default access.
    gpus: list[Gpu] | None = None

    def __post_init__(self) -> None:
        self.unit = scope_unit_name(self.assignment)
        a = self.assignment
        self._log_fields = TaskLogFields(self.unit, a.job.id, a.id, a.task_ids, a.jobtype.name)

    @property
    def fd_name(self) -> str:
        return fdstore.link_name(self.assignment.id, self.link_version)

    # TaskReporter for the job type
    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        if state.finished:
            self._finished.add(task_id)
        self.report_states(self.assignment.id, [StateChange(task_id, state, reason)])

    def set_task_progress(self, task_id: int, progress: float) -> None:
        self.report_progress(self.assignment.id, task_id, progress)

    def _finish_all(self, state: TaskState, reason: str | None, status: ExitStatus | None) -> None:
        if self._output_note:
            reason = f"{reason}; {self._output_note}" if reason else self._output_note
        changes = [StateChange(task.id, state, reason, status.code if status else None,
                               status.signal if status else None)
                   for task in self.assignment.tasks if task.id not in self._finished]
        self._finished.update(c.task_id for c in changes)
        # One batch: the store commits it once, however many tasks the assignment holds.
        self.report_states(self.assignment.id, changes)

    async def _journal_spool(self) -> None:
        """Journal the output the shim left in its spool (journald was away when the scope
        was stopped or the shim gave up waiting), and say so in the outcome. While journald
        is still away the spool stays, for the agent's spool janitor."""
        fields = self._log_fields
        if fields is None or not spool.spools(str(self.status_path())):
            return
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(None, spool.replay, str(self.status_path()),
                                              fields)
        except OSError as exc:
            log.warning("assignment %s: output held while journald was away waits in its "
                        "spool: %s", self.assignment.id, exc)
            self._output_note = spool.pending_note(str(self.status_path()))
            self.spool_waits = True  # the agent's spool janitor journals it once it can
            return
        self._output_note = done.describe()

    def status_path(self) -> Path:
        return Path(self.config.agent_runtime_dir) / "tasks" / f"{self.assignment.id}.json"

    def _load_jobtype(self) -> JobType:
        a = self.assignment
        try:
            cls = load_jobtype(a.jobtype.name, a.jobtype.version)
        except UnknownJobType:
            # Not built in: a job type downloaded from the master, run inside the scope.
            if not self.config.jobtype_enable_download:
                raise UnknownJobType(a.jobtype.name, a.jobtype.version, available_jobtypes(),
                                     detail=f"unknown job type {a.jobtype.name!r} (version "
                                     f"{a.jobtype.version}), and downloading job types from "
                                     "the master is off (jobtype_enable_download)") from None
            hit = cache_latest(self.config.jobtype_cache_directory, a.jobtype.name,
                               a.jobtype.version)
            if hit is None:
                why = f": {self._fetch_error}" if self._fetch_error else ""
                raise UnknownJobType(a.jobtype.name, a.jobtype.version, available_jobtypes(),
                                     detail=f"unknown job type {a.jobtype.name!r} (version "
                                     f"{a.jobtype.version}), none installed or downloaded"
                                     f"{why}") from None
            cls = remote_jobtype_class(*hit)
        self.jobtype = cls(a, self, expandvars=self.config.jobtype_expandvars,
                           default_user=self.config.task_default_user,
                           path_map=parse_rules(self.config.jobtype_path_map.split(",")))
        if isinstance(self.jobtype, RemoteJobType) and self.node_facts is not None:
            self.jobtype.node = self.node_facts()
        return self.jobtype

    async def run(self) -> None:
        try:
            await self._start()
        except Exception as exc:  # a bug here must fail the tasks, never the agent
            log.exception("assignment %s crashed", self.assignment.id)
            self._finish_all(TaskState.FAILED, f"agent error: {exc}", None)

    def _load_jobtype_after_restart(self) -> None:
        try:
            self._load_jobtype()
        except Exception as exc:
            # The output is still journaled; only the job type's parsing is lost.
            log.warning("assignment %s: job type unavailable after restart: %s",
                        self.assignment.id, exc)

    async def adopt(self, sock: socket.socket) -> None:
        """Continue a run a previous agent process started; its link came from the fd store."""
        try:
            self._load_jobtype_after_restart()
            if await self._serve(sock, resume=True):
                # The previous agent died before opening the gate: nothing of the job ever
                # ran, so it simply starts now.
                log.info("assignment %s never started; starting it", self.assignment.id)
                self.adopting = False
                await self._start()
        except Exception as exc:
            log.exception("adopted assignment %s crashed", self.assignment.id)
            self._finish_all(TaskState.FAILED, f"agent error: {exc}", None)
        finally:
            self.attached.set()

    def recorded_exit(self) -> dict[str, Any] | None:
        """The shim's status record (written when the job ended), if there is one."""
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(self.status_path().read_text())
            if isinstance(record, dict) and record:
                return record
        return None

    def shim_pid(self) -> int | None:
        return shim_pid(cgroup_path_dir(unit_cgroup_path(self.unit, self.config.task_slice)))

    def shim_alive(self) -> bool:
        return self.shim_pid() is not None

    async def conclude_headless(self) -> None:
        """Conclude a run whose link did not survive (systemd flushed the fd store: the unit
        failed or hit its start limit while no agent ran).

        The shim noticed the link go and journals the job's output itself, so no line is
        lost; when the job ends it writes the status record. Wait for the shim to go, then
        conclude from that record, as the link's EXIT would have."""
        try:
            self._load_jobtype_after_restart()
            pid = self.shim_pid()
            self.attached.set()
            if pid is not None:
                log.info("assignment %s: no link survived; its shim (pid %d) journals the "
                         "output itself, waiting for it to end", self.assignment.id, pid)
                self._arm_timeout()
                with contextlib.suppress(ProcessLookupError):
                    await wait_pid(pid)
                self._disarm_timeout()
            await self._journal_spool()
            record = self.recorded_exit()
            if record is not None:
                self._conclude(record)
            elif self.cancelled_reason or self.timed_out:
                self._conclude_without_exit()
            else:
                self._finish_all(TaskState.FAILED, "the task's shim ended without an exit "
                                 "status while no agent ran", None)
            self.status_path().unlink(missing_ok=True)
            await self.scopes.stop_scope(self.unit)
            remove_unit_settings(self.unit)
        except Exception as exc:
            log.exception("assignment %s crashed while concluding", self.assignment.id)
            self._finish_all(TaskState.FAILED, f"agent error: {exc}", None)
        finally:
            self.attached.set()

    async def _start(self) -> None:
        prepared = await self._prepare()
        if prepared is None:
            return
        command, ident, env = prepared
        spec = self._shim_spec(command, ident, env)
        if spec is None:
            return
        await self._launch_shim(command, ident, env, spec)

    async def _prepare(self) -> tuple[CommandData, accounts.Account, dict[str, str]] | None:
        """The job type's command, the account and the environment it runs with; None when
        the tasks are already concluded (a setup error, a cancel)."""
        a = self.assignment
        if self.fetch_jobtype is not None and self.config.jobtype_enable_download:
            try:
                load_jobtype(a.jobtype.name, a.jobtype.version)
            except UnknownJobType:
                self._fetch_error = await self.fetch_jobtype(a.jobtype.name, a.jobtype.version)
        try:
            command = self._load_jobtype().get_command_data()
            ident = resolve_identity(command, self.config)
        except TaskSetupError as exc:
            self._finish_all(TaskState.FAILED, str(exc), None)
            return None
        except Exception as exc:
            self._finish_all(TaskState.FAILED, f"job type {a.jobtype.name!r}: {exc}", None)
            return None
        if self.cancelled_reason:
            self._finish_all(TaskState.CANCELLED, self.cancelled_reason, None)
            return None
        env = dict(command.env)
        env.setdefault("HOME", ident.home)
        env.setdefault("USER", ident.user)
        env.setdefault("LOGNAME", ident.user)
        if self.gpus is not None:
            # Over the job's own: its devices are the agent's to say (the kernel holds it to
            # them anyway).
            env.update(gpu_environment(self.gpus))
        # A job type with a warm per-job process: it is started (or reused) before the
        # task's shim, which runs only its client (farmnode.warm).
        if isinstance(self.jobtype, WarmJobType):
            try:
                warm_socket = await warm_manager.ensure(
                    self.scopes, self.config, a, self.jobtype.warm_process(), ident, env,
                    limits_for(a, self.config))
            except (ValueError, warm_manager.WarmError) as exc:
                self._finish_all(TaskState.FAILED, str(exc), None)
                return None
            env[warm_wire.SOCKET_ENV] = str(warm_socket)
        return command, ident, env

    def _shim_spec(self, command: CommandData, ident: accounts.Account,
                   env: dict[str, str]) -> dict[str, Any] | None:
        """What the shim is told through its gate; None when the tasks are already concluded
        (the job type's hooks failed)."""
        a = self.assignment
        self.status_path().parent.mkdir(parents=True, exist_ok=True)
        self.status_path().unlink(missing_ok=True)
        spec = {
            "argv": [command.command, *command.arguments], "env": env, "cwd": command.cwd,
            "uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups),
            "status_path": str(self.status_path()),
            "journal_grace": self.config.task_journal_grace,
            "journal": [list(p) for p in zip(IDENTIFIERS, DEFAULT_PRIORITIES, strict=True)],
        }
        try:
            pre, post = self._load_jobtype_hooks()
        except Exception as exc:
            self._finish_all(TaskState.FAILED, f"job type {a.jobtype.name!r} hooks: {exc}", None)
            return None
        if pre:
            spec["pre"] = pre
        if post:
            spec["post"] = post
        return spec

    async def _launch_shim(self, command: CommandData, ident: accounts.Account,
                           env: dict[str, str], spec: dict[str, Any]) -> None:
        """Spawn the shim, store its link, create the scope, open the gate, read the link."""
        a = self.assignment
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gate_r, gate_w = os.pipe()
        try:
            self._proc = _spawn_shim(gate_r, theirs.fileno())
        finally:
            os.close(gate_r)
            theirs.close()
        # Stored before the gate opens: from here on an agent death loses nothing.
        fdstore.store(self.fd_name, ours.fileno())
        description = f"farmnode job {a.job.id} tasks {','.join(map(str, a.task_ids))}"
        if a.job.title:
            description += f" ({a.job.title})"
        assert self.jobtype is not None
        props = scope_properties([self._proc.pid], self.config.task_slice, description,
                                 limits_for(a, self.config),
                                 int(self.config.task_stop_grace * 1_000_000),
                                 kill_signal=self.jobtype.stop_signal,
                                 devices=None if self.gpus is None else device_allow(
                                     self.gpus, split_listed(self.config.task_device_allow)))
        try:
            await self.scopes.start_scope(self.unit, props)
        except ScopeError as exc:
            await self._abandon(gate_w, ours, scope_exists=False)
            self._finish_all(TaskState.FAILED, str(exc), None)
            return
        if self.cancelled_reason:
            # Cancelled while systemd was creating the scope (its stop found no unit yet).
            await self._abandon(gate_w, ours, scope_exists=True)
            self._finish_all(TaskState.CANCELLED, self.cancelled_reason, None)
            return
        try:
            assert self._log_fields is not None
            export_unit_settings(self._log_fields)
        except OSError as exc:
            # Without them journald would rate-limit the task's lines: do not run it.
            await self._abandon(gate_w, ours, scope_exists=True)
            self._finish_all(TaskState.FAILED, f"cannot set the task's journald settings: {exc}",
                             None)
            return
        if self.report_log is not None:
            self.report_log(a.id, tasklog.start_lines(
                time.time(), a.job.title, len(a.tasks), command.command, command.arguments,
                command.cwd, ident.user, command.group, env), None)
        with os.fdopen(gate_w, "wb") as gate:
            gate.write(json.dumps(spec).encode())
        await self._serve(ours, resume=False)

    def _load_jobtype_hooks(self) -> tuple[list[str] | None, list[str] | None]:
        assert self.jobtype is not None
        pre = shlex.split(self.config.task_pre_hook) or None
        post = shlex.split(self.config.task_post_hook) or None
        return self.jobtype.get_hooks(pre, post)

    async def _abandon(self, gate_w: int, ours: socket.socket, scope_exists: bool) -> None:
        """Give up before the gate opens: nothing of the job ever runs (the shim exits 125)."""
        os.close(gate_w)
        assert self._proc is not None
        await _wait_process(self._proc)
        fdstore.remove(self.fd_name)
        ours.close()
        if scope_exists:
            await self.scopes.stop_scope(self.unit)
            remove_unit_settings(self.unit)

    # ---- the link --------------------------------------------------------------------
    async def _serve(self, sock: socket.socket, resume: bool) -> bool:
        """Read the link to the end; True if the job never started (start it afresh)."""
        session = await self._open_link(sock, resume)
        self.attached.set()
        self._arm_timeout()
        await self._read_link(session)
        self._disarm_timeout()
        return await self._close_link(session)

    async def _open_link(self, sock: socket.socket, resume: bool) -> LinkSession:
        """Start reading the link; an adopted one is first asked to resend (RESUME)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        session = LinkSession(sock, loop, [StreamState(link.STDOUT), StreamState(link.STDERR)],
                              secrets.randbits(63),
                              LineSplitter(self.assignment.id, self.assignment.jobtype.name,
                                           self.link_version, self._log_fields, self.jobtype))
        if resume:
            if self.link_version == 1:
                # Lines the dead agent sent may still sit in journald's queue.
                await loop.run_in_executor(None, _journal_sync)
            for st in session.streams:
                if self.link_version == 1:
                    st.journaled, st.line_no = await loop.run_in_executor(
                        None, legacy_resume_point, self.assignment.id, st.index)
                st.resuming = True
                # protocol 1 takes the resume point in the offset field; 2 a nonce to echo
                await loop.sock_sendall(sock, link.pack(
                    link.RESUME, st.index,
                    st.journaled if self.link_version == 1 else session.nonce))
        return session

    async def _read_link(self, session: LinkSession) -> None:
        """Hand each packet to the handler of its kind until EXIT or the link's end; a kind
        with no handler is ignored."""
        handlers: dict[bytes, PacketHandler] = {
            link.STARTED: self.handle_started,
            link.RESUMED: self.handle_resumed,
            link.DATA: self.handle_data,
            link.EXIT: self.handle_exit,
        }
        while session.record is None:
            try:
                packet = await session.loop.sock_recv(
                    session.sock, link.HEADER.size + link.MAX_PAYLOAD + 1024)
            except ConnectionResetError:
                packet = b""
            if not packet:
                break
            kind, stream, offset, payload = link.unpack(packet)
            handler = handlers.get(kind)
            if handler is not None:
                await handler(session, stream, offset, payload)

    async def handle_started(self, session: LinkSession, stream: int, offset: int,
                             payload: bytes) -> None:
        self._log_started(payload)
        self._mark_started()

    async def handle_resumed(self, session: LinkSession, stream: int, offset: int,
                             payload: bytes) -> None:
        # The shim journaled up to offset (WRITEs of the previous agent included) and
        # resends what follows.
        if stream >= len(session.streams):
            return
        if self.link_version != 1 and payload != session.nonce.to_bytes(8, "big"):
            return  # the answer to an agent that died while resuming
        st = session.streams[stream]
        st.resuming = False
        if self.link_version == 1 and offset > st.journaled:
            log.error("assignment %s stream %d: bytes %d..%d lost (the shim no longer "
                      "had them)", self.assignment.id, st.index, st.journaled, offset)
        st.journaled, st.pending = offset, b""

    async def handle_data(self, session: LinkSession, stream: int, offset: int,
                          payload: bytes) -> None:
        if stream >= len(session.streams):
            return
        self._mark_started()
        for out in session.lines.take(session.streams[stream], offset, payload):
            await session.loop.sock_sendall(session.sock, out)
        # sock_recv/sock_sendall return without yielding while the link has data and
        # room: a task spewing output would starve the loop (D-Bus, other tasks, the
        # watchdog: 10 M lines got the agent killed). One yield per packet (~60 KB).
        await asyncio.sleep(0)

    async def handle_exit(self, session: LinkSession, stream: int, offset: int,
                          payload: bytes) -> None:
        if any(st.resuming for st in session.streams):
            # Sent to the previous agent before our RESUME: output behind it may have
            # been dropped as stale here. The shim says EXIT again after the resend.
            return
        session.record = json.loads(payload)

    async def _close_link(self, session: LinkSession) -> bool:
        """Conclude the run and clean up after it once the link has been read; True if the
        job never started."""
        loop, sock, record = session.loop, session.sock, session.record
        if record is not None:
            with contextlib.suppress(OSError):
                for st in session.streams:
                    for out in session.lines.flush_pending(st):
                        await loop.sock_sendall(sock, out)
                await loop.sock_sendall(sock, link.pack(link.EXIT_ACK))
                # The shim leaves once it has handed every line to journald: a task is
                # reported finished only with all its output journaled.
                while await loop.sock_recv(sock, 1024):
                    pass
            await self._journal_spool()
            self._conclude(record)
        never_started = False
        if record is None:
            await self._journal_spool()
            never_started = self._conclude_without_exit()
        fdstore.remove(self.fd_name)
        sock.close()
        if self._proc is not None:
            await _wait_process(self._proc)
        self.status_path().unlink(missing_ok=True)
        # Background processes the job left behind end with it.
        await self.scopes.stop_scope(self.unit)
        remove_unit_settings(self.unit)
        if isinstance(self.jobtype, WarmJobType):
            await warm_manager.after_run(self.scopes, self.config, self.assignment,
                                         self.jobtype, bool(self.cancelled_reason))
        return never_started

    def ran_for(self, now: float) -> float:
        """Seconds the run has had to run, as task_max_runtime counts them: since its start,
        less the time it was paused (a user at a workstation is not the task's doing)."""
        paused = self.paused_for
        if self.paused_since is not None:
            paused += max(0.0, now - self.paused_since)
        return max(0.0, now - (self.started_at or now) - paused)

    def pause_clock(self, now: float) -> None:
        """Workstation mode paused the run's scope: its runtime stops counting."""
        if self.paused_since is None:
            self.paused_since = now

    def resume_clock(self, now: float) -> None:
        """The scope runs again: the runtime counts on, and the limit is looked at again."""
        if self.paused_since is None:
            return
        self.paused_for += max(0.0, now - self.paused_since)
        self.paused_since = None
        if self._timing:
            self._arm_timeout()

    def _arm_timeout(self) -> None:
        limit = self.config.task_max_runtime
        if limit is None:
            return
        if self.started_at is None:
            self.started_at = time.time()
        self._disarm_timeout()
        self._timing = True
        left = limit - self.ran_for(time.time())
        self._timer = asyncio.get_running_loop().call_later(max(0.0, left), self._expire)

    def _disarm_timeout(self) -> None:
        self._timing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        limit = self.config.task_max_runtime
        assert limit is not None
        self._timer = None
        left = limit - self.ran_for(time.time())
        if self.paused_since is not None:
            # resume_clock arms the timer again for what is left
            log.info("assignment %s: its task_max_runtime (%g s) would have ended while it "
                     "is paused; the pause does not count: %.1f s left",
                     self.assignment.id, limit, left)
            return
        if left > 0.01:  # paused meanwhile, or the wall clock was set back
            self._timer = asyncio.get_running_loop().call_later(left, self._expire)
            return
        self.timed_out = f"timeout: ran longer than task_max_runtime ({limit:g} s)"
        log.warning("assignment %s: %s", self.assignment.id, self.timed_out)
        self._stopping = asyncio.get_running_loop().create_task(
            self.scopes.stop_scope(self.unit))

    def _log_started(self, payload: bytes) -> None:
        if self.report_log is None or self.started:
            return
        try:
            pid = int(json.loads(payload)["pid"])
        except (ValueError, KeyError, TypeError):
            return
        self.report_log(self.assignment.id, [tasklog.started_line(time.time(), self.unit, pid)],
                        pid)

    def _mark_started(self) -> None:
        if self.started:
            return
        self.started = True
        self.report_states(self.assignment.id, [StateChange(task.id, TaskState.RUNNING)
                                                for task in self.assignment.tasks])

    # ---- the end ---------------------------------------------------------------------
    def _conclude_without_exit(self) -> bool:
        """The link closed with no EXIT: the shim was killed, or never got the gate.

        True (and nothing concluded) for an adopted run whose job never started."""
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(self.status_path().read_text())
        if record:
            self._conclude(record)
        elif self.cancelled_reason or self.timed_out:
            # The stop ran out of grace: systemd SIGKILLed the whole cgroup, shim included.
            killed = ExitStatus(code=None, signal=9)
            if self.cancelled_reason:
                self._finish_all(TaskState.CANCELLED, self.cancelled_reason, killed)
            else:
                self._finish_all(TaskState.FAILED, self.timed_out, killed)
        elif not self.started and self.adopting:
            return True
        elif not self.started:
            self._finish_all(TaskState.FAILED, "the task's shim ended before starting the job",
                             None)
        else:
            self._finish_all(TaskState.FAILED, "the task's shim died without an exit status",
                             None)
        return False

    def _conclude(self, record: dict[str, Any]) -> None:
        accounting = record.get("accounting")
        if isinstance(accounting, dict) and accounting:
            self.report_accounting(self.assignment.id, accounting)
        if "error" in record:
            self._finish_all(TaskState.FAILED, str(record["error"]), None)
            return
        status = ExitStatus(code=_int_or_none(record.get("exit_code")),
                            signal=_int_or_none(record.get("signal")))
        if self.cancelled_reason:
            self._finish_all(TaskState.CANCELLED, self.cancelled_reason, status)
            return
        if self.timed_out:
            self._finish_all(TaskState.FAILED, self.timed_out, status)
            return
        if "failure" in record:
            # A hook failed (or, under the hooks' supervisor, the job could not be started).
            self._finish_all(TaskState.FAILED, str(record["failure"]), status)
            return
        oom = isinstance(accounting, dict) and int(accounting.get("oom_kills", 0)) > 0
        if oom and status.signal == 9:
            self._finish_all(TaskState.FAILED, "oom-kill", status)
            return
        if self.jobtype is None:
            ok = status.code == 0
        else:
            try:
                ok = self.jobtype.is_successful(status)
            except Exception as exc:
                self._finish_all(TaskState.FAILED, f"job type is_successful failed: {exc}",
                                 status)
                return
        if ok:
            self._finish_all(TaskState.DONE, None, status)
        else:
            reason = status.describe()
            if self.jobtype is not None:
                with contextlib.suppress(Exception):
                    reason = self.jobtype.failure_reason(status)
            self._finish_all(TaskState.FAILED, reason, status)


def _int_or_none(v: object) -> int | None:
    return v if isinstance(v, int) else None


def _spawn_shim(gate_r: int, link_fd: int) -> subprocess.Popen[bytes]:
    # The gate is the shim's stdin, the link its stdout (see farmnode.systemd.shim).
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "farmnode.systemd.shim"],
        stdin=gate_r, stdout=link_fd, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True,
    )


def _journal_sync() -> None:
    subprocess.run(["journalctl", "--sync"], check=False, timeout=30)


async def _wait_process(proc: subprocess.Popen[bytes]) -> None:
    await wait_pid(proc.pid)
    proc.wait()


