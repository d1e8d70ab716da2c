"""GET /api/v1/events: server-sent events of task and agent changes.

The stream relays the agent's D-Bus signals (TaskChanged, StateChanged) and the bus's
NameOwnerChanged for the agent (offline when it leaves). The match is installed before the
first event (the agent's current state) is read, so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import falcon

from farmnode.api import client
from farmnode.api.errors import ApiError
from farmnode.api.resources import Resource
from farmnode.bus.interface import BUS_NAME, INTERFACE, OBJECT_PATH, Agent1Interface

HEARTBEAT = 15.0  # a comment line this often: proxies keep the stream, dead peers are noticed
EVENT_STREAM = "text/event-stream"


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

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        slots = client.call_with_bus(lambda bus: _subscribe(bus, queue))
        try:
            state = json.loads(client.call(lambda a: a.get_status())).get("state", "unknown")
        except ApiError as exc:
            if exc.status_code != 503:
                raise
            state = "offline"
        resp.content_type = EVENT_STREAM
        resp.set_header("Cache-Control", "no-store")
        resp.stream = _stream(queue, slots, state)


async def _subscribe(bus: Any, queue: asyncio.Queue[bytes]) -> list[Any]:
    pending: set[asyncio.Task[None]] = set()

    def on_agent(message: Any) -> None:
        event = signal_event(message.member, message.get_contents())
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


def _stream(queue: asyncio.Queue[bytes], slots: list[Any], state: str) -> Iterator[bytes]:
    try:
        yield b"retry: 2000\n\n"
        yield sse("agent", {"state": state})
        while True:
            try:
                yield client.run(asyncio.wait_for(queue.get(), HEARTBEAT))
            except TimeoutError:
                yield b": keep-alive\n\n"
    finally:
        slots.clear()  # dropping the slots removes the matches
