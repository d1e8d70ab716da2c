"""The endpoints: PyFarm's agent API, then ours. Each one is a thin translation of an HTTP
request into calls of org.farmnode.Agent1 (farmnode.api.client) and of the answer back.

Resource attributes read by the guard (farmnode.api.app): `produces` (media types, for 406),
`consumes` (for 415), `public` (never needs credentials).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import falcon
from sdbus import SdBus

from farmnode.api import client, formats
from farmnode.api.errors import ApiError
from farmnode.api.http import JSON, MERGE_PATCH, object_body, read_json, send_json
from farmnode.bus.interface import BUS_NAME, Agent1Interface
from farmnode.tasks.tasklog import LogEntry

# How long POST /api/v1/stop {"wait": true} waits for the agent to go (TimeoutStopSec=90s).
STOP_WAIT = 120.0
INT64_MAX = 2**63 - 1


class Resource:
    produces: ClassVar[tuple[str, ...]] = (JSON,)
    consumes: ClassVar[tuple[str, ...]] = (JSON,)
    public: ClassVar[bool] = False
    # One of PyFarm's agent endpoints: a trusted master may call it without credentials.
    pyfarm: ClassVar[bool] = False
    # Task output: needs credentials unless agent_api_output_requires_auth is false.
    output: ClassVar[bool] = False


def task_id_param(raw: str) -> int:
    """PyFarm: a task id that is not an integer is a 400."""
    if not re.fullmatch(r"[0-9]{1,19}", raw) or int(raw) > INT64_MAX:
        raise ApiError(400, f"Task id was not an integer: {raw[:40]!r}")
    return int(raw)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def task_view(t: dict[str, Any]) -> dict[str, Any]:
    """PyFarm's task keys first (id, frame, attempt, tile, local_state), then every field of
    the agent's record, including the cgroup accounting fields when the agent has them."""
    view = {"id": t["id"], "frame": _number(t.get("frame")), "attempt": t.get("attempt", 0),
            "tile": t.get("tile"), "local_state": t.get("state")}
    view.update({k: v for k, v in t.items() if k not in view})
    return view


# Named as the agent's record names them (farmnode.systemd.cgroup.read_accounting): the
# cgroup's own units, bytes and microseconds.
STAT_KEYS = ("memory_current", "memory_peak", "cpu_usage_usec", "tasks_current")


def task_stats(t: dict[str, Any]) -> dict[str, Any]:
    """A task's cgroup figures, last sampled while it ran or final after it ended; null where
    the agent has none (no sample yet, or a controller the host does not expose)."""
    accounting = t.get("accounting")
    figures = accounting if isinstance(accounting, dict) else {}
    return {"task_id": t["id"], "state": t.get("state"),
            **{k: figures.get(k) for k in STAT_KEYS}}


# ---- PyFarm's endpoints ------------------------------------------------------------------


class Versions(Resource):
    public = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, {"versions": [1]})


class Assign(Resource):
    pyfarm = True
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, required=True)
        payload = json.dumps(body)
        assignment_id: str = client.call(lambda a: a.assign(payload))
        send_json(resp, {"id": assignment_id}, 202)


class Tasks(Resource):
    pyfarm = True
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tasks = json.loads(client.call(lambda a: a.list_tasks(True)))
        send_json(resp, [task_view(t) for t in tasks])


class Task(Resource):
    pyfarm = True
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        tid = task_id_param(task_id)
        t = json.loads(client.call(lambda a: a.get_task(tid)))
        send_json(resp, {**task_view(t), "stats": task_stats(t)})

    def on_delete(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        tid = task_id_param(task_id)
        try:
            stopped: bool = client.call(lambda a: a.cancel_task(tid))
        except ApiError as exc:
            if exc.status_code != 404:
                raise
            stopped = False
        # PyFarm: 202 while the assignment holding it stops, 204 when there is nothing to stop
        resp.status = falcon.HTTP_202 if stopped else falcon.HTTP_204


class Status(Resource):
    pyfarm = True
    # PyFarm's keys the agent does not (yet) report are present as null.
    PYFARM_KEYS = ("state", "agent_hostname", "free_ram", "agent_process_ram", "consumed_ram",
                   "child_processes", "grandchild_processes", "pids", "agent_id",
                   "last_master_contact", "last_announce", "uptime", "jobs")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = json.loads(client.call(lambda a: a.get_status()))
        # PyFarm's master compares farm_name with its own whenever the key is present, null
        # included, and fails the poll on a mismatch: a node with no farm name says nothing.
        if status.get("farm_name") is None:
            status.pop("farm_name", None)
        send_json(resp, {**dict.fromkeys(self.PYFARM_KEYS), **status})


class Stop(Resource):
    pyfarm = True
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        wait = bool(object_body(req, {"wait": bool}).get("wait", False))
        client.call_with_bus(lambda bus: _stop(bus, wait))
        if wait:
            send_json(resp, {"stopped": True}, 200)
        else:
            send_json(resp, {"stopping": True}, 202)


async def _stop(bus: SdBus, wait: bool) -> None:
    gone = asyncio.Event()

    def on_owner(message: Any) -> None:
        name, _old, new = message.get_contents()
        if name == BUS_NAME and not new:
            gone.set()

    # Subscribed before the call, so the agent cannot leave unseen.
    slot = await bus.match_signal_async(client.DBUS, "/org/freedesktop/DBus", client.DBUS,
                                        "NameOwnerChanged", on_owner)
    try:
        agent = await client.agent_proxy(bus)
        await agent.stop()
        if wait:
            try:
                await asyncio.wait_for(gone.wait(), STOP_WAIT)
            except TimeoutError:
                raise ApiError(503, f"the agent did not stop within {STOP_WAIT:g}s") from None
    finally:
        del slot


class Restart(Resource):
    pyfarm = True
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        immediately = bool(object_body(req, {"immediately": bool}).get("immediately", False))
        now: bool = client.call(lambda a: a.restart(immediately))
        send_json(resp, {"restart": "now" if now else "when idle"}, 202)


class Update(Resource):
    pyfarm = True
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = object_body(req, {"version": str})
        if "version" not in body:
            raise ApiError(400, "version: is required", field="version")
        version: str = body["version"]
        client.call(lambda a: a.update(version))
        send_json(resp, {"version": version, "message": (
            "update recorded; farmnode does not replace itself: the system's package manager "
            "installs new versions")}, 202)


class Config(Resource):
    consumes = (JSON, MERGE_PATCH)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, json.loads(client.call(lambda a: a.get_config())))

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, required=True)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object of key: value")
        patch = json.dumps(body)
        send_json(resp, json.loads(client.call(lambda a: a.patch_config(patch))))


