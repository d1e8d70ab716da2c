"""Job types from the master: the cache, the in-scope host, and the agent-side decoding."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from farmnode.jobtypes.base import Stream
from farmnode.jobtypes.remote import (
    RemoteJobTypeError,
    cache_latest,
    cache_store,
    remote_jobtype_class,
)
from farmnode.tasks.model import TaskState
from farmnode.tasks.schema import parse_assignment

CODE = '''
from farmnode.jobtypes.base import JobType

class Counter(JobType):
    name = "counter"

    def get_command_data(self):
        return self.make_command_data("/bin/sh", ["-c", "echo one; echo two >&2; exit 0"])

    def process_stdout_line(self, line):
        self.set_task_progress(self.tasks[0].id, 0.5)

    def format_stdout_line(self, line):
        return line.upper()
'''


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, object]] = []

    def set_task_state(self, task_id: int, state: TaskState, reason: str | None = None) -> None:
        self.events.append(("state", task_id, state))

    def set_task_progress(self, task_id: int, progress: float) -> None:
        self.events.append(("progress", task_id, progress))


def assignment():  # type: ignore[no-untyped-def]
    return parse_assignment({"job": {"id": 1, "by": 1}, "jobtype": {"name": "counter",
                                                                   "version": 3},
                             "tasks": [{"id": 9, "frame": 1}]}, "a-1")


def test_cache_keeps_each_source_once_and_prefers_the_newest(tmp_path: Path) -> None:
    first = cache_store(tmp_path, "counter", 3, "Counter", CODE)
    assert cache_store(tmp_path, "counter", 3, "Counter", CODE) == first
    time.sleep(0.01)  # mtime order decides "newest"; distinct stamps, not an event
    second = cache_store(tmp_path, "counter", 3, "Counter", CODE + "\n# v2\n")
    assert second != first and cache_latest(tmp_path, "counter", 3) == (second, "Counter")
    assert cache_latest(tmp_path, "counter", 4) is None
    with pytest.raises(RemoteJobTypeError):
        cache_store(tmp_path, "../evil", 1, "X", "")
    with pytest.raises(RemoteJobTypeError):
        cache_store(tmp_path, "ok", 1, "not an identifier", "")


def test_host_runs_the_class_and_the_agent_decodes_it(tmp_path: Path) -> None:
    path = cache_store(tmp_path, "counter", 3, "Counter", CODE)
    rec = Recorder()
    jt = remote_jobtype_class(path, "Counter")(assignment(), rec)
    cmd = jt.get_command_data()
    proc = subprocess.run([cmd.command, *cmd.arguments], capture_output=True, text=True,
                          timeout=60, env=cmd.env)
    assert proc.returncode == 0, proc.stderr
    # split on newlines only, as the agent does (str.splitlines also splits on \x1e)
    logged = [(stream, out) for stream, text in ((Stream.STDOUT, proc.stdout),
                                                  (Stream.STDERR, proc.stderr))
              for line in text.rstrip("\n").split("\n")
              if (out := jt.handle_line(stream, line)) is not None]
    # stdout went through the job type's hooks; stderr passed through its hooks too, and
    # stays stderr
    assert logged == [(Stream.STDOUT, "ONE"), (Stream.STDERR, "two")]
    assert ("progress", 9, 0.5) in rec.events
    # the host's own plain words (say a traceback) are logged as they are
    assert jt.handle_line(Stream.STDERR, "Traceback (most recent call last):") is not None


def test_a_broken_job_type_fails_in_the_host(tmp_path: Path) -> None:
    path = cache_store(tmp_path, "counter", 3, "Counter", "raise SystemExit('no')")
    jt = remote_jobtype_class(path, "Counter")(assignment(), Recorder())
    cmd = jt.get_command_data()
    proc = subprocess.run([sys.executable, *cmd.arguments], capture_output=True, text=True,
                          timeout=60, env=cmd.env)
    assert proc.returncode != 0 and "no" in proc.stderr
