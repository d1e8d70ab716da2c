"""The ``fakerender`` job type: runs ``farmnode-fakerender`` and follows its progress lines.

Owns: FakeRenderJobType and the mapping from ``job.data`` to fakerender's flags.
May import: farmnode.tasks.model and farmnode.config only (and this package's base).

``job.data`` keys (all optional): ram, duration, return_code (int or list), duration_jitter,
ram_jitter, spew, segfault, lines, seed, error_lines — see ``farmnode-fakerender --help``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import ClassVar, TypeGuard

from farmnode.jobtypes.base import (
    PRIORITY_ERR,
    CommandData,
    JobType,
    Stream,
    format_frame,
)
from farmnode.tasks.model import TaskState

SCRIPT = "farmnode-fakerender"
MODULE = "farmnode.jobtypes.fakerender_cmd"

_LINE_RE = re.compile(
    r"^fakerender: frame (?P<frame>-?\d+(?:\.\d+)?) "
    r"(?:(?P<started>started)|progress (?P<progress>\d+(?:\.\d+)?)|(?P<done>done))\s*$"
)
_ERROR_RE = re.compile(r"\berror:", re.IGNORECASE)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _nonneg_int(key: str, v: object) -> list[str]:
    if not (_is_int(v) and v >= 0):
        raise ValueError(f"job.data.{key} must be an integer >= 0")
    return [f"--{key.replace('_', '-')}", str(v)]


def _nonneg_number(key: str, v: object) -> list[str]:
    if not (_is_number(v) and math.isfinite(v) and v >= 0):
        raise ValueError(f"job.data.{key} must be a number >= 0")
    return [f"--{key.replace('_', '-')}", repr(float(v))]


def _flag(key: str, v: object) -> list[str]:
    if not isinstance(v, bool):
        raise ValueError(f"job.data.{key} must be true or false")
    return [f"--{key.replace('_', '-')}"] if v else []


def _return_code(key: str, v: object) -> list[str]:
    codes = v if isinstance(v, list) else [v]
    if not codes or not all(_is_int(c) and 0 <= c <= 255 for c in codes):
        raise ValueError(f"job.data.{key} must be an int 0..255 or a non-empty list of them")
    return [arg for c in codes for arg in ("--return-code", str(c))]


def _seed(key: str, v: object) -> list[str]:
    if not _is_int(v):
        raise ValueError(f"job.data.{key} must be an integer")
    return ["--seed", str(v)]


_OPTIONS: dict[str, Callable[[str, object], list[str]]] = {
    "ram": _nonneg_int,
    "duration": _nonneg_number,
    "return_code": _return_code,
    "duration_jitter": _nonneg_number,
    "ram_jitter": _nonneg_int,
    "spew": _flag,
    "segfault": _flag,
    "lines": _nonneg_int,
    "seed": _seed,
    "error_lines": _flag,
}


def fakerender_command() -> list[str]:
    """How to start fakerender: the script beside our interpreter, on PATH, or ``python -m``.

    The script beside ``sys.executable`` comes first so a venv's agent runs its own copy, not
    whatever another installation put on PATH.
    """
    beside = os.path.join(os.path.dirname(sys.executable), SCRIPT)
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which(SCRIPT)
    if found:
        return [found]
    return [sys.executable, "-m", MODULE]


class FakeRenderJobType(JobType):
    """Fake renders for tests and demos: per-frame RUNNING and progress from the output."""

    name: ClassVar[str] = "fakerender"

    def fakerender_arguments(self) -> list[str]:
        """Flags for ``job.data`` and the frame range; ValueError names a bad key."""
        data = self.checked_data(frozenset(_OPTIONS))
        args = [
            "-s",
            format_frame(self.start),
            "-e",
            format_frame(self.end),
            "-b",
            format_frame(self.by),
        ]
        for key in sorted(data):
            args += _OPTIONS[key](key, data[key])
        return args

    def get_command_data(self) -> CommandData:
        command = fakerender_command()
        return self.make_command_data(command[0], [*command[1:], *self.fakerender_arguments()])

    def process_stdout_line(self, line: str) -> None:
        match = _LINE_RE.match(line)
        if match is None:
            return
        frame = float(match["frame"])
        for task in self.tasks_for_frame(frame):
            if self.is_task_finished(task.id):
                continue
            if match["started"]:
                self.set_task_state(task.id, TaskState.RUNNING)
                self.set_task_progress(task.id, 0.0)
            elif match["done"]:
                # Progress only: the exit status decides done or failed (a fake render told
                # to return 3 fails its frames even after printing them done).
                self.set_task_state(task.id, TaskState.RUNNING)
                self.set_task_progress(task.id, 1.0)
            else:
                self.set_task_state(task.id, TaskState.RUNNING)
                self.set_task_progress(task.id, float(match["progress"]))

    def line_priority(self, stream: Stream, line: str) -> int:
        if stream == Stream.STDERR and _ERROR_RE.search(line):
            return PRIORITY_ERR
        return super().line_priority(stream, line)