IDENTIFIER = re.compile(r"[A-Za-z0-9._-]{1,128}")


class TaskLogs(Resource):
    pyfarm = True
    output = True
    produces = ("text/csv", "text/plain")

    def on_get(self, req: falcon.Request, resp: falcon.Response, identifier: str) -> None:
        if "/" in identifier or "\\" in identifier:
            raise ApiError(400, "log_identifier must not contain directory separators")
        if not IDENTIFIER.fullmatch(identifier):
            raise ApiError(400, "log identifier must be a task id, an assignment id or "
                                "<assignment id>.csv")
        fmt = req.get_param("format")
        if fmt is None:  # Accept decides: CSV (PyFarm) unless text/plain is preferred
            fmt = "text" if req.client_prefers(["text/csv", "text/plain"]) == "text/plain" \
                else "csv"
        if fmt not in ("csv", "text"):
            raise ApiError(400, f"format must be csv or text, got {fmt[:20]!r}")
        tail = tail_param(req.get_param("tail"))
        fd: int = client.call(lambda a: a.task_log(identifier))
        resp.content_type = ("text/csv" if fmt == "csv" else "text/plain") + "; charset=utf-8"
        resp.stream = _log_stream(fd, fmt, tail)


MAX_TAIL = 10_000


def tail_param(raw: str | None) -> int | None:
    """?tail=N: only the last N lines of the log (the status page shows the end)."""
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= MAX_TAIL:
        raise ApiError(400, f"tail must be a number of lines from 1 to {MAX_TAIL}, got "
                            f"{raw[:20]!r}", field="tail")
    return int(raw)


def _log_stream(fd: int, fmt: str, tail: int | None = None) -> Iterator[bytes]:
    # The fd came over D-Bus and is ours to close; gunicorn closes the iterator on disconnect.
    with os.fdopen(fd, "rb") as f:
        entries: Iterable[LogEntry] = formats.log_entries(f)
        if tail is not None:  # read through, keeping only the last lines
            entries = collections.deque(entries, maxlen=tail)
        lines = formats.csv_rows(entries) if fmt == "csv" else formats.text_lines(entries)
        for line in lines:
            yield line.encode("utf-8")


# ---- ours ----------------------------------------------------------------------------------


class TaskStats(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        tid = task_id_param(task_id)
        send_json(resp, task_stats(json.loads(client.call(lambda a: a.get_task(tid)))))


def parse_signal(value: Any) -> signal.Signals:
    """A signal as a number or a name (TERM, SIGTERM, sigusr1)."""
    valid = signal.valid_signals()
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            sig = signal.Signals(value)
        except ValueError:
            raise ApiError(400, f"signal: {value} is not a signal number", field="signal")\
                from None
        if sig in valid:
            return sig
        raise ApiError(400, f"signal: {value} is not a signal number", field="signal")
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig_or_none = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(sig_or_none, signal.Signals) and sig_or_none in valid:
            return sig_or_none
        raise ApiError(400, f"signal: unknown signal {value[:20]!r}", field="signal")
    raise ApiError(400, "signal: expected a signal number or name", field="signal")


class TaskSignal(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        tid = task_id_param(task_id)
        body = read_json(req, required=True)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = [k for k in body if k != "signal"]
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown key (expected signal)", field=unknown[0])
        if "signal" not in body:
            raise ApiError(400, "signal: is required", field="signal")
        sig = parse_signal(body["signal"])
        sent: bool = client.call(lambda a: a.signal_task(tid, int(sig)))
        if not sent:
            raise ApiError(409, f"task {tid} is not running")
        send_json(resp, {"task_id": tid, "signal": sig.name, "number": int(sig)}, 202)


class Metrics(Resource):
    produces = (formats.PROMETHEUS_TYPE.split(";")[0], "text/*")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        async def gather(a: Agent1Interface) -> tuple[str, str, str]:
            return await a.get_status(), await a.list_tasks(False), await a.list_tasks(True)

        try:
            status, tasks, active = client.call(gather)
            text = formats.metrics(json.loads(status), json.loads(tasks), json.loads(active))
        except ApiError as exc:
            if exc.status_code != 503:
                raise
            text = formats.metrics(None, [], [])  # farmnode_up 0: the scrape itself worked
        resp.content_type = formats.PROMETHEUS_TYPE
        resp.text = text


class OpenApi(Resource):
    public = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        from farmnode.api.openapi import document

        send_json(resp, document())
