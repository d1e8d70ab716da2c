"""The contract of job types that run their assignments in the job's warm process.

Owns: WarmProcess (what the persistent process is), WarmJobType (a job type that asks for one:
the agent starts or reuses it before the task's shim and gives the task the host's socket).
The task's own command is farmnode.warm.client, which hands the job type's commands over.
"""

from __future__ import annotations

import abc
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from farmnode.jobtypes.base import (
    PRIORITY_ERR,
    CommandData,
    ExitStatus,
    JobType,
    Stream,
    format_frame,
)
from farmnode.warm import client, executor

CLIENT_PATH = client.__file__
EXECUTOR_PATH = executor.__file__
DEFAULT_IDLE_TIMEOUT = 300.0
MAX_REQUEST = 120 * 1024


@dataclass(frozen=True)
class WarmProcess:
    """One persistent process per job on this node.

    ``argv`` runs farmnode.warm.executor's protocol (EXECUTOR_PATH: a Python interpreter runs
    it directly, a DCC through its own way of running a script). ``setup``/``teardown`` run
    once in it: at the start of its first task, and before it leaves. It leaves after
    ``idle_timeout`` seconds with no task, and after the assignment holding ``last_frame``
    (the job's last frame, when the job type knows it) ends."""

    argv: tuple[str, ...]
    setup: tuple[str, ...] = ()
    teardown: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    last_frame: float | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and a and "\0" not in a
                                    for a in self.argv):
            raise ValueError("WarmProcess.argv must be non-empty strings without NUL")
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout > 0):
            raise ValueError("WarmProcess.idle_timeout must be a positive number of seconds")

    def holds_last_frame(self, frames: list[float]) -> bool:
        return self.last_frame is not None and any(abs(f - self.last_frame) <= 1e-6
                                                   for f in frames)


class WarmJobType(JobType):
    """A job type whose commands (Python source, for the executor) run in the job's warm
    process, once per frame of the assignment, with ``frame``, ``task``, ``job`` set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The host's reason when the warm process failed the task (the client's record).
        self.warm_error: str | None = None
        self._warm_priority: int | None = None

    @abc.abstractmethod
    def warm_process(self) -> WarmProcess:
        """The job's persistent process. Raise ValueError for unusable ``job.data``."""

    @abc.abstractmethod
    def commands(self) -> list[str]:
        """The commands each frame runs, in order; the first that raises fails the task."""

    def request(self) -> dict[str, Any]:
        items = []
        for frame in self.frames:
            tasks = self.tasks_for_frame(frame)
            items.append({"label": format_frame(frame),
                          "vars": {"frame": frame, "task": tasks[0].id, "job": self.job.id,
                                   "assignment": self.assignment.id}})
        return {"op": "run", "tasks": [t.id for t in self.tasks], "commands": self.commands(),
                "items": items}

    def get_command_data(self) -> CommandData:
        warm = self.warm_process()  # its errors fail the task before anything starts
        request = json.dumps(self.request())
        if len(request.encode()) > MAX_REQUEST:
            # One argv string (the kernel's MAX_ARG_STRLEN) and one packet to the host.
            raise ValueError(f"job.data: one assignment's commands take {len(request)} bytes "
                             f"(at most {MAX_REQUEST}): put the code in a module the setup "
                             "imports")
        return self.make_command_data(sys.executable, ["-I", "-S", CLIENT_PATH, request],
                                      cwd=warm.cwd)

    def handle_line(self, stream: Stream, line: str) -> str | None:
        self._warm_priority = None
        if stream == Stream.STDERR and line.startswith(client.RECORD):
            self.warm_error = line[len(client.RECORD):]
            self._warm_priority = PRIORITY_ERR
            return f"farmnode-warm: {self.warm_error}"
        return super().handle_line(stream, line)

    def line_priority(self, stream: Stream, line: str) -> int:
        if self._warm_priority is not None:
            return self._warm_priority
        return super().line_priority(stream, line)

    def failure_reason(self, status: ExitStatus) -> str:
        return self.warm_error or super().failure_reason(status)
