"""The webhook delivery queue: SQLite in the state directory, one ordered queue per webhook.

An event is queued (committed) before anyone tries to post it and leaves the queue only when
its receiver answered, so an agent restart, crash or `kill -9` delays a delivery and never
loses one; a delivery cut short by the agent's end is posted again (receivers see an event
at least once and may recognise a repeat by its id).

Bounded: each webhook holds at most `limit` events. When a receiver stays away long enough
to fill it, the oldest events are dropped to make room (the newest describe the node as it
is now, which is what a receiver that comes back needs), and the sender says how many.

Its own file, not the state store: a receiver that is away for days fills this one, never
the database that holds the tasks, and it is written with synchronous=NORMAL (WAL: a
process crash loses nothing, only a power cut may lose the last events) so queuing an event
on the agent's loop costs no fsync.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hook TEXT NOT NULL,          -- the webhook's URL
    event TEXT NOT NULL,         -- task.<state> / agent.<state>
    event_id TEXT NOT NULL,
    supersedes TEXT,             -- a later event with this key replaces this one
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_hook ON deliveries(hook, seq);
CREATE INDEX IF NOT EXISTS deliveries_superseded ON deliveries(hook, supersedes);
"""


@dataclass(frozen=True)
class Delivery:
    seq: int
    hook: str
    event: str
    event_id: str
    body: bytes
    attempts: int
    created: float


class DeliveryQueue:
    def __init__(self, path: str | Path, limit: int) -> None:
        self.path = Path(path)
        self.limit = limit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def put(self, hook: str, event: str, event_id: str, body: bytes,
            supersedes: str | None = None, now: float | None = None) -> int:
        """Queue one event for one webhook; returns how many old events made room for it."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if supersedes is not None:
                self.db.execute("DELETE FROM deliveries WHERE hook=? AND supersedes=?",
                                (hook, supersedes))
            self.db.execute(
                "INSERT INTO deliveries (hook, event, event_id, supersedes, body, created)"
                " VALUES (?,?,?,?,?,?)",
                (hook, event, event_id, supersedes, body, time.time() if now is None else now))
            over = self.pending(hook) - self.limit
            if over > 0:
                self.db.execute(
                    "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries"
                    " WHERE hook=? ORDER BY seq LIMIT ?)", (hook, over))
            return max(over, 0)

    def head(self, hook: str) -> Delivery | None:
        """The oldest event the webhook has not taken yet."""
        row = self.db.execute("SELECT * FROM deliveries WHERE hook=? ORDER BY seq LIMIT 1",
                              (hook,)).fetchone()
        if row is None:
            return None
        return Delivery(row["seq"], row["hook"], row["event"], row["event_id"],
                        bytes(row["body"]), row["attempts"], row["created"])

    def done(self, seq: int) -> None:
        self.db.execute("DELETE FROM deliveries WHERE seq=?", (seq,))

    def failed(self, seq: int) -> None:
        self.db.execute("UPDATE deliveries SET attempts=attempts+1 WHERE seq=?", (seq,))

    def pending(self, hook: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM deliveries WHERE hook=?",
                                   (hook,)).fetchone()[0])

    def forget_others(self, hooks: Iterable[str]) -> dict[str, int]:
        """Drop the events of webhooks no longer configured; returns how many per URL."""
        keep = set(hooks)
        gone = {row[0]: int(row[1]) for row in self.db.execute(
            "SELECT hook, count(*) FROM deliveries GROUP BY hook") if row[0] not in keep}
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for hook in gone:
                self.db.execute("DELETE FROM deliveries WHERE hook=?", (hook,))
        return gone
