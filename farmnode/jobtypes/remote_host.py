"""Runs a downloaded job type inside the task's scope, as the task's user (see remote.py).

    python -I -m farmnode.jobtypes.remote_host MODULE_PATH CLASSNAME PAYLOAD_JSON

PAYLOAD_JSON: {"id", "assignment" (the master's JSON), "name", "version", "node" (what the
agent says of itself), "expandvars"}. The source is compiled here, never in the agent; it may
be a PyFarm job type (``pyfarm.jobtypes.core.jobtype.JobType``, provided by
`farmnode.jobtypes.pyfarm`) or a farmnode one (`farmnode.jobtypes.base.JobType`).

Prints, for the agent, marked JSON records (lines of the job's stderr on stderr, the rest on
stdout): {"line", "stream", "priority"}, {"state", "task",
"reason"}, {"progress", "task"}, and once, when the job type fails, {"error": reason}: the
reason the master shows (file and line for source that does not compile or raises). Exits 0
when the job type calls the run successful.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
import types
from typing import Any

from farmnode.jobtypes import pyfarm
from farmnode.jobtypes.base import ExitStatus, JobType, Stream
from farmnode.jobtypes.pyfarm import warm
from farmnode.jobtypes.pyfarm.agent.config import config as pyfarm_config
from farmnode.jobtypes.pyfarm.jobtypes.core import jobtype as pyfarm_jobtype
from farmnode.jobtypes.pyfarm.jobtypes.core.process import LineSplitter, pump
from farmnode.jobtypes.remote import MARK
from farmnode.pathmap import PathRule
from farmnode.tasks.model import TaskState

# The agent cuts lines at 16 KiB: a record must stay below that to reach it whole.
MAX_RECORD = 15 * 1024
MODULE_NAME = "farmnode_downloaded_jobtype"


MAX_REASON = 4000  # characters of a reason the master gets; the log has the whole story


def emit(record: dict[str, Any]) -> None:
    for key in ("reason", "error"):
        value = record.get(key)
        if isinstance(value, str) and len(value) > MAX_REASON:
            record = {**record, key: value[:MAX_REASON] + " [...]"}
    data = json.dumps(record, ensure_ascii=False)
    text = record.get("line")
    if len(data.encode()) > MAX_RECORD and isinstance(text, str) and len(text) > 1:
        half = len(text) // 2
        emit({**record, "line": text[:half]})
        emit({**record, "line": text[half:]})
        return
    # A line of the job's stderr goes out on ours, so the journal and the task log keep
    # PyFarm's stream of it; everything else on stdout.
    out = sys.stderr if record.get("stream") == 1 else sys.stdout
    out.write(MARK + data + "\n")
    out.flush()


class Failure(Exception):
    """The job type failed; ``reason`` goes to the master (the traceback to the log)."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class MarkedReporter:
    """farmnode job types' TaskReporter."""

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        emit({"state": str(state), "task": task_id, "reason": reason})

    def set_task_progress(self, task_id: int, progress: float) -> None:
        emit({"progress": progress, "task": task_id})


class MarkedSink:
    """PyFarm job types' sink (farmnode.jobtypes.pyfarm.jobtypes.core.jobtype.Sink)."""

    def line(self, stream: int, text: str, priority: int) -> None:
        emit({"line": text, "stream": stream, "priority": priority})

    def state(self, task_id: int, state: str, reason: str | None) -> None:
        emit({"state": state, "task": task_id, "reason": reason})

    def progress(self, task_id: int, progress: float) -> None:
        emit({"progress": progress, "task": task_id})


class LogLines(logging.Handler):
    """``pyfarm.agent.logger`` records as lines of the task's log."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def emit(self, record: logging.LogRecord) -> None:
        level = max((lv for lv in self.PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
        emit({"line": f"{record.name.removeprefix('pyfarm.')}: {record.getMessage()}",
              "stream": 1, "priority": self.PRIORITIES[level]})


def where(exc: BaseException, path: str) -> str:
    """``Type: message`` with the innermost place in the job type's own file."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    if frames:
        last = frames[-1]
        text += f" (in {last.name}, {path}, line {last.lineno})"
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "pyfarm":
        text += f"; farmnode provides {', '.join(pyfarm.provided())}"
    return text


def load_class(path: str, classname: str, label: str) -> type:
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"{label}: cannot read {path}: {exc}", exc) from None
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        # PyFarm's job types were Python 2: say so, with the place, not just "exit code 1".
        raise Failure(f"{label} is not valid Python 3: {exc.filename}, line {exc.lineno}: "
                      f"{exc.msg}", exc) from None
    except ValueError as exc:  # e.g. NUL bytes
        raise Failure(f"{label} is not valid Python 3: {path}: {exc}", exc) from None
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = path
    sys.modules[MODULE_NAME] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        raise Failure(f"{label}: loading it raised {where(exc, path)}", exc) from None
    cls = getattr(module, classname, None)
    if not isinstance(cls, type):
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and v.__module__ == MODULE_NAME)
        raise Failure(f"{label}: {path} defines no class {classname!r} (the master's classname; "
                      f"classes there: {', '.join(found) or 'none'})")
    if not issubclass(cls, pyfarm_jobtype.JobType | JobType):
        raise Failure(f"{label}: {classname} is not a subclass of "
                      "pyfarm.jobtypes.core.jobtype.JobType")
    return cls


