"""``pyfarm.core.enums``: the work states a job type may give a task, and the type tuples.

PyFarm's states are lower-case strings on the wire; WorkState members compare equal to them.
"""

from __future__ import annotations

import enum


class WorkState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PAUSED = "paused"


# Python 2 code checked isinstance against these; on Python 3 each is one type.
STRING_TYPES: tuple[type, ...] = (str,)
INTEGER_TYPES: tuple[type, ...] = (int,)
NUMERIC_TYPES: tuple[type, ...] = (int, float)
