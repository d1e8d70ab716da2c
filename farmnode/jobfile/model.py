"""A job file's jobs after validation: typed, frozen, and ready to become assignments.

`farmnode.jobfile.parse` is the only place that builds these from a file; everything
downstream (the node's own queue, the submission to a master) trusts their types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrameRange:
    start: float
    end: float
    by: float = 1.0
    batch: int = 1  # frames per assignment

    def frames(self) -> list[float]:
        # Counted, not accumulated: start + i*by does not drift as a running sum of
        # fractional steps does, so `end` is reached exactly when it is on the grid.
        count = int((self.end - self.start) / self.by + 1e-9) + 1
        return [self.start + i * self.by for i in range(count)]

    def batches(self) -> list[list[float]]:
        frames = self.frames()
        return [frames[i:i + self.batch] for i in range(0, len(frames), self.batch)]


@dataclass(frozen=True)
class JobSpec:
    """One job of the file. `line` is where it starts in the source (before Jinja)."""

    id: str
    jobtype: str
    frames: FrameRange
    line: int
    title: str | None = None
    jobtype_version: int = 1
    data: dict[str, Any] = field(default_factory=dict)
    ram: int | None = None
    ram_max: int | None = None
    cpus: float | None = None
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    dependencies: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "jobtype": self.jobtype,
            "jobtype_version": self.jobtype_version, "data": self.data,
            "start": self.frames.start, "end": self.frames.end, "by": self.frames.by,
            "batch": self.frames.batch, "ram": self.ram, "ram_max": self.ram_max,
            "cpus": self.cpus, "environment": self.environment, "user": self.user,
            "dependencies": list(self.dependencies), "line": self.line,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobSpec:
        """Read back what to_json stored (the queue's own rows, validated when submitted)."""
        return cls(
            id=d["id"], title=d["title"], jobtype=d["jobtype"],
            jobtype_version=d["jobtype_version"], data=d["data"],
            frames=FrameRange(d["start"], d["end"], d["by"], d["batch"]), ram=d["ram"],
            ram_max=d["ram_max"], cpus=d["cpus"], environment=d["environment"],
            user=d["user"], dependencies=tuple(d["dependencies"]), line=d["line"],
        )


@dataclass(frozen=True)
class JobFile:
    """The jobs of one file, in an order where each job comes after its dependencies."""

    name: str
    jobs: tuple[JobSpec, ...]
