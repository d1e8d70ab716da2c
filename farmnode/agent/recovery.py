"""Recovery after a restart: what a previous agent process left behind, taken back.

Runs still going are adopted through their links in systemd's fd store, runs that never got
past their gate start afresh, runs whose link was lost are concluded from their shim's
record; the journald settings of scopes whose run ended while no agent ran are removed, and
the shims of links whose assignment already concluded are let go. It also answers the spool
janitor (farmnode.agent.janitor): which spools no run of this agent journals, and what the
stored reasons say once one is journaled.

It starts runs only through the core's own functions (`Recovery.new_run`, `Recovery.launch`),
so a run it adopts is booked like any other. It may import farmnode.agent's runner and
janitor, farmnode.systemd, farmnode.tasks and farmnode.config; never farmnode.agent.core,
which calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from farmnode.agent.janitor import Left
from farmnode.agent.runner import AssignmentRun
from farmnode.agent.runsetup import scope_unit_name
from farmnode.config import Config
from farmnode.systemd import fdstore, link, spool
from farmnode.systemd.cgroup import cgroup_path_dir, shim_pid, unit_cgroup_path
from farmnode.systemd.journal import TaskLogFields, exported_units, remove_unit_settings
from farmnode.tasks.model import Assignment, TaskState
from farmnode.tasks.store import Store, TaskRecord

log = logging.getLogger(__name__)

ATTACH_TIMEOUT = 30  # s: how long READY waits for the adopted runs to attach again


@dataclass(frozen=True)
class Recovery:
    """What recovery reads (configuration, store, the agent's runs) and how it starts a run:
    the core's `_new_run` and `_launch`."""

    config: Config
    store: Store
    runs: Mapping[str, AssignmentRun]
    new_run: Callable[[Assignment, Sequence[str]], AssignmentRun]
    launch: Callable[[AssignmentRun, Coroutine[Any, Any, None]], None]


async def recover(ctx: Recovery) -> None:
    """Take back what a previous agent process left running (restart, upgrade, crash).

    Each running assignment's link comes back from systemd's fd store; its shim says how
    far the output is journaled and resends the rest. An assignment with no link never got
    past its gate (it is started afresh) or ran outside systemd (its scope is stopped, tasks
    failed).
    """
    inherited = fdstore.inherited()
    for a in ctx.store.active_assignments():
        take_back(ctx, a, inherited)
    adopted = [run for run in ctx.runs.values() if run.adopting]
    if adopted:
        # READY (sent after this) then means every inherited task is attached again.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(r.attached.wait() for r in adopted)),
                                   timeout=ATTACH_TIMEOUT)
    # journald settings of task scopes whose run ended while no agent was there to
    # remove them (they live in /run, so only since boot).
    for unit in exported_units() - {run.unit for run in ctx.runs.values()}:
        remove_unit_settings(unit)
    for name, fds in inherited.items():
        # Links of assignments already concluded: let their shims go.
        for fd in fds:
            with contextlib.suppress(OSError), socket.socket(fileno=fd) as sock:
                sock.setblocking(False)
                sock.send(link.pack(link.EXIT_ACK))
        fdstore.remove(name)


def take_back(ctx: Recovery, a: Assignment, inherited: dict[str, list[int]]) -> None:
    """Launch the run of one active assignment: adopted through its link (taken out of
    `inherited`), started afresh, or concluded from its shim's record."""
    run = ctx.new_run(a, ctx.store.gpus_of(a.id))
    records = ctx.store.tasks(a.id)
    fds = inherited.pop(fdstore.link_name(a.id, link.VERSION), [])
    if not fds:
        fds = inherited.pop(fdstore.link_name(a.id, 1), [])
        if fds:
            log.info("assignment %s: its shim speaks link protocol 1 (an older "
                     "farmnode started it); journaling its lines the old way", a.id)
            run.link_version = 1
    for extra in fds[1:]:
        os.close(extra)
    starts = [rec.started for rec in records if rec.started]
    run.started_at = min(starts) if starts else None
    run.paused_for, run.paused_since = ctx.store.paused_of(a.id)
    if run.paused_since is not None and not (ctx.config.workstation_mode
                                             or ctx.config.render_schedule):
        # nothing will resume it: its clock runs from now on
        run.resume_clock(time.time())
    run.started = any(rec.state is TaskState.RUNNING for rec in records)
    if fds:
        log.info("re-adopting assignment %s (%s)", a.id, run.unit)
        run.adopting = True
        ctx.launch(run, run.adopt(socket.socket(fileno=fds[0])))
    elif (run.recorded_exit() is None and not run.shim_alive()
          and all(rec.state is TaskState.QUEUED for rec in records)):
        log.info("restarting assignment %s: it never started", a.id)
        run.started = False
        ctx.launch(run, run.run())
    else:
        # The job ran (or runs) with no link left to it: its shim journals the output
        # itself and leaves the exit status in its record.
        log.warning("assignment %s: no link to its task survived; concluding from "
                    "its shim's record", a.id)
        run.adopting = True
        ctx.launch(run, run.conclude_headless())


def spools_left(config: Config, store: Store, runs: Mapping[str, AssignmentRun],
                unowned: set[str]) -> Left:
    """Spools no run of this agent will journal: their run concluded (in an earlier
    agent process, whose retry went with it). Those whose shim still writes them (it
    outlived its run) are counted, to be journaled once it has gone. `unowned`: the spools
    of no known assignment already told in the log (each is told once)."""
    found: dict[str, TaskLogFields] = {}
    held = 0
    tasks_dir = os.path.join(config.agent_runtime_dir, "tasks")
    for status_path, aid in spool.waiting(tasks_dir).items():
        if aid in runs:
            continue  # its own run journals it when it concludes
        a = store.assignment(aid)
        if a is None:
            if status_path not in unowned:
                unowned.add(status_path)
                log.warning("the spool of %s belongs to no assignment the agent knows; "
                            "left in place", status_path)
            continue
        unit = scope_unit_name(a)
        if shim_pid(cgroup_path_dir(unit_cgroup_path(unit, config.task_slice))):
            held += 1
            continue
        found[status_path] = TaskLogFields(unit, a.job.id, a.id, a.task_ids, a.jobtype.name)
    return Left(found, held)


def journaled_late(store: Store, status_path: str, fields: TaskLogFields,
                   done: spool.Replayed) -> list[TaskRecord]:
    """The output an outcome said was waiting is in the journal: its tasks' reasons say
    what came of it instead. Returns the records that changed."""
    note = done.describe() or "output held while journald was away: all in the journal"
    try:
        if not store.replace_note(fields.assignment_id, spool.pending_note(status_path), note):
            return []
        return [r for t in fields.task_ids
                if (r := store.task_in(fields.assignment_id, t)) is not None]
    except sqlite3.Error as exc:
        log.warning("assignment %s: %s (not stored: %s)", fields.assignment_id, note, exc)
        return []
