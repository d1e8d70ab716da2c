"""`farmnode`: status, tasks, assign, submit, jobs, cancel, logs, state, run."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farmnode", description="farmnode render-node agent")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-H", "--host", action="append", default=[], metavar="[USER@]HOST,…",
                   help="run on these nodes over ssh (status, tasks, cancel, state, drain)")
    p.add_argument("-M", "--machine", action="append", default=[], metavar="MACHINE,…",
                   help="run on these local containers (systemd-machined)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("status", help="the agent's state and resources")
    t = sub.add_parser("tasks", help="list tasks")
    t.add_argument("--active", action="store_true", help="only tasks of running assignments")
    t.add_argument("--follow", action="store_true",
                   help="redraw the progress tree until no task runs")
    a = sub.add_parser("assign", help="assign a job's tasks from a YAML or JSON file")
    a.add_argument("file", help="assignment file, - for standard input")
    a.add_argument("--wait", action="store_true", help="wait until every task has finished")
    w = sub.add_parser("wait", help="wait for an assignment's tasks to start or finish")
    w.add_argument("assignment")
    w.add_argument("--until", choices=["running", "finished"], default="finished")
    from farmnode.cli import jobs

    jobs.add_parsers(sub)
    c = sub.add_parser("cancel", help="stop the assignment holding a task")
    c.add_argument("task", type=int)
    lg = sub.add_parser("logs", help="a task's output, from the journal")
    lg.add_argument("task", type=int)
    lg.add_argument("-f", "--follow", action="store_true")
    s = sub.add_parser("state", help="set the agent online or disabled")
    s.add_argument("state", choices=["online", "disabled"])
    sub.add_parser("drain", help="take no new work, wait until running tasks have finished")
    r = sub.add_parser("run", help="run the agent in the foreground (what farmnode.service runs)")
    r.add_argument("--config", default="/etc/farmnode/farmnode.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    r.add_argument("--master", help="the master's host[:port] (config: master)")
    r.add_argument("--port", type=int, help="HTTP API port (config: agent_api_port)")
    return p


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


async def _proxy() -> Any:
    from sdbus import sd_bus_open_system

    from farmnode.bus.interface import BUS_NAME, OBJECT_PATH, Agent1Interface

    try:
        bus = sd_bus_open_system()
    except Exception as exc:  # sdbus raises its own SdBusLibraryError here
        raise CliError(f"cannot connect to the system bus ({exc.__class__.__name__}: "
                       f"{str(exc).rsplit(':', 1)[-1].strip()}); is dbus running?",
                       EXIT_UNAVAILABLE) from None
    return bus, Agent1Interface.new_proxy(BUS_NAME, OBJECT_PATH, bus)


def _dbus_error(exc: Exception) -> CliError:
    name = getattr(exc, "dbus_error_name", "")
    msg = str(exc.args[0] if exc.args else exc)
    if name.endswith("AccessDenied"):
        return CliError(f"permission denied ({msg}); mutating calls need root or group farmnode")
    if name.endswith(("ServiceUnknown", "NameHasNoOwner", "NoReply", "Spawn.ServiceNotFound")):
        return CliError(f"the farmnode agent is not reachable: {msg}", EXIT_UNAVAILABLE)
    return CliError(msg)


def _fmt_task(t: dict[str, Any]) -> str:
    frame = int(t["frame"]) if float(t["frame"]).is_integer() else t["frame"]
    reason = f"  {t['reason']}" if t.get("reason") else ""
    return (f"{t['id']:>8}  {t['job_id']:>6}  {frame!s:>7}  {t['state']:<9} "
            f"{t['progress'] * 100:5.1f}%  {t['unit']}{reason}")


TASK_HEADER = f"{'TASK':>8}  {'JOB':>6}  {'FRAME':>7}  {'STATE':<9} {'PROG':>6}  UNIT"


async def _assign(args: argparse.Namespace) -> int:
    from farmnode.tasks.schema import (
        AssignmentError,
        load_assignment_file,
        parse_assignment_text,
    )

    try:
        # stdin is read, not reopened: /dev/stdin of a pipe another user made is not ours
        payload = (parse_assignment_text(sys.stdin.read(), "<stdin>") if args.file == "-"
                   else load_assignment_file(args.file))
    except AssignmentError as exc:
        raise CliError(str(exc) if exc.field in (args.file, "<stdin>") else f"{args.file}: {exc}",
                       EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"{args.file}: {exc.strerror}", EXIT_USAGE) from None
    bus, proxy = await _proxy()
    if not args.wait:
        assignment_id = await proxy.assign(json.dumps(payload))
        _print(args, {"id": assignment_id}, assignment_id)
        return EXIT_OK
    return await _assign_and_wait(args, bus, proxy, payload)


async def _assign_and_wait(args: argparse.Namespace, bus: Any, proxy: Any, payload: Any) -> int:
    changes = await _subscribe(bus)
    assignment_id = await proxy.assign(json.dumps(payload))
    return await _wait(args, proxy, changes, assignment_id, "finished")


TaskChanges = asyncio.Queue[tuple[str, dict[str, Any]]]
RESYNC: tuple[str, dict[str, Any]] = ("", {})  # in the queue of changes: read every task again


async def _subscribe(bus: Any) -> TaskChanges:
    """PropertiesChanged of the agent's task objects, as (path, {property: value})."""
    from farmnode.bus.interface import BUS_NAME
    from farmnode.bus.task1 import TASK_INTERFACE, TASK_PATH_PREFIX

    changes: TaskChanges = asyncio.Queue()

    def changed(m: Any) -> None:
        if not str(m.path or "").startswith(TASK_PATH_PREFIX + "/"):
            return
        interface, props, _invalidated = m.get_contents()
        if interface == TASK_INTERFACE:
            changes.put_nowait((m.path, {k: v for k, (_sig, v) in props.items()}))

    slot = await bus.match_signal_async(BUS_NAME, None, "org.freedesktop.DBus.Properties",
                                        "PropertiesChanged", changed)

    def owner_changed(m: Any) -> None:
        # A new agent process (restart, upgrade, crash): a change its predecessor stored but
        # never signalled would be missed, so the waiter reads the tasks again.
        name, _old, new = m.get_contents()
        if name == BUS_NAME and new:
            changes.put_nowait(RESYNC)

    owner_slot = await bus.match_signal_async(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "NameOwnerChanged", owner_changed)
    # keeps the matches alive with the queue
    changes.slots = (slot, owner_slot)  # type: ignore[attr-defined]
    return changes


