"""Typed values of the D-Bus objects: a task record and the agent, as their properties show.

Decoded once here from the store's records and the core's figures, so the objects, the CLI
and the HTTP API read the same fields under the same names. Units are systemd's: bytes,
microseconds since the epoch (0: never), and UINT64_MAX for a figure nobody measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from farmnode.tasks.store import TaskRecord

UNSET = 2**64 - 1  # systemd's "[not set]" for a uint64 figure
NONE_INT = -1  # tile, exit code, signal: none


def usec(seconds: float | None) -> int:
    return 0 if not seconds else int(seconds * 1_000_000)


def seconds(value: int) -> float | None:
    return value / 1_000_000 if value else None


# The record's accounting keys (farmnode.systemd.cgroup.read_accounting), each a field here.
ACCOUNTING_FIELDS = ("memory_peak", "memory_current", "tasks_current", "tasks_peak",
                     "oom_kills", "memory_max_events", "cpu_usage_usec")


def _figure(accounting: dict[str, int], key: str) -> int:
    value = accounting.get(key)
    return value if isinstance(value, int) and value >= 0 else UNSET


@dataclass(frozen=True)
class TaskView:
    """org.farmnode.Task1's properties, in D-Bus form (the field order is the XML's)."""

    id: int
    assignment_id: str
    job_id: int
    job_type: str
    frame: float
    tile: int
    attempt: int
    state: str
    reason: str
    progress: float
    unit: str
    exit_code: int
    exit_signal: int
    memory_current: int
    memory_peak: int
    cpu_usage_usec: int
    tasks_current: int
    tasks_peak: int
    oom_kills: int
    memory_max_events: int
    gpus: tuple[str, ...]
    created: int
    started: int
    finished: int

    @classmethod
    def of(cls, rec: TaskRecord, accounting: dict[str, int] | None = None) -> TaskView:
        acc = rec.accounting if accounting is None else accounting
        return cls(
            id=rec.id, assignment_id=rec.assignment_id, job_id=rec.job_id,
            job_type=rec.jobtype or "", frame=float(rec.frame),
            tile=NONE_INT if rec.tile is None else rec.tile, attempt=rec.attempt,
            state=str(rec.state), reason=rec.reason or "", progress=float(rec.progress),
            unit=rec.unit,
            exit_code=NONE_INT if rec.exit_code is None else rec.exit_code,
            exit_signal=NONE_INT if rec.signal is None else rec.signal,
            memory_current=_figure(acc, "memory_current"),
            memory_peak=_figure(acc, "memory_peak"),
            cpu_usage_usec=_figure(acc, "cpu_usage_usec"),
            tasks_current=_figure(acc, "tasks_current"),
            tasks_peak=_figure(acc, "tasks_peak"), oom_kills=_figure(acc, "oom_kills"),
            memory_max_events=_figure(acc, "memory_max_events"),
            gpus=tuple(rec.gpus), created=usec(rec.created), started=usec(rec.started),
            finished=usec(rec.finished))

    def with_accounting(self, accounting: dict[str, int]) -> TaskView:
        return dataclasses.replace(
            self, memory_current=_figure(accounting, "memory_current"),
            memory_peak=_figure(accounting, "memory_peak"),
            cpu_usage_usec=_figure(accounting, "cpu_usage_usec"),
            tasks_current=_figure(accounting, "tasks_current"),
            tasks_peak=_figure(accounting, "tasks_peak"),
            oom_kills=_figure(accounting, "oom_kills"),
            memory_max_events=_figure(accounting, "memory_max_events"))

    def changed(self, other: TaskView) -> list[str]:
        """The fields whose values differ from `other`'s."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_properties(cls, props: dict[str, Any]) -> TaskView:
        """From GetAll/GetManagedObjects of org.farmnode.Task1 (values already unwrapped)."""
        values: dict[str, Any] = {
            f.name: (tuple(props[name]) if f.name == "gpus" else props[name])
            for f, name in zip(dataclasses.fields(cls), TASK_PROPERTY_NAMES, strict=True)}
        return cls(**values)

    def updated(self, changed: dict[str, Any]) -> TaskView:
        """With PropertiesChanged's values (D-Bus names, values unwrapped) applied."""
        values: dict[str, Any] = {}
        for name, value in changed.items():
            field_name = TASK_FIELDS.get(name)
            if field_name is not None:
                values[field_name] = tuple(value) if field_name == "gpus" else value
        return dataclasses.replace(self, **values)

    def to_record_dict(self) -> dict[str, Any]:
        """The task as the agent's listings have always shown it (TaskRecord.to_dict)."""
        accounting = {key: getattr(self, key) for key in ACCOUNTING_FIELDS
                      if getattr(self, key) != UNSET}
        return {
            "id": self.id, "assignment_id": self.assignment_id, "job_id": self.job_id,
            "frame": self.frame, "tile": None if self.tile == NONE_INT else self.tile,
            "attempt": self.attempt, "state": self.state, "reason": self.reason or None,
            "progress": self.progress,
            "exit_code": None if self.exit_code == NONE_INT else self.exit_code,
            "signal": None if self.exit_signal == NONE_INT else self.exit_signal,
            "unit": self.unit, "jobtype": self.job_type, "accounting": accounting,
            "created": seconds(self.created), "started": seconds(self.started),
            "finished": seconds(self.finished), "gpus": list(self.gpus),
        }