def _path_map(payload: dict[str, Any]) -> tuple[PathRule, ...]:
    # The agent checked the rules when it read its config; here they are only rebuilt.
    return tuple(PathRule(str(src), str(dst)) for src, dst in payload.get("path_map") or ())


def run_pyfarm(cls: type[pyfarm_jobtype.JobType], payload: dict[str, Any],
               path: str, label: str) -> int:
    node = payload.get("node") or {}
    pyfarm_config.update({k: v for k, v in node.items() if v is not None})
    pyfarm_config["jobtype_expandvars"] = bool(payload.get("expandvars", True))
    pyfarm_jobtype.path_map = _path_map(payload)
    pyfarm_jobtype.bind(MarkedSink(), node)
    log = logging.getLogger("pyfarm")
    if not any(isinstance(h, LogLines) for h in log.handlers):  # once per warm process
        log.addHandler(LogLines())
    log.setLevel(logging.INFO)
    log.propagate = False
    if warm.active:
        warm.prepare(cls, payload["assignment"], label, path)
    try:
        jt = cls(payload["assignment"])
    except Exception as exc:
        raise Failure(f"{label}: {cls.__name__}(assignment) raised {where(exc, path)}",
                      exc) from None
    try:
        reason = jt.start()
    except pyfarm_jobtype.JobTypeError as exc:
        raise Failure(f"{label}: {exc}", exc) from None
    except Exception as exc:
        raise Failure(f"{label}: {where(exc, path)}", exc) from None
    finally:
        jt.cleanup()
    if not jt.ran_process:
        raise Failure(f"{label}: start() ran no process (farmnode runs the one process "
                      "get_command_data() returns; call super().start())")
    successful = jt.successful
    if successful is None:  # process_stopped overridden without super()
        try:
            successful = bool(jt.is_successful(reason)) and not jt.failed_tasks
        except Exception as exc:
            raise Failure(f"{label}: is_successful() raised {where(exc, path)}", exc) from None
    if successful:
        return 0
    if reason.exitCode != 0:
        emit({"error": reason.describe()})  # as for every job type: "exit code 3"
    elif jt.failed_tasks:
        failed = ", ".join(map(str, sorted(jt.failed_tasks)))
        emit({"error": f"{label}: task(s) {failed} failed"})
    else:
        emit({"error": f"{label}: is_successful() says the process failed (it exited 0)"})
    return reason.exitCode or 1


def run_native(cls: type[JobType], payload: dict[str, Any], path: str, label: str) -> int:
    # Here only: the schema module pulls in yaml, a tenth of a PyFarm job type's start.
    from farmnode.tasks.schema import parse_assignment

    assignment = parse_assignment(payload["assignment"], payload["id"])
    try:
        jt = cls(assignment, MarkedReporter(),
                 expandvars=bool(payload.get("expandvars", True)), path_map=_path_map(payload))
        command = jt.get_command_data()
    except Exception as exc:
        raise Failure(f"{label}: {where(exc, path)}", exc) from None
    proc = subprocess.Popen([command.command, *command.arguments], env=command.env,
                            cwd=command.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    splitters = {0: LineSplitter(), 1: LineSplitter()}

    def line_out(stream: Stream, text: str) -> None:
        out = jt.handle_line(stream, text)
        if out is not None:
            emit({"line": out, "stream": int(stream), "priority": jt.line_priority(stream, text)})

    def output(stream: int, text: str) -> None:
        for line in splitters[stream].feed(text):
            line_out(Stream(stream), line)

    pump(proc, output)
    for stream, splitter in splitters.items():
        for line in splitter.close():
            line_out(Stream(stream), line)
    status = ExitStatus.from_returncode(proc.wait())
    if jt.is_successful(status):
        return 0
    emit({"error": status.describe()})
    return status.code if status.code else 1


def main(argv: list[str]) -> int:
    path, classname, payload = argv[1], argv[2], json.loads(argv[3])
    name = payload.get("name") or payload["assignment"]["jobtype"]["name"]
    version = payload.get("version") or payload["assignment"]["jobtype"]["version"]
    label = f"job type {name!r} v{version}"
    pyfarm.install()
    try:
        cls = warm.loaded.get((path, classname)) or load_class(path, classname, label)
        if warm.active:
            warm.loaded[(path, classname)] = cls
        if issubclass(cls, pyfarm_jobtype.JobType):
            return run_pyfarm(cls, payload, path, label)
        assert issubclass(cls, JobType)
        return run_native(cls, payload, path, label)
    except Failure as failure:
        if failure.cause is not None:
            # The whole story for the task's log; the master gets the one-line reason.
            traceback.print_exception(failure.cause, file=sys.stderr)
        sys.stderr.flush()
        emit({"error": failure.reason})
        return 1
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        emit({"error": f"{label}: {where(exc, path)}"})
        return 1


class TaskFailed(Exception):
    """The assignment failed in the job's warm process (its reason went out as a record)."""


def run_warm(path: str, classname: str, payload: dict[str, Any]) -> None:
    """One assignment in the job's warm interpreter (farmnode.warm), as main() runs it in a
    process of its own, except that the class stays loaded for the job's next assignments,
    with what prepare_for_job made and the processes spawn_persistent_process started."""
    warm.active = True
    code = main(["remote_host", path, classname, json.dumps(payload)])
    if code:
        raise TaskFailed(f"exit status {code}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
