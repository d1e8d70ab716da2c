"""Writes the store may refuse: outcomes held in memory, in order, until the state directory
takes writes again (full, read-only, failing), so no outcome is lost and no task is stuck
running; and the refusal the node reports meanwhile.

It imports nothing of farmnode: a write is any function that runs one store transaction
(and what follows it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
from collections.abc import Callable

log = logging.getLogger(__name__)

STORAGE_RETRY = 2.0  # s: how often held outcomes are written again while the store refuses
# What a full, read-only or failing state directory raises from the store.
STORAGE_ERRORS = (sqlite3.OperationalError, OSError)


class HeldWrites:
    def __init__(self) -> None:
        # Outcomes the store could not take yet (disk full): kept here, in order, and written
        # again until it takes them.
        self._unstored: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        # Why the store refuses writes; None: it takes them.
        self.error: str | None = None

    def store_in_order(self, what: str, write: Callable[[], None]) -> None:
        """Run `write` (one store transaction and what follows it) now, or, while the store
        refuses writes, after everything queued before it."""
        self._unstored.append((what, write))
        self._write_unstored()

    def _write_unstored(self) -> None:
        while self._unstored:
            what, write = self._unstored[0]
            try:
                write()
            except STORAGE_ERRORS as exc:
                self.failed(exc, what)
                with contextlib.suppress(RuntimeError):  # no loop: the next write retries
                    asyncio.get_running_loop().call_later(STORAGE_RETRY, self._write_unstored)
                return
            self._unstored.popleft()
        if self.error is not None:
            log.warning("the state directory takes writes again; every held outcome is "
                        "stored")
            self.error = None

    def failed(self, exc: BaseException, what: str = "") -> None:
        """The store refused a write (`what`, for the log)."""
        if self.error is None:
            log.error("the state directory refuses writes (%s)%s: outcomes are held in "
                      "memory and written again every %g s; no new work is accepted", exc,
                      f" writing the {what}" if what else "", STORAGE_RETRY)
        self.error = str(exc)
