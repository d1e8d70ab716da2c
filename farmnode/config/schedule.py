"""Render schedules: the hours of the day a node renders at all ("19:00-07:00, 12:00-13:00").

Parsed once when the config loads; the agent asks whether a moment is inside and when the
answer next changes. Times are the node's local time (its /etc/localtime).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DAY = 24 * 60  # minutes
_TIME = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    """From `start` to `end`, minutes after midnight; end < start runs past midnight."""

    start: int
    end: int

    def __contains__(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_fmt(self.start)}-{_fmt(self.end)}"


def _fmt(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _minute(text: str, part: str) -> int:
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError(f"{text.strip()!r} in {part!r} is not a time of day (HH:MM)")
    value = int(m.group(1)) * 60 + int(m.group(2))
    if value > DAY:
        raise ValueError(f"{text.strip()!r} in {part!r} is past 24:00")
    return value


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...]

    @classmethod
    def parse(cls, value: str) -> Schedule:
        """"HH:MM-HH:MM[, ...]"; ValueError saying which part is wrong."""
        windows = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            start, sep, end = part.partition("-")
            if not sep:
                raise ValueError(f"each window must be HH:MM-HH:MM, got {part!r}")
            w = Window(_minute(start, part) % DAY, _minute(end, part) % DAY)
            if w.start == w.end:
                raise ValueError(f"window {part!r} is empty or the whole day: write null for "
                                 "no schedule")
            windows.append(w)
        if not windows:
            raise ValueError(f"names no window (HH:MM-HH:MM), got {value!r}")
        return cls(tuple(windows))

    def __str__(self) -> str:
        return ", ".join(map(str, self.windows))

    def renders_at(self, minute: float) -> bool:
        return any(minute in w for w in self.windows)

    def minutes_to_change(self, minute: float) -> float:
        """Minutes from `minute` until `renders_at` next changes its answer (at most a day)."""
        now = self.renders_at(minute)
        edges = sorted({w.start for w in self.windows} | {w.end for w in self.windows})
        for step in sorted(((e - minute) % DAY) or DAY for e in edges):
            if self.renders_at((minute + step) % DAY) != now:
                return step
        return DAY


def canonical(value: str) -> str:
    """The config check: the schedule as it will be read back."""
    return str(Schedule.parse(value))