FINISHED = ("done", "failed", "cancelled")


async def _wait(args: argparse.Namespace, proxy: Any, changes: TaskChanges,
                assignment_id: str, until: str) -> int:
    """Follow the task objects' PropertiesChanged; the match is in place before the
    snapshot, so no change can slip between the two."""
    from farmnode.bus.client import task_views
    from farmnode.bus.task1 import task_id_of
    from farmnode.bus.views import TaskView

    tasks = {v.id: v for v in await task_views(proxy) if v.assignment_id == assignment_id}
    if not tasks:
        raise CliError(f"no assignment {assignment_id} on this node")
    if not args.json:
        print(f"assignment {assignment_id}: {len(tasks)} task(s)", flush=True)

    def reached() -> bool:
        if until == "running":
            return all(t.state != "queued" for t in tasks.values())
        return all(t.state in FINISHED for t in tasks.values())

    def show(new: TaskView) -> None:
        old = tasks[new.id]
        if (old.state, old.progress) != (new.state, new.progress) and not args.json:
            print(f"task {new.id}: {new.state} {new.progress * 100:.0f}%"
                  + (f" ({new.reason})" if new.reason else ""), flush=True)
        tasks[new.id] = new

    while not reached():
        path, changed = await changes.get()
        if (path, changed) == RESYNC:
            from sdbus.dbus_exceptions import DbusDisconnectedError, DbusNoReplyError

            try:
                views = await task_views(proxy)
            except (DbusNoReplyError, DbusDisconnectedError):
                # That agent went while answering (killed as it was asked): its successor's
                # NameOwnerChanged brings another resync.
                continue
            for v in views:
                if v.id in tasks and v.assignment_id == assignment_id:
                    show(v)
            continue
        task_id = task_id_of(path)
        if task_id not in tasks:
            continue
        new = tasks[task_id].updated(changed)
        if new.assignment_id == assignment_id:  # not a later retry of the same task id
            show(new)
    final = sorted(tasks.values(), key=lambda v: (-v.created, v.frame))
    if args.json:
        print(json.dumps({"id": assignment_id, "tasks": [v.to_record_dict() for v in final]},
                         indent=2))
    if until == "running":
        return EXIT_OK
    return EXIT_FAIL if any(t.state != "done" for t in final) else EXIT_OK


