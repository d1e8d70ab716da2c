"""``pyfarm.jobtypes.core.jobtype``: `JobType` and `CommandData` as PyFarm 0.8 documents them.

One instance per assignment, constructed as ``JobType(assignment)`` with the assignment as the
master sent it (a dict: ``job``, ``jobtype``, ``tasks``). `start` runs the one process that
`get_command_data` describes and feeds its output, line by line, through the documented
hooks (preprocess → format → log → process, per stream); `process_stopped` asks
`is_successful`. Task states and progress, and the lines the log hooks keep, go to the sink
the host bound (`bind`): the host turns them into records for the agent.

Differences from PyFarm, each because of where this code runs (inside the task's scope, as the
job's user, never in the agent): the process runs as the job's user, so ``CommandData.user``
and ``group`` may only name that user and their groups; a `start` override must still run its
process through ``super().start()``. `prepare_for_job`, `cleanup_after_job` and
`spawn_persistent_process`, documented but never implemented in PyFarm 0.8, work in the job's
warm process (farmnode.jobtypes.pyfarm.warm), where a job type that names them runs.
"""

from __future__ import annotations

import enum
import grp
import os
import platform
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from farmnode.jobtypes.pyfarm.agent.config import config
from farmnode.jobtypes.pyfarm.jobtypes.core.internals import Cache, Process, System, TypeChecks
from farmnode.jobtypes.pyfarm.jobtypes.core.process import LineSplitter, ProcessProtocol, pump
from farmnode.pathmap import PathRule
from farmnode.pathmap import map_path as apply_path_map

PRIORITY_INFO = 6
PRIORITY_WARNING = 4
# Task states the agent reports for a job type (PyFarm's "paused" is the master's to set).
TASK_STATES = ("queued", "running", "done", "failed")
_VAR_RE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)
MB = 1024 * 1024
MAX_HOOK_REPORTS = 10  # per assignment; more would bury the job's own output


class JobTypeError(Exception):
    """A job type broke a rule of this API; the message says which, and fails the task."""


class Sink(Protocol):
    """Where a job type's decisions go (the host writes them as records for the agent)."""

    def line(self, stream: int, text: str, priority: int) -> None: ...

    def state(self, task_id: int, state: str, reason: str | None) -> None: ...

    def progress(self, task_id: int, progress: float) -> None: ...


class _Discard:
    def line(self, stream: int, text: str, priority: int) -> None:
        pass

    def state(self, task_id: int, state: str, reason: str | None) -> None:
        pass

    def progress(self, task_id: int, progress: float) -> None:
        pass


_sink: Sink = _Discard()
_node: dict[str, Any] = {}
# The node's path-mapping rules (jobtype_path_map), set by the host before the job type runs.
path_map: tuple[PathRule, ...] = ()


def bind(sink: Sink, node: Mapping[str, Any] | None = None) -> None:
    """Send every job type's output to ``sink``; ``node`` is what the agent says of itself."""
    global _sink
    _sink = sink
    _node.clear()
    _node.update(node or {})


class ExitReason(int):
    """How the process ended, for `JobType.is_successful`.

    PyFarm passed an int or a Twisted ProcessTerminated/Failure; this is an int (the exit
    code, or minus the signal number) that also has their attributes: ``exitCode`` (None when
    killed), ``signal`` (None when exited), and ``value`` (itself, as a Failure's would be).
    """

    exitCode: int | None
    signal: int | None

    def __new__(cls, returncode: int) -> ExitReason:
        self = super().__new__(cls, returncode)
        self.exitCode = returncode if returncode >= 0 else None
        self.signal = -returncode if returncode < 0 else None
        return self

    @property
    def value(self) -> ExitReason:
        return self

    def describe(self) -> str:
        if self.signal is not None:
            import signal as signals

            try:
                return f"killed by signal {signals.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return "success" if self.exitCode == 0 else f"exit code {self.exitCode}"


