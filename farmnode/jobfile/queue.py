"""The node's own queue of job-file jobs (no master): durable, run in dependency order.

Owns `jobs.db` in the state directory. A submitted file is written in one transaction (all
its jobs or none); each job's frames are cut into batches with task ids chosen here, and a
batch runs as an assignment through `Agent.assign` — the call behind the Assign D-Bus
method, so it gets the scopes, limits, journald fields and signals a master's assignment
gets. A job starts when every job it depends on is done; a failed job fails its dependents
with its reason.

Crash safety: a batch is marked `starting` (with its task ids) before it is assigned, and
the agent's store is asked afterwards whether those task ids were taken. A restart thus
neither loses a batch nor runs one twice. Tasks the agent cancelled because it was stopped
(shutdown, reboot) are queued again rather than counted as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farmnode.jobfile.model import JobFile, JobSpec
from farmnode.jobfile.parse import as_assignment
from farmnode.tasks.model import TaskState

if TYPE_CHECKING:
    from farmnode.agent.core import Agent, TaskChange

log = logging.getLogger(__name__)

# Task ids the node gives its own jobs' tasks: far above a master's (which count from 1), so
# `farmnode logs`, `cancel` and scope names stay unambiguous.
TASK_ID_BASE = 1_000_000_000
RETRY_INTERVAL = 2.0  # s: how often a batch the agent did not take yet is offered again
# The reason the core gives tasks it stops because the agent stops (not the job's fault).
AGENT_STOPPED = "agent stopped"

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    submitted REAL NOT NULL,
    submission TEXT  -- the caller's token: a retry of the same submission stores nothing
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the assignments' job id
    file_id INTEGER NOT NULL REFERENCES files(id),
    name TEXT NOT NULL,  -- the job's id in its file
    spec TEXT NOT NULL,  -- JobSpec.to_json()
    state TEXT NOT NULL,  -- queued, running, done, failed; submitted (sent to a master)
    reason TEXT,
    master_job_id INTEGER,
    finished REAL
);
CREATE TABLE IF NOT EXISTS deps (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    dep_id INTEGER NOT NULL REFERENCES jobs(id)
);
CREATE TABLE IF NOT EXISTS batches (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    tasks TEXT NOT NULL,  -- JSON [[task id, frame], ...]
    state TEXT NOT NULL,  -- queued, starting, running, done, failed, skipped
    assignment_id TEXT,
    reason TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Batch:
    job_id: int
    idx: int
    tasks: tuple[tuple[int, float], ...]
    state: str
    assignment_id: str | None
    reason: str | None


class JobStore:
    """The queue's tables; every method is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(files)")}
        if "submission" not in columns:  # a jobs.db of an older farmnode
            with self._tx() as db:
                db.execute("ALTER TABLE files ADD COLUMN submission TEXT")
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS files_submission ON files "
                        "(submission) WHERE submission IS NOT NULL")

    def submitted(self, submission: str) -> list[int] | None:
        """The jobs stored for a submission token (None: no such submission)."""
        row = self.db.execute("SELECT id FROM files WHERE submission=?",
                              (submission,)).fetchone()
        if row is None:
            return None
        return [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE file_id=? ORDER BY id",
                                              (row["id"],))]

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def add_file(self, jobfile: JobFile, master_ids: dict[str, int] | None = None,
                 submission: str = "") -> list[int]:
        """Store every job of the file (queued, or submitted when `master_ids` says where
        the master keeps each); returns their ids, in the file's dependency order. A
        submission token stored already stores nothing and returns that file's jobs."""
        with self._tx() as db:
            if submission:
                known = db.execute("SELECT id FROM files WHERE submission=?",
                                   (submission,)).fetchone()
                if known is not None:
                    return [r[0] for r in db.execute(
                        "SELECT id FROM jobs WHERE file_id=? ORDER BY id", (known["id"],))]
            file_id = db.execute("INSERT INTO files (name, submitted, submission) "
                                 "VALUES (?, ?, ?)",
                                 (jobfile.name, time.time(), submission or None)).lastrowid
            row = db.execute("SELECT value FROM meta WHERE key='next_task'").fetchone()
            next_task = int(row["value"]) if row else TASK_ID_BASE + 1
            ids: dict[str, int] = {}
            for spec in jobfile.jobs:
                master_id = master_ids.get(spec.id) if master_ids is not None else None
                job_id = db.execute(
                    "INSERT INTO jobs (file_id, name, spec, state, master_job_id) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (file_id, spec.id, json.dumps(spec.to_json()),
                     "queued" if master_ids is None else "submitted", master_id)).lastrowid
                assert job_id is not None
                ids[spec.id] = job_id
                db.executemany("INSERT INTO deps (job_id, dep_id) VALUES (?, ?)",
                               [(job_id, ids[d]) for d in spec.dependencies])
                if master_ids is not None:
                    continue
                for idx, frames in enumerate(spec.frames.batches()):
                    tasks = [(next_task + i, f) for i, f in enumerate(frames)]
                    next_task += len(frames)
                    db.execute("INSERT INTO batches (job_id, idx, tasks, state) "
                               "VALUES (?, ?, ?, 'queued')", (job_id, idx, json.dumps(tasks)))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_task', ?)",
                       (str(next_task),))
        return list(ids.values())

    def jobs(self, states: tuple[str, ...] | None = None) -> list[sqlite3.Row]:
        rows = self.db.execute("SELECT jobs.*, files.name AS file FROM jobs JOIN files ON "
                               "files.id = jobs.file_id ORDER BY jobs.id").fetchall()
        return [r for r in rows if states is None or r["state"] in states]

    def deps(self, job_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT dep_id FROM deps WHERE job_id=?",
                                              (job_id,))]

    def batches(self, job_id: int | None = None, states: tuple[str, ...] | None = None
                ) -> list[Batch]:
        sql, args = "SELECT * FROM batches", tuple[int, ...]()
        if job_id is not None:
            sql, args = sql + " WHERE job_id=?", (job_id,)
        return [Batch(r["job_id"], r["idx"], tuple((int(t), float(f)) for t, f in
                                                   json.loads(r["tasks"])),
                      r["state"], r["assignment_id"], r["reason"])
                for r in self.db.execute(sql + " ORDER BY job_id, idx", args)
                if states is None or r["state"] in states]

    def set_batch(self, b: Batch, state: str, assignment_id: str | None = None,
                  reason: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE batches SET state=?, assignment_id=?, reason=? "
                       "WHERE job_id=? AND idx=?",
                       (state, assignment_id, reason, b.job_id, b.idx))

    def set_job(self, job_id: int, state: str, reason: str | None = None) -> None:
        with self._tx() as db:
            finished = time.time() if state in ("done", "failed") else None
            db.execute("UPDATE jobs SET state=?, reason=?, finished=? WHERE id=?",
                       (state, reason, finished, job_id))
            if state == "failed":
                db.execute("UPDATE batches SET state='skipped' WHERE job_id=? AND "
                           "state='queued'", (job_id,))


    def requeue(self, b: Batch) -> None:
        """A stopped batch runs again under new task ids (the old ones belong to the
        assignment that was stopped, and a task id names one scope)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='next_task'").fetchone()
            first = int(row["value"])
            tasks = [(first + i, f) for i, (_t, f) in enumerate(b.tasks)]
            db.execute("UPDATE meta SET value=? WHERE key='next_task'",
                       (str(first + len(tasks)),))
            db.execute("UPDATE batches SET tasks=?, state='queued', assignment_id=NULL, "
                       "reason=NULL WHERE job_id=? AND idx=?",
                       (json.dumps(tasks), b.job_id, b.idx))


class JobQueue:
    """Runs the queue's jobs on this node, reacting to the agent's task changes."""

    def __init__(self, agent: Agent, store: JobStore) -> None:
        self.agent = agent
        self.store = store
        self._scheduled = False
        self._stopped = False
        self._retry: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.agent.task_listeners.append(self._on_task)
        self._retry = asyncio.get_running_loop().create_task(self._retry_periodically())
        self.tick()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(ValueError):
            self.agent.task_listeners.remove(self._on_task)
        if self._retry is not None:
            self._retry.cancel()

    def submit(self, jobfile: JobFile, submission: str = "") -> list[int]:
        ids = self.store.add_file(jobfile, submission=submission)
        log.info("job file %s: %d job(s) queued (%s)", jobfile.name, len(ids),
                 ", ".join(j.id for j in jobfile.jobs))
        self.tick()
        return ids

    def _on_task(self, change: TaskChange) -> None:
        # A listener runs inside the core's state change: the queue acts after it, once.
        if change.state.finished and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_tick)

    def _scheduled_tick(self) -> None:
        self._scheduled = False
        self.tick()

    async def _retry_periodically(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            if self.store.batches(states=("queued",)):
                self.tick()

    def tick(self) -> None:
        if self._stopped:
            return
        try:
            self._reconcile()
            self._conclude_jobs()
            self._start_ready()
        except sqlite3.Error as exc:  # full or failing disk: the next tick tries again
            log.error("job queue: the state directory refuses writes (%s)", exc)

    # ---- what happened to the batches that were started --------------------------------
    def _reconcile(self) -> None:
        for b in self.store.batches(states=("starting", "running")):
            aid = b.assignment_id
            if b.state == "starting":
                rec = self.agent.store.task(b.tasks[0][0])
                if rec is None:  # the agent never took it (it died in between): offer again
                    self.store.set_batch(b, "queued")
                    continue
                aid = rec.assignment_id
                self.store.set_batch(b, "running", aid)
            assert aid is not None
            records = self.agent.store.tasks(aid)
            if not records or not all(r.state.finished for r in records):
                continue
            bad = [r for r in records if r.state is not TaskState.DONE]
            if not bad:
                self.store.set_batch(b, "done", aid)
            elif all(r.state is TaskState.CANCELLED and (r.reason or "").startswith(
                    AGENT_STOPPED) for r in bad):
                log.info("job %d: batch %d was stopped with the agent; queued again",
                         b.job_id, b.idx)
                self.store.requeue(b)
            else:
                first = min(bad, key=lambda r: r.frame)
                self.store.set_batch(b, "failed", aid,
                                     f"frame {first.frame:g}: {first.reason or first.state}")

    def _conclude_jobs(self) -> None:
        state = {r["id"]: (r["state"], r["reason"], r["name"]) for r in self.store.jobs()}
        # In id order: a job's dependencies come before it (a file is stored in dependency
        # order), so a failure reaches every dependent in one pass.
        for job_id, (current, _reason, name) in state.items():
            if current not in ("queued", "running"):
                continue
            failed_deps = [d for d in self.store.deps(job_id) if state[d][0] == "failed"]
            if failed_deps:
                _dep_state, dep_reason, dep_name = state[failed_deps[0]]
                why = f"dependency {dep_name!r} failed: {dep_reason}"
                self.store.set_job(job_id, "failed", why)
                state[job_id] = ("failed", why, name)
                log.info("job %d (%s) failed: %s", job_id, name, why)
                continue
            batches = self.store.batches(job_id)
            failed = [b for b in batches if b.state == "failed"]
            new: tuple[str, str | None] | None = None
            if failed and not any(b.state in ("starting", "running") for b in batches):
                new = ("failed", failed[0].reason)
            elif all(b.state == "done" for b in batches):
                new = ("done", None)
            elif any(b.state != "queued" for b in batches) and current == "queued":
                new = ("running", None)
            if new is not None:
                self.store.set_job(job_id, *new)
                state[job_id] = (new[0], new[1], name)
                log.info("job %d (%s): %s%s", job_id, name, new[0],
                         f" ({new[1]})" if new[1] else "")

    # ---- starting what may run -----------------------------------------------------------
    def _start_ready(self) -> None:
        rows = self.store.jobs(("queued", "running", "done", "failed"))
        state = {r["id"]: r["state"] for r in rows}
        total = self.agent.total_cpus()
        busy = 0.0
        ready: list[tuple[sqlite3.Row, JobSpec]] = []
        for r in rows:
            spec = JobSpec.from_json(json.loads(r["spec"]))
            need = min(spec.cpus or total, total)
            busy += need * len(self.store.batches(r["id"], ("starting", "running")))
            if r["state"] in ("queued", "running") and all(
                    state.get(d) == "done" for d in self.store.deps(r["id"])):
                ready.append((r, spec))
        for r, spec in ready:
            # Stop failed jobs from starting more frames (their remaining batches are skipped).
            if any(b.state == "failed" for b in self.store.batches(r["id"])):
                continue
            for b in self.store.batches(r["id"], ("queued",)):
                need = min(spec.cpus or total, total)
                if busy and busy + need > total:
                    return  # the queue's order holds: nothing overtakes the job waiting here
                if not self._assign(r["id"], spec, b):
                    return
                busy += need

    def _assign(self, job_id: int, spec: JobSpec, b: Batch) -> bool:
        """Offer the batch to the agent; False when it takes no work now (try later)."""
        from farmnode.agent.core import AgentError, NotAccepting, NotEnoughResources

        self.store.set_batch(b, "starting")
        try:
            aid, _new = self.agent.assign(as_assignment(spec, job_id, b.tasks))
        except (NotAccepting, NotEnoughResources) as exc:
            self.store.set_batch(b, "queued")
            log.debug("job %d batch %d waits: %s", job_id, b.idx, exc)
            return False
        except AgentError as exc:
            self.store.set_batch(b, "failed", reason=str(exc))
            log.warning("job %d (%s) batch %d refused: %s", job_id, spec.id, b.idx, exc)
            self._conclude_jobs()
            return True
        self.store.set_batch(b, "running", aid)
        self._conclude_jobs()
        return True


def listing(store: JobStore) -> list[dict[str, Any]]:
    """The jobs as `farmnode jobs` shows them."""
    out = []
    for r in store.jobs():
        spec = JobSpec.from_json(json.loads(r["spec"]))
        batches = store.batches(r["id"])
        out.append({
            "id": r["id"], "name": r["name"], "title": spec.title, "file": r["file"],
            "jobtype": spec.jobtype, "state": r["state"], "reason": r["reason"],
            "dependencies": list(spec.dependencies), "master_job_id": r["master_job_id"],
            "frames": len(spec.frames.frames()),
            "assignments": [b.assignment_id for b in batches if b.assignment_id],
            "tasks": [t for b in batches for t, _f in b.tasks],
        })
    return out