def _workstation_lines(ws: dict[str, Any]) -> str:
    paused = ", ".join(ws["paused_units"]) or "none"
    out = (f"\nworkstation: {'rendering' if ws['rendering'] else 'paused'} "
           f"(pause: {ws['pause']}; paused scopes: {paused})")
    for s in ws["sessions"]:
        out += (f"\nsession {s['id']}: {s['user']} {s['type']} "
                f"{s['seat'] or s['tty'] or 'no seat'}"
                f"{' remote' if s['remote'] else ''}{' idle' if s['idle_hint'] else ''}"
                f"{'' if s['counted'] else ' (not counted)'}")
    return out


def status_text(st: dict[str, Any]) -> str:
    """`farmnode status` for people: the status record's keys, one a line."""
    human = "\n".join(f"{k}: {v}" for k, v in st.items()
                       if k not in ("gpus", "workstation", "health"))
    if st.get("workstation"):
        human += _workstation_lines(st["workstation"])
    for c in (st.get("health") or {}).get("checks", []):
        verdict = {True: "ok", False: "FAILING", None: "not run yet"}[c["ok"]]
        human += f"\nhealth {c['name']}: {verdict}" + (
            f" ({c['detail']}): {' | '.join(c['output'])}" if c["output"] else "")
    for g in st.get("gpus") or []:
        human += f"\ngpu {g['id']} ({g['name']}, {g['pci_slot']}): " + (
            f"assignment {g['assignment']}" if g["assignment"] else "free")
    return human


async def _client(args: argparse.Namespace) -> int:
    from farmnode.cli import jobs

    if args.command == "assign":
        return await _assign(args)
    if args.command == "submit":
        return await jobs.submit(args)
    bus, proxy = await _proxy()
    if args.command == "jobs":
        return await jobs.list_jobs(args, proxy)
    if args.command == "tasks" and not args.json:
        return await jobs.tasks(args, bus, proxy)
    if args.command == "wait":
        changes = await _subscribe(bus)
        return await _wait(args, proxy, changes, args.assignment, args.until)
    if args.command == "status":
        from farmnode.bus.client import MissingProperty, agent_properties, status_record

        try:
            st = status_record(await agent_properties(proxy))
        except MissingProperty as exc:
            raise CliError(str(exc)) from None
        _print(args, st, status_text(st))
    elif args.command == "tasks":
        from farmnode.bus.client import task_views

        tasks = [v.to_record_dict() for v in await task_views(proxy, args.active)]
        _print(args, tasks, "\n".join([TASK_HEADER, *map(_fmt_task, tasks)]))
    elif args.command == "cancel":
        stopped = await _cancel(proxy, args.task)
        _print(args, {"task": args.task, "stopped": stopped},
               f"task {args.task}: " + ("stopping" if stopped else "not running"))
        return EXIT_OK if stopped else EXIT_FAIL
    elif args.command == "state":
        await proxy.set_state(args.state)
        # The state the node is in now: a failing health check keeps it disabled.
        state, reason = await proxy.state, await proxy.state_reason
        _print(args, {"state": state, "state_reason": reason or None},
               f"agent {state}" + (f" ({reason})" if reason else ""))
    elif args.command == "logs":
        await proxy.get_task(args.task)  # a clear error for an unknown task
        return _logs(args)
    return EXIT_OK


