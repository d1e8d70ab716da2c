"""Runs a downloaded job type inside the task's scope, as the task's user (see remote.py).

    python -I -m farmnode.jobtypes.remote_host MODULE_PATH CLASSNAME PAYLOAD_JSON

Imports the class, runs its command, feeds every output line through its hooks and prints,
for the agent, marked JSON records: {"line", "stream", "priority"}, {"state", "task",
"reason"}, {"progress", "task"}. Exits 0 when the job type calls the run successful.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import subprocess
import sys
from typing import Any

from farmnode.jobtypes.base import ExitStatus, JobType, Stream
from farmnode.jobtypes.remote import MARK
from farmnode.tasks.model import TaskState
from farmnode.tasks.schema import parse_assignment


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


class MarkedReporter:
    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        emit({"state": str(state), "task": task_id, "reason": reason})

    def set_task_progress(self, task_id: int, progress: float) -> None:
        emit({"progress": progress, "task": task_id})


def load_class(path: str, classname: str) -> type[JobType]:
    spec = importlib.util.spec_from_file_location("farmnode_downloaded_jobtype", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, classname, None)
    if not (isinstance(cls, type) and issubclass(cls, JobType)):
        raise RuntimeError(f"{classname} in the downloaded job type is not a farmnode JobType")
    return cls


def main(argv: list[str]) -> int:
    path, classname, payload = argv[1], argv[2], json.loads(argv[3])
    assignment = parse_assignment(payload["assignment"], payload["id"])
    jt = load_class(path, classname)(assignment, MarkedReporter())
    command = jt.get_command_data()
    proc = subprocess.Popen([command.command, *command.arguments], env=command.env,
                            cwd=command.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    buffers = {Stream.STDOUT: b"", Stream.STDERR: b""}
    sel.register(proc.stdout, selectors.EVENT_READ, Stream.STDOUT)
    sel.register(proc.stderr, selectors.EVENT_READ, Stream.STDERR)

    def line_out(stream: Stream, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        out = jt.handle_line(stream, text)
        if out is not None:
            emit({"line": out, "stream": int(stream), "priority": jt.line_priority(stream, text)})

    while sel.get_map():
        for key, _ in sel.select():
            stream = Stream(key.data)
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                if buffers[stream]:
                    line_out(stream, buffers[stream])
                continue
            *lines, buffers[stream] = (buffers[stream] + chunk).split(b"\n")
            for raw in lines:
                line_out(stream, raw)
    status = ExitStatus.from_returncode(proc.wait())
    if jt.is_successful(status):
        return 0
    print(f"job type {classname}: unsuccessful ({status.describe()})", file=sys.stderr)
    return status.code if status.code else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
