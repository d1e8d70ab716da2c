"""The state store: assignments and task states in SQLite under the state directory.

Nothing that matters lives only in memory: every accepted assignment and every task state
change is committed here before anyone is told about it. A task id may come back in a later
assignment (a retry), so a task row is keyed by (assignment, task).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from farmnode.tasks import tasklog
from farmnode.tasks.model import Assignment, StateChange, TaskState
from farmnode.tasks.schema import assignment_to_json, parse_assignment

SCHEMA = """
CREATE TABLE IF NOT EXISTS assignments (
    id TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    payload TEXT NOT NULL,
    unit TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    jobtype TEXT,  -- the job type's name, so reading a task never parses the payload
    accounting TEXT,  -- JSON: the scope's cgroup figures, last sampled or final
    gpus TEXT,  -- JSON: the GPUs (UUID, else PCI address) the assignment holds
    paused_for REAL,  -- s workstation mode held it paused (pauses that ended)
    paused_since REAL  -- wall clock: when the current pause began; NULL: not paused
);
CREATE TABLE IF NOT EXISTS tasks (
    assignment_id TEXT NOT NULL REFERENCES assignments(id),
    id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    frame REAL NOT NULL,
    tile INTEGER,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    progress REAL NOT NULL DEFAULT 0,
    exit_code INTEGER,
    signal INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    PRIMARY KEY (assignment_id, id)
);
CREATE INDEX IF NOT EXISTS tasks_by_id ON tasks(id);
CREATE INDEX IF NOT EXISTS tasks_by_finished ON tasks(finished);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Reports for the master not yet acknowledged, written in the same transaction as the change
-- they describe, so a crash can never leave a change that will not be reported.
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    job_id INTEGER,
    task_id INTEGER,
    payload TEXT NOT NULL,
    created REAL NOT NULL
);
-- One log per assignment, as PyFarm's agent kept it: the identifier the master knows it by
-- and the agent's own lines about the run (JSON [[time, pid, message], ...]); the job's
-- output stays in journald, the exit status in the task rows.
CREATE TABLE IF NOT EXISTS task_logs (
    assignment_id TEXT PRIMARY KEY REFERENCES assignments(id),
    identifier TEXT NOT NULL UNIQUE,
    internal TEXT NOT NULL DEFAULT '[]',
    pid INTEGER
);
"""


@dataclass(frozen=True)
class Report:
    """One outbox entry: kind is task_state, task_progress, agent_state, or for the task's
    log (PyFarm's per-attempt log calls) log_register, log_upload, log_state."""

    seq: int
    kind: str
    job_id: int | None
    task_id: int | None
    payload: dict[str, Any]
    created: float


@dataclass(frozen=True)
class TaskRecord:
    id: int
    assignment_id: str
    job_id: int
    frame: float
    tile: int | None
    attempt: int
    state: TaskState
    reason: str | None
    progress: float
    exit_code: int | None
    signal: int | None
    unit: str
    jobtype: str
    accounting: dict[str, int]
    created: float
    started: float | None
    finished: float | None
    gpus: tuple[str, ...] = ()  # the assignment's GPUs (UUID, else PCI address)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        d["gpus"] = list(self.gpus)
        return d


class Store:
    def __init__(self, path: str | Path, outbox: bool = False) -> None:
        # outbox: queue reports for a master (only when one is configured)
        self.outbox = outbox
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a state change reported to anyone must survive a power cut.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database an older farmnode wrote up to this schema (in place; an older
        farmnode still reads and writes it: it names the columns it uses)."""
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(assignments)")}
        if "jobtype" not in columns:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("ALTER TABLE assignments ADD COLUMN jobtype TEXT")
                self.db.execute("UPDATE assignments SET"
                                " jobtype=json_extract(payload, '$.jobtype.name')")
        if "gpus" not in columns:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("ALTER TABLE assignments ADD COLUMN gpus TEXT")
        if "paused_for" not in columns:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("ALTER TABLE assignments ADD COLUMN paused_for REAL")
                self.db.execute("ALTER TABLE assignments ADD COLUMN paused_since REAL")

    def close(self) -> None:
        self.db.close()

    def add_assignment(self, a: Assignment, unit: str, gpus: Sequence[str] = ()) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO assignments (id, job_id, payload, unit, created, jobtype, gpus)"
                " VALUES (?,?,?,?,?,?,?)",
                (a.id, a.job.id, json.dumps(assignment_to_json(a)), unit, now, a.jobtype.name,
                 json.dumps(list(gpus))),
            )
            self.db.executemany(
                "INSERT INTO tasks (assignment_id, id, job_id, frame, tile, attempt, state,"
                " created) VALUES (?,?,?,?,?,?,?,?)",
                [(a.id, t.id, a.job.id, t.frame, t.tile, t.attempt, str(TaskState.QUEUED), now)
                 for t in a.tasks],
            )
            log_id = tasklog.identifier(a.job.id, a.id, now)
            self.db.execute("INSERT INTO task_logs (assignment_id, identifier) VALUES (?,?)",
                            (a.id, log_id))
            if self.outbox:
                # Queued before any state of the tasks: the master takes a log's upload and
                # state only for a task attempt it was registered with.
                for t in a.tasks:
                    self._enqueue("log_register", a.job.id, t.id,
                                  {"assignment_id": a.id, "attempt": t.attempt,
                                   "identifier": log_id}, now)

    def assignment(self, assignment_id: str) -> Assignment | None:
        row = self.db.execute("SELECT payload FROM assignments WHERE id=?",
                              (assignment_id,)).fetchone()
        return None if row is None else parse_assignment(json.loads(row["payload"]), assignment_id)

    def gpus_of(self, assignment_id: str) -> tuple[str, ...]:
        row = self.db.execute("SELECT gpus FROM assignments WHERE id=?",
                              (assignment_id,)).fetchone()
        return () if row is None else tuple(json.loads(row["gpus"] or "[]"))

    def paused_of(self, assignment_id: str) -> tuple[float, float | None]:
        """The time an assignment was paused (s) and when its current pause began."""
        row = self.db.execute("SELECT paused_for, paused_since FROM assignments WHERE id=?",
                              (assignment_id,)).fetchone()
        if row is None:
            return 0.0, None
        return float(row["paused_for"] or 0.0), row["paused_since"]

    def set_paused(self, assignment_id: str, paused_for: float,
                   paused_since: float | None) -> None:
        with self.db:
            self.db.execute("UPDATE assignments SET paused_for=?, paused_since=? WHERE id=?",
                            (paused_for, paused_since, assignment_id))

    def replace_note(self, assignment_id: str, old: str, new: str) -> int:
        """Replace a note in the reasons of an assignment's tasks (the output a reason said
        was waiting has been journaled); returns how many tasks had it."""
        with self.db:
            return self.db.execute("UPDATE tasks SET reason=replace(reason, ?, ?) "
                                   "WHERE assignment_id=? AND instr(reason, ?) > 0",
                                   (old, new, assignment_id, old)).rowcount

    def unit_of(self, assignment_id: str) -> str | None:
        row = self.db.execute("SELECT unit FROM assignments WHERE id=?",
                              (assignment_id,)).fetchone()
        return None if row is None else str(row["unit"])

    def active_assignments(self) -> list[Assignment]:
        rows = self.db.execute(
            "SELECT id, payload FROM assignments WHERE active=1 ORDER BY created").fetchall()
        return [parse_assignment(json.loads(r["payload"]), r["id"]) for r in rows]

    def set_accounting(self, assignment_id: str, accounting: dict[str, int]) -> None:
        self.db.execute("UPDATE assignments SET accounting=? WHERE id=?",
                        (json.dumps(accounting), assignment_id))

    def finish_assignment(self, assignment_id: str) -> None:
        self.db.execute("UPDATE assignments SET active=0 WHERE id=?", (assignment_id,))

    def set_task_state(self, assignment_id: str, task_id: int, state: TaskState,
                       reason: str | None = None, exit_code: int | None = None,
                       signal: int | None = None) -> bool:
        """Move a task forward; False (and no change) if it already finished."""
        change = StateChange(task_id, state, reason, exit_code, signal)
        return bool(self.set_task_states(assignment_id, [change]))

    def set_task_states(self, assignment_id: str, changes: Sequence[StateChange],
                        ) -> list[StateChange]:
        """Move tasks forward in one transaction; the changes that took effect.

        One commit for a whole batch: a 5,000-task assignment that ends made 5,000 durable
        commits (each an fsync) on the event loop, long enough for the watchdog to kill the
        agent. Same-state and post-finish updates are no-ops, so every change is reported once.
        """
        now = time.time()
        finished_states = tuple(str(s) for s in TaskState if s.finished)
        applied: list[StateChange] = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            job_id = self._job_of(assignment_id) if self.outbox else None
            log_id = self._log_of(assignment_id) if self.outbox else None
            unfinished = self.unfinished(assignment_id) if log_id else 0
            for c in changes:
                sets = ["state=?", "reason=?"]
                args: list[Any] = [str(c.state), c.reason]
                if c.state is TaskState.RUNNING:
                    sets.append("started=COALESCE(started, ?)")
                    args.append(now)
                if c.state.finished:
                    sets += ["finished=?", "exit_code=?", "signal=?"]
                    args += [now, c.exit_code, c.signal]
                    if c.state is TaskState.DONE:
                        sets.append("progress=1")
                cur = self.db.execute(
                    f"UPDATE tasks SET {', '.join(sets)} WHERE assignment_id=? AND id=?"
                    f" AND state<>? AND state NOT IN ({','.join('?' * len(finished_states))})",
                    (*args, assignment_id, c.task_id, str(c.state), *finished_states),
                )
                if cur.rowcount != 1:
                    continue
                applied.append(c)
                if not self.outbox:
                    continue
                if log_id is not None and c.state.finished:
                    unfinished -= 1
                    if unfinished == 0:
                        self._enqueue_upload(assignment_id, job_id, log_id, now)
                payload: dict[str, Any] = {"assignment_id": assignment_id,
                                           "state": str(c.state), "time": now}
                if c.reason is not None:
                    payload["reason"] = c.reason
                self._enqueue("task_state", job_id, c.task_id, payload, now)
                if log_id is not None:
                    # PyFarm's agent marks the log with each state right after the task's.
                    self._enqueue("log_state", job_id, c.task_id,
                                  {"assignment_id": assignment_id,
                                   "attempt": self._attempt_of(assignment_id, c.task_id),
                                   "identifier": log_id, "state": str(c.state)}, now)
        return applied

    def unfinished(self, assignment_id: str) -> int:
        """How many of the assignment's tasks have no final state yet."""
        finished_states = tuple(str(s) for s in TaskState if s.finished)
        return int(self.db.execute(
            f"SELECT count(*) FROM tasks WHERE assignment_id=? AND state NOT IN"
            f" ({','.join('?' * len(finished_states))})",
            (assignment_id, *finished_states)).fetchone()[0])

    def _enqueue_upload(self, assignment_id: str, job_id: int | None, log_id: str,
                        now: float) -> None:
        """The log's upload, queued with the last task of the assignment to finish and before
        that task's final state (PyFarm's order: the log is on the master when the task is
        done). The row names the log; its text is read when it is sent."""
        # PyFarm uploads once, to the first task's attempt: the master keeps one file per
        # identifier, which every task of the batch was registered with.
        first = self.db.execute("SELECT id, attempt FROM tasks WHERE assignment_id=?"
                                " ORDER BY rowid LIMIT 1", (assignment_id,)).fetchone()
        self._enqueue("log_upload", job_id, int(first["id"]),
                      {"assignment_id": assignment_id, "attempt": int(first["attempt"]),
                       "identifier": log_id}, now)

    def _log_of(self, assignment_id: str) -> str | None:
        row = self.db.execute("SELECT identifier FROM task_logs WHERE assignment_id=?",
                              (assignment_id,)).fetchone()
        return None if row is None else str(row["identifier"])

    def _attempt_of(self, assignment_id: str, task_id: int) -> int:
        row = self.db.execute("SELECT attempt FROM tasks WHERE assignment_id=? AND id=?",
                              (assignment_id, task_id)).fetchone()
        return 0 if row is None else int(row["attempt"])

    # ---- task logs -------------------------------------------------------------------
    def add_log_lines(self, assignment_id: str, lines: list[tasklog.InternalLine],
                      pid: int | None = None) -> None:
        """Append the agent's own lines to the assignment's log (and the job's pid, once the
        shim has said it); no-op for an assignment accepted before logs were kept."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT internal FROM task_logs WHERE assignment_id=?",
                                  (assignment_id,)).fetchone()
            if row is None:
                return
            internal = json.loads(row["internal"]) + [ln.to_json() for ln in lines]
            self.db.execute("UPDATE task_logs SET internal=?, pid=COALESCE(?, pid)"
                            " WHERE assignment_id=?", (json.dumps(internal), pid, assignment_id))

    def task_log(self, assignment_id: str) -> tasklog.TaskLogRecord | None:
        row = self.db.execute(
            "SELECT l.*, a.job_id AS job_id, a.created AS created FROM task_logs l"
            " JOIN assignments a ON a.id = l.assignment_id WHERE l.assignment_id=?",
            (assignment_id,)).fetchone()
        if row is None:
            return None
        ends = tuple(
            tasklog.TaskEnd(r["id"], r["state"], r["reason"], r["exit_code"], r["signal"],
                            r["finished"])
            for r in self.db.execute("SELECT * FROM tasks WHERE assignment_id=? ORDER BY rowid",
                                     (assignment_id,)))
        return tasklog.TaskLogRecord(
            assignment_id=assignment_id, identifier=row["identifier"], job_id=row["job_id"],
            created=row["created"],
            internal=tuple(tasklog.InternalLine.from_json(v) for v in json.loads(row["internal"])),
            pid=row["pid"], ends=ends)

    def task_log_assignment(self, identifier: str) -> str | None:
        """The assignment whose log the master knows by `identifier`."""
        row = self.db.execute("SELECT assignment_id FROM task_logs WHERE identifier=?",
                              (identifier,)).fetchone()
        return None if row is None else str(row["assignment_id"])

    def set_task_progress(self, assignment_id: str, task_id: int, progress: float) -> bool:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "UPDATE tasks SET progress=? WHERE assignment_id=? AND id=? AND progress<>?"
                " AND state IN (?, ?)",
                (progress, assignment_id, task_id, progress, str(TaskState.QUEUED),
                 str(TaskState.RUNNING)),
            )
            changed = cur.rowcount == 1
            if changed and self.outbox:
                # Only the latest progress matters: an undelivered older one is replaced,
                # which keeps a long master outage from growing the outbox per output line.
                self.db.execute("DELETE FROM outbox WHERE kind='task_progress' AND task_id=?",
                                (task_id,))
                self._enqueue("task_progress", self._job_of(assignment_id), task_id,
                              {"assignment_id": assignment_id, "progress": progress}, now)
        return changed

    # ---- outbox ----------------------------------------------------------------------
    def _job_of(self, assignment_id: str) -> int | None:
        row = self.db.execute("SELECT job_id FROM assignments WHERE id=?",
                              (assignment_id,)).fetchone()
        return None if row is None else int(row["job_id"])

    def _enqueue(self, kind: str, job_id: int | None, task_id: int | None,
                 payload: dict[str, Any], now: float) -> None:
        self.db.execute(
            "INSERT INTO outbox (kind, job_id, task_id, payload, created) VALUES (?,?,?,?,?)",
            (kind, job_id, task_id, json.dumps(payload), now),
        )

    def pending_reports(self, limit: int = 100) -> list[Report]:
        rows = self.db.execute("SELECT * FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Report(r["seq"], r["kind"], r["job_id"], r["task_id"], json.loads(r["payload"]),
                       r["created"]) for r in rows]

    def ack_report(self, seq: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE seq=?", (seq,))

    def assignments_with_pending_reports(self) -> list[str]:
        """Ids of assignments the outbox still holds reports for, oldest report first."""
        rows = self.db.execute(
            "SELECT json_extract(payload, '$.assignment_id') AS aid, min(seq) AS first"
            " FROM outbox WHERE aid IS NOT NULL GROUP BY aid ORDER BY first").fetchall()
        return [str(r["aid"]) for r in rows]

    def pending_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    _SELECT = (
        # json_extract parsed the whole payload per row (1 ms a row at 5,000 tasks); rows an
        # older farmnode wrote have no column value yet.
        "SELECT t.*, a.unit AS unit,"
        " COALESCE(a.jobtype, json_extract(a.payload, '$.jobtype.name')) AS jobtype,"
        " a.accounting AS accounting, a.gpus AS gpus"
        " FROM tasks t JOIN assignments a ON a.id = t.assignment_id"
    )

    @staticmethod
    def _record(row: sqlite3.Row) -> TaskRecord:
        return TaskRecord(
            id=row["id"], assignment_id=row["assignment_id"], job_id=row["job_id"],
            frame=row["frame"], tile=row["tile"], attempt=row["attempt"],
            state=TaskState(row["state"]), reason=row["reason"], progress=row["progress"],
            exit_code=row["exit_code"], signal=row["signal"], unit=row["unit"],
            jobtype=row["jobtype"], accounting=json.loads(row["accounting"] or "{}"),
            created=row["created"], started=row["started"],
            finished=row["finished"], gpus=tuple(json.loads(row["gpus"] or "[]")),
        )

    def tasks(self, assignment_id: str | None = None, active_only: bool = False,
              limit: int | None = None) -> list[TaskRecord]:
        """Task rows, newest assignment first; `limit` bounds a listing for a client (the
        agent itself always reads an assignment whole: recovery must see every task)."""
        where, args = [], []
        if assignment_id is not None:
            where.append("t.assignment_id=?")
            args.append(assignment_id)
        if active_only:
            where.append("a.active=1")
        sql = self._SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY t.created DESC, t.frame ASC LIMIT ?"
        return [self._record(r) for r in self.db.execute(sql, (*args, -1 if limit is None
                                                                else limit))]

    def finished_since(self, since: float) -> list[TaskRecord]:
        """Tasks that finished after `since` (an index range, whatever the history's size)."""
        return [self._record(r) for r in self.db.execute(
            self._SELECT + " WHERE t.finished > ? ORDER BY t.finished", (since,))]

    def task_in(self, assignment_id: str, task_id: int) -> TaskRecord | None:
        """One task of one assignment (an index lookup, whatever the assignment's size)."""
        row = self.db.execute(self._SELECT + " WHERE t.assignment_id=? AND t.id=?",
                              (assignment_id, task_id)).fetchone()
        return None if row is None else self._record(row)

    def task(self, task_id: int) -> TaskRecord | None:
        """The latest attempt of a task id."""
        row = self.db.execute(self._SELECT + " WHERE t.id=? ORDER BY t.created DESC LIMIT 1",
                              (task_id,)).fetchone()
        return None if row is None else self._record(row)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                        " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))
