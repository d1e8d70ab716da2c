"""GET /api/v1/events: server-sent events of task and agent changes.

The stream relays the agent's D-Bus signals (TaskChanged, StateChanged) and the bus's
NameOwnerChanged for the agent (offline when it leaves), and samples the node's status for
what no signal tells (farmnode.api.node_events). The match is installed before the first
event (the agent's current state) is read, so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import falcon

from farmnode.api import client
from farmnode.api.errors import ApiError
from farmnode.api.node_events import NodeWatch
from farmnode.api.resources import Resource
from farmnode.bus.interface import BUS_NAME, INTERFACE, OBJECT_PATH, Agent1Interface

HEARTBEAT = 15.0  # a comment line this often: proxies keep the stream, dead peers are noticed
EVENT_STREAM = "text/event-stream"
# Each stream holds one of gunicorn's 32 threads for as long as it lasts: together they may
# hold at most these, the rest stay for requests. Streams of clients without credentials
# (only with agent_api_output_requires_auth: false) have their own, smaller share, so they
# cannot take the authenticated clients' streams either.
MAX_STREAMS = 8
MAX_PUBLIC_STREAMS = 4
RETRY_AFTER = "5"


class StreamSlots:
    """How many streams are open, of each kind; a stream takes a slot or is refused."""

    def __init__(self, limits: dict[bool, int]) -> None:
        self._lock = threading.Lock()
        self._limits = limits
        self._open = dict.fromkeys(limits, 0)

    def take(self, authenticated: bool) -> bool:
        with self._lock:
            if self._open[authenticated] >= self._limits[authenticated]:
                return False
            self._open[authenticated] += 1
            return True

    def give_back(self, authenticated: bool) -> None:
        with self._lock:
            self._open[authenticated] -= 1

    def open(self, authenticated: bool) -> int:
        with self._lock:
            return self._open[authenticated]


slots = StreamSlots({True: MAX_STREAMS, False: MAX_PUBLIC_STREAMS})


class _Held:
    """A stream that gives its slot back when the server closes it: at its end, on a write
    that failed, or before its first byte (a generator never started runs no `finally`)."""

    def __init__(self, stream: Iterator[bytes], authenticated: bool) -> None:
        self._stream = stream
        self._authenticated = authenticated
        self._held = True

    def __iter__(self) -> _Held:
        return self

    def __next__(self) -> bytes:
        return next(self._stream)

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            if self._held:
                self._held = False
                slots.give_back(self._authenticated)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def signal_event(member: str, args: tuple[Any, ...]) -> bytes | None:
    if member == "TaskChanged":
        assignment_id, task_id, state, reason, progress = args
        return sse("task", {"assignment_id": assignment_id, "task_id": task_id, "state": state,
                            "reason": reason or None, "progress": progress})
    if member == "StateChanged":
        return sse("agent", {"state": args[0]})
    return None


class Events(Resource):
    produces = (EVENT_STREAM,)

    output = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        authenticated = bool(getattr(req.context, "authenticated", False))
        if not slots.take(authenticated):
            limit = MAX_STREAMS if authenticated else MAX_PUBLIC_STREAMS
            who = "" if authenticated else " without credentials"
            raise ApiError(503, f"too many event streams{who} are open (at most {limit}); "
                                "try again later",
                           headers={"Retry-After": RETRY_AFTER, "Connection": "close"})
        try:
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            watch = NodeWatch(next_sample=time.monotonic())
            matches = client.call_with_bus(lambda bus: _subscribe(bus, queue, watch))
            try:
                status = json.loads(client.call(lambda a: a.get_status()))
                state = status.get("state", "unknown")
            except ApiError as exc:
                if exc.status_code != 503:
                    raise
                status, state = None, "offline"
        except BaseException:
            slots.give_back(authenticated)
            raise
        resp.content_type = EVENT_STREAM
        resp.set_header("Cache-Control", "no-store")
        resp.stream = _Held(_stream(queue, matches, state, watch, status), authenticated)


async def _subscribe(bus: Any, queue: asyncio.Queue[bytes], watch: NodeWatch) -> list[Any]:
    pending: set[asyncio.Task[None]] = set()

    def on_agent(message: Any) -> None:
        contents = message.get_contents()
        watch.saw(message.member, contents, time.monotonic())
        event = signal_event(message.member, contents)
        if event is not None:
            queue.put_nowait(event)

    def on_owner(message: Any) -> None:
        name, _old, new = message.get_contents()
        if name != BUS_NAME:
            return
        if not new:
            queue.put_nowait(sse("agent", {"state": "offline"}))
        else:  # held until done: the loop keeps only a weak reference to a task
            task = asyncio.get_running_loop().create_task(_announce(bus, new, queue))
            pending.add(task)
            task.add_done_callback(pending.discard)

    return [
        await bus.match_signal_async(BUS_NAME, OBJECT_PATH, INTERFACE, None, on_agent),
        await bus.match_signal_async(client.DBUS, "/org/freedesktop/DBus", client.DBUS,
                                     "NameOwnerChanged", on_owner),
    ]


async def _announce(bus: Any, owner: str, queue: asyncio.Queue[bytes]) -> None:
    """A (re)started agent: tell its state (it emits no StateChanged for its first one)."""
    try:
        status = json.loads(await Agent1Interface.new_proxy(owner, OBJECT_PATH, bus)
                            .get_status())
        queue.put_nowait(sse("agent", {"state": status.get("state", "unknown")}))
    except Exception:
        pass


def _node_status() -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = json.loads(client.call(lambda a: a.get_status()))
    except ApiError:  # the agent is away: its NameOwnerChanged says offline
        return None
    return status


def _stream(queue: asyncio.Queue[bytes], slots: list[Any], state: str, watch: NodeWatch,
            status: dict[str, Any] | None) -> Iterator[bytes]:
    try:
        yield b"retry: 2000\n\n"
        yield sse("agent", {"state": state})
        view = watch.sampled(status, time.monotonic())
        if view is not None:
            yield sse("node", view)
        written = time.monotonic()
        while True:
            now = time.monotonic()
            if watch.due(now):
                view = watch.sampled(_node_status(), now)
                if view is not None:
                    written = now
                    yield sse("node", view)
                continue
            if now - written >= HEARTBEAT:
                written = now
                yield b": keep-alive\n\n"
                continue
            wait = min(watch.next_sample, written + HEARTBEAT) - now
            try:
                event = client.run(asyncio.wait_for(queue.get(), wait))
            except TimeoutError:
                continue
            written = time.monotonic()
            yield event
    finally:
        slots.clear()  # dropping the slots removes the matches
