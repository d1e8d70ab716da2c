"""Job types downloaded from the master: cached on disk, run inside the task's scope.

PyFarm's master serves a job type's Python source (GET /jobtypes/<name>/versions/<v>). That
code must never run in the root agent: the agent runs `farmnode.jobtypes.remote_host` as the
task's command, inside the scope and as the task's user; the host imports the downloaded
class, runs the real command and its line hooks, and writes what they decide — lines to log,
task states, progress, the reason of a failure — as marked records on its stdout.
`RemoteJobType` on the agent's side only decodes those records, so a hostile job type can do
no more than the task's user can. The source may be PyFarm's (``from
pyfarm.jobtypes.core.jobtype import JobType``; the host provides those import paths, see
`farmnode.jobtypes.pyfarm`) or a farmnode job type.

Cache: <jobtype_cache_directory>/<name>/<version>/<sha256>.py with <sha256>.json (its class
name); the newest download of a name+version is used when the master is unreachable, and a
changed source under the same version is a new file (PyFarm never refreshed its cache).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from farmnode.jobtypes.base import CommandData, ExitStatus, JobType, Stream
from farmnode.tasks.model import TaskState
from farmnode.warm import client as warm_client
from farmnode.warm.jobtype import EXECUTOR_PATH, WarmJobType, WarmProcess

MARK = "\x1e"  # ASCII record separator: never the start of a renderer's line
HOST_MODULE = "farmnode.jobtypes.remote_host"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class RemoteJobTypeError(RuntimeError):
    pass


def cache_store(cache_dir: str | Path, name: str, version: int, classname: str,
                code: str) -> Path:
    """Keep a downloaded job type; the same source is stored once."""
    if not _NAME.match(name) or not classname.isidentifier():
        raise RemoteJobTypeError(f"refusing job type record: name {name!r}, class {classname!r}")
    digest = hashlib.sha256(code.encode()).hexdigest()
    folder = Path(cache_dir) / name / str(version)
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    path = folder / f"{digest}.py"
    for target, text in ((path, code), (folder / f"{digest}.json",
                                        json.dumps({"classname": classname}))):
        if not target.exists():
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)  # the task's user must be able to read it
            os.replace(tmp, target)
    os.utime(path)  # newest use wins when the master is away
    return path


def cache_latest(cache_dir: str | Path, name: str, version: int) -> tuple[Path, str] | None:
    folder = Path(cache_dir) / name / str(version)
    candidates = sorted(folder.glob("*.py"), key=lambda p: p.stat().st_mtime) \
        if folder.is_dir() else []
    for path in reversed(candidates):
        meta = path.with_suffix(".json")
        try:
            return path, str(json.loads(meta.read_text())["classname"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def remote_jobtype_class(module_path: Path, classname: str) -> type[JobType]:
    """A JobType for the agent's side of one downloaded job type."""
    base = WarmRemoteJobType if uses_persistent_hooks(module_path) else RemoteJobType
    return type(f"Remote{classname}", (base,),
                {"module_path": str(module_path), "classname": classname})


PERSISTENT_HOOKS = frozenset({"prepare_for_job", "cleanup_after_job",
                              "spawn_persistent_process"})


def uses_persistent_hooks(module_path: Path | str) -> bool:
    """Whether the source names one of PyFarm's job-level hooks: then the job's assignments
    run in its warm process (farmnode.jobtypes.pyfarm.warm). The source is only parsed here,
    never run (the agent runs no downloaded code); what cannot be parsed runs as before and
    fails in the task's scope with the file and line."""
    try:
        with open(module_path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), str(module_path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = node.name
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        else:
            continue
        if name in PERSISTENT_HOOKS:
            return True
    return False


class RemoteJobType(JobType):
    name: ClassVar[str] = "remote"
    module_path: ClassVar[str] = ""
    classname: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._priority = 6
        # What the agent says of itself to the job type (PyFarm's JobType.node()).
        self.node: dict[str, Any] = {}
        # The host's reason when the job type failed, for the master's last_error.
        self.error: str | None = None

    def get_command_data(self) -> CommandData:
        from farmnode.tasks.schema import assignment_to_json

        a = self.assignment
        payload = {"id": a.id, "assignment": assignment_to_json(a), "name": a.jobtype.name,
                   "version": a.jobtype.version, "node": self.node,
                   "expandvars": self.expandvars_enabled,
                   "path_map": [[r.source, r.target] for r in self.path_map]}
        return self.make_command_data(
            sys.executable, ["-I", "-m", HOST_MODULE, self.module_path, self.classname,
                             json.dumps(payload)])

    def handle_line(self, stream: Stream, line: str) -> str | None:
        if not line.startswith(MARK):
            self._priority = 4 if stream is Stream.STDERR else 6
            return line  # the host's own words (e.g. a traceback of the job type)
        try:
            rec: dict[str, Any] = json.loads(line[len(MARK):])
        except ValueError:
            self._priority = 4
            return line
        if "line" in rec:
            self._priority = int(rec.get("priority", 6))
            text = rec["line"]
            return None if text is None else str(text)
        if "error" in rec:
            self.error = str(rec["error"])
            self._priority = 3
            return f"job type failed: {self.error}"
        if "state" in rec:
            self.set_task_state(int(rec["task"]), TaskState(rec["state"]), rec.get("reason"))
        elif "progress" in rec:
            self.set_task_progress(int(rec["task"]), float(rec["progress"]))
        return None

    def line_priority(self, stream: Stream, line: str) -> int:
        return self._priority

    def is_successful(self, status: ExitStatus) -> bool:
        return status.code == 0

    def failure_reason(self, status: ExitStatus) -> str:
        return self.error or super().failure_reason(status)


class WarmRemoteJobType(RemoteJobType, WarmJobType):
    """A downloaded job type that uses PyFarm's job-level hooks: each assignment is run by
    farmnode.jobtypes.remote_host inside the job's warm interpreter (this node's Python, with
    farmnode), so what prepare_for_job made and spawn_persistent_process started live on
    from one assignment of the job to the next; the teardown runs cleanup_after_job."""

    HOST = "_farmnode_remote_host"

    def warm_process(self) -> WarmProcess:
        return WarmProcess(
            argv=(sys.executable, "-I", EXECUTOR_PATH),
            setup=(f"import {HOST_MODULE} as {self.HOST}",),
            teardown=(f"{self.HOST}.warm.cleanup()",),
            env=self.get_environment())

    def commands(self) -> list[str]:
        payload = json.loads(RemoteJobType.get_command_data(self).arguments[-1])
        return [f"{self.HOST}.run_warm({self.module_path!r}, {self.classname!r}, "
                f"{payload!r})"]

    def request(self) -> dict[str, Any]:
        # The job type handles the assignment's frames itself: one run, not one per frame.
        req = super().request()
        req["items"] = req["items"][:1]
        return req

    def get_command_data(self) -> CommandData:
        return WarmJobType.get_command_data(self)

    def handle_line(self, stream: Stream, line: str) -> str | None:
        if stream == Stream.STDERR and line.startswith(warm_client.RECORD):
            return WarmJobType.handle_line(self, stream, line)
        self._warm_priority = None
        return RemoteJobType.handle_line(self, stream, line)

    def line_priority(self, stream: Stream, line: str) -> int:
        if self._warm_priority is not None:
            return self._warm_priority
        return RemoteJobType.line_priority(self, stream, line)

    def failure_reason(self, status: ExitStatus) -> str:
        # The job type's own reason first; the warm process's when it never got that far.
        return self.error or self.warm_error or status.describe()
