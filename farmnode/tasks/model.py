"""The assignment as the master sends it (PyFarm's schema), after validation.

These are plain frozen dataclasses: `farmnode.tasks.schema.parse_assignment` is the only
place that builds them from untrusted input, so everything downstream may trust the types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


@dataclass(frozen=True)
class StateChange:
    """One task's move to a new state, as a run reports it (a batch ends many at once)."""

    task_id: int
    state: TaskState
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class Job:
    id: int
    by: float
    title: str | None = None
    user: str | None = None
    ram: int | None = None  # MB the job expects to need
    cpus: float | None = None
    ram_warning: int | None = None
    ram_max: int | None = None  # MB, hard limit
    batch: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)
    notified_users: list[Any] = field(default_factory=list)
    priority: int | None = None
    job_group_id: int | None = None
    job_group: str | None = None
    notes: str | None = None
    tags: list[str] = field(default_factory=list)
    num_tiles: int | None = None
    # PyFarm's JOB_SCHEMA accepts it (an old integer agent id); kept so such a master is not
    # refused, but nothing relies on it: agent ids are UUIDs since PyFarm 0.8.
    agent_id: int | None = None


@dataclass(frozen=True)
class JobTypeRef:
    name: str
    version: int


@dataclass(frozen=True)
class Task:
    id: int
    frame: float
    tile: int | None = None
    attempt: int = 0


@dataclass(frozen=True)
class Assignment:
    id: str  # uuid chosen by the agent (PyFarm: the assignment uuid returned by /assign)
    job: Job
    jobtype: JobTypeRef
    tasks: tuple[Task, ...]

    @property
    def task_ids(self) -> tuple[int, ...]:
        return tuple(t.id for t in self.tasks)
