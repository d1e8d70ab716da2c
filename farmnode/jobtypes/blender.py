"""The ``blender`` job type: renders the assignment's frames with ``blender -b`` and follows them.

Owns: BlenderJobType, the Blender command line, and the parsing of Blender's render output.
May import: farmnode.tasks.model and farmnode.config only (and this package's base).

``job.data``: ``file`` (required), ``blender`` (executable, default "blender"), ``output``
(-o pattern, ``#`` = frame digits, ``//`` = beside the .blend), ``format`` (-F, e.g. PNG,
OPEN_EXR), ``engine`` (-E, e.g. CYCLES, BLENDER_EEVEE), ``scene`` (-S), ``threads`` (-t; default
from ``job.cpus``), ``args`` (extra arguments; anything from ``--`` on goes to Python scripts).

Output understood (Blender 2.7x to 4.x; samples in tests/data/blender_*.log)::

    Fra:12 Mem:35.52M (Peak 35.62M) | Time:00:01.23 | ... | Scene, ViewLayer | Sample 12/128
    Fra:1 ... | Rendering 5 / 64 samples            (EEVEE, Workbench)
    Fra:1 ... | Path Tracing Tile 3/135             (Cycles 2.7x tiles)
    Fra:1 ... | Rendered 12/135 Tiles               (Cycles 2.8x-2.9x tiles)
    Saved: '/tmp/render/0001.png'                    (the current frame is written)
    Append frame 3                                   (movie outputs instead of Saved:)
    skipping existing frame "/tmp/render/0004.png"   (Overwrite off and the file exists)
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

from farmnode.jobtypes.base import (
    PRIORITY_ERR,
    PRIORITY_WARNING,
    CommandData,
    ExitStatus,
    JobType,
    Stream,
)
from farmnode.tasks.model import TaskState

_DATA_KEYS = frozenset(
    {"file", "blender", "output", "format", "engine", "scene", "args", "threads"}
)

_FRA_RE = re.compile(r"^Fra:\s*(?P<frame>-?\d+)\b")
# Most specific first: in tiled Cycles a "Sample a/b" after the tile count is the current
# tile's samples, not the frame's. Each pattern comes with a word it cannot match without:
# a substring test is ~20x cheaper than a failing search, and this runs on every line
# (bench/REPORT.md).
_PROGRESS_RES = (
    ("Tile", re.compile(r"\bRendered (?P<done>\d+)/(?P<total>\d+) Tiles")),
    ("Tile", re.compile(r"\bPath Tracing Tile (?P<done>\d+)/(?P<total>\d+)")),
    ("Sample ", re.compile(r"\bSample (?P<done>\d+)/(?P<total>\d+)")),
    ("samples", re.compile(r"\bRendering (?P<done>\d+) / (?P<total>\d+) samples")),
)
_SAVED_RE = re.compile(r"^\s*Saved: ['\"]")
_APPEND_RE = re.compile(r"^\s*Append frame (?P<frame>-?\d+)\b")
_SKIPPED_RE = re.compile(r"^\s*skipping existing frame\b", re.IGNORECASE)
_ERROR_RE = re.compile(
    r"\bError:|^\s*Traceback \(most recent call last\)|^\s*ERROR\b|"
    r"\bSegmentation fault\b|^\s*Writing: .*\.crash\.txt"
)
_ERROR_WORDS = ("Error:", "Traceback", "ERROR", "Segmentation fault", ".crash.txt")
_WARNING_RE = re.compile(r"^\s*(?:Warning:|WARN\b)")
# Blender's own enum identifiers; a whitelist would reject formats/engines of newer releases.
_IDENT_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"job.data.{key} must be a non-empty string")
    if value.startswith("-"):
        # Blender would parse it as an option (e.g. "--python-expr"), not as a value.
        raise ValueError(f"job.data.{key} must not start with '-': {value!r}")
    return value


class BlenderJobType(JobType):
    """Renders ``job.data.file`` in background mode; a frame is done when Blender saved it."""

    name: ClassVar[str] = "blender"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._current_frame: int | None = None

    # -- command ------------------------------------------------------------------------------

    def _int_frames(self) -> list[int]:
        frames = self.frames
        if not all(f.is_integer() for f in frames):
            raise ValueError("blender renders whole frames only; the assignment has fractions")
        return [int(f) for f in frames]

    def frame_arguments(self) -> list[str]:
        """``-s S -e E -j BY -a``, or ``-f a,b,c`` when the frames are not evenly spaced."""
        frames = self._int_frames()
        if len(frames) == 1 or self.is_evenly_spaced:
            # Whole frames evenly spaced have a whole step; one frame needs none but -j 1.
            by = 1 if len(frames) == 1 else round(self.by)
            return ["-s", str(frames[0]), "-e", str(frames[-1]), "-j", str(by), "-a"]
        # Holes (a retried batch): rendering start..end would redo frames nobody assigned us.
        return ["-f", ",".join(str(f) for f in frames)]

    def get_command_data(self) -> CommandData:
        data = self.checked_data(_DATA_KEYS)
        file = _opt_str(data, "file")
        if file is None:
            raise ValueError("job.data.file is required (the .blend to render)")
        blender = _opt_str(data, "blender") or "blender"
        args: list[str] = ["-b", self.map_path(file)]

        scene = _opt_str(data, "scene")
        if scene is not None:
            args += ["-S", scene]
        for key, flag in (("engine", "-E"), ("format", "-F")):
            value = _opt_str(data, key)
            if value is not None:
                if not _IDENT_RE.match(value):
                    raise ValueError(f"job.data.{key} must be a Blender identifier like PNG")
                args += [flag, value]
        output = _opt_str(data, "output")
        if output is not None:
            args += ["-o", self.map_path(output)]

        threads = data.get("threads")
        if threads is None and self.job.cpus is not None and self.job.cpus > 0:
            # Blender sizes its thread pool from the host's CPU count, not the scope's CPU quota;
            # left alone it would run far more threads than the quota pays for.
            threads = math.ceil(self.job.cpus)
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
                raise ValueError("job.data.threads must be an integer >= 0 (0 = all CPUs)")
            args += ["-t", str(threads)]

        extra = data.get("args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ValueError("job.data.args must be a list of strings")
        # Blender executes arguments in order and hands everything after "--" to Python, so
        # script arguments must come after the render action or they would swallow it.
        split = extra.index("--") if "--" in extra else len(extra)
        args += [self.expandvars(a) for a in extra[:split]]
        args += self.frame_arguments()
        args += extra[split:]

        try:
            return self.make_command_data(self.map_path(blender), args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job.data: {exc}") from None

    # -- output -------------------------------------------------------------------------------

    @property
    def current_frame(self) -> int | None:
        """The frame Blender last reported (``Fra:N``), None before the first."""
        return self._current_frame

    def _finish_frame(self, frame: int) -> None:
        for task in self.tasks_for_frame(frame):
            if not self.is_task_finished(task.id):
                self.set_task_state(task.id, TaskState.RUNNING)
                self.set_task_progress(task.id, 1.0)
                self.set_task_state(task.id, TaskState.DONE)

    def process_stdout_line(self, line: str) -> None:
        fra = _FRA_RE.match(line)
        if fra is not None:
            frame = int(fra["frame"])
            self._current_frame = frame
            for task in self.tasks_for_frame(frame):
                if self.is_task_finished(task.id):
                    continue
                self.set_task_state(task.id, TaskState.RUNNING)
                for word, pattern in _PROGRESS_RES:
                    m = pattern.search(line) if word in line else None
                    if m is not None:
                        total = int(m["total"])
                        if total > 0:
                            self.set_task_progress(task.id, int(m["done"]) / total)
                        break
            return
        if _SAVED_RE.match(line):
            if self._current_frame is not None:
                self._finish_frame(self._current_frame)
            return
        append = _APPEND_RE.match(line)
        if append is not None:
            self._finish_frame(int(append["frame"]))
            return
        if _SKIPPED_RE.match(line):
            # No Fra: line precedes a skipped frame; Blender walks the range in order, so it is
            # the first of ours after the current frame that is not finished yet.
            for frame in self._int_frames():
                if self._current_frame is not None and frame <= self._current_frame:
                    continue
                if not all(self.is_task_finished(t.id) for t in self.tasks_for_frame(frame)):
                    self._current_frame = frame
                    self._finish_frame(frame)
                    break

    def line_priority(self, stream: Stream, line: str) -> int:
        if any(w in line for w in _ERROR_WORDS) and _ERROR_RE.search(line):
            return PRIORITY_ERR
        if _WARNING_RE.match(line):
            return PRIORITY_WARNING
        return super().line_priority(stream, line)

    def is_successful(self, status: ExitStatus) -> bool:
        """Exit code 0 *and* every frame saved.

        Blender exits 0 after many failures (a .blend that does not load, a Python error
        without --python-exit-code); a frame that was never saved was not rendered.
        """
        if status.code != 0:
            return False
        states = self.task_states
        return all(states.get(t.id) == TaskState.DONE for t in self.tasks)