# D-Bus name and signature of each TaskView field, in field order.
TASK_PROPERTIES: dict[str, tuple[str, str]] = {
    "id": ("Id", "x"), "assignment_id": ("AssignmentId", "s"), "job_id": ("JobId", "x"),
    "job_type": ("JobType", "s"), "frame": ("Frame", "d"), "tile": ("Tile", "x"),
    "attempt": ("Attempt", "u"), "state": ("State", "s"), "reason": ("Reason", "s"),
    "progress": ("Progress", "d"), "unit": ("Unit", "s"), "exit_code": ("ExitCode", "i"),
    "exit_signal": ("ExitSignal", "i"), "memory_current": ("MemoryCurrent", "t"),
    "memory_peak": ("MemoryPeak", "t"), "cpu_usage_usec": ("CPUUsageUSec", "t"),
    "tasks_current": ("TasksCurrent", "t"), "tasks_peak": ("TasksPeak", "t"),
    "oom_kills": ("OOMKills", "t"), "memory_max_events": ("MemoryMaxEvents", "t"),
    "gpus": ("GPUs", "as"),
    "created": ("CreatedUSec", "t"), "started": ("StartedUSec", "t"),
    "finished": ("FinishedUSec", "t"),
}
TASK_PROPERTY_NAMES = tuple(name for name, _sig in TASK_PROPERTIES.values())
TASK_FIELDS = {name: field_name for field_name, (name, _sig) in TASK_PROPERTIES.items()}
assert tuple(TASK_PROPERTIES) == tuple(f.name for f in dataclasses.fields(TaskView))


@dataclass(frozen=True)
class AgentView:
    """The agent's properties that change (org.farmnode.Agent1), in D-Bus form."""

    state: str
    free_ram: int  # MiB, as PyFarm counts it
    total_ram: int  # MiB
    cpus: float
    running_tasks: int
    assignments: tuple[str, ...]
    gpus_total: int
    gpus_free: int
    master_link: str  # standalone, unannounced or announced
    master_last_error: str
    last_master_contact: int  # usec since the epoch, 0: never
    queued_reports: int
    storage_error: str
    # What `farmnode status` shows besides: the same facts as GetStatus's record, typed.
    agent_hostname: str  # the FQDN once resolved (the kernel's name until then)
    farm_name: str  # "": none
    state_reason: str  # why the node is disabled when not by the admin; "": not
    jobs: tuple[int, ...]
    # (id, PCI slot, name, UUID or "", its /dev nodes, the assignment holding it or "")
    gpus: tuple[tuple[str, str, str, str, list[str], str], ...]
    master: str  # the master's API URL; "": standalone
    master_agent_id: str
    last_announce: int  # usec since the epoch, 0: never
    master_last_error_at: int  # usec since the epoch, 0: never
    master_time_offset: int  # s
    health_enabled: bool  # false: no farmnode-health.target, nothing gates work
    health_passed_once: bool
    health_interval: float  # s
    # (name, unit, ran, ok, detail, output, at: s since the epoch, 0 until it ran)
    health_checks: tuple[tuple[str, str, bool, bool, str, list[str], float], ...]
    workstation: bool  # workstation mode or a render schedule is in effect
    workstation_mode: bool
    render_schedule: str
    workstation_pause: str  # freeze or cpu-idle
    rendering: bool
    rendering_reason: str
    paused_since: float  # the workstation's clock; 0: not paused
    paused_units: tuple[str, ...]
    pause_errors: dict[str, str]  # scope: why it could not be paused or resumed
    last_pause: float  # s every scope took to pause; -1: never measured
    last_resume: float
    # (id, user, type, class, seat, tty, remote, active, idle hint, idle since (s since the
    # epoch, 0: never), counted)
    sessions: tuple[tuple[str, str, str, str, str, str, bool, bool, bool, float, bool], ...]


