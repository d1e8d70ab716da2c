"""The job type contract: `JobType`, the `CommandData` it returns, and what the agent hands it.

Owns: CommandData, ExitStatus, Stream, TaskReporter, JobType, format_frame and the syslog
priority constants job types use. May import: farmnode.tasks.model and farmnode.config only.

Calling convention (the agent's side, summarised so job type authors know what to expect):

1. ``jt = cls(assignment, reporter, expandvars=..., default_user=...)``
2. ``cmd = jt.get_command_data()``; the agent spawns ``cmd.argv`` in the assignment's scope,
   without a shell, with exactly ``cmd.env`` as the environment.
3. For every complete output line (terminator removed), in order per stream:
   ``out = jt.handle_line(stream, line)``; if ``out`` is not None the agent writes it to journald
   with ``PRIORITY=jt.line_priority(stream, out)``.
4. When the process has ended: ``jt.is_successful(status)``. Tasks not yet finished are then
   marked done or failed by the agent, not by the job type.

Every hook runs synchronously in the agent's event loop, so hooks must be quick and must not
block. An exception raised by any hook is caught and logged by the agent, which then fails the
assignment (from `get_command_data`) or drops that one line's processing (from line hooks);
raising ValueError with a message that names the offending ``job.data`` key is the expected
way to reject bad job data.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import itertools
import math
import os
import pwd
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from farmnode.pathmap import PathRule, map_data, map_path
from farmnode.tasks.model import Assignment, Job, Task, TaskState

# syslog(3) priorities, as journald's PRIORITY= field wants them.
PRIORITY_ERR = 3
PRIORITY_WARNING = 4
PRIORITY_INFO = 6

# Deliberately minimal: the agent runs as root under systemd and its own environment (NOTIFY_SOCKET,
# LISTEN_FDS, credentials directories, ...) must never leak into a job.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SAFE_LANG = "C.UTF-8"

_FRAME_TOLERANCE = 1e-6


def format_frame(frame: float) -> str:
    """Render a frame number the way humans and renderers expect: ``1.0`` → ``"1"``."""
    if math.isfinite(frame) and frame == int(frame):
        return str(int(frame))
    return repr(float(frame))


def _has_nul(value: str) -> bool:
    return "\0" in value


# job.data keys the agent itself reads (the GPUs a job asks for): every job type takes them.
AGENT_DATA_KEYS = frozenset({"gpus"})


@dataclass(frozen=True)
class CommandData:
    """What to execute for an assignment; the agent spawns it without a shell.

    ``command`` is a program path or a name looked up in ``env["PATH"]``. ``env`` is the complete
    environment (nothing is inherited from the agent). ``user``/``group`` are names or numeric
    strings; None means the agent's default.
    """

    command: str
    arguments: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not self.command:
            raise ValueError("CommandData.command must be a non-empty string")
        if isinstance(self.arguments, list):
            # Frozen, so coerce via object.__setattr__; a list here is an easy caller slip and
            # a tuple keeps the instance hashable-by-content and safe to share.
            object.__setattr__(self, "arguments", tuple(self.arguments))
        if not isinstance(self.arguments, tuple):
            raise TypeError("CommandData.arguments must be a tuple of strings")
        checks: list[tuple[str, object]] = [("command", self.command)]
        checks += [(f"arguments[{i}]", a) for i, a in enumerate(self.arguments)]
        checks += [("cwd", self.cwd), ("user", self.user), ("group", self.group)]
        for key, env_value in self.env.items():
            checks += [(f"env key {key!r}", key), (f"env[{key!r}]", env_value)]
            # execve() splits "K=V" at the first '=', so a key holding one would silently
            # become a different variable.
            if not key or "=" in key:
                raise ValueError(f"CommandData env key {key!r} must be non-empty without '='")
        for what, value in checks:
            if value is None and what in ("cwd", "user", "group"):
                continue
            if not isinstance(value, str):
                raise TypeError(f"CommandData.{what} must be a string, not {type(value).__name__}")
            if _has_nul(value):
                raise ValueError(f"CommandData.{what} contains a NUL byte")
        if self.cwd is not None and not self.cwd:
            raise ValueError("CommandData.cwd must be None or a non-empty path")

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.command, *self.arguments)


@dataclass(frozen=True)
class ExitStatus:
    """How the process ended: exactly one of ``code`` (exited) or ``signal`` (killed) is set."""

    code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError("ExitStatus needs exactly one of code or signal")

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """From `subprocess`'s convention, where ``-N`` means killed by signal N."""
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal_name}"
        if self.code == 0:
            return "success"
        return f"exit code {self.code}"


