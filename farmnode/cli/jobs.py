"""`farmnode submit`, `farmnode jobs`, and the tree `farmnode tasks` draws.

The job file's Jinja is rendered here, in the caller's process (the user's template, the
user's rights); the agent's SubmitJobs validates the result, so both the node's own queue
and a master get only checked jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from typing import Any

from farmnode.cli import progress

REFRESH = 1.0  # s: at the latest, the tree is read again (a job's state can change alone)
# An agent that went while a submission was in flight (restart, crash) is asked again for
# this long; its systemd restarts it well within (RestartSec= plus the agent's start).
SUBMIT_RETRY_FOR = 120.0
SUBMIT_RETRY_PAUSE = 0.5


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("submit", help="submit a job file (YAML with Jinja): run here, or on "
                       "the master's farm when one is configured")
    s.add_argument("file", help="job file, - for standard input")
    s.add_argument("-D", "--define", action="append", default=[], metavar="NAME=VALUE",
                   help="a Jinja variable (repeatable)")
    s.add_argument("--wait", action="store_true",
                   help="draw the jobs' progress until every one has finished")
    sub.add_parser("jobs", help="the job-file jobs queued or submitted here")


def _read(args: argparse.Namespace) -> tuple[str, str]:
    from farmnode.cli.main import EXIT_USAGE, CliError

    if args.file == "-":
        return "<stdin>", sys.stdin.read()
    try:
        with open(args.file, encoding="utf-8") as f:
            return args.file, f.read()
    except UnicodeDecodeError:
        raise CliError(f"{args.file}: not UTF-8 text", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"{args.file}: {exc.strerror}", EXIT_USAGE) from None


async def submit(args: argparse.Namespace) -> int:
    from farmnode.cli.main import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _print, _proxy
    from farmnode.jobfile.render import RenderError, render

    variables: dict[str, str] = {}
    for item in args.define:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise CliError(f"-D {item!r}: expected NAME=VALUE", EXIT_USAGE)
        variables[name] = value
    name, text = _read(args)
    try:
        rendered = render(text, name, variables)
    except RenderError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    bus, proxy = await _proxy()
    changes = await _changes(bus) if args.wait else None
    jobs = json.loads(await _submit_once(proxy, name, rendered.text,
                                         list(rendered.source_lines)))
    if not args.wait:
        _print(args, jobs, "\n".join(_job_line(j) for j in jobs))
        return EXIT_OK
    assert changes is not None
    ids = {j["id"] for j in jobs}
    if any(j.get("master_job_id") is not None for j in jobs):
        _print(args, jobs, "\n".join(_job_line(j) for j in jobs))
        return EXIT_OK  # the master's farm runs them; its UI follows them
    final = await follow(args, proxy, changes, ids)
    return EXIT_OK if all(j["state"] == "done" for j in final) else EXIT_FAIL


async def _submit_once(proxy: Any, name: str, text: str, lines: list[int]) -> str:
    """SubmitJobs, called again with the same token when the agent went before it answered
    (killed, restarted): the agent stores what one token brings once, so a retry whose
    first call was stored answers with those jobs instead of queueing them twice."""
    from sdbus.dbus_exceptions import DbusDisconnectedError, DbusNoReplyError

    token = str(uuid.uuid4())
    deadline = time.monotonic() + SUBMIT_RETRY_FOR
    while True:
        try:
            return str(await proxy.submit_jobs(name, text, lines, token))
        except (DbusNoReplyError, DbusDisconnectedError) as exc:
            if time.monotonic() > deadline:
                raise
            print(f"farmnode: the agent went before it answered ({exc}); asking its "
                  "successor (submission " + token + ")", file=sys.stderr)
        except Exception as exc:
            # While the agent restarts its name has no owner: the successor is awaited.
            error = str(getattr(exc, "dbus_error_name", ""))
            name_gone = error.endswith(("ServiceUnknown", "NameHasNoOwner")) \
                or ".Spawn." in error
            if not name_gone or time.monotonic() > deadline:
                raise
        await asyncio.sleep(SUBMIT_RETRY_PAUSE)


def _job_line(j: dict[str, Any]) -> str:
    where = (f"master job {j['master_job_id']}" if j.get("master_job_id") is not None
             else f"job {j['id']}")
    deps = f" after {', '.join(j['dependencies'])}" if j["dependencies"] else ""
    why = f"  {j['reason']}" if j.get("reason") else ""
    return f"{where:>16}  {j['name']:<20} {j['state']:<9} {j['frames']:>5} frame(s){deps}{why}"


async def list_jobs(args: argparse.Namespace, proxy: Any) -> int:
    from farmnode.cli.main import EXIT_OK, _print

    jobs = json.loads(await proxy.list_jobs())
    _print(args, jobs, "\n".join(_job_line(j) for j in jobs) or "no jobs")
    return EXIT_OK


async def _changes(bus: Any) -> asyncio.Queue[Any]:
    from farmnode.cli.main import _subscribe

    return await _subscribe(bus)


async def follow(args: argparse.Namespace, proxy: Any, changes: asyncio.Queue[Any],
                 job_ids: set[int] | None) -> list[dict[str, Any]]:
    """Draw the tree until everything shown has finished; the jobs' final records.

    `job_ids` None follows what is active now and what becomes active meanwhile; a job or
    task stays in the tree once shown, so its end is drawn too."""
    tty = sys.stdout.isatty() and not args.json
    drawn = 0
    printed: dict[tuple[int, int | None], str] = {}
    shown_jobs: set[int] = set(job_ids or ())
    shown_tasks: set[int] = set()
    while True:
        all_jobs = json.loads(await proxy.list_jobs())
        all_tasks = json.loads(await proxy.list_tasks(False))
        if job_ids is None:
            shown_jobs |= {j["id"] for j in all_jobs if j["state"] in ("queued", "running")}
            shown_tasks |= {t["id"] for t in all_tasks if t["state"] not in progress.FINISHED}
        jobs = [j for j in all_jobs if j["id"] in shown_jobs]
        shown_tasks |= {i for j in jobs for i in j["tasks"]}
        nodes = progress.build([t for t in all_tasks if t["id"] in shown_tasks], jobs)
        if args.json:
            pass
        elif tty:
            lines = progress.draw(nodes)
            # Up to the first line drawn last time, clear to the end, draw again.
            sys.stdout.write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines)
                             + "\n")
            sys.stdout.flush()
            drawn = len(lines)
        else:
            for key, line in progress.plain(nodes).items():
                if printed.get(key) != line:
                    print(line, flush=True)
                    printed[key] = line
        if progress.finished(nodes) and all(j["state"] in ("done", "failed") for j in jobs):
            if args.json:
                print(json.dumps(jobs, indent=2))
            return jobs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changes.get(), timeout=REFRESH)
        await asyncio.sleep(0.1)  # a burst of changes is drawn once
        while not changes.empty():
            changes.get_nowait()


async def tasks(args: argparse.Namespace, bus: Any, proxy: Any) -> int:
    """`farmnode tasks` for people: the tree once, or redrawn (--follow) until idle."""
    from farmnode.cli.main import EXIT_OK

    if args.follow:
        await follow(args, proxy, await _changes(bus), None)
        return EXIT_OK
    all_tasks = json.loads(await proxy.list_tasks(args.active))
    jobs = json.loads(await proxy.list_jobs())
    nodes = progress.build(all_tasks, [j for j in jobs if j["tasks"] or
                                       j["state"] in ("queued", "running")])
    print("\n".join(progress.draw(nodes)) or "no tasks")
    return EXIT_OK