class CommandData:
    """What to execute: ``CommandData(command, *arguments, env=, cwd=, user=, group=)``.

    No path resolution happens here; job types use `JobType.map_path` for that.
    """

    def __init__(self, command: Any, *arguments: Any, **kwargs: Any) -> None:
        self.command = command
        self.arguments: tuple[Any, ...] = tuple(arguments)
        self.env: dict[str, str] | None = kwargs.pop("env", None)
        self.cwd: str | None = kwargs.pop("cwd", None)
        self.user: str | int | None = kwargs.pop("user", None)
        self.group: str | int | None = kwargs.pop("group", None)
        if kwargs:
            raise ValueError(f"CommandData got unexpected keyword(s): {', '.join(sorted(kwargs))}")

    def validate(self) -> None:
        """Check the attributes; numbers given as arguments become strings (PyFarm did too)."""
        if not isinstance(self.command, str) or not self.command:
            raise TypeError(f"CommandData.command must be a non-empty string, not "
                            f"{self.command!r}")
        fixed: list[str] = []
        for i, arg in enumerate(self.arguments):
            if isinstance(arg, bool) or not isinstance(arg, str | int | float):
                raise TypeError(f"CommandData argument {i} must be a string or a number, not "
                                f"{type(arg).__name__}")
            fixed.append(str(arg))
        self.arguments = tuple(fixed)
        if self.env is not None and (not isinstance(self.env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.env.items())):
            raise TypeError("CommandData.env must be a dict of strings to strings")
        if self.cwd is not None and (not isinstance(self.cwd, str) or not self.cwd):
            raise TypeError(f"CommandData.cwd must be a non-empty string, not {self.cwd!r}")
        for what in ("user", "group"):
            value = getattr(self, what)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, str | int)):
                raise TypeError(f"CommandData.{what} must be a name or an id, not {value!r}")

    def set_default_environment(self, value: Mapping[str, str]) -> None:
        if self.env is None:
            self.env = dict(value)


def _task_id(task: Any) -> int:
    if isinstance(task, Mapping) and "id" in task:
        return int(task["id"])
    if isinstance(task, int) and not isinstance(task, bool):
        return task
    raise TypeError(f"a task is the assignment's task dict (or its id), not {task!r}")


def _kept(result: Any, line: str) -> str:
    # PyFarm's line hooks return nothing by default; a string returned replaces the line.
    return line if result is None else str(result)