class Stream(enum.IntEnum):
    """Which pipe a line came from; PyFarm's numbering, also used for journald's FARMNODE_STREAM."""

    STDOUT = 0
    STDERR = 1


class TaskReporter(Protocol):
    """Where task state and progress go; the agent's implementation persists and forwards them."""

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None: ...

    def set_task_progress(self, task_id: int, progress: float) -> None: ...


_VAR_RE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)


class JobType(abc.ABC):
    """Base class of every job type: one instance per assignment, one process per assignment.

    Subclasses set `name` and implement `get_command_data`; the line hooks, `line_priority` and
    `is_successful` are optional override points. Instances are not thread-safe; the agent calls
    them from its event loop only.
    """

    name: ClassVar[str]
    # The signal the agent sends first when stopping the assignment (PyFarm's stop(signal=...));
    # SIGKILL of the whole scope follows after the grace period.
    stop_signal: ClassVar[int] = signal.SIGTERM
    # Master-side job type versions this implementation accepts; None accepts any. The master
    # versions job type *code* it would ship to PyFarm agents; we never run shipped code, so a
    # version only matters where an implementation knows it cannot honour it.
    supported_versions: ClassVar[frozenset[int] | None] = None

    def __init__(
        self,
        assignment: Assignment,
        reporter: TaskReporter,
        *,
        expandvars: bool = True,
        default_user: str | None = None,
        path_map: tuple[PathRule, ...] = (),
    ) -> None:
        if not assignment.tasks:
            raise ValueError(f"assignment {assignment.id} has no tasks")
        # The site's rules apply to the job's data before the job type sees it, and again in
        # map_path to paths the job type builds (the rules are idempotent by construction).
        if path_map:
            data = map_data(assignment.job.data, path_map)
            job = dataclasses.replace(assignment.job, data=data)
            assignment = dataclasses.replace(assignment, job=job)
        self.path_map = path_map
        self.assignment = assignment
        self.reporter = reporter
        self.expandvars_enabled = expandvars
        self.default_user = default_user
        self._tasks_by_id: dict[int, Task] = {t.id: t for t in assignment.tasks}
        self._states: dict[int, TaskState] = {}
        self._progress: dict[int, float] = {}
        self._environment: dict[str, str] | None = None

    # -- assignment helpers -------------------------------------------------------------------

    @property
    def job(self) -> Job:
        return self.assignment.job

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.assignment.tasks

    @property
    def frames(self) -> list[float]:
        """The assignment's distinct frames, ascending (tiles of one frame count once)."""
        return sorted({float(t.frame) for t in self.assignment.tasks})

    @property
    def start(self) -> float:
        return self.frames[0]

    @property
    def end(self) -> float:
        return self.frames[-1]

    def _step(self) -> float | None:
        frames = self.frames
        if len(frames) == 1:
            return self.job.by if self.job.by > 0 else 1.0
        step = frames[1] - frames[0]
        if all(abs((b - a) - step) <= _FRAME_TOLERANCE for a, b in itertools.pairwise(frames)):
            return step
        return None

    @property
    def by(self) -> float:
        """The step between the assignment's frames; ``job.by`` for a single frame.

        Raises ValueError when the frames are not evenly spaced (a batch with holes, e.g. after
        a retry): a renderer given start/end/by would then render frames nobody assigned.
        """
        step = self._step()
        if step is None:
            shown = ", ".join(format_frame(f) for f in self.frames)
            raise ValueError(f"the assignment's frames ({shown}) are not evenly spaced")
        return step

    @property
    def is_evenly_spaced(self) -> bool:
        return self._step() is not None

    def tasks_for_frame(self, frame: float) -> list[Task]:
        """The tasks (one per tile) rendering ``frame``; empty when it is not ours."""
        return [t for t in self.assignment.tasks if abs(t.frame - frame) <= _FRAME_TOLERANCE]

    def task(self, task_id: int) -> Task:
        try:
            return self._tasks_by_id[task_id]
        except KeyError:
            raise ValueError(
                f"task {task_id} is not part of assignment {self.assignment.id}"
            ) from None

    # -- task reporting -----------------------------------------------------------------------

    @property
    def task_states(self) -> Mapping[int, TaskState]:
        """States set through this instance (PyFarm's finished/failed_tasks); unset ids absent."""
        return dict(self._states)

    def task_progress(self, task_id: int) -> float | None:
        return self._progress.get(self.task(task_id).id)

    def is_task_finished(self, task_id: int) -> bool:
        state = self._states.get(self.task(task_id).id)
        return state is not None and state.finished

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        """Report a state change; repeats of the current state are not forwarded.

        Renderers repeat the line that implies "running" hundreds of times per frame; forwarding
        each would flood the master with identical reports.
        """
        task = self.task(task_id)
        if self._states.get(task.id) == state:
            return
        self._states[task.id] = state
        self.reporter.set_task_state(task.id, state, reason)

    def set_task_progress(self, task_id: int, progress: float) -> None:
        """Report progress (clamped to 0..1); unchanged values and finished tasks are skipped.

        A finished task's progress is final: late output must not show a done frame at 30 %.
        """
        task = self.task(task_id)
        if math.isnan(progress):
            raise ValueError(f"progress for task {task.id} is NaN")
        progress = min(1.0, max(0.0, float(progress)))
        if self.is_task_finished(task.id) or self._progress.get(task.id) == progress:
            return
        self._progress[task.id] = progress
        self.reporter.set_task_progress(task.id, progress)

    # -- command ------------------------------------------------------------------------------

    @property
    def run_user(self) -> str | None:
        """The account the process runs as: the job's user, else the agent's default.

        Render farms share accounts with their file servers (NIS/LDAP/sssd), so the submitter's
        name is what the renders' files must belong to; a name unknown on this node fails the
        task with that reason (the agent checks), rather than silently running as someone else.
        """
        return self.job.user or self.default_user

    def default_environment(self) -> dict[str, str]:
        env = {
            "PATH": SAFE_PATH,
            "LANG": SAFE_LANG,
            "FARMNODE_JOB": str(self.job.id),
            "FARMNODE_ASSIGNMENT": self.assignment.id,
            "FARMNODE_FRAMES": " ".join(format_frame(f) for f in self.frames),
        }
        user = self.run_user
        if user is not None:
            # Renderers keep caches and preferences under $HOME; without it they write to '/'
            # or refuse to start.
            try:
                pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            except KeyError:
                pass
            else:
                env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        return env

    def get_environment(self) -> dict[str, str]:
        """The process environment: `default_environment` with ``job.environ`` over it."""
        if self._environment is None:
            self._environment = {**self.default_environment(), **self.job.environ}
        return dict(self._environment)

    def checked_data(self, allowed: frozenset[str]) -> dict[str, Any]:
        """job.data, refusing keys this job type does not know (a typo must not be ignored)."""
        data = self.job.data
        unknown = sorted(set(data) - allowed - AGENT_DATA_KEYS)
        if unknown:
            names = ", ".join(sorted(allowed))
            raise ValueError(f"job.data.{unknown[0]}: unknown key (allowed: {names})")
        return data

    def make_command_data(
        self,
        command: str,
        arguments: list[str] | tuple[str, ...],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandData:
        """Build CommandData with this job's environment (``env`` on top) and run user."""
        return CommandData(
            command=command,
            arguments=tuple(arguments),
            env={**self.get_environment(), **(env or {})},
            cwd=cwd,
            user=self.run_user,
        )

    @abc.abstractmethod
    def get_command_data(self) -> CommandData:
        """The one process for this assignment. Raise ValueError for unusable ``job.data``."""

    def expandvars(self, value: str, environment: Mapping[str, str] | None = None) -> str:
        """Expand ``$VAR``/``${VAR}`` from ``environment``, then the job's environment.

        Like `os.path.expandvars`, unknown variables are left as written. Returns ``value``
        untouched when expansion is disabled (PyFarm's ``jobtype_expandvars``). The agent's own
        environment is never consulted: it is not the job's.
        """
        if not self.expandvars_enabled or "$" not in value:
            return value
        job_env = self.get_environment()

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("{"):
                name = name[1:-1]
            if environment is not None and name in environment:
                return environment[name]
            return job_env.get(name, match.group(0))

        return _VAR_RE.sub(replace, value)

    def get_hooks(self, pre: list[str] | None,
                  post: list[str] | None) -> tuple[list[str] | None, list[str] | None]:
        """The commands run before and after this assignment, in its scope as the job's user;
        given the node's (task_pre_hook, task_post_hook), None where there is none. Override
        to add or replace them for this job type."""
        return pre, post

    def map_path(self, path: str, environment: Mapping[str, str] | None = None) -> str:
        """Translate a path from the job for this node: variables expanded (as `expandvars`),
        then the site's path-mapping rules (`jobtype_path_map`), then ``~`` (a bare ``~`` means
        the job's ``$HOME``).
        """
        path = map_path(self.expandvars(path, environment), self.path_map)
        if path == "~" or path.startswith("~/"):
            home = (environment or {}).get("HOME") or self.get_environment().get("HOME")
            if home is not None:
                return home + path[1:]
        return os.path.expanduser(path)

    # -- output -------------------------------------------------------------------------------

    def handle_line(self, stream: Stream, line: str) -> str | None:
        """Run one line through preprocess → process → format; return what to log, or None.

        Processing sees the preprocessed line, not the formatted one (PyFarm processed after
        formatting): formatting is for humans reading the journal and must not be able to break
        progress parsing.
        """
        if stream == Stream.STDOUT:
            pre = self.preprocess_stdout_line(line)
            if pre is None:
                return None
            self.process_stdout_line(pre)
            return self.format_stdout_line(pre)
        pre = self.preprocess_stderr_line(line)
        if pre is None:
            return None
        self.process_stderr_line(pre)
        return self.format_stderr_line(pre)

    def preprocess_stdout_line(self, line: str) -> str | None:
        """Rewrite a raw line before anything else sees it; None drops it from hooks and log."""
        return line

    def preprocess_stderr_line(self, line: str) -> str | None:
        return line

    def process_stdout_line(self, line: str) -> None:
        """Parse progress or state from a line; the default does nothing."""
        return None

    def process_stderr_line(self, line: str) -> None:
        """Defaults to `process_stdout_line`, as in PyFarm: renderers mix progress into both."""
        self.process_stdout_line(line)

    def format_stdout_line(self, line: str) -> str:
        """The text written to the journal for a stdout line."""
        return line

    def format_stderr_line(self, line: str) -> str:
        return line

    def line_priority(self, stream: Stream, line: str) -> int:
        """The syslog priority for a (formatted) line: info for stdout, warning for stderr."""
        return PRIORITY_WARNING if stream == Stream.STDERR else PRIORITY_INFO

    def is_successful(self, status: ExitStatus) -> bool:
        """Whether the process succeeded; the default is PyFarm's: exit code 0."""
        return status.code == 0

    def failure_reason(self, status: ExitStatus) -> str:
        """Why an unsuccessful run failed: the reason the master shows (``last_error``)."""
        return status.describe()
