"""Workstation mode and the render schedule: when a user is at the node, or the hour is
outside `render_schedule`, the node takes no new work and its running tasks are paused
(frozen, never killed); they resume once the user has been idle for workstation_idle_time.

The verdict is a pure function of logind's sessions and the clock (`decide`). The watcher
re-reads the sessions on logind's signals and otherwise sleeps until the verdict can change
on its own: an idle timeout ending, a schedule boundary, or the next look at text sessions,
whose activity is their tty's last input (logind's IdleSinceHint) and comes with no signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdbus import SdBus
from sdbus.dbus_exceptions import DbusFailedError
from sdbus.exceptions import SdBusUnmappedMessageError

from farmnode.config import Config
from farmnode.config.schedule import Schedule
from farmnode.systemd import logind
from farmnode.systemd.freezer import Freezer, Pause, PauseFailed
from farmnode.systemd.logind import Session

log = logging.getLogger(__name__)

HOLD = "workstation"  # the agent's hold this module sets and lifts
# The schedule is looked at again at least this often (s): the wall clock may be set or its
# time zone changed meanwhile, which a wait on the monotonic clock would not follow.
SCHEDULE_RECHECK = 300.0


@dataclass(frozen=True)
class Verdict:
    render: bool
    reason: str | None  # why not, for status and the log
    recheck: float | None  # s until the verdict may change with no logind signal (None: never)


def counted(s: Session, remote: bool) -> bool:
    """Whether a session is someone using the node: a user's (not a greeter's, lock
    screen's or a service's), not closing, in front on its seat, local unless `remote`."""
    return (s.session_class == "user" and s.state != "closing" and s.active
            and (remote or not s.remote))


def idle_for(s: Session, now: float) -> float | None:
    """Seconds the session's user has been idle; None: active now, or no way to tell.

    A hint set true counts from when it was set. A graphical session says when its user is
    active by clearing the hint; one that never set it (IdleSinceHint 0) is taken as active.
    A text session never sets it: logind reports its tty's last input as IdleSinceHint."""
    if s.idle_hint:
        return max(0.0, now - s.idle_since) if s.idle_since else 0.0
    if s.graphical or not s.idle_since:
        return None
    return max(0.0, now - s.idle_since)


def decide(sessions: Sequence[Session], config: Config, now: float,
           local_minute: float) -> Verdict:
    checks: list[float] = []
    if config.render_schedule:
        schedule = Schedule.parse(config.render_schedule)
        checks.append(min(schedule.minutes_to_change(local_minute) * 60, SCHEDULE_RECHECK))
        if not schedule.renders_at(local_minute):
            return Verdict(False, f"outside render_schedule ({schedule})", min(checks))
    if not config.workstation_mode:
        return Verdict(True, None, min(checks, default=None))
    limit = config.workstation_idle_time
    busy: list[str] = []
    for s in sessions:
        if not counted(s, config.workstation_remote_sessions):
            continue
        if not s.graphical and not s.idle_hint:
            checks.append(config.workstation_tty_check_interval)
        idle = idle_for(s, now)
        if idle is None:
            busy.append(f"{s.describe()} is active")
        elif idle < limit:
            busy.append(f"{s.describe()} idle {idle:.0f} s of {limit:g} s")
            checks.append(limit - idle)
    recheck = min(checks, default=None)
    if busy:
        return Verdict(False, "a user is at the node: " + "; ".join(busy), recheck)
    return Verdict(True, None, recheck)


class AgentSide(Protocol):
    """What this module needs of farmnode.agent.core.Agent."""

    def set_hold(self, source: str, reason: str | None) -> None: ...

    def running_units(self) -> list[str]: ...

    def note_paused(self, unit: str, paused: bool) -> None: ...

    def status_changed(self) -> None: ...

    @property
    def task_listeners(self) -> list[Callable[[Any], None]]: ...


@dataclass
class Figures:
    """When the verdict last changed, and how long the tasks took to follow."""

    paused_since: float | None = None
    last_pause_s: float | None = None  # verdict → every scope paused
    last_resume_s: float | None = None  # verdict → every scope resumed
    paused_units: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)


