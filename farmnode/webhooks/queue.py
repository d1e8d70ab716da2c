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
process crash loses nothing, only a power cut may lose the last events, and of those the
marks below bring back each task's latest change) so queuing an event on the agent's loop
costs no fsync.

Its own file also means no transaction spans a task's change in the state store and its
event here (SQLite's WAL mode makes a transaction over ATTACHed files atomic per file only).
So the queue marks, per task, the last change it queued (in the transaction that queues
it), and the agent's next start queues each change the store holds and the marks lack: a
`kill -9` between the two commits delays that event and never loses it, and a change whose
event is queued is never queued twice.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
-- Per task, the last change queued for the webhooks (whichever wanted it).
CREATE TABLE IF NOT EXISTS task_marks (
    assignment_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL,
    PRIMARY KEY (assignment_id, task_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class TaskMark(NamedTuple):
    """A task's change as its event describes it: what the store is compared with."""

    assignment_id: str
    task_id: int
    state: str
    progress: float



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
        return self.put_all([hook], event, event_id, body, supersedes, now=now)[0]

    def put_all(self, hooks: Sequence[str], event: str, event_id: str, body: bytes,
                supersedes: str | None = None, mark: TaskMark | None = None,
                now: float | None = None) -> list[int]:
        """Queue one event for each of `hooks`, and mark the task's change, in one
        transaction: a crash leaves either all of it or none (then the next start queues
        it). Returns, per webhook, how many old events made room for it."""
        created = time.time() if now is None else now
        dropped: list[int] = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for hook in hooks:
                if supersedes is not None:
                    self.db.execute("DELETE FROM deliveries WHERE hook=? AND supersedes=?",
                                    (hook, supersedes))
                self.db.execute(
                    "INSERT INTO deliveries (hook, event, event_id, supersedes, body, created)"
                    " VALUES (?,?,?,?,?,?)", (hook, event, event_id, supersedes, body, created))
                over = self.pending(hook) - self.limit
                if over > 0:
                    self.db.execute(
                        "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries"
                        " WHERE hook=? ORDER BY seq LIMIT ?)", (hook, over))
                dropped.append(max(over, 0))
            if mark is not None:
                self._mark(mark)
        return dropped

    def _mark(self, mark: TaskMark) -> None:
        self.db.execute(
            "INSERT INTO task_marks (assignment_id, task_id, state, progress) VALUES (?,?,?,?)"
            " ON CONFLICT(assignment_id, task_id) DO UPDATE SET state=excluded.state,"
            " progress=excluded.progress", mark)

    def marks(self) -> dict[tuple[str, int], TaskMark] | None:
        """Every task's marked change; None while this file has never been compared with
        the store (a new file, or one an older farmnode wrote): it knows nothing yet."""
        if self.db.execute("SELECT 1 FROM meta WHERE key='marks'").fetchone() is None:
            return None
        return {(r[0], r[1]): TaskMark(r[0], r[1], r[2], r[3]) for r in self.db.execute(
            "SELECT assignment_id, task_id, state, progress FROM task_marks")}

    def settle_marks(self, marks: Iterable[TaskMark],
                     keep: Iterable[tuple[str, int]]) -> None:
        """Mark these changes (none of their events was wanted, or the file starts tracking
        here) and forget the marks of tasks not in `keep` (their assignments ended: their
        tasks change no more, and the store is not compared with them again)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS kept"
                            " (assignment_id TEXT NOT NULL, task_id INTEGER NOT NULL)")
            self.db.execute("DELETE FROM kept")
            self.db.executemany("INSERT INTO kept VALUES (?,?)", keep)
            self.db.execute("DELETE FROM task_marks WHERE (assignment_id, task_id)"
                            " NOT IN (SELECT assignment_id, task_id FROM kept)")
            for m in marks:
                self._mark(m)
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('marks', '1')")

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
