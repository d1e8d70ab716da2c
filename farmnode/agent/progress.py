"""The progress throttle: which task progress the agent core stores now and which it holds.

The first change of a quiet spell is stored at once, later ones at most every
PROGRESS_INTERVAL (only the latest counts). A renderer printing a progress line per sample
made one durable SQLite commit per line (bench: 1000 commits in 8 s held the Blender job type
to 55 % of journald's speed).

It owns only the held values and the timer; storing (and signalling) one value is the core's,
handed in as a function. It imports nothing of farmnode.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

PROGRESS_INTERVAL = 0.5  # s: how often a task's changing progress is stored and signalled

# Stores one task's progress: (assignment id, task id, progress).
StoreProgress = Callable[[str, int, float], None]


class ProgressThrottle:
    def __init__(self, store_progress: StoreProgress) -> None:
        self._store_progress = store_progress
        self._progress_pending: dict[tuple[str, int], float] = {}
        self._progress_timer: asyncio.TimerHandle | None = None

    def report(self, assignment_id: str, task_id: int, progress: float) -> None:
        if self._progress_timer is not None:
            self._progress_pending[(assignment_id, task_id)] = progress
            return
        self._store_progress(assignment_id, task_id, progress)
        with contextlib.suppress(RuntimeError):  # no loop (tests of the core alone): no throttle
            self._progress_timer = asyncio.get_running_loop().call_later(
                PROGRESS_INTERVAL, self._flush_progress)

    def store_pending(self, assignment_id: str, task_id: int) -> None:
        """Store the task's held progress now: a state change comes after the progress that
        preceded it."""
        pending = self._progress_pending.pop((assignment_id, task_id), None)
        if pending is not None:
            self._store_progress(assignment_id, task_id, pending)

    def flush(self) -> None:
        """Store throttled progress now (before the agent goes)."""
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        self._progress_timer = None
        pending, self._progress_pending = self._progress_pending, {}
        for (assignment_id, task_id), progress in pending.items():
            self._store_progress(assignment_id, task_id, progress)

    def _flush_progress(self) -> None:
        pending = bool(self._progress_pending)
        self.flush()
        if pending:
            self._progress_timer = asyncio.get_running_loop().call_later(
                PROGRESS_INTERVAL, self._flush_progress)
