"""The spool janitor: journals the output shims held while journald was away, for runs that
no run of this agent concludes (an earlier agent process concluded them, or their shim
outlived the run). It may import farmnode.systemd and farmnode.config only.

One task for all such spools, in rounds: each round replays every spool whose shim has
gone; while journald is away the first failed replay ends the round, so an outage costs
one probe per round, not one per spool, and rounds back off to JANITOR_MAX_DELAY. Spools
a live shim still writes keep the janitor going and are journaled in the first round
after their shim has left. It ends once no spool is left to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from farmnode.systemd import spool
from farmnode.systemd.journal import TaskLogFields

log = logging.getLogger(__name__)

JANITOR_MAX_DELAY = 30.0  # s between rounds at most (journald away, or shims still writing)


@dataclass(frozen=True)
class Left:
    """What the janitor has left to do: spools to journal now ({status path: fields}), and
    how many wait for their shim to leave."""

    orphans: dict[str, TaskLogFields]
    held: int = 0


@dataclass
class SpoolJanitor:
    find: Callable[[], Left]
    replay: Callable[[str, TaskLogFields], spool.Replayed] = spool.replay
    # Told what became of a spool: (its status path, its fields, what was journaled).
    journaled: Callable[[str, TaskLogFields, spool.Replayed], None] | None = None
    max_delay: float = JANITOR_MAX_DELAY
    rounds: int = 0  # rounds done, for tests and the log
    _told: set[str] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Look at the spools now (again, if it was idle)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="spools")

    def stop(self) -> None:
        """The agent goes: the next agent's janitor takes the spools up again."""
        if self._task is not None:
            self._task.cancel()

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        while True:
            left = self.find()  # on the loop: it reads the agent's runs and store
            if not left.orphans and not left.held:
                return
            self.rounds += 1
            cleared = 0
            for status_path, fields in left.orphans.items():
                if status_path not in self._told:
                    self._told.add(status_path)
                    log.warning("assignment %s: output held while journald was away waits in "
                                "%s.*.spool; journaling it once journald answers",
                                fields.assignment_id, status_path)
                try:
                    done = await loop.run_in_executor(None, self.replay, status_path, fields)
                except OSError as exc:
                    log.info("spools: journald does not answer (%s); trying again in %g s",
                             exc, max(delay, 1.0))
                    break
                log.warning("assignment %s: %s", fields.assignment_id,
                            done.describe() or "its spool held nothing journald lacked")
                if self.journaled is not None:
                    try:
                        self.journaled(status_path, fields, done)
                    except Exception:  # what the agent does with the news must not end us
                        log.exception("assignment %s: recording what came of its spool "
                                      "failed", fields.assignment_id)
                cleared += not spool.spools(status_path)
            if left.orphans and cleared == len(left.orphans) and not left.held:
                delay = 0.0  # all journaled: one more look at once, which should find none
                continue
            await asyncio.sleep(delay)
            delay = min(max(1.0, delay * 2), self.max_delay)