async def _cancel(proxy: Any, task_id: int) -> bool:
    from sdbus.dbus_exceptions import DbusFailedError

    from farmnode.bus.client import no_such_object, task_proxy

    try:
        stopped: bool = await task_proxy(proxy, task_id).cancel()
    except DbusFailedError as exc:
        if no_such_object(exc):
            raise CliError(f"no task {task_id} on this node (running, or finished within "
                           "agent_task_object_retention)") from None
        raise
    return stopped


def _logs(args: argparse.Namespace) -> int:
    from systemd import journal

    from farmnode.systemd.journal import stream_of

    reader = journal.Reader(flags=journal.SYSTEM)
    reader.add_match(FARMNODE_TASK=str(args.task))
    lines = {"stdout": 0, "stderr": 0}

    def show(entry: dict[str, Any]) -> None:
        stream = stream_of(entry)
        if stream is None:
            return
        lines[stream] += 1
        message = entry.get("MESSAGE", "")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if args.json:
            print(json.dumps({
                "time": entry["__REALTIME_TIMESTAMP"].isoformat(),
                "stream": stream,
                "line": lines[stream],
                "message": message,
            }), flush=True)
        else:
            ts = time.strftime("%H:%M:%S", entry["__REALTIME_TIMESTAMP"].timetuple())
            print(f"{ts} {stream:<6} {message}", flush=True)

    for entry in reader:
        show(entry)
    while args.follow:
        if reader.wait(1.0) == journal.APPEND:
            for entry in reader:
                show(entry)
    return EXIT_OK


def _run_agent(args: argparse.Namespace) -> int:
    from farmnode.agent.main import run
    from farmnode.config import SETTINGS, ConfigError, load_config

    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set {item!r}: expected KEY=VALUE", EXIT_USAGE)
        key = key.strip()
        if key in SETTINGS and SETTINGS[key].base is tuple:
            # A list of entries (webhooks) has no one-line form that reads better than its
            # YAML; and the value is not repeated here: a webhook's URL may carry a token.
            dropins = Path(args.config).parent / "conf.d"
            raise CliError(f"--set {key}: a list of entries cannot be set on the command "
                           f"line; write it in a drop-in file under {dropins}/ (e.g. "
                           f"{dropins}/50-{key}.yaml; farmnode.yaml(5))", EXIT_USAGE)
        overrides[key] = value
    if args.master is not None:
        overrides["master"] = args.master
    if args.port is not None:
        overrides["agent_api_port"] = str(args.port)
    try:
        config = load_config(args.config, overrides=overrides, private_secrets=True)
    except ConfigError as exc:
        raise CliError(f"configuration error: {exc}", EXIT_USAGE) from None
    return run(config)


async def _fleet(args: argparse.Namespace) -> int:
    from farmnode.fleet import fanout
    from farmnode.fleet.target import LOCAL, TargetError, parse_targets

    if args.command not in fanout.COMMANDS:
        raise CliError(f"-H/-M: {args.command} runs on one node; fleet commands are "
                       f"{', '.join(fanout.COMMANDS)}", EXIT_USAGE)
    try:
        targets = parse_targets(args.host, args.machine) or [LOCAL]
    except TargetError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    cmd = fanout.Command(args.command, task=getattr(args, "task", 0),
                         state=getattr(args, "state", ""),
                         active_only=getattr(args, "active", False))
    ok, _ = await fanout.run(targets, cmd, fanout.Printer(json_lines=args.json))
    return EXIT_OK if ok else EXIT_FAIL


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run_agent(args)
        if args.host or args.machine or args.command == "drain":
            return asyncio.run(_fleet(args))
        return asyncio.run(_client(args))
    except CliError as exc:
        print(f"farmnode: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if hasattr(exc, "dbus_error_name"):
            err = _dbus_error(exc)
            print(f"farmnode: {err}", file=sys.stderr)
            return err.code
        raise


if __name__ == "__main__":
    sys.exit(main())