AGENT_PROPERTIES: dict[str, tuple[str, str]] = {
    "state": ("State", "s"), "free_ram": ("FreeRAM", "t"), "total_ram": ("TotalRAM", "t"),
    "cpus": ("CPUs", "d"), "running_tasks": ("RunningTasks", "u"),
    "assignments": ("Assignments", "as"), "gpus_total": ("GPUsTotal", "u"),
    "gpus_free": ("GPUsFree", "u"), "master_link": ("MasterLink", "s"),
    "master_last_error": ("MasterLastError", "s"),
    "last_master_contact": ("LastMasterContactUSec", "t"),
    "queued_reports": ("QueuedReports", "u"), "storage_error": ("StorageError", "s"),
    "agent_hostname": ("AgentHostname", "s"), "farm_name": ("FarmName", "s"),
    "state_reason": ("StateReason", "s"), "jobs": ("Jobs", "ax"),
    "gpus": ("GPUs", "a(ssssass)"), "master": ("Master", "s"),
    "master_agent_id": ("MasterAgentId", "s"), "last_announce": ("LastAnnounceUSec", "t"),
    "master_last_error_at": ("MasterLastErrorUSec", "t"),
    "master_time_offset": ("MasterTimeOffset", "x"),
    "health_enabled": ("HealthEnabled", "b"), "health_passed_once": ("HealthPassedOnce", "b"),
    "health_interval": ("HealthInterval", "d"),
    "health_checks": ("HealthChecks", "a(ssbbsasd)"), "workstation": ("Workstation", "b"),
    "workstation_mode": ("WorkstationMode", "b"), "render_schedule": ("RenderSchedule", "s"),
    "workstation_pause": ("WorkstationPause", "s"), "rendering": ("Rendering", "b"),
    "rendering_reason": ("RenderingReason", "s"), "paused_since": ("PausedSince", "d"),
    "paused_units": ("PausedUnits", "as"), "pause_errors": ("PauseErrors", "a{ss}"),
    "last_pause": ("LastPauseSec", "d"), "last_resume": ("LastResumeSec", "d"),
    "sessions": ("Sessions", "a(ssssssbbbdb)"),
}
assert tuple(AGENT_PROPERTIES) == tuple(f.name for f in dataclasses.fields(AgentView))


@dataclass(frozen=True)
class AgentFigures:
    """The agent's properties that change all the time (no PropertiesChanged: read them, as
    systemd's MemoryCurrent is read)."""

    uptime: int  # usec the agent has run (its own clock: a client's may be off)
    agent_process_ram: int  # MiB, the agent's own RSS
    consumed_ram: int  # MiB, the running tasks' scopes
    child_processes: int  # processes in the running tasks' scopes
    disks: list[tuple[str, int, int]]  # (mount point, size, free), bytes
    master_requests: int
    master_reports_sent: int
    master_reports_dropped: int


def agent_changes(old: AgentView | None, new: AgentView, ram_delta: int) -> list[str]:
    """The fields worth a PropertiesChanged: free RAM only once it moved by `ram_delta` MiB
    (it changes all the time; the master is told on the same terms)."""
    out = []
    for f in dataclasses.fields(new):
        before, after = (None if old is None else getattr(old, f.name)), getattr(new, f.name)
        if f.name == "free_ram" and old is not None:
            if abs(after - before) >= max(ram_delta, 1):
                out.append(f.name)
        elif before != after:
            out.append(f.name)
    return out


def changed_properties(view: object, fields: list[str], table: dict[str, tuple[str, str]],
                       ) -> dict[str, tuple[str, Any]]:
    """PropertiesChanged's a{sv} for these fields of a view."""
    out: dict[str, tuple[str, Any]] = {}
    for name in fields:
        dbus_name, sig = table[name]
        value = getattr(view, name)
        out[dbus_name] = (sig, list(value) if isinstance(value, tuple) else value)
    return out
