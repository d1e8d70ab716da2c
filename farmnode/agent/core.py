"""The agent core: accepts assignments, owns task state, runs assignments under systemd.

Every input (D-Bus, and through it the CLI and HTTP API) arrives here; state changes go to
the store first, then to listeners (the D-Bus signals). Errors raised to callers are
AgentError subclasses whose text says what is wrong (agent/errors.py).

`Agent` keeps the state machine, the runs' bookkeeping, the listeners, the queries and the
control entries; it hands out the rest, each in a module of its own: admission.py (the checks
before a run starts), progress.py (the progress throttle), heldwrites.py (outcomes held while
the store refuses writes), recovery.py (what an earlier agent process left), janitor.py
(spools no run journals), jobtypefetch.py (job types downloaded from the master). A run
itself is runner.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from farmnode import __version__
from farmnode.agent import admission, jobtypefetch, recovery
from farmnode.agent.errors import AgentError as AgentError
from farmnode.agent.errors import InvalidArgument as InvalidArgument
from farmnode.agent.errors import InvalidAssignment as InvalidAssignment
from farmnode.agent.errors import NotAccepting as NotAccepting
from farmnode.agent.errors import NotEnoughResources as NotEnoughResources
from farmnode.agent.errors import PartialOverlap as PartialOverlap
from farmnode.agent.errors import StorageFailed as StorageFailed
from farmnode.agent.errors import UnknownTask as UnknownTask
from farmnode.agent.gpus import GpuPool
from farmnode.agent.heldwrites import STORAGE_ERRORS, HeldWrites
from farmnode.agent.janitor import Left, SpoolJanitor
from farmnode.agent.progress import ProgressThrottle
from farmnode.agent.runner import AssignmentRun
from farmnode.agent.runsetup import scope_unit_name
from farmnode.agent.workstation import Workstation
from farmnode.config import Config
from farmnode.sysinfo import gpu, host
from farmnode.systemd import spool
from farmnode.systemd.cgroup import cgroup_path_dir, read_accounting, unit_cgroup_path
from farmnode.systemd.journal import TaskLogFields
from farmnode.systemd.scope import ScopeManager
from farmnode.tasks.model import Assignment, StateChange, TaskState
from farmnode.tasks.schema import AssignmentError, parse_assignment
from farmnode.tasks.store import Store, TaskRecord
from farmnode.tasks.tasklog import InternalLine

log = logging.getLogger(__name__)

# Finished tasks a listing shows besides every active one.
TASK_HISTORY = 1000
LOG_BUILDS = 4  # task logs built from journald at once (GET /api/v1/task_logs/, TaskLog)


class AgentState(enum.StrEnum):
    ONLINE = "online"
    RUNNING = "running"
    DISABLED = "disabled"
    OFFLINE = "offline"


class StatusSource(Protocol):
    """What the core needs of farmnode.master.link.MasterLink: the core must not import it."""

    def status(self) -> dict[str, Any]: ...

    def note_master_contact(self) -> None: ...

    async def fetch_jobtype(self, name: str, version: int) -> dict[str, Any] | str: ...

    def assign_refusal(self) -> str | None: ...


class TrustSource(Protocol):
    """What the core needs of farmnode.master.trust.TrustedMasters, for the same reason."""

    def as_strings(self) -> list[str]: ...


class HealthSource(Protocol):
    """What the core needs of farmnode.health.watch.HealthWatch: the checks, for the status."""

    def status(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class TaskChange:
    assignment_id: str
    task_id: int
    state: TaskState
    reason: str
    progress: float
    record: TaskRecord | None = None  # the whole stored task, as the change left it


class Agent:
    def __init__(self, config: Config, store: Store, scopes: ScopeManager,
                 gpu_pool: GpuPool | None = None) -> None:
        self.config = config
        # Detected once: GPUs do not come and go while the node runs (a hot-plugged one
        # counts from the next agent start).
        self.gpu_pool = gpu_pool if gpu_pool is not None else GpuPool.of(gpu.gpus())
        self.store = store
        self.scopes = scopes
        self.runs: dict[str, AssignmentRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Journals the spools of runs concluded by an earlier agent process.
        self.spool_janitor = SpoolJanitor(self.spools_left, journaled=self._journaled_late)
        self._unowned_spools: set[str] = set()  # told once in the log
        self._open: dict[str, int] = {}  # unfinished tasks per running assignment
        # Outcomes the store could not take yet (farmnode.agent.heldwrites).
        self._writes = HeldWrites()
        self.state = AgentState.ONLINE
        self.started = time.time()
        self.task_listeners: list[Callable[[TaskChange], None]] = []
        self.state_listeners: list[Callable[[AgentState], None]] = []
        self.idle_listeners: list[Callable[[], None]] = []  # the last running run has ended
        # (assignment id, its scope's cgroup figures) after each sample is stored
        self.accounting_listeners: list[Callable[[str, dict[str, int]], None]] = []
        self.runs_listeners: list[Callable[[], None]] = []
        # A task's stored record changed with no change of state (its reason told what
        # came of its late output): what shows records (the task objects) shows it again.
        self.record_listeners: list[Callable[[TaskRecord], None]] = []
        # Something the status shows changed that none of the above tells (status_changed).
        self.status_listeners: list[Callable[[], None]] = []
        self.agent_id = self._load_agent_id()
        # Set by serve() when a master is configured; GetStatus shows it.
        self.master_link: StatusSource | None = None
        # Who may call PyFarm's endpoints without credentials (set by the entry point).
        self.trusted_masters: TrustSource | None = None
        # Health checks (set by the entry point; a failing one is a hold, "health").
        self.health: HealthSource | None = None
        self._shutting_down = False
        self._detached = False
        # Why the node takes no new work besides the admin's own `disabled` ({source: why}):
        # workstation mode sets one while a user is at the node.
        self.holds: dict[str, str] = {}
        self._admin_disabled = False
        self.workstation: Workstation | None = None
        # Progress is throttled (farmnode.agent.progress says why and how).
        self._progress = ProgressThrottle(self._store_progress)
        # Logs built at once: each holds a memfd and a journal reader (one descriptor per
        # journal file); callers beyond these wait holding nothing.
        self._log_builds = asyncio.Semaphore(LOG_BUILDS)
        # The FQDN for GetStatus, resolved once off the event loop: getfqdn() asks DNS, and a
        # lost reply stalled every GetStatus (and the whole loop) for 5 s (bench/REPORT.md).
        self.hostname = socket.gethostname()
        self.hostname_resolved = threading.Event()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # the core alone in a test: nobody to tell
            loop = None
        threading.Thread(target=self._resolve_hostname, args=(loop,), name="fqdn",
                         daemon=True).start()

    def _resolve_hostname(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.hostname = socket.getfqdn(self.hostname)
        self.hostname_resolved.set()
        if loop is not None:  # the status shows it (AgentHostname's PropertiesChanged)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.status_changed)

    def _load_agent_id(self) -> str:
        stored = self.store.get_meta("agent_id")
        if stored:
            return stored
        new = str(uuid.uuid4())
        self.store.set_meta("agent_id", new)
        return new

    # ---- resources (farmnode.agent.admission) -----------------------------------------
    def total_ram_mb(self) -> int:
        return admission.total_ram_mb(self.config)

    def total_cpus(self) -> float:
        return admission.total_cpus(self.config)

    def free_ram_mb(self) -> int:
        return admission.free_ram_mb()

    def slice_memory_max_mb(self) -> int:
        """What all tasks together may use: the node less the reserve for the OS and agent."""
        return admission.slice_memory_max_mb(self.config)

    def gpus_held(self) -> dict[str, tuple[str, ...]]:
        return admission.gpus_held(self.runs)

    # ---- commands --------------------------------------------------------------------
    def assign(self, payload: object) -> tuple[str, bool]:
        """Validate and start an assignment; (id, False) for an identical repeat."""
        if self._shutting_down or self.state in (AgentState.DISABLED, AgentState.OFFLINE):
            raise NotAccepting(f"agent is {self.state} and takes no new work"
                               + "".join(f": {why}" for why in self.holds.values()))
        refusal = self.master_link.assign_refusal() if self.master_link else None
        if refusal:
            # PyFarm's answer while it reannounces: the master tries again.
            raise NotAccepting(refusal)
        try:
            a = parse_assignment(payload)
        except AssignmentError as exc:
            raise InvalidAssignment(exc) from None
        admit = admission.Admission(self.config, self.gpu_pool, self.runs)
        repeated = admit.repeat_of(a)
        if repeated is not None:
            return repeated, False  # PyFarm: an identical repeat is accepted
        admit.check_user(a)
        admit.check_resources(a)
        gpu_ids = admit.pick_gpus(a)
        unit = scope_unit_name(a)
        admit.check_unit_free(a, unit)
        if self.storage_error is not None:
            raise StorageFailed(f"the state directory refuses writes ({self.storage_error}): "
                                "no new work until it takes them again")
        try:
            self.store.add_assignment(a, unit, gpu_ids)
        except STORAGE_ERRORS as exc:
            self._writes.failed(exc)
            raise StorageFailed(f"the assignment could not be stored ({exc}): not accepted"
                                ) from None
        self._start(a, gpu_ids)
        log.info("accepted assignment %s: job %d tasks %s%s", a.id, a.job.id, list(a.task_ids),
                 f" GPUs {', '.join(gpu_ids)}" if gpu_ids else "")
        return a.id, True

    def _new_run(self, a: Assignment, gpu_ids: Sequence[str] = ()) -> AssignmentRun:
        run = AssignmentRun(a, self.config, self.scopes, self._report_states,
                            self._report_progress, self._report_accounting)
        run.gpu_ids = tuple(gpu_ids)
        # On a node with GPUs every task is confined to its own (none when it asked for
        # none); a node without keeps systemd's default device access.
        run.gpus = self.gpu_pool.by_ident(gpu_ids) if self.gpu_pool.gpus else None
        run.fetch_jobtype = self._fetch_jobtype
        run.node_facts = self.node_facts
        run.report_log = self._report_log
        return run

    async def _fetch_jobtype(self, name: str, version: int) -> str | None:
        """Refresh the cache from the master (farmnode.agent.jobtypefetch); why nothing new
        was cached (None: cached)."""
        return await jobtypefetch.refresh(self.master_link, self.config.jobtype_cache_directory,
                                          name, version)

    def node_facts(self) -> dict[str, Any]:
        """What a job type is told of this node (PyFarm's JobType.node() and config)."""
        return {"master_api": self.config.master_api, "hostname": self.hostname,
                "systemid": self.agent_id, "id": self.agent_id, "agent_id": self.agent_id,
                "cpus": self.total_cpus(), "ram": self.total_ram_mb(),
                "farm_name": self.config.farm_name}

    def _start(self, a: Assignment, gpu_ids: Sequence[str] = ()) -> None:
        run = self._new_run(a, gpu_ids)
        for rec in self.store.tasks(a.id):
            self._emit(a.id, rec.id, rec)
        self._launch(run, run.run())

    def _launch(self, run: AssignmentRun, body: Coroutine[Any, Any, None]) -> None:
        self.runs[run.assignment.id] = run
        self._open[run.assignment.id] = self.store.unfinished(run.assignment.id)
        task = asyncio.get_running_loop().create_task(self._run(run, body),
                                                      name=f"assignment-{run.assignment.id}")
        self._tasks[run.assignment.id] = task
        self._update_running_state()

    async def _run(self, run: AssignmentRun, body: Coroutine[Any, Any, None]) -> None:
        try:
            await body
        except asyncio.CancelledError:
            # The agent is leaving (restart): the assignment stays active for the next one.
            return
        if not self._detached:
            aid = run.assignment.id

            def finish() -> None:
                self.store.finish_assignment(aid)
                self.runs.pop(aid, None)
                self._tasks.pop(aid, None)
                self._open.pop(aid, None)
                self._update_running_state()
                self._note_idle()
                if run.spool_waits:
                    self.spool_janitor.start()
            self._writes.store_in_order(f"end of assignment {aid}", finish)

    def _update_running_state(self) -> None:
        if self.state in (AgentState.ONLINE, AgentState.RUNNING):
            busy = any(self._unfinished(run) for run in self.runs.values())
            self._set_state(AgentState.RUNNING if busy else AgentState.ONLINE)
        for cb in self.runs_listeners:  # the runs or their open tasks changed
            cb()

    def _unfinished(self, run: AssignmentRun) -> bool:
        # A run whose tasks all have their final state is only cleaning up: the node is
        # online from that moment, and the master hears so before it hears `done` (PyFarm's
        # order; the master sends the next task when it hears `done`).
        # A count kept per state change: reading the tasks here made every event cost the
        # assignment's size.
        return self._open.get(run.assignment.id, 0) > 0

    async def cancel_task(self, task_id: int, reason: str = "cancelled") -> bool:
        """Stop the whole assignment holding the task; False if it is not running here."""
        for run in list(self.runs.values()):
            if task_id in run.assignment.task_ids:
                await self._cancel_run(run, reason)
                return True
        if self.store.task(task_id) is None:
            raise UnknownTask(f"no task {task_id} on this node")
        return False

    async def _cancel_run(self, run: AssignmentRun, reason: str) -> None:
        if run.cancelled_reason:
            return
        run.cancelled_reason = reason
        if self.workstation is not None:
            await self.workstation.release(run.unit)
        await self.scopes.stop_scope(run.unit)

    def set_state(self, state: str) -> None:
        try:
            new = AgentState(state)
        except ValueError:
            raise InvalidArgument(
                f"unknown state {state!r}: expected one of online, disabled") from None
        if new not in (AgentState.ONLINE, AgentState.DISABLED):
            raise InvalidArgument(f"state {state!r} cannot be set: use online or disabled")
        self._admin_disabled = new is AgentState.DISABLED
        if new is AgentState.ONLINE and self.holds:
            log.info("state online asked for; the node stays disabled: %s",
                     "; ".join(self.holds.values()))
            return
        if new is AgentState.ONLINE and self.runs:
            new = AgentState.RUNNING
        self._set_state(new)

    # ---- holds (workstation mode) ----------------------------------------------------
    def set_hold(self, source: str, reason: str | None) -> None:
        """Take no new work while `reason` holds (None lifts it): the node is `disabled`
        to the master, and status says why. The admin's own `disabled` outlasts it."""
        if reason is None:
            self.holds.pop(source, None)
        else:
            self.holds[source] = reason
        self.status_changed()
        if self.state is AgentState.OFFLINE or self._shutting_down:
            return
        if self.holds:
            self._set_state(AgentState.DISABLED)
        elif self.state is AgentState.DISABLED and not self._admin_disabled:
            busy = any(self._unfinished(run) for run in self.runs.values())
            self._set_state(AgentState.RUNNING if busy else AgentState.ONLINE)

    def status_changed(self) -> None:
        """Something the status shows changed that no other listener tells: a hold's reason,
        a health check's output, workstation mode's sessions or paused scopes."""
        for cb in self.status_listeners:
            cb()

    def running_units(self) -> list[str]:
        return [run.unit for run in self.runs.values()]

    def note_paused(self, unit: str, paused: bool) -> None:
        """Workstation mode paused (or resumed) a run's scope: its task_max_runtime clock
        stops (or goes on), and the store keeps where it stands for a restarted agent."""
        now = time.time()
        for run in self.runs.values():
            if run.unit != unit:
                continue
            if paused:
                run.pause_clock(now)
            else:
                run.resume_clock(now)
            self.store.set_paused(run.assignment.id, run.paused_for, run.paused_since)

    def _set_state(self, state: AgentState) -> None:
        if state is self.state:
            return
        self.state = state
        for cb in self.state_listeners:
            cb(state)

    # ---- drain: fleet control waits for a disabled node to run nothing ---------------
    def _note_idle(self) -> None:
        # A disabled node's state does not change when its work ends (it stays disabled),
        # and its last TaskChanged comes before the run has cleaned up: this is the one
        # moment a drain can await.
        if self.runs:
            return
        for cb in self.idle_listeners:
            try:
                cb()
            except Exception:
                log.exception("idle listener failed")

    # ---- reporting (called by runs) --------------------------------------------------
    def _report_state(self, assignment_id: str, task_id: int, state: TaskState,
                      reason: str | None, exit_code: int | None, signal: int | None) -> None:
        self._report_states(assignment_id,
                            [StateChange(task_id, state, reason, exit_code, signal)])

    def _report_states(self, assignment_id: str, changes: Sequence[StateChange]) -> None:
        for c in changes:
            self._progress.store_pending(assignment_id, c.task_id)
        changes = list(changes)

        def store() -> None:
            finished = False
            for c in self.store.set_task_states(assignment_id, changes):
                log.info("task %d (%s): %s%s", c.task_id, assignment_id, c.state,
                         f" ({c.reason})" if c.reason else "")
                self._emit(assignment_id, c.task_id)
                if c.state.finished:
                    finished = True
                    if assignment_id in self._open:
                        self._open[assignment_id] -= 1
            if finished:
                self._update_running_state()
        self._writes.store_in_order(f"state of task(s) {[c.task_id for c in changes][:5]}", store)

    # ---- writes the store may refuse (farmnode.agent.heldwrites) ----------------------
    @property
    def storage_error(self) -> str | None:
        """Why the state directory refuses writes; None while it takes them."""
        return self._writes.error

    def _report_log(self, assignment_id: str, lines: list[InternalLine],
                    pid: int | None = None) -> None:
        self._writes.store_in_order(f"log lines of assignment {assignment_id}",
                             lambda: self.store.add_log_lines(assignment_id, lines, pid))

    def _report_accounting(self, assignment_id: str, accounting: dict[str, Any]) -> None:
        try:
            self.store.set_accounting(assignment_id, accounting)
        except STORAGE_ERRORS as exc:  # a sample; the next one replaces it
            self._writes.failed(exc, "accounting sample")
            return
        self._accounted(assignment_id, accounting)

    def _accounted(self, assignment_id: str, accounting: dict[str, int]) -> None:
        for cb in self.accounting_listeners:
            try:
                cb(assignment_id, accounting)
            except Exception:
                log.exception("accounting listener failed")

    def _report_progress(self, assignment_id: str, task_id: int, progress: float) -> None:
        self._progress.report(assignment_id, task_id, progress)

    def _store_progress(self, assignment_id: str, task_id: int, progress: float) -> None:
        try:
            changed = self.store.set_task_progress(assignment_id, task_id, progress)
        except STORAGE_ERRORS as exc:  # progress is superseded by the next, or by the end
            self._writes.failed(exc, "progress")
            return
        if changed:
            self._emit(assignment_id, task_id)

    def _emit(self, assignment_id: str, task_id: int, rec: TaskRecord | None = None) -> None:
        rec = rec or self.store.task_in(assignment_id, task_id)
        if rec is None:
            return
        change = TaskChange(assignment_id, task_id, rec.state, rec.reason or "", rec.progress,
                            rec)
        for cb in self.task_listeners:
            try:
                cb(change)
            except Exception:
                log.exception("task listener failed")

    # ---- queries ---------------------------------------------------------------------
    def list_tasks(self, active_only: bool = False) -> list[dict[str, Any]]:
        """Every task of the active assignments (the master re-sends what it finds missing
        here, so none may be cut off), then the most recent finished ones."""
        active = self.store.tasks(active_only=True)
        if active_only:
            return [r.to_dict() for r in active]
        keys = {(r.assignment_id, r.id) for r in active}
        recent = self.store.tasks(limit=TASK_HISTORY + len(active))
        history = [r for r in recent if (r.assignment_id, r.id) not in keys][:TASK_HISTORY]
        return [r.to_dict() for r in sorted(active + history, key=lambda r: -r.created)]

    def get_task(self, task_id: int) -> TaskRecord:
        rec = self.store.task(task_id)
        if rec is None:
            raise UnknownTask(f"no task {task_id} on this node")
        return rec

    def figures(self) -> dict[str, Any]:
        """What changes all the time: the agent's RSS, the running tasks' RAM and processes
        (MiB), the disks."""
        me = psutil.Process()
        # Tasks are not the agent's children (they live in their scopes): PyFarm's
        # consumed_ram/child_processes come from the scopes' cgroups instead.
        running = [rec.accounting for rid in self.runs
                   for rec in self.store.tasks(rid, limit=1)]
        return {
            "agent_process_ram": me.memory_info().rss // (1024 * 1024),
            "consumed_ram": sum(acc.get("memory_current", 0) for acc in running) // (1024 * 1024),
            "child_processes": sum(acc.get("tasks_current", 0) for acc in running),
            "disks": [d.to_json() for d in host.disks()],
        }

    def status(self) -> dict[str, Any]:
        figures = self.figures()
        return {
            "state": str(self.state),
            # The health checks: each one's last verdict and output.
            "health": self.health.status() if self.health else None,
            "agent_id": self.agent_id,
            "agent_hostname": self.hostname,
            "version": __version__,
            "free_ram": self.free_ram_mb(),
            "ram": self.total_ram_mb(),
            "cpus": self.total_cpus(),
            "agent_process_ram": figures["agent_process_ram"],
            "consumed_ram": figures["consumed_ram"],
            "child_processes": figures["child_processes"],
            "pids": [os.getpid()],
            "uptime": time.time() - self.started,
            "jobs": sorted({r.assignment.job.id for r in self.runs.values()}),
            "assignments": sorted(self.runs),
            "running_tasks": sum(len(r.assignment.tasks) for r in self.runs.values()),
            # The node's GPUs tasks may get, and which assignment holds each (null: free).
            "gpus": self.gpu_status(),
            "farm_name": self.config.farm_name,
            # Set while the state directory refuses writes (outcomes held in memory).
            "storage_error": self.storage_error,
            # Why the node is disabled when it is not the admin's doing; the user sessions
            # and paused tasks of workstation mode.
            "state_reason": "; ".join(self.holds.values()) or None,
            "workstation": self.workstation.status() if self.workstation else None,
            # PyFarm's 0.8.6 master has no column for disks (it refuses an announce that
            # carries them): they are ours to show only.
            "disks": figures["disks"],
            # The master link's last contact, queued reports, last error (None: standalone)
            **(self.master_link.status() if self.master_link else {"master_link": None}),
        }

    def gpu_status(self) -> list[dict[str, Any]]:
        holder = {i: aid for aid, ids in self.gpus_held().items() for i in ids}
        return [{"id": g.ident, "pci_slot": g.pci_slot, "name": g.fullname,
                 "uuid": g.uuid, "devices": list(g.devices),
                 "assignment": holder.get(g.ident)} for g in self.gpu_pool.gpus]

    def note_master_contact(self) -> None:
        """The master called our HTTP API (its User-Agent): it has heard from us."""
        if self.master_link is not None:
            self.master_link.note_master_contact()

    # ---- lifecycle -------------------------------------------------------------------
    async def recover(self) -> None:
        """Take back what a previous agent process left running (farmnode.agent.recovery),
        then set the spool janitor going."""
        await recovery.recover(recovery.Recovery(self.config, self.store, self.runs,
                                                 self._new_run, self._launch))
        self.spool_janitor.start()

    def orphan_spools(self) -> dict[str, TaskLogFields]:
        """Spools no run of this agent will journal and no shim still writes."""
        return self.spools_left().orphans

    def spools_left(self) -> Left:
        """Spools no run of this agent will journal (farmnode.agent.recovery.spools_left)."""
        return recovery.spools_left(self.config, self.store, self.runs, self._unowned_spools)

    def _journaled_late(self, status_path: str, fields: TaskLogFields,
                        done: spool.Replayed) -> None:
        """The output an outcome said was waiting is in the journal: the tasks' stored
        reasons say what came of it (recovery.journaled_late), and the task objects too."""
        for rec in recovery.journaled_late(self.store, status_path, fields, done):
            for cb in self.record_listeners:
                try:
                    cb(rec)
                except Exception:
                    log.exception("record listener failed")

    def sample_accounting(self) -> None:
        for run in list(self.runs.values()):
            figures = read_accounting(cgroup_path_dir(unit_cgroup_path(run.unit,
                                                                       self.config.task_slice)))
            if figures:
                self.store.set_accounting(run.assignment.id, figures)
                self._accounted(run.assignment.id, figures)

    async def account_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.task_accounting_interval)
            if self.runs:
                self.sample_accounting()

    def stop_accepting(self) -> None:
        """From the moment a stop or restart begins, assigns are refused (503)."""
        self._shutting_down = True

    async def detach(self) -> None:
        """Leave for a restart: tasks keep running, their links stay in the fd store."""
        self._shutting_down = True
        self._detached = True
        for task in self._tasks.values():
            task.cancel()
        self.spool_janitor.stop()
        self.flush_progress()

    def flush_progress(self) -> None:
        """Store throttled progress now (before the agent goes)."""
        self._progress.flush()

    async def shutdown(self, reason: str = "agent stopped") -> None:
        self._shutting_down = True
        runs = list(self.runs.values())
        await asyncio.gather(*(self._cancel_run(r, reason) for r in runs),
                             return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()),
                               timeout=self.config.task_stop_grace + 10)
        # The jobs' warm processes stop with their tasks, idle ones too (farmnode.warm).
        from farmnode.warm import manager as warm_manager

        await warm_manager.stop_all(self.scopes, self.config)
        self.spool_janitor.stop()  # the next agent picks the spools up again
        self.flush_progress()
        self._set_state(AgentState.OFFLINE)

    # ---- control for the HTTP API ------------------------------------------------------
    # Reached over D-Bus (SignalTask, Stop, Restart, Update, GetConfig, PatchConfig, TaskLog);
    # the work is in farmnode.agent.control, imported here so this section stays self-contained.
    async def signal_task(self, task_id: int, signum: int) -> bool:
        """Signal every process of the task's scope; False if the task is not running."""
        from farmnode.agent import control

        try:
            control.check_signal(signum)
        except control.ControlError as exc:
            raise InvalidArgument(str(exc)) from None
        for run in list(self.runs.values()):
            if task_id in run.assignment.task_ids:
                log.info("signal %d to task %d (%s)", signum, task_id, run.unit)
                return await self.scopes.kill_scope(run.unit, signum)
        self.get_task(task_id)  # UnknownTask for a task this node never had
        return False

    def _queue_own_unit_job(self, action: str) -> None:
        from farmnode.agent import control

        # A task, started after this D-Bus call's reply is sent; held: the loop keeps only a
        # weak reference to a task.
        self._own_unit_job = asyncio.get_running_loop().create_task(
            control.own_unit_job(self.scopes.bus, action))

    async def stop_agent(self) -> None:
        log.info("stop of the agent requested over D-Bus")
        self._queue_own_unit_job("stop")

    async def restart_agent(self, immediately: bool) -> bool:
        """Restart now. PyFarm waited for running work unless `immediately`; here running
        tasks survive the agent's restart (their scopes are not the agent's), so there is
        nothing to wait for."""
        log.info("restart of the agent requested over D-Bus (immediately=%s; tasks keep "
                 "running)", immediately)
        self._queue_own_unit_job("restart")
        return True

    def request_update(self, version: str) -> None:
        from farmnode.agent import control

        try:
            control.check_version(version)
        except control.ControlError as exc:
            raise InvalidArgument(str(exc)) from None
        self.store.set_meta("update_requested", version)
        # Honest about what happens: the agent does not update itself; the package manager does.
        log.warning("update to farmnode %s requested by the master; this agent does not "
                    "update itself: install the package with the system's package manager "
                    "(running %s)", version, __version__)

    def config_dict(self) -> dict[str, Any]:
        from farmnode.config.model import redacted

        return redacted(self.config)

    def patch_config(self, patch: object) -> dict[str, Any]:
        from farmnode.agent import control

        try:
            self.config = control.patch_config(self.config, patch)
        except control.ControlError as exc:
            raise InvalidArgument(str(exc)) from None
        logging.getLogger().setLevel(self.config.agent_log_level.upper())
        log.info("configuration patched over D-Bus: %s", ", ".join(sorted(
            patch if isinstance(patch, dict) else ())))
        return self.config_dict()

    async def task_log(self, identifier: str) -> int:
        """A memfd holding the log's rows as JSON lines, the rows the master is sent; the
        caller (D-Bus) sends a duplicate."""
        from farmnode.agent import control

        try:
            record = control.log_record(self.store, control.log_assignment(self.store,
                                                                           identifier))
        except control.NoSuchLog as exc:
            raise UnknownTask(str(exc)) from None
        async with self._log_builds:
            fd = os.memfd_create("farmnode-task-log", os.MFD_CLOEXEC)
            try:
                await asyncio.to_thread(control.write_log, fd, record,
                                        self.config.task_log_max_size * 1024 * 1024)
            except BaseException:
                os.close(fd)
                raise
        # sd-bus duplicates the fd into the reply as this coroutine returns (sdbus builds and
        # sends the reply in the same step of the loop): ours can go at the next step. Kept
        # longer, a burst of requests held a descriptor each until the limit was reached.
        asyncio.get_running_loop().call_soon(os.close, fd)
        return fd