class Workstation:
    def __init__(self, config: Config, agent: AgentSide, freezer: Freezer,
                 read_sessions: Callable[[], Awaitable[list[Session]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.agent = agent
        self.freezer = freezer
        self.read_sessions = read_sessions
        self.clock = clock
        self.verdict = Verdict(True, None, None)
        self.sessions: list[Session] = []
        self.figures = Figures()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.how: Pause = config.workstation_pause
        self._resume_all = False
        self.slots: list[Any] = []  # logind's signal matches, held for as long as it watches

    @property
    def enabled(self) -> bool:
        return self.config.workstation_mode or bool(self.config.render_schedule)

    def changed(self) -> None:
        """logind said something changed (or a task started): look again now."""
        self._wake.set()

    async def start(self) -> None:
        """Judge once before the agent takes work, then keep watching. Scopes an earlier
        agent paused are not known as such: the first verdict to render resumes every one."""
        self._resume_all = True
        await self.evaluate()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="workstation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            timeout = self.verdict.recheck
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self.evaluate()
            except Exception:  # a logind hiccup must not end the watch
                log.exception("workstation: judging the sessions failed; trying again")
                await asyncio.sleep(self.config.workstation_tty_check_interval)

    async def evaluate(self) -> None:
        async with self._lock:
            t0 = time.monotonic()
            now = self.clock()
            local = time.localtime(now)
            minute = local.tm_hour * 60 + local.tm_min + local.tm_sec / 60 + now % 1 / 60
            before = self.verdict
            try:
                self.sessions = (await self.read_sessions() if self.config.workstation_mode
                                 else [])
                self.verdict = decide(self.sessions, self.config, now, minute)
            except (DbusFailedError, SdBusUnmappedMessageError, OSError) as exc:
                # Whether a user is there cannot be told: theirs is the safe side.
                self.verdict = Verdict(False, f"logind's sessions cannot be read ({exc})",
                                       self.config.workstation_tty_check_interval)
            if self.verdict.render != before.render or self.verdict.reason != before.reason:
                self.agent.set_hold(HOLD, self.verdict.reason)
            if self.verdict.render != before.render:
                log.info("workstation: %s", self.verdict.reason if not self.verdict.render
                         else "no user at the node: rendering again")
            await self._apply(t0)
            # The sessions, the paused scopes and their timings are in the status too.
            self.agent.status_changed()

    async def _apply(self, t0: float) -> None:
        units = set(self.agent.running_units())
        self.figures.paused_units &= units
        if not self.verdict.render:
            todo = units - self.figures.paused_units
            self._resume_all = False
            if self.figures.paused_since is None:
                self.figures.paused_since = self.clock()
            await asyncio.gather(*(self._pause(u) for u in sorted(todo)))
            if todo:
                self.figures.last_pause_s = time.monotonic() - t0
                log.info("workstation: %d task scope(s) %s in %.3f s", len(todo),
                         "frozen" if self.how == "freeze" else "set to CPUWeight=idle",
                         self.figures.last_pause_s)
        else:
            todo = self.figures.paused_units | (units if self._resume_all else set())
            self._resume_all = False
            self.figures.paused_since = None
            await asyncio.gather(*(self._resume(u) for u in sorted(todo)))
            if todo:
                self.figures.last_resume_s = time.monotonic() - t0
                log.info("workstation: %d task scope(s) resumed in %.3f s", len(todo),
                         self.figures.last_resume_s)

    async def release(self, unit: str) -> None:
        """The scope is about to be stopped: thaw it if systemd would not (see Freezer)."""
        self.figures.paused_units.discard(unit)
        if self.how == "freeze":
            await self.freezer.release(unit)

    async def _pause(self, unit: str) -> None:
        try:
            if await self.freezer.pause(unit, self.how):
                self.figures.paused_units.add(unit)
                self.agent.note_paused(unit, True)
                self.figures.errors.pop(unit, None)
        except PauseFailed as exc:
            # The task runs on, which is what the user would see; status says why.
            if self.figures.errors.get(unit) != str(exc):
                log.error("workstation: %s", exc)
            self.figures.errors[unit] = str(exc)

    async def _resume(self, unit: str) -> None:
        try:
            await self.freezer.resume(unit, self.how)
            self.figures.paused_units.discard(unit)
            self.agent.note_paused(unit, False)
            self.figures.errors.pop(unit, None)
        except PauseFailed as exc:
            log.error("workstation: %s", exc)
            self.figures.errors[unit] = str(exc)

    def status(self) -> dict[str, Any]:
        v, f = self.verdict, self.figures
        return {
            "mode": self.config.workstation_mode, "schedule": self.config.render_schedule,
            "pause": self.how, "rendering": v.render, "reason": v.reason,
            "paused_since": f.paused_since, "paused_units": sorted(f.paused_units),
            "pause_errors": dict(f.errors), "last_pause_s": f.last_pause_s,
            "last_resume_s": f.last_resume_s,
            "sessions": [{"id": s.id, "user": s.user, "type": s.type, "class": s.session_class,
                          "seat": s.seat, "tty": s.tty, "remote": s.remote, "active": s.active,
                          "idle_hint": s.idle_hint, "idle_since": s.idle_since or None,
                          "counted": counted(s, self.config.workstation_remote_sessions)}
                         for s in self.sessions],
        }


async def start(config: Config, agent: AgentSide, bus: SdBus) -> Workstation | None:
    """Workstation mode or a schedule as configured (None: neither is), judged once."""
    ws = Workstation(config, agent, Freezer(bus, config.task_slice),
                     lambda: logind.sessions(bus))
    if not ws.enabled:
        # Scopes an agent with workstation mode froze would otherwise stay frozen for good.
        for unit in agent.running_units():
            await ws.release(unit)
        return None
    if config.workstation_mode:
        ws.slots = await logind.watch(bus, ws.changed)

    def on_task(change: Any) -> None:
        # A scope that came up while the node must not render (a run recovery restarted).
        if not ws.verdict.render and str(getattr(change, "state", "")) == "running":
            ws.changed()

    agent.task_listeners.append(on_task)
    await ws.start()
    return ws
