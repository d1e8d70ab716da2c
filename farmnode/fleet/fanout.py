"""One command on many nodes at once: each node's answer as it arrives, then a summary.

Every node runs in its own coroutine over its own bus; a node that cannot be reached,
does not resolve or refuses the call is one failed line, named, and the others go on. The
exit status is 0 only when every node succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from farmnode.fleet.calls import Lost, NodeAgent, Refused, Status
from farmnode.fleet.target import OpenFailed, Target, open_bus

# Connections opened at once for the one-shot commands (each is an ssh process and two
# descriptors here); a drain holds its connections until the node is idle, so it has none.
MAX_PARALLEL = 128
# s: a draining node's state is read again after this long without a signal, which also
# notices a node that went away (a dead ssh sends no signal).
DRAIN_RECHECK = 30.0
COMMANDS = ("status", "tasks", "cancel", "state", "drain")


@dataclass(frozen=True)
class Command:
    name: str  # one of COMMANDS
    task: int = 0  # cancel
    state: str = ""  # state
    active_only: bool = False  # tasks


@dataclass
class Outcome:
    target: Target
    ok: bool
    text: str  # the summary's word for this node: its answer, or why it failed
    data: Any = None
    seconds: float = 0.0
    # cancel: whether this node held the task (the command fails if no node did)
    held: bool = False


@dataclass
class Printer:
    """Lines go out whole and at once: nodes answer in any order, never interleaved."""

    json_lines: bool
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def lines(self, target: Target, lines: Sequence[str], data: Any = None,
              event: str = "answer") -> None:
        if self.json_lines:
            print(json.dumps({"node": target.label, "event": event, "data": data}),
                  file=self.out, flush=True)
            return
        for line in lines:
            print(f"{target.label}: {line}", file=self.out, flush=True)

    def transport(self, target: Target, messages: Sequence[str]) -> None:
        """What ssh said on a connection that worked (a new host key, a banner)."""
        for message in messages:
            if self.json_lines:
                print(json.dumps({"node": target.label, "event": "transport",
                                  "message": message}), file=self.out, flush=True)
            else:
                print(f"{target.label}: {message}", file=self.err, flush=True)

    def failure(self, target: Target, why: str) -> None:
        if self.json_lines:
            print(json.dumps({"node": target.label, "event": "failed", "error": why}),
                  file=self.out, flush=True)
        else:
            print(f"{target.label}: failed: {why}", file=self.err, flush=True)


def _status_line(st: Status) -> str:
    raw = st.raw
    gpus = raw.get("gpus") or []
    return (f"{st.state}, {len(st.assignments)} assignment(s), {st.running_tasks} task(s); "
            f"free RAM {raw.get('free_ram')}/{raw.get('ram')} MB, {raw.get('cpus')} CPUs"
            + (f", {len(gpus)} GPU(s)" if gpus else "")
            + f"; farmnode {raw.get('version')} on {raw.get('agent_hostname')}")


def _task_lines(tasks: list[dict[str, Any]]) -> list[str]:
    from farmnode.cli.main import TASK_HEADER, _fmt_task

    return [TASK_HEADER, *map(_fmt_task, tasks)] if tasks else ["no tasks"]


async def _drain(target: Target, agent: NodeAgent, printer: Printer) -> Outcome:
    changes = await agent.watch_idle()
    await agent.set_state("disabled")
    st = await agent.status()
    if st.assignments:
        printer.lines(target, [f"disabled; waiting for {len(st.assignments)} running "
                               f"assignment(s): {', '.join(st.assignments)}"],
                      {"state": st.state, "assignments": list(st.assignments)}, "draining")
    while st.assignments:
        try:
            change = await asyncio.wait_for(changes.get(), DRAIN_RECHECK)
        except TimeoutError:
            change = ""
        if change == "restarted":
            # A new agent process starts online: the drain holds for it too.
            await agent.set_state("disabled")
        st = await agent.status()
    printer.lines(target, ["idle (disabled, nothing running)"], {"state": st.state}, "idle")
    return Outcome(target, True, "idle", {"state": st.state})


async def _answer(target: Target, agent: NodeAgent, cmd: Command,
                  printer: Printer) -> Outcome:
    if cmd.name == "status":
        st = await agent.status()
        printer.lines(target, [_status_line(st)], st.raw)
        return Outcome(target, True, st.state, st.raw)
    if cmd.name == "tasks":
        tasks = await agent.tasks(cmd.active_only)
        printer.lines(target, _task_lines(tasks), tasks)
        return Outcome(target, True, f"{len(tasks)} task(s)", tasks)
    if cmd.name == "cancel":
        stopped = await agent.cancel(cmd.task)
        text = {True: f"task {cmd.task}: stopping", False: f"task {cmd.task}: not running",
                None: f"no task {cmd.task} here"}[stopped]
        data = {"task": cmd.task, "stopped": bool(stopped), "known": stopped is not None}
        printer.lines(target, [text], data)
        return Outcome(target, True, text, data, held=stopped is not None)
    if cmd.name == "state":
        await agent.set_state(cmd.state)
        printer.lines(target, [f"agent {cmd.state}"], {"state": cmd.state})
        return Outcome(target, True, cmd.state, {"state": cmd.state})
    if cmd.name == "drain":
        return await _drain(target, agent, printer)
    raise ValueError(f"not a fleet command: {cmd.name}")


async def _one(target: Target, cmd: Command, printer: Printer,
               gate: asyncio.Semaphore | None) -> Outcome:
    t0 = time.monotonic()
    async with gate if gate is not None else contextlib.nullcontext():
        conn = None
        try:
            conn = open_bus(target)
            outcome = await _answer(target, NodeAgent(conn.bus), cmd, printer)
            printer.transport(target, conn.transport_messages())
        except OpenFailed as exc:
            outcome = Outcome(target, False, str(exc))
        except Lost as exc:
            said = await conn.final_messages() if conn is not None else []
            # ssh's last line is the cause ("Could not resolve hostname …"); sd-bus only
            # knows that the connection ended.
            why = f"{said[-1]} ({exc})" if said else str(exc)
            outcome = Outcome(target, False, f"cannot reach the node: {why}")
        except Refused as exc:
            outcome = Outcome(target, False, f"refused: {exc}")
        except Exception as exc:  # one node's surprise must not end the others' answers
            outcome = Outcome(target, False, f"{exc.__class__.__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()
    outcome.seconds = time.monotonic() - t0
    if not outcome.ok:
        printer.failure(target, outcome.text)
    return outcome


def _more_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def summarise(outcomes: Sequence[Outcome], cmd: Command, seconds: float) -> tuple[bool, str]:
    failed = [o for o in outcomes if not o.ok]
    ok = not failed
    text = (f"{len(outcomes) - len(failed)} of {len(outcomes)} node(s) succeeded "
            f"in {seconds:.2f} s")
    if failed:
        text += "; failed: " + ", ".join(o.target.label for o in failed)
    if cmd.name == "cancel" and not any(o.held for o in outcomes):
        ok = False
        text += f"; no node has task {cmd.task}"
    return ok, text


async def run(targets: Sequence[Target], cmd: Command, printer: Printer,
              on_done: Callable[[Outcome], None] | None = None) -> tuple[bool, list[Outcome]]:
    _more_descriptors()
    gate = None if cmd.name == "drain" else asyncio.Semaphore(MAX_PARALLEL)
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    for fut in asyncio.as_completed([_one(t, cmd, printer, gate) for t in targets]):
        outcome = await fut
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    seconds = time.monotonic() - t0
    ok, text = summarise(outcomes, cmd, seconds)
    order = {t: i for i, t in enumerate(targets)}
    outcomes.sort(key=lambda o: order[o.target])
    if printer.json_lines:
        print(json.dumps({"summary": {
            "ok": ok, "seconds": round(seconds, 3), "text": text,
            "nodes": {o.target.label: {"ok": o.ok, "result": o.text,
                                       "seconds": round(o.seconds, 3)} for o in outcomes}}}),
            file=printer.out, flush=True)
    else:
        print(f"fleet: {text}", file=printer.out, flush=True)
    return ok, outcomes