class JobType(Cache, System, Process, TypeChecks):
    """Base class of PyFarm job types; subclasses implement `get_command_data`."""

    COMMAND_DATA: type[CommandData] = CommandData
    COMMAND_DATA_CLASS: type[CommandData] = CommandData
    PROCESS_PROTOCOL: type[ProcessProtocol] = ProcessProtocol
    PERSISTENT_JOB_DATA: dict[Any, Any] = {}
    ASSIGNMENT_SCHEMA: Any = None

    def __init__(self, assignment: dict[str, Any]) -> None:
        self.assignment = assignment
        self.uuid = uuidlib.uuid4()
        self.finished_tasks: set[int] = set()
        self.failed_tasks: set[int] = set()
        # What prepare_for_job made for this job (in the job's warm process; see
        # farmnode.jobtypes.pyfarm.warm), as PyFarm documents PERSISTENT_JOB_DATA.
        self.persistent_job_data: Any = self.PERSISTENT_JOB_DATA.get(
            assignment.get("job", {}).get("id"))
        self.processes: dict[uuidlib.UUID, ProcessProtocol] = {}
        self.ran_process = False
        self.stopped_reason: ExitReason | None = None
        self.successful: bool | None = None
        self.hook_failures = 0
        self._task_ids = {int(t["id"]) for t in assignment.get("tasks", [])}
        self._states: dict[int, str] = {}
        self._tempdirs: list[str] = []
        self._tempdir: str | None = None
        self._stdout_line_fragments: dict[Any, str] = {}
        self._stderr_line_fragments: dict[Any, str] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(job={self.assignment.get('job', {}).get('id')})"

    # -- the class-level hooks PyFarm documents as not implemented ---------------------------
    @classmethod
    def load(cls, assignment: dict[str, Any]) -> Any:
        raise NotImplementedError("the agent loads job types (from its cache of the master's)")

    @classmethod
    def prepare_for_job(cls, job: int) -> Any:
        return None

    @classmethod
    def cleanup_after_job(cls, persistent_data: Any) -> None:
        return None

    @classmethod
    def spawn_persistent_process(cls, job: int, command_data: CommandData) -> Any:
        """The job's one persistent process on this node (a Popen, stdin a pipe), started
        once and kept until the job's warm process leaves."""
        from farmnode.jobtypes.pyfarm import warm

        command_data.validate()
        argv = [str(command_data.command), *map(str, command_data.arguments)]
        return warm.spawn(int(job), argv, command_data.env, command_data.cwd)

    # -- facts -------------------------------------------------------------------------------
    def node(self) -> dict[str, Any]:
        """Live facts about this host (PyFarm's keys)."""
        import psutil

        vm = psutil.virtual_memory()
        me = psutil.Process()
        consumed = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                consumed += child.memory_info().rss
            except psutil.Error:
                continue
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        return {
            "master_api": _node.get("master_api"),
            "hostname": _node.get("hostname") or socket.getfqdn(),
            "systemid": _node.get("systemid"),
            "id": _node.get("id"),
            "cpus": _node.get("cpus") or os.cpu_count(),
            "ram": _node.get("ram") or vm.total // MB,
            "total_ram": vm.total // MB,
            "free_ram": vm.available // MB,
            "consumed_ram": consumed // MB,
            "admin": os.getuid() == 0,
            "user": user,
            "case_sensitive_files": True,
            "case_sensitive_env": True,
            "machine_architecture": 64 if sys.maxsize > 2**32 else 32,
            "operating_system": "linux" if sys.platform.startswith("linux") else "other",
            "machine": platform.machine(),
        }

    def assignments(self) -> list[dict[str, Any]]:
        """The assignment's tasks."""
        tasks: list[dict[str, Any]] = self.assignment["tasks"]
        return tasks

    def tempdir(self, new: bool = False, remove_on_finish: bool = True) -> str:
        """A directory of the job's user for this assignment; the same one unless ``new``."""
        if self._tempdir is not None and not new:
            return self._tempdir
        path = tempfile.mkdtemp(prefix=f"farmnode-jobtype-{self.uuid}-")
        if remove_on_finish:
            self._tempdirs.append(path)
        if self._tempdir is None:
            self._tempdir = path
        return path

    def get_uid_gid(self, user: str | int | None, group: str | int | None,
                    ) -> tuple[int | None, int | None]:
        uid: int | None = None
        gid: int | None = None
        if user is not None:
            uid = user if isinstance(user, int) else pwd.getpwnam(user).pw_uid
        if group is not None:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        return uid, gid

    # -- environment and paths ---------------------------------------------------------------
    def get_environment(self) -> dict[str, str]:
        """The environment the agent built for the job (``job.environ`` included), with
        ``jobtype_default_environment`` under it."""
        defaults = config.get("jobtype_default_environment") or {}
        return {**{str(k): str(v) for k, v in dict(defaults).items()}, **os.environ}

    def get_command_list(self, cmdlist: Iterable[Any]) -> tuple[str, ...]:
        """The command as a read-only tuple of strings, variables expanded."""
        return tuple(self.expandvars(str(item)) for item in cmdlist)

    def expandvars(self, value: str, environment: Mapping[str, str] | None = None,
                   expand: bool | None = None) -> str:
        """Expand ``$VAR`` and ``${VAR}`` from ``environment`` (default: `get_environment`);
        unknown variables stay as written. ``expand`` defaults to ``jobtype_expandvars``."""
        if expand is None:
            expand = bool(config.get("jobtype_expandvars", True))
        if not expand or "$" not in value:
            return value
        env = self.get_environment() if environment is None else environment

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("{"):
                name = name[1:-1]
            return env.get(name, match.group(0))

        return _VAR_RE.sub(replace, value)

    def map_path(self, path: str) -> str:
        """The path for this node: variables expanded, the site's path-mapping rules, ``~``."""
        path = apply_path_map(self.expandvars(path), path_map)
        if path == "~" or path.startswith("~/"):
            home = self.get_environment().get("HOME")
            if home:
                return home + path[1:]
        return os.path.expanduser(path)

    # -- the command -------------------------------------------------------------------------
    def get_command_data(self) -> CommandData:
        """Override: return ``self.COMMAND_DATA(command, *arguments, env=..., cwd=...)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement get_command_data()")

    def before_start(self) -> None:
        pass

    def before_spawn_process(self, command: CommandData, protocol: ProcessProtocol) -> None:
        pass

    def process_started(self, protocol: ProcessProtocol) -> None:
        pass

    def process_stopped(self, protocol: ProcessProtocol, reason: Any) -> None:
        """Decide the assignment's outcome: `is_successful`, unless a task already failed."""
        self.successful = bool(self.is_successful(reason)) and not self.failed_tasks

    def start(self) -> ExitReason:
        """Run the assignment's one process to its end; returns how it ended."""
        self.before_start()
        command = self.get_command_data()
        if not isinstance(command, self.COMMAND_DATA_CLASS | CommandData):
            raise JobTypeError(
                f"get_command_data() returned {type(command).__name__}, not "
                f"{self.COMMAND_DATA_CLASS.__name__}")
        command.validate()
        command.set_default_environment(self.get_environment())
        self._check_identity(command)
        protocol = self.PROCESS_PROTOCOL(self)
        self.before_spawn_process(command, protocol)
        command.validate()  # before_spawn_process may change it
        assert command.env is not None
        protocol.process = subprocess.Popen(
            [command.command, *command.arguments], env=command.env, cwd=command.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ran_process = True
        self.processes[protocol.uuid] = protocol
        protocol.connectionMade()
        self.process_started(protocol)
        splitters = {0: LineSplitter(), 1: LineSplitter()}
        handlers: dict[int, Callable[[ProcessProtocol, str], None]] = {
            0: self.handle_stdout_line, 1: self.handle_stderr_line}
        fragments = {0: self._stdout_line_fragments, 1: self._stderr_line_fragments}

        def output(stream: int, text: str) -> None:
            self.process_output(protocol, text, fragments[stream], guarded[stream])

        def guard(stream: int) -> Callable[[ProcessProtocol, str], None]:
            handler = handlers[stream]

            def call(protocol: ProcessProtocol, line: str) -> None:
                # As for the agent's own job types: a hook that fails loses that one line's
                # processing, never the run.
                try:
                    handler(protocol, line)
                except Exception as exc:
                    self.hook_failures += 1
                    if self.hook_failures <= MAX_HOOK_REPORTS:
                        _sink.line(1, f"job type line hook failed: {self.format_error(exc)} "
                                      f"(line: {line[:200]!r})", PRIORITY_WARNING)

            return call

        guarded = {0: guard(0), 1: guard(1)}

        pump(protocol.process, output)
        for stream, frags in fragments.items():
            rest = frags.pop(protocol.uuid, "")
            for line in splitters[stream].feed(rest) + splitters[stream].close():
                guarded[stream](protocol, line)
        reason = ExitReason(protocol.process.wait())
        self.stopped_reason = reason
        protocol.processEnded(reason)
        self.process_stopped(protocol, reason)
        return reason

    def _check_identity(self, command: CommandData) -> None:
        # The process can only run as the job's user (this code already runs as them).
        uid, gid = os.getuid(), os.getgid()
        if command.user is not None:
            try:
                want, _ = self.get_uid_gid(command.user, None)
            except KeyError:
                raise JobTypeError(f"CommandData user {command.user!r} does not exist on "
                                   "this node") from None
            if want != uid:
                raise JobTypeError(
                    f"CommandData user {command.user!r} is not the job's user "
                    f"({pwd.getpwuid(uid).pw_name}): farmnode runs a job type's process as "
                    "the job's user only")
        if command.group is not None:
            try:
                _, want_gid = self.get_uid_gid(None, command.group)
            except KeyError:
                raise JobTypeError(f"CommandData group {command.group!r} does not exist on "
                                   "this node") from None
            if want_gid != gid:
                raise JobTypeError(
                    f"CommandData group {command.group!r} is not the job's group ({gid}): "
                    "farmnode runs a job type's process with the job user's group only")

    def stop(self, signal: str = "KILL") -> None:
        """Stop the running process with KILL, TERM or INT."""
        actions = {"KILL": "kill", "TERM": "terminate", "INT": "interrupt"}
        if signal not in actions:
            raise ValueError(f"stop(signal={signal!r}): use KILL, TERM or INT")
        for protocol in self.processes.values():
            getattr(protocol, actions[signal])()

    def is_successful(self, reason: Any) -> bool:
        """True when the process exited 0; ``reason`` is an `ExitReason`."""
        if isinstance(reason, ExitReason):
            return reason.exitCode == 0
        if isinstance(reason, int):
            return reason == 0
        # what a Twisted ProcessTerminated, or a Failure wrapping one, would carry
        for obj in (reason, getattr(reason, "value", None)):
            if obj is not None and hasattr(obj, "exitCode"):
                return bool(obj.exitCode == 0)
        raise NotImplementedError(f"cannot tell success from {reason!r}")

    def cleanup(self) -> None:
        for path in self._tempdirs:
            shutil.rmtree(path, ignore_errors=True)
        self._tempdirs.clear()

    # -- task state --------------------------------------------------------------------------
    def format_error(self, error: Any) -> str:
        if isinstance(error, BaseException):
            return f"{type(error).__name__}: {error}"
        message = getattr(error, "getErrorMessage", None)
        if callable(message):
            return str(message())
        return str(error)

    def set_task_state(self, task: Any, state: Any, error: Any = None) -> None:
        task_id = _task_id(task)
        if task_id not in self._task_ids:
            raise JobTypeError(f"task {task_id} is not part of this assignment")
        name = str(state.value if isinstance(state, enum.Enum) else state).lower()
        if name not in TASK_STATES:
            raise JobTypeError(f"task state {state!r}: a job type may set "
                               f"{', '.join(TASK_STATES)}")
        reason = self.format_error(error) if error is not None else None
        if self._states.get(task_id) == name and reason is None:
            return
        self._states[task_id] = name
        if name == "done":
            self.finished_tasks.add(task_id)
            self.failed_tasks.discard(task_id)
        elif name == "failed":
            self.failed_tasks.add(task_id)
            self.finished_tasks.discard(task_id)
        _sink.state(task_id, name, reason)

    def set_states(self, tasks: Iterable[Any], state: Any, error: Any = None) -> None:
        for task in tasks:
            self.set_task_state(task, state, error)

    def get_local_task_state(self, task_id: int) -> str | None:
        return self._states.get(int(task_id))

    def set_task_progress(self, task: Any, progress: float) -> None:
        task_id = _task_id(task)
        if task_id not in self._task_ids:
            raise JobTypeError(f"task {task_id} is not part of this assignment")
        value = float(progress)
        if value != value:  # NaN
            raise JobTypeError(f"progress of task {task_id} is NaN")
        _sink.progress(task_id, min(1.0, max(0.0, value)))

    # -- output ------------------------------------------------------------------------------
    def process_output(self, protocol: ProcessProtocol, output: str,
                       line_fragments: dict[Any, str],
                       line_handler: Callable[[ProcessProtocol, str], None]) -> None:
        """Split output into whole lines for ``line_handler``; the rest waits in
        ``line_fragments``."""
        splitter = LineSplitter()
        splitter.pending = line_fragments.pop(protocol.uuid, "")
        lines = splitter.feed(output)
        if splitter.pending:
            line_fragments[protocol.uuid] = splitter.pending
        for line in lines:
            line_handler(protocol, line)

    def handle_stdout_line(self, protocol: ProcessProtocol, stdout: str) -> None:
        line = _kept(self.preprocess_stdout_line(protocol, stdout), stdout)
        line = _kept(self.format_stdout_line(protocol, line), line)
        self.log_stdout_line(protocol, line)
        self.process_stdout_line(protocol, line)

    def handle_stderr_line(self, protocol: ProcessProtocol, stderr: str) -> None:
        line = _kept(self.preprocess_stderr_line(protocol, stderr), stderr)
        line = _kept(self.format_stderr_line(protocol, line), line)
        self.log_stderr_line(protocol, line)
        self.process_stderr_line(protocol, line)

    def preprocess_stdout_line(self, protocol: ProcessProtocol, stdout: str) -> str | None:
        return None

    def preprocess_stderr_line(self, protocol: ProcessProtocol, stderr: str) -> str | None:
        return None

    def format_stdout_line(self, protocol: ProcessProtocol, stdout: str) -> str | None:
        return None

    def format_stderr_line(self, protocol: ProcessProtocol, stderr: str) -> str | None:
        return None

    def log_stdout_line(self, protocol: ProcessProtocol, stdout: str) -> None:
        _sink.line(0, stdout, PRIORITY_INFO)

    def log_stderr_line(self, protocol: ProcessProtocol, stderr: str) -> None:
        _sink.line(1, stderr, PRIORITY_WARNING)

    def process_stdout_line(self, protocol: ProcessProtocol, stdout: str) -> None:
        pass

    def process_stderr_line(self, protocol: ProcessProtocol, stderr: str) -> None:
        self.process_stdout_line(protocol, stderr)
