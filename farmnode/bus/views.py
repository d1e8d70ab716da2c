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


AGENT_PROPERTIES: dict[str, tuple[str, str]] = {
    "state": ("State", "s"), "free_ram": ("FreeRAM", "t"), "total_ram": ("TotalRAM", "t"),
    "cpus": ("CPUs", "d"), "running_tasks": ("RunningTasks", "u"),
    "assignments": ("Assignments", "as"), "gpus_total": ("GPUsTotal", "u"),
    "gpus_free": ("GPUsFree", "u"), "master_link": ("MasterLink", "s"),
    "master_last_error": ("MasterLastError", "s"),
    "last_master_contact": ("LastMasterContactUSec", "t"),
    "queued_reports": ("QueuedReports", "u"), "storage_error": ("StorageError", "s"),
}
assert tuple(AGENT_PROPERTIES) == tuple(f.name for f in dataclasses.fields(AgentView))


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
